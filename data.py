"""Where a run's images come from and how they reach the device.

    dataset = load("./data", image_size=256)        # CIFAR-10, or an image folder prepared once
    split = on_device(dataset.train_x, device)      # held on the device, or streamed to it
    for images, index in split.batches(perm, slices):
        ...  # rot_kernel.rotation_batch(images, index, ...) builds the step's batch

`--data` is CIFAR-10 in its python format (cifar.py) or a folder of images (listed by
listing.py, decoded once by folders.py into a memory-mapped uint8 file). Either way a split
is uint8 [N, 3, S, S] on the CPU. A split that fits on the device (with room to train) is
copied there once and batches index it; a larger one is streamed: a background thread
gathers the next step's images from the file into pinned memory and copies them on a side
stream while the current step runs. Both give the same batches for the same draws.
"""
import contextlib
import ctypes
import hashlib
import io
import json
import os
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import cifar
import folders
import listing
import rot_kernel
from errors import UserError

PAD = 4                # pad-crop (CIFAR's recipe): zero-pad 4 and crop at the source's size
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # resized-crop: area share and aspect, as torchvision's
RESIDENT_SHARE = 0.5   # a split is held on the GPU if it takes at most this share of free memory
PREFETCH = 3           # streamed batches in flight ahead of the step that uses them


@dataclass(frozen=True)
class Dataset:
    train_x: torch.Tensor            # uint8 [N, 3, S, S], CPU (memory-mapped for folders)
    train_y: Optional[torch.Tensor]  # int64 [N]; None for a folder of unlabelled images
    test_x: torch.Tensor             # CIFAR-10's test split, or the folder's val split
    test_y: Optional[torch.Tensor]
    mean: tuple                      # per channel, 0-255 scale: what batches are normalised by
    std: tuple
    classes: tuple
    fingerprint: str = ""            # which images, in which split, with which labels (config.json)
    cache: Optional[str] = None      # the folder a folder of images was prepared in (absolute)

    def require_labels(self, what):
        """self, refused (what names the run, for the message) without labels or with fewer
        than 2 classes. load(labels_for=...) refuses such a folder from its listing, before it
        is prepared; this also catches one that lost a class to images that could not be read."""
        require_classes(what, None if self.train_y is None else self.train_y.unique().tolist(), self.classes,
                        None if self.test_y is None else self.test_y.unique().tolist())
        return self


def require_classes(what, labels, classes, test_labels=()):
    """Refuses training images that are unlabelled (labels None) or of fewer than 2 classes
    (the labels present, indices into classes): one class is 100 % whatever is learnt. And a
    class tested but never trained (test_labels, likewise): its test images would all be
    wrong, the accuracy capped below 100 % by a gap in the folder, not by what was learnt."""
    if labels is None:
        raise UserError(f"{what} needs labels, but the data is a folder of unlabelled images: "
                        "give a folder of class subfolders (or train/ and val/ of them)")
    present = sorted(set(labels))
    if len(present) < 2:
        named = f" ({classes[present[0]]})" if present and present[0] < len(classes) else ""
        raise UserError(f"{what} needs images of at least 2 classes, but {'only one' if present else 'no'} class "
                        f"folder{named} holds training images: give a folder with a subfolder per class")
    untrained = sorted(set(test_labels or ()) - set(present))
    if untrained:
        names = ", ".join(classes[c] for c in untrained[:3]) + (", ..." if len(untrained) > 3 else "")
        raise UserError(f"{what} would be tested on {len(untrained)} class{'es' if len(untrained) > 1 else ''} "
                        f"({names}) with no training images (none, or none readable): give "
                        f"{'them' if len(untrained) > 1 else 'it'} training images, or take "
                        f"{'their' if len(untrained) > 1 else 'its'} test images out")


def as_tensor(array):
    with warnings.catch_warnings():  # a read-only memory map: torch warns, but nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def load(data, *, image_size=256, download=False, cache=None, val_fraction=0.1, recipe=None, labels_for=None):
    """The data set in --data: CIFAR-10 (image_size is then 32), or an image folder,
    prepared into `cache` on first use at image_size x image_size. Checked before a folder is
    prepared, which can take hours: against recipe, how the run crops, the images' size; and,
    given labels_for (the run that needs them, for the message), that they have labels."""
    data = os.path.expanduser(data)  # (the shell leaves --data=~/pictures as it is)
    if not os.path.exists(data) and not download:  # before any guess at which data set it is
        raise UserError(f"{data}: no such folder (--data is CIFAR-10's folder, the folder holding it "
                        "or its archive, or a folder of images; --download fetches CIFAR-10)")
    if listing.is_image_folder(data):
        dataset = _load_folder(data, image_size, cache, val_fraction, recipe, labels_for)
    else:
        dataset = _load_cifar(data, download, recipe)
    return dataset.require_labels(labels_for) if labels_for else dataset


