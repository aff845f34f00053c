//! Any size: the `config.json` of every Qwen2.5 and Qwen3 release users train
//! (`tests/fixtures/model-configs/`) cut to one or two layers, with random bf16 weights from
//! `grpo init-model --like` stored in shards, loads into f32 master weights with transformers'
//! names and shapes, and decodes with the KV cache as its full forward computes; chunked
//! log-probs work over the full 151,936-token vocabulary. Also: unsupported families and
//! settings are refused naming them.
//!
//! What makes the releases differ stays real: `hidden_size`, the query and key/value heads,
//! `head_dim` (128 for every Qwen3, not `hidden_size / num_attention_heads`), biases, q/k norms
//! and tying. To keep each test a few seconds (random weights cost about 60 ns each in a debug
//! build), the vocabulary is cut to 512 rows and, above 2B, the MLP's `intermediate_size` to 512
//! (the smaller releases keep theirs).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor, D};
use grpo::model::{token_logprobs, ModelFamily, ModelFiles, Qwen2, Qwen2Config};
use serde_json::{json, Value};

/// The real `config.json` of a release, from `tests/fixtures/model-configs/`.
fn release_config(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model-configs")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Writes `config` to `dir/like.json` and runs `grpo init-model --like` into `dir/model`.
fn init_model(dir: &Path, config: &Value) -> PathBuf {
    let like = dir.join("like.json");
    std::fs::write(&like, serde_json::to_string_pretty(config).unwrap()).unwrap();
    let out = dir.join("model");
    Command::new(env!("CARGO_BIN_EXE_grpo"))
        .env_remove("RUST_LOG")
        .args(["init-model", "--seed", "3", "--like"])
        .arg(&like)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    out
}

/// Splits `dir/model.safetensors` into two shards (the embeddings alone in the first, as the
/// releases' first shard starts) with a `model.safetensors.index.json`, as the hub stores models
/// above a few GB.
fn shard(dir: &Path) {
    let single = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let (first, second): (HashMap<String, Tensor>, HashMap<String, Tensor>) = tensors
        .into_iter()
        .partition(|(name, _)| name == "model.embed_tokens.weight");
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (shard, file) in [first, second].iter().zip(names) {
        candle_core::safetensors::save(shard, dir.join(file)).unwrap();
        for name in shard.keys() {
            weight_map.insert(name.clone(), file.into());
        }
    }
    let index = json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// transformers' parameter names and shapes for a config.json, written out from the modelling
/// files (`modeling_qwen2.py`, `modeling_qwen3.py`) rather than from our code.
fn transformers_shapes(config: &Value) -> HashMap<String, Vec<usize>> {
    let get = |key: &str| config[key].as_u64().unwrap() as usize;
    let (hidden, heads, kv_heads) = (
        get("hidden_size"),
        get("num_attention_heads"),
        get("num_key_value_heads"),
    );
    let qwen3 = config["model_type"] == "qwen3";
    let head_dim = config["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |d| d as usize);
    let (q, kv, inter) = (
        heads * head_dim,
        kv_heads * head_dim,
        get("intermediate_size"),
    );
    let mut shapes = HashMap::from([
        (
            "model.embed_tokens.weight".to_string(),
            vec![get("vocab_size"), hidden],
        ),
        ("model.norm.weight".to_string(), vec![hidden]),
    ]);
    if !config["tie_word_embeddings"].as_bool().unwrap() {
        shapes.insert("lm_head.weight".into(), vec![get("vocab_size"), hidden]);
    }
    for layer in 0..get("num_hidden_layers") {
        let p = format!("model.layers.{layer}");
        let mut add = |name: &str, shape: Vec<usize>| {
            shapes.insert(format!("{p}.{name}"), shape);
        };
        add("self_attn.q_proj.weight", vec![q, hidden]);
        add("self_attn.k_proj.weight", vec![kv, hidden]);
        add("self_attn.v_proj.weight", vec![kv, hidden]);
        add("self_attn.o_proj.weight", vec![hidden, q]);
        if qwen3 {
            add("self_attn.q_norm.weight", vec![head_dim]);
            add("self_attn.k_norm.weight", vec![head_dim]);
        } else {
            add("self_attn.q_proj.bias", vec![q]);
            add("self_attn.k_proj.bias", vec![kv]);
            add("self_attn.v_proj.bias", vec![kv]);
        }
        add("mlp.gate_proj.weight", vec![inter, hidden]);
        add("mlp.up_proj.weight", vec![inter, hidden]);
        add("mlp.down_proj.weight", vec![hidden, inter]);
        add("input_layernorm.weight", vec![hidden]);
        add("post_attention_layernorm.weight", vec![hidden]);
    }
    shapes
}

/// Left-padded prompts of random ids below `vocab`, with their mask: row 0 full, row 1 padded.
fn prompts(vocab: usize, len: usize) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..2 * len as u32)
        .map(|i| (i * 7919 + 11) % vocab as u32)
        .collect();
    let mask: Vec<u32> = (0..2 * len)
        .map(|i| u32::from(i < len || i >= len + 2))
        .collect();
    (
        Tensor::from_vec(ids, (2, len), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (2, len), &Device::Cpu).unwrap(),
    )
}

/// Rows of the vocabulary and width of the MLP of the cut releases (see the module doc).
const CUT_VOCAB: usize = 512;
const CUT_INTERMEDIATE: usize = 512;

/// Whether two tensors hold the same values.
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.ne(b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0
}

/// The release `name` cut to `layers` layers, a [`CUT_VOCAB`]-token vocabulary and, with
/// `cut_mlp`, a [`CUT_INTERMEDIATE`]-wide MLP, made by `grpo init-model` in bf16, sharded, loads
/// into f32 with transformers' names and shapes, and decodes with the KV cache as its full
/// forward computes.
fn check_release(name: &str, layers: usize, cut_mlp: bool) {
    let mut config = release_config(name);
    config["num_hidden_layers"] = json!(layers);
    config["vocab_size"] = json!(CUT_VOCAB);
    if cut_mlp {
        config["intermediate_size"] = json!(CUT_INTERMEDIATE);
    }
    let dir = tempfile::tempdir().unwrap();
    let model_dir = init_model(dir.path(), &config);
    let stored =
        candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        stored.values().all(|t| t.dtype() == DType::BF16),
        "{name}: init-model stores the config's torch_dtype"
    );
    shard(&model_dir);

    let files = ModelFiles::resolve(model_dir.to_str().unwrap(), "main").unwrap();
    assert_eq!(files.weights.len(), 2, "{name}: both shards are read");
    let family = match config["model_type"].as_str().unwrap() {
        "qwen3" => ModelFamily::Qwen3,
        _ => ModelFamily::Qwen2,
    };
    assert_eq!(files.config.family, family, "{name}");
    let model = Qwen2::load_policy(&files, &Device::Cpu).unwrap();
    let expected = transformers_shapes(&config);
    assert_eq!(model.named_parameters().len(), expected.len(), "{name}");
    for (param, var) in model.named_parameters() {
        assert_eq!(
            Some(&var.dims().to_vec()),
            expected.get(param),
            "{name}: {param}"
        );
        assert_eq!(
            var.dtype(),
            DType::F32,
            "{name}: {param} is an f32 master weight"
        );
        let bf16 = stored[param].to_dtype(DType::F32).unwrap();
        assert!(
            same_values(var.as_tensor(), &bf16),
            "{name}: {param} is the stored bf16 value"
        );
    }

    let (ids, mask) = prompts(CUT_VOCAB, 6);
    common::assert_kv_cache_decoding_matches_full_forward(
        &model,
        &ids,
        &grpo::model::position_ids_from_mask(&mask).unwrap(),
        &mask,
        1e-4,
    );
}

