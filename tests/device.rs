//! Device selection and compute dtype ([`grpo::device`]), and the model's bf16 compute path
//! on the CPU against the golden folder (tolerances explained in `docs/PRECISION.md`).

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use grpo::config::{Config, DeviceChoice};
use grpo::device::{compute_dtype, select_device, Runtime, BUILT_WITH_CUDA};
use grpo::model::{
    completion_logprobs, grouped_completion_logprobs, GroupedBatch, ModelFiles, Qwen2,
};

use common::{
    cases, golden_dir, golden_forward_hidden, l2, max_abs_diff, tensors, BF16_UNIT_ROUNDOFF,
    GRADIENT_RELATIVE_ERROR, LOGIT_ROUNDOFFS,
};

fn files(dir: &Path) -> ModelFiles {
    ModelFiles::resolve(dir.to_str().expect("utf-8 path"), "main").expect("golden model resolves")
}

fn policy() -> Qwen2 {
    Qwen2::load_policy(&files(&golden_dir()), &Device::Cpu).expect("policy loads")
}

fn bf16_policy() -> Qwen2 {
    policy()
        .with_compute_dtype(DType::BF16)
        .expect("bf16 policy")
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `t` with the entries where `mask` (its leading shape) is 0 zeroed.
fn masked(t: &Tensor, mask: &Tensor) -> Tensor {
    let mut mask = mask.to_dtype(t.dtype()).unwrap();
    while mask.rank() < t.rank() {
        mask = mask.unsqueeze(D::Minus1).unwrap();
    }
    t.broadcast_mul(&mask).unwrap()
}

/// The bf16 tolerance for logits and log-probs of this golden model.
fn logit_tolerance() -> f64 {
    let t = tensors();
    let golden = masked(&t["forward.logits"], &t["forward.attention_mask"]);
    LOGIT_ROUNDOFFS * BF16_UNIT_ROUNDOFF * max_abs(&golden)
}

#[test]
fn cpu_is_f32_even_when_bf16_is_asked() {
    for bf16 in [false, true] {
        let runtime = Runtime::new(DeviceChoice::Cpu, bf16).unwrap();
        assert!(runtime.device.is_cpu());
        assert_eq!(runtime.compute_dtype, DType::F32, "bf16 = {bf16}");
        assert_eq!(runtime.to_string(), "cpu (f32)");
    }
    assert_eq!(compute_dtype(&Device::Cpu, true), DType::F32);
}

#[test]
fn runtime_follows_the_config() {
    let config = Config {
        device: DeviceChoice::Cpu,
        bf16: true,
        ..Config::default()
    };
    let runtime = Runtime::from_config(&config).unwrap();
    assert!(runtime.device.is_cpu());
    assert_eq!(runtime.compute_dtype, DType::F32);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cpu_only_build_uses_the_cpu_for_auto_and_explains_cuda() {
    const { assert!(!BUILT_WITH_CUDA) };
    assert!(select_device(DeviceChoice::Auto).unwrap().is_cpu());
    let error = format!("{:#}", select_device(DeviceChoice::Cuda).unwrap_err());
    assert!(error.contains("--features cuda"), "{error}");
    assert!(error.contains("scripts/build-cuda.sh"), "{error}");
    assert!(Runtime::new(DeviceChoice::Cuda, true).is_err());
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_build_opens_a_gpu_or_falls_back_for_auto() {
    const { assert!(BUILT_WITH_CUDA) };
    // With a GPU both give CUDA; without one `auto` falls back and `cuda` is an error.
    let auto = select_device(DeviceChoice::Auto).unwrap();
    match select_device(DeviceChoice::Cuda) {
        Ok(device) => {
            assert!(device.is_cuda() && auto.is_cuda());
            assert_eq!(compute_dtype(&device, true), DType::BF16);
            assert_eq!(compute_dtype(&device, false), DType::F32);
        }
        Err(error) => {
            assert!(auto.is_cpu());
            assert!(format!("{error:#}").contains("CUDA device 0"), "{error:#}");
        }
    }
}

#[test]
fn compute_dtype_must_be_a_float_type() {
    let error = policy().with_compute_dtype(DType::U32).err().unwrap();
    assert!(error.to_string().contains("bf16"), "{error}");
}

#[test]
fn bf16_logits_are_within_tolerance_of_golden() {
    let t = tensors();
    let mask = &t["forward.attention_mask"];
    let model = bf16_policy();
    assert_eq!(model.compute_dtype(), DType::BF16);
    let hidden = golden_forward_hidden(&model, &t);
    assert_eq!(hidden.dtype(), DType::F32, "the residual stream stays f32");
    let logits = model.lm_head(&hidden).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let diff = max_abs_diff(&masked(&logits, mask), &masked(&t["forward.logits"], mask));
    let tolerance = logit_tolerance();
    assert!(
        diff < tolerance,
        "bf16 logits differ by {diff} (tolerance {tolerance})"
    );
    // bf16 really is used: the result is not the f32 one.
    let f32_model = policy();
    let f32_hidden = f32_model
        .forward_masked(&t["forward.input_ids"], mask)
        .unwrap();
    let f32_logits = f32_model.lm_head(&f32_hidden).unwrap();
    assert!(max_abs_diff(&logits, &f32_logits) > 0.0);
}

#[test]
fn bf16_logprobs_are_within_tolerance_of_golden() {
    let t = tensors();
    let temperature = cases()["logprobs"]["temperature"].as_f64().unwrap();
    let prompt_len = cases()["logprobs"]["P"].as_u64().unwrap() as usize;
    // log_softmax(z / T) moves by at most 2 max|dz| / T; half of that bound is ample.
    let tolerance = logit_tolerance() / temperature;
    let reference = Qwen2::load_reference(&files(&golden_dir().join("ref_model")), &Device::Cpu)
        .unwrap()
        .with_compute_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        reference.lm_head_weight().dtype(),
        DType::BF16,
        "stored in bf16"
    );
    for (model, key) in [
        (bf16_policy(), "logprobs.policy"),
        (reference, "logprobs.ref"),
    ] {
        let out = completion_logprobs(
            &model,
            &t["logprobs.input_ids"],
            &t["logprobs.attention_mask"],
            prompt_len,
            temperature,
            false,
        )
        .unwrap();
        let diff = max_abs_diff(&out.logprobs, &t[key]);
        assert!(
            diff < tolerance,
            "{key}: bf16 differs by {diff} (tolerance {tolerance})"
        );
    }
}

/// Gradients of a fixed random-weighted sum of the completion log-probs.
fn logprob_gradients(model: &Qwen2) -> Vec<(String, Tensor)> {
    let t = tensors();
    let prompt_len = cases()["logprobs"]["P"].as_u64().unwrap() as usize;
    let out = completion_logprobs(
        model,
        &t["logprobs.input_ids"],
        &t["logprobs.attention_mask"],
        prompt_len,
        1.0,
        false,
    )
    .unwrap();
    let count = out.logprobs.elem_count();
    let weights: Vec<f32> = (0..count)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let weights = Tensor::from_vec(weights, out.logprobs.shape(), &Device::Cpu).unwrap();
    let grads = (out.logprobs * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    model
        .named_parameters()
        .iter()
        .map(|(name, var)| {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"));
            (name.clone(), grad.clone())
        })
        .collect()
}

#[test]
fn bf16_gradients_land_on_the_f32_parameters() {
    let model = bf16_policy();
    for (_, var) in model.named_parameters() {
        assert_eq!(var.dtype(), DType::F32, "master weights stay f32");
    }
    let exact = logprob_gradients(&policy());
    let approximate = logprob_gradients(&model);
    assert_eq!(exact.len(), approximate.len());
    for ((name, exact), (_, approximate)) in exact.iter().zip(&approximate) {
        assert_eq!(approximate.dtype(), DType::F32, "{name}");
        let error = l2(&(approximate - exact).unwrap()) / l2(exact);
        assert!(
            error < GRADIENT_RELATIVE_ERROR,
            "{name}: bf16 gradient has relative error {error}"
        );
    }
}

#[test]
fn bf16_cache_and_inference_copy_match_the_bf16_forward() {
    let t = tensors();
    let ids = &t["forward.input_ids"];
    let mask = &t["forward.attention_mask"];
    let positions = &t["forward.position_ids"];
    let model = bf16_policy();
    let full = model.forward(ids, positions, mask, None).unwrap();

    let copy = model.inference_copy().unwrap();
    assert!(copy.named_parameters().is_empty());
    assert_eq!(copy.lm_head_weight().dtype(), DType::BF16);
    let (rows, width) = ids.dims2().unwrap();
    let mut cache = copy.new_cache(rows, width).unwrap();
    let prefill = width / 2;
    let first = copy
        .forward(
            &ids.narrow(1, 0, prefill).unwrap(),
            &positions.narrow(1, 0, prefill).unwrap(),
            &mask.narrow(1, 0, prefill).unwrap(),
            Some(&mut cache),
        )
        .unwrap();
    let rest = copy
        .forward(
            &ids.narrow(1, prefill, width - prefill).unwrap(),
            &positions.narrow(1, prefill, width - prefill).unwrap(),
            mask,
            Some(&mut cache),
        )
        .unwrap();
    let decoded = Tensor::cat(&[first, rest], 1).unwrap();
    let diff = max_abs_diff(&masked(&decoded, mask), &masked(&full, mask));
    // The copy computes what the policy computes (f32 embeddings, bf16 matrices, a bf16
    // cache holding the bf16 keys/values exactly): at most accumulation order may differ.
    let tolerance = BF16_UNIT_ROUNDOFF * max_abs(&masked(&full, mask));
    assert!(diff < tolerance, "cached bf16 decoding differs by {diff}");
}

#[test]
fn bf16_grouped_forward_is_within_tolerance_of_golden() {
    let t = tensors();
    let c = &cases()["grpo"];
    let (ids, mask) = (&t["grpo.input_ids"], &t["grpo.attention_mask"]);
    let prompt_len = c["P"].as_u64().unwrap() as usize;
    let group = c["num_generations"].as_u64().unwrap() as usize;
    let temperature = c["temperature"].as_f64().unwrap();
    let (rows, width) = ids.dims2().unwrap();
    let firsts: Vec<u32> = (0..(rows / group) as u32)
        .map(|r| r * group as u32)
        .collect();
    let firsts = Tensor::new(firsts, &Device::Cpu).unwrap();
    let prompt = |t: &Tensor| {
        let t = t.narrow(1, 0, prompt_len).unwrap().contiguous().unwrap();
        t.index_select(&firsts, 0).unwrap()
    };
    let completion = |t: &Tensor| t.narrow(1, prompt_len, width - prompt_len).unwrap();
    let (prompt_ids, prompt_mask) = (prompt(ids), prompt(mask));
    let (completion_ids, completion_mask) = (completion(ids), completion(mask));
    let batch = GroupedBatch {
        prompt_ids: &prompt_ids,
        prompt_mask: &prompt_mask,
        completion_ids: &completion_ids,
        completion_mask: &completion_mask,
        group_size: group,
    };
    let model = bf16_policy();
    let out = grouped_completion_logprobs(&model, &batch, temperature, true).unwrap();
    let tolerance = logit_tolerance() / temperature;
    let diff = max_abs_diff(&out.logprobs, &t["grpo.policy_logps"]);
    assert!(
        diff < tolerance,
        "bf16 grouped log-probs differ by {diff} (tolerance {tolerance})"
    );
    let diff = max_abs_diff(out.entropy.as_ref().unwrap(), &t["grpo.entropy"]);
    assert!(
        diff < tolerance,
        "bf16 entropies differ by {diff} (tolerance {tolerance})"
    );
    let grads = out.logprobs.sum_all().unwrap().backward().unwrap();
    for (name, var) in model.named_parameters() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no grad"));
        assert_eq!(grad.dtype(), DType::F32, "{name}");
        assert!(l2(grad).is_finite() && l2(grad) > 0.0, "{name}");
    }
}

#[test]
fn bf16_sampling_decodes_with_the_bf16_cache_like_the_bf16_forward() {
    use grpo::sampling::{generate, GenerationSpec, SamplingParams};
    let model = bf16_policy().inference_copy().unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 42, 9], vec![300, 2]];
    let spec = GenerationSpec {
        group_size: 2,
        max_new_tokens: 6,
        eos_ids: Vec::new(),
        pad_id: 0,
        params: SamplingParams::greedy(),
        seed: 0,
    };
    let out = generate(&model, &prompts, &spec).unwrap();
    for (row, ids) in out.ids.iter().enumerate() {
        let sequence: Vec<u32> = prompts[row / 2].iter().chain(ids).copied().collect();
        let n = sequence.len();
        let input = Tensor::new(sequence.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((1, n))
            .unwrap();
        let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let hidden = model.forward_masked(&input, &mask).unwrap();
        let logits = model.lm_head(&hidden).unwrap().squeeze(0).unwrap();
        let prompt_len = prompts[row / 2].len();
        for (step, &token) in ids.iter().enumerate() {
            let scores: Vec<f32> = logits
                .get(prompt_len - 1 + step)
                .unwrap()
                .to_vec1()
                .unwrap();
            let best = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // The argmax, or a tie within bf16 resolution of the largest logit.
            let slack = 4.0 * BF16_UNIT_ROUNDOFF as f32 * best.abs().max(1.0);
            assert!(
                best - scores[token as usize] <= slack,
                "row {row} step {step}: chose {token} ({}), best {best}",
                scores[token as usize]
            );
        }
    }
}
