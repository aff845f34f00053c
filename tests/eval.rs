//! `grpo eval` end to end on the golden tiny model and a small parquet dataset folder written
//! here: the report's numbers against the per-sample file, --limit, --num-samples, the file
//! names, and a missing checkpoint.

mod common;

use std::fs;
use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

use common::{golden_dir, write_qa_parquet};

/// Ten test questions (more than one generation batch of 8).
const TEST_ROWS: usize = 10;

/// A dataset folder with `train.parquet` (2 rows) and `test.parquet` ([`TEST_ROWS`] rows), and
/// an output folder, inside one temporary folder.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let (questions, answers): (Vec<String>, Vec<String>) = (0..TEST_ROWS)
            .map(|i| (format!("{i}+{i}等于几？"), format!("{}", 2 * i)))
            .unzip();
        write_qa_parquet(&data.join("test.parquet"), &questions, &answers);
        write_qa_parquet(
            &data.join("train.parquet"),
            &["1+1=?".to_string(), "2+2=?".to_string()],
            &["2".to_string(), "4".to_string()],
        );
        Self { dir }
    }

    fn output_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn eval(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_grpo"));
        cmd.env_remove("RUST_LOG")
            .env("HF_HUB_OFFLINE", "1")
            .arg("eval")
            .arg("--set")
            .arg(format!("model_name_or_path={}", golden_dir().display()))
            .arg("--set")
            .arg(format!(
                "dataset_name={}",
                self.dir.path().join("data").display()
            ))
            .arg("--set")
            .arg(format!("output_dir={}", self.output_dir().display()))
            .args(["--set", "max_completion_length=10", "--set", "device=cpu"]);
        cmd
    }

    fn report(&self, name: &str) -> Value {
        let path = self.output_dir().join("eval").join(format!("{name}.json"));
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    fn samples(&self, name: &str) -> Vec<Value> {
        let path = self.output_dir().join("eval").join(format!("{name}.jsonl"));
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    values.iter().sum::<f64>() / values.len() as f64
}

fn assert_close(got: &Value, want: f64, what: &str) {
    let got = got
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number"));
    assert!((got - want).abs() < 1e-9, "{what}: {got} vs {want}");
}

/// Every report number recomputed from the per-sample lines.
fn assert_consistent(report: &Value, samples: &[Value], reward_names: &[&str]) {
    let correct = |s: &Value| f64::from(u8::from(s["correct"].as_bool().unwrap()));
    assert_close(
        &report["accuracy"],
        mean(samples.iter().map(correct)),
        "accuracy",
    );
    assert_close(
        &report["mean_completion_length"],
        mean(samples.iter().map(|s| s["length"].as_f64().unwrap())),
        "mean_completion_length",
    );
    assert_close(
        &report["reward"],
        mean(samples.iter().map(|s| s["reward"].as_f64().unwrap())),
        "reward",
    );
    let names: Vec<&str> = report["rewards"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names, reward_names);
    for name in reward_names {
        assert_close(
            &report["rewards"][name],
            mean(samples.iter().map(|s| s["rewards"][name].as_f64().unwrap())),
            name,
        );
    }
    let rate = report["format_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate));
    for sample in samples {
        // The recipe's correctness reward: the text inside the last <answer> equals the answer.
        let completion = sample["completion"].as_str().unwrap();
        let answer = sample["answer"].as_str().unwrap();
        let inside = completion
            .rsplit("<answer>")
            .next()
            .unwrap()
            .split("</answer>")
            .next()
            .unwrap()
            .trim();
        assert_eq!(sample["correct"].as_bool().unwrap(), inside == answer);
    }
}

#[test]
fn greedy_report_matches_the_per_sample_file() {
    let work = Workspace::new();
    work.eval()
        .assert()
        .success()
        .stdout(predicate::str::contains("accuracy"))
        .stdout(predicate::str::contains("format rate"));
    let report = work.report("test-base");
    let samples = work.samples("test-base");
    for field in [
        "model",
        "step",
        "split",
        "num_questions",
        "num_samples",
        "decoding",
        "accuracy",
        "format_rate",
        "rewards",
        "reward",
        "mean_completion_length",
    ] {
        assert!(
            report.get(field).is_some(),
            "report lacks {field}: {report}"
        );
    }
    assert_eq!(report["num_questions"], TEST_ROWS);
    assert_eq!(report["num_samples"], 1);
    assert_eq!(report["decoding"], "greedy");
    assert_eq!(report["split"], "test");
    assert_eq!(report["step"], "base");
    assert!(report["pass_at_k"].is_null());
    assert_eq!(samples.len(), TEST_ROWS);
    for (i, sample) in samples.iter().enumerate() {
        assert_eq!(sample["question"], format!("{i}+{i}等于几？"));
        assert_eq!(sample["answer"], format!("{}", 2 * i));
    }
    let rewards = ["mark", "soft_format", "hard_format", "digit", "correctness"];
    assert_consistent(&report, &samples, &rewards);

    // Make the greedy completions of the even rows their reference answers: greedy decoding
    // is deterministic, so exactly those rows become correct.
    let questions: Vec<String> = (0..TEST_ROWS).map(|i| format!("{i}+{i}等于几？")).collect();
    let answers: Vec<String> = samples
        .iter()
        .enumerate()
        .map(|(i, sample)| match i % 2 {
            0 => sample["completion"].as_str().unwrap().trim().to_string(),
            _ => format!("{}", 2 * i),
        })
        .collect();
    write_qa_parquet(
        &work.dir.path().join("data").join("test.parquet"),
        &questions,
        &answers,
    );
    work.eval().assert().success();
    let report = work.report("test-base");
    let samples = work.samples("test-base");
    for (i, sample) in samples.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(sample["correct"], true, "row {i}: {sample}");
        }
    }
    assert!(report["accuracy"].as_f64().unwrap() >= 0.5);
    assert_consistent(&report, &samples, &rewards);
}

