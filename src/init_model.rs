//! Randomly initialised Qwen2 or Qwen3 models of any shape (`grpo init-model`), for tests,
//! benchmarks and training from scratch: weights drawn as transformers'
//! `Qwen2PreTrainedModel._init_weights` / `Qwen3PreTrainedModel._init_weights` draw them
//! (matrices and embeddings normal(0, `initializer_range`), norm weights (q_norm and k_norm
//! included) 1, biases 0,
//! the `pad_token_id` embedding row 0), held in memory ([`random_model`]) or written as a
//! transformers checkpoint folder ([`write_random_checkpoint`], [`init_model_folder`]).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::Normal;
use serde_json::{json, Map, Value};

use crate::model::{ModelFamily, Qwen2, Qwen2Config};

/// transformers' `PretrainedConfig.initializer_range` default.
pub const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// The tokenizer files `--tokenizer-from` copies.
const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// Random f32 CPU parameters for `config` in `named_parameters()` order
/// ([`Qwen2Config::parameter_shapes`]): normal(0, `std`) for matrices and embeddings, 1 for norm
/// weights, 0 for biases and for the embedding row `pad_token_id` (when given). The same
/// `seed` gives the same values.
pub fn random_parameters(
    config: &Qwen2Config,
    std: f64,
    seed: u64,
    pad_token_id: Option<usize>,
) -> Result<Vec<(String, Tensor)>> {
    let normal = Normal::new(0.0f32, std as f32)
        .ok()
        .filter(|_| std.is_finite() && std > 0.0)
        .with_context(|| format!("initializer_range must be a positive number, got {std}"))?;
    let mut rng = StdRng::seed_from_u64(seed);
    config
        .parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let tensor = if name.ends_with("norm.weight") {
                Tensor::ones(shape, DType::F32, &Device::Cpu)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, &Device::Cpu)?
            } else {
                let mut values: Vec<f32> = (0..count).map(|_| rng.sample(normal)).collect();
                if name == "model.embed_tokens.weight" {
                    if let Some(pad) = pad_token_id.filter(|&pad| pad < config.vocab_size) {
                        let width = config.hidden_size;
                        values[pad * width..(pad + 1) * width].fill(0.0);
                    }
                }
                Tensor::from_vec(values, shape, &Device::Cpu)?
            };
            Ok((name, tensor))
        })
        .collect()
}

/// A trainable random model of shape `config` on `device` (see [`random_parameters`]): no
/// files needed, for benchmarks and tests.
pub fn random_model(config: Qwen2Config, std: f64, seed: u64, device: &Device) -> Result<Qwen2> {
    let parameters = random_parameters(&config, std, seed, None)?
        .into_iter()
        .map(|(name, tensor)| Ok((name, tensor.to_device(device)?)))
        .collect::<Result<Vec<_>>>()?;
    Qwen2::from_parameters(config, parameters, true)
}

/// A transformers `config.json` (as a JSON object) describing `config` (its family's
/// `model_type` and `architectures`), with `initializer_range` [`DEFAULT_INITIALIZER_RANGE`]
/// and f32 weights; pass it to [`write_random_checkpoint`] to get a loadable folder of any
/// shape.
pub fn config_json(config: &Qwen2Config) -> Value {
    let mut value = json!({
        "architectures": [config.family.architecture()],
        "model_type": config.family.model_type(),
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": DEFAULT_INITIALIZER_RANGE,
        "attention_dropout": 0.0,
        "use_sliding_window": false,
        "torch_dtype": "float32",
    });
    match config.family {
        ModelFamily::Qwen2
            if config.head_dim * config.num_attention_heads == config.hidden_size => {}
        ModelFamily::Qwen2 => value["head_dim"] = json!(config.head_dim),
        ModelFamily::Qwen3 => {
            value["head_dim"] = json!(config.head_dim);
            value["attention_bias"] = json!(config.attention_bias);
        }
    }
    value
}

