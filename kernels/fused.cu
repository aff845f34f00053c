// CUDA kernels of grpo's fused ops (src/model/fused.rs), forward and backward.
//
// Each op's launch (grid, block, arguments in this order, scratch buffers) is described once,
// in src/model/kernels.rs, for both executors of these kernels: the CUDA one (src/model/kernels.rs,
// `--features cuda`, this file compiled to PTX by build.rs) and the CPU emulator of the tests
// (tests/kernel_emulator/, which compiles this very file as C++ and runs every block's threads
// with a barrier for __syncthreads), so the kernels' indexing and reductions are checked against
// the CPU ops on machines without a GPU.
//
// Rules that keep both executors valid:
// - every kernel with __syncthreads (the block reductions) is launched with a power-of-two
//   block of at most BLOCK_MAX threads, and no thread leaves it early;
// - shared memory is static (`__shared__` arrays in the kernel entries);
// - no warp intrinsics; sums over a row are in a fixed order (deterministic results);
// - everything accumulates in f32; T (f32 or bf16) is only the storage type.

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <stdint.h>
#include <cmath>
#endif

#define BLOCK_MAX 1024

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// The sum of `v` over the threads of the block, returned to every thread. Tree order: the result
// does not depend on timing. `shared` holds BLOCK_MAX floats.
__device__ float block_sum(float v, float *shared) {
  const unsigned t = threadIdx.x;
  shared[t] = v;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) shared[t] += shared[t + stride];
    __syncthreads();
  }
  const float total = shared[0];
  __syncthreads();  // everyone has read shared[0] before it is reused
  return total;
}

// The maximum of `v` over the threads of the block, returned to every thread.
__device__ float block_max(float v, float *shared) {
  const unsigned t = threadIdx.x;
  shared[t] = v;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) shared[t] = fmaxf(shared[t], shared[t + stride]);
    __syncthreads();
  }
  const float best = shared[0];
  __syncthreads();
  return best;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: out = w * x / sqrt(mean(x^2) + eps), one block per row.
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ void rms_norm(const T *x, const T *w, T *out, int width, float eps, float *shared) {
  const size_t at = (size_t)blockIdx.x * width;
  float squares = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float v = to_f32(x[at + i]);
    squares += v * v;
  }
  const float r = 1.0f / sqrtf(block_sum(squares, shared) / width + eps);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    out[at + i] = from_f32<T>(to_f32(w[i]) * (to_f32(x[at + i]) * r));
  }
}

// The gradients of rms_norm for the rows [blockIdx.x * rows_per_block, +rows_per_block):
//   dx = r * (g*w - n * mean(g*w*n)),  r = 1/sqrt(mean(x^2) + eps),  n = x * r,
// and this block's share of dw = sum over rows of g*n, written to dw_partial[blockIdx.x] (each
// thread owns the columns i = threadIdx.x + k * blockDim.x, so no two threads touch one entry).
template <typename T>
__device__ void rms_norm_backward_rows(const T *x, const T *w, const T *g, T *dx,
                                       float *dw_partial, int rows, int width, float eps,
                                       int rows_per_block, float *shared) {
  float *partial = dw_partial + (size_t)blockIdx.x * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) partial[i] = 0.0f;
  const int first = blockIdx.x * rows_per_block;
  const int last = min(rows, first + rows_per_block);
  for (int row = first; row < last; ++row) {
    const size_t at = (size_t)row * width;
    float squares = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
      const float v = to_f32(x[at + i]);
      squares += v * v;
      dot += to_f32(g[at + i]) * to_f32(w[i]) * v;
    }
    const float r = 1.0f / sqrtf(block_sum(squares, shared) / width + eps);
    const float projection = block_sum(dot, shared) * r / width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
      const float n = to_f32(x[at + i]) * r;
      const float grad = to_f32(g[at + i]);
      dx[at + i] = from_f32<T>(r * (grad * to_f32(w[i]) - n * projection));
      partial[i] += grad * n;
    }
  }
}

