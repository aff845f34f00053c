//! Fused CPU kernels of the forward (linear layers, RMSNorm, rotary embeddings, softmax, the
//! attention softmax, SwiGLU, splitting and merging heads), each a candle custom op WITH a
//! backward pass that is itself one kernel or one matmul per input, so they are fast and still
//! differentiable; [`FewRowsMatmul`], the forward-only product of decoding; and the per-token
//! log-probs with their gradient ([`LogSoftmaxGather`], [`LogprobGrad`]).
//!
//! RMSNorm, rotary embeddings, the softmaxes (with their backward ops) and the log-prob ops also
//! run on CUDA, in f32 or bf16 storage: their `cuda_fwd` launches the kernels of
//! `kernels/fused.cu` as [`super::kernels`] describes.
//!
//! Why fused: candle's backward gives every graph node a zero-filled gradient buffer and adds the
//! node's gradient into it, views (reshape, transpose) included, so a layer composed of
//! elementary ops moves many times the memory its maths needs. `ops` uses these kernels for f32
//! tensors on the CPU and falls back to the composite (multi-op) forms elsewhere; `tests/ops.rs`
//! checks values and gradients against those forms. Element-wise kernels split their rows over
//! the threads (rayon) above 32 K elements; every output element is computed
//! by one thread, so results do not depend on the thread count. Outputs are written into
//! uninitialised memory rather than zero-filled first ([`map_rows`], [`write_all`]), and the
//! linear layer's product calls gemm, the kernel behind candle's matmul, directly for the same
//! reason ([`matmul_transposed`]): with freed memory reused, zeroing is a pass of its own.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use std::mem::MaybeUninit;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};

#[cfg(feature = "cuda")]
use super::kernels;
use super::simd::{self, LANES};

/// The f32 slice of a contiguous CPU tensor argument.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 tensors are supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// Runs the CUDA kernels of `plan` on `inputs` (all of one dtype, f32 or bf16, which the output
/// gets), the result shaped `shape`.
#[cfg(feature = "cuda")]
fn run_cuda(
    plan: Result<kernels::Plan>,
    inputs: &[(&CudaStorage, &Layout)],
    shape: Shape,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(storage, _)| storage.dtype() != dtype) {
        bail!("{op}: the inputs must have one dtype");
    }
    Ok((kernels::run(&plan?, dtype, inputs)?, shape))
}

/// `(rows, width)` of RMSNorm's `x` `[.., width]` and `weight` `[width]`.
fn rms_norm_dims(x: &Layout, weight: &Layout) -> Result<(usize, usize)> {
    let width = weight.shape().elem_count();
    if x.dims().last() != Some(&width) || width == 0 {
        bail!("fused-rms-norm: x {:?} vs weight [{width}]", x.dims());
    }
    Ok((x.shape().elem_count() / width, width))
}

/// The u32 slice of a contiguous CPU tensor argument.
fn contiguous_u32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else {
        bail!("{op}: the targets must be u32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the targets must be contiguous"),
    }
}

/// An error naming both inputs of `op` unless they have the same dimensions.
fn same_dims(
    op: &str,
    (a, a_layout): (&str, &Layout),
    (b, b_layout): (&str, &Layout),
) -> Result<()> {
    if a_layout.dims() != b_layout.dims() {
        bail!(
            "{op}: {a} {:?} vs {b} {:?}",
            a_layout.dims(),
            b_layout.dims()
        );
    }
    Ok(())
}

/// `(rows, width)` of a tensor softmaxed over its last dimension.
fn rows_of(layout: &Layout) -> (usize, usize) {
    let width = layout.dims().last().copied().unwrap_or(1).max(1);
    (layout.shape().elem_count() / width, width)
}

/// `weight * x / sqrt(mean(x^2) + eps)` over the last dimension.
pub struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, width) = rms_norm_dims(x_layout, weight_layout)?;
        let x_data = contiguous_f32(x, x_layout, self.name())?;
        let weight = contiguous_f32(weight, weight_layout, self.name())?;
        let out = map_rows(x_data, width, |out, _, row| {
            let scale = inverse_rms(row, self.eps);
            write_all(out, row.iter().zip(weight).map(|(v, w)| w * (v * scale)))
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, width) = rms_norm_dims(x_layout, weight_layout)?;
        run_cuda(
            kernels::rms_norm(rows, width, self.eps),
            &[(x, x_layout), (weight, weight_layout)],
            x_layout.shape().clone(),
            self.name(),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass over the rows (see `RmsNormBackward`); the weight's gradient is its last row.
        let x = x.contiguous()?;
        let width = weight.elem_count();
        let rows = x.elem_count() / width;
        let both = x.apply_op3_no_bwd(
            &weight.contiguous()?,
            &grad_out.contiguous()?,
            &RmsNormBackward { eps: self.eps },
        )?;
        let grad_x = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        // A frozen weight (a LoRA model's norms) gets no gradient.
        let grad_weight = match weight.track_op() {
            true => Some(both.narrow(0, rows, 1)?.reshape(width)?),
            false => None,
        };
        Ok((Some(grad_x), grad_weight))
    }
}

/// `1 / sqrt(mean(row^2) + eps)`.
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

/// A new output of `input.len()` f32s, row by row: `f(out_row, index, in_row)` gets each output
/// row of width `width` uninitialised and returns it written (through [`write_all`]), in
/// parallel when there are many rows. The output is never zero-filled first: that would be a
/// pass of its own over memory the allocator reuses (see `memory::reuse_freed_memory`).
fn map_rows(
    input: &[f32],
    width: usize,
    f: impl for<'a> Fn(&'a mut [MaybeUninit<f32>], usize, &[f32]) -> &'a mut [f32] + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let width = width.max(1);
    // Tasks of about PARALLEL_ELEMENTS each: many short rows, or one long one.
    let rows_per_task = (PARALLEL_ELEMENTS / width).max(1);
    let map_row = |out: &mut [MaybeUninit<f32>], index: usize, input: &[f32]| {
        let (start, len) = (out.as_ptr().cast::<f32>(), out.len());
        let written = f(out, index, input);
        assert!(
            std::ptr::eq(written.as_ptr(), start) && written.len() == len,
            "map_rows: a row must come back whole"
        );
    };
    // SAFETY: the rows cover the output, and `map_row` checks that each came back whole, as
    // a `&mut [f32]`, which safe code makes of uninitialised slots only by writing them.
    unsafe {
        written_f32(input.len(), |out| {
            if input.len() < PARALLEL_ELEMENTS {
                out.chunks_mut(width)
                    .zip(input.chunks(width))
                    .enumerate()
                    .for_each(|(index, (out, input))| map_row(out, index, input));
                return;
            }
            out.par_chunks_mut(width * rows_per_task)
                .zip(input.par_chunks(width * rows_per_task))
                .enumerate()
                .for_each(|(task, (out, input))| {
                    out.chunks_mut(width)
                        .zip(input.chunks(width))
                        .enumerate()
                        .for_each(|(row, (out, input))| {
                            map_row(out, task * rows_per_task + row, input)
                        });
                });
        })
    }
}

