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
    """Checks a per-image tensor argument (index, shifts, flips)."""
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


def check_arguments(images, index, shifts, flips, mean, std, rotations, out_dtype, channels_last):
    """Validates everything but the index range; returns (mean, std, rotations) as lists."""
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

    if isinstance(rotations, numbers.Integral):
        rotations = [rotations]
    rotations = list(rotations)
    if not 1 <= len(rotations) <= MAX_ROTATIONS:
        raise ValueError(f"rotations: expected 1 to {MAX_ROTATIONS} angles, got {len(rotations)}")
    for deg in rotations:
        if not isinstance(deg, numbers.Integral) or isinstance(deg, bool) or not 0 <= deg < 360 or deg % 45:
            raise ValueError(f"rotations: every angle must be a multiple of 45 in [0, 360), got {deg!r}")
        if deg % 180 and H != W:
            raise ValueError(f"rotations: a {deg} degree turn needs square images, got {H}x{W}")
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

    mean = _per_channel(mean, "mean", C, 0.0)
    std = _per_channel(std, "std", C, 1.0)
    if not all(s > 0 for s in std):
        raise ValueError(f"std: values must be > 0, got {std}")
    return mean, std, [int(d) for d in rotations]


def check_index_range(index, N):
    if index is not None and index.numel() and not (0 <= int(index.min()) and int(index.max()) < N):
        bad = int(index.min()) if int(index.min()) < 0 else int(index.max())
        raise IndexError(f"index: values must lie in [0, {N}), got {bad}")


def shifted_flipped_view(images, shifts, flips):
    """view[b, c, i, k] = images[b, c, i + dy, k' + dx] (k' = W-1-k if flipped), 0 outside."""
    B, C, H, W = images.shape
    rows = torch.arange(H, device=images.device).expand(B, H)
    cols = torch.arange(W, device=images.device).expand(B, W)
    if flips is not None:
        cols = torch.where(flips[:, None], W - 1 - cols, cols)
    if shifts is not None:
        rows = rows + shifts[:, :1].long()
        cols = cols + shifts[:, 1:].long()
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
    picked = images[torch.arange(B, device=images.device)[:, None, None], :,
                    rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]  # [B, H, W, C]
    return (picked * inside[..., None]).permute(0, 3, 1, 2)


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
                   rotations=(0, 90, 180, 270), out_dtype=torch.float32, channels_last=False):
    """Same contract as rot_kernel.rotation_batch, in plain torch."""
    mean, std, rotations = check_arguments(images, index, shifts, flips, mean, std, rotations,
                                           out_dtype, channels_last)
    check_index_range(index, images.shape[0])
    chosen = images if index is None else images[index]
    B, C, H, W = chosen.shape
    R = len(rotations)
    labels = torch.arange(R, device=images.device).repeat(B)
    if chosen.numel() == 0:
        empty = torch.empty(B * R, C, H, W, dtype=out_dtype, device=images.device)
        return empty.contiguous(memory_format=torch.channels_last) if channels_last else empty, labels
    view = shifted_flipped_view(chosen.float(), shifts, flips)
    turned = torch.stack([turn(view, deg) for deg in rotations], dim=1).reshape(B * R, C, H, W)
    m = torch.tensor(mean, device=images.device)[:, None, None]
    s = torch.tensor(std, device=images.device)[:, None, None]
    batch = ((turned - m) / s).to(out_dtype)
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), labels
