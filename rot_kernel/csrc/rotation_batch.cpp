// The rotation-batch operator: schema, argument checks shared by both devices, CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "rotation_batch.h"

namespace rot_kernel {

// ---------------------------------------------------------------- argument checks

static void check_rotations(at::IntArrayRef rotations, int64_t H, int64_t W, Params& p) {
  TORCH_CHECK_VALUE(!rotations.empty() && rotations.size() <= kMaxRotations,
                    "rotations: expected 1 to 8 angles, got ", rotations.size());
  for (size_t r = 0; r < rotations.size(); ++r) {
    const int64_t deg = rotations[r];
    TORCH_CHECK_VALUE(deg >= 0 && deg < 360 && deg % 45 == 0,
                      "rotations: every angle must be a multiple of 45 in [0, 360), got ", deg);
    for (size_t q = 0; q < r; ++q)
      TORCH_CHECK_VALUE(rotations[q] != deg, "rotations: angle ", deg, " appears twice");
    TORCH_CHECK_VALUE(deg % 180 == 0 || H == W, "rotations: a ", deg,
                      " degree turn needs square images, got ", H, "x", W);
    const double rad = deg * M_PI / 180.0;
    p.quarter[r] = deg % 90 == 0 ? static_cast<int>(deg / 90) : -1;
    p.cos_a[r] = static_cast<float>(std::cos(rad));
    p.sin_a[r] = static_cast<float>(std::sin(rad));
  }
  p.R = static_cast<int>(rotations.size());
}

static void check_normalisation(at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                int64_t C, Params& p) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(mean.size()) == C, "mean: expected ", C,
                    " values (one per channel), got ", mean.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(std.size()) == C, "std: expected ", C,
                    " values (one per channel), got ", std.size());
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK_VALUE(std::isfinite(mean[c]), "mean: values must be finite, got ", mean[c]);
    TORCH_CHECK_VALUE(std::isfinite(std[c]) && std[c] > 0,
                      "std: values must be finite and > 0, got ", std[c]);
    p.mean[c] = static_cast<float>(mean[c]);
    p.inv_std[c] = static_cast<float>(1.0 / std[c]);
  }
}

// A per-image tensor argument: on the images' device, of the right dtype and shape.
static at::Tensor per_image(const std::optional<at::Tensor>& t, const char* name,
                            const at::Tensor& images, bool integer, at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == images.device(), name, ": expected a tensor on ",
              images.device(), " (the images' device), got ", t->device());
  if (integer) {
    TORCH_CHECK_TYPE(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), name,
                     ": expected an integer tensor, got ", t->scalar_type());
  } else {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kBool, name, ": expected a bool tensor, got ",
                     t->scalar_type());
  }
  TORCH_CHECK_VALUE(t->sizes() == shape, name, ": expected shape ", shape, ", got ",
                    t->sizes());
  return integer ? t->to(at::kLong).contiguous() : t->contiguous();
}

Batch prepare_batch(const at::Tensor& images, const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& shifts,
                    const std::optional<at::Tensor>& flips, at::ArrayRef<double> mean,
                    at::ArrayRef<double> std, at::IntArrayRef rotations,
                    at::ScalarType out_dtype, bool channels_last) {
  TORCH_CHECK_VALUE(images.dim() == 4, "images: expected a 4-D tensor [N, C, H, W], got ",
                    images.dim(), " dimensions");
  TORCH_CHECK_TYPE(images.scalar_type() == at::kByte || images.scalar_type() == at::kFloat,
                   "images: expected uint8 or float32, got ", images.scalar_type());
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 ||
                       out_dtype == at::kHalf,
                   "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK_VALUE(C <= kMaxChannels, "images: at most ", kMaxChannels,
                    " channels are supported, got ", C);
  TORCH_CHECK_VALUE(H < (1 << 20) && W < (1 << 20), "images: ", H, "x", W, " is too large");

  Batch batch;
  Params& p = batch.p;
  p.C = static_cast<int>(C);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  check_rotations(rotations, H, W, p);
  check_normalisation(mean, std, C, p);

  if (index.has_value() && index->defined()) {
    TORCH_CHECK_VALUE(index->dim() == 1, "index: expected a 1-D tensor, got shape ",
                      index->sizes());
    batch.index = per_image(index, "index", images, true, {index->size(0)});
    if (batch.index.numel() > 0) {
      // One host round trip (a sync on CUDA): the alternative is reading out of bounds.
      const auto [lo_t, hi_t] = at::aminmax(batch.index);
      const at::Tensor range = at::stack({lo_t, hi_t}).cpu();
      const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
      TORCH_CHECK_INDEX(lo >= 0 && hi < N, "index: values must lie in [0, ", N, "), got ",
                        lo < 0 ? lo : hi);
    }
  }
  batch.B = batch.index.defined() ? batch.index.size(0) : N;
  batch.shifts = per_image(shifts, "shifts", images, true, {batch.B, 2});
  batch.flips = per_image(flips, "flips", images, false, {batch.B});

  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  batch.out = at::empty({batch.B * p.R, C, H, W},
                        images.options().dtype(out_dtype).memory_format(format));
  batch.labels = at::arange(p.R, images.options().dtype(at::kLong)).repeat({batch.B});
  return batch;
}

