//! Peak memory of a training step, logged as `memory/peak_gib`.
//!
//! - CUDA: the device memory in use (total − free, as `nvidia-smi` counts it, so it includes
//!   memory cudarc's pool keeps for reuse and other processes on the GPU), sampled by the trainer
//!   at the step's high-water points (after sampling, after each chunk's forward and backward);
//!   the peak is the largest sample.
//! - CPU: the process's peak resident set size (`VmHWM` in `/proc/self/status`), which the kernel
//!   tracks itself; each step starts by resetting it to the current resident size
//!   (`/proc/self/clear_refs`), so it is the step's own peak. Only on Linux; elsewhere the metric
//!   is absent.
//!
//! Before a command allocates anything, [`ensure_fits`] refuses batch shapes whose keys, values
//! and logits alone exceed the device's memory, naming the config fields that set them, so a huge
//! `per_device_train_batch_size` is an error instead of an allocation failure that aborts.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use crate::model::Qwen2Config;

/// Makes the C allocator keep and reuse freed memory instead of returning it to the system.
///
/// A forward and backward pass allocates and frees the same tensor sizes again and again. By
/// default glibc serves every block over 128 KiB-32 MiB (the threshold adapts) with a fresh
/// `mmap` and unmaps it on free, so each pass pays a page fault and a zero-fill per 4 KiB page
/// of every activation; with the largest threshold and no trimming those blocks are reused from
/// the heap. The peak resident size does not grow: freed memory is reused, not added. Only on
/// Linux with glibc; elsewhere nothing changes.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3; 32 MiB is the largest
        // mmap threshold glibc accepts on 64-bit systems.
        const M_TRIM_THRESHOLD: libc::c_int = -1;
        const M_MMAP_THRESHOLD: libc::c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; called before any threads start.
        unsafe {
            libc::mallopt(M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }
}

/// The metric's name in metrics.jsonl, TensorBoard and `log_history`.
pub const PEAK_METRIC: &str = "memory/peak_gib";

const BYTES_PER_GIB: f64 = (1u64 << 30) as f64;

/// The high-water mark of one step's memory.
pub struct PeakMemory {
    device: Device,
    /// Largest CUDA sample since [`PeakMemory::reset`], in bytes (0: none yet). Atomic so that
    /// workers running shards at once can sample it.
    peak_bytes: AtomicU64,
}

impl PeakMemory {
    /// A tracker for `device`, reset.
    pub fn new(device: &Device) -> Self {
        let mut memory = Self {
            device: device.clone(),
            peak_bytes: AtomicU64::new(0),
        };
        memory.reset();
        memory
    }

    /// Starts a new step: forgets the peak so far.
    pub fn reset(&mut self) {
        self.peak_bytes.store(0, Ordering::Relaxed);
        if self.device.is_cpu() {
            // "5" resets the peak RSS to the current RSS (Linux >= 4.0). Where this cannot be
            // written the peak is the process's since it started, still an upper bound.
            std::fs::write("/proc/self/clear_refs", "5").ok();
        }
        self.sample();
    }

    /// Records the memory in use now (CUDA); the CPU's peak is tracked by the kernel.
    pub fn sample(&self) {
        if let Some(used) = device_memory_in_use(&self.device) {
            self.peak_bytes.fetch_max(used, Ordering::Relaxed);
        }
    }

    /// The peak since the last reset in GiB; `None` where it cannot be measured.
    pub fn peak_gib(&self) -> Option<f64> {
        let bytes = match self.device {
            Device::Cpu => process_peak_rss()?,
            _ => match self.peak_bytes.load(Ordering::Relaxed) {
                0 => return None,
                bytes => bytes,
            },
        };
        Some(bytes as f64 / BYTES_PER_GIB)
    }
}

/// The process's peak resident set size in bytes (`VmHWM`, reported in kB).
fn process_peak_rss() -> Option<u64> {
    proc_file_kib("/proc/self/status", "VmHWM:")
}

/// The value of the `key` line (e.g. `VmHWM:`) of a `/proc` file whose values are in kB, in
/// bytes.
fn proc_file_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line
        .trim_start_matches(key)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Device memory in use (total − free) on a CUDA device, in bytes; `None` on other devices.
#[cfg(feature = "cuda")]
fn device_memory_in_use(device: &Device) -> Option<u64> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

/// Device memory in use on a CUDA device: never, in a build without CUDA.
#[cfg(not(feature = "cuda"))]
fn device_memory_in_use(_device: &Device) -> Option<u64> {
    None
}

/// A size that a config field or a flag sets, for messages: its name and value.
pub type Size<'a> = (&'a str, usize);

