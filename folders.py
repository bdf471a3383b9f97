"""Image folders prepared once into a memory-mapped uint8 file that training reads at memory speed.

    prepared = folders.prepare("~/imagenet", image_size=256)
    prepared.train.images    # np.memmap uint8 [N, 3, S, S], read-only
    prepared.train.labels    # np.int64 [N], or None for a flat folder of unlabelled images

Layouts of the data folder (hidden files and folders, macOS's __MACOSX, files of other extensions,
and pipes or devices named like images are ignored):
  train-val  DIR/train/<class>/... and DIR/val/<class>/... (ImageNet's, val sorted into classes;
             the names in any case, also training/, validation/, valid/). The classes are train's
             class folders; val_fraction and seed are not used.
  classes    DIR/<class>/...: val_fraction of each class held out for val at random (seeded). A
             class may be called train/ (of images only) where two or more others stand beside it.
  flat       DIR/*.jpg: unlabelled; val_fraction of the images held out for val at random.
  flat-train-val  DIR/train/*.jpg and DIR/val/*.jpg: unlabelled, split by their folders.
A class folder is searched recursively; sources are taken in the order of their relative paths.
A file reached twice (through links, or hard links) is read once; one reached in two classes or
two splits is refused: it would be tested on, or taught as two classes.

Each image: decoded by Pillow (JPEG, PNG, WebP, BMP or TIFF, whatever its extension says), its EXIF
orientation applied, turned into RGB, its shorter side resized to S and the centre S x S kept.
- Resizing is Pillow's BILINEAR, antialiased: what the original RotNet code got from
  torchvision's Resize on ImageNet. JPEGs are first decoded at 1/2, 1/4 or 1/8 scale (draft mode)
  when that still leaves the shorter side >= S: much faster, nearly the same pixels.
- Alpha is composited over black: a transparent background becomes one plain colour instead of
  whatever colours happen to lie under it. 16-bit grayscale keeps its high byte (as Pillow does
  for 16-bit RGB), 32-bit integer grayscale too unless it holds only 0-255, float grayscale in
  [0, 1] is scaled to 0-255; grayscale, palette and CMYK go through Pillow's own conversion.
- A file Pillow cannot read (corrupt, truncated, not an image, a decompression bomb) is skipped and
  listed in the manifest with its reason; it never stops the preparation.

The cache folder (default prepared/<name of DIR>-<S>; one that holds another folder's
preparation is refused rather than written over):
  manifest.json       settings, data path, layout, classes, per split the source list
                      [path, size, mtime_ns, label], the skipped files, counts, mean and std (per
                      channel, 0-255, over the training images); "complete": true once finished
  train.u8, val.u8    the images, raw uint8 [N, 3, S, S] (shape in the manifest)
  train.labels.npy    int64 [N] (and val.labels.npy); absent for a flat folder
While preparing, per split: <split>.done (uint8 per source: 0 to do, 1 stored, 2 unreadable),
<split>.sums (int64 per source: channel sums and sums of squares, for mean and std) and
<split>.skipped.jsonl (the reasons); they are deleted at the end.

A complete cache is reused while the settings and every source's path, size and mtime match; any
difference rebuilds it from scratch (one line says why). One this process may not write in (shared
read-only) is used as it is, when it matches. A killed preparation resumes where it
stopped. Nothing in the data folder is ever written.
"""
import contextlib
import ctypes
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import sys
import time
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from errors import UserError

try:
    import fcntl  # a lock on the cache folder, so that two processes never prepare it at once
except ImportError:  # Windows: no lock
    fcntl = None

VERSION = 1
EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # what Pillow may decode (JPEG includes MPO); no EPS etc.
CIFAR_NAMES = ("cifar-10-batches-py", "data_batch_1", "cifar-10-python.tar.gz")
SPLITS = ("train", "val")
HELD_OUT = ("classes", "flat")             # the layouts whose val is drawn (val_fraction, seed)
UNLABELLED = ("flat", "flat-train-val")    # the layouts with no labels
SPLIT_NAMES = (("train", "training"), ("val", "validation", "valid"))  # what the folders may be called, in any case
TODO, GOOD, BROKEN = 0, 1, 2     # the states in <split>.done
WORK_FILES = [s + ext for s in SPLITS for ext in (".done", ".sums", ".skipped.jsonl")]  # while preparing
COMMIT_SECONDS = 2.0             # how often the decoded images are flushed and recorded as done
# Pillow refuses images above 89 M pixels as possible decompression bombs, a limit made for web
# uploads: phones take photos of 108 and 200 M pixels. Ours: 256 M (768 MB decoded, a worker).
Image.MAX_IMAGE_PIXELS = 2**28


@dataclass
class Split:
    images: np.ndarray           # uint8 [N, 3, S, S] (np.memmap, read-only)
    labels: Optional[np.ndarray]  # int64 [N], None when unlabelled


