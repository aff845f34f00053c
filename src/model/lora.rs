//! LoRA as PEFT does it for a causal LM: which linear layers carry adapters, with what rank and
//! scale ([`LoraSpec`]); adapters put on a frozen base, new (PEFT's initialisation) or loaded,
//! switched off for the reference model, turned to training mode (dropout) and merged into the
//! weights (methods of [`Qwen2`]); and PEFT's adapter folder, `adapter_config.json` plus
//! `adapter_model.safetensors` ([`AdapterFolder`]), read and written.
//!
//! Trainable parameters are the adapters' `A` and `B` only, named as PEFT names them without its
//! `base_model.model.` prefix: `model.layers.<i>.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
//! `...lora_B.weight` (`[out, r]`), in the order of PEFT's `named_parameters()`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::linear::{Adapter, Dropout};
use super::load::ModelFiles;
use super::qwen2::{Qwen2, LINEAR_MODULES};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every module name in [`ADAPTER_WEIGHTS`].
pub const KEY_PREFIX: &str = "base_model.model.";
/// The modules adapters can target, by PEFT's `target_modules` names.
pub const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// PEFT's `target_modules` shorthand for every linear layer but the output layer.
pub const ALL_LINEAR: &str = "all-linear";

/// The shape of a model's LoRA adapters (PEFT's `LoraConfig` fields we support).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The rank `r`.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// `lora_dropout`: the probability of zeroing an adapter input element in training.
    pub dropout: f64,
    /// The targeted modules, a subset of [`TARGET_MODULES`] in that order.
    pub target_modules: Vec<String>,
}

impl LoraSpec {
    /// The scale of the adapters' product, `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether the module at `path` inside a decoder layer (`self_attn.q_proj`) carries an
    /// adapter.
    fn targets(&self, path: &str) -> bool {
        self.target_modules
            .iter()
            .any(|name| path.rsplit('.').next() == Some(name.as_str()))
    }
}

