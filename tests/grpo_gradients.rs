//! The whole GRPO step against TRL: golden policy and reference, the training forward (one
//! prompt pass per group), the loss of every loss type and the full gradient of every parameter.

mod common;

use candle_core::Tensor;
use grpo::grpo::LossType;

use common::{
    assert_tensor_close, cases, golden_dir, golden_grpo_step, load_model, tensors, GrpoSettings,
    Tolerance,
};

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
    let settings = GrpoSettings {
        loss_type,
        temperature: case["temperature"].as_f64().unwrap(),
        beta: case["beta"].as_f64().unwrap(),
        epsilon_low: case["epsilon_low"].as_f64().unwrap(),
        epsilon_high: case["epsilon_high"].as_f64().unwrap(),
        use_bias_correction_kl,
    };
    let policy = load_model(&golden_dir(), true);
    let reference = load_model(&golden_dir().join("ref_model"), false);
    let outcome = golden_grpo_step(&policy, &reference, &settings);
    (outcome.loss, outcome.grads)
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
