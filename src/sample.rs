//! `grpo sample`: G completions of one prompt (given as text or as a row of the training split),
//! each scored with the configured rewards and given its group advantage, printed as text or as
//! one JSON object per line.
//!
//! It also owns the [`Generator`] that `grpo eval` shares: a model (a model folder, or a PEFT
//! adapter folder on its base: [`ModelChoice`]), its tokenizer and the config's prompt
//! settings, turning questions into decoded completions.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::data::{Dataset, Example};
use crate::device::Runtime;
use crate::grpo;
use crate::model::{AdapterFolder, ModelFiles, Qwen2};
use crate::prompt::{ChatTokenizer, Message, Prompter};
use crate::rewards::{Completion, RewardSet};
use crate::sampling::{generate_on, GenerationSpec, SamplingParams, StopTokens};
use crate::workers::Workers;

/// Where `grpo sample` takes its prompt from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSource {
    /// A user message; correctness-type rewards compare with `answer` (the empty string when
    /// `None`).
    Text {
        prompt: String,
        answer: Option<String>,
    },
    /// Row N (from 0) of the training split, with its answer.
    TrainRow(usize),
}

/// One scored completion of `grpo sample`.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledCompletion {
    pub index: usize,
    pub completion: String,
    /// Each configured reward function's value, in `reward_funcs` order.
    pub rewards: Vec<(String, f64)>,
    /// The weighted sum of `rewards`.
    pub reward: f64,
    /// `reward - group mean`, divided by `std + 1e-4` (unbiased std, 0 for a single
    /// completion) unless `scale_rewards = "none"`; with one prompt the group is the batch.
    pub advantage: f64,
    /// Tokens generated, EOS included.
    pub length: usize,
    /// Cut at max_completion_length without an EOS.
    pub truncated: bool,
}

impl SampledCompletion {
    /// The `--json` line: `{"index", "completion", "rewards", "reward", "advantage", "length",
    /// "truncated"}`.
    pub fn to_json(&self) -> Value {
        let rewards: Map<String, Value> = self
            .rewards
            .iter()
            .map(|(name, value)| (name.clone(), json!(value)))
            .collect();
        json!({
            "index": self.index,
            "completion": self.completion,
            "rewards": rewards,
            "reward": self.reward,
            "advantage": self.advantage,
            "length": self.length,
            "truncated": self.truncated,
        })
    }
}

/// The model `grpo sample` and `grpo eval` complete with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    /// A model folder or hub id, or a PEFT adapter folder (one holding adapter_config.json).
    pub model: String,
    /// A LoRA adapter folder put on `model` (the config's `adapter_name_or_path`).
    pub adapter: Option<String>,
    /// The base model of an adapter folder given as `model` (`--base-model`); unset: the one
    /// its adapter_config.json names (`base_model_name_or_path`).
    pub base_model: Option<String>,
}

impl ModelChoice {
    /// `checkpoint` (`--checkpoint`) when given, else the config's model and adapter
    /// (`model_name_or_path`, `adapter_name_or_path`); `base_model` is `--base-model`.
    pub fn new(config: &Config, checkpoint: Option<&Path>, base_model: Option<String>) -> Self {
        match checkpoint {
            Some(dir) => Self {
                model: dir.display().to_string(),
                adapter: None,
                base_model,
            },
            None => Self {
                model: config.model_name_or_path.clone(),
                adapter: config.adapter_name_or_path.clone(),
                base_model,
            },
        }
    }

    /// The model's files (an adapter's base) and the adapter to put on it, if any.
    fn resolve(&self, revision: &str) -> Result<(ModelFiles, Option<AdapterFolder>)> {
        let dir = Path::new(&self.model);
        if AdapterFolder::is_adapter(dir) {
            let adapter = AdapterFolder::read(dir)?;
            let files = adapter.base_model_files(dir, self.base_model.as_deref(), revision)?;
            return Ok((files, Some(adapter)));
        }
        if let Some(base) = &self.base_model {
            bail!(
                "--base-model {base} is for a PEFT adapter folder, but {} holds no \
                 adapter_config.json",
                self.model
            );
        }
        let files = ModelFiles::resolve(&self.model, revision)?;
        let adapter = self
            .adapter
            .as_deref()
            .map(|dir| {
                AdapterFolder::read(Path::new(dir))
                    .with_context(|| format!("adapter_name_or_path = {dir:?}"))
            })
            .transpose()?;
        Ok((files, adapter))
    }
}