#[test]
fn limit_and_samples_per_question_shape_the_files() {
    let work = Workspace::new();
    work.eval()
        .args(["--limit", "3", "--num-samples", "4", "--split", "train"])
        .args(["--set", r#"reward_funcs=["mark","digit"]"#])
        .assert()
        .success()
        .stdout(predicate::str::contains("pass@4"))
        .stdout(predicate::str::contains("maj@4"));
    // The train split has only 2 rows: --limit 3 takes both.
    let report = work.report("train-base");
    let samples = work.samples("train-base");
    assert_eq!(report["num_questions"], 2);
    assert_eq!(report["decoding"], "sampled");
    assert_eq!(samples.len(), 2 * 4);
    // correctness is computed for accuracy even though it is not a configured reward.
    assert_consistent(&report, &samples, &["mark", "digit"]);
    let any_correct = samples
        .chunks(4)
        .filter(|group| group.iter().any(|s| s["correct"] == true))
        .count();
    assert_close(&report["pass_at_k"], any_correct as f64 / 2.0, "pass_at_k");

    work.eval().args(["--limit", "3"]).assert().success();
    assert_eq!(work.report("test-base")["num_questions"], 3);
    assert_eq!(work.samples("test-base").len(), 3);
}

#[test]
fn a_checkpoint_folder_names_the_step() {
    let work = Workspace::new();
    let checkpoint = work.dir.path().join("run").join("checkpoint-7");
    fs::create_dir_all(&checkpoint).unwrap();
    for entry in fs::read_dir(golden_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), checkpoint.join(entry.file_name())).unwrap();
        }
    }
    work.eval()
        .arg("--checkpoint")
        .arg(&checkpoint)
        .args(["--limit", "2"])
        .assert()
        .success();
    let report = work.report("test-7");
    assert_eq!(report["step"], "7");
    assert_eq!(report["model"], checkpoint.display().to_string());
    assert_eq!(work.samples("test-7").len(), 2);
}

#[test]
fn a_missing_checkpoint_folder_is_named_in_the_error() {
    let work = Workspace::new();
    let missing = work.dir.path().join("run").join("checkpoint-99");
    work.eval()
        .arg("--checkpoint")
        .arg(&missing)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(missing.display().to_string()))
        .stderr(predicate::str::contains("no such folder"));
}

