//! The run configuration: one [`Config`] whose field names are TRL's `GRPOConfig` /
//! `TrainingArguments` names (plus a few of ours for model, data and device), with the defaults of
//! the TRL 0.14 era the users' recipes were written for.
//!
//! A config comes from a `.toml`, `.yaml` or `.yml` file, then `--set key=value` overrides, then
//! [`Config::validate`]. Every problem is an error naming the key, the value and what is allowed;
//! an unknown key also names the nearest valid one. [`Config::to_toml`] writes the fully resolved
//! config back out, in a form [`Config::from_toml_str`] reads to an equal config.
//! `docs/CONFIG.md` documents every field.

use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::grpo::{ImportanceSamplingLevel, LossType, ScaleRewards};
use crate::model::lora;
pub use crate::optim::LrSchedulerType;
use crate::{prompt, rewards};

/// The system prompt of the users' TRL recipe (note the full-width colon `：`).
pub const SEED_SYSTEM_PROMPT: &str =
    "\n按照如下格式生成：\n<think>\n...\n</think>\n<answer>\n...\n</answer>\n";

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA device 0 when this build has CUDA and a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// TrainingArguments' `resume_from_checkpoint`: `true` or a checkpoint folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// `true`: the newest `checkpoint-*` folder in `output_dir`.
    Latest,
    /// A checkpoint folder.
    Path(String),
}

/// The largest value of every count and size field (batch sizes, lengths, steps, `top_k`, ...),
/// and of `per_device_train_batch_size × num_generations` and
/// `max_prompt_length + max_completion_length`: 2^31 - 1, what an `i32` holds (AdamW's bias
/// correction counts steps in one). Whether a run of that size fits in memory is checked when
/// the model is known ([`crate::memory::ensure_fits`]).
pub const MAX_COUNT: usize = i32::MAX as usize;

/// Most CPU worker threads (`cpu_workers`): far beyond any machine's cores, small enough that a
/// typo does not start millions of threads.
pub const MAX_CPU_WORKERS: usize = 1024;

/// What an external entry of `reward_funcs` looks like, for errors.
const EXTERNAL_REWARDS: &str = "(\"cmd:COMMAND\" with a command line, or an http:// or https:// \
                                URL with a host, like \"http://127.0.0.1:8000/reward\")";

/// The longest `reward_timeout`: a day, in seconds.
pub const MAX_REWARD_TIMEOUT: f64 = 86_400.0;

/// The most `reward_retries`.
pub const MAX_REWARD_RETRIES: usize = 100;

/// The reporting integrations this build knows (`report_to`).
pub const REPORT_TO_VALUES: &[&str] = &["none", "all", "tensorboard"];

