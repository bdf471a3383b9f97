"""listing.py and folders.py: image folders listed, then prepared into a memory-mapped uint8
cache.

Every image is compared with an independent Pillow decode, resize and crop done here. The
folders are written by the tests (tiny images, S = 24): every format and colour mode, EXIF
rotation, broken files, hidden entries; then reuse, invalidation, resume after an interrupt and
after a kill, the three layouts, the seeded split, the pool, and the user's errors.
"""
import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image, ImageOps

import decode
import folders
import listing
from errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for the child process

S = 24
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- writing folders
def noise(h, w, channels=3):
    return RNG.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def save(path, image, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **kw)


def rgb(h=48, w=64):
    # 64 x 48 -> 32 x 24 -> centre 24 x 24: an exact crop, so resize-then-crop equals ours
    return Image.fromarray(noise(h, w))


def write_bytes(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def jpeg_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


def exif_rotated_jpeg(path, orientation=6):
    exif = Image.Exif()
    exif[0x0112] = orientation
    save(path, rgb(), format="JPEG", exif=exif.tobytes())


def write_everything(root):
    """Class 'a': every format; class 'b': every colour mode and the EXIF-rotated JPEG;
    'empty': no images; plus broken files, hidden entries and a text file."""
    save(f"{root}/a/plain.jpg", rgb(), quality=90)
    save(f"{root}/a/upper.JPG", rgb(48, 64), format="JPEG")
    save(f"{root}/a/long.jpeg", rgb(64, 48), format="JPEG")   # portrait
    save(f"{root}/a/small.jpg", rgb(12, 16))                   # upscaled to S
    save(f"{root}/a/image.png", rgb())
    save(f"{root}/a/image.webp", rgb(), lossless=True)
    save(f"{root}/a/image.bmp", rgb())
    save(f"{root}/a/image.tif", rgb())
    save(f"{root}/a/deep/er/image.tiff", rgb())               # nested inside the class folder
    save(f"{root}/b/gray.png", Image.fromarray(noise(48, 64, 1)))
    save(f"{root}/b/gray.jpg", Image.fromarray(noise(48, 64, 1)))
    save(f"{root}/b/cmyk.jpg", rgb().convert("CMYK"))
    save(f"{root}/b/palette.png", rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=17))
    alpha = Image.fromarray((noise(48, 64, 1) > 127).astype(np.uint8) * 255)  # fully on or off
    rgba = rgb()
    rgba.putalpha(alpha)
    save(f"{root}/b/rgba.png", rgba)
    save(f"{root}/b/la.png", Image.merge("LA", [Image.fromarray(noise(48, 64, 1)), alpha]))
    save(f"{root}/b/sixteen.png", Image.fromarray(RNG.integers(0, 65536, (48, 64), dtype=np.uint16)))
    exif_rotated_jpeg(f"{root}/b/rotated.jpg", 6)
    write_bytes(f"{root}/b/corrupt.jpg", RNG.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    whole = jpeg_bytes(rgb(), quality=95)
    write_bytes(f"{root}/b/truncated.jpg", whole[:len(whole) // 2])
    write_bytes(f"{root}/b/text.jpg", b"this is not a picture\n")
    os.makedirs(f"{root}/empty")
    save(f"{root}/b/.hidden.png", rgb())
    save(f"{root}/.hidden/x.png", rgb())
    save(f"{root}/a/.cache/x.png", rgb())
    write_bytes(f"{root}/a/notes.txt", b"not an image, not broken either")


BROKEN = {"b/corrupt.jpg", "b/truncated.jpg", "b/text.jpg"}


def write_classes(root, counts, size=(48, 64)):
    for name, n in counts.items():
        for i in range(n):
            save(f"{root}/{name}/{i:03d}.png", rgb(*size))


def snapshot(root):
    """Every entry below root with its size and mtime (folders included)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- helpers
def expected(path):
    """The prepared image, by Pillow, done the straightforward way: resize the shorter side to
    S, then crop the centre. JPEGs use the same draft call as folders.py (the draft is part of
    the decode), so every comparison below is exact."""
    with Image.open(path) as im:
        im.draft("RGB", (S, S))
        im = ImageOps.exif_transpose(im)
        if im.mode == "I;16":
            pixels = np.repeat((np.asarray(im) >> 8).astype(np.uint8)[..., None], 3, axis=2)
        elif im.mode in ("RGBA", "LA"):  # over black (the tests' alpha is 0 or 255)
            four = np.asarray(im.convert("RGBA"))
            pixels = four[..., :3] * (four[..., 3:] == 255)
        else:
            pixels = np.asarray(im.convert("RGB"))
    h, w = pixels.shape[:2]
    nw, nh = w * S // min(w, h), h * S // min(w, h)
    resized = Image.fromarray(pixels).resize((nw, nh), Image.BILINEAR)
    left, top = (nw - S) // 2, (nh - S) // 2
    return np.asarray(resized.crop((left, top, left + S, top + S))).transpose(2, 0, 1)


def by_path(prepared):
    """{relative path: (image, label)} over both splits."""
    out = {}
    skipped = {s["path"] for s in prepared.manifest["skipped"]}
    for name in ("train", "val"):
        split = getattr(prepared, name)
        good = [src for src in prepared.manifest["splits"][name]["sources"] if src[0] not in skipped]
        assert len(good) == len(split.images)
        for k, src in enumerate(good):
            out[src[0]] = (np.asarray(split.images[k]), None if split.labels is None else int(split.labels[k]))
    return out


def prepare(data, cache, **kw):
    """folders.prepare, quietly, returning (prepared, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        prepared = folders.prepare(str(data), image_size=kw.pop("image_size", S), cache=str(cache),
                                   workers=kw.pop("workers", 0), progress=False, **kw)
    return prepared, err.getvalue()


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts the images decoded in this process (workers=0); `fail_after` raises
    KeyboardInterrupt on that call, like a Ctrl-C in the middle."""
    calls = {"n": 0, "fail_after": None}
    real = decode.load_image

    def counted(path, image_size):
        if calls["fail_after"] is not None and calls["n"] >= calls["fail_after"]:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(path, image_size)
    monkeypatch.setattr(decode, "load_image", counted)
    return calls


def assert_same(a, b):
    """Two preparations hold the same result."""
    for name in ("train", "val"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(x.images, y.images)
        assert (x.labels is None and y.labels is None) or np.array_equal(x.labels, y.labels)
    assert a.classes == b.classes and a.mean == b.mean and a.std == b.std
    for key in ("skipped", "layout", "settings", "complete"):
        assert a.manifest[key] == b.manifest[key]
    for name in ("train", "val"):
        assert a.manifest["splits"][name] == b.manifest["splits"][name]


# ----------------------------------------------------------------------------- one folder of everything
@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    base = tmp_path_factory.mktemp("everything")
    data = base / "pictures"
    write_everything(str(data))
    before = snapshot(str(data))
    prepared, err = prepare(data, base / "cache", val_fraction=0.25)
    return data, prepared, err, before


def test_every_format_and_mode_matches_pillow(everything):
    data, prepared, _, _ = everything
    got = by_path(prepared)
    names = {p for p in got}
    assert {"a/plain.jpg", "a/upper.JPG", "a/long.jpeg", "a/image.webp", "a/image.bmp", "a/image.tif",
            "a/deep/er/image.tiff", "b/cmyk.jpg", "b/palette.png", "b/la.png", "b/sixteen.png"} <= names
    assert len(got) == 17
    for path, (image, _) in got.items():
        assert image.dtype == np.uint8 and image.shape == (3, S, S)
        assert np.array_equal(image, expected(os.path.join(data, path))), path
    # the checks bite: alpha made black, 16-bit scaled, not just any RGB conversion
    four = np.asarray(Image.open(data / "b/rgba.png").convert("RGB").resize((32, 24), Image.BILINEAR))
    assert not np.array_equal(got["b/rgba.png"][0], four[:, 4:28].transpose(2, 0, 1))
    assert got["b/sixteen.png"][0].std() > 10 and got["b/sixteen.png"][0].mean() < 200  # not clipped to white


def test_exif_orientation_is_applied(everything):
    data, prepared, _, _ = everything
    image = by_path(prepared)["b/rotated.jpg"][0]
    with Image.open(data / "b/rotated.jpg") as im:
        im.draft("RGB", (S, S))
        raw = np.asarray(im.convert("RGB"))                  # 24 x 32 as stored
        upright = np.asarray(ImageOps.exif_transpose(im))    # 32 x 24, turned
    assert raw.shape[:2] == (24, 32) and upright.shape[:2] == (32, 24)
    assert np.array_equal(image, upright[4:28].transpose(2, 0, 1))
    assert not np.array_equal(image, raw[:, 4:28].transpose(2, 0, 1))


def test_labels_classes_and_ignored_files(everything):
    _, prepared, _, _ = everything
    assert prepared.classes == ["a", "b"]  # a folder of no images is no class
    for path, (_, label) in by_path(prepared).items():
        assert label == "ab".index(path[0]), path
    listed = [s[0] for name in ("train", "val") for s in prepared.manifest["splits"][name]["sources"]]
    assert not [p for p in listed if "hidden" in p or "/." in p or p.endswith(".txt")]
    assert len(listed) == 17 + 3


def test_broken_files_are_skipped_and_listed(everything):
    _, prepared, err, _ = everything
    skipped = {s["path"]: s["reason"] for s in prepared.manifest["skipped"]}
    assert set(skipped) == BROKEN
    assert all(skipped.values())
    assert "truncated" in skipped["b/truncated.jpg"]
    assert "not a readable JPEG" in skipped["b/text.jpg"]
    said = "; ".join(f"{path}: {skipped[path]}" for path in sorted(BROKEN))  # each named, with its reason
    assert f"skipped 3 unreadable files ({said}; all listed in {prepared.root}{os.sep}manifest.json)" in err
    assert "preparing 20 images at 24x24 into" in err and "(empty) holds no images: not a class" in err
    counts = prepared.manifest["splits"]
    assert counts["train"]["count"] + counts["val"]["count"] == 17
    assert counts["train"]["skipped"] + counts["val"]["skipped"] == 3


def test_a_disk_too_small_for_the_preparation_is_refused_before_it_starts(tmp_path, monkeypatch):
    # What it needs and what is free, in units that show them (a small disk: not "0.0 GB")
    root = tmp_path / "pictures"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    free = shutil._ntuple_diskusage(10**6, 10**6 - 4096, 4096)
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: free)
    with pytest.raises(UserError, match=r"preparing 12 images at 16x16 needs 9\.2 kB, but only 4\.1 kB are free"):
        folders.prepare(str(root), image_size=16, cache=str(tmp_path / "cache" / "pictures-16"), progress=False)
    assert not (tmp_path / "cache").exists()  # refused before the folder is made: nothing left behind
    assert [folders.size_text(n) for n in (2.5e11, 3.2e6)] == ["250.0 GB", "3.2 MB"]


def test_an_empty_file_is_said_so_and_many_skipped_are_named_a_few(tmp_path):
    data = tmp_path / "d"
    for i in range(4):
        save(f"{data}/a/{i}.png", rgb())
        write_bytes(f"{data}/b/{i}.png", b"")
    prepared, err = prepare(data, tmp_path / "c", val_fraction=0.3)
    assert {s["reason"] for s in prepared.manifest["skipped"]} == {"an empty file"}
    assert re.search(r"skipped 4 unreadable files \((b/\d\.png: an empty file; ){3}\.\.\.; all listed in", err), err


def test_mean_std_and_manifest(everything):
    data, prepared, _, _ = everything
    pixels = np.asarray(prepared.train.images, dtype=np.float64)
    assert np.allclose(prepared.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    assert np.allclose(prepared.std, pixels.std(axis=(0, 2, 3)), rtol=1e-9)
    assert isinstance(prepared.train.images, np.memmap) and not prepared.train.images.flags.writeable
    assert prepared.train.labels.dtype == np.int64
    with open(os.path.join(prepared.root, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest == prepared.manifest
    assert manifest["complete"] is True and manifest["version"] == folders.VERSION
    assert manifest["settings"] == {"image_size": S, "val_fraction": 0.25, "seed": 0}
    assert manifest["data"] == str(data) and manifest["layout"] == "classes"
    assert sorted(os.listdir(prepared.root)) == [".lock", "manifest.json", "train.labels.npy", "train.u8",
                                                 "val.labels.npy", "val.u8"]
    assert os.path.getsize(os.path.join(prepared.root, "train.u8")) == len(prepared.train.images) * 3 * S * S


def test_data_folder_is_never_written(everything, tmp_path):
    data, _, _, before = everything
    prepare(data, tmp_path / "again", val_fraction=0.5, seed=3)  # and again, elsewhere
    assert snapshot(str(data)) == before


# ----------------------------------------------------------------------------- reuse and invalidation
def test_reuse_decodes_nothing(tmp_path, count_decodes):
    write_classes(tmp_path / "d", {"x": 4, "y": 3})
    first, _ = prepare(tmp_path / "d", tmp_path / "c")
    assert count_decodes["n"] == 7
    again, err = prepare(tmp_path / "d", tmp_path / "c")
    assert count_decodes["n"] == 7 and err == ""
    assert_same(first, again)
    # the work files of a preparation killed after its manifest was completed: gone on reuse
    for name in folders.WORK_FILES:
        (tmp_path / "c" / name).write_bytes(b"left")
    prepare(tmp_path / "d", tmp_path / "c")
    assert count_decodes["n"] == 7 and not any((tmp_path / "c" / name).exists() for name in folders.WORK_FILES)


def test_changes_rebuild_with_one_line_saying_why(tmp_path, count_decodes):
    data, cache = tmp_path / "d", tmp_path / "c"
    write_classes(data, {"x": 4, "y": 3})
    prepare(data, cache)

    def rebuilt(expect, **kw):
        count_decodes["n"] = 0
        prepared, err = prepare(data, cache, **kw)
        lines = [line for line in err.splitlines() if "rebuilding" in line]
        assert len(lines) == 1 and expect in lines[0], err
        assert count_decodes["n"] == sum(len(prepared.manifest["splits"][s]["sources"]) for s in ("train", "val"))
        return prepared

    save(f"{data}/x/new.png", rgb())
    assert len(rebuilt("1 files added (e.g. x/new.png)").train.images) + 1 == 8  # 7 train, 1 val
    os.remove(f"{data}/y/000.png")
    rebuilt("1 files removed (e.g. y/000.png)")
    st = os.stat(f"{data}/x/001.png")
    os.utime(f"{data}/x/001.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt("1 files changed (e.g. x/001.png)")
    rebuilt("image_size changed (24 -> 16)", image_size=16)
    rebuilt("image_size changed (16 -> 24)")
    rebuilt("val_fraction changed (0.1 -> 0.5)", val_fraction=0.5)
    rebuilt("seed changed (0 -> 1)", val_fraction=0.5, seed=1)
    os.makedirs(f"{data}/z")  # no images: no class, nothing to rebuild
    assert "rebuilding" not in prepare(data, cache, val_fraction=0.5, seed=1)[1]
    save(f"{data}/z/0.png", rgb())
    rebuilt("the class folders changed (2 -> 3 classes)", val_fraction=0.5, seed=1)


def test_deleted_cache_files_rebuild(tmp_path):
    write_classes(tmp_path / "d", {"x": 3})
    prepare(tmp_path / "d", tmp_path / "c")
    os.remove(tmp_path / "c" / "train.labels.npy")
    prepared, err = prepare(tmp_path / "d", tmp_path / "c")
    assert "train.labels.npy is missing" in err and len(prepared.train.labels) == 3


# ----------------------------------------------------------------------------- resume
def test_resume_after_interrupt_decodes_only_the_rest(tmp_path, count_decodes):
    data = tmp_path / "d"
    write_classes(data, {"x": 6, "y": 5})
    write_bytes(f"{data}/x/001.png", b"broken")  # skipped before the interrupt: its reason must survive
    count_decodes["fail_after"] = 5
    with pytest.raises(KeyboardInterrupt):
        prepare(data, tmp_path / "c")
    with open(tmp_path / "c" / "manifest.json") as f:
        assert json.load(f)["complete"] is False
    count_decodes.update(n=0, fail_after=None)
    resumed, err = prepare(data, tmp_path / "c")
    assert count_decodes["n"] == 11 - 5 and "resuming after 5" in err
    whole, _ = prepare(data, tmp_path / "whole")
    assert_same(resumed, whole)
    assert [s["path"] for s in resumed.manifest["skipped"]] == ["x/001.png"]
    assert "not a readable JPEG" in resumed.manifest["skipped"][0]["reason"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_kill(tmp_path, count_decodes, workers):
    data, cache = tmp_path / "d", tmp_path / "c"
    write_classes(data, {"x": 20, "y": 20})
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        import decode, folders
        folders.COMMIT_SECONDS = 0
        real = decode.load_image
        def slow(path, size):
            time.sleep(0.05)
            return real(path, size)
        decode.load_image = slow
        folders.prepare({str(data)!r}, image_size={S}, cache={str(cache)!r}, workers={workers}, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    done_file, deadline = cache / "train.done", time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if done_file.exists() and (np.fromfile(done_file, np.uint8) != 0).sum() >= 8:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    # The pool's workers end with it (the pipe closes only when they have), quietly.
    _, err = child.communicate(timeout=30)
    assert "Traceback" not in err, err
    committed = sum(int((np.fromfile(cache / f"{s}.done", np.uint8) != 0).sum()) for s in ("train", "val"))
    assert 8 <= committed <= 30  # killed part way through train (32 images)
    resumed, _ = prepare(data, cache)
    assert count_decodes["n"] == 40 - committed
    whole, _ = prepare(data, tmp_path / "whole")
    assert_same(resumed, whole)


# ----------------------------------------------------------------------------- layouts
def test_train_val_layout(tmp_path):
    data = tmp_path / "imagenet"
    write_classes(data / "train", {"n02": 3, "n01": 2, "n03": 2})
    save(f"{data}/train/n01/sub/folder/deep.png", rgb())
    write_classes(data / "val", {"n01": 1, "n03": 2})  # no val for n02: fine
    prepared, _ = prepare(data, tmp_path / "c", val_fraction=0.5, seed=7)  # both unused here
    assert prepared.classes == ["n01", "n02", "n03"] and prepared.manifest["layout"] == "train-val"
    assert prepared.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert prepared.val.labels.tolist() == [0, 2, 2]
    train = [s[0] for s in prepared.manifest["splits"]["train"]["sources"]]
    assert train[:3] == ["train/n01/000.png", "train/n01/001.png", "train/n01/sub/folder/deep.png"]
    again, err = prepare(data, tmp_path / "c", val_fraction=0.2, seed=1)
    assert "rebuilding" not in err  # val_fraction and seed do not matter to this layout

    save(f"{data}/val/n09/0.png", rgb())
    with pytest.raises(UserError, match=r"val/n09: class 'n09' is not one of the 3 class folders"):
        prepare(data, tmp_path / "c")
    os.remove(f"{data}/val/n09/0.png")
    os.rename(f"{data}/val/n09", f"{data}/val/n02")  # a known class, but empty: no class, as before
    assert prepare(data, tmp_path / "c")[0].val.labels.tolist() == [0, 2, 2]
    os.rmdir(f"{data}/val/n02")
    save(f"{data}/val/loose.png", rgb())
    with pytest.raises(UserError, match=r"val holds 1 images outside class folders \(e.g. loose.png\)"):
        prepare(data, tmp_path / "c")


def test_unlabelled_train_and_val_folders(tmp_path):
    # train/ and val/ of images alone (photos for pretraining, split by the user): unlabelled,
    # each image in the split of its folder.
    data = tmp_path / "photos"
    for i in range(5):
        save(f"{data}/Train/{i}.jpg", rgb())
    save(f"{data}/val/9.png", rgb())
    prepared, _ = prepare(data, tmp_path / "c", val_fraction=0.5)
    assert prepared.manifest["layout"] == "flat-train-val" and prepared.classes == []
    assert prepared.train.labels is None and prepared.val.labels is None
    assert [s[0] for s in prepared.manifest["splits"]["val"]["sources"]] == ["val/9.png"]
    assert len(prepared.train.images) == 5 and len(prepared.val.images) == 1
    assert "rebuilding" not in prepare(data, tmp_path / "c", val_fraction=0.2)[1]  # val is not drawn
    os.makedirs(f"{data}/val/empty")  # a folder of no image is no class
    assert prepare(data, tmp_path / "c")[0].manifest["layout"] == "flat-train-val"
    for split in ("val", "Train"):  # one side holds no image (other files, or folders of none)
        os.rename(f"{data}/{split}", f"{data}/{split}.away")
        os.makedirs(f"{data}/{split}/empty")
        (data / split / "notes.txt").write_text("no image")
        with pytest.raises(UserError, match=rf"{split} holds no images \(.jpg .*\) beside .*s: give it images too"):
            prepare(data, tmp_path / "c")
        shutil.rmtree(f"{data}/{split}")
        os.rename(f"{data}/{split}.away", f"{data}/{split}")
    save(f"{data}/val/cat/0.png", rgb())  # images in classes on one side, loose on the other: unclear
    with pytest.raises(UserError, match=r"Train holds 5 images outside class folders .*\(or, unlabelled, give both"):
        prepare(data, tmp_path / "c")


def test_train_without_val_says_what_to_do(tmp_path):
    write_classes(tmp_path / "d" / "train", {"x": 2})
    with pytest.raises(UserError, match=r"has train/ but no val/"):
        prepare(tmp_path / "d", tmp_path / "c")


def test_held_out_split_is_stratified_seeded_and_disjoint(tmp_path):
    data = tmp_path / "d"
    sizes = {"one": 1, "two": 2, "ten": 10, "many": 25}
    write_classes(data, sizes, size=(8, 8))

    def split(seed, cache):
        p, _ = prepare(data, tmp_path / cache, val_fraction=0.2, seed=seed, image_size=8)
        return [[s[0] for s in p.manifest["splits"][name]["sources"]] for name in ("train", "val")], p

    (train, val), p = split(0, "a")
    assert not set(train) & set(val) and len(train) + len(val) == 38
    per_class = {c: sum(v.startswith(c + "/") for v in val) for c in sizes}
    assert per_class == {"one": 0, "two": 0, "ten": 2, "many": 5}  # round(0.2 n), one kept for train
    assert train == sorted(train) and val == sorted(val)
    assert p.val.labels.tolist() == sorted(p.classes.index(v.split("/")[0]) for v in val)
    assert split(0, "b")[0] == [train, val]
    assert split(1, "c")[0][1] != val


def test_flat_folder_is_unlabelled(tmp_path):
    data = tmp_path / "flat"
    for i in range(10):
        save(f"{data}/{i}.jpg", rgb())
    os.makedirs(data / "nothing-here")  # a folder with no images does not make it a class layout
    prepared, _ = prepare(data, tmp_path / "c", val_fraction=0.3)
    assert prepared.manifest["layout"] == "flat" and prepared.classes == []
    assert prepared.train.labels is None and prepared.val.labels is None
    assert len(prepared.train.images) == 7 and len(prepared.val.images) == 3
    assert not any(name.endswith(".npy") for name in os.listdir(prepared.root))
    save(f"{data}/nothing-here/x.png", rgb())
    with pytest.raises(UserError, match="holds both images"):
        prepare(data, tmp_path / "c")


def test_no_val_fraction_gives_an_empty_val(tmp_path):
    write_classes(tmp_path / "d", {"x": 3})
    prepared, _ = prepare(tmp_path / "d", tmp_path / "c", val_fraction=0)
    assert prepared.val.images.shape == (0, 3, S, S) and prepared.val.labels.shape == (0,)
    assert len(prepared.train.images) == 3


# ----------------------------------------------------------------------------- the pool, errors, odds and ends
def test_worker_pool_gives_the_same_result(tmp_path):
    data = tmp_path / "d"
    write_classes(data, {"x": 12, "y": 12})
    write_bytes(f"{data}/y/005.png", b"broken")
    exif_rotated_jpeg(f"{data}/x/rotated.jpg", 8)
    pooled, _ = prepare(data, tmp_path / "pool", workers=2)
    alone, _ = prepare(data, tmp_path / "alone", workers=0)
    assert_same(pooled, alone)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool forks on Linux only")
def test_the_pool_works_whatever_the_default_start_method(tmp_path):
    # Python 3.14 made forkserver the default: the workers must still start (they quit at
    # once when their parent was not the main process, and the pool waited forever).
    data = tmp_path / "d"
    write_classes(data, {"x": 6, "y": 6})
    script = textwrap.dedent(f"""
        import multiprocessing, sys
        sys.path.insert(0, {REPO!r})
        import folders
        multiprocessing.set_start_method("forkserver")
        folders.prepare({str(data)!r}, image_size={S}, cache={str(tmp_path / "c")!r}, workers=2, progress=False)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, capture_output=True)
    pooled, _ = prepare(data, tmp_path / "c")  # reused: complete and the same as decoded here
    assert_same(pooled, prepare(data, tmp_path / "alone")[0])


def test_only_broken_files_is_one_user_error(tmp_path, capsys):
    data = tmp_path / "bad"
    write_bytes(f"{data}/a.jpg", b"nope")
    write_bytes(f"{data}/b.png", b"nope")
    for _ in range(2):  # and again: the reasons are kept, nothing is decoded twice
        with pytest.raises(UserError) as err:
            prepare(data, tmp_path / "c")
        assert "\n" not in str(err.value) and str(data) in str(err.value)
        assert "no readable image" in str(err.value)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        prepare(tmp_path / "nowhere", tmp_path / "c")
    os.makedirs(tmp_path / "empty" / "class")
    write_bytes(f"{tmp_path}/empty/readme.txt", b"hi")
    with pytest.raises(UserError, match=r"empty holds no images"):
        prepare(tmp_path / "empty", tmp_path / "c")


def test_a_folder_of_no_images_is_no_class(tmp_path):
    # A class with nothing to train on would widen the classifier (and lower its chance level)
    # for nothing: left out, said, in both labelled layouts. (One with val images stays a class,
    # which pretraining may use and what needs labels refuses: test_data.)
    data = tmp_path / "shapes"
    write_classes(data, {"circle": 3, "star": 3})
    os.makedirs(data / "docs")
    write_bytes(f"{data}/docs/notes.txt", b"not an image")
    os.makedirs(data / "nothing" / "deeper")
    prepared, err = prepare(data, tmp_path / "c", val_fraction=0.3)
    assert prepared.classes == ["circle", "star"] and set(prepared.train.labels.tolist()) == {0, 1}
    assert f"note: 2 folders of {data} (docs, nothing) hold no images: not classes" in err

    imagenet = tmp_path / "imagenet"
    write_classes(imagenet / "train", {"n01": 2, "n03": 2})
    write_classes(imagenet / "val", {"n01": 1, "n03": 1})
    os.makedirs(imagenet / "train" / "n02")
    os.makedirs(imagenet / "val" / "n02")
    prepared, err = prepare(imagenet, tmp_path / "c2")
    assert prepared.classes == ["n01", "n03"] and prepared.val.labels.tolist() == [0, 1]
    assert f"note: 1 folder of {imagenet / 'train'} (n02) holds no images: not a class" in err
    save(f"{imagenet}/val/loose.png", rgb())  # refused: the one line, with no note before it
    said = io.StringIO()
    with pytest.raises(UserError, match="images outside class folders"), contextlib.redirect_stderr(said):
        folders.prepare(str(imagenet), image_size=S, cache=str(tmp_path / "c2"), workers=0, progress=False)
    assert said.getvalue() == ""
    os.remove(f"{imagenet}/val/loose.png")
    save(f"{imagenet}/val/n02/0.png", rgb())
    prepared, err = prepare(imagenet, tmp_path / "c2")
    assert prepared.classes == ["n01", "n02", "n03"] and prepared.val.labels.tolist() == [0, 1, 2]
    assert "not a class" not in err


def test_bad_settings_and_cache_inside_data(tmp_path):
    write_classes(tmp_path / "d", {"x": 2})
    for kw, message in (({"image_size": 0}, "--image-size"), ({"val_fraction": 1.0}, "--val-fraction"),
                        ({"seed": -1}, "seed")):
        with pytest.raises(UserError, match=message):
            prepare(tmp_path / "d", tmp_path / "c", **kw)
    with pytest.raises(UserError, match="inside the data folder"):
        prepare(tmp_path / "d", tmp_path / "d" / "cache")
    assert not (tmp_path / "d" / "cache").exists()


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    write_classes(tmp_path / "d", {"x": 2}, size=(8, 8))
    save(f"{tmp_path}/d/x/huge.png", rgb(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 > 1000: a warning, made an error
    prepared, _ = prepare(tmp_path / "d", tmp_path / "c", image_size=8, val_fraction=0)
    assert [s["path"] for s in prepared.manifest["skipped"]] == ["x/huge.png"]
    assert "DecompressionBomb" in prepared.manifest["skipped"][0]["reason"]


def test_default_cache_location(tmp_path, monkeypatch):
    write_classes(tmp_path / "my-data", {"x": 2})
    monkeypatch.chdir(tmp_path)
    prepared = folders.prepare("my-data/", image_size=S, workers=0, progress=False)
    assert prepared.root == str(tmp_path / "prepared" / f"my-data-{S}")


def test_is_image_folder(tmp_path):
    write_classes(tmp_path / "classes", {"x": 1})
    write_classes(tmp_path / "imagenet" / "train", {"x": 1})
    write_classes(tmp_path / "imagenet" / "val", {"x": 1})
    save(f"{tmp_path}/flat/a.PNG", rgb())
    for name in ("classes", "imagenet", "flat"):
        assert listing.is_image_folder(str(tmp_path / name)), name
    for marker in ("cifar-10-batches-py", "data_batch_1", "cifar-10-python.tar.gz"):
        write_bytes(f"{tmp_path}/cifar-{marker}/{marker}", b"")
        save(f"{tmp_path}/cifar-{marker}/stray.png", rgb())
        assert not listing.is_image_folder(str(tmp_path / f"cifar-{marker}"))
    os.makedirs(tmp_path / "nothing" / ".hidden")
    save(f"{tmp_path}/nothing/.hidden/a.png", rgb())
    write_bytes(f"{tmp_path}/nothing/a.txt", b"")
    assert not listing.is_image_folder(str(tmp_path / "nothing"))
    assert not listing.is_image_folder(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- robustness
def test_a_cache_that_cannot_be_created_is_one_user_error(tmp_path):
    write_classes(tmp_path / "d", {"x": 2})
    write_bytes(f"{tmp_path}/a-file", b"")
    for cache in ("/proc/x", tmp_path / "a-file", tmp_path / "a-file" / "below"):
        with pytest.raises(UserError, match="cannot create the folder") as err:
            prepare(tmp_path / "d", cache)
        assert str(cache) in str(err.value) and "\n" not in str(err.value)


def test_an_impossible_size_is_refused_before_the_cache_is_touched(tmp_path, count_decodes):
    data, cache = tmp_path / "d", tmp_path / "c"
    write_classes(data, {"x": 3, "y": 2})
    first, _ = prepare(data, cache, image_size=8)
    files = lambda: {k: v for k, v in snapshot(str(cache)).items() if k != ".lock"}  # the lock is rewritten
    before = files()
    with pytest.raises(UserError, match="99999999x99999999") as err:
        prepare(data, cache, image_size=99999999)
    assert "\n" not in str(err.value)
    assert files() == before  # nothing deleted, nothing written
    count_decodes["n"] = 0
    again, err = prepare(data, cache, image_size=8)
    assert again.manifest["complete"] and count_decodes["n"] == 0 and err == ""
    assert_same(first, again)


def test_an_allocation_the_os_refuses_is_one_user_error(tmp_path, monkeypatch):
    """A file system whose largest file is smaller than its free space (FAT32: 4 GB)."""
    write_classes(tmp_path / "d", {"x": 2})

    class TooLarge(io.FileIO):
        def truncate(self, size=None):
            if size and self.name.endswith(".u8"):
                raise OSError(27, "File too large")
            return super().truncate(size)
    monkeypatch.setattr(folders, "open", lambda path, mode="r", *a, **kw:
                        TooLarge(path, mode) if mode == "wb" else open(path, mode, *a, **kw), raising=False)
    with pytest.raises(UserError, match=f"at {S}x{S}.*File too large"):
        prepare(tmp_path / "d", tmp_path / "c")


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("layout"), lambda m: m.update(mean=None), lambda m: m.pop("complete"),
    lambda m: m["settings"].pop("seed"), lambda m: m["splits"]["val"].pop("shape"),
    lambda m: m["splits"]["train"].update(shape=[1, 2]), lambda m: m.update(classes="x"),
    lambda m: m["splits"]["train"]["sources"].append("x"), lambda m: m.update(splits=[]),
])
def test_a_manifest_lacking_what_is_read_rebuilds_with_one_line(tmp_path, edit):
    data, cache = tmp_path / "d", tmp_path / "c"
    write_classes(data, {"x": 3, "y": 2})
    first, _ = prepare(data, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    again, err = prepare(data, cache)
    lines = [line for line in err.splitlines() if "rebuilding" in line or "starting over" in line]
    assert len(lines) == 1 and "Traceback" not in err and ": manifest.json" in lines[0], err
    assert again.manifest["complete"]
    assert_same(first, again)


# ----------------------------------------------------------------------------- what users' folders hold
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names of any bytes: Linux file systems")
def test_a_class_name_that_is_not_utf8(tmp_path):
    data = tmp_path / "d"
    latin1 = os.fsdecode(b"caf\xe9")  # as unzipped from an old Windows or Latin-1 archive
    write_classes(data, {latin1: 10, "tea": 10}, size=(8, 8))
    prepared, _ = prepare(data, tmp_path / "c", image_size=8, val_fraction=0.2)
    assert prepared.classes == [latin1, "tea"] and sorted(set(prepared.val.labels.tolist())) == [0, 1]
    again, err = prepare(data, tmp_path / "c", image_size=8, val_fraction=0.2)  # the manifest reads back
    assert "rebuilding" not in err and again.classes == prepared.classes


def test_split_folders_in_any_case(tmp_path):
    data = tmp_path / "d"
    write_classes(data / "Train", {"x": 2, "y": 2}, size=(8, 8))
    write_classes(data / "Validation", {"x": 1, "y": 1}, size=(8, 8))
    prepared, _ = prepare(data, tmp_path / "c", image_size=8)
    assert prepared.manifest["layout"] == "train-val" and prepared.classes == ["x", "y"]
    assert len(prepared.train.images) == 4 and len(prepared.val.images) == 2
    write_classes(tmp_path / "e" / "training", {"x": 2, "y": 2}, size=(8, 8))
    write_classes(tmp_path / "e" / "VALID", {"x": 1, "y": 1}, size=(8, 8))
    assert prepare(tmp_path / "e", tmp_path / "c3", image_size=8)[0].manifest["layout"] == "train-val"
    # Train/ alone is a class (trains, buses), as before; train/ alone is a layout missing val/
    write_classes(tmp_path / "v", {"Train": 3, "bus": 3}, size=(8, 8))
    vehicles, _ = prepare(tmp_path / "v", tmp_path / "c2", image_size=8)
    assert vehicles.manifest["layout"] == "classes" and vehicles.classes == ["Train", "bus"]
    # and on a disk blind to case (macOS, Windows), where Train/ is also found as train/
    real_isdir = os.path.isdir
    blind = lambda p: real_isdir(p) or any(real_isdir(q) and q.lower() == str(p).lower()
                                           for q in glob.glob(os.path.join(os.path.dirname(p), "*")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os.path, "isdir", blind)
        assert blind(tmp_path / "v" / "train")
        assert prepare(tmp_path / "v", tmp_path / "c6", image_size=8)[0].classes == ["Train", "bus"]
    # a split folder among class folders is not read as one more class
    write_classes(tmp_path / "w", {"car": 3, "bus": 3, "val/car": 1, "val/bus": 1}, size=(8, 8))
    with pytest.raises(UserError, match=r"w/val is named like a split, not a class: give .* a train/ and a val/"):
        prepare(tmp_path / "w", tmp_path / "c5", image_size=8)
    with pytest.raises(UserError, match=r"000.png is a file, not a folder of images"):
        prepare(tmp_path / "v" / "bus" / "000.png", tmp_path / "c4", image_size=8)


def test_classes_too_small_to_test_are_said(tmp_path):
    write_classes(tmp_path / "d", {"big": 20, "small": 3, "tiny": 1}, size=(8, 8))
    prepared, err = prepare(tmp_path / "d", tmp_path / "c", image_size=8)
    assert sorted(set(prepared.val.labels.tolist())) == [0]
    assert "note: 2 class folders (small, tiny) too small to hold out any image at --val-fraction 0.1" in err


def test_links_that_loop_and_pipes_named_like_images(tmp_path):
    data = tmp_path / "d"
    write_classes(data, {"x": 3, "y": 3}, size=(8, 8))
    os.symlink("loop.jpg", data / "x" / "loop.jpg")  # ELOOP when followed
    os.symlink("loopy", data / "y" / "loopy")
    os.mkfifo(data / "y" / "pipe.jpg")  # opening it would wait for a writer forever
    done = {}
    worker = __import__("threading").Thread(
        target=lambda: done.update(p=prepare(data, tmp_path / "c", image_size=8, val_fraction=0)[0]), daemon=True)
    worker.start()
    worker.join(60)
    assert "p" in done, "the preparation hung or failed"
    prepared = done["p"]
    assert len(prepared.train.images) == 6
    assert [s["path"] for s in prepared.manifest["skipped"]] == ["x/loop.jpg"]  # listed, as a dangling link is
    assert all("pipe" not in s[0] for s in prepared.manifest["splits"]["train"]["sources"])


def test_a_file_reached_in_two_places_is_refused_and_twice_in_one_place_is_read_once(tmp_path):
    # a class folder linked into another class, val/ linked to train/, a hard link across classes
    write_classes(tmp_path / "a", {"cats": 2, "dogs": 2}, size=(8, 8))
    os.symlink("../cats", tmp_path / "a" / "dogs" / "more")
    write_classes(tmp_path / "b" / "train", {"x": 2, "y": 2}, size=(8, 8))
    os.makedirs(tmp_path / "b" / "val")
    os.symlink("../train/y", tmp_path / "b" / "val" / "y")
    write_classes(tmp_path / "c", {"cats": 2, "dogs": 2}, size=(8, 8))
    os.link(tmp_path / "c" / "cats" / "001.png", tmp_path / "c" / "dogs" / "cat.png")
    for data, first, second in (("a", "cats/000.png", "dogs/more/000.png"), ("b", "train/y/000.png", "val/y/000.png"),
                                ("c", "cats/001.png", "dogs/cat.png")):
        with pytest.raises(UserError, match=rf"^{first} and {second} are one file \(reached through a link\): "
                                            "an image may stand in one class folder and one split only"):
            listing.find_sources(str(tmp_path / data))
    # in one place (a class, a flat folder held out from): once, so never in both train and val
    write_classes(tmp_path / "d", {"cats": 3, "dogs": 3}, size=(8, 8))
    os.symlink("000.png", tmp_path / "d" / "cats" / "again.png")
    os.symlink(".", tmp_path / "d" / "dogs" / "self")
    _, _, sources = listing.find_sources(str(tmp_path / "d"), val_fraction=0.5)
    assert sorted(s[0] for s in sources["train"] + sources["val"]) == [f"{c}/{i:03d}.png" for c in ("cats", "dogs")
                                                                       for i in range(3)]
    assert all(len(s) == 4 for s in sources["train"] + sources["val"])  # [path, size, mtime_ns, label]
    save(tmp_path / "e" / "0.png", rgb(8, 8))
    os.symlink("0.png", tmp_path / "e" / "1.png")
    _, _, sources = listing.find_sources(str(tmp_path / "e"), val_fraction=0.5)
    assert [s[0] for s in sources["train"] + sources["val"]] == ["0.png"]
    # a file of no known identity (a dangling link; st_ino 0, as on Windows) is no other's
    rows = [[f"{i}.png", 1, 0, None, None] for i in range(3)]
    assert listing._one_place_each([rows[:2], rows[2:]]) == [[[f"{i}.png", 1, 0, None] for i in range(2)],
                                                            [["2.png", 1, 0, None]]]


def test_a_class_called_train_beside_other_classes_and_a_test_folder_for_val(tmp_path):
    write_classes(tmp_path / "v", {"train": 3, "bus": 3, "car": 3}, size=(8, 8))  # CIFAR-100 has trains
    layout, classes, _ = listing.find_sources(str(tmp_path / "v"))
    assert layout == "classes" and classes == ["bus", "car", "train"]
    # a split otherwise: of class folders (even with a stray image), beside a test folder by
    # another name (Kaggle's train/ and test1/), or with one folder beside it
    for name, counts in (("w", {"train/x": 2, "train/y": 2, "train": 1, "bus": 2, "car": 2}),
                         ("k", {"train": 3, "test1": 3, "extra": 2}), ("o", {"train": 3, "bus": 3})):
        write_classes(tmp_path / name, counts, size=(8, 8))
        with pytest.raises(UserError, match=r"has train/ but no val/"):
            listing.find_sources(str(tmp_path / name))
    write_classes(tmp_path / "t", {"Train/x": 2, "test/x": 1}, size=(8, 8))
    with pytest.raises(UserError, match=r"t has Train/ and test/ but no val/: rename test/ to val/"):
        listing.find_sources(str(tmp_path / "t"))


def test_a_zip_made_on_a_mac_and_class_names_spelt_two_ways(tmp_path):
    write_classes(tmp_path / "z", {"cats": 2, "dogs": 2, "__MACOSX/cats": 2}, size=(8, 8))
    assert listing.find_sources(str(tmp_path / "z"))[1] == ["cats", "dogs"]
    save(tmp_path / "m" / "__MACOSX" / "0.png", rgb(8, 8))
    assert not listing.is_image_folder(str(tmp_path / "m"))
    # café written as one character under train/ and as e + an accent under val/ (a copy from a Mac)
    write_classes(tmp_path / "u" / "train", {"caf\u00e9": 2, "tea": 2}, size=(8, 8))
    write_classes(tmp_path / "u" / "val", {"cafe\u0301": 1, "tea": 1}, size=(8, 8))
    layout, classes, sources = listing.find_sources(str(tmp_path / "u"))
    assert classes == ["caf\u00e9", "tea"] and [s[3] for s in sources["val"]] == [0, 1]
    write_classes(tmp_path / "u" / "train", {"cafe\u0301": 2}, size=(8, 8))  # both spellings: each its own
    assert [s[3] for s in listing.find_sources(str(tmp_path / "u"))[2]["val"]] == [0, 2]  # (e + accent sorts first)


def test_more_than_8_bit_grayscale_and_rare_extensions(tmp_path):
    data = tmp_path / "d"
    ramp = np.linspace(0, 1, 8 * 8, dtype=np.float32).reshape(8, 8)
    save(f"{data}/x/unit-float.tif", Image.fromarray(ramp, mode="F"))              # floats in [0, 1]
    save(f"{data}/x/byte-float.tif", Image.fromarray(ramp * 255, mode="F"))        # floats in [0, 255]
    save(f"{data}/x/int32-bytes.tif", Image.fromarray((ramp * 255).astype(np.int32), mode="I"))
    save(f"{data}/x/int32-words.tif", Image.fromarray((ramp * 65535).astype(np.int32), mode="I"))
    save(f"{data}/x/photo.jfif", rgb(8, 8), format="JPEG")
    save(f"{data}/x/photo.jpe", rgb(8, 8), format="JPEG")
    prepared, _ = prepare(data, tmp_path / "c", image_size=8, val_fraction=0)
    images = by_path(prepared)
    assert set(images) == {"x/unit-float.tif", "x/byte-float.tif", "x/int32-bytes.tif", "x/int32-words.tif",
                           "x/photo.jfif", "x/photo.jpe"}
    want = (ramp * 255 + 0.5).astype(np.uint8)
    for name in ("unit-float", "byte-float", "int32-bytes", "int32-words"):
        got = images[f"x/{name}.tif"][0]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name  # the same ramp, at 8 bits
        assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2])
    assert Image.MAX_IMAGE_PIXELS >= 200_000_000  # phones' 108 and 200 M pixel photos are not "bombs"


def test_a_damaged_labels_file_rebuilds(tmp_path):
    write_classes(tmp_path / "d", {"x": 3, "y": 3}, size=(8, 8))
    first, _ = prepare(tmp_path / "d", tmp_path / "c", image_size=8, val_fraction=0)
    for damage in (b"", b"\x93NUMPY garbage"):
        (tmp_path / "c" / "train.labels.npy").write_bytes(damage)
        again, err = prepare(tmp_path / "d", tmp_path / "c", image_size=8, val_fraction=0)
        assert "train.labels.npy is damaged" in err and "Traceback" not in err
        assert_same(first, again)


def test_two_folders_do_not_share_a_cache(tmp_path, monkeypatch):
    for parent in ("a", "b"):
        write_classes(tmp_path / parent / "pics", {"x": 2, "y": 2 if parent == "a" else 3}, size=(8, 8))
    monkeypatch.chdir(tmp_path)
    quiet = dict(image_size=8, workers=0, progress=False, val_fraction=0)
    folders.prepare("a/pics", **quiet)
    with pytest.raises(UserError, match=r"holds the preparation of another folder of that name, .*a/pics: "
                                        r"give --cache DIR for .*b/pics"):
        folders.prepare("b/pics", **quiet)
    assert folders.prepare("a/pics", **quiet).manifest["complete"]  # kept, not wiped
    folders.prepare("b/pics", cache="elsewhere", **quiet)
    with pytest.raises(UserError, match=r"--cache .*elsewhere holds the preparation of another folder, .*b/pics: "
                                        r"give another --cache DIR for .*a/pics \(or delete"):
        folders.prepare("a/pics", cache="elsewhere", **quiet)  # one given explicitly is not wiped either
    assert folders.prepare("b/pics", cache="elsewhere", **quiet).manifest["complete"]
    # The same folder reached through a link, or moved away and then changed, is not another one.
    os.symlink(tmp_path / "a", tmp_path / "link")
    write_classes(tmp_path / "a" / "pics", {"z": 2}, size=(8, 8))
    assert folders.prepare("link/pics", **quiet).classes == ["x", "y", "z"]
    os.rename(tmp_path / "a", tmp_path / "moved")
    write_classes(tmp_path / "moved" / "pics", {"w": 2}, size=(8, 8))
    assert folders.prepare("moved/pics", **quiet).classes == ["w", "x", "y", "z"]


def test_a_preparation_shared_read_only_is_used_as_it_is(tmp_path, monkeypatch, count_decodes):
    write_classes(tmp_path / "d", {"x": 3, "y": 3}, size=(8, 8))
    first, _ = prepare(tmp_path / "d", tmp_path / "c", image_size=8, val_fraction=0)
    decoded = count_decodes["n"]

    def read_only(root):  # as for a user other than the one who prepared it (root ignores modes)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(folders, "_lock_file", read_only)
    again, err = prepare(tmp_path / "d", tmp_path / "c", image_size=8, val_fraction=0)
    assert count_decodes["n"] == decoded and err == ""
    assert_same(first, again)
    save(f"{tmp_path}/d/x/new.png", rgb(8, 8))  # it no longer matches: said, and nothing is touched
    with pytest.raises(UserError, match=r"c: cannot write in the cache folder \(Permission denied\); it would be "
                                        r"rebuilt: 1 files added"):
        prepare(tmp_path / "d", tmp_path / "c", image_size=8, val_fraction=0)
    with pytest.raises(UserError, match=r"cannot write in the cache folder \(Permission denied\)$"):
        prepare(tmp_path / "d", tmp_path / "fresh", image_size=8, val_fraction=0)
