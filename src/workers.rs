//! CPU data parallelism: independent shards of a batch (groups of prompts while sampling, chunks
//! of a micro-batch while training) run at once, one worker thread per core, each shard's
//! operations single-threaded.
//!
//! A small model's matrix products are too small to split across cores: the tiny demo model
//! (hidden 128) trains as fast on one thread as on two, the rest going to synchronisation. Its
//! cores therefore take whole shards. Larger models keep one worker whose every operation uses
//! all the cores, as before.
//!
//! candle's CPU kernels read their thread counts from the environment: matrix products from
//! `RAYON_NUM_THREADS` (at every call), element-wise operations from `CANDLE_NUM_THREADS` (once,
//! at the first such operation). [`Workers::for_cpu`] sets both to 1 when it runs several
//! workers, so it must be called before the first tensor operation of the process.

use anyhow::{Context, Result};
use candle_core::Device;
use rayon::prelude::*;

/// Models up to this hidden size shard their batches over the cores ([`Workers::for_cpu`]).
pub const MAX_SHARDED_HIDDEN_SIZE: usize = 512;

/// The worker threads that run the shards of a batch.
pub struct Workers {
    pool: Option<rayon::ThreadPool>,
}

impl Workers {
    /// One worker: shards run one after the other, each operation using every core.
    pub fn single() -> Self {
        Workers { pool: None }
    }

    /// The workers for `requested` (0 = automatic) on `device` for a model of `hidden_size`:
    /// automatic means one per thread the process may use (`RAYON_NUM_THREADS` when set, else
    /// the cores available to it) on the CPU when `hidden_size` is at most
    /// [`MAX_SHARDED_HIDDEN_SIZE`], else one. CUDA always has one (the GPU is the parallelism).
    /// With more than one, candle's kernels are made single-threaded (see the module doc).
    pub fn for_cpu(requested: usize, device: &Device, hidden_size: usize) -> Result<Self> {
        let cores = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|threads| threads.parse::<usize>().ok())
            .filter(|&threads| threads > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let count = match (device, requested) {
            (Device::Cpu, 0) if hidden_size <= MAX_SHARDED_HIDDEN_SIZE => cores,
            (Device::Cpu, 0) => 1,
            (Device::Cpu, n) => n,
            _ => 1,
        };
        if count <= 1 {
            return Ok(Self::single());
        }
        std::env::set_var("RAYON_NUM_THREADS", "1");
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        Self::with_threads(count)
    }

    /// `count` worker threads, leaving candle's own threading as it is (tests).
    pub fn with_threads(count: usize) -> Result<Self> {
        if count <= 1 {
            return Ok(Self::single());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(count)
            .thread_name(|i| format!("grpo-worker-{i}"))
            .build()
            .context("starting the CPU worker threads")?;
        Ok(Workers { pool: Some(pool) })
    }

    /// How many shards run at once.
    pub fn count(&self) -> usize {
        self.pool
            .as_ref()
            .map_or(1, |pool| pool.current_num_threads())
    }

    /// `work` run on the workers' threads, so that its parallel loops (the optimizer's) use all
    /// of them: with several workers, the process-wide thread pool has only one.
    pub fn install<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            None => work(),
            Some(pool) => pool.install(work),
        }
    }

    /// `work` applied to every shard, the results in the shards' order; the first error wins.
    pub fn map<S, R, F>(&self, shards: Vec<S>, work: F) -> Result<Vec<R>>
    where
        S: Send,
        R: Send,
        F: Fn(S) -> Result<R> + Sync + Send,
    {
        match &self.pool {
            None => shards.into_iter().map(work).collect(),
            Some(pool) => pool.install(|| shards.into_par_iter().map(&work).collect()),
        }
    }
}

/// `len` items cut into at most `parts` consecutive ranges of sizes differing by at most one
/// (no empty range).
pub fn split_evenly(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, len.max(1));
    let (base, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let end = start + base + usize::from(i < extra);
            let range = start..end;
            start = end;
            range
        })
        .filter(|range| !range.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_splits_cover_everything_in_order() {
        assert_eq!(split_evenly(5, 2), vec![0..3, 3..5]);
        assert_eq!(split_evenly(4, 2), vec![0..2, 2..4]);
        assert_eq!(split_evenly(1, 4), vec![0..1]);
        assert_eq!(split_evenly(0, 2), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(split_evenly(7, 1), vec![0..7]);
    }

    #[test]
    fn map_keeps_the_order_and_reports_errors() {
        let workers = Workers::with_threads(3).unwrap();
        assert_eq!(workers.count(), 3);
        let squares = workers.map((0..10).collect(), |i: u64| Ok(i * i)).unwrap();
        assert_eq!(squares, (0..10).map(|i| i * i).collect::<Vec<_>>());
        let failed = workers.map((0..10).collect(), |i: u64| {
            anyhow::ensure!(i != 7, "shard {i} failed");
            Ok(i)
        });
        assert!(failed.unwrap_err().to_string().contains("shard 7 failed"));
        assert_eq!(Workers::single().count(), 1);
    }

    #[test]
    fn automatic_count_shards_small_models_on_the_cpu_only() {
        // Requests of one worker never touch the environment.
        assert_eq!(Workers::for_cpu(1, &Device::Cpu, 64).unwrap().count(), 1);
        assert_eq!(
            Workers::for_cpu(0, &Device::Cpu, MAX_SHARDED_HIDDEN_SIZE + 1)
                .unwrap()
                .count(),
            1
        );
    }
}