/// Everything a run needs to know. Field names, meanings and defaults: `docs/CONFIG.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    // Model and data (ours).
    pub model_name_or_path: String,
    pub model_revision: String,
    pub dataset_name: String,
    /// TRL ScriptArguments' `dataset_config`: the hub config (subset) folder; unset picks the
    /// default config, or the only one holding the split.
    pub dataset_config: Option<String>,
    /// Hub branch, tag or commit of the dataset (ignored for local paths).
    pub dataset_revision: String,
    pub dataset_train_split: String,
    pub dataset_test_split: String,
    pub dataset_prompt_column: String,
    pub dataset_answer_column: String,
    pub dataset_solution_column: String,
    pub system_prompt: String,
    /// TRL's `chat_template_kwargs`: extra variables for the chat template, e.g.
    /// `{ enable_thinking = false }` for Qwen3.
    pub chat_template_kwargs: Map<String, Value>,
    pub reward_funcs: Vec<String>,
    /// Ours: seconds an external reward (`cmd:` or `http(s)://`) may take to answer one batch.
    pub reward_timeout: f64,
    /// Ours: how many times a failed external reward call that may pass (a timeout, a crashed
    /// command, a refused connection, HTTP 408/429/5xx) is tried again.
    pub reward_retries: usize,
    pub device: DeviceChoice,

    // LoRA (TRL's ModelConfig names).
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    #[serde(deserialize_with = "one_or_many_strings")]
    pub lora_target_modules: Vec<String>,
    pub lora_modules_to_save: Option<Vec<String>>,
    /// Ours: a PEFT adapter folder to continue training (with `use_peft`).
    pub adapter_name_or_path: Option<String>,

    // Optimisation (TrainingArguments).
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub lr_scheduler_type: LrSchedulerType,
    pub max_grad_norm: f64,
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Ours: most completions per training forward/backward pass; 0 = all of the micro-step's.
    pub forward_batch_size: usize,
    /// Ours: CPU worker threads that each run a shard of a batch single-threaded; 0 = automatic.
    pub cpu_workers: usize,
    pub seed: u64,
    pub bf16: bool,

    // Logging and checkpoints (TrainingArguments).
    pub logging_steps: usize,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub output_dir: String,
    #[serde(deserialize_with = "one_or_many_strings")]
    pub report_to: Vec<String>,
    #[serde(
        deserialize_with = "resume_from_de",
        serialize_with = "resume_from_ser"
    )]
    pub resume_from_checkpoint: Option<ResumeFrom>,

    // Generation (GRPOConfig).
    pub num_generations: usize,
    pub max_prompt_length: usize,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub min_p: Option<f64>,
    pub repetition_penalty: f64,
    /// Completions sampled together; unset: `steps_per_generation` micro-steps' worth.
    pub generation_batch_size: Option<usize>,
    /// Micro-steps trained on each generation; unset: `gradient_accumulation_steps`.
    pub steps_per_generation: Option<usize>,
    /// Ours (DAPO): drop groups whose rewards all agree and sample more prompts instead.
    pub dynamic_sampling: bool,
    /// Ours: most extra generation rounds dynamic sampling runs per generation.
    pub max_resample_rounds: usize,

    // The GRPO loss (GRPOConfig).
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    pub delta: Option<f64>,
    pub num_iterations: usize,
    pub loss_type: LossType,
    pub importance_sampling_level: ImportanceSamplingLevel,
    pub sapo_temperature_neg: f64,
    pub sapo_temperature_pos: f64,
    pub top_entropy_quantile: f64,
    #[serde(deserialize_with = "scale_rewards_de")]
    pub scale_rewards: ScaleRewards,
    pub reward_weights: Option<Vec<f64>>,
    pub mask_truncated_completions: bool,
    pub log_completions: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model_name_or_path: "Qwen/Qwen2.5-0.5B-Instruct".into(),
            model_revision: "main".into(),
            dataset_name: "swulling/gsm8k_chinese".into(),
            dataset_config: None,
            dataset_revision: "main".into(),
            dataset_train_split: "train".into(),
            dataset_test_split: "test".into(),
            dataset_prompt_column: "question_zh-cn".into(),
            dataset_answer_column: "answer_only".into(),
            dataset_solution_column: "answer".into(),
            system_prompt: SEED_SYSTEM_PROMPT.into(),
            chat_template_kwargs: Map::new(),
            reward_funcs: rewards::SEED_REWARDS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            reward_timeout: 300.0,
            reward_retries: 2,
            device: DeviceChoice::Auto,

            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: lora::TARGET_MODULES.iter().map(|m| m.to_string()).collect(),
            lora_modules_to_save: None,
            adapter_name_or_path: None,

            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            lr_scheduler_type: LrSchedulerType::Linear,
            max_grad_norm: 1.0,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            forward_batch_size: 0,
            cpu_workers: 0,
            seed: 42,
            bf16: false,

            logging_steps: 500,
            save_steps: 500,
            save_total_limit: None,
            output_dir: "trainer_output".into(),
            report_to: vec!["all".into()],
            resume_from_checkpoint: None,

            num_generations: 8,
            max_prompt_length: 512,
            max_completion_length: 256,
            temperature: 0.9,
            top_p: 1.0,
            top_k: 0,
            min_p: None,
            repetition_penalty: 1.0,
            generation_batch_size: None,
            steps_per_generation: None,
            dynamic_sampling: false,
            max_resample_rounds: 10,

            beta: 0.04,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            num_iterations: 1,
            loss_type: LossType::Grpo,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            sapo_temperature_neg: 1.05,
            sapo_temperature_pos: 1.0,
            top_entropy_quantile: 1.0,
            scale_rewards: ScaleRewards::Group,
            reward_weights: None,
            mask_truncated_completions: false,
            log_completions: false,
        }
    }
}

