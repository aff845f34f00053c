//! Finding and reading a Qwen2 / Qwen2.5 or Qwen3 checkpoint: `config.json` (the family from its
//! `model_type` or `architectures`), safetensors weights (single file or sharded through
//! `model.safetensors.index.json`, any float dtype, read into f32), `generation_config.json` and
//! the paths of the tokenizer files, from a local folder or a hub repo.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::hub::{is_inside, HubRepo, RepoKind};

/// The decoder families this crate runs: transformers' `Qwen2ForCausalLM` (Qwen2, Qwen2.5) and
/// `Qwen3ForCausalLM` (the dense Qwen3 models). They are one architecture with three
/// differences, which [`Qwen2Config`] turns into flags: Qwen3 normalises every query and key
/// head (`q_norm`, `k_norm`) before the rotary embeddings, takes its projection biases from
/// `attention_bias` (Qwen2 always has q/k/v biases and no o_proj bias), and defaults `head_dim`
/// to 128 rather than `hidden_size / num_attention_heads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    Qwen2,
    Qwen3,
}

impl ModelFamily {
    /// Every supported family.
    pub const ALL: [ModelFamily; 2] = [ModelFamily::Qwen2, ModelFamily::Qwen3];

    /// The `model_type` of its `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "qwen2",
            ModelFamily::Qwen3 => "qwen3",
        }
    }

    /// The transformers class of its causal LM (`architectures` in `config.json`).
    pub fn architecture(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "Qwen2ForCausalLM",
            ModelFamily::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    fn with_model_type(model_type: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|family| family.model_type() == model_type)
    }

    fn with_architecture(architecture: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|family| family.architecture() == architecture)
    }
}

/// The family `config.json` names: its `model_type` (what transformers' Auto classes go by),
/// checked against its `architectures`; Qwen2 when it names neither (older hand-written
/// configs). An unsupported or contradictory name is an error naming it.
fn family(raw: &RawConfig, origin: &str) -> Result<ModelFamily> {
    let by_type = match raw.model_type.as_deref() {
        None => None,
        Some(model_type) => Some(ModelFamily::with_model_type(model_type).with_context(|| {
            format!(
                "{origin}: model_type {model_type:?} is not supported; grpo runs the model types \
                 {}",
                supported_families()
            )
        })?),
    };
    let mut by_architecture = None;
    for architecture in raw.architectures.iter().flatten() {
        let family = ModelFamily::with_architecture(architecture).with_context(|| {
            format!(
                "{origin}: architectures names {architecture:?}, which is not supported; grpo \
                 runs the causal LMs {}",
                supported_families()
            )
        })?;
        by_architecture.get_or_insert(family);
    }
    match (by_type, by_architecture) {
        (Some(by_type), Some(by_architecture)) if by_type != by_architecture => bail!(
            "{origin}: model_type {:?} contradicts architectures {:?} (a {} model is a {}); \
             fix config.json",
            by_type.model_type(),
            raw.architectures.as_deref().unwrap_or_default(),
            by_type.model_type(),
            by_type.architecture()
        ),
        (by_type, by_architecture) => Ok(by_type.or(by_architecture).unwrap_or(ModelFamily::Qwen2)),
    }
}

