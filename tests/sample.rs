//! `grpo sample` end to end on the golden tiny model and a small parquet dataset written here.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

use common::{golden_dir, write_qa_parquet};

const QUESTIONS: [&str; 3] = ["1+1等于几？", "小明有3个苹果，吃了1个，还剩几个？", "2*3=?"];
const ANSWERS: [&str; 3] = ["2", "2", "6"];

/// A snappy parquet file with the recipe's columns `question_zh-cn` and `answer_only`.
fn write_dataset(path: &Path) {
    write_qa_parquet(path, &QUESTIONS, &ANSWERS);
}

/// `grpo sample` on the golden model with short completions, on the CPU.
fn grpo_sample(dataset: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grpo"));
    cmd.env_remove("RUST_LOG")
        .env("HF_HUB_OFFLINE", "1")
        .arg("sample")
        .arg("--set")
        .arg(format!("model_name_or_path={}", golden_dir().display()))
        .arg("--set")
        .arg(format!("dataset_name={}", dataset.display()))
        .args(["--set", "max_completion_length=12", "--set", "device=cpu"]);
    cmd
}

fn dataset() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    write_dataset(&path);
    (dir, path)
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8(stdout.to_vec())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

#[test]
fn json_output_has_one_scored_object_per_completion() {
    let (_dir, path) = dataset();
    let output = grpo_sample(&path)
        .args(["--index", "2", "--num-generations", "6", "--json"])
        .args([
            "--set",
            "max_completion_length=40",
            "--set",
            "temperature=1.5",
        ])
        .args([
            "--set",
            r#"reward_funcs=["soft_overlong_punishment","mark","correctness"]"#,
            "--set",
            "reward_weights=[2.0,1.0,0.5]",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = json_lines(&output.stdout);
    assert_eq!(lines.len(), 6);
    let reward_names = ["soft_overlong_punishment", "mark", "correctness"];
    let weights = [2.0, 1.0, 0.5];
    let mut totals = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "index",
                "completion",
                "rewards",
                "reward",
                "advantage",
                "length",
                "truncated"
            ]
        );
        assert_eq!(line["index"], i);
        let rewards = line["rewards"].as_object().unwrap();
        let names: Vec<&str> = rewards.keys().map(String::as_str).collect();
        assert_eq!(names, reward_names);
        let sum: f64 = rewards
            .values()
            .zip(weights)
            .map(|(v, w)| w * v.as_f64().unwrap())
            .sum();
        let reward = line["reward"].as_f64().unwrap();
        assert!((sum - reward).abs() < 1e-9, "weighted sum: {line}");
        totals.push(reward);
        let length = line["length"].as_u64().unwrap();
        assert!((1..=40).contains(&length), "{line}");
        if line["truncated"].as_bool().unwrap() {
            assert_eq!(
                length, 40,
                "only rows cut at max_completion_length are truncated"
            );
        }
    }
    // Advantages are the group-normalised totals: (r - mean) / (unbiased std + 1e-4).
    let mean = totals.iter().sum::<f64>() / 6.0;
    let std = (totals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
    for (line, total) in lines.iter().zip(&totals) {
        let advantage = line["advantage"].as_f64().unwrap();
        assert!((advantage - (total - mean) / (std + 1e-4)).abs() < 1e-9);
    }
}

