//! The CUDA kernels (`kernels/fused.cu`) without a GPU: `tests/kernel_emulator/` compiles the
//! kernel source as C++ (g++, C++20), runs every block's threads as OS threads meeting at a
//! barrier for `__syncthreads`, and these tests launch it with the very plans the CUDA build
//! launches (`grpo::model::kernels`: grid, block, argument order, scratch buffers) and compare
//! forward and backward results, in f32 and bf16, with the CPU fused ops
//! (`grpo::model::fused`, themselves checked against composite candle ops in `tests/ops.rs`).
//! Outputs start as NaN, so an element no thread writes fails the comparison.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use grpo::model::fused;
use grpo::model::kernels::{self, Arg, Buffer, Plan};
use grpo::model::ops::{causal_bias, rope_tables, MASKED_BIAS};

type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, *mut *mut c_void, *mut c_char, usize) -> c_int;

/// `emu_launch` of the emulator library, built once per test process.
fn emulator() -> LaunchFn {
    static LAUNCH: OnceLock<LaunchFn> = OnceLock::new();
    *LAUNCH.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let library = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kernel-emulator-{}.so", std::process::id()));
        let output = Command::new("g++")
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o"])
            .arg(&library)
            .arg(root.join("tests/kernel_emulator/emulator.cpp"))
            .output()
            .expect("tests/kernels.rs needs g++ (C++20) to build the kernel emulator");
        assert!(
            output.status.success(),
            "building the kernel emulator failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = CString::new(library.to_str().unwrap()).unwrap();
        // SAFETY: a library we just built, loaded once and never unloaded.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        assert!(!handle.is_null(), "cannot load {}", library.display());
        let symbol = unsafe { libc::dlsym(handle, c"emu_launch".as_ptr()) };
        assert!(!symbol.is_null(), "the emulator has no emu_launch");
        let _ = std::fs::remove_file(&library);
        // SAFETY: the address of `emu_launch`, whose signature LaunchFn spells out.
        unsafe { std::mem::transmute::<*mut c_void, LaunchFn>(symbol) }
    })
}

/// A host buffer in a kernel's storage type.
enum Host {
    F32(Vec<f32>),
    /// bf16 bits.
    Bf16(Vec<u16>),
    U32(Vec<u32>),
}

impl Host {
    /// `t`'s values stored as `dtype` (f32 or bf16; u32 tensors stay u32).
    fn of(t: &Tensor, dtype: DType) -> Host {
        if t.dtype() == DType::U32 {
            return Host::U32(t.flatten_all().unwrap().to_vec1().unwrap());
        }
        let values: Vec<f32> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        match dtype {
            DType::F32 => Host::F32(values),
            DType::BF16 => Host::Bf16(values.iter().map(|&v| bf16_bits(v)).collect()),
            other => panic!("no {other:?} kernels"),
        }
    }

    /// NaNs of `dtype`: an element no kernel writes stays NaN.
    fn nan(len: usize, dtype: DType) -> Host {
        match dtype {
            DType::F32 => Host::F32(vec![f32::NAN; len]),
            DType::BF16 => Host::Bf16(vec![0x7fc0; len]),
            other => panic!("no {other:?} kernels"),
        }
    }

