//! `grpo sft`: the supervised warm start before GRPO (the counterpart of open-r1's `sft.py`).
//!
//! Each row's worked solution (`dataset_solution_column`, GSM8K style: reasoning, then
//! `#### <answer>`) becomes the assistant turn `<think>\n{reasoning}\n</think>\n<answer>\n
//! {answer}\n</answer>` followed by the end-of-turn token; the prompt is the same chat prompt GRPO
//! uses. The loss is the cross-entropy of the target tokens only (the prompt is context),
//! averaged over all target tokens of the optimiser step, as the HF Trainer does with gradient
//! accumulation. Batching, AdamW, the schedule, clipping, logs, checkpoints, resume, Ctrl-C and
//! LoRA (`use_peft`) are those of `grpo train`.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use regex::Regex;
use serde_json::json;
use tracing::{info, warn};

use crate::checkpoint;
use crate::config::Config;
use crate::data::{normalize_answer, Dataset, DatasetSpec, Example};
use crate::device::Runtime;
use crate::model::{grouped_completion_logprobs, GroupedBatch, ModelFiles};
use crate::optim::{AdamW, AdamWParams, DecayGrouping, Gradients, LrSchedule};
use crate::prompt::{left_pad, ChatTokenizer, Prompter};
use crate::run::{self, Run};
use crate::sampling::StopTokens;
use crate::train::{dropout_seed, total_optimizer_steps};

/// GSM8K's calculator annotations, `<<48/2=24>>`, which the targets leave out.
static CALCULATOR_ANNOTATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"<<[^<>]*>>").expect("the annotation pattern is valid"));

/// The assistant turn `grpo sft` teaches for a GSM8K-style solution, or `None` when the
/// solution has no `#### <answer>` line. The reasoning keeps its lines, without calculator
/// annotations; the answer is the normalised final number.
pub fn sft_target(solution: &str) -> Option<String> {
    let (reasoning, _) = solution.rsplit_once("####")?;
    let reasoning = CALCULATOR_ANNOTATION.replace_all(reasoning, "");
    let answer = normalize_answer(solution);
    if answer.is_empty() {
        return None;
    }
    Some(format!(
        "<think>\n{}\n</think>\n<answer>\n{answer}\n</answer>",
        reasoning.trim()
    ))
}

/// Runs `grpo sft` with a validated config.
pub fn sft(cfg: &Config) -> Result<()> {
    // ---- setup: model, tokenizer, targets, optimiser -------------------------------------------
    let runtime = Runtime::from_config(cfg)?;
    let device = runtime.device.clone();
    let output_dir = PathBuf::from(&cfg.output_dir);
    checkpoint::ensure_writable(&output_dir)?;
    let files = ModelFiles::resolve(&cfg.model_name_or_path, &cfg.model_revision)?;
    // Targets are cut to what they need, so only the batch size can be absurd here.
    crate::memory::ensure_fits(
        &device,
        &files.config,
        runtime.compute_dtype,
        &[(
            "per_device_train_batch_size",
            cfg.per_device_train_batch_size,
        )],
        &[],
    )?;
    let tokenizer = Arc::new(ChatTokenizer::from_dir(&files.tokenizer_dir()?)?);
    let prompter = Prompter::from_config(tokenizer.clone(), cfg)?;
    let stop = StopTokens::resolve(&files, &tokenizer)?;
    let end_of_turn = tokenizer
        .token_to_id("<|im_end|>")
        .unwrap_or(stop.first_eos());
    let policy = run::load_policy(cfg, &files, &runtime)?;
    let spec = DatasetSpec {
        answer_column: cfg.dataset_solution_column.clone(),
        ..DatasetSpec::from_config(cfg, &cfg.dataset_train_split)
    };
    let dataset = Dataset::load_solutions(&spec).with_context(|| {
        format!(
            "reading worked solutions from column `{}` (dataset_solution_column)",
            cfg.dataset_solution_column
        )
    })?;
    if let Some(bad) = dataset
        .examples()
        .iter()
        .position(|e| sft_target(&e.answer).is_none())
    {
        bail!(
            "row {bad} of column `{}` in dataset `{}` is not a worked solution ending in \
             `#### <answer>`: grpo sft needs GSM8K-style solutions; set dataset_solution_column \
             to such a column",
            cfg.dataset_solution_column,
            cfg.dataset_name
        );
    }
    let total_steps = total_optimizer_steps(cfg, dataset.len())?;
    let schedule = LrSchedule::from_config(cfg, total_steps);
    let mut optimizer = AdamW::new(
        policy.named_parameters(),
        AdamWParams::from_config(cfg),
        DecayGrouping::HfTrainer,
    )?;
    let mut run = Run::start(cfg, &files, &policy, &mut optimizer, total_steps)?;
    let progress = crate::progress::Progress::new(total_steps as u64, run.state.global_step, "sft");
    info!(
        "supervised fine-tuning {} on {} solutions: {total_steps} steps of {} examples",
        files.source,
        dataset.len(),
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
    );

    // ---- the loop: one iteration per optimizer step -------------------------------------------
    let mut truncated_targets = 0usize;
    while run.state.global_step < total_steps as u64 {
        let started = Instant::now();
        let step = run.state.global_step;
        let batches = (0..cfg.gradient_accumulation_steps)
            .map(|_| {
                let examples = dataset.next_batch(
                    cfg.seed,
                    cfg.per_device_train_batch_size,
                    &mut run.state.data,
                );
                let batch = TargetBatch::new(
                    &examples,
                    &prompter,
                    end_of_turn,
                    stop.pad_id,
                    cfg.max_completion_length,
                    &device,
                )?;
                truncated_targets += batch.truncated;
                Ok(batch)
            })
            .collect::<Result<Vec<_>>>()?;

        // Cross-entropy summed over the step's target tokens, divided by their count.
        let target_tokens: usize = batches.iter().map(|b| b.num_tokens).sum();
        let mut grads = Gradients::new();
        let mut loss_value = 0.0;
        for (index, batch) in batches.iter().enumerate() {
            let training = policy.in_training(dropout_seed(cfg.seed, step, index as u64));
            let logps = grouped_completion_logprobs(&training, &batch.grouped(), 1.0, false)?;
            let mask = batch.target_mask.to_dtype(logps.logprobs.dtype())?;
            let loss = ((logps.logprobs * mask)?.sum_all()?.neg()? / target_tokens as f64)?;
            loss_value += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            grads.accumulate(policy.named_parameters(), &loss.backward()?)?;
        }
        let lr = schedule.lr(step as usize);
        let (grad_norm, applied) =
            optimizer.clipped_step(&mut grads, loss_value, cfg.max_grad_norm, lr)?;
        if !applied {
            run.state.skipped_steps += 1;
            warn!(
                "step {}: loss {loss_value} / grad_norm {grad_norm} not finite; step skipped, \
                 weights untouched",
                step + 1
            );
        }
        run.state.global_step += 1;
        run.state.epoch =
            run.state.data.epoch as f64 + run.state.data.index as f64 / dataset.len() as f64;
        run.state.num_tokens += batches.iter().map(|b| b.seen_tokens).sum::<u64>();

        // Log and save.
        let step = run.state.global_step;
        if cfg.logging_steps > 0 && step % cfg.logging_steps as u64 == 0 {
            let values = json!({
                "loss": loss_value,
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "num_tokens": run.state.num_tokens,
                "step_time": started.elapsed().as_secs_f64(),
                "epoch": run.state.epoch,
            });
            let values = values
                .as_object()
                .cloned()
                .context("metrics are an object")?;
            run.log(&values)?;
            progress.log_step(step, &format!("loss {loss_value:.4}"));
        }
        progress.set(step);
        if run.save_if_due(&policy, &optimizer)? {
            return Ok(());
        }
    }
    progress.finish();
    if truncated_targets > 0 {
        warn!(
            "{truncated_targets} targets were longer than max_completion_length = {} and were \
             cut; raise it to train on whole solutions",
            cfg.max_completion_length
        );
    }
    run.finish(&policy)
}

