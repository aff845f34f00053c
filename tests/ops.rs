//! The fused CPU kernels (forward AND backward) against their composite differentiable forms,
//! the frozen-operand ops (a LoRA base layer's), plus the attention-bias and position-id helpers.

use candle_core::{DType, Device, Tensor, Var};
use grpo::model::attention::Attention;
use grpo::model::ops::{
    apply_rope_composite, attention, attention_composite, attention_softmax,
    attention_softmax_composite, causal_bias, causal_bias_composite, linear, linear_composite,
    merge_heads, merge_heads_composite, position_ids_from_mask, rms_norm, rms_norm_composite,
    rope_tables, rope_tables_composite, softmax_composite, split_heads, split_heads_composite,
    swiglu, swiglu_composite, MASKED_BIAS,
};
use grpo::model::{frozen, fused};

fn random(shape: &[usize], seed_scale: f64) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, seed_scale as f32, shape, &Device::Cpu).unwrap()).unwrap()
}

/// The largest absolute value of `t`.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// Gradients of `sum(out * upstream)` with respect to `inputs`.
fn grads_of(out: &Tensor, upstream: &Tensor, inputs: &[&Var]) -> Vec<Tensor> {
    let grads = (out * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    inputs
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("input has a gradient")
                .clone()
        })
        .collect()
}

#[test]
fn fused_rms_norm_matches_composite_forward_and_backward() {
    let x = random(&[3, 5, 64], 2.0);
    let weight = random(&[64], 1.0);
    let eps = 1e-6;
    let fused = x
        .as_tensor()
        .apply_op2(weight.as_tensor(), fused::RmsNorm { eps: eps as f32 })
        .unwrap();
    let composite = rms_norm_composite(x.as_tensor(), weight.as_tensor(), eps).unwrap();
    assert!(max_diff(&fused, &composite) < 1e-5);
    let upstream = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu).unwrap();
    let a = grads_of(&fused, &upstream, &[&x, &weight]);
    let b = grads_of(&composite, &upstream, &[&x, &weight]);
    for (name, (a, b)) in ["x", "weight"].iter().zip(a.iter().zip(&b)) {
        let diff = max_diff(a, b);
        assert!(diff < 1e-4, "rms_norm d{name} differs by {diff}");
    }
}

#[test]
fn fused_rope_matches_composite_forward_and_backward() {
    let (b, heads, t, d) = (2, 3, 7, 16);
    let x = random(&[b, heads, t, d], 1.0);
    let positions = Tensor::new(
        &[[0i64, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 600]],
        &Device::Cpu,
    )
    .unwrap();
    let (cos, sin) = rope_tables(&positions, d, 1e6).unwrap();
    let fused = x
        .as_tensor()
        .apply_op3(&cos, &sin, fused::Rope { adjoint: false })
        .unwrap();
    let composite = apply_rope_composite(x.as_tensor(), &cos, &sin).unwrap();
    assert!(max_diff(&fused, &composite) < 1e-6);
    let upstream = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu).unwrap();
    let a = grads_of(&fused, &upstream, &[&x]);
    let b = grads_of(&composite, &upstream, &[&x]);
    assert!(max_diff(&a[0], &b[0]) < 1e-5);
}

#[test]
fn fused_softmax_matches_composite_forward_and_backward() {
    let x = random(&[2, 4, 5, 9], 3.0);
    // A masked column (finite large negative) must stay exactly 0 and never NaN.
    let bias = Tensor::new(
        &[0f32, 0., MASKED_BIAS, 0., 0., 0., 0., 0., 0.],
        &Device::Cpu,
    )
    .unwrap();
    let scores = x.as_tensor().broadcast_add(&bias).unwrap();
    let fused = scores.apply_op1(fused::Softmax).unwrap();
    let composite = softmax_composite(&scores).unwrap();
    assert!(max_diff(&fused, &composite) < 1e-6);
    let masked_column = fused
        .narrow(3, 2, 1)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(masked_column.to_scalar::<f32>().unwrap(), 0.0);
    let upstream = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu).unwrap();
    let a = grads_of(&fused, &upstream, &[&x]);
    let b = grads_of(&composite, &upstream, &[&x]);
    assert!(max_diff(&a[0], &b[0]) < 1e-5);
}

#[test]
fn fully_masked_softmax_row_is_uniform_not_nan() {
    let scores = Tensor::full(MASKED_BIAS, (1, 4), &Device::Cpu).unwrap();
    let probs = scores
        .apply_op1(fused::Softmax)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(probs, vec![vec![0.25; 4]]);
}

