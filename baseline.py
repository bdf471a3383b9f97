"""The conventional input pipeline, kept only as the baseline that `python rotnet.py --benchmark
--baseline` (and `--sweep`) times the fused operator against; training never uses it.

It is what the original RotNet code did, written as a user would write it today: a torch
DataLoader whose worker processes take one uint8 image at a time on the CPU through a pad-4
random crop, a random horizontal flip, the quarter turns and normalisation; the batch is
collated there, handed over in pinned memory and copied to the device asynchronously. Its
batches are laid out as rot_kernel.rotation_batch's: image b's rotation r at b*R + r.
"""
import os
import signal

import torch
import torch.nn.functional as F

from data import PAD

WORKERS = min(8, os.cpu_count() or 1)  # worker processes, by default
PREFETCH = 4  # batches each worker keeps ready, so that one slow batch does not stall the step


def rotated_views(image, dy, dx, flip, *, rotations, mean, std):
    """One uint8 image [C, H, W] -> its R views, float32 [R, C, H, W]: the H x W window at
    (dy, dx) of the image zero-padded by PAD, mirrored if flip, turned counter-clockwise by
    each of rotations (quarter turns, as torch.rot90), normalised by mean and std (0-255)."""
    H, W = image.shape[-2:]
    x = F.pad(image, (PAD, PAD, PAD, PAD))[:, PAD + dy:PAD + dy + H, PAD + dx:PAD + dx + W]
    if flip:
        x = x.flip(-1)
    x = torch.stack([torch.rot90(x, deg // 90, dims=(-2, -1)) for deg in rotations])
    mean, std = torch.as_tensor(mean)[:, None, None], torch.as_tensor(std)[:, None, None]
    return (x.float() - mean) / std


class RotatedImages(torch.utils.data.Dataset):
    """Image i, freshly cropped and flipped at random, as its R rotated views and their labels."""

    def __init__(self, images, *, rotations, mean, std):
        self.images, self.rotations = images, rotations
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        dy, dx = torch.randint(-PAD, PAD + 1, (2,)).tolist()
        flip = bool(torch.rand(()) < 0.5)
        views = rotated_views(self.images[i], dy, dx, flip, rotations=self.rotations, mean=self.mean, std=self.std)
        return views, torch.arange(len(self.rotations))


def loader(images, *, batch_size, draws, workers, pin_memory, seed, rotations, mean, std):
    """Batches of `draws` random picks of the uint8 images [N, C, H, W] (CPU), each batch
    ([B, R, C, H, W] views, [B, R] labels) collated by a worker process."""
    dataset = RotatedImages(images, rotations=rotations, mean=mean, std=std)
    g = torch.Generator().manual_seed(seed)  # the order and the workers' crops and flips
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=torch.utils.data.RandomSampler(dataset, num_samples=draws, generator=g),
        num_workers=workers, persistent_workers=True, prefetch_factor=PREFETCH, pin_memory=pin_memory, drop_last=True,
        generator=g, worker_init_fn=_default_sigterm)


def _default_sigterm(worker_id):
    # A worker dies of SIGTERM (sent to the whole group by `timeout`, say) rather than
    # raising run_job's Terminated with a traceback of its own: the main process says it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def to_device(ctx, views, labels):
    """A collated batch -> the step's [B*R, C, H, W] batch and [B*R] labels on ctx's device,
    laid out as ctx.batch lays out its own."""
    x = views.flatten(0, 1).to(ctx.device, non_blocking=True)  # from pinned memory: does not wait
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels.flatten().to(ctx.device, non_blocking=True)


if __name__ == "__main__":  # a module of the benchmark, which takes rotnet.py's settings
    raise SystemExit("baseline.py is timed through rotnet.py: python rotnet.py --benchmark --baseline "
                     "(python rotnet.py --help lists the settings)")
