"""rot_kernel.rotation_batch against the plain-torch reference, on fresh random inputs.

Every output is poisoned before the op writes it: with deterministic algorithms on, torch
fills each new tensor (ours included) with NaN, so an element the kernel skips fails the
comparison. Inputs are random per test (seeded by the test's id; set ROT_TEST_SEED for
other draws). CUDA cases run where a GPU is present and skip elsewhere.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import rot_kernel
from conftest import make_crops, make_images
from rot_kernel import reference

pytestmark = pytest.mark.usefixtures("poison_outputs")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROTATION_SETS = {"four": (0, 90, 180, 270), "half": (0, 180), "sideways": (90, 270),
                 "eight": tuple(range(0, 360, 45)), "none": (0,)}
CIFAR_MEAN, CIFAR_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def make_batch(gen, N, B, H, W, device, max_shift=4):
    index = torch.randint(0, N, (B,), generator=gen).to(device)
    shifts = torch.randint(-max_shift, max_shift + 1, (B, 2), generator=gen).to(device)
    flips = (torch.rand(B, generator=gen) < 0.5).to(device)
    return index, shifts, flips


def normalisation(images):
    if images.dtype == torch.uint8:
        return dict(mean=CIFAR_MEAN[:images.shape[1]], std=CIFAR_STD[:images.shape[1]])
    return dict(mean=[0.5] * images.shape[1], std=[0.25] * images.shape[1])


def reference_on_cpu(*args, **kw):
    """The reference's batch (and labels) computed from CPU copies of these arguments."""
    cpu = lambda x: x.cpu() if isinstance(x, torch.Tensor) else x
    return reference.rotation_batch(*map(cpu, args), **{k: cpu(v) for k, v in kw.items()})


def check_against_reference(images, index, shifts, flips, **kw):
    got, labels = rot_kernel.rotation_batch(images, index, shifts, flips, **kw)
    # The reference runs on the CPU whatever the device: the CUDA kernel gives the CPU kernel's
    # bits (test_cuda_kernel.py), so a CUDA case passes exactly when its CPU twin does. Against
    # the reference on CUDA (torch's CUDA grid_sample, which rounds differently) the 45-degree
    # margin below could not be known on a machine without a GPU.
    want, want_labels = reference_on_cpu(images, index, shifts, flips, **kw)
    fmt = torch.channels_last if kw.get("channels_last") else torch.contiguous_format
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == images.device
    assert got.is_contiguous(memory_format=fmt)
    assert torch.equal(labels.cpu(), want_labels)
    # PyTorch's CPU kernels fuse multiply-adds, ours do not (so that CPU and CUDA agree
    # bit for bit): bilinear paths (45-degree turns, boxes) differ from them by float rounding.
    bilinear = any(r % 90 for r in kw.get("rotations", (0,))) or kw.get("boxes") is not None
    if got.dtype == torch.float32:  # quarter turns: float rounding of the normalisation only
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-4 if bilinear else 1e-5)
    else:  # one rounding step of the output dtype
        torch.testing.assert_close(got.cpu().float(), want.float(), **({"rtol": 1.6e-2, "atol": 1e-2}
                                   if got.dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 2e-3}))
    return got


def test_compiled_kernels_are_in_use():
    # Every comparison below would compare the reference with itself otherwise.
    assert rot_kernel.backend() != "reference"
    assert "cpu" in rot_kernel.backend()


def test_the_prebuilt_operator_is_built_from_these_sources():
    # A build older than rot_kernel/csrc would make every test below test the old kernel.
    if not rot_kernel.backend().endswith("(prebuilt)"):
        pytest.skip(f"no prebuilt operator ({rot_kernel.backend()})")
    built_into = os.path.dirname(rot_kernel._C.__file__)
    assert os.path.exists(os.path.join(built_into, "_C.sources")), "built by an older setup.py: rebuild it"
    assert rot_kernel.stale_build(built_into) is None


def test_a_build_older_than_its_sources_is_said(tmp_path):
    csrc, built = tmp_path / "csrc", tmp_path / "module"
    csrc.mkdir()
    built.mkdir()
    (csrc / "op.cpp").write_text("int op();\n")
    assert rot_kernel.stale_build(str(built), str(csrc)) is None  # no fingerprint recorded: unknown
    (built / "_C.sources").write_text(rot_kernel.fingerprint(str(csrc)) + "\n")
    assert rot_kernel.stale_build(str(built), str(csrc)) is None
    for change in (lambda: (csrc / "op.cpp").write_text("int op(int);\n"), lambda: (csrc / "new.h").write_text("")):
        change()
        message = rot_kernel.stale_build(str(built), str(csrc))
        assert str(built) in message and "pip install --no-build-isolation -e ." in message


