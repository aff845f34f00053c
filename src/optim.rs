//! The optimizer side of a training step, as the HF Trainer does it: gradients gathered by
//! parameter name ([`Gradients`]), global-norm clipping (`torch.nn.utils.clip_grad_norm_`),
//! `torch.optim.AdamW` with the Trainer's weight-decay grouping ([`AdamW`]), and the learning-rate
//! schedules of `transformers.get_scheduler` ([`LrSchedule`]).
//!
//! A step reads: backward each micro-batch and [`Gradients::accumulate`] its `GradStore`;
//! [`Gradients::clip_global_norm`] (its return value is the logged `grad_norm`);
//! [`AdamW::step`] with `schedule.lr(updates_done)`; then start fresh [`Gradients`].

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Storage, Tensor, Var};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// torch's `clip_grad_norm_` adds this to the norm before dividing.
const CLIP_EPSILON: f64 = 1e-6;

// ---------------------------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------------------------

/// Gradients by parameter name, summed over the micro-batches of one optimizer step.
///
/// Named rather than a `GradStore` so that accumulation, clipping and checkpoints do not depend
/// on tensor ids; iteration is in name order, so norms are deterministic.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    by_name: BTreeMap<String, Tensor>,
}

impl Gradients {
    /// No gradients yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients `store` holds for `params` (detached, so the backward graph is freed).
    /// Parameters the loss did not reach have no entry and are skipped.
    pub fn accumulate(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        for (name, var) in params {
            if let Some(grad) = store.get(var.as_tensor()) {
                self.add(name, &grad.detach())?;
            }
        }
        Ok(())
    }

    /// Adds one gradient to the running sum of `name`.
    pub fn add(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        let sum = match self.by_name.get(name) {
            Some(sum) => sum
                .add(grad)
                .with_context(|| format!("cannot add the gradient of {name} to its running sum"))?,
            None => grad.clone(),
        };
        self.by_name.insert(name.to_owned(), sum);
        Ok(())
    }

    /// Gives each of `params` without a gradient a zero one: what a backward through a loss
    /// of zero gradient gives them (torch's zeros, not `None`: AdamW still moves such a
    /// parameter by its momentum and weight decay).
    pub fn add_zeros_where_missing(&mut self, params: &[(String, Var)]) -> Result<()> {
        for (name, var) in params {
            if !self.by_name.contains_key(name) {
                self.by_name
                    .insert(name.clone(), var.as_tensor().zeros_like()?);
            }
        }
        Ok(())
    }

    /// The gradient of `name`, if the loss reached it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name)
    }

    /// Global L2 norm over all gradients: `sqrt(sum of squared per-tensor norms)`, accumulated in
    /// f64.
    pub fn global_norm(&self) -> Result<f64> {
        let mut squares = 0.0;
        for (name, grad) in &self.by_name {
            squares += sum_of_squares(grad)
                .with_context(|| format!("cannot take the norm of the gradient of {name}"))?;
        }
        Ok(squares.sqrt())
    }

    /// torch's `clip_grad_norm_(max_norm)`: scales every gradient by
    /// `min(1, max_norm / (norm + 1e-6))` and returns the norm before clipping. A non-finite norm
    /// is returned as is (the gradients then carry NaN/inf; the caller decides to skip the step).
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        ensure!(
            max_norm > 0.0,
            "max_grad_norm is {max_norm}: clipping needs a positive norm (use global_norm to only \
             measure)"
        );
        let norm = self.global_norm()?;
        let coef = max_norm / (norm + CLIP_EPSILON);
        if coef < 1.0 {
            for grad in self.by_name.values_mut() {
                *grad = (&*grad * coef)?;
            }
        }
        Ok(norm)
    }
}

impl From<HashMap<String, Tensor>> for Gradients {
    fn from(grads: HashMap<String, Tensor>) -> Self {
        Self {
            by_name: grads.into_iter().collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// AdamW hyper-parameters (HF `TrainingArguments` names: `adam_beta1`, `adam_beta2`,
/// `adam_epsilon`, `weight_decay`); the learning rate comes from the schedule at each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// The HF `TrainingArguments` defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Which parameters get weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayGrouping {
    /// Every parameter (one torch param group).
    All,
    /// The HF Trainer's grouping: no decay where [`hf_no_decay`] says so.
    HfTrainer,
}

static NO_DECAY_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
        .expect("the no-decay pattern is a valid regex")
});

