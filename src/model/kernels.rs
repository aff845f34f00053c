//! How the CUDA kernels of the fused ops (`kernels/fused.cu`) are launched: for each op a
//! [`Plan`], the grid, block and arguments of each kernel in order and the buffers they need,
//! described once and run by two executors — [`run`] on a CUDA device (`--features cuda`; the
//! `cuda_fwd` of the ops in [`super::fused`]), and the CPU emulator of the tests
//! (`tests/kernels.rs`), which compiles `kernels/fused.cu` as C++ and runs each block's threads
//! with a barrier for `__syncthreads`. So the kernels, their indexing and these launch
//! descriptions are checked against the CPU ops on machines without a GPU, and on a GPU
//! `tests/device.rs` compares the ops on both devices.
//!
//! Kernel names are `<kernel>_<dtype>` (`f32` or `bf16`: the storage type of the inputs and
//! the output; every kernel computes in f32).

use candle_core::{bail, Result};

/// What a buffer argument of a kernel points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// The op's `i`-th input, from its first element.
    Input(usize),
    /// The op's output, from element `offset` on.
    Output { offset: usize },
    /// The plan's zero-filled f32 scratch buffer ([`Plan::scratch_len`] elements).
    Scratch,
}

/// One argument of a kernel, in the order of the kernel's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Buffer(Buffer),
    /// An `int` parameter.
    Int(i32),
    /// A `float` parameter.
    Float(f32),
}

/// One kernel launch: a one-dimensional grid of `grid` blocks of `block` threads (a power of
/// two, at most [`BLOCK_MAX`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The kernel's name without the dtype suffix.
    pub kernel: &'static str,
    pub grid: u32,
    pub block: u32,
    pub args: Vec<Arg>,
}

/// The launches of one op, run in order, and the sizes of its buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub launches: Vec<Launch>,
    /// Elements of the output.
    pub output_len: usize,
    /// f32 elements of the scratch buffer (0: none).
    pub scratch_len: usize,
}

/// Most threads per block (the kernels' static shared memory holds this many floats).
pub const BLOCK_MAX: u32 = 1024;

/// Threads per block of the element-wise kernels.
const ELEMENTWISE_BLOCK: u32 = 256;

/// Rows of the RMSNorm backward handled by one block (its share of the weight gradient is one
/// row of the scratch buffer).
const RMS_NORM_ROWS_PER_BLOCK: usize = 16;

/// The block for row kernels over rows of `width`: the power of two at least `width`, between
/// 32 and `most` threads (wider rows loop).
fn row_block(width: usize, most: u32) -> u32 {
    let threads = width.next_power_of_two().clamp(32, most as usize);
    threads as u32
}

/// `value` as a kernel `int`.
fn int(value: usize, what: &str) -> Result<Arg> {
    match i32::try_from(value) {
        Ok(v) => Ok(Arg::Int(v)),
        Err(_) => bail!("fused kernels: {what} = {value} does not fit a 32-bit int"),
    }
}

/// `count` as a grid size.
fn grid(count: usize, what: &str) -> Result<u32> {
    match u32::try_from(count) {
        Ok(v) if v > 0 => Ok(v),
        _ => bail!("fused kernels: {count} {what} cannot be launched"),
    }
}

fn input(i: usize) -> Arg {
    Arg::Buffer(Buffer::Input(i))
}

const OUTPUT: Arg = Arg::Buffer(Buffer::Output { offset: 0 });

/// [`super::fused::RmsNorm`] of `rows` rows of `width`: inputs `(x, weight)`.
pub fn rms_norm(rows: usize, width: usize, eps: f32) -> Result<Plan> {
    Ok(Plan {
        launches: vec![Launch {
            kernel: "rms_norm",
            grid: grid(rows, "rows")?,
            block: row_block(width, 256),
            args: vec![
                input(0),
                input(1),
                OUTPUT,
                int(width, "width")?,
                Arg::Float(eps),
            ],
        }],
        output_len: rows * width,
        scratch_len: 0,
    })
}

