//! Custom ops for the frozen operands of a graph: a linear layer whose weight and bias are
//! constants ([`FrozenLinear`], a LoRA model's base layers) and a product with a constant tensor
//! ([`ConstantMul`], LoRA's dropout masks). Each holds its constant itself rather than taking it
//! as a graph input, and its backward returns the gradient of the one input only.
//!
//! Why: candle's backward computes a gradient for every input of a node, tracked or not, and
//! keeps those of untracked tensors in the `GradStore` until it is dropped. A frozen weight used
//! in a plain matmul would get a weight-sized gradient per use (twice per layer in the grouped
//! forward), a constant mask an activation-sized one: memory a LoRA step exists to save.
//!
//! The forwards are written once over candle's storage backends (its matmul and broadcast
//! binary kernels), so they run on the CPU and, in a `cuda` build, on CUDA.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// `x @ weight^T (+ bias)` for `x` `[.., k]`, a constant `weight` `[n, k]` and `bias` `[n]`, in
/// `x`'s dtype. The backward returns `d x = g @ weight` and nothing for the constants.
pub struct FrozenLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// `x * factor` for a constant `factor` of `x`'s shape and dtype; the backward is `g * factor`.
pub struct ConstantMul {
    pub factor: Tensor,
}

/// The forward of [`FrozenLinear`] on one backend.
fn frozen_linear<S: BackendStorage>(
    x: (&S, &Layout),
    weight: (&S, &Layout),
    bias: Option<(&S, &Layout)>,
) -> Result<(S, Shape)> {
    let ((x, x_layout), (weight, weight_layout)) = (x, weight);
    let dims = x_layout.dims();
    let k = *dims.last().unwrap_or(&0);
    let m = x_layout.shape().elem_count() / k.max(1);
    let (n, weight_k) = weight_layout.shape().dims2()?;
    if k != weight_k || !x_layout.is_contiguous() || !weight_layout.is_contiguous() {
        bail!("frozen-linear: x {dims:?} vs weight [{n}, {weight_k}] (both must be contiguous)");
    }
    let rows = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
    let mut out = x.matmul(weight, (1, m, n, k), &rows, &weight_layout.transpose(0, 1)?)?;
    if let Some((bias, bias_layout)) = bias {
        if bias_layout.dims() != [n] {
            bail!(
                "frozen-linear: bias {:?} for {n} outputs",
                bias_layout.dims()
            );
        }
        let broadcast = bias_layout.broadcast_as((m, n))?;
        out = out.binary_impl::<Add>(bias, &Layout::contiguous((m, n)), &broadcast)?;
    }
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a feature dimension") = n;
    Ok((out, Shape::from(out_dims)))
}

/// `x * factor` on one backend.
fn constant_mul<S: BackendStorage>(x: (&S, &Layout), factor: (&S, &Layout)) -> Result<(S, Shape)> {
    let ((x, x_layout), (factor, factor_layout)) = (x, factor);
    if x_layout.dims() != factor_layout.dims() {
        bail!(
            "constant-mul: x {:?} vs factor {:?}",
            x_layout.dims(),
            factor_layout.dims()
        );
    }
    Ok((
        x.binary_impl::<Mul>(factor, x_layout, factor_layout)?,
        x_layout.shape().clone(),
    ))
}

/// The CPU storage of a constant an op holds, or an error naming the op.
fn cpu<'a>(storage: &'a Storage, op: &str) -> Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(storage) => Ok(storage),
        _ => bail!("{op}: the input is on the CPU but a constant is not"),
    }
}

#[cfg(feature = "cuda")]
fn cuda<'a>(storage: &'a Storage, op: &str) -> Result<&'a candle_core::CudaStorage> {
    match storage {
        Storage::Cuda(storage) => Ok(storage),
        _ => bail!("{op}: the input is on CUDA but a constant is not"),
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let bias = self.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = match &bias {
            Some((storage, layout)) => Some((cpu(storage, self.name())?, *layout)),
            None => None,
        };
        frozen_linear(
            (x, layout),
            (cpu(&weight, self.name())?, weight_layout),
            bias,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let bias = self.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = match &bias {
            Some((storage, layout)) => Some((cuda(storage, self.name())?, *layout)),
            None => None,
        };
        frozen_linear(
            (x, layout),
            (cuda(&weight, self.name())?, weight_layout),
            bias,
        )
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = self.weight.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let grad_x = grad_out
            .reshape((rows, n))?
            .matmul(&self.weight)?
            .reshape(x.shape())?;
        Ok(Some(grad_x))
    }
}

impl CustomOp1 for ConstantMul {
    fn name(&self) -> &'static str {
        "constant-mul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (factor, factor_layout) = self.factor.storage_and_layout();
        constant_mul((x, layout), (cpu(&factor, self.name())?, factor_layout))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (factor, factor_layout) = self.factor.storage_and_layout();
        constant_mul((x, layout), (cuda(&factor, self.name())?, factor_layout))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_out.mul(&self.factor)?))
    }
}
