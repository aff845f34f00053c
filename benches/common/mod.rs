//! Model shapes shared by the benches.

use grpo::model::{ModelFamily, Qwen2Config};

/// The mid-size model of issue 11: hidden 512, intermediate 1408, 8 layers, 8 heads, 2 kv heads.
/// Its vocabulary is the golden tokenizer's size (1000), far below Qwen2.5's 151,936, so the
/// lm-head's share of the work is much smaller than on a real checkpoint.
pub fn mid_size_config() -> Qwen2Config {
    Qwen2Config {
        family: ModelFamily::Qwen2,
        vocab_size: 1000,
        hidden_size: 512,
        intermediate_size: 1408,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 64,
        max_position_embeddings: 4096,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

/// Qwen2.5-0.5B-Instruct's config: hidden 896, intermediate 4864, 24 layers, 14 heads, 2 kv
/// heads, vocab 151,936, tied embeddings.
#[allow(dead_code)] // benches/train_step.rs uses only the mid size
pub fn qwen05b_config() -> Qwen2Config {
    Qwen2Config {
        family: ModelFamily::Qwen2,
        vocab_size: 151_936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        max_position_embeddings: 32_768,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}