@dataclass
class Prepared:
    train: Split
    val: Split
    classes: list
    mean: tuple                  # per channel, 0-255 scale, over the training images
    std: tuple
    root: str                    # the cache folder
    manifest: dict


# ----------------------------------------------------------------------------- one image
def load_image(path, image_size):
    """One image file -> uint8 [3, S, S]. Raises whatever Pillow raises for a bad file, and
    DecompressionBombWarning as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": the pixels are fine
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=FORMATS) as im:
            im.draft("RGB", (image_size, image_size))  # JPEG only (a no-op for the others)
            ImageOps.exif_transpose(im, in_place=True)  # decodes; turns only if the EXIF says so
            im = _to_rgb(im)
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2  # the centre square, resized to S x S
            im = im.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(im).transpose(2, 0, 1).copy()


def _to_rgb(im):
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # grayscale of more than 8 bits
        gray = np.asarray(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and gray.max(initial=0) > 255):
            gray = np.clip(gray, 0, 65535) >> 8  # 16-bit: the high byte
        elif im.mode == "F" and gray.max(initial=0) <= 1:  # floats in [0, 1]
            gray = gray * 255.0 + 0.5
        return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, im.convert("RGBA")).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _start_worker(main_pid):
    """A decoding worker ignores Ctrl-C (the main process stops the pool), dies of SIGTERM,
    and, on Linux, is ended with the main process: a killed preparation leaves no worker
    printing tracebacks into the closed result pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not run_job's handler: the pool ends its workers so
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the workers end when their pipe does
        pass
    if os.getppid() != main_pid:  # it died before prctl took effect
        os._exit(0)


def _pool_context():
    """Forked workers on Linux, whatever the default: _start_worker's check needs the main
    process as their parent, and under forkserver (Python 3.14's default) the parent is the
    server, so every worker would quit at once and the pool would wait forever."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)


def _decode(task):
    """(path, S) -> (image, None, channel sums and sums of squares) or (None, reason, None).
    Runs in the worker processes."""
    path, image_size = task
    try:
        image = load_image(path, image_size)
    except Exception as err:  # any failure of a file is that file's problem, never the run's
        if isinstance(err, UnidentifiedImageError):  # (the name's extension said it was one)
            empty = os.path.exists(path) and os.path.getsize(path) == 0
            return None, "an empty file" if empty else "not a readable JPEG, PNG, WebP, BMP or TIFF image " \
                "(damaged, or another format)", None
        return None, f"{type(err).__name__}: {err}"[:200], None
    pixels = image.reshape(3, -1)  # exact int64 sums, without a large temporary (8x faster)
    squares = np.einsum("cp,cp->c", pixels, pixels, dtype=np.int64, casting="unsafe")
    return image, None, np.concatenate([pixels.sum(1, dtype=np.int64), squares])


# ----------------------------------------------------------------------------- finding the sources
def is_image_folder(path):
    """True when path is a folder with image files in it or below it, and none of CIFAR-10's
    files at its top. Stops at the first image found."""
    if not os.path.isdir(path) or any(os.path.exists(os.path.join(path, n)) for n in CIFAR_NAMES):
        return False
    try:
        return _has_images(path)
    except OSError:  # unreadable: not something we can prepare
        return False


def _hidden(name):
    """Not data: a hidden file or folder, or the __MACOSX folder of a zip made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def _walk(folder, seen=None):
    """The image files (os.DirEntry) under folder, in name order, recursively; hidden entries
    skipped; a folder reached twice (through links) is read once."""
    seen = set() if seen is None else seen
    real = os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    for e in entries:
        if _is_dir(e):
            yield from _walk(e.path, seen)
        elif e.name.lower().endswith(EXTENSIONS) and not _special(e):
            yield e


def _has_images(folder):
    """Whether an image file lies in folder or below it (stops at the first)."""
    return next(_walk(folder), None) is not None


def _is_dir(entry):
    try:
        return entry.is_dir()
    except OSError:  # a link to itself (ELOOP): not a folder; an image name makes it a skipped file
        return False


def _special(entry):
    """A pipe, socket or device named like an image: reading one would wait forever. (A link
    to nothing is not special: it is listed, then skipped as unreadable.)"""
    try:
        return not stat.S_ISREG(entry.stat().st_mode)
    except OSError:
        return False


def _sources(data, folder, label):
    """[relative path, size, mtime_ns, label, file] of each image under folder, where file
    (device and inode) is _one_place_each's, which takes it off."""
    out, prefix = [], len(os.path.join(data, ""))  # os.path.relpath would take seconds for ImageNet
    for e in _walk(folder):
        try:
            st = e.stat()
            size, mtime = st.st_size, st.st_mtime_ns
            file = st.st_dev << 64 | st.st_ino if st.st_ino else None  # (0: unknown, as on Windows)
        except OSError:  # a dangling link: listed, then skipped as unreadable
            size, mtime, file = -1, 0, None
        out.append([e.path[prefix:].replace(os.sep, "/"), size, mtime, label, file])
    return out


