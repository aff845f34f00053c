//! The `grpo` binary: help text, `--print-config`, exit codes and error messages.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use grpo::config::Config;
use predicates::prelude::*;

fn grpo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grpo"));
    cmd.env_remove("RUST_LOG");
    cmd
}

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/qwen05b.toml")
}

#[test]
fn help_lists_every_subcommand() {
    let mut assert = grpo().arg("--help").assert().success();
    for name in [
        "train",
        "eval",
        "sample",
        "score",
        "--verbose",
        "RUST_LOG",
        "--config",
    ] {
        assert = assert.stdout(predicate::str::contains(name));
    }
}

#[test]
fn subcommand_help_explains_every_flag() {
    for (command, flags) in [
        ("train", &["--config", "--set", "--print-config"][..]),
        (
            "eval",
            &[
                "--checkpoint",
                "--split",
                "--limit",
                "--num-samples",
                "--print-config",
            ],
        ),
        (
            "sample",
            &[
                "--prompt",
                "--index",
                "--num-generations",
                "--json",
                "--set",
            ],
        ),
        ("score", &["--input", "--config", "--set"]),
    ] {
        let mut assert = grpo().args([command, "--help"]).assert().success();
        for flag in flags {
            assert = assert.stdout(predicate::str::contains(*flag));
        }
    }
}

#[test]
fn print_config_prints_the_resolved_config_with_overrides() {
    let output = grpo()
        .args(["train", "--config"])
        .arg(recipe())
        .args([
            "--set",
            "beta=0.0",
            "--set",
            "reward_funcs=[\"mark\",\"digit\"]",
        ])
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = Config::from_toml_str(&String::from_utf8(output.stdout).unwrap()).unwrap();
    let expected = Config::load(
        Some(&recipe()),
        &[
            "beta=0.0".into(),
            "reward_funcs=[\"mark\",\"digit\"]".into(),
        ],
    )
    .unwrap();
    assert_eq!(printed, expected);
    assert_eq!(printed.beta, 0.0);
    assert_eq!(printed.reward_funcs, ["mark", "digit"]);
    assert_eq!(printed.num_generations, 16);
}

#[test]
fn every_subcommand_honours_print_config() {
    for args in [
        &["train"][..],
        &["sft"],
        &["eval", "--limit", "5"],
        &["sample", "--prompt", "1+1=?", "--json"],
        &["score", "--input", "does-not-matter.jsonl"],
    ] {
        grpo()
            .args(args)
            .args(["--print-config", "--set", "seed=7"])
            .assert()
            .success()
            .stdout(predicate::str::contains("seed = 7"));
    }
}

#[test]
fn train_with_a_missing_local_model_fails_offline_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    grpo()
        .arg("train")
        .arg("--config")
        .arg(recipe())
        .args([
            "--set",
            &format!("output_dir={}", dir.path().join("out").display()),
        ])
        .args([
            "--set",
            &format!("model_name_or_path={}", missing.display()),
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", dir.path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no-such-model"));
}

#[test]
fn bad_value_exits_1_naming_field_and_value() {
    grpo()
        .args(["train", "--set", "num_generations=1", "--print-config"])
        .assert()
        .code(1)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::starts_with("error: "))
        .stderr(predicate::str::contains("num_generations"))
        .stderr(predicate::str::contains(">= 2"));
}

#[test]
fn bad_config_file_exits_1_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, "temperature: 0\n").unwrap();
    grpo()
        .args(["eval", "--config"])
        .arg(&path)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("temperature"))
        .stderr(predicate::str::contains("> 0"));

    grpo()
        .args(["train", "--config", "no/such/file.toml"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no/such/file.toml"));
}

#[test]
fn unknown_key_exits_1_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "max_completion_lenght = 100\n").unwrap();
    grpo()
        .args(["train", "--config"])
        .arg(&path)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("max_completion_lenght"))
        .stderr(predicate::str::contains(
            "did you mean `max_completion_length`",
        ));
}