#[test]
fn qwen2_5_1_5b_loads_and_runs() {
    check_release("Qwen2.5-1.5B-Instruct", 1, false);
}

#[test]
fn qwen2_5_3b_loads_and_runs() {
    check_release("Qwen2.5-3B-Instruct", 1, true);
}

#[test]
fn qwen2_5_7b_untied_loads_and_runs() {
    check_release("Qwen2.5-7B-Instruct", 1, true);
}

#[test]
fn qwen3_0_6b_loads_and_runs() {
    check_release("Qwen3-0.6B", 2, false);
}

#[test]
fn qwen3_1_7b_loads_and_runs() {
    check_release("Qwen3-1.7B", 1, false);
}

#[test]
fn qwen3_4b_loads_and_runs() {
    check_release("Qwen3-4B", 1, true);
}

#[test]
fn qwen3_8b_untied_loads_and_runs() {
    check_release("Qwen3-8B", 1, true);
}

/// Deterministic weights for `config` without a random generator, so that any size is cheap:
/// `0.02 sin(0.7 i + 1.3 j + k)` at row `i`, column `j` of the `k`-th tensor (computed as
/// `sin a cos b + cos a sin b` from one row and one column of sines), norm weights 1.
fn cheap_parameters(config: &Qwen2Config) -> Vec<(String, Tensor)> {
    let angles = |len: usize, step: f64, offset: f64| {
        Tensor::arange(0u32, len as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(step, offset)
            .unwrap()
    };
    config
        .parameter_shapes()
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let tensor = match shape[..] {
                _ if name.ends_with("norm.weight") => {
                    Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
                }
                [rows, columns] => {
                    let a = angles(rows, 0.7, k as f64).unsqueeze(1).unwrap();
                    let b = angles(columns, 1.3, 0.0).unsqueeze(0).unwrap();
                    let sin_cos = a.sin().unwrap().broadcast_mul(&b.cos().unwrap()).unwrap();
                    let cos_sin = a.cos().unwrap().broadcast_mul(&b.sin().unwrap()).unwrap();
                    ((sin_cos + cos_sin).unwrap() * 0.02).unwrap()
                }
                _ => (angles(shape[0], 0.7, k as f64).sin().unwrap() * 0.02).unwrap(),
            };
            (name, tensor)
        })
        .collect()
}

