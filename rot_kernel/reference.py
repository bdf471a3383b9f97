"""The rotation-batch operator in plain torch.

It is the definition the fused kernels are tested against and the fallback when they cannot
be built; `check_arguments` is the argument contract both follow. Written for clarity, not
speed: every step of the contract is one visible torch operation.
"""
import math
import numbers

import torch
import torch.nn.functional as F

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CHANNELS = 64
MAX_ROTATIONS = 8


def _per_image(t, name, images, kind, shape=None):
    """Checks a per-image tensor argument (index, shifts, flips, boxes)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device != images.device:
        raise RuntimeError(f"{name}: expected a tensor on {images.device} (the images' device), got {t.device}")
    if kind == "int" and (t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex):
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _per_channel(values, name, C, default):
    """mean/std as a list of C finite Python floats."""
    if values is None:
        return [float(default)] * C
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, numbers.Real):
        values = [values]
    values = list(values)
    if len(values) != C or not all(isinstance(v, numbers.Real) for v in values):
        raise ValueError(f"{name}: expected {C} numbers (one per channel), got {values!r}")
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: values must be finite, got {values}")
    return values


def _size(size, H, W):
    """size as (h, w): None means (H, W)."""
    if size is None:
        return H, W
    ints = isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(
        isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool) for v in size)
    if not ints or not all(v >= 1 for v in size):
        raise ValueError(f"size: expected two positive ints (h, w), got {size!r}")
    h, w = size
    if h > H or w > W:
        raise ValueError(f"size: {h}x{w} is larger than the images' {H}x{W}")
    return h, w


def check_arguments(images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last,
                    size=None, boxes=None, check_bounds=True):
    """Validates everything but the ranges of index and boxes (values on the device);
    returns mean, std and rotations as lists and the output's size as (h, w)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images: expected a 4-D tensor [N, C, H, W], got shape {list(images.shape)}")
    if images.dtype not in (torch.uint8, torch.float32):
        raise TypeError(f"images: expected uint8 or float32, got {images.dtype}")
    N, C, H, W = images.shape
    if C > MAX_CHANNELS:
        raise ValueError(f"images: at most {MAX_CHANNELS} channels are supported, got {C}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected float32, bfloat16 or float16, got {out_dtype}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last: expected a bool, got {type(channels_last).__name__}")
    if not isinstance(check_bounds, bool):
        raise TypeError(f"check_bounds: expected a bool, got {type(check_bounds).__name__}")
    h, w = _size(size, H, W)

    if isinstance(rotations, numbers.Integral):
        rotations = [rotations]
    rotations = list(rotations)
    if not 1 <= len(rotations) <= MAX_ROTATIONS:
        raise ValueError(f"rotations: expected 1 to {MAX_ROTATIONS} angles, got {len(rotations)}")
    for deg in rotations:
        if not isinstance(deg, numbers.Integral) or isinstance(deg, bool) or not 0 <= deg < 360 or deg % 45:
            raise ValueError(f"rotations: every angle must be a multiple of 45 in [0, 360), got {deg!r}")
        if deg % 180 and h != w:
            raise ValueError(f"rotations: a {deg} degree turn needs a square output, got {h}x{w}")
    if len(set(rotations)) != len(rotations):
        raise ValueError(f"rotations: angles must be unique, got {rotations}")

    if index is not None:
        _per_image(index, "index", images, "int")
        if index.dim() != 1:
            raise ValueError(f"index: expected a 1-D tensor, got shape {list(index.shape)}")
    B = N if index is None else index.shape[0]
    if shifts is not None:
        _per_image(shifts, "shifts", images, "int", (B, 2))
    if flips is not None:
        _per_image(flips, "flips", images, "bool", (B,))
    if boxes is not None:
        _per_image(boxes, "boxes", images, "int", (B, 4))
        if shifts is not None:
            raise ValueError("boxes and shifts: give one or the other (a box is resampled to the "
                             "output size, a shift moves a window of that size)")

    mean = _per_channel(mean, "mean", C, 0.0)
    std = _per_channel(std, "std", C, 1.0)
    if not all(s > 0 for s in std):
        raise ValueError(f"std: values must be > 0, got {std}")
    return mean, std, [int(d) for d in rotations], (h, w)


def check_index_range(index, N):
    if index is not None and index.numel() and not (0 <= int(index.min()) and int(index.max()) < N):
        bad = int(index.min()) if int(index.min()) < 0 else int(index.max())
        raise IndexError(f"index: values must lie in [0, {N}), got {bad}")


