"""cifar.py: CIFAR-10 loading (every pickle flavour, the folder, its parent, the archive read
in place, alone or in a folder), the md5-checked download, and damaged or hostile files as the command line
shows them: one line, no traceback.
"""
import os
import pickle
import pickletools
import tarfile
import urllib.request

import numpy as np
import pytest
import torch

import cifar
from conftest import (RunsCode, assert_one_line_error, make_archive, md5_of, python2_pickle, run_cli,
                      tiny_run_flags, write_cifar)
from errors import UserError


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
    got = cifar.load_cifar(str(tmp_path))
    assert [tuple(t.shape) for t in got] == [(35, 3, 32, 32), (35,), (5, 3, 32, 32), (5,)]
    assert [t.dtype for t in got] == [torch.uint8, torch.int64, torch.uint8, torch.int64]
    for tensor, want in zip(got, (train_x, train_y, test_x, test_y)):
        assert np.array_equal(tensor.numpy(), want)


def test_load_cifar_accepts_the_batches_folder_itself(tmp_path):
    train_x, _, test_x, _ = write_cifar(tmp_path, 3, 4)
    got = cifar.load_cifar(str(tmp_path / "cifar-10-batches-py"))
    assert np.array_equal(got[0].numpy(), train_x) and np.array_equal(got[2].numpy(), test_x)


@pytest.mark.parametrize("given", ["its folder", "the archive itself"])
def test_load_cifar_reads_the_archive_in_place_writing_nothing(tmp_path, given):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path / "src", 3, 4)
    data = tmp_path / "data"
    data.mkdir()
    archive = make_archive(tmp_path / "src", data / "cifar-10-sample-python.tar.gz")  # any cifar-10*python
    data.chmod(0o555)  # read-only, as a shared data set is
    try:
        got = cifar.load_cifar(str(data if given == "its folder" else archive))
    finally:
        data.chmod(0o755)
    assert os.listdir(data) == ["cifar-10-sample-python.tar.gz"]
    for tensor, want in zip(got, (train_x, train_y, test_x, test_y)):
        assert np.array_equal(tensor.numpy(), want)


@pytest.mark.parametrize("member", ["symlink", "hard link", "folder"])
def test_an_archive_whose_batch_is_not_a_plain_file_is_refused(tmp_path, member):
    write_cifar(tmp_path / "src", 1, 1)
    os.remove(tmp_path / "src" / "cifar-10-batches-py" / "data_batch_2")
    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_2")
    info.type, info.linkname = {"symlink": (tarfile.SYMTYPE, "/etc/passwd"),
                                "hard link": (tarfile.LNKTYPE, "cifar-10-batches-py/data_batch_1"),
                                "folder": (tarfile.DIRTYPE, "")}[member]
    archive = make_archive(tmp_path / "src", tmp_path / "cifar-10-python.tar.gz", extra=[info])
    with pytest.raises(UserError, match="data_batch_2 is not a plain file"):
        cifar.load_cifar(str(archive))


def test_an_archive_without_every_batch_names_what_it_lacks(tmp_path):
    write_cifar(tmp_path / "src", 1, 1)
    os.remove(tmp_path / "src" / "cifar-10-batches-py" / "test_batch")
    archive = make_archive(tmp_path / "src", tmp_path / "cifar-10-python.tar.gz", extra=[("elsewhere/test_batch", b"")])
    with pytest.raises(UserError, match="lacks cifar-10-batches-py/test_batch"):
        cifar.load_cifar(str(archive))


# ----------------------------------------------------------------------------- download
@pytest.fixture
def local_only_downloads(monkeypatch):
    # A test must never fetch the real 170 MB archive: only file:// URLs go through.
    real = urllib.request.urlretrieve

    def local_only(url, *args, **kwargs):
        if not url.startswith("file:"):
            raise AssertionError(f"the test tried to download {url}")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(cifar.urllib.request, "urlretrieve", local_only)


@pytest.fixture
def served_archive(tmp_path):
    """(file:// URL, md5, what it holds) of an archive outside the data folder."""
    content = write_cifar(tmp_path / "src", 2, 3)
    (tmp_path / "server").mkdir()
    archive = make_archive(tmp_path / "src", tmp_path / "server" / "cifar-10-python.tar.gz")
    return archive.as_uri(), md5_of(archive), content


