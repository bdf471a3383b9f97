"""data.py: CIFAR-10 or an image folder behind one interface, the resident and the streamed
split giving the same batches (also to two ranks, each streaming its share), and the scripts
end to end on a folder of images (CPU, tiny models, images the tests write).
"""
import contextlib
import io
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import cli
import data
import probe
import rotnet
import runs
import semi_supervised
import tables
import train
from conftest import (assert_one_line_error, free_port, metrics_of, run_cli, save_alexnet, save_nin, write_cifar,
                      write_folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("pictures") / "pictures")


def test_cifar_and_folders_load_through_one_interface(tmp_path, folder):
    write_cifar(tmp_path / "cifar", 4, 6)
    c = data.load(str(tmp_path / "cifar"))
    assert c.train_x.shape == (20, 3, 32, 32) and c.test_x.shape == (6, 3, 32, 32) and len(c.classes) == 10
    f = data.load(str(folder), image_size=16, cache=str(tmp_path / "cache"))
    assert f.classes == ("cat", "dog", "ship")
    assert f.train_x.dtype == torch.uint8 and f.train_x.shape[1:] == (3, 16, 16)
    assert len(f.train_x) + len(f.test_x) == 36 and len(f.test_x) >= 3  # a tenth of each class held out
    assert set(f.train_y.tolist()) == set(f.test_y.tolist()) == {0, 1, 2}
    pixels = f.train_x.double()
    mean = pixels.mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(f.mean, dtype=torch.float64), mean, atol=1e-3)


# On CUDA a streamed split copies on its own stream from a ring of pinned buffers: the
# batches must still equal the resident ones while the consumer keeps the GPU busy.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, batch", [(37, 8), (5, 5), (1, 4), (300, 16)])
def test_streamed_batches_equal_resident_ones(device, n, batch):
    images = torch.randint(0, 256, (n, 3, 9, 7), dtype=torch.uint8)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    slices = list(train.batches(n, batch))
    resident = data.on_device(images, device, stream=False)
    streamed = data.on_device(images, device, stream=True)
    assert isinstance(resident, data.Resident) and isinstance(streamed, data.Streamed)
    seen = 0
    for s, (source, index), (gathered, none) in zip(slices, resident.batches(order, slices),
                                                   streamed.batches(order, slices)):
        assert none is None and gathered.device.type == device
        if device == "cuda":  # work queued before the comparison: the copies must not overtake it
            torch.cuda._sleep(1_000_000)
        assert torch.equal(gathered, source[index]) and torch.equal(gathered.cpu(), images[order[s]])
        seen += 1
    assert seen == len(slices)


@pytest.mark.parametrize("device", DEVICES)
def test_the_ring_keeps_whole_buffers_past_an_epochs_short_last_batch(device):
    images = torch.randint(0, 256, (23, 3, 4, 5), dtype=torch.uint8)
    streamed = data.on_device(images, device, stream=True)
    slices = list(train.batches(23, 4))  # five of 4 and a last of 3, in the slot the first used
    assert len(slices) == len(streamed.ring) + 1
    for epoch in range(2):
        order = torch.randperm(23, generator=torch.Generator().manual_seed(epoch))
        for s, (batch, _) in zip(slices, streamed.batches(order, slices)):
            assert torch.equal(batch.cpu(), images[order[s]])
        buffers = [buffer for buffer, _ in streamed.ring]
        assert [len(b) for b in buffers] == [4] * len(buffers)  # a slot's next step refills, not reallocates
        if epoch == 0:
            first = [b.data_ptr() for b in buffers]
    assert [b.data_ptr() for b in buffers] == first


@pytest.mark.parametrize("device", DEVICES)
def test_a_consumer_that_stops_early_stops_the_stream(device):
    images = torch.zeros(1000, 3, 4, 4, dtype=torch.uint8)
    streamed = data.on_device(images, device, stream=True)
    read = []

    def slices():  # counts the steps the worker gathers
        for s in train.batches(1000, 2):
            read.append(s)
            yield s

    batches = streamed.batches(torch.arange(1000), slices())
    next(batches)
    batches.close()  # joins the thread: returns only if it stopped
    # it stops within the steps it had queued ahead, not after the epoch's 500 reads
    assert len(read) <= data.PREFETCH + 3, len(read)


