// The CUDA kernels' block programs, written once for two callers: the kernels in
// rotation_batch_cuda.cu, and rotation_batch_emulated (emulated.cpp), which runs the same
// programs on the CPU thread by thread, so that CI checks the GPU's index math against the
// CPU kernel without a GPU.
//
// A block program is a struct built from (launch arguments, block index, shared memory)
// with one method per phase, called by every thread of the block in turn; a phase ends
// where the kernel puts __syncthreads(). A phase reads only what earlier phases wrote.
//
// Staged (the view fits in shared memory; CIFAR): block (b, g) stages image b's h x w view
// once (normalised, for quarter turns; with 16-byte loads where source rows are whole,
// aligned packs), then writes rotation group g's outputs in 16-byte packs. Every thread works in 32-bit offsets, divides by launch constants with a multiply
// (FastDiv), and walks the view along per-rotation affine steps computed on the host
// (Walk): no per-element switch, no 64-bit division.
// Tiled (larger outputs; ImageNet): block (b*R + r, tile) stages, channel group by channel
// group, the part of the view its 32 x 32 output tile reads, then writes the tile's whole
// pixels (all channels of the group), so channels_last rows are written contiguously.
#pragma once

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "rotation_batch.h"

namespace rot_kernel {

constexpr int kThreads = 256;
// A block gets 48 KiB of shared memory without opting in; the staged view leaves room for
// its tables of mean and 1/std.
constexpr int kStagedBytes = 48 * 1024 - 2 * kMaxChannels * sizeof(float);
constexpr int kTile = 32;      // the tiled path's output tile
constexpr int kBox = 52;       // its staged box: a 32-tile turned by 45 degrees, with source_box's
                               // margins, spans at most 49 rows and columns
constexpr int kBoxPitch = kBox + 1;
constexpr int kTileChannels = 4;  // channels staged at once: 4 x 52 x 53 floats = 43 KiB

// n / d for 0 <= n < 2^31 by a multiply and a shift (Granlund and Montgomery): with
// s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1, n / d = (umulhi(n, m) + n) >> s.
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    while ((uint32_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  ROT_HD uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    return (hi + n) >> s;
  }
};

// A quarter turn's read of the staged view (quarter_turn_row as offsets): pixel j of output
// row i is view pixel start + i * di + j * dj, a view pixel being y * pitch + x.
struct Walk {
  int start, di, dj;
};

// What the staged kernel needs besides Params, all computed on the host (plan_launch).
struct Staged {
  int pitch, plane;     // view row and plane, in floats (rows padded by one: no bank conflicts
                        // when 90 and 270 degree turns read columns)
  int group;            // rotations per block: R, or 1 when B is too small to fill the GPU
  int line;             // one output row in memory: w (NCHW) or w * C (channels_last)
  int lines;            // rows per output image: C * h (NCHW) or h (channels_last)
  bool wide;            // staging loads 16-byte packs of source rows (stage_wide)
  int packs;            // packs per source row: W / (16 / sizeof(in_t))
  int reach;            // packs a view row's window reaches, at most
  FastDiv by_w, by_h, by_C, by_lines, by_image;  // image: line * lines outputs
  FastDiv by_reach;
  Walk walks[kMaxRotations];  // quarter turns, in view pixels
};

struct Tiled {
  int tiles_w, tiles;   // output tiles per row, in all
  int chunk;            // channels staged together: min(C, kTileChannels)
  FastDiv by_row, by_chunk;  // one tile row of a channel group in memory order: kTile * chunk
};

template <typename in_t>
struct Images {
  const in_t* data;
  int64_t sN;
  int sC, sH, sW;  // within one image, offsets fit in 32 bits (checked on the host)
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// A pack at `at`. The GPU requires the pack's alignment; the emulation checks it.
template <typename P, typename T>
ROT_HD P* pack_at(T* at) {
#ifndef __CUDA_ARCH__
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(at) % alignof(P) == 0,
                        "a ", sizeof(P), "-byte access at an unaligned address");
#endif
  return reinterpret_cast<P*>(at);
}

// Everything a launch passes by value.
template <typename in_t, typename out_t>
struct Launch {
  Images<in_t> img;
  PerImage per;
  Params p;
  Staged st;
  Tiled tl;
  bool channels_last;
  out_t* out;
  int64_t* labels;
  int64_t B;
};

// The source window at (dy, dx) with 32-bit offsets: shifts far outside the image give only
// zeros, so they are clamped to where they still do (dy in [-h, H], dx in [-w, W]).
struct Window {
  int dy, dx;
  bool flip;
};

ROT_HD Window window_of(const Params& p, const ViewSource& s) {
  return {static_cast<int>(clamp64(s.dy, -p.h, p.H)), static_cast<int>(clamp64(s.dx, -p.w, p.W)),
          s.flip};
}

// View pixel (c, y, x) read from global memory: the shifted window (0 outside the image) or
// the box's bilinear resample (view_value, as the CPU kernel stages it).
template <typename in_t>
ROT_HD float view_pixel(const Images<in_t>& img, const in_t* image, const Params& p,
                        const ViewSource& s, const Window& win, int c, int y, int x) {
  const in_t* plane = image + c * img.sC;
  if (s.boxed)
    return view_value(p, s, y, x, [&](int64_t sy, int64_t sx) {
      return static_cast<float>(plane[static_cast<int>(sy) * img.sH + static_cast<int>(sx) * img.sW]);
    });
  const int sy = y + win.dy, sx = (win.flip ? p.w - 1 - x : x) + win.dx;
  const bool inside = static_cast<unsigned>(sy) < static_cast<unsigned>(p.H) &&
                      static_cast<unsigned>(sx) < static_cast<unsigned>(p.W);
  return inside ? static_cast<float>(plane[sy * img.sH + sx * img.sW]) : 0.f;
}

// ------------------------------------------------------------------------------ staged

// Two programs, by VEC:
//   VEC > 1, the fast one (every turn a quarter turn; plan_launch checks): the view is
//     staged normalised, its channels ordered as the output's (pixel-major for channels_last),
//     so writing is a permutation: a shared load per output, then a 16-byte store per VEC.
//     Each thread keeps one slot of the output rows, so the columns and channels of its VEC
//     outputs are fixed: their offsets in the view change only with the rotation.
//   VEC == 1, the general one (45-degree turns, rows that do not divide into packs): the raw
//     view in planes, each output turned (bilinear where needed) and normalised.
template <typename in_t, typename out_t, int VEC, bool CL>
struct StagedBlock {
  static constexpr bool kFast = VEC > 1;
  static constexpr bool kPixelMajor = kFast && CL;
  const Launch<in_t, out_t>& a;
  int64_t b;
  int r0, r1;          // this block's rotations [r0, r1)
  float* view;         // C * h rows of pitch floats: planes, or pixel-major (kPixelMajor)
  float* mean;         // C floats each, after the view
  float* inv_std;

