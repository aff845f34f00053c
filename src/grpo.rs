//! The GRPO step as pure tensor math: completion masks, group-normalised advantages, the k3 KL
//! against the reference, the clipped surrogate and the four loss aggregations, and the step's
//! metrics. Nothing here knows about the model, the CLI or the device.
//!
//! Everything follows TRL's `GRPOTrainer` (`_generate_and_score_completions` and `_compute_loss`)
//! for one process, so a run logs the same numbers TRL would:
//!
//! 1. [`CompletionBatch`]: the loss mask runs up to and including the first EOS; tokens after it
//!    become pad (what the model is fed); rows without EOS are truncated.
//! 2. [`weighted_rewards`] and [`group_advantages`]: `A = (r - group_mean) / (std + 1e-4)` in f32.
//! 3. [`grpo_loss`]: the clipped surrogate plus `beta` × k3 KL, aggregated per [`LossType`] and
//!    scaled for gradient accumulation, with the clip and KL metrics TRL logs.
//! 4. [`StepMetrics`]: one logged step with TRL's key names.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// How per-token losses are aggregated into the scalar loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over sequences of each sequence's token mean (the original GRPO).
    #[default]
    Grpo,
    /// Token mean over the whole micro-batch.
    Bnpo,
    /// Sum over tokens divided by batch size × max_completion_length (Dr. GRPO).
    DrGrpo,
    /// Sum over tokens divided by the tokens of the whole accumulated batch (DAPO).
    Dapo,
}

/// How group rewards are scaled into advantages (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the std of the completion's own group.
    #[default]
    Group,
    /// Divide by the std of the whole batch.
    Batch,
    /// Do not divide (Dr. GRPO): advantages are `r - group_mean`.
    None,
}

/// TRL's constant added to the std before dividing (`std + 1e-4`).
const STD_EPSILON: f32 = 1e-4;

// ---------------------------------------------------------------------------------------------
// Completion masks
// ---------------------------------------------------------------------------------------------

/// A batch of sampled completions after EOS handling, `[B][C]` with `C` the longest row.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionBatch {
    /// Token ids with every token after the first EOS (and the right padding of shorter rows)
    /// replaced by the pad id: what TRL feeds the model.
    pub ids: Vec<Vec<u32>>,
    /// Loss mask: 1.0 up to and including the first EOS, else 0.0; all 0.0 for truncated rows
    /// when `mask_truncated_completions` is on.
    pub mask: Vec<Vec<f32>>,
    /// Tokens per completion up to and including the first EOS (the whole row when there is
    /// none). Not affected by `mask_truncated_completions`: TRL logs these lengths.
    pub lengths: Vec<usize>,
    /// Rows that never produced an EOS (cut by `max_completion_length`).
    pub truncated: Vec<bool>,
}

impl CompletionBatch {
    /// Builds masks from possibly ragged rows of sampled ids. Any id of `eos_ids` ends a
    /// completion (TRL: the tokenizer's EOS plus the generation config's).
    pub fn new(
        rows: &[Vec<u32>],
        eos_ids: &[u32],
        pad_id: u32,
        mask_truncated_completions: bool,
    ) -> Result<Self> {
        ensure!(
            !eos_ids.is_empty(),
            "no EOS token id given: completion masks need the tokenizer's eos_token_id \
             (and generation_config.json's eos_token_id)"
        );
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = Self {
            ids: Vec::with_capacity(rows.len()),
            mask: Vec::with_capacity(rows.len()),
            lengths: Vec::with_capacity(rows.len()),
            truncated: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            let first_eos = row.iter().position(|id| eos_ids.contains(id));
            let length = first_eos.map_or(row.len(), |eos| eos + 1);
            let truncated = first_eos.is_none();
            let kept = if truncated && mask_truncated_completions {
                0
            } else {
                length
            };
            let mut ids = row[..length].to_vec();
            ids.resize(width, pad_id);
            let mut mask = vec![1.0f32; kept];
            mask.resize(width, 0.0);
            batch.ids.push(ids);
            batch.mask.push(mask);
            batch.lengths.push(length);
            batch.truncated.push(truncated);
        }
        Ok(batch)
    }

