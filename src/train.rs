//! `grpo train`: the GRPO loop, top to bottom in one place (as nanoGPT's train.py).
//!
//! One optimizer step:
//! 1. take `per_device_train_batch_size` prompts per micro-step from the epoch's seeded order;
//!    a generation samples `steps_per_generation` micro-steps' worth at once (default
//!    `gradient_accumulation_steps`, one generation per step) and is trained on for
//!    `num_iterations` passes;
//! 2. sample `num_generations` completions per prompt (one prefill per prompt, shared KV cache;
//!    one shard of the rows per CPU worker);
//! 3. score them with the rewards and turn rewards into group-normalised advantages over the
//!    whole generation; with `dynamic_sampling`, drop the groups whose rewards all agree and
//!    sample more prompts in their place (at most `max_resample_rounds` more rounds);
//! 4. per micro-step, `forward_batch_size` completions at a time (whole groups, or equal slices
//!    of one group): policy log-probs (grouped forward: one prompt pass for the chunk's
//!    completions of it, their gradients summed into it), reference log-probs without a graph,
//!    the GRPO loss normalised by the whole micro-batch, backward, gradients accumulated by
//!    parameter name, the chunk's graph dropped before the next one (with several CPU
//!    workers, each takes one chunk at a time; gradients are summed in the chunks' order);
//!    a chunk whose gradient is zero (`beta = 0` and every advantage 0: groups whose rewards
//!    all agree) skips its backward;
//!
//!    with `use_peft` the trained parameters are LoRA adapters on the frozen base, and the
//!    reference is that base with the adapters switched off (no second model);
//! 5. clip by global norm, AdamW at the scheduled learning rate (skipped, weights untouched, when
//!    the loss or a gradient is not finite);
//! 6. log (with the step's peak memory), save checkpoints on schedule, stop cleanly on Ctrl-C
//!    with a checkpoint. A rollout that fails (a failed external reward, say) stops the run
//!    after saving the steps done since the last checkpoint.
//!
//! Every random choice derives from (seed, step, micro-step, round, row), so a resumed run
//! continues bit for bit as if it had never stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use tracing::{info, warn};

use crate::checkpoint;
use crate::config::{Config, MAX_COUNT};
use crate::data::{DataPosition, Dataset, Example};
use crate::device::Runtime;
use crate::grpo::{
    self, Advantages, CompletionBatch, CompletionLengthMetrics, DynamicSamplingMetrics,
    ImportanceSamplingLevel, LossInputs, LossMetrics, LossParams, LossType, MicroBatchSize,
    RewardMetrics, StepMetrics,
};
use crate::memory::{self, PeakMemory};
use crate::model::{grouped_completion_logprobs, GroupedBatch, ModelFiles, Qwen2};
use crate::optim::{AdamW, AdamWParams, DecayGrouping, Gradients, LrSchedule};
use crate::prompt::{left_pad, ChatTokenizer, Prompter};
use crate::rewards::external::TrainerProgress;
use crate::rewards::{Completion, RewardSet};
use crate::run::{self, Run};
use crate::sampling::{self, GenerationSpec, SamplingParams, StopTokens};
use crate::timing::{PhaseTimes, Stopwatch};
use crate::workers::Workers;

/// Runs `grpo train` with a validated config.
pub fn train(cfg: &Config) -> Result<()> {
    // ---- setup: model, reference, tokenizer, data, rewards, optimiser -------------------------
    let runtime = Runtime::from_config(cfg)?;
    let device = runtime.device.clone();
    let output_dir = PathBuf::from(&cfg.output_dir);
    checkpoint::ensure_writable(&output_dir)?;
    let files = ModelFiles::resolve(&cfg.model_name_or_path, &cfg.model_revision)?;
    memory::ensure_fits(
        &device,
        &files.config,
        runtime.compute_dtype,
        &[
            (
                "per_device_train_batch_size",
                cfg.per_device_train_batch_size,
            ),
            ("num_generations", cfg.num_generations),
        ],
        // Not max_prompt_length: prompts take only the positions they need.
        &[("max_completion_length", cfg.max_completion_length)],
    )?;
    // Before the first tensor operation: it may make candle's kernels single-threaded.
    let workers = Workers::for_cpu(cfg.cpu_workers, &device, files.config.hidden_size)?;
    let tokenizer = Arc::new(ChatTokenizer::from_dir(&files.tokenizer_dir()?)?);
    let prompter = Prompter::from_config(tokenizer.clone(), cfg)?;
    let stop = StopTokens::resolve(&files, &tokenizer)?;
    let policy = run::load_policy(cfg, &files, &runtime)?;
    let reference = match cfg.beta {
        0.0 => None,
        // LoRA: the policy's own frozen base, adapters off; no reference weights are loaded.
        _ if cfg.use_peft => Some(policy.without_adapters()?),
        _ => Some(
            Qwen2::load_reference(&files, &device)?.with_compute_dtype(runtime.compute_dtype)?,
        ),
    };
    let dataset = Dataset::from_config(cfg, &cfg.dataset_train_split)?;
    let rewards = RewardSet::from_config(cfg)?;
    let total_steps = total_optimizer_steps(cfg, dataset.len())?;
    let schedule = LrSchedule::from_config(cfg, total_steps);
    let mut optimizer = AdamW::new(
        policy.named_parameters(),
        AdamWParams::from_config(cfg),
        DecayGrouping::HfTrainer,
    )?;
    let mut run = Run::start(cfg, &files, &policy, &mut optimizer, total_steps)?;
    let progress =
        crate::progress::Progress::new(total_steps as u64, run.state.global_step, "train");
    let generations = Generations::from_config(cfg);
    warn_on_token_sums_of_sequence_ratios(cfg);
    info!(
        "training {} on {} prompts: {total_steps} steps of {} prompts x {} completions, {} \
         worker(s)",
        files.source,
        dataset.len(),
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
        cfg.num_generations,
        workers.count()
    );

    // ---- the loop: one iteration per optimizer step -------------------------------------------
    // A checkpoint saved inside a generation (one trained on by later micro-steps) holds it.
    let mut generation: Vec<Rollout> = match &run.resumed_from {
        Some(dir) if !generations.starts(run.state.global_step, 0) => {
            load_rollouts(dir, &device, cfg.steps_per_generation())?
        }
        _ => Vec::new(),
    };
    let mut meters = Meters {
        memory: PeakMemory::new(&device),
        stopwatch: Stopwatch::new(&device),
    };
    while run.state.global_step < total_steps as u64 {
        let started = Instant::now();
        let step = run.state.global_step;
        meters.memory.reset();
        let mut times = PhaseTimes::default();

        // 1-3. the step's micro-batches: slices of the current generation, a new one sampled,
        // scored and turned into advantages every steps_per_generation × num_iterations
        // micro-steps (later slices and passes use the sampling-time log-probs as the old
        // policy, as TRL does).
        let (data_before, generation_before) = (run.state.data, generation.clone());
        let mut rollouts = Vec::with_capacity(cfg.gradient_accumulation_steps);
        let mut generated_tokens = 0;
        for micro in 0..cfg.gradient_accumulation_steps {
            if generations.starts(step, micro) || generation.is_empty() {
                let sampler = Sampler {
                    // Sampling needs no graph: a frozen copy in the compute dtype, cast once.
                    model: policy.inference_copy()?,
                    workers: &workers,
                    prompter: &prompter,
                    rewards: &rewards,
                    progress: TrainerProgress {
                        global_step: step,
                        max_steps: total_steps as u64,
                        epoch: run.state.epoch,
                    },
                    stop: &stop,
                    params: SamplingParams::from_config(cfg),
                    stopwatch: &meters.stopwatch,
                    cfg,
                };
                let sampled = generate(&sampler, &dataset, &mut run.state.data, step, micro)
                    .with_context(|| format!("step {}: sampling the rollout", step + 1));
                let sampled = match sampled {
                    Ok(sampled) => sampled,
                    Err(error) => {
                        // E.g. a failed external reward: keep the steps done.
                        run.state.data = data_before;
                        let pending = |dir: &Path| match generations.starts(step, 0) {
                            true => Ok(()),
                            false => save_rollouts(dir, &generation_before),
                        };
                        return Err(run.stop_with(&policy, &optimizer, error, &pending));
                    }
                };
                times.add(&sampled.times);
                generated_tokens += sampled.generated_tokens;
                generation = sampled.rollouts;
                meters.memory.sample();
            }
            rollouts.push(generation[generations.slice(step, micro)].clone());
        }
        times.set_generated_tokens(generated_tokens);

        // 4. loss and gradients, micro-batch by micro-batch, chunk by chunk.
        let mut grads = Gradients::new();
        let mut loss_value = 0.0;
        let mut micro_metrics = Vec::new();
        let mut entropy = Vec::new();
        for (index, rollout) in rollouts.iter().enumerate() {
            let loss_params = LossParams::from_config(cfg, rollout.generation_items);
            let micro = micro_step(
                &policy,
                // LoRA dropout draws its masks from (seed, step, micro-step): resuming redraws
                // them.
                dropout_seed(cfg.seed, step, index as u64),
                reference.as_ref(),
                &rollout.batch,
                cfg,
                &loss_params,
                &workers,
                &mut grads,
                &meters,
            )?;
            times.add(&micro.times);
            loss_value += micro.loss;
            micro_metrics.push(micro.metrics);
            entropy.push(micro.entropy);
        }

        // 5. clip, then step unless something is not finite.
        let lr = schedule.lr(step as usize);
        let ((grad_norm, applied), optimizer_time) = meters.stopwatch.time(|| {
            workers
                .install(|| optimizer.clipped_step(&mut grads, loss_value, cfg.max_grad_norm, lr))
        })?;
        times.optimizer = optimizer_time;
        if !applied {
            run.state.skipped_steps += 1;
            let file = log_skipped_batch(&output_dir, step + 1, &rollouts)?;
            warn!(
                "step {}: loss {loss_value} / grad_norm {grad_norm} not finite; step skipped, \
                 weights untouched (batch written to {})",
                step + 1,
                file.display()
            );
        }
        run.state.global_step += 1;
        run.state.epoch =
            run.state.data.epoch as f64 + run.state.data.index as f64 / dataset.len() as f64;
        run.state.num_tokens += rollouts.iter().map(Rollout::num_tokens).sum::<u64>();

        // 6. log and save.
        let metrics = step_metrics(
            &rollouts,
            &rewards,
            StepTotals {
                loss: loss_value,
                grad_norm,
                lr,
                num_tokens: run.state.num_tokens,
                step_time: started.elapsed().as_secs_f64(),
            },
            &micro_metrics,
            &entropy,
        )?;
        let step = run.state.global_step;
        if cfg.logging_steps > 0 && step % cfg.logging_steps as u64 == 0 {
            let mut values = serde_json::to_value(&metrics)?
                .as_object()
                .cloned()
                .context("step metrics serialise to an object")?;
            values.insert("epoch".into(), run.state.epoch.into());
            if let serde_json::Value::Object(phases) = serde_json::to_value(times)? {
                values.extend(phases);
            }
            if let Some(peak) = meters.memory.peak_gib() {
                values.insert(memory::PEAK_METRIC.into(), peak.into());
            }
            run.log(&values)?;
            progress.log_step(
                step,
                &format!(
                    "reward {:.3} kl {:.4}",
                    metrics.rewards.reward,
                    metrics.policy.kl.map_or(0.0, |kl| kl.value())
                ),
            );
        }
        if cfg.log_completions && step % cfg.logging_steps as u64 == 0 {
            write_completions(&output_dir, step, &rollouts)?;
        }
        progress.set(step);
        let pending = |dir: &Path| match generations.starts(step, 0) {
            true => Ok(()),
            false => save_rollouts(dir, &generation),
        };
        if run.save_if_due_with(&policy, &optimizer, &pending)? {
            return Ok(());
        }
    }
    progress.finish();
    run.finish(&policy)
}