def test_poison_is_on():
    assert torch.empty(64).isnan().all()
    assert torch.empty(64, dtype=torch.bfloat16).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [1, 2, 7, 32, 33, 64])
@pytest.mark.parametrize("rotations", ROTATION_SETS.values(), ids=ROTATION_SETS.keys())
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["u8", "f32"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference(gen, device, size, rotations, in_dtype, out_dtype, channels_last):
    images = make_images(gen, 11, 3, size, size, in_dtype, device)
    index, shifts, flips = make_batch(gen, 11, 7, size, size, device, max_shift=size + 1)
    check_against_reference(images, index, shifts, flips, rotations=rotations, out_dtype=out_dtype,
                            channels_last=channels_last, **normalisation(images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "broadcast"])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["u8", "f32"])
@pytest.mark.parametrize("rotations", ROTATION_SETS.values(), ids=ROTATION_SETS.keys())
def test_any_input_layout(gen, device, layout, in_dtype, rotations):
    images = make_images(gen, 9, 3, 15, 15, in_dtype, device, layout)
    index, shifts, flips = make_batch(gen, 9, 6, 15, 15, device)
    check_against_reference(images, index, shifts, flips, rotations=rotations, **normalisation(images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [0, 1, 7, 128])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["f32", "bf16", "f16"])
