//! How the commands turn the [`Config`] into the parameters of the pieces below them: the loss,
//! the optimiser, the schedule, the rewards, sampling, the dataset, the prompts and the LoRA
//! adapters know nothing of the config (layers only look down); each `from_config` here is the
//! one place a config field reaches them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::config::Config;
use crate::data::{Dataset, DatasetSpec};
use crate::grpo::LossParams;
use crate::model::{lora, LoraSpec};
use crate::optim::{warmup_steps, AdamWParams, LrSchedule};
use crate::prompt::{ChatTokenizer, Prompter};
use crate::rewards::external::{self, ExternalParams};
use crate::rewards::{RewardParams, RewardSet};
use crate::sampling::SamplingParams;

impl LossParams {
    /// The config's loss (`loss_type`, `importance_sampling_level`, `beta`, `epsilon`,
    /// `epsilon_high`, `delta`, `sapo_temperature_*`, the accumulation and generation sizes)
    /// for a micro-batch of a generation whose loss mask sums to `num_items_in_batch` tokens.
    pub fn from_config(cfg: &Config, num_items_in_batch: usize) -> Self {
        Self {
            loss_type: cfg.loss_type,
            importance_sampling_level: cfg.importance_sampling_level,
            beta: cfg.beta,
            epsilon_low: cfg.epsilon,
            epsilon_high: cfg.epsilon_high(),
            delta: cfg.delta,
            sapo_temperature_pos: cfg.sapo_temperature_pos,
            sapo_temperature_neg: cfg.sapo_temperature_neg,
            max_completion_length: cfg.max_completion_length,
            num_items_in_batch,
            gradient_accumulation_steps: cfg.gradient_accumulation_steps,
            steps_per_generation: cfg.steps_per_generation(),
            use_bias_correction_kl: false,
        }
    }
}

impl AdamWParams {
    /// The config's `adam_beta1`, `adam_beta2`, `adam_epsilon` and `weight_decay`.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        }
    }
}

impl LrSchedule {
    /// The config's schedule (`lr_scheduler_type`, `learning_rate`, warmup) over `total_steps`.
    pub fn from_config(cfg: &Config, total_steps: usize) -> Self {
        Self {
            kind: cfg.lr_scheduler_type,
            peak_lr: cfg.learning_rate,
            warmup_steps: warmup_steps(total_steps, cfg.warmup_steps, cfg.warmup_ratio),
            total_steps,
        }
    }
}

impl RewardParams {
    /// The config's `max_completion_length`, `reward_timeout` and `reward_retries`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_completion_length: config.max_completion_length,
            external: ExternalParams {
                timeout: Duration::from_secs_f64(config.reward_timeout),
                retries: config.reward_retries,
            },
        }
    }
}

impl RewardSet {
    /// The config's `reward_funcs` with their `reward_weights`.
    pub fn from_config(config: &Config) -> Result<Self> {
        Self::new(
            &config.reward_funcs,
            config.reward_weights.as_deref(),
            RewardParams::from_config(config),
        )
    }
}

impl SamplingParams {
    /// The config's sampling settings (`temperature`, `top_k`, `top_p`, `min_p`,
    /// `repetition_penalty`).
    pub fn from_config(config: &Config) -> Self {
        Self {
            temperature: Some(config.temperature as f32),
            top_k: config.top_k,
            top_p: config.top_p as f32,
            min_p: config.min_p.unwrap_or(0.0) as f32,
            repetition_penalty: config.repetition_penalty as f32,
        }
    }
}

impl DatasetSpec {
    /// The config's dataset (`dataset_name`, `dataset_revision`, `dataset_config`, prompt and
    /// answer columns) at `split`.
    pub fn from_config(config: &Config, split: &str) -> Self {
        Self {
            name_or_path: config.dataset_name.clone(),
            revision: Some(config.dataset_revision.clone()),
            config: config.dataset_config.clone(),
            split: split.to_string(),
            prompt_column: config.dataset_prompt_column.clone(),
            answer_column: config.dataset_answer_column.clone(),
        }
    }
}

impl Dataset {
    /// The config's dataset at `split` ([`DatasetSpec::from_config`]), with every column of
    /// every row when an external reward in `reward_funcs` will be sent them.
    pub fn from_config(config: &Config, split: &str) -> Result<Self> {
        let mut dataset = Self::load(&DatasetSpec::from_config(config, split))?;
        if config
            .reward_funcs
            .iter()
            .any(|name| external::is_external(name))
        {
            dataset.load_columns()?;
        }
        Ok(dataset)
    }
}

impl Prompter {
    /// The config's prompts: `system_prompt` (none when empty), `max_prompt_length` and
    /// `chat_template_kwargs`.
    pub fn from_config(tokenizer: Arc<ChatTokenizer>, cfg: &Config) -> Result<Self> {
        let system_prompt = Some(cfg.system_prompt.clone()).filter(|s| !s.is_empty());
        Self::new(tokenizer, system_prompt, cfg.max_prompt_length)?
            .with_chat_template_kwargs(cfg.chat_template_kwargs.clone())
    }
}

impl LoraSpec {
    /// The config's LoRA shape: `lora_r`, `lora_alpha`, `lora_dropout` and
    /// `lora_target_modules` (`"all-linear"` expanded).
    pub fn from_config(cfg: &Config) -> Result<Self> {
        Ok(Self {
            r: cfg.lora_r,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout,
            target_modules: lora::target_modules(&cfg.lora_target_modules)
                .map_err(|problem| anyhow::anyhow!("lora_target_modules: {problem}"))?,
        })
    }
}
