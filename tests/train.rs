//! `grpo train` end to end on the tiny golden model: it trains, logs, checkpoints, resumes bit
//! for bit (also after SIGKILL), and refuses bad input before doing any work.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::Device;
use grpo::config::Config;

use common::machine_independent_metrics as metrics;
use common::{golden_dir, write_qa_parquet};

const QUESTIONS: &[(&str, &str)] = &[
    ("小明有3个苹果，又买了5个，现在有多少个？", "8"),
    ("Tom has 12 apples and eats 5. How many are left?", "7"),
    ("一支笔2元，买4支要多少元？", "8"),
    ("What is 6 + 7?", "13"),
    ("20个糖分给4个人，每人几个？", "5"),
];

/// A tiny run: 2 prompts x 2 completions of at most 8 tokens per micro-step, 2 micro-steps.
fn overrides(dir: &Path, extra: &[&str]) -> Vec<String> {
    let data = dir.join("train.parquet");
    if !data.exists() {
        let (questions, answers): (Vec<_>, Vec<_>) = QUESTIONS.iter().copied().unzip();
        write_qa_parquet(&data, &questions, &answers);
    }
    let mut sets = vec![
        format!("model_name_or_path={}", golden_dir().display()),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", dir.join("out").display()),
        "per_device_train_batch_size=2".into(),
        "gradient_accumulation_steps=2".into(),
        "num_generations=2".into(),
        "max_completion_length=8".into(),
        "max_prompt_length=64".into(),
        "max_steps=4".into(),
        "save_steps=2".into(),
        "logging_steps=1".into(),
        "learning_rate=0.01".into(),
        "warmup_ratio=0.0".into(),
        "report_to=tensorboard".into(),
        "seed=7".into(),
        // Rewards that vary on a random model's output, so advantages (and gradients) are not 0.
        r#"reward_funcs=["cosine","repetition_penalty","correctness"]"#.into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

fn config(dir: &Path, extra: &[&str]) -> Config {
    Config::load(None, &overrides(dir, extra)).unwrap()
}

fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut tensors: Vec<_> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// metrics.jsonl as logged.
fn logged_metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn every_step_logs_where_its_time_went() {
    let dir = tempfile::tempdir().unwrap();
    grpo::train::train(&config(dir.path(), &[])).unwrap();
    let lines = logged_metrics(&dir.path().join("out"));
    for line in &lines {
        let seconds = |key: &str| -> f64 {
            let value = line[key]
                .as_f64()
                .unwrap_or_else(|| panic!("no {key} in {line}"));
            assert!(value.is_finite() && value >= 0.0, "{key} = {value}");
            value
        };
        let phases: Vec<f64> = [
            "timing/generation",
            "timing/rewards",
            "timing/policy",
            "timing/reference",
            "timing/optimizer",
        ]
        .iter()
        .map(|key| seconds(key))
        .collect();
        assert!(
            phases.iter().sum::<f64>() <= seconds("step_time"),
            "the phases are parts of the step: {line}"
        );
        assert!(seconds("timing/generation") > 0.0 && seconds("timing/policy") > 0.0);
        // Throughput = the step's generated tokens over its generation seconds.
        let rows = 2.0 * 2.0 * 2.0; // prompts x completions x micro-steps of `config`
        let tokens = line["completions/mean_length"].as_f64().unwrap() * rows;
        let expected = tokens / seconds("timing/generation");
        let logged = seconds("generation/tokens_per_second");
        assert!(
            (logged - expected).abs() <= 1e-6 * expected,
            "tokens/s {logged} vs {expected}"
        );
    }
}

#[test]
fn train_logs_checkpoints_and_saves_a_model_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[]);
    grpo::train::train(&cfg).unwrap();
    let out = dir.path().join("out");
    let lines = metrics(&out);
    assert_eq!(lines.len(), 4, "one line per logged step");
    for key in [
        "loss",
        "grad_norm",
        "learning_rate",
        "reward",
        "reward_std",
        "kl",
        "entropy",
        "rewards/correctness/mean",
        "completions/mean_length",
        "frac_reward_zero_std",
        "clip_ratio/region_mean",
        "num_tokens",
    ] {
        assert!(
            lines[0].get(key).is_some(),
            "metrics.jsonl lacks {key}: {}",
            lines[0]
        );
    }
    assert!(lines.iter().all(|l| l["grad_norm"].as_f64().unwrap() > 0.0));
    assert!(out.join("checkpoint-2/trainer_state.json").is_file());
    assert!(out.join("checkpoint-4/optimizer.safetensors").is_file());
    assert!(
        std::fs::read_dir(out.join("runs")).unwrap().count() == 1,
        "TensorBoard events"
    );
    // The final model is an HF folder our loader (and transformers) reads, and it moved.
    let files = grpo::model::ModelFiles::resolve(out.to_str().unwrap(), "main").unwrap();
    grpo::model::Qwen2::load_policy(&files, &Device::Cpu).unwrap();
    let before = weights(&golden_dir().join("model.safetensors"));
    let after = weights(&out.join("model.safetensors"));
    assert_eq!(
        before.iter().map(|w| &w.0).collect::<Vec<_>>(),
        after.iter().map(|w| &w.0).collect::<Vec<_>>(),
        "same HF tensor names (tied embeddings stay tied)"
    );
    assert_ne!(before, after, "training changed the weights");
}

#[test]
fn resume_from_a_checkpoint_continues_bit_for_bit() {
    let straight = tempfile::tempdir().unwrap();
    grpo::train::train(&config(straight.path(), &[])).unwrap();
    let resumed = tempfile::tempdir().unwrap();
    let checkpoint = straight.path().join("out/checkpoint-2");
    let resume = format!("resume_from_checkpoint={}", checkpoint.display());
    grpo::train::train(&config(resumed.path(), &[&resume])).unwrap();
    let (a, b) = (straight.path().join("out"), resumed.path().join("out"));
    assert_eq!(
        weights(&a.join("model.safetensors")),
        weights(&b.join("model.safetensors"))
    );
    assert_eq!(
        metrics(&a)[2..],
        metrics(&b)[..],
        "steps 3 and 4 logged identically"
    );
}

#[test]
fn killed_run_resumes_from_its_last_complete_checkpoint() {
    let straight = tempfile::tempdir().unwrap();
    grpo::train::train(&config(straight.path(), &[])).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = overrides(dir.path(), &["max_steps=4", "save_steps=1"])
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect();
    let bin = env!("CARGO_BIN_EXE_grpo");
    let mut child = Command::new(bin).arg("train").args(&args).spawn().unwrap();
    let out = dir.path().join("out");
    let started = Instant::now();
    while !out.join("checkpoint-2/trainer_state.json").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint-2 in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let status = Command::new(bin)
        .arg("train")
        .args(&args)
        .args(["--set", "resume_from_checkpoint=true"])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        weights(&straight.path().join("out/model.safetensors")),
        weights(&out.join("model.safetensors"))
    );
}