/// Writes `values` into `slots`, which they must fill exactly (else a panic), and returns the
/// slots as the initialised values.
fn write_all(slots: &mut [MaybeUninit<f32>], values: impl IntoIterator<Item = f32>) -> &mut [f32] {
    let mut written = 0;
    for (slot, value) in slots.iter_mut().zip(values) {
        slot.write(value);
        written += 1;
    }
    assert_eq!(written, slots.len(), "write_all: too few values");
    // SAFETY: every slot was written just above; f32 and MaybeUninit<f32> share their layout.
    unsafe { &mut *(slots as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `len` f32s that `fill` writes, without zero-filling them first (see [`map_rows`]). In debug
/// builds they start as NaN, so that one left unwritten shows in the tests.
///
/// # Safety
/// `fill` must write every element of the slice it gets.
pub(super) unsafe fn written_f32(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    // SAFETY: the caller's promise.
    let [out] = unsafe { written_f32s([len], |[slots]| fill(slots)) };
    out
}

/// [`written_f32`] for several outputs at once, of lengths `lens`.
///
/// # Safety
/// `fill` must write every element of the slices it gets.
pub(super) unsafe fn written_f32s<const N: usize>(
    lens: [usize; N],
    fill: impl FnOnce([&mut [MaybeUninit<f32>]; N]),
) -> [Vec<f32>; N] {
    let mut outs = lens.map(Vec::with_capacity);
    let mut lengths = lens.iter();
    fill(outs.each_mut().map(|out| {
        let len = *lengths.next().expect("one length per output");
        let slots = &mut out.spare_capacity_mut()[..len];
        if cfg!(debug_assertions) {
            slots.fill(MaybeUninit::new(f32::NAN));
        }
        slots
    }));
    for (out, &len) in outs.iter_mut().zip(&lens) {
        // SAFETY: `fill` wrote all `len` elements (the caller's promise).
        unsafe { out.set_len(len) };
    }
    outs
}

/// `row`, already shifted by its maximum, becomes its softmax: `e^v / Σ e^v`.
fn normalize_exp(row: &mut [f32]) {
    simd::exp_in_place(row);
    let inverse = 1.0 / simd::sum(row);
    row.iter_mut().for_each(|o| *o *= inverse);
}

/// One row of the attention softmax in place: `row * scale + bias`, shifted by its maximum, to
/// its softmax (as [`AttentionSoftmax`]).
pub(super) fn masked_softmax_in_place(row: &mut [f32], bias: &[f32], scale: f32) {
    row.iter_mut()
        .zip(bias)
        .for_each(|(x, b)| *x = *x * scale + b);
    let max = simd::max(row);
    row.iter_mut().for_each(|o| *o -= max);
    normalize_exp(row);
}

/// One row of the softmax gradient in place: `g` becomes `scale * y * (g - sum(g * y))` (as
/// [`SoftmaxBackward`]).
pub(super) fn softmax_gradient_in_place(g: &mut [f32], y: &[f32], scale: f32) {
    let dot = simd::dot(g, y);
    g.iter_mut()
        .zip(y)
        .for_each(|(g, y)| *g = scale * y * (*g - dot));
}

/// Tensors smaller than this run element-wise kernels on one thread.
pub(super) const PARALLEL_ELEMENTS: usize = 1 << 15;

/// The gradients of [`RmsNorm`] in one pass, as `[rows + 1, width]`: rows `0..rows` are
/// `dx = r * (g*w - n * mean(g*w*n))` (with `r = 1/sqrt(mean(x^2) + eps)`, `n = x * r`), the
/// last row `dw = sum over rows of g * n`. Inputs `(x, weight, grad_out)`, contiguous f32.
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let weight = contiguous_f32(weight, weight_layout, self.name())?;
        let grad = contiguous_f32(grad, grad_layout, self.name())?;
        let width = weight.len();
        let rows = x.len() / width;
        let mut out = vec![0f32; x.len() + width];
        let (grad_x, grad_weight) = out.split_at_mut(x.len());
        for ((dx, x), g) in grad_x
            .chunks_exact_mut(width)
            .zip(x.chunks_exact(width))
            .zip(grad.chunks_exact(width))
        {
            let r = inverse_rms(x, self.eps);
            let projection = x
                .iter()
                .zip(g)
                .zip(weight)
                .map(|((x, g), w)| g * w * x * r)
                .sum::<f32>()
                / width as f32;
            for ((((dx, x), g), w), dw) in dx
                .iter_mut()
                .zip(x)
                .zip(g)
                .zip(weight)
                .zip(grad_weight.iter_mut())
            {
                let n = x * r;
                *dx = r * (g * w - n * projection);
                *dw += g * n;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, width) = rms_norm_dims(x_layout, weight_layout)?;
        if grad_layout.dims() != x_layout.dims() {
            bail!(
                "{}: grad {:?} vs x {:?}",
                self.name(),
                grad_layout.dims(),
                x_layout.dims()
            );
        }
        run_cuda(
            kernels::rms_norm_backward(rows, width, self.eps),
            &[(x, x_layout), (weight, weight_layout), (grad, grad_layout)],
            Shape::from((rows + 1, width)),
            self.name(),
        )
    }
}

/// Rotary embedding `x * cos + rotate_half(x) * sin` for `x` `[b, heads, t, d]` and tables
/// `[b, 1, t, d]` (see `ops::rope_tables`); with `adjoint`, the gradient of that map applied to
/// `x`: `x * cos + rotate_half^T(x * sin)`, where the adjoint of `u -> cat(-u2, u1)` is
/// `v -> cat(v2, -v1)` (the backward uses it).
pub struct Rope {
    pub adjoint: bool,
}

impl Rope {
    fn check(x: &Layout, table: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (b, heads, t, d) = x.shape().dims4()?;
        if table.dims() != [b, 1, t, d] || d % 2 != 0 {
            bail!("fused-rope: x {:?} vs table {:?}", x.dims(), table.dims());
        }
        Ok((b, heads, t, d))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        rope_kernel(x, x_layout, cos, cos_layout, sin, sin_layout, self.adjoint)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        cos: &CudaStorage,
        cos_layout: &Layout,
        sin: &CudaStorage,
        sin_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, heads, t, d) = Rope::check(x_layout, cos_layout)?;
        Rope::check(x_layout, sin_layout)?;
        run_cuda(
            kernels::rope(b, heads, t, d, self.adjoint),
            &[(x, x_layout), (cos, cos_layout), (sin, sin_layout)],
            x_layout.shape().clone(),
            self.name(),
        )
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        let grad_x =
            grad_out
                .contiguous()?
                .apply_op3_no_bwd(&cos, &sin, &Rope { adjoint: true })?;
        Ok((Some(grad_x), None, None))
    }
}

/// Rotary embedding of `x` `[b, heads, t, d]` with tables `[b, 1, t, d]`, or (`adjoint`) the
/// gradient of that map applied to `x`.
fn rope_kernel(
    x: &CpuStorage,
    x_layout: &Layout,
    cos: &CpuStorage,
    cos_layout: &Layout,
    sin: &CpuStorage,
    sin_layout: &Layout,
    adjoint: bool,
) -> Result<(CpuStorage, Shape)> {
    use rayon::prelude::*;
    let (_, heads, t, d) = Rope::check(x_layout, cos_layout)?;
    Rope::check(x_layout, sin_layout)?;
    let x = contiguous_f32(x, x_layout, "fused-rope")?;
    let cos = contiguous_f32(cos, cos_layout, "fused-rope")?;
    let sin = contiguous_f32(sin, sin_layout, "fused-rope")?;
    let half = d / 2;
    let mut out = vec![0f32; x.len()];
    // One task per (batch, head): `t` positions of `d` values.
    out.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .enumerate()
        .with_min_len((PARALLEL_ELEMENTS / (t * d).max(1)).max(1))
        .for_each(|(index, (out, x))| {
            let batch = index / heads;
            for pos in 0..t {
                let at = pos * d;
                let table_at = (batch * t + pos) * d;
                let (xr, c, s) = (&x[at..at + d], &cos[table_at..], &sin[table_at..]);
                let o = &mut out[at..at + d];
                for i in 0..half {
                    if adjoint {
                        o[i] = xr[i] * c[i] + xr[i + half] * s[i + half];
                        o[i + half] = xr[i + half] * c[i + half] - xr[i] * s[i];
                    } else {
                        o[i] = xr[i] * c[i] - xr[i + half] * s[i];
                        o[i + half] = xr[i + half] * c[i + half] + xr[i] * s[i + half];
                    }
                }
            }
        });
    Ok((CpuStorage::F32(out), x_layout.shape().clone()))
}

/// Softmax over the last dimension, computed in f32 with the row maximum subtracted.
pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(x, layout, self.name())?;
        let (_, width) = rows_of(layout);
        let out = map_rows(data, width, |out, _, row| {
            let max = simd::max(row);
            let out = write_all(out, row.iter().map(|v| v - max));
            normalize_exp(out);
            out
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, width) = rows_of(layout);
        run_cuda(
            kernels::softmax(rows, width),
            &[(x, layout)],
            layout.shape().clone(),
            self.name(),
        )
    }

    fn bwd(&self, _x: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_out
            .contiguous()?
            .apply_op2_no_bwd(&out.contiguous()?, &SoftmaxBackward { scale: 1.0 })?;
        Ok(Some(grad))
    }
}