/// Whether the HF Trainer exempts a parameter from weight decay.
///
/// transformers' `get_decay_parameter_names` excludes parameters of `nn.LayerNorm` modules and
/// every name matching (lower-cased) `bias`, `layernorm`, `rmsnorm`, `(^|.)norm($|.)` or
/// `_norm($|.)`. Qwen2 has no `nn.LayerNorm`; its RMSNorm weights are named `*layernorm*` and
/// `model.norm`, so the name rule is the whole rule.
pub fn hf_no_decay(name: &str) -> bool {
    NO_DECAY_NAME.is_match(&name.to_lowercase())
}

/// `torch.optim.AdamW` (single-tensor implementation, `amsgrad` and `maximize` off) over named
/// f32 parameters; its moments are f32 too.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<ParamState>,
    hyper: AdamWParams,
}

#[derive(Debug)]
struct ParamState {
    name: String,
    var: Var,
    weight_decay: f64,
    /// Updates this parameter received (torch keeps the step per parameter).
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl AdamW {
    pub fn new(
        params: &[(String, Var)],
        hyper: AdamWParams,
        grouping: DecayGrouping,
    ) -> Result<Self> {
        let params = params
            .iter()
            .map(|(name, var)| {
                ensure!(
                    var.dtype() == DType::F32,
                    "parameter {name} is {:?}: AdamW trains f32 parameters; load the policy in f32",
                    var.dtype()
                );
                let decays = grouping == DecayGrouping::All || !hf_no_decay(name);
                Ok(ParamState {
                    name: name.clone(),
                    var: var.clone(),
                    weight_decay: if decays { hyper.weight_decay } else { 0.0 },
                    step: 0,
                    exp_avg: var.zeros_like()?,
                    exp_avg_sq: var.zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { params, hyper })
    }

    /// Clips `grads` to `max_norm` (`0`: no clipping, as the HF Trainer with
    /// `max_grad_norm = 0`) and updates at `lr`, unless the step's `loss` or the gradient norm is
    /// not finite: then no weight and no moment changes. Returns the pre-clip norm (measured
    /// also without clipping) and whether the update was applied.
    pub fn clipped_step(
        &mut self,
        grads: &mut Gradients,
        loss: f64,
        max_norm: f64,
        lr: f64,
    ) -> Result<(f64, bool)> {
        let grad_norm = if max_norm > 0.0 {
            grads.clip_global_norm(max_norm)?
        } else {
            grads.global_norm()?
        };
        let finite = loss.is_finite() && grad_norm.is_finite();
        if finite {
            self.step(grads, lr)?;
        }
        Ok((grad_norm, finite))
    }

    /// One update at learning rate `lr`. Parameters without a gradient are left untouched, as
    /// torch does for a `None` grad.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        let AdamWParams {
            beta1, beta2, eps, ..
        } = self.hyper;
        for param in &mut self.params {
            let Some(grad) = grads.get(&param.name) else {
                continue;
            };
            ensure!(
                grad.dims() == param.var.dims(),
                "the gradient of {} has shape {:?} but the parameter has {:?}",
                param.name,
                grad.dims(),
                param.var.dims()
            );
            let grad = grad.to_dtype(DType::F32)?;
            param.step += 1;
            let step = i32::try_from(param.step).context("more than 2^31 AdamW steps")?;
            let update = Update {
                beta1: beta1 as f32,
                beta2: beta2 as f32,
                eps: eps as f32,
                decay: (1.0 - lr * param.weight_decay) as f32,
                step_size: (lr / (1.0 - beta1.powi(step))) as f32,
                bias_correction2_sqrt: (1.0 - beta2.powi(step)).sqrt() as f32,
            };
            let fused = [
                param.var.as_tensor(),
                &grad,
                &param.exp_avg,
                &param.exp_avg_sq,
            ]
            .iter()
            .all(|t| t.device().is_cpu() && t.is_contiguous());
            if fused {
                // In place, one pass per moment and one for the weights.
                param
                    .exp_avg
                    .inplace_op2(&grad, &MomentUpdate::Average(update))?;
                param
                    .exp_avg_sq
                    .inplace_op2(&grad, &MomentUpdate::Square(update))?;
                param
                    .var
                    .as_tensor()
                    .inplace_op3(&param.exp_avg, &param.exp_avg_sq, &update)?;
            } else {
                // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq = beta2 * v + (1 - beta2) * g².
                let value = (param.var.as_tensor() * f64::from(update.decay))?;
                param.exp_avg = (&param.exp_avg + ((&grad - &param.exp_avg)? * (1.0 - beta1))?)?;
                param.exp_avg_sq = ((&param.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                let denom =
                    ((param.exp_avg_sq.sqrt()? / f64::from(update.bias_correction2_sqrt))? + eps)?;
                let step_update = ((&param.exp_avg / denom)? * f64::from(update.step_size))?;
                param.var.set(&(value - step_update)?)?;
            }
        }
        Ok(())
    }

    /// The optimizer state for a checkpoint: `<name>.exp_avg`, `<name>.exp_avg_sq` (f32, the
    /// parameter's shape) and `<name>.step` (f64 scalar) for every parameter, ready for
    /// `candle_core::safetensors::save`.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = HashMap::with_capacity(3 * self.params.len());
        for param in &self.params {
            let step = Tensor::new(param.step as f64, param.exp_avg.device())?;
            state.insert(format!("{}.exp_avg", param.name), param.exp_avg.clone());
            state.insert(
                format!("{}.exp_avg_sq", param.name),
                param.exp_avg_sq.clone(),
            );
            state.insert(format!("{}.step", param.name), step);
        }
        Ok(state)
    }

    /// Restores a state written by [`AdamW::state`] for the same parameters.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let expected = 3 * self.params.len();
        if state.len() != expected {
            let known: Vec<String> = self
                .params
                .iter()
                .flat_map(|p| ["exp_avg", "exp_avg_sq", "step"].map(|k| format!("{}.{k}", p.name)))
                .collect();
            let unknown: Vec<&String> = state.keys().filter(|k| !known.contains(k)).collect();
            bail!(
                "the optimizer state has {} tensors but these parameters need {expected}; \
                 unexpected: {unknown:?} (was it saved for another model?)",
                state.len()
            );
        }
        for param in &mut self.params {
            let tensor = |kind: &str| {
                let key = format!("{}.{kind}", param.name);
                state
                    .get(&key)
                    .with_context(|| format!("the optimizer state has no tensor {key}"))
            };
            let moment = |kind: &str| -> Result<Tensor> {
                let value = tensor(kind)?;
                ensure!(
                    value.dims() == param.var.dims(),
                    "optimizer state {}.{kind} has shape {:?} but the parameter has {:?}",
                    param.name,
                    value.dims(),
                    param.var.dims()
                );
                Ok(value.to_dtype(DType::F32)?.to_device(param.var.device())?)
            };
            let exp_avg = moment("exp_avg")?;
            let exp_avg_sq = moment("exp_avg_sq")?;
            let step = tensor("step")?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            ensure!(
                step >= 0.0 && step.fract() == 0.0,
                "optimizer state {}.step is {step}, not a step count",
                param.name
            );
            param.exp_avg = exp_avg;
            param.exp_avg_sq = exp_avg_sq;
            param.step = step as u64;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedules
// ---------------------------------------------------------------------------------------------

/// transformers' `lr_scheduler_type` values we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Linear warmup, then linear decay to 0 (the HF default).
    #[default]
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// The peak rate throughout, no warmup.
    Constant,
    /// Linear warmup, then the peak rate.
    ConstantWithWarmup,
}

/// transformers' `TrainingArguments.get_warmup_steps`: `warmup_steps` when positive, else
/// `ceil(warmup_ratio * total_steps)`.
pub fn warmup_steps(total_steps: usize, warmup_steps: usize, warmup_ratio: f64) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (total_steps as f64 * warmup_ratio).ceil() as usize
    }
}

/// A learning-rate schedule: `peak_lr` times transformers' schedule factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: LrSchedulerType,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The learning rate of the `(updates_done + 1)`-th optimizer update, i.e. after the
    /// scheduler has stepped `updates_done` times. The first update of a warmup therefore uses
    /// lr 0, and the HF Trainer logs `lr(k - 1)` at global step `k`.
    pub fn lr(&self, updates_done: usize) -> f64 {
        self.peak_lr * self.factor(updates_done)
    }

    fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let in_warmup = step < warmup && self.kind != LrSchedulerType::Constant;
        if in_warmup {
            return step / warmup.max(1.0);
        }
        let decay_steps = (total - warmup).max(1.0);
        match self.kind {
            LrSchedulerType::Constant | LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => ((total - step) / decay_steps).max(0.0),
            LrSchedulerType::Cosine => {
                let progress = (step - warmup) / decay_steps;
                // num_cycles = 0.5: pi * 0.5 * 2.0 * progress, in transformers' operation order.
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fused CPU kernels of the optimizer step
// ---------------------------------------------------------------------------------------------

/// `sum(x^2)` of a tensor, accumulated in f64 (on the CPU in one pass, without an f64 copy).
fn sum_of_squares(x: &Tensor) -> Result<f64> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            use rayon::prelude::*;
            // Partial sums in chunk order, added in that order: the same bits every run.
            let partial: Vec<f64> = data[start..end]
                .par_chunks(1 << 16)
                .map(|chunk| {
                    chunk
                        .iter()
                        .map(|&v| f64::from(v) * f64::from(v))
                        .sum::<f64>()
                })
                .collect();
            return Ok(partial.iter().sum());
        }
    }
    Ok(x.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// The scalars of one AdamW update of one parameter, in f32 as the element-wise ops use them.
#[derive(Debug, Clone, Copy)]
struct Update {
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// `1 - lr * weight_decay`.
    decay: f32,
    /// `lr / (1 - beta1^step)`.
    step_size: f32,
    /// `sqrt(1 - beta2^step)`.
    bias_correction2_sqrt: f32,
}

/// In-place moment updates over `(moment, grad)`: torch's `exp_avg.lerp_(grad, 1 - beta1)` and
/// `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)`.
enum MomentUpdate {
    Average(Update),
    Square(Update),
}

/// The f32 slice of a contiguous CPU tensor argument of the fused optimizer kernels.
fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("the fused AdamW kernels take contiguous f32 tensors"),
    }
}

fn cpu_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("the fused AdamW kernels take contiguous f32 tensors"),
    }
}