impl Config {
    /// Defaults, then the file at `path` (`.toml`, `.yaml` or `.yml`), then `overrides`
    /// (`key=value`, the value read as a TOML value), then [`Config::validate`].
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config> {
        let mut keys = match path {
            Some(path) => read_file(path)?,
            None => Map::new(),
        };
        for item in overrides {
            let (key, value) = parse_override(item)?;
            keys.insert(key, value);
        }
        let config = from_keys(keys)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads TOML config text (unvalidated; [`Config::load`] validates).
    pub fn from_toml_str(text: &str) -> Result<Config> {
        from_keys(parse_toml(text)?)
    }

    /// Reads YAML config text (unvalidated; [`Config::load`] validates).
    pub fn from_yaml_str(text: &str) -> Result<Config> {
        from_keys(parse_yaml(text)?)
    }

    /// The upper clipping bound: `epsilon_high`, or `epsilon` when unset.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// Micro-steps trained on each generation (TRL's resolved `steps_per_generation`):
    /// `steps_per_generation`, else `generation_batch_size` over the completions of a
    /// micro-step, else `gradient_accumulation_steps`.
    pub fn steps_per_generation(&self) -> usize {
        match (self.steps_per_generation, self.generation_batch_size) {
            (Some(steps), _) => steps,
            (None, Some(completions)) => {
                completions / (self.per_device_train_batch_size * self.num_generations).max(1)
            }
            (None, None) => self.gradient_accumulation_steps,
        }
    }

    /// The per-reward weights: `reward_weights`, or 1 for each of `reward_funcs` when unset.
    pub fn reward_weights(&self) -> Vec<f64> {
        self.reward_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.reward_funcs.len()])
    }

    /// Whether `report_to` asks for TensorBoard event files.
    pub fn reports_to_tensorboard(&self) -> bool {
        self.report_to
            .iter()
            .any(|r| r == "tensorboard" || r == "all")
    }

    /// Checks every value against its allowed range; the error lists every problem found, each
    /// naming the field, its value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        bail!("invalid configuration:\n  - {}", problems.join("\n  - "))
    }

    /// The fully resolved config as TOML, every default filled in. Optional fields that are unset
    /// are listed in a trailing comment (TOML has no null).
    pub fn to_toml(&self) -> Result<String> {
        let mut text = String::from("# grpo configuration, fully resolved (see docs/CONFIG.md)\n");
        text.push_str(&toml::to_string_pretty(self).context("writing the config as TOML")?);
        let unset: Vec<String> = to_keys(self)?
            .into_iter()
            .filter(|(_, value)| value.is_null())
            .map(|(key, _)| key)
            .collect();
        if !unset.is_empty() {
            text.push_str(&format!(
                "\n# Unset, so their documented defaults apply: {}\n",
                unset.join(", ")
            ));
        }
        Ok(text)
    }

    fn problems(&self) -> Vec<String> {
        let mut check = Checker::default();

        for (field, value) in [
            ("model_name_or_path", &self.model_name_or_path),
            ("model_revision", &self.model_revision),
            ("dataset_name", &self.dataset_name),
            ("dataset_revision", &self.dataset_revision),
            ("dataset_train_split", &self.dataset_train_split),
            ("dataset_test_split", &self.dataset_test_split),
            ("dataset_prompt_column", &self.dataset_prompt_column),
            ("dataset_answer_column", &self.dataset_answer_column),
            ("dataset_solution_column", &self.dataset_solution_column),
            ("output_dir", &self.output_dir),
        ] {
            check.that(
                !value.trim().is_empty(),
                field,
                Quoted(value),
                "a non-empty string",
            );
        }

        if let Some(name) = prompt::reserved_template_variable(self.chat_template_kwargs.keys()) {
            check.that(
                false,
                "chat_template_kwargs",
                Value::Object(self.chat_template_kwargs.clone()),
                &format!(
                    "extra template variables, not {name:?}: apply_chat_template sets {} itself",
                    prompt::RESERVED_TEMPLATE_VARIABLES.join(", ")
                ),
            );
        }

        if let Some(subset) = &self.dataset_config {
            check.that(
                !subset.trim().is_empty(),
                "dataset_config",
                Quoted(subset),
                "a non-empty config (subset) name, or unset",
            );
        }

        check.positive("lora_r", self.lora_r);
        check.that(
            self.lora_alpha > 0.0 && self.lora_alpha.is_finite(),
            "lora_alpha",
            self.lora_alpha,
            "a finite number > 0 (the adapters' update is scaled by lora_alpha / lora_r)",
        );
        check.that(
            (0.0..1.0).contains(&self.lora_dropout),
            "lora_dropout",
            self.lora_dropout,
            "a number in [0, 1)",
        );
        let unknown = self
            .lora_target_modules
            .iter()
            .find(|name| !lora::TARGET_MODULES.contains(&name.as_str()));
        check.that(
            lora::target_modules(&self.lora_target_modules).is_ok(),
            "lora_target_modules",
            Quoted(&self.lora_target_modules),
            &format!(
                "names from {}, each once, or \"{}\" alone{}",
                one_of(&lora::TARGET_MODULES),
                lora::ALL_LINEAR,
                unknown.map_or(String::new(), |name| did_you_mean(
                    name,
                    &lora::TARGET_MODULES
                ))
            ),
        );
        if let Some(modules) = &self.lora_modules_to_save {
            check.that(
                modules.is_empty(),
                "lora_modules_to_save",
                Quoted(modules),
                "unset or an empty list: training whole modules beside the adapters is not \
                 supported (only the LoRA matrices are trained)",
            );
        }
        if let Some(adapter) = &self.adapter_name_or_path {
            check.that(
                !adapter.trim().is_empty(),
                "adapter_name_or_path",
                Quoted(adapter),
                "a PEFT adapter folder, or unset",
            );
            check.that(
                self.use_peft,
                "adapter_name_or_path",
                Quoted(adapter),
                "unset unless use_peft = true (it is the LoRA adapter training continues)",
            );
        }

        check.range(
            "learning_rate",
            self.learning_rate,
            0.0,
            f64::INFINITY,
            "a finite number >= 0",
        );
        check.that(
            (0.0..1.0).contains(&self.adam_beta1),
            "adam_beta1",
            self.adam_beta1,
            "a number in [0, 1)",
        );
        check.that(
            (0.0..1.0).contains(&self.adam_beta2),
            "adam_beta2",
            self.adam_beta2,
            "a number in [0, 1)",
        );
        check.that(
            self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite(),
            "adam_epsilon",
            self.adam_epsilon,
            "a finite number > 0",
        );
        check.range(
            "weight_decay",
            self.weight_decay,
            0.0,
            f64::INFINITY,
            "a finite number >= 0",
        );
        check.range(
            "warmup_ratio",
            self.warmup_ratio,
            0.0,
            1.0,
            "a number in [0, 1]",
        );
        check.range(
            "max_grad_norm",
            self.max_grad_norm,
            0.0,
            f64::INFINITY,
            "a finite number >= 0 (0 turns clipping off)",
        );
        check.that(
            self.max_steps == -1 || (self.max_steps > 0 && self.max_steps <= MAX_COUNT as i64),
            "max_steps",
            self.max_steps,
            &format!("-1 (train for num_train_epochs) or a step count in [1, {MAX_COUNT}]"),
        );
        if self.max_steps <= 0 {
            check.that(
                self.num_train_epochs > 0.0 && self.num_train_epochs.is_finite(),
                "num_train_epochs",
                self.num_train_epochs,
                "a finite number > 0 (or set max_steps)",
            );
        } else {
            check.range(
                "num_train_epochs",
                self.num_train_epochs,
                0.0,
                f64::INFINITY,
                "a finite number >= 0",
            );
        }
        check.positive(
            "per_device_train_batch_size",
            self.per_device_train_batch_size,
        );
        check.positive(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
        );
        let g = self.num_generations.max(1);
        check.that(
            self.forward_batch_size == 0
                || g % self.forward_batch_size == 0
                || self.forward_batch_size % g == 0,
            "forward_batch_size",
            self.forward_batch_size,
            &format!(
                "0 (all completions of a micro-step in one pass), a divisor of num_generations \
                 = {g} (equal slices of one group) or a multiple of it (whole groups)"
            ),
        );
        check.at_most("warmup_steps", self.warmup_steps);
        check.at_most("forward_batch_size", self.forward_batch_size);
        check.that(
            self.cpu_workers <= MAX_CPU_WORKERS,
            "cpu_workers",
            self.cpu_workers,
            &format!("0 (automatic) or a number of threads up to {MAX_CPU_WORKERS}"),
        );
        check.at_most("top_k", self.top_k);
        let rows = self
            .per_device_train_batch_size
            .checked_mul(self.num_generations);
        check.that(
            rows.is_some_and(|rows| rows <= MAX_COUNT),
            "per_device_train_batch_size × num_generations",
            format!(
                "{} × {}",
                self.per_device_train_batch_size, self.num_generations
            ),
            &format!("at most {MAX_COUNT} completions per micro-step"),
        );
        let positions = self
            .max_prompt_length
            .checked_add(self.max_completion_length);
        check.that(
            positions.is_some_and(|positions| positions <= MAX_COUNT),
            "max_prompt_length + max_completion_length",
            format!(
                "{} + {}",
                self.max_prompt_length, self.max_completion_length
            ),
            &format!("at most {MAX_COUNT} tokens per sequence"),
        );
        check.that(
            i64::try_from(self.seed).is_ok(),
            "seed",
            self.seed,
            "an integer in [0, 2^63)",
        );

        check.positive("logging_steps", self.logging_steps);
        check.positive("save_steps", self.save_steps);
        if let Some(limit) = self.save_total_limit {
            check.that(
                limit > 0 && limit <= MAX_COUNT,
                "save_total_limit",
                limit,
                &format!(
                    "a count of checkpoints to keep in [1, {MAX_COUNT}], or unset to keep all"
                ),
            );
        }
        for name in &self.report_to {
            check.that(
                REPORT_TO_VALUES.contains(&name.as_str()),
                "report_to",
                Quoted(name),
                &format!(
                    "{}{}",
                    one_of(REPORT_TO_VALUES),
                    did_you_mean(name, REPORT_TO_VALUES)
                ),
            );
        }
        if self.report_to.len() > 1 && self.report_to.iter().any(|r| r == "none") {
            check.that(
                false,
                "report_to",
                Quoted(&self.report_to),
                "\"none\" alone, or a list of integrations without \"none\"",
            );
        }
        if let Some(ResumeFrom::Path(path)) = &self.resume_from_checkpoint {
            check.that(
                !path.trim().is_empty(),
                "resume_from_checkpoint",
                Quoted(path),
                "a checkpoint folder, true (newest in output_dir) or false",
            );
        }

        check.that(
            self.num_generations >= 2,
            "num_generations",
            self.num_generations,
            "an integer >= 2 (a group needs two completions to compare)",
        );
        check.at_most("num_generations", self.num_generations);
        check.positive("max_prompt_length", self.max_prompt_length);
        check.positive("max_completion_length", self.max_completion_length);
        check.that(
            self.temperature > 0.0 && self.temperature.is_finite(),
            "temperature",
            self.temperature,
            "a finite number > 0",
        );
        check.that(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p",
            self.top_p,
            "a number in (0, 1]",
        );
        if let Some(min_p) = self.min_p {
            check.range("min_p", min_p, 0.0, 1.0, "a number in [0, 1], or unset");
        }
        check.that(
            self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            "repetition_penalty",
            self.repetition_penalty,
            "a finite number > 0 (1.0 turns it off)",
        );

        check.range(
            "beta",
            self.beta,
            0.0,
            f64::INFINITY,
            "a finite number >= 0 (0 turns the KL term off)",
        );
        check.range(
            "epsilon",
            self.epsilon,
            0.0,
            f64::INFINITY,
            "a finite number >= 0",
        );
        if let Some(high) = self.epsilon_high {
            check.range(
                "epsilon_high",
                high,
                0.0,
                f64::INFINITY,
                "a finite number >= 0, or unset to use epsilon",
            );
        }
        check.positive("num_iterations", self.num_iterations);
        self.check_loss_variants(&mut check);
        self.check_generation_batch(&mut check);

        check.that(
            !self.reward_funcs.is_empty(),
            "reward_funcs",
            Quoted(&self.reward_funcs),
            &format!(
                "a non-empty list drawn from {}, or external rewards {EXTERNAL_REWARDS}",
                one_of(rewards::AVAILABLE)
            ),
        );
        for (i, name) in self.reward_funcs.iter().enumerate() {
            let external = rewards::external::is_external(name);
            check.that(
                match external {
                    true => rewards::external::check_name(name).is_ok(),
                    false => rewards::AVAILABLE.contains(&name.as_str()),
                },
                "reward_funcs",
                Quoted(name),
                &match external {
                    true => format!("an external reward {EXTERNAL_REWARDS}"),
                    false => format!(
                        "{}{}, or an external reward {EXTERNAL_REWARDS}",
                        one_of(rewards::AVAILABLE),
                        did_you_mean(name, rewards::AVAILABLE)
                    ),
                },
            );
            check.that(
                !self.reward_funcs[..i].contains(name),
                "reward_funcs",
                Quoted(name),
                "each reward once (listed twice; use reward_weights to weight it)",
            );
        }
        check.that(
            self.reward_timeout > 0.0 && self.reward_timeout <= MAX_REWARD_TIMEOUT,
            "reward_timeout",
            self.reward_timeout,
            &format!("a number of seconds in (0, {MAX_REWARD_TIMEOUT}]"),
        );
        check.that(
            self.reward_retries <= MAX_REWARD_RETRIES,
            "reward_retries",
            self.reward_retries,
            &format!("an integer in [0, {MAX_REWARD_RETRIES}]"),
        );
        if let Some(weights) = &self.reward_weights {
            check.that(
                weights.len() == self.reward_funcs.len(),
                "reward_weights",
                Quoted(weights),
                &format!(
                    "one weight per reward_funcs entry ({} for {:?})",
                    self.reward_funcs.len(),
                    self.reward_funcs
                ),
            );
            for &weight in weights {
                check.that(
                    weight.is_finite(),
                    "reward_weights",
                    weight,
                    "finite numbers",
                );
            }
        }
        check.problems
    }
}

