//! The GRPO step as pure tensor math: completion masks, group-normalised advantages, the k3 KL
//! against the reference, the policy terms (clipped, two-sided clipped, CISPO, SAPO; token- or
//! sequence-level ratios), high-entropy token masks, the loss aggregations, and the step's
//! metrics. Nothing here knows about the model, the CLI or the device.
//!
//! Everything follows TRL's `GRPOTrainer` (`_generate_and_score_completions` and `_compute_loss`)
//! for one process, so a run logs the same numbers TRL would:
//!
//! 1. [`CompletionBatch`]: the loss mask runs up to and including the first EOS; tokens after it
//!    become pad (what the model is fed); rows without EOS are truncated.
//! 2. [`weighted_rewards`] and [`group_advantages`]: `A = (r - group_mean) / (std + 1e-4)` in f32.
//! 3. [`grpo_loss`]: the policy term of the [`LossType`] (on the tokens [`high_entropy_mask`]
//!    keeps) plus `beta` × k3 KL, aggregated per [`LossType`] and scaled for gradient
//!    accumulation, with the clip and KL metrics TRL logs.
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
    /// The capped ratio (no graph) times the advantage times the log-prob, token sum divided
    /// like dapo (MiniMax-M1's CISPO).
    Cispo,
    /// A temperature-controlled sigmoid gate instead of hard clipping, aggregated like grpo
    /// (Soft Adaptive Policy Optimization).
    Sapo,
}

/// Whether importance ratios are per token or per sequence (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One ratio per token, `exp(logp - old_logp)`.
    #[default]
    Token,
    /// One ratio per sequence, the exp of the mean log-ratio over its tokens (GSPO).
    Sequence,
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
        let zero = self.std.iter().filter(|&&s| is_zero_std(s)).count();
        zero as f64 / self.std.len() as f64
    }

    /// Rows `start..start + len` (whole groups, for a micro-batch of a larger batch).
    pub fn rows(&self, start: usize, len: usize) -> Advantages {
        let rows = |v: &Vec<f32>| v[start..start + len].to_vec();
        Advantages {
            rewards: rows(&self.rewards),
            group_mean: rows(&self.group_mean),
            std: rows(&self.std),
            advantages: rows(&self.advantages),
        }
    }
}

/// `torch.isclose(std, 0)` with its default tolerance, as TRL tests for zero-std groups.
fn is_zero_std(std: f32) -> bool {
    std.abs() <= 1e-8
}

/// Whether the rewards of one group all agree (zero std, as [`Advantages::frac_reward_zero_std`]
/// counts it), or fewer than two of its completions have a reward (NaN std): such a group has
/// zero advantages and teaches the policy nothing, which is what dynamic sampling (DAPO) drops.
pub fn rewards_agree(group: &[f32]) -> bool {
    let (_, std) = nan_mean_and_std(group.iter().map(|&r| f64::from(r)));
    std.is_nan() || is_zero_std(std as f32)
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
    /// Whether the importance ratio is per token or one per sequence (GSPO).
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// KL coefficient; 0 disables the KL term (no reference model needed).
    pub beta: f64,
    /// The ratio is clipped to `[1 - epsilon_low, 1 + epsilon_high]`; cispo instead caps the
    /// ratio itself at `epsilon_high`.
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Two-sided clipping (INTELLECT-2): the unclipped ratio is also capped at `delta`, which
    /// bounds the loss of negative advantages. Clipped loss types only.
    pub delta: Option<f64>,
    /// sapo's gate temperatures for positive and for non-positive advantages.
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// The dr_grpo normaliser (micro-batch completions × `max_completion_length`).
    pub max_completion_length: usize,
    /// dapo and cispo: unmasked completion tokens of the whole generation batch (every
    /// micro-batch sampled together), TRL's `num_items_in_batch`.
    pub num_items_in_batch: usize,
    /// Micro-batches per optimizer step: grpo, bnpo, dr_grpo and sapo losses are divided by it.
    pub gradient_accumulation_steps: usize,
    /// Micro-batches per generation: dapo and cispo divide by `num_items_in_batch ×
    /// gradient_accumulation_steps / steps_per_generation`, the tokens of one optimizer step's
    /// share of the generation.
    pub steps_per_generation: usize,
    /// TRL's `use_bias_correction_kl`: multiply the per-token KL by the importance ratio.
    pub use_bias_correction_kl: bool,
}

