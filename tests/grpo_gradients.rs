//! The whole GRPO step against TRL: golden policy and reference, the training forward (one
//! prompt pass per group), the loss of every loss type and the full gradient of every parameter.

mod common;

use candle_core::{DType, Device, Tensor};
use grpo::grpo::{grpo_loss, ImportanceSamplingLevel, LossInputs, LossParams, LossType};
use grpo::model::{grouped_completion_logprobs, GroupedBatch, ModelFiles, Qwen2};

use common::{assert_tensor_close, cases, golden_dir, tensors, Tolerance};

fn model(dir: &std::path::Path, trainable: bool) -> Qwen2 {
    let files = ModelFiles::resolve(dir.to_str().unwrap(), "main").unwrap();
    if trainable {
        Qwen2::load_policy(&files, &Device::Cpu).unwrap()
    } else {
        Qwen2::load_reference(&files, &Device::Cpu).unwrap()
    }
}

fn loss_types() -> [(LossType, &'static str); 4] {
    [
        (LossType::Grpo, "grpo"),
        (LossType::Bnpo, "bnpo"),
        (LossType::DrGrpo, "dr_grpo"),
        (LossType::Dapo, "dapo"),
    ]
}

/// Runs the training forward and loss on the golden GRPO batch and returns the loss value and
/// the gradient of every named parameter.
fn loss_and_grads(
    loss_type: LossType,
    use_bias_correction_kl: bool,
) -> (f32, Vec<(String, Tensor)>) {
    let case = &cases()["grpo"];
    let t = tensors();
    let g = case["num_generations"].as_u64().unwrap() as usize;
    let rows = t["grpo.prompt_ids"].dim(0).unwrap();
    // One row per distinct prompt: rows are prompt * G + g.
    let firsts = Tensor::new(
        (0..rows as u32).step_by(g).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap();
    let prompt_ids = t["grpo.prompt_ids"].index_select(&firsts, 0).unwrap();
    let prompt_mask = t["grpo.prompt_mask"].index_select(&firsts, 0).unwrap();
    let completion_ids = &t["grpo.completion_ids"];
    let mask = t["grpo.completion_mask"].to_dtype(DType::F32).unwrap();
    let batch = GroupedBatch {
        prompt_ids: &prompt_ids,
        prompt_mask: &prompt_mask,
        completion_ids,
        completion_mask: &mask,
        group_size: g,
    };
    let temperature = case["temperature"].as_f64().unwrap();
    let policy = model(&golden_dir(), true);
    let reference = model(&golden_dir().join("ref_model"), false);
    let logp = grouped_completion_logprobs(&policy, &batch, temperature, false)
        .unwrap()
        .logprobs;
    let ref_logp = grouped_completion_logprobs(&reference, &batch, temperature, false)
        .unwrap()
        .logprobs;
    let num_items = mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize;
    let params = LossParams {
        loss_type,
        beta: case["beta"].as_f64().unwrap(),
        epsilon_low: case["epsilon_low"].as_f64().unwrap(),
        epsilon_high: case["epsilon_high"].as_f64().unwrap(),
        max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
        num_items_in_batch: num_items,
        gradient_accumulation_steps: 1,
        steps_per_generation: 1,
        use_bias_correction_kl,
        importance_sampling_level: ImportanceSamplingLevel::Token,
        delta: None,
        sapo_temperature_pos: 1.0,
        sapo_temperature_neg: 1.05,
    };
    let inputs = LossInputs {
        logp: &logp,
        old_logp: &logp.detach(),
        ref_logp: Some(&ref_logp),
        advantages: &t["grpo.advantages"],
        mask: &mask,
        entropy_mask: None,
    };
    let loss = grpo_loss(&inputs, &params).unwrap();
    let grads = loss.loss.backward().unwrap();
    let named = policy
        .named_parameters()
        .iter()
        .map(|(name, var)| {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            (name.clone(), grad.clone())
        })
        .collect();
    (loss.loss.to_scalar::<f32>().unwrap(), named)
}

#[test]
fn every_loss_type_matches_trl_value_and_full_gradient() {
    let t = tensors();
    let names = cases()["meta"]["model"]["parameter_names"]
        .as_array()
        .unwrap()
        .len();
    for (loss_type, key) in loss_types() {
        let (loss, grads) = loss_and_grads(loss_type, false);
        let want = t[&format!("grpo.loss.{key}")].to_scalar::<f32>().unwrap();
        let tolerance = Tolerance::recorded(&format!("grpo.{key}.abs_err_loss"));
        assert!(
            ((loss - want) as f64).abs() <= tolerance.bound(want as f64),
            "{key}: loss {loss}, TRL {want} ({tolerance:?})"
        );
        assert_eq!(
            grads.len(),
            names,
            "{key}: one gradient per named parameter"
        );
        for (name, grad) in &grads {
            let want = &t[&format!("grad.{key}.{name}")];
            let tolerance = Tolerance::recorded(&format!("grpo.{key}.max_abs_err_grad"));
            assert_tensor_close(&format!("grad.{key}.{name}"), grad, want, None, tolerance);
        }
    }
}

#[test]
fn bias_corrected_kl_matches_trl_default_gradient() {
    let t = tensors();
    let (loss, grads) = loss_and_grads(LossType::Grpo, true);
    let want = t["grpo.loss.grpo"].to_scalar::<f32>().unwrap();
    let tolerance = Tolerance::recorded("grpo.grpo_klbc.abs_err_loss");
    assert!(((loss - want) as f64).abs() <= tolerance.bound(want as f64));
    let tolerance = Tolerance::recorded("grpo.grpo_klbc.max_abs_err_grad");
    for (name, grad) in &grads {
        let want = &t[&format!("grad_klbc.grpo.{name}")];
        assert_tensor_close(
            &format!("grad_klbc.grpo.{name}"),
            grad,
            want,
            None,
            tolerance,
        );
    }
    // The bias correction changes the gradient: this test would notice it being ignored.
    let (_, plain) = loss_and_grads(LossType::Grpo, false);
    let differs = plain.iter().zip(&grads).any(|((_, a), (_, b))| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-7
    });
    assert!(differs, "use_bias_correction_kl must change the gradient");
}