impl Config {
    /// `delta`, `loss_type`'s own fields and `top_entropy_quantile`.
    fn check_loss_variants(&self, check: &mut Checker) {
        let clipped = matches!(
            self.loss_type,
            LossType::Grpo | LossType::Bnpo | LossType::DrGrpo | LossType::Dapo
        );
        if let Some(delta) = self.delta {
            let upper = 1.0 + self.epsilon_high();
            check.that(
                delta.is_finite() && delta > upper,
                "delta",
                delta,
                &format!(
                    "a finite number above 1 + epsilon_high = {upper} (the cap on the ratio of \
                     negative advantages lies above the clip range; INTELLECT-2 uses 4), or unset"
                ),
            );
            check.that(
                clipped,
                "delta",
                delta,
                &format!(
                    "unset with loss_type = {}: two-sided clipping applies to the clipped \
                     losses (grpo, bnpo, dr_grpo, dapo)",
                    serde_json::json!(self.loss_type)
                ),
            );
        }
        if self.loss_type == LossType::Cispo {
            check.that(
                self.epsilon_high.is_some_and(|high| high > 0.0),
                "epsilon_high",
                self.epsilon_high
                    .map_or_else(|| "unset".to_string(), |high| high.to_string()),
                "a number > 0 with loss_type = \"cispo\", which caps the ratio itself at \
                 epsilon_high (ScaleRL recommends 5.0); set it explicitly",
            );
        }
        for (field, value) in [
            ("sapo_temperature_neg", self.sapo_temperature_neg),
            ("sapo_temperature_pos", self.sapo_temperature_pos),
        ] {
            check.that(
                value > 0.0 && value.is_finite(),
                field,
                value,
                "a finite number > 0",
            );
        }
        check.range(
            "top_entropy_quantile",
            self.top_entropy_quantile,
            0.0,
            1.0,
            "a number in [0, 1] (1 trains on every token, 0.2 on the top 20% by entropy)",
        );
    }