    /// Same as [`CompletionBatch::new`] for a `[B, C]` tensor of ids (any integer dtype).
    pub fn from_tensor(
        ids: &Tensor,
        eos_ids: &[u32],
        pad_id: u32,
        mask_truncated_completions: bool,
    ) -> Result<Self> {
        ensure!(
            ids.rank() == 2 && !ids.dtype().is_float(),
            "completion ids must be an integer [batch, completion] tensor, got {:?} {:?}",
            ids.dtype(),
            ids.dims()
        );
        let rows = ids
            .to_dtype(DType::U32)
            .and_then(|ids| ids.to_vec2::<u32>())
            .context("cannot read the completion ids tensor")?;
        Self::new(&rows, eos_ids, pad_id, mask_truncated_completions)
    }

    /// Unmasked tokens of the batch (TRL's `num_items_in_batch` for one micro-batch).
    pub fn num_items(&self) -> usize {
        self.mask.iter().flatten().filter(|&&m| m > 0.0).count()
    }

    /// The ids as a `[B, C]` u32 tensor.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<u32> = self.ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            flat,
            (self.ids.len(), self.width()),
            device,
        )?)
    }

    /// The loss mask as a `[B, C]` f32 tensor.
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = self.mask.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            flat,
            (self.mask.len(), self.width()),
            device,
        )?)
    }

    /// Completion width `C` (the longest sampled row).
    pub fn width(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }
}

// ---------------------------------------------------------------------------------------------
// Rewards and advantages
// ---------------------------------------------------------------------------------------------

/// Each completion's reward: `sum_k w_k r_k` over the reward functions, in f32 as TRL computes it.
///
/// `rewards_per_func` is `[B][K]` (one row per completion, one column per reward function). A NaN
/// reward means "no reward" (a reward function's `None` in TRL) and is left out of the sum
/// (TRL's `nansum`); a completion no function rewarded gets NaN, which [`group_advantages`]
/// leaves out of its group's statistics. An infinite reward is an error.
pub fn weighted_rewards(rewards_per_func: &[Vec<f64>], weights: &[f64]) -> Result<Vec<f32>> {
    rewards_per_func
        .iter()
        .enumerate()
        .map(|(row, rewards)| {
            ensure!(
                rewards.len() == weights.len(),
                "completion {row} has {} rewards but there are {} reward weights: give one weight \
                 per reward function",
                rewards.len(),
                weights.len()
            );
            let mut total = 0.0f32;
            let mut rewarded = false;
            for (k, (&reward, &weight)) in rewards.iter().zip(weights).enumerate() {
                ensure!(
                    !reward.is_infinite(),
                    "reward function {k} returned {reward} for completion {row}: rewards must be \
                     finite (or NaN for no reward)"
                );
                if !reward.is_nan() {
                    total += reward as f32 * weight as f32;
                    rewarded = true;
                }
            }
            Ok(if rewarded { total } else { f32::NAN })
        })
        .collect()
}

/// Group-normalised advantages of one batch (rows = `prompt * G + g`).
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// The rewards the advantages were computed from (NaN: no function rewarded the completion).
    pub rewards: Vec<f32>,
    /// Mean reward of each row's group, over its rewarded completions (NaN when there are none).
    pub group_mean: Vec<f32>,
    /// Unbiased std per row: the group's for [`ScaleRewards::Group`] and [`ScaleRewards::None`]
    /// (where it is only logged), the whole batch's for [`ScaleRewards::Batch`], over rewarded
    /// completions only. A group of one (or a batch of one) has no defined std; it is taken as 0,
    /// as TRL does; a larger group with fewer than two rewarded completions gets NaN (TRL's
    /// `nanstd`).
    pub std: Vec<f32>,
    /// `(r - group_mean) / (std + 1e-4)`, or `r - group_mean` for [`ScaleRewards::None`]; 0 where
    /// that is NaN (an unrewarded completion, or a group with a single rewarded one).
    pub advantages: Vec<f32>,
}

impl Advantages {
    /// Fraction of rows whose std is zero (TRL's `frac_reward_zero_std`): groups that carry no
    /// learning signal. A NaN std is not zero.
    pub fn frac_reward_zero_std(&self) -> f64 {
        if self.std.is_empty() {
            return 0.0;
        }
        // torch.isclose(std, 0) with its default atol.
        let zero = self.std.iter().filter(|s| s.abs() <= 1e-8).count();
        zero as f64 / self.std.len() as f64
    }
}