  ROT_HD StagedBlock(const Launch<in_t, out_t>& launch, int64_t block_x, int block_y, float* shared)
      : a(launch), b(block_x) {
    r0 = block_y * a.st.group;
    r1 = r0 + a.st.group < a.p.R ? r0 + a.st.group : a.p.R;
    view = shared;
    mean = shared + a.p.C * a.st.plane;
    inv_std = mean + a.p.C;
  }

  // Where view pixel (c, y, x) is staged.
  ROT_HD int at(int c, int y, int x) const {
    const int pixel = y * a.st.pitch + x;
    return kPixelMajor ? pixel * a.p.C + c : c * a.st.plane + pixel;
  }

  // What the view holds for value v of channel c: normalised for the fast program.
  ROT_HD float staged_value(int c, float v) const {
    return kFast ? (v - a.p.mean[c]) * a.p.inv_std[c] : v;  // as the CPU kernel rounds it
  }

  // Phase 1: the view (and the tables, and this block's labels).
  ROT_HD void stage(int t, int T) {
    const Params& p = a.p;
    const ViewSource s = view_source(p, a.per, b);
    if (t < p.C) {
      mean[t] = p.mean[t];
      inv_std[t] = p.inv_std[t];
    }
    if (t < r1 - r0) a.labels[b * p.R + r0 + t] = r0 + t;
    const in_t* image = a.img.data + s.n * a.img.sN;
    const Window win = window_of(p, s);
    if (a.st.wide)
      stage_wide(t, T, win, image);
    else
      stage_pixels(t, T, s, win, image);
  }

