//! Every command on the golden Qwen3 model (`$GRPO_GOLDEN_DIR/qwen3`) through the real `grpo`
//! binary: `train` samples with the KV cache, trains with the grouped forward and chunked
//! log-probs, writes checkpoints that load as Qwen3 and resumes from them bit for bit; and
//! `chat_template_kwargs` reaches the prompts of `train`, `sft`, `sample` and `eval`.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use candle_core::Device;
use grpo::model::{ModelFamily, ModelFiles, Qwen2};
use serde_json::Value;

use common::qwen3_dir;

fn grpo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grpo"));
    cmd.env_remove("RUST_LOG").env("HF_HUB_OFFLINE", "1");
    cmd
}

/// A synthetic dataset (train and test splits, with worked solutions for `sft`) in `dir/data`.
fn dataset(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    grpo::synth::write_dataset(&data, 8, 6, 3, grpo::synth::MAX_ANSWER).unwrap();
    data
}

/// `--set` arguments for a tiny run of `model` on `data`, writing into `out`: 2 prompts x 2
/// completions of at most 8 tokens per micro-step, 2 micro-steps per update.
fn tiny_run(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    [
        format!("model_name_or_path={}", model.display()),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", out.display()),
        "per_device_train_batch_size=2".into(),
        "gradient_accumulation_steps=2".into(),
        "num_generations=2".into(),
        "max_prompt_length=128".into(),
        "max_completion_length=8".into(),
        "max_steps=4".into(),
        "save_steps=2".into(),
        "logging_steps=1".into(),
        "learning_rate=0.01".into(),
        "report_to=none".into(),
        "seed=3".into(),
        "device=cpu".into(),
        // Rewards that vary on a random model's output, so advantages (and gradients) are not 0.
        r#"reward_funcs=["cosine","repetition_penalty","correctness"]"#.into(),
    ]
    .into_iter()
    .chain(extra.iter().map(|s| s.to_string()))
    .flat_map(|set| ["--set".to_string(), set])
    .collect()
}

/// The tensors of a safetensors file, sorted by name, as f32 values.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut tensors: Vec<_> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
        .into_iter()
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn train_checkpoints_and_resumes_a_qwen3_model_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let straight = dir.path().join("straight");
    grpo()
        .arg("train")
        .args(tiny_run(&qwen3_dir(), &data, &straight, &[]))
        .assert()
        .success();
    let lines = common::machine_independent_metrics(&straight);
    assert_eq!(lines.len(), 4);
    assert!(lines
        .iter()
        .all(|l| l["grad_norm"].as_f64().unwrap() > 0.0 && l["loss"].as_f64().is_some()));

    // The checkpoint is a Qwen3 folder transformers' Auto classes load: its config.json names
    // the family, its weights every parameter (q_norm and k_norm included), trained.
    let checkpoint = straight.join("checkpoint-2");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "qwen3");
    assert_eq!(config["architectures"][0], "Qwen3ForCausalLM");
    let files = ModelFiles::resolve(checkpoint.to_str().unwrap(), "main").unwrap();
    assert_eq!(files.config.family, ModelFamily::Qwen3);
    Qwen2::load_policy(&files, &Device::Cpu).unwrap();
    let before = weights(&qwen3_dir().join("model.safetensors"));
    let after = weights(&checkpoint.join("model.safetensors"));
    assert_eq!(
        before.iter().map(|w| &w.0).collect::<Vec<_>>(),
        after.iter().map(|w| &w.0).collect::<Vec<_>>(),
        "the same transformers tensor names"
    );
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "{name} was trained");
    }

    let resumed = dir.path().join("resumed");
    let resume = format!("resume_from_checkpoint={}", checkpoint.display());
    grpo()
        .arg("train")
        .args(tiny_run(&qwen3_dir(), &data, &resumed, &[&resume]))
        .assert()
        .success();
    assert_eq!(
        weights(&straight.join("model.safetensors")),
        weights(&resumed.join("model.safetensors"))
    );
    assert_eq!(
        common::machine_independent_metrics(&straight)[2..],
        common::machine_independent_metrics(&resumed)[..]
    );
}

/// A copy of the Qwen3 folder whose chat template sets `enable_thinking = false` itself: what
/// `chat_template_kwargs = {enable_thinking = false}` must render on the original.
fn thinking_off_in_the_template(dir: &Path) -> PathBuf {
    let model = dir.join("thinking-off");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(qwen3_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
        }
    }
    let path = model.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let template = config["chat_template"].as_str().unwrap();
    config["chat_template"] = format!("{{%- set enable_thinking = false %}}{template}").into();
    std::fs::write(&path, config.to_string()).unwrap();
    model
}

/// What `grpo <command>` with `sets` computed: what `sample` prints, and what the others write
/// into `out` (logged metrics without the machine's timings, eval samples, final weights).
fn run(command: &[&str], sets: &[String], out: &Path) -> Vec<String> {
    let output = grpo().args(command).args(sets).assert().success();
    let mut results = Vec::new();
    if command[0] == "sample" {
        results.push(String::from_utf8(output.get_output().stdout.clone()).unwrap());
    }
    if out.join("metrics.jsonl").is_file() {
        results.push(format!("{:?}", common::machine_independent_metrics(out)));
    }
    if let Ok(samples) = std::fs::read_to_string(out.join("eval/test-base.jsonl")) {
        results.push(samples);
    }
    if out.join("model.safetensors").is_file() {
        results.push(format!("{:?}", weights(&out.join("model.safetensors"))));
    }
    assert!(!results.is_empty(), "{command:?} left nothing to compare");
    results
}