/// `"qwen2" (Qwen2ForCausalLM), "qwen3" (Qwen3ForCausalLM)`, for messages.
fn supported_families() -> String {
    ModelFamily::ALL
        .iter()
        .map(|family| format!("{:?} ({})", family.model_type(), family.architecture()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The hyper-parameters the forward pass needs, read from `config.json`, for either
/// [`ModelFamily`].
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Config {
    pub family: ModelFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `config.json`'s `head_dim`; when absent, `hidden_size / num_attention_heads` for Qwen2
    /// and 128 for Qwen3 (transformers' defaults).
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// No `lm_head.weight`: the output projection is `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// `config.json`'s `attention_bias` (default false): Qwen3's q/k/v/o projections have
    /// biases when set; Qwen2 ignores it, as transformers does (see [`Qwen2Config::qkv_bias`]).
    pub attention_bias: bool,
}

/// `config.json` as written by transformers (only the fields we use).
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    /// transformers 5's form of the RoPE settings.
    rope_parameters: Option<RopeParameters>,
    /// transformers 4's form of the RoPE scaling (null for default RoPE).
    rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    eos_token_id: Option<TokenIds>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    /// transformers 4's older name of `rope_type`.
    #[serde(rename = "type")]
    legacy_type: Option<String>,
}

impl RopeParameters {
    fn rope_type(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.legacy_type.as_deref())
    }
}

/// Qwen3's `head_dim` when `config.json` has none (`Qwen3Config.head_dim`).
const QWEN3_DEFAULT_HEAD_DIM: usize = 128;

fn default_max_position_embeddings() -> usize {
    32768
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// An `eos_token_id` field: one id or a list of ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

#[derive(Debug, Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
}

#[derive(Debug, Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Qwen2Config {
    /// Parses the text of a `config.json` (`origin`, e.g. its path, names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        Ok(Self::from_raw(parse_json(text, origin)?, origin)?.0)
    }

    fn from_raw(raw: RawConfig, origin: &str) -> Result<(Self, Vec<u32>)> {
        let family = family(&raw, origin)?;
        if let Some(activation) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            bail!(
                "{origin}: hidden_act {activation:?} is not supported (Qwen models use \"silu\")"
            );
        }
        let sliding_layer = raw
            .layer_types
            .iter()
            .flatten()
            .any(|t| t != "full_attention");
        if raw.use_sliding_window == Some(true) || sliding_layer {
            bail!(
                "{origin}: sliding-window attention (use_sliding_window = true or a \
                 \"sliding_attention\" layer type) is not supported; set use_sliding_window to \
                 false (the Qwen2.5 and Qwen3 releases do)"
            );
        }
        for (key, rope) in [
            ("rope_parameters", &raw.rope_parameters),
            ("rope_scaling", &raw.rope_scaling),
        ] {
            if let Some(rope_type) = rope.as_ref().and_then(RopeParameters::rope_type) {
                if rope_type != "default" {
                    bail!(
                        "{origin}: {key} asks for rope_type {rope_type:?}, which is not \
                         supported (only \"default\" RoPE; remove the scaling to train at the \
                         native context length)"
                    );
                }
            }
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0
            || num_key_value_heads == 0
            || raw.num_attention_heads % num_key_value_heads != 0
        {
            bail!(
                "{origin}: num_attention_heads ({}) must be a positive multiple of \
                 num_key_value_heads ({num_key_value_heads})",
                raw.num_attention_heads
            );
        }
        let head_dim = match raw.head_dim {
            Some(head_dim) => head_dim,
            None if family == ModelFamily::Qwen3 => QWEN3_DEFAULT_HEAD_DIM,
            None if raw.hidden_size % raw.num_attention_heads == 0 => {
                raw.hidden_size / raw.num_attention_heads
            }
            None => bail!(
                "{origin}: hidden_size ({}) is not divisible by num_attention_heads ({}) and no \
                 head_dim is given",
                raw.hidden_size,
                raw.num_attention_heads
            ),
        };
        if head_dim % 2 != 0 {
            bail!("{origin}: head_dim {head_dim} must be even for rotary embeddings");
        }
        let config = Qwen2Config {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias.unwrap_or(false),
        };
        let eos = raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default();
        Ok((config, eos))
    }

    /// Whether the q/k/v projections have biases: always for Qwen2, `attention_bias` for Qwen3.
    pub fn qkv_bias(&self) -> bool {
        match self.family {
            ModelFamily::Qwen2 => true,
            ModelFamily::Qwen3 => self.attention_bias,
        }
    }

    /// Whether the output projection has a bias: never for Qwen2, `attention_bias` for Qwen3.
    pub fn o_proj_bias(&self) -> bool {
        self.family == ModelFamily::Qwen3 && self.attention_bias
    }

    /// Whether queries and keys get a per-head RMSNorm (`q_norm`, `k_norm`): Qwen3.
    pub fn qk_norm(&self) -> bool {
        self.family == ModelFamily::Qwen3
    }

    /// Every parameter name and shape in transformers' `named_parameters()` order (a tied
    /// `lm_head` is not listed).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (d, q) = (self.head_dim, self.num_attention_heads * self.head_dim);
        let kv = self.num_key_value_heads * self.head_dim;
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for layer in 0..self.num_hidden_layers {
            let p = format!("model.layers.{layer}.self_attn");
            let mut projection = |name: &str, out: usize, input: usize, bias: bool| {
                shapes.push((format!("{p}.{name}.weight"), vec![out, input]));
                if bias {
                    shapes.push((format!("{p}.{name}.bias"), vec![out]));
                }
            };
            projection("q_proj", q, h, self.qkv_bias());
            projection("k_proj", kv, h, self.qkv_bias());
            projection("v_proj", kv, h, self.qkv_bias());
            projection("o_proj", h, q, self.o_proj_bias());
            if self.qk_norm() {
                shapes.push((format!("{p}.q_norm.weight"), vec![d]));
                shapes.push((format!("{p}.k_norm.weight"), vec![d]));
            }
            let p = format!("model.layers.{layer}");
            shapes.extend([
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            ]);
        }
        shapes.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        shapes
    }
}

