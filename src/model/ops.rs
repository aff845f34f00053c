//! Differentiable building blocks of the Qwen2 forward: linear layers, RMSNorm, rotary position
//! embeddings, attention bias from a padding mask, attention (and its softmax) and the SwiGLU
//! activation.
//!
//! Every function here records a backward graph when its inputs come from `Var`s (candle's fast
//! `rms_norm`, `rope` and `softmax_last_dim` kernels do not, so they are not used). Every op
//! runs as a fused custom op with a backward ([`super::fused`], attention in
//! [`super::attention`]) for f32 CPU tensors; RMSNorm, rotary embeddings and the softmaxes also
//! for f32 and bf16 CUDA tensors (CUDA kernels, [`super::kernels`]). Elsewhere (CUDA linear
//! layers, attention's products, SwiGLU and head permutes; other dtypes) they run as their
//! composite forms (`*_composite`, the reference the fused ops are tested against).

use candle_core::{DType, Device, Result, Tensor, D};

use super::attention::Attention;
use super::frozen::FrozenLinear;
use super::fused;

/// Whether the fused CPU kernels apply to `x`.
fn fused_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether the fused ops that also have CUDA kernels apply to `x` and `others` (one dtype): on
/// the CPU in f32, on CUDA in f32 or bf16.
fn fused_kernels_apply(x: &Tensor, others: &[&Tensor]) -> bool {
    let device_fits =
        fused_applies(x) || (x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16));
    device_fits && others.iter().all(|t| t.dtype() == x.dtype())
}

/// Additive attention bias for masked keys: large, negative and finite, so that a fully masked
/// (padding) query row still gives a finite, uniform softmax instead of NaN.
pub const MASKED_BIAS: f32 = -1e9;

/// `x @ weight^T (+ bias)` for `x` of shape `[.., in]` and `weight` `[out, in]`. On the CPU in
/// f32 it is one fused node ([`fused::Linear`]), and a few rows without a gradient (decoding)
/// take [`fused::FewRowsMatmul`]. A frozen weight (and bias) under a graph, as in a LoRA
/// model's base layers, is a [`FrozenLinear`] node on every device: only `x` gets a gradient.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let frozen = !weight.track_op() && bias.is_none_or(|b| !b.track_op());
    if frozen && x.track_op() {
        let op = FrozenLinear {
            weight: weight.contiguous()?,
            bias: bias.map(Tensor::contiguous).transpose()?,
        };
        return x.contiguous()?.apply_op1(op);
    }
    if fused_applies(x) && fused_applies(weight) {
        let x = x.contiguous()?;
        let weight = weight.contiguous()?;
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        if rows <= fused::FEW_ROWS && !x.track_op() && !weight.track_op() {
            let features = x.dim(D::Minus1)?;
            let mut out_dims = x.dims().to_vec();
            *out_dims.last_mut().expect("x has a feature dimension") = weight.dim(0)?;
            let y = x
                .reshape((rows, features))?
                .apply_op2_no_bwd(&weight, &fused::FewRowsMatmul)?
                .reshape(out_dims)?;
            return match bias {
                Some(bias) => y.broadcast_add(bias),
                None => Ok(y),
            };
        }
        return match bias {
            Some(bias) => x.apply_op3(&weight, &bias.contiguous()?, fused::Linear),
            None => x.apply_op2(&weight, fused::Linear),
        };
    }
    linear_composite(x, weight, bias)
}

/// [`linear`] from elementary differentiable ops.
pub fn linear_composite(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let features = dims[dims.len() - 1];
    let y = x.reshape((rows, features))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims
        .last_mut()
        .expect("linear input has a feature dimension") = weight.dim(0)?;
    y.reshape(out_dims)
}

/// RMSNorm over the last dimension as transformers computes it in f32:
/// `weight * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_kernels_apply(x, &[weight]) {
        let eps = eps as f32;
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, fused::RmsNorm { eps });
    }
    rms_norm_composite(x, weight, eps)
}

/// [`rms_norm`] from elementary differentiable ops.
pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)
}