@pytest.mark.parametrize("device", DEVICES)
def test_a_failure_in_the_stream_reaches_the_caller(device):
    streamed = data.on_device(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), device, stream=True)
    with pytest.raises(IndexError):
        list(streamed.batches(torch.tensor([0, 9]), [slice(0, 2)]))


def test_memory_the_allocator_holds_unused_counts_as_free(monkeypatch):
    # Whether a split fits on the GPU: the driver reports the allocator's cache as taken,
    # so a run after another in the same process would stream what fits.
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 10 * gib)
    assert data.free_memory(torch.device("cuda", 0)) == 21 * gib


def test_training_on_a_folder_streamed_equals_resident(folder, tmp_path, monkeypatch):
    """One epoch of pretraining with the split streamed gives the very weights of the resident run."""
    def run(stream, out):
        real = data.on_device
        monkeypatch.setattr(data, "on_device", lambda images, device, stream_=None: real(images, device, stream))
        rotnet.pretrain(rotnet.Pretraining(data=str(folder), image_size=16, cache=str(tmp_path / "cache"), epochs=1,
                                           width=0.125, batch_size=8, device="cpu", out=str(out)))
        return torch.load(out / "model.pt", weights_only=True)["model"]
    a, b = run(False, tmp_path / "resident"), run(True, tmp_path / "streamed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def pretrain_as_a_rank(rank, port, stream, settings):
    """One of two gloo ranks (a spawned process) pretraining with its split streamed or not."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    real = data.on_device
    data.on_device = lambda images, device, stream_=None: real(images, device, stream)
    cli.run_job(lambda: rotnet.pretrain(rotnet.Pretraining(**settings)))


def test_ranks_streaming_their_shares_train_as_resident_ones(folder, tmp_path):
    """Two ranks (gloo) each stream only their share of every step, as an ImageNet run on
    several GPUs does: the same weights as two ranks holding the split resident."""
    def run(stream, out):
        settings = dict(data=str(folder), image_size=16, cache=str(tmp_path / "cache"), epochs=1, width=0.125,
                        batch_size=8, device="cpu", out=str(out))
        spawn = torch.multiprocessing.get_context("spawn")  # fork would copy pytest's OpenMP threads
        port = free_port()
        ranks = [spawn.Process(target=pretrain_as_a_rank, args=(r, port, stream, settings)) for r in range(2)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(timeout=300)
        assert [p.exitcode for p in ranks] == [0, 0]
        assert json.loads((out / "config.json").read_text())["world_size"] == 2
        return torch.load(out / "model.pt", weights_only=True)["model"]
    a, b = run(False, tmp_path / "resident"), run(True, tmp_path / "streamed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_scripts_run_on_a_folder(folder, tmp_path):
    # Without --image-size: the NIN's 32 x 32, then the size the RotNet learnt at (one cache)
    common = ["--data", folder, "--cache", tmp_path / "cache", "--width", 0.125, "--device", "cpu", "--batch-size", 8]
    size = lambda run: json.loads((tmp_path / run / "config.json").read_text())["image_size"]
    run_cli(*common, "--epochs", 2, "--out", tmp_path / "run")
    assert [m["epoch"] for m in metrics_of(tmp_path / "run")] == [1, 2] and size("run") == 32
    model = tmp_path / "run" / "model.pt"
    proc = run_cli(*common, "--checkpoint", model, "--block", 2, "--classifier", "nonlinear", "--epochs", 1,
                   "--out", tmp_path / "probe", script="probe.py")
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert 0 <= results["test_acc"] <= 100 and "test accuracy" in proc.stdout
    assert size("probe") == 32 and "rebuilding" not in proc.stderr and "note: --image-size" not in proc.stderr
    proc = run_cli(*common[:2], *common[4:], "--cache", tmp_path / "cache16", "--image-size", 16, "--checkpoint", model,
                   "--epochs", 1, "--out", tmp_path / "probe16", script="probe.py")  # said, then done as asked
    assert f"note: --image-size 16, but {model} learnt at 32 (its run's config.json)" in proc.stderr
    assert size("probe16") == 16
    proc = run_cli(*common, "--per-class", 2, "--checkpoint", model, "--epochs", 1, "--epoch-size", 16,
                   "--out", tmp_path / "semi", script="semi_supervised.py")
    rows = json.loads((tmp_path / "semi" / "results.json").read_text())["rows"]
    assert [r["per_class"] for r in rows] == [2]
    assert size("semi/K2_rotnet_conv") == 32 and "rebuilding" not in proc.stderr


def test_the_image_size_is_the_networks_or_the_one_the_checkpoint_learnt_at(tmp_path):
    # A NIN at 256 x 256 needs about a hundred GB a step: it is made for 32 x 32
    assert rotnet.Pretraining().image_size == 32 and rotnet.Pretraining(image_size=64).image_size == 64
    assert rotnet.Pretraining(arch="alexnet").image_size == 256
    save_nin(tmp_path / "nin.pt")
    save_alexnet(tmp_path / "alexnet.pt")
    for given, size in (("nin.pt", 32), ("alexnet.pt", 256)):  # no run's record beside them: their kind's
        assert probe.Probing(checkpoint=str(tmp_path / given)).image_size == size
    assert probe.Probing(supervised=True).image_size == probe.Probing(init="random").image_size == 32
    with pytest.raises(data.UserError, match="missing.pt: not a readable checkpoint"):  # (one line, from the CLI)
        probe.Probing(checkpoint=str(tmp_path / "missing.pt"))
    (tmp_path / "config.json").write_text(json.dumps(dict(image_size=48)))  # the record of the run that made them
    assert probe.Probing(checkpoint=str(tmp_path / "alexnet.pt")).image_size == 48
    assert semi_supervised.Sweep(checkpoint=str(tmp_path / "nin.pt")).image_size == 48
    assert probe.Probing(checkpoint=str(tmp_path / "nin.pt"), image_size=20).image_size == 20
    shapes = str(write_folder(tmp_path / "shapes", classes=("a", "b"), per_class=2, size=(8, 8)))
    for sweep, said in ((semi_supervised.Sweep(checkpoint=str(tmp_path / "nin.pt"), data=shapes), False),
                        (semi_supervised.Sweep(checkpoint=str(tmp_path / "nin.pt"), data=shapes, image_size=16), True),
                        (semi_supervised.Sweep(image_size=16, data=shapes), False)):  # (its own RotNet, at 16)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            probe.say_if_not_learnt_size(train.Context("cpu"), sweep)
        assert ("note: --image-size 16, but" in err.getvalue()) == said, err.getvalue()
    write_cifar(tmp_path / "cifar", 2, 2)  # a run on CIFAR-10 learnt at 32, whatever it records
    (tmp_path / "config.json").write_text(json.dumps(dict(image_size=256, data=str(tmp_path / "cifar"))))
    assert probe.Probing(checkpoint=str(tmp_path / "nin.pt")).image_size == 32


def test_a_probe_on_unlabelled_images_says_it_needs_labels(tmp_path):
    flat = tmp_path / "flat"
    write_folder(tmp_path, classes=("flat",), per_class=10)
    common = ["--data", flat, "--image-size", 16, "--cache", tmp_path / "cache", "--width", 0.125, "--device", "cpu",
              "--batch-size", 4, "--epochs", 1]
    run_cli(*common, "--out", tmp_path / "run")  # pretraining needs no labels
    # Refused from the folder's listing: not after hours of preparing it (another --cache)
    common[common.index("--cache") + 1] = tmp_path / "unprepared"
    proc = run_cli(*common, "--checkpoint", tmp_path / "run" / "model.pt", "--out", tmp_path / "probe",
                   check=False, script="probe.py")
    assert_one_line_error(proc, "a probe needs labels")
    proc = run_cli(*common, "--supervised", "--out", tmp_path / "nin", check=False, script="probe.py")
    assert_one_line_error(proc, "the supervised NIN needs labels")
    proc = run_cli(*common, "--table", 3, "--epochs-scale", 0.05, "--out", tmp_path / "table", check=False,
                   script="probe.py")  # nor after pretraining the table's RotNets
    assert_one_line_error(proc, "a probe needs labels")
    proc = run_cli(*common, "--per-class", 2, "--out", tmp_path / "semi", check=False, script="semi_supervised.py")
    assert_one_line_error(proc, "the label-scarcity sweep needs labels")
    assert not os.path.exists(tmp_path / "unprepared") and not os.path.exists(tmp_path / "table")


def test_too_few_images_to_hold_out_says_what_helps(tmp_path):
    ones = write_folder(tmp_path / "ones", classes=("a", "b"), per_class=1, size=(8, 8))
    with pytest.raises(data.UserError) as err:
        data.load(str(ones), image_size=8, cache=str(tmp_path / "c1"))
    assert "fewer than 2 images" in str(err.value) and "--val-fraction" not in str(err.value)
    threes = write_folder(tmp_path / "threes", classes=("a", "b"), per_class=3, size=(8, 8))
    with pytest.raises(data.UserError) as err:  # 0.1 of 3 rounds to 0: a larger fraction holds one out
        data.load(str(threes), image_size=8, cache=str(tmp_path / "c2"), val_fraction=0.1)
    assert "raise --val-fraction" in str(err.value) and "fewer than 2" not in str(err.value)
    assert not os.path.exists(tmp_path / "c2" / "train.u8")  # said before any image is decoded


def test_the_loader_benchmark_refuses_bad_flags_in_one_line(folder, tmp_path):
    common = ["--data", folder, "--image-size", 8, "--cache", tmp_path / "cache"]
    for flags, named in ((["--batch-size", 0], "--batch-size"), (["--steps", 0], "--steps"),
                         (["--steps", -3], "--steps"), (["--device", "banana"], "--device")):
        proc = run_cli(*common, *flags, check=False, script="data.py")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("usage:") and named in proc.stderr.splitlines()[-1], proc.stderr
    proc = run_cli(*common, "--device", "cuda", check=False, script="data.py", env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_error(proc, "--device cuda but no CUDA device is available")
    write_cifar(tmp_path / "cifar", 2, 2)
    proc = run_cli("--data", tmp_path / "cifar", "--cache", tmp_path / "c2", "--device", "cpu", check=False,
                   script="data.py")
    assert_one_line_error(proc, "image folders")


def test_one_class_is_refused_by_what_needs_labels(tmp_path):
    one = write_folder(tmp_path / "one", classes=("photos",), per_class=20, size=(8, 8))
    dataset = data.load(str(one), image_size=8, cache=str(tmp_path / "c"))
    assert dataset.classes == ("photos",)  # pretraining needs no labels: fine
    with pytest.raises(data.UserError, match=r"a probe needs images of at least 2 classes, .*\(photos\)"):
        dataset.require_labels("a probe")
    for check in (lambda: data.load(str(one), image_size=8, cache=str(tmp_path / "c2"), labels_for="a probe"),
                  lambda: data.identity(str(one), image_size=8, labels_for="a probe")):
        with pytest.raises(data.UserError, match=r"a probe needs images of at least 2 classes, .*\(photos\)"):
            check()
    assert not os.path.exists(tmp_path / "c2")  # from the listing, before anything is decoded
    # Two class folders, one of them all unreadable: known only once decoded, refused then
    two = write_folder(tmp_path / "two", classes=("photos", "scans"), per_class=20, size=(8, 8))
    for name in os.listdir(two / "scans"):
        (two / "scans" / name).write_bytes(b"not an image")
    with pytest.raises(data.UserError, match=r"only one class folder \(photos\)"):
        data.load(str(two), image_size=8, cache=str(tmp_path / "c3"), labels_for="a probe")
    assert data.load(str(two), image_size=8, cache=str(tmp_path / "c3")).classes == ("photos", "scans")


def test_a_class_tested_but_never_trained_is_refused_by_what_needs_labels(tmp_path):
    # train/ and val/: val/circle's images all wrong whatever is learnt, the accuracy capped
    root = tmp_path / "shapes"
    for split in ("train", "val"):
        write_folder(root / split, classes=("circle", "square", "star"), per_class=6, size=(8, 8))
    for name in os.listdir(root / "train" / "circle"):
        os.remove(root / "train" / "circle" / name)
    named = r"a probe would be tested on 1 class \(circle\) with no training images"
    for check in (lambda: data.load(str(root), image_size=8, cache=str(tmp_path / "c"), labels_for="a probe"),
                  lambda: data.identity(str(root), image_size=8, labels_for="a probe")):
        with pytest.raises(data.UserError, match=named):
            check()
    assert not os.path.exists(tmp_path / "c")  # from the listing, before anything is decoded
    assert data.load(str(root), image_size=8, cache=str(tmp_path / "c")).classes == ("circle", "square", "star")
    # Its training images there but unreadable: known once decoded, refused then
    write_folder(root / "train", classes=("circle",), per_class=4, size=(8, 8))
    for name in os.listdir(root / "train" / "circle"):
        (root / "train" / "circle" / name).write_bytes(b"not an image")
    with pytest.raises(data.UserError, match=named):
        data.load(str(root), image_size=8, cache=str(tmp_path / "c2"), labels_for="a probe")


def test_a_class_trained_but_never_tested_is_noted(tmp_path, capfd):
    root = tmp_path / "shapes"
    write_folder(root / "train", classes=("circle", "square", "star"), per_class=6, size=(8, 8))
    write_folder(root / "val", classes=("square", "star"), per_class=2, size=(8, 8))
    assert data.load(str(root), image_size=8, cache=str(tmp_path / "c"), labels_for="a probe").classes[0] == "circle"
    assert f"note: 1 class folder (circle) with no images in {root / 'val'}: none of theirs is tested" \
        in capfd.readouterr().err


def test_a_channel_that_never_varies_normalises(tmp_path):
    import numpy as np
    import rot_kernel
    for c in ("a", "b"):  # red only: one stain saved as RGB
        os.makedirs(tmp_path / "red" / c)
        for i in range(10):
            pixels = np.zeros((8, 8, 3), np.uint8)
            pixels[..., 0] = np.random.default_rng(i).integers(0, 256, (8, 8))
            Image.fromarray(pixels).save(tmp_path / "red" / c / f"{i}.png")
    dataset = data.load(str(tmp_path / "red"), image_size=8, cache=str(tmp_path / "c"))
    assert dataset.std[0] > 1 and dataset.std[1:] == (1.0, 1.0) and dataset.mean[1:] == (0.0, 0.0)
    batch, _ = rot_kernel.rotation_batch(dataset.train_x, torch.arange(4), mean=dataset.mean, std=dataset.std)
    assert batch[:, 1:].eq(0).all() and batch.isfinite().all()


def test_data_given_as_a_file_or_from_home(tmp_path, monkeypatch, folder):
    png = next(p for p in folder.rglob("*.png"))
    with pytest.raises(data.UserError, match=r"is a file: --data is a folder of images"):
        data.load(str(png))
    monkeypatch.setenv("HOME", str(folder.parent))
    dataset = data.load(f"~/{folder.name}", image_size=8, cache=str(tmp_path / "c"))
    assert len(dataset.train_x) + len(dataset.test_x) == 36
    # --flag=~/x reaches the scripts unexpanded: every path flag expands it
    monkeypatch.setenv("HOME", str(tmp_path))
    run_cli(f"--data=~/../{folder.parent.name}/{folder.name}", "--image-size", 8, "--cache=~/cache", "--out=~/run",
            "--epochs", 1, "--width", 0.125, "--batch-size", 8, "--device", "cpu", env={"HOME": str(tmp_path)})
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "cache" / "manifest.json").exists()


def test_the_data_identity_is_found_without_preparing_anything(tmp_path, monkeypatch):
    classes = write_folder(tmp_path / "classes", per_class=10, size=(16, 16))
    flat = write_folder(tmp_path / "flat", classes=("",), per_class=10, size=(16, 16))
    write_folder(tmp_path / "split" / "train", per_class=4, size=(16, 16))
    write_folder(tmp_path / "split" / "val", per_class=2, size=(16, 16), seed=1)
    write_folder(tmp_path / "photos" / "train", classes=("",), per_class=4, size=(16, 16))  # unlabelled
    write_folder(tmp_path / "photos" / "val", classes=("",), per_class=2, size=(16, 16), seed=1)
    write_cifar(tmp_path / "cifar", 3, 5)
    monkeypatch.chdir(tmp_path)  # where a folder would be prepared by default (prepared/)
    for folder in (classes, flat, tmp_path / "split", tmp_path / "photos", tmp_path / "cifar"):
        for size in (8, 16):
            listed = data.identity(str(folder), image_size=size, val_fraction=0.2)
            assert not (tmp_path / "prepared").exists()  # nothing prepared
            loaded = data.load(str(folder), image_size=size, val_fraction=0.2, cache=str(tmp_path / "cache"))
            assert listed["data_fingerprint"] == loaded.fingerprint, (folder, size)
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        # the settings that change its images: a folder's size, and val_fraction where val is drawn
        assert sorted(listed) == sorted({"classes": ["data_fingerprint", "image_size", "val_fraction"],
                                         "flat": ["data_fingerprint", "image_size", "val_fraction"],
                                         "cifar": ["data_fingerprint"]}.get(folder.name,
                                                                            ["data_fingerprint", "image_size"]))
    held_out = {data.identity(str(classes), val_fraction=f)["data_fingerprint"] for f in (0.1, 0.2)}
    assert len(held_out) == 2  # other images held out: other data


def test_a_folder_prepared_by_default_is_found_again_from_another_folder(folder, tmp_path, monkeypatch, capfd):
    # Without --cache a folder is prepared under the current folder's prepared/; config.json
    # records where, and a resume or a probe of the run's model started elsewhere uses it
    # (ImageNet would otherwise be prepared again, for hours, wherever the command is typed).
    (tmp_path / "here").mkdir(), (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    settings = dict(data=str(folder), image_size=16, epochs=1, width=0.125, batch_size=8, device="cpu")
    rotnet.pretrain(rotnet.Pretraining(**settings, out=str(tmp_path / "run")))
    cache = tmp_path / "here" / "prepared" / "pictures-16"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cache"] == str(cache)
    monkeypatch.chdir(tmp_path / "elsewhere")
    capfd.readouterr()
    rotnet.pretrain(rotnet.Pretraining(**settings, out=str(tmp_path / "run"), resume=True))  # (finished: rewritten)
    probe.probe(probe.Probing(**settings, checkpoint=str(tmp_path / "run" / "model.pt"), out=str(tmp_path / "probe")))
    assert json.loads((tmp_path / "probe" / "config.json").read_text())["cache"] == str(cache)
    assert "preparing" not in capfd.readouterr().err and not (tmp_path / "elsewhere" / "prepared").exists()
    # Not at another size, nor held out otherwise: those are other preparations (here, the default)
    probe.probe(probe.Probing(**dict(settings, image_size=12), checkpoint=str(tmp_path / "run" / "model.pt"),
                              out=str(tmp_path / "probe12")))
    assert (tmp_path / "elsewhere" / "prepared" / "pictures-12").exists()
    # nor once it is gone (deleted to make room): then here too, not where it was
    shutil.rmtree(cache)
    probe.probe(probe.Probing(**settings, checkpoint=str(tmp_path / "run" / "model.pt"), out=str(tmp_path / "p2")))
    assert (tmp_path / "elsewhere" / "prepared" / "pictures-16").exists() and not cache.exists()


def test_a_supervised_probe_resumed_at_another_size_is_refused_before_preparing(tmp_path, capfd):
    # It records its own block, classifier, ... (not the command line's): only the settings every
    # run records as given are compared before the data is prepared.
    pictures = write_folder(tmp_path / "pictures", per_class=10, size=(16, 16))
    settings = dict(data=str(pictures), image_size=16, cache=str(tmp_path / "c1"), epochs=1, width=0.125,
                    batch_size=8, device="cpu", out=str(tmp_path / "run"), supervised=True)
    probe.probe(probe.Probing(**settings))
    capfd.readouterr()
    with pytest.raises(data.UserError, match=r"other settings \(image_size 16 there, 20 here\)"):
        probe.probe(probe.Probing(**dict(settings, image_size=20, cache=str(tmp_path / "c2"), resume=True)))
    assert "preparing" not in capfd.readouterr().err and not (tmp_path / "c2").exists()


def test_a_probe_resumed_with_its_own_settings_changed_is_refused_before_preparing(tmp_path, capfd):
    # Compared as its config.json records them: the classifier, and the epochs its schedule resolves.
    pictures = write_folder(tmp_path / "pictures", per_class=10, size=(16, 16))
    settings = dict(data=str(pictures), image_size=16, cache=str(tmp_path / "c1"), epochs=1, width=0.125,
                    batch_size=8, device="cpu", out=str(tmp_path / "run"), init="random", blocks=3)
    probe.probe(probe.Probing(**settings))
    capfd.readouterr()
    for changed, named in ((dict(classifier="linear"), r"classifier nonlinear there, linear here"),
                           (dict(epochs=None, epochs_scale=0.02), r"epochs 1 there, 2 here")):
        with pytest.raises(data.UserError, match=named):
            probe.probe(probe.Probing(**dict(settings, cache=str(tmp_path / "c2"), resume=True, **changed)))
    assert "preparing" not in capfd.readouterr().err and not (tmp_path / "c2").exists()
    probe.probe(probe.Probing(**dict(settings, resume=True)))  # its own settings: resumed (finished)


def test_an_out_inside_the_image_folder_is_refused(tmp_path, capfd):
    # Its folder would be listed as one more class (empty: a note, and every label shifted).
    pictures = write_folder(tmp_path / "pictures", per_class=10, size=(16, 16))
    settings = dict(data=str(pictures), image_size=16, cache=str(tmp_path / "c"), epochs=1, width=0.125,
                    batch_size=8, device="cpu")
    named = r"--out .*run is inside the image folder .*pictures, which is never written to .*give an --out elsewhere"
    for out in (pictures / "run", pictures / "cat" / "run"):
        with pytest.raises(data.UserError, match=named):
            probe.probe(probe.Probing(**settings, out=str(out), init="random", blocks=3))
        assert not out.exists() and not (tmp_path / "c").exists()
    # A table's or the sweep's --out, named as given (not the run under it), before the data is prepared
    with pytest.raises(data.UserError, match=r"--out \S*pictures/run is inside"):
        tables.run_table(3, probe.Probing(**settings, out=str(pictures / "run")))
    with pytest.raises(data.UserError, match=r"--out \S*pictures/run is inside"):
        semi_supervised.sweep(semi_supervised.Sweep(**settings, out=str(pictures / "run"), per_class=(2,)))
    assert not (pictures / "run").exists() and not (tmp_path / "c").exists()
    os.symlink(pictures, tmp_path / "link")  # reached through a link: the same folder
    with pytest.raises(data.UserError, match="is inside the image folder"):
        rotnet.pretrain(rotnet.Pretraining(**settings, out=str(tmp_path / "link" / "run")))
    rotnet.pretrain(rotnet.Pretraining(**settings, out=str(tmp_path / "pictures-run")))  # beside it: fine


def test_a_run_resumed_on_images_edited_in_place_is_refused_and_on_a_copy_is_not(tmp_path):
    pictures = write_folder(tmp_path / "pictures", per_class=10, size=(16, 16))
    settings = dict(data=str(pictures), image_size=16, cache=str(tmp_path / "cache"), epochs=1, width=0.125,
                    batch_size=8, device="cpu", out=str(tmp_path / "run"))
    rotnet.pretrain(rotnet.Pretraining(**settings))
    copy = tmp_path / "copy"  # a copy: every file's time new, its size the same
    shutil.copytree(pictures, copy, copy_function=shutil.copyfile)
    rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(copy), cache=str(tmp_path / "c2")), resume=True))
    Image.new("RGB", (16, 16)).save(copy / "dog" / "003.png")  # saved again in place: other pixels, other size
    with pytest.raises(data.UserError, match=r"run was trained on other images: .*added, removed or edited"):
        rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(copy), cache=str(tmp_path / "c2")), resume=True))
    # A run recorded before sizes were (its fingerprint the names' alone) is matched on the names
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    names = config["data_fingerprint"].split(".")[0]
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(config, data_fingerprint=names)))
    rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(copy), cache=str(tmp_path / "c2")), resume=True))
    found = data.identity(str(copy), image_size=16)
    runs.check_reusable(str(tmp_path / "run"), identity=found)
    os.remove(copy / "dog" / "003.png")  # but not on other names
    with pytest.raises(data.UserError, match=r"run was trained on other images"):
        rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(copy), cache=str(tmp_path / "c2")), resume=True))
    with pytest.raises(data.UserError, match=r"made on other images than --data holds now"):
        runs.check_reusable(str(tmp_path / "run"), identity=data.identity(str(copy), image_size=16))


def test_block_0_of_a_nin_is_refused_before_preparing(tmp_path, capfd):
    pictures = write_folder(tmp_path / "pictures", per_class=10, size=(16, 16))
    with pytest.raises(data.UserError, match=r"--block 0 \(every conv at once\) is for an AlexNet"):
        probe.probe(probe.Probing(data=str(pictures), image_size=16, cache=str(tmp_path / "c"), epochs=1, width=0.125,
                                  device="cpu", out=str(tmp_path / "run"), init="random", blocks=3, block=0))
    assert "preparing" not in capfd.readouterr().err and not (tmp_path / "c").exists()


def test_a_run_resumed_on_other_images_is_refused(tmp_path, capfd):
    pictures = write_folder(tmp_path / "pictures", per_class=10, size=(16, 16))
    settings = dict(data=str(pictures), image_size=16, cache=str(tmp_path / "cache"), epochs=1, width=0.125,
                    batch_size=8, device="cpu", out=str(tmp_path / "run"))
    rotnet.pretrain(rotnet.Pretraining(**settings))
    rotnet.pretrain(rotnet.Pretraining(**settings, resume=True))  # the same images: fine
    os.rename(pictures, tmp_path / "moved")  # moved (files copied elsewhere): the same images
    rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(tmp_path / "moved"), cache=str(tmp_path / "c2")),
                                       resume=True))
    # Another --val-fraction holds out other images too: the setting is named, not the data blamed.
    # Each refusal comes before the folder is prepared again (hours, for ImageNet).
    capfd.readouterr()
    with pytest.raises(data.UserError, match=r"other settings \(val_fraction 0.1 there, 0.3 here\)"):
        rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(tmp_path / "moved"), cache=str(tmp_path / "c2"),
                                                  val_fraction=0.3), resume=True))
    write_folder(tmp_path / "moved", classes=("cat",), per_class=11, size=(16, 16))  # one image more
    with pytest.raises(data.UserError, match=r"run was trained on other images: the data in --data changed"):
        rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(tmp_path / "moved"), cache=str(tmp_path / "c2")),
                                           resume=True))
    with pytest.raises(data.UserError, match=r"other settings \(image_size 16 there, 8 here\)"):
        rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(tmp_path / "moved"), cache=str(tmp_path / "c3"),
                                                  image_size=8), resume=True))
    # Another setting changed as well is named, not the data blamed, before preparing too:
    # every run's (seed) and rotnet.py's own (rotations).
    with pytest.raises(data.UserError, match=r"other settings \(seed 0 there, 1 here\)"):
        rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(tmp_path / "moved"), cache=str(tmp_path / "c3"),
                                                  seed=1), resume=True))
    with pytest.raises(data.UserError, match=r"other settings \(rotations \[0, 90, 180, 270\] there, \[0, 180\] "):
        rotnet.pretrain(rotnet.Pretraining(**dict(settings, data=str(tmp_path / "moved"), cache=str(tmp_path / "c3"),
                                                  rotations=(0, 180)), resume=True))
    assert "preparing" not in capfd.readouterr().err and not (tmp_path / "c3").exists()