/// TRL's warning: with sequence-level ratios, the losses that sum over tokens weight each
/// sequence by its length instead of optimising GSPO's per-sequence objective.
fn warn_on_token_sums_of_sequence_ratios(cfg: &Config) {
    let sums_tokens = matches!(
        cfg.loss_type,
        LossType::Bnpo | LossType::DrGrpo | LossType::Dapo | LossType::Cispo
    );
    if cfg.importance_sampling_level == ImportanceSamplingLevel::Sequence && sums_tokens {
        warn!(
            "importance_sampling_level = \"sequence\" with loss_type = {} sums per-token terms, \
             weighting each sequence by its length; GSPO's setup is loss_type = \"grpo\"",
            serde_json::json!(cfg.loss_type)
        );
    }
}

/// Where micro-steps fall in the generations, as TRL schedules them: a generation of
/// `steps_per_generation` micro-batches is sampled every `steps_per_generation ×
/// num_iterations` micro-steps, and micro-step `s` (counted over the whole run) trains on its
/// micro-batch `s % steps_per_generation`.
#[derive(Debug, Clone, Copy)]
struct Generations {
    accumulation: u64,
    steps_per_generation: u64,
    every: u64,
}

impl Generations {
    fn from_config(cfg: &Config) -> Self {
        let steps_per_generation = cfg.steps_per_generation() as u64;
        Self {
            accumulation: cfg.gradient_accumulation_steps as u64,
            steps_per_generation,
            every: steps_per_generation * cfg.num_iterations as u64,
        }
    }

    fn micro_step(&self, step: u64, micro: usize) -> u64 {
        step * self.accumulation + micro as u64
    }

    /// Whether micro-step `micro` of optimizer step `step` starts a new generation.
    fn starts(&self, step: u64, micro: usize) -> bool {
        self.micro_step(step, micro) % self.every == 0
    }

    /// The micro-batch of its generation that micro-step `micro` of `step` trains on.
    fn slice(&self, step: u64, micro: usize) -> usize {
        (self.micro_step(step, micro) % self.steps_per_generation) as usize
    }

    /// Whether some micro-batch is trained on after an optimizer step changed the weights it
    /// was sampled with, so the loss needs the sampling-time log-probs (TRL's condition: a
    /// generation's passes do not fit in whole within optimizer steps).
    fn need_old_logprobs(&self) -> bool {
        self.accumulation % self.every != 0
    }
}

/// Whether sampling records each token's entropy, so that a chunk whose gradient vanishes
/// needs no forward pass: the entropy is all such a chunk's forward yields (its loss is zero and
/// no token of it counts as clipped), and sampling's is the same quantity (the same fused op on
/// the same policy's logits, summed in another order) when the policy samples and trains with
/// the same weights and the same forward. So: no KL term (with `beta` > 0 every chunk has a
/// gradient), no `top_entropy_quantile` mask (it needs every chunk's forward entropies), every
/// generation trained on before an optimizer step changes the weights, and no LoRA dropout
/// (the training forward applies it, sampling does not).
fn entropies_from_sampling(cfg: &Config) -> bool {
    cfg.beta == 0.0
        && cfg.top_entropy_quantile >= 1.0
        && !Generations::from_config(cfg).need_old_logprobs()
        && !(cfg.use_peft && cfg.lora_dropout > 0.0)
}