// ---------------------------------------------------------------- CPU kernel

// The shifted, flipped image as float planes [C][H][W], zeros outside.
template <typename in_t>
static void stage_view(const in_t* image, const at::Tensor& images, int64_t dy, int64_t dx,
                       bool flip, const Params& p, float* view) {
  const int64_t sC = images.stride(1), sH = images.stride(2), sW = images.stride(3);
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;
  for (int y = 0; y < p.H; ++y) {
    const ViewRow v = view_row(y, dy, dx, flip, p.H, p.W);
    const int64_t step = v.step * sW;
    for (int c = 0; c < p.C; ++c) {
      float* row = view + c * HW + static_cast<int64_t>(y) * p.W;
      std::fill(row, row + p.W, 0.f);
      if (v.x_lo == v.x_hi) continue;
      const in_t* src = image + c * sC + v.sy * sH + v.sx0 * sW;
      if (step == 1)  // the common layouts get loops the compiler vectorises
        for (int x = v.x_lo; x < v.x_hi; ++x) row[x] = static_cast<float>(src[x]);
      else if (step == -1)
        for (int x = v.x_lo; x < v.x_hi; ++x) row[x] = static_cast<float>(src[-x]);
      else
        for (int x = v.x_lo; x < v.x_hi; ++x) row[x] = static_cast<float>(src[x * step]);
    }
  }
}

// Each plane transposed, so that quarter turns by 90 and 270 degrees read rows, not columns.
// In 8x8 tiles: both sides of a tile stay in a few cache lines and the compiler unrolls it.
static void transpose_view(const float* view, const Params& p, float* transposed) {
  constexpr int T = 8;
  const int H = p.H, W = p.W;
  const int64_t HW = static_cast<int64_t>(H) * W;
  for (int c = 0; c < p.C; ++c) {
    const float* src = view + c * HW;
    float* dst = transposed + c * HW;
    for (int y0 = 0; y0 < H; y0 += T)
      for (int x0 = 0; x0 < W; x0 += T) {
        if (y0 + T <= H && x0 + T <= W) {
          for (int x = 0; x < T; ++x)
            for (int y = 0; y < T; ++y) dst[(x0 + x) * H + y0 + y] = src[(y0 + y) * W + x0 + x];
        } else {
          for (int x = x0; x < std::min(x0 + T, W); ++x)
            for (int y = y0; y < std::min(y0 + T, H); ++y) dst[x * H + y] = src[y * W + x];
        }
      }
  }
}

// How a float is stored as out_t. Both 16-bit types round to nearest even with integer
// ops and selects that the compiler vectorises (c10's scalar conversions do not), and give
// c10's bits for every float (a NaN becomes the canonical quiet NaN, with its sign).
template <typename out_t>
struct Store {
  using raw = out_t;
  static raw convert(float v) { return v; }
};