/// `scale_rewards = "none"` (Dr. GRPO) leaves advantages unscaled: `reward - mean`.
#[test]
fn scale_rewards_none_gives_unscaled_advantages() {
    let (_dir, path) = dataset();
    let output = grpo_sample(&path)
        .args(["--index", "2", "--num-generations", "6", "--json"])
        .args([
            "--set",
            "max_completion_length=40",
            "--set",
            "temperature=1.5",
            "--set",
            r#"reward_funcs=["repetition_penalty","cosine"]"#,
            "--set",
            "reward_weights=[3.0,1.0]",
            "--set",
            "scale_rewards=none",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = json_lines(&output.stdout);
    let totals: Vec<f64> = lines
        .iter()
        .map(|l| l["reward"].as_f64().unwrap())
        .collect();
    let mean = totals.iter().sum::<f64>() / totals.len() as f64;
    let std = (totals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
    // Scaling by the std would change the advantages only when the std is neither 0 nor 1.
    assert!(
        std > 1e-3 && (std - 1.0).abs() > 1e-2,
        "the rewards must vary for this test to mean something: {totals:?}"
    );
    for (line, total) in lines.iter().zip(&totals) {
        let advantage = line["advantage"].as_f64().unwrap();
        assert!(
            (advantage - (total - mean)).abs() < 1e-5,
            "advantage {advantage}, reward {total}, mean {mean}"
        );
    }
}

#[test]
fn a_seed_reproduces_the_output_and_text_mode_prints_every_completion() {
    let (_dir, path) = dataset();
    let run = |seed: &str| {
        grpo_sample(&path)
            .args(["--prompt", "3+4=?", "--answer", "7", "--json"])
            .args(["--set", &format!("seed={seed}")])
            .output()
            .unwrap()
            .stdout
    };
    let first = run("3");
    assert_eq!(
        json_lines(&first).len(),
        8,
        "num_generations defaults to the config's"
    );
    assert_eq!(first, run("3"));
    assert_ne!(first, run("4"));

    grpo_sample(&path)
        .args(["--prompt", "3+4=?", "--num-generations", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("── completion 0"))
        .stdout(predicate::str::contains("── completion 1"))
        .stdout(predicate::str::contains("advantage"));
}

#[test]
fn index_out_of_range_names_the_split_and_its_size() {
    let (_dir, path) = dataset();
    grpo_sample(&path)
        .args(["--index", "3"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--index 3 is out of range"))
        .stderr(predicate::str::contains("has 3 rows"));
}

#[test]
fn no_prompt_and_no_index_is_an_error_saying_what_to_give() {
    let (_dir, path) = dataset();
    grpo_sample(&path)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--prompt TEXT"))
        .stderr(predicate::str::contains("--index N"));
}

/// The completions of `grpo sample --json` with `args` (greedy: `top_k = 1`).
fn greedy_texts(dataset: &Path, args: &[&str]) -> Vec<String> {
    let output = grpo_sample(dataset)
        .args(["--index", "1", "--num-generations", "2", "--json"])
        .args(["--set", "top_k=1"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    json_lines(&output.stdout)
        .iter()
        .map(|line| line["completion"].as_str().unwrap().to_string())
        .collect()
}

/// A PEFT adapter folder is sampled directly (`--checkpoint`, on `--base-model` or the config's
/// `adapter_name_or_path`) and completes as the model `grpo merge` makes of it, not as the base.
#[test]
fn an_adapter_checkpoint_samples_like_its_merged_model() {
    let (dir, path) = dataset();
    let adapter = golden_dir().join("lora/adapter");
    let merged = dir.path().join("merged");
    common::merge_onto_golden(&adapter, &merged);
    let (adapter, golden) = (
        adapter.display().to_string(),
        golden_dir().display().to_string(),
    );
    let with_adapter = greedy_texts(&path, &["--checkpoint", &adapter, "--base-model", &golden]);
    let merged = greedy_texts(&path, &["--checkpoint", merged.to_str().unwrap()]);
    assert_eq!(with_adapter, merged);
    let configured = greedy_texts(
        &path,
        &[
            "--set",
            "use_peft=true",
            "--set",
            &format!("adapter_name_or_path={adapter}"),
        ],
    );
    assert_eq!(
        configured, merged,
        "adapter_name_or_path on model_name_or_path"
    );
    assert_ne!(
        greedy_texts(&path, &[]),
        merged,
        "the base model completes otherwise"
    );
}

#[test]
fn base_model_is_for_adapter_checkpoints_only() {
    let (_dir, path) = dataset();
    let golden = golden_dir().display().to_string();
    grpo_sample(&path)
        .args([
            "--index",
            "0",
            "--checkpoint",
            &golden,
            "--base-model",
            &golden,
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("adapter_config.json"));
    // The golden adapter records a base model that does not exist here: the error says so.
    let adapter = golden_dir().join("lora/adapter").display().to_string();
    grpo_sample(&path)
        .args(["--index", "0", "--checkpoint", &adapter])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("base_model_name_or_path"))
        .stderr(predicate::str::contains("--base-model"));
}
