//! LoRA against PEFT (`$GRPO_GOLDEN_DIR/lora`, made by PEFT on the golden base model and its
//! `grpo.*` batch): the adapter folder as PEFT saved it, the completion log-probs with the
//! adapter and with it switched off (the reference), the GRPO loss, the gradient of every
//! `lora_A` / `lora_B`, and the merged model's logits through `grpo merge`. Only the adapters are
//! trainable and only they get gradients; PEFT's initialisation; dropout in training only; and
//! adapters that do not fit the base refused by name.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, IndexOp, Tensor};
use grpo::grpo::{grpo_loss, LossInputs, LossParams, LossType};
use grpo::model::{
    grouped_completion_logprobs, AdapterFolder, GroupedBatch, LoraSpec, ModelFiles, Qwen2,
};

use common::{assert_tensor_close, flat_f64, golden_dir, Tolerance, GOLDEN_SAFETY};

fn lora_dir() -> PathBuf {
    golden_dir().join("lora")
}

fn adapter_dir() -> PathBuf {
    lora_dir().join("adapter")
}

/// `lora/cases.json`.
fn lora_cases() -> serde_json::Value {
    let text = std::fs::read_to_string(lora_dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `lora/tensors.safetensors`.
fn lora_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_dir().join("tensors.safetensors"), &Device::Cpu).unwrap()
}

fn base_files() -> ModelFiles {
    ModelFiles::resolve(golden_dir().to_str().unwrap(), "main").unwrap()
}

fn base() -> Qwen2 {
    Qwen2::load_base(&base_files(), &Device::Cpu, DType::F32).unwrap()
}

/// The golden base with the golden adapter (its spec changed by `edit`).
fn policy_with(edit: impl Fn(&mut LoraSpec)) -> Qwen2 {
    let mut adapter = AdapterFolder::read(&adapter_dir()).unwrap();
    edit(&mut adapter.spec);
    base().with_adapters(adapter.spec, adapter.weights).unwrap()
}

fn policy() -> Qwen2 {
    policy_with(|_| {})
}

/// The golden `grpo.*` batch as the grouped forward takes it: one row per distinct prompt.
struct Batch {
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    group_size: usize,
}

impl Batch {
    fn golden() -> Self {
        let t = common::tensors();
        let group_size = common::cases()["grpo"]["num_generations"].as_u64().unwrap() as usize;
        let rows = t["grpo.prompt_ids"].dim(0).unwrap();
        let firsts: Vec<u32> = (0..rows as u32).step_by(group_size).collect();
        let firsts = Tensor::new(firsts, &Device::Cpu).unwrap();
        Self {
            prompt_ids: t["grpo.prompt_ids"].index_select(&firsts, 0).unwrap(),
            prompt_mask: t["grpo.prompt_mask"].index_select(&firsts, 0).unwrap(),
            completion_ids: t["grpo.completion_ids"].clone(),
            mask: t["grpo.completion_mask"].to_dtype(DType::F32).unwrap(),
            group_size,
        }
    }

    fn grouped(&self) -> GroupedBatch<'_> {
        GroupedBatch {
            prompt_ids: &self.prompt_ids,
            prompt_mask: &self.prompt_mask,
            completion_ids: &self.completion_ids,
            completion_mask: &self.mask,
            group_size: self.group_size,
        }
    }
}

fn temperature() -> f64 {
    lora_cases()["temperature"].as_f64().unwrap()
}

fn logprobs(model: &Qwen2, batch: &Batch) -> Tensor {
    grouped_completion_logprobs(model, &batch.grouped(), temperature(), false)
        .unwrap()
        .logprobs
}

/// PEFT's GRPO loss of `policy` on `batch` (the settings of `lora/cases.json`, advantages
/// `grpo.advantages`), with the reference = `policy`'s adapters switched off.
fn golden_loss(policy: &Qwen2, batch: &Batch) -> Tensor {
    let cases = lora_cases();
    let logp = logprobs(policy, batch);
    let ref_logp = logprobs(&policy.without_adapters().unwrap(), batch);
    let params = LossParams::new(
        LossType::Grpo,
        cases["beta"].as_f64().unwrap(),
        cases["epsilon"].as_f64().unwrap(),
        cases["epsilon"].as_f64().unwrap(),
        batch.mask.dim(1).unwrap(),
        batch.mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize,
    );
    let inputs = LossInputs {
        logp: &logp,
        old_logp: &logp.detach(),
        ref_logp: Some(&ref_logp),
        advantages: &common::tensors()["grpo.advantages"],
        mask: &batch.mask,
        entropy_mask: None,
    };
    grpo_loss(&inputs, &params).unwrap().loss
}