def test_batch_sizes(gen, device, B, out_dtype):
    images = make_images(gen, 200, 3, 32, 32, torch.uint8, device)
    index, shifts, flips = make_batch(gen, 200, B, 32, 32, device)
    got = check_against_reference(images, index, shifts, flips, out_dtype=out_dtype, **normalisation(images))
    assert got.shape == (4 * B, 3, 32, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_shifts_at_and_beyond_the_edges(gen, device, channels_last):
    H = W = 9
    edges = [-H - 3, -H, -H + 1, -1, 0, 1, H - 1, H, H + 3, 2**40]
    shifts = torch.tensor([(dy, dx) for dy in edges for dx in edges], device=device)
    B = len(shifts)
    images = make_images(gen, B, 3, H, W, torch.uint8, device)
    index = torch.arange(B, device=device)
    for flip in (False, True):
        flips = torch.full((B,), flip, device=device)
        got = check_against_reference(images, index, shifts, flips, rotations=ROTATION_SETS["eight"],
                                      channels_last=channels_last, **normalisation(images))
        # A shift of the whole size or more leaves nothing: every pixel is -mean/std.
        gone = (shifts.abs() >= H).any(1).repeat_interleave(8)
        blank = (-torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)).to(device)[:, None, None]
        torch.testing.assert_close(got[gone], blank.expand_as(got[gone]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W", [(5, 9), (32, 17), (1, 40)])
@pytest.mark.parametrize("rotations", [(0, 180), (0,), (180,)])
def test_non_square_images(gen, device, H, W, rotations):
    images = make_images(gen, 6, 3, H, W, torch.uint8, device)
    index, shifts, flips = make_batch(gen, 6, 5, H, W, device)
    for channels_last in (False, True):
        check_against_reference(images, index, shifts, flips, rotations=rotations,
                                channels_last=channels_last, **normalisation(images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 4, 64])
def test_channel_counts(gen, device, C):
    images = make_images(gen, 5, C, 12, 12, torch.uint8, device)
    index, shifts, flips = make_batch(gen, 5, 4, 12, 12, device)
    # std of realistic size: bilinear turns differ from grid_sample by float rounding of the
    # sample position (a few 1e-6 px), times the image's slope (up to 255 / std per px).
    mean = (torch.rand(C, generator=gen) * 255).tolist()
    std = (torch.rand(C, generator=gen) * 60 + 30).tolist()
    for rotations in ROTATION_SETS.values():
        check_against_reference(images, index, shifts, flips, mean=mean, std=std, rotations=rotations)


@pytest.mark.parametrize("device", DEVICES)
def test_large_images_use_every_rotation(gen, device):
    # On CUDA this is the tiled path (the image does not fit in shared memory).
    images = make_images(gen, 3, 3, 131, 131, torch.uint8, device)
    index, shifts, flips = make_batch(gen, 3, 2, 131, 131, device, max_shift=20)
    for channels_last in (False, True):
        check_against_reference(images, index, shifts, flips, rotations=ROTATION_SETS["eight"],
                                channels_last=channels_last, **normalisation(images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["f32", "bf16", "f16"])
def test_quarter_turns_are_exact(gen, device, out_dtype):
    # Without normalisation a quarter turn moves values and does nothing else: torch.rot90
    # of each chosen image, bit for bit, independent of the reference's own code.
    images = make_images(gen, 10, 3, 17, 17, torch.uint8, device)
    index = torch.randint(0, 10, (6,), generator=gen).to(device)
    got, labels = rot_kernel.rotation_batch(images, index, out_dtype=out_dtype)
    want = torch.stack([torch.rot90(images[n], k, dims=(-2, -1)) for n in index.tolist() for k in range(4)])
    assert torch.equal(got, want.to(out_dtype))
    assert labels.tolist() == [0, 1, 2, 3] * 6


@pytest.mark.parametrize("device", DEVICES)
def test_defaults_take_every_image_in_order(gen, device):
    images = make_images(gen, 5, 3, 8, 8, torch.float32, device)
    got, labels = rot_kernel.rotation_batch(images, rotations=(0,))
    assert torch.equal(got, images)
    assert torch.equal(labels, torch.zeros(5, dtype=torch.int64, device=device))
    shifts = torch.zeros(5, 2, dtype=torch.int32, device=device)  # any integer dtype
    check_against_reference(images, None, shifts, None, rotations=(90,))
    check_against_reference(images, None, None, torch.ones(5, dtype=torch.bool, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16_bit_stores_round_like_torch(gen, device, out_dtype):
    # Random float bit patterns (normals, subnormals, infinities, NaNs) and the rounding
    # edges of both formats, passed through unchanged (mean 0, std 1): each output must
    # have the bits of torch's own conversion, NaN for NaN.
    edges = [0, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x477FE000, 0x477FEFFF,
             0x477FF000, 0x477FF001, 0x38800000, 0x387FFFFF, 0x33000000, 0x33000001,
             0x32FFFFFF, 1, 0x00800000, 0x3F808000, 0x3F818000, 0x7F7F8000, 0x7F7FFFFF]
    edges = torch.tensor(edges + [e | 0x80000000 for e in edges], dtype=torch.int64)
    noise = torch.randint(0, 2**32, (1 << 16,), generator=gen, dtype=torch.int64)
    bits = torch.cat([edges, noise, torch.zeros(-(len(edges) + len(noise)) % 16, dtype=torch.int64)])
    images = bits.to(torch.int32).view(torch.float32).reshape(-1, 1, 4, 4).to(device)
    got, _ = rot_kernel.rotation_batch(images, rotations=(0,), out_dtype=out_dtype)
    want = images.to(out_dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


# ----------------------------------------------------------------------------- crops and boxes

# (H, W) source -> (h, w) output, with the rotation sets tried on it: every set on a
# non-square source cropped square, a few elsewhere; quarter turns only where h == w.
CROP_SHAPES = {"37x41to29": ((37, 41, 29, 29), ROTATION_SETS.keys()),
               "32to24": ((32, 32, 24, 24), ["four", "eight"]),
               "9x12to1": ((9, 12, 1, 1), ["sideways", "eight"]),
               "37x41to13x29": ((37, 41, 13, 29), ["half", "none"]),
               "23x40to1x40": ((23, 40, 1, 40), ["half"])}


def crop_cases(kinds):
    return [pytest.param(sizes, ROTATION_SETS[name], kind, id=f"{shape}-{name}-{kind}")
            for shape, (sizes, rotation_sets) in CROP_SHAPES.items() for name in rotation_sets for kind in kinds]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,rotations,kind", crop_cases(["corner", "centre", "inside", "outside",  # shifts
                                                            "box", "full", "pixel", "up", "down"]))  # boxes
def test_crops_match_reference(gen, device, shape, rotations, kind):
    H, W, h, w = shape
    images = make_images(gen, 8, 3, H, W, torch.uint8, device)
    index, _, flips = make_batch(gen, 8, 6, H, W, device)
    shifts, boxes = make_crops(gen, kind, 6, H, W, h, w, device)
    got = check_against_reference(images, index, shifts, flips, size=(h, w), boxes=boxes, rotations=rotations,
                                  **normalisation(images))
    assert got.shape == (6 * len(rotations), 3, h, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["outside", "box"])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["u8", "f32"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_crop_dtypes_and_formats(gen, device, kind, in_dtype, out_dtype, channels_last):
    images = make_images(gen, 7, 3, 37, 41, in_dtype, device)
    index, _, flips = make_batch(gen, 7, 5, 37, 41, device)
    shifts, boxes = make_crops(gen, kind, 5, 37, 41, 29, 29, device)
    check_against_reference(images, index, shifts, flips, boxes=boxes, size=(29, 29), rotations=ROTATION_SETS["eight"],
                            out_dtype=out_dtype, channels_last=channels_last, **normalisation(images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "broadcast"])
@pytest.mark.parametrize("kind", ["outside", "box"])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["u8", "f32"])
def test_crops_of_any_input_layout(gen, device, layout, kind, in_dtype):
    images = make_images(gen, 6, 3, 19, 22, in_dtype, device, layout)
    index, _, flips = make_batch(gen, 6, 5, 19, 22, device)
    shifts, boxes = make_crops(gen, kind, 5, 19, 22, 15, 15, device)
    check_against_reference(images, index, shifts, flips, boxes=boxes, size=(15, 15),
                            rotations=ROTATION_SETS["eight"], **normalisation(images))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [0, 1, 6])
@pytest.mark.parametrize("C", [1, 3, 4])
@pytest.mark.parametrize("kind", ["inside", "box"])
def test_crops_of_any_batch_and_channel_count(gen, device, B, C, kind):
    images = make_images(gen, 9, C, 21, 18, torch.uint8, device)
    index, _, flips = make_batch(gen, 9, B, 21, 18, device)
    mean = (torch.rand(C, generator=gen) * 255).tolist()
    std = (torch.rand(C, generator=gen) * 60 + 30).tolist()
    shifts, boxes = make_crops(gen, kind, B, 21, 18, 11, 11, device)
    for rotations in (ROTATION_SETS["four"], ROTATION_SETS["eight"]):
        got = check_against_reference(images, index, shifts, flips, boxes=boxes, size=(11, 11), mean=mean,
                                      std=std, rotations=rotations)
        assert got.shape == (B * len(rotations), C, 11, 11)


@pytest.mark.parametrize("device", DEVICES)
def test_large_crops(gen, device):
    # On CUDA: 131x131 outputs take the tiled path, 40x40 ones of the same sources the staged one.
    images = make_images(gen, 3, 3, 140, 150, torch.uint8, device)
    index, _, flips = make_batch(gen, 3, 2, 140, 150, device)
    for size in ((131, 131), (40, 40)):
        for kind in ("outside", "box", "up"):
            shifts, boxes = make_crops(gen, kind, 2, 140, 150, *size, device)
            for channels_last in (False, True):
                check_against_reference(images, index, shifts, flips, boxes=boxes, size=size,
                                        rotations=ROTATION_SETS["eight"], channels_last=channels_last,
                                        **normalisation(images))


def reference_on_both(device, images, index, shifts, flips, **kw):
    """The reference's batch from device and from the CPU, both on the CPU."""
    on_device, labels = reference.rotation_batch(images, index, shifts, flips, **kw)
    on_host, host_labels = reference_on_cpu(images, index, shifts, flips, **kw)
    assert on_device.device.type == torch.device(device).type and torch.equal(labels.cpu(), host_labels)
    return on_device.cpu(), on_host


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_the_reference_on_cuda_agrees_with_the_reference_on_the_cpu(gen, device):
    # The reference on CUDA is the op's fallback where the kernel is missing and the baseline
    # of the operator's benchmark. torch's CUDA grid_sample and interpolate round differently
    # from the CPU's: each is within about 4e-5 of exact at 131 px (the CPU's, against float64),
    # so the two may be twice that apart on bilinear paths; quarter turns agree as the kernel does.
    images = make_images(gen, 3, 3, 131, 131, torch.uint8, device)
    index, shifts, flips = make_batch(gen, 3, 2, 131, 131, device, max_shift=20)
    for rotations, atol in ((ROTATION_SETS["four"], 1e-5), (ROTATION_SETS["eight"], 2e-4)):
        for channels_last in (False, True):
            got, want = reference_on_both(device, images, index, shifts, flips, rotations=rotations,
                                          channels_last=channels_last, **normalisation(images))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=atol)
    images = make_images(gen, 4, 3, 40, 36, torch.float32, device)
    index, _, flips = make_batch(gen, 4, 5, 40, 36, device)
    _, boxes = make_crops(gen, "box", 5, 40, 36, 17, 17, device)
    for out_dtype in (torch.float32, torch.bfloat16):
        got, want = reference_on_both(device, images, index, None, flips, boxes=boxes, size=(17, 17),
                                      rotations=ROTATION_SETS["eight"], out_dtype=out_dtype, **normalisation(images))
        torch.testing.assert_close(got.float(), want.float(), **({"rtol": 1e-6, "atol": 2e-4}
                                   if out_dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}))