/// Rotary tables for `position_ids` (`[b, t]`, any integer dtype): `(cos, sin)`, each
/// `[b, 1, t, head_dim]` (the half-dimension frequencies repeated twice, as transformers'
/// `rotate_half` layout expects). Angles are `position * theta^(-2i/head_dim)` in f32.
/// On the CPU they are computed directly, one tensor each (decoding asks for them every token);
/// elsewhere by [`rope_tables_composite`], on the device.
pub fn rope_tables(position_ids: &Tensor, head_dim: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    if !position_ids.device().is_cpu() {
        return rope_tables_composite(position_ids, head_dim, theta);
    }
    let (b, t) = position_ids.dims2()?;
    let inv_freq = inverse_frequencies(head_dim, theta);
    let positions = position_ids
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let angles = positions.iter().flat_map(|&position| {
        let half = inv_freq.iter().map(move |&frequency| position * frequency);
        half.clone().chain(half)
    });
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.map(|angle| (angle.cos(), angle.sin())).unzip();
    let shape = (b, 1, t, head_dim);
    let device = position_ids.device();
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// `theta^(-2i/head_dim)` for `i` in `0..head_dim / 2`, in f32.
fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect()
}

/// [`rope_tables`] from candle ops, on the device of `position_ids`.
pub fn rope_tables_composite(
    position_ids: &Tensor,
    head_dim: usize,
    theta: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, t) = position_ids.dims2()?;
    let inv_freq = inverse_frequencies(head_dim, theta);
    let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), position_ids.device())?;
    let positions = position_ids.to_dtype(DType::F32)?.reshape((b * t, 1))?;
    let angles = positions.broadcast_mul(&inv_freq)?;
    let angles = Tensor::cat(&[&angles, &angles], D::Minus1)?.reshape((b, 1, t, head_dim))?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Applies rotary embeddings to `x` `[b, heads, t, head_dim]` with tables from [`rope_tables`]:
/// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x2, x1)`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_kernels_apply(x, &[cos, sin]) {
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        return x
            .contiguous()?
            .apply_op3(&cos, &sin, fused::Rope { adjoint: false });
    }
    apply_rope_composite(x, cos, sin)
}

/// [`apply_rope`] from elementary differentiable ops.
pub fn apply_rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// SwiGLU, `silu(gate) * up` (the Qwen2 MLP's activation), differentiable.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_applies(gate) && fused_applies(up) {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, fused::Swiglu);
    }
    swiglu_composite(gate, up)
}

/// [`swiglu`] from elementary differentiable ops.
pub fn swiglu_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// Scaled dot-product attention, `softmax(q kᵀ * scale + bias) v`, differentiable in `q`, `k`
/// and `v`: `q` `[b, kv_heads, heads_per_kv * t, d]` (the query heads sharing a key/value head
/// grouped in blocks of `t` rows, so one product serves them all without repeating the keys),
/// `k` and `v` `[b, kv_heads, s, d]`, `bias` `[b, 1, t, s]` (f32, no gradient). The scores,
/// bias and softmax are f32; the two products run in `q`'s dtype. Returns `[b, kv_heads,
/// heads_per_kv * t, d]`. On the CPU in f32 it is one fused node ([`Attention`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_applies(q) && [k, v, bias].iter().all(|t| fused_applies(t)) {
        return q.apply_op3(k, v, Attention::new(bias, scale as f32)?);
    }
    attention_composite(q, k, v, bias, scale)
}

/// [`attention`] from candle's matmuls around [`attention_softmax`].
pub fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let probs = attention_softmax(&scores, bias, scale)?.to_dtype(q.dtype())?;
    probs.matmul(v)
}

/// `softmax(scores * scale + bias)` over the last dimension (differentiable in `scores`):
/// `scores` `[b, kv_heads, per_kv * t, s]` (the query heads sharing a key head grouped in
/// blocks of `t` rows), `bias` `[b, 1, t, s]` added to every block.
pub fn attention_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_kernels_apply(scores, &[bias]) {
        let op = fused::AttentionSoftmax {
            scale: scale as f32,
        };
        return scores.contiguous()?.apply_op2(&bias.contiguous()?, op);
    }
    attention_softmax_composite(scores, bias, scale)
}

/// [`attention_softmax`] from elementary differentiable ops.
pub fn attention_softmax_composite(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, kv_heads, rows, s) = scores.dims4()?;
    let t = bias.dim(2)?;
    let scores = (scores * scale)?
        .reshape((b, kv_heads * rows / t, t, s))?
        .broadcast_add(bias)?;
    softmax_last_dim(&scores)?.reshape((b, kv_heads, rows, s))
}

