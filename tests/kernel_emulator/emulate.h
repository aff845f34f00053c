// Host definitions under which kernels/fused.cu compiles as plain C++ (g++ -std=c++20), for the
// CPU emulator of tests/kernels.rs: the thread and block indices are per-OS-thread variables,
// `__shared__` arrays are function statics (the blocks of a grid run one after another, each
// block's threads at the same time), `__syncthreads` is a barrier of the block's threads, and
// bf16 is stored as 16 bits and rounded to nearest even as CUDA's __float2bfloat16 does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {
extern thread_local dim3 thread_idx;
extern thread_local dim3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;
void sync_threads();
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() emu::sync_threads()

using std::max;
using std::min;

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
