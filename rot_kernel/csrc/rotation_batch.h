// The rotation-batch operator's per-pixel index math, shared by the CPU and CUDA kernels so
// that the CPU tests exercise exactly the mapping the GPU runs.
//
// For output image j = b*R + r, pixel (c, i, k):
//   view(c, y, x)   = image[index[b]](c, y + dy, (flip ? W-1-x : x) + dx), 0 outside the image
//   turned(c, i, k) = view at the source point of rotation r (quarter turn or bilinear)
//   out(c, i, k)    = (turned - mean[c]) * inv_std[c]
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

#ifdef __CUDACC__
#define ROT_HD __host__ __device__ __forceinline__
#else
#define ROT_HD inline
#endif

namespace rot_kernel {

constexpr int kMaxChannels = 64;  // mean/std travel by value in Params
constexpr int kMaxRotations = 8;  // unique multiples of 45 degrees

// Everything a kernel needs besides pointers; small enough to pass by value to a CUDA kernel.
struct Params {
  int C, H, W, R;
  float mean[kMaxChannels];
  float inv_std[kMaxChannels];
  int quarter[kMaxRotations];  // 0..3 quarter turns, or -1: bilinear turn by (cos_a, sin_a)
  float cos_a[kMaxRotations];
  float sin_a[kMaxRotations];
};

// View row y is image row sy (zeros if that is outside) read at columns sx0 + x*step for
// x in [x_lo, x_hi), and zeros outside that range: the shift, then the mirror.
struct ViewRow {
  int64_t sy, sx0;
  int step, x_lo, x_hi;
};

ROT_HD ViewRow view_row(int y, int64_t dy, int64_t dx, bool flip, int H, int W) {
  ViewRow v;
  v.sy = y + dy;
  v.step = flip ? -1 : 1;
  v.sx0 = flip ? W - 1 + dx : dx;
  const int64_t first = flip ? dx : -dx;  // the first x whose column lies in the image
  const auto clip = [W](int64_t x) { return static_cast<int>(x < 0 ? 0 : (x > W ? W : x)); };
  const bool inside = v.sy >= 0 && v.sy < H;
  v.x_lo = inside ? clip(first) : 0;
  v.x_hi = inside ? clip(first + W) : 0;
  return v;
}

// Row i of a quarter turn by k reads the view along a line: pixel j of the row is
// view(y0 + j*sy, x0 + j*sx). Equal to torch.rot90(view, k, dims=(-2, -1)).
struct Line {
  int y0, x0, sy, sx;
};

ROT_HD Line quarter_turn_row(int k, int i, int H, int W) {
  switch (k) {
    case 0: return {i, 0, 0, 1};
    case 1: return {0, W - 1 - i, 1, 0};
    case 2: return {H - 1 - i, W - 1, 0, -1};
    default: return {H - 1, i, -1, 0};
  }
}

// Source point of output pixel (i, j) for a counter-clockwise turn about the centre of a
// square S x S image: what affine_grid([[cos, -sin, 0], [sin, cos, 0]]) + grid_sample
// (align_corners=False) sample. At 90 degrees it is the quarter turn above.
ROT_HD void turned_point(float cos_a, float sin_a, int i, int j, int S, float& y, float& x) {
  const float mid = 0.5f * (S - 1);
  const float u = j - mid, v = i - mid;
  x = cos_a * u - sin_a * v + mid;
  y = sin_a * u + cos_a * v + mid;
}

// Bilinear sample at (y, x) with zeros outside, as grid_sample does; load(yy, xx) reads an
// in-bounds pixel.
template <typename Load>
ROT_HD float bilinear(float y, float x, int H, int W, const Load& load) {
  const float fy = floorf(y), fx = floorf(x);
  const int y0 = static_cast<int>(fy), x0 = static_cast<int>(fx);
  const float wy = y - fy, wx = x - fx;
  const bool row0 = y0 >= 0 && y0 < H, row1 = y0 + 1 >= 0 && y0 + 1 < H;
  const bool col0 = x0 >= 0 && x0 < W, col1 = x0 + 1 >= 0 && x0 + 1 < W;
  float acc = 0.f;
  if (row0 && col0) acc += (1.f - wy) * (1.f - wx) * load(y0, x0);
  if (row0 && col1) acc += (1.f - wy) * wx * load(y0, x0 + 1);
  if (row1 && col0) acc += wy * (1.f - wx) * load(y0 + 1, x0);
  if (row1 && col1) acc += wy * wx * load(y0 + 1, x0 + 1);
  return acc;
}

// Value of output pixel (c, i, j) of rotation r before normalisation; load(c, y, x) reads
// an in-bounds view pixel.
template <typename Load>
ROT_HD float turned_value(const Params& p, int r, int c, int i, int j, const Load& load) {
  const int k = p.quarter[r];
  if (k >= 0) {
    const Line l = quarter_turn_row(k, i, p.H, p.W);
    return load(c, l.y0 + j * l.sy, l.x0 + j * l.sx);
  }
  float y, x;
  turned_point(p.cos_a[r], p.sin_a[r], i, j, p.W, y, x);
  return bilinear(y, x, p.H, p.W, [&](int yy, int xx) { return load(c, yy, xx); });
}

// Host side, shared by both devices: validates the arguments (naming the one at fault),
// puts index/shifts/flips in canonical form and allocates the outputs.
struct Batch {
  Params p;
  int64_t B;
  at::Tensor index, shifts, flips;  // int64 [B], int64 [B, 2], bool [B]; undefined if absent
  at::Tensor out, labels;
};

Batch prepare_batch(const at::Tensor& images, const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& shifts,
                    const std::optional<at::Tensor>& flips, at::ArrayRef<double> mean,
                    at::ArrayRef<double> std, at::IntArrayRef rotations,
                    at::ScalarType out_dtype, bool channels_last);

// Calls f(in_t{}, out_t{}) with the C++ types of the images' and the output's dtypes.
template <typename F>
void dispatch_dtypes(at::ScalarType in, at::ScalarType out, const F& f) {
  const auto with_out = [&](auto in_tag) {
    switch (out) {
      case at::kFloat: return f(in_tag, float{});
      case at::kBFloat16: return f(in_tag, at::BFloat16{});
      default: return f(in_tag, at::Half{});
    }
  };
  if (in == at::kByte)
    with_out(uint8_t{});
  else
    with_out(float{});
}

}  // namespace rot_kernel