@pytest.mark.parametrize("device", DEVICES)
def test_crops_are_exact(gen, device):
    # Without normalisation, independent of the reference: a window inside the image turned by
    # quarter turns is torch.rot90 of a slice; a box of the output's size is that slice, and
    # a box of the whole image at the image's size is the image.
    H, W, h, w = 30, 26, 17, 17
    images = make_images(gen, 6, 3, H, W, torch.uint8, device)
    index = torch.randint(0, 6, (5,), generator=gen).to(device)
    shifts, _ = make_crops(gen, "inside", 5, H, W, h, w, device)
    crops = [images[n, :, dy:dy + h, dx:dx + w] for n, (dy, dx) in zip(index.tolist(), shifts.tolist())]
    got, _ = rot_kernel.rotation_batch(images, index, shifts, size=(h, w))
    assert torch.equal(got, torch.stack([torch.rot90(c, k, dims=(-2, -1)) for c in crops for k in range(4)]).float())
    boxes = torch.cat([shifts, torch.tensor([[h, w]] * 5, device=device)], 1)
    got, _ = rot_kernel.rotation_batch(images, index, boxes=boxes, size=(h, w), rotations=(0,))
    assert torch.equal(got, torch.stack(crops).float())
    whole = torch.tensor([[0, 0, H, W]] * 5, device=device)
    got, _ = rot_kernel.rotation_batch(images, index, boxes=whole, rotations=(0, 180))
    assert torch.equal(got[::2], images[index].float())