/// The log-prob tolerance of the golden folder (the LoRA forward is the same float32 arithmetic
/// with two small matmuls more per layer).
fn logprob_tolerance() -> Tolerance {
    Tolerance::recorded("logprobs_policy_max_abs_err")
}

#[test]
fn the_peft_adapter_folder_is_read_as_saved() {
    let cases = lora_cases();
    let adapter = AdapterFolder::read(&adapter_dir()).unwrap();
    assert_eq!(adapter.spec.r as u64, cases["r"].as_u64().unwrap());
    assert_eq!(adapter.spec.alpha, cases["lora_alpha"].as_f64().unwrap());
    assert_eq!(
        adapter.spec.dropout,
        cases["lora_dropout"].as_f64().unwrap()
    );
    let targets: BTreeSet<&str> = cases["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let read: BTreeSet<&str> = adapter
        .spec
        .target_modules
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(read, targets);
    let elements: usize = adapter.weights.values().map(Tensor::elem_count).sum();
    assert_eq!(
        elements as u64,
        cases["num_lora_parameters"].as_u64().unwrap()
    );
}

#[test]
fn policy_and_reference_logprobs_match_peft_with_and_without_the_adapter() {
    let t = lora_tensors();
    let batch = Batch::golden();
    let policy = policy();
    let with_adapter = logprobs(&policy, &batch);
    let reference = logprobs(&policy.without_adapters().unwrap(), &batch);
    let tolerance = logprob_tolerance();
    let mask = Some(&batch.mask);
    assert_tensor_close(
        "with",
        &with_adapter,
        &t["lora.policy_logps"],
        mask,
        tolerance,
    );
    assert_tensor_close("without", &reference, &t["lora.ref_logps"], mask, tolerance);
    // The adapter changes the model far beyond the tolerance, so neither check is vacuous.
    let moved = common::max_abs_diff(&t["lora.policy_logps"], &t["lora.ref_logps"]);
    assert!(moved > 100.0 * tolerance.bound(1.0), "{moved}");
    // Adapters off is the base model itself: the same numbers as a plain load.
    let plain = Qwen2::load_reference(&base_files(), &Device::Cpu).unwrap();
    assert_eq!(flat_f64(&reference), flat_f64(&logprobs(&plain, &batch)));
}

/// The GRPO loss with reference = adapters off, its value and the gradient of every adapter
/// matrix against PEFT; the base model's tensors get no gradient and are not parameters.
#[test]
fn loss_and_every_adapter_gradient_match_peft_and_the_base_gets_none() {
    let cases = lora_cases();
    let t = lora_tensors();
    let batch = Batch::golden();
    let policy = policy();
    let loss = golden_loss(&policy, &batch);
    let value = loss.to_scalar::<f32>().unwrap() as f64;
    let want = t["lora.loss"].to_scalar::<f32>().unwrap() as f64;
    assert_eq!(want, cases["loss"].as_f64().unwrap());
    let tolerance = Tolerance::recorded("grpo.grpo.abs_err_loss");
    assert!(
        (value - want).abs() <= tolerance.bound(want),
        "loss {value}, PEFT {want}"
    );

    let grads = loss.backward().unwrap();
    let golden_names: BTreeSet<String> = t
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .map(str::to_string)
        .collect();
    let names: BTreeSet<String> = policy
        .named_parameters()
        .iter()
        .map(|(name, _)| name.clone())
        .collect();
    assert_eq!(
        names, golden_names,
        "the parameters are the adapter matrices"
    );
    // Gradients in float32 are off by about the golden folder's recorded relative error of a
    // parameter's gradient, relative to that gradient's largest element.
    let relative =
        GOLDEN_SAFETY * common::recorded_error("grpo.grpo.max_err_grad_rel_to_param_max");
    for (name, var) in policy.named_parameters() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let want = &t[&format!("grad.{name}")];
        let scale = flat_f64(want).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: PEFT's gradient is not zero");
        let tolerance = Tolerance {
            rtol: relative,
            atol: relative * scale,
        };
        assert_tensor_close(&format!("grad.{name}"), grad, want, None, tolerance);
    }
    for (name, tensor) in policy.named_weights().unwrap() {
        assert!(
            grads.get(&tensor).is_none(),
            "the frozen {name} got a gradient"
        );
    }
}