#[test]
fn checkpoint_of_another_model_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    grpo::train::train(&config(dir.path(), &["max_steps=2"])).unwrap();
    let ckpt = dir.path().join("out/checkpoint-2");
    let path = ckpt.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert(
        "model.norm.weight".into(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let other = tempfile::tempdir().unwrap();
    let resume = format!("resume_from_checkpoint={}", ckpt.display());
    let err = grpo::train::train(&config(other.path(), &[&resume])).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model.norm.weight") && msg.contains("another model"),
        "{msg}"
    );
}

#[test]
fn unwritable_output_dir_fails_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let out: PathBuf = blocker.join("out");
    let set = format!("output_dir={}", out.display());
    let err = grpo::train::train(&config(dir.path(), &[&set])).unwrap_err();
    assert!(format!("{err:#}").contains("output_dir"), "{err:#}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = overrides(dir.path(), &["max_steps=500", "save_steps=1000"])
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grpo"))
        .arg("train")
        .args(&args)
        .spawn()
        .unwrap();
    let out = dir.path().join("out");
    let started = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no training progress in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert!(child.wait().unwrap().success(), "Ctrl-C exits with success");
    let checkpoints = grpo::checkpoint::list(&out).unwrap();
    let (step, path) = checkpoints.last().expect("a checkpoint written on Ctrl-C");
    assert!(*step >= 2 && *step < 500, "stopped early, at step {step}");
    let (state, _) = grpo::checkpoint::load_state(path).unwrap();
    assert_eq!(state.global_step, *step);
}

#[test]
fn total_steps_follow_the_hf_trainer() {
    let dir = tempfile::tempdir().unwrap();
    // ceil(5 / 2) = 3 micro-batches per epoch, // 2 accumulation = 1 update, x 3 epochs.
    let cfg = config(dir.path(), &["max_steps=-1", "num_train_epochs=3"]);
    assert_eq!(grpo::train::total_optimizer_steps(&cfg, 5).unwrap(), 3);
    // The recipe: 1 prompt per micro-step, accumulation 4, one epoch of 7473 GSM8K rows.
    let cfg = config(
        dir.path(),
        &[
            "max_steps=-1",
            "num_train_epochs=1",
            "per_device_train_batch_size=1",
            "gradient_accumulation_steps=4",
        ],
    );
    assert_eq!(
        grpo::train::total_optimizer_steps(&cfg, 7473).unwrap(),
        1868
    );
    // Fractional epochs round up; fewer batches than one update still give one per epoch.
    let cfg = config(dir.path(), &["max_steps=-1", "num_train_epochs=1.5"]);
    assert_eq!(grpo::train::total_optimizer_steps(&cfg, 3).unwrap(), 2);
    // max_steps wins when positive.
    assert_eq!(
        grpo::train::total_optimizer_steps(&config(dir.path(), &[]), 1_000_000).unwrap(),
        4
    );
    // A huge num_train_epochs is an error naming it, not an endless run.
    let cfg = config(dir.path(), &["max_steps=-1", "num_train_epochs=1e300"]);
    let err = grpo::train::total_optimizer_steps(&cfg, 5).unwrap_err();
    assert!(
        format!("{err:#}").contains("num_train_epochs = 1e300"),
        "{err:#}"
    );
}

#[test]
fn num_iterations_reuses_each_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &["num_iterations=2", "max_steps=2", "log_completions=true"],
    );
    grpo::train::train(&cfg).unwrap();
    let out = dir.path().join("out");
    let read = |step: u64| {
        std::fs::read_to_string(out.join(format!("completions/step_{step}.jsonl"))).unwrap()
    };
    assert_eq!(read(1), read(2), "step 2 trains on step 1's completions");
    let lines = metrics(&out);
    assert_eq!(lines.len(), 2);
    assert_ne!(lines[0]["loss"], lines[1]["loss"]);
}

/// The largest difference between the updates `after_a - before` and `after_b - before`, relative
/// to the largest update.
fn max_relative_update_diff(
    before: &[(String, Vec<f32>)],
    after_a: &[(String, Vec<f32>)],
    after_b: &[(String, Vec<f32>)],
) -> f64 {
    let updates = |after: &[(String, Vec<f32>)]| -> Vec<f64> {
        before
            .iter()
            .zip(after)
            .flat_map(|((_, w0), (_, w))| w0.iter().zip(w).map(|(&x, &y)| f64::from(y - x)))
            .collect()
    };
    let (a, b) = (updates(after_a), updates(after_b));
    let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "training moved the weights");
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Settings under which chunking must not change training: a micro-batch of 3 prompts x 2
/// completions; `num_iterations = 2` makes step 2 retrain on step 1's completions (so both runs
/// see the same completions) with off-policy ratios; a large `adam_epsilon` makes AdamW's update
/// nearly linear in the gradient (`lr * g / (|g| + eps)`), so comparing updates compares
/// gradients instead of AdamW's amplified signs of gradients that are 0 up to rounding.
const CHUNKING_SETTINGS: [&str; 7] = [
    "per_device_train_batch_size=3",
    "gradient_accumulation_steps=1",
    "num_iterations=2",
    "max_steps=2",
    "save_steps=100",
    "learning_rate=0.5",
    "adam_epsilon=1.0",
];

/// A run with [`CHUNKING_SETTINGS`] and `extra`: its config, metrics and the trained tensors of
/// `weights_file` in its output folder.
struct ChunkingRun {
    cfg: grpo::config::Config,
    metrics: Vec<serde_json::Value>,
    weights: Vec<(String, Vec<f32>)>,
}

impl ChunkingRun {
    fn new(extra: &[&str], weights_file: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &[&CHUNKING_SETTINGS[..], extra].concat());
        grpo::train::train(&cfg).unwrap();
        let out = dir.path().join("out");
        Self {
            metrics: metrics(&out),
            weights: weights(&out.join(weights_file)),
            cfg,
        }
    }

    /// Asserts that `self` trained as `one_pass` did from the `initial` weights: the metrics
    /// `keys` agree up to float32 reordering (the loss sums O(1) per-token terms to near 0:
    /// f32 noise is ~1e-7 absolute), and so do the weight updates.
    fn assert_trains_as(
        &self,
        one_pass: &ChunkingRun,
        initial: &[(String, Vec<f32>)],
        keys: &[&str],
        what: &str,
    ) {
        for (whole, chunked) in one_pass.metrics.iter().zip(&self.metrics) {
            for &key in keys {
                let (x, y) = (value(whole, key), value(chunked, key));
                assert!(
                    (x - y).abs() <= 1e-6 + 1e-5 * x.abs(),
                    "{what}: {key} {y} vs {x} in one pass"
                );
            }
        }
        let diff = max_relative_update_diff(initial, &one_pass.weights, &self.weights);
        assert!(
            diff < 1e-4,
            "{what}: weight updates differ by {diff} (relative)"
        );
    }
}

