// The rotation-batch operator on CUDA.
//
// Small outputs (CIFAR): one block per source image stages its h x w view (the shifted
// window or the resized box, flipped) in shared memory once, then writes all R turned,
// normalised outputs with coalesced 16-byte stores. Outputs too large for shared memory
// (224x224): one block per 32x32 output tile stages the part of the view that tile reads (a
// tile for quarter turns, its rotated bounding box for bilinear turns), read from global
// memory through the shared view_value (a box: a bilinear read of the source), then writes
// the tile.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rotation_batch.h"

namespace rot_kernel {
namespace {

constexpr int kThreads = 256;
// A block gets 48 KiB of shared memory without opting in; the staged kernel's own tables
// of mean and 1/std take part of it.
constexpr int kMaxStagedBytes = 48 * 1024 - 2 * kMaxChannels * sizeof(float);
constexpr int kTile = 32;  // output tile of the large-image path
constexpr int kBox = 52;   // staged box: a 32-tile turned by 45 deg spans at most 48

template <typename in_t>
struct Images {
  const in_t* data;
  int64_t sN, sC, sH, sW;
};

// View pixel (c, y, x) of one output image, read from global memory through the mapping
// the CPU kernel stages (view_value): the shifted window, 0 outside the image, or the
// bilinear resample of the box.
template <typename in_t>
__device__ __forceinline__ float load_view(const Images<in_t>& img, const Params& p,
                                           const ViewSource& s, int c, int y, int x) {
  const in_t* plane = img.data + s.n * img.sN + c * img.sC;
  return view_value(p, s, y, x, [&](int64_t sy, int64_t sx) {
    return static_cast<float>(plane[sy * img.sH + sx * img.sW]);
  });
}

// (c, i, j) of element e of one output image in its memory format.
__device__ __forceinline__ void unflatten(int64_t e, const Params& p, bool channels_last,
                                          int& c, int& i, int& j) {
  if (channels_last) {
    c = static_cast<int>(e % p.C);
    const int64_t pixel = e / p.C;
    j = static_cast<int>(pixel % p.w);
    i = static_cast<int>(pixel / p.w);
  } else {
    j = static_cast<int>(e % p.w);
    const int64_t row = e / p.w;
    i = static_cast<int>(row % p.h);
    c = static_cast<int>(row / p.h);
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One block per source image; VEC outputs per 16-byte store (1 when the output size does
// not divide).
template <typename in_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    staged_kernel(Images<in_t> img, PerImage per, Params p, bool channels_last, out_t* out) {
  extern __shared__ float view[];  // C planes of h rows with pitch w + 1: column reads of
                                   // 90/270-degree turns then fall in distinct banks
  __shared__ float mean[kMaxChannels], inv_std[kMaxChannels];
  const int64_t b = blockIdx.x;
  const ViewSource s = view_source(p, per, b);
  const int H = p.h, W = p.w, pitch = W + 1;  // the view's size
  const int64_t CHW = static_cast<int64_t>(p.C) * H * W;

  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    mean[c] = p.mean[c];
    inv_std[c] = p.inv_std[c];
  }
  for (int64_t e = threadIdx.x; e < CHW; e += blockDim.x) {
    const int x = static_cast<int>(e % W);
    const int64_t row = e / W;
    const int y = static_cast<int>(row % H), c = static_cast<int>(row / H);
    view[row * pitch + x] = load_view(img, p, s, c, y, x);
  }
  __syncthreads();

  const auto load = [&](int c, int y, int x) { return view[(c * H + y) * pitch + x]; };
  for (int r = 0; r < p.R; ++r) {
    auto* dst = reinterpret_cast<Pack<out_t, VEC>*>(out + (b * p.R + r) * CHW);
    for (int64_t v = threadIdx.x; v < CHW / VEC; v += blockDim.x) {
      Pack<out_t, VEC> pack;
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        int c, i, j;
        unflatten(v * VEC + u, p, channels_last, c, i, j);
        pack.v[u] = static_cast<out_t>((turned_value(p, r, c, i, j, load) - mean[c]) * inv_std[c]);
      }
      dst[v] = pack;
    }
  }
}

// Rows [y_lo, y_hi] and columns [x_lo, x_hi] of the view that output tile (ti, tj) of
// rotation r reads, clipped to the view.
__device__ void source_box(const Params& p, int r, int ti, int tj, int& y_lo, int& y_hi,
                           int& x_lo, int& x_hi) {
  const int i1 = min(ti + kTile, p.h) - 1, j1 = min(tj + kTile, p.w) - 1;
  float ylo = 1e30f, yhi = -1e30f, xlo = 1e30f, xhi = -1e30f;
  for (int corner = 0; corner < 4; ++corner) {
    const int i = corner & 1 ? i1 : ti, j = corner & 2 ? j1 : tj;
    float y, x;
    if (p.quarter[r] >= 0) {
      const Line l = quarter_turn_row(p.quarter[r], i, p.h, p.w);
      y = static_cast<float>(l.y0 + j * l.sy);
      x = static_cast<float>(l.x0 + j * l.sx);
    } else {
      turned_point(p.cos_a[r], p.sin_a[r], i, j, p.w, y, x);
    }
    ylo = fminf(ylo, y), yhi = fmaxf(yhi, y), xlo = fminf(xlo, x), xhi = fmaxf(xhi, x);
  }
  // Bilinear reads reach one pixel past the floor; one more each side absorbs rounding.
  y_lo = max(0, static_cast<int>(floorf(ylo)) - 1);
  x_lo = max(0, static_cast<int>(floorf(xlo)) - 1);
  y_hi = min(p.h - 1, static_cast<int>(floorf(yhi)) + 2);
  x_hi = min(p.w - 1, static_cast<int>(floorf(xhi)) + 2);
}

// Grid: (output image b*R + r, output tile, channel); block: kTile x 8 threads.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kTile * 8)
    tiled_kernel(Images<in_t> img, PerImage per, Params p, bool channels_last, out_t* out) {
  __shared__ float box[kBox][kBox + 1];
  const int64_t o = blockIdx.x;
  const int64_t b = o / p.R;
  const int r = static_cast<int>(o % p.R), c = blockIdx.z;
  const int tiles_w = (p.w + kTile - 1) / kTile;
  const int ti = (blockIdx.y / tiles_w) * kTile, tj = (blockIdx.y % tiles_w) * kTile;
  const ViewSource s = view_source(p, per, b);

  int y_lo, y_hi, x_lo, x_hi;
  source_box(p, r, ti, tj, y_lo, y_hi, x_lo, x_hi);
  for (int y = y_lo + threadIdx.y; y <= y_hi && y - y_lo < kBox; y += blockDim.y)
    for (int x = x_lo + threadIdx.x; x <= x_hi && x - x_lo < kBox; x += blockDim.x)
      box[y - y_lo][x - x_lo] = load_view(img, p, s, c, y, x);
  __syncthreads();

  const auto load = [&](int, int y, int x) { return box[y - y_lo][x - x_lo]; };
  const int j = tj + threadIdx.x;
  if (j >= p.w) return;
  const int64_t hw = static_cast<int64_t>(p.h) * p.w;
  out_t* dst = out + o * p.C * hw;
  for (int i = ti + threadIdx.y; i < min(ti + kTile, p.h); i += blockDim.y) {
    const float v = (turned_value(p, r, c, i, j, load) - p.mean[c]) * p.inv_std[c];
    const int64_t at = channels_last ? (static_cast<int64_t>(i) * p.w + j) * p.C + c
                                     : c * hw + static_cast<int64_t>(i) * p.w + j;
    dst[at] = static_cast<out_t>(v);
  }
}

template <typename in_t, typename out_t>
void launch(const at::Tensor& images, Batch& batch, bool channels_last) {
  const Params& p = batch.p;
  const Images<in_t> img{images.data_ptr<in_t>(), images.stride(0), images.stride(1),
                         images.stride(2), images.stride(3)};
  const PerImage per = batch.per();
  out_t* out = batch.out.data_ptr<out_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t CHW = static_cast<int64_t>(p.C) * p.h * p.w;  // one output image
  const int64_t staged_bytes = static_cast<int64_t>(p.C) * p.h * (p.w + 1) * sizeof(float);
  constexpr int VEC = 16 / sizeof(out_t);

  if (staged_bytes <= kMaxStagedBytes) {
    const dim3 grid(static_cast<unsigned>(batch.B));
    if (CHW % VEC == 0)
      staged_kernel<in_t, out_t, VEC><<<grid, kThreads, staged_bytes, stream>>>(img, per, p, channels_last, out);
    else
      staged_kernel<in_t, out_t, 1><<<grid, kThreads, staged_bytes, stream>>>(img, per, p, channels_last, out);
  } else {
    const int tiles = ((p.h + kTile - 1) / kTile) * ((p.w + kTile - 1) / kTile);
    TORCH_CHECK(tiles <= 65535, "size: ", p.h, "x", p.w, " is too large for the CUDA kernel");
    const dim3 grid(static_cast<unsigned>(batch.B * p.R), tiles, p.C);
    tiled_kernel<in_t, out_t><<<grid, dim3(kTile, 8), 0, stream>>>(img, per, p, channels_last, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(batch.B <= 0x7fffffff / batch.p.R, "index: at most 2^31 / R images per batch");
  if (batch.out.numel() == 0) return {batch.out, batch.labels};
  dispatch_dtypes(images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    launch<decltype(in_tag), decltype(out_tag)>(images, batch, channels_last);
  });
  return {batch.out, batch.labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(rot_kernel, CUDA, m) { m.impl("rotation_batch", &rotation_batch_cuda); }

}  // namespace rot_kernel
