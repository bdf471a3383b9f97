"""What the tests share: CIFAR-10 files written in the original format (every pickle flavour),
archives, hostile payloads, running a script as a user would, and reading what a run wrote.
Tests import these helpers by name (`from conftest import write_cifar`); pytest.ini puts the
repository root on the path, so the tests import the project's modules directly.
"""
import hashlib
import io
import json
import os
import pickle
import shlex
import socket
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Deterministic mode (poison_outputs) lets cuBLAS run only with this workspace setting, read
# at its first call: the reference's 45-degree turns use bmm on CUDA.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def cifar_rows(images):
    """uint8 [n, 3, 32, 32] -> [n, 3072] as CIFAR-10 stores an image: the red plane, then
    the green, then the blue, each row by row."""
    return np.concatenate([images[:, c].reshape(len(images), 1024) for c in range(3)], axis=1)


def python2_pickle(batch):
    """The bytes Python 2's cPickle wrote for the official batches (protocol 2, str as
    BINSTRING, numpy.core names); Python 3 cannot write str that way, so it is done by hand
    after the opcodes of the real files."""
    def s(b):
        b = b if isinstance(b, bytes) else b.encode("latin1")
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v):
        return b"J" + struct.pack("<i", v)

    data = batch["data"]
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s("b") + b"\x87R"
             + b"(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + s("u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s("|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
             + b"\x89" + s(data.tobytes()) + b"tb")
    labels = b"](" + b"".join(i(v) for v in batch["labels"]) + b"e"
    names = b"](" + b"".join(s(f) for f in batch["filenames"]) + b"e"
    return (b"\x80\x02}(" + s("batch_label") + s(batch["batch_label"]) + s("labels") + labels
            + s("data") + array + s("filenames") + names + b"u.")


def encode_batch(batch, flavour):
    if flavour == "python2":
        return python2_pickle(batch)
    if flavour == "bytes-keys":  # what a Python 2 pickle gives with encoding="bytes"
        as_bytes = {"batch_label": batch["batch_label"].encode(), "labels": batch["labels"],
                    "data": batch["data"], "filenames": [f.encode() for f in batch["filenames"]]}
        return pickle.dumps({k.encode(): v for k, v in as_bytes.items()}, protocol=2)
    protocol = {"str-keys-protocol2": 2, "python3": 4, "python3-protocol5": 5}[flavour]
    return pickle.dumps(batch, protocol=protocol)


