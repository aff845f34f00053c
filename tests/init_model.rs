//! `grpo init-model` and [`grpo::init_model`]: random checkpoints shaped like the golden
//! config load with our loader, with transformers' initialisation statistics.

mod common;

use std::collections::HashMap;
use std::path::Path;

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use grpo::init_model::{
    config_json, init_model_folder, random_model, random_parameters, write_random_checkpoint,
    DEFAULT_INITIALIZER_RANGE,
};
use grpo::model::{ModelFamily, ModelFiles, Qwen2, Qwen2Config};
use serde_json::Value;

use common::{cases, golden_dir};

fn golden_config_json() -> Value {
    let text = std::fs::read_to_string(golden_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn resolve(dir: &Path) -> ModelFiles {
    ModelFiles::resolve(dir.to_str().unwrap(), "main").expect("the random model resolves")
}

fn stored(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn std_and_mean(t: &Tensor) -> (f64, f64) {
    let values = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (var.sqrt(), mean)
}

/// The `eos_token_id` of a config (int or list) as a list.
fn eos_ids(config: &Value) -> Vec<u32> {
    match &config["eos_token_id"] {
        Value::Number(id) => vec![id.as_u64().unwrap() as u32],
        Value::Array(ids) => ids.iter().map(|id| id.as_u64().unwrap() as u32).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn random_model_from_the_golden_config_loads_with_its_names_and_shapes() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("random");
    init_model_folder(&golden_dir().join("config.json"), &dir, 7, None).unwrap();

    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        written,
        golden_config_json(),
        "config.json is written as given"
    );

    let files = resolve(&dir);
    assert_eq!(files.config, resolve(&golden_dir()).config);
    assert_eq!(files.eos_token_ids, eos_ids(&golden_config_json()));
    let model = Qwen2::load_policy(&files, &Device::Cpu).unwrap();
    let names: Vec<&str> = model
        .named_parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let cases = cases();
    let expected: Vec<&str> = cases["meta"]["model"]["parameter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names, expected);
    let tensors = stored(&dir);
    assert_eq!(
        tensors.contains_key("lm_head.weight"),
        !files.config.tie_word_embeddings,
        "lm_head.weight is stored only for untied embeddings"
    );
    assert_eq!(tensors.len(), files.config.parameter_shapes().len());
}

#[test]
fn values_follow_transformers_initialisation() {
    // Qwen2's and Qwen3's (whose q_norm and k_norm start at 1 too).
    for like in [golden_dir(), common::qwen3_dir()].map(|dir| dir.join("config.json")) {
        let config: Value = serde_json::from_str(&std::fs::read_to_string(&like).unwrap()).unwrap();
        check_initialisation(&like, &config);
    }
}

fn check_initialisation(like: &Path, config: &Value) {
    let std = config["initializer_range"]
        .as_f64()
        .unwrap_or(DEFAULT_INITIALIZER_RANGE);
    let out = tempfile::tempdir().unwrap();
    init_model_folder(like, out.path(), 1, None).unwrap();
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(&written, config, "config.json is written as given");
    let tensors = stored(out.path());
    assert_eq!(
        tensors.len(),
        resolve(out.path()).config.parameter_shapes().len()
    );
    for (name, tensor) in tensors {
        let (sample_std, mean) = std_and_mean(&tensor);
        if name.ends_with("norm.weight") {
            assert_eq!((sample_std, mean), (0.0, 1.0), "{name}: norms start at 1");
        } else if name.ends_with(".bias") {
            assert_eq!((sample_std, mean), (0.0, 0.0), "{name}: biases start at 0");
        } else {
            assert!(
                (sample_std / std - 1.0).abs() < 0.1,
                "{name}: std {sample_std}, initializer_range {std}"
            );
            assert!(mean.abs() < 0.1 * std, "{name}: mean {mean}");
        }
    }
}

#[test]
fn the_seed_decides_the_weights() {
    let config = resolve(&golden_dir()).config;
    let a = random_parameters(&config, 0.02, 3, None).unwrap();
    let b = random_parameters(&config, 0.02, 3, None).unwrap();
    let c = random_parameters(&config, 0.02, 4, None).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for ((name, x), ((_, y), (_, z))) in a.iter().zip(b.iter().zip(&c)) {
        assert_eq!(values(x), values(y), "{name}: same seed, same values");
        if name.ends_with("proj.weight") {
            assert_ne!(values(x), values(z), "{name}: another seed, other values");
        }
    }
}

#[test]
fn pad_row_is_zero_and_dtype_follows_the_config() {
    let mut config = golden_config_json();
    config["pad_token_id"] = serde_json::json!(3);
    config["torch_dtype"] = serde_json::json!("bfloat16");
    config["tie_word_embeddings"] = serde_json::json!(false);
    let out = tempfile::tempdir().unwrap();
    write_random_checkpoint(&config, "edited config", out.path(), 5).unwrap();
    let tensors = stored(out.path());
    let embed = &tensors["model.embed_tokens.weight"];
    assert_eq!(embed.dtype(), DType::BF16);
    let row = embed.get(3).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(
        row.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert!(tensors.contains_key("lm_head.weight"));
    let generation: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(generation["pad_token_id"], 3);
    assert_eq!(generation["eos_token_id"], config["eos_token_id"]);
    Qwen2::load_policy(&resolve(out.path()), &Device::Cpu).expect("bf16 untied model loads");
}

#[test]
fn config_json_and_random_model_give_any_shape() {
    let qwen3 = resolve(&common::qwen3_dir()).config;
    assert_eq!(qwen3.family, ModelFamily::Qwen3);
    for (base, attention_bias) in [
        (resolve(&golden_dir()).config, false),
        (qwen3.clone(), false),
        (qwen3, true),
    ] {
        let mut shape = base;
        shape.num_hidden_layers = 3;
        shape.head_dim = 8; // not hidden_size / num_attention_heads
        shape.attention_bias = attention_bias;
        check_any_shape(shape);
    }
}

fn check_any_shape(shape: Qwen2Config) {
    let json = config_json(&shape);
    assert_eq!(json["model_type"], shape.family.model_type());
    assert_eq!(json["architectures"][0], shape.family.architecture());
    let out = tempfile::tempdir().unwrap();
    write_random_checkpoint(&json, "shape", out.path(), 0).unwrap();
    let files = resolve(out.path());
    assert_eq!(files.config, shape);

    let loaded = Qwen2::load_policy(&files, &Device::Cpu).unwrap();
    let in_memory = random_model(shape, DEFAULT_INITIALIZER_RANGE, 0, &Device::Cpu).unwrap();
    for ((name, a), (_, b)) in loaded
        .named_parameters()
        .iter()
        .zip(in_memory.named_parameters())
    {
        let diff = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}: the folder holds the in-memory model");
    }
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 3), DType::U8, &Device::Cpu).unwrap();
    let logits = in_memory
        .lm_head(&in_memory.forward_masked(&ids, &mask).unwrap())
        .unwrap();
    assert_eq!(logits.dims(), [1, 3, in_memory.config().vocab_size]);
}

#[test]
fn tokenizer_files_are_copied_or_named_when_missing() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("with-tokenizer");
    init_model_folder(
        &golden_dir().join("config.json"),
        &dir,
        0,
        Some(&golden_dir()),
    )
    .unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(dir.join(file)).unwrap(),
            std::fs::read(golden_dir().join(file)).unwrap(),
            "{file}"
        );
    }
    resolve(&dir).tokenizer_files().expect("tokenizer found");

    let empty = out.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let error = init_model_folder(
        &golden_dir().join("config.json"),
        &out.path().join("other"),
        0,
        Some(&empty),
    )
    .unwrap_err();
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
    assert!(
        !out.path().join("other").exists(),
        "nothing written on error"
    );
}