/// The gradient of [`Softmax`] (scaled by `scale`, for [`AttentionSoftmax`]),
/// `dx = scale * y * (g - sum(g * y))` per row, as a custom op over `(grad_out, y)`.
pub struct SoftmaxBackward {
    pub scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dims(self.name(), ("grad", grad_layout), ("y", y_layout))?;
        let grad = contiguous_f32(grad, grad_layout, self.name())?;
        let y = contiguous_f32(y, y_layout, self.name())?;
        let (_, width) = rows_of(y_layout);
        let scale = self.scale;
        let out = map_rows(grad, width, |out, row, g| {
            let out = write_all(out, g.iter().copied());
            softmax_gradient_in_place(out, &y[row * width..][..g.len()], scale);
            out
        });
        Ok((CpuStorage::F32(out), y_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        grad: &CudaStorage,
        grad_layout: &Layout,
        y: &CudaStorage,
        y_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        same_dims(self.name(), ("grad", grad_layout), ("y", y_layout))?;
        let (rows, width) = rows_of(y_layout);
        run_cuda(
            kernels::softmax_backward(rows, width, self.scale),
            &[(grad, grad_layout), (y, y_layout)],
            y_layout.shape().clone(),
            self.name(),
        )
    }
}

/// The attention softmax, `softmax(scores * scale + bias)` over the last dimension, as one
/// node. `scores` `[b, rows, s]` (any number of middle dimensions, flattened to `rows`) holds,
/// for each batch item, blocks of `t` query rows (one block per head), and `bias` `[b, 1, t, s]`
/// is added to every block: row `r` of item `i` gets `bias[i, 0, r % t]`. So the scores of all
/// heads, grouped as the grouped-query matmul leaves them, need no reshaping. The bias gets no
/// gradient (it comes from the mask).
pub struct AttentionSoftmax {
    pub scale: f32,
}

impl AttentionSoftmax {
    /// `(batch, rows per item, t, s)` of `scores` and `bias`, checked.
    fn dims(scores: &Layout, bias: &Layout) -> Result<(usize, usize, usize, usize)> {
        let dims = scores.dims();
        let (bias_batch, _, t, s) = bias.shape().dims4()?;
        let batch = dims.first().copied().unwrap_or(0);
        let rows = scores.shape().elem_count() / (batch * s).max(1);
        if dims.last() != Some(&s) || bias_batch != batch || t == 0 || rows % t != 0 {
            bail!(
                "fused-attention-softmax: scores {dims:?} vs bias {:?}",
                bias.dims()
            );
        }
        Ok((batch, rows, t, s))
    }
}

impl CustomOp2 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(
        &self,
        scores: &CpuStorage,
        scores_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, rows, t, s) = AttentionSoftmax::dims(scores_layout, bias_layout)?;
        let scores = contiguous_f32(scores, scores_layout, self.name())?;
        let bias = contiguous_f32(bias, bias_layout, self.name())?;
        let scale = self.scale;
        let out = map_rows(scores, s, |out, index, row| {
            let (item, query) = (index / rows, index % rows % t);
            let out = write_all(out, row.iter().copied());
            masked_softmax_in_place(out, &bias[(item * t + query) * s..][..s], scale);
            out
        });
        Ok((CpuStorage::F32(out), scores_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        scores: &CudaStorage,
        scores_layout: &Layout,
        bias: &CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, rows, t, s) = AttentionSoftmax::dims(scores_layout, bias_layout)?;
        run_cuda(
            kernels::attention_softmax(batch, rows, t, s, self.scale),
            &[(scores, scores_layout), (bias, bias_layout)],
            scores_layout.shape().clone(),
            self.name(),
        )
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_out
            .contiguous()?
            .apply_op2_no_bwd(&out.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(grad), None))
    }
}

