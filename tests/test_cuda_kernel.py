"""The CUDA kernel of rot_kernel.rotation_batch against the CPU kernel, bit for bit.

Both builds round alike (the .cu is compiled with -fmad=false, the C++ with
-ffp-contract=off), so every path must give the CPU kernel's exact bits: quarter turns,
45-degree turns, shifts and resized boxes, in every input and output dtype and memory format,
through both CUDA paths: the staged one (an image's view in shared memory, written by one
block per image or per image and rotation, with 16-byte stores where rows divide; taken iff
C * h * (w + 1) * 4 <= 48 KiB - 512 bytes for an h x w output) and the tiled one (32x32
output tiles, channels in groups), on both sides of that edge; labels included.

Each comparison runs on two "devices":
  cuda      rot_kernel.rotation_batch on CUDA tensors (skipped without a CUDA device);
  emulated  torch.ops.rot_kernel.rotation_batch_emulated: the CUDA kernels' block programs
            run thread by thread on the CPU, the same 12-argument schema, CPU tensors in and
            out (skipped where that test-only op is not registered).
The inputs are built on the CPU and moved with their strides kept; the expected batch is the
CPU kernel's on the same CPU tensors. Tests of what only a GPU has (errors raised next to
device data, a non-default stream, opcheck and inductor on CUDA, repeated calls) skip
without CUDA.

Every output is poisoned before the op writes it: with deterministic algorithms on, torch
fills each new tensor with NaN, so an element a kernel skips fails the comparison. Inputs
are random per test (seeded by the test's id; set ROT_TEST_SEED for other draws). Cases are
kept small in bytes so that the emulated run stays fast.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import rot_kernel
from conftest import between, make_crops, make_images
from rot_kernel import reference

pytestmark = pytest.mark.usefixtures("poison_outputs")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
EMULATED = getattr(torch.ops.rot_kernel, "rotation_batch_emulated", None)

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
needs_emulation = pytest.mark.skipif(
    EMULATED is None, reason="no torch.ops.rot_kernel.rotation_batch_emulated registered")
DEVICES = [pytest.param("cuda", marks=needs_cuda), pytest.param("emulated", marks=needs_emulation)]

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_IDS = ["f32", "bf16", "f16"]
ROTATION_SETS = {"four": (0, 90, 180, 270), "half": (0, 180), "sideways": (90, 270),
                 "eight": tuple(range(0, 360, 45)), "none": (0,)}
LAYOUTS = ["contiguous", "channels_last", "strided", "broadcast"]

# The CUDA kernel's choice of path (plan_launch in csrc/cuda_blocks.h): the view of one image,
# C planes of h rows with a pitch of w + 1 floats, must fit in 48 KiB less the mean and 1/std
# tables.
STAGED_BYTES = 48 * 1024 - 512


def staged(C, h, w):
    return C * h * (w + 1) * 4 <= STAGED_BYTES


def largest_staged_square(C):
    s = 1
    while staged(C, s + 1, s + 1):
        s += 1
    return s






# ----------------------------------------------------------------------------- inputs (CPU)

def make_picks(gen, N, B):
    """index int64 [B] into N images and flips bool [B]."""
    index = torch.randint(0, N, (B,), generator=gen) if N else torch.zeros(0, dtype=torch.long)
    return index, torch.rand(B, generator=gen) < 0.5


def normalisation(gen, images):
    """Random mean and std per channel, in the scale of the images."""
    C = images.shape[1]
    if images.dtype == torch.uint8:
        return dict(mean=(torch.rand(C, generator=gen) * 255).tolist(),
                    std=(torch.rand(C, generator=gen) * 60 + 30).tolist())
    return dict(mean=torch.rand(C, generator=gen).tolist(),
                std=(torch.rand(C, generator=gen) * 0.4 + 0.1).tolist())


# ----------------------------------------------------------------------------- running

def copy_with_strides(t, device):
    """t on `device` with the same sizes, strides and storage offset: views (stride 0, every
    other column, channels_last) stay views of a copy of the whole storage."""
    storage = t.untyped_storage()
    flat = t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
    return flat.to(device, copy=True).as_strided(t.shape, t.stride(), t.storage_offset())


def on(device, t):
    return copy_with_strides(t, "cuda") if device == "cuda" and t is not None else t


def emulate(images, index, shifts, flips, *, mean=None, std=None, rotations=(0, 90, 180, 270),
            out_dtype=torch.float32, channels_last=False, size=None, boxes=None, check_bounds=True):
    """The emulation op, called with the arguments in the canonical form rotation_batch gives
    the real op."""
    mean, std, rotations, (h, w) = reference.check_arguments(
        images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last, size, boxes,
        check_bounds)
    call = lambda: EMULATED(images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last,
                            None if size is None else [h, w], boxes, check_bounds)
    batch, labels = call()
    # Again with each phase's threads run last to first: a GPU keeps no order, so a result
    # that depends on it is a race between threads (one reading what another writes, or two
    # writing one element), which the sanitizer's racecheck would find only on a GPU.
    torch.ops.rot_kernel.emulated_reverse_threads(True)
    try:
        reversed_batch, reversed_labels = call()
    finally:
        torch.ops.rot_kernel.emulated_reverse_threads(False)
    assert torch.equal(bits(reversed_batch), bits(batch)) and torch.equal(reversed_labels, labels), \
        "the emulated kernel's result depends on the order of its threads: a race"
    return batch, labels


def run(device, images, index=None, shifts=None, flips=None, **kw):
    """The implementation under test on CPU inputs: the CUDA kernel (inputs moved to the GPU,
    strides kept) or its emulation on the CPU."""
    if device == "cuda":
        kw = dict(kw, boxes=on(device, kw.get("boxes")))
        return rot_kernel.rotation_batch(*(on(device, t) for t in (images, index, shifts, flips)), **kw)
    return emulate(images, index, shifts, flips, **kw)


def planned(device):
    """How the last call was cut into blocks ("staged vec=8 group=4 wide", "tiled chunk=3"), as
    the emulation reports it; None on CUDA, which does not."""
    return torch.ops.rot_kernel.emulated_plan() if device == "emulated" else None


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def check(device, images, index=None, shifts=None, flips=None, **kw):
    """Runs `device` and the CPU kernel on the same CPU inputs; the batches must have the same
    bits and format, the labels be equal. Returns the batch, on the CPU."""
    got, labels = run(device, images, index, shifts, flips, **kw)
    want, want_labels = rot_kernel.rotation_batch(images, index, shifts, flips, **kw)
    assert got.device.type == ("cuda" if device == "cuda" else "cpu")
    assert labels.device == got.device and labels.dtype == torch.int64
    fmt = torch.channels_last if kw.get("channels_last") else torch.contiguous_format
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous(memory_format=fmt)
    got, labels = got.cpu(), labels.cpu()
    assert torch.equal(labels, want_labels)
    assert not got.isnan().any(), "an output element was not written (still NaN)"
    assert not want.isnan().any(), "the CPU kernel left an output element unwritten (still NaN)"
    same = bits(got) == bits(want)
    if not same.all():
        where = same.logical_not().nonzero()[0].tolist()
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} elements differ; the first at "
                             f"{where}: got {got[tuple(where)].item()!r}, want {want[tuple(where)].item()!r}")
    return got


# ----------------------------------------------------------------------------- preconditions

def test_the_oracle_is_the_cpu_kernel():
    # Every comparison below would be against the plain-torch reference otherwise.
    assert rot_kernel.backend() != "reference" and "cpu" in rot_kernel.backend()


def test_poison_is_on():
    assert torch.empty(64).isnan().all()
    assert torch.empty(64, dtype=torch.bfloat16).isnan().all()


def test_the_path_rule_has_the_expected_edges():
    # The cases below are chosen by this rule; it must be the kernel's (48 KiB less 512 bytes).
    assert (largest_staged_square(3), largest_staged_square(1), largest_staged_square(64)) == (63, 109, 13)
    assert staged(1, 64, 189) and not staged(1, 64, 190)  # 64 * 190 * 4 bytes is exactly the limit


@needs_cuda
def test_the_compiled_cuda_kernel_is_in_use():
    assert "cuda" in rot_kernel.backend(), rot_kernel.backend()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rot_kernel::rotation_batch", "CUDA")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the fallback to the reference warns
        batch, labels = rot_kernel.rotation_batch(images)
    assert batch.is_cuda and labels.is_cuda and not batch.isnan().any()


@needs_emulation
def test_the_emulation_has_the_ops_schema():
    op = torch.ops.rot_kernel.rotation_batch.default._schema
    emulated = EMULATED.default._schema
    assert str(emulated).replace("rotation_batch_emulated(", "rotation_batch(") == str(op)


# ----------------------------------------------------------------------------- staged path

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [1, 8, 12, 33])
@pytest.mark.parametrize("rotations", ROTATION_SETS.values(), ids=ROTATION_SETS.keys())
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["u8", "f32"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
def test_staged(gen, device, size, rotations, in_dtype, out_dtype):
    assert staged(3, size, size)
    images = make_images(gen, 7, 3, size, size, in_dtype)
    index, flips = make_picks(gen, 7, 5)
    shifts, _ = make_crops(gen, "outside", 5, size, size, size, size)
    for channels_last in (False, True):
        check(device, images, index, shifts, flips, rotations=rotations, out_dtype=out_dtype,
              channels_last=channels_last, **normalisation(gen, images))


# (C, h, w, rotation set): output rows (w, or w * C for channels_last) that divide into
# 16-byte packs of 4 floats or 8 halves, or only of 4, or neither (the vector stores and the
# general fallback); rows of at most 256 packs and just over (one pack a thread); h != w,
# one row or column, and the most channels (64).
STAGED_SHAPES = [(1, 4, 4, "four"), (1, 6, 6, "four"), (3, 10, 10, "eight"), (1, 5, 12, "half"),
                 (2, 7, 10, "half"), (3, 9, 7, "half"), (5, 11, 16, "half"), (4, 13, 13, "eight"),
                 (1, 1, 40, "half"), (3, 40, 1, "none"), (64, 5, 5, "eight"), (64, 3, 7, "half"),
                 (64, 1, 1, "four"), (1, 1, 1024, "half"), (1, 1, 1028, "half"), (1, 2, 2048, "half"),
                 (1, 2, 2056, "half"), (4, 2, 256, "half"), (4, 2, 260, "half")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C,h,w,rotations", STAGED_SHAPES, ids=[f"{c}c-{h}x{w}-{r}" for c, h, w, r in STAGED_SHAPES])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_staged_shapes(gen, device, C, h, w, rotations, out_dtype, channels_last):
    assert staged(C, h, w)
    images = make_images(gen, 6, C, h + 3, w + 2)
    index, flips = make_picks(gen, 6, 3)
    for kind in ("outside", "box"):
        shifts, boxes = make_crops(gen, kind, 3, h + 3, w + 2, h, w)
        check(device, images, index, shifts, flips, size=(h, w), boxes=boxes, rotations=ROTATION_SETS[rotations],
              out_dtype=out_dtype, channels_last=channels_last, **normalisation(gen, images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("rotations", ["four", "eight"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=OUT_IDS[:2])
def test_staged_large_batches(gen, device, size, rotations, out_dtype):
    # With B at least 4 blocks per multiprocessor, a staged block writes all R rotations of
    # its image; below that, one each (the tests above). 1000 is past 4 x 132 (an H100's).
    B = 1000
    images = make_images(gen, 50, 3, size + 2, size + 2)
    index, flips = make_picks(gen, 50, B)
    for kind in ("outside", "box"):
        shifts, boxes = make_crops(gen, kind, B, size + 2, size + 2, size, size)
        for channels_last in (False, True):
            check(device, images, index, shifts, flips, size=(size, size), boxes=boxes,
                  rotations=ROTATION_SETS[rotations], out_dtype=out_dtype, channels_last=channels_last,
                  **normalisation(gen, images))
            assert planned(device) is None or f" group={len(ROTATION_SETS[rotations])} " in planned(device)


# Staging reads source rows in 16-byte packs when every row is whole, aligned packs (16
# uint8 or 4 float32 pixels; the CIFAR batches), else pixel by pixel: the kernel's rule
# (plan_launch), mirrored here so that each case below is pinned to its side of it.
def wide(images, boxes=None):
    pack = 16 // images.element_size()
    sN, sC, sH, sW = images.stride()
    return (boxes is None and sW == 1 and images.shape[3] % pack == 0 and sH % pack == 0
            and sC % pack == 0 and sN % pack == 0 and images.data_ptr() % 16 == 0)


def placed(images, offset=0, pad=0):
    """A copy of images `offset` elements into a buffer, its rows `pad` elements apart."""
    N, C, H, W = images.shape
    buffer = images.new_zeros(offset + N * C * H * (W + pad))
    view = buffer[offset:].view(N, C, H, W + pad)[..., :W]
    view.copy_(images)
    return view


# name: (input dtype, C, source H x W, output h x w, shifts, offset, row padding, wide?)
# Shifts "pad4" are CIFAR's (at most 4 pixels each way), "outside" reach past every edge;
# crops of rows of several packs exercise windows that reach only some of them.
WIDE_CASES = {
    "u8-cifar": (torch.uint8, 3, (32, 32), (32, 32), "pad4", 0, 0, True),
    "u8-one-pack": (torch.uint8, 1, (9, 16), (9, 16), "outside", 0, 0, True),
    "u8-crop-outside": (torch.uint8, 2, (40, 64), (21, 21), "outside", 0, 0, True),
    "u8-crop-inside": (torch.uint8, 2, (40, 64), (21, 21), "inside", 0, 0, True),
    "u8-wide-crop": (torch.uint8, 1, (5, 48), (3, 40), "outside", 0, 0, True),
    "u8-padded-rows": (torch.uint8, 3, (12, 32), (12, 32), "outside", 0, 16, True),
    "u8-offset-16": (torch.uint8, 3, (12, 32), (12, 32), "outside", 16, 0, True),
    "u8-offset-1": (torch.uint8, 3, (12, 32), (12, 32), "outside", 1, 0, False),
    "u8-rows-of-24": (torch.uint8, 3, (12, 24), (12, 24), "outside", 0, 0, False),
    "u8-rows-apart-8": (torch.uint8, 3, (12, 32), (12, 32), "outside", 0, 8, False),
    "f32-rows-of-12": (torch.float32, 3, (10, 12), (10, 12), "outside", 0, 0, True),
    "f32-crop": (torch.float32, 3, (20, 36), (7, 7), "outside", 0, 0, True),
    "f32-offset-4": (torch.float32, 3, (10, 12), (10, 12), "outside", 4, 0, True),
    "f32-offset-2": (torch.float32, 3, (10, 12), (10, 12), "outside", 2, 0, False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", WIDE_CASES.keys())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=OUT_IDS[:2])
def test_staging_with_16_byte_loads(gen, device, case, out_dtype):
    in_dtype, C, (H, W), (h, w), kind, offset, pad, expect_wide = WIDE_CASES[case]
    images = placed(make_images(gen, 6, C, H, W, in_dtype), offset, pad)
    assert wide(images) == expect_wide and staged(C, h, w)
    index, flips = make_picks(gen, 6, 9)
    if kind == "pad4":
        shifts = between(gen, [[-4, -4]] * 9, 4)
    else:
        shifts, _ = make_crops(gen, kind, 9, H, W, h, w)
    for rotations, channels_last in (("four", False), ("four", True), ("eight", False)):
        rotations = ROTATION_SETS[rotations if h == w else "half"]
        check(device, images, index, shifts, flips, size=(h, w), rotations=rotations, out_dtype=out_dtype,
              channels_last=channels_last, **normalisation(gen, images))
        assert planned(device) is None or planned(device).endswith(" wide" if expect_wide else " pixels")


@pytest.mark.parametrize("device", DEVICES)
def test_cifar_training_batches(gen, device):
    # The training batch as rotnet.py asks for it, at B = 128 (a rotation per block) and past
    # 4 x 132 (every rotation of an image in one block): 16-byte loads and stores throughout.
    images = make_images(gen, 64, 3, 32, 32)
    assert wide(images)
    for B in (128, 600):
        index, flips = make_picks(gen, 64, B)
        shifts = between(gen, [[-4, -4]] * B, 4)
        check(device, images, index, shifts, flips, out_dtype=torch.bfloat16, channels_last=True,
              mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7])
        assert planned(device) in (None, f"staged vec=8 group={1 if B == 128 else 4} wide")


# ----------------------------------------------------------------------------- tiled path

# name: (C, source H x W, output h x w, rotation set, crop kind). Sizes are not multiples of
# 32 (partial tiles) but for one; non-square outputs allow only 0 and 180 degrees.
TILED_CASES = {
    "3c-70x100-half": (3, (73, 104), (70, 100), "half", "outside"),
    "3c-40x130-half": (3, (40, 130), (40, 130), "half", "corner"),
    "3c-96x96-four": (3, (96, 96), (96, 96), "four", "corner"),
    "1c-111-four": (1, (111, 111), (111, 111), "four", "corner"),
    "1c-33x400-half": (1, (35, 400), (33, 400), "half", "outside"),
    "2c-78-eight": (2, (80, 80), (78, 78), "eight", "inside"),
    "4c-57-eight": (4, (60, 61), (57, 57), "eight", "box"),
    "5c-50-eight": (5, (50, 50), (50, 50), "eight", "outside"),
    "3c-80x72to66-eight-box": (3, (80, 72), (66, 66), "eight", "box"),
    "3c-80x72to66-eight-inside": (3, (80, 72), (66, 66), "eight", "inside"),
    "3c-80x72to66-sideways-up": (3, (80, 72), (66, 66), "sideways", "up"),
    "64c-14-eight": (64, (20, 17), (14, 14), "eight", "box"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TILED_CASES.keys())
@pytest.mark.parametrize("out_dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                     (torch.bfloat16, True), (torch.float16, False)],
                         ids=["f32-nchw", "f32-nhwc", "bf16-nhwc", "f16-nchw"])
def test_tiled(gen, device, case, out_dtype, channels_last):
    C, (H, W), (h, w), rotations, kind = TILED_CASES[case]
    assert not staged(C, h, w)
    images = make_images(gen, 4, C, H, W)
    index, flips = make_picks(gen, 4, 2)
    shifts, boxes = make_crops(gen, kind, 2, H, W, h, w)
    check(device, images, index, shifts, flips, size=(h, w), boxes=boxes, rotations=ROTATION_SETS[rotations],
          out_dtype=out_dtype, channels_last=channels_last, **normalisation(gen, images))


# ----------------------------------------------------------------------------- both paths

def edge_cases():
    """(C, h, w) on both sides of the staged path's limit: the largest staged square and the
    next, and non-square outputs whose view is exactly 48 KiB - 512 bytes, and one column more."""
    for C in (1, 2, 3, 4, 5, 64):
        s = largest_staged_square(C)
        yield C, s, s
        yield C, s + 1, s + 1
    for C, h, w in ((1, 64, 189), (2, 95, 63), (5, 32, 75), (3, 1, 4052)):
        yield C, h, w
        yield C, h, w + 1


EDGE_CASES = list(edge_cases())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C,h,w", EDGE_CASES, ids=[f"{c}c-{h}x{w}-{'staged' if staged(c, h, w) else 'tiled'}"
                                                  for c, h, w in EDGE_CASES])
@pytest.mark.parametrize("kind", ["outside", "box"])
def test_at_the_shared_memory_edge(gen, device, C, h, w, kind):
    H, W = h + 4, w + 3
    images = make_images(gen, 3, C, H, W)
    index, flips = make_picks(gen, 3, 2)
    shifts, boxes = make_crops(gen, kind, 2, H, W, h, w)
    check(device, images, index, shifts, flips, size=(h, w), boxes=boxes,
          rotations=ROTATION_SETS["eight" if h == w else "half"], **normalisation(gen, images))
    assert planned(device) is None or planned(device).startswith("staged" if staged(C, h, w) else "tiled")


# The fast program (16-byte packs of outputs) at the same edge: (C, h, w, rotations, out dtype,
# channels_last) whose view takes the most shared memory that rows of whole packs allow (the
# exact edge, 48 KiB - 512 bytes, where a layout admits it); a row more (a square: a side
# more) is tiled. Their
# sources are rows of whole 16-byte packs, so shifted crops stage with 16-byte loads too.
FAST_EDGE_CASES = [(3, 62, 64, "half", torch.float32, False), (5, 73, 32, "half", torch.float16, False),
                   (4, 32, 94, "half", torch.bfloat16, True), (2, 64, 94, "half", torch.float32, True),
                   (4, 54, 54, "four", torch.float32, True), (4, 54, 54, "four", torch.bfloat16, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C,h,w,rotations,out_dtype,channels_last", FAST_EDGE_CASES,
                         ids=[f"{c}c-{h}x{w}-{r}-{str(d)[6:]}-{'nhwc' if cl else 'nchw'}"
                              for c, h, w, r, d, cl in FAST_EDGE_CASES])
@pytest.mark.parametrize("kind", ["outside", "box"])
@pytest.mark.parametrize("more", [0, 1], ids=["edge", "row-more"])
def test_the_fast_program_at_the_shared_memory_edge(gen, device, C, h, w, rotations, out_dtype, channels_last,
                                                     kind, more):
    h, w = h + more, w + (more if h == w else 0)  # (a square stays square: its turns are quarter turns)
    assert staged(C, h, w) == (not more)
    H, W = h + 4, -(-(w + 3) // 16) * 16
    images = make_images(gen, 3, C, H, W)
    index, flips = make_picks(gen, 3, 2)
    shifts, boxes = make_crops(gen, kind, 2, H, W, h, w)
    check(device, images, index, shifts, flips, size=(h, w), boxes=boxes, rotations=ROTATION_SETS[rotations],
          out_dtype=out_dtype, channels_last=channels_last, **normalisation(gen, images))
    vec = 16 // out_dtype.itemsize
    want = "tiled" if more else f"staged vec={vec} group=1 {'pixels' if kind == 'box' else 'wide'}"
    assert planned(device) is None or planned(device).startswith(want), planned(device)


# path: (images, picks, source H x W, [(crop kind, output size, rotation set)], out dtype)
INPUT_LAYOUT_CASES = {
    "staged": (6, 5, (19, 22), [("corner", (19, 22), "half"), ("outside", (15, 15), "eight"),
                                ("box", (15, 15), "eight")], torch.float32),
    "tiled": (4, 2, (80, 72), [("outside", (66, 66), "four"), ("box", (66, 66), "eight")], torch.bfloat16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", INPUT_LAYOUT_CASES.keys())
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["u8", "f32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_input_layouts(gen, device, path, layout, in_dtype, channels_last):
    N, B, (H, W), crops, out_dtype = INPUT_LAYOUT_CASES[path]
    images = make_images(gen, N, 3, H, W, in_dtype, layout=layout)
    index, flips = make_picks(gen, N, B)
    for kind, size, rotations in crops:
        assert staged(3, *size) == (path == "staged")
        shifts, boxes = make_crops(gen, kind, B, H, W, *size)
        check(device, images, index, shifts, flips, size=size, boxes=boxes, rotations=ROTATION_SETS[rotations],
              channels_last=channels_last, out_dtype=out_dtype, **normalisation(gen, images))


PATHS = {"staged": (3, 21, 21), "tiled": (3, 67, 67)}  # C and an output size of that path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS.keys())
@pytest.mark.parametrize("kind", ["corner", "centre", "inside", "outside", "box", "full", "pixel", "up", "down"])
def test_crops_and_boxes(gen, device, path, kind):
    C, h, w = PATHS[path]
    H, W = h + 6, w + 5  # the source
    images = make_images(gen, 5, C, H, W)
    index, flips = make_picks(gen, 5, 3)
    for size, rotations, channels_last in (((h, w), "eight", False), ((h - 5, w + 2), "half", True)):
        assert staged(C, *size) == (path == "staged")
        shifts, boxes = make_crops(gen, kind, 3, H, W, *size)
        check(device, images, index, shifts, flips, size=size, boxes=boxes, rotations=ROTATION_SETS[rotations],
              channels_last=channels_last, **normalisation(gen, images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS.keys())
def test_shifts_at_and_beyond_the_edges(gen, device, path):
    C, H, W = PATHS[path]
    edges = [-2**40, -2**31 - 1, -H - 3, -H, -H + 1, -1, 0, 1, H - 1, H, 2**31, 2**40]
    if path == "staged":  # every pair
        shifts = torch.tensor([(dy, dx) for dy in edges for dx in edges])
    else:  # each edge with three others, in each coordinate
        shifts = torch.tensor([(dy, edges[(k + j) % len(edges)]) for k, dy in enumerate(edges) for j in (0, 5, 7)])
        shifts = torch.cat([shifts, shifts.flip(1)])
    images = make_images(gen, 2, C, H, W)
    index = torch.arange(len(shifts)) % 2
    rotations = ROTATION_SETS["eight"] if path == "staged" else (0, 45, 270)
    for flip in (False, True):
        check(device, images, index, shifts, torch.full((len(shifts),), flip), rotations=rotations,
              **normalisation(gen, images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS.keys())
@pytest.mark.parametrize("B", [0, 1, 7])
def test_batch_sizes(gen, device, path, B):
    C, H, W = PATHS[path]
    images = make_images(gen, 9, C, H, W)
    index, flips = make_picks(gen, 9, B)
    shifts, _ = make_crops(gen, "outside", B, H, W, H, W)
    got = check(device, images, index, shifts, flips, **normalisation(gen, images))
    assert got.shape == (4 * B, C, H, W)
    got = check(device, images[:B], rotations=(90, 0, 45), **normalisation(gen, images))  # every image, in order
    assert got.shape == (3 * B, C, H, W)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS.keys())
def test_per_image_arguments_of_any_integer_type_and_stride(gen, device, path):
    C, H, W = PATHS[path]
    images = make_images(gen, 6, C, H + 4, W + 4)
    B = 5
    index = torch.randint(0, 6, (2 * B,), generator=gen)
    flips = (torch.rand(2 * B, generator=gen) < 0.5)[1::2]  # no unit stride
    shifts, _ = make_crops(gen, "outside", B, H + 4, W + 4, H, W)
    _, boxes = make_crops(gen, "box", B, H + 4, W + 4, H, W)
    kw = dict(size=(H, W), rotations=(0, 45, 90), **normalisation(gen, images))
    for index_dtype, dtype in ((torch.uint8, torch.int8), (torch.int16, torch.int16), (torch.int32, torch.int32)):
        picked = index.to(index_dtype)[::2]  # every other entry: no unit stride
        column_major = lambda t: t.to(dtype).t().contiguous().t()  # noqa: E731
        assert not picked.is_contiguous() and not column_major(shifts).is_contiguous()
        check(device, images, picked, column_major(shifts), flips, **kw)
        check(device, images, picked, None, flips, boxes=column_major(boxes), **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS.keys())
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16_bit_stores_round_alike(gen, device, path, out_dtype):
    # Random float bit patterns (normals, subnormals, infinities, NaNs) and the rounding edges
    # of both formats, passed through unchanged (mean 0, std 1): each output has the CPU
    # kernel's bits, NaN where it has NaN (NaN payloads are not compared).
    edges = [0, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x477FE000, 0x477FEFFF,
             0x477FF000, 0x477FF001, 0x38800000, 0x387FFFFF, 0x33000000, 0x33000001,
             0x32FFFFFF, 1, 0x00800000, 0x3F808000, 0x3F818000, 0x7F7F8000, 0x7F7FFFFF]
    edges = torch.tensor(edges + [e | 0x80000000 for e in edges], dtype=torch.int64)
    side = 8 if path == "staged" else 111  # rows of 8: 16-byte stores; 1 x 111 x 111 is tiled
    assert staged(1, side, side) == (path == "staged")
    count = max(2, (1 << 14) // side**2) * side * side
    noise = torch.randint(0, 2**32, (count - len(edges),), generator=gen, dtype=torch.int64)
    images = torch.cat([edges, noise]).to(torch.int32).view(torch.float32).reshape(-1, 1, side, side)
    got, _ = run(device, images, rotations=(0, 90), out_dtype=out_dtype)
    want, _ = rot_kernel.rotation_batch(images, rotations=(0, 90), out_dtype=out_dtype)
    got = got.cpu()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits(got)[~nan], bits(want)[~nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", [3, 4])
def test_more_than_65535_images(gen, device, side):
    # One block per image on the staged path: a grid dimension other than x stops at 65,535.
    # Rows of 3 take the general program, rows of 4 floats the vector stores.
    B = 65537
    images = make_images(gen, 5, 1, side, side)
    index, flips = make_picks(gen, 5, B)
    shifts, _ = make_crops(gen, "outside", B, side, side, side, side)
    got = check(device, images, index, shifts, flips, **normalisation(gen, images))
    assert got.shape == (4 * B, 1, side, side)


@needs_cuda
def test_more_than_65535_images_on_the_tiled_path(gen):
    # 4 x 55 x 55 outputs are tiled (2 x 2 tiles); a turn by 90 degrees without
    # normalisation is torch.rot90, in bfloat16 exactly (uint8 values fit its 8 bits).
    B, C, S = 65537, 4, 55
    assert not staged(C, S, S)
    images = make_images(gen, 3, C, S, S)
    index, _ = make_picks(gen, 3, B)
    cuda_images, cuda_index = images.cuda(), index.cuda()
    got, labels = rot_kernel.rotation_batch(cuda_images, cuda_index, rotations=(90,), out_dtype=torch.bfloat16)
    assert got.shape == (B, C, S, S) and torch.equal(labels, torch.zeros(B, dtype=torch.int64, device="cuda"))
    want = torch.rot90(cuda_images[cuda_index], 1, dims=(-2, -1)).to(torch.bfloat16)
    assert torch.equal(bits(got), bits(want))
    for part in (slice(0, 3), slice(B - 3, B)):  # and the CPU kernel's bits at both ends
        cpu, _ = rot_kernel.rotation_batch(images, index[part], rotations=(90,), out_dtype=torch.bfloat16)
        assert torch.equal(bits(got[part].cpu()), bits(cpu))


# ----------------------------------------------------------------------------- CUDA only

@needs_cuda
@pytest.mark.parametrize("path,B", [("staged", 6), ("staged", 1000), ("tiled", 6)])
def test_repeated_calls_give_the_same_bits(gen, path, B):
    C, H, W = PATHS[path]
    images = make_images(gen, 8, C, H + 5, W + 3).cuda()
    index, flips = (t.cuda() for t in make_picks(gen, 8, B))
    _, boxes = make_crops(gen, "box", B, H + 5, W + 3, H, W)
    shifts, _ = make_crops(gen, "outside", B, H + 5, W + 3, H, W)
    for kw in (dict(boxes=boxes.cuda()), dict(shifts=shifts.cuda())):
        for channels_last in (False, True):
            kw.update(size=(H, W), rotations=ROTATION_SETS["eight"], out_dtype=torch.bfloat16,
                      channels_last=channels_last, **normalisation(gen, images))
            first, _ = rot_kernel.rotation_batch(images, index, flips=flips, **kw)
            second, _ = rot_kernel.rotation_batch(images, index, flips=flips, **kw)
            assert first.data_ptr() != second.data_ptr()
            assert torch.equal(bits(first), bits(second))


def cuda_error_cases():
    """name: (kwargs on CUDA images [4, 3, 8, 8], the error, a pattern its message matches).
    The kwargs are built when called, so that nothing touches CUDA at collection."""
    def index(device="cuda", values=(0, 1)):
        return torch.tensor(values, device=device)

    def boxes(rows, device="cuda"):
        return dict(index=index(), boxes=torch.tensor(rows, device=device))

    whole = [[0, 0, 8, 8]] * 2
    return {
        "index past the end": (lambda: dict(index=index(values=[0, 4])), IndexError, "index"),
        "negative index": (lambda: dict(index=index(values=[-1, 0])), IndexError, "index"),
        "huge index": (lambda: dict(index=index(values=[0, 2**40])), IndexError, "index"),
        "index on the CPU": (lambda: dict(index=index("cpu")), RuntimeError, r"index.*cuda"),
        "shifts on the CPU": (lambda: dict(index=index(), shifts=torch.zeros(2, 2, dtype=torch.long)),
                              RuntimeError, r"shifts.*cuda"),
        "flips on the CPU": (lambda: dict(index=index(), flips=torch.zeros(2, dtype=torch.bool)),
                             RuntimeError, r"flips.*cuda"),
        "boxes on the CPU": (lambda: boxes(whole, "cpu"), RuntimeError, r"boxes.*cuda"),
        "box below the image": (lambda: boxes([[0, 0, 8, 8], [1, 0, 8, 8]]), ValueError, "boxes"),
        "box at a negative column": (lambda: boxes([[0, 0, 2, 2], [0, -3, 2, 2]]), ValueError, "boxes"),
        "empty box": (lambda: boxes([[0, 0, 0, 2], [0, 0, 8, 8]]), ValueError, "boxes"),
        "huge box": (lambda: boxes([[0, 0, 2**62, 2], [0, 0, 8, 8]]), ValueError, "boxes"),
    }


CUDA_ERRORS = cuda_error_cases()


@needs_cuda
@pytest.mark.parametrize("case", CUDA_ERRORS.keys())
@pytest.mark.parametrize("call", ["wrapper", "op"])
def test_errors_with_cuda_tensors_name_the_argument(case, call):
    make, error, pattern = CUDA_ERRORS[case]
    kw = make()
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8, device="cuda")
    with pytest.raises(error, match=pattern):
        if call == "wrapper":
            rot_kernel.rotation_batch(images, kw.get("index"), kw.get("shifts"), kw.get("flips"),
                                      boxes=kw.get("boxes"))
        else:
            torch.ops.rot_kernel.rotation_batch.default(
                images, kw.get("index"), kw.get("shifts"), kw.get("flips"), [0.0] * 3, [1.0] * 3,
                [0, 90, 180, 270], torch.float32, False, None, kw.get("boxes"), True)
    assert torch.zeros(3, device="cuda").add(1).sum().item() == 3  # the device is still usable


@needs_cuda
@pytest.mark.parametrize("call", ["wrapper", "op"])
def test_cpu_images_with_a_cuda_index_name_the_images(call):
    # A CUDA argument sends the op to the CUDA kernel: it must name the images, not fail in
    # the device guard (the reverse case is "index on the CPU" above).
    images, index = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1], device="cuda")
    pattern = r"index: expected a tensor on cpu" if call == "wrapper" else r"images: expected a CUDA tensor"
    with pytest.raises(RuntimeError, match=pattern):
        if call == "wrapper":
            rot_kernel.rotation_batch(images, index)
        else:
            torch.ops.rot_kernel.rotation_batch.default(images, index, None, None, [0.0] * 3, [1.0] * 3, [0, 90],
                                                        torch.float32, False, None, None, True)


UNCHECKED_SCRIPT = """
import torch, rot_kernel
gen = torch.Generator().manual_seed(0)
index = torch.tensor([0, 3, 4, -1, 2**40, -2**40, 2], device="cuda")
boxes = torch.tensor([[0, 0, 20, 20], [-5, -5, 10, 10], [30, 30, 40, 40], [0, 0, 0, 0],
                      [2**40, 0, 1, 1], [0, 0, -3, 2**40], [5, 5, 2**40, 2**40]], device="cuda")