  // A view pixel per item, in view order. Loads go out four at a time before their values
  // are stored, so each thread keeps several reads in flight.
  ROT_HD void stage_pixels(int t, int T, const ViewSource& s, const Window& win, const in_t* image) {
    const Params& p = a.p;
    const Staged& st = a.st;
    const int n = p.C * p.h * p.w;
    constexpr int kAhead = 4;
    for (int e0 = t; e0 < n; e0 += kAhead * T) {
      float v[kAhead];
      int to[kAhead];
      ROT_UNROLL
      for (int u = 0; u < kAhead; ++u) {
        const int e = e0 + u * T;
        to[u] = -1;
        if (e < n) {
          const int row = static_cast<int>(st.by_w.div(e)), x = e - row * p.w;  // row = c*h + y
          const int c = static_cast<int>(st.by_h.div(row)), y = row - c * p.h;
          v[u] = staged_value(c, view_pixel(a.img, image, p, s, win, c, y, x));
          to[u] = at(c, y, x);
        }
      }
      ROT_UNROLL
      for (int u = 0; u < kAhead; ++u)
        if (to[u] >= 0) view[to[u]] = v[u];
    }
  }

  // A 16-byte pack of a source row per item (plan_launch: rows of whole, aligned packs, no
  // boxes). The window's columns [dx, dx + w) lie in packs [k0, k0 + reach) of the row, so
  // item (c, y, kk) loads pack k0 + kk of source row y + dy and stages the view pixels it
  // holds; the first and last also stage the zeros of the view pixels whose source column is
  // before or after the loaded packs (outside the image), and an item whose row is outside
  // stages zeros only. Every view pixel is staged once.
  ROT_HD void stage_wide(int t, int T, const Window& win, const in_t* image) {
    constexpr int L = 16 / sizeof(in_t);
    using P = Pack<in_t, L>;
    const Params& p = a.p;
    const Staged& st = a.st;
    const int first = win.dx > 0 ? win.dx / L : 0;
    const int k0 = first < st.packs - st.reach ? first : st.packs - st.reach;
    const int lo = k0 * L, hi = (k0 + st.reach) * L;  // the source columns loaded
    // The view columns of source columns [s0, s1), clipped to the view, into [x0, x1).
    const auto columns = [&](int s0, int s1, int& x0, int& x1) {
      x0 = win.flip ? p.w - s1 + win.dx : s0 - win.dx;
      x1 = win.flip ? p.w - s0 + win.dx : s1 - win.dx;
      x0 = x0 > 0 ? x0 : 0;
      x1 = x1 < p.w ? x1 : p.w;
    };
    const int n = p.C * p.h * st.reach;
    for (int item = t; item < n; item += T) {
      const int row = static_cast<int>(st.by_reach.div(item)), kk = item - row * st.reach;
      const int c = static_cast<int>(st.by_h.div(row)), y = row - c * p.h;
      const int sy = y + win.dy, s0 = lo + kk * L;
      const bool inside = static_cast<unsigned>(sy) < static_cast<unsigned>(p.H);
      P pack{};
      if (inside) pack = *pack_at<const P>(image + c * a.img.sC + sy * a.img.sH + s0);
      // View pixel x of this row is at base + x * pixel; hoisted, so that the 16 stores are
      // a convert, two float operations and an address each.
      const int base = at(c, y, 0), pixel = kPixelMajor ? p.C : 1;
      const float m = p.mean[c], is = p.inv_std[c];
      const auto put = [&](int x, float v) { view[base + x * pixel] = kFast ? (v - m) * is : v; };
      const int x_first = win.flip ? p.w - 1 - (s0 - win.dx) : s0 - win.dx;
      const int x_step = win.flip ? -1 : 1;
      const auto in_view = [&](int x) { return static_cast<unsigned>(x) < static_cast<unsigned>(p.w); };
      if (in_view(x_first) && in_view(x_first + (L - 1) * x_step)) {  // most packs: no test each
        ROT_UNROLL
        for (int u = 0; u < L; ++u) put(x_first + u * x_step, static_cast<float>(pack.v[u]));
      } else {
        ROT_UNROLL
        for (int u = 0; u < L; ++u)
          if (in_view(x_first + u * x_step)) put(x_first + u * x_step, static_cast<float>(pack.v[u]));
      }
      int x0, x1;
      if (kk == 0) {  // source columns before lo: all before the image (-w <= dx)
        columns(-p.w, lo, x0, x1);
        for (int x = x0; x < x1; ++x) put(x, 0.f);
      }
      if (kk == st.reach - 1) {  // from hi on: those the view reads are past the image
        columns(hi, p.W + p.w, x0, x1);
        for (int x = x0; x < x1; ++x) put(x, 0.f);
      }
    }
  }

