//! The shipped base model of the tiny R1-Zero demo (models/tiny-base, configs/tiny.toml): it is
//! small, loads, and answers held-out synthetic problems in the format, some but not most of
//! them correctly — the starting point GRPO has to improve.

use std::path::{Path, PathBuf};

use grpo::config::Config;
use grpo::eval::{self, EvalOptions};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// configs/tiny.toml with paths made absolute and the data written as scripts/demo.sh writes
/// it (only the first problems of the test split are evaluated).
fn demo_config(dir: &Path) -> Config {
    let data = dir.join("tiny");
    grpo::synth::write_dataset(&data, 20_000, 500, 1, 20).unwrap();
    let sets = [
        format!(
            "model_name_or_path={}",
            repo().join("models/tiny-base").display()
        ),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", dir.join("out").display()),
    ];
    Config::load(Some(&repo().join("configs/tiny.toml")), &sets).unwrap()
}

#[test]
fn the_shipped_base_model_is_a_few_megabytes() {
    let weights = repo().join("models/tiny-base/model.safetensors");
    let bytes = std::fs::metadata(&weights).unwrap().len();
    assert!(bytes < 8 << 20, "{} is {bytes} bytes", weights.display());
}

#[test]
fn the_base_model_answers_in_format_and_some_but_not_most_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(dir.path());
    let report = eval::run(
        &config,
        &EvalOptions {
            limit: Some(40),
            num_samples: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        report.format_rate >= 0.9,
        "format rate {}",
        report.format_rate
    );
    assert!(
        report.accuracy > 0.0 && report.accuracy < 0.5,
        "accuracy {} on 40 held-out problems",
        report.accuracy
    );
}