/// `grpo merge` writes a full model folder whose logits are those of PEFT's
/// `merge_and_unload()`, loadable without the adapter.
#[test]
fn grpo_merge_writes_the_model_peft_merges() {
    let out = tempfile::tempdir().unwrap();
    let merged = out.path().join("merged");
    common::merge_onto_golden(&adapter_dir(), &merged);
    for file in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(file).is_file(), "{file}");
    }
    assert!(!AdapterFolder::is_adapter(&merged));
    let files = ModelFiles::resolve(merged.to_str().unwrap(), "main").unwrap();
    let model = Qwen2::load_reference(&files, &Device::Cpu).unwrap();
    let batch = Batch::golden();
    let g = batch.group_size;
    let hidden = model
        .forward_masked(&batch.prompt_ids, &batch.prompt_mask)
        .unwrap();
    let prompt_len = batch.prompt_ids.dim(1).unwrap();
    let last = model
        .lm_head(&hidden.i((.., prompt_len - 1, ..)).unwrap())
        .unwrap();
    // Golden rows are prompt * G + g: every G-th row is one of our prompts.
    let want = lora_tensors()["merged.logits_last"].clone();
    let rows: Vec<u32> = (0..want.dim(0).unwrap() as u32).step_by(g).collect();
    let want = want
        .index_select(&Tensor::new(rows, &Device::Cpu).unwrap(), 0)
        .unwrap();
    assert_tensor_close(
        "merged.logits_last",
        &last,
        &want,
        None,
        Tolerance::recorded("forward_logits_max_abs_err"),
    );
    // Merging changed the weights: the base's logits are far from the merged ones.
    let base_hidden = base()
        .forward_masked(&batch.prompt_ids, &batch.prompt_mask)
        .unwrap();
    let base_last = base()
        .lm_head(&base_hidden.i((.., prompt_len - 1, ..)).unwrap())
        .unwrap();
    assert!(common::max_abs_diff(&base_last, &want) > 1e-2);
}

fn grpo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_grpo"))
        .args(args)
        .output()
        .unwrap()
}

/// `grpo merge` refuses what it cannot do, naming the culprit.
#[test]
fn grpo_merge_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = adapter_dir();
    let adapter = adapter.to_str().unwrap();
    let golden = golden_dir();
    let golden = golden.to_str().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let stderr = |o: std::process::Output| {
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8(o.stderr).unwrap()
    };
    // The golden adapter records a base_model_name_or_path that does not exist here.
    let msg = stderr(grpo(&["merge", "--adapter", adapter, "--out", out]));
    assert!(
        msg.contains("base_model_name_or_path") && msg.contains("--base-model"),
        "{msg}"
    );
    // A model folder is not an adapter.
    let msg = stderr(grpo(&["merge", "--adapter", golden, "--out", out]));
    assert!(msg.contains("adapter_config.json"), "{msg}");
    // An existing model is not overwritten.
    let msg = stderr(grpo(&[
        "merge",
        "--adapter",
        adapter,
        "--base-model",
        golden,
        "--out",
        golden,
    ]));
    assert!(msg.contains("already holds"), "{msg}");
}

/// PEFT's initialisation: `A` uniform in ±1/sqrt(in) from the seed, `B` zero, so the model is
/// exactly the base until trained.
#[test]
fn new_adapters_are_initialised_as_peft_does() {
    let spec = |r| LoraSpec {
        r,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
    };
    let model = base().with_new_adapters(spec(3), 5).unwrap();
    let config = base_files().config;
    assert_eq!(
        model.named_parameters().len(),
        4 * config.num_hidden_layers,
        "A and B of two modules per layer"
    );
    for (name, var) in model.named_parameters() {
        let values = flat_f64(var.as_tensor());
        if name.ends_with("lora_B.weight") {
            assert!(values.iter().all(|&v| v == 0.0), "{name} starts at zero");
            continue;
        }
        let fan_in = var.dims()[1] as f64;
        let bound = 1.0 / fan_in.sqrt();
        assert!(
            values.iter().all(|v| v.abs() <= bound),
            "{name} within ±{bound}"
        );
        let widest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            widest > 0.8 * bound,
            "{name} fills its range: {widest} of {bound}"
        );
        assert_eq!(var.dims()[0], 3, "{name}: rank rows");
    }
    let again = base().with_new_adapters(spec(3), 5).unwrap();
    let other = base().with_new_adapters(spec(3), 6).unwrap();
    let first = |m: &Qwen2| flat_f64(m.named_parameters()[0].1.as_tensor());
    assert_eq!(first(&model), first(&again), "the seed decides");
    assert_ne!(first(&model), first(&other));
    let batch = Batch::golden();
    assert_eq!(
        flat_f64(&logprobs(&model, &batch)),
        flat_f64(&logprobs(&base(), &batch)),
        "B = 0: the base model exactly"
    );
}