def _one_place_each(groups):
    """groups, _sources' lists (one per class folder of a split, or per split), with every file
    in one place: a file reached twice in one group (a link beside what it links to) is kept
    once, and one reached in two is refused (tested on what it trained on, or taught as two
    classes). The rows lose their file."""
    group_of = {}
    for g, rows in enumerate(groups):
        for row in rows:
            first = group_of.setdefault(row[-1], g) if row[-1] is not None else g
            if first != g:
                other = next(r[0] for r in groups[first] if r[-1] == row[-1])
                raise UserError(f"{other} and {row[0]} are one file (reached through a link): an image may stand "
                                "in one class folder and one split only; remove one of them")
    kept = []
    for rows in groups:
        kept.append([])
        for row in rows:
            file = row.pop()
            if file is None or group_of.pop(file, None) is not None:  # (popped: its first row only)
                kept[-1].append(row)
    return kept


def _subfolders(folder):
    return sorted(e.name for e in os.scandir(folder) if _is_dir(e) and not _hidden(e.name))


def _loose_images(folder):
    return sorted(e.name for e in os.scandir(folder) if not _hidden(e.name)
                  and e.name.lower().endswith(EXTENSIONS) and os.path.isfile(e.path))


def _hold_out(groups, val_fraction, seed):
    """Each group's items split at random: round(val_fraction * n) to val, at least one kept for
    train. A group's draw depends on the seed and its name only, not on the other groups."""
    train, val = [], []
    for name, items in groups:
        n_val = max(0, min(int(val_fraction * len(items) + 0.5), len(items) - 1))
        rng = np.random.default_rng([seed, zlib.crc32(os.fsencode(name))])  # any bytes a name may hold
        held = set(rng.permutation(len(items))[:n_val].tolist())
        for i, item in enumerate(items):
            (val if i in held else train).append(item)
    return sorted(train), sorted(val)


def _why_no_val(layout, sources, val_fraction):
    """What would give a classes or flat folder a val split (_hold_out keeps at least one
    image of each class for training: a class of one image gives none, whatever the fraction)."""
    per_class = {}
    for *_, label in sources["train"]:
        per_class[label] = per_class.get(label, 0) + 1
    flat, largest = layout == "flat", max(per_class.values())
    if largest < 2:
        return ("the folder holds a single image: add more images" if flat else
                "every class has fewer than 2 images: add a val/ folder or more images per class")
    return (f"raise --val-fraction (it is {val_fraction}, too small a share of the largest "
            f"{'folder' if flat else 'class'}'s {largest} images)")


def find_sources(data, val_fraction=0.1, seed=0):
    """(layout, classes, {"train": sources, "val": sources}) of an image folder: what prepare
    will decode, found without decoding anything."""
    if os.path.isfile(data):
        raise UserError(f"{data} is a file, not a folder of images")
    if not os.path.isdir(data):
        raise UserError(f"{data}: no such folder")
    try:
        train_dir, val_dir = (os.path.join(data, _split_folder(data, names)) for names in SPLIT_NAMES)
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            return _train_val_sources(data, train_dir, val_dir)
        names = _subfolders(data)
        trained, tested = ([n for n in names if n.lower() in split] for split in (SPLIT_NAMES[0], ("test", "testing")))
        if trained and tested:
            raise UserError(f"{data} has {trained[0]}/ and {tested[0]}/ but no val/: rename {tested[0]}/ to val/ "
                            "(the images to test on, in the class folders that the training images have)")
        if "train" in names and not _a_class(data, "train", names):
            raise UserError(f"{data} has train/ but no val/: add val/<class>/ folders, "
                            f"or use {train_dir} itself to hold out {val_fraction:.0%} of it for val")
        return _held_out_sources(data, val_fraction, seed)
    except OSError as err:
        raise UserError(f"cannot read {err.filename or data}: {err.strerror or err}") from None


def _a_class(data, name, names):
    """Whether data/name, a train/ with no val/ beside it, is a class (CIFAR-100 has trains): it
    holds only images, and at least two other class folders of images stand beside it, none
    named like a split (test1/, eval/). Otherwise it is a split that lacks its val/."""
    folder = os.path.join(data, name)
    others = [n for n in names if n != name and _has_images(os.path.join(data, n))]
    return (bool(_loose_images(folder)) and not any(_has_images(os.path.join(folder, c)) for c in _subfolders(folder))
            and len(others) >= 2 and not any(n.lower().startswith(("test", "val", "eval")) for n in others))


def _split_folder(data, names):
    """The folder of data that holds a split, whatever its case (Train/, VAL/, validation/),
    so that Train/ and Val/ are not read as two classes. names[0] when there is none."""
    found = [e.name for e in os.scandir(data) if e.name.lower() in names and _is_dir(e)]
    return min(found, key=lambda n: (names.index(n.lower()), n)) if found else names[0]