def _load_cifar(data, download, recipe):
    train_x, train_y, test_x, test_y = cifar.load_cifar(data, download)
    if recipe is not None:
        recipe.check(*train_x.shape[-2:])
    # the labels tell the full set from a sample of it, and cost nothing to hash
    fingerprint = digest(train_y.numpy().tobytes(), b"|", test_y.numpy().tobytes())
    return Dataset(train_x, train_y, test_x, test_y, cifar.MEAN, cifar.STD, cifar.CLASSES, fingerprint)


def _load_folder(data, image_size, cache, val_fraction, recipe, labels_for):
    if recipe is not None:
        recipe.check(image_size, image_size)
    # The held-out images are drawn with folders.prepare's fixed seed, not --seed: runs of
    # every seed test on the same images. Labels are checked from the listing, before preparing.
    p = folders.prepare(data, image_size=image_size, cache=cache, val_fraction=val_fraction, need_val=True,
                        check=labels_for and (lambda *listed: require_listed_labels(labels_for, *listed)))
    labels = lambda y: None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))
    if len(p.val.images) == 0:  # held out (need_val), but none of them could be decoded
        raise UserError(f"{data}: none of the {len(p.manifest['splits']['val']['sources']):,} images held out for "
                        f"testing could be read (reasons in {os.path.join(p.root, 'manifest.json')})")
    # A channel that never varies (all-black pictures, one stain saved as RGB) has std 0: it is
    # 0 once centred, whatever it is divided by, and a grey level is the least a std may be.
    std = tuple(max(s, 1.0) for s in p.std)
    fingerprint = folder_fingerprint(p.classes, {s: p.manifest["splits"][s]["sources"] for s in listing.SPLITS})
    return Dataset(as_tensor(p.train.images), labels(p.train.labels), as_tensor(p.val.images), labels(p.val.labels),
                   tuple(p.mean), std, tuple(p.classes), fingerprint, cache=p.root)


def identity(data, *, image_size=256, val_fraction=0.1, download=False, labels_for=None):
    """What tells runs made on load(...)'s data from runs made on other data, as config.json
    records it: its fingerprint (load(...).fingerprint), and the settings that change its images
    (image_size, for a folder; val_fraction, for one whose val is drawn). Without preparing an
    image folder: from a listing of its files (a table whose runs are all finished need not
    prepare ImageNet again to check them), which labels_for checks as load does."""
    data = os.path.expanduser(data)
    if not listing.is_image_folder(data):  # CIFAR-10: loaded, which takes a second
        return dict(data_fingerprint=load(data, download=download, labels_for=labels_for).fingerprint)
    with contextlib.redirect_stderr(io.StringIO()):  # (its notes are printed when it is prepared)
        layout, classes, sources = listing.find_sources(os.path.abspath(data), val_fraction)
    if labels_for:
        require_listed_labels(labels_for, layout, classes, sources)
    held_out = dict(val_fraction=val_fraction) if layout in listing.HELD_OUT else {}
    return dict(data_fingerprint=folder_fingerprint(classes, sources), image_size=image_size, **held_out)


def require_listed_labels(what, layout, classes, sources):
    """require_classes on a folder's listing (listing.find_sources), before it is prepared."""
    unlabelled = layout in listing.UNLABELLED
    require_classes(what, None if unlabelled else [label for *_, label in sources["train"]], classes,
                    None if unlabelled else [label for *_, label in sources["val"]])


def folder_fingerprint(classes, sources):
    """"NAMES.SIZES": which files, labelled how, in which split, then their sizes; not their
    times, which a copy of the folder changes. So a file added or moved to val/ is seen, and
    one edited in place by its size (as a compressed picture saved again nearly always is; a
    BMP keeps its size); not the size they are prepared at, a setting of the run (image_size).
    sources: {split: [path, size, mtime_ns, label] of each file}, as listing.find_sources
    gives them."""
    which = [[(path, label) for path, _, _, label in sources[s]] for s in listing.SPLITS]
    sizes = [[size for _, size, _, _ in sources[s]] for s in listing.SPLITS]
    # (ASCII: odd names are escaped)
    return digest(json.dumps([list(classes), *which]).encode()) + "." + digest(json.dumps(sizes).encode())


def same_images(recorded, found):
    """Whether a run's recorded data_fingerprint is that of the data found. One recorded
    before folders' sizes were (NAMES alone, before 2026-12-07) is matched on the names."""
    return recorded == found or (isinstance(recorded, str) and isinstance(found, str) and "." not in recorded
                                 and found.split(".")[0] == recorded)