/// SwiGLU, `silu(gate) * up` with `silu(x) = x * sigmoid(x)`, as one node whose backward is one
/// pass (see [`SwigluBackward`]). Inputs `(gate, up)` of the same shape.
pub struct Swiglu;

/// `sigmoid(x)` of each of `x` written into `out` (of the same length).
fn sigmoid_into<'a>(x: &[f32], out: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
    let out = write_all(out, x.iter().map(|x| -x));
    simd::exp_in_place(out);
    out.iter_mut().for_each(|o| *o = 1.0 / (1.0 + *o));
    out
}

/// Elements per block of the element-wise kernels that need a scratch row (on the stack).
const BLOCK: usize = 512;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dims(self.name(), ("gate", gate_layout), ("up", up_layout))?;
        let gate = contiguous_f32(gate, gate_layout, self.name())?;
        let up = contiguous_f32(up, up_layout, self.name())?;
        let width = gate_layout.dims().last().copied().unwrap_or(1);
        let out = map_rows(gate, width, |out, row, gate| {
            let up = &up[row * width..][..gate.len()];
            // The row holds sigmoid(gate), then the output: up * gate * sigmoid(gate).
            let out = sigmoid_into(gate, out);
            out.iter_mut()
                .zip(gate)
                .zip(up)
                .for_each(|((o, g), u)| *o = u * (g * *o));
            out
        });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &grad_out.contiguous()?,
            &SwigluBackward,
        )?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// The gradients of [`Swiglu`] in one pass over `(gate, up, grad_out)`, stacked as
