//! Checkpoints: `output_dir/checkpoint-<step>/` holding an HF-format model (config.json,
//! model.safetensors with HF tensor names, tokenizer and generation config) that transformers'
//! `from_pretrained` loads, or for a LoRA policy a PEFT adapter (adapter_config.json,
//! adapter_model.safetensors, tokenizer) that `PeftModel.from_pretrained` loads, plus what
//! resuming needs: optimiser state and `trainer_state.json`.
//!
//! A checkpoint is written into a temporary sibling folder, synced, then renamed into place, so a
//! crash mid-save never leaves a half checkpoint that looks complete.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::ResumeFrom;
use crate::data::DataPosition;
use crate::model::lora::ADAPTER_CONFIG;
use crate::model::{AdapterFolder, LoraSpec, ModelFiles, Qwen2};
use crate::optim::AdamW;

/// Model weights file name inside a checkpoint (HF's single-file layout).
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimiser moments and step inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer progress inside a checkpoint (HF's name and main fields).
pub const STATE_FILE: &str = "trainer_state.json";
const PREFIX: &str = "checkpoint-";

/// Where training stands; saved as `trainer_state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser updates done.
    pub global_step: u64,
    /// Fractional epochs done, as the HF Trainer reports it.
    pub epoch: f64,
    /// Planned optimiser updates for the whole run.
    pub max_steps: u64,
    /// Data position: the epoch in progress and how many of its examples were consumed.
    #[serde(flatten)]
    pub data: DataPosition,
    /// Every logged step's metrics, as in HF's `log_history`.
    pub log_history: Vec<serde_json::Value>,
    /// Prompt and completion tokens seen so far (TRL's `num_tokens`).
    pub num_tokens: u64,
    /// Steps skipped because the loss or a gradient was not finite.
    pub skipped_steps: u64,
    /// Sampling randomness is derived from (seed, step, row): no generator state to save.
    pub seed: u64,
}

/// Everything that goes into one checkpoint.
pub struct Checkpoint<'a> {
    /// Model tensors with their HF names (a tied lm_head is not listed); for a LoRA policy its
    /// adapter matrices.
    pub model: &'a [(String, Tensor)],
    /// Set for a LoRA policy: `model` is written as a PEFT adapter, not as model.safetensors.
    pub adapter: Option<AdapterFormat<'a>>,
    /// Optimiser state tensors by name.
    pub optimizer: &'a HashMap<String, Tensor>,
    pub state: &'a TrainerState,
    /// Model-side files copied verbatim: config.json, tokenizer files, generation_config.json.
    pub model_files: &'a [PathBuf],
}

/// How a LoRA policy is written: its adapter matrices as a PEFT adapter folder.
#[derive(Debug, Clone, Copy)]
pub struct AdapterFormat<'a> {
    pub spec: &'a LoraSpec,
    /// The base model, written as `base_model_name_or_path`.
    pub base_model_name_or_path: &'a str,
}

/// What a run writes with the policy's weights, into every checkpoint and the final folder.
pub struct ModelOutputs {
    /// Files copied verbatim (see [`model_side_files`]).
    pub files: Vec<PathBuf>,
    /// The base model a LoRA policy's adapter_config.json names (model_name_or_path).
    pub base_model: String,
}

impl ModelOutputs {
    /// The outputs of a run training `policy` from `files`, given as `base_model`.
    pub fn new(files: &ModelFiles, base_model: &str, policy: &Qwen2) -> Result<Self> {
        Ok(Self {
            files: model_side_files(files, policy.lora().is_some())?,
            base_model: base_model.to_string(),
        })
    }

    /// How `policy` is written: as a PEFT adapter when it has LoRA adapters.
    pub fn adapter_format<'a>(&'a self, policy: &'a Qwen2) -> Option<AdapterFormat<'a>> {
        policy.lora().map(|spec| AdapterFormat {
            spec,
            base_model_name_or_path: &self.base_model,
        })
    }

    /// Writes `policy` into `dir` (a model folder, or an adapter folder for a LoRA policy).
    pub fn write_policy(&self, dir: &Path, policy: &Qwen2) -> Result<()> {
        write_model(
            dir,
            &policy_tensors(policy),
            self.adapter_format(policy),
            &self.files,
        )
    }
}

/// Writes `output_dir/checkpoint-<global_step>` atomically and prunes the oldest beyond
/// `save_total_limit`. Returns the checkpoint's path.
pub fn save(
    output_dir: &Path,
    ckpt: &Checkpoint,
    save_total_limit: Option<usize>,
) -> Result<PathBuf> {
    save_with(output_dir, ckpt, save_total_limit, &|_| Ok(()))
}