def _train_val_sources(data, train_dir, val_dir):
    """The train-val layout: the classes are train's class folders; val's must be among them.
    Or, when both hold only images, flat-train-val: unlabelled images, split by their folders."""
    unsorted = [_loose_images(folder) for folder in (train_dir, val_dir)]
    sorted_in = [[c for c in _subfolders(folder) if _has_images(os.path.join(folder, c))]
                 for folder in (train_dir, val_dir)]
    if all(unsorted) and not any(sorted_in):
        train, val = _one_place_each([_sources(data, folder, None) for folder in (train_dir, val_dir)])
        return "flat-train-val", [], {"train": sorted(train), "val": sorted(val)}
    if any(unsorted) and not any(sorted_in):  # images beside a folder of none (other files, or nothing)
        empty, full = (train_dir, val_dir) if unsorted[1] else (val_dir, train_dir)
        raise UserError(f"{empty} holds no images ({' '.join(EXTENSIONS)}) beside {full}'s: give it images too "
                        "(unlabelled), or give both class folders of images")
    classes = _subfolders(train_dir)
    for folder, loose in zip((train_dir, val_dir), unsorted):
        if loose:
            raise UserError(f"{folder} holds {len(loose)} images outside class folders (e.g. {loose[0]}); "
                            f"sort them into {os.path.basename(folder)}/<class>/ folders (or, unlabelled, "
                            "give both train/ and val/ only images)")
    train = []
    for label, name in enumerate(classes):
        train.append(_sources(data, os.path.join(train_dir, name), label))
        if not train[-1]:
            print(f"note: class folder {os.path.join(train_dir, name)} holds no images", file=sys.stderr)
    # (a name copied from a Mac may spell é as e and an accent: the same class, where train/
    # does not hold both spellings)
    label_of = {unicodedata.normalize("NFC", name): label for label, name in enumerate(classes)}
    label_of.update((name, label) for label, name in enumerate(classes))
    val = []
    for name in _subfolders(val_dir):
        folder = os.path.join(val_dir, name)
        label = label_of.get(name, label_of.get(unicodedata.normalize("NFC", name)))
        if label is None:
            raise UserError(f"{folder}: class {name!r} is not one of the {len(classes)} "
                            f"class folders of {train_dir}")
        val.append(_sources(data, folder, label))
        if not val[-1]:
            raise UserError(f"{folder} holds no images")
    kept = _one_place_each(train + val)
    train, val = ([row for rows in part for row in rows] for part in (kept[:len(train)], kept[len(train):]))
    for folder, found in ((train_dir, train), (val_dir, val)):
        if not found:
            raise UserError(f"{folder} holds no images in class folders")
    _note_untested(classes, train, val, f"with no images in {val_dir}")
    return "train-val", classes, {"train": sorted(train), "val": sorted(val)}


def _note_untested(classes, train, val, why):
    """A note naming the classes trained but never tested (the test accuracy says nothing of them)."""
    tested = {label for *_, label in val}
    untested = [classes[label] for label in sorted({label for *_, label in train} - tested)]
    if untested:
        print(f"note: {len(untested)} class folder{'s' if len(untested) > 1 else ''} ({', '.join(untested[:3])}"
              f"{', ...' if len(untested) > 3 else ''}) {why}: none of theirs is tested", file=sys.stderr)


def _held_out_sources(data, val_fraction, seed):
    """The classes layout (a folder per class) or the flat one (only images), val held out."""
    loose, classes = _loose_images(data), _subfolders(data)
    if loose:
        mixed = [c for c in classes if _has_images(os.path.join(data, c))]
        if mixed:
            raise UserError(f"{data} holds both images ({len(loose)}) and folders of images ({mixed[0]}/...); "
                            "use one class folder per class, or only images")
        train, val = _hold_out([("", *_one_place_each([_sources(data, data, None)]))], val_fraction, seed)
        return "flat", [], {"train": train, "val": val}
    train_names, val_names = SPLIT_NAMES
    split = [c for c in classes if c.lower() in train_names[1:] + val_names + ("test", "testing")]
    if split:  # (not train/ itself: trains and buses are classes)
        raise UserError(f"{os.path.join(data, split[0])} is named like a split, not a class: give {data} a train/ "
                        "and a val/ folder, each of class folders (or rename it, if it is a class)")
    groups = list(zip(classes, _one_place_each([_sources(data, os.path.join(data, name), label)
                                                for label, name in enumerate(classes)])))
    for name, items in groups:
        if not items:
            print(f"note: class folder {os.path.join(data, name)} holds no images", file=sys.stderr)
    if not any(items for _, items in groups):
        raise UserError(f"{data} holds no images ({' '.join(EXTENSIONS)})")
    train, val = _hold_out(groups, val_fraction, seed)
    if val:
        _note_untested(classes, train, val, f"too small to hold out any image at --val-fraction {val_fraction}")
    return "classes", classes, {"train": train, "val": val}