#[test]
fn usage_errors_keep_clap_exit_code_2() {
    grpo().arg("fly").assert().code(2);
    grpo().args(["train", "--no-such-flag"]).assert().code(2);
    grpo().args(["score"]).assert().code(2); // --input is required
    grpo().args(["eval", "--limit", "0"]).assert().code(2);
    grpo()
        .args(["sample", "--prompt", "x", "--index", "3"])
        .assert()
        .code(2);
}

#[test]
fn data_synth_errors_name_their_own_flag() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    grpo()
        .args(["data", "synth", "--out"])
        .arg(blocker.join("out"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--out"))
        .stderr(predicate::str::contains("--max-answer").not());
    grpo()
        .args(["data", "synth", "--max-answer", "5", "--out"])
        .arg(dir.path().join("data"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--max-answer 5 is too small"));
}

/// A model folder (golden weights and tokenizer) whose files name no EOS token anywhere.
fn model_without_eos(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    let golden = common::golden_dir();
    for name in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(golden.join(name), model.join(name)).unwrap();
    }
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
    ] {
        let text = std::fs::read_to_string(golden.join(name)).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("eos_token_id");
        fields.remove("eos_token");
        std::fs::write(model.join(name), json.to_string()).unwrap();
    }
    model
}

/// `--set` arguments for a tiny run of the model at `model` on a 2-row dataset in `dir`.
fn tiny_run(dir: &Path, model: &Path) -> Vec<String> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for split in ["train", "test"] {
        common::write_qa_parquet(
            &data.join(format!("{split}.parquet")),
            &["1+1=?", "2+2=?"],
            &["2", "4"],
        );
    }
    [
        format!("model_name_or_path={}", model.display()),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", dir.join("out").display()),
        "dataset_solution_column=answer_only".into(),
        "per_device_train_batch_size=2".into(),
        "num_generations=2".into(),
        "max_completion_length=4".into(),
        "max_steps=1".into(),
        "device=cpu".into(),
    ]
    .into_iter()
    .flat_map(|set| ["--set".to_string(), set])
    .collect()
}

/// Every command that generates or trains checks the stop tokens at start-up: a model without
/// an EOS token is an error naming the fix, not a panic (sft), a wasted sampling pass (train) or
/// completions that silently run to max_completion_length (sample, eval).
#[test]
fn a_model_without_eos_is_refused_by_every_command_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_without_eos(dir.path());
    let sets = tiny_run(dir.path(), &model);
    for command in [
        &["train"][..],
        &["sft"],
        &["sample", "--prompt", "1+1=?"],
        &["eval"],
    ] {
        grpo()
            .args(command)
            .args(&sets)
            .assert()
            .code(1)
            .stderr(predicate::str::contains("names no EOS token"))
            .stderr(predicate::str::contains("eos_token_id"))
            .stderr(predicate::str::contains("panicked").not());
    }
    assert!(
        !dir.path().join("out/metrics.jsonl").exists(),
        "no training step ran"
    );
}

/// Sizes the config accepts but no memory holds are an error naming them, checked before any
/// allocation (which would abort the process instead).
#[test]
fn sizes_beyond_memory_are_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let sets = tiny_run(dir.path(), &common::golden_dir());
    for (command, extra, culprit) in [
        (
            &["train"][..],
            "per_device_train_batch_size=268435455",
            "per_device_train_batch_size = 268435455",
        ),
        (
            &["train"],
            "max_completion_length=2000000000",
            "max_completion_length = 2000000000",
        ),
        (
            &["sft"],
            "per_device_train_batch_size=1073741823",
            "per_device_train_batch_size = 1073741823",
        ),
        (
            &[
                "sample",
                "--prompt",
                "1+1=?",
                "--num-generations",
                "100000000000",
            ],
            "seed=1",
            "--num-generations = 100000000000",
        ),
        (
            &["eval", "--num-samples", "100000000000"],
            "seed=1",
            "--num-samples = 100000000000",
        ),
    ] {
        grpo()
            .args(command)
            .args(&sets)
            .args(["--set", extra])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(culprit))
            .stderr(predicate::str::contains("GiB of memory"));
    }
}