/// Computes advantages over consecutive groups of `num_generations` rewards, leaving NaN rewards
/// (no reward) out of the statistics as TRL 1.16 does (`nanmean`, `nanstd`, then NaN
/// advantages set to 0).
///
/// Means and stds are accumulated in f64 and rounded to f32 (torch's f32 reductions are exact to
/// the last bit on groups this small); the subtraction and division then run in f32 as in torch.
pub fn group_advantages(
    rewards: &[f32],
    num_generations: usize,
    scale: ScaleRewards,
) -> Result<Advantages> {
    ensure!(num_generations > 0, "num_generations must be at least 1");
    ensure!(
        rewards.len() % num_generations == 0,
        "{} rewards do not form groups of num_generations = {num_generations}: the batch must hold \
         every completion of each prompt",
        rewards.len()
    );
    let stats = |values: &[f32]| {
        let (mean, std) = nan_mean_and_std(values.iter().map(|&r| f64::from(r)));
        // A single value has no spread to scale by: TRL takes 0 rather than nanstd's NaN.
        (mean as f32, if values.len() > 1 { std as f32 } else { 0.0 })
    };
    let mut group_mean = Vec::with_capacity(rewards.len());
    let mut group_std = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(num_generations) {
        let (mean, std) = stats(group);
        group_mean.extend(std::iter::repeat_n(mean, group.len()));
        group_std.extend(std::iter::repeat_n(std, group.len()));
    }
    let std = match scale {
        ScaleRewards::Group | ScaleRewards::None => group_std,
        ScaleRewards::Batch => vec![stats(rewards).1; rewards.len()],
    };
    let advantages = rewards
        .iter()
        .zip(&group_mean)
        .zip(&std)
        .map(|((&r, &mean), &std)| match scale {
            ScaleRewards::None => r - mean,
            ScaleRewards::Group | ScaleRewards::Batch => (r - mean) / (std + STD_EPSILON),
        })
        .map(|advantage| if advantage.is_nan() { 0.0 } else { advantage })
        .collect();
    Ok(Advantages {
        rewards: rewards.to_vec(),
        group_mean,
        std,
        advantages,
    })
}

/// Mean and unbiased (Bessel-corrected) std of the values that are not NaN, in f64, as TRL's
/// `nanmean` and `nanstd`: the mean is NaN when every value is, the std when fewer than two
/// are not.
fn nan_mean_and_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let values = values.filter(|v| !v.is_nan());
    let n = values.clone().count();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.clone().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let squares: f64 = values.map(|v| (v - mean) * (v - mean)).sum();
    (mean, (squares / (n - 1) as f64).sqrt())
}

// ---------------------------------------------------------------------------------------------
// Loss
// ---------------------------------------------------------------------------------------------

/// Settings of the GRPO loss (TRL's `GRPOConfig` names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParams {
    pub loss_type: LossType,
    /// KL coefficient; 0 disables the KL term (no reference model needed).
    pub beta: f64,
    /// The ratio is clipped to `[1 - epsilon_low, 1 + epsilon_high]`.
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// The dr_grpo normaliser (micro-batch completions × `max_completion_length`).
    pub max_completion_length: usize,
    /// dapo only: unmasked completion tokens of the whole accumulated batch (every micro-batch
    /// of the optimizer step), TRL's `num_items_in_batch`.
    pub num_items_in_batch: usize,
    /// Micro-batches per optimizer step: grpo, bnpo and dr_grpo losses are divided by it.
    pub gradient_accumulation_steps: usize,
    /// TRL's `use_bias_correction_kl`: multiply the per-token KL by the importance ratio.
    pub use_bias_correction_kl: bool,
}

/// The tensors of one micro-batch, all `[B, C]` except `advantages` (`[B]`).
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// Per-token log-probs of the policy, attached to the graph.
    pub logp: &'a Tensor,
    /// Log-probs the completions were sampled with: `logp.detach()` when `num_iterations` is 1,
    /// the sampling-time log-probs otherwise.
    pub old_logp: &'a Tensor,
    /// Reference-model log-probs; required when `beta != 0`, ignored otherwise.
    pub ref_logp: Option<&'a Tensor>,
    pub advantages: &'a Tensor,
    /// Loss mask (1.0 = completion token), any float dtype.
    pub mask: &'a Tensor,
}

/// The KL and clip metrics TRL computes inside the loss (one micro-batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossMetrics {
    /// Masked mean of the per-token KL; `None` when `beta == 0` (TRL does not log it then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// Masked fraction of tokens with `ratio < 1 - epsilon_low` and a negative advantage.
    #[serde(rename = "clip_ratio/low_mean")]
    pub clip_ratio_low_mean: f64,
    /// Masked fraction of tokens with `ratio > 1 + epsilon_high` and a positive advantage.
    #[serde(rename = "clip_ratio/high_mean")]
    pub clip_ratio_high_mean: f64,
    /// Masked fraction of tokens clipped either way.
    #[serde(rename = "clip_ratio/region_mean")]
    pub clip_ratio_region_mean: f64,
}