#[test]
fn chunked_logprobs_over_the_full_qwen3_vocabulary_match_log_softmax() {
    // Qwen3-0.6B with one layer (and a narrow MLP) but all 151,936 embedding rows: the
    // log-probs, computed in vocabulary chunks, equal log_softmax of the full logits.
    let mut config = release_config("Qwen3-0.6B");
    config["num_hidden_layers"] = json!(1);
    config["intermediate_size"] = json!(CUT_INTERMEDIATE);
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    let config = Qwen2Config::parse(&config.to_string(), "Qwen3-0.6B, one layer").unwrap();
    let model = Qwen2::from_parameters(config.clone(), cheap_parameters(&config), false).unwrap();
    // 2 x 12 predicted positions: more rows than decoding's few-rows product takes.
    let (ids, mask) = prompts(vocab, 13);
    let hidden = model.forward_masked(&ids, &mask).unwrap();
    let predictor = hidden.narrow(1, 0, 12).unwrap();
    let targets = ids.narrow(1, 1, 12).unwrap();
    let target_mask = mask.narrow(1, 1, 12).unwrap();
    let temperature = 0.7;
    let chunked = token_logprobs(
        &model,
        &predictor,
        &targets,
        &target_mask,
        temperature,
        true,
    )
    .unwrap();
    let logits = (model.lm_head(&predictor).unwrap() / temperature).unwrap();
    assert_eq!(logits.dim(D::Minus1).unwrap(), vocab);
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let direct = log_probs
        .gather(&targets.contiguous().unwrap().unsqueeze(2).unwrap(), 2)
        .unwrap()
        .squeeze(2)
        .unwrap()
        .mul(&target_mask.to_dtype(DType::F32).unwrap())
        .unwrap();
    let diff = common::max_abs_diff(&chunked.logprobs, &direct);
    assert!(diff < 1e-4, "chunked vs direct log-probs: {diff}");
    let entropy = (log_probs.exp().unwrap() * &log_probs)
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .neg()
        .unwrap()
        .mul(&target_mask.to_dtype(DType::F32).unwrap())
        .unwrap();
    let diff = common::max_abs_diff(&chunked.entropy.unwrap(), &entropy);
    assert!(diff < 1e-3, "chunked vs direct entropy: {diff}");
}

/// The error of parsing the golden Qwen3 config.json edited by `edit`.
fn config_error(edit: impl FnOnce(&mut Value)) -> String {
    let path = common::qwen3_dir().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut config);
    let error = Qwen2Config::parse(&config.to_string(), "the edited config.json")
        .expect_err("the edited config is refused");
    format!("{error:#}")
}

#[test]
fn unsupported_families_and_settings_are_refused_naming_them() {
    for (edit, named) in [
        (json!({"model_type": "llama"}), "\"llama\""),
        (json!({"model_type": "qwen3_moe"}), "\"qwen3_moe\""),
        (
            json!({"architectures": ["Qwen2ForProcessRewardModel"]}),
            "\"Qwen2ForProcessRewardModel\"",
        ),
        (
            json!({"model_type": "qwen2", "architectures": ["Qwen3ForCausalLM"]}),
            "contradicts",
        ),
        (json!({"hidden_act": "gelu"}), "\"gelu\""),
        (json!({"use_sliding_window": true}), "sliding-window"),
        (
            json!({"rope_scaling": {"type": "yarn", "factor": 4.0}}),
            "\"yarn\"",
        ),
        (
            json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6}}),
            "\"linear\"",
        ),
    ] {
        let message = config_error(|config| {
            for (key, value) in edit.as_object().unwrap() {
                config[key] = value.clone();
            }
        });
        assert!(message.contains(named), "{edit}: {message}");
        if edit.get("model_type").is_some() && !message.contains("contradicts") {
            assert!(
                message.contains("\"qwen2\"") && message.contains("\"qwen3\""),
                "the supported types are listed: {message}"
            );
        }
    }
}

#[test]
fn the_family_comes_from_model_type_else_architectures() {
    let path = common::qwen3_dir().join("config.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let parse = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut config = golden.as_object().unwrap().clone();
        edit(&mut config);
        Qwen2Config::parse(&Value::Object(config).to_string(), "config.json").unwrap()
    };
    assert_eq!(parse(&|_| {}).family, ModelFamily::Qwen3);
    let by_architecture = parse(&|c| {
        c.remove("model_type");
    });
    assert_eq!(by_architecture.family, ModelFamily::Qwen3);
    // JSON nulls are absent values, as in Python.
    let nulls = parse(&|c| {
        for key in [
            "architectures",
            "layer_types",
            "attention_bias",
            "use_sliding_window",
        ] {
            c.insert(key.into(), Value::Null);
        }
    });
    assert_eq!(nulls.family, ModelFamily::Qwen3);
    assert!(!nulls.attention_bias);
    // Neither: an older hand-written Qwen2 config.
    let neither = parse(&|c| {
        c.remove("model_type");
        c.remove("architectures");
    });
    assert_eq!(neither.family, ModelFamily::Qwen2);
    // Qwen3 without head_dim: transformers' default of 128, not hidden / heads.
    let no_head_dim = parse(&|c| {
        c.remove("head_dim");
    });
    assert_eq!(no_head_dim.head_dim, 128);
}
