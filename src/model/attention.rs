//! Scaled dot-product attention with grouped key/value heads as one differentiable CPU node
//! ([`Attention`]): the scores, the masked softmax and the weighted sum of the values in one
//! forward pass, and one backward pass that gives the query, key and value gradients. Every
//! product is a gemm call on its operands where they lie (keys and values read in place from a
//! KV cache, transposes as strides), writing outputs that are never zero-filled first.
//!
//! Why: composed of candle ops (two batched matmuls around the attention softmax), attention's
//! largest tensors, the `[rows, keys]` scores and probabilities, cost a zero-filled matmul
//! output each, and in candle's backward a zero-filled gradient buffer and an add per node
//! (see [`super::fused`]). Here the probabilities are the only `[rows, keys]` tensor kept for
//! the backward, as the composed graph kept them too. The composed form stays the reference
//! (`ops::attention_composite`, also what CUDA and other dtypes run); `tests/ops.rs` checks
//! values and gradients against it.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fused::{
    masked_softmax_in_place, product, softmax_gradient_in_place, written_f32s, Matrix,
    PARALLEL_ELEMENTS,
};

/// Each block's products run on one thread (the blocks spread over the threads instead).
const SERIAL: gemm::Parallelism = gemm::Parallelism::None;

/// `softmax(q kᵀ * scale + bias) v` per batch item and key/value head: `q` `[b, kv_heads, rows,
/// d]` (the query heads sharing a key/value head grouped, `rows = heads_per_kv * t`), `k` and
/// `v` `[b, kv_heads, s, d]` (any strides, the last dimension contiguous), the f32 `bias`
/// `[b, 1, t, s]` added to each group of `t` rows (it gets no gradient). Output `[b, kv_heads,
/// rows, d]`. CPU, f32.
pub struct Attention {
    bias: Tensor,
    scale: f32,
    /// The forward's probabilities `[b, kv_heads, rows, s]`, for the backward.
    probs: OnceLock<Vec<f32>>,
}

impl Attention {
    pub fn new(bias: &Tensor, scale: f32) -> Result<Self> {
        Ok(Attention {
            bias: bias.contiguous()?,
            scale,
            probs: OnceLock::new(),
        })
    }
}

/// The dimensions of one attention call, checked.
#[derive(Clone, Copy)]
struct Dims {
    /// Batch items times key/value heads: the independent blocks.
    blocks: usize,
    /// Query rows per block (`heads_per_kv * t`).
    rows: usize,
    /// Queries per sequence: row `r` of a block takes bias row `r % t`.
    t: usize,
    /// Keys per block.
    s: usize,
    /// Head dimension.
    d: usize,
    kv_heads: usize,
}

impl Dims {
    fn of(q: &Layout, k: &Layout, v: &Layout, bias: &[usize]) -> Result<Self> {
        let (b, kv_heads, rows, d) = q.shape().dims4()?;
        let (kb, kh, s, kd) = k.shape().dims4()?;
        let &[bias_b, 1, t, bias_s] = bias else {
            bail!("fused-attention: bias {bias:?} is not [b, 1, t, s]");
        };
        if (kb, kh, kd) != (b, kv_heads, d)
            || v.dims() != k.dims()
            || (bias_b, bias_s) != (b, s)
            || t == 0
            || rows % t != 0
        {
            bail!(
                "fused-attention: q {:?}, k {:?}, v {:?} and bias {bias:?} do not agree",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Dims {
            blocks: b * kv_heads,
            rows,
            t,
            s,
            d,
            kv_heads,
        })
    }

    /// Whether the blocks are worth spreading over the threads.
    fn parallel(&self) -> bool {
        self.blocks > 1 && self.blocks * self.rows * self.s.max(self.d) >= PARALLEL_ELEMENTS
    }
}

/// A `[b, heads, rows, cols]` f32 tensor read in place, one `rows x cols` matrix per
/// (item, head) block.
struct Blocks<'a> {
    data: &'a [f32],
    heads: usize,
    rows: usize,
    cols: usize,
    strides: [usize; 3],
}

impl<'a> Blocks<'a> {
    fn of(storage: &'a CpuStorage, layout: &Layout, name: &str) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            bail!("fused-attention: {name} must be f32");
        };
        let (_, heads, rows, cols) = layout.shape().dims4()?;
        let &[item, head, row, col] = layout.stride() else {
            bail!("fused-attention: {name} is not 4-dimensional");
        };
        if col != 1 && cols > 1 {
            bail!("fused-attention: the last dimension of {name} must be contiguous");
        }
        Ok(Blocks {
            data: &data[layout.start_offset()..],
            heads,
            rows,
            cols,
            strides: [item, head, row],
        })
    }

    /// Block `index` (item-major).
    fn block(&self, index: usize) -> Matrix<'a> {
        let (item, head) = (index / self.heads, index % self.heads);
        let start = item * self.strides[0] + head * self.strides[1];
        Matrix::new(
            &self.data[start.min(self.data.len())..],
            self.rows,
            self.cols,
            self.strides[2],
        )
    }
}

