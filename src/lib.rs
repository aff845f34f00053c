//! `grpo`: GRPO (the rule-reward RL of DeepSeek-R1-Zero) for Qwen2.5 and Qwen3 chat models.
//!
//! The pipeline, top to bottom: [`config`] → [`data`] rows → [`prompt`] token ids →
//! [`sampling`] of G completions per prompt with the [`model`] → [`rewards`] →
//! [`grpo`] advantages and loss → [`optim`] step → [`metrics`] and checkpoints
//! (see `docs/ARCHITECTURE.md`).

pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod grpo;
pub mod hub;
pub mod init_model;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod params;
pub mod plot;
pub mod progress;
pub mod prompt;
pub mod rewards;
pub mod run;
pub mod sample;
pub mod sampling;
pub mod score;
pub mod sft;
pub mod synth;
pub mod timing;
pub mod train;
pub mod workers;