/// The sampling-time entropies of `groups`' completions as `[rows, width]` (0 past each
/// completion, `width` being the longest), when sampling recorded them.
fn sampled_entropies(
    groups: &[SampledGroup],
    width: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let mut flat = Vec::new();
    for group in groups {
        let Some(entropies) = &group.entropies else {
            return Ok(None);
        };
        for row in entropies {
            flat.extend_from_slice(row);
            flat.extend(std::iter::repeat_n(0.0, width - row.len()));
        }
    }
    let rows = flat.len() / width.max(1);
    Ok(Some(Tensor::from_vec(flat, (rows, width), device)?))
}

/// One micro-batch of sampled experience: prompts, completions, rewards and advantages.
#[derive(Clone)]
struct Rollout {
    examples: Vec<Example>,
    completions: CompletionBatch,
    texts: Vec<String>,
    rewards_per_func: Vec<Vec<f64>>,
    advantages: Advantages,
    /// What the training forward needs, as tensors.
    batch: TrainBatch,
    /// Loss-mask tokens of the whole generation this micro-batch was sampled in (TRL's
    /// `num_items_in_batch`, the dapo and cispo normaliser).
    generation_items: usize,
    /// What dynamic sampling did to fill that generation; `None` without it.
    dynamic_sampling: Option<DynamicSampling>,
}

/// How dynamic sampling filled a generation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct DynamicSampling {
    /// Generation rounds run (the first plus the resampling ones).
    rounds: usize,
    /// Groups whose rewards all agree kept because `max_resample_rounds` ran out.
    filled_groups: usize,
    /// Fraction of every group sampled (in all rounds) whose rewards all agree.
    frac_reward_zero_std: f64,
}

/// Checkpoint files holding the generation of a checkpoint saved inside one (one that later
/// micro-steps still train on): its rollouts' tensors, and their texts and lengths.
const ROLLOUTS_TENSORS: &str = "rollouts.safetensors";
const ROLLOUTS_JSON: &str = "rollouts.json";

/// What of a rollout is not a tensor, as saved in [`ROLLOUTS_JSON`].
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedRollout {
    /// (question, answer) per prompt.
    examples: Vec<(String, String)>,
    texts: Vec<String>,
    lengths: Vec<usize>,
    truncated: Vec<bool>,
    group_size: usize,
    /// Absent from checkpoints written before dynamic sampling existed.
    #[serde(default)]
    dynamic_sampling: Option<DynamicSampling>,
}

/// Writes `rollouts` into the checkpoint folder `dir`, exactly (tensors as safetensors), so a
/// run resumed from it trains on the same completions, advantages and old log-probs.
fn save_rollouts(dir: &Path, rollouts: &[Rollout]) -> Result<()> {
    let cpu = Device::Cpu;
    let mut tensors = std::collections::HashMap::new();
    let mut saved = Vec::with_capacity(rollouts.len());
    for (i, r) in rollouts.iter().enumerate() {
        let b = &r.batch;
        let rows = r.rewards_per_func.len();
        let per_func: Vec<f64> = r.rewards_per_func.concat();
        let advantages = &r.advantages;
        let mut put = |name: &str, t: Tensor| tensors.insert(format!("{i}.{name}"), t);
        put("prompt_ids", b.prompt_ids.to_device(&cpu)?);
        put("prompt_mask", b.prompt_mask.to_device(&cpu)?);
        put("completion_ids", b.completion_ids.to_device(&cpu)?);
        put("mask", b.mask.to_device(&cpu)?);
        put("advantages", b.advantages.to_device(&cpu)?);
        if let Some(old) = &b.old_logp {
            put("old_logp", old.to_device(&cpu)?);
        }
        if let Some(entropy) = &b.sampled_entropy {
            put("sampled_entropy", entropy.to_device(&cpu)?);
        }
        let width = per_func.len().checked_div(rows).unwrap_or(0);
        put(
            "rewards_per_func",
            Tensor::from_vec(per_func, (rows, width), &cpu)?,
        );
        put("rewards", Tensor::new(advantages.rewards.as_slice(), &cpu)?);
        put(
            "group_mean",
            Tensor::new(advantages.group_mean.as_slice(), &cpu)?,
        );
        put("std", Tensor::new(advantages.std.as_slice(), &cpu)?);
        put(
            "advantage_values",
            Tensor::new(advantages.advantages.as_slice(), &cpu)?,
        );
        saved.push(SavedRollout {
            examples: r
                .examples
                .iter()
                .map(|e| (e.question.clone(), e.answer.clone()))
                .collect(),
            texts: r.texts.clone(),
            lengths: r.completions.lengths.clone(),
            truncated: r.completions.truncated.clone(),
            group_size: b.group_size,
            dynamic_sampling: r.dynamic_sampling,
        });
    }
    candle_core::safetensors::save(&tensors, dir.join(ROLLOUTS_TENSORS))
        .context("cannot write the pending rollouts")?;
    std::fs::write(dir.join(ROLLOUTS_JSON), serde_json::to_string(&saved)?)
        .context("cannot write the pending rollouts")
}