/// `names` as target modules: [`TARGET_MODULES`] in their order, `["all-linear"]` standing for all
/// of them. The error names the first name that is not one of them, or a repeated one.
pub fn target_modules(names: &[String]) -> std::result::Result<Vec<String>, String> {
    if names.len() == 1 && names[0] == ALL_LINEAR {
        return Ok(TARGET_MODULES.iter().map(|m| m.to_string()).collect());
    }
    if names.is_empty() {
        return Err(format!(
            "an empty list: name modules from {TARGET_MODULES:?}, or \"{ALL_LINEAR}\""
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if !TARGET_MODULES.contains(&name.as_str()) {
            let hint = match name.as_str() {
                ALL_LINEAR => format!("\"{ALL_LINEAR}\" alone (not in a list with other names)"),
                _ => format!("one of {TARGET_MODULES:?} or \"{ALL_LINEAR}\""),
            };
            return Err(format!(
                "{name:?} is not a module adapters can target: use {hint}"
            ));
        }
        if names[..i].contains(name) {
            return Err(format!("{name:?} is listed twice"));
        }
    }
    Ok(TARGET_MODULES
        .iter()
        .filter(|m| names.iter().any(|n| n == *m))
        .map(|m| m.to_string())
        .collect())
}

/// The name of an adapter matrix (`which` is `A` or `B`) of the module at `path` in layer
/// `layer`: `model.layers.<layer>.<path>.lora_<which>.weight`.
fn parameter_name(layer: usize, path: &str, which: &str) -> String {
    format!("model.layers.{layer}.{path}.lora_{which}.weight")
}

impl Qwen2 {
    /// This frozen model (see [`Qwen2::load_base`]) with new adapters as PEFT initialises them:
    /// `A` from `kaiming_uniform_(a = sqrt(5))`, i.e. uniform in `±1 / sqrt(in)`, and `B` zero,
    /// so the model computes exactly what the base does until `B` is trained. `seed` draws `A`.
    pub fn with_new_adapters(self, spec: LoraSpec, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut weights = HashMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (path, linear) in LINEAR_MODULES.iter().zip(layer.linears()) {
                if !spec.targets(path) {
                    continue;
                }
                let (out_features, in_features) = linear.weight.dims2()?;
                let bound = 1.0 / (in_features as f32).sqrt();
                let a: Vec<f32> = (0..spec.r * in_features)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (spec.r, in_features), &Device::Cpu)?;
                let b = Tensor::zeros((out_features, spec.r), DType::F32, &Device::Cpu)?;
                weights.insert(parameter_name(i, path, "A"), a);
                weights.insert(parameter_name(i, path, "B"), b);
            }
        }
        self.with_adapters(spec, weights)
    }

    /// This frozen model (see [`Qwen2::load_base`]) with the adapters `weights` (by parameter
    /// name, see the module doc) on the modules `spec` targets in every layer; they become the
    /// model's trainable f32 parameters. A missing, misshapen or unused tensor is an error: the
    /// adapter was made for another base or other target modules.
    pub fn with_adapters(
        mut self,
        spec: LoraSpec,
        mut weights: HashMap<String, Tensor>,
    ) -> Result<Self> {
        ensure!(
            self.parameters.is_empty() && self.lora.is_none(),
            "LoRA adapters go on a frozen base model without adapters (Qwen2::load_base)"
        );
        ensure!(spec.r > 0, "a LoRA rank r of 0 is not allowed: use r >= 1");
        let device = self.embed_tokens.device().clone();
        let scale = spec.scale();
        let mut parameters = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (path, linear) in LINEAR_MODULES.iter().zip(layer.linears_mut()) {
                if !spec.targets(path) {
                    continue;
                }
                let (out_features, in_features) = linear.weight.dims2()?;
                let mut take = |which: &str, shape: [usize; 2]| -> Result<(String, Var)> {
                    let name = parameter_name(i, path, which);
                    let tensor = weights.remove(&name).with_context(|| {
                        format!(
                            "the adapter has no tensor {KEY_PREFIX}{name}: it was made for \
                             another base model (fewer layers?) or other target modules than \
                             {:?}",
                            spec.target_modules
                        )
                    })?;
                    ensure!(
                        tensor.dims() == shape,
                        "the adapter's {KEY_PREFIX}{name} has shape {:?} but this base model \
                         needs {shape:?} (r = {}): the adapter was made for another base model",
                        tensor.dims(),
                        spec.r
                    );
                    let var = Var::from_tensor(&tensor.to_dtype(DType::F32)?.to_device(&device)?)?;
                    Ok((name, var))
                };
                let a = take("A", [spec.r, in_features])?;
                let b = take("B", [out_features, spec.r])?;
                linear.adapter = Some(Adapter {
                    a: a.1.as_tensor().clone(),
                    b: b.1.as_tensor().clone(),
                    scale,
                });
                parameters.extend([a, b]);
            }
        }
        if !weights.is_empty() {
            let unused: BTreeSet<String> =
                weights.keys().map(|k| format!("{KEY_PREFIX}{k}")).collect();
            let more = if unused.len() > 3 { ", ..." } else { "" };
            bail!(
                "the adapter holds {} tensors this model has no place for ({}{more}): it was made \
                 for another base model or other target modules than {:?}",
                unused.len(),
                unused
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.target_modules
            );
        }
        self.parameters = parameters;
        self.lora = Some(spec);
        Ok(self)
    }

    /// The LoRA adapters' shape, when the model has adapters.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    /// The frozen base of a LoRA model, adapters switched off: the reference model for free
    /// (the same tensors, no copy, no graph). A model without adapters gives a frozen view of
    /// itself.
    pub fn without_adapters(&self) -> Result<Qwen2> {
        let mut base = self.clone();
        for layer in &mut base.layers {
            for linear in layer.linears_mut() {
                linear.adapter = None;
            }
        }
        base.parameters = Vec::new();
        base.lora = None;
        base.dropout = None;
        Ok(base.inference_copy()?)
    }

    /// This model for a training forward: the adapters' dropout on, its masks drawn from `seed`
    /// (the same seed drops the same elements). Without adapters, or with `lora_dropout` 0, the
    /// model itself.
    pub fn in_training(&self, seed: u64) -> Qwen2 {
        let dropout = self
            .lora
            .as_ref()
            .filter(|spec| spec.dropout > 0.0)
            .map(|spec| Arc::new(Dropout::new(spec.dropout, seed)));
        Qwen2 {
            dropout,
            ..self.clone()
        }
    }

    /// Every weight by transformers name in f32 with the adapters merged in (`W + scale * B A`,
    /// PEFT's `merge_and_unload`): a full model that computes what this one does.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.weights_with(&|linear| linear.merged_weight())?
            .into_iter()
            .map(|(name, tensor)| Ok((name, tensor.to_dtype(DType::F32)?)))
            .collect()
    }
}

