//! Our Qwen decoder: transformers' `Qwen2ForCausalLM` (`modeling_qwen2.py`, Qwen2 and Qwen2.5)
//! and `Qwen3ForCausalLM` (`modeling_qwen3.py`) in one implementation, their differences read
//! from the config ([`Qwen2Config::qkv_bias`], [`Qwen2Config::o_proj_bias`],
//! [`Qwen2Config::qk_norm`], `head_dim`); differentiable end to end, for batched left-padded
//! prompts, with an optional KV cache for sampling and a grouped forward that shares each
//! prompt's pass among its G completions.
//!
//! # Inputs
//! * `input_ids` `[b, t]` (`u32` or `i64`), `position_ids` `[b, t]` (any integer dtype; for a
//!   left-padded batch use [`position_ids_from_mask`]: `(cumsum(mask) - 1).clamp(min = 0)`),
//! * `attention_mask` `[b, k]` of 0/1 over ALL keys the new tokens may see: the cached ones
//!   followed by the `t` new ones (`k = cache.len() + t`; without a cache `k = t`).
//!
//! [`Qwen2::forward`] returns the hidden states after the final norm, `[b, t, hidden]`;
//! [`Qwen2::lm_head`] turns (a slice of) them into logits, so callers compute logits only where
//! they need them (see `logprobs`).
//!
//! # Sampling with the KV cache
//! ```text
//! // prefill: B prompts, left-padded to P, room for N new tokens
//! let mut cache = model.new_cache(B, P + N)?;
//! let hidden = model.forward(&prompt_ids, &position_ids_from_mask(&prompt_mask)?, &prompt_mask,
//!                            Some(&mut cache))?;                       // [B, P, h]
//! let logits = model.lm_head(&hidden.narrow(1, P - 1, 1)?)?;            // [B, 1, V]
//! // G samples per prompt: row r of the cache becomes rows r*G .. r*G+G-1
//! let mut cache = cache.repeat_rows(G)?;
//! // decode: one token per row, position = that row's previous position + 1, key mask = the
//! // prompt mask (repeated G-fold) followed by 1 for every generated token
//! let hidden = model.forward(&next_ids /*[B*G, 1]*/, &next_positions /*[B*G, 1]*/,
//!                            &key_mask /*[B*G, cache.len() + 1]*/, Some(&mut cache))?;
//! ```
//! The cache is written in place and records no gradient: use it for sampling only.
//! [`Qwen2::new_cache`] makes one in the model's compute dtype.
//!
//! # Precision
//! Weights are stored in f32 (the policy's [`Var`]s are the f32 master copies; a LoRA model's
//! frozen base is stored in the compute dtype, see [`Qwen2::load_base`]). With a compute
//! dtype of bf16 ([`Qwen2::with_compute_dtype`], the CUDA setting) the forward does what
//! PyTorch autocast does: matrices and biases are cast to bf16 for every matmul (the cast is
//! differentiable, so gradients land on the f32 `Var`s), while the residual stream, RMSNorm,
//! the attention softmax and the logits stay f32. With f32 (the default) every cast is a no-op.
//! See `docs/PRECISION.md`.
//!
//! # Training
//! Policy parameters are candle [`Var`]s, listed by [`Qwen2::named_parameters`] in
//! transformers' `named_parameters()` order; a tied `lm_head` reuses
//! `model.embed_tokens.weight` (one `Var` whose gradient sums both uses). The reference model
//! ([`Qwen2::load_reference`]) holds plain tensors and records no graph. With LoRA adapters
//! (`lora`) the only `Var`s are the adapters' matrices; the base's plain tensors get no
//! gradient, and the reference is the same model with its adapters switched off.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor, Var};

use super::linear::{Dropout, Linear};
use super::load::{ModelFiles, Qwen2Config};
use super::lora::LoraSpec;
use super::ops::{
    apply_rope, attention, causal_bias, linear, merge_heads, position_ids_from_mask, rms_norm,
    rope_tables, split_heads, swiglu,
};

/// The linear layers of a decoder layer by their module names inside it, in transformers'
/// order (the order of [`DecoderLayer::linears`]).
pub const LINEAR_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Weights of one decoder layer.
#[derive(Clone)]
pub(crate) struct DecoderLayer {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    /// Qwen3's per-head RMSNorm weights `[head_dim]` of queries and keys.
    pub(crate) qk_norm: Option<(Tensor, Tensor)>,
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
}

