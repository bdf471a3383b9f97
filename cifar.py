"""CIFAR-10 in its original python format: find it, download it (md5-checked), and load it
into uint8 tensors, from its folder or straight from its archive.

    train_x, train_y, test_x, test_y = load_cifar("./data", download_missing=True)

`--data` may be the cifar-10-batches-py folder itself, a folder holding it, the archive
(cifar-10-python.tar.gz, or another cifar-10*python.tar.gz such as a sample), or a folder
holding the archive. An archive is read as it is, never unpacked: nothing is written beside
it, and its other members are never looked at. Batch files are read by an unpickler that
accepts numpy arrays, lists and strings only: a file that carries code is refused, never run.
"""
import glob
import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request
import zlib

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
MEAN = (125.3, 123.0, 113.9)  # per channel, 0-255 scale, as the original code
STD = (63.0, 62.1, 66.7)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _CifarUnpickler(pickle.Unpickler):
    # CIFAR batches hold numpy arrays, lists and strings; anything else is not CIFAR and
    # may be code, so it is refused rather than run.
    # (_frombuffer: how protocol 5 stores arrays; it refuses object arrays.)
    ALLOWED = {(numpy_module, name) for numpy_module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


BATCHES = (tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",))  # train, test
NAMES = BATCHES[0] + BATCHES[1]


def load_batch(f, name):
    """One CIFAR batch (Python 2 or 3 pickle), read from the file object f and called name
    in messages -> uint8 [n, 3, 32, 32], int64 [n]."""
    try:
        batch = _CifarUnpickler(f, encoding="latin1").load()
        get = lambda key: batch[key] if key in batch else batch[key.encode()]
        images = np.asarray(get("data"), dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(get("labels"), dtype=np.int64)
        if len(images) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise ValueError(f"{len(images)} images but {len(labels)} labels in 0..9")
    except Exception as err:  # truncated, corrupt, or not a CIFAR batch at all
        raise UserError(f"{name} is damaged or not a CIFAR-10 batch ({type(err).__name__}: {err}); "
                        "delete it and download the data set again") from None
    return images, labels


def read_folder(folder):
    """{batch name: (images, labels)} from a cifar-10-batches-py folder."""
    missing = [n for n in NAMES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}; download the data set again")
    batches = {}
    for n in NAMES:
        with open(os.path.join(folder, n), "rb") as f:
            batches[n] = load_batch(f, os.path.join(folder, n))
    return batches


def read_archive(archive):
    """{batch name: (images, labels)} straight from the .tar.gz, in one pass and without
    unpacking: only the batch files of its cifar-10-batches-py/ are read, and only plain files."""
    wanted, batches = {f"cifar-10-batches-py/{n}" for n in NAMES}, {}
    try:
        with tarfile.open(archive, "r|gz") as tar:  # a stream: each member read as it comes
            for m in tar:
                name = m.name.removeprefix("./")
                if name not in wanted:
                    continue
                if not m.isfile():
                    raise UserError(f"{archive}: {m.name} is not a plain file (a link?); refusing the archive")
                batches[name.split("/")[-1]] = load_batch(tar.extractfile(m), f"{archive}:{m.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise UserError(f"{archive} is damaged ({type(err).__name__}: {err}); delete it and download it again") from None
    missing = [n for n in NAMES if n not in batches]
    if missing:
        raise UserError(f"{archive} lacks cifar-10-batches-py/{', '.join(missing)}: not CIFAR-10's archive, "
                        "or cut short")
    return batches


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def download(dest, url=None, md5=None):
    """Fetches the archive into dest with a progress bar; keeps it only if its md5 matches."""
    url, md5 = url or URL, md5 or MD5  # read at call time: a mirror can be set
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, os.path.basename(url))
    print(f"downloading {url} to {path}", file=sys.stderr)
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False, disable=None) as bar:
        def report(blocks, block_size, total):
            bar.total = total if total > 0 else None
            bar.update(blocks * block_size - bar.n)
        try:
            urllib.request.urlretrieve(url, path + ".part", reporthook=report)
        except OSError as err:
            raise UserError(f"could not download {url}: {err}") from None
    got = md5_of(path + ".part")
    if got != md5:
        os.remove(path + ".part")
        raise UserError(f"{url}: md5 {got} is not the expected {md5}; nothing was kept")
    os.replace(path + ".part", path)
    return path


def find_cifar(data, download_missing=False):
    """Where CIFAR-10 is for --data: its cifar-10-batches-py folder (--data itself, or in
    --data), else its archive (--data itself, or in --data; downloaded there if missing
    and asked for), else another cifar-10*python.tar.gz in --data (a sample), unless the
    whole data set was asked for."""
    if os.path.isfile(data) and data.endswith((".tar.gz", ".tgz")):
        return data
    if os.path.isfile(data):
        raise UserError(f"{data} is a file: --data is a folder of images, CIFAR-10's folder, or its archive "
                        "(cifar-10-python.tar.gz)")
    if os.path.isdir(data) and not os.access(data, os.R_OK | os.X_OK):
        raise UserError(f"{data}: cannot read the folder (permission denied)")
    if os.path.isfile(os.path.join(data, "data_batch_1")):
        return data
    folder = os.path.join(data, "cifar-10-batches-py")
    if os.path.isdir(folder):
        return folder
    archives = sorted(glob.glob(os.path.join(glob.escape(data), "cifar-10*python.tar.gz")))
    full = os.path.join(data, os.path.basename(URL))
    if full in archives:
        return full
    if download_missing:  # asked for CIFAR-10: another archive there (a sample) is not it, unless it is
        return next((a for a in archives if md5_of(a) == MD5), None) or download(data)  # (renamed)
    if archives:
        return archives[0]
    raise UserError(f"{data} holds neither images (JPEG, PNG, WebP, BMP or TIFF files) nor CIFAR-10 (looked for "
                    f"{folder} and {data}/cifar-10-python.tar.gz): point --data at one, or add --download to fetch "
                    "CIFAR-10")


def load_cifar(data, download_missing=False):
    """CIFAR-10 as uint8 tensors: (train images [N,3,32,32], train labels, test images, test labels)."""
    source = find_cifar(data, download_missing)
    batches = read_archive(source) if os.path.isfile(source) else read_folder(source)
    parts = []
    for names in BATCHES:
        parts.append(torch.from_numpy(np.concatenate([batches[n][0] for n in names])))
        parts.append(torch.from_numpy(np.concatenate([batches[n][1] for n in names])))
    return tuple(parts)
