//! The Qwen3 policy (transformers' `Qwen3ForCausalLM`) against `$GRPO_GOLDEN_DIR/qwen3`: names
//! and shapes, full logits of the golden GRPO batch, policy and reference log-probs, the GRPO
//! loss and the gradient of every parameter (`q_norm` / `k_norm` included), the KV cache and the
//! grouped forward, and the chat prompt ids of its template with `enable_thinking` true and false.
//!
//! The inputs are the parent folder's `grpo.*` batch; every size comes from the folders.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use grpo::grpo::LossType;
use grpo::model::{ModelFamily, Qwen2};
use grpo::prompt::{ChatTokenizer, Prompter};
use serde_json::{Map, Value};

use common::{
    assert_tensor_close, flat_f64, golden_grpo_step, load_model, qwen3_dir, tensors, GrpoSettings,
    Tolerance, F32_EPS, GOLDEN_SAFETY,
};

/// `qwen3/golden.json`: the settings, the loss and the chat prompt ids.
fn golden_json() -> Value {
    let path = qwen3_dir().join("golden.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// `qwen3/golden.safetensors`: logits, log-probs, loss and gradients.
fn golden_tensors() -> HashMap<String, Tensor> {
    let path = qwen3_dir().join("golden.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

fn policy() -> Qwen2 {
    load_model(&qwen3_dir(), true)
}

fn reference() -> Qwen2 {
    load_model(&qwen3_dir().join("ref_model"), false)
}

fn max_abs(t: &Tensor) -> f64 {
    flat_f64(t).into_iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// The largest golden logit where attended, relative to the parent folder's (at least 1).
///
/// The Qwen3 folder records no float32 error of its own. Its values come from the same float32
/// pipeline on a model of the same width and the same batch as the parent folder's, whose
/// `cases.json` → `precision` records those errors; they are taken to grow with the logits'
/// magnitude, and never to be smaller than the parent's.
fn logit_scale(golden: &HashMap<String, Tensor>) -> f64 {
    let mask = tensors()["grpo.attention_mask"]
        .to_dtype(DType::F32)
        .unwrap();
    let masked = golden["qwen3.logits"]
        .broadcast_mul(&mask.unsqueeze(2).unwrap())
        .unwrap();
    (max_abs(&masked) / common::recorded_error("forward_logits_max_abs")).max(1.0)
}

/// [`Tolerance::recorded`] of the parent folder's `key`, scaled by [`logit_scale`].
fn scaled(key: &str, golden: &HashMap<String, Tensor>) -> Tolerance {
    let parent = Tolerance::recorded(key);
    Tolerance {
        rtol: parent.rtol,
        atol: parent.atol * logit_scale(golden),
    }
}

/// The GRPO settings of `golden.json`.
fn settings() -> GrpoSettings {
    let golden = golden_json();
    let number = |key: &str| {
        golden[key]
            .as_f64()
            .unwrap_or_else(|| panic!("golden.json {key}"))
    };
    let loss_type: LossType = serde_json::from_value(golden["loss_type"].clone()).unwrap();
    let epsilon = number("epsilon");
    GrpoSettings {
        loss_type,
        temperature: number("temperature"),
        beta: number("beta"),
        epsilon_low: epsilon,
        epsilon_high: epsilon,
        use_bias_correction_kl: false,
    }
}

#[test]
fn config_is_read_as_qwen3_with_its_own_head_dim() {
    let model = policy();
    let config = model.config();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(qwen3_dir().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config.family, ModelFamily::Qwen3);
    assert_eq!(config.head_dim as u64, json["head_dim"].as_u64().unwrap());
    assert_eq!(
        config.attention_bias,
        json["attention_bias"].as_bool().unwrap()
    );
    assert!(config.qk_norm());
}

#[test]
fn parameter_names_and_shapes_are_the_golden_gradients() {
    let golden = golden_tensors();
    let model = policy();
    let mut expected: Vec<(&str, &[usize])> = golden
        .iter()
        .filter_map(|(key, grad)| Some((key.strip_prefix("grad.")?, grad.dims())))
        .collect();
    expected.sort();
    let mut names: Vec<(&str, &[usize])> = model
        .named_parameters()
        .iter()
        .map(|(name, var)| (name.as_str(), var.dims()))
        .collect();
    names.sort();
    assert_eq!(names, expected);
    let stored =
        candle_core::safetensors::load(qwen3_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut stored: Vec<&str> = stored.keys().map(String::as_str).collect();
    stored.sort();
    let names: Vec<&str> = names.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, stored, "the parameters are the checkpoint's tensors");
    assert!(names
        .iter()
        .any(|name| name.ends_with("self_attn.q_norm.weight")));
    assert!(reference().named_parameters().is_empty());
}

#[test]
fn logits_match_golden_where_attended() {
    let (t, golden) = (tensors(), golden_tensors());
    let model = policy();
    let mask = &t["grpo.attention_mask"];
    let hidden = model
        .forward(&t["grpo.input_ids"], &t["grpo.position_ids"], mask, None)
        .unwrap();
    let logits = model.lm_head(&hidden).unwrap();
    assert_tensor_close(
        "qwen3 logits",
        &logits,
        &golden["qwen3.logits"],
        Some(mask),
        scaled("forward_logits_max_abs_err", &golden),
    );
}

#[test]
fn grpo_loss_logprobs_and_every_gradient_match_transformers() {
    let golden = golden_tensors();
    let outcome = golden_grpo_step(&policy(), &reference(), &settings());
    assert_tensor_close(
        "qwen3 policy log-probs",
        &outcome.policy_logps,
        &golden["qwen3.policy_logps"],
        None,
        scaled("logprobs_policy_max_abs_err", &golden),
    );
    assert_tensor_close(
        "qwen3 reference log-probs",
        &outcome.ref_logps,
        &golden["qwen3.ref_logps"],
        None,
        scaled("grpo_ref_logps_max_abs_err", &golden),
    );
    let loss_type = golden_json()["loss_type"].as_str().unwrap().to_string();
    let want = golden["qwen3.loss"].to_scalar::<f32>().unwrap() as f64;
    let tolerance = scaled(&format!("grpo.{loss_type}.abs_err_loss"), &golden);
    assert!(
        (outcome.loss as f64 - want).abs() <= tolerance.bound(want),
        "loss {} vs transformers {want} ({tolerance:?})",
        outcome.loss
    );
    let expected = golden.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(outcome.grads.len(), expected, "one gradient per parameter");
    // The parent folder records the gradients' float32 error relative to each parameter's
    // largest gradient; Qwen3's come from the same float32 pipeline.
    let relative =
        common::recorded_error(&format!("grpo.{loss_type}.max_err_grad_rel_to_param_max"));
    for (name, grad) in &outcome.grads {
        let want = &golden[&format!("grad.{name}")];
        let tolerance = Tolerance {
            rtol: GOLDEN_SAFETY * F32_EPS,
            atol: GOLDEN_SAFETY * relative * max_abs(want),
        };
        assert_tensor_close(&format!("grad.{name}"), grad, want, None, tolerance);
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let t = tensors();
    common::assert_kv_cache_decoding_matches_full_forward(
        &policy(),
        &t["grpo.input_ids"],
        &t["grpo.position_ids"],
        &t["grpo.attention_mask"],
        1e-4,
    );
}

#[test]
fn grouped_forward_matches_plain_forward() {
    common::assert_grouped_forward_matches_plain_forward(&policy());
}

/// `chat_template_kwargs` of a `golden.json` chat key such as `enable_thinking=false`.
fn kwargs_of(key: &str) -> Map<String, Value> {
    let (name, value) = key.split_once('=').expect("chat keys are name=value");
    let value: Value = serde_json::from_str(value).expect("the value is JSON");
    Map::from_iter([(name.to_string(), value)])
}

#[test]
fn chat_prompt_ids_match_transformers_for_every_template_option() {
    let golden = golden_json();
    let tokenizer = Arc::new(ChatTokenizer::from_dir(&qwen3_dir()).unwrap());
    let system_prompt = golden["system_prompt"].as_str().unwrap().to_string();
    let questions: Vec<&str> = golden["questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap())
        .collect();
    let chat = golden["chat"].as_object().unwrap();
    assert!(chat.len() >= 2, "cases with and without thinking");
    let mut renderings = Vec::new();
    for (key, ids) in chat {
        let prompter = Prompter::new(tokenizer.clone(), Some(system_prompt.clone()), usize::MAX)
            .unwrap()
            .with_chat_template_kwargs(kwargs_of(key))
            .unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(ids.clone()).unwrap();
        assert_eq!(ids.len(), questions.len());
        for (question, want) in questions.iter().zip(&ids) {
            let got = prompter.prompt_ids(question).unwrap();
            assert_eq!(&got, want, "{key}: prompt ids of {question:?}");
        }
        renderings.push(ids);
    }
    assert!(
        renderings.windows(2).all(|w| w[0] != w[1]),
        "the template options change the prompt"
    );
    // No kwargs renders as transformers' default (thinking on: `enable_thinking` undefined).
    if let Some(thinking) = chat.get("enable_thinking=true") {
        let prompter = Prompter::new(tokenizer.clone(), Some(system_prompt), usize::MAX).unwrap();
        let thinking: Vec<Vec<u32>> = serde_json::from_value(thinking.clone()).unwrap();
        for (question, want) in questions.iter().zip(&thinking) {
            assert_eq!(&prompter.prompt_ids(question).unwrap(), want);
        }
    }
}

#[test]
fn bf16_compute_stays_within_bf16_resolution_and_trains_the_f32_weights() {
    // docs/PRECISION.md: matmuls in bf16, norms (q_norm and k_norm too), softmax and logits in
    // f32; gradients land on the f32 master weights.
    let (t, golden) = (tensors(), golden_tensors());
    let mask = &t["grpo.attention_mask"];
    let bf16 = policy().with_compute_dtype(DType::BF16).unwrap();
    let hidden = bf16
        .forward(&t["grpo.input_ids"], &t["grpo.position_ids"], mask, None)
        .unwrap();
    let logits = bf16.lm_head(&hidden).unwrap();
    let scale = max_abs(
        &golden["qwen3.logits"]
            .broadcast_mul(&mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap())
            .unwrap(),
    );
    let diff = common::masked_max_diff(&logits, &golden["qwen3.logits"], mask);
    let tolerance = common::LOGIT_ROUNDOFFS * common::BF16_UNIT_ROUNDOFF * scale;
    assert!(
        diff < tolerance,
        "bf16 logits differ by {diff} ({tolerance})"
    );
    assert!(diff > 0.0, "bf16 is really used");

    // Sampling's frozen bf16 copy decodes with its bf16 cache as its forward computes, up to a
    // few bf16 roundings of the hidden states (accumulation order differs between shapes).
    let copy = bf16.inference_copy().unwrap();
    let full = copy.forward_masked(&t["grpo.input_ids"], mask).unwrap();
    let hidden_scale = max_abs(
        &full
            .broadcast_mul(&mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap())
            .unwrap(),
    );
    common::assert_kv_cache_decoding_matches_full_forward(
        &copy,
        &t["grpo.input_ids"],
        &t["grpo.position_ids"],
        mask,
        4.0 * common::BF16_UNIT_ROUNDOFF * hidden_scale,
    );

    let reference = reference().with_compute_dtype(DType::BF16).unwrap();
    let outcome = golden_grpo_step(&bf16, &reference, &settings());
    for (name, grad) in &outcome.grads {
        assert_eq!(grad.dtype(), DType::F32, "{name}");
        let want = &golden[&format!("grad.{name}")];
        let error = common::l2(&(grad - want).unwrap()) / common::l2(want);
        assert!(
            error < common::GRADIENT_RELATIVE_ERROR,
            "{name}: bf16 gradient has relative error {error}"
        );
    }
}

#[test]
fn attention_bias_adds_biases_to_all_four_projections() {
    // Qwen3 with `attention_bias = true` (transformers: bias on q, k, v and o_proj): zero biases
    // leave the golden logits unchanged, and each bias is a trained parameter.
    let t = tensors();
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(qwen3_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["attention_bias"] = true.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let weights_path = dir.path().join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&weights_path, &Device::Cpu).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    let mut biases = Vec::new();
    for layer in 0..layers {
        for projection in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let prefix = format!("model.layers.{layer}.self_attn.{projection}");
            let rows = weights[&format!("{prefix}.weight")].dim(0).unwrap();
            let zeros = Tensor::zeros(rows, DType::F32, &Device::Cpu).unwrap();
            weights.insert(format!("{prefix}.bias"), zeros);
            biases.push(format!("{prefix}.bias"));
        }
    }
    candle_core::safetensors::save(&weights, &weights_path).unwrap();

    let model = load_model(dir.path(), true);
    let mask = &t["grpo.attention_mask"];
    let hidden = model
        .forward(&t["grpo.input_ids"], &t["grpo.position_ids"], mask, None)
        .unwrap();
    let logits = model.lm_head(&hidden).unwrap();
    let golden = golden_tensors();
    assert_tensor_close(
        "logits with zero attention biases",
        &logits,
        &golden["qwen3.logits"],
        Some(mask),
        scaled("forward_logits_max_abs_err", &golden),
    );
    let grads = logits.sum_all().unwrap().backward().unwrap();
    for name in &biases {
        let (_, var) = model
            .named_parameters()
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is a parameter"));
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(common::l2(grad) > 0.0, "{name}: zero gradient");
    }
}