impl LossParams {
    /// A loss of `loss_type` over one micro-batch that is its own generation and optimizer
    /// step, with TRL's defaults for the rest: token-level ratios, no `delta`, sapo
    /// temperatures 1.0 and 1.05, no bias-corrected KL.
    pub fn new(
        loss_type: LossType,
        beta: f64,
        epsilon_low: f64,
        epsilon_high: f64,
        max_completion_length: usize,
        num_items_in_batch: usize,
    ) -> Self {
        Self {
            loss_type,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            beta,
            epsilon_low,
            epsilon_high,
            delta: None,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            max_completion_length,
            num_items_in_batch,
            gradient_accumulation_steps: 1,
            steps_per_generation: 1,
            use_bias_correction_kl: false,
        }
    }

    /// Whether the loss of completions with `advantages` (`[B]`) has a zero gradient, so their
    /// backward can be skipped: without the KL term (`beta == 0`) every loss type's per-token
    /// loss is the advantage times a function of the ratio, so completions whose advantages are
    /// all zero (groups whose rewards all agree) add nothing to the gradient.
    pub fn gradient_vanishes(&self, advantages: &Tensor) -> Result<bool> {
        if self.beta != 0.0 {
            return Ok(false);
        }
        let advantages = advantages
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Ok(advantages.iter().all(|&a| a == 0.0))
    }
}

/// The tensors of one micro-batch, all `[B, C]` except `advantages` (`[B]`).
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// Per-token log-probs of the policy, attached to the graph.
    pub logp: &'a Tensor,
    /// Log-probs the completions were sampled with: `logp.detach()` when they were sampled by
    /// the weights being trained, the sampling-time log-probs otherwise.
    pub old_logp: &'a Tensor,
    /// Reference-model log-probs; required when `beta != 0`, ignored otherwise.
    pub ref_logp: Option<&'a Tensor>,
    pub advantages: &'a Tensor,
    /// Loss mask (1.0 = completion token), any float dtype.
    pub mask: &'a Tensor,
    /// The tokens the policy term keeps (`top_entropy_quantile`, see [`high_entropy_mask`]);
    /// `None` keeps every token. The KL term and the normalisers use `mask` either way.
    pub entropy_mask: Option<&'a Tensor>,
}

/// A mean kept as its parts, so that the means of the chunks of a micro-batch (or the
/// micro-batches of a step) combine exactly. Serialised as its value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mean {
    pub sum: f64,
    pub count: f64,
}

impl Mean {
    /// `sum / max(count, 1)`, TRL's global masked mean.
    pub fn value(&self) -> f64 {
        self.sum / self.count.max(1.0)
    }

    /// The plain mean of `values` (TRL's average of the values logged per micro-batch).
    pub fn of_values(values: impl Iterator<Item = f64>) -> Self {
        values.fold(Self::default(), |mean, value| Self {
            sum: mean.sum + value,
            count: mean.count + 1.0,
        })
    }

    /// `sum(values * mask)` over `sum(mask)`, in f64.
    pub fn masked(values: &Tensor, mask: &Tensor) -> Result<Self> {
        let mask = mask.to_dtype(DType::F64)?;
        let sum = (values.to_dtype(DType::F64)?.broadcast_mul(&mask))?
            .sum_all()?
            .to_scalar::<f64>()?;
        let count = mask.sum_all()?.to_scalar::<f64>()?;
        Ok(Self { sum, count })
    }
}

impl std::ops::Add for Mean {
    type Output = Mean;

    /// The mean of both parts together.
    fn add(self, other: Mean) -> Mean {
        Mean {
            sum: self.sum + other.sum,
            count: self.count + other.count,
        }
    }
}

impl Serialize for Mean {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.value())
    }
}

/// The KL and clip metrics TRL computes inside the loss (one micro-batch, or a chunk of one).
/// Token-level metrics are means over unmasked tokens; with sequence-level importance sampling
/// the clip ratios are means over sequences, as TRL computes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossMetrics {
    /// Masked mean of the per-token KL; `None` when `beta == 0` (TRL does not log it then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<Mean>,
    /// Fraction with `ratio < 1 - epsilon_low` and a negative advantage (clipped loss types).
    #[serde(
        rename = "clip_ratio/low_mean",
        skip_serializing_if = "Option::is_none"
    )]
    pub clip_ratio_low_mean: Option<Mean>,
    /// Fraction with `ratio > 1 + epsilon_high` and a positive advantage (the ratio capped at
    /// `delta` first, as TRL does).
    #[serde(
        rename = "clip_ratio/high_mean",
        skip_serializing_if = "Option::is_none"
    )]
    pub clip_ratio_high_mean: Option<Mean>,
    /// Fraction clipped either way.
    #[serde(
        rename = "clip_ratio/region_mean",
        skip_serializing_if = "Option::is_none"
    )]
    pub clip_ratio_region_mean: Option<Mean>,
    /// cispo: fraction with `ratio > epsilon_high` and a positive advantage.
    #[serde(rename = "cispo_clip_ratio", skip_serializing_if = "Option::is_none")]
    pub cispo_clip_ratio: Option<Mean>,
}