#[test]
fn causal_bias_hides_future_and_padded_keys() {
    // Left-padded row [pad, a, b] with one cached key: 2 new queries over 3 keys.
    let mask = Tensor::new(&[[0u32, 1, 1]], &Device::Cpu).unwrap();
    let m = MASKED_BIAS;
    let bias = causal_bias(&mask, 2)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(
        bias.to_vec2::<f32>().unwrap(),
        vec![vec![m, 0.0, m], vec![m, 0.0, 0.0]]
    );
    assert!(
        causal_bias(&mask, 4).is_err(),
        "more queries than keys must be refused"
    );
}

#[test]
fn host_rope_tables_and_causal_bias_are_the_device_forms_bit_for_bit() {
    // The CPU builds both directly; CUDA keeps the candle ops. Left padding, a long position,
    // one and several queries, a head dimension whose half is odd.
    let positions = Tensor::new(
        &[[0i64, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 60_000]],
        &Device::Cpu,
    )
    .unwrap();
    for (d, theta) in [(16, 1e6), (6, 1e4)] {
        let (cos, sin) = rope_tables(&positions, d, theta).unwrap();
        let (cos_want, sin_want) = rope_tables_composite(&positions, d, theta).unwrap();
        assert_eq!(cos.dims(), [2, 1, 7, d]);
        for (got, want) in [(cos, cos_want), (sin, sin_want)] {
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(got), flat(want), "head_dim {d}");
        }
    }
    let mask = Tensor::new(&[[0u8, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    for queries in [1, 3, 6] {
        let got = causal_bias(&mask, queries).unwrap();
        let want = causal_bias_composite(&mask, queries).unwrap();
        assert_eq!(got.dims(), [2, 1, queries, 6]);
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(got), flat(want), "{queries} queries");
    }
    assert!(causal_bias_composite(&mask, 7).is_err());
}

#[test]
fn position_ids_are_cumsum_minus_one_clamped() {
    let mask = Tensor::new(&[[0i64, 0, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let positions = position_ids_from_mask(&mask).unwrap();
    assert_eq!(positions.dtype(), DType::I64);
    assert_eq!(
        positions.to_vec2::<i64>().unwrap(),
        vec![vec![0, 0, 0, 1, 2], vec![0, 1, 2, 2, 2]]
    );
}

/// `fused` and `composite` (the same function of `inputs`) agree in value and in the gradient
/// of every input, within `tol` relative to the largest magnitude of each compared tensor.
fn assert_same_function(fused: &Tensor, composite: &Tensor, inputs: &[(&str, &Var)], tol: f32) {
    let scale = |t: &Tensor| max_abs(t).max(1.0);
    let diff = max_diff(fused, composite);
    assert!(diff < tol * scale(composite), "values differ by {diff}");
    let upstream = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu).unwrap();
    let vars: Vec<&Var> = inputs.iter().map(|(_, v)| *v).collect();
    let a = grads_of(fused, &upstream, &vars);
    let b = grads_of(composite, &upstream, &vars);
    for ((name, _), (a, b)) in inputs.iter().zip(a.iter().zip(&b)) {
        let diff = max_diff(a, b);
        assert!(diff < tol * scale(b), "d{name} differs by {diff}");
    }
}

#[test]
fn fused_rms_norm_matches_composite_on_many_rows() {
    // Enough rows for the multi-threaded path.
    let x = random(&[4, 100, 128], 2.0);
    let weight = random(&[128], 1.0);
    let fused = rms_norm(x.as_tensor(), weight.as_tensor(), 1e-6).unwrap();
    let composite = rms_norm_composite(x.as_tensor(), weight.as_tensor(), 1e-6).unwrap();
    assert_same_function(&fused, &composite, &[("x", &x), ("weight", &weight)], 1e-5);
}

#[test]
fn fused_linear_matches_composite_with_and_without_bias() {
    for (rows, k, n) in [(40, 37, 23), (300, 64, 96)] {
        let x = random(&[2, rows / 2, k], 1.0);
        let weight = random(&[n, k], 0.5);
        let bias = random(&[n], 0.5);
        let fused = linear(x.as_tensor(), weight.as_tensor(), Some(bias.as_tensor())).unwrap();
        let composite =
            linear_composite(x.as_tensor(), weight.as_tensor(), Some(bias.as_tensor())).unwrap();
        assert_eq!(fused.dims(), [2, rows / 2, n]);
        let inputs = [("x", &x), ("weight", &weight), ("bias", &bias)];
        assert_same_function(&fused, &composite, &inputs, 1e-5);
        let fused = linear(x.as_tensor(), weight.as_tensor(), None).unwrap();
        let composite = linear_composite(x.as_tensor(), weight.as_tensor(), None).unwrap();
        assert_same_function(&fused, &composite, &[("x", &x), ("weight", &weight)], 1e-5);
    }
}

#[test]
fn fused_linear_forward_is_candles_matmul_bit_for_bit() {
    // It calls candle's gemm kernels directly (without candle's zero-filled output), so the
    // values must not move at all (above 16 rows: not the decoding product).
    for (rows, k, n) in [(17, 5, 3), (300, 64, 96), (96, 300, 130)] {
        let x = random(&[rows, k], 1.0);
        let weight = random(&[n, k], 0.5);
        let bias = random(&[n], 0.5);
        let want = linear_composite(x.as_tensor(), weight.as_tensor(), Some(bias.as_tensor()))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let got = linear(x.as_tensor(), weight.as_tensor(), Some(bias.as_tensor()))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got, want, "{rows} x {k} x {n}");
    }
}

#[test]
fn few_rows_matmul_equals_the_general_product() {
    // Decoding shapes: a few rows, no gradient; odd sizes exercise every remainder path, and
    // the last two weights are large enough to be split over threads.
    for (m, k, n) in [
        (1, 7, 3),
        (3, 37, 23),
        (16, 64, 1001),
        (5, 896, 130),
        (7, 130, 1101),
        (16, 512, 1408),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        let fast = x.apply_op2_no_bwd(&weight, &fused::FewRowsMatmul).unwrap();
        let general = x.matmul(&weight.t().unwrap()).unwrap();
        assert_eq!(fast.dims(), [m, n]);
        let diff = max_diff(&fast, &general);
        assert!(
            diff < 1e-4 * (k as f32).sqrt(),
            "{m}x{k}x{n}: differs by {diff}"
        );
        // `linear` takes this path for few untracked rows, bias included.
        let via_linear = linear(&x, &weight, Some(&bias)).unwrap();
        let want = general.broadcast_add(&bias).unwrap();
        assert!(max_diff(&via_linear, &want) < 1e-4 * (k as f32).sqrt());
    }
}

#[test]
fn fused_swiglu_matches_composite() {
    for shape in [[2, 3, 10], [4, 64, 300]] {
        let gate = random(&shape, 2.0);
        let up = random(&shape, 1.0);
        let fused = swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let composite = swiglu_composite(gate.as_tensor(), up.as_tensor()).unwrap();
        assert_same_function(&fused, &composite, &[("gate", &gate), ("up", &up)], 1e-5);
    }
}

#[test]
fn fused_attention_softmax_matches_composite_for_grouped_heads() {
    // 2 items, 2 kv heads of 3 query heads each, 5 queries over 9 keys, padded keys masked and
    // one query row fully masked.
    for (b, kv_heads, per_kv, t, s) in [(2, 2, 3, 5, 9), (2, 2, 4, 64, 100)] {
        let scores = random(&[b, kv_heads, per_kv * t, s], 3.0);
        let mut mask = vec![1u32; b * s];
        mask[0] = 0;
        mask[s + 3] = 0;
        let mask = Tensor::from_vec(mask, (b, s), &Device::Cpu).unwrap();
        let bias = causal_bias(&mask, t).unwrap();
        let scale = 0.125;
        let fused = attention_softmax(scores.as_tensor(), &bias, scale).unwrap();
        let composite = attention_softmax_composite(scores.as_tensor(), &bias, scale).unwrap();
        assert_eq!(fused.dims(), scores.as_tensor().dims());
        assert_same_function(&fused, &composite, &[("scores", &scores)], 1e-5);
    }
}

#[test]
fn fused_attention_matches_composite_for_grouped_heads_and_cached_keys() {
    // 2 items, 2 kv heads of 3 (then 4) query heads, padded keys masked and one query row fully
    // masked; the second shape is large enough for the threads. Keys and values are read as
    // views of longer buffers, as from a KV cache (their gradients land in the buffers).
    for (b, kv_heads, per_kv, t, s, d) in [(2, 2, 3, 5, 9, 4), (2, 2, 4, 64, 100, 16)] {
        let q = random(&[b, kv_heads, per_kv * t, d], 1.0);
        let k_buffer = random(&[b, kv_heads, s + 7, d], 1.0);
        let v_buffer = random(&[b, kv_heads, s + 7, d], 1.0);
        let k = k_buffer.as_tensor().narrow(2, 0, s).unwrap();
        let v = v_buffer.as_tensor().narrow(2, 0, s).unwrap();
        let mut mask = vec![1u32; b * s];
        mask[0] = 0;
        mask[s + 3] = 0;
        let mask = Tensor::from_vec(mask, (b, s), &Device::Cpu).unwrap();
        let bias = causal_bias(&mask, t).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let op = Attention::new(&bias, scale as f32).unwrap();
        let fused = q.as_tensor().apply_op3(&k, &v, op).unwrap();
        let composite = attention_composite(q.as_tensor(), &k, &v, &bias, scale).unwrap();
        assert_eq!(fused.dims(), [b, kv_heads, per_kv * t, d]);
        let inputs = [("q", &q), ("k", &k_buffer), ("v", &v_buffer)];
        assert_same_function(&fused, &composite, &inputs, 1e-5);
        // The model's entry point takes the fused node on the CPU (same bits).
        let dispatched = attention(q.as_tensor(), &k, &v, &bias, scale).unwrap();
        assert_eq!(max_diff(&dispatched, &fused), 0.0);
    }
}

#[test]
fn fused_attention_refuses_inputs_that_do_not_agree_and_names_them() {
    use candle_core::CustomOp3;
    let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let (q, k, bias) = (
        zeros(&[1, 2, 6, 4]),
        zeros(&[1, 2, 5, 4]),
        zeros(&[1, 1, 3, 5]),
    );
    let error = |q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor| {
        let op = Attention::new(bias, 1.0).unwrap();
        q.apply_op3(k, v, op).unwrap_err().to_string()
    };
    // Keys of another head dimension, or a bias of another key count.
    let other_k = zeros(&[1, 2, 5, 8]);
    assert!(error(&q, &other_k, &other_k, &bias).contains("do not agree"));
    assert!(error(&q, &k, &k, &zeros(&[1, 1, 3, 7])).contains("do not agree"));
    // 6 query rows are not whole blocks of 4 queries.
    assert!(error(&q, &k, &k, &zeros(&[1, 1, 4, 5])).contains("do not agree"));
    assert!(error(&q, &k, &k, &zeros(&[1, 3, 5])).contains("is not [b, 1, t, s]"));
    // Keys whose last dimension is strided (a transposed view).
    let strided = zeros(&[1, 2, 4, 5]).transpose(2, 3).unwrap();
    assert!(error(&q, &strided, &k, &bias).contains("last dimension of k must be contiguous"));
    // A backward needs the probabilities its forward kept.
    let unused = Attention::new(&bias, 1.0).unwrap();
    let out = zeros(&[1, 2, 6, 4]);
    let backward = unused.bwd(&q, &k, &k, &out, &out).unwrap_err().to_string();
    assert!(
        backward.contains("without the forward's probabilities"),
        "{backward}"
    );
}

#[test]
fn fused_split_and_merge_heads_match_composite() {
    for (b, t, heads, d) in [(2, 3, 4, 5), (3, 40, 8, 64)] {
        let x = random(&[b, t, heads * d], 1.0);
        let fused = split_heads(x.as_tensor(), heads).unwrap();
        let composite = split_heads_composite(x.as_tensor(), heads).unwrap();
        assert_eq!(fused.dims(), [b, heads, t, d]);
        assert_same_function(&fused, &composite, &[("x", &x)], 1e-6);

        let y = random(&[b, heads, t, d], 1.0);
        let fused = merge_heads(y.as_tensor()).unwrap();
        let composite = merge_heads_composite(y.as_tensor()).unwrap();
        assert_eq!(fused.dims(), [b, t, heads * d]);
        assert_same_function(&fused, &composite, &[("y", &y)], 1e-6);
    }
}

/// A frozen weight and bias under a graph (a LoRA base layer) give the product and the
/// gradient of `x` that `linear_composite` gives, and no gradient at all to the weight or the
/// bias: the backward's store holds `x`'s gradient alone.
#[test]
fn frozen_linear_gives_x_its_gradient_and_the_constants_none() {
    for (rows, k, n) in [(40, 37, 23), (300, 64, 96)] {
        let x = random(&[2, rows / 2, k], 1.0);
        let weight = Tensor::randn(0f32, 0.5, (n, k), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.5, n, &Device::Cpu).unwrap();
        for bias in [Some(&bias), None] {
            let frozen = linear(x.as_tensor(), &weight, bias).unwrap();
            assert_eq!(frozen.dims(), [2, rows / 2, n]);
            let composite = linear_composite(x.as_tensor(), &weight, bias).unwrap();
            assert_same_function(&frozen, &composite, &[("x", &x)], 1e-5);
            // (A plain sum: a product with a constant would give that constant a gradient.)
            let grads = frozen.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(&weight).is_none() && bias.is_none_or(|b| grads.get(b).is_none()));
            assert_eq!(grads.get_ids().count(), 1, "only x has a gradient");
        }
    }
}

/// `x * factor` with a constant factor: the product, `g * factor` for `x`, nothing for the factor.
#[test]
fn constant_mul_gives_x_its_gradient_and_the_factor_none() {
    let x = random(&[3, 5, 7], 1.0);
    let factor = Tensor::randn(0f32, 1.0, (3, 5, 7), &Device::Cpu).unwrap();
    let product = x
        .as_tensor()
        .apply_op1(frozen::ConstantMul {
            factor: factor.clone(),
        })
        .unwrap();
    let composite = x.as_tensor().mul(&factor).unwrap();
    assert_eq!(max_diff(&product, &composite), 0.0);
    let upstream = Tensor::randn(0f32, 1.0, (3, 5, 7), &Device::Cpu).unwrap();
    let grads = (product * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = (upstream * &factor).unwrap();
    assert_eq!(max_diff(grads.get(x.as_tensor()).unwrap(), &want), 0.0);
    assert!(grads.get(&factor).is_none());
}

/// A frozen norm weight gets no gradient from the fused RMSNorm; `x` still gets its own.
#[test]
fn fused_rms_norm_gives_a_frozen_weight_no_gradient() {
    let x = random(&[4, 9, 16], 1.0);
    let weight = Tensor::randn(0f32, 1.0, 16, &Device::Cpu).unwrap();
    let fused = rms_norm(x.as_tensor(), &weight, 1e-6).unwrap();
    let composite = rms_norm_composite(x.as_tensor(), &weight, 1e-6).unwrap();
    assert_same_function(&fused, &composite, &[("x", &x)], 1e-5);
    let grads = fused.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&weight).is_none());
}

