//! What `grpo train` and `grpo sft` share around their loops: the policy they train (the whole
//! model, or LoRA adapters on a frozen base), starting fresh or from `resume_from_checkpoint`,
//! the metrics log and `log_history`, saving on `save_steps`, on Ctrl-C or before an error stops
//! the loop, and writing the final model (or adapter).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::checkpoint::{self, ModelOutputs, TrainerState};
use crate::config::Config;
use crate::device::Runtime;
use crate::metrics::{MetricsLog, StepMetrics};
use crate::model::{AdapterFolder, LoraSpec, ModelFiles, Qwen2};
use crate::optim::AdamW;

/// The policy a config trains, computing in the runtime's dtype: the whole model as f32
/// `Var`s, or with `use_peft` the base frozen in the compute dtype carrying trainable LoRA
/// adapters, those of `adapter_name_or_path` (whose adapter_config.json then sets their shape)
/// or new ones (PEFT's initialisation, drawn from `seed`).
pub fn load_policy(cfg: &Config, files: &ModelFiles, runtime: &Runtime) -> Result<Qwen2> {
    if !cfg.use_peft {
        return Qwen2::load_policy(files, &runtime.device)?
            .with_compute_dtype(runtime.compute_dtype);
    }
    let base = Qwen2::load_base(files, &runtime.device, runtime.compute_dtype)?;
    let configured = LoraSpec::from_config(cfg)?;
    let Some(dir) = &cfg.adapter_name_or_path else {
        return base.with_new_adapters(configured, cfg.seed);
    };
    let context = || format!("adapter_name_or_path = {dir:?}");
    let adapter = AdapterFolder::read(Path::new(dir)).with_context(context)?;
    if adapter.spec != configured {
        info!(
            "continuing the adapter {dir}: its r {}, lora_alpha {}, lora_dropout {} and target \
             modules {:?} apply, not the config's lora_* values",
            adapter.spec.r, adapter.spec.alpha, adapter.spec.dropout, adapter.spec.target_modules
        );
    }
    base.with_adapters(adapter.spec, adapter.weights)
        .with_context(context)
}

/// One training run's progress and outputs.
pub struct Run {
    pub state: TrainerState,
    /// The checkpoint the run resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    output_dir: PathBuf,
    log: MetricsLog,
    outputs: ModelOutputs,
    save_steps: usize,
    save_total_limit: Option<usize>,
}

impl Run {
    /// Starts the run of `total_steps` optimizer steps: restores the policy, the optimiser and
    /// the progress from `resume_from_checkpoint` when set, opens the metrics log, and makes
    /// Ctrl-C stop the loop cleanly.
    pub fn start(
        cfg: &Config,
        files: &ModelFiles,
        policy: &Qwen2,
        optimizer: &mut AdamW,
        total_steps: usize,
    ) -> Result<Run> {
        let output_dir = PathBuf::from(&cfg.output_dir);
        let mut state = TrainerState {
            max_steps: total_steps as u64,
            seed: cfg.seed,
            ..Default::default()
        };
        let resume_dir = checkpoint::resume_dir(cfg.resume_from_checkpoint.as_ref(), &output_dir)?;
        if let Some(dir) = &resume_dir {
            state = checkpoint::restore(dir, policy, optimizer)?;
            info!(
                "resumed from {} at step {}",
                dir.display(),
                state.global_step
            );
        }
        let log = MetricsLog::open(
            &output_dir,
            cfg.reports_to_tensorboard(),
            resume_dir.as_ref().map(|_| state.global_step),
        )?;
        checkpoint::stop_on_ctrl_c();
        Ok(Run {
            state,
            resumed_from: resume_dir,
            outputs: ModelOutputs::new(files, &cfg.model_name_or_path, policy)?,
            output_dir,
            log,
            save_steps: cfg.save_steps,
            save_total_limit: cfg.save_total_limit,
        })
    }

    /// Logs the step just done (`state.global_step`) to metrics.jsonl, TensorBoard and
    /// `log_history`.
    pub fn log(&mut self, values: &StepMetrics) -> Result<()> {
        let step = self.state.global_step;
        self.log.log(step, values)?;
        let mut history = values.clone();
        history.insert("step".into(), step.into());
        self.state.log_history.push(history.into());
        Ok(())
    }

    /// Saves a checkpoint when `save_steps` says so or Ctrl-C was pressed; returns whether the
    /// loop must stop (Ctrl-C).
    pub fn save_if_due(&self, policy: &Qwen2, optimizer: &AdamW) -> Result<bool> {
        self.save_if_due_with(policy, optimizer, &|_| Ok(()))
    }

    /// [`Run::save_if_due`], with `extra` writing more files into the checkpoint folder.
    pub fn save_if_due_with(
        &self,
        policy: &Qwen2,
        optimizer: &AdamW,
        extra: &dyn Fn(&Path) -> Result<()>,
    ) -> Result<bool> {
        let step = self.state.global_step;
        let stopping = checkpoint::stop_requested();
        if self.save_due() || stopping {
            let dir = self.save(policy, optimizer, extra)?;
            info!("saved {}", dir.display());
        }
        if stopping {
            warn!(
                "interrupted: stopped after step {step}; resume with resume_from_checkpoint = true"
            );
        }
        Ok(stopping)
    }

    /// `error` (which stopped the loop between two steps, with `state` as after the last
    /// completed one), after saving a checkpoint of the steps done since the last one, so that
    /// no work is lost (`extra` writing more files into it); the error then names the checkpoint
    /// to resume from.
    pub fn stop_with(
        &self,
        policy: &Qwen2,
        optimizer: &AdamW,
        error: anyhow::Error,
        extra: &dyn Fn(&Path) -> Result<()>,
    ) -> anyhow::Error {
        let step = self.state.global_step;
        if step == 0 || self.save_due() {
            return error;
        }
        match self.save(policy, optimizer, extra) {
            Ok(dir) => error.context(format!(
                "stopped after step {step}, saved in {}: remove the cause and resume with \
                 resume_from_checkpoint = true",
                dir.display()
            )),
            Err(save_error) => error.context(format!(
                "stopped after step {step}; saving a checkpoint failed too: {save_error:#}"
            )),
        }
    }

    /// Whether `save_steps` asks for a checkpoint at the current step.
    fn save_due(&self) -> bool {
        self.save_steps > 0 && self.state.global_step % self.save_steps as u64 == 0
    }

    /// Saves a checkpoint of the current step (`extra` writing more files into it).
    fn save(
        &self,
        policy: &Qwen2,
        optimizer: &AdamW,
        extra: &dyn Fn(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        checkpoint::save_training(
            &self.output_dir,
            policy,
            optimizer,
            &self.state,
            &self.outputs,
            self.save_total_limit,
            extra,
        )
    }

    /// Writes the trained model into `output_dir` as an HF folder (a LoRA policy: as a PEFT
    /// adapter folder).
    pub fn finish(&self, policy: &Qwen2) -> Result<()> {
        self.outputs.write_policy(&self.output_dir, policy)?;
        info!("done: final model in {}", self.output_dir.display());
        Ok(())
    }
}