/// Samples `num_generations` completions (the config's when `None`) for `source` with `model`
/// (see [`ModelChoice`]) and the config's system prompt, sampling settings and seed, and scores
/// them.
pub fn run(
    config: &Config,
    model: &ModelChoice,
    source: &PromptSource,
    num_generations: Option<usize>,
) -> Result<Vec<SampledCompletion>> {
    let example = match source {
        PromptSource::Text { prompt, answer } => Example {
            question: prompt.clone(),
            answer: answer.clone().unwrap_or_default(),
            columns: None,
        },
        PromptSource::TrainRow(index) => {
            let split = &config.dataset_train_split;
            let dataset = Dataset::from_config(config, split)?;
            if *index >= dataset.len() {
                bail!(
                    "--index {index} is out of range: split `{split}` of dataset `{}` has {} rows \
                     (use 0 to {})",
                    config.dataset_name,
                    dataset.len(),
                    dataset.len() - 1
                );
            }
            dataset.get(*index).clone()
        }
    };
    let rewards = RewardSet::from_config(config)?;
    let generator = Generator::load(
        model,
        &config.model_revision,
        config,
        &Runtime::from_config(config)?,
    )?;
    let group_size = num_generations.unwrap_or(config.num_generations);
    let flag = match num_generations {
        Some(_) => "--num-generations",
        None => "num_generations",
    };
    generator.ensure_fits(&[(flag, group_size)])?;
    let completions = generator.complete(
        &[example.question.as_str()],
        group_size,
        SamplingParams::from_config(config),
        config.seed,
    )?;

    let messages = generator.messages(&example.question);
    let scored: Vec<Completion> = completions
        .iter()
        .map(|generated| generated.to_score(&example, &messages))
        .collect();
    let scores = rewards.score(&scored, None)?;
    let weighted = grpo::weighted_rewards(&scores, rewards.weights())?;
    let advantages = grpo::group_advantages(&weighted, group_size, config.scale_rewards)?;
    let totals: Vec<f64> = weighted.iter().map(|&r| f64::from(r)).collect();
    let advantages = advantages.advantages.iter().map(|&a| f64::from(a));
    Ok(completions
        .into_iter()
        .zip(scores)
        .zip(totals.iter().zip(advantages))
        .enumerate()
        .map(
            |(index, ((generated, scores), (&reward, advantage)))| SampledCompletion {
                index,
                completion: generated.text,
                rewards: rewards.names().iter().cloned().zip(scores).collect(),
                reward,
                advantage,
                length: generated.length,
                truncated: generated.truncated,
            },
        )
        .collect())
}

/// Prints each completion with its rewards, total and advantage for a person to read.
pub fn write_text(out: &mut impl Write, completions: &[SampledCompletion]) -> Result<()> {
    for sample in completions {
        let cut = if sample.truncated { ", truncated" } else { "" };
        writeln!(
            out,
            "── completion {} ({} tokens{cut}) ──",
            sample.index, sample.length
        )?;
        writeln!(out, "{}", sample.completion)?;
        let rewards: Vec<String> = sample
            .rewards
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        writeln!(
            out,
            "rewards: {} | total {:.4} | advantage {:.4}\n",
            rewards.join(", "),
            sample.reward,
            sample.advantage
        )?;
    }
    Ok(())
}

/// Prints one JSON object per completion.
pub fn write_json(out: &mut impl Write, completions: &[SampledCompletion]) -> Result<()> {
    for sample in completions {
        serde_json::to_writer(&mut *out, &sample.to_json())?;
        writeln!(out)?;
    }
    Ok(())
}

/// One decoded completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedText {
    /// Decoded without special tokens (as TRL's `batch_decode(skip_special_tokens=True)`).
    pub text: String,
    /// The generated token ids, EOS included.
    pub ids: Vec<u32>,
    /// Tokens generated, EOS included.
    pub length: usize,
    pub truncated: bool,
}

impl GeneratedText {
    /// This completion of `example`'s question, asked as `messages`, for the rewards.
    pub fn to_score<'a>(&'a self, example: &'a Example, messages: &'a [Message]) -> Completion<'a> {
        Completion {
            prompt: &example.question,
            text: &self.text,
            answer: &example.answer,
            num_tokens: Some(self.length),
            messages,
            ids: &self.ids,
            columns: example.columns.as_deref(),
        }
    }
}