#[test]
fn chat_template_kwargs_reach_train_sft_sample_and_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let forced = thinking_off_in_the_template(dir.path());
    let kwargs = "chat_template_kwargs={enable_thinking=false}";
    let short = ["max_steps=2", "save_steps=2"];
    for command in [
        &["train"][..],
        &["sft"],
        &["sample", "--index", "1", "--json"],
        &["eval", "--split", "test", "--limit", "3"],
    ] {
        let name = command[0];
        let out = |case: &str| dir.path().join(format!("{name}-{case}"));
        let given = run(
            command,
            &tiny_run(
                &qwen3_dir(),
                &data,
                &out("given"),
                &[&short[..], &[kwargs]].concat(),
            ),
            &out("given"),
        );
        let in_template = run(
            command,
            &tiny_run(&forced, &data, &out("template"), &short),
            &out("template"),
        );
        let default = run(
            command,
            &tiny_run(&qwen3_dir(), &data, &out("default"), &short),
            &out("default"),
        );
        assert_eq!(
            given, in_template,
            "{name}: the kwargs render as the template setting them"
        );
        assert_ne!(given, default, "{name}: without the kwargs, thinking is on");
    }
}

#[test]
fn print_config_shows_chat_template_kwargs_and_reserved_names_are_refused() {
    let output = grpo()
        .args(["train", "--print-config", "--set"])
        .arg("chat_template_kwargs={enable_thinking=false, depth=2}")
        .assert()
        .success();
    let text = String::from_utf8(output.get_output().stdout.clone()).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let kwargs = &table["chat_template_kwargs"];
    assert_eq!(kwargs["enable_thinking"].as_bool(), Some(false), "{text}");
    assert_eq!(kwargs["depth"].as_integer(), Some(2), "{text}");

    grpo()
        .args(["sample", "--prompt", "1+1=?", "--set"])
        .arg("chat_template_kwargs={add_generation_prompt=false}")
        .assert()
        .code(1)
        .stderr(predicates::str::contains("chat_template_kwargs"))
        .stderr(predicates::str::contains("add_generation_prompt"));
}

/// LoRA on Qwen3 through the binary: `use_peft` trains adapters on all seven projections of
/// every layer (never on q_norm / k_norm, which stay frozen), and `grpo merge` writes a Qwen3
/// folder (q_norm / k_norm included, as the base has them) whose logits are those of the base
/// with the trained adapter.
#[test]
fn lora_trains_and_merges_a_qwen3_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("lora");
    let lora = [
        "use_peft=true",
        "lora_r=2",
        r#"lora_target_modules="all-linear""#,
        "learning_rate=0.05",
    ];
    grpo()
        .arg("train")
        .args(tiny_run(&qwen3_dir(), &data, &out, &lora))
        .assert()
        .success();
    let adapter = grpo::model::AdapterFolder::read(&out).unwrap();
    let layers = ModelFiles::resolve(qwen3_dir().to_str().unwrap(), "main")
        .unwrap()
        .config
        .num_hidden_layers;
    assert_eq!(
        adapter.weights.len(),
        layers * 7 * 2,
        "A and B of 7 modules per layer"
    );
    assert!(adapter.weights.keys().all(|k| !k.contains("norm")));
    let trained_b = adapter
        .weights
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .filter(|(_, t)| common::flat_f64(t).iter().any(|&v| v != 0.0))
        .count();
    assert!(trained_b > 0, "the adapters trained");

    let merged = dir.path().join("merged");
    grpo()
        .args(["merge", "--adapter"])
        .arg(&out)
        .arg("--out")
        .arg(&merged)
        .assert()
        .success();
    let merged_files = ModelFiles::resolve(merged.to_str().unwrap(), "main").unwrap();
    assert_eq!(merged_files.config.family, ModelFamily::Qwen3);
    let base_weights = weights(&qwen3_dir().join("model.safetensors"));
    let merged_weights = weights(&merged.join("model.safetensors"));
    assert_eq!(
        base_weights.iter().map(|w| &w.0).collect::<Vec<_>>(),
        merged_weights.iter().map(|w| &w.0).collect::<Vec<_>>(),
        "every tensor of the base, by the same names"
    );
    for ((name, base), (_, merged)) in base_weights.iter().zip(&merged_weights) {
        if name.contains("norm") {
            assert_eq!(base, merged, "{name} is frozen");
        }
    }

    let base_files = ModelFiles::resolve(qwen3_dir().to_str().unwrap(), "main").unwrap();
    let with_adapter = Qwen2::load_base(&base_files, &Device::Cpu, candle_core::DType::F32)
        .unwrap()
        .with_adapters(adapter.spec, adapter.weights)
        .unwrap();
    let merged_model = Qwen2::load_reference(&merged_files, &Device::Cpu).unwrap();
    let base_model = Qwen2::load_reference(&base_files, &Device::Cpu).unwrap();
    let ids = candle_core::Tensor::new(&[[3u32, 17, 42, 5, 99, 7]], &Device::Cpu).unwrap();
    let mask = ids.ones_like().unwrap();
    let logits = |model: &Qwen2| {
        model
            .lm_head(&model.forward_masked(&ids, &mask).unwrap())
            .unwrap()
    };
    let want = logits(&with_adapter);
    let scale = common::max_abs_diff(&want, &want.zeros_like().unwrap());
    let merged_diff = common::max_abs_diff(&logits(&merged_model), &want);
    assert!(
        merged_diff <= 1e-5 * scale.max(1.0),
        "merged vs adapter logits differ by {merged_diff}"
    );
    assert!(
        common::max_abs_diff(&logits(&base_model), &want) > 100.0 * merged_diff.max(1e-7),
        "the adapter changes the logits"
    );
}