/// A resolved checkpoint: parsed config plus the local paths of every file we read.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user gave (`model_name_or_path`), for messages.
    pub source: String,
    pub config: Qwen2Config,
    /// Safetensors files holding the weights (one, or every shard of the index).
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, when the checkpoint has one (a reference model need not).
    pub tokenizer_json: Option<PathBuf>,
    /// `tokenizer_config.json`, when the checkpoint has one.
    pub tokenizer_config_json: Option<PathBuf>,
    /// `generation_config.json`'s `eos_token_id` (int or list), else `config.json`'s; may be
    /// empty when neither names one.
    pub eos_token_ids: Vec<u32>,
}

/// Where a checkpoint's files come from.
enum Source {
    Local(PathBuf),
    Hub(HubRepo),
}

impl Source {
    fn has(&self, name: &str, hub_files: &BTreeSet<String>) -> bool {
        match self {
            Source::Local(dir) => dir.join(name).is_file(),
            Source::Hub(_) => hub_files.contains(name),
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        match self {
            Source::Local(dir) => Ok(dir.join(name)),
            Source::Hub(repo) => repo
                .file(name)
                .with_context(|| format!("downloading {name} from the hub repo {}", repo.id)),
        }
    }
}

impl ModelFiles {
    /// Resolves `model_name_or_path`: an existing local folder, else a hub model id at
    /// `revision`.
    pub fn resolve(model_name_or_path: &str, revision: &str) -> Result<Self> {
        let local = Path::new(model_name_or_path);
        let (source, hub_files) = if local.is_dir() {
            (Source::Local(local.to_path_buf()), BTreeSet::new())
        } else {
            let repo = HubRepo {
                id: model_name_or_path.to_string(),
                kind: RepoKind::Model,
                revision: revision.to_string(),
            };
            let files = repo.list_files().with_context(|| {
                format!(
                    "{model_name_or_path:?} is not a local folder, and listing it as a hub model \
                     failed (check the path or the model id)"
                )
            })?;
            (Source::Hub(repo), files.into_iter().collect())
        };
        let name = model_name_or_path;
        if local.join(super::lora::ADAPTER_CONFIG).is_file() && !local.join("config.json").is_file()
        {
            bail!(
                "{name:?} is a PEFT adapter folder ({}), not a model: give its base model here \
                 and the adapter as adapter_name_or_path (with use_peft = true), or pass the \
                 folder to eval/sample as --checkpoint",
                super::lora::ADAPTER_CONFIG
            );
        }
        let require = |file: &str| -> Result<PathBuf> {
            if !source.has(file, &hub_files) {
                bail!("model {name:?} has no {file} (a Qwen2 checkpoint in transformers format is required)");
            }
            source.path(file)
        };

        let config_path = require("config.json")?;
        let origin = config_path.display().to_string();
        let text =
            std::fs::read_to_string(&config_path).with_context(|| format!("reading {origin}"))?;
        let (config, config_eos) = Qwen2Config::from_raw(parse_json(&text, &origin)?, &origin)?;

        let weights = if source.has("model.safetensors", &hub_files) {
            vec![source.path("model.safetensors")?]
        } else if source.has("model.safetensors.index.json", &hub_files) {
            let index_path = source.path("model.safetensors.index.json")?;
            let origin = index_path.display().to_string();
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("reading {origin}"))?;
            let index: ShardIndex = parse_json(&text, &origin)?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            if let Some(outside) = shards.iter().find(|shard| !is_inside(shard)) {
                bail!(
                    "model {name:?}: {origin} names the weight file {outside:?}, which is not \
                     inside the model folder; every shard must be a file under the folder \
                     (a relative path without `..`): fix the index's weight_map"
                );
            }
            shards
                .into_iter()
                .map(|shard| require(shard))
                .collect::<Result<Vec<_>>>()?
        } else if source.has("pytorch_model.bin", &hub_files)
            || source.has("pytorch_model.bin.index.json", &hub_files)
        {
            bail!(
                "model {name:?} only has pickle weights (pytorch_model.bin); safetensors is \
                 required. Convert once with Python: \
                 `AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`"
            );
        } else {
            bail!("model {name:?} has no model.safetensors nor model.safetensors.index.json");
        };