/// The generation [`save_rollouts`] wrote into checkpoint `dir`, on `device`: `micro_batches`
/// rollouts, else an error naming the setting that changed. A checkpoint without one (written
/// before they were saved) gets a warning and a fresh generation.
fn load_rollouts(dir: &Path, device: &Device, micro_batches: usize) -> Result<Vec<Rollout>> {
    let json_path = dir.join(ROLLOUTS_JSON);
    if !json_path.is_file() {
        warn!(
            "{} holds no {ROLLOUTS_JSON}: the rollout of its step is generated again, so the run \
             does not continue exactly",
            dir.display()
        );
        return Ok(Vec::new());
    }
    let bad = || {
        format!(
            "{} is damaged: resume from another checkpoint",
            json_path.display()
        )
    };
    let saved: Vec<SavedRollout> =
        serde_json::from_str(&std::fs::read_to_string(&json_path).with_context(bad)?)
            .with_context(bad)?;
    ensure!(
        saved.len() == micro_batches,
        "{} holds a generation of {} micro-batches but steps_per_generation is now \
         {micro_batches}: resume with the steps_per_generation (or generation_batch_size and \
         per_device_train_batch_size) it was saved with",
        json_path.display(),
        saved.len()
    );
    let tensors = candle_core::safetensors::load(dir.join(ROLLOUTS_TENSORS), &Device::Cpu)
        .with_context(|| format!("cannot read {}", dir.join(ROLLOUTS_TENSORS).display()))?;
    let mut generation = saved
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let get = |name: &str| {
                tensors
                    .get(&format!("{i}.{name}"))
                    .cloned()
                    .with_context(|| {
                        format!("{ROLLOUTS_TENSORS} in {} lacks {i}.{name}", dir.display())
                    })
            };
            let on_device = |name: &str| -> Result<Tensor> { Ok(get(name)?.to_device(device)?) };
            let completion_ids = get("completion_ids")?;
            let mask = get("mask")?;
            let batch = TrainBatch {
                prompt_ids: on_device("prompt_ids")?,
                prompt_mask: on_device("prompt_mask")?,
                completion_ids: completion_ids.to_device(device)?,
                mask: mask.to_device(device)?,
                advantages: on_device("advantages")?,
                old_logp: match tensors.contains_key(&format!("{i}.old_logp")) {
                    true => Some(on_device("old_logp")?),
                    false => None,
                },
                sampled_entropy: match tensors.contains_key(&format!("{i}.sampled_entropy")) {
                    true => Some(on_device("sampled_entropy")?),
                    false => None,
                },
                group_size: s.group_size,
            };
            Ok(Rollout {
                examples: s
                    .examples
                    .into_iter()
                    .map(|(question, answer)| Example {
                        question,
                        answer,
                        columns: None,
                    })
                    .collect(),
                completions: CompletionBatch {
                    ids: completion_ids.to_vec2()?,
                    mask: mask.to_vec2()?,
                    lengths: s.lengths,
                    truncated: s.truncated,
                },
                texts: s.texts,
                rewards_per_func: get("rewards_per_func")?.to_vec2()?,
                advantages: Advantages {
                    rewards: get("rewards")?.to_vec1()?,
                    group_mean: get("group_mean")?.to_vec1()?,
                    std: get("std")?.to_vec1()?,
                    advantages: get("advantage_values")?.to_vec1()?,
                },
                batch,
                generation_items: 0,
                dynamic_sampling: s.dynamic_sampling,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let generation_items = generation.iter().map(|r| r.completions.num_items()).sum();
    for rollout in &mut generation {
        rollout.generation_items = generation_items;
    }
    Ok(generation)
}

/// Prompts with `group_size` completions each, as the training forward takes them: a whole
/// micro-batch, or a chunk of one.
#[derive(Clone)]
struct TrainBatch {
    /// `[prompts, P]`, left-padded.
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    /// `[prompts * group_size, C]`, right-padded; row `p * group_size + g`.
    completion_ids: Tensor,
    /// The loss mask, `[prompts * group_size, C]`.
    mask: Tensor,
    /// `[prompts * group_size]`.
    advantages: Tensor,
    /// Sampling-time log-probs, kept when the micro-batch is trained on after the weights it
    /// was sampled with changed ([`Generations::need_old_logprobs`]).
    old_logp: Option<Tensor>,
    /// Sampling-time entropies `[prompts * group_size, C]` (0 past each completion), when
    /// recorded ([`entropies_from_sampling`]): a chunk with a zero gradient needs no forward.
    sampled_entropy: Option<Tensor>,
    group_size: usize,
}

impl TrainBatch {
    fn grouped(&self) -> GroupedBatch<'_> {
        GroupedBatch {
            prompt_ids: &self.prompt_ids,
            prompt_mask: &self.prompt_mask,
            completion_ids: &self.completion_ids,
            completion_mask: &self.mask,
            group_size: self.group_size,
        }
    }

    /// The batch `size` completions at a time (`0`: all at once). A multiple of the group size
    /// takes whole groups; a divisor of it takes equal slices of one group, each with the
    /// group's prompt.
    fn chunks(&self, size: usize) -> Result<Vec<TrainBatch>> {
        let rows = self.completion_ids.dim(0)?;
        if size == 0 || size >= rows {
            return Ok(vec![self.clone()]);
        }
        let group = self.group_size;
        ensure!(
            group % size == 0 || size % group == 0,
            "forward_batch_size = {size} neither divides nor is a multiple of num_generations = \
             {group}: choose 0, a divisor or a multiple"
        );
        (0..rows)
            .step_by(size)
            .map(|start| {
                let len = size.min(rows - start);
                // The chunk's rows, cut to its longest completion (masks are prefixes): a
                // chunk of short completions does not pay for another chunk's long one.
                let mask = self.mask.narrow(0, start, len)?;
                let width = (mask.sum(1)?.max(0)?.to_scalar::<f32>()? as usize).max(1);
                let cut = |t: &Tensor| t.narrow(0, start, len)?.narrow(1, 0, width);
                let (first_prompt, prompts) = (start / group, len.div_ceil(group));
                Ok(TrainBatch {
                    prompt_ids: self.prompt_ids.narrow(0, first_prompt, prompts)?,
                    prompt_mask: self.prompt_mask.narrow(0, first_prompt, prompts)?,
                    completion_ids: cut(&self.completion_ids)?,
                    mask: cut(&self.mask)?,
                    advantages: self.advantages.narrow(0, start, len)?,
                    old_logp: self.old_logp.as_ref().map(cut).transpose()?,
                    sampled_entropy: self.sampled_entropy.as_ref().map(cut).transpose()?,
                    group_size: len.min(group),
                })
            })
            .collect()
    }
}

/// What a step measures about itself: its peak memory and the time of each phase.
struct Meters {
    memory: PeakMemory,
    stopwatch: Stopwatch,
}

/// What one micro-step adds to the step: its loss, metrics and phase times (its gradients go
/// into `grads`).
struct MicroStep {
    loss: f64,
    metrics: LossMetrics,
    entropy: f64,
    times: PhaseTimes,
}

/// Loss and gradients of one micro-batch, in chunks ([`chunk_size`]): each chunk's loss is
/// normalised by the whole micro-batch and back-propagated, its graph dropped before its
/// gradients join `grads`, so the sums equal one pass over the whole micro-batch. The workers
/// take one chunk each at a time; the gradients are summed in the chunks' order. A chunk whose
/// gradient is zero runs forward only, or no pass at all ([`zero_gradient_chunk`]).
#[allow(clippy::too_many_arguments)]
fn micro_step(
    policy: &Qwen2,
    dropout_seed: u64,
    reference: Option<&Qwen2>,
    batch: &TrainBatch,
    cfg: &Config,
    loss_params: &LossParams,
    workers: &Workers,
    grads: &mut Gradients,
    meters: &Meters,
) -> Result<MicroStep> {
    let micro_batch = MicroBatchSize::of(&batch.mask)?;
    let size = chunk_size(
        cfg.forward_batch_size,
        batch.mask.dim(0)?,
        batch.group_size,
        workers.count(),
    );
    let chunks = batch.chunks(size)?;
    // LoRA dropout: each chunk draws its masks from a seed of its own, whichever worker runs it.
    let training = |chunk: usize| policy.in_training(derive_seed(dropout_seed, chunk as u64, 0));
    let mut loss_value = 0.0;
    let mut metrics = Vec::new();
    let mut entropy = grpo::Mean::default();
    let mut times = PhaseTimes::default();
    // top_entropy_quantile keeps the micro-batch's highest-entropy tokens: in chunks, a first
    // pass without backward finds the whole micro-batch's threshold.
    let top_entropy = match cfg.top_entropy_quantile < 1.0 {
        false => TopEntropy::AllTokens,
        true if chunks.len() == 1 => TopEntropy::ChunkThreshold,
        true => {
            let (threshold, time) = meters
                .stopwatch
                .time(|| micro_batch_entropy_threshold(&training, &chunks, cfg, workers))?;
            times.policy += time;
            TopEntropy::Threshold(threshold)
        }
    };
    // Without the KL term, a chunk whose advantages are all zero (groups whose rewards all
    // agree) has a zero gradient: it runs forward only, for its entropy and its share of the
    // metrics, or no pass when sampling recorded its entropies. Chunks with a backward go
    // first, so that a wave of workers holds chunks of like cost; the gradients are summed in
    // the chunks' order all the same, and so is the rest.
    let backward: Vec<bool> = chunks
        .iter()
        .map(|chunk| Ok(!loss_params.gradient_vanishes(&chunk.advantages)?))
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by_key(|&index| !backward[index]);
    let mut done_chunks: Vec<Option<ChunkStep>> = chunks.iter().map(|_| None).collect();
    for wave in order.chunks(workers.count()) {
        let (done, seconds) = meters.stopwatch.time(|| {
            workers.map(wave.to_vec(), |index| {
                chunk_step(
                    &training(index),
                    reference,
                    &chunks[index],
                    cfg,
                    ChunkLoss {
                        params: loss_params,
                        micro_batch,
                        top_entropy,
                        backward: backward[index],
                    },
                    meters,
                )
            })
        })?;
        // The wave's wall-clock time, shared between the phases as the workers spent it.
        let policy_seconds: f64 = done.iter().map(|c| c.policy_seconds).sum();
        let reference_seconds: f64 = done.iter().map(|c| c.reference_seconds).sum();
        let reference_share = reference_seconds / (policy_seconds + reference_seconds).max(1e-12);
        times.reference += seconds * reference_share;
        times.policy += seconds * (1.0 - reference_share);
        for (&index, mut chunk) in wave.iter().zip(done) {
            if let Some(chunk_grads) = chunk.grads.take() {
                grads.accumulate(policy.named_parameters(), &chunk_grads)?;
            }
            done_chunks[index] = Some(chunk);
        }
    }
    if !backward.contains(&true) {
        // No backward ran: zeros for every parameter, as torch's backward would give.
        grads.add_zeros_where_missing(policy.named_parameters())?;
    }
    for chunk in done_chunks.into_iter().flatten() {
        loss_value += chunk.loss;
        metrics.push(chunk.metrics);
        entropy = entropy + chunk.entropy;
    }
    Ok(MicroStep {
        loss: loss_value,
        metrics: LossMetrics::of_chunks(&metrics),
        entropy: entropy.value(),
        times,
    })
}

/// Completions per training chunk: `forward_batch_size`; with several workers and
/// `forward_batch_size = 0`, one group per chunk (each cut to its own longest completion), or
/// equal slices of a group when there are fewer groups than workers.
fn chunk_size(forward_batch_size: usize, rows: usize, group: usize, workers: usize) -> usize {
    if forward_batch_size != 0 || workers <= 1 {
        return forward_batch_size;
    }
    let per_worker = rows.div_ceil(workers).min(group);
    (per_worker..=group)
        .find(|size| group % size == 0)
        .unwrap_or(group)
}

/// Which tokens the policy term of a chunk's loss keeps (`top_entropy_quantile`).
#[derive(Debug, Clone, Copy)]
enum TopEntropy {
    /// Every completion token (`top_entropy_quantile = 1`).
    AllTokens,
    /// Those at or above the chunk's own threshold: the chunk is the whole micro-batch.
    ChunkThreshold,
    /// Those at or above the micro-batch's threshold, found before the chunks' passes.
    Threshold(Option<f32>),
}

/// How a chunk's loss is made: the loss parameters, the micro-batch it is normalised by, the
/// tokens its policy term keeps and whether it is back-propagated.
#[derive(Clone, Copy)]
struct ChunkLoss<'a> {
    params: &'a LossParams,
    micro_batch: MicroBatchSize,
    top_entropy: TopEntropy,
    /// `false` for a chunk whose gradient is zero ([`LossParams::gradient_vanishes`]): forward
    /// only, or no pass at all when sampling recorded its entropies ([`zero_gradient_chunk`]).
    backward: bool,
}