/// `forward_batch_size` and `cpu_workers` change how completions are fed to the
/// forward/backward, not the loss, the gradients or the metrics: slices of a group (1), one
/// group (2) and two groups (4) of the micro-batch of [`CHUNKING_SETTINGS`], and those chunks
/// (or, with `forward_batch_size = 0`, one group per chunk) shared by 2 or 3 worker threads
/// that also sample the completions in shards, train like one pass over all 6 on one worker,
/// for each loss type.
#[test]
fn forward_batch_size_and_cpu_workers_change_neither_loss_nor_gradients() {
    let initial = weights(&golden_dir().join("model.safetensors"));
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"] {
        let run = |forward_batch_size: usize, cpu_workers: usize| {
            ChunkingRun::new(
                &[
                    &format!("loss_type={loss_type}"),
                    &format!("forward_batch_size={forward_batch_size}"),
                    &format!("cpu_workers={cpu_workers}"),
                ],
                "model.safetensors",
            )
        };
        let whole = run(0, 1);
        for (size, workers) in [(1, 1), (2, 1), (4, 1), (0, 2), (1, 3)] {
            run(size, workers).assert_trains_as(
                &whole,
                &initial,
                &[
                    "loss",
                    "grad_norm",
                    "kl",
                    "entropy",
                    "clip_ratio/region_mean",
                    "reward",
                ],
                &format!("{loss_type}, forward_batch_size = {size}, cpu_workers = {workers}"),
            );
        }
    }
}

/// Without the KL term, the chunks of groups whose rewards all agree run no pass at all (their
/// gradient is zero; their entropies come from sampling): one group per chunk on 2 workers,
/// with and without such groups skipped (`beta = 0` skips them; at step 1 the KL term is 0 and
/// so is its gradient, but `beta > 0` runs the forward and backward of every chunk), the step
/// trains alike and logs the same metrics, the entropy included.
#[test]
fn groups_whose_rewards_agree_skip_their_passes_and_change_nothing() {
    let initial = weights(&golden_dir().join("model.safetensors"));
    let run = |beta: &str| {
        ChunkingRun::new(
            &[
                "max_steps=1",
                "forward_batch_size=2",
                "cpu_workers=2",
                &format!("beta={beta}"),
                // Completions that all reach max_completion_length get the same penalty: with
                // this seed, two of the three groups.
                r#"reward_funcs=["soft_overlong_punishment"]"#,
                "seed=1",
            ],
            "model.safetensors",
        )
    };
    let skipping = run("0.0");
    let zero_std = value(&skipping.metrics[0], "frac_reward_zero_std");
    assert!(
        zero_std > 0.0 && zero_std < 1.0,
        "the step needs groups of both kinds (another seed?): frac_reward_zero_std {zero_std}"
    );
    skipping.assert_trains_as(
        &run("0.04"),
        &initial,
        &[
            "loss",
            "grad_norm",
            "entropy",
            "clip_ratio/region_mean",
            "reward",
        ],
        "beta = 0 (skipping) against beta = 0.04",
    );
}

/// A step whose groups all agree (no reward is ever earned) back-propagates nothing, yet moves
/// the weights as torch's AdamW does with zero gradients: weight decay alone, on the matrices
/// (HF's decay grouping leaves biases and norms alone).
#[test]
fn a_step_without_any_gradient_still_applies_weight_decay() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[
            r#"reward_funcs=["correctness"]"#,
            "beta=0.0",
            "max_steps=1",
            "gradient_accumulation_steps=1",
            "learning_rate=0.5",
            "weight_decay=0.1",
        ],
    );
    grpo::train::train(&cfg).unwrap();
    let out = dir.path().join("out");
    let logged = &metrics(&out)[0];
    assert_eq!(value(logged, "frac_reward_zero_std"), 1.0, "{logged}");
    assert_eq!(value(logged, "grad_norm"), 0.0, "{logged}");
    let initial = weights(&golden_dir().join("model.safetensors"));
    let trained = weights(&out.join("model.safetensors"));
    let mut decayed = 0;
    for ((name, before), (_, after)) in initial.iter().zip(&trained) {
        let factor = match name.ends_with(".bias") || name.contains("norm") {
            true => 1.0,
            false => {
                decayed += 1;
                1.0 - 0.5 * 0.1
            }
        };
        for (&w0, &w1) in before.iter().zip(after) {
            let want = w0 * factor;
            assert!(
                (w1 - want).abs() <= 1e-6 * want.abs(),
                "{name}: {w1} vs {want}"
            );
        }
    }
    assert!(decayed > 0, "some weights decay");
}

/// On Linux the CPU peak is the process's `VmHWM` since the step began; other systems log no
/// memory metric. Run as its own process (so no other test's memory counts), whose resident
/// size this test samples while it trains: each step's peak is at least about the resident size
/// seen during training and at most the process's virtual peak (`VmPeak`), so a unit slip
/// (bytes, KiB, MiB for GiB: a factor of 1024 or more) or a wrong counter fails.
#[cfg(target_os = "linux")]
#[test]
fn peak_memory_is_logged_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = overrides(
        dir.path(),
        &["max_steps=500", "save_steps=1000", "forward_batch_size=2"],
    )
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grpo"))
        .arg("train")
        .args(&args)
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let gib = |field: &str| -> Option<f64> {
        let text = std::fs::read_to_string(&status).ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        let kib: f64 = line[field.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / (1024.0 * 1024.0))
    };
    let out = dir.path().join("out");
    let logged =
        || std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
    let started = Instant::now();
    let (mut min_rss, mut vm_peak) = (f64::INFINITY, 0.0f64);
    while logged() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no training progress in time"
        );
        if logged() >= 1 {
            min_rss = min_rss.min(gib("VmRSS:").unwrap_or(f64::INFINITY));
        }
        vm_peak = vm_peak.max(gib("VmPeak:").unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(5));
    }
    vm_peak = vm_peak.max(gib("VmPeak:").unwrap_or(0.0));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert!(child.wait().unwrap().success());
    assert!(
        min_rss.is_finite() && vm_peak > 0.0,
        "read /proc/<pid>/status"
    );
    let lines = logged_metrics(&out);
    assert!(lines.len() >= 4);
    for line in lines {
        let peak = line["memory/peak_gib"]
            .as_f64()
            .unwrap_or_else(|| panic!("no memory/peak_gib in {line}"));
        assert!(
            peak >= 0.5 * min_rss && peak <= vm_peak,
            "memory/peak_gib = {peak}, resident during training >= {min_rss}, VmPeak {vm_peak}"
        );
    }
}

