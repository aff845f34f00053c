//! The decoder's linear layers: `y = x W^T (+ b)`, optionally with a LoRA adapter (PEFT's
//! `lora.Linear`): `y = x W^T (+ b) + scale * dropout(x) A^T B^T` with `A` `[r, in]`, `B`
//! `[out, r]` and `scale = lora_alpha / r`. Dropout acts on the adapter's input only, and only
//! in a training forward ([`Dropout`]); merging folds the adapter into the weight.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor};
use rand::{Rng, SeedableRng};

use super::frozen::ConstantMul;
use super::ops::linear;

/// One linear layer: its weight `[out, in]`, optional bias `[out]` and optional LoRA adapter.
#[derive(Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) adapter: Option<Adapter>,
}

/// A LoRA adapter: `A` `[r, in]`, `B` `[out, r]` and the `scale` of their product.
#[derive(Clone)]
pub(crate) struct Adapter {
    pub(crate) a: Tensor,
    pub(crate) b: Tensor,
    pub(crate) scale: f64,
}

/// Training-time dropout of the adapters' inputs, as torch's `nn.Dropout` in training mode:
/// each element is zeroed with probability `p` and the others scaled by `1 / (1 - p)`. Masks
/// come from one seeded generator, drawn in the order the forward applies them, so a forward
/// with the same seed drops the same elements.
pub struct Dropout {
    p: f64,
    rng: Mutex<rand::rngs::StdRng>,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)`, masks drawn from `seed`.
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        }
    }

    /// `x` with dropout applied (the mask is a constant of the graph: only `x` gets a gradient).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep_scale = (1.0 / (1.0 - self.p)) as f32;
        let p = self.p as f32;
        let mask: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            (0..x.elem_count())
                .map(|_| match rng.random::<f32>() < p {
                    true => 0.0,
                    false => keep_scale,
                })
                .collect()
        };
        let factor = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.contiguous()?.apply_op1(ConstantMul { factor })
    }
}

impl Linear {
    /// `x W^T (+ b)`, plus the adapter's `scale * B A x` with `x` through `dropout` when given.
    /// Every tensor must already be in `x`'s dtype.
    pub(crate) fn forward(&self, x: &Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
        let y = linear(x, &self.weight, self.bias.as_ref())?;
        let Some(adapter) = &self.adapter else {
            return Ok(y);
        };
        let x = match dropout {
            Some(dropout) => dropout.apply(x)?,
            None => x.clone(),
        };
        let update = linear(&linear(&x, &adapter.a, None)?, &adapter.b, None)?;
        y + (update * adapter.scale)?
    }

    /// This layer with `f` applied to the weight, the bias and the adapter's matrices.
    pub(crate) fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Linear {
            weight: f(&self.weight)?,
            bias: self.bias.as_ref().map(&f).transpose()?,
            adapter: self
                .adapter
                .as_ref()
                .map(|adapter| -> Result<Adapter> {
                    Ok(Adapter {
                        a: f(&adapter.a)?,
                        b: f(&adapter.b)?,
                        scale: adapter.scale,
                    })
                })
                .transpose()?,
        })
    }

    /// The weight with the adapter folded in, `W + scale * B A`, in f32 (PEFT's merge).
    pub(crate) fn merged_weight(&self) -> Result<Tensor> {
        let weight = self.weight.detach().to_dtype(DType::F32)?;
        match &self.adapter {
            None => Ok(weight),
            Some(adapter) => {
                let a = adapter.a.detach().to_dtype(DType::F32)?;
                let b = adapter.b.detach().to_dtype(DType::F32)?;
                weight + (b.matmul(&a)? * adapter.scale)?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// torch's training-mode dropout: about `p` of the elements zeroed, the others scaled by
    /// `1 / (1 - p)`, and the gradient through the same mask.
    #[test]
    fn dropout_zeroes_about_p_and_scales_the_rest() {
        let x =
            Var::from_tensor(&Tensor::ones((64, 256), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let dropped = Dropout::new(0.25, 9).apply(x.as_tensor()).unwrap();
        let values: Vec<f32> = dropped.flatten_all().unwrap().to_vec1().unwrap();
        let zeros = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros} dropped");
        assert!(values
            .iter()
            .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let grad = dropped.sum_all().unwrap().backward().unwrap();
        let grad: Vec<f32> = grad
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(grad, values, "d(sum)/dx is the mask itself (x = 1)");
        let again = Dropout::new(0.25, 9).apply(x.as_tensor()).unwrap();
        assert_eq!(
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            values
        );
        let none = Dropout::new(0.0, 9).apply(x.as_tensor()).unwrap();
        assert_eq!(
            none.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            64.0 * 256.0
        );
    }
}