/// One chunk's loss and gradients, and the seconds its policy and reference passes took.
struct ChunkStep {
    loss: f64,
    metrics: LossMetrics,
    entropy: grpo::Mean,
    /// `None` when it ran no backward ([`ChunkLoss::backward`]).
    grads: Option<GradStore>,
    policy_seconds: f64,
    reference_seconds: f64,
}

/// Forward passes, loss and backward (unless its gradient is zero) of one chunk (see
/// [`micro_step`]); a chunk whose gradient is zero and whose entropies sampling recorded runs
/// no pass ([`zero_gradient_chunk`]).
fn chunk_step(
    policy: &Qwen2,
    reference: Option<&Qwen2>,
    chunk: &TrainBatch,
    cfg: &Config,
    how: ChunkLoss,
    meters: &Meters,
) -> Result<ChunkStep> {
    if let (false, Some(entropy)) = (how.backward, &chunk.sampled_entropy) {
        return zero_gradient_chunk(chunk, entropy, how, meters);
    }
    let (policy_logps, forward_time) = meters
        .stopwatch
        .time(|| grouped_completion_logprobs(policy, &chunk.grouped(), cfg.temperature, true))?;
    let chunk_entropy = policy_logps
        .entropy
        .as_ref()
        .context("the policy forward returns entropies")?;
    let threshold = match how.top_entropy {
        TopEntropy::AllTokens => None,
        TopEntropy::ChunkThreshold => Some(grpo::entropy_threshold(
            &[(chunk_entropy, &chunk.mask)],
            cfg.top_entropy_quantile,
        )?),
        TopEntropy::Threshold(threshold) => Some(threshold),
    };
    let entropy_mask = threshold
        .map(|threshold| grpo::high_entropy_mask(chunk_entropy, &chunk.mask, threshold))
        .transpose()?;
    let (ref_logps, reference_seconds) = meters.stopwatch.time(|| {
        reference
            .map(|model| {
                grouped_completion_logprobs(model, &chunk.grouped(), cfg.temperature, false)
                    .map(|logps| logps.logprobs)
            })
            .transpose()
    })?;
    meters.memory.sample();
    let old_logp = match &chunk.old_logp {
        Some(old) => old.clone(),
        None => policy_logps.logprobs.detach(),
    };
    let loss = grpo::chunk_grpo_loss(
        &LossInputs {
            logp: &policy_logps.logprobs,
            old_logp: &old_logp,
            ref_logp: ref_logps.as_ref(),
            advantages: &chunk.advantages,
            mask: &chunk.mask,
            entropy_mask: entropy_mask.as_ref(),
        },
        how.params,
        how.micro_batch,
    )?;
    let ((chunk_loss, grads), backward_time) = meters.stopwatch.time(|| -> Result<_> {
        let grads = how.backward.then(|| loss.loss.backward()).transpose()?;
        Ok((loss.loss.to_scalar::<f32>()? as f64, grads))
    })?;
    meters.memory.sample();
    Ok(ChunkStep {
        loss: chunk_loss,
        metrics: loss.metrics,
        entropy: grpo::Mean::masked(chunk_entropy, &chunk.mask)?,
        grads,
        policy_seconds: forward_time + backward_time,
        reference_seconds,
    })
}

/// [`chunk_step`] of a chunk whose gradient vanishes, without a forward pass: its loss and
/// metrics from log-probs equal to their detached selves, as the forward gives them (every
/// ratio 1; its advantages are zero, so the loss is zero and no token counts as clipped), its
/// entropy from sampling ([`entropies_from_sampling`]).
fn zero_gradient_chunk(
    chunk: &TrainBatch,
    sampled_entropy: &Tensor,
    how: ChunkLoss,
    meters: &Meters,
) -> Result<ChunkStep> {
    let ((loss, metrics, entropy), seconds) = meters.stopwatch.time(|| -> Result<_> {
        let logp = chunk.mask.zeros_like()?;
        let loss = grpo::chunk_grpo_loss(
            &LossInputs {
                logp: &logp,
                old_logp: &logp,
                ref_logp: None,
                advantages: &chunk.advantages,
                mask: &chunk.mask,
                entropy_mask: None,
            },
            how.params,
            how.micro_batch,
        )?;
        let entropy = grpo::Mean::masked(sampled_entropy, &chunk.mask)?;
        Ok((loss.loss.to_scalar::<f32>()? as f64, loss.metrics, entropy))
    })?;
    Ok(ChunkStep {
        loss,
        metrics,
        entropy,
        grads: None,
        policy_seconds: seconds,
        reference_seconds: 0.0,
    })
}