/// A PEFT LoRA adapter folder: `adapter_config.json` and `adapter_model.safetensors`.
pub struct AdapterFolder {
    pub spec: LoraSpec,
    /// `base_model_name_or_path`: the model the adapter was trained on, when recorded.
    pub base_model_name_or_path: Option<String>,
    /// The adapter matrices by parameter name (without [`KEY_PREFIX`]), on the CPU.
    pub weights: HashMap<String, Tensor>,
}

impl AdapterFolder {
    /// Whether `dir` is a folder holding `adapter_config.json`.
    pub fn is_adapter(dir: &Path) -> bool {
        dir.join(ADAPTER_CONFIG).is_file()
    }

    /// Reads an adapter folder saved by PEFT (`PeftModel.save_pretrained`) or by us. What we do
    /// not support (DoRA, rsLoRA, per-module ranks, bias training, `modules_to_save`, layer
    /// subsets, regular-expression targets, other PEFT methods) is an error naming the field.
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "{} is not a PEFT adapter folder: it has no readable {ADAPTER_CONFIG}",
                dir.display()
            )
        })?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let spec = spec_of(&config)
            .with_context(|| format!("{} cannot be used", config_path.display()))?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let stored = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .with_context(|| format!("cannot read {}", weights_path.display()))?;
        let weights = stored
            .into_iter()
            .map(|(key, tensor)| match key.strip_prefix(KEY_PREFIX) {
                Some(name) => Ok((name.to_string(), tensor)),
                None => bail!(
                    "{}: tensor {key} does not start with {KEY_PREFIX:?}, as PEFT names a causal \
                     LM's adapter tensors",
                    weights_path.display()
                ),
            })
            .collect::<Result<_>>()?;
        let base_model_name_or_path = config["base_model_name_or_path"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        Ok(Self {
            spec,
            base_model_name_or_path,
            weights,
        })
    }

    /// The files of the base model of the adapter read from `dir`: `base` when given, else the
    /// `base_model_name_or_path` it records (a local folder or a hub id at `revision`).
    pub fn base_model_files(
        &self,
        dir: &Path,
        base: Option<&str>,
        revision: &str,
    ) -> Result<ModelFiles> {
        let (base, from) = match (base, &self.base_model_name_or_path) {
            (Some(base), _) => (base, "as given"),
            (None, Some(recorded)) => (recorded.as_str(), "its base_model_name_or_path"),
            (None, None) => bail!(
                "the adapter {} names no base model (base_model_name_or_path): give its base \
                 model (--base-model)",
                dir.display()
            ),
        };
        ModelFiles::resolve(base, revision).with_context(|| {
            format!(
                "loading {base:?}, {from}, as the base model of the adapter {} (--base-model \
                 gives another)",
                dir.display()
            )
        })
    }

    /// Writes `adapter_config.json` (PEFT's fields) and `adapter_model.safetensors` (the
    /// adapter matrices `parameters`, by parameter name) into `dir`, which must exist.
    pub fn write(
        dir: &Path,
        spec: &LoraSpec,
        base_model_name_or_path: &str,
        parameters: &[(String, Tensor)],
    ) -> Result<()> {
        let number = |value: f64| match value.fract() == 0.0 && value.abs() < 1e15 {
            true => json!(value as i64),
            false => json!(value),
        };
        let config = json!({
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": number(spec.alpha),
            "lora_dropout": spec.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": spec.r,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
            "target_modules": spec.target_modules,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": false,
        });
        let config_path = dir.join(ADAPTER_CONFIG);
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n")
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let tensors: HashMap<String, Tensor> = parameters
            .iter()
            .map(|(name, tensor)| (format!("{KEY_PREFIX}{name}"), tensor.clone()))
            .collect();
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        candle_core::safetensors::save(&tensors, &weights_path)
            .with_context(|| format!("cannot write {}", weights_path.display()))
    }
}