def test_download_keeps_the_archive_when_the_md5_matches(tmp_path, served_archive, local_only_downloads):
    url, md5, _ = served_archive
    path = cifar.download(str(tmp_path / "data"), url=url, md5=md5)
    assert path == str(tmp_path / "data" / "cifar-10-python.tar.gz")
    assert md5_of(path) == md5
    assert os.listdir(tmp_path / "data") == ["cifar-10-python.tar.gz"]  # no .part left


def test_download_keeps_nothing_when_the_md5_differs(tmp_path, served_archive, local_only_downloads):
    url, _, _ = served_archive
    with pytest.raises(UserError, match="md5"):
        cifar.download(str(tmp_path / "data"), url=url, md5="0" * 32)
    assert os.listdir(tmp_path / "data") == []


def test_find_cifar_downloads_from_the_configured_url(tmp_path, served_archive, local_only_downloads,
                                                      monkeypatch):
    url, md5, (train_x, *_) = served_archive
    monkeypatch.setattr(cifar, "URL", url)
    monkeypatch.setattr(cifar, "MD5", md5)
    archive = cifar.find_cifar(str(tmp_path / "data"), download_missing=True)
    assert archive == str(tmp_path / "data" / "cifar-10-python.tar.gz")
    assert np.array_equal(cifar.load_cifar(str(tmp_path / "data"))[0].numpy(), train_x)


def test_an_archive_already_there_is_not_downloaded_again(tmp_path, local_only_downloads):
    write_cifar(tmp_path / "src", 2, 3)
    (tmp_path / "data").mkdir()
    make_archive(tmp_path / "src", tmp_path / "data" / "cifar-10-python.tar.gz")
    assert cifar.find_cifar(str(tmp_path / "data"), download_missing=True) == \
        str(tmp_path / "data" / "cifar-10-python.tar.gz")


def test_download_fetches_the_data_set_beside_a_sample_of_it(tmp_path, served_archive, local_only_downloads,
                                                             monkeypatch):
    # --download asks for CIFAR-10: a sample archive in the folder (docs/cpu-sample.md puts one
    # in data/) is used without it, never instead of the whole data set.
    url, md5, (train_x, *_) = served_archive
    monkeypatch.setattr(cifar, "URL", url)
    monkeypatch.setattr(cifar, "MD5", md5)
    write_cifar(tmp_path / "src", 1, 1, seed=5)
    (tmp_path / "data").mkdir()
    sample = make_archive(tmp_path / "src", tmp_path / "data" / "cifar-10-sample-python.tar.gz")
    assert cifar.find_cifar(str(tmp_path / "data")) == str(sample)
    full = str(tmp_path / "data" / "cifar-10-python.tar.gz")
    assert cifar.find_cifar(str(tmp_path / "data"), download_missing=True) == full
    assert np.array_equal(cifar.load_cifar(str(tmp_path / "data"))[0].numpy(), train_x)  # the whole one, now
    # The whole archive under another name is known by its md5: not fetched again
    os.replace(full, tmp_path / "data" / "cifar-10-full-python.tar.gz")
    assert cifar.find_cifar(str(tmp_path / "data"), download_missing=True) == \
        str(tmp_path / "data" / "cifar-10-full-python.tar.gz")
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-full-python.tar.gz", "cifar-10-sample-python.tar.gz"]


# ----------------------------------------------------------------------------- data errors, as the CLI shows them
def test_cli_missing_data_says_where_it_looked(tmp_path):
    proc = run_cli(*tiny_run_flags(tmp_path / "nothing", tmp_path / "out", "--epochs", "1"), check=False)
    assert_one_line_error(proc, tmp_path / "nothing", "no such folder", "--download")
    assert not (tmp_path / "out").exists()
    # A folder that exists but holds neither (an ImageNet path one level off, say)
    os.makedirs(tmp_path / "empty")
    proc = run_cli(*tiny_run_flags(tmp_path / "empty", tmp_path / "out", "--epochs", "1", "--arch", "alexnet"),
                   check=False)
    assert_one_line_error(proc, tmp_path / "empty", "neither images (JPEG, PNG", "nor CIFAR-10", "--download")


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


def test_cli_a_damaged_batch_inside_the_archive_names_both(tmp_path):
    write_cifar(tmp_path / "src", 2, 2)
    path = tmp_path / "src" / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:100])
    archive = make_archive(tmp_path / "src", tmp_path / "cifar-10-python.tar.gz", extra=[("../evil", b"gotcha")])
    proc = run_cli(*tiny_run_flags(archive, tmp_path / "out", "--epochs", "1"), check=False)
    assert_one_line_error(proc, f"{archive}:cifar-10-batches-py/data_batch_4 is damaged")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cifar-10-batches-py").exists()


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

