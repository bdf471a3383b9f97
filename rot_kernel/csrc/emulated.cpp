// rotation_batch_emulated (test-only): the CUDA kernels' block programs (cuda_blocks.h) run on
// the CPU, block after block and, within a block, thread after thread for each phase between
// barriers. The same plan, the same 32-bit index math and the same float operations as on
// the GPU, so CI can check the GPU's mapping against the CPU kernel bit for bit, and the
// alignment of its 16-byte loads and stores; what only a GPU can check (the launch itself,
// the hardware's conversions, races that do not change the result with the order of the
// threads) is left to the tests that run there. emulated_reverse_threads(True) runs each
// phase's threads last to first: a result that changes with it is a race.
//
// Shared memory is NaN before every block (and, in the tiled kernel, before every channel
// group) and fenced by NaN on both sides, so a read of an element no phase wrote, or a read
// outside the block's allocation, shows as NaN in the output; a write outside it changes a
// fence, which is checked after every block. Labels start at -1, so a label no block wrote
// shows too. emulated_plan() says how the last call was cut into blocks, so that tests can
// pin their cases to a path; emulated_capturing(True) makes the next calls behave as on a
// stream being captured into a CUDA graph.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_blocks.h"

namespace rot_kernel {
namespace {

constexpr int kEmulatedSMs = 132;  // an H100's multiprocessors: decides the rotation groups
constexpr int64_t kFence = 4096;   // floats of NaN on each side of the block's shared memory

// A NaN with a payload of its own: no staged value has these bits, not even a NaN pixel.
constexpr uint32_t kPoisonBits = 0x7FC0DEADu;

struct SharedMemory {
  std::vector<float> words;
  explicit SharedMemory(int64_t bytes) : words(bytes / sizeof(float) + 2 * kFence) {}
  int64_t size() const { return static_cast<int64_t>(words.size()) - 2 * kFence; }  // floats between the fences
  static float poison() {
    float nan;
    std::memcpy(&nan, &kPoisonBits, sizeof nan);
    return nan;
  }
  float* fresh() {  // what a block starts with
    std::fill(words.begin(), words.end(), poison());
    return words.data() + kFence;
  }
  void repoison() { std::fill_n(words.data() + kFence, size(), poison()); }  // keeps the fences
  void check_fences(int64_t x, int y) const {  // a block's writes stayed inside its allocation
    auto intact = [](const float* begin, const float* end) {
      return std::all_of(begin, end, [](float v) {
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        return bits == kPoisonBits;
      });
    };
    const float* data = words.data();
    TORCH_CHECK(intact(data, data + kFence) && intact(data + kFence + size(), data + words.size()),
                "emulated block (", x, ", ", y, ") wrote outside its ", size() * sizeof(float),
                " bytes of shared memory");
  }
};

thread_local std::string last_plan;
// Whether the emulated device says its stream is being captured into a CUDA graph.
thread_local bool graph_capture = false;
// The order in which a phase's threads run. A GPU runs them in no order: a program whose
// result depends on it has a race, so the tests run every case both ways and compare.
thread_local bool reverse_threads = false;

template <typename F>
void each_thread(F&& phase) {
  for (int i = 0; i < kThreads; ++i) phase(reverse_threads ? kThreads - 1 - i : i);
}

struct Emulator {
  int sms = kEmulatedSMs;
  bool capturing() const { return graph_capture; }

  explicit Emulator(const at::Tensor&) { last_plan = "empty"; }

  template <typename in_t, typename out_t, int VEC, bool CL>
  void staged(const Launch<in_t, out_t>& a, const Plan& plan) const {
    last_plan = "staged vec=" + std::to_string(VEC) + " group=" + std::to_string(a.st.group) +
                (a.st.wide ? " wide" : " pixels");
    SharedMemory shared(plan.shared_bytes);
    std::fill_n(a.labels, a.B * a.p.R, -1);
    for (int64_t x = 0; x < plan.blocks_x; ++x)
      for (int y = 0; y < plan.blocks_y; ++y) {
        StagedBlock<in_t, out_t, VEC, CL> block(a, x, y, shared.fresh());
        each_thread([&](int t) { block.stage(t, kThreads); });
        each_thread([&](int t) { block.write(t, kThreads); });  // after __syncthreads()
        shared.check_fences(x, y);
      }
  }

  template <typename in_t, typename out_t, bool CL>
  void tiled(const Launch<in_t, out_t>& a, const Plan& plan) const {
    last_plan = "tiled chunk=" + std::to_string(a.tl.chunk);
    SharedMemory shared(plan.shared_bytes);
    std::fill_n(a.labels, a.B * a.p.R, -1);
    for (int64_t x = 0; x < plan.blocks_x; ++x)
      for (int y = 0; y < plan.blocks_y; ++y) {
        TiledBlock<in_t, out_t, CL> block(a, x, y, shared.fresh());
        for (int c0 = 0; c0 < a.p.C; c0 += a.tl.chunk) {
          if (c0 > 0) shared.repoison();  // a group must not read what the previous one staged
          each_thread([&](int t) { block.stage(t, kThreads, c0); });
          each_thread([&](int t) { block.write(t, kThreads, c0); });
        }
        shared.check_fences(x, y);
      }
  }
};

}  // namespace

// Test-only ops, declared here so that the real op's library holds only the real op.
TORCH_LIBRARY_FRAGMENT(rot_kernel, m) {
  m.def(
      "rotation_batch_emulated(Tensor images, Tensor? index, Tensor? shifts, Tensor? flips, "
      "float[] mean, float[] std, int[] rotations, ScalarType out_dtype, bool channels_last, "
      "SymInt[]? size=None, Tensor? boxes=None, bool check_bounds=True) -> (Tensor, Tensor)");
  m.def("emulated_plan() -> str", [] { return last_plan; });
  m.def("emulated_reverse_threads(bool reverse) -> ()", [](bool reverse) { reverse_threads = reverse; });
  m.def("emulated_capturing(bool capturing) -> ()", [](bool on) { graph_capture = on; });
}

TORCH_LIBRARY_IMPL(rot_kernel, CPU, m) {
  m.impl("rotation_batch_emulated", &rotation_batch_blocks<Emulator>);
}

}  // namespace rot_kernel