impl DecoderLayer {
    /// This layer with `matrix` applied to every linear layer's tensors (weights, biases,
    /// adapters), `norm` to the norm weights.
    fn map(
        &self,
        matrix: impl Fn(&Tensor) -> Result<Tensor>,
        norm: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        Ok(DecoderLayer {
            q_proj: self.q_proj.map(&matrix)?,
            k_proj: self.k_proj.map(&matrix)?,
            v_proj: self.v_proj.map(&matrix)?,
            o_proj: self.o_proj.map(&matrix)?,
            qk_norm: match &self.qk_norm {
                Some((q, k)) => Some((norm(q)?, norm(k)?)),
                None => None,
            },
            gate_proj: self.gate_proj.map(&matrix)?,
            up_proj: self.up_proj.map(&matrix)?,
            down_proj: self.down_proj.map(&matrix)?,
            input_layernorm: norm(&self.input_layernorm)?,
            post_attention_layernorm: norm(&self.post_attention_layernorm)?,
        })
    }

    /// The linear layers, in the order of [`LINEAR_MODULES`].
    pub(crate) fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// [`DecoderLayer::linears`], mutable.
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }

    /// Every tensor of the layer by its name inside the layer, in `named_parameters()` order,
    /// with `matrix` giving each linear layer's weight.
    fn weights(
        &self,
        matrix: &impl Fn(&Linear) -> Result<Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut weights = Vec::new();
        for (module, linear) in LINEAR_MODULES.iter().zip(self.linears()) {
            weights.push((format!("{module}.weight"), matrix(linear)?));
            if let Some(bias) = &linear.bias {
                weights.push((format!("{module}.bias"), bias.detach()));
            }
            if let ("self_attn.o_proj", Some((q_norm, k_norm))) = (*module, &self.qk_norm) {
                weights.push(("self_attn.q_norm.weight".into(), q_norm.detach()));
                weights.push(("self_attn.k_norm.weight".into(), k_norm.detach()));
            }
        }
        weights.push((
            "input_layernorm.weight".into(),
            self.input_layernorm.detach(),
        ));
        weights.push((
            "post_attention_layernorm.weight".into(),
            self.post_attention_layernorm.detach(),
        ));
        Ok(weights)
    }

    /// The layer as the forward uses it: matrices, biases and adapters in `dtype`, norms as
    /// stored (f32).
    fn in_compute_dtype(&self, dtype: DType) -> Result<Self> {
        self.map(|t| t.to_dtype(dtype), |t| Ok(t.clone()))
    }
}

/// Query, key and value heads of a block of tokens, rotary embeddings applied:
/// `q` `[b, heads, t, head_dim]`, `k`/`v` `[b, kv_heads, t, head_dim]`.
struct Heads {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

/// A training batch of `B` distinct prompts with `G` completions each, for
/// [`Qwen2::forward_grouped`]: `prompt_ids`/`prompt_mask` `[B, P]` (left-padded),
/// `completion_ids`/`completion_mask` `[B * G, C]` (row `r * G + g` continues prompt `r`).
#[derive(Clone, Copy)]
pub struct GroupedBatch<'a> {
    pub prompt_ids: &'a Tensor,
    pub prompt_mask: &'a Tensor,
    pub completion_ids: &'a Tensor,
    pub completion_mask: &'a Tensor,
    pub group_size: usize,
}

/// A Qwen2, Qwen2.5 or Qwen3 causal language model (the family is the config's; cloning shares
/// every tensor).
#[derive(Clone)]
pub struct Qwen2 {
    pub(crate) config: Qwen2Config,
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Tensor,
    /// `embed_tokens` itself when the embeddings are tied.
    pub(crate) lm_head: Tensor,
    /// Trainable parameters in `named_parameters()` order; empty for a frozen model.
    pub(crate) parameters: Vec<(String, Var)>,
    /// The dtype of the matmuls (see the module doc's "Precision").
    pub(crate) compute_dtype: DType,
    /// The LoRA adapters on the linear layers, when there are any (see `lora`).
    pub(crate) lora: Option<LoraSpec>,
    /// Dropout of the adapters' inputs, in a training forward ([`Qwen2::in_training`]).
    pub(crate) dropout: Option<Arc<Dropout>>,
}

