//! Optimizer step against the golden folder (torch `clip_grad_norm_` + `torch.optim.AdamW`, the HF
//! Trainer's decay grouping, transformers' cosine schedule) and checkpoint round trips.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use grpo::optim::{
    hf_no_decay, warmup_steps, AdamW, AdamWParams, DecayGrouping, Gradients, LrSchedule,
    LrSchedulerType,
};
use serde_json::Value;

fn names(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The golden policy weights as named variables, in `named_parameters()` order.
fn golden_params(cases: &Value) -> Vec<(String, Var)> {
    let path = common::golden_dir().join("model.safetensors");
    let weights = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    names(&cases["meta"]["model"]["parameter_names"])
        .into_iter()
        .map(|name| {
            let tensor = weights
                .get(&name)
                .unwrap_or_else(|| panic!("{name} not in the model"));
            let var = Var::from_tensor(tensor).unwrap();
            (name, var)
        })
        .collect()
}

fn golden_grads(params: &[(String, Var)], tensors: &HashMap<String, Tensor>) -> Gradients {
    let mut grads = Gradients::new();
    for (name, _) in params {
        grads
            .add(name, &tensors[&format!("grad.grpo.{name}")])
            .unwrap();
    }
    grads
}

fn adamw_params(cases: &Value) -> (AdamWParams, f64) {
    let adamw = &cases["optimizer"]["adamw"];
    let hyper = AdamWParams {
        beta1: adamw["betas"][0].as_f64().unwrap(),
        beta2: adamw["betas"][1].as_f64().unwrap(),
        eps: adamw["eps"].as_f64().unwrap(),
        weight_decay: adamw["weight_decay"].as_f64().unwrap(),
    };
    (hyper, adamw["lr"].as_f64().unwrap())
}

/// One clipped AdamW step from the golden start; returns every parameter's update.
fn golden_updates(grouping: DecayGrouping) -> HashMap<String, Tensor> {
    let cases = common::cases();
    let tensors = common::tensors();
    let params = golden_params(&cases);
    let initial: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let mut grads = golden_grads(&params, &tensors);
    let max_norm = cases["optimizer"]["clip_grad_norm"]["max_norm"]
        .as_f64()
        .unwrap();
    grads.clip_global_norm(max_norm).unwrap();
    let (hyper, lr) = adamw_params(&cases);
    let mut optimizer = AdamW::new(&params, hyper, grouping).unwrap();
    optimizer.step(&grads, lr).unwrap();
    params
        .iter()
        .map(|(name, var)| (name.clone(), (var.as_tensor() - &initial[name]).unwrap()))
        .collect()
}

fn assert_update(updates: &HashMap<String, Tensor>, name: &str, golden_key: &str) {
    let cases_tensors = common::tensors();
    let path = common::golden_dir().join("model.safetensors");
    let initial = &candle_core::safetensors::load(&path, &Device::Cpu).unwrap()[name];
    let expected = (&cases_tensors[golden_key] - initial).unwrap();
    // The golden updated weight is rounded to float32 at the weight's magnitude, and so is
    // ours: their updates differ by a few ulps of |weight|, plus a few roundings of the AdamW
    // update itself (moments, square root, division): 4 ulps of each.
    let (ours, want, start) = (
        common::flat_f64(&updates[name]),
        common::flat_f64(&expected),
        common::flat_f64(initial),
    );
    let eps = common::F32_EPS;
    for (i, ((a, e), w)) in ours.iter().zip(&want).zip(&start).enumerate() {
        let tolerance = 4.0 * eps * (w.abs() + e.abs()) + 4.0 * eps * e.abs();
        assert!(
            (a - e).abs() <= tolerance,
            "{golden_key}[{i}]: update {a} vs {e} (tolerance {tolerance})"
        );
    }
}

#[test]
fn hf_grouping_matches_the_trainer() {
    let cases = common::cases();
    let no_decay = names(&cases["optimizer"]["hf_no_decay_param_names"]);
    for name in names(&cases["meta"]["model"]["parameter_names"]) {
        assert_eq!(hf_no_decay(&name), no_decay.contains(&name), "{name}");
    }
    assert!(hf_no_decay("lm_head.bias") && hf_no_decay("model.final_norm.weight"));
    assert!(!hf_no_decay("lm_head.weight") && !hf_no_decay("model.normalizer.weight"));
}

#[test]
fn clip_grad_norm_matches_torch() {
    let cases = common::cases();
    let tensors = common::tensors();
    let params = golden_params(&cases);
    let mut grads = golden_grads(&params, &tensors);
    let clip = &cases["optimizer"]["clip_grad_norm"];
    let norm = grads
        .clip_global_norm(clip["max_norm"].as_f64().unwrap())
        .unwrap();
    let expected = f64::from(
        tensors["optim.pre_clip_grad_norm"]
            .to_scalar::<f32>()
            .unwrap(),
    );
    // The norm is accumulated in float64, as the recorded float64 norm of the same gradients;
    // torch's float32 norm is off that by the recorded difference, which bounds ours too.
    let exact = clip["pre_clip_grad_norm_float64_manual"].as_f64().unwrap();
    let eps = common::F32_EPS;
    assert!(
        (norm - exact).abs() <= 4.0 * eps * exact,
        "norm {norm} vs float64 {exact}"
    );
    let torch_error = (expected - exact).abs();
    assert!(
        (norm - expected).abs() <= common::GOLDEN_SAFETY * torch_error + 4.0 * eps * expected,
        "norm {norm} vs torch's {expected}"
    );

    // Scaled by min(1, max_norm / (norm + 1e-6)): torch's coefficient differs from ours by the
    // norm's relative error, plus one float32 rounding of each product.
    let coef = clip["clip_coef"].as_f64().unwrap();
    let (name, _) = &params[0];
    let scaled = (&tensors[&format!("grad.grpo.{name}")] * coef).unwrap();
    common::assert_tensor_close(
        &format!("clipped {name}"),
        grads.get(name).unwrap(),
        &scaled,
        None,
        common::Tolerance {
            rtol: common::GOLDEN_SAFETY * (torch_error / exact + eps),
            atol: 0.0,
        },
    );
    assert!(
        (grads.global_norm().unwrap() - 0.1).abs() < 1e-6,
        "norm after clipping"
    );

    // Below the threshold nothing changes.
    let before = grads.get(name).unwrap().clone();
    grads.clip_global_norm(10.0).unwrap();
    assert_eq!(common::max_abs_diff(grads.get(name).unwrap(), &before), 0.0);
    assert!(grads
        .clip_global_norm(0.0)
        .unwrap_err()
        .to_string()
        .contains("max_grad_norm"));
}

#[test]
fn adamw_single_group_matches_torch() {
    let cases = common::cases();
    let updates = golden_updates(DecayGrouping::All);
    for name in names(&cases["optimizer"]["saved_params"]) {
        assert_update(&updates, &name, &format!("optim.updated.{name}"));
    }
}

#[test]
fn adamw_hf_grouping_matches_the_trainer() {
    let cases = common::cases();
    let updates = golden_updates(DecayGrouping::HfTrainer);
    let hf_saved = names(&cases["optimizer"]["optim_hf_saved_params"]);
    assert!(!hf_saved.is_empty());
    for name in names(&cases["optimizer"]["saved_params"]) {
        let key = if hf_saved.contains(&name) {
            "optim_hf"
        } else {
            "optim"
        };
        assert_update(&updates, &name, &format!("{key}.updated.{name}"));
    }
}

#[test]
fn cosine_schedule_matches_transformers() {
    let cases = common::cases();
    let schedule = &cases["schedule"];
    let total = schedule["total_steps"].as_u64().unwrap() as usize;
    let warmup = warmup_steps(total, 0, schedule["warmup_ratio"].as_f64().unwrap());
    assert_eq!(warmup as u64, schedule["warmup_steps"].as_u64().unwrap());
    let lr = LrSchedule {
        kind: LrSchedulerType::Cosine,
        peak_lr: schedule["lr"].as_f64().unwrap(),
        warmup_steps: warmup,
        total_steps: total,
    };
    let expected: Vec<f64> = common::tensors()["schedule.lr"].to_vec1().unwrap();
    assert_eq!(expected.len(), total + 1);
    for (step, &e) in expected.iter().enumerate() {
        let a = lr.lr(step);
        assert!((a - e).abs() <= 1e-12 * e.abs(), "step {step}: {a} vs {e}");
    }
}

#[test]
fn other_schedules_and_warmup() {
    let schedule = |kind| LrSchedule {
        kind,
        peak_lr: 2.0,
        warmup_steps: 2,
        total_steps: 10,
    };
    let lrs = |kind| (0..=12).map(|s| schedule(kind).lr(s)).collect::<Vec<f64>>();
    // Linear: warmup s/2, then 2 * (10 - s) / 8, floored at 0.
    let linear = [
        0.0, 1.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0,
    ];
    assert_eq!(lrs(LrSchedulerType::Linear), linear);
    assert_eq!(lrs(LrSchedulerType::Constant), [2.0; 13]);
    let mut warm_constant = [2.0; 13];
    warm_constant[..2].copy_from_slice(&[0.0, 1.0]);
    assert_eq!(lrs(LrSchedulerType::ConstantWithWarmup), warm_constant);
    // Cosine halfway through the decay is half the peak.
    assert!((schedule(LrSchedulerType::Cosine).lr(6) - 1.0).abs() < 1e-15);

    assert_eq!(warmup_steps(50, 3, 0.1), 3, "explicit warmup_steps win");
    assert_eq!(warmup_steps(7, 0, 0.1), 1, "ceil(0.7)");
    assert_eq!(warmup_steps(7, 0, 0.0), 0);
}

fn small_params(device: &Device) -> Vec<(String, Var)> {
    let weight = Var::from_vec(vec![0.5f32, -1.0, 2.0, 0.25], (2, 2), device).unwrap();
    let bias = Var::from_vec(vec![0.1f32, -0.2], 2, device).unwrap();
    vec![
        ("layer.weight".to_owned(), weight),
        ("layer.bias".to_owned(), bias),
    ]
}

fn small_grads(scale: f32, device: &Device) -> Gradients {
    let mut grads = Gradients::new();
    let weight = Tensor::from_vec(vec![0.3f32, -0.1, 0.05, 0.7], (2, 2), device).unwrap();
    grads
        .add("layer.weight", &(weight * f64::from(scale)).unwrap())
        .unwrap();
    grads
        .add(
            "layer.bias",
            &Tensor::new(&[-0.4f32 * scale, 0.2], device).unwrap(),
        )
        .unwrap();
    grads
}

fn values(params: &[(String, Var)]) -> Vec<Vec<f32>> {
    params
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn state_round_trip_continues_bitwise() {
    let device = Device::Cpu;
    let hyper = AdamWParams {
        weight_decay: 0.1,
        ..AdamWParams::default()
    };
    let params = small_params(&device);
    let mut optimizer = AdamW::new(&params, hyper, DecayGrouping::HfTrainer).unwrap();
    optimizer.step(&small_grads(1.0, &device), 1e-2).unwrap();
    optimizer.step(&small_grads(-0.5, &device), 1e-2).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    candle_core::safetensors::save(&optimizer.state().unwrap(), &path).unwrap();
    let saved = candle_core::safetensors::load(&path, &device).unwrap();

    // Copies of the current weights (a cloned `Var` would share its storage).
    let copy_of = |params: &[(String, Var)]| -> Vec<(String, Var)> {
        params
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                )
            })
            .collect()
    };
    let resumed_params = copy_of(&params);
    let mut resumed = AdamW::new(&resumed_params, hyper, DecayGrouping::HfTrainer).unwrap();
    resumed.load_state(&saved).unwrap();
    let fresh_params = copy_of(&params);
    let mut fresh = AdamW::new(&fresh_params, hyper, DecayGrouping::HfTrainer).unwrap();

    let next = small_grads(2.0, &device);
    optimizer.step(&next, 5e-3).unwrap();
    resumed.step(&next, 5e-3).unwrap();
    fresh.step(&next, 5e-3).unwrap();
    assert_eq!(
        values(&params),
        values(&resumed_params),
        "resumed step is bitwise identical"
    );
    assert_ne!(values(&params), values(&fresh_params), "the state matters");
}