/// The backward of [`super::fused::RmsNorm`]: inputs `(x, weight, grad_out)`; the output is
/// `[rows + 1, width]`, `dx` then `dw`. Each block of rows writes its share of `dw` to a scratch
/// row; a second kernel adds those rows in order.
pub fn rms_norm_backward(rows: usize, width: usize, eps: f32) -> Result<Plan> {
    let blocks = rows.div_ceil(RMS_NORM_ROWS_PER_BLOCK);
    Ok(Plan {
        launches: vec![
            Launch {
                kernel: "rms_norm_backward_rows",
                grid: grid(blocks, "row blocks")?,
                block: row_block(width, 256),
                args: vec![
                    input(0),
                    input(1),
                    input(2),
                    OUTPUT,
                    Arg::Buffer(Buffer::Scratch),
                    int(rows, "rows")?,
                    int(width, "width")?,
                    Arg::Float(eps),
                    int(RMS_NORM_ROWS_PER_BLOCK, "rows per block")?,
                ],
            },
            Launch {
                kernel: "rms_norm_weight_grad",
                grid: grid(width.div_ceil(ELEMENTWISE_BLOCK as usize), "column blocks")?,
                block: ELEMENTWISE_BLOCK,
                args: vec![
                    Arg::Buffer(Buffer::Scratch),
                    Arg::Buffer(Buffer::Output {
                        offset: rows * width,
                    }),
                    int(blocks, "row blocks")?,
                    int(width, "width")?,
                ],
            },
        ],
        output_len: (rows + 1) * width,
        scratch_len: blocks * width,
    })
}

/// [`super::fused::Rope`] of `x` `[b, heads, t, d]`: inputs `(x, cos, sin)`, tables
/// `[b, 1, t, d]`; `adjoint` applies the gradient of the rotation instead.
pub fn rope(b: usize, heads: usize, t: usize, d: usize, adjoint: bool) -> Result<Plan> {
    let pairs = b * heads * t * (d / 2);
    Ok(Plan {
        launches: vec![Launch {
            kernel: "rope",
            grid: grid(pairs.div_ceil(ELEMENTWISE_BLOCK as usize), "pair blocks")?,
            block: ELEMENTWISE_BLOCK,
            args: vec![
                input(0),
                input(1),
                input(2),
                OUTPUT,
                int(pairs, "pairs")?,
                int(heads, "heads")?,
                int(t, "positions")?,
                int(d, "head dim")?,
                Arg::Int(i32::from(adjoint)),
            ],
        }],
        output_len: pairs * 2,
        scratch_len: 0,
    })
}

/// [`super::fused::Softmax`] of `rows` rows of `width`: input `x`.
pub fn softmax(rows: usize, width: usize) -> Result<Plan> {
    Ok(Plan {
        launches: vec![Launch {
            kernel: "softmax",
            grid: grid(rows, "rows")?,
            block: row_block(width, 256),
            args: vec![input(0), OUTPUT, int(width, "width")?],
        }],
        output_len: rows * width,
        scratch_len: 0,
    })
}

/// [`super::fused::AttentionSoftmax`]: inputs `(scores, bias)`, scores of `items` batch items
/// of `rows_per_item` rows of `width`, bias `[items, 1, t, width]`.
pub fn attention_softmax(
    items: usize,
    rows_per_item: usize,
    t: usize,
    width: usize,
    scale: f32,
) -> Result<Plan> {
    let rows = items * rows_per_item;
    Ok(Plan {
        launches: vec![Launch {
            kernel: "attention_softmax",
            grid: grid(rows, "rows")?,
            block: row_block(width, 256),
            args: vec![
                input(0),
                input(1),
                OUTPUT,
                int(width, "width")?,
                int(rows_per_item, "rows per item")?,
                int(t, "queries")?,
                Arg::Float(scale),
            ],
        }],
        output_len: rows * width,
        scratch_len: 0,
    })
}