def digest(*parts):
    """The start of the SHA-256 of the bytes in parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Recipe:
    """How an epoch views each image (a crop, then a flip) and how testing views it, as
    rotation_batch arguments:
      pad-crop      zero-pad PAD and crop at the source's size (CIFAR, the NIN)
      random-crop   a random size x size window (the AlexNet probes: 256 -> 224)
      resized-crop  RandomResizedCrop to size x size (AlexNet pretraining)
    Testing sees the centre size x size window (pad-crop: the whole image)."""
    kind: str = "pad-crop"
    size: Optional[int] = None

    def out_size(self, H, W):
        return (H, W) if self.size is None else (self.size, self.size)

    def check(self, H, W):
        if self.size is not None and self.size > min(H, W):
            raise UserError(f"the images are {H}x{W}, smaller than this recipe's {self.size}x{self.size} crop: "
                            f"give an image folder prepared at --image-size {self.size} or more (CIFAR-10's 32x32 "
                            "images are for the NIN)")

    def draws(self, n, epoch, seed, device, H, W, count=None):
        """The epoch's order of n images (count draws: the images cycled in fresh orders, for
        a small labelled set) and each draw's crop and flip: a function of (seed, epoch)
        alone, so a resumed run draws exactly what the uninterrupted one did."""
        count = count or n
        # seed and epoch mixed into one number, far apart so (seed, epoch) pairs never collide
        g = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
        perm = torch.cat([torch.randperm(n, generator=g, device=device) for _ in range(-(-count // n))])[:count]
        h, w = self.out_size(H, W)
        if self.kind == "pad-crop":
            view = dict(shifts=torch.randint(-PAD, PAD + 1, (count, 2), generator=g, device=device))
        elif self.kind == "random-crop":
            dy = torch.randint(0, H - h + 1, (count, 1), generator=g, device=device)
            view = dict(shifts=torch.cat([dy, torch.randint(0, W - w + 1, (count, 1), generator=g, device=device)], 1))
        else:
            view = dict(boxes=rot_kernel.resized_crop_boxes(count, H, W, SCALE, RATIO, generator=g, device=device))
        view["flips"] = torch.rand(count, generator=g, device=device) < 0.5
        return perm, view

    def test_view(self, count, H, W, device):
        h, w = self.out_size(H, W)
        # Filled on the device: a copy from host memory would wait for the GPU every batch.
        shifts = torch.empty((count, 2), dtype=torch.long, device=device)
        shifts[:, 0], shifts[:, 1] = (H - h) // 2, (W - w) // 2
        return dict(shifts=shifts)


# ----------------------------------------------------------------------------- on the device
def on_device(images, device, stream=None):
    """Resident (copied to the device once) or Streamed. stream=None decides by size: on the
    CPU a split is always resident (a memory map is paged in by the OS as batches read it)."""
    device = torch.device(device)
    if stream is None:
        stream = device.type == "cuda" and images.nbytes > RESIDENT_SHARE * free_memory(device)
    return Streamed(images, device) if stream else Resident(images.to(device))


def free_memory(device):
    """Bytes a new tensor can take on a CUDA device: what the driver has free, and what this
    process's allocator holds cached but unused (the driver counts it as taken; an earlier
    model in the same process, a table's previous probe say, leaves it there)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class Resident:
    """A split on the device: each step's batch is built from it by index."""

    def __init__(self, images):
        self.images, self.shape = images, images.shape

    def __len__(self):
        return len(self.images)

    def batches(self, order, slices):
        for s in slices:
            yield self.images, order[s]