/// Elements per parallel task of the optimizer kernels.
const OPTIMIZER_CHUNK: usize = 1 << 16;

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        moment: &mut CpuStorage,
        moment_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let moment = cpu_f32_mut(moment, moment_layout)?;
        let grad = cpu_f32(grad, grad_layout)?;
        if moment.len() != grad.len() {
            candle_core::bail!(
                "adamw-moment: {} moments, {} gradients",
                moment.len(),
                grad.len()
            );
        }
        let chunks = moment
            .par_chunks_mut(OPTIMIZER_CHUNK)
            .zip(grad.par_chunks(OPTIMIZER_CHUNK));
        match *self {
            MomentUpdate::Average(u) => chunks.for_each(|(m, g)| {
                let weight = 1.0 - u.beta1;
                m.iter_mut()
                    .zip(g)
                    .for_each(|(m, g)| *m += (g - *m) * weight);
            }),
            MomentUpdate::Square(u) => chunks.for_each(|(v, g)| {
                let weight = 1.0 - u.beta2;
                v.iter_mut()
                    .zip(g)
                    .for_each(|(v, g)| *v = *v * u.beta2 + g * g * weight);
            }),
        }
        Ok(())
    }
}

/// The in-place weight update over `(param, exp_avg, exp_avg_sq)`:
/// `p = p * (1 - lr * wd) - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_layout: &Layout,
        exp_avg: &CpuStorage,
        exp_avg_layout: &Layout,
        exp_avg_sq: &CpuStorage,
        exp_avg_sq_layout: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let param = cpu_f32_mut(param, param_layout)?;
        let exp_avg = cpu_f32(exp_avg, exp_avg_layout)?;
        let exp_avg_sq = cpu_f32(exp_avg_sq, exp_avg_sq_layout)?;
        if param.len() != exp_avg.len() || param.len() != exp_avg_sq.len() {
            candle_core::bail!("adamw-update: parameter and moments differ in size");
        }
        let u = *self;
        param
            .par_chunks_mut(OPTIMIZER_CHUNK)
            .zip(exp_avg.par_chunks(OPTIMIZER_CHUNK))
            .zip(exp_avg_sq.par_chunks(OPTIMIZER_CHUNK))
            .for_each(|((p, m), v)| {
                for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() / u.bias_correction2_sqrt + u.eps;
                    *p = *p * u.decay - m / denom * u.step_size;
                }
            });
        Ok(())
    }
}