impl LossMetrics {
    /// The metrics of a micro-batch from those of its chunks: every metric is a mean over the
    /// micro-batch's tokens (or sequences), so adding the parts gives the micro-batch's own.
    pub fn of_chunks(chunks: &[LossMetrics]) -> LossMetrics {
        Self::combine(chunks, |parts| {
            parts.iter().fold(Mean::default(), |a, &b| a + b)
        })
    }

    /// The metrics of a step: the plain mean over its micro-batches of each one's value (TRL
    /// logs one value per micro-batch and averages them).
    pub fn mean_of(micro_batches: &[LossMetrics]) -> LossMetrics {
        Self::combine(micro_batches, |parts| {
            Mean::of_values(parts.iter().map(Mean::value))
        })
    }

    /// Each metric combined over `parts` by `combine`; a metric missing from any part (a
    /// loss type or beta that does not log it) is missing from the result.
    fn combine(parts: &[LossMetrics], combine: impl Fn(&[Mean]) -> Mean) -> LossMetrics {
        let metric = |get: fn(&LossMetrics) -> Option<Mean>| -> Option<Mean> {
            let values: Option<Vec<Mean>> = parts.iter().map(get).collect();
            values.filter(|v| !v.is_empty()).map(|v| combine(&v))
        };
        LossMetrics {
            kl: metric(|m| m.kl),
            clip_ratio_low_mean: metric(|m| m.clip_ratio_low_mean),
            clip_ratio_high_mean: metric(|m| m.clip_ratio_high_mean),
            clip_ratio_region_mean: metric(|m| m.clip_ratio_region_mean),
            cispo_clip_ratio: metric(|m| m.cispo_clip_ratio),
        }
    }
}

/// The result of [`grpo_loss`].
#[derive(Debug, Clone)]
pub struct GrpoLoss {
    /// Scalar to call `backward` on, already scaled for gradient accumulation exactly as TRL
    /// does: grpo, bnpo, dr_grpo and sapo divide the micro-batch loss by
    /// `gradient_accumulation_steps`; dapo and cispo divide the token sum by the generation's
    /// `num_items_in_batch × gradient_accumulation_steps / steps_per_generation`. Summing its
    /// value over the micro-batches of a step gives the step's loss as the HF Trainer logs it.
    pub loss: Tensor,
    /// The policy term (times the entropy mask) plus `beta` × KL per token, before masking.
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
    /// Completions of the micro-batch (grpo, sapo and dr_grpo divide by it).
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

/// The GRPO loss of one micro-batch (TRL's `_compute_loss`).
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
        entropy_mask,
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
    if let Some(entropy_mask) = entropy_mask {
        expect_shape("entropy_mask", entropy_mask)?;
    }
    ensure!(
        advantages.dims() == [batch],
        "advantages has shape {:?} but the batch has {batch} completions",
        advantages.dims()
    );
    ensure!(
        params.gradient_accumulation_steps > 0 && params.steps_per_generation > 0,
        "gradient_accumulation_steps and steps_per_generation must be at least 1"
    );
    ensure!(
        batch <= micro_batch.completions,
        "a chunk of {batch} completions cannot belong to a micro-batch of {}",
        micro_batch.completions
    );
    let dtype = logp.dtype();
    let mask = mask.to_dtype(dtype)?;
    let advantages = advantages.to_dtype(dtype)?.unsqueeze(1)?;

