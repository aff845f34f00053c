//! The differentiable policy, a Qwen2 / Qwen2.5 or Qwen3 decoder: checkpoint loading and the
//! model family ([`load`]), the forward pass over hidden states with a KV cache and a grouped
//! training forward ([`qwen2`], one implementation for both families), its linear layers with
//! optional LoRA adapters ([`linear`]) and LoRA in PEFT's format ([`lora`]), its differentiable
//! building blocks ([`ops`], with fused kernels in [`fused`] and [`attention`], whose CUDA
//! launches [`kernels`] describes and whose vectorised exponentials and sums are [`simd`], and
//! the frozen-operand ops of [`frozen`]) and chunked per-token log-probs and entropies
//! ([`logprobs`]).

pub mod attention;
pub mod frozen;
pub mod fused;
pub mod kernels;
pub mod linear;
pub mod load;
pub mod logprobs;
pub mod lora;
pub mod ops;
pub mod qwen2;
pub mod simd;

pub use load::{ModelFamily, ModelFiles, Qwen2Config};
pub use logprobs::{
    completion_logprobs, grouped_completion_logprobs, next_token_entropies, token_logprobs,
    TokenLogprobs,
};
pub use lora::{AdapterFolder, LoraSpec};
pub use ops::position_ids_from_mask;
pub use qwen2::{group_index, GroupedBatch, KvCache, Qwen2};
