//! The CUDA build (`--features cuda`) compiles `kernels/fused.cu` to PTX for `CUDA_COMPUTE_CAP`
//! (default: the local GPU's) into `OUT_DIR/fused.ptx`, which `src/model/kernels.rs` includes.
//! PTX made at build time (not NVRTC at run time) puts nvcc's errors in the build, where the
//! GPU-less build machine sees them, and needs no compiler on the GPU machine. The CPU build
//! does nothing here.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    compile_kernels();
}

#[cfg(feature = "cuda")]
fn compile_kernels() {
    // cudaforge is what candle-kernels builds its PTX with: the same nvcc, the same rules for
    // CUDA_COMPUTE_CAP (90 becomes sm_90a), so both modules target the same GPU.
    let built = cudaforge::KernelBuilder::new()
        .source_files(["kernels/fused.cu"])
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx();
    if let Err(error) = built {
        panic!("compiling kernels/fused.cu with nvcc failed: {error}");
    }
}
