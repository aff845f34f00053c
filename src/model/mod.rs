//! The differentiable policy, a Qwen2 / Qwen2.5 or Qwen3 decoder: checkpoint loading and the
//! model family ([`load`]), the forward pass over hidden states with a KV cache and a grouped
//! training forward ([`qwen2`], one implementation for both families), its differentiable
//! building blocks ([`ops`], with fused CPU kernels in [`fused`]) and chunked per-token
//! log-probs and entropies ([`logprobs`]).

pub mod fused;
pub mod load;
pub mod logprobs;
pub mod ops;
pub mod qwen2;

pub use load::{ModelFamily, ModelFiles, Qwen2Config};
pub use logprobs::{
    completion_logprobs, grouped_completion_logprobs, token_logprobs, TokenLogprobs,
};
pub use ops::position_ids_from_mask;
pub use qwen2::{group_index, GroupedBatch, KvCache, Qwen2};