# ----------------------------------------------------------------------------- the cache
def prepare(data, image_size=256, cache=None, val_fraction=0.1, seed=0, workers=None, progress=True, need_val=False,
            check=None):
    """The prepared image folder `data`: reused when its cache is complete and up to date,
    finished when it was interrupted, (re)built otherwise. See the top of the file.

    image_size: S, the side of the stored square images.
    cache: the cache folder (default prepared/<name of data>-<S> under the current folder).
    val_fraction, seed: the held-out part of each class (or of a flat folder) and its draw;
        not used when data has train/ and val/.
    workers: decoding processes (None: one per core; 0 or 1: in this process).
    progress: a tqdm bar on stderr.
    need_val: refuse, before decoding anything, a folder that would leave val empty.
    check: called with find_sources' (layout, classes, sources) before anything is decoded, or
        a cache is looked at: it raises to refuse the folder."""
    if not (isinstance(image_size, int) and image_size >= 1):
        raise UserError(f"--image-size must be a positive whole number of pixels, got {image_size!r}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise UserError(f"seed must be a whole number >= 0, got {seed!r}")
    data = os.path.abspath(os.path.expanduser(data))
    root = os.path.abspath(cache or os.path.join("prepared", f"{os.path.basename(data)}-{image_size}"))
    if os.path.commonpath([os.path.realpath(root), os.path.realpath(data)]) == os.path.realpath(data):
        raise UserError(f"the cache folder {root} is inside the data folder {data}, which is never written to; "
                        "give --cache DIR elsewhere")
    layout, classes, sources = find_sources(data, val_fraction, seed)
    if check:
        check(layout, classes, sources)
    if need_val and not sources["val"]:
        raise UserError(f"{data}: no images were held out for testing; {_why_no_val(layout, sources, val_fraction)}")
    wanted = {"version": VERSION, "complete": False,
              "settings": {"image_size": image_size, "val_fraction": val_fraction, "seed": seed},
              "data": data, "layout": layout, "classes": classes, "mean": None, "std": None, "skipped": [],
              "source_fields": ["path", "size", "mtime_ns", "label"],
              "splits": {s: {"images": s + ".u8", "labels": None if layout in UNLABELLED else s + ".labels.npy",
                             "shape": None, "count": None, "skipped": None, "sources": sources[s]} for s in SPLITS}}
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:  # under /proc, below a file, a file itself, no permission: the user's to fix
        reason = "a file of that name exists" if isinstance(err, FileExistsError) else err.strerror or err
        raise UserError(f"{'--cache' if cache else 'the cache folder'} {root}: cannot create the folder "
                        f"({reason})") from None
    with _locked(root) as unwritable:
        old = _read_manifest(root)
        why = _why_not_same(old, wanted) if old else None
        if why and _another_folder(old.get("data"), data):  # (hours of ImageNet's, never wiped unasked)
            named, fix = (f"--cache {root}", "another --cache") if cache else (f"{root}", "--cache")
            raise UserError(f"{named} holds the preparation of another folder{'' if cache else ' of that name'}, "
                            f"{old['data']}: give {fix} DIR for {data} (or delete {root} to prepare it there)")
        if old and not why:
            why = _damaged(root, old)
            if not why and old["complete"]:
                if not unwritable:  # (left by a kill between the manifest's completion and their removal)
                    _remove(root, WORK_FILES)
                return _open(root, old)
        if unwritable:  # a shared preparation is used as it is, but cannot be made or finished here
            need = f"; it would be {'rebuilt: ' + why if why else 'made or finished'}" if old else ""
            raise UserError(f"{root}: cannot write in the cache folder ({unwritable.strerror or unwritable}){need}")
        # Before anything is deleted or said: a run refused for space leaves the old cache whole.
        _check_space(root, wanted, reset=not old or bool(why))
        if old and why:
            print(f"{root}: {'rebuilding' if old.get('complete') is True else 'starting over'}: {why}",
                  file=sys.stderr)
        if not old or why:
            _start(root, wanted)
        return _fill_and_finish(root, wanted, workers, progress)


def _another_folder(prepared, data):
    """Whether the folder a manifest names, `prepared`, is one other than data (not data moved
    away, or reached by another path: a link)."""
    if not isinstance(prepared, str) or prepared == data or not os.path.isdir(prepared):
        return False
    return os.path.realpath(prepared) != os.path.realpath(data)


def _why_not_same(old, new):
    """Why the cache described by `old` cannot serve `new` (None when it can)."""
    if old.get("version") != new["version"]:
        return f"it was written in format version {old.get('version')}, this is version {new['version']}"
    malformed = _malformed(old)
    if malformed:
        return malformed
    if old["layout"] != new["layout"]:
        return f"the layout changed ({old['layout']} -> {new['layout']})"
    keys = ["image_size"] + (["val_fraction", "seed"] if new["layout"] in HELD_OUT else [])
    for key in keys:
        if old["settings"][key] != new["settings"][key]:
            return f"{key} changed ({old['settings'][key]} -> {new['settings'][key]})"
    if old["classes"] != new["classes"]:
        return f"the class folders changed ({len(old['classes'])} -> {len(new['classes'])} classes)"
    if all(old["splits"][s]["sources"] == new["splits"][s]["sources"] for s in SPLITS):
        return None  # the quick check; what follows only says what changed
    try:  # old's sources differ from the ones found: they may be anything an edit left
        before = {p: (size, mtime) for s in SPLITS for p, size, mtime, _ in old["splits"][s]["sources"]}
    except (ValueError, TypeError):
        return "manifest.json has a source that is not [path, size, mtime_ns, label]"
    now = {p: (size, mtime) for s in SPLITS for p, size, mtime, _ in new["splits"][s]["sources"]}
    changes = [(what, sorted(paths)) for what, paths in (
        ("added", now.keys() - before.keys()), ("removed", before.keys() - now.keys()),
        ("changed", [p for p in now.keys() & before.keys() if now[p] != before[p]])) if paths]
    if changes:
        return ", ".join(f"{len(paths):,} files {what} (e.g. {paths[0]})" for what, paths in changes)
    return "the split of the sources changed"


def _malformed(manifest):
    """What the code reads from manifest.json that is missing or of the wrong type (None when
    nothing): a manifest cut short or edited by hand rebuilds the cache, never a traceback.
    The sources themselves are compared with the ones found (_why_not_same)."""
    def at(*keys):
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value
    S = at("settings", "image_size")
    numbers = lambda v, n: isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v)
    checks = [(("layout",), isinstance(at("layout"), str)),
              (("settings", "image_size"), isinstance(S, int) and S >= 1),
              (("settings", "val_fraction"), isinstance(at("settings", "val_fraction"), (int, float))),
              (("settings", "seed"), isinstance(at("settings", "seed"), int)),
              (("classes",), isinstance(at("classes"), list)),
              (("complete",), isinstance(at("complete"), bool))]
    for s in SPLITS:
        checks += [(("splits", s, "sources"), isinstance(at("splits", s, "sources"), list)),
                   (("splits", s, "images"), isinstance(at("splits", s, "images"), str)),
                   (("splits", s, "labels"), isinstance(at("splits", s, "labels"), (str, type(None))))]
    if at("complete") is True:  # what _damaged and _open read of a finished cache
        checks += [((k,), numbers(at(k), 3)) for k in ("mean", "std")]
        for s in SPLITS:
            shape = at("splits", s, "shape")
            checks.append((("splits", s, "shape"), isinstance(shape, list) and len(shape) == 4
                           and isinstance(shape[0], int) and shape[0] >= 0 and shape[1:] == [3, S, S]))
    for keys, ok in checks:
        if not ok:
            return f"manifest.json has no valid {'.'.join(keys)}"
    return None


