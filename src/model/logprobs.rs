//! Per-token log-probs (and entropies) of completion tokens under a temperature, as TRL computes
//! them: `log_softmax(logits / T)` gathered at the next token, in f32, 0 where the completion
//! mask is 0.
//!
//! Logits are produced in chunks of [`CHUNK_ROWS`] positions (lm_head, then one fused op for
//! `/ T`, log-softmax, gather and entropy: [`fused::LogSoftmaxGather`]), so no
//! `[batch, seq, vocab]` tensor is ever built whole, not even for the backward pass: the values
//! are computed without a graph and attached to the hidden states and the lm_head weight by
//! [`LmHeadLogprob`], a custom op whose backward turns each chunk's logits into their gradient
//! in one fused op ([`fused::LogprobGrad`]), reusing the forward's logits when all of them fit
//! in [`CACHED_LOGITS_ELEMENTS`] and otherwise recomputing them. Entropies come from the same
//! pass, without a gradient. Both fused ops have CUDA kernels.
//!
//! The lm_head matmuls (forward and backward) run in the model's compute dtype; logits,
//! log-softmax, softmax and the weight gradient's accumulation are f32, and the gradients
//! reach the hidden states and the (f32) weight in their own dtypes.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::fused;
use super::qwen2::{group_index, logits, GroupedBatch, Qwen2};

/// Positions per lm_head chunk (a 152k vocabulary makes each chunk ~600 MB of f32 logits).
pub const CHUNK_ROWS: usize = 1024;

/// Per-token results, each `[rows, completion_len]`, 0 where the completion mask is 0.
pub struct TokenLogprobs {
    /// `log p(token | prefix)` at the temperature, differentiable.
    pub logprobs: Tensor,
    /// Entropy of the temperature-scaled next-token distribution (no gradient), when asked.
    pub entropy: Option<Tensor>,
}

/// `log_softmax(hidden @ weight^T / T)[target]` per row, as a custom op over
/// `(hidden [n, h], weight [V, h], values [n])`: the forward passes the precomputed `values`
/// through; the backward takes the logits chunk by chunk and returns
/// `d hidden = G @ W` and `d weight = G^T @ hidden` with `G = (onehot - softmax) * g / T`
/// ([`fused::LogprobGrad`]).
struct LmHeadLogprob {
    /// `[n, 1]` u32 target ids.
    targets: Tensor,
    /// `[n]` f32: each row's `logsumexp(logits / T)` from the forward.
    normalizers: Tensor,
    temperature: f64,
    /// The dtype of the backward's matmuls.
    compute_dtype: DType,
    /// The forward's logits of each chunk, kept when small enough
    /// ([`CACHED_LOGITS_ELEMENTS`]) so the backward need not recompute them.
    logits: Option<Vec<Tensor>>,
}

/// Most `rows × vocab` logits the forward keeps for the backward (128 MiB of f32); beyond that
/// the backward recomputes each chunk's.
const CACHED_LOGITS_ELEMENTS: usize = 32 << 20;