/// The result of [`grpo_loss`].
#[derive(Debug, Clone)]
pub struct GrpoLoss {
    /// Scalar to call `backward` on, already scaled for gradient accumulation exactly as TRL
    /// does: grpo, bnpo and dr_grpo divide the micro-batch loss by
    /// `gradient_accumulation_steps`; dapo divides the token sum by `num_items_in_batch` of the
    /// whole accumulated batch. Summing its value over the micro-batches of a step gives the
    /// step's loss as the HF Trainer logs it.
    pub loss: Tensor,
    /// `-min(ratio * A, clip(ratio) * A) + beta * kl` per token, before masking.
    pub per_token_loss: Tensor,
    /// The k3 KL per token (times the ratio with `use_bias_correction_kl`); `None` if `beta == 0`.
    pub per_token_kl: Option<Tensor>,
    pub metrics: LossMetrics,
}

/// The size of the micro-batch a loss is normalised by.
///
/// A micro-batch fed through the model in chunks (`forward_batch_size`) normalises each chunk's
/// loss by the whole micro-batch, so the chunks' losses, and their gradients, sum to the
/// micro-batch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroBatchSize {
    /// Completions of the micro-batch (grpo and dr_grpo divide by it).
    pub completions: usize,
    /// Sum of the micro-batch's loss mask: its unmasked completion tokens (bnpo divides by it).
    pub tokens: f64,
}

impl MicroBatchSize {
    /// The size of the micro-batch with loss mask `mask` (`[B, C]`).
    pub fn of(mask: &Tensor) -> Result<Self> {
        let (completions, _) = mask
            .dims2()
            .context("the loss mask must be a [batch, completion] tensor")?;
        let tokens = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        Ok(Self {
            completions,
            tokens,
        })
    }
}

/// The GRPO loss of one micro-batch (TRL's `_compute_loss` with token-level importance sampling).
pub fn grpo_loss(inputs: &LossInputs, params: &LossParams) -> Result<GrpoLoss> {
    chunk_grpo_loss(inputs, params, MicroBatchSize::of(inputs.mask)?)
}

/// [`grpo_loss`] of some of the completions of a micro-batch of size `micro_batch`: the
/// aggregation divides by the whole micro-batch, so the losses of a micro-batch's chunks sum to
/// its [`grpo_loss`]. The metrics are the chunk's own (see [`LossMetrics::of_chunks`]).
pub fn chunk_grpo_loss(
    inputs: &LossInputs,
    params: &LossParams,
    micro_batch: MicroBatchSize,
) -> Result<GrpoLoss> {
    let LossInputs {
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
    } = *inputs;
    let (batch, width) = logp
        .dims2()
        .context("logp must be a [batch, completion] tensor")?;
    let expect_shape = |name: &str, tensor: &Tensor| {
        ensure!(
            tensor.dims() == [batch, width],
            "{name} has shape {:?} but logp has [{batch}, {width}]",
            tensor.dims()
        );
        Ok(())
    };
    expect_shape("old_logp", old_logp)?;
    expect_shape("mask", mask)?;
    ensure!(
        advantages.dims() == [batch],
        "advantages has shape {:?} but the batch has {batch} completions",
        advantages.dims()
    );
    ensure!(
        params.gradient_accumulation_steps > 0,
        "gradient_accumulation_steps must be at least 1"
    );
    ensure!(
        batch <= micro_batch.completions,
        "a chunk of {batch} completions cannot belong to a micro-batch of {}",
        micro_batch.completions
    );
    let dtype = logp.dtype();
    let mask = mask.to_dtype(dtype)?;
    let advantages = advantages.to_dtype(dtype)?.unsqueeze(1)?;

    let ratio = (logp - old_logp)?.exp()?;
    let clipped = ratio.clamp(1.0 - params.epsilon_low, 1.0 + params.epsilon_high)?;
    let surrogate = ratio
        .broadcast_mul(&advantages)?
        .minimum(&clipped.broadcast_mul(&advantages)?)?;
    let mut per_token_loss = surrogate.neg()?;
    let per_token_kl = if params.beta != 0.0 {
        let Some(ref_logp) = ref_logp else {
            bail!(
                "beta is {} but no reference log-probs were given: compute them with the reference \
                 model, or set beta = 0",
                params.beta
            );
        };
        expect_shape("ref_logp", ref_logp)?;
        let ref_minus_logp = (ref_logp - logp)?;
        let mut kl = ((ref_minus_logp.exp()? - &ref_minus_logp)? - 1.0)?;
        if params.use_bias_correction_kl {
            kl = (kl * &ratio)?;
        }
        per_token_loss = (per_token_loss + (&kl * params.beta)?)?;
        Some(kl)
    } else {
        None
    };

    let masked_sum = (&per_token_loss * &mask)?;
    let accumulation = params.gradient_accumulation_steps as f64;
    let completions = micro_batch.completions as f64;
    let loss = match params.loss_type {
        LossType::Grpo => {
            let per_sequence = masked_sum.sum(1)?.div(&mask.sum(1)?.maximum(1.0)?)?;
            (per_sequence.sum(0)? / (completions * accumulation))?
        }
        LossType::Bnpo => (masked_sum.sum_all()? / (micro_batch.tokens.max(1.0) * accumulation))?,
        LossType::DrGrpo => {
            ensure!(
                params.max_completion_length > 0,
                "max_completion_length must be at least 1"
            );
            let normaliser = completions * params.max_completion_length as f64 * accumulation;
            (masked_sum.sum_all()? / normaliser)?
        }
        LossType::Dapo => (masked_sum.sum_all()? / params.num_items_in_batch.max(1) as f64)?,
    };

    let metrics = loss_metrics(&ratio, &advantages, per_token_kl.as_ref(), &mask, params)?;
    Ok(GrpoLoss {
        loss,
        per_token_loss,
        per_token_kl,
        metrics,
    })
}