/// A split name that looks like a path cannot put the report outside `output_dir/eval` (a single
/// parquet file answers every split name, so the run gets as far as writing).
#[test]
fn a_path_like_split_name_stays_inside_the_eval_folder() {
    let work = Workspace::new();
    let file = work.dir.path().join("data/test.parquet");
    work.eval()
        .args(["--split", "../../escape", "--limit", "1"])
        .args(["--set", &format!("dataset_name={}", file.display())])
        .assert()
        .success();
    let written: Vec<String> = fs::read_dir(work.output_dir().join("eval"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        written.contains(&"_._.._escape-base.json".to_string()),
        "{written:?}"
    );
    for outside in [
        work.dir.path().join("escape-base.json"),
        work.output_dir().join("escape-base.json"),
    ] {
        assert!(!outside.exists(), "{} was written", outside.display());
    }
}

/// The first of the most frequent answers (the order they were sampled in) and whether it is
/// the reference answer: maj@K for one question, computed here from the per-sample lines.
fn majority_correct(group: &[Value]) -> bool {
    let answers: Vec<(String, bool)> = group
        .iter()
        .map(|s| {
            let text = s["completion"].as_str().unwrap();
            let inside = text
                .rsplit("<answer>")
                .next()
                .unwrap()
                .split("</answer>")
                .next()
                .unwrap()
                .trim()
                .to_string();
            (inside, s["correct"].as_bool().unwrap())
        })
        .collect();
    let count = |a: &str| answers.iter().filter(|(b, _)| b == a).count();
    let best = answers.iter().map(|(a, _)| count(a)).max().unwrap();
    answers.iter().find(|(a, _)| count(a) == best).unwrap().1
}

/// The shipped tiny base model answers in the format most of the time and is right some of the
/// time, so the rates below are neither all 0 nor all 1: format rate, truncated rate, pass@K
/// and maj@K recomputed from the per-sample lines must equal the report's.
#[test]
fn rates_and_votes_equal_their_recomputation_from_the_samples() {
    let work = Workspace::new();
    let data = work.dir.path().join("synth");
    grpo::synth::write_dataset(&data, 4, 12, 3, 20).unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-base");
    let k = 4;
    work.eval()
        .args(["--num-samples", &k.to_string()])
        .args(["--set", &format!("model_name_or_path={}", model.display())])
        .args(["--set", &format!("dataset_name={}", data.display())])
        .args([
            "--set",
            "max_completion_length=40",
            "--set",
            "temperature=1.2",
        ])
        .assert()
        .success();
    let report = work.report("test-base");
    let samples = work.samples("test-base");
    assert_eq!(samples.len(), 12 * k);
    let rate = |f: &dyn Fn(&Value) -> bool| {
        samples.iter().filter(|s| f(s)).count() as f64 / samples.len() as f64
    };
    let formatted = rate(&|s| s["rewards"]["hard_format"].as_f64().unwrap() == 0.5);
    let truncated = rate(&|s| s["truncated"].as_bool().unwrap());
    let groups: Vec<&[Value]> = samples.chunks(k).collect();
    let per_question = |f: &dyn Fn(&[Value]) -> bool| {
        groups.iter().filter(|g| f(g)).count() as f64 / groups.len() as f64
    };
    let pass = per_question(&|g| g.iter().any(|s| s["correct"] == true));
    let maj = per_question(&majority_correct);
    for (name, value) in [
        ("format", formatted),
        ("truncated", truncated),
        ("pass", pass),
    ] {
        assert!(
            value > 0.0 && value < 1.0,
            "{name} rate {value}: this test needs a mix to tell rates apart"
        );
    }
    assert!(
        maj < pass,
        "some question has a right answer outvoted ({maj} vs {pass})"
    );
    assert_close(&report["format_rate"], formatted, "format_rate");
    assert_close(&report["truncated_rate"], truncated, "truncated_rate");
    assert_close(&report["pass_at_k"], pass, "pass_at_k");
    assert_close(&report["maj_at_k"], maj, "maj_at_k");
    for sample in &samples {
        if sample["truncated"] == true {
            assert_eq!(sample["length"], 40, "only rows cut at the limit: {sample}");
        }
    }
}

/// An adapter checkpoint (here PEFT's golden one, as `checkpoint-3`) is evaluated on its base
/// model and answers exactly as the model `grpo merge` makes of it.
#[test]
fn an_adapter_checkpoint_evaluates_like_its_merged_model() {
    let work = Workspace::new();
    let adapter = work.dir.path().join("run").join("checkpoint-3");
    fs::create_dir_all(&adapter).unwrap();
    for entry in fs::read_dir(golden_dir().join("lora/adapter")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), adapter.join(entry.file_name())).unwrap();
    }
    let merged = work.dir.path().join("merged");
    common::merge_onto_golden(&adapter, &merged);
    work.eval()
        .arg("--checkpoint")
        .arg(&adapter)
        .arg("--base-model")
        .arg(golden_dir())
        .args(["--limit", "4"])
        .assert()
        .success();
    work.eval()
        .arg("--checkpoint")
        .arg(&merged)
        .args(["--limit", "4"])
        .assert()
        .success();
    work.eval().args(["--limit", "4"]).assert().success();
    let completions = |name: &str| -> Vec<Value> {
        work.samples(name)
            .iter()
            .map(|s| s["completion"].clone())
            .collect()
    };
    assert_eq!(work.report("test-3")["step"], "3");
    assert_eq!(completions("test-3"), completions("test-final"));
    assert_ne!(completions("test-3"), completions("test-base"));
}