#[test]
fn log_completions_follows_logging_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["log_completions=true", "logging_steps=2"]);
    grpo::train::train(&cfg).unwrap();
    let out = dir.path().join("out");
    let mut written: Vec<String> = std::fs::read_dir(out.join("completions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, ["step_2.jsonl", "step_4.jsonl"]);
    assert_eq!(metrics(&out).len(), 2, "metrics on the same steps");
}

/// `max_grad_norm = 0` turns clipping off: training runs and still logs the gradient norm.
#[test]
fn zero_max_grad_norm_trains_without_clipping() {
    let dir = tempfile::tempdir().unwrap();
    grpo::train::train(&config(dir.path(), &["max_grad_norm=0", "max_steps=2"])).unwrap();
    let lines = metrics(&dir.path().join("out"));
    assert_eq!(lines.len(), 2);
    for line in lines {
        let norm = line["grad_norm"].as_f64().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{line}");
    }
}

/// With `num_iterations = 2` a checkpoint saved between two generations (here checkpoint-1,
/// whose rollout step 2 trains on again) holds that rollout, so the resumed run neither samples
/// a new one nor consumes more data: it ends bit for bit where the uninterrupted run does.
#[test]
fn resume_between_two_generations_continues_bit_for_bit() {
    let extra = ["num_iterations=2", "save_steps=1", "max_steps=3"];
    let straight = tempfile::tempdir().unwrap();
    grpo::train::train(&config(straight.path(), &extra)).unwrap();
    let a = straight.path().join("out");
    let logged = metrics(&a);
    assert!(
        logged
            .iter()
            .all(|l| l["reward_std"].as_f64().unwrap() > 0.0),
        "the rewards vary, so a different rollout would train differently: {logged:?}"
    );
    let resumed = tempfile::tempdir().unwrap();
    let resume = format!(
        "resume_from_checkpoint={}",
        a.join("checkpoint-1").display()
    );
    let mut resumed_extra = extra.to_vec();
    resumed_extra.push(&resume);
    grpo::train::train(&config(resumed.path(), &resumed_extra)).unwrap();
    let b = resumed.path().join("out");
    assert_eq!(
        weights(&a.join("checkpoint-3/model.safetensors")),
        weights(&b.join("checkpoint-3/model.safetensors"))
    );
    assert_eq!(
        logged[1..],
        metrics(&b)[..],
        "steps 2 and 3 logged identically"
    );
    let state = |dir: &Path| grpo::checkpoint::load_state(dir).unwrap().0.data;
    assert_eq!(
        state(&a.join("checkpoint-3")),
        state(&b.join("checkpoint-3")),
        "the same data consumed"
    );
}

/// What a short run left behind: its logged metrics, step 1's completions (log_completions)
/// and the final weights (a LoRA run's: its adapter's).
struct Outcome {
    metrics: Vec<serde_json::Value>,
    completions: Vec<String>,
    weights: Vec<(String, Vec<f32>)>,
}

fn run_with(extra: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mut sets = vec!["log_completions=true", "save_steps=100"];
    sets.extend_from_slice(extra);
    grpo::train::train(&config(dir.path(), &sets)).unwrap();
    let out = dir.path().join("out");
    let completions = std::fs::read_to_string(out.join("completions/step_1.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["completion"].as_str().unwrap().to_string()
        })
        .collect();
    let model = match out.join("model.safetensors") {
        full if full.is_file() => full,
        _ => out.join("adapter_model.safetensors"),
    };
    Outcome {
        metrics: metrics(&out),
        completions,
        weights: weights(&model),
    }
}

fn value(line: &serde_json::Value, key: &str) -> f64 {
    line[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// The clip bounds reach the loss the right way round: with `epsilon = 0` every ratio below 1
/// of a negative advantage is clipped (low) and with a huge `epsilon_high` no ratio above is
/// (high); swapped, the other way round. Step 2 retrains step 1's rollout, so ratios move off 1.
#[test]
fn epsilon_low_and_high_reach_the_loss_the_right_way_round() {
    let common = ["num_iterations=2", "max_steps=2", "learning_rate=0.05"];
    let low_only = run_with(&[&common[..], &["epsilon=0.0", "epsilon_high=100.0"]].concat());
    let high_only = run_with(&[&common[..], &["epsilon=100.0", "epsilon_high=0.0"]].concat());
    let (a, b) = (&low_only.metrics[1], &high_only.metrics[1]);
    assert!(value(a, "clip_ratio/low_mean") > 0.0, "{a}");
    assert_eq!(value(a, "clip_ratio/high_mean"), 0.0, "{a}");
    assert_eq!(value(b, "clip_ratio/low_mean"), 0.0, "{b}");
    assert!(value(b, "clip_ratio/high_mean") > 0.0, "{b}");
    for line in [a, b] {
        let region = value(line, "clip_ratio/region_mean");
        let sum = value(line, "clip_ratio/low_mean") + value(line, "clip_ratio/high_mean");
        assert!((region - sum).abs() < 1e-12, "region = low + high: {line}");
    }
}

/// `mask_truncated_completions`, `scale_rewards` and `weight_decay` change step 1 (same samples:
/// sampling does not depend on them), each in its own way.
#[test]
fn loss_and_optimiser_settings_reach_the_step() {
    let one_step = ["max_steps=1"];
    let plain = run_with(&one_step);
    let loss = |o: &Outcome| value(&o.metrics[0], "loss");
    let grad_norm = |o: &Outcome| value(&o.metrics[0], "grad_norm");

    // Most completions of a random model hit max_completion_length = 8: masking them changes
    // the loss.
    let masked = run_with(&[&one_step[..], &["mask_truncated_completions=true"]].concat());
    assert_eq!(masked.completions, plain.completions, "same samples");
    assert_ne!(loss(&masked), loss(&plain));

    // Unscaled advantages give another gradient (group stds are not 1).
    let unscaled = run_with(&[&one_step[..], &["scale_rewards=none"]].concat());
    assert_eq!(unscaled.completions, plain.completions, "same samples");
    assert_ne!(grad_norm(&unscaled), grad_norm(&plain));

    // Weight decay shrinks the decayed weights only: norms and biases (the HF Trainer's
    // no-decay group) get exactly the same update as without it.
    let decayed = run_with(&[&one_step[..], &["weight_decay=0.5"]].concat());
    for ((name, with), (_, without)) in decayed.weights.iter().zip(&plain.weights) {
        let exempt = name.contains("norm") || name.ends_with("bias");
        assert_eq!(exempt, with == without, "{name}: decayed {}", !exempt);
    }
}

/// The logged learning rate follows `lr_scheduler_type` over the run's 4 steps (HF: step k
/// logs the rate its update used, `lr(k - 1)`).
#[test]
fn lr_scheduler_type_reaches_the_optimiser() {
    let quarter_cos = |k: f64| 0.5 * (1.0 + (std::f64::consts::PI * k / 4.0).cos());
    for (kind, factors) in [
        ("linear", [1.0, 0.75, 0.5, 0.25]),
        (
            "cosine",
            [1.0, quarter_cos(1.0), quarter_cos(2.0), quarter_cos(3.0)],
        ),
        ("constant", [1.0; 4]),
    ] {
        let outcome = run_with(&[&format!("lr_scheduler_type={kind}")]);
        let logged: Vec<f64> = outcome
            .metrics
            .iter()
            .map(|l| value(l, "learning_rate"))
            .collect();
        for (got, factor) in logged.iter().zip(factors) {
            assert!((got - 0.01 * factor).abs() < 1e-12, "{kind}: {logged:?}");
        }
    }
}

/// The sampling filters reach generation: each of `top_k = 1`, a tiny `top_p` and
/// `min_p = 1` leaves only the most likely token, so every completion of a group is the same
/// greedy text; a strong `repetition_penalty` changes that greedy text.
#[test]
fn sampling_settings_reach_generation() {
    let base = ["max_steps=1", "num_generations=4", "temperature=1.0"];
    let groups = |o: &Outcome| -> Vec<Vec<String>> {
        o.completions.chunks(4).map(<[String]>::to_vec).collect()
    };
    let plain = run_with(&base);
    assert!(
        groups(&plain).iter().any(|g| g.iter().any(|c| c != &g[0])),
        "plain sampling varies within a group: {:?}",
        plain.completions
    );
    let greedy = run_with(&[&base[..], &["top_k=1"]].concat());
    for filter in [&["top_k=1"][..], &["top_p=0.000001"], &["min_p=1.0"]] {
        let outcome = run_with(&[&base[..], filter].concat());
        for group in groups(&outcome) {
            assert!(
                group.iter().all(|c| c == &group[0]),
                "{filter:?}: {group:?}"
            );
        }
        assert_eq!(
            outcome.completions, greedy.completions,
            "{filter:?} is greedy"
        );
    }
    let penalised = run_with(&[&base[..], &["top_k=1", "repetition_penalty=100.0"]].concat());
    assert_ne!(penalised.completions, greedy.completions);
}

/// The memory check does not count `max_prompt_length` (prompts take the positions they need):
/// a huge one, as set to mean "never truncate", still trains.
#[test]
fn a_huge_max_prompt_length_is_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    grpo::train::train(&config(
        dir.path(),
        &["max_prompt_length=2000000000", "max_steps=1"],
    ))
    .unwrap();
}

// ---- LoRA (use_peft) --------------------------------------------------------------------------

/// A LoRA run's final adapter folder, read back.
fn adapter_of(
    dir: &Path,
) -> (
    serde_json::Value,
    std::collections::HashMap<String, Vec<usize>>,
) {
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let config = serde_json::from_str(&text).unwrap();
    let shapes =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, t)| (name, t.dims().to_vec()))
            .collect();
    (config, shapes)
}