/// [`save`], with `extra` writing more files into the checkpoint folder before it is moved into
/// place (what a trainer needs besides the weights and optimiser to resume exactly).
pub fn save_with(
    output_dir: &Path,
    ckpt: &Checkpoint,
    save_total_limit: Option<usize>,
    extra: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let name = format!("{PREFIX}{}", ckpt.state.global_step);
    let final_dir = output_dir.join(&name);
    let tmp_dir = output_dir.join(format!(".{name}.tmp"));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir)
            .with_context(|| format!("cannot clear stale {}", tmp_dir.display()))?;
    }
    std::fs::create_dir_all(&tmp_dir).with_context(|| {
        format!(
            "cannot create {} (is output_dir writable?)",
            tmp_dir.display()
        )
    })?;
    write_model(&tmp_dir, ckpt.model, ckpt.adapter, ckpt.model_files)?;
    candle_core::safetensors::save(ckpt.optimizer, tmp_dir.join(OPTIMIZER_FILE))
        .context("cannot write the optimiser state")?;
    let state = serde_json::to_string_pretty(ckpt.state)?;
    std::fs::write(tmp_dir.join(STATE_FILE), state).context("cannot write trainer_state.json")?;
    extra(&tmp_dir)?;
    sync_dir_files(&tmp_dir)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("cannot replace {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp_dir, &final_dir)
        .with_context(|| format!("cannot move the checkpoint into {}", final_dir.display()))?;
    File::open(output_dir).and_then(|d| d.sync_all()).ok();
    if let Some(limit) = save_total_limit {
        prune(output_dir, limit)?;
    }
    Ok(final_dir)
}

/// Writes an HF-format model folder (the weights plus the copied model-side files), or with
/// `adapter` a PEFT adapter folder of the adapter matrices `model`.
pub fn write_model(
    dir: &Path,
    model: &[(String, Tensor)],
    adapter: Option<AdapterFormat>,
    model_files: &[PathBuf],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match adapter {
        Some(format) => {
            AdapterFolder::write(dir, format.spec, format.base_model_name_or_path, model)?
        }
        None => {
            let tensors: HashMap<&str, Tensor> =
                model.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            candle_core::safetensors::save(&tensors, dir.join(MODEL_FILE))
                .with_context(|| format!("cannot write {}", dir.join(MODEL_FILE).display()))?;
        }
    }
    for file in model_files {
        let name = file.file_name().context("model file without a name")?;
        std::fs::copy(file, dir.join(name))
            .with_context(|| format!("cannot copy {} into {}", file.display(), dir.display()))?;
    }
    Ok(())
}

/// Set by the Ctrl-C handler; training loops save a checkpoint and stop at the end of the step.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C request a clean stop (see [`stop_requested`]) instead of killing the process.
pub fn stop_on_ctrl_c() {
    ctrlc::set_handler(|| STOP_REQUESTED.store(true, Ordering::SeqCst)).ok();
}

/// Whether Ctrl-C was pressed since [`stop_on_ctrl_c`].
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Fails before any work when `output_dir` cannot be written.
pub fn ensure_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "output_dir {} cannot be created: choose a writable folder",
            dir.display()
        )
    })?;
    let probe = dir.join(".grpo-write-test");
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "output_dir {} is not writable: choose a writable folder",
            dir.display()
        )
    })?;
    std::fs::remove_file(probe).ok();
    Ok(())
}

/// The checkpoint `resume_from_checkpoint` points at, if any.
pub fn resume_dir(resume: Option<&ResumeFrom>, output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(match resume {
        None => None,
        Some(ResumeFrom::Latest) => Some(latest(output_dir)?),
        Some(ResumeFrom::Path(path)) => Some(PathBuf::from(path)),
    })
}

/// config.json, generation_config.json and the tokenizer files, copied into every checkpoint;
/// an `adapter` folder gets the tokenizer files only (its model is the base's, as with PEFT).
pub fn model_side_files(files: &ModelFiles, adapter: bool) -> Result<Vec<PathBuf>> {
    let dir = files.weights[0]
        .parent()
        .context("weights file without a folder")?;
    let model_files: &[&str] = match adapter {
        true => &[],
        false => &["config.json", "generation_config.json"],
    };
    let mut paths: Vec<PathBuf> = model_files
        .iter()
        .map(|name| dir.join(name))
        .filter(|p| p.is_file())
        .collect();
    let (tokenizer_json, tokenizer_config) = files.tokenizer_files()?;
    paths.extend([tokenizer_json, tokenizer_config]);
    Ok(paths)
}