    /// `generation_batch_size` / `steps_per_generation` (as TRL checks them) and dynamic sampling.
    fn check_generation_batch(&self, check: &mut Checker) {
        if let (Some(completions), Some(steps)) =
            (self.generation_batch_size, self.steps_per_generation)
        {
            check.that(
                false,
                "generation_batch_size",
                format!("{completions} with steps_per_generation = {steps}"),
                "only one of generation_batch_size and steps_per_generation",
            );
        }
        if let Some(steps) = self.steps_per_generation {
            check.positive("steps_per_generation", steps);
        }
        if let Some(completions) = self.generation_batch_size {
            let g = self.num_generations.max(1);
            let per_micro_step = self.per_device_train_batch_size.max(1).saturating_mul(g);
            check.positive("generation_batch_size", completions);
            check.that(
                completions % g == 0,
                "generation_batch_size",
                completions,
                &format!("a multiple of num_generations = {g} (whole groups of completions)"),
            );
            check.that(
                completions % per_micro_step == 0,
                "generation_batch_size",
                completions,
                &format!(
                    "a multiple of per_device_train_batch_size × num_generations = \
                     {per_micro_step} (the completions of one micro-step)"
                ),
            );
        }
        check.positive("max_resample_rounds", self.max_resample_rounds);
    }
}