    // The importance ratio: [B, C] per token, or [B, 1] per sequence (the exp of the masked
    // mean log-ratio, GSPO).
    let log_ratio = (logp - old_logp)?;
    let log_weights = match params.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => (&log_ratio * &mask)?
            .sum_keepdim(1)?
            .broadcast_div(&mask.sum_keepdim(1)?.maximum(1.0)?)?,
    };
    let ratio = log_weights.exp()?;

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
        let kl = ((ref_minus_logp.exp()? - &ref_minus_logp)? - 1.0)?;
        Some(match params.use_bias_correction_kl {
            true => kl.broadcast_mul(&ratio)?,
            false => kl,
        })
    } else {
        None
    };

    let policy = policy_term(&ratio, &advantages, logp, params)?;
    let mut per_token_loss = policy.loss.broadcast_as((batch, width))?.contiguous()?;
    if let Some(entropy_mask) = entropy_mask {
        per_token_loss = (per_token_loss * entropy_mask.to_dtype(dtype)?)?;
    }
    if let Some(kl) = &per_token_kl {
        per_token_loss = (per_token_loss + (kl * params.beta)?)?;
    }

    let masked_sum = (&per_token_loss * &mask)?;
    let accumulation = params.gradient_accumulation_steps as f64;
    let completions = micro_batch.completions as f64;
    let loss = match params.loss_type {
        LossType::Grpo | LossType::Sapo => {
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
        LossType::Dapo | LossType::Cispo => {
            // num_items_in_batch spans the generation: rescaled to one optimizer step's share.
            let normaliser = params.num_items_in_batch.max(1) as f64 * accumulation
                / params.steps_per_generation as f64;
            (masked_sum.sum_all()? / normaliser)?
        }
    };

    let level = params.importance_sampling_level;
    let metrics = LossMetrics {
        kl: per_token_kl
            .as_ref()
            .map(|kl| Mean::masked(&kl.detach(), &mask))
            .transpose()?,
        clip_ratio_low_mean: policy
            .clipped_low
            .as_ref()
            .map(|low| ratio_mean(low, &mask, level))
            .transpose()?,
        clip_ratio_high_mean: policy
            .clipped_high
            .as_ref()
            .map(|high| ratio_mean(high, &mask, level))
            .transpose()?,
        clip_ratio_region_mean: match (&policy.clipped_low, &policy.clipped_high) {
            // An advantage is never both negative and positive, so the sum is the union.
            (Some(low), Some(high)) => Some(ratio_mean(&(low + high)?, &mask, level)?),
            _ => None,
        },
        cispo_clip_ratio: policy
            .cispo_clipped
            .as_ref()
            .map(|clipped| ratio_mean(clipped, &mask, level))
            .transpose()?,
    };
    Ok(GrpoLoss {
        loss,
        per_token_loss,
        per_token_kl,
        metrics,
    })
}

/// The policy term of the per-token loss, `[B, C]` or `[B, 1]` like the ratio, with the 0/1
/// indicators (no graph) of the tokens (or sequences) its loss type counts as clipped.
struct PolicyTerm {
    loss: Tensor,
    clipped_low: Option<Tensor>,
    clipped_high: Option<Tensor>,
    cispo_clipped: Option<Tensor>,
}

fn policy_term(
    ratio: &Tensor,
    advantages: &Tensor,
    logp: &Tensor,
    params: &LossParams,
) -> Result<PolicyTerm> {
    let dtype = ratio.dtype();
    let indicator = |t: Tensor| t.to_dtype(dtype);
    let positive = indicator(advantages.gt(0.0)?)?;
    Ok(match params.loss_type {
        LossType::Grpo | LossType::Bnpo | LossType::DrGrpo | LossType::Dapo => {
            let clipped = ratio.clamp(1.0 - params.epsilon_low, 1.0 + params.epsilon_high)?;
            let ratio = match params.delta {
                Some(delta) => ratio.minimum(delta)?,
                None => ratio.clone(),
            };
            let loss = ratio
                .broadcast_mul(advantages)?
                .minimum(&clipped.broadcast_mul(advantages)?)?
                .neg()?;
            let ratio = ratio.detach();
            let negative = indicator(advantages.lt(0.0)?)?;
            let low = indicator(ratio.lt(1.0 - params.epsilon_low)?)?.broadcast_mul(&negative)?;
            let high = indicator(ratio.gt(1.0 + params.epsilon_high)?)?.broadcast_mul(&positive)?;
            PolicyTerm {
                loss,
                clipped_low: Some(low),
                clipped_high: Some(high),
                cispo_clipped: None,
            }
        }
        LossType::Cispo => {
            // The capped ratio is a constant weight on the log-prob's gradient (MiniMax-M1).
            let ratio = ratio.detach();
            let weight = ratio.minimum(params.epsilon_high)?;
            let loss = weight
                .broadcast_mul(advantages)?
                .broadcast_mul(logp)?
                .neg()?;
            let clipped = indicator(ratio.gt(params.epsilon_high)?)?.broadcast_mul(&positive)?;
            PolicyTerm {
                loss,
                clipped_low: None,
                clipped_high: None,
                cispo_clipped: Some(clipped),
            }
        }
        LossType::Sapo => {
            // A soft gate sigmoid(t (r - 1)) * 4 / t instead of hard clipping, with t per sign of
            // the advantage.
            let ones = advantages.ones_like()?;
            let temperature = advantages.gt(0.0)?.where_cond(
                &ones.affine(params.sapo_temperature_pos, 0.0)?,
                &ones.affine(params.sapo_temperature_neg, 0.0)?,
            )?;
            let gate = (candle_nn::ops::sigmoid(&(ratio - 1.0)?.broadcast_mul(&temperature)?)?
                * 4.0)?
                .broadcast_div(&temperature)?;
            PolicyTerm {
                loss: gate.broadcast_mul(advantages)?.neg()?,
                clipped_low: None,
                clipped_high: None,
                cispo_clipped: None,
            }
        }
    })
}