/// Writes a random checkpoint folder `out` for the transformers `config_json` object:
/// `config.json` (as given), `model.safetensors` (HF names; no `lm_head.weight` when the
/// embeddings are tied; stored in the config's `torch_dtype`/`dtype`, f32 by default) and
/// `generation_config.json` (the config's bos/eos/pad ids). `origin` names the config in errors.
/// Refuses to overwrite a folder that already holds a model.
pub fn write_random_checkpoint(
    config_json: &Value,
    origin: &str,
    out: &Path,
    seed: u64,
) -> Result<()> {
    let fields = config_json
        .as_object()
        .with_context(|| format!("{origin} must be a JSON object"))?;
    let text = serde_json::to_string_pretty(config_json)?;
    let config = Qwen2Config::parse(&text, origin)?;
    let std = match fields.get("initializer_range") {
        None | Some(Value::Null) => DEFAULT_INITIALIZER_RANGE,
        Some(value) => value
            .as_f64()
            .with_context(|| format!("{origin}: initializer_range must be a number"))?,
    };
    let pad_token_id = fields
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .map(|id| id as usize);
    let stored_dtype = stored_dtype(fields, origin)?;

    for existing in [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ] {
        if out.join(existing).exists() {
            bail!(
                "{} already holds a model ({existing}); choose another --out or remove it first",
                out.display()
            );
        }
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let parameters = random_parameters(&config, std, seed, pad_token_id)?
        .into_iter()
        .map(|(name, tensor)| Ok((name, tensor.to_dtype(stored_dtype)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let weights = out.join("model.safetensors");
    candle_core::safetensors::save(&parameters, &weights)
        .with_context(|| format!("writing {}", weights.display()))?;

    let mut generation = Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(id) = fields.get(key).filter(|id| !id.is_null()) {
            generation.insert(key.to_string(), id.clone());
        }
    }
    write_json(
        &out.join("generation_config.json"),
        &Value::Object(generation),
    )?;
    write_json(&out.join("config.json"), config_json)
}

/// `grpo init-model`: a random checkpoint in `out` shaped like the `config.json` at `like`,
/// with the tokenizer files of the folder `tokenizer_from` copied when given.
pub fn init_model_folder(
    like: &Path,
    out: &Path,
    seed: u64,
    tokenizer_from: Option<&Path>,
) -> Result<()> {
    let origin = like.display().to_string();
    let text = fs::read_to_string(like).with_context(|| format!("reading --like {origin}"))?;
    let config_json: Value = serde_json::from_str(&text)
        .with_context(|| format!("--like {origin} is not a JSON config.json"))?;
    if let Some(dir) = tokenizer_from {
        for file in TOKENIZER_FILES {
            if !dir.join(file).is_file() {
                bail!(
                    "--tokenizer-from {} has no {file} (give a model folder with a tokenizer)",
                    dir.display()
                );
            }
        }
    }
    write_random_checkpoint(&config_json, &origin, out, seed)?;
    if let Some(dir) = tokenizer_from {
        for file in TOKENIZER_FILES {
            fs::copy(dir.join(file), out.join(file))
                .with_context(|| format!("copying {file} from {}", dir.display()))?;
        }
    }
    Ok(())
}

/// The dtype named by `torch_dtype` (transformers 4) or `dtype` (transformers 5), f32 when
/// neither is set.
fn stored_dtype(fields: &Map<String, Value>, origin: &str) -> Result<DType> {
    let name = ["torch_dtype", "dtype"]
        .iter()
        .find_map(|key| fields.get(*key).and_then(Value::as_str));
    match name {
        None | Some("float32") => Ok(DType::F32),
        Some("bfloat16") => Ok(DType::BF16),
        Some("float16") => Ok(DType::F16),
        Some(other) => bail!(
            "{origin}: torch_dtype {other:?} is not supported (use float32, bfloat16 or float16)"
        ),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