/// The golden model's config.json.
fn golden_config() -> serde_json::Value {
    let text = std::fs::read_to_string(golden_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `use_peft` trains only adapters on the targeted modules (`lora_r`, `lora_target_modules`)
/// and writes PEFT adapter folders (checkpoints and output_dir, with the optimiser state of the
/// adapters only); the reference is the base with adapters off, so with `B = 0` at step 1 the KL
/// is exactly 0, and it grows once the adapters moved.
#[test]
fn lora_trains_the_adapters_only_and_writes_peft_folders() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[
            "use_peft=true",
            "lora_r=2",
            r#"lora_target_modules=["v_proj","q_proj","down_proj"]"#,
            "learning_rate=0.05",
        ],
    );
    grpo::train::train(&cfg).unwrap();
    let out = dir.path().join("out");
    let (config, shapes) = adapter_of(&out);
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["bias"], "none");
    assert_eq!(config["r"], 2);
    assert_eq!(config["lora_alpha"], 32);
    assert_eq!(config["lora_dropout"], 0.05);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(
        config["base_model_name_or_path"],
        golden_dir().display().to_string()
    );
    let model = golden_config();
    let dim = |key: &str| model[key].as_u64().unwrap() as usize;
    let head_dim = dim("hidden_size") / dim("num_attention_heads");
    let (hidden, kv) = (dim("hidden_size"), dim("num_key_value_heads") * head_dim);
    let q = dim("num_attention_heads") * head_dim;
    let mut want = std::collections::HashMap::new();
    for layer in 0..dim("num_hidden_layers") {
        for (module, out_features, in_features) in [
            ("self_attn.q_proj", q, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("mlp.down_proj", hidden, dim("intermediate_size")),
        ] {
            let key = |which: &str| {
                format!("base_model.model.model.layers.{layer}.{module}.lora_{which}.weight")
            };
            want.insert(key("A"), vec![2, in_features]);
            want.insert(key("B"), vec![out_features, 2]);
        }
    }
    assert_eq!(shapes, want, "adapter_model.safetensors keys and shapes");
    assert!(!out.join("model.safetensors").exists(), "no full model");
    assert!(out.join("tokenizer.json").is_file());

    let checkpoint = out.join("checkpoint-2");
    assert_eq!(adapter_of(&checkpoint).1, want);
    assert!(!checkpoint.join("model.safetensors").exists());
    let (_, optimizer) = grpo::checkpoint::load_state(&checkpoint).unwrap();
    let mut moments: Vec<String> = optimizer
        .keys()
        .filter_map(|k| k.strip_suffix(".exp_avg"))
        .map(|k| format!("base_model.model.{k}"))
        .collect();
    moments.sort();
    let mut adapters: Vec<String> = want.keys().cloned().collect();
    adapters.sort();
    assert_eq!(moments, adapters, "AdamW state of the adapters only");
    assert_eq!(optimizer.len(), 3 * adapters.len());

    let lines = metrics(&out);
    assert_eq!(
        value(&lines[0], "kl"),
        0.0,
        "step 1: B = 0, policy = reference"
    );
    assert!(value(&lines[3], "kl") > 0.0, "{}", lines[3]);
    // The adapter trained: B left zero, and it loads onto the base again.
    let adapter = grpo::model::AdapterFolder::read(&out).unwrap();
    let b = &adapter.weights["model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert!(common::flat_f64(b).iter().any(|&v| v != 0.0));
    let files = grpo::model::ModelFiles::resolve(golden_dir().to_str().unwrap(), "main").unwrap();
    grpo::model::Qwen2::load_base(&files, &Device::Cpu, candle_core::DType::F32)
        .unwrap()
        .with_adapters(adapter.spec, adapter.weights)
        .unwrap();
}

/// A LoRA run resumed from a checkpoint ends bit for bit where the straight run does, dropout
/// masks included.
#[test]
fn lora_resume_continues_bit_for_bit_with_dropout() {
    let lora = [
        "use_peft=true",
        "lora_r=4",
        "lora_dropout=0.5",
        "learning_rate=0.05",
    ];
    let straight = tempfile::tempdir().unwrap();
    grpo::train::train(&config(straight.path(), &lora)).unwrap();
    let resumed = tempfile::tempdir().unwrap();
    let resume = format!(
        "resume_from_checkpoint={}",
        straight.path().join("out/checkpoint-2").display()
    );
    let mut extra = lora.to_vec();
    extra.push(&resume);
    grpo::train::train(&config(resumed.path(), &extra)).unwrap();
    let (a, b) = (straight.path().join("out"), resumed.path().join("out"));
    let adapter = |dir: &Path| weights(&dir.join("adapter_model.safetensors"));
    assert_eq!(adapter(&a), adapter(&b));
    assert_eq!(metrics(&a)[2..], metrics(&b)[..]);
}

/// `lora_alpha` scales the adapters' update: at step 1 (`B = 0`, no dropout) only `B` has a
/// gradient, proportional to `lora_alpha / r`, so the logged gradient norm scales with it while
/// the loss does not move. `lora_dropout` changes that gradient (not the loss, nor the samples).
#[test]
fn lora_alpha_and_dropout_reach_the_step() {
    let step1 = |extra: &[&str]| {
        let mut sets = vec!["use_peft=true", "max_steps=1"];
        sets.extend_from_slice(extra);
        run_with(&sets)
    };
    let alpha32 = step1(&["lora_alpha=32", "lora_dropout=0.0"]);
    let alpha8 = step1(&["lora_alpha=8", "lora_dropout=0.0"]);
    let dropped = step1(&["lora_alpha=32", "lora_dropout=0.5"]);
    let (a, b, d) = (&alpha32.metrics[0], &alpha8.metrics[0], &dropped.metrics[0]);
    assert_eq!(alpha32.completions, alpha8.completions);
    assert_eq!(value(a, "loss"), value(b, "loss"));
    let ratio = value(a, "grad_norm") / value(b, "grad_norm");
    assert!((ratio - 4.0).abs() < 1e-5, "grad_norm ratio {ratio}");
    assert_eq!(
        dropped.completions, alpha32.completions,
        "sampling has no dropout"
    );
    assert_eq!(
        value(d, "loss"),
        value(a, "loss"),
        "B = 0: dropout cannot move the loss"
    );
    assert_ne!(value(d, "grad_norm"), value(a, "grad_norm"));
}

/// `adapter_name_or_path` continues a PEFT adapter (the golden one, made by PEFT): its shape
/// replaces the config's `lora_*`, and the policy starts away from the reference (KL > 0).
#[test]
fn lora_continues_from_a_peft_adapter() {
    let adapter = golden_dir().join("lora/adapter");
    let peft = grpo::model::AdapterFolder::read(&adapter).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[
            "use_peft=true",
            "max_steps=1",
            "lora_r=2",
            &format!("adapter_name_or_path={}", adapter.display()),
        ],
    );
    grpo::train::train(&cfg).unwrap();
    let out = dir.path().join("out");
    assert!(
        value(&metrics(&out)[0], "kl") > 0.0,
        "the PEFT adapter is on at step 1"
    );
    let trained = grpo::model::AdapterFolder::read(&out).unwrap();
    assert_eq!(
        trained.spec, peft.spec,
        "the adapter's r, alpha and targets"
    );
    assert_eq!(trained.weights.len(), peft.weights.len());
    let moved = trained
        .weights
        .iter()
        .map(|(name, w)| common::max_abs_diff(w, &peft.weights[name]))
        .fold(0.0, f64::max);
    assert!(moved > 0.0, "training continued from the adapter");
}