  // Phase 2: the outputs of rotations [r0, r1), memory row by memory row (rotation-major).
  ROT_HD void write(int t, int T) const {
    if (kFast)
      write_fast(t, T);
    else
      write_general(t, T);
  }

  ROT_HD void write_fast(int t, int T) const {
    const Params& p = a.p;
    const Staged& st = a.st;
    const int slots = st.line / VEC;  // <= T (plan_launch)
    const int step = T / slots;       // rows per pass; threads past step * slots idle
    if (t >= step * slots) return;
    const int slot = t % slots;
    // This thread's outputs in each row: column jj[u], channel cc[u] (NCHW: the row's).
    int jj[VEC], cc[VEC];
    const float* from[VEC];  // where in the view: this rotation's offset of each output
    ROT_UNROLL
    for (int u = 0; u < VEC; ++u) {
      const int e = slot * VEC + u;
      jj[u] = CL ? static_cast<int>(st.by_C.div(e)) : e;
      cc[u] = CL ? e - jj[u] * p.C : 0;
      from[u] = view;  // set for the first row's rotation below (g++ cannot see that it is)
    }
    const int pstride = CL ? p.C : 1;  // floats per view pixel
    const int64_t chw = static_cast<int64_t>(p.C) * p.h * p.w;
    const int rows = (r1 - r0) * st.lines;
    int r = -1;
    Walk wk{0, 0, 0};
    for (int q = t / slots; q < rows; q += step) {
      const int rl = static_cast<int>(st.by_lines.div(q)), line = q - rl * st.lines;
      if (r0 + rl != r) {  // a new rotation: new offsets of this thread's outputs
        r = r0 + rl;
        wk = st.walks[r];
        ROT_UNROLL
        for (int u = 0; u < VEC; ++u) from[u] = view + jj[u] * wk.dj * pstride + cc[u];
      }
      int base;
      if (CL) {
        base = (wk.start + line * wk.di) * pstride;
      } else {
        const int c = static_cast<int>(st.by_h.div(line)), i = line - c * p.h;
        base = c * st.plane + wk.start + i * wk.di;
      }
      Pack<out_t, VEC> pack;  // an address and a load per output
      ROT_UNROLL
      for (int u = 0; u < VEC; ++u) pack.v[u] = static_cast<out_t>(from[u][base]);
      out_t* row = a.out + (b * p.R + r) * chw + static_cast<int64_t>(line) * st.line;
      *pack_at<Pack<out_t, VEC>>(row + slot * VEC) = pack;
    }
  }

  ROT_HD void write_general(int t, int T) const {
    const Params& p = a.p;
    const Staged& st = a.st;
    const int per_image = st.lines * st.line;
    const int n = (r1 - r0) * per_image;
    const int64_t chw = static_cast<int64_t>(p.C) * p.h * p.w;
    const auto load = [&](int c, int y, int x) { return view[at(c, y, x)]; };
    for (int k = t; k < n; k += T) {
      const int rl = static_cast<int>(st.by_image.div(k)), e = k - rl * per_image;
      const int r = r0 + rl;
      int c, i, j;  // e in the output image's memory order
      if (CL) {
        const int pixel = static_cast<int>(st.by_C.div(e));
        c = e - pixel * p.C;
        i = static_cast<int>(st.by_w.div(pixel));
        j = pixel - i * p.w;
      } else {
        const int row = static_cast<int>(st.by_w.div(e));
        j = e - row * p.w;
        c = static_cast<int>(st.by_h.div(row));
        i = row - c * p.h;
      }
      const float v = turned_value(p, r, c, i, j, load);
      a.out[(b * p.R + r) * chw + e] = static_cast<out_t>((v - mean[c]) * inv_std[c]);
    }
  }
};

// ------------------------------------------------------------------------------ tiled

// Rows [y_lo, y_hi] and columns [x_lo, x_hi] of the view that output tile (ti, tj) of
// rotation r reads, clipped to the view.
ROT_HD void source_box(const Params& p, int r, int ti, int tj, int& y_lo, int& y_hi, int& x_lo,
                       int& x_hi) {
  const int i1 = (ti + kTile < p.h ? ti + kTile : p.h) - 1, j1 = (tj + kTile < p.w ? tj + kTile : p.w) - 1;
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
  const int ya = static_cast<int>(floorf(ylo)) - 1, xa = static_cast<int>(floorf(xlo)) - 1;
  const int yb = static_cast<int>(floorf(yhi)) + 2, xb = static_cast<int>(floorf(xhi)) + 2;
  y_lo = ya > 0 ? ya : 0;
  x_lo = xa > 0 ? xa : 0;
  y_hi = yb < p.h - 1 ? yb : p.h - 1;
  x_hi = xb < p.w - 1 ? xb : p.w - 1;
}

template <typename in_t, typename out_t, bool CL>
struct TiledBlock {
  const Launch<in_t, out_t>& a;
  int64_t o, b;        // output image o = b*R + r
  int r, ti, tj;       // the tile's first output row and column
  int y_lo, y_hi, x_lo, x_hi;
  float* box;          // chunk planes of kBox rows of kBoxPitch floats