fn loss_metrics(
    ratio: &Tensor,
    advantages: &Tensor,
    per_token_kl: Option<&Tensor>,
    mask: &Tensor,
    params: &LossParams,
) -> Result<LossMetrics> {
    let ratio = ratio.detach();
    let dtype = ratio.dtype();
    let negative = advantages.lt(0.0)?.to_dtype(dtype)?;
    let positive = advantages.gt(0.0)?.to_dtype(dtype)?;
    let low = ratio
        .lt(1.0 - params.epsilon_low)?
        .to_dtype(dtype)?
        .broadcast_mul(&negative)?;
    let high = ratio
        .gt(1.0 + params.epsilon_high)?
        .to_dtype(dtype)?
        .broadcast_mul(&positive)?;
    // An advantage is never both negative and positive, so the sum is the union.
    let region = (&low + &high)?;
    Ok(LossMetrics {
        kl: per_token_kl
            .map(|kl| masked_mean(&kl.detach(), mask))
            .transpose()?,
        clip_ratio_low_mean: masked_mean(&low, mask)?,
        clip_ratio_high_mean: masked_mean(&high, mask)?,
        clip_ratio_region_mean: masked_mean(&region, mask)?,
    })
}

impl LossMetrics {
    /// The metrics of a micro-batch from those of its chunks, each given with the sum of its loss
    /// mask: every metric is a masked mean, so weighting by tokens gives the micro-batch's own.
    pub fn of_chunks(chunks: &[(LossMetrics, f64)]) -> LossMetrics {
        let combine = |metric: fn(&LossMetrics) -> f64| {
            combine_masked_means(chunks.iter().map(|(m, tokens)| (metric(m), *tokens)))
        };
        LossMetrics {
            kl: chunks
                .iter()
                .all(|(m, _)| m.kl.is_some())
                .then(|| combine(|m| m.kl.unwrap_or(0.0))),
            clip_ratio_low_mean: combine(|m| m.clip_ratio_low_mean),
            clip_ratio_high_mean: combine(|m| m.clip_ratio_high_mean),
            clip_ratio_region_mean: combine(|m| m.clip_ratio_region_mean),
        }
    }
}

/// The [`masked_mean`] of a whole from `(masked mean, mask sum)` of its parts.
pub fn combine_masked_means(parts: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (total, count) = parts.fold((0.0, 0.0), |(total, count), (mean, tokens)| {
        (total + mean * tokens, count + tokens)
    });
    total / f64::max(count, 1.0)
}

/// `sum(values * mask) / max(sum(mask), 1)`: TRL's global masked mean (kl, entropy, clip ratios).
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<f64> {
    let mask = mask.to_dtype(DType::F64)?;
    let total = (values.to_dtype(DType::F64)? * &mask)?
        .sum_all()?
        .to_scalar::<f64>()?;
    let count = mask.sum_all()?.to_scalar::<f64>()?;
    Ok(total / count.max(1.0))
}