@pytest.mark.parametrize("device", DEVICES)
def test_size_of_the_source_is_the_default(gen, device):
    images = make_images(gen, 5, 3, 12, 14, torch.uint8, device)
    index, shifts, flips = make_batch(gen, 5, 4, 12, 14, device)
    want, _ = rot_kernel.rotation_batch(images, index, shifts, flips, rotations=(0, 180))
    for size in ((12, 14), [12, 14], torch.Size([12, 14])):
        got, _ = rot_kernel.rotation_batch(images, index, shifts, flips, rotations=(0, 180), size=size)
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["none", "outside", "box"])
def test_unchecked_bounds_give_the_same_batch(gen, device, kind):
    images = make_images(gen, 8, 3, 20, 20, torch.uint8, device)
    index, _, flips = make_batch(gen, 8, 6, 20, 20, device)
    shifts, boxes = (None, None) if kind == "none" else make_crops(gen, kind, 6, 20, 20, 16, 16, device)
    kw = dict(size=(16, 16), rotations=ROTATION_SETS["eight"], boxes=boxes, **normalisation(images))
    for implementation in (rot_kernel.rotation_batch, reference.rotation_batch):
        checked, _ = implementation(images, index, shifts, flips, **kw)
        unchecked, _ = implementation(images, index, shifts, flips, check_bounds=False, **kw)
        assert torch.equal(checked, unchecked)


def test_cpu_checks_ranges_even_unchecked():
    # check_bounds=False spares CUDA a sync; on the CPU the check is free and always done.
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    for implementation in (rot_kernel.rotation_batch, reference.rotation_batch):
        with pytest.raises(IndexError, match="index"):
            implementation(images, torch.tensor([0, 4]), check_bounds=False)
        with pytest.raises(ValueError, match="boxes"):
            implementation(images, boxes=torch.tensor([[0, 0, 8, 8]] * 3 + [[1, 0, 8, 8]]), check_bounds=False)


def test_nine_argument_calls_of_the_op_still_work(gen):
    images = make_images(gen, 5, 3, 10, 10, torch.uint8, "cpu")
    index, shifts, flips = make_batch(gen, 5, 4, 10, 10, "cpu")
    args = (images, index, shifts, flips, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0, 90, 180, 270], torch.float32, False)
    got, labels = torch.ops.rot_kernel.rotation_batch.default(*args)
    want, want_labels = rot_kernel.rotation_batch(images, index, shifts, flips, mean=args[4], std=args[5])
    assert torch.equal(got, want) and torch.equal(labels, want_labels)


def test_resized_crop_boxes_are_valid():
    gen = torch.Generator().manual_seed(0)
    for H, W in ((256, 256), (256, 320), (40, 12)):  # the last mostly falls back to a centre crop
        boxes = rot_kernel.resized_crop_boxes(500, H, W, generator=gen)
        assert boxes.shape == (500, 4) and boxes.dtype == torch.int64
        reference.check_box_range(boxes, H, W)
        if H == 256:  # area fractions in [0.08, 1], but for rounding the sides
            area = (boxes[:, 2] * boxes[:, 3]).float() / (H * W)
            assert area.min() >= 0.075 and area.max() <= 1.0 and area.max() > 0.9


# ----------------------------------------------------------------------------- bad input

