// The rotation-batch operator's per-pixel index math, shared by the CPU and CUDA kernels so
// that the CPU tests exercise exactly the mapping the GPU runs.
//
// For output image j = b*R + r (source image n = index[b]), pixel (c, i, k) of h x w:
//   x'              = flip ? w-1-x : x
//   view(c, y, x)   = image[n](c, y + dy, x' + dx), 0 outside the image            (shifts)
//                   = bilinear resize of image[n]'s box to h x w, at (y, x')         (boxes)
//   turned(c, i, k) = view at the source point of rotation r (quarter turn or bilinear)
//   out(c, i, k)    = (turned - mean[c]) * inv_std[c]
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

#ifdef __CUDACC__
#define ROT_HD __host__ __device__ __forceinline__
#define ROT_UNROLL _Pragma("unroll")
#else
#define ROT_HD inline
#define ROT_UNROLL  // the CPU emulation: g++ knows no `#pragma unroll`, and needs none
#endif

namespace rot_kernel {

constexpr int kMaxChannels = 64;  // mean/std travel by value in Params
constexpr int kMaxRotations = 8;  // unique multiples of 45 degrees

// Everything a kernel needs besides pointers; small enough to pass by value to a CUDA kernel.
struct Params {
  int64_t N;     // source images
  int C, H, W;   // source channels and size
  int h, w;      // output size (the view's): 1 <= h <= H, 1 <= w <= W
  int R;
  float mean[kMaxChannels];
  float inv_std[kMaxChannels];
  int quarter[kMaxRotations];  // 0..3 quarter turns, or -1: bilinear turn by (cos_a, sin_a)
  float cos_a[kMaxRotations];
  float sin_a[kMaxRotations];
};

// The per-image arguments in canonical form: int64 [B], int64 [B, 2], bool [B], int64 [B, 4]
// (top, left, height, width); null where absent.
struct PerImage {
  const int64_t* index;
  const int64_t* shifts;
  const bool* flips;
  const int64_t* boxes;
};

// Where output image b's h x w view comes from: source image n, either through the window
// at (dy, dx) (zeros outside the image) or resampled from its box (top, left, height,
// width); mirrored if flip.
struct ViewSource {
  int64_t n, dy, dx;
  bool flip, boxed;
  int top, left, height, width;
};

ROT_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The host checks index and boxes (always in the CPU op; on CUDA, and in its emulation, unless
// check_bounds=False).
// Unchecked values are clamped into range here, so that a wrong one gives a wrong batch,
// never a read out of bounds; checked values pass unchanged.
ROT_HD ViewSource view_source(const Params& p, const PerImage& per, int64_t b) {
  ViewSource s;
  s.n = per.index ? clamp64(per.index[b], 0, p.N - 1) : b;
  s.dy = per.shifts ? per.shifts[2 * b] : 0;
  s.dx = per.shifts ? per.shifts[2 * b + 1] : 0;
  s.flip = per.flips ? per.flips[b] : false;
  s.boxed = per.boxes != nullptr;
  s.top = s.left = 0;
  s.height = p.H;
  s.width = p.W;
  if (s.boxed) {
    const int64_t* box = per.boxes + 4 * b;
    s.height = static_cast<int>(clamp64(box[2], 1, p.H));
    s.width = static_cast<int>(clamp64(box[3], 1, p.W));
    s.top = static_cast<int>(clamp64(box[0], 0, p.H - s.height));
    s.left = static_cast<int>(clamp64(box[1], 0, p.W - s.width));
  }
  return s;
}

// Shifts: view row y is image row sy (zeros if that is outside) read at columns sx0 + x*step
// for x in [x_lo, x_hi), and zeros outside that range: the shift, then the mirror.
struct ViewRow {
  int64_t sy, sx0;
  int step, x_lo, x_hi;
};

ROT_HD ViewRow view_row(int y, int64_t dy, int64_t dx, bool flip, int H, int W, int w) {
  ViewRow v;
  v.sy = y + dy;
  v.step = flip ? -1 : 1;
  v.sx0 = flip ? w - 1 + dx : dx;
  // The first x whose column lies in the image; the next W are inside too.
  const int64_t first = flip ? w - W + dx : -dx;
  const auto clip = [w](int64_t x) { return static_cast<int>(x < 0 ? 0 : (x > w ? w : x)); };
  const bool inside = v.sy >= 0 && v.sy < H;
  v.x_lo = inside ? clip(first) : 0;
  v.x_hi = inside ? clip(first + W) : 0;
  return v;
}

// Boxes: one axis of PyTorch's bilinear resize (F.interpolate, align_corners=False, no
// antialias) of `in` pixels to `out`: output pixel dst reads input pixels i0 and i1 with
// weights l0 and l1. The source coordinate is (dst + 0.5) * in/out - 0.5, clamped below at 0;
// i1 is i0 + 1, or i0 at the last pixel: the border is replicated, nothing outside is read.
// The same float operations as PyTorch's CPU kernel, including its shortcut for in == out.
struct Tap {
  int i0, i1;
  float l0, l1;
};

ROT_HD Tap linear_tap(int dst, int in, int out) {
  Tap t;
  if (in == out) {
    t.i0 = t.i1 = dst;
    t.l0 = 1.f;
    t.l1 = 0.f;
    return t;
  }
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  const int i = static_cast<int>(floorf(src));
  t.i0 = i < in - 1 ? i : in - 1;
  const float l1 = src - static_cast<float>(t.i0);
  t.l1 = l1 < 0.f ? 0.f : (l1 > 1.f ? 1.f : l1);
  t.l0 = 1.f - t.l1;
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  return t;
}

// Mixes the four taps (rows ty.i0/i1, columns tx.i0/i1) in PyTorch's order: along the row
// first, then across the rows.
ROT_HD float bilinear_mix(const Tap& ty, const Tap& tx, float v00, float v01, float v10,
                          float v11) {
  return (v00 * tx.l0 + v01 * tx.l1) * ty.l0 + (v10 * tx.l0 + v11 * tx.l1) * ty.l1;
}

// View pixel (y, x) of one channel; load(sy, sx) reads an in-bounds source pixel.
template <typename Load>
ROT_HD float view_value(const Params& p, const ViewSource& s, int y, int x, const Load& load) {
  if (s.boxed) {
    const Tap ty = linear_tap(y, s.height, p.h);
    const Tap tx = linear_tap(s.flip ? p.w - 1 - x : x, s.width, p.w);
    const int64_t y0 = s.top + ty.i0, y1 = s.top + ty.i1;
    const int64_t x0 = s.left + tx.i0, x1 = s.left + tx.i1;
    return bilinear_mix(ty, tx, load(y0, x0), load(y0, x1), load(y1, x0), load(y1, x1));
  }
  const ViewRow v = view_row(y, s.dy, s.dx, s.flip, p.H, p.W, p.w);
  if (x < v.x_lo || x >= v.x_hi) return 0.f;
  return load(v.sy, v.sx0 + static_cast<int64_t>(x) * v.step);
}

// Row i of a quarter turn by k of an h x w view reads the view along a line: pixel j of the
// row is view(y0 + j*sy, x0 + j*sx). Equal to torch.rot90(view, k, dims=(-2, -1)); odd k
// need h == w.
struct Line {
  int y0, x0, sy, sx;
};

ROT_HD Line quarter_turn_row(int k, int i, int h, int w) {
  switch (k) {
    case 0: return {i, 0, 0, 1};
    case 1: return {0, w - 1 - i, 1, 0};
    case 2: return {h - 1 - i, w - 1, 0, -1};
    default: return {h - 1, i, -1, 0};
  }
}

// Source point of output pixel (i, j) for a counter-clockwise turn about the centre of a
// square S x S view: what affine_grid([[cos, -sin, 0], [sin, cos, 0]]) + grid_sample
// (align_corners=False) sample. At 90 degrees it is the quarter turn above.
ROT_HD void turned_point(float cos_a, float sin_a, int i, int j, int S, float& y, float& x) {
  const float mid = 0.5f * (S - 1);
  const float u = j - mid, v = i - mid;
  x = cos_a * u - sin_a * v + mid;
  y = sin_a * u + cos_a * v + mid;
}

// Bilinear sample at (y, x) of an h x w view with zeros outside, as grid_sample does;
// load(yy, xx) reads an in-bounds pixel.
template <typename Load>
ROT_HD float bilinear(float y, float x, int h, int w, const Load& load) {
  const float fy = floorf(y), fx = floorf(x);
  const int y0 = static_cast<int>(fy), x0 = static_cast<int>(fx);
  const float wy = y - fy, wx = x - fx;
  const bool row0 = y0 >= 0 && y0 < h, row1 = y0 + 1 >= 0 && y0 + 1 < h;
  const bool col0 = x0 >= 0 && x0 < w, col1 = x0 + 1 >= 0 && x0 + 1 < w;
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
    const Line l = quarter_turn_row(k, i, p.h, p.w);
    return load(c, l.y0 + j * l.sy, l.x0 + j * l.sx);
  }
  float y, x;
  turned_point(p.cos_a[r], p.sin_a[r], i, j, p.w, y, x);
  return bilinear(y, x, p.h, p.w, [&](int yy, int xx) { return load(c, yy, xx); });
}

// Host side, shared by both devices: validates the arguments (naming the one at fault),
// puts index/shifts/flips/boxes in canonical form and allocates the outputs.
struct Batch {
  Params p;
  int64_t B;
  // int64 [B], int64 [B, 2], bool [B], int64 [B, 4]; undefined if absent
  at::Tensor index, shifts, flips, boxes;
  at::Tensor out, labels;

  PerImage per() const {
    return {index.defined() ? index.data_ptr<int64_t>() : nullptr,
            shifts.defined() ? shifts.data_ptr<int64_t>() : nullptr,
            flips.defined() ? flips.data_ptr<bool>() : nullptr,
            boxes.defined() ? boxes.data_ptr<int64_t>() : nullptr};
  }
};

// check_bounds=false skips the range checks of index and boxes, which on CUDA cost a
// device-to-host sync (view_source clamps what is not checked). The CPU op checks anyway (it
// is free there, and a clear error beats a clamped batch); the emulation of the CUDA op does
// as the GPU does, so that its clamps are tested on the CPU too.
Batch prepare_batch(const at::Tensor& images, const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& shifts,
                    const std::optional<at::Tensor>& flips, at::ArrayRef<double> mean,
                    at::ArrayRef<double> std, at::IntArrayRef rotations,
                    at::ScalarType out_dtype, bool channels_last, at::OptionalIntArrayRef size,
                    const std::optional<at::Tensor>& boxes, bool check_bounds);

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