/// Collects validation problems, each naming the field, its value and what is allowed.
#[derive(Default)]
struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn that(&mut self, ok: bool, field: &str, value: impl fmt::Display, allowed: &str) {
        if !ok {
            self.problems.push(format!(
                "`{field}` = {value} is not allowed: expected {allowed}"
            ));
        }
    }

    /// `value` finite and in `[low, high]`.
    fn range(&mut self, field: &str, value: f64, low: f64, high: f64, allowed: &str) {
        let ok = value.is_finite() && value >= low && value <= high;
        self.that(ok, field, value, allowed);
    }

    /// `value` in `[1, MAX_COUNT]`.
    fn positive(&mut self, field: &str, value: usize) {
        self.that(
            (1..=MAX_COUNT).contains(&value),
            field,
            value,
            &format!("an integer in [1, {MAX_COUNT}]"),
        );
    }

    /// `value` at most `MAX_COUNT`.
    fn at_most(&mut self, field: &str, value: usize) {
        self.that(
            value <= MAX_COUNT,
            field,
            value,
            &format!("an integer in [0, {MAX_COUNT}]"),
        );
    }
}

/// Displays a value the way it is written in a config (strings and lists quoted).
struct Quoted<T>(T);

impl<T: fmt::Debug> fmt::Display for Quoted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

