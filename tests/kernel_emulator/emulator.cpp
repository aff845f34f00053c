// CPU emulator of the kernels in kernels/fused.cu (tests/kernels.rs builds it as a shared
// library and runs the launch plans of src/model/kernels.rs through `emu_launch`).
//
// A launch of `grid` blocks of `block` threads starts `block` OS threads; they run the blocks one
// after another, meeting at a barrier at every __syncthreads and at the end of each block.
#include "emulate.h"

#include "../../kernels/fused.cu"

#include <barrier>
#include <cstdio>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
dim3 block_dim;
dim3 grid_dim;
thread_local std::barrier<> *block_barrier = nullptr;
void sync_threads() { block_barrier->arrive_and_wait(); }
}  // namespace emu

namespace {

using Kernel = std::function<void(void **)>;

// Calls `f` with its arguments read from `params` as cuLaunchKernel does: params[i] points at
// the i-th argument's value.
template <typename... Args, std::size_t... I>
void invoke(void (*f)(Args...), void **params, std::index_sequence<I...>) {
  f(*static_cast<Args *>(params[I])...);
}

template <typename... Args>
Kernel bind(void (*f)(Args...)) {
  return [f](void **params) { invoke(f, params, std::index_sequence_for<Args...>{}); };
}

#define ENTRY(name) {#name, bind(name)}
#define ENTRIES(SUFFIX)                                                                 \
  ENTRY(rms_norm_##SUFFIX), ENTRY(rms_norm_backward_rows_##SUFFIX),                     \
      ENTRY(rms_norm_weight_grad_##SUFFIX), ENTRY(rope_##SUFFIX), ENTRY(softmax_##SUFFIX), \
      ENTRY(attention_softmax_##SUFFIX), ENTRY(softmax_backward_##SUFFIX),                 \
      ENTRY(logprob_grad_##SUFFIX)

const std::map<std::string, Kernel> &kernels() {
  static const std::map<std::string, Kernel> table = {ENTRIES(f32), ENTRIES(bf16),
                                                      ENTRY(log_softmax_gather_f32)};
  return table;
}

}  // namespace

// Runs kernel `name` on a grid of `grid` blocks of `block` threads. Returns 0, or 1 with a
// message in `error` (`error_len` bytes). One launch at a time (the grid's dimensions and the
// kernels' shared memory are process-wide).
extern "C" int emu_launch(const char *name, unsigned grid, unsigned block, void **params,
                          char *error, std::size_t error_len) {
  static std::mutex one_launch_at_a_time;
  const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  const auto found = kernels().find(name);
  if (found == kernels().end()) {
    std::snprintf(error, error_len, "no kernel named %s", name);
    return 1;
  }
  if (block == 0 || block > BLOCK_MAX || (block & (block - 1)) != 0 || grid == 0) {
    std::snprintf(error, error_len, "%s: bad launch of %u blocks of %u threads", name, grid,
                  block);
    return 1;
  }
  const Kernel &kernel = found->second;
  emu::block_dim = {block, 1, 1};
  emu::grid_dim = {grid, 1, 1};
  std::barrier<> barrier(block);
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      emu::thread_idx = {t, 0, 0};
      emu::block_barrier = &barrier;
      for (unsigned b = 0; b < grid; ++b) {
        emu::block_idx = {b, 0, 0};
        kernel(params);
        barrier.arrive_and_wait();  // the block ends before the next one reuses shared memory
      }
    });
  }
  for (auto &thread : threads) thread.join();
  return 0;
}
