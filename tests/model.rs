//! The Qwen2 policy against the golden folder: loading, logits, gradients, log-probs, entropy,
//! the KV cache and the grouped forward.

mod common;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use grpo::model::{completion_logprobs, position_ids_from_mask, token_logprobs, ModelFiles, Qwen2};

use common::{
    assert_same_gradient, cases, golden_dir, golden_forward_hidden, load_model, loss_weights,
    max_abs_diff, tensors,
};

fn files(dir: &Path) -> ModelFiles {
    ModelFiles::resolve(dir.to_str().expect("utf-8 path"), "main").expect("golden model resolves")
}

fn policy() -> Qwen2 {
    load_model(&golden_dir(), true)
}

fn reference() -> Qwen2 {
    load_model(&golden_dir().join("ref_model"), false)
}

fn usize_of(value: &serde_json::Value) -> usize {
    value.as_u64().expect("non-negative integer") as usize
}

#[test]
fn parameter_names_and_shapes_match_transformers() {
    let meta = &cases()["meta"]["model"];
    let model = policy();
    let names: Vec<&str> = model
        .named_parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let expected: Vec<&str> = meta["parameter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names, expected);
    for (name, var) in model.named_parameters() {
        let shape: Vec<usize> = meta["parameter_shapes"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(usize_of)
            .collect();
        assert_eq!(var.dims(), shape.as_slice(), "{name}");
    }
    assert!(reference().named_parameters().is_empty());
}

#[test]
fn logits_match_golden_where_attended() {
    let t = tensors();
    let model = policy();
    let mask = &t["forward.attention_mask"];
    let hidden = golden_forward_hidden(&model, &t);
    let logits = model.lm_head(&hidden).unwrap();
    common::assert_tensor_close(
        "logits",
        &logits,
        &t["forward.logits"],
        Some(mask),
        common::Tolerance::recorded("forward_logits_max_abs_err"),
    );
}

#[test]
fn every_parameter_gets_a_gradient() {
    let t = tensors();
    let model = policy();
    let mask = &t["forward.attention_mask"];
    let hidden = model.forward_masked(&t["forward.input_ids"], mask).unwrap();
    let logits = model.lm_head(&hidden).unwrap();
    let weights = Tensor::randn(0f32, 1.0, logits.shape(), &Device::Cpu).unwrap();
    let loss = (logits * weights).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.named_parameters() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}

/// Log-probs of the policy and of the reference carry the float32 error `cases.json` records
/// for them.
fn logprob_tolerance(golden_key: &str) -> common::Tolerance {
    match golden_key.contains("ref") {
        true => common::Tolerance::recorded("grpo_ref_logps_max_abs_err"),
        false => common::Tolerance::recorded("logprobs_policy_max_abs_err"),
    }
}

fn check_logprobs(model: &Qwen2, golden_key: &str, temperature: f64) {
    let t = tensors();
    let c = cases();
    let prompt_len = usize_of(&c["logprobs"]["P"]);
    let out = completion_logprobs(
        model,
        &t["logprobs.input_ids"],
        &t["logprobs.attention_mask"],
        prompt_len,
        temperature,
        false,
    )
    .unwrap();
    common::assert_tensor_close(
        golden_key,
        &out.logprobs,
        &t[golden_key],
        None,
        logprob_tolerance(golden_key),
    );
    let completion_mask = t["logprobs.completion_mask"].to_dtype(DType::F32).unwrap();
    let outside_mask = out
        .logprobs
        .mul(&(1.0 - completion_mask).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        outside_mask, 0.0,
        "log-probs must be 0 outside the completion mask"
    );
}

#[test]
fn policy_logprobs_match_golden() {
    let temperature = cases()["logprobs"]["temperature"].as_f64().unwrap();
    check_logprobs(&policy(), "logprobs.policy", temperature);
    check_logprobs(&policy(), "logprobs.policy_t1", 1.0);
}

#[test]
fn reference_logprobs_match_golden() {
    let temperature = cases()["logprobs"]["temperature"].as_f64().unwrap();
    check_logprobs(&reference(), "logprobs.ref", temperature);
}

/// The golden GRPO batch: (input_ids, attention_mask, prompt width, temperature, G).
fn grpo_batch() -> (Tensor, Tensor, usize, f64, usize) {
    let t = tensors();
    let c = cases();
    (
        t["grpo.input_ids"].clone(),
        t["grpo.attention_mask"].clone(),
        usize_of(&c["grpo"]["P"]),
        c["grpo"]["temperature"].as_f64().unwrap(),
        usize_of(&c["grpo"]["num_generations"]),
    )
}

#[test]
fn grpo_logprobs_and_entropy_match_golden() {
    let t = tensors();
    let (ids, mask, prompt_len, temperature, _) = grpo_batch();
    let out = completion_logprobs(&policy(), &ids, &mask, prompt_len, temperature, true).unwrap();
    let policy_tolerance = logprob_tolerance("grpo.policy_logps");
    common::assert_tensor_close(
        "policy log-probs",
        &out.logprobs,
        &t["grpo.policy_logps"],
        None,
        policy_tolerance,
    );
    // The entropy -sum p log p is a p-weighted mean of -log p: each term carries at most the
    // log-probs' error, and the weights' error adds at most ln(V) times it.
    let entropy = out.entropy.expect("entropy requested");
    let vocab = policy().config().vocab_size as f64;
    let entropy_tolerance = common::Tolerance {
        rtol: policy_tolerance.rtol,
        atol: policy_tolerance.atol * (1.0 + vocab.ln()),
    };
    common::assert_tensor_close(
        "entropy",
        &entropy,
        &t["grpo.entropy"],
        None,
        entropy_tolerance,
    );
    let reference =
        completion_logprobs(&reference(), &ids, &mask, prompt_len, temperature, false).unwrap();
    common::assert_tensor_close(
        "reference log-probs",
        &reference.logprobs,
        &t["grpo.ref_logps"],
        None,
        logprob_tolerance("grpo.ref_logps"),
    );
    assert!(reference.entropy.is_none());
}

#[test]
fn chunked_logprob_gradients_match_the_direct_formula() {
    let (ids, mask, prompt_len, temperature, _) = grpo_batch();
    let completion_len = ids.dim(1).unwrap() - prompt_len;
    let model = policy();
    let hidden = model.forward_masked(&ids, &mask).unwrap();
    let predictor = hidden.narrow(1, prompt_len - 1, completion_len).unwrap();
    let targets = ids.narrow(1, prompt_len, completion_len).unwrap();
    let completion_mask = mask.narrow(1, prompt_len, completion_len).unwrap();
    let chunked = token_logprobs(
        &model,
        &predictor,
        &targets,
        &completion_mask,
        temperature,
        false,
    )
    .unwrap()
    .logprobs;
    let logits = (model.lm_head(&predictor).unwrap() / temperature).unwrap();
    let direct = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .gather(
            &targets.to_dtype(DType::U32).unwrap().unsqueeze(2).unwrap(),
            2,
        )
        .unwrap()
        .squeeze(2)
        .unwrap()
        .mul(&completion_mask.to_dtype(DType::F32).unwrap())
        .unwrap();
    // The same log-softmax, its row sums taken in another order: a few float32 roundings.
    let scale = max_abs_diff(&direct, &direct.zeros_like().unwrap());
    let diff = max_abs_diff(&chunked, &direct);
    assert!(
        diff <= 4.0 * f32::EPSILON as f64 * scale,
        "differ by {diff}"
    );
    let weights = loss_weights(direct.shape());
    let a = (&chunked * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let b = (&direct * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in model.named_parameters() {
        assert_same_gradient(
            name,
            a.get(var.as_tensor()).unwrap(),
            b.get(var.as_tensor()).unwrap(),
        );
    }
}

#[test]
fn fully_masked_row_stays_finite() {
    let t = tensors();
    let c = cases();
    let prompt_len = usize_of(&c["logprobs"]["P"]);
    let mask = t["logprobs.attention_mask"].clone();
    let (rows, width) = mask.dims2().unwrap();
    let zero_row = Tensor::zeros((1, width), mask.dtype(), &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&mask.narrow(0, 0, rows - 1).unwrap(), &zero_row], 0).unwrap();
    let model = policy();
    let out = completion_logprobs(
        &model,
        &t["logprobs.input_ids"],
        &mask,
        prompt_len,
        0.9,
        true,
    )
    .unwrap();
    let hidden = model
        .forward_masked(&t["logprobs.input_ids"], &mask)
        .unwrap();
    for (what, tensor) in [
        ("logits", model.lm_head(&hidden).unwrap()),
        ("logprobs", out.logprobs.clone()),
        ("entropy", out.entropy.unwrap()),
    ] {
        let sum = tensor.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(sum.is_finite(), "{what} not finite with a fully masked row");
    }
    // Masked-out rows contribute nothing, and the other rows are unchanged.
    let last = out
        .logprobs
        .i(rows - 1)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(last.to_scalar::<f32>().unwrap(), 0.0);
    let diff = max_abs_diff(
        &out.logprobs.narrow(0, 0, rows - 1).unwrap(),
        &t["logprobs.policy"].narrow(0, 0, rows - 1).unwrap(),
    );
    assert!(diff < 2e-5, "other rows changed: {diff}");
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let t = tensors();
    common::assert_kv_cache_decoding_matches_full_forward(
        &policy(),
        &t["forward.input_ids"],
        &t["forward.position_ids"],
        &t["forward.attention_mask"],
        1e-4,
    );
}

#[test]
fn position_ids_follow_the_mask() {
    let t = tensors();
    for key in ["forward", "logprobs", "grpo"] {
        let derived = position_ids_from_mask(&t[&format!("{key}.attention_mask")]).unwrap();
        let golden = &t[&format!("{key}.position_ids")];
        assert_eq!(max_abs_diff(&derived, golden), 0.0, "{key}.position_ids");
    }
}

#[test]
fn grouped_forward_matches_plain_forward() {
    common::assert_grouped_forward_matches_plain_forward(&policy());
}

/// A copy of the golden checkpoint in a temp folder, its tensors rewritten by `edit` and its
/// `config.json` by `edit_config`.
fn edited_checkpoint(
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let golden = golden_dir();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(golden.join(name), dir.path().join(name)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join("config.json")).unwrap())
            .unwrap();
    edit_config(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut weights =
        candle_core::safetensors::load(golden.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut weights);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn resolve_error(dir: &Path) -> String {
    let loaded = ModelFiles::resolve(dir.to_str().unwrap(), "main")
        .and_then(|files| Qwen2::load_policy(&files, &Device::Cpu));
    match loaded {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn pickle_checkpoints_are_refused_with_a_fix() {
    let dir = edited_checkpoint(|_| {}, |_| {});
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("pytorch_model.bin"),
    )
    .unwrap();
    let message = resolve_error(dir.path());
    assert!(message.contains("pytorch_model.bin"), "{message}");
    assert!(message.contains("safetensors"), "{message}");
    assert!(message.contains("save_pretrained"), "{message}");
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let dir = edited_checkpoint(
        |w| {
            w.remove("model.norm.weight");
        },
        |_| {},
    );
    let message = resolve_error(dir.path());
    assert!(
        message.contains("model.norm.weight") && message.contains("missing"),
        "{message}"
    );

    let hidden = usize_of(&cases()["meta"]["model"]["config"]["hidden_size"]);
    let dir = edited_checkpoint(
        |w| {
            let bad = Tensor::zeros(hidden + 1, DType::F32, &Device::Cpu).unwrap();
            w.insert("model.norm.weight".into(), bad);
        },
        |_| {},
    );
    let message = resolve_error(dir.path());
    assert!(message.contains("model.norm.weight"), "{message}");
    assert!(message.contains(&format!("[{}]", hidden + 1)), "{message}");
    assert!(message.contains(&format!("[{hidden}]")), "{message}");
}

#[test]
fn eos_ids_come_from_generation_config_else_config() {
    let golden = files(&golden_dir());
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("generation_config.json")).unwrap(),
    )
    .unwrap();
    let expected: Vec<u32> = match &generation["eos_token_id"] {
        serde_json::Value::Array(ids) => ids.iter().map(|i| usize_of(i) as u32).collect(),
        one => vec![usize_of(one) as u32],
    };
    assert_eq!(golden.eos_token_ids, expected);

    let dir = edited_checkpoint(|_| {}, |c| c["eos_token_id"] = 7.into());
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 5}"#,
    )
    .unwrap();
    assert_eq!(files(dir.path()).eos_token_ids, vec![5]);
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    assert_eq!(files(dir.path()).eos_token_ids, vec![7]);
}

#[test]
fn tokenizer_paths_are_resolved_or_reported_missing() {
    let (json, config) = files(&golden_dir()).tokenizer_files().unwrap();
    assert!(json.ends_with("tokenizer.json") && json.is_file());
    assert!(config.ends_with("tokenizer_config.json") && config.is_file());
    let dir = edited_checkpoint(|_| {}, |_| {});
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let message = format!("{:#}", files(dir.path()).tokenizer_files().unwrap_err());
    assert!(message.contains("tokenizer.json"), "{message}");
}

#[test]
fn sharded_untied_checkpoint_with_nested_rope_theta_loads() {
    let t = tensors();
    // Untie by storing a copy of the embeddings as lm_head: logits must stay golden.
    let dir = edited_checkpoint(
        |w| {
            let embed = w["model.embed_tokens.weight"].copy().unwrap();
            w.insert("lm_head.weight".into(), embed);
        },
        |c| {
            c["tie_word_embeddings"] = false.into();
            let theta = c["rope_theta"].take();
            c.as_object_mut().unwrap().remove("rope_theta");
            c["rope_parameters"]["rope_theta"] = theta;
        },
    );
    // Shard it: every tensor but the embeddings in a second file.
    let path = dir.path();
    let mut first =
        candle_core::safetensors::load(path.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(path.join("model.safetensors")).unwrap();
    let second: std::collections::HashMap<String, Tensor> = first
        .keys()
        .filter(|k| *k != "model.embed_tokens.weight")
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
        .map(|k| {
            let v = first.remove(&k).unwrap();
            (k, v)
        })
        .collect();
    let mut weight_map = serde_json::Map::new();
    weight_map.insert("model.embed_tokens.weight".into(), "a.safetensors".into());
    for name in second.keys() {
        weight_map.insert(name.clone(), "b.safetensors".into());
    }
    candle_core::safetensors::save(&first, path.join("a.safetensors")).unwrap();
    candle_core::safetensors::save(&second, path.join("b.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(path.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let files = files(path);
    assert_eq!(files.weights.len(), 2);
    assert!(!files.config.tie_word_embeddings);
    let model = Qwen2::load_policy(&files, &Device::Cpu).unwrap();
    let names: Vec<&str> = model
        .named_parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names.last(), Some(&"lm_head.weight"));
    let mask = &t["forward.attention_mask"];
    let hidden = golden_forward_hidden(&model, &t);
    let logits = model.lm_head(&hidden).unwrap();
    common::assert_tensor_close(
        "untied logits",
        &logits,
        &t["forward.logits"],
        Some(mask),
        common::Tolerance::recorded("forward_logits_max_abs_err"),
    );
    // The untied head has its own gradient, separate from the embeddings'.
    let grads = logits.sum_all().unwrap().backward().unwrap();
    for (name, var) in model.named_parameters() {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "{name} has no gradient"
        );
    }
}

/// A shard index naming a file outside the model folder is refused, even when that file exists
/// and holds valid weights.
#[test]
fn shard_index_naming_a_file_outside_the_folder_is_refused() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let golden = golden_dir();
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(golden.join(name), dir.join(name)).unwrap();
    }
    let weights =
        candle_core::safetensors::load(golden.join("model.safetensors"), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&weights, outer.path().join("outside.safetensors")).unwrap();
    for outside in [
        "../outside.safetensors".to_string(),
        outer
            .path()
            .join("outside.safetensors")
            .display()
            .to_string(),
        "./../model/../outside.safetensors".to_string(),
    ] {
        let weight_map: serde_json::Map<String, serde_json::Value> = weights
            .keys()
            .map(|name| (name.clone(), outside.clone().into()))
            .collect();
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let err = ModelFiles::resolve(dir.to_str().unwrap(), "main").unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains(&outside) && message.contains("not inside the model folder"),
            "{message}"
        );
    }
}