  ROT_HD TiledBlock(const Launch<in_t, out_t>& launch, int64_t block_x, int block_y, float* shared)
      : a(launch), o(block_x), b(block_x / launch.p.R), box(shared) {
    r = static_cast<int>(o - b * a.p.R);
    ti = (block_y / a.tl.tiles_w) * kTile;
    tj = (block_y % a.tl.tiles_w) * kTile;
    source_box(a.p, r, ti, tj, y_lo, y_hi, x_lo, x_hi);
  }

  // Phase 1 of channel group [c0, c0 + chunk): the box, row by row.
  ROT_HD void stage(int t, int T, int c0) {
    const Params& p = a.p;
    const ViewSource s = view_source(p, a.per, b);
    const Window win = window_of(p, s);
    const in_t* image = a.img.data + s.n * a.img.sN;
    if (c0 == 0 && ti == 0 && tj == 0 && t == 0) a.labels[o] = r;
    const int chunk = c0 + a.tl.chunk < p.C ? a.tl.chunk : p.C - c0;
    const int bh = y_hi - y_lo + 1 < kBox ? y_hi - y_lo + 1 : kBox;
    const int bw = x_hi - x_lo + 1 < kBox ? x_hi - x_lo + 1 : kBox;
    // A warp per box row (cl, y), its lanes along the row.
    for (int row = t / 32; row < chunk * bh; row += T / 32) {
      const int cl = row / bh, y = row - cl * bh;
      for (int x = t % 32; x < bw; x += 32)
        box[(cl * kBox + y) * kBoxPitch + x] = view_pixel(a.img, image, p, s, win, c0 + cl, y_lo + y, x_lo + x);
    }
  }