/// The policy's trainable weights as (HF name, tensor) pairs for saving (a LoRA policy's: its
/// adapter matrices).
pub fn policy_tensors(policy: &Qwen2) -> Vec<(String, Tensor)> {
    policy
        .named_parameters()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// Saves the policy, optimiser and trainer state as `checkpoint-<global_step>`, plus what
/// `extra` writes into the folder (see [`save_with`]).
pub fn save_training(
    output_dir: &Path,
    policy: &Qwen2,
    optimizer: &AdamW,
    state: &TrainerState,
    outputs: &ModelOutputs,
    save_total_limit: Option<usize>,
    extra: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let model = policy_tensors(policy);
    let ckpt = Checkpoint {
        model: &model,
        adapter: outputs.adapter_format(policy),
        optimizer: &optimizer.state()?,
        state,
        model_files: &outputs.files,
    };
    save_with(output_dir, &ckpt, save_total_limit, extra)
}

/// Restores weights (a LoRA policy's adapter matrices), optimiser state and progress from a
/// checkpoint, refusing one of another model shape or kind.
pub fn restore(dir: &Path, policy: &Qwen2, optimizer: &mut AdamW) -> Result<TrainerState> {
    let (state, optimizer_state) = load_state(dir)?;
    let weights = match policy.lora() {
        Some(spec) => saved_adapter(dir, spec)?,
        None => {
            let weights_path = dir.join(MODEL_FILE);
            if !weights_path.is_file() && AdapterFolder::is_adapter(dir) {
                bail!(
                    "checkpoint {} holds a LoRA adapter ({ADAPTER_CONFIG}), not a whole model: \
                     resume it with use_peft = true and its LoRA settings",
                    dir.display()
                );
            }
            candle_core::safetensors::load(&weights_path, &Device::Cpu)
                .with_context(|| format!("cannot read {}", weights_path.display()))?
        }
    };
    for (name, var) in policy.named_parameters() {
        let saved = weights.get(name).with_context(|| {
            format!(
                "checkpoint {} has no tensor {name}: it was saved from another model; point \
                 resume_from_checkpoint at a checkpoint of this model_name_or_path",
                dir.display()
            )
        })?;
        ensure!(
            saved.dims() == var.dims(),
            "checkpoint {} holds {name} of shape {:?} but the model has {:?}: it was saved from \
             another model",
            dir.display(),
            saved.dims(),
            var.dims()
        );
        var.set(&saved.to_device(var.device())?)?;
    }
    optimizer.load_state(&optimizer_state)?;
    Ok(state)
}

/// The adapter matrices of a LoRA checkpoint, which must have the adapters' shape `spec`.
fn saved_adapter(dir: &Path, spec: &LoraSpec) -> Result<HashMap<String, Tensor>> {
    if !AdapterFolder::is_adapter(dir) {
        bail!(
            "checkpoint {} holds no LoRA adapter ({ADAPTER_CONFIG}): it was saved by a full \
             fine-tuning run; resume it with use_peft = false",
            dir.display()
        );
    }
    let saved = AdapterFolder::read(dir)?;
    let shape = |s: &LoraSpec| (s.r, s.alpha, s.target_modules.clone());
    ensure!(
        shape(&saved.spec) == shape(spec),
        "checkpoint {} holds LoRA adapters with r {}, lora_alpha {} on {:?}, but this run's have \
         r {}, lora_alpha {} on {:?}: resume with the checkpoint's lora_r, lora_alpha and \
         lora_target_modules",
        dir.display(),
        saved.spec.r,
        saved.spec.alpha,
        saved.spec.target_modules,
        spec.r,
        spec.alpha,
        spec.target_modules
    );
    Ok(saved.weights)
}

/// Reads a checkpoint's trainer state and optimiser tensors.
pub fn load_state(dir: &Path) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "{} is not a complete checkpoint: {STATE_FILE} is missing",
            dir.display()
        )
    })?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid trainer state", state_path.display()))?;
    let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &Device::Cpu)
        .with_context(|| format!("cannot read the optimiser state in {}", dir.display()))?;
    Ok((state, optimizer))
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(found);
    };
    for entry in entries {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(step) = step {
            if path.join(STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of `output_dir`, for `resume_from_checkpoint = true`.
pub fn latest(output_dir: &Path) -> Result<PathBuf> {
    match list(output_dir)?.pop() {
        Some((_, path)) => Ok(path),
        None => bail!(
            "resume_from_checkpoint = true but {} holds no complete checkpoint-<step> folder; \
             set it to a checkpoint path or to false",
            output_dir.display()
        ),
    }
}

/// Removes the oldest checkpoints so that at most `limit` remain.
fn prune(output_dir: &Path, limit: usize) -> Result<()> {
    let all = list(output_dir)?;
    let excess = all.len().saturating_sub(limit.max(1));
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&path)
            .with_context(|| format!("cannot remove old checkpoint {}", path.display()))?;
    }
    Ok(())
}

/// fsync every file of a folder and the folder itself.
fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        File::open(entry?.path())?.sync_all()?;
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}