/// Checkpoints of the other kind, or of other adapter shapes, are refused with the fix.
#[test]
fn lora_and_full_checkpoints_do_not_mix() {
    let lora_run = tempfile::tempdir().unwrap();
    grpo::train::train(&config(
        lora_run.path(),
        &["use_peft=true", "lora_r=2", "max_steps=2"],
    ))
    .unwrap();
    let full_run = tempfile::tempdir().unwrap();
    grpo::train::train(&config(full_run.path(), &["max_steps=2"])).unwrap();
    let resume = |run: &tempfile::TempDir| {
        format!(
            "resume_from_checkpoint={}",
            run.path().join("out/checkpoint-2").display()
        )
    };
    let attempt = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let err = grpo::train::train(&config(dir.path(), extra)).unwrap_err();
        format!("{err:#}")
    };
    let msg = attempt(&[&resume(&lora_run)]);
    assert!(msg.contains("use_peft = true"), "{msg}");
    let msg = attempt(&["use_peft=true", "lora_r=2", &resume(&full_run)]);
    assert!(msg.contains("use_peft = false"), "{msg}");
    let msg = attempt(&["use_peft=true", "lora_r=4", &resume(&lora_run)]);
    assert!(msg.contains("r 2") && msg.contains("r 4"), "{msg}");
}

/// With LoRA (dropout 0) `forward_batch_size` changes neither the loss nor the adapters'
/// gradients either: one group per chunk trains like one pass.
#[test]
fn lora_forward_batch_size_changes_neither_loss_nor_gradients() {
    let run = |forward_batch_size: usize| {
        ChunkingRun::new(
            &[
                "use_peft=true",
                "lora_dropout=0.0",
                &format!("forward_batch_size={forward_batch_size}"),
            ],
            "adapter_model.safetensors",
        )
    };
    let whole = run(0);
    // The adapters before training: the same PEFT initialisation both runs started from.
    let cfg = &whole.cfg;
    let files = grpo::model::ModelFiles::resolve(golden_dir().to_str().unwrap(), "main").unwrap();
    let initial = grpo::model::Qwen2::load_base(&files, &Device::Cpu, candle_core::DType::F32)
        .unwrap()
        .with_new_adapters(grpo::model::LoraSpec::from_config(cfg).unwrap(), cfg.seed)
        .unwrap();
    let mut before: Vec<(String, Vec<f32>)> = initial
        .named_parameters()
        .iter()
        .map(|(name, var)| {
            let values = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (format!("base_model.model.{name}"), values)
        })
        .collect();
    before.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        before.iter().map(|w| &w.0).collect::<Vec<_>>(),
        whole.weights.iter().map(|w| &w.0).collect::<Vec<_>>()
    );
    run(2).assert_trains_as(
        &whole,
        &before,
        &["loss", "grad_norm", "kl", "entropy"],
        "LoRA, forward_batch_size = 2",
    );
}