/// `[2, ..]`: `d gate = g * up * s * (1 + gate * (1 - s))` with `s = sigmoid(gate)`, and
/// `d up = g * silu(gate)`.
struct SwigluBackward;

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let gate = contiguous_f32(gate, gate_layout, self.name())?;
        let up = contiguous_f32(up, up_layout, self.name())?;
        let grad = contiguous_f32(grad, grad_layout, self.name())?;
        let n = gate.len();
        if up.len() != n || grad.len() != n {
            bail!("{}: gate, up and grad differ in size", self.name());
        }
        const CHUNK: usize = 1 << 14;
        let fill = |out: &mut [MaybeUninit<f32>]| {
            let (grad_gate, grad_up) = out.split_at_mut(n);
            grad_gate
                .par_chunks_mut(CHUNK)
                .zip(grad_up.par_chunks_mut(CHUNK))
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(((dg, du), (gate, up)), g)| {
                    // The sigmoid goes into `dg`, which is then overwritten element by element.
                    let dg = sigmoid_into(gate, dg);
                    write_all(du, (0..gate.len()).map(|i| g[i] * (gate[i] * dg[i])));
                    for i in 0..gate.len() {
                        let s = dg[i];
                        dg[i] = g[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
                    }
                })
        };
        // SAFETY: the chunks cover both halves, and `write_all` writes each whole.
        let out = unsafe { written_f32(2 * n, fill) };
        let mut dims = vec![2];
        dims.extend_from_slice(gate_layout.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `x @ weight^T` for a few rows of `x` (decoding: one row per sequence), forward only.
///
/// A general matrix product packs the weight into blocks before multiplying, which for a handful
/// of rows costs as much as the product; here each weight row is streamed from memory once and
/// its dot products with every row of `x` (which stay in cache) are taken as it passes, split
/// over the threads by weight rows. `x` `[m, k]`, `weight` `[n, k]`, both contiguous f32;
/// returns `[m, n]`. Use it only where no gradient is needed (it has no backward).
pub struct FewRowsMatmul;

/// Rows of `x` up to which [`FewRowsMatmul`] beats the general product.
pub const FEW_ROWS: usize = 16;

/// Weight rows multiplied together, so each loaded piece of `x` serves several of them.
const WEIGHT_BLOCK: usize = 4;

impl CustomOp2 for FewRowsMatmul {
    fn name(&self) -> &'static str {
        "few-rows-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (m, k) = x_layout.shape().dims2()?;
        let (n, weight_k) = weight_layout.shape().dims2()?;
        if k != weight_k {
            bail!("{}: x [{m}, {k}] vs weight [{n}, {weight_k}]", self.name());
        }
        let x = contiguous_f32(x, x_layout, self.name())?;
        let weight = contiguous_f32(weight, weight_layout, self.name())?;
        // Each task owns a contiguous run of weight rows, i.e. of output columns; a small
        // weight is one task.
        let tasks = if n * k < SMALL_WEIGHT {
            1
        } else {
            rayon::current_num_threads().max(1) * 8
        };
        let rows_per_task = n
            .div_ceil(tasks)
            .next_multiple_of(WEIGHT_BLOCK)
            .max(WEIGHT_BLOCK);
        let mut out = Vec::<f32>::with_capacity(m * n);
        let columns = OutputColumns {
            out: out.as_mut_ptr(),
            m,
            n,
        };
        let run = |(task, weight): (usize, &[f32])| {
            // SAFETY: the task's columns start at its first weight row, and no other task has
            // them.
            unsafe { multiply_rows(x, k, weight, task * rows_per_task, columns) }
        };
        if tasks == 1 {
            run((0, weight));
        } else {
            weight
                .par_chunks(rows_per_task * k)
                .enumerate()
                .for_each(run);
        }
        // SAFETY: the tasks wrote every element: each its weight rows' columns, all rows of x.
        unsafe { out.set_len(m * n) };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Weights smaller than this (in elements) are multiplied on one thread.
const SMALL_WEIGHT: usize = 1 << 17;

/// The `[m, n]` output of [`FewRowsMatmul`], written by tasks that each own a range of its
/// columns, so that no two write the same element.
#[derive(Clone, Copy)]
struct OutputColumns {
    out: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: tasks write disjoint columns (see `OutputColumns::set`).
unsafe impl Send for OutputColumns {}
unsafe impl Sync for OutputColumns {}

impl OutputColumns {
    /// `out[i, j] = value`.
    ///
    /// # Safety
    /// `i < m`, `j < n`, and no other thread writes column `j` meanwhile.
    #[inline(always)]
    unsafe fn set(self, i: usize, j: usize, value: f32) {
        debug_assert!(i < self.m && j < self.n);
        *self.out.add(i * self.n + j) = value;
    }
}

/// `out[i, first + j] = weight[j] . x[i]` for the weight rows `weight` (`[rows, k]`) and every
/// row `i` of `x` (`[out.m, k]`).
///
/// # Safety
/// `first + rows <= out.n`, and no other thread writes those columns meanwhile.
unsafe fn multiply_rows(x: &[f32], k: usize, weight: &[f32], first: usize, out: OutputColumns) {
    assert!(x.len() == out.m * k && weight.len() % k == 0 && first + weight.len() / k <= out.n);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return multiply_rows_avx2(x, k, weight, first, out);
    }
    multiply_rows_portable(x, k, weight, first, out)
}

/// [`multiply_rows_portable`] with 8-wide fused multiply-adds, in tiles of four weight rows by
/// [`X_BLOCK`] rows of `x`: twelve independent accumulators keep both FMA units busy (four
/// would wait on each other's latency), and each loaded vector serves three or four products.
/// Each dot product is still summed lane by lane in order, then across the lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn multiply_rows_avx2(
    x: &[f32],
    k: usize,
    weight: &[f32],
    first: usize,
    out: OutputColumns,
) {
    let (m, rows) = (out.m, weight.len() / k);
    let mut j = 0;
    while j < rows {
        let block = WEIGHT_BLOCK.min(rows - j);
        // A short last block repeats its last row; the repeats are computed but not stored.
        let w: [*const f32; WEIGHT_BLOCK] =
            std::array::from_fn(|r| weight.as_ptr().add((j + r.min(block - 1)) * k));
        // The next block's rows, fetched into the cache while the first tile runs: the weight
        // comes from memory, and the hardware prefetcher alone leaves the FMAs waiting for it.
        let next: [*const f32; WEIGHT_BLOCK] =
            std::array::from_fn(|r| weight.as_ptr().add((j + block + r).min(rows - 1) * k));
        let mut i = 0;
        while i < m {
            // 3 rows per tile, but 2 + 2 rather than 3 + 1 at the end: a one-row tile has only
            // four accumulators.
            let tile = match m - i {
                4 => 2,
                left => X_BLOCK.min(left),
            };
            let xp = x.as_ptr().add(i * k);
            let prefetch = (i == 0).then_some(&next);
            let at = (i, first + j);
            match tile {
                3 => dot_tile_avx2::<3>(xp, k, &w, prefetch, block, at, out),
                2 => dot_tile_avx2::<2>(xp, k, &w, prefetch, block, at, out),
                _ => dot_tile_avx2::<1>(xp, k, &w, prefetch, block, at, out),
            }
            i += tile;
        }
        j += block;
    }
}

/// Rows of `x` per tile of [`multiply_rows_avx2`].
#[cfg(target_arch = "x86_64")]
const X_BLOCK: usize = 3;

/// `out[i + s, j + r] = w[r] . x[s]` (`(i, j)` = `at`) for the `block` weight rows `w` and the
/// `XR` rows of `x` from `x` (row stride `k`), fetching the rows `prefetch` into the cache on the
/// way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_tile_avx2<const XR: usize>(
    x: *const f32,
    k: usize,
    w: &[*const f32; WEIGHT_BLOCK],
    prefetch: Option<&[*const f32; WEIGHT_BLOCK]>,
    block: usize,
    (i, j): (usize, usize),
    out: OutputColumns,
) {
    use std::arch::x86_64::*;
    let full = k / LANES * LANES;
    let mut acc = [[_mm256_setzero_ps(); XR]; WEIGHT_BLOCK];
    let mut c = 0;
    while c < full {
        if let Some(rows) = prefetch {
            // One touch per 64-byte cache line.
            if c % 16 == 0 {
                for row in rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(c).cast());
                }
            }
        }
        let mut xv = [_mm256_setzero_ps(); XR];
        for (s, xv) in xv.iter_mut().enumerate() {
            *xv = _mm256_loadu_ps(x.add(s * k + c));
        }
        for (acc, w) in acc.iter_mut().zip(w) {
            let wv = _mm256_loadu_ps(w.add(c));
            for (acc, xv) in acc.iter_mut().zip(&xv) {
                *acc = _mm256_fmadd_ps(*xv, wv, *acc);
            }
        }
        c += LANES;
    }
    for (r, (acc, w)) in acc.iter().zip(w).enumerate().take(block) {
        for (s, acc) in acc.iter().enumerate() {
            // The 8 lanes' sum, then the tail.
            let pair = _mm_add_ps(_mm256_castps256_ps128(*acc), _mm256_extractf128_ps(*acc, 1));
            let pair = _mm_hadd_ps(pair, pair);
            let mut dot = _mm_cvtss_f32(_mm_hadd_ps(pair, pair));
            for c in full..k {
                dot += *x.add(s * k + c) * *w.add(c);
            }
            out.set(i + s, j + r, dot);
        }
    }
}

/// [`multiply_rows`] on any CPU.
///
/// # Safety
/// As [`multiply_rows`].
#[inline(always)]
unsafe fn multiply_rows_portable(
    x: &[f32],
    k: usize,
    weight: &[f32],
    first: usize,
    out: OutputColumns,
) {
    let mut blocks = weight.chunks_exact(WEIGHT_BLOCK * k);
    for (b, block) in (&mut blocks).enumerate() {
        let rows: [&[f32]; WEIGHT_BLOCK] = std::array::from_fn(|r| &block[r * k..(r + 1) * k]);
        for (i, x_row) in x.chunks_exact(k).enumerate() {
            let dots = dot_block(x_row, &rows);
            for (r, dot) in dots.into_iter().enumerate() {
                out.set(i, first + b * WEIGHT_BLOCK + r, dot);
            }
        }
    }
    // The last weight rows, one at a time.
    let done = weight.len() / k / WEIGHT_BLOCK * WEIGHT_BLOCK;
    for (r, row) in blocks.remainder().chunks_exact(k).enumerate() {
        for (i, x_row) in x.chunks_exact(k).enumerate() {
            out.set(i, first + done + r, dot_block(x_row, &[row])[0]);
        }
    }
}

/// Dot products of `x` with each of `rows`, in [`LANES`] independent partial sums each.
#[inline(always)]
fn dot_block<const R: usize>(x: &[f32], rows: &[&[f32]; R]) -> [f32; R] {
    let mut acc = [[0f32; LANES]; R];
    let chunks = x.len() / LANES * LANES;
    for start in (0..chunks).step_by(LANES) {
        let xs: &[f32; LANES] = x[start..start + LANES].try_into().expect("a full chunk");
        for (acc, row) in acc.iter_mut().zip(rows) {
            let ws: &[f32; LANES] = row[start..start + LANES].try_into().expect("a full chunk");
            for lane in 0..LANES {
                acc[lane] += xs[lane] * ws[lane];
            }
        }
    }
    std::array::from_fn(|r| {
        let tail: f32 = (chunks..x.len()).map(|i| x[i] * rows[r][i]).sum();
        acc[r].iter().sum::<f32>() + tail
    })
}

