"""What an image folder holds, found without decoding anything: its layout, its classes and,
per split, the image files to prepare (folders.prepare decodes them).

    layout, classes, sources = listing.find_sources("~/imagenet")
    sources["train"]         # [relative path, size, mtime_ns, label] per image, label None if unlabelled

Layouts of the data folder (hidden files and folders, macOS's __MACOSX, files of other extensions,
and pipes or devices named like images are ignored):
  train-val  DIR/train/<class>/... and DIR/val/<class>/... (ImageNet's, val sorted into classes;
             the names in any case, also training/, validation/, valid/). The classes are train's
             class folders; val_fraction and seed are not used.
  classes    DIR/<class>/...: val_fraction of each class held out for val at random (seeded). A
             class may be called train/ (of images only) where two or more others stand beside it.
  flat       DIR/*.jpg: unlabelled; val_fraction of the images held out for val at random.
  flat-train-val  DIR/train/*.jpg and DIR/val/*.jpg: unlabelled, split by their folders.
A class folder is searched recursively; one that holds no image (nor has val/ images) is no class.
Sources are taken in the order of their relative paths.
A file reached twice (through links, or hard links) is read once; one reached in two classes or
two splits is refused: it would be tested on, or taught as two classes.
"""
import os
import stat
import sys
import unicodedata
import zlib

import numpy as np

from errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff")
CIFAR_NAMES = ("cifar-10-batches-py", "data_batch_1", "cifar-10-python.tar.gz")  # a CIFAR-10 folder, not one of images
SPLIT_NAMES = (("train", "training"), ("val", "validation", "valid"))  # what the folders may be called, in any case
SPLITS = ("train", "val")                  # the keys of find_sources' sources
TEST_NAMES = ("test", "testing")           # a folder named so is refused: neither val nor a class
HELD_OUT = ("classes", "flat")             # the layouts whose val is drawn (val_fraction, seed)
UNLABELLED = ("flat", "flat-train-val")    # the layouts with no labels


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


def why_no_val(layout, sources, val_fraction):
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
    """(layout, classes, {"train": sources, "val": sources}) of an image folder: what
    folders.prepare will decode, found without decoding anything."""
    if os.path.isfile(data):
        raise UserError(f"{data} is a file, not a folder of images")
    if not os.path.isdir(data):
        raise UserError(f"{data}: no such folder")
    try:
        train_dir, val_dir = (os.path.join(data, _split_folder(data, names)) for names in SPLIT_NAMES)
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            return _train_val_sources(data, train_dir, val_dir)
        names = _subfolders(data)
        trained, tested = ([n for n in names if n.lower() in split] for split in (SPLIT_NAMES[0], TEST_NAMES))
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
    # (a class with val images but none to train on is kept: pretraining ignores labels, and
    # what needs them refuses it, data.require_classes)
    in_val = {unicodedata.normalize("NFC", name) for name in sorted_in[1]}
    classes = [c for c in _subfolders(train_dir) if c in sorted_in[0] or unicodedata.normalize("NFC", c) in in_val]
    for folder, loose in zip((train_dir, val_dir), unsorted):
        if loose:
            raise UserError(f"{folder} holds {len(loose)} images outside class folders (e.g. {loose[0]}); "
                            f"sort them into {os.path.basename(folder)}/<class>/ folders (or, unlabelled, "
                            "give both train/ and val/ only images)")
    train = [_sources(data, os.path.join(train_dir, name), label) for label, name in enumerate(classes)]
    # (a name copied from a Mac may spell é as e and an accent: the same class, where train/
    # does not hold both spellings)
    label_of = {unicodedata.normalize("NFC", name): label for label, name in enumerate(classes)}
    label_of.update((name, label) for label, name in enumerate(classes))
    val = []
    for name in sorted_in[1]:  # (a folder of no images is no class here either: no refusal)
        folder = os.path.join(val_dir, name)
        label = label_of.get(name, label_of.get(unicodedata.normalize("NFC", name)))
        if label is None:
            raise UserError(f"{folder}: class {name!r} is not one of the {len(classes)} "
                            f"class folders of {train_dir}")
        val.append(_sources(data, folder, label))
    kept = _one_place_each(train + val)
    train, val = ([row for rows in part for row in rows] for part in (kept[:len(train)], kept[len(train):]))
    for folder, found in ((train_dir, train), (val_dir, val)):
        if not found:
            raise UserError(f"{folder} holds no images in class folders")
    _note_not_classes(train_dir, classes)  # (the notes last: a refusal above stays one line)
    _note_untested(classes, train, val, f"with no images in {val_dir}")
    return "train-val", classes, {"train": sorted(train), "val": sorted(val)}


def _note_not_classes(folder, classes):
    """A note naming the folders beside the classes that hold no image: no class (a class with
    nothing to train on would only widen the classifier and lower its chance level)."""
    others = [n for n in _subfolders(folder) if n not in classes]
    if others:
        print(f"note: {len(others)} folder{'s' if len(others) > 1 else ''} of {folder} ({', '.join(others[:3])}"
              f"{', ...' if len(others) > 3 else ''}) hold{'' if len(others) > 1 else 's'} no images: "
              f"not {'classes' if len(others) > 1 else 'a class'}", file=sys.stderr)


def _note_untested(classes, train, val, why):
    """A note naming the classes trained but never tested (the test accuracy says nothing of them)."""
    tested = {label for *_, label in val}
    untested = [classes[label] for label in sorted({label for *_, label in train} - tested)]
    if untested:
        print(f"note: {len(untested)} class folder{'s' if len(untested) > 1 else ''} ({', '.join(untested[:3])}"
              f"{', ...' if len(untested) > 3 else ''}) {why}: none of theirs is tested", file=sys.stderr)


def _held_out_sources(data, val_fraction, seed):
    """The classes layout (a folder per class) or the flat one (only images), val held out."""
    loose = _loose_images(data)
    classes = [c for c in _subfolders(data) if _has_images(os.path.join(data, c))]
    if loose:
        if classes:
            raise UserError(f"{data} holds both images ({len(loose)}) and folders of images ({classes[0]}/...); "
                            "use one class folder per class, or only images")
        train, val = _hold_out([("", *_one_place_each([_sources(data, data, None)]))], val_fraction, seed)
        return "flat", [], {"train": train, "val": val}
    train_names, val_names = SPLIT_NAMES
    split = [c for c in classes if c.lower() in train_names[1:] + val_names + TEST_NAMES]
    if split:  # (not train/ itself: trains and buses are classes)
        raise UserError(f"{os.path.join(data, split[0])} is named like a split, not a class: give {data} a train/ "
                        "and a val/ folder, each of class folders (or rename it, if it is a class)")
    if not classes:
        raise UserError(f"{data} holds no images ({' '.join(EXTENSIONS)})")
    groups = list(zip(classes, _one_place_each([_sources(data, os.path.join(data, name), label)
                                                for label, name in enumerate(classes)])))
    train, val = _hold_out(groups, val_fraction, seed)
    _note_not_classes(data, classes)
    if val:
        _note_untested(classes, train, val, f"too small to hold out any image at --val-fraction {val_fraction}")
    return "classes", classes, {"train": train, "val": val}