/// `[b, t, heads * d]` → `[b, heads, t, d]` (differentiable).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    if fused_applies(x) {
        return x.contiguous()?.apply_op1(fused::SplitHeads { heads });
    }
    split_heads_composite(x, heads)
}

/// [`split_heads`] from elementary differentiable ops.
pub fn split_heads_composite(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    x.reshape((b, t, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, t, d]` → `[b, t, heads * d]` (differentiable).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    if fused_applies(x) {
        return x.contiguous()?.apply_op1(fused::MergeHeads);
    }
    merge_heads_composite(x)
}

/// [`merge_heads`] from elementary differentiable ops.
pub fn merge_heads_composite(x: &Tensor) -> Result<Tensor> {
    let (b, heads, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, heads * d))
}

/// Softmax over the last dimension (differentiable).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_kernels_apply(x, &[]) {
        return x.contiguous()?.apply_op1(fused::Softmax);
    }
    softmax_composite(x)
}

/// [`softmax_last_dim`] from elementary differentiable ops.
pub fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Additive attention bias `[b, 1, t, k]` for `t` new queries over `k` keys, the last `t` of
/// which are the queries themselves: query `i` sees key `j` when `j <= k - t + i` (causal) and
/// `key_mask[j] == 1`; other entries are [`MASKED_BIAS`]. `key_mask` is `[b, k]` of 0/1 (any
/// dtype).
/// On the CPU it is computed directly, as one tensor (decoding asks for it every token);
/// elsewhere by [`causal_bias_composite`], on the device.
pub fn causal_bias(key_mask: &Tensor, query_len: usize) -> Result<Tensor> {
    if !key_mask.device().is_cpu() {
        return causal_bias_composite(key_mask, query_len);
    }
    let (b, k) = key_mask.dims2()?;
    let offset = causal_offset(k, query_len)?;
    let mask = key_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut bias = Vec::with_capacity(b * query_len * k);
    for keys in &mask {
        // Each key's bias where the causal order lets a query see it; query `i` sees the first
        // `offset + i + 1` keys.
        let open: Vec<f32> = keys
            .iter()
            .map(|&key| if key != 0.0 { 0.0 } else { MASKED_BIAS })
            .collect();
        for seen in offset + 1..=offset + query_len {
            bias.extend_from_slice(&open[..seen]);
            bias.resize(bias.len() + k - seen, MASKED_BIAS);
        }
    }
    Tensor::from_vec(bias, (b, 1, query_len, k), key_mask.device())
}

/// Keys before the first of `query_len` queries among `keys` keys (an error when there are more
/// queries than keys).
fn causal_offset(keys: usize, query_len: usize) -> Result<usize> {
    if query_len > keys {
        candle_core::bail!("causal_bias: {query_len} queries but only {keys} keys in the mask");
    }
    Ok(keys - query_len)
}

/// [`causal_bias`] from candle ops, on the device of `key_mask`.
pub fn causal_bias_composite(key_mask: &Tensor, query_len: usize) -> Result<Tensor> {
    let (b, k) = key_mask.dims2()?;
    let offset = causal_offset(k, query_len)?;
    let causal: Vec<u8> = (0..query_len)
        .flat_map(|i| (0..k).map(move |j| u8::from(j <= offset + i)))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, query_len, k), key_mask.device())?;
    let keys = key_mask.ne(0u8)?.reshape((b, 1, 1, k))?;
    let visible = causal.broadcast_mul(&keys)?;
    bias_from_visibility(&visible, key_mask.device())
}

/// Turns a 0/1 `u8` visibility tensor into an additive f32 bias (0 or [`MASKED_BIAS`]).
pub fn bias_from_visibility(visible: &Tensor, device: &Device) -> Result<Tensor> {
    let zeros = Tensor::zeros(visible.shape(), DType::F32, device)?;
    let masked = Tensor::full(MASKED_BIAS, visible.shape(), device)?;
    visible.where_cond(&zeros, &masked)
}

/// `(cumsum(mask) - 1).clamp(min = 0)` along the last dimension, as `i64`: the position ids of
/// a left-padded batch with attention mask `mask` (`[b, t]` of 0/1).
pub fn position_ids_from_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let rows = mask.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let positions: Vec<i64> = rows
        .iter()
        .flat_map(|row| {
            row.iter().scan(0i64, |seen, &m| {
                *seen += m;
                Some((*seen - 1).max(0))
            })
        })
        .collect();
    Tensor::from_vec(positions, (b, t), mask.device())
}