/// `x @ weight^T (+ bias)` for `x` `[.., k]`, `weight` `[n, k]`, `bias` `[n]`, as ONE graph
/// node. Composed from candle ops the same product is a reshape, a transposed view, a matmul, a
/// broadcast, an add and a reshape, and candle's backward allocates, zero-fills and adds a
/// gradient for each of them; here the backward returns the three gradients directly, the
/// weight's already in its `[n, k]` layout.
pub struct Linear;

impl Linear {
    /// The product as `[m, n]` rows, bias added in place; `(m, n)` and the output shape.
    fn forward(
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = x_layout.dims();
        let k = *dims.last().unwrap_or(&0);
        let m = x_layout.shape().elem_count() / k.max(1);
        let (n, weight_k) = weight_layout.shape().dims2()?;
        if k != weight_k || !x_layout.is_contiguous() || !weight_layout.is_contiguous() {
            bail!("fused-linear: x {dims:?} vs weight [{n}, {weight_k}] (both must be contiguous)");
        }
        let x = contiguous_f32(x, x_layout, "fused-linear")?;
        let weight = contiguous_f32(weight, weight_layout, "fused-linear")?;
        let mut out = matmul_transposed(x, weight, m, n, k);
        if let Some((bias, bias_layout)) = bias {
            let bias = contiguous_f32(bias, bias_layout, "fused-linear")?;
            for row in out.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has a feature dimension") = n;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    /// Gradients of `x` (in its shape), `weight` `[n, k]` and, `with_bias`, the bias `[n]`.
    fn backward(
        x: &Tensor,
        weight: &Tensor,
        grad_out: &Tensor,
        with_bias: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (n, k) = weight.dims2()?;
        let m = x.elem_count() / k;
        let grad_rows = grad_out.reshape((m, n))?;
        let grad_x = grad_rows.matmul(&weight.detach())?.reshape(x.shape())?;
        let grad_weight = grad_rows.t()?.matmul(&x.detach().reshape((m, k))?)?;
        let grad_bias = with_bias.then(|| column_sums(&grad_rows)).transpose()?;
        Ok((grad_x, grad_weight, grad_bias))
    }
}

/// `x @ weight^T` as `[m, n]` rows, for `x` `[m, k]` and `weight` `[n, k]`: gemm called as
/// candle's matmul calls it (the same kernels and threads, so the same bits) but without
/// candle's zero-filling of the output ([`product`]).
fn matmul_transposed(x: &[f32], weight: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let parallelism = match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    };
    let (x, weight) = (Matrix::dense(x, m, k), Matrix::dense(weight, n, k));
    // SAFETY: `product` writes the whole output.
    unsafe {
        written_f32(m * n, |out| {
            product(out, x, false, weight, true, parallelism);
        })
    }
}

/// A `rows x cols` f32 matrix inside `data`, row `i` at `i * row_stride` (columns contiguous),
/// read in place.
#[derive(Clone, Copy)]
pub(super) struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> Matrix<'a> {
    pub(super) fn new(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        let needed = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * row_stride + cols
        };
        assert!(needed <= data.len(), "Matrix: the rows run past the data");
        Matrix {
            data,
            rows,
            cols,
            row_stride,
        }
    }

    /// A contiguous matrix.
    pub(super) fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Matrix::new(data, rows, cols, cols)
    }

    /// `(rows, cols, row stride, column stride)` of the matrix, or of its transpose.
    fn view(&self, transposed: bool) -> (usize, usize, isize, isize) {
        match transposed {
            false => (self.rows, self.cols, self.row_stride as isize, 1),
            true => (self.cols, self.rows, 1, self.row_stride as isize),
        }
    }
}

/// `out = op(a) · op(b)` into `out` (contiguous rows), with `op` the transpose where asked: one
/// gemm call (the kernel behind candle's CPU matmul) that writes every output element without
/// reading it, so `out` needs no zero-filling first.
pub(super) fn product<'o>(
    out: &'o mut [MaybeUninit<f32>],
    a: Matrix,
    a_transposed: bool,
    b: Matrix,
    b_transposed: bool,
    parallelism: gemm::Parallelism,
) -> &'o mut [f32] {
    let (m, k, lhs_rs, lhs_cs) = a.view(a_transposed);
    let (b_k, n, rhs_rs, rhs_cs) = b.view(b_transposed);
    assert!(
        k == b_k && out.len() == m * n,
        "product: [{m}, {k}] x [{b_k}, {n}] into {}",
        out.len()
    );
    // SAFETY: `Matrix::new` checked that every element of both operands, as their strides reach
    // them, lies inside their slices, and `out` holds the m × n output (row stride n). gemm
    // writes all of it without reading it (`read_dst` false, alpha 0), also when k = 0.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            b.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32])
    }
}

/// The sums of the columns of `rows` `[m, n]`: `[n]`, each column summed in row order in f32,
/// as candle's `sum(0)`. On the CPU in f32 that is one pass adding row after row (candle walks
/// each column with a stride of `n`); elsewhere candle's `sum(0)`.
fn column_sums(rows: &Tensor) -> Result<Tensor> {
    if rows.device().is_cpu() && rows.dtype() == candle_core::DType::F32 {
        return rows.contiguous()?.apply_op1_no_bwd(&ColumnSums);
    }
    rows.sum(0)
}

/// [`column_sums`] on the CPU.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, rows: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n) = layout.shape().dims2()?;
        let rows = contiguous_f32(rows, layout, self.name())?;
        let mut sums = vec![0f32; n];
        for row in rows.chunks_exact(n.max(1)) {
            sums.iter_mut().zip(row).for_each(|(sum, v)| *sum += v);
        }
        Ok((CpuStorage::F32(sums), Shape::from(n)))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Linear::forward(x, x_layout, weight, weight_layout, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_weight, _) = Linear::backward(x, weight, grad_out, false)?;
        Ok((Some(grad_x), Some(grad_weight)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Linear::forward(
            x,
            x_layout,
            weight,
            weight_layout,
            Some((bias, bias_layout)),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_weight, grad_bias) = Linear::backward(x, weight, grad_out, true)?;
        Ok((Some(grad_x), Some(grad_weight), grad_bias))
    }
}