static inline int32_t float_bits(float v) {
  int32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

template <>
struct Store<at::BFloat16> {
  using raw = uint16_t;
  static raw convert(float v) {
    const int32_t u = float_bits(v), a = u & 0x7FFFFFFF;
    const int32_t rounded = static_cast<int32_t>(
        (static_cast<uint32_t>(u) + 0x7FFFu + ((static_cast<uint32_t>(u) >> 16) & 1u)) >> 16);
    return static_cast<uint16_t>(a > 0x7F800000 ? ((u >> 16) & 0x8000) | 0x7FC0 : rounded);
  }
};

template <>
struct Store<at::Half> {
  using raw = uint16_t;
  static raw convert(float v) {
    const int32_t u = float_bits(v), a = u & 0x7FFFFFFF, sign = (u >> 16) & 0x8000;
    // Normal halves: rebias the exponent (127 -> 15), round at mantissa bit 13; from
    // 65520 up this reaches 0x7C00 (infinity) and is clamped there.
    int32_t normal = (a - (112 << 23) + 0xFFF + ((a >> 13) & 1)) >> 13;
    normal = normal < 0x7C00 ? normal : 0x7C00;
    // Below 2^-14 halves are multiples of 2^-24: adding 0.5f rounds to exactly those.
    float tiny;
    std::memcpy(&tiny, &a, sizeof tiny);
    const int32_t subnormal = float_bits(tiny + 0.5f) - 0x3F000000;
    int32_t h = a < (113 << 23) ? subnormal : normal;
    h = a > 0x7F800000 ? 0x7E00 : h;
    return static_cast<uint16_t>(h | sign);
  }
};

// One output row: the normalised line into a float row (read in any direction), then
// stored as out_t by a forward loop. Two simple loops vectorise where one fused loop of a
// reversed read and a narrowing store does not.
template <typename out_t>
static void write_line(const float* src, int64_t step, int W, float m, float s, float* row,
                       out_t* out) {
  if constexpr (std::is_same_v<out_t, float>) row = out;
  if (step == 1)
    for (int j = 0; j < W; ++j) row[j] = (src[j] - m) * s;
  else if (step == -1)
    for (int j = 0; j < W; ++j) row[j] = (src[-j] - m) * s;
  else
    for (int j = 0; j < W; ++j) row[j] = (src[j * step] - m) * s;
  if constexpr (!std::is_same_v<out_t, float>) {  // a narrowing store
    using S = Store<out_t>;
    auto* dst = reinterpret_cast<typename S::raw*>(out);
    for (int j = 0; j < W; ++j) dst[j] = S::convert(row[j]);
  }
}

// Rotation r of the staged view (and its transpose, for quarter turns), normalised, into
// one output image.
template <typename out_t>
static void write_turn(const float* view, const float* transposed, const Params& p, int r,
                       bool channels_last, float* row, out_t* out) {
  const int C = p.C, H = p.H, W = p.W, k = p.quarter[r];
  const int64_t HW = static_cast<int64_t>(H) * W;
  if (k >= 0 && !channels_last) {
    // The hot path: every output row is a line of the view, read along a row of the view
    // or of its transpose, so all four quarter turns get unit-stride loops.
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < H; ++i) {
        const Line l = quarter_turn_row(k, i, H, W);
        const bool along_rows = l.sy == 0;
        const float* plane = (along_rows ? view : transposed) + c * HW;
        const int64_t start = along_rows ? static_cast<int64_t>(l.y0) * W + l.x0
                                         : static_cast<int64_t>(l.x0) * H + l.y0;
        write_line(plane + start, along_rows ? l.sx : l.sy, W, p.mean[c], p.inv_std[c], row,
                   out + c * HW + static_cast<int64_t>(i) * W);
      }
    return;
  }
  const auto load = [&](int c, int y, int x) { return view[c * HW + static_cast<int64_t>(y) * W + x]; };
  for (int i = 0; i < H; ++i)
    for (int j = 0; j < W; ++j)
      for (int c = 0; c < C; ++c) {
        const int64_t at = channels_last ? (static_cast<int64_t>(i) * W + j) * C + c
                                         : c * HW + static_cast<int64_t>(i) * W + j;
        out[at] = static_cast<out_t>((turned_value(p, r, c, i, j, load) - p.mean[c]) * p.inv_std[c]);
      }
}

template <typename in_t, typename out_t>
static void rotation_batch_cpu_kernel(const at::Tensor& images, Batch& batch, bool channels_last) {
  const Params& p = batch.p;
  const int64_t CHW = static_cast<int64_t>(p.C) * p.H * p.W;
  const in_t* data = images.data_ptr<in_t>();
  const int64_t* index = batch.index.defined() ? batch.index.data_ptr<int64_t>() : nullptr;
  const int64_t* shifts = batch.shifts.defined() ? batch.shifts.data_ptr<int64_t>() : nullptr;
  const bool* flips = batch.flips.defined() ? batch.flips.data_ptr<bool>() : nullptr;
  out_t* out = batch.out.data_ptr<out_t>();
  // At least ~64k output values per task, so small batches do not pay for threads.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, CHW * p.R));
  bool sideways = false;  // any turn by 90 or 270 degrees written from the transposed view
  for (int r = 0; r < p.R; ++r) sideways |= p.quarter[r] % 2 == 1 && !channels_last;
  at::parallel_for(0, batch.B, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> view(CHW), transposed(sideways ? CHW : 0), row(p.W);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = index ? index[b] : b;
      stage_view(data + n * images.stride(0), images, shifts ? shifts[2 * b] : 0,
                 shifts ? shifts[2 * b + 1] : 0, flips && flips[b], p, view.data());
      if (sideways) transpose_view(view.data(), p, transposed.data());
      for (int r = 0; r < p.R; ++r)
        write_turn(view.data(), transposed.data(), p, r, channels_last, row.data(),
                   out + (b * p.R + r) * CHW);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rotation_batch_cpu(
    const at::Tensor& images, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& shifts, const std::optional<at::Tensor>& flips,
    at::ArrayRef<double> mean, at::ArrayRef<double> std, at::IntArrayRef rotations,
    at::ScalarType out_dtype, bool channels_last) {
  Batch batch = prepare_batch(images, index, shifts, flips, mean, std, rotations, out_dtype,
                              channels_last);
  if (batch.out.numel() == 0) return {batch.out, batch.labels};
  dispatch_dtypes(images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    rotation_batch_cpu_kernel<decltype(in_tag), decltype(out_tag)>(images, batch, channels_last);
  });
  return {batch.out, batch.labels};
}

TORCH_LIBRARY(rot_kernel, m) {
  m.def(
      "rotation_batch(Tensor images, Tensor? index, Tensor? shifts, Tensor? flips, "
      "float[] mean, float[] std, int[] rotations, ScalarType out_dtype, bool channels_last) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rot_kernel, CPU, m) { m.impl("rotation_batch", &rotation_batch_cpu); }

}  // namespace rot_kernel

// Lets setup.py's build be imported as the module rot_kernel._C (which registers the op).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
