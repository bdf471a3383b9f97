"""One image file -> uint8 [3, S, S]: how folders.prepare turns each file of a folder into the
image it stores.

Decoded by Pillow (JPEG, PNG, WebP, BMP or TIFF, whatever its extension says), its EXIF
orientation applied, turned into RGB, its shorter side resized to S and the centre S x S kept.
- Resizing is Pillow's BILINEAR, antialiased: what the original RotNet code got from
  torchvision's Resize on ImageNet. JPEGs are first decoded at 1/2, 1/4 or 1/8 scale (draft mode)
  when that still leaves the shorter side >= S: much faster, nearly the same pixels.
- Alpha is composited over black: a transparent background becomes one plain colour instead of
  whatever colours happen to lie under it. 16-bit grayscale keeps its high byte (as Pillow does
  for 16-bit RGB), 32-bit integer grayscale too unless it holds only 0-255, float grayscale in
  [0, 1] is scaled to 0-255; grayscale, palette and CMYK go through Pillow's own conversion.
- A file Pillow cannot read (corrupt, truncated, not an image, a decompression bomb) is a
  reason, never an exception: image_and_sums says which and why.

pool(workers) gives the processes that decode a folder's files side by side.
"""
import ctypes
import multiprocessing
import os
import signal
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # what Pillow may decode (JPEG includes MPO); no EPS etc.
# Pillow refuses images above 89 M pixels as possible decompression bombs, a limit made for web
# uploads: phones take photos of 108 and 200 M pixels. Ours: 256 M (768 MB decoded, a worker).
Image.MAX_IMAGE_PIXELS = 2**28


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
    """A decoded image of any mode -> RGB, as the module's docstring says."""
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


def image_and_sums(task):
    """(path, S) -> (image, None, its channel sums and sums of squares) or (None, reason, None):
    what folders.prepare's decoding workers give back for each file (the sums make the mean
    and std, without reading the images again)."""
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


def pool(workers):
    """A multiprocessing pool of `workers` decoding processes, for image_and_sums."""
    return _pool_context().Pool(workers, _start_worker, (os.getpid(),))


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