#[test]
fn fused_logprobs_match_log_softmax_gather_and_entropy() {
    let (rows, vocab, temperature) = (4, 50, 0.7);
    let logits = random(&[rows, vocab], 3.0);
    let targets = Tensor::new(&[[3u32], [0], [49], [17]], &Device::Cpu).unwrap();
    let stats = logits
        .as_tensor()
        .apply_op2_no_bwd(&targets, &fused::LogSoftmaxGather { temperature })
        .unwrap();
    assert_eq!(stats.dims(), [rows, 3]);
    let scaled = (logits.as_tensor() / temperature).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&scaled, 1).unwrap();
    let gathered = log_probs.gather(&targets, 1).unwrap();
    assert!(max_diff(&stats.narrow(1, 0, 1).unwrap(), &gathered) < 1e-5);
    let entropy = (log_probs.exp().unwrap() * &log_probs)
        .unwrap()
        .sum_keepdim(1)
        .unwrap()
        .neg()
        .unwrap();
    assert!(max_diff(&stats.narrow(1, 1, 1).unwrap(), &entropy) < 1e-5);
    // logsumexp(z) = z - log_softmax(z), at any column.
    let normalizer =
        (scaled.narrow(1, 5, 1).unwrap() - log_probs.narrow(1, 5, 1).unwrap()).unwrap();
    assert!(max_diff(&stats.narrow(1, 2, 1).unwrap(), &normalizer) < 1e-5);

    // The gradient of sum(g * log-probs) with respect to the logits.
    let upstream = Tensor::new(&[[1f32], [-2.0], [0.5], [3.0]], &Device::Cpu).unwrap();
    let composite = grads_of(&gathered, &upstream, &[&logits]).remove(0);
    let scale = (&upstream / temperature).unwrap();
    let stats = Tensor::cat(&[&stats.narrow(1, 2, 1).unwrap(), &scale], 1).unwrap();
    let op = fused::LogprobGrad {
        temperature,
        dtype: DType::F32,
    };
    let fused = logits
        .as_tensor()
        .apply_op3_no_bwd(&targets, &stats, &op)
        .unwrap();
    assert!(max_diff(&fused, &composite) < 1e-5);
    assert!(
        max_abs(&composite) > 0.1,
        "the gradient is not trivially zero"
    );

    // A target outside the vocabulary is an error naming it, in both ops.
    let bad = Tensor::new(&[[3u32], [0], [50], [17]], &Device::Cpu).unwrap();
    let gather = logits
        .as_tensor()
        .apply_op2_no_bwd(&bad, &fused::LogSoftmaxGather { temperature })
        .unwrap_err();
    let grad = logits
        .as_tensor()
        .apply_op3_no_bwd(&bad, &stats, &op)
        .unwrap_err();
    for error in [gather, grad] {
        assert!(
            error
                .to_string()
                .contains("target 50 is outside the vocabulary of 50"),
            "{error}"
        );
    }
}