/// LoRA dropout masks belong to the chunk, not to the worker that runs it: with chunks fed to
/// one worker or to two at once, a run with dropout logs the same losses and trains the same
/// adapters (masks drawn from one shared generator would differ with the workers' order).
#[test]
fn lora_dropout_masks_do_not_depend_on_the_workers() {
    let run = |cpu_workers: usize| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            &[
                "use_peft=true",
                "lora_dropout=0.5",
                "per_device_train_batch_size=3",
                "gradient_accumulation_steps=1",
                "max_steps=2",
                "learning_rate=0.5",
                "forward_batch_size=1",
                &format!("cpu_workers={cpu_workers}"),
            ],
        );
        grpo::train::train(&cfg).unwrap();
        let out = dir.path().join("out");
        (
            metrics(&out),
            weights(&out.join("adapter_model.safetensors")),
        )
    };
    let (one_metrics, one) = run(1);
    let (two_metrics, two) = run(2);
    for (a, b) in one_metrics.iter().zip(&two_metrics) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (value(a, key), value(b, key));
            assert!((x - y).abs() <= 1e-6 + 1e-5 * x.abs(), "{key}: {y} vs {x}");
        }
    }
    for ((name, x), (_, y)) in one.iter().zip(&two) {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-4 * scale.max(1e-3), "{name}: differs by {diff}");
    }
}

/// The data position a checkpoint of the run in `out` saved.
fn data_at(out: &Path, step: u64) -> grpo::data::DataPosition {
    grpo::checkpoint::load_state(&out.join(format!("checkpoint-{step}")))
        .unwrap()
        .0
        .data
}

fn run_in(dir: &Path, extra: &[&str]) -> Outcome {
    let mut sets = vec!["log_completions=true", "save_steps=1"];
    sets.extend_from_slice(extra);
    grpo::train::train(&config(dir, &sets)).unwrap();
    let out = dir.join("out");
    Outcome {
        metrics: metrics(&out),
        completions: Vec::new(),
        weights: weights(&out.join("model.safetensors")),
    }
}

/// `steps_per_generation = 4` (two optimizer steps of 2 micro-steps): step 1 samples 4
/// micro-batches of 2 prompts at once (the data moves on by 8 prompts) and step 2 trains on the
/// last two without sampling, with the sampling-time log-probs as the old policy (with
/// `epsilon = 0` every ratio off 1 is clipped: step 2 clips, while a run sampling every step
/// trains on-policy and clips nothing). `generation_batch_size = 16` completions is the same.
#[test]
fn steps_per_generation_spreads_a_generation_over_steps() {
    let clip_all = ["epsilon=0.0", "epsilon_high=0.0", "learning_rate=0.05"];
    let spread_dir = tempfile::tempdir().unwrap();
    let spread = run_in(
        spread_dir.path(),
        &[&clip_all[..], &["steps_per_generation=4"]].concat(),
    );
    let out = spread_dir.path().join("out");
    let sampled: Vec<bool> = logged_metrics(&out)
        .iter()
        .map(|line| value(line, "timing/generation") > 0.0)
        .collect();
    assert_eq!(
        sampled,
        [true, false, true, false],
        "one generation per 2 steps"
    );
    let prompts = |p: grpo::data::DataPosition| p.epoch * QUESTIONS.len() as u64 + p.index;
    assert_eq!(prompts(data_at(&out, 1)), 8, "step 1 sampled 4 x 2 prompts");
    assert_eq!(prompts(data_at(&out, 2)), 8, "step 2 sampled nothing");
    assert_eq!(prompts(data_at(&out, 3)), 16);
    assert!(value(&spread.metrics[1], "clip_ratio/region_mean") > 0.0);

    let every_step = run_in(tempfile::tempdir().unwrap().path(), &clip_all);
    for line in &every_step.metrics {
        assert_eq!(
            value(line, "clip_ratio/region_mean"),
            0.0,
            "on-policy: {line}"
        );
    }

    let by_size = run_in(
        tempfile::tempdir().unwrap().path(),
        &[&clip_all[..], &["generation_batch_size=16"]].concat(),
    );
    assert_eq!(by_size.metrics, spread.metrics);
    assert_eq!(by_size.weights, spread.weights);
}

/// A reward on which a few groups of the tiny random model agree (two completions of the same
/// length in characters: open-r1's cosine reward of a wrong answer depends on length only) and
/// most do not.
const MIXED_REWARDS: &str = r#"reward_funcs=["cosine"]"#;

/// The completions a run logged at `step`, grouped by prompt (2 per group): their rewards.
fn logged_group_rewards(out: &Path, step: u64) -> Vec<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(out.join(format!("completions/step_{step}.jsonl"))).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    records
        .chunks(2)
        .map(|group| group.iter().map(|r| r["rewards"].clone()).collect())
        .collect()
}

/// `dynamic_sampling`: without it some trained groups' rewards agree; with it none do, more
/// prompts are used up, and the rounds and the zero-std fraction of everything sampled are
/// logged.
#[test]
fn dynamic_sampling_trains_only_on_groups_whose_rewards_differ() {
    let steps = ["max_steps=3"];
    let plain_dir = tempfile::tempdir().unwrap();
    run_in(plain_dir.path(), &[&steps[..], &[MIXED_REWARDS]].concat());
    let plain = plain_dir.path().join("out");
    let agreeing = (1..=3)
        .flat_map(|step| logged_group_rewards(&plain, step))
        .filter(|group| group[0] == group[1])
        .count();
    assert!(agreeing > 0, "the premise: some groups' rewards agree");
    for line in metrics(&plain) {
        assert!(line.get("dynamic_sampling/generation_rounds").is_none());
    }

    let dynamic_dir = tempfile::tempdir().unwrap();
    run_in(
        dynamic_dir.path(),
        &[&steps[..], &[MIXED_REWARDS, "dynamic_sampling=true"]].concat(),
    );
    let dynamic = dynamic_dir.path().join("out");
    for step in 1..=3 {
        for group in logged_group_rewards(&dynamic, step) {
            assert_ne!(
                group[0], group[1],
                "step {step} trained on a zero-std group"
            );
        }
    }
    let lines = metrics(&dynamic);
    assert!(lines
        .iter()
        .any(|l| value(l, "dynamic_sampling/generation_rounds") > 1.0));
    for line in &lines {
        assert_eq!(value(line, "dynamic_sampling/filled_groups"), 0.0);
        let rounds = value(line, "dynamic_sampling/generation_rounds");
        let zero_std = value(line, "frac_reward_zero_std");
        assert_eq!(rounds > 1.0, zero_std > 0.0, "{line}");
    }
    let prompts = |p: grpo::data::DataPosition| p.epoch * QUESTIONS.len() as u64 + p.index;
    assert!(prompts(data_at(&dynamic, 3)) > prompts(data_at(&plain, 3)));
}

