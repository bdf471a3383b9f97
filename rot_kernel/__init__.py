"""rot_kernel: the fused rotation-batch operator of RotNet.

    batch, labels = rotation_batch(images, index, shifts, flips, mean=..., std=...)

turns uint8 (or float32) images [N, C, H, W] into the cropped (or resized-cropped), flipped,
rotated and normalised training batch [B*R, C, h, w] in one pass; see rotation_batch's
docstring.

The compiled operator comes from `pip install --no-build-isolation -e .` (rot_kernel._C),
else from a just-in-time build cached under TORCH_EXTENSIONS_DIR; if neither works the
plain-torch reference stands in, with one warning.
"""
import math
import os
import sys
import warnings

import torch

from . import reference
from ._sources import fingerprint

__all__ = ["rotation_batch", "resized_crop_boxes", "backend", "stale_build", "reference"]

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_JIT_NAME = "rot_kernel_jit"
# -fopenmp: at::parallel_for is serial without it; -fno-trapping-math: lets the compiler
# vectorise the float16 store (nothing here reads floating-point exception flags).
# -ffp-contract=off (C++) and -fmad=false (CUDA): no fused multiply-adds, so that both
# devices round every product and sum alike and give the same bits, bilinear paths included.
# setup.py uses the same.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "-fmad=false"]


def _jit_build():
    from torch.utils import cpp_extension

    sources = [os.path.join(_CSRC, name) for name in ("rotation_batch.cpp", "emulated.cpp")]
    if torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None:
        sources.append(os.path.join(_CSRC, "rotation_batch_cuda.cu"))
    try:  # a private helper: only used to say that the first build takes a while
        build_dir = cpp_extension._get_build_directory(_JIT_NAME, verbose=False)
        cached = any(f.endswith(".so") for f in os.listdir(build_dir))
    except Exception:
        cached = True
    if not cached:
        print("rot_kernel: compiling the fused operator (once; about a minute)...", file=sys.stderr)
    cpp_extension.load(name=_JIT_NAME, sources=sources, extra_cflags=CXX_FLAGS,
                       extra_ldflags=["-fopenmp"], extra_cuda_cflags=NVCC_FLAGS, is_python_module=False)


def stale_build(module_dir, csrc=_CSRC):
    """Why the operator built into module_dir is older than the sources in csrc (None when
    they match, or when either is unknown: a build from before the fingerprint, no sources)."""
    try:
        with open(os.path.join(module_dir, "_C.sources")) as f:
            built = f.read().strip()
        now = fingerprint(csrc)
    except OSError:
        return None
    if built == now:
        return None
    return (f"rot_kernel: the prebuilt operator in {module_dir} was built from other sources than {csrc} "
            f"holds now (fingerprint {built}, now {now}); rebuild it: pip install --no-build-isolation -e .")


def _load():
    """Registers torch.ops.rot_kernel.rotation_batch; returns how it was obtained."""
    try:
        from . import _C  # noqa: F401  (built by setup.py; importing it registers the op)
        stale = stale_build(os.path.dirname(_C.__file__))
        if stale:  # it runs, but what runs is not what the sources say: tests would test the old one
            warnings.warn(stale, RuntimeWarning, stacklevel=3)
        return "prebuilt"
    except ImportError:
        pass
    try:
        _jit_build()
        return "jit"
    except Exception as err:  # no compiler, no ninja, a failed build: all end the same way
        lines = str(err).strip().splitlines() or [""]
        why = next((ln for ln in lines if "error" in ln.lower()), lines[-1]).strip()
        warnings.warn(f"rot_kernel: the fused operator could not be built ({type(err).__name__}: "
                      f"{why}); using the slow plain-torch reference instead",
                      RuntimeWarning, stacklevel=3)
        return None


_BUILD = _load()


def _has_kernel(device_type):
    return _BUILD is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "rot_kernel::rotation_batch", device_type.upper())


# Looked up once: torch.compile traces a dict lookup, not the dispatcher query.
_KERNELS = {device: _has_kernel(device) for device in ("cpu", "cuda")}


def backend():
    """Which implementation runs: e.g. 'cpu+cuda (prebuilt)', 'cpu (jit)' or 'reference'."""
    if _BUILD is None:
        return "reference"
    devices = "+".join(d for d, built in _KERNELS.items() if built)
    return f"{devices} ({_BUILD})"


if _BUILD is not None:
    @torch.library.register_fake("rot_kernel::rotation_batch")
    def _(images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last, size=None,
          boxes=None, check_bounds=True):
        _, _, _, (h, w) = reference.check_arguments(  # traced calls fail as eager ones do
            images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last, size,
            boxes, check_bounds)
        B = images.shape[0] if index is None else index.shape[0]
        R = len(rotations)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        batch = images.new_empty((B * R, images.shape[1], h, w), dtype=out_dtype).contiguous(memory_format=fmt)
        return batch, images.new_empty((B * R,), dtype=torch.int64)


_warned_devices = set()