/// Dropout acts in a training forward only, with masks decided by the seed, and never on the
/// base or the reference.
#[test]
fn dropout_drops_adapter_inputs_in_training_only() {
    let batch = Batch::golden();
    let policy = policy_with(|spec| spec.dropout = 0.5);
    let eval = flat_f64(&logprobs(&policy, &batch));
    let no_dropout = flat_f64(&logprobs(&policy_with(|_| {}), &batch));
    assert_eq!(eval, no_dropout, "no dropout outside training");
    let train = |seed| flat_f64(&logprobs(&policy.in_training(seed), &batch));
    assert_eq!(train(1), train(1), "the seed decides the masks");
    assert_ne!(train(1), train(2));
    assert_ne!(train(1), eval);
    let reference = flat_f64(&logprobs(
        &policy.in_training(1).without_adapters().unwrap(),
        &batch,
    ));
    let base_logps = flat_f64(&logprobs(&base(), &batch));
    assert_eq!(reference, base_logps, "adapters off: no dropout either");
}

/// Writes a copy of the golden adapter with `edit` applied to its config and `tensors` to its
/// weights (by PEFT key), and reads it back onto the golden base.
fn load_edited(
    edit: impl Fn(&mut serde_json::Value),
    tensors: impl Fn(&mut HashMap<String, Tensor>),
) -> anyhow::Result<Qwen2> {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(adapter_dir().join("adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let mut weights = candle_core::safetensors::load(
        adapter_dir().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors(&mut weights);
    candle_core::safetensors::save(&weights, dir.path().join("adapter_model.safetensors")).unwrap();
    let adapter = AdapterFolder::read(dir.path())?;
    base().with_adapters(adapter.spec, adapter.weights)
}

fn error_of(result: anyhow::Result<Qwen2>) -> String {
    match result {
        Ok(_) => panic!("the adapter was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn adapters_that_do_not_fit_are_refused_by_name() {
    let keep = |_: &mut HashMap<String, Tensor>| {};
    let golden = AdapterFolder::read(&adapter_dir()).unwrap();
    // Rank 0.
    let msg = error_of(load_edited(|c| c["r"] = 0.into(), keep));
    assert!(msg.contains("r is 0"), "{msg}");
    // Another rank than the tensors have: another base's shapes.
    let msg = error_of(load_edited(|c| c["r"] = (golden.spec.r + 1).into(), keep));
    assert!(
        msg.contains("lora_A.weight") && msg.contains("another base"),
        "{msg}"
    );
    // An unknown target module.
    let msg = error_of(load_edited(
        |c| c["target_modules"] = serde_json::json!(["q_proj", "qkv_proj"]),
        keep,
    ));
    assert!(msg.contains("qkv_proj"), "{msg}");
    // Fewer target modules than the tensors cover: tensors with no place.
    let first = golden.spec.target_modules[0].clone();
    let layers = base_files().config.num_hidden_layers;
    if golden.spec.target_modules.len() > 1 {
        let msg = error_of(load_edited(
            |c| c["target_modules"] = serde_json::json!([first]),
            keep,
        ));
        let unused = golden.weights.len() - 2 * layers;
        assert!(msg.contains(&format!("{unused} tensors")), "{msg}");
        assert!(msg.contains("no place"), "{msg}");
    }
    // The last layer missing from the weights (an adapter for a shallower base).
    let last = format!("model.layers.{}.", layers - 1);
    let msg = error_of(load_edited(|_| {}, |w| w.retain(|k, _| !k.contains(&last))));
    assert!(msg.contains(&last) && msg.contains("fewer layers"), "{msg}");
    // Unsupported PEFT features name their field.
    for (field, value) in [
        ("use_dora", serde_json::json!(true)),
        ("use_rslora", serde_json::json!(true)),
        ("bias", serde_json::json!("all")),
        ("layers_to_transform", serde_json::json!([0])),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("peft_type", serde_json::json!("IA3")),
        ("target_modules", serde_json::json!(".*proj")),
    ] {
        let msg = error_of(load_edited(|c| c[field] = value.clone(), keep));
        assert!(msg.contains(field), "{field}: {msg}");
    }
}

/// An adapter made for another base model (here: a wider one) is refused naming the tensor
/// and the shape this base needs.
#[test]
fn an_adapter_for_another_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(golden_dir().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let base = base_files().config;
    let wider = base.hidden_size + 2 * base.num_attention_heads;
    config["hidden_size"] = wider.into();
    let other = dir.path().join("other");
    grpo::init_model::write_random_checkpoint(&config, "test", &other, 1).unwrap();
    let files = ModelFiles::resolve(other.to_str().unwrap(), "main").unwrap();
    let adapter = AdapterFolder::read(&adapter_dir()).unwrap();
    let err = Qwen2::load_base(&files, &Device::Cpu, DType::F32)
        .unwrap()
        .with_adapters(adapter.spec, adapter.weights)
        .map(|_| ())
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model.layers.0.") && msg.contains("another base model"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{wider}")), "{msg}");
}

/// The base model's files are never read from the adapter folder: a path that is an adapter
/// given as model_name_or_path is refused with the way to use it.
#[test]
fn an_adapter_folder_is_not_taken_for_a_model() {
    let err = ModelFiles::resolve(adapter_dir().to_str().unwrap(), "main").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("adapter_name_or_path"), "{msg}");
    assert!(Path::new(&adapter_dir())
        .join("adapter_config.json")
        .is_file());
}

