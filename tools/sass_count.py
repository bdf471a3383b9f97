"""Instructions per output in the staged kernel's write loop, read off the compiled SASS.

    cuobjdump --dump-sass rotation_batch_cuda.o > k.sass   (docs/gpu-notes.md: how, on a CPU)
    python tools/sass_count.py k.sass

Counts the loop's steady-state path (the rotation unchanged: the loop's first forward branch,
past the new-rotation offsets, taken), without the BSSY/BSYNC convergence markers, for the
uint8-in kernels of the fast program: bf16 (packs of 8) and fp32 (packs of 4), NCHW and
channels_last. A reading of the code, not a measurement of the GPU.
"""
import re
import sys

KERNELS = {"staged_kernelIhN3c108BFloat16ELi8ELb0": ("bf16", "nchw", 8),
           "staged_kernelIhN3c108BFloat16ELi8ELb1": ("bf16", "channels_last", 8),
           "staged_kernelIhfLi4ELb0": ("fp32", "nchw", 4),
           "staged_kernelIhfLi4ELb1": ("fp32", "channels_last", 4)}


def functions(text):
    """{mangled name: [(address, instruction)]}"""
    out, name = {}, None
    for line in text.splitlines():
        if "Function :" in line:
            name = line.split("Function :")[1].strip()
            out[name] = []
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2).strip()))
    return out


def branch_target(instruction):
    m = re.search(r"BRA (0x[0-9a-f]+)", instruction)
    return int(m.group(1), 16) if m else None


def write_loop_path(code):
    barrier = next(a for a, t in code if "BAR.SYNC" in t)
    for a, t in code:  # the write loop: the backward branch after the barrier
        target = branch_target(t)
        if target is not None and target < a and a > barrier:
            body = [(b, u) for b, u in code if target <= b <= a]
            skip_from, skip_to = next((b, branch_target(u)) for b, u in body
                                      if branch_target(u) and branch_target(u) > b)
            return [u for b, u in body if (b <= skip_from or b >= skip_to) and not u.startswith(("BSSY", "BSYNC"))]
    raise SystemExit("no write loop found")


def main(path):
    code = functions(open(path).read())
    print(f"{'out':5} {'layout':14} {'per pack':>9} {'per output':>11}")
    for key, (dtype, layout, vec) in KERNELS.items():
        name = next((n for n in code if key in n), None)
        if name is None:
            raise SystemExit(f"{key} is not in {path}")
        path_ = write_loop_path(code[name])
        print(f"{dtype:5} {layout:14} {len(path_):9d} {len(path_) / vec:11.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
