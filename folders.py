"""Image folders prepared once into a memory-mapped uint8 file that training reads at memory speed.

    prepared = folders.prepare("~/imagenet", image_size=256)
    prepared.train.images    # np.memmap uint8 [N, 3, S, S], read-only
    prepared.train.labels    # np.int64 [N], or None for a flat folder of unlabelled images

What is prepared (the layout of the data folder, its classes, the files of each split) is
listing.find_sources's to say.

Each image is decoded, turned into RGB and centre-cropped to S x S as decode.py says; a file
Pillow cannot read is skipped and listed in the manifest with its reason, and never stops the
preparation.

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
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm import tqdm

import decode
import listing
from errors import UserError
from listing import SPLITS

try:
    import fcntl  # a lock on the cache folder, so that two processes never prepare it at once
except ImportError:  # Windows: no lock
    fcntl = None

VERSION = 1
TODO, GOOD, BROKEN = 0, 1, 2     # the states in <split>.done
WORK_FILES = [s + ext for s in SPLITS for ext in (".done", ".sums", ".skipped.jsonl")]  # while preparing
CACHE_FILES = ["manifest.json"] + [s + ext for s in SPLITS for ext in (".u8", ".labels.npy")] + WORK_FILES  # (in order)
COMMIT_SECONDS = 2.0             # how often the decoded images are flushed and recorded as done


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
    check: called with listing.find_sources' (layout, classes, sources) before anything is decoded, or
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
    layout, classes, sources = listing.find_sources(data, val_fraction, seed)
    if check:
        check(layout, classes, sources)
    if need_val and not sources["val"]:
        why = listing.why_no_val(layout, sources, val_fraction)
        raise UserError(f"{data}: no images were held out for testing; {why}")
    wanted = {"version": VERSION, "complete": False,
              "settings": {"image_size": image_size, "val_fraction": val_fraction, "seed": seed},
              "data": data, "layout": layout, "classes": classes, "mean": None, "std": None, "skipped": [],
              "source_fields": ["path", "size", "mtime_ns", "label"],
              "splits": {s: {"images": s + ".u8", "labels": None if layout in listing.UNLABELLED else s + ".labels.npy",
                             "shape": None, "count": None, "skipped": None, "sources": sources[s]} for s in SPLITS}}
    made = folders_to_make(root)  # (a refusal leaves none of them)
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
        # Before anything is deleted or said: a run refused for space leaves the old cache whole,
        # and a new one unmade.
        try:
            _check_space(root, wanted, reset=not old or bool(why))
        except UserError:
            _unmake(made)
            raise
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
    keys = ["image_size"] + (["val_fraction", "seed"] if new["layout"] in listing.HELD_OUT else [])
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
    _remove(root, CACHE_FILES)  # manifest.json first: a half-reset cache must never look complete
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
    total = _count(manifest)
    freed, done = 0, 0
    for name in CACHE_FILES if reset else []:
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(root, name))
            freed += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size  # a sparse file: what it holds
    if not reset:
        done = _decoded(root)
    needed, free = (total - done) * 3 * S * S, shutil.disk_usage(root).free + freed
    if needed > free:
        raise UserError(f"{root}: preparing {total - done:,} images at {S}x{S} needs {size_text(needed)}, "
                        f"but only {size_text(free)} are free there")


def size_text(n):
    """A number of bytes as a disk's free space is told: in GB, MB or kB (never "0.0 GB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def _count(manifest):
    """How many images the preparation decodes, both splits."""
    return sum(len(manifest["splits"][s]["sources"]) for s in SPLITS)


def _decoded(root):
    """How many of them a preparation has done so far (stored, or found unreadable)."""
    return sum(int((np.fromfile(os.path.join(root, s + ".done"), np.uint8) != TODO).sum()) for s in SPLITS)


def _fill_and_finish(root, manifest, workers, progress):
    S = manifest["settings"]["image_size"]
    item = 3 * S * S
    total, done = _count(manifest), _decoded(root)
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
            pool = stack.enter_context(decode.pool(workers))
            results = pool.imap(decode.image_and_sums, tasks, chunksize=max(1, min(32, len(tasks) // (4 * workers))))
        else:
            results = map(decode.image_and_sums, tasks)
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


def _unmake(made):
    """Removes the folders prepare made, and the lock it put in the deepest."""
    if made:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(made[0], ".lock"))
    remove_made(made)


def folders_to_make(path):
    """The folders that os.makedirs(path) would make, deepest first."""
    made = []
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def remove_made(made):
    """Removes folders_to_make's folders once made, deepest first, while they are empty: what
    a run or a preparation refused before it wrote anything leaves behind."""
    for path in made:
        if os.listdir(path):
            break
        os.rmdir(path)


def _lock_file(root):
    return open(os.path.join(root, ".lock"), "w")