/// `[b, t, heads * d]` → `[b, heads, t, d]` (a projection's output split into attention heads),
/// as one node whose backward is [`MergeHeads`]. Composed from candle ops this is a reshape, a
/// transpose and a copy, three nodes each with its own zeroed gradient in the backward.
pub struct SplitHeads {
    pub heads: usize,
}

/// `[b, heads, t, d]` → `[b, t, heads * d]` (attention heads joined for the output projection),
/// as one node whose backward is [`SplitHeads`].
pub struct MergeHeads;

/// Copies `x` laid out as `[b, t, heads, d]` into `[b, heads, t, d]` (`split`), or back.
fn permute_heads(x: &[f32], t: usize, heads: usize, d: usize, split: bool) -> Vec<f32> {
    use rayon::prelude::*;
    // One task per (batch, head) block of the [b, heads, t, d] side.
    let block = t * d;
    let min_blocks = (PARALLEL_ELEMENTS / block.max(1)).max(1);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        if split {
            out.par_chunks_mut(block.max(1))
                .enumerate()
                .with_min_len(min_blocks)
                .for_each(|(index, out)| {
                    let (batch, head) = (index / heads, index % heads);
                    for pos in 0..t {
                        let from = ((batch * t + pos) * heads + head) * d;
                        write_all(
                            &mut out[pos * d..(pos + 1) * d],
                            x[from..from + d].iter().copied(),
                        );
                    }
                });
        } else {
            // Merge: each batch item's [t, heads * d] rows gather from its heads.
            out.par_chunks_mut((t * heads * d).max(1))
                .enumerate()
                .for_each(|(batch, out)| {
                    for head in 0..heads {
                        for pos in 0..t {
                            let from = ((batch * heads + head) * t + pos) * d;
                            let to = (pos * heads + head) * d;
                            write_all(&mut out[to..to + d], x[from..from + d].iter().copied());
                        }
                    }
                });
        }
    };
    // SAFETY: every block's positions (split), every batch item's positions and heads (merge)
    // cover it, each `d` values written whole by `write_all`.
    unsafe { written_f32(x.len(), fill) }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "fused-split-heads"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, width) = layout.shape().dims3()?;
        if self.heads == 0 || width % self.heads != 0 {
            bail!("{}: width {width} is not {} heads", self.name(), self.heads);
        }
        let d = width / self.heads;
        let x = contiguous_f32(x, layout, self.name())?;
        let out = permute_heads(x, t, self.heads, d, true);
        Ok((CpuStorage::F32(out), Shape::from((b, self.heads, t, d))))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_out.contiguous()?.apply_op1_no_bwd(&MergeHeads)?))
    }
}

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "fused-merge-heads"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, heads, t, d) = layout.shape().dims4()?;
        let x = contiguous_f32(x, layout, self.name())?;
        let out = permute_heads(x, t, heads, d, false);
        Ok((CpuStorage::F32(out), Shape::from((b, t, heads * d))))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let heads = x.dim(1)?;
        Ok(Some(
            grad_out
                .contiguous()?
                .apply_op1_no_bwd(&SplitHeads { heads })?,
        ))
    }
}

/// Per-token log-probs at a temperature as TRL computes them, `log_softmax(logits / T)` at each
/// row's target, with the entropy of the row's distribution and its log-normaliser
/// `Z = logsumexp(logits / T)`, in one pass over the logits and without a graph: inputs f32
/// `logits` `[rows, vocab]` and u32 `targets` (`rows` of them, any shape), output `[rows, 3]`
/// f32 `(log p(target), entropy, Z)`. [`LogprobGrad`] is the log-probs' gradient. The logits
/// are scaled by `1 / T` rounded to f32, as `logits / T` on a tensor does.
pub struct LogSoftmaxGather {
    pub temperature: f64,
}

/// `1 / temperature` as the logits are multiplied by it.
fn inverse_temperature(temperature: f64) -> f32 {
    (1.0 / temperature) as f32
}

/// `(rows, vocab)` of logits `[rows, vocab]` and `rows` targets.
fn logit_rows(logits: &Layout, targets: &Layout, op: &str) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.shape().dims2()?;
    if targets.shape().elem_count() != rows || vocab == 0 {
        bail!(
            "{op}: logits {:?} vs targets {:?}",
            logits.dims(),
            targets.dims()
        );
    }
    Ok((rows, vocab))
}

/// An error naming the first target token outside the vocabulary.
fn check_targets(targets: &[u32], vocab: usize, op: &str) -> Result<()> {
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("{op}: target {bad} is outside the vocabulary of {vocab}");
    }
    Ok(())
}

impl CustomOp2 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (rows, vocab) = logit_rows(logits_layout, targets_layout, self.name())?;
        let logits = contiguous_f32(logits, logits_layout, self.name())?;
        let targets = contiguous_u32(targets, targets_layout, self.name())?;
        check_targets(targets, vocab, self.name())?;
        let scale = inverse_temperature(self.temperature);
        let mut out = vec![0f32; rows * 3];
        out.par_chunks_mut(3)
            .zip(logits.par_chunks(vocab))
            .zip(targets.par_iter())
            // Scratch blocks once per task, not zero-filled again for every row.
            .for_each_init(
                || ([0f32; BLOCK], [0f32; BLOCK]),
                |(shifted, e), ((out, row), &target)| {
                    // The largest `v * scale`: `scale` > 0 (a temperature's inverse) and rounding
                    // is monotonic, so it is the largest `v`, scaled.
                    let best = simd::max(row) * scale;
                    // Sums over a 152k vocabulary lose ~1e-4 in f32; f64 keeps them exact enough
                    // for f32 results at no real cost next to the exponentials.
                    let (mut total, mut weighted) = (0f64, 0f64);
                    for row in row.chunks(BLOCK) {
                        let (shifted, e) = (&mut shifted[..row.len()], &mut e[..row.len()]);
                        shifted
                            .iter_mut()
                            .zip(row)
                            .for_each(|(s, v)| *s = v * scale - best);
                        e.copy_from_slice(shifted);
                        simd::exp_in_place(e);
                        let (block_total, block_weighted) = simd::sums_f64(e, shifted);
                        total += block_total;
                        weighted += block_weighted;
                    }
                    // (z - max) - log(sum), as log_softmax computes it.
                    let log_total = total.ln() as f32;
                    out[0] = (row[target as usize] * scale - best) - log_total;
                    out[1] = log_total - (weighted / total) as f32;
                    out[2] = best + log_total;
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((rows, 3))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::DType;
        let (rows, vocab) = logit_rows(logits_layout, targets_layout, self.name())?;
        if logits.dtype() != DType::F32 || targets.dtype() != DType::U32 {
            bail!("{}: needs f32 logits and u32 targets", self.name());
        }
        let plan = kernels::log_softmax_gather(rows, vocab, inverse_temperature(self.temperature))?;
        let inputs = [(logits, logits_layout), (targets, targets_layout)];
        Ok((
            kernels::run(&plan, DType::F32, &inputs)?,
            Shape::from((rows, 3)),
        ))
    }
}

