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
        entropy_temperature: None,
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

/// The fused ops' CUDA kernels (`kernels/fused.cu`), forward and backward, in f32 and bf16,
/// against the CPU ops on the same inputs; and the golden check on the GPU. These need a GPU:
/// they run in the CUDA build (`--features cuda`) only, and fail without a GPU.
#[cfg(feature = "cuda")]
mod cuda_kernels {
    use candle_core::{DType, Device, Tensor, Var};
    use grpo::model::fused;
    use grpo::model::ops::{causal_bias, rope_tables, MASKED_BIAS};

    fn gpu() -> Device {
        Device::new_cuda(0).expect("the CUDA kernel tests need a GPU")
    }

    /// Deterministic values in about [-scale, scale] (f32, CPU).
    fn values(shape: &[usize], seed: f64, scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        ((t * 0.7312).unwrap() + seed)
            .unwrap()
            .sin()
            .unwrap()
            .affine(scale, 0.0)
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    /// `t` (CPU f32) as `dtype` on `device`.
    fn on(t: &Tensor, device: &Device, dtype: DType) -> Tensor {
        t.to_dtype(dtype).unwrap().to_device(device).unwrap()
    }

    /// `t` rounded to `dtype`, as f32 on the CPU.
    fn host(t: &Tensor, dtype: DType) -> Tensor {
        t.to_dtype(dtype)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn assert_close(what: &str, gpu: &Tensor, cpu: &Tensor, dtype: DType) {
        assert!(gpu.device().is_cuda(), "{what} ran on the GPU");
        let a: Vec<f32> = host(gpu, dtype).flatten_all().unwrap().to_vec1().unwrap();
        let e: Vec<f32> = cpu.flatten_all().unwrap().to_vec1().unwrap();
        let largest = e.iter().fold(0f32, |m, v| m.max(v.abs()));
        let relative = if dtype == DType::BF16 {
            1.0 / 128.0
        } else {
            1e-5
        };
        for (i, (a, e)) in a.iter().zip(&e).enumerate() {
            let bound = relative * e.abs() + relative * 1e-2 * largest + 1e-6;
            assert!(
                (a - e).abs() <= bound,
                "{what} ({dtype:?}): element {i} is {a} on the GPU, {e} on the CPU"
            );
        }
    }

    /// Runs `op` on CPU f32 inputs (rounded to `dtype`) and on the GPU in `dtype`; compares the
    /// outputs and the gradients of `sum(out * upstream)` for the first `trainable` inputs.
    fn compare(what: &str, inputs: &[Tensor], trainable: usize, op: impl Fn(&[Tensor]) -> Tensor) {
        let gpu = gpu();
        for dtype in [DType::F32, DType::BF16] {
            let run = |device: &Device, storage: DType| {
                let vars: Vec<Var> = inputs[..trainable]
                    .iter()
                    .map(|t| Var::from_tensor(&on(&host(t, dtype), device, storage)).unwrap())
                    .collect();
                let mut all: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                all.extend(
                    inputs[trainable..]
                        .iter()
                        .map(|t| on(&host(t, dtype), device, storage)),
                );
                let out = op(&all);
                let upstream = on(&host(&values(out.dims(), 0.9, 1.0), dtype), device, storage);
                let grads = (&out * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grads: Vec<Tensor> = vars
                    .iter()
                    .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
                    .collect();
                (out, grads)
            };
            let (cpu_out, cpu_grads) = run(&Device::Cpu, DType::F32);
            let (gpu_out, gpu_grads) = run(&gpu, dtype);
            assert_close(what, &gpu_out, &cpu_out, dtype);
            for (i, (g, c)) in gpu_grads.iter().zip(&cpu_grads).enumerate() {
                assert_close(&format!("{what} gradient {i}"), g, c, dtype);
            }
        }
    }

    #[test]
    fn rms_norm_kernels_match_the_cpu_op() {
        for (rows, width) in [(37, 50), (5, 896)] {
            let inputs = [values(&[rows, width], 0.1, 2.0), values(&[width], 0.5, 1.0)];
            compare("rms_norm", &inputs, 2, |t| {
                t[0].apply_op2(&t[1], fused::RmsNorm { eps: 1e-6 }).unwrap()
            });
        }
    }

    #[test]
    fn rope_kernels_match_the_cpu_op() {
        let (b, heads, t, d) = (2, 3, 7, 64);
        let positions: Vec<i64> = (0..b * t).map(|i| (i * 37 % 11) as i64).collect();
        let positions = Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap();
        let (cos, sin) = rope_tables(&positions, d, 1e6).unwrap();
        let inputs = [values(&[b, heads, t, d], 0.3, 1.5), cos, sin];
        compare("rope", &inputs, 1, |t| {
            t[0].apply_op3(&t[1], &t[2], fused::Rope { adjoint: false })
                .unwrap()
        });
    }

    #[test]
    fn softmax_kernels_match_the_cpu_op() {
        let (rows, width) = (6, 300);
        let mask: Vec<f32> = (0..width)
            .map(|i| if i % 4 == 2 { MASKED_BIAS } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, width, &Device::Cpu).unwrap();
        let x = values(&[rows, width], 0.2, 3.0)
            .broadcast_add(&mask)
            .unwrap();
        compare("softmax", &[x], 1, |t| {
            t[0].apply_op1(fused::Softmax).unwrap()
        });
    }

    #[test]
    fn attention_softmax_kernels_match_the_cpu_op() {
        let (b, kv_heads, per_kv, t, past) = (2, 2, 7, 5, 4);
        let s = past + t;
        let key_mask = Tensor::new(
            &[[0u8, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]],
            &Device::Cpu,
        )
        .unwrap();
        let bias = causal_bias(&key_mask, t).unwrap();
        let scores = values(&[b, kv_heads, per_kv * t, s], 0.4, 4.0);
        compare("attention softmax", &[scores, bias], 1, |t| {
            t[0].apply_op2(&t[1], fused::AttentionSoftmax { scale: 0.125 })
                .unwrap()
        });
    }

    #[test]
    fn logprob_kernels_match_the_cpu_ops() {
        // Qwen2.5's vocabulary.
        let (rows, vocab, temperature) = (5, 151_936, 0.9);
        let logits = values(&[rows, vocab], 0.6, 8.0);
        let targets = Tensor::new(&[3u32, 0, 151_935, 77, 1024], &Device::Cpu).unwrap();
        let gpu = gpu();
        let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
        let op = fused::LogSoftmaxGather { temperature };
        let cpu = logits.apply_op2_no_bwd(&targets, &op).unwrap();
        let out = on_gpu(&logits)
            .apply_op2_no_bwd(&on_gpu(&targets), &op)
            .unwrap();
        assert_close("log-probs", &out, &cpu, DType::F32);

        let upstream = Tensor::new(&[[1f32], [-2.0], [0.5], [3.0], [0.0]], &Device::Cpu).unwrap();
        let scale = (upstream / temperature).unwrap();
        let stats = Tensor::cat(&[&cpu.narrow(1, 2, 1).unwrap(), &scale], 1).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let op = fused::LogprobGrad { temperature, dtype };
            let cpu = logits.apply_op3_no_bwd(&targets, &stats, &op).unwrap();
            let out = on_gpu(&logits)
                .apply_op3_no_bwd(&on_gpu(&targets), &on_gpu(&stats), &op)
                .unwrap();
            assert_eq!(out.dtype(), dtype);
            assert_close("log-prob gradient", &out, &cpu, dtype);
        }
    }

    #[test]
    fn golden_check_passes_on_the_gpu_in_f32_and_bf16() {
        let report =
            grpo::check::check_golden(&super::golden_dir(), &gpu(), &[DType::F32, DType::BF16])
                .unwrap();
        assert!(report.passed(), "{}", report.table());
    }
}
