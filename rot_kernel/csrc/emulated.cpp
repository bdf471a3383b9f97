// rotation_batch_emulated (test-only): the CUDA kernels' block programs (cuda_blocks.h) run on
// the CPU, block after block and, within a block, thread after thread for each phase between
// barriers. The same plan, the same 32-bit index math and the same float operations as on
// the GPU, so CI can check the GPU's mapping against the CPU kernel bit for bit; what only a
// GPU can check (the launch itself, races, the hardware's conversions) is left to the tests
// that run there.
//
// Shared memory is NaN before every block and fenced by NaN on both sides, so a read of an
// element no phase wrote, or a read outside the block's allocation, shows as NaN in the
// output.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cuda_blocks.h"

namespace rot_kernel {
namespace {

constexpr int kEmulatedSMs = 132;  // an H100's multiprocessors: decides the rotation groups
constexpr int64_t kFence = 4096;   // floats of NaN on each side of the block's shared memory

struct SharedMemory {
  std::vector<float> words;
  explicit SharedMemory(int64_t bytes) : words(bytes / sizeof(float) + 2 * kFence) {}
  float* fresh() {  // what a block starts with
    std::fill(words.begin(), words.end(), std::numeric_limits<float>::quiet_NaN());
    return words.data() + kFence;
  }
};

template <typename in_t, typename out_t, int VEC, bool CL>
void run_staged(const Launch<in_t, out_t>& a, const Plan& plan) {
  SharedMemory shared(plan.shared_bytes);
  for (int64_t x = 0; x < plan.blocks_x; ++x)
    for (int y = 0; y < plan.blocks_y; ++y) {
      StagedBlock<in_t, out_t, VEC, CL> block(a, x, y, shared.fresh());
      for (int t = 0; t < kThreads; ++t) block.stage(t, kThreads);
      for (int t = 0; t < kThreads; ++t) block.write(t, kThreads);  // after __syncthreads()
    }
}

template <typename in_t, typename out_t, bool CL>
void run_tiled(const Launch<in_t, out_t>& a, const Plan& plan) {
  SharedMemory shared(plan.shared_bytes);
  for (int64_t x = 0; x < plan.blocks_x; ++x)
    for (int y = 0; y < plan.blocks_y; ++y) {
      TiledBlock<in_t, out_t, CL> block(a, x, y, shared.fresh());
      for (int c0 = 0; c0 < a.p.C; c0 += a.tl.chunk) {
        for (int t = 0; t < kThreads; ++t) block.stage(t, kThreads, c0);
        for (int t = 0; t < kThreads; ++t) block.write(t, kThreads, c0);
      }
    }
}

template <typename in_t, typename out_t, bool CL>
void run(const Launch<in_t, out_t>& a, const Plan& plan) {
  constexpr int VEC = 16 / sizeof(out_t);
  if (!plan.staged)
    run_tiled<in_t, out_t, CL>(a, plan);
  else if (plan.vec == VEC)
    run_staged<in_t, out_t, VEC, CL>(a, plan);
  else
    run_staged<in_t, out_t, 1, CL>(a, plan);
}

std::tuple<at::Tensor, at::Tensor> rotation_batch_emulated(
    const at::Tensor& images, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& shifts, const std::optional<at::Tensor>& flips,
    at::ArrayRef<double> mean, at::ArrayRef<double> std, at::IntArrayRef rotations,
    at::ScalarType out_dtype, bool channels_last, at::OptionalIntArrayRef size,
    const std::optional<at::Tensor>& boxes, bool check_bounds) {
  Batch batch = prepare_batch(images, index, shifts, flips, mean, std, rotations, out_dtype,
                              channels_last, size, boxes, check_bounds);
  if (batch.out.numel() == 0) return {batch.out, batch.labels};
  batch.labels.fill_(-1);  // the blocks must write every label
  dispatch_dtypes(images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    Launch<in_t, out_t> a = make_launch<in_t, out_t>(images, batch, channels_last);
    const Plan plan = plan_launch(a, kEmulatedSMs);
    if (channels_last)
      run<in_t, out_t, true>(a, plan);
    else
      run<in_t, out_t, false>(a, plan);
  });
  return {batch.out, batch.labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(rot_kernel, CPU, m) {
  m.impl("rotation_batch_emulated", &rotation_batch_emulated);
}

}  // namespace rot_kernel