/// When every group's rewards agree (a random model is never correct), dynamic sampling runs
/// 1 + `max_resample_rounds` rounds, each sampling the missing groups' worth of prompts, then
/// trains on groups whose rewards agree and says so.
#[test]
fn max_resample_rounds_bounds_dynamic_sampling() {
    for rounds in [1u64, 3] {
        let dir = tempfile::tempdir().unwrap();
        let bound = format!("max_resample_rounds={rounds}");
        run_in(
            dir.path(),
            &[
                "max_steps=1",
                r#"reward_funcs=["correctness"]"#,
                "dynamic_sampling=true",
                &bound,
            ],
        );
        let out = dir.path().join("out");
        let line = &metrics(&out)[0];
        assert_eq!(
            value(line, "dynamic_sampling/generation_rounds"),
            (1 + rounds) as f64
        );
        assert_eq!(
            value(line, "dynamic_sampling/filled_groups"),
            4.0,
            "2 x 2 prompts"
        );
        assert_eq!(value(line, "frac_reward_zero_std"), 1.0);
        // 4 prompts per round: the first round's, then the 4 missing groups' each time.
        let data = data_at(&out, 1);
        assert_eq!(
            data.epoch * QUESTIONS.len() as u64 + data.index,
            4 * (1 + rounds)
        );
    }
}

/// Dynamic sampling with generations of 4 micro-batches (2 steps each): resuming from
/// checkpoint-1 (inside a generation: its rollouts come from the checkpoint) or checkpoint-2
/// (between two: the resampled data order and the seeds of every round must come back) ends bit
/// for bit where the uninterrupted run does.
#[test]
fn resume_with_dynamic_sampling_continues_bit_for_bit() {
    let extra = [
        MIXED_REWARDS,
        "dynamic_sampling=true",
        "steps_per_generation=4",
        "save_steps=1",
        "max_steps=4",
    ];
    let straight = tempfile::tempdir().unwrap();
    grpo::train::train(&config(straight.path(), &extra)).unwrap();
    let a = straight.path().join("out");
    let logged = metrics(&a);
    assert!(
        logged
            .iter()
            .any(|l| value(l, "dynamic_sampling/generation_rounds") > 1.0),
        "groups were resampled: {logged:?}"
    );
    for from in [1usize, 2] {
        let resumed = tempfile::tempdir().unwrap();
        let resume = format!(
            "resume_from_checkpoint={}",
            a.join(format!("checkpoint-{from}")).display()
        );
        let mut resumed_extra = extra.to_vec();
        resumed_extra.push(&resume);
        grpo::train::train(&config(resumed.path(), &resumed_extra)).unwrap();
        let b = resumed.path().join("out");
        assert_eq!(
            weights(&a.join("model.safetensors")),
            weights(&b.join("model.safetensors")),
            "resumed from checkpoint-{from}"
        );
        assert_eq!(logged[from..], metrics(&b)[..], "from checkpoint-{from}");
        assert_eq!(data_at(&a, 4), data_at(&b, 4), "the same data consumed");
    }
}

/// Resuming a checkpoint saved inside a generation with another `steps_per_generation` is an
/// error naming it, not a panic or a silent mix.
#[test]
fn resume_inside_a_generation_needs_its_steps_per_generation() {
    let dir = tempfile::tempdir().unwrap();
    grpo::train::train(&config(
        dir.path(),
        &["steps_per_generation=4", "save_steps=1", "max_steps=1"],
    ))
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    let resume = format!(
        "resume_from_checkpoint={}",
        dir.path().join("out/checkpoint-1").display()
    );
    let err = grpo::train::train(&config(other.path(), &["steps_per_generation=6", &resume]))
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("steps_per_generation") && msg.contains("4 micro-batches"),
        "{msg}"
    );
}

/// Each loss option reaches the loop. Step 2 retrains step 1's rollout (`num_iterations = 2`),
/// so its ratios are off 1: sequence-level ratios, cispo, sapo and its temperatures and
/// `delta` change step 2's loss; `top_entropy_quantile` changes step 1's already. cispo logs
/// its own clip metric and sapo none.
#[test]
fn loss_options_reach_the_loop() {
    let common = ["num_iterations=2", "max_steps=2", "learning_rate=0.05"];
    let run = |extra: &[&str]| run_with(&[&common[..], extra].concat()).metrics;
    let loss = |lines: &[serde_json::Value], step: usize| value(&lines[step], "loss");
    let base = run(&[]);

    let sequence = run(&["importance_sampling_level=sequence"]);
    assert_ne!(loss(&sequence, 1), loss(&base, 1), "GSPO");

    let cispo = run(&["loss_type=cispo", "epsilon_high=1.02"]);
    let cispo_wider = run(&["loss_type=cispo", "epsilon_high=5.0"]);
    assert_ne!(loss(&cispo, 1), loss(&cispo_wider, 1), "cispo's cap");
    assert!(cispo[1].get("cispo_clip_ratio").is_some());
    assert!(cispo[1].get("clip_ratio/region_mean").is_none());

    let sapo = run(&["loss_type=sapo"]);
    let sapo_hot = run(&[
        "loss_type=sapo",
        "sapo_temperature_pos=4.0",
        "sapo_temperature_neg=0.25",
    ]);
    assert_ne!(loss(&sapo, 1), loss(&sapo_hot, 1), "sapo's temperatures");
    assert_ne!(loss(&sapo, 1), loss(&base, 1));
    assert!(sapo[1].get("clip_ratio/region_mean").is_none());

    let tight = ["epsilon=0.01", "epsilon_high=0.01"];
    let undelta = run(&tight);
    let delta = run(&[&tight[..], &["delta=1.0101"]].concat());
    assert_ne!(loss(&delta, 1), loss(&undelta, 1), "delta");

    let top_entropy = run(&["top_entropy_quantile=0.2"]);
    assert_ne!(
        loss(&top_entropy, 0),
        loss(&base, 0),
        "top_entropy_quantile"
    );
}

/// `forward_batch_size` with `top_entropy_quantile` and sequence-level ratios: chunks (slices
/// of a group, or single groups) take the whole micro-batch's entropy threshold and give the
/// loss, metrics and update of one pass.
#[test]
fn chunked_micro_steps_keep_the_entropy_threshold_and_sequence_ratios() {
    let run = |forward_batch_size: usize| {
        ChunkingRun::new(
            &[
                "top_entropy_quantile=0.5",
                "importance_sampling_level=sequence",
                &format!("forward_batch_size={forward_batch_size}"),
            ],
            "model.safetensors",
        )
    };
    let initial = weights(&golden_dir().join("model.safetensors"));
    let whole = run(0);
    for size in [1, 2] {
        run(size).assert_trains_as(
            &whole,
            &initial,
            &[
                "loss",
                "grad_norm",
                "kl",
                "entropy",
                "clip_ratio/region_mean",
            ],
            &format!("forward_batch_size = {size}"),
        );
    }
}