// dw[i] = sum over blocks of dw_partial[block][i], blocks in order; one thread per column.
template <typename T>
__device__ void rms_norm_weight_grad(const float *dw_partial, T *dw, int blocks, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= width) return;
  float total = 0.0f;
  for (int b = 0; b < blocks; ++b) total += dw_partial[(size_t)b * width + i];
  dw[i] = from_f32<T>(total);
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding of x [b, heads, t, d] with tables [b, 1, t, d], one thread per pair (i, i+d/2):
//   forward: o1 = x1*c1 - x2*s1,  o2 = x2*c2 + x1*s2
//   adjoint (its gradient): o1 = x1*c1 + x2*s2,  o2 = x2*c2 - x1*s1
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *out, int pairs, int heads, int t,
                     int d, int adjoint) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= pairs) return;
  const int half = d / 2;
  const int i = index % half;
  const int row = index / half;  // (batch, head, position)
  const int position = row % t;
  const int batch = row / (t * heads);
  const size_t at = (size_t)row * d;
  const size_t table = ((size_t)batch * t + position) * d;
  const float x1 = to_f32(x[at + i]), x2 = to_f32(x[at + i + half]);
  const float c1 = to_f32(cos[table + i]), c2 = to_f32(cos[table + i + half]);
  const float s1 = to_f32(sin[table + i]), s2 = to_f32(sin[table + i + half]);
  if (adjoint) {
    out[at + i] = from_f32<T>(x1 * c1 + x2 * s2);
    out[at + i + half] = from_f32<T>(x2 * c2 - x1 * s1);
  } else {
    out[at + i] = from_f32<T>(x1 * c1 - x2 * s1);
    out[at + i + half] = from_f32<T>(x2 * c2 + x1 * s2);
  }
}

// ---------------------------------------------------------------------------------------------
// Softmax over rows of `width`, of x * scale (+ bias), one block per row. With a bias
// [items, 1, t, width], row r of the scores gets bias row (r / rows_per_item) * t +
// (r % rows_per_item) % t (the attention softmax: blocks of t query rows per head).
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ void softmax(const T *x, const T *bias, T *out, int width, int rows_per_item, int t,
                        float scale, float *shared) {
  const size_t r = blockIdx.x;
  const size_t at = r * width;
  const T *b = bias ? bias + ((r / rows_per_item) * t + (r % rows_per_item) % t) * width : 0;
  float best = -INFINITY;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float v = to_f32(x[at + i]) * scale + (b ? to_f32(b[i]) : 0.0f);
    best = fmaxf(best, v);
  }
  best = block_max(best, shared);
  float total = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float v = to_f32(x[at + i]) * scale + (b ? to_f32(b[i]) : 0.0f);
    total += expf(v - best);
  }
  const float inverse = 1.0f / block_sum(total, shared);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float v = to_f32(x[at + i]) * scale + (b ? to_f32(b[i]) : 0.0f);
    out[at + i] = from_f32<T>(expf(v - best) * inverse);
  }
}

// The gradient of softmax (times `scale`): dx = scale * y * (g - sum(g * y)), one block per row.
template <typename T>
__device__ void softmax_backward(const T *g, const T *y, T *out, int width, float scale,
                                 float *shared) {
  const size_t at = (size_t)blockIdx.x * width;
  float dot = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    dot += to_f32(g[at + i]) * to_f32(y[at + i]);
  }
  dot = block_sum(dot, shared);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    out[at + i] = from_f32<T>(scale * to_f32(y[at + i]) * (to_f32(g[at + i]) - dot));
  }
}

// ---------------------------------------------------------------------------------------------
// Per-token log-probs at a temperature T from f32 logits [rows, vocab], one block per row:
// with z = logits * (1/T) and Z = logsumexp(z), out[row] = (z[target] - Z, entropy, Z), the
// entropy -sum p log p = log S - sum(e * (z - max)) / S with e = exp(z - max), S = sum e.
// ---------------------------------------------------------------------------------------------

__device__ void log_softmax_gather(const float *logits, const uint32_t *targets, float *out,
                                   int vocab, float inv_temperature, float *shared) {
  const size_t r = blockIdx.x;
  const float *row = logits + r * vocab;
  float best = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) best = fmaxf(best, row[i] * inv_temperature);
  best = block_max(best, shared);
  float total = 0.0f, weighted = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float shifted = row[i] * inv_temperature - best;
    const float e = expf(shifted);
    total += e;
    weighted += e * shifted;
  }
  total = block_sum(total, shared);
  weighted = block_sum(weighted, shared);
  if (threadIdx.x == 0) {
    // (z - max) - log(sum), as log_softmax computes it.
    const float log_total = logf(total);
    out[3 * r] = (row[targets[r]] * inv_temperature - best) - log_total;
    out[3 * r + 1] = log_total - weighted / total;
    out[3 * r + 2] = best + log_total;
  }
}