/// The softmax gradient (times `scale`) of `rows` rows of `width`: inputs `(grad_out, y)`.
pub fn softmax_backward(rows: usize, width: usize, scale: f32) -> Result<Plan> {
    Ok(Plan {
        launches: vec![Launch {
            kernel: "softmax_backward",
            grid: grid(rows, "rows")?,
            block: row_block(width, 256),
            args: vec![
                input(0),
                input(1),
                OUTPUT,
                int(width, "width")?,
                Arg::Float(scale),
            ],
        }],
        output_len: rows * width,
        scratch_len: 0,
    })
}

/// [`super::fused::LogSoftmaxGather`]: inputs `(logits [rows, vocab] f32, targets [rows] u32)`,
/// output `[rows, 3]` f32; run with the f32 kernel. The logits are multiplied by
/// `inv_temperature`.
pub fn log_softmax_gather(rows: usize, vocab: usize, inv_temperature: f32) -> Result<Plan> {
    Ok(Plan {
        launches: vec![Launch {
            kernel: "log_softmax_gather",
            grid: grid(rows, "rows")?,
            block: row_block(vocab, BLOCK_MAX),
            args: vec![
                input(0),
                input(1),
                OUTPUT,
                int(vocab, "vocab")?,
                Arg::Float(inv_temperature),
            ],
        }],
        output_len: rows * 3,
        scratch_len: 0,
    })
}

/// [`super::fused::LogprobGrad`]: inputs `(logits [rows, vocab] f32, targets [rows] u32,
/// stats [rows, 2] f32)`, output `[rows, vocab]` in the kernel's dtype. The logits are
/// multiplied by `inv_temperature`.
pub fn logprob_grad(rows: usize, vocab: usize, inv_temperature: f32) -> Result<Plan> {
    let elements = rows * vocab;
    Ok(Plan {
        launches: vec![Launch {
            kernel: "logprob_grad",
            grid: grid(
                elements.div_ceil(ELEMENTWISE_BLOCK as usize),
                "element blocks",
            )?,
            block: ELEMENTWISE_BLOCK,
            args: vec![
                input(0),
                input(1),
                input(2),
                OUTPUT,
                int(rows, "rows")?,
                int(vocab, "vocab")?,
                Arg::Float(inv_temperature),
            ],
        }],
        output_len: elements,
        scratch_len: 0,
    })
}