/// A model with its tokenizer and the config's prompt and length settings, ready to complete
/// questions.
pub struct Generator {
    model: Qwen2,
    workers: Workers,
    prompter: Prompter,
    stop: StopTokens,
    max_new_tokens: usize,
    /// The model folder or hub id (or adapter folder), named in errors.
    source: String,
    compute_dtype: candle_core::DType,
}

impl Generator {
    /// Loads `choice` (a local folder or a hub id at `revision`, or an adapter on its base) and
    /// the tokenizer files next to the (base) model's weights; prompts use the config's system
    /// prompt and `max_prompt_length`, completions its `max_completion_length`.
    pub fn load(
        choice: &ModelChoice,
        revision: &str,
        config: &Config,
        runtime: &Runtime,
    ) -> Result<Self> {
        let (files, adapter) = choice.resolve(revision)?;
        let tokenizer = ChatTokenizer::from_dir(&files.tokenizer_dir()?)?;
        let stop = StopTokens::resolve(&files, &tokenizer)?;
        // Before the first tensor operation: it may make candle's kernels single-threaded.
        let workers = Workers::for_cpu(
            config.cpu_workers,
            &runtime.device,
            files.config.hidden_size,
        )?;
        let model = match adapter {
            None => Qwen2::load_reference(&files, &runtime.device)?
                .with_compute_dtype(runtime.compute_dtype)?,
            Some(adapter) => Qwen2::load_base(&files, &runtime.device, runtime.compute_dtype)?
                .with_adapters(adapter.spec, adapter.weights)?
                .inference_copy()?,
        };
        let prompter = Prompter::from_config(Arc::new(tokenizer), config)?;
        let model_name_or_path = &choice.model;
        tracing::info!(
            "loaded {model_name_or_path} ({} layers, vocab {}) on {runtime}",
            files.config.num_hidden_layers,
            files.config.vocab_size
        );
        Ok(Self {
            model,
            workers,
            prompter,
            stop,
            max_new_tokens: config.max_completion_length,
            source: model_name_or_path.to_owned(),
            compute_dtype: runtime.compute_dtype,
        })
    }

    /// Fails, naming `rows` (the sizes whose product is the completions generated at once) and
    /// `max_completion_length`, when such a batch cannot fit in memory
    /// ([`crate::memory::ensure_fits`]; prompts take only the positions they need, so
    /// `max_prompt_length` is not counted).
    pub fn ensure_fits(&self, rows: &[crate::memory::Size]) -> Result<()> {
        crate::memory::ensure_fits(
            self.model.lm_head_weight().device(),
            self.model.config(),
            self.compute_dtype,
            rows,
            &[("max_completion_length", self.max_new_tokens)],
        )
    }

    /// The conversation the model is given for `question` (system prompt, then the question).
    pub fn messages(&self, question: &str) -> Vec<Message> {
        self.prompter.messages(question)
    }

    /// `group_size` completions of each question, rows `q * group_size + g` for question `q`.
    pub fn complete(
        &self,
        questions: &[&str],
        group_size: usize,
        params: SamplingParams,
        seed: u64,
    ) -> Result<Vec<GeneratedText>> {
        let prompts = questions
            .iter()
            .map(|question| self.prompter.prompt_ids(question))
            .collect::<Result<Vec<_>>>()?;
        let spec = GenerationSpec {
            group_size,
            max_new_tokens: self.max_new_tokens,
            eos_ids: self.stop.eos_ids.clone(),
            pad_id: self.stop.pad_id,
            params,
            seed,
            entropy_temperature: None,
        };
        let completions = generate_on(&self.workers, &self.model, &prompts, &spec)
            .with_context(|| format!("sampling from the model {}", self.source))?;
        let tokenizer = self.prompter.tokenizer();
        completions
            .ids
            .iter()
            .zip(&completions.lengths)
            .zip(&completions.truncated)
            .map(|((ids, &length), &truncated)| {
                Ok(GeneratedText {
                    text: tokenizer.decode(&ids[..length], true)?,
                    ids: ids[..length].to_vec(),
                    length,
                    truncated,
                })
            })
            .collect()
    }
}