        let optional = |file: &str| -> Result<Option<PathBuf>> {
            match source.has(file, &hub_files) {
                true => source.path(file).map(Some),
                false => Ok(None),
            }
        };
        let tokenizer_json = optional("tokenizer.json")?;
        let tokenizer_config_json = optional("tokenizer_config.json")?;

        let eos_token_ids = if source.has("generation_config.json", &hub_files) {
            let path = source.path("generation_config.json")?;
            let origin = path.display().to_string();
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {origin}"))?;
            let generation: GenerationConfig = parse_json(&text, &origin)?;
            generation
                .eos_token_id
                .map(TokenIds::into_vec)
                .unwrap_or(config_eos)
        } else {
            config_eos
        };

        Ok(ModelFiles {
            source: name.to_string(),
            config,
            weights,
            tokenizer_json,
            tokenizer_config_json,
            eos_token_ids,
        })
    }

    /// The folder holding the tokenizer files.
    pub fn tokenizer_dir(&self) -> Result<PathBuf> {
        let (tokenizer_json, _) = self.tokenizer_files()?;
        Ok(tokenizer_json
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default())
    }

    /// `tokenizer.json` and `tokenizer_config.json`, or an error naming the missing one.
    pub fn tokenizer_files(&self) -> Result<(PathBuf, PathBuf)> {
        let missing = |file: &str| {
            anyhow::anyhow!(
                "model {:?} has no {file}; the policy checkpoint must include its tokenizer",
                self.source
            )
        };
        Ok((
            self.tokenizer_json
                .clone()
                .ok_or_else(|| missing("tokenizer.json"))?,
            self.tokenizer_config_json
                .clone()
                .ok_or_else(|| missing("tokenizer_config.json"))?,
        ))
    }

    /// Reads every parameter named by the config as f32 on `device` (bf16/f16 checkpoints are
    /// converted one shard at a time, so the stored copy of only one shard is held besides the
    /// f32 weights), checking names and shapes. Returned in `named_parameters()` order.
    pub fn load_parameters(&self, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let shapes = self.config.parameter_shapes();
        let mut loaded: HashMap<String, Tensor> = HashMap::with_capacity(shapes.len());
        let wanted: HashMap<&str, &[usize]> = shapes
            .iter()
            .map(|(name, shape)| (name.as_str(), shape.as_slice()))
            .collect();
        for path in &self.weights {
            let tensors = candle_core::safetensors::load(path, &Device::Cpu)
                .with_context(|| format!("reading safetensors {}", path.display()))?;
            for (name, tensor) in tensors {
                let Some(&shape) = wanted.get(name.as_str()) else {
                    continue;
                };
                if tensor.dims() != shape {
                    bail!(
                        "model {:?}: tensor {name} in {} has shape {:?}, config.json implies \
                         {shape:?}",
                        self.source,
                        path.display(),
                        tensor.dims()
                    );
                }
                let tensor = tensor.to_dtype(DType::F32)?.to_device(device)?;
                loaded.insert(name, tensor);
            }
        }
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let tensor = loaded.remove(&name).with_context(|| {
                    format!(
                        "model {:?}: tensor {name} (shape {shape:?}) is missing from {}",
                        self.source,
                        display_paths(&self.weights)
                    )
                })?;
                Ok((name, tensor))
            })
            .collect()
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    serde_json::from_str(text).with_context(|| format!("{origin} is not a valid config file"))
}