/// Preallocated per-layer key/value buffers `[batch, kv_heads, capacity, head_dim]` and the
/// number of positions filled so far (the same for every row).
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty f32 cache for `batch` rows of up to `capacity` positions (prompt + new
    /// tokens). [`Qwen2::new_cache`] makes one in the model's compute dtype.
    pub fn new(
        config: &Qwen2Config,
        batch: usize,
        capacity: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::with_dtype(config, batch, capacity, device, DType::F32)
    }

    /// [`KvCache::new`] storing keys and values in `dtype`.
    pub fn with_dtype(
        config: &Qwen2Config,
        batch: usize,
        capacity: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let shape = (batch, config.num_key_value_heads, capacity, config.head_dim);
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of rows (sequences).
    pub fn batch(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[0])
    }

    /// A new cache whose row `r * times + g` (for `g < times`) is a copy of row `r`: prefill B
    /// prompts once, then decode G samples of each.
    pub fn repeat_rows(&self, times: usize) -> Result<Self> {
        self.select_rows(&group_index(self.batch(), times, &self.device())?)
    }

    /// The device of the buffers.
    fn device(&self) -> Device {
        self.layers
            .first()
            .map_or(Device::Cpu, |(k, _)| k.device().clone())
    }

    /// A new cache made of the rows `rows` (`u32` indices, repeats allowed) of this one.
    pub fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.index_select(rows, 0)?, v.index_select(rows, 0)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: self.len,
            capacity: self.capacity,
        })
    }

    /// Keeps only the rows `keep` (strictly increasing indices), in that order: finished
    /// sequences leave the batch. On the CPU in f32 the kept rows move down within the buffers
    /// (their filled positions only) and the buffers are narrowed to them; elsewhere the cache
    /// is copied ([`KvCache::select_rows`]).
    pub fn keep_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|pair| pair[0] >= pair[1]) || keep.last() >= Some(&self.batch()) {
            candle_core::bail!(
                "keep_rows: {keep:?} is not increasing within {} rows",
                self.batch()
            );
        }
        let in_place = self.layers.iter().all(|(k, v)| {
            [k, v]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
        });
        if !in_place {
            let rows = Tensor::new(
                keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                &self.device(),
            )?;
            *self = self.select_rows(&rows)?;
            return Ok(());
        }
        let op = KeepRows {
            keep: keep.to_vec(),
            len: self.len,
        };
        for (k, v) in &mut self.layers {
            for buffer in [k, v] {
                buffer.inplace_op1(&op)?;
                *buffer = buffer.narrow(0, 0, keep.len())?;
            }
        }
        Ok(())
    }

    /// Forgets every cached position (the buffers are reused).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// [`KvCache::keep_rows`] on a CPU f32 buffer `[batch, kv_heads, capacity, head_dim]`: row
/// `keep[i]` moves to row `i` (the first `len` positions of each head), in place.
struct KeepRows {
    keep: Vec<usize>,
    len: usize,
}

impl InplaceOp1 for KeepRows {
    fn name(&self) -> &'static str {
        "keep-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (CpuStorage::F32(data), Some((0, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("keep-rows: the cache must be a contiguous f32 buffer");
        };
        let (_, heads, capacity, head_dim) = layout.shape().dims4()?;
        let (head, row) = (capacity * head_dim, heads * capacity * head_dim);
        let data = &mut data[..end];
        for (to, &from) in self
            .keep
            .iter()
            .enumerate()
            .filter(|(to, from)| to != *from)
        {
            for h in 0..heads {
                let source = from * row + h * head;
                data.copy_within(source..source + self.len * head_dim, to * row + h * head);
            }
        }
        Ok(())
    }
}

impl Qwen2 {
    /// The trainable policy from a resolved checkpoint: every parameter becomes a [`Var`].
    pub fn load_policy(files: &ModelFiles, device: &Device) -> anyhow::Result<Self> {
        Self::from_parameters(files.config.clone(), files.load_parameters(device)?, true)
    }

    /// The frozen reference model: plain tensors, no gradient graph.
    pub fn load_reference(files: &ModelFiles, device: &Device) -> anyhow::Result<Self> {
        Self::from_parameters(files.config.clone(), files.load_parameters(device)?, false)
    }

