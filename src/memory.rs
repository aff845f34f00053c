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

use candle_core::Device;

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
    /// Largest CUDA sample since [`PeakMemory::reset`], in bytes.
    peak_bytes: Option<u64>,
}

impl PeakMemory {
    /// A tracker for `device`, reset.
    pub fn new(device: &Device) -> Self {
        let mut memory = Self {
            device: device.clone(),
            peak_bytes: None,
        };
        memory.reset();
        memory
    }

    /// Starts a new step: forgets the peak so far.
    pub fn reset(&mut self) {
        self.peak_bytes = None;
        if self.device.is_cpu() {
            // "5" resets the peak RSS to the current RSS (Linux >= 4.0). Where this cannot be
            // written the peak is the process's since it started, still an upper bound.
            std::fs::write("/proc/self/clear_refs", "5").ok();
        }
        self.sample();
    }

    /// Records the memory in use now (CUDA); the CPU's peak is tracked by the kernel.
    pub fn sample(&mut self) {
        if let Some(used) = device_memory_in_use(&self.device) {
            self.peak_bytes = Some(self.peak_bytes.map_or(used, |peak| peak.max(used)));
        }
    }

    /// The peak since the last reset in GiB; `None` where it cannot be measured.
    pub fn peak_gib(&self) -> Option<f64> {
        let bytes = match self.device {
            Device::Cpu => process_peak_rss()?,
            _ => self.peak_bytes?,
        };
        Some(bytes as f64 / BYTES_PER_GIB)
    }
}

/// The process's peak resident set size in bytes (`VmHWM`, reported in kB).
fn process_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
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