/// The mean of a clip indicator: over unmasked tokens, or with sequence-level importance
/// sampling over sequences (all of them, as TRL counts them).
fn ratio_mean(indicator: &Tensor, mask: &Tensor, level: ImportanceSamplingLevel) -> Result<Mean> {
    match level {
        ImportanceSamplingLevel::Token => Mean::masked(indicator, mask),
        ImportanceSamplingLevel::Sequence => Ok(Mean {
            sum: indicator
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?,
            count: indicator.dim(0)? as f64,
        }),
    }
}

/// `sum(values * mask) / max(sum(mask), 1)`: TRL's global masked mean (kl, entropy, clip ratios).
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<f64> {
    Ok(Mean::masked(values, mask)?.value())
}

// ---------------------------------------------------------------------------------------------
// Entropy masking (top_entropy_quantile)
// ---------------------------------------------------------------------------------------------

/// The entropy at or above which a token of a micro-batch stays in the policy loss under
/// `top_entropy_quantile` ("Beyond the 80/20 rule"; TRL's `get_high_entropy_mask`): the
/// `1 - top_entropy_quantile` quantile of the entropies of the unmasked tokens, with
/// `torch.quantile`'s linear interpolation in f32. A micro-batch fed in chunks passes every
/// chunk's entropy and mask, so the quantile is the whole micro-batch's. `None` when no token is
/// unmasked.
pub fn entropy_threshold(
    chunks: &[(&Tensor, &Tensor)],
    top_entropy_quantile: f64,
) -> Result<Option<f32>> {
    ensure!(
        (0.0..=1.0).contains(&top_entropy_quantile),
        "top_entropy_quantile must lie in [0, 1], got {top_entropy_quantile}"
    );
    let mut values = Vec::new();
    for (entropy, mask) in chunks {
        let entropy = entropy
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mask = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        ensure!(
            entropy.len() == mask.len(),
            "entropy and mask differ in shape"
        );
        values.extend(
            entropy
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| m != 0.0)
                .map(|(&e, _)| e),
        );
    }
    if values.is_empty() {
        return Ok(None);
    }
    values.sort_by(f32::total_cmp);
    // torch.quantile: rank = q * (n - 1) in the input's dtype, then lerp between its neighbours.
    let q = (1.0 - top_entropy_quantile) as f32;
    let rank = q * (values.len() - 1) as f32;
    let below = rank as usize;
    let above = (rank.ceil() as usize).min(values.len() - 1);
    Ok(Some(lerp(
        values[below],
        values[above],
        rank - below as f32,
    )))
}

/// torch's `lerp(start, end, weight)` for f32.
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// 1.0 for the unmasked tokens whose entropy is at least `threshold` (see [`entropy_threshold`]),
/// else 0.0; all 0.0 without a threshold. `[B, C]` like `entropy`.
pub fn high_entropy_mask(
    entropy: &Tensor,
    mask: &Tensor,
    threshold: Option<f32>,
) -> Result<Tensor> {
    let dtype = mask.dtype();
    let Some(threshold) = threshold else {
        return Ok(mask.zeros_like()?);
    };
    let kept = entropy
        .to_dtype(DType::F32)?
        .ge(threshold)?
        .to_dtype(dtype)?;
    Ok((kept * mask.ne(0.0)?.to_dtype(dtype)?)?)
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
    /// What dynamic sampling did; `None` (not logged) without it.
    #[serde(flatten)]
    pub dynamic_sampling: Option<DynamicSamplingMetrics>,
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

/// How dynamic sampling (DAPO) filled a step's batch, averaged over its micro-batches' generations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DynamicSamplingMetrics {
    /// Generation rounds sampled: 1, plus one per round of more prompts for the groups dropped.
    #[serde(rename = "dynamic_sampling/generation_rounds")]
    pub generation_rounds: f64,
    /// Groups whose rewards all agree trained on anyway, because `max_resample_rounds` rounds
    /// did not find enough others (0 normally).
    #[serde(rename = "dynamic_sampling/filled_groups")]
    pub filled_groups: f64,
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
