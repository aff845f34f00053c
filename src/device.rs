//! Where tensors live and in which float type the model computes: the config's `device`
//! (`auto | cpu | cuda`) and `bf16` become a [`Runtime`], which the trainer, sampler and
//! evaluator take.
//!
//! CUDA needs a binary built with the `cuda` feature (`scripts/build-cuda.sh`). bf16 compute is
//! used on CUDA only: on the CPU, bf16 matmuls are slower than f32 ones, so `bf16 = true` there
//! computes in f32 (the numbers are then simply more precise). See `docs/PRECISION.md`.

use std::fmt;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::config::{Config, DeviceChoice};

/// Whether this binary was built with CUDA support (the `cuda` feature).
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// What `grpo --version` prints after the name: the package version and `(cuda)` or `(cpu)`,
/// the build's devices (`scripts/gpu-check.sh` reads it).
pub const VERSION: &str = if BUILT_WITH_CUDA {
    concat!(env!("CARGO_PKG_VERSION"), " (cuda)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (cpu)")
};

/// The device tensors live on and the dtype of the model's matmuls there.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub device: Device,
    /// f32 on the CPU; bf16 on CUDA when the config asks for it (see [`compute_dtype`]).
    pub compute_dtype: DType,
}

impl Runtime {
    /// The runtime the config asks for (`device` and `bf16`).
    pub fn from_config(config: &Config) -> Result<Self> {
        Self::new(config.device, config.bf16)
    }

    /// The device for `choice` (see [`select_device`]) and its compute dtype.
    pub fn new(choice: DeviceChoice, bf16: bool) -> Result<Self> {
        let device = select_device(choice)?;
        let compute_dtype = compute_dtype(&device, bf16);
        Ok(Runtime {
            device,
            compute_dtype,
        })
    }

    /// The CPU with f32 compute.
    pub fn cpu() -> Self {
        Runtime {
            device: Device::Cpu,
            compute_dtype: DType::F32,
        }
    }
}

impl fmt::Display for Runtime {
    /// `cpu (f32)` or `cuda:0 (bf16)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            device_name(&self.device),
            self.compute_dtype.as_str()
        )
    }
}

/// `cpu`, `cuda:0`, ...
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `cpu` → the CPU; `cuda` → CUDA device 0, an error when this build has no CUDA or no GPU is
/// usable; `auto` → CUDA device 0 when this build has CUDA and it opens, else the CPU.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if !BUILT_WITH_CUDA {
                bail!(
                    "device = \"cuda\" but this grpo binary was built without CUDA support: \
                     build it with `cargo build --release --features cuda` (with a CUDA toolkit) \
                     or `scripts/build-cuda.sh` (no toolkit needed), or set device = \"cpu\""
                );
            }
            Device::new_cuda(0).context(
                "device = \"cuda\" but CUDA device 0 cannot be opened (is there a GPU, is the \
                 NVIDIA driver loaded, do CUDA_VISIBLE_DEVICES and LD_LIBRARY_PATH point at it?)",
            )
        }
        DeviceChoice::Auto if BUILT_WITH_CUDA => match Device::new_cuda(0) {
            Ok(device) => Ok(device),
            Err(error) => {
                tracing::warn!("device = \"auto\": no usable CUDA device ({error}), using the CPU");
                Ok(Device::Cpu)
            }
        },
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

/// bf16 on a GPU when `bf16` is set, else f32. On the CPU `bf16` is ignored with an info log:
/// CPU bf16 matmuls are slower than f32 ones.
pub fn compute_dtype(device: &Device, bf16: bool) -> DType {
    match (bf16, device.is_cpu()) {
        (false, _) => DType::F32,
        (true, false) => DType::BF16,
        (true, true) => {
            tracing::info!("bf16 = true on the CPU: computing in f32 (CPU bf16 matmuls are slow)");
            DType::F32
        }
    }
}