def rotation_batch(images, index=None, shifts=None, flips=None, *, mean=None, std=None,
                   rotations=(0, 90, 180, 270), out_dtype=torch.float32, channels_last=False,
                   size=None, boxes=None, check_bounds=True):
    """The training batch of RotNet, built in one pass.

    images:   uint8 or float32 [N, C, H, W], CPU or CUDA, any strides
    index:    int64 [B], which images (None: all N, in order)
    shifts:   integer [B, 2], (dy, dx) per image: the view is the h x w window
              view[c, i, k] = image[c, i + dy, k + dx], 0 where that is outside the image
              (None: the window at (0, 0)). With size < (H, W), shifts in [0, H-h] x [0, W-w]
              are a random crop and ((H-h)//2, (W-w)//2) the centre crop.
    flips:    bool [B], horizontal flip per image, of the h x w view (after the crop)
    mean/std: C numbers each, in the scale of the input (None: 0 and 1)
    rotations: degrees, unique multiples of 45 in [0, 360); quarter turns are exact
               (torch.rot90), odd multiples of 45 bilinear with zeros outside; all but 0 and
               180 need a square output (h == w), whatever the source's shape
    out_dtype: float32, bfloat16 or float16; channels_last: the output's memory format
    size:     (h, w), the output's size, 1 <= h <= H, 1 <= w <= W (None: (H, W))
    boxes:    integer [B, 4] on the images' device, (top, left, height, width) per image: a
              non-empty box inside the image, resized to h x w as
              F.interpolate(box, (h, w), mode="bilinear", align_corners=False) without
              antialias (torchvision's RandomResizedCrop with antialias=False): output pixel d
              samples the box at (d + 0.5) * in/out - 0.5 along each axis, clamped below at 0,
              its upper neighbour clamped to the box's last row/column, so nothing outside
              the box is read (float32 weights; CPU and CUDA builds round alike, without
              fused multiply-adds). Not together with shifts.
    check_bounds: True: index and boxes are range-checked against the images (IndexError,
              ValueError); on CUDA that costs a device-to-host sync, which the CUDA kernel
              refuses (ValueError) on a stream being captured into a CUDA graph. False: the
              caller guarantees them and the CUDA kernel never syncs (a bad value is clamped
              into range: a wrong batch, never a read out of bounds); the CPU checks anyway,
              as it costs nothing. (The plain-torch reference, the fallback without a
              compiled kernel, syncs and indexes unclamped.)

    For each chosen image, in this order: crop (shift window or resized box), flip, turn,
    normalise, write once in out_dtype and the memory format.
    Returns batch [B*R, C, h, w] and labels int64 [B*R]: output b*R + r is image index[b]
    turned by rotations[r], with label r.
    """
    if not (isinstance(images, torch.Tensor) and _KERNELS.get(images.device.type)):
        if isinstance(images, torch.Tensor) and images.device.type not in _warned_devices and _BUILD:
            _warned_devices.add(images.device.type)
            warnings.warn(f"rot_kernel: no compiled kernel for {images.device.type}; using the "
                          "plain-torch reference", RuntimeWarning, stacklevel=2)
        return reference.rotation_batch(images, index, shifts, flips, mean=mean, std=std,
                                        rotations=rotations, out_dtype=out_dtype,
                                        channels_last=channels_last, size=size, boxes=boxes,
                                        check_bounds=check_bounds)
    mean, std, rotations, (h, w) = reference.check_arguments(
        images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last, size, boxes,
        check_bounds)
    # The ranges of index and boxes are checked by the op itself, next to the data.
    return torch.ops.rot_kernel.rotation_batch.default(
        images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last,
        None if size is None else [h, w], boxes, check_bounds)


def resized_crop_boxes(B, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10, generator=None,
                       device=None):
    """int64 [B, 4] (top, left, height, width), each drawn as torchvision's RandomResizedCrop
    draws its crop: up to `tries` draws of an area (a fraction of H*W uniform in `scale`) and an
    aspect ratio w/h (log-uniform in `ratio`), sides rounded; the first that fits wins, at a
    uniform position. If none fits: the largest centred crop whose ratio lies in `ratio`.
    The `boxes` argument of rotation_batch; drawn on `device` (default: that of `generator`)."""
    device = device if device is not None or generator is None else generator.device
    area = torch.empty(B, tries, dtype=torch.float64, device=device).uniform_(*scale, generator=generator) * (H * W)
    aspect = torch.empty(B, tries, dtype=torch.float64, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w = (area * aspect).sqrt().round().long()
    h = (area / aspect).sqrt().round().long()
    fits = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 where none does)
    h, w, fitted = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(1)
    if W / H < min(ratio):  # the fallback: the whole image, trimmed to the nearest allowed ratio
        fh, fw = round(W / min(ratio)), W
    elif W / H > max(ratio):
        fh, fw = H, round(H * max(ratio))
    else:
        fh, fw = H, W
    h, w = torch.where(fitted, h, fh), torch.where(fitted, w, fw)
    u = torch.rand(B, 2, dtype=torch.float64, generator=generator, device=device)
    top = torch.where(fitted, (u[:, 0] * (H - h + 1)).long(), (H - h) // 2)
    left = torch.where(fitted, (u[:, 1] * (W - w + 1)).long(), (W - w) // 2)
    return torch.stack([top, left, h, w], 1)
