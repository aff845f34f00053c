//! `grpo merge`: a PEFT LoRA adapter folded into its base model (PEFT's `merge_and_unload`),
//! written as a full transformers model folder that loads without PEFT.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use crate::checkpoint;
use crate::model::lora::ADAPTER_CONFIG;
use crate::model::{AdapterFolder, Qwen2};

/// Merges the adapter folder `adapter_dir` into its base model (`base_model`, else the
/// adapter's `base_model_name_or_path`) and writes `out`: config.json, model.safetensors (f32,
/// every targeted weight `W + (lora_alpha / r) B A`), generation_config.json and the base's
/// tokenizer files. Refuses an `out` that already holds a model or an adapter.
pub fn merge(adapter_dir: &Path, base_model: Option<&str>, out: &Path) -> Result<()> {
    for existing in [
        "config.json",
        checkpoint::MODEL_FILE,
        "model.safetensors.index.json",
        ADAPTER_CONFIG,
    ] {
        if out.join(existing).exists() {
            bail!(
                "--out {} already holds a model or adapter ({existing}); choose another folder \
                 or remove it first",
                out.display()
            );
        }
    }
    if !AdapterFolder::is_adapter(adapter_dir) {
        bail!(
            "--adapter {} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}",
            adapter_dir.display()
        );
    }
    let adapter = AdapterFolder::read(adapter_dir)?;
    let files = adapter.base_model_files(adapter_dir, base_model, "main")?;
    let model = Qwen2::load_base(&files, &Device::Cpu, DType::F32)?
        .with_adapters(adapter.spec, adapter.weights)?;
    checkpoint::write_model(
        out,
        &model.merged_weights()?,
        None,
        &checkpoint::model_side_files(&files, false)?,
    )
}