    fn ptr(&mut self) -> *mut c_void {
        match self {
            Host::F32(v) => v.as_mut_ptr().cast(),
            Host::Bf16(v) => v.as_mut_ptr().cast(),
            Host::U32(v) => v.as_mut_ptr().cast(),
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self {
            Host::F32(v) => v.clone(),
            Host::Bf16(v) => v
                .iter()
                .map(|&bits| f32::from_bits(u32::from(bits) << 16))
                .collect(),
            Host::U32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

/// The bf16 bits of `v`, which must be a bf16 value (the tests round their inputs first).
fn bf16_bits(v: f32) -> u16 {
    assert_eq!(v.to_bits() & 0xffff, 0, "{v} is not a bf16 value");
    (v.to_bits() >> 16) as u16
}

/// Runs `plan` in the emulator with `dtype` kernels, every input stored as `dtype`; returns the
/// output as f32.
fn emulate(plan: &Plan, dtype: DType, inputs: &[&Tensor]) -> Vec<f32> {
    emulate_hosts(
        plan,
        dtype,
        inputs.iter().map(|t| Host::of(t, dtype)).collect(),
    )
}

/// [`emulate`] with the inputs as given.
fn emulate_hosts(plan: &Plan, dtype: DType, inputs: Vec<Host>) -> Vec<f32> {
    try_emulate(plan, dtype, inputs).unwrap_or_else(|error| panic!("{error}"))
}

/// [`emulate_hosts`], or the emulator's refusal.
fn try_emulate(plan: &Plan, dtype: DType, mut inputs: Vec<Host>) -> Result<Vec<f32>, String> {
    let mut output = Host::nan(plan.output_len, dtype);
    let mut scratch = vec![0f32; plan.scratch_len];
    let element = if dtype == DType::BF16 { 2 } else { 4 };
    for launch in &plan.launches {
        // Each argument's value in an 8-byte slot; the kernel reads its type's bytes from it.
        let mut slots: Vec<u64> = launch
            .args
            .iter()
            .map(|arg| match *arg {
                Arg::Int(v) => v as u32 as u64,
                Arg::Float(v) => v.to_bits() as u64,
                Arg::Buffer(Buffer::Input(i)) => inputs[i].ptr() as u64,
                Arg::Buffer(Buffer::Output { offset }) => {
                    assert!(offset < plan.output_len, "offset past the output");
                    output.ptr() as u64 + (offset * element) as u64
                }
                Arg::Buffer(Buffer::Scratch) => scratch.as_mut_ptr() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|slot| (slot as *mut u64).cast())
            .collect();
        let name = CString::new(format!("{}_{}", launch.kernel, dtype.as_str())).unwrap();
        let mut error = [0 as c_char; 256];
        // SAFETY: the buffers outlive the call; the emulator checks the kernel name and launch.
        let status = unsafe {
            emulator()(
                name.as_ptr(),
                launch.grid,
                launch.block,
                params.as_mut_ptr(),
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if status != 0 {
            let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
            return Err(message.to_string_lossy().into_owned());
        }
    }
    Ok(output.to_f32())
}

/// Deterministic values in about [-scale, scale].
fn values(shape: &[usize], seed: f32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
    ((t * 0.7312).unwrap() + seed as f64)
        .unwrap()
        .sin()
        .unwrap()
        .affine(scale as f64, 0.0)
        .unwrap()
        .reshape(shape)
        .unwrap()
}

/// `t` rounded to `dtype` and back (the inputs a bf16 kernel sees, as f32).
fn rounded(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Asserts that `actual` is `expected` within f32 accumulation-order error (f32) or one bf16
/// rounding of the result (bf16), relative to each value and to the largest one.
fn assert_close(what: &str, actual: &[f32], expected: &[f32], dtype: DType) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let largest = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let relative = match dtype {
        DType::BF16 => 1.0 / 256.0,
        _ => 1e-5,
    };
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let bound = relative * e.abs() + 1e-5 * largest + 1e-7;
        assert!(
            (a - e).abs() <= bound,
            "{what} ({dtype:?}): element {i} is {a}, the CPU op gives {e} (bound {bound})"
        );
    }
}

/// Gradients of `sum(out * upstream)` for `inputs`.
fn gradients(out: &Tensor, upstream: &Tensor, inputs: &[&Var]) -> Vec<Tensor> {
    let grads = (out * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    inputs
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
        .collect()
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

#[test]
fn rms_norm_kernels_match_the_cpu_op() {
    // Wider than a block (300 > 256), more rows than one backward block (16), and a remainder.
    for (rows, width) in [(3, 64), (37, 50), (5, 300)] {
        for dtype in DTYPES {
            let eps = 1e-6;
            let x = Var::from_tensor(&rounded(&values(&[rows, width], 0.1, 2.0), dtype)).unwrap();
            let weight = Var::from_tensor(&rounded(&values(&[width], 0.5, 1.0), dtype)).unwrap();
            let upstream = rounded(&values(&[rows, width], 0.9, 1.0), dtype);
            let cpu = x
                .as_tensor()
                .apply_op2(weight.as_tensor(), fused::RmsNorm { eps })
                .unwrap();
            let plan = kernels::rms_norm(rows, width, eps).unwrap();
            let out = emulate(&plan, dtype, &[x.as_tensor(), weight.as_tensor()]);
            assert_close("rms_norm", &out, &flat(&cpu), dtype);

            let grads = gradients(&cpu, &upstream, &[&x, &weight]);
            let plan = kernels::rms_norm_backward(rows, width, eps).unwrap();
            let both = emulate(
                &plan,
                dtype,
                &[x.as_tensor(), weight.as_tensor(), &upstream],
            );
            let (dx, dw) = both.split_at(rows * width);
            assert_close("rms_norm dx", dx, &flat(&grads[0]), dtype);
            assert_close("rms_norm dw", dw, &flat(&grads[1]), dtype);
        }
    }
}

#[test]
fn rope_kernel_matches_the_cpu_op_both_ways() {
    for (b, heads, t, d) in [(2, 3, 7, 16), (1, 2, 5, 6)] {
        let positions: Vec<i64> = (0..b * t).map(|i| (i * 37 % 11) as i64).collect();
        let positions = Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap();
        for dtype in DTYPES {
            let (cos, sin) = rope_tables(&positions, d, 1e4).unwrap();
            let (cos, sin) = (rounded(&cos, dtype), rounded(&sin, dtype));
            let x = rounded(&values(&[b, heads, t, d], 0.3, 1.5), dtype);
            for adjoint in [false, true] {
                let cpu = x.apply_op3(&cos, &sin, fused::Rope { adjoint }).unwrap();
                let plan = kernels::rope(b, heads, t, d, adjoint).unwrap();
                let out = emulate(&plan, dtype, &[&x, &cos, &sin]);
                assert_close(&format!("rope adjoint={adjoint}"), &out, &flat(&cpu), dtype);
            }
        }
    }
}

#[test]
fn softmax_kernels_match_the_cpu_op() {
    // A masked column (finite large negative) and rows wider than a block.
    for (rows, width) in [(6, 9), (4, 300)] {
        for dtype in DTYPES {
            let mask: Vec<f32> = (0..width)
                .map(|i| if i % 4 == 2 { MASKED_BIAS } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, width, &Device::Cpu).unwrap();
            let x = values(&[rows, width], 0.2, 3.0)
                .broadcast_add(&mask)
                .unwrap();
            let x = Var::from_tensor(&rounded(&x, dtype)).unwrap();
            let upstream = rounded(&values(&[rows, width], 0.7, 1.0), dtype);
            let cpu = x.as_tensor().apply_op1(fused::Softmax).unwrap();
            let out = emulate(
                &kernels::softmax(rows, width).unwrap(),
                dtype,
                &[x.as_tensor()],
            );
            assert_close("softmax", &out, &flat(&cpu), dtype);

            // The backward kernel reads the forward's output as the kernel stored it.
            let y = rounded(&cpu, dtype);
            let op = fused::SoftmaxBackward { scale: 1.0 };
            let grad = upstream.apply_op2_no_bwd(&y, &op).unwrap();
            let plan = kernels::softmax_backward(rows, width, 1.0).unwrap();
            let out = emulate(&plan, dtype, &[&upstream, &y]);
            assert_close("softmax backward", &out, &flat(&grad), dtype);
            // That op is the gradient of the softmax (as the training graph uses it).
            if dtype == DType::F32 {
                let autograd = gradients(&cpu, &upstream, &[&x]).remove(0);
                assert_close("softmax gradient", &flat(&grad), &flat(&autograd), dtype);
            }
        }
    }
}

#[test]
fn attention_softmax_kernels_match_the_cpu_op() {
    // [b, kv_heads, per_kv * t, s] scores with a causal, left-padded bias [b, 1, t, s].
    let (b, kv_heads, per_kv, t, past) = (2, 2, 3, 5, 4);
    let s = past + t;
    let key_mask = Tensor::new(
        &[[0u8, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let bias = causal_bias(&key_mask, t).unwrap();
    let scale = 0.35f32;
    for dtype in DTYPES {
        let scores = rounded(&values(&[b, kv_heads, per_kv * t, s], 0.4, 4.0), dtype);
        let scores = Var::from_tensor(&scores).unwrap();
        let bias = rounded(&bias, dtype);
        let cpu = scores
            .as_tensor()
            .apply_op2(&bias, fused::AttentionSoftmax { scale })
            .unwrap();
        let plan = kernels::attention_softmax(b, kv_heads * per_kv * t, t, s, scale).unwrap();
        let out = emulate(&plan, dtype, &[scores.as_tensor(), &bias]);
        assert_close("attention softmax", &out, &flat(&cpu), dtype);

        let upstream = rounded(&values(cpu.dims(), 0.8, 1.0), dtype);
        let y = rounded(&cpu, dtype);
        let grad = upstream
            .apply_op2_no_bwd(&y, &fused::SoftmaxBackward { scale })
            .unwrap();
        let plan = kernels::softmax_backward(b * kv_heads * per_kv * t, s, scale).unwrap();
        let out = emulate(&plan, dtype, &[&upstream, &y]);
        assert_close("attention softmax backward", &out, &flat(&grad), dtype);
        if dtype == DType::F32 {
            let autograd = gradients(&cpu, &upstream, &[&scores]).remove(0);
            assert_close(
                "attention softmax gradient",
                &flat(&grad),
                &flat(&autograd),
                dtype,
            );
        }
    }
}

#[test]
fn logprob_kernels_match_the_cpu_ops() {
    // A vocabulary wider than a block of 1024 threads; targets at both ends.
    let (rows, vocab, temperature) = (5, 1500, 0.7);
    let logits = values(&[rows, vocab], 0.6, 8.0);
    let targets = Tensor::new(&[3u32, 0, 1499, 77, 1024], &Device::Cpu).unwrap();
    let op = fused::LogSoftmaxGather { temperature };
    let cpu = logits.apply_op2_no_bwd(&targets, &op).unwrap();
    let plan = kernels::log_softmax_gather(rows, vocab, (1.0 / temperature) as f32).unwrap();
    let out = emulate_hosts(
        &plan,
        DType::F32,
        vec![
            Host::of(&logits, DType::F32),
            Host::of(&targets, DType::F32),
        ],
    );
    assert_close(
        "log-probs, entropies, normalizers",
        &out,
        &flat(&cpu),
        DType::F32,
    );

    let upstream = Tensor::new(&[1f32, -2.0, 0.5, 3.0, 0.0], &Device::Cpu).unwrap();
    let scale = (upstream.reshape((rows, 1)).unwrap() / temperature).unwrap();
    let stats = Tensor::cat(&[&cpu.narrow(1, 2, 1).unwrap(), &scale], 1).unwrap();
    for dtype in DTYPES {
        let op = fused::LogprobGrad { temperature, dtype };
        let cpu = logits.apply_op3_no_bwd(&targets, &stats, &op).unwrap();
        let plan = kernels::logprob_grad(rows, vocab, (1.0 / temperature) as f32).unwrap();
        let inputs = vec![
            Host::of(&logits, DType::F32),
            Host::of(&targets, DType::F32),
            Host::of(&stats, DType::F32),
        ];
        let out = emulate_hosts(&plan, dtype, inputs);
        assert_close("log-prob gradient", &out, &flat(&cpu), dtype);
    }
}

#[test]
fn the_emulator_refuses_unknown_kernels_and_bad_blocks() {
    let mut plan = kernels::softmax(2, 8).unwrap();
    let x = values(&[2, 8], 0.0, 1.0);
    let input = || vec![Host::of(&x, DType::F32)];
    assert!(try_emulate(&plan, DType::F32, input()).is_ok());
    plan.launches[0].block = 48;
    let refused = try_emulate(&plan, DType::F32, input()).unwrap_err();
    assert!(refused.contains("bad launch"), "{refused}");
    plan.launches[0].block = 32;
    plan.launches[0].kernel = "no_such_kernel";
    let refused = try_emulate(&plan, DType::F32, input()).unwrap_err();
    assert!(
        refused.contains("no kernel named no_such_kernel_f32"),
        "{refused}"
    );
}
