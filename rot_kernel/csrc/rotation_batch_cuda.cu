// The rotation-batch operator on CUDA: a launch of one of the block programs in
// cuda_blocks.h (which says what each does; emulated.cpp runs the same programs on the CPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_blocks.h"

namespace rot_kernel {
namespace {

template <typename in_t, typename out_t, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads) staged_kernel(const Launch<in_t, out_t> a) {
  extern __shared__ float shared[];
  StagedBlock<in_t, out_t, VEC, CL> block(a, blockIdx.x, blockIdx.y, shared);
  block.stage(threadIdx.x, blockDim.x);
  __syncthreads();
  block.write(threadIdx.x, blockDim.x);
}

template <typename in_t, typename out_t, bool CL>
__global__ void __launch_bounds__(kThreads) tiled_kernel(const Launch<in_t, out_t> a) {
  extern __shared__ float shared[];
  TiledBlock<in_t, out_t, CL> block(a, blockIdx.x, blockIdx.y, shared);
  for (int c0 = 0; c0 < a.p.C; c0 += a.tl.chunk) {
    if (c0 > 0) __syncthreads();  // every thread is done reading the previous group's box
    block.stage(threadIdx.x, blockDim.x, c0);
    __syncthreads();
    block.write(threadIdx.x, blockDim.x, c0);
  }
}

template <typename in_t, typename out_t, bool CL>
void launch(const Launch<in_t, out_t>& a, const Plan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks_x), plan.blocks_y);
  const size_t bytes = static_cast<size_t>(plan.shared_bytes);
  constexpr int VEC = 16 / sizeof(out_t);
  if (!plan.staged)
    tiled_kernel<in_t, out_t, CL><<<grid, kThreads, bytes, stream>>>(a);
  else if (plan.vec == VEC)
    staged_kernel<in_t, out_t, VEC, CL><<<grid, kThreads, bytes, stream>>>(a);
  else
    staged_kernel<in_t, out_t, 1, CL><<<grid, kThreads, bytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The device's multiprocessors (a driver lookup, well under a microsecond).
int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

std::tuple<at::Tensor, at::Tensor> rotation_batch_cuda(
    const at::Tensor& images, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& shifts, const std::optional<at::Tensor>& flips,
    at::ArrayRef<double> mean, at::ArrayRef<double> std, at::IntArrayRef rotations,
    at::ScalarType out_dtype, bool channels_last, at::OptionalIntArrayRef size,
    const std::optional<at::Tensor>& boxes, bool check_bounds) {
  const c10::cuda::CUDAGuard guard(images.device());
  Batch batch = prepare_batch(images, index, shifts, flips, mean, std, rotations, out_dtype,
                              channels_last, size, boxes, check_bounds);
  if (batch.out.numel() == 0) return {batch.out, batch.labels};
  const int sms = multiprocessors(images.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtypes(images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    Launch<in_t, out_t> a = make_launch<in_t, out_t>(images, batch, channels_last);
    const Plan plan = plan_launch(a, sms);
    if (channels_last)
      launch<in_t, out_t, true>(a, plan, stream);
    else
      launch<in_t, out_t, false>(a, plan, stream);
  });
  return {batch.out, batch.labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(rot_kernel, CUDA, m) { m.impl("rotation_batch", &rotation_batch_cuda); }

}  // namespace rot_kernel
