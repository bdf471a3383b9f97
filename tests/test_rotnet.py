"""rotnet.py: the NIN, CIFAR-10 loading (every pickle flavour, archives, damaged and hostile
files), the download, checkpoints (this project's and the original code's), and the command
line end to end: a short run, kill and --resume, two CPU ranks, --benchmark, bad flags.

Everything runs on the CPU with tiny models (--width 0.125) on a few hundred images that
the tests write themselves in CIFAR-10's python format.
"""
import hashlib
import io
import json
import os
import pickle
import pickletools
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.request

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python -m pytest` has it; plain `pytest` puts only tests/ there
    sys.path.insert(0, REPO)
import rotnet  # noqa: E402


# ----------------------------------------------------------------------------- helpers
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


def cli_command(*args, launcher=()):
    return [sys.executable, *launcher, "rotnet.py", *map(str, args)]


def cli_env(env=None):
    # One thread per process: runs are bit-reproducible and two of them share 2 cores.
    return dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))


def run_cli(*args, check=True, env=None, timeout=180, launcher=()):
    """rotnet.py (or a launcher such as torchrun running it) from the repo root."""
    proc = subprocess.run(cli_command(*args, launcher=launcher), cwd=REPO, env=cli_env(env),
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
    """(k, in, out) of every conv of the paper's NIN, block by block (PAPER.md)."""
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


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """300 training and 100 test images in --data layout, shared by the command-line runs
    (which only read it)."""
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar(folder, 60, 100)
    return folder


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("blocks", [3, 4, 5])
def test_nin_feature_and_output_shapes(blocks):
    model = rotnet.NIN(blocks, num_classes=10, width=1.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for k in range(1, blocks + 1):
            expected = (2, 96, 16, 16) if k == 1 else (2, 192, 8, 8)
            assert tuple(model.features(x, k).shape) == expected, k
        assert tuple(model(x).shape) == (2, 10)


@pytest.mark.parametrize("blocks", [3, 4, 5])
@pytest.mark.parametrize("classes", [4, 10])
def test_nin_has_the_papers_layers_and_parameter_count(blocks, classes):
    model = rotnet.NIN(blocks, num_classes=classes, width=1.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(o, i, k, k) for k, i, o in paper_convs(blocks)]
    assert all(c.bias is None for c in convs)
    expected = sum(k * k * i * o + 2 * o for k, i, o in paper_convs(blocks)) + 192 * classes + classes
    assert sum(p.numel() for p in model.parameters()) == expected


def test_nin_initialisation_is_the_original_one():
    torch.manual_seed(0)
    model = rotnet.NIN(4, num_classes=4, width=1.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv, (k, _, out) in zip(convs, paper_convs(4)):
        want = (2.0 / (k * k * out)) ** 0.5
        w = conv.weight.detach()
        assert abs(w.std().item() - want) < 0.05 * want   # >= 15,000 draws: ~1% noise
        assert abs(w.mean().item()) < 0.05 * want
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(model.head.bias, torch.zeros_like(model.head.bias))


@pytest.mark.parametrize("blocks", [2, 6])
def test_nin_refuses_a_block_count_the_paper_lacks(blocks):
    with pytest.raises(ValueError, match="blocks"):
        rotnet.NIN(blocks=blocks)


@pytest.mark.parametrize("block", [0, 5])
def test_features_refuses_a_block_the_model_lacks(block):
    model = rotnet.NIN(4, width=0.125)
    with pytest.raises(ValueError, match="block"):
        model.features(torch.zeros(1, 3, 32, 32), block)


# ----------------------------------------------------------------------------- data
FLAVOURS = ["python2", "bytes-keys", "str-keys-protocol2", "python3",
            "python3-protocol5"]


def test_python2_pickle_helper_writes_what_the_official_files_hold():
    # The official batches (checked against the real sample) use exactly these globals and
    # no unicode strings; read back under latin1 the keys are str and the array is intact.
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = python2_pickle({"batch_label": "b", "labels": [3, 7], "data": rows, "filenames": ["x", "y"]})
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert {arg for name, arg in ops if name == "GLOBAL"} == \
        {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert not any("UNICODE" in name for name, _ in ops)
    back = pickle.loads(raw, encoding="latin1")
    assert back["labels"] == [3, 7] and back["filenames"] == ["x", "y"] and back["batch_label"] == "b"
    assert np.array_equal(back["data"], rows) and back["data"].dtype == np.uint8


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_load_cifar_reads_every_pickle_flavour(tmp_path, flavour):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path, 7, 5, flavour)
    got = rotnet.load_cifar(str(tmp_path))
    assert [tuple(t.shape) for t in got] == [(35, 3, 32, 32), (35,), (5, 3, 32, 32), (5,)]
    assert [t.dtype for t in got] == [torch.uint8, torch.int64, torch.uint8, torch.int64]
    for tensor, want in zip(got, (train_x, train_y, test_x, test_y)):
        assert np.array_equal(tensor.numpy(), want)


def test_load_cifar_accepts_the_batches_folder_itself(tmp_path):
    train_x, _, test_x, _ = write_cifar(tmp_path, 3, 4)
    got = rotnet.load_cifar(str(tmp_path / "cifar-10-batches-py"))
    assert np.array_equal(got[0].numpy(), train_x) and np.array_equal(got[2].numpy(), test_x)


def test_load_cifar_unpacks_the_archive_in_the_folder(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path / "src", 3, 4)
    data = tmp_path / "data"
    data.mkdir()
    make_archive(tmp_path / "src", data / "cifar-10-python.tar.gz")
    got = rotnet.load_cifar(str(data))
    assert (data / "cifar-10-batches-py" / "test_batch").is_file()
    for tensor, want in zip(got, (train_x, train_y, test_x, test_y)):
        assert np.array_equal(tensor.numpy(), want)


@pytest.mark.parametrize("member", ["absolute path", "symlink"])
def test_unpack_refuses_members_that_escape_or_are_not_files(tmp_path, member):
    write_cifar(tmp_path / "src", 1, 1)
    data = tmp_path / "data"
    data.mkdir()
    escaped = tmp_path / "escaped"
    if member == "symlink":
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        info = tarfile.TarInfo(str(escaped))
    make_archive(tmp_path / "src", data / "cifar-10-python.tar.gz", extra=[info])
    with pytest.raises(rotnet.DataError, match="refusing to unpack"):
        rotnet.find_cifar(str(data))
    assert not escaped.exists()
    assert os.listdir(data) == ["cifar-10-python.tar.gz"]  # checked before anything is written


# ----------------------------------------------------------------------------- download
@pytest.fixture
def local_only_downloads(monkeypatch):
    # A test must never fetch the real 170 MB archive: only file:// URLs go through.
    real = urllib.request.urlretrieve

    def local_only(url, *args, **kwargs):
        if not url.startswith("file:"):
            raise AssertionError(f"the test tried to download {url}")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(rotnet.urllib.request, "urlretrieve", local_only)


@pytest.fixture
def served_archive(tmp_path):
    """(file:// URL, md5, what it holds) of an archive outside the data folder."""
    content = write_cifar(tmp_path / "src", 2, 3)
    (tmp_path / "server").mkdir()
    archive = make_archive(tmp_path / "src", tmp_path / "server" / "cifar-10-python.tar.gz")
    return archive.as_uri(), md5_of(archive), content


def test_download_keeps_the_archive_when_the_md5_matches(tmp_path, served_archive, local_only_downloads):
    url, md5, _ = served_archive
    path = rotnet.download(str(tmp_path / "data"), url=url, md5=md5)
    assert path == str(tmp_path / "data" / "cifar-10-python.tar.gz")
    assert md5_of(path) == md5
    assert os.listdir(tmp_path / "data") == ["cifar-10-python.tar.gz"]  # no .part left


def test_download_keeps_nothing_when_the_md5_differs(tmp_path, served_archive, local_only_downloads):
    url, _, _ = served_archive
    with pytest.raises(rotnet.DataError, match="md5"):
        rotnet.download(str(tmp_path / "data"), url=url, md5="0" * 32)
    assert os.listdir(tmp_path / "data") == []


def test_find_cifar_downloads_from_the_configured_url(tmp_path, served_archive, local_only_downloads,
                                                      monkeypatch):
    url, md5, (train_x, *_) = served_archive
    monkeypatch.setattr(rotnet, "CIFAR_URL", url)
    monkeypatch.setattr(rotnet, "CIFAR_MD5", md5)
    folder = rotnet.find_cifar(str(tmp_path / "data"), download_missing=True)
    assert folder == str(tmp_path / "data" / "cifar-10-batches-py")
    assert np.array_equal(rotnet.load_cifar(str(tmp_path / "data"))[0].numpy(), train_x)


def test_an_archive_already_there_is_not_downloaded_again(tmp_path, local_only_downloads):
    write_cifar(tmp_path / "src", 2, 3)
    (tmp_path / "data").mkdir()
    make_archive(tmp_path / "src", tmp_path / "data" / "cifar-10-python.tar.gz")
    assert rotnet.find_cifar(str(tmp_path / "data"), download_missing=True) == \
        str(tmp_path / "data" / "cifar-10-batches-py")


# ----------------------------------------------------------------------------- data errors, as the CLI shows them
def test_cli_missing_data_says_where_it_looked(tmp_path):
    proc = run_cli(*tiny_run_flags(tmp_path / "nothing", tmp_path / "out", "--epochs", "1"), check=False)
    assert_one_line_error(proc, tmp_path / "nothing", "--download")
    assert not (tmp_path / "out").exists()


def test_cli_truncated_batch_names_the_file(tmp_path):
    write_cifar(tmp_path, 20, 10)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    proc = run_cli(*tiny_run_flags(tmp_path, tmp_path / "out", "--epochs", "1"), check=False)
    assert_one_line_error(proc, path)


def test_cli_damaged_archive_names_the_archive(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(os.urandom(4096))
    proc = run_cli(*tiny_run_flags(tmp_path, tmp_path / "out", "--epochs", "1"), check=False)
    assert_one_line_error(proc, archive)


def test_cli_refuses_an_archive_member_outside_the_folder(tmp_path):
    write_cifar(tmp_path / "src", 2, 2)
    data = tmp_path / "data"
    data.mkdir()
    archive = make_archive(tmp_path / "src", data / "cifar-10-python.tar.gz", extra=[("../evil", b"gotcha")])
    proc = run_cli(*tiny_run_flags(data, tmp_path / "out", "--epochs", "1"), check=False)
    assert_one_line_error(proc, archive, "../evil")
    assert not (tmp_path / "evil").exists()
    assert os.listdir(data) == ["cifar-10-python.tar.gz"]


def test_cli_refuses_a_batch_that_carries_code_without_running_it(tmp_path):
    # The control shows the payload is live: plain pickle runs it.
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    write_cifar(tmp_path, 2, 2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    marker = tmp_path / "code-ran"
    path.write_bytes(pickle.dumps({"data": RunsCode(marker), "labels": [0]}))
    proc = run_cli(*tiny_run_flags(tmp_path, tmp_path / "out", "--epochs", "1"), check=False)
    assert_one_line_error(proc, path, "system")
    assert not marker.exists()


# ----------------------------------------------------------------------------- runs
def test_cli_short_run_writes_its_files(cifar, tmp_path):
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar, out, "--epochs", "2"))
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    assert config["torch"] == torch.__version__
    assert config["rot_kernel"] == rotnet.rot_kernel.backend()
    assert config["device"] == "cpu"
    metrics = metrics_of(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(m) == {"epoch", "lr", "train_loss", "train_acc", "test_acc", "seconds", "images_per_s"}
        assert 0 <= m["test_acc"] <= 100 and m["train_loss"] > 0 and m["images_per_s"] > 0
    for name in ("model.pt", "checkpoint.pt"):
        model = rotnet.load_model(out / name)
        assert isinstance(model, rotnet.NIN) and not model.training
        assert model.config == dict(blocks=4, num_classes=4, width=0.125)
        with torch.no_grad():
            assert tuple(model(torch.randn(3, 3, 32, 32)).shape) == (3, 4)
    saved = torch.load(out / "model.pt", weights_only=True)["model"]
    for key, value in rotnet.load_model(out / "model.pt").state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("rotations", ["0,180", ",".join(str(r) for r in range(0, 360, 45))])
def test_cli_other_rotation_sets(cifar, tmp_path, rotations):
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar, out, "--epochs", "1", "--rotations", rotations))
    assert len(metrics_of(out)) == 1
    model = rotnet.load_model(out / "model.pt")
    assert model.head.out_features == len(rotations.split(","))
    assert torch.load(out / "model.pt", weights_only=True)["rotations"] == [int(r) for r in rotations.split(",")]


def test_cli_save_every_keeps_tested_snapshots(cifar, tmp_path):
    # The snapshots of Figure 5(a) carry their rotation accuracy, also on epochs that
    # --eval-every skips.
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar, out, "--epochs", "2", "--save-every", "1", "--eval-every", "2"))
    assert [m["test_acc"] is None for m in metrics_of(out)] == [True, False]
    for epoch in (1, 2):
        saved = torch.load(out / f"model_epoch{epoch:03d}.pt", weights_only=True)
        assert saved["metrics"]["epoch"] == epoch and 0 <= saved["metrics"]["test_acc"] <= 100
        rotnet.load_model(out / f"model_epoch{epoch:03d}.pt")


def test_cli_resume_after_kill_equals_an_uninterrupted_run(cifar, tmp_path):
    flags = lambda out: tiny_run_flags(cifar, out, "--epochs", "4", "--eval-every", "1", "--seed", "3")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    quiet = dict(cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_a = subprocess.Popen(cli_command(*flags(out_a)), **quiet)  # alongside B: one core each
    run_b = subprocess.Popen(cli_command(*flags(out_b)), **quiet)
    try:
        # Kill B as soon as its first epoch is logged and checkpointed.
        deadline = time.monotonic() + 150
        while not ((out_b / "checkpoint.pt").exists() and (out_b / "metrics.jsonl").exists()
                   and (out_b / "metrics.jsonl").read_text().count("\n") >= 1):
            assert run_b.poll() is None, "run B ended before it could be killed"
            assert time.monotonic() < deadline, "run B logged no epoch in time"
            time.sleep(0.02)
        os.kill(run_b.pid, signal.SIGKILL)
        run_b.wait()
    finally:
        if run_b.poll() is None:
            run_b.kill()
    assert not (out_b / "model.pt").exists(), "B finished before the kill: make the data bigger"
    done = torch.load(out_b / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4
    resumed = run_cli(*flags(out_b), "--resume")
    assert run_a.wait(timeout=150) == 0
    # The resumed run trains only the epochs the checkpoint lacks.
    assert [int(ln.split()[1]) for ln in resumed.stdout.splitlines() if ln.startswith("epoch ")] == \
        list(range(done + 1, 5))
    state_a = torch.load(out_a / "model.pt", weights_only=True)["model"]
    state_b = torch.load(out_b / "model.pt", weights_only=True)["model"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    untimed = lambda ms: [{k: v for k, v in m.items() if k not in ("seconds", "images_per_s")} for m in ms]
    assert [m["epoch"] for m in metrics_of(out_b)] == [1, 2, 3, 4]
    assert untimed(metrics_of(out_b)) == untimed(metrics_of(out_a))


def test_cli_two_cpu_ranks_with_torchrun(cifar, tmp_path):
    out = tmp_path / "out"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = run_cli(*tiny_run_flags(cifar, out, "--epochs", "1"), launcher=launcher)
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt"]
    assert len(metrics_of(out)) == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert sum(ln.startswith("epoch ") for ln in proc.stdout.splitlines()) == 1  # rank 0 alone reports
    rotnet.load_model(out / "model.pt")


def test_cli_benchmark_prints_its_json(tmp_path):
    proc = run_cli("--benchmark", "--steps", "2", "--width", "0.125", "--device", "cpu", "--batch-size", "16")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "minutes_per_100_epochs", "batch_building_share"):
        assert result[key] > 0, key


@pytest.mark.parametrize("flags, named", [
    (["--rotations", "0,30"], "--rotations"),
    (["--rotations", "0,90,90"], "--rotations"),
    (["--rotations", "0,ninety"], "--rotations"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--width", "0"], "--width"),
    (["--blocks", "6"], "--blocks"),
])
def test_bad_flags_are_usage_errors(capsys, flags, named):
    with pytest.raises(SystemExit) as exit_:
        rotnet.parse_args(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and named in err.splitlines()[-1]


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("blocks", [3, 4, 5])
@pytest.mark.parametrize("width", [1.0, 0.125])
def test_load_model_reads_an_original_checkpoint(tmp_path, blocks, width):
    torch.manual_seed(blocks)
    original = rotnet.NIN(blocks, num_classes=10, width=width)
    with torch.no_grad():  # BN statistics unlike any other layer's, so a swap would show
        for bn in (m for m in original.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0), bn.num_batches_tracked.fill_(123)
        original.head.bias.normal_()
    path = tmp_path / "original.pth.tar"
    torch.save({"epoch": 7, "network": to_original_names(original.state_dict(), blocks)}, path)
    model = rotnet.load_model(path)
    assert model.config == dict(blocks=blocks, num_classes=10, width=width)
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), original.eval()(x))


def test_load_model_reads_an_old_pytorch_original_checkpoint(tmp_path):
    # The original code ran on PyTorch 0.3: no num_batches_tracked, the pre-1.6 file format.
    original = rotnet.NIN(4, num_classes=4, width=0.125).eval()
    state = {k: v for k, v in to_original_names(original.state_dict(), 4).items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 200, "network": state}, tmp_path / "old.pth.tar", _use_new_zipfile_serialization=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rotnet.load_model(tmp_path / "old.pth.tar")(x), original(x))


def test_load_model_refuses_a_checkpoint_that_carries_code(tmp_path):
    config = dict(blocks=3, num_classes=4, width=0.125)
    torch.save({"model": RunsCode(tmp_path / "control"), "model_config": config}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # the payload is live without weights_only
    assert (tmp_path / "control").exists()
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "model_config": config}, tmp_path / "model.pt")
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        rotnet.load_model(tmp_path / "model.pt")
    assert not marker.exists()