/// One micro-batch of prompts (left-padded) and their target turns (right-padded).
struct TargetBatch {
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    target_ids: Tensor,
    target_mask: Tensor,
    /// Target tokens (those the loss covers).
    num_tokens: usize,
    /// Prompt and target tokens the model saw.
    seen_tokens: u64,
    /// Targets cut at `max_completion_length`.
    truncated: usize,
}

impl TargetBatch {
    fn new(
        examples: &[Example],
        prompter: &Prompter,
        end_of_turn: u32,
        pad_id: u32,
        max_target_length: usize,
        device: &Device,
    ) -> Result<Self> {
        let prompts: Vec<Vec<u32>> = examples
            .iter()
            .map(|e| prompter.prompt_ids(&e.question))
            .collect::<Result<_>>()?;
        let mut truncated = 0;
        let targets: Vec<Vec<u32>> = examples
            .iter()
            .map(|e| {
                let text = sft_target(&e.answer).context("checked when the data was loaded")?;
                let mut ids = prompter.tokenizer().encode(&text)?;
                ids.push(end_of_turn);
                if ids.len() > max_target_length {
                    ids.truncate(max_target_length);
                    truncated += 1;
                }
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        let width = targets.iter().map(Vec::len).max().unwrap_or(1);
        let mut target_ids = Vec::with_capacity(targets.len() * width);
        let mut target_mask = Vec::with_capacity(targets.len() * width);
        for ids in &targets {
            target_ids.extend(
                ids.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, width - ids.len())),
            );
            target_mask.extend((0..width).map(|i| if i < ids.len() { 1f32 } else { 0.0 }));
        }
        let padded = left_pad(&prompts, pad_id);
        let rows = prompts.len();
        let num_tokens = targets.iter().map(Vec::len).sum();
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
        Ok(Self {
            prompt_ids: Tensor::from_vec(padded.ids.concat(), (rows, padded.width()), device)?,
            prompt_mask: Tensor::from_vec(padded.mask.concat(), (rows, padded.width()), device)?,
            target_ids: Tensor::from_vec(target_ids, (rows, width), device)?,
            target_mask: Tensor::from_vec(target_mask, (rows, width), device)?,
            num_tokens,
            seen_tokens: (prompt_tokens + num_tokens) as u64,
            truncated,
        })
    }

    fn grouped(&self) -> GroupedBatch<'_> {
        GroupedBatch {
            prompt_ids: &self.prompt_ids,
            prompt_mask: &self.prompt_mask,
            completion_ids: &self.target_ids,
            completion_mask: &self.target_mask,
            group_size: 1,
        }
    }
}