def _damaged(root, manifest):
    """What is missing or of the wrong size among the cache's files (None when all is well)."""
    item = 3 * manifest["settings"]["image_size"] ** 2
    for split in SPLITS:
        info, base = manifest["splits"][split], os.path.join(root, split)
        n = len(info["sources"])
        if manifest["complete"]:
            expected = {".u8": info["shape"][0] * item}
            if info["labels"]:
                expected[".labels.npy"] = None
        else:
            done = np.fromfile(base + ".done", np.uint8) if os.path.exists(base + ".done") else None
            finished = done is not None and len(done) == n and bool(done.all())
            slots = int((done == GOOD).sum()) if finished else n  # .u8 is cut to the good ones at the end
            expected = {".done": n, ".sums": n * 48, ".u8": slots * item}
        for ext, size in expected.items():
            if not os.path.exists(base + ext) or size is not None and os.path.getsize(base + ext) != size:
                return f"{split}{ext} is missing or of the wrong size"
        if manifest["complete"] and info["labels"] and not _labels_fit(base + ".labels.npy", info["shape"][0],
                                                                        len(manifest["classes"])):
            return f"{split}.labels.npy is damaged"
    return None


def _labels_fit(path, n, classes):
    """Whether path holds n int64 labels of 0 to classes - 1 (a file cut short or edited is not)."""
    try:
        labels = np.load(path, allow_pickle=False)  # (10 MB for ImageNet; _open reads it anyway)
    except (ValueError, OSError, EOFError):
        return False
    return labels.shape == (n,) and labels.dtype == np.int64 and (n == 0 or 0 <= labels.min() and
                                                                  labels.max() < classes)