def check_box_range(boxes, H, W):
    """Every box (top, left, height, width) non-empty and inside the H x W images."""
    if boxes is None or not boxes.numel():
        return
    top, left, height, width = boxes.long().unbind(1)
    bad = (top < 0) | (left < 0) | (height < 1) | (width < 1) | (top > H - height) | (left > W - width)
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"boxes: box {b} (top, left, height, width) = {tuple(boxes[b].tolist())} "
                         f"is empty or not inside the {H}x{W} images")


def shifted_flipped_view(images, shifts, flips, size=None):
    """The h x w window at (dy, dx), mirrored where flipped: view[b, c, i, k] =
    images[b, c, i + dy, k' + dx] with k' = w-1-k if flipped else k, and 0 outside the images."""
    B, C, H, W = images.shape
    h, w = size or (H, W)
    rows = torch.arange(h, device=images.device).expand(B, h)
    cols = torch.arange(w, device=images.device).expand(B, w)
    if flips is not None:
        cols = torch.where(flips[:, None], w - 1 - cols, cols)
    if shifts is not None:
        rows = rows + shifts[:, :1].long()
        cols = cols + shifts[:, 1:].long()
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
    picked = images[torch.arange(B, device=images.device)[:, None, None], :,
                    rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]  # [B, h, w, C]
    return (picked * inside[..., None]).permute(0, 3, 1, 2)


def resized_flipped_view(images, boxes, flips, size):
    """Each image's box (top, left, height, width) resized to h x w by bilinear interpolation,
    align_corners=False and no antialias (torchvision's RandomResizedCrop with antialias off),
    then mirrored where flipped. Only the box is read: PyTorch's rule puts output pixel d at
    source coordinate (d + 0.5) * in/out - 0.5 (in float32, in/out = box side / output side),
    clamped below at 0, with the upper neighbour clamped to the box's last row/column, so the
    box's border pixels are replicated. The fused kernels compute the same taps and weights
    but round every product and sum (no fused multiply-adds, which PyTorch's CPU build uses),
    so they differ from this by float rounding, never by a pixel."""
    views = []
    for image, (top, left, height, width) in zip(images, boxes.tolist()):
        box = image[None, :, top:top + height, left:left + width].float().contiguous()
        views.append(F.interpolate(box, size=tuple(size), mode="bilinear", align_corners=False,
                                   antialias=False)[0])
    view = torch.stack(views) if views else images.new_zeros((0, images.shape[1], *size)).float()
    if flips is not None:
        view = torch.where(flips[:, None, None, None], view.flip(-1), view)
    return view


def turn(view, deg):
    """Counter-clockwise turn: exact for quarter turns, bilinear with zeros outside otherwise."""
    if deg % 90 == 0:
        return torch.rot90(view, deg // 90, dims=(-2, -1))
    a = math.radians(deg)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                         dtype=view.dtype, device=view.device).expand(view.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(view.shape), align_corners=False)
    return F.grid_sample(view, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation_batch(images, index=None, shifts=None, flips=None, *, mean=None, std=None,
                   rotations=(0, 90, 180, 270), out_dtype=torch.float32, channels_last=False,
                   size=None, boxes=None, check_bounds=True):
    """Same contract as rot_kernel.rotation_batch, in plain torch.

    For each chosen image: crop (the h x w window at the shift, or the box resized to h x w),
    flip, turn, normalise, store. check_bounds=False skips the range checks of index and
    boxes on CUDA (the CPU checks always: it costs nothing there).
    """
    mean, std, rotations, size = check_arguments(images, index, shifts, flips, mean, std, rotations,
                                                 out_dtype, channels_last, size, boxes, check_bounds)
    N, C, H, W = images.shape
    if check_bounds or images.device.type == "cpu":
        check_index_range(index, N)
        check_box_range(boxes, H, W)
    chosen = images if index is None else images[index]
    B = chosen.shape[0]
    h, w = size
    R = len(rotations)
    labels = torch.arange(R, device=images.device).repeat(B)
    if chosen.numel() == 0:
        empty = torch.empty(B * R, C, h, w, dtype=out_dtype, device=images.device)
        return empty.contiguous(memory_format=torch.channels_last) if channels_last else empty, labels
    if boxes is not None:
        view = resized_flipped_view(chosen, boxes, flips, size)
    else:
        view = shifted_flipped_view(chosen.float(), shifts, flips, size)
    turned = torch.stack([turn(view, deg) for deg in rotations], dim=1).reshape(B * R, C, h, w)
    m = torch.tensor(mean, device=images.device)[:, None, None]
    s = torch.tensor(std, device=images.device)[:, None, None]
    batch = ((turned - m) / s).to(out_dtype)
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), labels