  // Phase 2: the tile's pixels, each with the group's channels, in the output's memory
  // order: consecutive threads write consecutive addresses.
  ROT_HD void write(int t, int T, int c0) const {
    const Params& p = a.p;
    const int chunk = c0 + a.tl.chunk < p.C ? a.tl.chunk : p.C - c0;
    const int64_t hw = static_cast<int64_t>(p.h) * p.w;
    out_t* dst = a.out + o * p.C * hw;
    const auto load = [&](int c, int y, int x) {
      return box[((c - c0) * kBox + y - y_lo) * kBoxPitch + x - x_lo];
    };
    for (int e = t; e < kTile * kTile * a.tl.chunk; e += T) {
      int c, il, jl;
      if (CL) {  // e = (il * kTile + jl) * chunk + (c - c0)
        il = static_cast<int>(a.tl.by_row.div(e));
        const int rest = e - il * kTile * a.tl.chunk;
        jl = static_cast<int>(a.tl.by_chunk.div(rest));
        c = c0 + rest - jl * a.tl.chunk;
      } else {                // e = ((c - c0) * kTile + il) * kTile + jl
        jl = e % kTile;
        il = (e / kTile) % kTile;
        c = c0 + e / (kTile * kTile);
      }
      const int i = ti + il, j = tj + jl;
      if (c - c0 >= chunk || i >= p.h || j >= p.w) continue;
      const float v = (turned_value(p, r, c, i, j, load) - p.mean[c]) * p.inv_std[c];
      const int64_t at = CL ? (static_cast<int64_t>(i) * p.w + j) * p.C + c
                                         : c * hw + static_cast<int64_t>(i) * p.w + j;
      dst[at] = static_cast<out_t>(v);
    }
  }
};

// ------------------------------------------------------------------------------ the plan

// The launch arguments of a prepared batch (host side). Offsets inside one image are 32-bit,
// the image's place in the batch 64-bit.
template <typename in_t, typename out_t>
Launch<in_t, out_t> make_launch(const at::Tensor& images, const Batch& batch, bool channels_last) {
  int64_t extent = 1;  // one past the farthest element of an image
  for (int d = 1; d < 4; ++d) extent += (images.size(d) - 1) * images.stride(d);
  TORCH_CHECK_VALUE(extent < (int64_t{1} << 31), "images: one image spans ", extent,
                    " elements; the CUDA kernel takes at most 2^31");
  TORCH_CHECK_VALUE(batch.B <= 0x7fffffff / batch.p.R, batch.index.defined() ? "index" : "images",
                    ": at most 2^31 / R images per batch (R rotations each), got ", batch.B);
  Launch<in_t, out_t> a{};
  a.img = {images.data_ptr<in_t>(), images.stride(0), static_cast<int>(images.stride(1)),
           static_cast<int>(images.stride(2)), static_cast<int>(images.stride(3))};
  a.per = batch.per();
  a.p = batch.p;
  a.channels_last = channels_last;
  a.out = batch.out.data_ptr<out_t>();
  a.labels = batch.labels.data_ptr<int64_t>();
  a.B = batch.B;
  return a;
}

struct Plan {
  bool staged;
  int vec;  // outputs per store in the staged kernel: a 16-byte pack (the fast program), or 1
  int64_t blocks_x;
  int blocks_y;
  int64_t shared_bytes;
};

// How a batch is cut into blocks, on the host: the staged path when the view fits in shared
// memory, with one rotation per block when B blocks would leave the GPU's `sms`
// multiprocessors underused; else the tiled path. Fills in a.st and a.tl.
template <typename in_t, typename out_t>
Plan plan_launch(Launch<in_t, out_t>& a, int sms) {
  Params& p = a.p;
  Staged& st = a.st;
  Tiled& tl = a.tl;
  Plan plan{};
  // The view alone decides (its tables of mean and 1/std fit in what kStagedBytes leaves).
  const int64_t view_bytes = int64_t{p.C} * p.h * (p.w + 1) * static_cast<int64_t>(sizeof(float));
  plan.staged = view_bytes <= kStagedBytes;
  if (!plan.staged) {
    tl.tiles_w = (p.w + kTile - 1) / kTile;
    const int64_t tiles = int64_t{tl.tiles_w} * ((p.h + kTile - 1) / kTile);
    TORCH_CHECK_VALUE(tiles <= 65535, "size: ", p.h, "x", p.w, " is too large for the CUDA kernel");
    tl.tiles = static_cast<int>(tiles);
    tl.chunk = p.C < kTileChannels ? p.C : kTileChannels;
    tl.by_row = FastDiv(kTile * tl.chunk);
    tl.by_chunk = FastDiv(tl.chunk);
    plan.vec = 1;
    plan.blocks_x = a.B * p.R;
    plan.blocks_y = tl.tiles;
    plan.shared_bytes = int64_t{tl.chunk} * kBox * kBoxPitch * static_cast<int64_t>(sizeof(float));
    return plan;
  }
  st.pitch = p.w + 1;
  st.plane = p.h * st.pitch;
  st.line = a.channels_last ? p.w * p.C : p.w;
  st.lines = a.channels_last ? p.h : p.C * p.h;
  // The fast program needs quarter turns only and rows of whole packs, at most one a thread,
  // from an aligned start (the allocator's always is; a pluggable one's might not be).
  const int vec = 16 / static_cast<int>(sizeof(out_t));
  bool quarter_turns = true;
  for (int r = 0; r < p.R; ++r) quarter_turns &= p.quarter[r] >= 0;
  plan.vec = quarter_turns && st.line % vec == 0 && st.line / vec <= kThreads &&
                     reinterpret_cast<uintptr_t>(a.out) % 16 == 0
                 ? vec
                 : 1;
  st.group = a.B >= 4 * static_cast<int64_t>(sms) ? p.R : 1;
  // Staging loads 16-byte packs where every source row is whole, aligned packs (uint8 rows
  // of 16, 32, ... pixels, in memory order; the CIFAR batches).
  const int load = 16 / static_cast<int>(sizeof(in_t));
  st.wide = !a.per.boxes && a.img.sW == 1 && p.W % load == 0 && a.img.sH % load == 0 &&
            a.img.sC % load == 0 && a.img.sN % load == 0 &&
            reinterpret_cast<uintptr_t>(a.img.data) % 16 == 0;
  st.packs = p.W / load;
  st.reach = (p.w + 2 * load - 2) / load;  // w columns from any column reach this many
  st.reach = st.reach < st.packs ? st.reach : st.packs;
  st.by_reach = FastDiv(st.reach > 0 ? st.reach : 1);
  st.by_w = FastDiv(p.w);
  st.by_h = FastDiv(p.h);
  st.by_C = FastDiv(p.C);
  st.by_lines = FastDiv(st.lines);
  st.by_image = FastDiv(st.lines * st.line);
  for (int r = 0; r < p.R; ++r) {
    // quarter_turn_row(k, i, h, w) in view pixels: pixel j of output row i is
    // start + i*di + j*dj, a pixel being y * pitch + x.
    const int k = p.quarter[r], P = st.pitch, h = p.h, w = p.w;
    st.walks[r] = k == 0 ? Walk{0, P, 1}
                : k == 1 ? Walk{w - 1, -1, P}
                : k == 2 ? Walk{(h - 1) * P + w - 1, -P, -1}
                         : Walk{(h - 1) * P, 1, -P};
  }
  plan.blocks_x = a.B;
  plan.blocks_y = (p.R + st.group - 1) / st.group;
  plan.shared_bytes = (int64_t{p.C} * st.plane + 2 * p.C) * static_cast<int64_t>(sizeof(float));
  return plan;
}

// ------------------------------------------------------------------------------ the op

// The op on anything that runs block programs, written once for both: the GPU
// (rotation_batch_cuda.cu) and the emulation (emulated.cpp). Device(images) makes the
// device current; device.sms is its multiprocessors; device.capturing() whether its stream is
// being captured into a CUDA graph; device.staged<in_t, out_t, VEC, CL> and
// device.tiled<in_t, out_t, CL> run a plan's blocks.
template <typename Device>
std::tuple<at::Tensor, at::Tensor> rotation_batch_blocks(
    const at::Tensor& images, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& shifts, const std::optional<at::Tensor>& flips,
    at::ArrayRef<double> mean, at::ArrayRef<double> std, at::IntArrayRef rotations,
    at::ScalarType out_dtype, bool channels_last, at::OptionalIntArrayRef size,
    const std::optional<at::Tensor>& boxes, bool check_bounds) {
  const Device device(images);
  // The range check copies to the host, which a graph being captured cannot do (CUDA would
  // say only "operation not permitted when stream is capturing"): name the way out. (Asked
  // only of a checked call: training's unchecked ones skip the driver call.)
  const auto given = [](const std::optional<at::Tensor>& t) { return t && t->defined() && t->numel() > 0; };
  TORCH_CHECK_VALUE(!(check_bounds && (given(index) || given(boxes)) && device.capturing()),
                    "check_bounds: the range check of index and boxes waits for the GPU, which a "
                    "CUDA graph being captured cannot do: give check_bounds=False, with values "
                    "known to be in range (others are clamped into it)");
  Batch batch = prepare_batch(images, index, shifts, flips, mean, std, rotations, out_dtype,
                              channels_last, size, boxes, check_bounds);
  if (batch.out.numel() == 0) return {batch.out, batch.labels};
  dispatch_dtypes(images.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    constexpr int VEC = 16 / sizeof(out_t);
    Launch<in_t, out_t> a = make_launch<in_t, out_t>(images, batch, channels_last);
    const Plan plan = plan_launch(a, device.sms);
    const auto run = [&](auto channels_last_tag) {
      constexpr bool CL = decltype(channels_last_tag)::value;
      if (!plan.staged)
        device.template tiled<in_t, out_t, CL>(a, plan);
      else if (plan.vec == VEC)
        device.template staged<in_t, out_t, VEC, CL>(a, plan);
      else
        device.template staged<in_t, out_t, 1, CL>(a, plan);
    };
    if (channels_last)
      run(std::true_type{});
    else
      run(std::false_type{});
  });
  return {batch.out, batch.labels};
}

}  // namespace rot_kernel