/// The `top_entropy_quantile` threshold of a micro-batch fed in `chunks`: their entropies
/// under `training(chunk index)` (the policy chunk `i` is trained with), from forward passes
/// whose graphs are dropped at once.
fn micro_batch_entropy_threshold(
    training: &(dyn Fn(usize) -> Qwen2 + Sync),
    chunks: &[TrainBatch],
    cfg: &Config,
    workers: &Workers,
) -> Result<Option<f32>> {
    let entropies = workers.map(chunks.iter().enumerate().collect(), |(index, chunk)| {
        let policy = training(index);
        grouped_completion_logprobs(&policy, &chunk.grouped(), cfg.temperature, true)?
            .entropy
            .context("the policy forward returns entropies")
    })?;
    let parts: Vec<(&Tensor, &Tensor)> = entropies
        .iter()
        .zip(chunks)
        .map(|(entropy, chunk)| (entropy, &chunk.mask))
        .collect();
    grpo::entropy_threshold(&parts, cfg.top_entropy_quantile)
}

/// What sampling a generation needs: a frozen copy of the policy and the pieces that turn
/// prompts into scored completions.
struct Sampler<'a> {
    model: Qwen2,
    /// Sampling runs one shard of the rows per worker.
    workers: &'a Workers,
    prompter: &'a Prompter,
    rewards: &'a RewardSet,
    /// Where training stands, for the reward functions.
    progress: TrainerProgress,
    stop: &'a StopTokens,
    params: SamplingParams,
    stopwatch: &'a Stopwatch,
    cfg: &'a Config,
}

/// One prompt with its `num_generations` sampled completions and their rewards.
struct SampledGroup {
    example: Example,
    prompt_ids: Vec<u32>,
    /// Each completion's sampled ids (as long as it was sampled).
    completions: Vec<Vec<u32>>,
    /// Each completion's entropy at each of its tokens, when sampling recorded them
    /// ([`entropies_from_sampling`]).
    entropies: Option<Vec<Vec<f32>>>,
    texts: Vec<String>,
    rewards_per_func: Vec<Vec<f64>>,
    /// The weighted rewards.
    rewards: Vec<f32>,
}

/// A sampled generation with the time it took.
struct SampledGeneration {
    /// `steps_per_generation` micro-batches.
    rollouts: Vec<Rollout>,
    times: PhaseTimes,
    /// Completion tokens sampled, those of dropped groups included.
    generated_tokens: usize,
}

/// Samples the generation that starts at micro-step `micro` of optimizer step `step`:
/// `steps_per_generation` micro-batches of `per_device_train_batch_size` prompts from the data
/// order (`data` advances), their completions scored, advantages computed over the whole
/// generation as TRL does.
///
/// With `dynamic_sampling` (DAPO), groups whose rewards all agree are dropped and further rounds
/// sample the missing groups' worth of prompts, a micro-batch of prompts at a time, until the
/// generation is full (surplus groups of the last round are left out) or `max_resample_rounds`
/// extra rounds have run; then the first dropped groups fill the generation up (they have zero
/// advantages, so only the KL term sees them) and a warning says so.
fn generate(
    sampler: &Sampler,
    dataset: &Dataset,
    data: &mut DataPosition,
    step: u64,
    micro: usize,
) -> Result<SampledGeneration> {
    let cfg = sampler.cfg;
    let prompts_per_batch = cfg.per_device_train_batch_size;
    let wanted = cfg.steps_per_generation() * prompts_per_batch;
    let mut times = PhaseTimes::default();
    let mut generated_tokens = 0;
    let (mut kept, mut dropped) = (Vec::with_capacity(wanted), Vec::new());
    let mut round = 0;
    loop {
        let batches = match round {
            0 => cfg.steps_per_generation(),
            _ => (wanted - kept.len()).div_ceil(prompts_per_batch),
        };
        for batch in 0..batches {
            // Round 0 seeds micro-batch k as micro-step micro + k; later rounds get their own.
            let seed = match round {
                0 => derive_seed(cfg.seed, step, (micro + batch) as u64),
                _ => derive_seed(
                    derive_seed(cfg.seed, step, micro as u64),
                    round as u64,
                    batch as u64,
                ),
            };
            let examples = dataset.next_batch(cfg.seed, prompts_per_batch, data);
            let (sampled, batch_times) = sample_groups(sampler, &examples, seed)?;
            times.add(&batch_times);
            for group in sampled {
                generated_tokens += group.completions.iter().map(Vec::len).sum::<usize>();
                match cfg.dynamic_sampling && grpo::rewards_agree(&group.rewards) {
                    true => dropped.push(group),
                    false => kept.push(group),
                }
            }
        }
        if kept.len() >= wanted || round == cfg.max_resample_rounds {
            break;
        }
        round += 1;
    }
    let sampled_groups = kept.len() + dropped.len();
    let frac_reward_zero_std = dropped.len() as f64 / sampled_groups as f64;
    let filled_groups = wanted.saturating_sub(kept.len());
    if filled_groups > 0 {
        warn!(
            "step {}: dynamic sampling found {} of {wanted} groups whose rewards differ in {} \
             rounds (max_resample_rounds = {}); {filled_groups} groups whose rewards all agree \
             fill the batch",
            step + 1,
            kept.len(),
            round + 1,
            cfg.max_resample_rounds
        );
        kept.extend(dropped.drain(..filled_groups));
    }
    kept.truncate(wanted);
    let dynamic_sampling = cfg.dynamic_sampling.then_some(DynamicSampling {
        rounds: round + 1,
        filled_groups,
        frac_reward_zero_std,
    });

    let scoring_started = Instant::now();
    let rewards: Vec<f32> = kept
        .iter()
        .flat_map(|g| g.rewards.iter().copied())
        .collect();
    let advantages = grpo::group_advantages(&rewards, cfg.num_generations, cfg.scale_rewards)?;
    let rows_per_batch = prompts_per_batch * cfg.num_generations;
    let mut rollouts = kept
        .chunks(prompts_per_batch)
        .enumerate()
        .map(|(k, groups)| {
            let advantages = advantages.rows(k * rows_per_batch, rows_per_batch);
            Rollout::from_groups(groups, advantages, sampler, dynamic_sampling)
        })
        .collect::<Result<Vec<_>>>()?;
    let generation_items = rollouts.iter().map(|r| r.completions.num_items()).sum();
    times.rewards += scoring_started.elapsed().as_secs_f64();
    let need_old_logprobs = Generations::from_config(cfg).need_old_logprobs();
    for rollout in &mut rollouts {
        rollout.generation_items = generation_items;
        if need_old_logprobs {
            let (logps, old_logp_time) = sampler.stopwatch.time(|| {
                grouped_completion_logprobs(
                    &sampler.model,
                    &rollout.batch.grouped(),
                    cfg.temperature,
                    false,
                )
            })?;
            times.generation += old_logp_time;
            rollout.batch.old_logp = Some(logps.logprobs.detach());
        }
    }
    Ok(SampledGeneration {
        rollouts,
        times,
        generated_tokens,
    })
}