/// The gradient of [`LogSoftmaxGather`]'s log-probs with respect to the logits, for an upstream
/// gradient `g` per row: `(onehot(target) - softmax(logits / T)) * g / T`, from the f32 logits
/// `[rows, vocab]`, the u32 targets and f32 `stats` `[rows, 2]` = `(Z, g / T)` (`Z` as
/// [`LogSoftmaxGather`] returned it). Output `[rows, vocab]`: in `dtype` (f32 or bf16; the
/// matmuls' compute dtype) on CUDA, in f32 on the CPU (callers cast).
pub struct LogprobGrad {
    pub temperature: f64,
    pub dtype: candle_core::DType,
}

impl LogprobGrad {
    fn check_stats(stats: &Layout, rows: usize) -> Result<()> {
        if stats.dims() != [rows, 2] {
            bail!(
                "fused-logprob-grad: stats {:?}, want [{rows}, 2]",
                stats.dims()
            );
        }
        Ok(())
    }
}

impl CustomOp3 for LogprobGrad {
    fn name(&self) -> &'static str {
        "fused-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
        stats: &CpuStorage,
        stats_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = logit_rows(logits_layout, targets_layout, self.name())?;
        LogprobGrad::check_stats(stats_layout, rows)?;
        let logits = contiguous_f32(logits, logits_layout, self.name())?;
        let targets = contiguous_u32(targets, targets_layout, self.name())?;
        check_targets(targets, vocab, self.name())?;
        let stats = contiguous_f32(stats, stats_layout, self.name())?;
        let inverse = inverse_temperature(self.temperature);
        let out = map_rows(logits, vocab, |out, r, row| {
            let (normalizer, scale) = (stats[2 * r], stats[2 * r + 1]);
            let target = targets[r] as usize;
            let out = write_all(out, row.iter().map(|v| v * inverse - normalizer));
            simd::exp_in_place(out);
            // (onehot - p) * scale, the one-hot only at the target.
            let p_target = out[target];
            out.iter_mut().for_each(|p| *p = -*p * scale);
            out[target] = (1.0 - p_target) * scale;
            out
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, vocab))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
        stats: &CudaStorage,
        stats_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::DType;
        let (rows, vocab) = logit_rows(logits_layout, targets_layout, self.name())?;
        LogprobGrad::check_stats(stats_layout, rows)?;
        if logits.dtype() != DType::F32
            || targets.dtype() != DType::U32
            || stats.dtype() != DType::F32
        {
            bail!("{}: needs f32 logits and stats, u32 targets", self.name());
        }
        let plan = kernels::logprob_grad(rows, vocab, inverse_temperature(self.temperature))?;
        let inputs = [
            (logits, logits_layout),
            (targets, targets_layout),
            (stats, stats_layout),
        ];
        Ok((
            kernels::run(&plan, self.dtype, &inputs)?,
            Shape::from((rows, vocab)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_whose_inputs_must_agree_name_both_when_they_do_not() {
        use candle_core::{DType, Device};
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (zeros(&[2, 3]), zeros(&[3, 2]));
        let message = |result: Result<Tensor>| result.unwrap_err().to_string();
        let softmax = message(a.apply_op2_no_bwd(&b, &SoftmaxBackward { scale: 1.0 }));
        assert!(softmax.contains("grad [2, 3] vs y [3, 2]"), "{softmax}");
        let swiglu = message(a.apply_op2_no_bwd(&b, &Swiglu));
        assert!(swiglu.contains("gate [2, 3] vs up [3, 2]"), "{swiglu}");
        let backward = message(a.apply_op3_no_bwd(&a, &zeros(&[5]), &SwigluBackward));
        assert!(backward.contains("differ in size"), "{backward}");
    }

    #[test]
    #[should_panic(expected = "too few values")]
    fn write_all_refuses_to_leave_slots_unwritten() {
        let mut slots = [MaybeUninit::<f32>::uninit(); 4];
        write_all(&mut slots, [1.0, 2.0, 3.0]);
    }

    #[test]
    #[should_panic(expected = "must come back whole")]
    fn map_rows_refuses_a_row_written_in_part() {
        map_rows(&[1.0; 6], 3, |out, _, row| {
            &mut write_all(out, row.iter().copied())[1..]
        });
    }

    #[test]
    fn map_rows_maps_every_row_in_order_also_in_parallel() {
        for rows in [3, PARALLEL_ELEMENTS / 5 + 70] {
            let input: Vec<f32> = (0..rows * 5).map(|i| i as f32).collect();
            let out = map_rows(&input, 5, |out, row, values| {
                write_all(out, values.iter().map(|v| v * 2.0 + row as f32))
            });
            let want: Vec<f32> = (0..rows * 5)
                .map(|i| i as f32 * 2.0 + (i / 5) as f32)
                .collect();
            assert_eq!(out, want);
        }
    }

    /// `x @ weight^T` by [`multiply_rows_portable`] over column runs of `run` weight rows (as
    /// the tasks of [`FewRowsMatmul`] split it).
    fn portable_product(x: &[f32], weight: &[f32], k: usize, run: usize) -> Vec<f32> {
        let (m, n) = (x.len() / k, weight.len() / k);
        let mut out = vec![f32::NAN; m * n];
        let columns = OutputColumns {
            out: out.as_mut_ptr(),
            m,
            n,
        };
        for (task, weight) in weight.chunks(run * k).enumerate() {
            // SAFETY: one thread; the runs are disjoint and within the output.
            unsafe { multiply_rows_portable(x, k, weight, task * run, columns) };
        }
        out
    }

    #[test]
    fn the_portable_few_rows_product_covers_every_element_and_matches_the_naive_one() {
        // (The AVX2 form is what `FewRowsMatmul` runs on x86-64 CPUs; tests/ops.rs checks it.)
        for (m, k, n, run) in [
            (1, 7, 3, 4),
            (3, 37, 23, 8),
            (16, 64, 101, 12),
            (5, 9, 8, 8),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
                .collect();
            let weight: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let got = portable_product(&x, &weight, k, run);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|c| x[i * k + c] * weight[j * k + c]).sum();
                    let value = got[i * n + j];
                    assert!(
                        (value - want).abs() < 1e-4,
                        "{m}x{k}x{n}: [{i}, {j}] = {value}, want {want}"
                    );
                }
            }
        }
    }
}