def _start(root, manifest):
    """Deletes what a previous preparation left and sets up an empty one."""
    _remove(root, ["manifest.json"])  # first: a half-reset cache must never look complete
    _remove(root, [s + ext for s in SPLITS for ext in (".u8", ".labels.npy", ".done", ".sums", ".skipped.jsonl")])
    item = 3 * manifest["settings"]["image_size"] ** 2
    for split in SPLITS:
        n = len(manifest["splits"][split]["sources"])
        for ext, size in ((".u8", n * item), (".done", n), (".sums", n * 48), (".skipped.jsonl", 0)):
            try:
                with open(os.path.join(root, split + ext), "wb") as f:
                    f.truncate(size)  # zeros, allocated on disk only when written
            except OSError as err:  # a file larger than the file system allows (FAT32: 4 GB, EFBIG)
                S = manifest["settings"]["image_size"]
                raise UserError(f"{root}: cannot make {split}{ext} for {n:,} images at {S}x{S} "
                                f"({size / 1e9:,.1f} GB): {err.strerror or err}; "
                                "choose a smaller --image-size or another --cache") from None
    _write_manifest(root, manifest)


def _check_space(root, manifest, reset):
    """Raises UserError when the images still to decode do not fit in the free space of the
    cache's disk. reset: the cache's files are deleted first (_start), so their space counts as
    free and every image is to be decoded; otherwise the done ones are already stored."""
    S = manifest["settings"]["image_size"]
    total = sum(len(manifest["splits"][s]["sources"]) for s in SPLITS)
    names = ["manifest.json"] + [s + ext for s in SPLITS for ext in (".u8", ".labels.npy", ".done", ".sums",
                                                                    ".skipped.jsonl")]
    freed, done = 0, 0
    for name in names if reset else []:
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(root, name))
            freed += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size  # a sparse file: what it holds
    if not reset:
        done = sum(int((np.fromfile(os.path.join(root, s + ".done"), np.uint8) != TODO).sum()) for s in SPLITS)
    needed, free = (total - done) * 3 * S * S, shutil.disk_usage(root).free + freed
    if needed > free:
        raise UserError(f"{root}: preparing {total - done:,} images at {S}x{S} needs {needed / 1e9:,.1f} GB, "
                        f"but only {free / 1e9:,.1f} GB are free there")


def _fill_and_finish(root, manifest, workers, progress):
    S = manifest["settings"]["image_size"]
    item = 3 * S * S
    total = sum(len(manifest["splits"][s]["sources"]) for s in SPLITS)
    done = sum(int((np.fromfile(os.path.join(root, s + ".done"), np.uint8) != TODO).sum()) for s in SPLITS)
    size = total * item
    print(f"preparing {total:,} images at {S}x{S} into {root} "
          f"({f'{size / 1e9:.1f} GB' if size >= 1e9 else f'{size / 1e6:.1f} MB'})"
          + (f", resuming after {done:,}" if done else ""), file=sys.stderr)
    workers = os.cpu_count() if workers is None else workers
    for split in SPLITS:
        _fill(root, split, manifest, workers, progress)
    return _finish(root, manifest)


