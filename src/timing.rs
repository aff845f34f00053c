//! Where a training step's time goes: wall-clock seconds per phase (generation, rewards, policy
//! forward + backward, reference forward, optimizer), logged as `timing/<phase>` beside
//! `generation/tokens_per_second`.
//!
//! On an asynchronous device (CUDA) a phase's kernels may still be running when its code
//! returns, so every reading first synchronises the device: the time of each phase is the time
//! its work took, not the time it took to queue it.

use std::time::Instant;

use candle_core::{Device, Result};
use serde::Serialize;

/// Seconds spent in each phase of one optimizer step, with TRL-style metric names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PhaseTimes {
    /// Sampling the completions (prefill and decode), and the sampling-time log-probs when
    /// `num_iterations > 1`.
    #[serde(rename = "timing/generation")]
    pub generation: f64,
    /// Decoding the completions to text and scoring them; advantages.
    #[serde(rename = "timing/rewards")]
    pub rewards: f64,
    /// The policy's forward and backward passes.
    #[serde(rename = "timing/policy")]
    pub policy: f64,
    /// The frozen reference model's forward passes (0 when `beta` is 0).
    #[serde(rename = "timing/reference")]
    pub reference: f64,
    /// Clipping and the AdamW update.
    #[serde(rename = "timing/optimizer")]
    pub optimizer: f64,
    /// Completion tokens generated in the step per second of generation (0 on steps that reuse
    /// an earlier rollout, as `num_iterations > 1` does).
    #[serde(rename = "generation/tokens_per_second")]
    pub generation_tokens_per_second: f64,
}

impl PhaseTimes {
    /// Adds `other`'s seconds to these (the throughput is left as it is).
    pub fn add(&mut self, other: &PhaseTimes) {
        self.generation += other.generation;
        self.rewards += other.rewards;
        self.policy += other.policy;
        self.reference += other.reference;
        self.optimizer += other.optimizer;
    }

    /// Sets the generation throughput from the number of tokens generated in the step.
    pub fn set_generated_tokens(&mut self, tokens: usize) {
        self.generation_tokens_per_second = if self.generation > 0.0 {
            tokens as f64 / self.generation
        } else {
            0.0
        };
    }
}

/// Measures phases on one device, synchronising it before each reading.
#[derive(Debug, Clone)]
pub struct Stopwatch {
    device: Device,
}

impl Stopwatch {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
        }
    }

    /// Runs `phase` and returns its value with the seconds it took, its device work included.
    pub fn time<T, E>(
        &self,
        phase: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<(T, f64), E>
    where
        E: From<candle_core::Error>,
    {
        self.sync()?;
        let started = Instant::now();
        let value = phase()?;
        self.sync()?;
        Ok((value, started.elapsed().as_secs_f64()))
    }

    fn sync(&self) -> Result<()> {
        self.device.synchronize()
    }
}
