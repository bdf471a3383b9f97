"""rot_kernel: the fused rotation-batch operator of RotNet.

    batch, labels = rotation_batch(images, index, shifts, flips, mean=..., std=...)

turns uint8 (or float32) images [N, C, H, W] into the normalised, shifted, flipped and
rotated training batch [B*R, C, H, W] in one pass; see rotation_batch's docstring.

The compiled operator comes from `pip install --no-build-isolation -e .` (rot_kernel._C),
else from a just-in-time build cached under TORCH_EXTENSIONS_DIR; if neither works the
plain-torch reference stands in, with one warning.
"""
import os
import sys
import warnings

import torch

from . import reference

__all__ = ["rotation_batch", "backend", "reference"]

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_JIT_NAME = "rot_kernel_jit"
# -fopenmp: at::parallel_for is serial without it; -fno-trapping-math: lets the compiler
# vectorise the float16 store (nothing here reads floating-point exception flags).
# setup.py uses the same.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]


def _jit_build():
    from torch.utils import cpp_extension

    sources = [os.path.join(_CSRC, "rotation_batch.cpp")]
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
                       extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"], is_python_module=False)


def _load():
    """Registers torch.ops.rot_kernel.rotation_batch; returns how it was obtained."""
    try:
        from . import _C  # noqa: F401  (built by setup.py; importing it registers the op)
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
    def _(images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last):
        reference.check_arguments(images, index, shifts, flips, mean, std, rotations, out_dtype,
                                  channels_last)  # traced calls fail as eager ones do
        B = images.shape[0] if index is None else index.shape[0]
        R = len(rotations)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        batch = images.new_empty((B * R, *images.shape[1:]), dtype=out_dtype).contiguous(memory_format=fmt)
        return batch, images.new_empty((B * R,), dtype=torch.int64)


_warned_devices = set()


def rotation_batch(images, index=None, shifts=None, flips=None, *, mean=None, std=None,
                   rotations=(0, 90, 180, 270), out_dtype=torch.float32, channels_last=False):
    """The training batch of RotNet, built in one pass.

    images:   uint8 or float32 [N, C, H, W], CPU or CUDA, any strides
    index:    int64 [B], which images (None: all N, in order)
    shifts:   integer [B, 2], (dy, dx) per image; pixels shifted in from outside are 0
    flips:    bool [B], horizontal flip per image (after the shift)
    mean/std: C numbers each, in the scale of the input (None: 0 and 1)
    rotations: degrees, unique multiples of 45 in [0, 360); quarter turns are exact
               (torch.rot90), odd multiples of 45 bilinear with zeros outside
    out_dtype: float32, bfloat16 or float16; channels_last: the output's memory format

    Returns batch [B*R, C, H, W] and labels int64 [B*R]: output b*R + r is image index[b]
    turned by rotations[r], with label r.
    """
    if not (isinstance(images, torch.Tensor) and _KERNELS.get(images.device.type)):
        if isinstance(images, torch.Tensor) and images.device.type not in _warned_devices and _BUILD:
            _warned_devices.add(images.device.type)
            warnings.warn(f"rot_kernel: no compiled kernel for {images.device.type}; using the "
                          "plain-torch reference", RuntimeWarning, stacklevel=2)
        return reference.rotation_batch(images, index, shifts, flips, mean=mean, std=std,
                                        rotations=rotations, out_dtype=out_dtype,
                                        channels_last=channels_last)
    mean, std, rotations = reference.check_arguments(images, index, shifts, flips, mean, std,
                                                     rotations, out_dtype, channels_last)
    # The index range is checked by the op itself, next to the data.
    return torch.ops.rot_kernel.rotation_batch.default(images, index, shifts, flips, mean, std,
                                                       rotations, out_dtype, channels_last)