/// Fails when a forward over `rows` sequences (the product of the sizes) of `positions` tokens
/// each (their sum; at least one) cannot fit in `device`'s memory. The bound is what such a pass
/// must hold at once: the keys and values of every layer in `dtype` (sampling's KV cache,
/// training's saved activations) and one row of f32 logits per sequence. The error names every
/// size and its value. Where the memory cannot be read (a CPU other than Linux's), nothing is
/// checked.
pub fn ensure_fits(
    device: &Device,
    model: &Qwen2Config,
    dtype: DType,
    rows: &[Size],
    positions: &[Size],
) -> Result<()> {
    let Some(capacity) = device_memory_total(device) else {
        return Ok(());
    };
    let needed = lower_bound_bytes(model, dtype, rows, positions);
    if needed <= u128::from(capacity) {
        return Ok(());
    }
    let describe = |sizes: &[Size], op: &str| {
        sizes
            .iter()
            .map(|(name, value)| format!("{name} = {value}"))
            .collect::<Vec<_>>()
            .join(op)
    };
    let mut shape = format!("{} sequences", describe(rows, " × "));
    if !positions.is_empty() {
        shape.push_str(&format!(" of up to {} tokens", describe(positions, " + ")));
    }
    let names: Vec<&str> = rows
        .iter()
        .chain(positions)
        .map(|(name, _)| *name)
        .collect();
    bail!(
        "{shape} need at least {:.1} GiB (keys and values of every layer, plus logits), more than \
         the {:.1} GiB of memory of the {}: lower {}",
        needed as f64 / BYTES_PER_GIB,
        capacity as f64 / BYTES_PER_GIB,
        if device.is_cpu() { "machine" } else { "GPU" },
        names.join(" or ")
    )
}

/// Bytes of keys, values and logits of `rows` × `positions` (see [`ensure_fits`]), saturating.
fn lower_bound_bytes(model: &Qwen2Config, dtype: DType, rows: &[Size], positions: &[Size]) -> u128 {
    let rows = rows
        .iter()
        .fold(1u128, |n, &(_, value)| n.saturating_mul(value as u128));
    let positions = positions
        .iter()
        .fold(0u128, |n, &(_, value)| n.saturating_add(value as u128))
        .max(1);
    let per_token = [
        model.num_hidden_layers,
        2,
        model.num_key_value_heads,
        model.head_dim,
        dtype.size_in_bytes(),
    ]
    .iter()
    .fold(1u128, |n, &factor| n.saturating_mul(factor as u128));
    let per_row = positions
        .saturating_mul(per_token)
        .saturating_add((model.vocab_size as u128).saturating_mul(4));
    rows.saturating_mul(per_row)
}

/// The device's memory in bytes: the machine's (`MemTotal`) for the CPU, the GPU's total for
/// CUDA; `None` where it cannot be read.
fn device_memory_total(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => proc_file_kib("/proc/meminfo", "MemTotal:"),
        _ => device_memory_capacity(device),
    }
}

/// Total memory of a CUDA device, in bytes; `None` on other devices.
#[cfg(feature = "cuda")]
fn device_memory_capacity(device: &Device) -> Option<u64> {
    let cuda = device.as_cuda_device().ok()?;
    let (_free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some(total as u64)
}

/// Total memory of a CUDA device: never, in a build without CUDA.
#[cfg(not(feature = "cuda"))]
fn device_memory_capacity(_device: &Device) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelFamily;

    fn model() -> Qwen2Config {
        Qwen2Config {
            family: ModelFamily::Qwen2,
            vocab_size: 1000,
            hidden_size: 64,
            intermediate_size: 160,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 512,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    #[test]
    fn the_bound_counts_keys_values_and_logits() {
        // 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes = 512 bytes a token; 4000 of logits.
        let bytes = lower_bound_bytes(&model(), DType::F32, &[("b", 3), ("g", 2)], &[("p", 10)]);
        assert_eq!(bytes, 6 * (10 * 512 + 4000));
        let bf16 = lower_bound_bytes(&model(), DType::BF16, &[("b", 1)], &[("p", 3), ("c", 7)]);
        assert_eq!(bf16, 10 * 256 + 4000);
        let huge = lower_bound_bytes(
            &model(),
            DType::F32,
            &[("b", usize::MAX)],
            &[("c", usize::MAX)],
        );
        assert_eq!(huge, u128::MAX, "saturates instead of wrapping around");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sizes_beyond_memory_are_refused_by_name() {
        let err = ensure_fits(
            &Device::Cpu,
            &model(),
            DType::F32,
            &[
                ("per_device_train_batch_size", 1 << 40),
                ("num_generations", 8),
            ],
            &[("max_prompt_length", 512), ("max_completion_length", 256)],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("per_device_train_batch_size = 1099511627776")
                && err.contains("max_completion_length = 256")
                && err.contains("lower per_device_train_batch_size or num_generations"),
            "{err}"
        );
        ensure_fits(
            &Device::Cpu,
            &model(),
            DType::F32,
            &[("per_device_train_batch_size", 8), ("num_generations", 8)],
            &[("max_prompt_length", 512), ("max_completion_length", 256)],
        )
        .unwrap();
    }
}