/// Samples, decodes and scores the completions of `examples` (`num_generations` each, seeded
/// by `seed`); times their generation and rewards.
fn sample_groups(
    sampler: &Sampler,
    examples: &[Example],
    seed: u64,
) -> Result<(Vec<SampledGroup>, PhaseTimes)> {
    let cfg = sampler.cfg;
    let rewards = sampler.rewards;
    let spec = GenerationSpec {
        group_size: cfg.num_generations,
        max_new_tokens: cfg.max_completion_length,
        eos_ids: sampler.stop.eos_ids.clone(),
        pad_id: sampler.stop.pad_id,
        params: sampler.params,
        seed,
        entropy_temperature: entropies_from_sampling(cfg).then_some(cfg.temperature),
    };
    let mut times = PhaseTimes::default();
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| sampler.prompter.prompt_ids(&e.question))
        .collect::<Result<_>>()?;
    let (sampled, generation_time) = sampler
        .stopwatch
        .time(|| sampling::generate_on(sampler.workers, &sampler.model, &prompts, &spec))?;
    times.generation = generation_time;
    let scoring_started = Instant::now();
    let rows: Vec<Vec<u32>> = sampled
        .ids
        .iter()
        .zip(&sampled.lengths)
        .map(|(ids, &n)| ids[..n].to_vec())
        .collect();
    let completions = CompletionBatch::new(
        &rows,
        &spec.eos_ids,
        spec.pad_id,
        cfg.mask_truncated_completions,
    )?;
    let tokenizer = sampler.prompter.tokenizer();
    let texts: Vec<String> = rows
        .iter()
        .map(|ids| tokenizer.decode(ids, true))
        .collect::<Result<_>>()?;
    let messages: Vec<_> = examples
        .iter()
        .map(|e| sampler.prompter.messages(&e.question))
        .collect();
    let scored: Vec<Completion> = (0..rows.len())
        .map(|row| {
            let prompt = row / spec.group_size;
            let example = &examples[prompt];
            Completion {
                prompt: &example.question,
                text: &texts[row],
                answer: &example.answer,
                num_tokens: Some(completions.lengths[row]),
                messages: &messages[prompt],
                ids: &rows[row],
                columns: example.columns.as_deref(),
            }
        })
        .collect();
    let rewards_per_func = rewards.score(&scored, Some(&sampler.progress))?;
    let weighted = grpo::weighted_rewards(&rewards_per_func, rewards.weights())?;
    times.rewards = scoring_started.elapsed().as_secs_f64();
    let g = spec.group_size;
    let groups = examples
        .iter()
        .zip(prompts)
        .enumerate()
        .map(|(p, (example, prompt_ids))| {
            let group = p * g..(p + 1) * g;
            SampledGroup {
                example: example.clone(),
                prompt_ids,
                completions: rows[group.clone()].to_vec(),
                entropies: sampled
                    .entropies
                    .as_ref()
                    .map(|entropies| entropies[group.clone()].to_vec()),
                texts: texts[group.clone()].to_vec(),
                rewards_per_func: rewards_per_func[group.clone()].to_vec(),
                rewards: weighted[group].to_vec(),
            }
        })
        .collect();
    Ok((groups, times))
}

impl Rollout {
    /// A micro-batch of `groups` (possibly sampled in different rounds) with their `advantages`:
    /// completion masks, and prompts and completions padded into the training tensors.
    fn from_groups(
        groups: &[SampledGroup],
        advantages: Advantages,
        sampler: &Sampler,
        dynamic_sampling: Option<DynamicSampling>,
    ) -> Result<Self> {
        let device = sampler.model.lm_head_weight().device();
        let pad_id = sampler.stop.pad_id;
        let rows: Vec<Vec<u32>> = groups
            .iter()
            .flat_map(|g| g.completions.iter().cloned())
            .collect();
        let completions = CompletionBatch::new(
            &rows,
            &sampler.stop.eos_ids,
            pad_id,
            sampler.cfg.mask_truncated_completions,
        )?;
        let prompts: Vec<Vec<u32>> = groups.iter().map(|g| g.prompt_ids.clone()).collect();
        let padded = left_pad(&prompts, pad_id);
        let (num_prompts, prompt_len) = (prompts.len(), padded.width());
        let batch = TrainBatch {
            prompt_ids: Tensor::from_vec(padded.ids.concat(), (num_prompts, prompt_len), device)?,
            prompt_mask: Tensor::from_vec(padded.mask.concat(), (num_prompts, prompt_len), device)?,
            completion_ids: completions.ids_tensor(device)?,
            mask: completions.mask_tensor(device)?,
            advantages: Tensor::new(advantages.advantages.as_slice(), device)?,
            old_logp: None,
            sampled_entropy: sampled_entropies(groups, completions.width(), device)?,
            group_size: sampler.cfg.num_generations,
        };
        Ok(Rollout {
            examples: groups.iter().map(|g| g.example.clone()).collect(),
            completions,
            texts: groups
                .iter()
                .flat_map(|g| g.texts.iter().cloned())
                .collect(),
            rewards_per_func: groups
                .iter()
                .flat_map(|g| g.rewards_per_func.iter().cloned())
                .collect(),
            advantages,
            batch,
            generation_items: 0,
            dynamic_sampling,
        })
    }

    /// Prompt and completion tokens the model saw (TRL's `num_tokens`).
    fn num_tokens(&self) -> u64 {
        let prompt: f32 = self
            .batch
            .prompt_mask
            .to_dtype(candle_core::DType::F32)
            .and_then(|m| m.sum_all())
            .and_then(|s| s.to_scalar::<f32>())
            .unwrap_or(0.0);
        prompt as u64 * self.batch.group_size as u64
            + self.completions.lengths.iter().sum::<usize>() as u64
    }
}

/// Optimizer updates of the run, as the HF Trainer computes them: `max_steps` when positive,
/// else `ceil(num_train_epochs * max(ceil(N / batch) // accumulation, 1))`, which must not
/// exceed [`MAX_COUNT`] (so a huge `num_train_epochs` is an error, not an endless run).
pub fn total_optimizer_steps(cfg: &Config, num_examples: usize) -> Result<usize> {
    if cfg.max_steps > 0 {
        return Ok(cfg.max_steps as usize);
    }
    let batches_per_epoch = num_examples.div_ceil(cfg.per_device_train_batch_size);
    let updates_per_epoch = (batches_per_epoch / cfg.gradient_accumulation_steps).max(1);
    let steps = (cfg.num_train_epochs * updates_per_epoch as f64).ceil();
    ensure!(
        steps <= MAX_COUNT as f64,
        "num_train_epochs = {:?} makes {steps:e} optimizer steps ({updates_per_epoch} per epoch), \
         more than {MAX_COUNT}: lower num_train_epochs or set max_steps",
        cfg.num_train_epochs
    );
    Ok(steps as usize)
}

/// The seed of one micro-step's LoRA dropout masks, independent of its sampling seed.
pub(crate) fn dropout_seed(seed: u64, step: u64, micro: u64) -> u64 {
    derive_seed(derive_seed(seed, step, micro), u64::MAX, u64::MAX)
}