#[test]
fn bias_is_not_decayed_and_missing_gradients_skip_the_parameter() {
    let device = Device::Cpu;
    let params = small_params(&device);
    let before = values(&params);
    let hyper = AdamWParams {
        weight_decay: 0.5,
        ..AdamWParams::default()
    };
    let mut optimizer = AdamW::new(&params, hyper, DecayGrouping::HfTrainer).unwrap();
    // Zero gradients: only weight decay moves a parameter.
    let mut grads = Gradients::new();
    grads
        .add(
            "layer.weight",
            &Tensor::zeros((2, 2), DType::F32, &device).unwrap(),
        )
        .unwrap();
    grads
        .add(
            "layer.bias",
            &Tensor::zeros(2, DType::F32, &device).unwrap(),
        )
        .unwrap();
    optimizer.step(&grads, 0.1).unwrap();
    let after = values(&params);
    for (a, b) in after[0].iter().zip(&before[0]) {
        assert!(
            (a - b * (1.0 - 0.1 * 0.5)).abs() < 1e-7,
            "weight decayed: {a} vs {b}"
        );
    }
    assert_eq!(after[1], before[1], "bias not decayed");

    let only_bias = {
        let mut g = Gradients::new();
        g.add("layer.bias", &Tensor::new(&[1f32, 1.0], &device).unwrap())
            .unwrap();
        g
    };
    optimizer.step(&only_bias, 0.1).unwrap();
    assert_eq!(
        values(&params)[0],
        after[0],
        "weight without gradient untouched"
    );
    let state = optimizer.state().unwrap();
    assert_eq!(state["layer.weight.step"].to_scalar::<f64>().unwrap(), 1.0);
    assert_eq!(state["layer.bias.step"].to_scalar::<f64>().unwrap(), 2.0);
}