/// The [`LoraSpec`] of a parsed `adapter_config.json`, refusing what we do not support.
fn spec_of(config: &Value) -> Result<LoraSpec> {
    let field = |name: &str| &config[name];
    let peft_type = field("peft_type").as_str().unwrap_or("");
    ensure!(
        peft_type == "LORA",
        "peft_type is {:?}: only LoRA adapters (\"LORA\") are supported",
        field("peft_type")
    );
    let r = field("r")
        .as_u64()
        .with_context(|| format!("r is {}: expected the rank, an integer >= 1", field("r")))?;
    ensure!(r >= 1, "r is 0: the rank must be at least 1");
    let alpha = field("lora_alpha")
        .as_f64()
        .with_context(|| format!("lora_alpha is {}: expected a number", field("lora_alpha")))?;
    let dropout = match field("lora_dropout") {
        Value::Null => 0.0,
        value => value
            .as_f64()
            .filter(|p| (0.0..1.0).contains(p))
            .with_context(|| format!("lora_dropout is {value}: expected a number in [0, 1)"))?,
    };
    let names: Vec<String> = match field("target_modules") {
        Value::String(name) if name == ALL_LINEAR => vec![name.clone()],
        Value::String(pattern) => bail!(
            "target_modules is the regular expression {pattern:?}, which is not supported: list \
             module names from {TARGET_MODULES:?}"
        ),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("target_modules holds {item}, not a module name"))
            })
            .collect::<Result<_>>()?,
        other => bail!("target_modules is {other}: expected a list of module names"),
    };
    let target_modules =
        target_modules(&names).map_err(|problem| anyhow::anyhow!("target_modules: {problem}"))?;
    match field("bias") {
        Value::Null => {}
        Value::String(bias) if bias == "none" => {}
        other => bail!("bias is {other}: only \"none\" is supported (no trained biases)"),
    }
    for flag in ["use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"] {
        ensure!(
            !field(flag).as_bool().unwrap_or(false),
            "{flag} is true, which is not supported"
        );
    }
    for unset in [
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
        "layer_replication",
    ] {
        let empty = match field(unset) {
            Value::Null => true,
            Value::Array(items) => items.is_empty(),
            Value::Object(items) => items.is_empty(),
            Value::String(text) => text.is_empty(),
            _ => false,
        };
        ensure!(
            empty,
            "{unset} is {}, which is not supported (adapters on every layer's target modules, \
             one rank and alpha)",
            field(unset)
        );
    }
    Ok(LoraSpec {
        r: r as usize,
        alpha,
        dropout,
        target_modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn target_modules_are_checked_and_put_in_model_order() {
        assert_eq!(
            target_modules(&names(&["v_proj", "q_proj"])).unwrap(),
            ["q_proj", "v_proj"]
        );
        assert_eq!(
            target_modules(&names(&["all-linear"])).unwrap(),
            TARGET_MODULES
        );
        let unknown = target_modules(&names(&["q_proj", "qproj"])).unwrap_err();
        assert!(unknown.contains("\"qproj\""), "{unknown}");
        let twice = target_modules(&names(&["q_proj", "q_proj"])).unwrap_err();
        assert!(twice.contains("twice"), "{twice}");
        let mixed = target_modules(&names(&["q_proj", "all-linear"])).unwrap_err();
        assert!(mixed.contains("alone"), "{mixed}");
        assert!(target_modules(&[]).is_err());
    }

    #[test]
    fn a_module_is_targeted_by_its_last_name() {
        let spec = LoraSpec {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: names(&["q_proj", "down_proj"]),
        };
        assert!(spec.targets("self_attn.q_proj"));
        assert!(spec.targets("mlp.down_proj"));
        assert!(!spec.targets("self_attn.k_proj"));
        assert_eq!(spec.scale(), 2.0);
    }
}