class Streamed:
    """A split left on the host: a thread gathers each step's images (order[s]) into pinned
    memory and copies them to the device on its own stream, PREFETCH steps ahead. The host
    buffers are a ring reused from step to step (fresh ones of tens of MB cost more in page
    faults than the gather itself), so on the CPU a batch is valid until the next is drawn."""

    def __init__(self, images, device):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # the gathering thread sets it: it needs a number
            device = torch.device("cuda", torch.cuda.current_device())
        self.images, self.device, self.shape = images, device, images.shape
        self.copies = torch.cuda.Stream(device) if self.cuda else None
        self.ring = [None] * (PREFETCH + 2)  # (buffer, copy event): in the queue, at the step, being filled

    def __len__(self):
        return len(self.images)

    def batches(self, order, slices):
        """(batch, None) for each slice of order; one epoch at a time (the ring is shared)."""
        order = order.cpu()  # one sync an epoch, not one a step
        ready, stop, ring = queue.Queue(PREFETCH), threading.Event(), self.ring

        def offer(item):  # waits for room, unless the consumer has left
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    pass

        def gather():
            # A new thread starts on GPU 0: on another rank's GPU, its stream switches would
            # otherwise make a CUDA context on GPU 0 (hundreds of MB for each rank).
            try:
                if self.cuda:
                    torch.cuda.set_device(self.device)
                for step, s in enumerate(slices):
                    if stop.is_set():  # the consumer has left (an error, Ctrl-C): read no more
                        return
                    index = order[s]
                    slot = step % len(ring)
                    buffer, copied = ring[slot] or (None, None)
                    if copied is not None:
                        copied.synchronize()  # its last copy to the device is done: free to refill
                    if buffer is None or len(buffer) < len(index):
                        buffer = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8,
                                             pin_memory=self.cuda)
                    host = buffer[:len(index)]  # the ring keeps the whole buffer: an epoch's short
                    torch.index_select(self.images, 0, index, out=host)  # last batch does not shrink it
                    if not self.cuda:
                        ring[slot] = (buffer, None)
                        offer((host, None))
                        continue
                    with torch.cuda.stream(self.copies):
                        batch = host.to(self.device, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record()
                    ring[slot] = (buffer, done)
                    offer((batch, done))
                offer(None)
            except BaseException as err:  # handed to the training thread, raised there
                offer(err)

        worker = threading.Thread(target=gather, daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                batch, done = item
                if done is not None:  # the step's stream waits for the copy, not the host
                    torch.cuda.current_stream(self.device).wait_event(done)
                    batch.record_stream(torch.cuda.current_stream(self.device))
                yield batch, None
        finally:
            stop.set()
            worker.join()


def keep_freed_memory():
    """glibc hands big freed blocks (activations, batches) back to the OS at once, and the
    next step faults them in again page by page: on the CPU that was a third of each step.
    Keeping them mapped makes reuse free."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)     # M_MMAP_THRESHOLD: serve blocks below 1 GiB from the heap
        libc.mallopt(-1, 2**31 - 1)   # M_TRIM_THRESHOLD: and do not shrink it
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def benchmark(data_dir, *, image_size=256, batch_size=192, steps=50, device="cpu", cache=None, val_fraction=0.1):
    """The loader alone: images/s from a prepared folder's file into device batches (random
    order, as training reads it), with the page cache cold (the file's pages dropped
    first) and then warm. Prints one JSON line and returns it."""
    p = folders.prepare(data_dir, image_size=image_size, cache=cache, val_fraction=val_fraction)
    keep_freed_memory()  # as a CPU training run does: batch buffers are reused, not faulted in anew
    images = as_tensor(p.train.images)
    source = on_device(images, device, stream=True)
    order = torch.randperm(len(images))
    slices = [s for _, s in zip(range(steps), ((slice(i, i + batch_size)) for i in range(0, len(images), batch_size)))]
    if len(slices) < steps:
        made = f"{len(slices)} batch" + ("es" if len(slices) != 1 else "")
        print(f"note: {len(images):,} training images make {made} of up to {batch_size}, not {steps}: timing those",
              file=sys.stderr)
    result = dict(images=len(images), image_size=image_size, batch_size=batch_size, steps=len(slices), device=str(device),
                  file_GB=round(images.numel() / 1e9, 3))
    for cache_state in ("cold", "warm"):
        if cache_state == "cold":  # drop the file's pages: reads go to the disk
            fd = os.open(os.path.join(p.root, "train.u8"), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t0 = time.perf_counter()
        n = sum(len(batch) for batch, _ in source.batches(order, slices))
        if source.cuda:
            torch.cuda.synchronize(device)
        result[f"{cache_state}_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import argparse
    # Only here: cli imports this module (through runs and train), but this module does not
    # import cli at import time, so there is no cycle (cli imports a second copy, as "data").
    from cli import positive_float, positive_int, run_job, user_path
    from train import resolve_device
    ap = argparse.ArgumentParser(description="Loader benchmark: a prepared image folder into device batches")
    ap.add_argument("--data", required=True, type=user_path, help="a folder of images (prepared on first use)")
    ap.add_argument("--image-size", type=positive_int, default=256)
    ap.add_argument("--batch-size", type=positive_int, default=192)
    ap.add_argument("--steps", type=positive_int, default=50)
    ap.add_argument("--cache", type=user_path)
    ap.add_argument("--val-fraction", type=positive_float, default=0.1,
                    help="as the training scripts' (the prepared folder depends on it)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args()

    def loader_benchmark():
        device = resolve_device(a.device)
        if os.path.isdir(a.data) and not listing.is_image_folder(a.data):  # a missing one: prepare says so
            raise UserError(f"{a.data} is not a folder of images: the loader benchmark is for image folders "
                            "(CIFAR-10 is held in memory, nothing to benchmark)")
        benchmark(a.data, image_size=a.image_size, batch_size=a.batch_size, steps=a.steps, device=device,
                  cache=a.cache, val_fraction=a.val_fraction)

    run_job(loader_benchmark)  # (a preparation stopped by Ctrl-C keeps what it decoded)