#[test]
fn bad_state_and_gradients_are_reported() {
    let device = Device::Cpu;
    let params = small_params(&device);
    let mut optimizer = AdamW::new(&params, AdamWParams::default(), DecayGrouping::All).unwrap();
    let mut state = optimizer.state().unwrap();
    let moment = state.remove("layer.bias.exp_avg").unwrap();
    state.insert("other.bias.exp_avg".to_owned(), moment);
    let err = optimizer.load_state(&state).unwrap_err();
    assert!(err.to_string().contains("layer.bias.exp_avg"), "{err}");

    let mut state = optimizer.state().unwrap();
    state.insert(
        "layer.bias.exp_avg".to_owned(),
        Tensor::zeros(3, DType::F32, &device).unwrap(),
    );
    let err = optimizer.load_state(&state).unwrap_err();
    assert!(
        err.to_string().contains("layer.bias.exp_avg has shape"),
        "{err}"
    );

    let mut grads = Gradients::new();
    grads
        .add(
            "layer.bias",
            &Tensor::zeros(5, DType::F32, &device).unwrap(),
        )
        .unwrap();
    let err = optimizer.step(&grads, 0.1).unwrap_err();
    assert!(err.to_string().contains("gradient of layer.bias"), "{err}");

    let half = Var::zeros(2, DType::BF16, &device).unwrap();
    let err = AdamW::new(
        &[("h".to_owned(), half)],
        AdamWParams::default(),
        DecayGrouping::All,
    )
    .unwrap_err();
    assert!(err.to_string().contains("parameter h is BF16"), "{err}");
}