fn one_of(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    format!("one of {}", quoted.join(", "))
}

/// ` (did you mean "x"?)` when some candidate is close to `name`, else nothing.
fn did_you_mean(name: &str, candidates: &[&str]) -> String {
    match nearest(name, candidates) {
        Some(best) if strsim::levenshtein(name, best) <= name.chars().count().max(3) / 2 => {
            format!(" (did you mean {best:?}?)")
        }
        _ => String::new(),
    }
}

/// The candidate with the smallest edit distance to `name` (the first on ties).
pub(crate) fn nearest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .min_by_key(|candidate| strsim::levenshtein(name, candidate))
        .copied()
}

/// Every valid key, in declaration order.
pub fn field_names() -> Vec<String> {
    // The default config serialises every field (unset options as null).
    to_keys(&Config::default())
        .map(|keys| keys.into_iter().map(|(key, _)| key).collect())
        .unwrap_or_default()
}

fn to_keys(config: &Config) -> Result<Map<String, Value>> {
    top_level_mapping(serde_json::to_value(config).context("serialising the config")?)
}

fn read_file(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let parsed = match extension.as_deref() {
        Some("toml") => parse_toml(&text),
        Some("yaml" | "yml") => parse_yaml(&text),
        _ => bail!(
            "config file {} has an unknown extension: use .toml, .yaml or .yml",
            path.display()
        ),
    };
    parsed.with_context(|| format!("in config file {}", path.display()))
}

fn parse_toml(text: &str) -> Result<Map<String, Value>> {
    let table: toml::Table = toml::from_str(text).context("invalid TOML")?;
    table
        .into_iter()
        .map(|(key, value)| {
            let value = toml_to_json(value).with_context(|| format!("`{key}`"))?;
            Ok((key, value))
        })
        .collect()
}