/// A seed for one micro-step's sampling, independent of everything but its inputs.
fn derive_seed(seed: u64, step: u64, micro: u64) -> u64 {
    let mut x =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Per-step values that are not computed from the rollouts.
struct StepTotals {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    num_tokens: u64,
    step_time: f64,
}

/// The step's metrics over all its micro-batches, with TRL's names.
fn step_metrics(
    rollouts: &[Rollout],
    rewards: &RewardSet,
    totals: StepTotals,
    micro: &[LossMetrics],
    entropy: &[f64],
) -> Result<StepMetrics> {
    let concat = |f: fn(&Advantages) -> &Vec<f32>| -> Vec<f32> {
        rollouts
            .iter()
            .flat_map(|r| f(&r.advantages).iter().copied())
            .collect()
    };
    let advantages = Advantages {
        rewards: concat(|a| &a.rewards),
        group_mean: concat(|a| &a.group_mean),
        std: concat(|a| &a.std),
        advantages: concat(|a| &a.advantages),
    };
    let rewards_per_func: Vec<Vec<f64>> = rollouts
        .iter()
        .flat_map(|r| r.rewards_per_func.iter().cloned())
        .collect();
    let all = CompletionBatch {
        ids: Vec::new(),
        mask: Vec::new(),
        lengths: rollouts
            .iter()
            .flat_map(|r| r.completions.lengths.iter().copied())
            .collect(),
        truncated: rollouts
            .iter()
            .flat_map(|r| r.completions.truncated.iter().copied())
            .collect(),
    };
    let mean = |values: &mut dyn Iterator<Item = f64>| grpo::Mean::of_values(values).value();
    let mut reward_metrics = RewardMetrics::new(rewards.names(), &rewards_per_func, &advantages)?;
    // With dynamic sampling the batch holds (nearly) no zero-std groups: frac_reward_zero_std
    // counts those of every group sampled, dropped ones included.
    let dynamic: Option<Vec<DynamicSampling>> =
        rollouts.iter().map(|r| r.dynamic_sampling).collect();
    let dynamic_sampling = dynamic.map(|stats| {
        reward_metrics.frac_reward_zero_std =
            mean(&mut stats.iter().map(|s| s.frac_reward_zero_std));
        DynamicSamplingMetrics {
            generation_rounds: mean(&mut stats.iter().map(|s| s.rounds as f64)),
            filled_groups: mean(&mut stats.iter().map(|s| s.filled_groups as f64)),
        }
    });
    Ok(StepMetrics {
        loss: totals.loss,
        grad_norm: totals.grad_norm,
        learning_rate: totals.lr,
        rewards: reward_metrics,
        dynamic_sampling,
        policy: LossMetrics::mean_of(micro),
        completions: CompletionLengthMetrics::new(&all),
        entropy: mean(&mut entropy.iter().copied()),
        num_tokens: totals.num_tokens,
        step_time: totals.step_time,
    })
}

/// Prompts, completions, rewards and advantages of a step as JSON lines.
fn completion_records(rollouts: &[Rollout]) -> Vec<serde_json::Value> {
    rollouts
        .iter()
        .flat_map(|r| {
            (0..r.texts.len()).map(move |row| {
                let example = &r.examples[row / r.batch.group_size];
                serde_json::json!({
                    "prompt": example.question,
                    "answer": example.answer,
                    "completion": r.texts[row],
                    "rewards": r.rewards_per_func[row],
                    "advantage": r.advantages.advantages[row],
                    "length": r.completions.lengths[row],
                })
            })
        })
        .collect()
}

fn write_jsonl(path: &Path, records: &[serde_json::Value]) -> Result<()> {
    let dir = path.parent().context("no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// `output_dir/completions/step_<N>.jsonl` (log_completions).
fn write_completions(output_dir: &Path, step: u64, rollouts: &[Rollout]) -> Result<()> {
    let path = output_dir
        .join("completions")
        .join(format!("step_{step}.jsonl"));
    write_jsonl(&path, &completion_records(rollouts))
}

/// The batch of a skipped (non-finite) step, for inspection.
fn log_skipped_batch(output_dir: &Path, step: u64, rollouts: &[Rollout]) -> Result<PathBuf> {
    let path = output_dir
        .join("skipped")
        .join(format!("step_{step}.jsonl"));
    write_jsonl(&path, &completion_records(rollouts))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 prompts x 2 completions whose masks cover 1, 3 | 2, 2 of 4 positions.
    fn batch() -> TrainBatch {
        let lengths = [1usize, 3, 2, 2];
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..4).map(move |i| if i < n { 1.0 } else { 0.0 }))
            .collect();
        let ids: Vec<u32> = (0..16).collect();
        let device = Device::Cpu;
        TrainBatch {
            prompt_ids: Tensor::new(&[[7u32, 8], [9, 10]], &device).unwrap(),
            prompt_mask: Tensor::ones((2, 2), candle_core::DType::U32, &device).unwrap(),
            completion_ids: Tensor::from_vec(ids, (4, 4), &device).unwrap(),
            mask: Tensor::from_vec(mask, (4, 4), &device).unwrap(),
            advantages: Tensor::new(&[1f32, -1., 0.5, -0.5], &device).unwrap(),
            old_logp: Some(
                Tensor::from_vec((0..16).map(|v| v as f32).collect(), (4, 4), &device).unwrap(),
            ),
            sampled_entropy: Some(
                Tensor::from_vec((16..32).map(|v| v as f32).collect(), (4, 4), &device).unwrap(),
            ),
            group_size: 2,
        }
    }

    #[test]
    fn sampling_records_entropies_only_where_they_are_the_training_forwards() {
        let base = Config {
            beta: 0.0,
            ..Config::default()
        };
        assert!(entropies_from_sampling(&base));
        let lora = Config {
            use_peft: true,
            lora_dropout: 0.0,
            ..base.clone()
        };
        assert!(entropies_from_sampling(&lora), "LoRA without dropout");
        let accumulated = Config {
            gradient_accumulation_steps: 4,
            steps_per_generation: Some(2),
            num_iterations: 2,
            ..base.clone()
        };
        assert!(
            entropies_from_sampling(&accumulated),
            "two passes within one step"
        );
        for (what, cfg) in [
            (
                "a KL term",
                Config {
                    beta: 0.04,
                    ..base.clone()
                },
            ),
            (
                "a top-entropy mask",
                Config {
                    top_entropy_quantile: 0.8,
                    ..base.clone()
                },
            ),
            (
                "a second pass after an update",
                Config {
                    num_iterations: 2,
                    ..base.clone()
                },
            ),
            (
                "a generation over two steps",
                Config {
                    steps_per_generation: Some(2),
                    ..base.clone()
                },
            ),
            (
                "LoRA dropout",
                Config {
                    lora_dropout: 0.05,
                    ..lora.clone()
                },
            ),
        ] {
            assert!(!entropies_from_sampling(&cfg), "{what}");
        }
    }

    #[test]
    fn workers_get_one_group_per_chunk_or_slices_of_a_lone_group() {
        // (forward_batch_size, rows, group, workers) -> completions per chunk
        for (args, size) in [
            ((0, 128, 8, 1), 0), // one worker: all at once
            ((4, 128, 8, 2), 4), // an explicit size is kept
            ((0, 128, 8, 2), 8), // one group per chunk
            ((0, 24, 8, 4), 8),  // fewer groups than workers, still whole groups
            ((0, 16, 16, 2), 8), // one group: halves
            ((0, 6, 6, 4), 2),   // one group: the smallest divisor covering it in 4
            ((0, 5, 5, 2), 5),   // a prime group cannot be sliced evenly
        ] {
            let (forward_batch_size, rows, group, workers) = args;
            assert_eq!(
                chunk_size(forward_batch_size, rows, group, workers),
                size,
                "{args:?}"
            );
        }
    }

    #[test]
    fn chunks_are_whole_groups_or_slices_cut_to_their_longest_completion() {
        let whole = batch();
        let groups = whole.chunks(2).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0].completion_ids.dims(),
            [2, 3],
            "longest of 1 and 3"
        );
        assert_eq!(groups[1].completion_ids.dims(), [2, 2]);
        assert_eq!(
            groups[1].completion_ids.to_vec2::<u32>().unwrap(),
            [[8, 9], [12, 13]]
        );
        assert_eq!(groups[1].prompt_ids.to_vec2::<u32>().unwrap(), [[9, 10]]);
        let values = |t: &Option<Tensor>| t.as_ref().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(values(&groups[1].old_logp), [[8., 9.], [12., 13.]]);
        assert_eq!(values(&groups[1].sampled_entropy), [[24., 25.], [28., 29.]]);
        assert_eq!(groups[1].advantages.to_vec1::<f32>().unwrap(), [0.5, -0.5]);

        let slices = whole.chunks(1).unwrap();
        assert_eq!(slices.len(), 4);
        assert_eq!(slices[0].mask.to_vec2::<f32>().unwrap(), [[1.]]);
        assert_eq!(slices[1].prompt_ids.to_vec2::<u32>().unwrap(), [[7, 8]]);
        assert_eq!(slices[1].completion_ids.dims(), [1, 3]);
        assert_eq!(slices[1].group_size, 1);

        let all = whole.chunks(0).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].completion_ids.dims(),
            [4, 4],
            "the whole micro-batch as it is"
        );
    }
}