shifts = torch.tensor([[0, 0], [2**40, 0], [0, -2**40], [-1, 1], [3, 3], [0, 0], [1, 1]], device="cuda")
for C, side in ((3, 20), (3, 70)):  # the staged path, the tiled path
    images = torch.randint(0, 256, (4, C, side, side), dtype=torch.uint8, generator=gen).cuda()
    for kw in (dict(shifts=shifts), dict(boxes=boxes, size=(16, 16)), dict(boxes=boxes)):
        batch, labels = rot_kernel.rotation_batch(images, index, rotations=tuple(range(0, 360, 45)),
                                                  check_bounds=False, **kw)
        assert batch.shape[0] == 7 * 8
torch.cuda.synchronize()
print("after", float(torch.ones(8, device="cuda").mul(2).sum()))
"""


@needs_cuda
def test_unchecked_bad_values_do_not_fault():
    # check_bounds=False: a bad index or box gives a wrong batch (clamped into range: see the
    # next test), never a read out of bounds. A fault would poison the CUDA context, so this
    # runs in its own process, which must end cleanly with the device still usable afterwards.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    # (a hung kernel fails here in 2 minutes, not the whole GPU stage at its limit)
    done = subprocess.run([sys.executable, "-c", UNCHECKED_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-2:] == ["after", "16.0"], done.stdout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS.keys())
def test_unchecked_bad_values_are_clamped_into_range(gen, device, path):
    # check_bounds=False: the block programs clamp an index into [0, N) and a box into the
    # image (view_source), so a bad value reads a wrong image, never out of bounds. On the CPU
    # the emulation runs those clamps, where the CPU op would refuse the values.
    C, H, W = PATHS[path]
    N = 4
    images = make_images(gen, N, C, H, W)
    index = torch.tensor([0, 3, 4, -1, 2**40, -2**40, 2])
    flips = torch.rand(len(index), generator=gen) < 0.5
    boxes = torch.tensor([[0, 0, H, W], [-5, -5, 10, 10], [H - 3, W - 7, 40, 40], [0, 0, 0, 0], [2**40, 0, 1, 1],
                          [0, 2, -3, 2**40], [5, 5, 2**40, 2**40]])
    height, width = boxes[:, 2].clamp(1, H), boxes[:, 3].clamp(1, W)
    top = torch.minimum(boxes[:, 0].clamp(min=0), H - height)
    left = torch.minimum(boxes[:, 1].clamp(min=0), W - width)
    inside = torch.stack([top, left, height, width], 1)
    kw = dict(rotations=(0, 90, 180, 270), **normalisation(gen, images))
    for crop, clamped in (({}, {}), (dict(boxes=boxes), dict(boxes=inside)),
                          (dict(boxes=boxes, size=(16, 16)), dict(boxes=inside, size=(16, 16)))):
        got, labels = run(device, images, index, None, flips, check_bounds=False, **crop, **kw)
        want, want_labels = rot_kernel.rotation_batch(images, index.clamp(0, N - 1), None, flips, **clamped, **kw)
        assert torch.equal(bits(got.cpu()), bits(want)) and torch.equal(labels.cpu(), want_labels)
        with pytest.raises((IndexError, ValueError), match="index|boxes"):  # checked: refused
            run(device, images, index, None, flips, **crop, **kw)


@needs_cuda
def test_opcheck_on_cuda(gen):
    images = make_images(gen, 6, 3, 10, 10).cuda()
    index, flips = (t.cuda() for t in make_picks(gen, 6, 4))
    shifts, _ = make_crops(gen, "outside", 4, 10, 10, 10, 10)
    _, boxes = make_crops(gen, "box", 4, 10, 10, 8, 8)
    shifts, boxes = shifts.cuda(), boxes.cuda()
    large = make_images(gen, 3, 3, 80, 72).cuda()  # 66 x 66 and 60 x 70 outputs are tiled
    large_index, large_flips = (t.cuda() for t in make_picks(gen, 3, 2))
    _, large_boxes = make_crops(gen, "box", 2, 80, 72, 60, 70)
    large_shifts, _ = make_crops(gen, "outside", 2, 80, 72, 66, 66)
    m, s = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]
    samples = [
        (images, index, shifts, flips, m, s, [0, 90, 180, 270], torch.float32, False),
        (images.float(), None, None, None, [0.0] * 3, [1.0] * 3, [45, 180], torch.bfloat16, True),
        (images, index[:0], shifts[:0], flips[:0], [0.0] * 3, [1.0] * 3, [0], torch.float16, False),
        (images, index, shifts, flips, m, s, [0, 45, 90], torch.float32, False, [7, 7], None, True),
        (images, index, None, flips, m, s, [0, 90, 180, 270], torch.bfloat16, True, [8, 8], boxes, False),
        (large, large_index, large_shifts.cuda(), large_flips, m, s, list(range(0, 360, 45)), torch.bfloat16,
         False, [66, 66], None, True),
        (large, large_index, None, large_flips, m, s, [0, 180], torch.float32, True, [60, 70],
         large_boxes.cuda(), False),
    ]
    torch.use_deterministic_algorithms(False)  # opcheck compares repeated runs itself
    for args in samples:
        torch.library.opcheck(torch.ops.rot_kernel.rotation_batch.default, args)


@needs_cuda
def test_torch_compile_fullgraph_with_inductor_on_cuda(gen):
    images = make_images(gen, 12, 3, 80, 72).cuda()
    index, flips = (t.cuda() for t in make_picks(gen, 12, 6))
    shifts, _ = make_crops(gen, "inside", 6, 80, 72, 32, 32)
    _, boxes = make_crops(gen, "box", 6, 80, 72, 66, 66)
    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]

    def step(images, index, shifts, flips, boxes):
        kw = dict(mean=mean, std=std, out_dtype=torch.bfloat16, check_bounds=False)
        small, labels = rot_kernel.rotation_batch(images, index, shifts, flips, size=(32, 32), **kw)  # staged
        large, _ = rot_kernel.rotation_batch(images, index, None, flips, boxes=boxes, size=(66, 66),  # tiled
                                             rotations=tuple(range(0, 360, 45)), **kw)
        return small.float().mean(dim=(1, 2, 3)), large.float().mean(dim=(1, 2, 3)), labels

    torch.use_deterministic_algorithms(False)
    compiled = torch.compile(step, fullgraph=True)
    args = (images, index, shifts.cuda(), flips, boxes.cuda())
    got, want = compiled(*args), step(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], want[2])


@needs_emulation
def test_a_graph_capture_refuses_the_range_check_by_name(gen):
    # The range check waits for the GPU, which a stream being captured into a CUDA graph cannot
    # do: CUDA would say only "operation not permitted when stream is capturing".
    N = 6
    images = make_images(gen, N, 3, 20, 20)
    index, _ = make_picks(gen, N, N)
    _, boxes = make_crops(gen, "box", N, 20, 20, 16, 16)
    kw = normalisation(gen, images)
    checked = [dict(index=index), dict(boxes=boxes, size=(16, 16)), dict(index=index, boxes=boxes, size=(16, 16))]
    torch.ops.rot_kernel.emulated_capturing(True)
    try:
        for given in checked:
            args = {"index": None, "shifts": None, "flips": None, **given}
            with pytest.raises(ValueError, match="^check_bounds: .* CUDA graph being captured .*check_bounds=False"):
                emulate(images, **args, **kw)
            got, _ = emulate(images, **args, check_bounds=False, **kw)
            assert torch.equal(bits(got), bits(rot_kernel.rotation_batch(images, **args, **kw)[0]))
        got, _ = emulate(images, None, None, None, **kw)  # nothing to check: nothing refused
        assert torch.equal(bits(got), bits(rot_kernel.rotation_batch(images, **kw)[0]))
    finally:
        torch.ops.rot_kernel.emulated_capturing(False)
    emulate(images, index, None, None, **kw)  # and outside a capture, checked as ever


@needs_cuda
def test_captured_in_a_cuda_graph_and_replayed_with_new_draws(gen):
    # check_bounds=False never waits for the GPU, so a step that builds its batch can be
    # captured once and replayed with each step's draws copied into the captured tensors.
    N, B, S = 64, 16, 32
    images = make_images(gen, N, 3, S, S).cuda()
    kw = dict(out_dtype=torch.bfloat16, channels_last=True, **normalisation(gen, images))
    index = torch.zeros(B, dtype=torch.long, device="cuda")
    shifts = torch.zeros(B, 2, dtype=torch.long, device="cuda")
    flips = torch.zeros(B, dtype=torch.bool, device="cuda")
    rot_kernel.rotation_batch(images, index, shifts, flips, check_bounds=False, **kw)  # once before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with pytest.raises(ValueError, match="^check_bounds: .* CUDA graph being captured"):
            rot_kernel.rotation_batch(images, index, shifts, flips, **kw)
        batch, labels = rot_kernel.rotation_batch(images, index, shifts, flips, check_bounds=False, **kw)
    for _ in range(3):
        new_index, new_flips = make_picks(gen, N, B)
        new_shifts, _ = make_crops(gen, "outside", B, S, S, S, S)
        index.copy_(new_index)
        shifts.copy_(new_shifts)
        flips.copy_(new_flips)
        batch.fill_(float("nan"))  # poisoned: the replay must write every element
        graph.replay()
        want, want_labels = rot_kernel.rotation_batch(images.cpu(), new_index, new_shifts, new_flips, **kw)
        assert torch.equal(bits(batch.cpu()), bits(want)) and torch.equal(labels.cpu(), want_labels)


@needs_cuda
def test_runs_on_the_current_stream(gen):
    # The images are written on a side stream s and the batch built and read back on s, with
    # no sync between (check_bounds=False): a kernel launched on another stream would race
    # with the copy (reading stale zeros) and with the read-back (poison NaN left).
    N, B = 4096, 4096
    fresh = make_images(gen, N, 3, 32, 32, torch.float32)
    index, flips = make_picks(gen, N, B)
    shifts, _ = make_crops(gen, "outside", B, 32, 32, 32, 32)
    kw = dict(out_dtype=torch.float32, check_bounds=False, **normalisation(gen, fresh))
    want, want_labels = rot_kernel.rotation_batch(fresh, index, shifts, flips, **kw)
    fresh_cuda, index, shifts, flips = (t.cuda() for t in (fresh, index, shifts, flips))
    images = torch.zeros_like(fresh_cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        images.copy_(fresh_cuda)
        batch, labels = rot_kernel.rotation_batch(images, index, shifts, flips, **kw)
        got, got_labels = batch.cpu(), labels.cpu()
    side.synchronize()
    assert torch.equal(got_labels, want_labels)
    assert torch.equal(bits(got), bits(want))