/// Runs `work` on every item (one per block), on the threads when `parallel`.
fn for_each_block<T: Send>(items: Vec<T>, parallel: bool, work: impl Fn(T) + Sync + Send) {
    match parallel {
        false => items.into_iter().for_each(work),
        true => items.into_par_iter().for_each(work),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(q_layout, k_layout, v_layout, self.bias.dims())?;
        let Dims { rows, t, s, d, .. } = dims;
        let (q, k, v) = (
            Blocks::of(q, q_layout, "q")?,
            Blocks::of(k, k_layout, "k")?,
            Blocks::of(v, v_layout, "v")?,
        );
        let (bias, bias_layout) = self.bias.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(bias)) = &*bias else {
            bail!("fused-attention: the bias must be f32 on the CPU");
        };
        let bias = &bias[bias_layout.start_offset()..][..dims.blocks / dims.kv_heads * t * s];
        // SAFETY: `product` writes every block of both outputs whole.
        let [probs, out] = unsafe {
            written_f32s(
                [dims.blocks * rows * s, dims.blocks * rows * d],
                |[probs, out]| {
                    let blocks: Vec<_> = probs
                        .chunks_mut(rows * s)
                        .zip(out.chunks_mut(rows * d))
                        .enumerate()
                        .collect();
                    for_each_block(blocks, dims.parallel(), |(index, (probs, out))| {
                        let scores =
                            product(probs, q.block(index), false, k.block(index), true, SERIAL);
                        let bias = &bias[index / dims.kv_heads * t * s..][..t * s];
                        for (row, scores) in scores.chunks_mut(s).enumerate() {
                            masked_softmax_in_place(scores, &bias[row % t * s..][..s], self.scale);
                        }
                        product(
                            out,
                            Matrix::dense(scores, rows, s),
                            false,
                            v.block(index),
                            false,
                            SERIAL,
                        );
                    });
                },
            )
        };
        // Kept only while the node is in a graph: without one candle drops the op right away.
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.get() else {
            bail!("fused-attention: backward without the forward's probabilities");
        };
        let dims = Dims::of(q.layout(), k.layout(), v.layout(), self.bias.dims())?;
        let grad_out = grad_out.contiguous()?;
        let tensors = [q, k, v, &grad_out];
        let guards = tensors.map(|t| t.storage_and_layout());
        let names = ["q", "k", "v", "the output gradient"];
        let [q_blocks, k_blocks, v_blocks, grad_blocks] = [0, 1, 2, 3].map(|i| {
            let (storage, layout) = &guards[i];
            match &**storage {
                Storage::Cpu(storage) => Blocks::of(storage, layout, names[i]),
                _ => bail!("fused-attention: {} must be on the CPU", names[i]),
            }
        });
        let [grad_q, grad_k, grad_v] = attention_gradients(
            dims,
            self.scale,
            probs,
            [&q_blocks?, &k_blocks?, &v_blocks?, &grad_blocks?],
        );
        let tensor = |data, like: &Tensor| Tensor::from_vec(data, like.shape(), like.device());
        Ok((
            Some(tensor(grad_q, q)?),
            Some(tensor(grad_k, k)?),
            Some(tensor(grad_v, v)?),
        ))
    }
}

/// `[dq, dk, dv]` of one attention call from `[q, k, v, d_out]`, each contiguous in its input's
/// shape: per block, with `P` the probabilities and `dO` the output gradient, `dV = Pᵀ dO`,
/// `dP = dO Vᵀ`, `dS = scale * P ∘ (dP - rowsum(P ∘ dP))`, `dQ = dS K`, `dK = dSᵀ Q`.
fn attention_gradients(
    dims: Dims,
    scale: f32,
    probs: &[f32],
    [q, k, v, grad_out]: [&Blocks; 4],
) -> [Vec<f32>; 3] {
    let Dims { rows, s, d, .. } = dims;
    let lens = [
        dims.blocks * rows * d,
        dims.blocks * s * d,
        dims.blocks * s * d,
    ];
    // SAFETY: `product` writes every block of the three outputs whole.
    unsafe {
        written_f32s(lens, |[grad_q, grad_k, grad_v]| {
            let blocks: Vec<_> = grad_q
                .chunks_mut(rows * d)
                .zip(grad_k.chunks_mut(s * d))
                .zip(grad_v.chunks_mut(s * d))
                .enumerate()
                .collect();
            for_each_block(blocks, dims.parallel(), |(index, ((dq, dk), dv))| {
                let block_probs = &probs[index * rows * s..][..rows * s];
                let p = Matrix::dense(block_probs, rows, s);
                let d_out = grad_out.block(index);
                product(dv, p, true, d_out, false, SERIAL);
                let mut scratch = Vec::with_capacity(rows * s);
                let d_scores = product(
                    &mut scratch.spare_capacity_mut()[..rows * s],
                    d_out,
                    false,
                    v.block(index),
                    true,
                    SERIAL,
                );
                for (d_scores, p) in d_scores.chunks_mut(s).zip(block_probs.chunks(s)) {
                    softmax_gradient_in_place(d_scores, p, scale);
                }
                let d_scores = Matrix::dense(d_scores, rows, s);
                product(dq, d_scores, false, k.block(index), false, SERIAL);
                product(dk, d_scores, true, q.block(index), false, SERIAL);
            });
        })
    }
}