// ---------------------------------------------------------------------------------------------
// Step metrics
// ---------------------------------------------------------------------------------------------

/// One logged optimizer step, serialised with TRL's metric names.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepMetrics {
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    #[serde(flatten)]
    pub rewards: RewardMetrics,
    #[serde(flatten)]
    pub policy: LossMetrics,
    #[serde(flatten)]
    pub completions: CompletionLengthMetrics,
    /// Masked mean entropy of the temperature-scaled policy (see [`masked_mean`]).
    pub entropy: f64,
    /// Prompt and completion tokens seen since the start of training.
    pub num_tokens: u64,
    /// Wall-clock seconds of the step.
    pub step_time: f64,
}

/// Reward statistics of a batch (means and unbiased stds over all completions).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RewardMetrics {
    /// Mean weighted reward.
    pub reward: f64,
    /// Std of the weighted rewards over the whole batch.
    pub reward_std: f64,
    /// `rewards/<name>/mean` and `rewards/<name>/std` per reward function.
    #[serde(flatten)]
    pub per_function: PerFunctionRewards,
    pub frac_reward_zero_std: f64,
}

/// Mean and std of each reward function's raw (unweighted) rewards, in function order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerFunctionRewards(pub Vec<FunctionReward>);

/// Statistics of one reward function over a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FunctionReward {
    pub name: String,
    pub mean: f64,
    pub std: f64,
}

impl Serialize for PerFunctionRewards {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2 * self.0.len()))?;
        for function in &self.0 {
            map.serialize_entry(&format!("rewards/{}/mean", function.name), &function.mean)?;
            map.serialize_entry(&format!("rewards/{}/std", function.name), &function.std)?;
        }
        map.end()
    }
}

impl RewardMetrics {
    /// Statistics of a batch from its raw rewards (`[B][K]`, columns named by `names`; NaN: no
    /// reward) and the advantages computed from them, over the rewarded completions only (TRL's
    /// `nanmean` and `nanstd`): a mean over none and a std over fewer than two are NaN (logged as
    /// null).
    pub fn new(
        names: &[String],
        rewards_per_func: &[Vec<f64>],
        advantages: &Advantages,
    ) -> Result<Self> {
        if let Some((row, rewards)) = rewards_per_func
            .iter()
            .enumerate()
            .find(|(_, rewards)| rewards.len() != names.len())
        {
            bail!(
                "completion {row} has {} rewards but there are {} reward functions",
                rewards.len(),
                names.len()
            );
        }
        let (reward, reward_std) =
            nan_mean_and_std(advantages.rewards.iter().map(|&r| f64::from(r)));
        let per_function = names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                // Rewards are f32 tensors in TRL.
                let column = rewards_per_func
                    .iter()
                    .map(|rewards| f64::from(rewards[k] as f32));
                let (mean, std) = nan_mean_and_std(column);
                FunctionReward {
                    name: name.clone(),
                    mean,
                    std,
                }
            })
            .collect();
        Ok(Self {
            reward,
            reward_std,
            per_function: PerFunctionRewards(per_function),
            frac_reward_zero_std: advantages.frac_reward_zero_std(),
        })
    }
}

/// Completion-length statistics of a batch (lengths up to and including the first EOS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CompletionLengthMetrics {
    #[serde(rename = "completions/mean_length")]
    pub mean_length: f64,
    #[serde(rename = "completions/min_length")]
    pub min_length: f64,
    #[serde(rename = "completions/max_length")]
    pub max_length: f64,
    /// Fraction of completions that never produced an EOS.
    #[serde(rename = "completions/clipped_ratio")]
    pub clipped_ratio: f64,
}

impl CompletionLengthMetrics {
    /// Statistics of a batch; all zero for an empty batch.
    pub fn new(batch: &CompletionBatch) -> Self {
        let count = batch.lengths.len();
        if count == 0 {
            return Self::default();
        }
        let lengths = || batch.lengths.iter().map(|&l| l as f64);
        Self {
            mean_length: lengths().sum::<f64>() / count as f64,
            min_length: lengths().fold(f64::INFINITY, f64::min),
            max_length: lengths().fold(0.0, f64::max),
            clipped_ratio: batch.truncated.iter().filter(|&&t| t).count() as f64 / count as f64,
        }
    }
}