/// Two small parameters with a gradient each; `poison` puts a NaN into the first gradient.
fn tiny_step_setup(poison: bool) -> (Vec<(String, Var)>, Gradients) {
    let device = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &device).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.5f32], &device).unwrap()).unwrap();
    let params = vec![
        ("layer.weight".to_string(), w),
        ("layer.bias".to_string(), b),
    ];
    let first = if poison { f32::NAN } else { 0.3 };
    let grads: HashMap<String, Tensor> = [
        (
            "layer.weight".to_string(),
            Tensor::new(&[first, 0.1, -0.2], &device).unwrap(),
        ),
        (
            "layer.bias".to_string(),
            Tensor::new(&[0.05f32], &device).unwrap(),
        ),
    ]
    .into();
    (params, Gradients::from(grads))
}

#[test]
fn non_finite_loss_or_gradient_leaves_weights_and_moments_untouched() {
    let hyper = AdamWParams {
        weight_decay: 0.1,
        ..AdamWParams::default()
    };
    for (poison, loss) in [(true, 1.0), (false, f64::NAN), (false, f64::INFINITY)] {
        let (params, mut grads) = tiny_step_setup(poison);
        let before = values(&params);
        let mut optimizer = AdamW::new(&params, hyper, DecayGrouping::HfTrainer).unwrap();
        let state_before = optimizer.state().unwrap();
        let (_, applied) = optimizer.clipped_step(&mut grads, loss, 1.0, 1e-2).unwrap();
        assert!(
            !applied,
            "poisoned gradient {poison} / loss {loss} must skip the step"
        );
        assert_eq!(values(&params), before, "weights untouched");
        let state_after = optimizer.state().unwrap();
        for (name, t) in &state_before {
            let a = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            let b = state_after[name]
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            assert_eq!(
                a.to_vec1::<f64>().unwrap(),
                b.to_vec1::<f64>().unwrap(),
                "{name} untouched"
            );
        }
    }
    let (params, mut grads) = tiny_step_setup(false);
    let before = values(&params);
    let mut optimizer = AdamW::new(&params, hyper, DecayGrouping::HfTrainer).unwrap();
    let (norm, applied) = optimizer.clipped_step(&mut grads, 1.0, 1.0, 1e-2).unwrap();
    assert!(applied && norm > 0.0);
    assert_ne!(values(&params), before, "a finite step moves the weights");
}

