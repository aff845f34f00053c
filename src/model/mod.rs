//! The differentiable Qwen2 policy: checkpoint loading ([`load`]), the forward pass over hidden
//! states with a KV cache and a grouped training forward ([`qwen2`]), its differentiable
//! building blocks ([`ops`], with fused kernels in [`fused`], whose CUDA launches [`kernels`]
//! describes) and chunked per-token log-probs and entropies ([`logprobs`]).

pub mod fused;
pub mod kernels;
pub mod load;
pub mod logprobs;
pub mod ops;
pub mod qwen2;

pub use load::{ModelFiles, Qwen2Config};
pub use logprobs::{
    completion_logprobs, grouped_completion_logprobs, token_logprobs, TokenLogprobs,
};
pub use ops::position_ids_from_mask;
pub use qwen2::{group_index, GroupedBatch, KvCache, Qwen2};