def _fill(root, split, manifest, workers, progress):
    """Decodes the split's sources that are not done yet into <split>.u8.

    Unreadable files are known only once decoded, so the good images are packed from the front
    as they come: results are taken in source order (imap keeps it) and recorded in order, so
    the done sources are always a prefix and a resumed run writes the next good image at slot
    = the number of good ones before. No holes, no compaction pass, no second decode."""
    sources, S = manifest["splits"][split]["sources"], manifest["settings"]["image_size"]
    n, base = len(sources), os.path.join(root, split)
    if n == 0:
        return
    done = np.memmap(base + ".done", np.uint8, "r+", shape=(n,))
    first = int(np.argmin(done != TODO)) if (done == TODO).any() else n
    if first == n:
        return
    slot = int((done[:first] == GOOD).sum())
    sums = np.memmap(base + ".sums", np.int64, "r+", shape=(n, 6))
    tasks = [(os.path.join(manifest["data"], path), S) for path, *_ in sources[first:]]
    pending = []  # (source, state) decoded since the last commit

    def commit():
        os.fsync(images.fileno())
        sums.flush()
        log.flush()
        os.fsync(log.fileno())
        for i, state in pending:  # only once the pixels are on disk
            done[i] = state
        done.flush()
        pending.clear()

    # images written with pwrite, not through a memmap: one copy per image instead of 48 page faults
    with open(base + ".u8", "r+b") as images, open(base + ".skipped.jsonl", "a") as log, \
            contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(_pool_context().Pool(workers, _start_worker, (os.getpid(),)))
            results = pool.imap(_decode, tasks, chunksize=max(1, min(32, len(tasks) // (4 * workers))))
        else:
            results = map(_decode, tasks)
        bar = stack.enter_context(tqdm(total=n, initial=first, desc=split, unit="img", file=sys.stderr,
                                       disable=not progress or None, dynamic_ncols=True))  # None: a terminal only
        last = time.monotonic()
        try:
            for i, (image, reason, stats) in enumerate(results, start=first):
                if image is None:
                    log.write(json.dumps([i, reason]) + "\n")
                    pending.append((i, BROKEN))
                else:
                    os.pwrite(images.fileno(), image, slot * image.nbytes)
                    sums[i] = stats
                    slot += 1
                    pending.append((i, GOOD))
                bar.update()
                if time.monotonic() - last >= COMMIT_SECONDS:
                    commit()
                    last = time.monotonic()
        finally:  # also on Ctrl-C: what was decoded is kept
            commit()


def _finish(root, manifest):
    """Cuts the image files to the good images, writes labels, mean, std and the complete manifest."""
    S = manifest["settings"]["image_size"]
    item, skipped = 3 * S * S, []
    for split in SPLITS:
        info, base = manifest["splits"][split], os.path.join(root, split)
        sources = info["sources"]
        done = np.fromfile(base + ".done", np.uint8)
        reasons = {}
        with open(base + ".skipped.jsonl") as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut by a kill was written again later
                    i, reason = json.loads(line)
                    reasons[i] = reason
        skipped += [{"split": split, "path": sources[i][0], "reason": reasons.get(i, "unreadable")}
                    for i in np.flatnonzero(done == BROKEN).tolist()]
        good = np.flatnonzero(done == GOOD)
        os.truncate(base + ".u8", len(good) * item)
        info.update(shape=[len(good), 3, S, S], count=len(good), skipped=int((done == BROKEN).sum()))
        if info["labels"]:
            np.save(base + ".labels.tmp.npy", np.array([sources[i][3] for i in good], dtype=np.int64))
            os.replace(base + ".labels.tmp.npy", base + ".labels.npy")
        if split == "train":
            totals = [int(t) for t in np.fromfile(base + ".sums", np.int64).reshape(-1, 6)[good].sum(0)]
            pixels = len(good) * S * S
    manifest["skipped"] = skipped
    if skipped:
        files = "file" if len(skipped) == 1 else "files"
        said = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        print(f"skipped {len(skipped):,} unreadable {files} ({said}{'; ...' if len(skipped) > 3 else ''}; all "
              f"listed in {os.path.join(root, 'manifest.json')})", file=sys.stderr)
    if pixels == 0:
        _write_manifest(root, manifest)  # still incomplete, but with the reasons
        raise UserError(f"{manifest['data']} holds no readable image for training: all "
                        f"{len(manifest['splits']['train']['sources']):,} failed to decode "
                        f"(reasons in {os.path.join(root, 'manifest.json')})")
    # exact integer arithmetic: the same numbers however the preparation was split or resumed
    manifest["mean"] = [totals[c] / pixels for c in range(3)]
    manifest["std"] = [((totals[3 + c] * pixels - totals[c] ** 2) / pixels ** 2) ** 0.5 for c in range(3)]
    manifest["complete"] = True
    _write_manifest(root, manifest)
    _remove(root, WORK_FILES)
    return _open(root, manifest)


def _open(root, manifest):
    def split(name):
        info = manifest["splits"][name]
        shape = tuple(info["shape"])
        if shape[0]:
            images = np.memmap(os.path.join(root, info["images"]), np.uint8, "r", shape=shape)
        else:  # an empty file cannot be mapped
            images = np.zeros(shape, np.uint8)
            images.flags.writeable = False
        labels = np.load(os.path.join(root, info["labels"])) if info["labels"] else None
        return Split(images, labels)
    return Prepared(train=split("train"), val=split("val"), classes=list(manifest["classes"]),
                    mean=tuple(manifest["mean"]), std=tuple(manifest["std"]), root=root, manifest=manifest)


# ----------------------------------------------------------------------------- small helpers
def _read_manifest(root):
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):  # what is in it is checked by _why_not_same (_malformed)
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        return manifest
    except (ValueError, OSError) as err:
        print(f"{root}: starting over: manifest.json is unreadable ({err})", file=sys.stderr)
        return None


def _write_manifest(root, manifest):
    """Written whole or not at all (a temporary file renamed). Indented, with short lists (a
    shape, the classes) on one line, except the source lists: one line each, as indenting a
    million sources takes seconds to write."""
    head = dict(manifest, splits={s: dict(info, sources=None) for s, info in manifest["splits"].items()})
    text = json.dumps(head, indent=1)
    text = re.sub(r"\[\n\s+([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r"\n\s+", " ", m.group(1)) + "]", text)
    for info in manifest["splits"].values():  # in order; inside strings the quotes would be escaped
        text = text.replace('"sources": null', '"sources": ' + json.dumps(info["sources"]), 1)
    path = os.path.join(root, "manifest.json")
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _remove(root, names):
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, name))


@contextlib.contextmanager
def _locked(root):
    """Holds the cache folder's lock (several ranks of one run may call prepare at once).
    Yields None, or the OSError that kept it from being taken: a folder this process may not
    write in, such as a preparation shared read-only, holds no lock and can only be read."""
    try:
        f = _lock_file(root)
    except OSError as err:
        yield err
        return
    with f:
        if fcntl:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if os.environ.get("RANK", "0") == "0":  # (the other ranks of a run wait for each other)
                    print(f"waiting for another process preparing {root}", file=sys.stderr)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield None


def _lock_file(root):
    return open(os.path.join(root, ".lock"), "w")