/// `max_grad_norm = 0` turns clipping off (the HF Trainer's `max_grad_norm > 0` test): the
/// gradients stay as they are, the norm is still measured, and the step is taken.
#[test]
fn zero_max_norm_steps_without_clipping_and_still_measures_the_norm() {
    let (params, mut grads) = tiny_step_setup(false);
    let want = grads.global_norm().unwrap();
    let before = values(&params);
    let original: Vec<f32> = grads.get("layer.weight").unwrap().to_vec1::<f32>().unwrap();
    let mut optimizer =
        AdamW::new(&params, AdamWParams::default(), DecayGrouping::HfTrainer).unwrap();
    let (norm, applied) = optimizer.clipped_step(&mut grads, 1.0, 0.0, 1e-2).unwrap();
    assert!(applied, "a finite step with clipping off is applied");
    assert_eq!(norm, want, "grad_norm is the unclipped global norm");
    assert_eq!(
        grads.get("layer.weight").unwrap().to_vec1::<f32>().unwrap(),
        original,
        "no clipping: the gradients are not scaled"
    );
    assert_ne!(values(&params), before);
    // A tiny positive norm does clip (so the case above is not clipping by accident).
    let (_, mut grads) = tiny_step_setup(false);
    optimizer.clipped_step(&mut grads, 1.0, 1e-3, 1e-2).unwrap();
    let clipped = grads.global_norm().unwrap();
    assert!((clipped - 1e-3).abs() < 1e-6, "clipped to {clipped}");
}
