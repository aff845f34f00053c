//! `grpo sft` end to end on the tiny golden model: the logged loss is the mean cross-entropy of
//! the target tokens (checked with an independent unpadded forward), training lowers it, a
//! resumed run continues bit for bit, LoRA adapters train too, and bad solution columns are
//! refused by name.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use grpo::config::Config;
use grpo::data::{DataPosition, Dataset, DatasetSpec};
use grpo::model::{completion_logprobs, ModelFiles, Qwen2};
use grpo::prompt::{ChatTokenizer, Prompter};
use grpo::sft::{sft, sft_target};

use common::golden_dir;

/// 2 examples per micro-step, 2 micro-steps per update, on 16 synthetic problems.
fn config(dir: &Path, extra: &[&str]) -> Config {
    let data = dir.join("data");
    if !data.exists() {
        grpo::synth::write_dataset(&data, 16, 4, 3, grpo::synth::MAX_ANSWER).unwrap();
    }
    let mut sets = vec![
        format!("model_name_or_path={}", golden_dir().display()),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", dir.join("out").display()),
        "per_device_train_batch_size=2".into(),
        "gradient_accumulation_steps=2".into(),
        "max_prompt_length=96".into(),
        "max_completion_length=256".into(),
        "max_steps=6".into(),
        "save_steps=3".into(),
        "logging_steps=1".into(),
        "learning_rate=0.01".into(),
        "warmup_ratio=0.0".into(),
        "seed=5".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
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

#[test]
fn targets_are_think_and_answer_turns_without_calculator_annotations() {
    assert_eq!(
        sft_target("She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072").unwrap(),
        "<think>\nShe sold 48/2 = 24 clips.\nIn all 48+24 = 72.\n</think>\n<answer>\n1072\n</answer>"
    );
    assert_eq!(
        sft_target("72"),
        None,
        "no #### line: not a worked solution"
    );
    assert_eq!(sft_target("reasoning\n####  "), None, "no final answer");
}

#[test]
fn logged_loss_is_the_mean_cross_entropy_of_the_target_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["max_steps=1", "learning_rate=0.0"]);
    sft(&cfg).unwrap();
    let logged = losses(&dir.path().join("out"))[0];

    // Independently: the step's 4 examples, each as one unpadded row through the plain forward.
    let spec = DatasetSpec {
        answer_column: cfg.dataset_solution_column.clone(),
        ..DatasetSpec::from_config(&cfg, "train")
    };
    let dataset = Dataset::load_solutions(&spec).unwrap();
    let examples = dataset.next_batch(cfg.seed, 4, &mut DataPosition::default());
    let files = ModelFiles::resolve(golden_dir().to_str().unwrap(), "main").unwrap();
    let tokenizer = Arc::new(ChatTokenizer::from_dir(&golden_dir()).unwrap());
    let prompter = Prompter::new(tokenizer.clone(), Some(cfg.system_prompt.clone()), 96).unwrap();
    let model = Qwen2::load_policy(&files, &Device::Cpu).unwrap();
    let end_of_turn = tokenizer.token_to_id("<|im_end|>").unwrap();
    let (mut total, mut count) = (0.0f64, 0usize);
    for example in &examples {
        let prompt = prompter.prompt_ids(&example.question).unwrap();
        let mut target = tokenizer
            .encode(&sft_target(&example.answer).unwrap())
            .unwrap();
        target.push(end_of_turn);
        let ids: Vec<u32> = prompt.iter().chain(&target).copied().collect();
        let len = ids.len();
        let input = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, len), candle_core::DType::F32, &Device::Cpu).unwrap();
        let logps = completion_logprobs(&model, &input, &mask, prompt.len(), 1.0, false).unwrap();
        total += logps
            .logprobs
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        count += target.len();
    }
    let expected = -total / count as f64;
    assert!(
        (logged - expected).abs() <= 1e-4 * expected.abs(),
        "logged loss {logged}, mean target cross-entropy {expected}"
    );
}

#[test]
fn training_lowers_the_loss_and_resume_continues_bit_for_bit() {
    let straight = tempfile::tempdir().unwrap();
    sft(&config(straight.path(), &[])).unwrap();
    let out = straight.path().join("out");
    let logged = losses(&out);
    assert_eq!(logged.len(), 6);
    assert!(
        logged[5] < 0.8 * logged[0],
        "the target cross-entropy falls: {logged:?}"
    );
    assert!(out.join("checkpoint-3/trainer_state.json").is_file());
    let files = ModelFiles::resolve(out.to_str().unwrap(), "main").unwrap();
    Qwen2::load_policy(&files, &Device::Cpu).unwrap();

    let resumed = tempfile::tempdir().unwrap();
    let resume = format!(
        "resume_from_checkpoint={}",
        out.join("checkpoint-3").display()
    );
    sft(&config(resumed.path(), &[&resume])).unwrap();
    let again = resumed.path().join("out");
    assert_eq!(
        weights(&out.join("model.safetensors")),
        weights(&again.join("model.safetensors"))
    );
    assert_eq!(
        logged[3..],
        losses(&again)[..],
        "steps 4 to 6 logged identically"
    );
}

#[test]
fn a_column_without_worked_solutions_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["dataset_solution_column=answer_only"]);
    let err = format!("{:#}", sft(&cfg).unwrap_err());
    assert!(
        err.contains("answer_only")
            && err.contains("dataset_solution_column")
            && err.contains("####"),
        "{err}"
    );
    let cfg = config(dir.path(), &["dataset_solution_column=solution"]);
    let err = format!("{:#}", sft(&cfg).unwrap_err());
    assert!(
        err.contains("`solution`")
            && err.contains("dataset_solution_column")
            && err.contains("columns present"),
        "{err}"
    );
}

/// `max_grad_norm = 0` turns clipping off: sft runs and still logs the gradient norm.
#[test]
fn zero_max_grad_norm_trains_without_clipping() {
    let dir = tempfile::tempdir().unwrap();
    sft(&config(dir.path(), &["max_grad_norm=0", "max_steps=1"])).unwrap();
    let text = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let norm = line["grad_norm"].as_f64().unwrap();
    assert!(norm.is_finite() && norm > 0.0, "{line}");
}

/// `use_peft` works for `sft` too: the adapters train (the loss falls), the base stays, and the
/// output is a PEFT adapter folder.
#[test]
fn sft_trains_lora_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[
            "use_peft=true",
            "lora_r=4",
            "learning_rate=0.02",
            "max_steps=4",
        ],
    );
    sft(&cfg).unwrap();
    let out = dir.path().join("out");
    let losses = losses(&out);
    assert!(losses[3] < losses[0], "{losses:?}");
    assert!(!out.join("model.safetensors").exists());
    let adapter = grpo::model::AdapterFolder::read(&out).unwrap();
    assert_eq!(adapter.spec.r, 4);
    assert_eq!(adapter.weights.len(), 2 * 7 * golden_layers());
}

fn golden_layers() -> usize {
    let text = std::fs::read_to_string(golden_dir().join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["num_hidden_layers"].as_u64().unwrap() as usize
}