def bad_cases():
    img = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    wide = torch.zeros(4, 3, 8, 10, dtype=torch.uint8)
    idx = torch.tensor([0, 1])
    return {
        "index out of range": (dict(images=img, index=torch.tensor([0, 4])), IndexError, "index"),
        "negative index": (dict(images=img, index=torch.tensor([-1, 0])), IndexError, "index"),
        "float index": (dict(images=img, index=torch.tensor([0.0])), TypeError, "index"),
        "2-D index": (dict(images=img, index=torch.zeros(2, 1, dtype=torch.long)), ValueError, "index"),
        "quarter turn of wide images": (dict(images=wide, rotations=(0, 90)), ValueError, "square"),
        "45 degrees of wide images": (dict(images=wide, rotations=(45,)), ValueError, "square"),
        "3-D images": (dict(images=img[0]), ValueError, "images"),
        "int32 images": (dict(images=img.int()), TypeError, "images"),
        "float64 images": (dict(images=img.double()), TypeError, "images"),
        "too many channels": (dict(images=torch.zeros(1, 65, 2, 2)), ValueError, "channels"),
        "index on another device": (dict(images=img, index=idx.to("meta")), RuntimeError, "index"),
        "shifts on another device": (dict(images=img, index=idx, shifts=torch.zeros(2, 2, dtype=torch.long, device="meta")), RuntimeError, "shifts"),
        "shifts of the wrong shape": (dict(images=img, index=idx, shifts=torch.zeros(2, 3, dtype=torch.long)), ValueError, "shifts"),
        "float shifts": (dict(images=img, index=idx, shifts=torch.zeros(2, 2)), TypeError, "shifts"),
        "flips of the wrong shape": (dict(images=img, index=idx, flips=torch.zeros(3, dtype=torch.bool)), ValueError, "flips"),
        "integer flips": (dict(images=img, index=idx, flips=torch.zeros(2, dtype=torch.long)), TypeError, "flips"),
        "mean of the wrong length": (dict(images=img, mean=(1.0, 2.0)), ValueError, "mean"),
        "std of the wrong length": (dict(images=img, std=(1.0,) * 4), ValueError, "std"),
        "zero std": (dict(images=img, std=(1.0, 0.0, 1.0)), ValueError, "std"),
        "negative std": (dict(images=img, std=(1.0, -2.0, 1.0)), ValueError, "std"),
        "nan mean": (dict(images=img, mean=(0.0, float("nan"), 0.0)), ValueError, "mean"),
        "no rotations": (dict(images=img, rotations=()), ValueError, "rotations"),
        "repeated rotation": (dict(images=img, rotations=(0, 90, 0)), ValueError, "rotations"),
        "rotation of 30": (dict(images=img, rotations=(0, 30)), ValueError, "rotations"),
        "rotation of 360": (dict(images=img, rotations=(360,)), ValueError, "rotations"),
        "negative rotation": (dict(images=img, rotations=(-90,)), ValueError, "rotations"),
        "fractional rotation": (dict(images=img, rotations=(45.5,)), ValueError, "rotations"),
        "float64 output": (dict(images=img, out_dtype=torch.float64), TypeError, "out_dtype"),
        "size of one int": (dict(images=img, size=4), ValueError, "size"),
        "size of three ints": (dict(images=img, size=(4, 4, 4)), ValueError, "size"),
        "size of floats": (dict(images=img, size=(4.0, 4.0)), ValueError, "size"),
        "zero size": (dict(images=img, size=(0, 4)), ValueError, "size"),
        "negative size": (dict(images=img, size=(4, -1)), ValueError, "size"),
        "size larger than the images": (dict(images=wide, size=(9, 8), rotations=(0,)), ValueError, "size"),
        "size wider than the images": (dict(images=wide, size=(8, 11), rotations=(0,)), ValueError, "size"),
        "quarter turn of a non-square output": (dict(images=img, size=(6, 8), rotations=(0, 90)), ValueError, "square"),
        "45 degrees of a non-square output": (dict(images=img, size=(8, 7), rotations=(45,)), ValueError, "square"),
        "float boxes": (dict(images=img, index=idx, boxes=torch.zeros(2, 4)), TypeError, "boxes"),
        "bool boxes": (dict(images=img, index=idx, boxes=torch.ones(2, 4, dtype=torch.bool)), TypeError, "boxes"),
        "boxes of the wrong shape": (dict(images=img, index=idx, boxes=torch.ones(2, 2, dtype=torch.long)), ValueError, "boxes"),
        "boxes for another batch size": (dict(images=img, index=idx, boxes=torch.ones(3, 4, dtype=torch.long)), ValueError, "boxes"),
        "boxes on another device": (dict(images=img, index=idx, boxes=torch.ones(2, 4, dtype=torch.long, device="meta")), RuntimeError, "boxes"),
        "box below the image": (dict(images=img, index=idx, boxes=torch.tensor([[0, 0, 8, 8], [1, 0, 8, 8]])), ValueError, "boxes"),
        "box right of the image": (dict(images=wide, index=idx, boxes=torch.tensor([[0, 3, 2, 8], [0, 0, 8, 10]]), rotations=(0,)), ValueError, "boxes"),
        "box at a negative row": (dict(images=img, index=idx, boxes=torch.tensor([[-1, 0, 2, 2], [0, 0, 8, 8]])), ValueError, "boxes"),
        "box at a negative column": (dict(images=img, index=idx, boxes=torch.tensor([[0, 0, 2, 2], [0, -3, 2, 2]], dtype=torch.int32)), ValueError, "boxes"),
        "empty box": (dict(images=img, index=idx, boxes=torch.tensor([[0, 0, 0, 2], [0, 0, 8, 8]])), ValueError, "boxes"),
        "box of negative width": (dict(images=img, index=idx, boxes=torch.tensor([[0, 5, 2, -2], [0, 0, 8, 8]])), ValueError, "boxes"),
        "huge box": (dict(images=img, index=idx, boxes=torch.tensor([[0, 0, 2**62, 2], [0, 0, 8, 8]])), ValueError, "boxes"),
        "boxes with shifts": (dict(images=img, index=idx, shifts=torch.zeros(2, 2, dtype=torch.long),
                                   boxes=torch.tensor([[0, 0, 8, 8]] * 2)), ValueError, "boxes and shifts"),
        "integer check_bounds": (dict(images=img, check_bounds=1), TypeError, "check_bounds"),
    }


