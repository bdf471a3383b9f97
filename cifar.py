"""CIFAR-10 in its original python format: find it, download it (md5-checked), unpack it
safely, and load it into uint8 tensors.

    train_x, train_y, test_x, test_y = load_cifar("./data", download_missing=True)

`--data DIR` may be the cifar-10-batches-py folder itself, a folder holding it, or a folder
holding cifar-10-python.tar.gz (unpacked there, refusing members that would land outside).
Batch files are read by an unpickler that accepts numpy arrays, lists and strings only: a
file that carries code is refused, never run.
"""
import glob
import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request

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


def load_batch(path):
    """One CIFAR batch file (Python 2 or 3 pickle) -> uint8 [n, 3, 32, 32], int64 [n]."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        get = lambda key: batch[key] if key in batch else batch[key.encode()]
        images = np.asarray(get("data"), dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(get("labels"), dtype=np.int64)
        if len(images) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise ValueError(f"{len(images)} images but {len(labels)} labels in 0..9")
    except Exception as err:  # truncated, corrupt, or not a CIFAR batch at all
        raise UserError(f"{path} is damaged or not a CIFAR-10 batch ({type(err).__name__}: {err}); "
                        "delete it and unpack or download the data set again") from None
    return images, labels


def unpack(archive, dest):
    """Unpacks a .tar.gz into dest, refusing members that are not plain files or folders
    or that would land outside dest (all checked before anything is written)."""
    root = os.path.realpath(dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                target = os.path.realpath(os.path.join(root, m.name))
                if not (m.isfile() or m.isdir()) or os.path.commonpath([root, target]) != root:
                    raise UserError(f"{archive}: refusing to unpack {m.name!r} (not a plain file inside {dest})")
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **extra)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise UserError(f"{archive} is damaged ({type(err).__name__}: {err}); delete it and download it again") from None


def download(dest, url=None, md5=None):
    """Fetches the archive into dest with a progress bar; keeps it only if its md5 matches."""
    url, md5 = url or URL, md5 or MD5  # read at call time: a mirror can be set
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, os.path.basename(url))
    print(f"downloading {url} to {path}", file=sys.stderr)
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False) as bar:
        def report(blocks, block_size, total):
            bar.total = total if total > 0 else None
            bar.update(blocks * block_size - bar.n)
        try:
            urllib.request.urlretrieve(url, path + ".part", reporthook=report)
        except OSError as err:
            raise UserError(f"could not download {url}: {err}") from None
    with open(path + ".part", "rb") as f:
        got = hashlib.md5(f.read()).hexdigest()
    if got != md5:
        os.remove(path + ".part")
        raise UserError(f"{url}: md5 {got} is not the expected {md5}; nothing was kept")
    os.replace(path + ".part", path)
    return path


def find_cifar(data, download_missing=False):
    """The cifar-10-batches-py folder for --data: the folder itself, a folder holding it, or
    a folder holding the archive (which is unpacked there)."""
    if os.path.isfile(os.path.join(data, "data_batch_1")):
        return data
    folder = os.path.join(data, "cifar-10-batches-py")
    if os.path.isdir(folder):
        return folder
    archives = sorted(glob.glob(os.path.join(data, "cifar-10*python.tar.gz")))
    if not archives and download_missing:
        archives = [download(data)]
    if archives:
        unpack(archives[0], data)
        if os.path.isdir(folder):
            return folder
        raise UserError(f"{archives[0]} holds no cifar-10-batches-py folder")
    raise UserError(f"{data} holds neither images nor CIFAR-10 (looked for {folder} and "
                    f"{data}/cifar-10-python.tar.gz): point --data at one, or add --download to fetch CIFAR-10")


def load_cifar(data, download_missing=False):
    """CIFAR-10 as uint8 tensors: (train images [N,3,32,32], train labels, test images, test labels)."""
    folder = find_cifar(data, download_missing)
    parts = []
    for names in ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]):
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise UserError(f"{folder} lacks {', '.join(missing)}; unpack or download the data set again")
        batches = [load_batch(os.path.join(folder, n)) for n in names]
        parts.append(torch.from_numpy(np.concatenate([b[0] for b in batches])))
        parts.append(torch.from_numpy(np.concatenate([b[1] for b in batches])))
    return tuple(parts)