    /// Builds the model from `(name, tensor)` pairs named as transformers names them (the
    /// order of [`Qwen2Config::parameter_shapes`]); `trainable` wraps each in a [`Var`].
    pub fn from_parameters(
        config: Qwen2Config,
        parameters: Vec<(String, Tensor)>,
        trainable: bool,
    ) -> anyhow::Result<Self> {
        let mut named_vars = Vec::with_capacity(parameters.len());
        let mut by_name = HashMap::with_capacity(parameters.len());
        for (name, tensor) in parameters {
            let tensor = if trainable {
                let var = Var::from_tensor(&tensor)?;
                let tensor = var.as_tensor().clone();
                named_vars.push((name.clone(), var));
                tensor
            } else {
                tensor.detach()
            };
            by_name.insert(name, tensor);
        }
        for (name, shape) in config.parameter_shapes() {
            let tensor = by_name
                .get(&name)
                .with_context(|| format!("parameter {name} (shape {shape:?}) is missing"))?;
            if tensor.dims() != shape.as_slice() {
                bail!(
                    "parameter {name} has shape {:?}, config implies {shape:?}",
                    tensor.dims()
                );
            }
        }
        let take = |name: &str| -> Tensor { by_name[name].clone() };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let linear = |module: &str, with_bias: bool| Linear {
                    weight: take(&format!("{p}.{module}.weight")),
                    bias: with_bias.then(|| take(&format!("{p}.{module}.bias"))),
                    adapter: None,
                };
                let qkv_bias = config.qkv_bias();
                DecoderLayer {
                    q_proj: linear("self_attn.q_proj", qkv_bias),
                    k_proj: linear("self_attn.k_proj", qkv_bias),
                    v_proj: linear("self_attn.v_proj", qkv_bias),
                    o_proj: linear("self_attn.o_proj", config.o_proj_bias()),
                    qk_norm: config.qk_norm().then(|| {
                        (
                            take(&format!("{p}.self_attn.q_norm.weight")),
                            take(&format!("{p}.self_attn.k_norm.weight")),
                        )
                    }),
                    gate_proj: linear("mlp.gate_proj", false),
                    up_proj: linear("mlp.up_proj", false),
                    down_proj: linear("mlp.down_proj", false),
                    input_layernorm: take(&format!("{p}.input_layernorm.weight")),
                    post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight")),
                }
            })
            .collect();
        let embed_tokens = take("model.embed_tokens.weight");
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            take("lm_head.weight")
        };
        Ok(Qwen2 {
            norm: take("model.norm.weight"),
            config,
            embed_tokens,
            layers,
            lm_head,
            parameters: named_vars,
            compute_dtype: DType::F32,
            lora: None,
            dropout: None,
        })
    }

    /// The frozen base of a LoRA policy (see `lora`): plain tensors like the reference model,
    /// but with every matrix, the embeddings included, stored in `dtype` (norm weights stay
    /// f32): no f32 copy of the base exists, and a tied lm_head stays one tensor.
    pub fn load_base(files: &ModelFiles, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        let model = Self::load_reference(files, device)?;
        Ok(model.frozen_copy(dtype, dtype)?)
    }

    /// This model computing its matmuls in `dtype` (f32, bf16 or f16). A trainable model keeps
    /// its f32 `Var`s and casts them in the forward; a frozen one (the reference model) stores
    /// its layer matrices and lm_head in `dtype` directly (see [`Qwen2::inference_copy`]).
    pub fn with_compute_dtype(self, dtype: DType) -> anyhow::Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("compute dtype {dtype:?} is not supported (use f32, bf16 or f16)");
        }
        if self.parameters.is_empty() {
            return Ok(self.frozen_copy(dtype, self.embed_tokens.dtype())?);
        }
        Ok(Qwen2 {
            compute_dtype: dtype,
            ..self
        })
    }

    /// A frozen copy (no `Var`s, no graph) with its matrices stored in the compute dtype, for
    /// sampling: a bf16 policy casts its weights once here rather than at every decoded token
    /// (tensors already in that dtype, such as a LoRA policy's base, are shared, not copied).
    /// Take a new copy after each optimiser step.
    pub fn inference_copy(&self) -> Result<Self> {
        self.frozen_copy(self.compute_dtype, self.embed_tokens.dtype())
    }

    /// Detached copy with the layers' matrices, biases and adapters and the lm_head in `dtype`,
    /// the embedding table in `embeddings` and the norm weights in f32. With `embeddings` f32 the
    /// copy computes exactly what this model computes (tied embeddings become two tensors: the
    /// f32 table and the `dtype` lm_head); with `embeddings` = `dtype` a tied lm_head is the
    /// table itself.
    fn frozen_copy(&self, dtype: DType, embeddings: DType) -> Result<Self> {
        let matrix = |t: &Tensor| t.detach().to_dtype(dtype);
        let norm = |t: &Tensor| t.detach().to_dtype(DType::F32);
        let embed_tokens = self.embed_tokens.detach().to_dtype(embeddings)?;
        let lm_head = match self.config.tie_word_embeddings && embeddings == dtype {
            true => embed_tokens.clone(),
            false => matrix(&self.lm_head)?,
        };
        Ok(Qwen2 {
            config: self.config.clone(),
            embed_tokens,
            lm_head,
            layers: self
                .layers
                .iter()
                .map(|layer| layer.map(matrix, norm))
                .collect::<Result<_>>()?,
            norm: norm(&self.norm)?,
            parameters: Vec::new(),
            compute_dtype: dtype,
            lora: self.lora.clone(),
            dropout: None,
        })
    }

    /// Every weight of the model by transformers name, in `named_parameters()` order (a tied
    /// lm_head is not listed), as stored: for a LoRA model, the frozen base without its
    /// adapters.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.weights_with(&|linear: &Linear| Ok(linear.weight.detach()))
    }

    /// Every weight by transformers name, with `matrix` giving each linear layer's weight.
    pub(crate) fn weights_with(
        &self,
        matrix: &impl Fn(&Linear) -> Result<Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut weights = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.detach(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, tensor) in layer.weights(matrix)? {
                weights.push((format!("model.layers.{i}.{name}"), tensor));
            }
        }
        weights.push(("model.norm.weight".to_string(), self.norm.detach()));
        if !self.config.tie_word_embeddings {
            weights.push(("lm_head.weight".to_string(), self.lm_head.detach()));
        }
        Ok(weights)
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// The dtype of the matmuls: f32 unless set by [`Qwen2::with_compute_dtype`].
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// An empty KV cache in the compute dtype on the model's device (see [`KvCache::new`]).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::with_dtype(
            &self.config,
            batch,
            capacity,
            self.embed_tokens.device(),
            self.compute_dtype,
        )
    }

    /// Trainable parameters by transformers name, in `named_parameters()` order (empty for the
    /// reference model). A tied `lm_head` is not listed: it is `model.embed_tokens.weight`.
    pub fn named_parameters(&self) -> &[(String, Var)] {
        &self.parameters
    }

    /// The output projection weight `[vocab, hidden]` (the embeddings when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Logits `[.., vocab]` of hidden states `[.., hidden]` (f32; the matmul runs in the
    /// compute dtype).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        logits(hidden, &self.lm_head.to_dtype(self.compute_dtype)?)
    }

    /// Final hidden states `[b, t, hidden]` of `input_ids` (see the module doc for the inputs).
    /// With a cache, the new keys/values are appended to it and the tokens attend to every
    /// cached position too.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attention_mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if position_ids.dims() != [b, t] {
            candle_core::bail!(
                "position_ids has shape {:?}, input_ids has {:?}",
                position_ids.dims(),
                input_ids.dims()
            );
        }
        if attention_mask.dims() != [b, past + t] {
            candle_core::bail!(
                "attention_mask has shape {:?}, expected [{b}, {}] ({past} cached + {t} new keys)",
                attention_mask.dims(),
                past + t
            );
        }
        if let Some(cache) = cache.as_ref() {
            if cache.batch() != b || past + t > cache.capacity {
                candle_core::bail!(
                    "KV cache holds {} rows with room for {} positions, got {b} rows needing {}",
                    cache.batch(),
                    cache.capacity,
                    past + t
                );
            }
        }
        let bias = causal_bias(attention_mask, t)?;
        let rope = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)?;
        let mut x = self.embed(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer = layer.in_compute_dtype(self.compute_dtype)?;
            let heads = self.heads(&layer, &x, &rope)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => {
                    // The new positions are written in place; attention reads the filled part
                    // of the buffers as a view (no copy). A cache in another dtype than the
                    // compute dtype still works, with casts.
                    let (k_buf, v_buf) = &cache.layers[i];
                    k_buf.slice_set(&heads.k.to_dtype(k_buf.dtype())?.contiguous()?, 2, past)?;
                    v_buf.slice_set(&heads.v.to_dtype(v_buf.dtype())?.contiguous()?, 2, past)?;
                    let read =
                        |buf: &Tensor| buf.narrow(2, 0, past + t)?.to_dtype(self.compute_dtype);
                    (read(k_buf)?, read(v_buf)?)
                }
                None => (heads.k, heads.v),
            };
            let attended = self.attend(&heads.q, &k, &v, &bias)?;
            x = self.finish_layer(&layer, &x, &attended)?;
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// [`Qwen2::forward`] without a cache, with position ids derived from the mask.
    pub fn forward_masked(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let position_ids = position_ids_from_mask(attention_mask)?;
        self.forward(input_ids, &position_ids, attention_mask, None)
    }

    /// Grouped training forward: `B` distinct prompts `[B, P]` run once, and the `B * G`
    /// completions `[B * G, C]` (row `r * G + g` continues prompt `r`) attend to their
    /// prompt's keys/values (shared by index, so their gradients sum into the one prompt pass)
    /// and causally to their own. Returns `(prompt_hidden [B, P, h], completion_hidden
    /// [B * G, C, h])`, equal to the matching slices of [`Qwen2::forward_masked`] on the
    /// concatenated `[B * G, P + C]` batch.
    pub fn forward_grouped(&self, batch: &GroupedBatch) -> Result<(Tensor, Tensor)> {
        let GroupedBatch {
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            group_size,
        } = *batch;
        let (num_prompts, prompt_len) = prompt_ids.dims2()?;
        let (rows, completion_len) = completion_ids.dims2()?;
        if rows != num_prompts * group_size {
            candle_core::bail!(
                "forward_grouped: {rows} completion rows for {num_prompts} prompts x G={group_size}"
            );
        }
        let device = prompt_ids.device();
        let group_index = group_index(num_prompts, group_size, device)?;
        let full_mask = Tensor::cat(
            &[
                &prompt_mask.contiguous()?.index_select(&group_index, 0)?,
                &completion_mask.to_dtype(prompt_mask.dtype())?,
            ],
            1,
        )?;
        let completion_positions =
            position_ids_from_mask(&full_mask)?.narrow(1, prompt_len, completion_len)?;
        let prompt_bias = causal_bias(prompt_mask, prompt_len)?;
        let completion_bias = causal_bias(&full_mask, completion_len)?;
        let prompt_rope = rope_tables(
            &position_ids_from_mask(prompt_mask)?,
            self.config.head_dim,
            self.config.rope_theta,
        )?;
        let completion_rope = rope_tables(
            &completion_positions,
            self.config.head_dim,
            self.config.rope_theta,
        )?;
        let mut prompt_x = self.embed(prompt_ids)?;
        let mut completion_x = self.embed(completion_ids)?;
        for layer in &self.layers {
            let layer = &layer.in_compute_dtype(self.compute_dtype)?;
            let prompt = self.heads(layer, &prompt_x, &prompt_rope)?;
            let completion = self.heads(layer, &completion_x, &completion_rope)?;
            let k = Tensor::cat(
                &[&prompt.k.index_select(&group_index, 0)?, &completion.k],
                2,
            )?;
            let v = Tensor::cat(
                &[&prompt.v.index_select(&group_index, 0)?, &completion.v],
                2,
            )?;
            let completion_attended = self.attend(&completion.q, &k, &v, &completion_bias)?;
            let prompt_attended = self.attend(&prompt.q, &prompt.k, &prompt.v, &prompt_bias)?;
            prompt_x = self.finish_layer(layer, &prompt_x, &prompt_attended)?;
            completion_x = self.finish_layer(layer, &completion_x, &completion_attended)?;
        }
        let eps = self.config.rms_norm_eps;
        Ok((
            rms_norm(&prompt_x, &self.norm, eps)?,
            rms_norm(&completion_x, &self.norm, eps)?,
        ))
    }

    /// The f32 residual stream `[b, t, hidden]` of `input_ids`.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        self.embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// RMSNorm of `x` (the f32 residual, or query/key heads) in f32, then cast to the compute
    /// dtype for the matmuls.
    fn norm_for_matmul(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        rms_norm(&x.to_dtype(DType::F32)?, weight, self.config.rms_norm_eps)?
            .to_dtype(self.compute_dtype)
    }

    /// Projects `x` `[b, t, h]` (input norm applied here) to rotated query/key heads and value
    /// heads, in the compute dtype; `layer` is already in the compute dtype. Qwen3 normalises
    /// each query and key head (in f32, like the other norms) before the rotation.
    fn heads(&self, layer: &DecoderLayer, x: &Tensor, rope: &(Tensor, Tensor)) -> Result<Heads> {
        let c = &self.config;
        let h = self.norm_for_matmul(x, &layer.input_layernorm)?;
        let split = |projection: &Linear, heads: usize| -> Result<Tensor> {
            split_heads(&projection.forward(&h, self.dropout.as_deref())?, heads)
        };
        let (mut q, mut k) = (
            split(&layer.q_proj, c.num_attention_heads)?,
            split(&layer.k_proj, c.num_key_value_heads)?,
        );
        if let Some((q_norm, k_norm)) = &layer.qk_norm {
            q = self.norm_for_matmul(&q, q_norm)?;
            k = self.norm_for_matmul(&k, k_norm)?;
        }
        let cos = rope.0.to_dtype(self.compute_dtype)?;
        let sin = rope.1.to_dtype(self.compute_dtype)?;
        let q = apply_rope(&q, &cos, &sin)?;
        let k = apply_rope(&k, &cos, &sin)?;
        let v = split(&layer.v_proj, c.num_key_value_heads)?;
        Ok(Heads { q, k, v })
    }

    /// Scaled dot-product attention with grouped key/value heads: `q` `[b, heads, t, d]`,
    /// `k`/`v` `[b, kv_heads, s, d]`, additive `bias` `[b, 1, t, s]`; returns `[b, heads, t, d]`.
    /// The scores, bias and softmax are f32; the two products run in the compute dtype.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, heads, t, d) = q.dims4()?;
        let per_kv = heads / c.num_key_value_heads;
        // Heads sharing a kv head are adjacent, so grouping them into the query axis lets one
        // matmul serve them all without copying the keys (transformers' `repeat_kv`).
        let q = q.reshape((b, c.num_key_value_heads, per_kv * t, d))?;
        attention(&q, k, v, bias, 1.0 / (d as f64).sqrt())?.reshape((b, heads, t, d))
    }

    /// Output projection and residual, then the MLP block and residual (the residual adds in
    /// f32).
    fn finish_layer(&self, layer: &DecoderLayer, x: &Tensor, attended: &Tensor) -> Result<Tensor> {
        let dropout = self.dropout.as_deref();
        let attended = merge_heads(attended)?;
        let x = (x + layer
            .o_proj
            .forward(&attended, dropout)?
            .to_dtype(DType::F32)?)?;
        let h = self.norm_for_matmul(&x, &layer.post_attention_layernorm)?;
        let gate = layer.gate_proj.forward(&h, dropout)?;
        let up = layer.up_proj.forward(&h, dropout)?;
        x + layer
            .down_proj
            .forward(&swiglu(&gate, &up)?, dropout)?
            .to_dtype(DType::F32)?
    }
}

/// f32 logits of `hidden` `[.., hidden]` under an output projection `weight` `[vocab, hidden]`
/// already in the compute dtype (the matmul runs in that dtype).
pub(crate) fn logits(hidden: &Tensor, weight: &Tensor) -> Result<Tensor> {
    linear(&hidden.to_dtype(weight.dtype())?, weight, None)?.to_dtype(DType::F32)
}

/// The `u32` index `[0, .., 0, 1, .., 1, ..]` that repeats each of `groups` rows `group_size`
/// times: row `r * group_size + g` of a grouped batch comes from row `r` (its prompt).
pub fn group_index(groups: usize, group_size: usize, device: &Device) -> Result<Tensor> {
    let index: Vec<u32> = (0..groups as u32)
        .flat_map(|r| std::iter::repeat_n(r, group_size))
        .collect();
    Tensor::new(index, device)
}