#[cfg(feature = "cuda")]
pub use cuda::run;

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda_backend::cudarc::driver::{
        sys::CUdeviceptr, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
        PushKernelArg, SyncOnDrop,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

    use super::{Arg, Buffer, Plan};

    /// The kernels, compiled to PTX by build.rs for `CUDA_COMPUTE_CAP`.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    /// The name the module is cached under by candle's device.
    const MODULE: &str = "grpo-fused";

    /// Runs `plan` on the inputs' device with kernels for `dtype` (f32 or bf16), which is also
    /// the output's dtype. Inputs must be contiguous.
    pub fn run(
        plan: &Plan,
        dtype: DType,
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<CudaStorage> {
        let Some((first, _)) = inputs.first() else {
            bail!("fused kernels: no inputs");
        };
        if !matches!(dtype, DType::F32 | DType::BF16) {
            bail!("fused kernels: no {dtype:?} kernels (f32 and bf16 only)");
        }
        let device = first.device().clone();
        let stream = device.cuda_stream();
        // SAFETY: every element of the output is written by the plan's kernels.
        let mut output = unsafe { device.alloc_uninit(&Shape::from(plan.output_len), dtype)? };
        let mut scratch: Option<CudaSlice<f32>> = match plan.scratch_len {
            0 => None,
            n => Some(device.alloc_zeros::<f32>(n)?),
        };
        let element = dtype.size_in_bytes() as CUdeviceptr;
        for launch in &plan.launches {
            let name = format!("{}_{}", launch.kernel, dtype.as_str());
            let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
            // The buffers' addresses, with the guards that order this stream after their earlier
            // writers and record this launch's reads and writes when dropped after it.
            let mut input_ptrs = Vec::with_capacity(inputs.len());
            for (storage, layout) in inputs {
                input_ptrs.push(input_ptr(storage, layout, &stream)?);
            }
            let (output_address, output_guard) = output_ptr(&mut output, &stream)?;
            let scratch_ptr = scratch.as_mut().map(|s| s.device_ptr_mut(&stream));
            let mut values = Vec::with_capacity(launch.args.len());
            for arg in &launch.args {
                values.push(match *arg {
                    Arg::Int(v) => Value::Int(v),
                    Arg::Float(v) => Value::Float(v),
                    Arg::Buffer(Buffer::Input(i)) => match input_ptrs.get(i) {
                        Some((ptr, _)) => Value::Ptr(*ptr),
                        None => bail!("fused kernels: {name} wants input {i}"),
                    },
                    Arg::Buffer(Buffer::Output { offset }) => {
                        Value::Ptr(output_address + offset as CUdeviceptr * element)
                    }
                    Arg::Buffer(Buffer::Scratch) => match &scratch_ptr {
                        Some((ptr, _)) => Value::Ptr(*ptr),
                        None => bail!("fused kernels: {name} wants a scratch buffer"),
                    },
                });
            }
            let mut builder = func.builder();
            for value in &values {
                match value {
                    Value::Int(v) => builder.arg(v),
                    Value::Float(v) => builder.arg(v),
                    Value::Ptr(v) => builder.arg(v),
                };
            }
            let config = LaunchConfig {
                grid_dim: (launch.grid, 1, 1),
                block_dim: (launch.block, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments follow the kernel's parameters (the plan is checked against
            // kernels/fused.cu by the emulator tests) and every buffer holds what it indexes.
            unsafe { builder.launch(config) }.w()?;
            drop((input_ptrs, output_guard, scratch_ptr));
        }
        Ok(output)
    }

    /// A kernel argument's value.
    enum Value {
        Int(i32),
        Float(f32),
        Ptr(CUdeviceptr),
    }

    fn offset_ptr<'a, T>(
        slice: &'a CudaSlice<T>,
        start: usize,
        stream: &'a std::sync::Arc<CudaStream>,
    ) -> (CUdeviceptr, SyncOnDrop<'a>) {
        let (ptr, guard) = slice.device_ptr(stream);
        (
            ptr + (start * std::mem::size_of::<T>()) as CUdeviceptr,
            guard,
        )
    }

    /// The device address of a contiguous input's first element.
    fn input_ptr<'a>(
        storage: &'a CudaStorage,
        layout: &Layout,
        stream: &'a std::sync::Arc<CudaStream>,
    ) -> Result<(CUdeviceptr, SyncOnDrop<'a>)> {
        let Some((start, _)) = layout.contiguous_offsets() else {
            bail!("fused kernels: inputs must be contiguous");
        };
        Ok(match &storage.slice {
            CudaStorageSlice::F32(s) => offset_ptr(s, start, stream),
            CudaStorageSlice::BF16(s) => offset_ptr(s, start, stream),
            CudaStorageSlice::U32(s) => offset_ptr(s, start, stream),
            _ => bail!(
                "fused kernels: {:?} inputs are not supported",
                storage.dtype()
            ),
        })
    }

    /// The device address of the output's first element, for writing.
    fn output_ptr<'a>(
        output: &'a mut CudaStorage,
        stream: &'a std::sync::Arc<CudaStream>,
    ) -> Result<(CUdeviceptr, SyncOnDrop<'a>)> {
        Ok(match &mut output.slice {
            CudaStorageSlice::F32(s) => s.device_ptr_mut(stream),
            CudaStorageSlice::BF16(s) => s.device_ptr_mut(stream),
            _ => bail!("fused kernels: the output must be f32 or bf16"),
        })
    }
}