BAD = bad_cases()


@pytest.mark.parametrize("implementation", [rot_kernel.rotation_batch, reference.rotation_batch],
                         ids=["fused", "reference"])
@pytest.mark.parametrize("case", BAD.keys())
def test_bad_arguments_raise_clear_errors(implementation, case):
    kwargs, error, word = BAD[case]
    kwargs = dict(kwargs)
    images = kwargs.pop("images")
    args = [images] + [kwargs.pop(k, None) for k in ("index", "shifts", "flips")]
    with pytest.raises(error, match=word):
        implementation(*args, **kwargs)


# The op's own checks, for callers that skip the Python wrapper (torch.ops directly).
OP_CASES = ["index out of range", "negative index", "float index", "quarter turn of wide images",
            "3-D images", "int32 images", "too many channels", "shifts of the wrong shape",
            "float shifts", "integer flips", "flips of the wrong shape", "mean of the wrong length",
            "zero std", "nan mean", "no rotations", "repeated rotation", "rotation of 30",
            "negative rotation", "float64 output", "index on another device", "size of one int",
            "size of three ints", "size of floats", "zero size", "negative size", "size larger than the images",
            "size wider than the images", "quarter turn of a non-square output", "45 degrees of a non-square output",
            "float boxes", "bool boxes", "boxes of the wrong shape", "boxes for another batch size",
            "boxes on another device", "box below the image", "box right of the image", "box at a negative row",
            "box at a negative column", "empty box", "box of negative width", "huge box", "boxes with shifts"]


@pytest.mark.parametrize("case", OP_CASES)
def test_op_checks_its_arguments(case):
    kwargs, error, word = BAD[case]
    kwargs = dict(kwargs)
    images = kwargs["images"]
    C = images.shape[1] if images.dim() == 4 else 3
    args = (images, kwargs.get("index"), kwargs.get("shifts"), kwargs.get("flips"),
            list(kwargs.get("mean", [0.0] * C)), list(kwargs.get("std", [1.0] * C)),
            list(kwargs.get("rotations", (0, 90, 180, 270))), kwargs.get("out_dtype", torch.float32), False)
    size = kwargs.get("size")
    args += (list(size) if isinstance(size, tuple) else size, kwargs.get("boxes"), True)
    with pytest.raises((error, RuntimeError), match=word):
        torch.ops.rot_kernel.rotation_batch.default(*args)


# ----------------------------------------------------------------------------- torch.library

def test_opcheck(gen):
    images = make_images(gen, 6, 3, 10, 10, torch.uint8, "cpu")
    index, shifts, flips = make_batch(gen, 6, 4, 10, 10, "cpu")
    _, boxes = make_crops(gen, "box", 4, 10, 10, 8, 8, "cpu")
    samples = [
        (images, index, shifts, flips, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0, 90, 180, 270], torch.float32, False),
        (images.float(), None, None, None, [0.0] * 3, [1.0] * 3, [45, 180], torch.bfloat16, True),
        (images, index[:0], shifts[:0], flips[:0], [0.0] * 3, [1.0] * 3, [0], torch.float16, False),
        (images, index, shifts, flips, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0, 45, 90], torch.float32, False,
         [7, 7], None, True),
        (images, index, None, flips, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0, 90, 180, 270], torch.bfloat16, True,
         [8, 8], boxes, False),
        (images.float(), None, None, None, [0.0] * 3, [1.0] * 3, [180], torch.float16, False, [3, 9],
         torch.tensor([[0, 0, 10, 10], [1, 2, 3, 4], [9, 9, 1, 1], [0, 5, 10, 5], [4, 0, 2, 10], [0, 0, 1, 1]]), True),
    ]
    torch.use_deterministic_algorithms(False)  # opcheck compares repeated runs itself
    for args in samples:
        torch.library.opcheck(torch.ops.rot_kernel.rotation_batch.default, args)


