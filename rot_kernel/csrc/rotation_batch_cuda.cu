// The rotation-batch operator on CUDA: launches of the block programs in cuda_blocks.h
// (which says what each does; emulated.cpp runs the same programs on the CPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
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

// The device's multiprocessors (a driver lookup, well under a microsecond).
int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// The dispatcher picks this kernel when any argument is on CUDA; the images must be, before
// a guard is made from their device (prepare_batch then checks every other argument).
c10::Device cuda_device_of(const at::Tensor& images) {
  TORCH_CHECK(images.is_cuda(), "images: expected a CUDA tensor, as another argument is, got ",
              images.device());
  return images.device();
}

struct Gpu {
  c10::cuda::CUDAGuard guard;
  int sms;
  cudaStream_t stream;

  explicit Gpu(const at::Tensor& images)
      : guard(cuda_device_of(images)),
        sms(multiprocessors(images.get_device())),
        stream(c10::cuda::getCurrentCUDAStream()) {}

  // Whether the stream is being captured into a CUDA graph (asked only where it matters). The
  // runtime's own call: torch's wrappers of it differ between versions (2.11 has no
  // captureStatusMayInitCtx).
  bool capturing() const {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    return status != cudaStreamCaptureStatusNone;
  }

  template <typename in_t, typename out_t, int VEC, bool CL>
  void staged(const Launch<in_t, out_t>& a, const Plan& plan) const {
    staged_kernel<in_t, out_t, VEC, CL><<<grid(plan), kThreads, bytes(plan), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename in_t, typename out_t, bool CL>
  void tiled(const Launch<in_t, out_t>& a, const Plan& plan) const {
    tiled_kernel<in_t, out_t, CL><<<grid(plan), kThreads, bytes(plan), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static dim3 grid(const Plan& plan) {
    return dim3(static_cast<unsigned>(plan.blocks_x), static_cast<unsigned>(plan.blocks_y));
  }
  static size_t bytes(const Plan& plan) { return static_cast<size_t>(plan.shared_bytes); }
};

}  // namespace

TORCH_LIBRARY_IMPL(rot_kernel, CUDA, m) {
  m.impl("rotation_batch", &rotation_batch_blocks<Gpu>);
}

}  // namespace rot_kernel