/// The bf16 path (CUDA's, run here on the CPU): the base stored in bf16 (embeddings included,
/// norm weights f32), the f32 adapters cast per matmul. Log-probs stay within bf16 roundoff of
/// PEFT's f32 values (16 roundings of the largest golden logit, over the temperature, as
/// docs/PRECISION.md sets for the full model), each adapter gradient within 5 % (relative L2) of
/// PEFT's, the base gets no gradient, and dropout runs in bf16.
#[test]
fn bf16_lora_stays_within_bf16_roundoff_of_peft() {
    let golden = common::tensors();
    let t = lora_tensors();
    let adapter = AdapterFolder::read(&adapter_dir()).unwrap();
    let policy = Qwen2::load_base(&base_files(), &Device::Cpu, DType::BF16)
        .unwrap()
        .with_adapters(adapter.spec, adapter.weights)
        .unwrap();
    for (name, tensor) in policy.named_weights().unwrap() {
        let want = if name.contains("norm") {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(tensor.dtype(), want, "{name}");
    }
    let batch = Batch::golden();
    let logp = logprobs(&policy, &batch);
    let attended = golden["forward.logits"]
        .broadcast_mul(
            &golden["forward.attention_mask"]
                .to_dtype(DType::F32)
                .unwrap()
                .unsqueeze(2)
                .unwrap(),
        )
        .unwrap();
    let largest = flat_f64(&attended)
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let tolerance = 16.0 / 512.0 * largest / temperature();
    let masked = |x: &Tensor| flat_f64(&x.mul(&batch.mask).unwrap());
    let worst = masked(&logp)
        .iter()
        .zip(masked(&t["lora.policy_logps"]))
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= tolerance,
        "bf16 log-probs off by {worst} (tolerance {tolerance})"
    );

    let grads = golden_loss(&policy, &batch).backward().unwrap();
    let l2 = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    for (name, var) in policy.named_parameters() {
        let grad = flat_f64(grads.get(var.as_tensor()).unwrap());
        let want = flat_f64(&t[&format!("grad.{name}")]);
        let diff: Vec<f64> = grad.iter().zip(&want).map(|(a, b)| a - b).collect();
        let relative = l2(&diff) / l2(&want);
        assert!(
            relative < 0.05,
            "{name}: bf16 gradient off by {relative} (relative L2)"
        );
    }
    for (name, tensor) in policy.named_weights().unwrap() {
        assert!(
            grads.get(&tensor).is_none(),
            "the frozen {name} got a gradient"
        );
    }

    let dropped = policy_with_dropout_in(DType::BF16);
    let train = flat_f64(&logprobs(&dropped.in_training(3), &batch));
    assert!(train.iter().all(|v| v.is_finite()));
    assert_ne!(train, flat_f64(&logprobs(&dropped, &batch)));
}

/// The golden adapter with dropout 0.5 on the base stored in `dtype`.
fn policy_with_dropout_in(dtype: DType) -> Qwen2 {
    let mut adapter = AdapterFolder::read(&adapter_dir()).unwrap();
    adapter.spec.dropout = 0.5;
    Qwen2::load_base(&base_files(), &Device::Cpu, dtype)
        .unwrap()
        .with_adapters(adapter.spec, adapter.weights)
        .unwrap()
}