#[test]
fn an_existing_model_is_never_overwritten() {
    let out = tempfile::tempdir().unwrap();
    let like = golden_dir().join("config.json");
    init_model_folder(&like, out.path(), 0, None).unwrap();
    let before = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let error = init_model_folder(&like, out.path(), 1, None).unwrap_err();
    assert!(
        error.to_string().contains("already holds a model"),
        "{error}"
    );
    assert_eq!(
        std::fs::read(out.path().join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn bad_configs_are_named() {
    let out = tempfile::tempdir().unwrap();
    let like = out.path().join("config.json");
    std::fs::write(&like, "{ not json").unwrap();
    let error = init_model_folder(&like, &out.path().join("m"), 0, None).unwrap_err();
    assert!(format!("{error:#}").contains("config.json"), "{error:#}");

    let mut config = golden_config_json();
    config["initializer_range"] = serde_json::json!(-1.0);
    let error = write_random_checkpoint(&config, "cfg", &out.path().join("m"), 0).unwrap_err();
    assert!(error.to_string().contains("initializer_range"), "{error}");
}

#[test]
fn cli_writes_a_loadable_model() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("cli");
    Command::cargo_bin("grpo")
        .unwrap()
        .args(["init-model", "--like"])
        .arg(golden_dir().join("config.json"))
        .arg("--out")
        .arg(&dir)
        .args(["--seed", "9", "--tokenizer-from"])
        .arg(golden_dir())
        .assert()
        .success();
    resolve(&dir).tokenizer_files().unwrap();
    let library = out.path().join("library");
    init_model_folder(&golden_dir().join("config.json"), &library, 9, None).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(library.join("model.safetensors")).unwrap(),
        "--seed reaches the weights"
    );
}