// The gradient of those log-probs with respect to the logits, one thread per element:
// (onehot(target) - softmax(z)) * scale with softmax(z) = exp(z - Z); stats[row] = (Z, scale),
// scale being the upstream gradient divided by T.
template <typename T>
__device__ void logprob_grad(const float *logits, const uint32_t *targets, const float *stats,
                             T *out, int rows, int vocab, float inv_temperature) {
  const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (size_t)rows * vocab) return;
  const size_t r = index / vocab;
  const uint32_t column = (uint32_t)(index % vocab);
  const float p = expf(logits[index] * inv_temperature - stats[2 * r]);
  const float onehot = column == targets[r] ? 1.0f : 0.0f;
  out[index] = from_f32<T>((onehot - p) * stats[2 * r + 1]);
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per op and storage type: NAME_f32 and NAME_bf16 (candle's dtype names).
// ---------------------------------------------------------------------------------------------

#define FUSED_ENTRIES(T, SUFFIX)                                                                \
  extern "C" __global__ void rms_norm_##SUFFIX(const T *x, const T *w, T *out, int width,       \
                                               float eps) {                                     \
    __shared__ float shared[BLOCK_MAX];                                                         \
    rms_norm<T>(x, w, out, width, eps, shared);                                                 \
  }                                                                                             \
  extern "C" __global__ void rms_norm_backward_rows_##SUFFIX(                                   \
      const T *x, const T *w, const T *g, T *dx, float *dw_partial, int rows, int width,        \
      float eps, int rows_per_block) {                                                          \
    __shared__ float shared[BLOCK_MAX];                                                         \
    rms_norm_backward_rows<T>(x, w, g, dx, dw_partial, rows, width, eps, rows_per_block,        \
                              shared);                                                          \
  }                                                                                             \
  extern "C" __global__ void rms_norm_weight_grad_##SUFFIX(const float *dw_partial, T *dw,      \
                                                           int blocks, int width) {             \
    rms_norm_weight_grad<T>(dw_partial, dw, blocks, width);                                     \
  }                                                                                             \
  extern "C" __global__ void rope_##SUFFIX(const T *x, const T *cos, const T *sin, T *out,      \
                                           int pairs, int heads, int t, int d, int adjoint) {   \
    rope<T>(x, cos, sin, out, pairs, heads, t, d, adjoint);                                     \
  }                                                                                             \
  extern "C" __global__ void softmax_##SUFFIX(const T *x, T *out, int width) {                  \
    __shared__ float shared[BLOCK_MAX];                                                         \
    softmax<T>(x, 0, out, width, 1, 1, 1.0f, shared);                                           \
  }                                                                                             \
  extern "C" __global__ void attention_softmax_##SUFFIX(const T *x, const T *bias, T *out,      \
                                                        int width, int rows_per_item, int t,    \
                                                        float scale) {                          \
    __shared__ float shared[BLOCK_MAX];                                                         \
    softmax<T>(x, bias, out, width, rows_per_item, t, scale, shared);                           \
  }                                                                                             \
  extern "C" __global__ void softmax_backward_##SUFFIX(const T *g, const T *y, T *out,          \
                                                       int width, float scale) {                \
    __shared__ float shared[BLOCK_MAX];                                                         \
    softmax_backward<T>(g, y, out, width, scale, shared);                                       \
  }                                                                                             \
  extern "C" __global__ void logprob_grad_##SUFFIX(const float *logits, const uint32_t *targets, \
                                                   const float *stats, T *out, int rows,        \
                                                   int vocab, float inv_temperature) {          \
    logprob_grad<T>(logits, targets, stats, out, rows, vocab, inv_temperature);                 \
  }

FUSED_ENTRIES(float, f32)
FUSED_ENTRIES(__nv_bfloat16, bf16)

// The log-probs read f32 logits and write f32 results, whatever the compute dtype.
extern "C" __global__ void log_softmax_gather_f32(const float *logits, const uint32_t *targets,
                                                  float *out, int vocab, float inv_temperature) {
  __shared__ float shared[BLOCK_MAX];
  log_softmax_gather(logits, targets, out, vocab, inv_temperature, shared);
}