/// One TOML value as JSON, the common form of both file formats. JSON has no NaN or infinity,
/// so those are refused here rather than silently becoming null.
fn toml_to_json(value: toml::Value) -> Result<Value> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => match serde_json::Number::from_f64(f) {
            Some(number) => Value::Number(number),
            None => bail!("{f} is not allowed: expected a finite number"),
        },
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => bail!("{d} is a TOML date, which no config field takes"),
        toml::Value::Array(items) => {
            Value::Array(items.into_iter().map(toml_to_json).collect::<Result<_>>()?)
        }
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(key, value)| Ok((key, toml_to_json(value)?)))
                .collect::<Result<_>>()?,
        ),
    })
}

fn parse_yaml(text: &str) -> Result<Map<String, Value>> {
    let value: Value = serde_saphyr::from_str(text).map_err(|e| anyhow!("invalid YAML: {e}"))?;
    top_level_mapping(value)
}

/// The keys of a parsed config file; an empty file has none.
fn top_level_mapping(value: Value) -> Result<Map<String, Value>> {
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        other => bail!("expected a mapping of config keys at the top level, found {other}"),
    }
}

/// Splits `key=value` and reads the value as a TOML value; text that is not valid TOML
/// (e.g. `out/run1`) is taken as a string.
fn parse_override(item: &str) -> Result<(String, Value)> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set {item:?}: expected key=value (e.g. --set beta=0.0)");
    };
    let key = key.trim();
    if key.is_empty() {
        bail!("--set {item:?}: the key before `=` is empty");
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("value = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .and_then(|value| toml_to_json(value).ok())
        .unwrap_or_else(|| Value::String(raw.to_string()));
    // A string field given something TOML reads as a number or bool (`output_dir=2024`) keeps
    // the text as written.
    let value = if !value.is_string() && single_key(key, &value).is_err() {
        let text = Value::String(raw.to_string());
        if single_key(key, &text).is_ok() {
            text
        } else {
            value
        }
    } else {
        value
    };
    Ok((key.to_string(), value))
}

/// A default config with only `key` set to `value`.
fn single_key(key: &str, value: &Value) -> Result<Config, serde_json::Error> {
    let mut map = Map::new();
    map.insert(key.to_string(), value.clone());
    serde_json::from_value(Value::Object(map))
}

/// Builds a config from parsed keys: unknown keys and wrongly typed values are errors naming
/// the key (and the nearest valid key, or the value and the expected type).
fn from_keys(keys: Map<String, Value>) -> Result<Config> {
    let valid = field_names();
    let valid: Vec<&str> = valid.iter().map(String::as_str).collect();
    for (key, value) in &keys {
        if !valid.contains(&key.as_str()) {
            let suggestion = nearest(key, &valid).unwrap_or("");
            bail!("unknown config key `{key}` (did you mean `{suggestion}`?)");
        }
        if let Err(e) = single_key(key, value) {
            bail!("`{key}` = {value} has the wrong type or value: {e}");
        }
    }
    serde_json::from_value(Value::Object(keys)).context("building the config")
}

fn one_or_many_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "expected a string, found {other}"
                ))),
            })
            .collect(),
        other => Err(D::Error::custom(format!(
            "expected a string or a list of strings, found {other}"
        ))),
    }
}

fn resume_from_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ResumeFrom>, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Null | Value::Bool(false) => Ok(None),
        Value::Bool(true) => Ok(Some(ResumeFrom::Latest)),
        Value::String(path) => Ok(Some(ResumeFrom::Path(path))),
        other => Err(D::Error::custom(format!(
            "expected a checkpoint folder, true or false, found {other}"
        ))),
    }
}

fn resume_from_ser<S: Serializer>(value: &Option<ResumeFrom>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        None => s.serialize_none(),
        Some(ResumeFrom::Latest) => s.serialize_bool(true),
        Some(ResumeFrom::Path(path)) => s.serialize_str(path),
    }
}

/// TRL accepts `true` / `false` for `"group"` / `"none"` besides the names.
fn scale_rewards_de<'de, D: Deserializer<'de>>(d: D) -> Result<ScaleRewards, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Bool(true) => Ok(ScaleRewards::Group),
        Value::Bool(false) => Ok(ScaleRewards::None),
        value => serde_json::from_value(value.clone()).map_err(|_| {
            D::Error::custom(format!(
                "expected one of \"group\", \"batch\", \"none\", true or false, found {value}"
            ))
        }),
    }
}