impl CustomOp3 for LmHeadLogprob {
    fn name(&self) -> &'static str {
        "lm-head-logprob"
    }

    fn cpu_fwd(
        &self,
        _hidden: &CpuStorage,
        _: &Layout,
        _weight: &CpuStorage,
        _: &Layout,
        values: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (values, layout.contiguous_offsets())
        else {
            bail!("lm-head-logprob: values must be contiguous f32");
        };
        Ok((
            CpuStorage::F32(data[start..end].to_vec()),
            layout.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _hidden: &candle_core::CudaStorage,
        _: &Layout,
        _weight: &candle_core::CudaStorage,
        _: &Layout,
        values: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if layout.start_offset() != 0 || !layout.is_contiguous() {
            bail!("lm-head-logprob: values must be a fresh contiguous tensor");
        }
        Ok((values.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _values: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let compute = self.compute_dtype;
        let compute_weight = weight.detach().to_dtype(compute)?;
        let rows = hidden.dim(0)?;
        let mut grad_hidden = Vec::new();
        // A frozen lm_head (a LoRA model's) gets no gradient, and its matmuls are skipped.
        let mut grad_weight = weight
            .track_op()
            .then(|| Tensor::zeros(weight.shape(), DType::F32, weight.device()))
            .transpose()?;
        for start in (0..rows).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(rows - start);
            let hidden_chunk = hidden.detach().narrow(0, start, len)?.to_dtype(compute)?;
            let logits = match &self.logits {
                Some(chunks) => chunks[start / CHUNK_ROWS].clone(),
                None => logits(&hidden_chunk, &compute_weight)?.contiguous()?,
            };
            let scale = (grad_out
                .narrow(0, start, len)?
                .detach()
                .to_dtype(DType::F32)?
                .reshape((len, 1))?
                / self.temperature)?;
            let normalizers = self.normalizers.narrow(0, start, len)?.reshape((len, 1))?;
            let stats = Tensor::cat(&[&normalizers, &scale], 1)?;
            let grad_logits = logits
                .apply_op3_no_bwd(
                    &self.targets.narrow(0, start, len)?.contiguous()?,
                    &stats,
                    &fused::LogprobGrad {
                        temperature: self.temperature,
                        dtype: compute,
                    },
                )?
                .to_dtype(compute)?;
            grad_hidden.push(
                grad_logits
                    .matmul(&compute_weight)?
                    .to_dtype(hidden.dtype())?,
            );
            if let Some(sum) = &mut grad_weight {
                let chunk_grad_weight = grad_logits.t()?.matmul(&hidden_chunk)?;
                *sum = (&*sum + chunk_grad_weight.to_dtype(DType::F32)?)?;
            }
        }
        Ok((
            Some(Tensor::cat(&grad_hidden, 0)?),
            grad_weight
                .map(|g| g.to_dtype(weight.dtype()))
                .transpose()?,
            None,
        ))
    }
}

/// The entropy of `softmax(logits / temperature)` for each row of `logits` `[rows, vocab]`
/// (f32), computed as [`token_logprobs`] computes it (the same fused op), on the logits' device;
/// only the `rows` values come to the host. Sampling records it for each token it draws.
pub fn next_token_entropies(logits: &Tensor, temperature: f64) -> Result<Vec<f32>> {
    let rows = logits.dim(0)?;
    let targets = Tensor::zeros((rows, 1), DType::U32, logits.device())?;
    let stats = logits
        .contiguous()?
        .apply_op2_no_bwd(&targets, &fused::LogSoftmaxGather { temperature })?;
    // [rows, 3]: log-prob (of token 0, unused), entropy, log-normaliser.
    stats.narrow(1, 1, 1)?.squeeze(1)?.to_vec1::<f32>()
}

/// Log-probs of `targets` `[b, c]` from the hidden states that predict them,
/// `predictor_hidden` `[b, c, hidden]` (position `j` predicts `targets[:, j]`).
pub fn token_logprobs(
    model: &Qwen2,
    predictor_hidden: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    temperature: f64,
    with_entropy: bool,
) -> Result<TokenLogprobs> {
    let (b, c, hidden) = predictor_hidden.dims3()?;
    if targets.dims() != [b, c] || mask.dims() != [b, c] {
        bail!(
            "token_logprobs: hidden {:?}, targets {:?} and mask {:?} disagree",
            predictor_hidden.dims(),
            targets.dims(),
            mask.dims()
        );
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("temperature must be positive, got {temperature}");
    }
    let rows = b * c;
    let hidden_rows = predictor_hidden.reshape((rows, hidden))?.contiguous()?;
    let target_rows = targets.reshape((rows, 1))?.to_dtype(DType::U32)?;
    let detached = hidden_rows.detach();
    let compute_weight = model
        .lm_head_weight()
        .detach()
        .to_dtype(model.compute_dtype())?;
    let vocab = compute_weight.dim(0)?;
    let keep_logits = hidden_rows.track_op() && rows * vocab <= CACHED_LOGITS_ELEMENTS;
    let mut stat_chunks = Vec::new();
    let mut logit_chunks = Vec::new();
    let op = fused::LogSoftmaxGather { temperature };
    for start in (0..rows).step_by(CHUNK_ROWS) {
        let len = CHUNK_ROWS.min(rows - start);
        let logits = logits(&detached.narrow(0, start, len)?, &compute_weight)?.contiguous()?;
        let targets = target_rows.narrow(0, start, len)?.contiguous()?;
        // [len, 3]: log-prob, entropy, log-normaliser.
        stat_chunks.push(logits.apply_op2_no_bwd(&targets, &op)?);
        if keep_logits {
            logit_chunks.push(logits);
        }
    }
    let stats = Tensor::cat(&stat_chunks, 0)?;
    let values = stats.narrow(1, 0, 1)?.reshape(rows)?.copy()?;
    let logprobs = hidden_rows.apply_op3(
        &model.lm_head_weight().contiguous()?,
        &values,
        LmHeadLogprob {
            targets: target_rows,
            normalizers: stats.narrow(1, 2, 1)?.reshape(rows)?.contiguous()?,
            temperature,
            compute_dtype: model.compute_dtype(),
            logits: keep_logits.then_some(logit_chunks),
        },
    )?;
    let mask = mask.to_dtype(DType::F32)?;
    let entropy = if with_entropy {
        Some(stats.narrow(1, 1, 1)?.reshape((b, c))?.mul(&mask)?)
    } else {
        None
    };
    Ok(TokenLogprobs {
        logprobs: logprobs.reshape((b, c))?.mul(&mask)?,
        entropy,
    })
}

/// Log-probs of the completions in `input_ids` `[b, P + C]` (left-padded prompt of width
/// `prompt_len` followed by the right-padded completion) with `attention_mask` `[b, P + C]`;
/// the completion mask is `attention_mask[:, P..]`.
pub fn completion_logprobs(
    model: &Qwen2,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    prompt_len: usize,
    temperature: f64,
    with_entropy: bool,
) -> Result<TokenLogprobs> {
    let (_, total) = input_ids.dims2()?;
    if prompt_len == 0 || prompt_len >= total {
        candle_core::bail!("prompt length {prompt_len} must be in 1..{total}");
    }
    let completion_len = total - prompt_len;
    let hidden = model.forward_masked(input_ids, attention_mask)?;
    token_logprobs(
        model,
        &hidden.narrow(1, prompt_len - 1, completion_len)?,
        &input_ids.narrow(1, prompt_len, completion_len)?,
        &attention_mask.narrow(1, prompt_len, completion_len)?,
        temperature,
        with_entropy,
    )
}

/// Same as [`completion_logprobs`] on the `[B * G, P + C]` batch, computed with
/// [`Qwen2::forward_grouped`]: each of the `B` prompts (`[B, P]`) runs once for its `G`
/// completions (`[B * G, C]`, row `r * G + g`).
pub fn grouped_completion_logprobs(
    model: &Qwen2,
    batch: &GroupedBatch,
    temperature: f64,
    with_entropy: bool,
) -> Result<TokenLogprobs> {
    let (num_prompts, prompt_len) = batch.prompt_ids.dims2()?;
    let completion_len = batch.completion_ids.dim(1)?;
    let (prompt_hidden, completion_hidden) = model.forward_grouped(batch)?;
    let group_index = group_index(num_prompts, batch.group_size, batch.prompt_ids.device())?;
    let last_prompt = prompt_hidden
        .narrow(1, prompt_len - 1, 1)?
        .contiguous()?
        .index_select(&group_index, 0)?;
    let predictor_hidden = Tensor::cat(
        &[
            &last_prompt,
            &completion_hidden.narrow(1, 0, completion_len - 1)?,
        ],
        1,
    )?;
    token_logprobs(
        model,
        &predictor_hidden,
        batch.completion_ids,
        batch.completion_mask,
        temperature,
        with_entropy,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Gradients of `sum(op(hidden, weight) * upstream)` for hidden and weight, with the
    /// forward's logits handed to the backward or recomputed there.
    fn gradients(keep_logits: bool) -> (Tensor, Tensor) {
        let device = Device::Cpu;
        let (rows, width, vocab, temperature) = (6, 8, 11, 0.7);
        // Deterministic inputs, the same for both calls.
        let table = |n: usize, m: usize, phase: f64| -> Var {
            let t = Tensor::arange(0f32, (n * m) as f32, &device).unwrap();
            let t = (t + phase).unwrap().sin().unwrap().reshape((n, m)).unwrap();
            Var::from_tensor(&t).unwrap()
        };
        let hidden = table(rows, width, 0.0);
        let weight = table(vocab, width, 0.3);
        let targets = Tensor::new(&[[3u32], [0], [10], [5], [5], [1]], &device).unwrap();
        let logits = hidden.matmul(&weight.t().unwrap()).unwrap().detach();
        let scaled = (&logits / temperature).unwrap();
        let log_probs = candle_nn::ops::log_softmax(&scaled, D::Minus1).unwrap();
        let values = log_probs
            .gather(&targets, 1)
            .unwrap()
            .reshape(rows)
            .unwrap()
            .detach();
        // logsumexp(z) = z - log_softmax(z), at any column.
        let normalizers = (scaled.narrow(1, 0, 1).unwrap() - log_probs.narrow(1, 0, 1).unwrap())
            .unwrap()
            .reshape(rows)
            .unwrap();
        let op = LmHeadLogprob {
            targets,
            normalizers,
            temperature,
            compute_dtype: DType::F32,
            logits: keep_logits.then(|| vec![logits.clone()]),
        };
        let out = hidden.as_tensor().apply_op3(&weight, &values, op).unwrap();
        let upstream = Tensor::new(&[1f32, -2.0, 0.5, 3.0, -1.0, 0.25], &device).unwrap();
        let grads = (out * upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (
            grads.get(hidden.as_tensor()).unwrap().clone(),
            grads.get(weight.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn kept_and_recomputed_logits_give_the_same_gradients() {
        let (kept_hidden, kept_weight) = gradients(true);
        let (hidden, weight) = gradients(false);
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&kept_hidden, &hidden) < 1e-5);
        assert!(diff(&kept_weight, &weight) < 1e-5);
        let magnitude: f32 = weight
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(magnitude > 0.1, "the gradients are not trivially zero");
    }
}
