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

static void check_rotations(at::IntArrayRef rotations, int64_t h, int64_t w, Params& p) {
  TORCH_CHECK_VALUE(!rotations.empty() && rotations.size() <= kMaxRotations,
                    "rotations: expected 1 to ", kMaxRotations, " angles, got ", rotations.size());
  for (size_t r = 0; r < rotations.size(); ++r) {
    const int64_t deg = rotations[r];
    TORCH_CHECK_VALUE(deg >= 0 && deg < 360 && deg % 45 == 0,
                      "rotations: every angle must be a multiple of 45 in [0, 360), got ", deg);
    for (size_t q = 0; q < r; ++q)
      TORCH_CHECK_VALUE(rotations[q] != deg, "rotations: angle ", deg, " appears twice");
    TORCH_CHECK_VALUE(deg % 180 == 0 || h == w, "rotations: a ", deg,
                      " degree turn needs a square output, got ", h, "x", w);
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

// Index values in [0, N) and boxes inside the H x W images: one host round trip (a sync on
// CUDA) for both, the alternative being reads out of bounds.
static void check_ranges(const Batch& batch, int64_t N, int64_t H, int64_t W) {
  std::vector<at::Tensor> parts;
  if (batch.index.defined()) {
    const auto [lo, hi] = at::aminmax(batch.index);
    parts.insert(parts.end(), {lo, hi});
  }
  at::Tensor bad;
  if (batch.boxes.defined()) {
    const auto box = batch.boxes.unbind(1);  // top, left, height, width
    bad = box[0].lt(0) | box[1].lt(0) | box[2].lt(1) | box[3].lt(1) |
          box[0].gt(H - box[2]) | box[1].gt(W - box[3]);
    parts.push_back(bad.to(at::kLong).argmax());  // the first bad box (0 if none)
    parts.push_back(bad.any().to(at::kLong));
  }
  const at::Tensor got = at::stack(parts).cpu();
  const int64_t* v = got.data_ptr<int64_t>();
  if (batch.index.defined())
    TORCH_CHECK_INDEX(v[0] >= 0 && v[1] < N, "index: values must lie in [0, ", N, "), got ",
                      v[0] < 0 ? v[0] : v[1]);
  if (batch.boxes.defined() && v[parts.size() - 1]) {
    const int64_t b = v[parts.size() - 2];
    const at::Tensor row = batch.boxes[b].cpu();
    const int64_t* x = row.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(false, "boxes: box ", b, " (top, left, height, width) = (", x[0], ", ",
                      x[1], ", ", x[2], ", ", x[3], ") is empty or not inside the ", H, "x", W,
                      " images");
  }
}

Batch prepare_batch(const at::Tensor& images, const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& shifts,
                    const std::optional<at::Tensor>& flips, at::ArrayRef<double> mean,
                    at::ArrayRef<double> std, at::IntArrayRef rotations,
                    at::ScalarType out_dtype, bool channels_last, at::OptionalIntArrayRef size,
                    const std::optional<at::Tensor>& boxes, bool check_bounds) {
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
  int64_t h = H, w = W;
  if (size.has_value()) {
    TORCH_CHECK_VALUE(size->size() == 2 && (*size)[0] >= 1 && (*size)[1] >= 1,
                      "size: expected two positive ints (h, w), got ", *size);
    h = (*size)[0];
    w = (*size)[1];
    TORCH_CHECK_VALUE(h <= H && w <= W, "size: ", h, "x", w, " is larger than the images' ",
                      H, "x", W);
  }

  Batch batch;
  Params& p = batch.p;
  p.N = N;
  p.C = static_cast<int>(C);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.h = static_cast<int>(h);
  p.w = static_cast<int>(w);
  check_rotations(rotations, h, w, p);
  check_normalisation(mean, std, C, p);

  if (index.has_value() && index->defined()) {
    TORCH_CHECK_VALUE(index->dim() == 1, "index: expected a 1-D tensor, got shape ",
                      index->sizes());
    batch.index = per_image(index, "index", images, true, {index->size(0)});
    TORCH_CHECK_INDEX(N > 0 || batch.index.numel() == 0,
                      "index: values must lie in [0, 0): the images are empty");
  }
  batch.B = batch.index.defined() ? batch.index.size(0) : N;
  batch.shifts = per_image(shifts, "shifts", images, true, {batch.B, 2});
  batch.flips = per_image(flips, "flips", images, false, {batch.B});
  batch.boxes = per_image(boxes, "boxes", images, true, {batch.B, 4});
  TORCH_CHECK_VALUE(!(batch.boxes.defined() && batch.shifts.defined()),
                    "boxes and shifts: give one or the other (a box is resampled to the "
                    "output size, a shift moves a window of that size)");
  if (check_bounds && batch.B > 0 && (batch.index.defined() || batch.boxes.defined()))
    check_ranges(batch, N, H, W);

  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  batch.out = at::empty({batch.B * p.R, C, h, w},
                        images.options().dtype(out_dtype).memory_format(format));
  // The kernels write the labels (output b*R + r has label r) next to the batch.
  batch.labels = batch.out.numel() == 0
                     ? at::arange(p.R, images.options().dtype(at::kLong)).repeat({batch.B})
                     : at::empty({batch.B * p.R}, images.options().dtype(at::kLong));
  return batch;
}

// ---------------------------------------------------------------- CPU kernel

// The h x w view of one source image as float planes [C][h][w]: the shifted window (zeros
// outside the image) or the resampled box, then mirrored. The same mapping as view_value,
// with the per-row and per-column work hoisted out of the pixel loops.
template <typename in_t>
static void stage_view(const in_t* image, const at::Tensor& images, const ViewSource& s,
                       const Params& p, Tap* column_taps, float* view) {
  const int64_t sC = images.stride(1), sH = images.stride(2), sW = images.stride(3);
  const int h = p.h, w = p.w;
  const int64_t hw = static_cast<int64_t>(h) * w;
  if (s.boxed) {
    for (int x = 0; x < w; ++x) column_taps[x] = linear_tap(s.flip ? w - 1 - x : x, s.width, w);
    for (int y = 0; y < h; ++y) {
      const Tap ty = linear_tap(y, s.height, h);
      for (int c = 0; c < p.C; ++c) {
        const in_t* plane = image + c * sC + s.left * sW;
        const in_t* row0 = plane + (s.top + ty.i0) * sH;
        const in_t* row1 = plane + (s.top + ty.i1) * sH;
        float* row = view + c * hw + static_cast<int64_t>(y) * w;
        for (int x = 0; x < w; ++x) {
          const Tap& tx = column_taps[x];
          const int64_t x0 = tx.i0 * sW, x1 = tx.i1 * sW;
          row[x] = bilinear_mix(ty, tx, static_cast<float>(row0[x0]), static_cast<float>(row0[x1]),
                                static_cast<float>(row1[x0]), static_cast<float>(row1[x1]));
        }
      }
    }
    return;
  }
  for (int y = 0; y < h; ++y) {
    const ViewRow v = view_row(y, s.dy, s.dx, s.flip, p.H, p.W, w);
    const int64_t step = v.step * sW;
    for (int c = 0; c < p.C; ++c) {
      float* row = view + c * hw + static_cast<int64_t>(y) * w;
      std::fill(row, row + w, 0.f);
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
  const int H = p.h, W = p.w;  // the view's size
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
// c10's bits for every number. A NaN stays a NaN, but its bits are not part of the contract:
// here the canonical quiet NaN with its sign, on the GPU what cvt.rn gives (0x7FFF), so the
// tests compare NaNs by position.
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

// A row of floats stored as out_t (for float, the row is the output already).
template <typename out_t>
static void store_row(const float* row, int64_t n, out_t* out) {
  if constexpr (!std::is_same_v<out_t, float>) {  // a narrowing store
    using S = Store<out_t>;
    auto* dst = reinterpret_cast<typename S::raw*>(out);
    for (int64_t j = 0; j < n; ++j) dst[j] = S::convert(row[j]);
  }
}

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
  store_row(row, W, out);
}

// Rotation r of the staged view (and its transpose, for quarter turns), normalised, into
// one output image.
template <typename out_t>
static void write_turn(const float* view, const float* transposed, const Params& p, int r,
                       bool channels_last, float* row, out_t* out) {
  const int C = p.C, H = p.h, W = p.w, k = p.quarter[r];  // the output's size
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
  if (k >= 0) {
    // Quarter turns into channels_last: an output row is a line of the view, its pixels'
    // channels interleaved.
    for (int i = 0; i < H; ++i) {
      const Line l = quarter_turn_row(k, i, H, W);
      const float* src = view + static_cast<int64_t>(l.y0) * W + l.x0;
      const int64_t step = static_cast<int64_t>(l.sy) * W + l.sx;
      out_t* dst = out + static_cast<int64_t>(i) * W * C;
      float* line = row;
      if constexpr (std::is_same_v<out_t, float>) line = dst;
      for (int c = 0; c < C; ++c) {
        const float m = p.mean[c], s = p.inv_std[c];
        for (int j = 0; j < W; ++j) line[j * C + c] = (src[c * HW + j * step] - m) * s;
      }
      store_row(line, static_cast<int64_t>(W) * C, dst);
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
  const int64_t chw = static_cast<int64_t>(p.C) * p.h * p.w;  // one output image
  const in_t* data = images.data_ptr<in_t>();
  const PerImage per = batch.per();
  out_t* out = batch.out.data_ptr<out_t>();
  int64_t* labels = batch.labels.data_ptr<int64_t>();
  // At least ~64k output values per task, so small batches do not pay for threads.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, chw * p.R));
  bool sideways = false;  // any turn by 90 or 270 degrees written from the transposed view
  for (int r = 0; r < p.R; ++r) sideways |= p.quarter[r] % 2 == 1 && !channels_last;
  at::parallel_for(0, batch.B, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> view(chw), transposed(sideways ? chw : 0), row(channels_last ? p.w * p.C : p.w);
    std::vector<Tap> column_taps(per.boxes ? p.w : 0);
    for (int64_t b = begin; b < end; ++b) {
      for (int r = 0; r < p.R; ++r) labels[b * p.R + r] = r;
      const ViewSource s = view_source(p, per, b);
      stage_view(data + s.n * images.stride(0), images, s, p, column_taps.data(), view.data());
      if (sideways) transpose_view(view.data(), p, transposed.data());
      for (int r = 0; r < p.R; ++r)
        write_turn(view.data(), transposed.data(), p, r, channels_last, row.data(),
                   out + (b * p.R + r) * chw);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rotation_batch_cpu(
    const at::Tensor& images, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& shifts, const std::optional<at::Tensor>& flips,
    at::ArrayRef<double> mean, at::ArrayRef<double> std, at::IntArrayRef rotations,
    at::ScalarType out_dtype, bool channels_last, at::OptionalIntArrayRef size,
    const std::optional<at::Tensor>& boxes, bool /*check_bounds: free here, so always*/) {
  Batch batch = prepare_batch(images, index, shifts, flips, mean, std, rotations, out_dtype,
                              channels_last, size, boxes, /*check_bounds=*/true);
  if (batch.out.numel() == 0) return {batch.out, batch.labels};
  dispatch_dtypes(images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    rotation_batch_cpu_kernel<decltype(in_tag), decltype(out_tag)>(images, batch, channels_last);
  });
  return {batch.out, batch.labels};
}

TORCH_LIBRARY(rot_kernel, m) {
  m.def(
      "rotation_batch(Tensor images, Tensor? index, Tensor? shifts, Tensor? flips, "
      "float[] mean, float[] std, int[] rotations, ScalarType out_dtype, bool channels_last, "
      "SymInt[]? size=None, Tensor? boxes=None, bool check_bounds=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rot_kernel, CPU, m) { m.impl("rotation_batch", &rotation_batch_cpu); }

}  // namespace rot_kernel

// Lets setup.py's build be imported as the module rot_kernel._C (which registers the op).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