def write_folder(root, classes=("cat", "dog", "ship"), per_class=12, size=(40, 36), seed=0):
    """root/<class>/NNN.png of random RGB pictures; returns root."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.png")
    return root


def write_cifar(folder, n_train_per_batch, n_test, flavour="python3", seed=0):
    """Writes folder/cifar-10-batches-py/{data_batch_1..5,test_batch}; returns what it
    wrote as (train images, train labels, test images, test labels), images uint8 [n,3,32,32]."""
    rng = np.random.default_rng(seed)
    batches_dir = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(batches_dir, exist_ok=True)
    written = {}
    for name, n in [(f"data_batch_{b}", n_train_per_batch) for b in range(1, 6)] + [("test_batch", n_test)]:
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {"batch_label": f"{name} of the test", "labels": labels, "data": cifar_rows(images),
                 "filenames": [f"{name}_{j}.png" for j in range(n)]}
        with open(os.path.join(batches_dir, name), "wb") as f:
            f.write(encode_batch(batch, flavour))
        written[name] = (images, np.array(labels, dtype=np.int64))
    train = [written[f"data_batch_{b}"] for b in range(1, 6)]
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
            written["test_batch"][0], written["test_batch"][1])


def make_archive(folder, archive, extra=()):
    """A .tar.gz of folder/cifar-10-batches-py plus extra members: (name, bytes) or TarInfo."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(folder, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
        for member in extra:
            info = member if isinstance(member, tarfile.TarInfo) else tarfile.TarInfo(member[0])
            payload = b"" if isinstance(member, tarfile.TarInfo) else member[1]
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def md5_of(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


class RunsCode:
    """Unpickling this runs a shell command that creates marker: the shape of a hostile file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def cli_command(*args, launcher=(), script="rotnet.py"):
    return [sys.executable, *launcher, script, *map(str, args)]


def cli_env(env=None):
    # One thread per process: runs are bit-reproducible and two of them share 2 cores.
    return dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))


def run_cli(*args, check=True, env=None, timeout=180, launcher=(), script="rotnet.py"):
    """A script (rotnet.py unless told; a launcher such as torchrun may run it) from the repo root."""
    proc = subprocess.run(cli_command(*args, launcher=launcher, script=script), cwd=REPO, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def tiny_run_flags(data, out, *extra):
    return ["--data", data, "--width", "0.125", "--device", "cpu", "--out", out, "--batch-size", "32", *extra]


def assert_one_line_error(proc, *needles):
    """What a user should see: a non-zero exit and one line that says what is wrong."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def metrics_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paper_convs(blocks):
    """(k, in, out) of every conv of the paper's NIN, block by block (the original code's
    architectures/NetworkInNetwork.py)."""
    return ([(5, 3, 192), (1, 192, 160), (1, 160, 96), (5, 96, 192), (1, 192, 192), (1, 192, 192)]
            + [(3, 192, 192), (1, 192, 192), (1, 192, 192)] * (blocks - 2))


def to_original_names(state, blocks):
    """This project's NIN state dict in the names of the original code
    (architectures/NetworkInNetwork.py): the head is the ModuleList entry after the last stage."""
    out = {}
    for key, value in state.items():
        part = key.split(".")
        if part[0] == "head":
            out[f"_feature_blocks.{blocks}.Classifier.{part[1]}"] = value
        else:
            s, j, layer = int(part[1]), int(part[2]) + 1, {"conv": "Conv", "bn": "BatchNorm"}[part[3]]
            out[f"_feature_blocks.{s}.Block{s + 1}_ConvB{j}.layers.{layer}.{part[4]}"] = value
    return out


def save_nin(path, blocks=4, num_classes=4, width=0.125, seed=0, **extra):
    """A model.pt as rotnet.py writes it (untrained: the tests that use it do not care)."""
    from nin import NIN
    torch.manual_seed(seed)
    model = NIN(blocks, num_classes, width)
    torch.save(dict(model=model.state_dict(), model_config=model.config, **extra), path)
    return model


def save_alexnet(path, width=0.05):
    """An AlexNet's model.pt, for the scripts that must refuse one."""
    from alexnet import AlexNet
    model = AlexNet(width=width)
    torch.save(dict(model=model.state_dict(), model_config=model.config), path)


# ----------------------------------------------------------------------------- the operator's tests
# (test_rotation_batch.py against the reference, test_cuda_kernel.py against the CPU kernel)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """300 training and 100 test images in --data layout, shared by a module's command-line runs
    (which only read it); test_probe.py and test_figures.py make smaller ones of their own."""
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar(folder, 60, 100)
    return folder


@pytest.fixture
def poison_outputs():
    """With deterministic algorithms on, torch fills each new tensor (the op's outputs
    included) with NaN, so an element a kernel skips fails the comparison."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def gen(request):
    """A generator seeded by the test's id (ROT_TEST_SEED shifts every seed: other draws)."""
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("ROT_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)


def make_images(gen, N, C, H, W, dtype=torch.uint8, device="cpu", layout="contiguous"):
    """uint8 in [0, 255] or float32 in [0, 1), N x C x H x W, in the asked memory layout."""
    shape = (N, C, H, 2 * W + 1) if layout == "strided" else (N, C, H, W)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    else:
        x = torch.rand(shape, generator=gen)
    x = x.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider image: no unit stride
        x = x[..., 1::2]
    elif layout == "broadcast":  # one image seen N times through a stride-0 dimension
        x = x[:1].expand(N, C, H, W)
    return x


def between(gen, lo, hi):
    """int64, uniform in [lo, hi] per entry (lo, hi: ints or tensors of one shape)."""
    lo, hi = torch.as_tensor(lo, dtype=torch.long), torch.as_tensor(hi, dtype=torch.long)
    u = torch.rand(torch.broadcast_shapes(lo.shape, hi.shape), generator=gen, dtype=torch.float64)
    return lo + (u * (hi - lo + 1)).long().clamp(max=hi - lo)


def make_crops(gen, kind, B, H, W, h, w, device="cpu"):
    """(shifts, boxes) for B crops of H x W images to h x w outputs, on device; one or both
    None. kind: corner, centre, inside, outside (shifts) or box, full, pixel, up, down."""
    shifts = boxes = None
    if kind == "centre":
        shifts = torch.tensor([[(H - h) // 2, (W - w) // 2]] * B, dtype=torch.long).reshape(B, 2)
    elif kind == "inside":  # a random crop
        shifts = torch.stack([between(gen, [0] * B, H - h), between(gen, [0] * B, W - w)], 1)
    elif kind == "outside":  # windows reaching past every edge, some wholly outside
        shifts = torch.stack([between(gen, [-h - 2] * B, H + 2), between(gen, [-w - 2] * B, W + 2)], 1)
    elif kind != "corner":  # corner: no shifts, the window at (0, 0)
        lo_h, hi_h, lo_w, hi_w = {  # boxes: a size range per kind, placed anywhere they fit
            "box": (1, H, 1, W),
            "full": (H, H, W, W),
            "pixel": (1, 1, 1, 1),
            "up": (1, max(1, h - 1), 1, max(1, w - 1)),  # smaller than the output
            "down": (min(h + 1, H), H, min(w + 1, W), W),  # larger than the output
        }[kind]
        height, width = between(gen, [lo_h] * B, hi_h), between(gen, [lo_w] * B, hi_w)
        top, left = between(gen, [0] * B, H - height), between(gen, [0] * B, W - width)
        boxes = torch.stack([top, left, height, width], 1).reshape(B, 4)
    return tuple(None if t is None else t.to(device) for t in (shifts, boxes))


def pytest_configure(config):
    # On a GPU machine (tools/gpu_check.sh) the CUDA tests must test the CUDA kernel: a build
    # without it would make every [cuda] test compare the reference with itself.
    if os.environ.get("ROT_REQUIRE_CUDA") == "1":
        import rot_kernel
        if not torch.cuda.is_available() or "cuda" not in rot_kernel.backend():
            raise pytest.UsageError(f"ROT_REQUIRE_CUDA=1, but the backend is {rot_kernel.backend()!r} "
                                    f"(CUDA available: {torch.cuda.is_available()})")