def test_torch_compile_fullgraph(gen):
    images = make_images(gen, 20, 3, 16, 16, torch.uint8, "cpu")
    index, shifts, flips = make_batch(gen, 20, 8, 16, 16, "cpu")

    def step(images, index, shifts, flips):
        batch, labels = rot_kernel.rotation_batch(images, index, shifts, flips, mean=CIFAR_MEAN,
                                                  std=CIFAR_STD, out_dtype=torch.bfloat16)
        return batch.float().mean(dim=(1, 2, 3)), labels

    torch.use_deterministic_algorithms(False)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(images, index, shifts, flips), step(images, index, shifts, flips)
    torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_with_crops(gen):
    images = make_images(gen, 20, 3, 40, 48, torch.uint8, "cpu")
    index, _, flips = make_batch(gen, 20, 8, 40, 48, "cpu")
    shifts, _ = make_crops(gen, "inside", 8, 40, 48, 32, 32, "cpu")
    _, boxes = make_crops(gen, "box", 8, 40, 48, 32, 32, "cpu")

    def step(images, index, flips, shifts, boxes):
        kw = dict(size=(32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, out_dtype=torch.bfloat16, check_bounds=False)
        cropped, labels = rot_kernel.rotation_batch(images, index, shifts, flips, **kw)
        resized, _ = rot_kernel.rotation_batch(images, index, None, flips, boxes=boxes, **kw)
        return cropped.float().mean(dim=(1, 2, 3)), resized.float().mean(dim=(1, 2, 3)), labels

    torch.use_deterministic_algorithms(False)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (images, index, flips, shifts, boxes)
    torch.testing.assert_close(compiled(*args), step(*args))


def test_falls_back_to_the_reference_without_a_compiler(tmp_path):
    # A copy of the package without its prebuilt library, a compiler that always fails and
    # an empty build cache: import must still work, say so once, and give right answers.
    package = tmp_path / "rot_kernel"
    package.mkdir()
    source = os.path.dirname(rot_kernel.__file__)
    for name in ("__init__.py", "reference.py", "_sources.py"):
        (package / name).write_text(open(os.path.join(source, name)).read())
    (package / "csrc").symlink_to(os.path.join(source, "csrc"))
    script = ("import sys, warnings, torch\n"
              # an editable install's finder would hand this copy the real package's _C
              "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f)]\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n"
              "    import rot_kernel\n"
              "    x = torch.randint(0, 256, (3, 3, 5, 5), dtype=torch.uint8)\n"
              "    a, _ = rot_kernel.rotation_batch(x)\n"
              "    b, _ = rot_kernel.rotation_batch(x)\n"
              "print(rot_kernel.backend(), sum('could not be built' in str(w.message) for w in caught))\n"
              "assert torch.equal(a, rot_kernel.reference.rotation_batch(x)[0])\n")
    env = dict(os.environ, CXX="false", CC="false", TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reference", "1"]


def test_the_benchmark_checks_then_times_every_row(tmp_path):
    # python -m rot_kernel.bench --quick: the three implementations are checked to agree
    # first (a wrong answer stops it), then every row is timed and written; no speed asserted.
    path = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "rot_kernel.bench", "--quick", "--device", "cpu", "--json", str(path)],
                          cwd=os.path.dirname(os.path.dirname(rot_kernel.__file__)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(path.read_text())
    rows = [(c["B"], c["out_dtype"], c["crop"], c["train"]) for c in result["cases"]]
    assert rows == [(128, "float32", None, False), (128, "bfloat16", None, False), (512, "float32", None, False),
                    (512, "bfloat16", None, False), (128, "float32", None, True),  # as CPU training calls it
                    (16, "bfloat16", "crop", False), (16, "bfloat16", "resized", False)]
    for c in result["cases"]:
        assert c["ms"]["fused"] > 0 and c["ms"]["reference"] > 0 and c["speedup_vs_reference"] > 0
    train = next(c for c in result["cases"] if c["train"])
    assert train["check_bounds"] is False and train["channels_last"] is False and train["calls_per_timing"] > 1
    assert result["backend"] == rot_kernel.backend() and "| 128 | 32x32 train | float32 |" in done.stdout
