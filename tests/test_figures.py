"""figures.py: the attention maps themselves (shape, range, where they peak), and every figure
as a PNG of the promised pixel size that is not blank, from tiny untrained models and a few
images written by the tests. Figure 5(a) trains two one-epoch probes, then reuses them.
"""
import json
import os
import shutil
import struct

import matplotlib.axes
import matplotlib.image
import pytest
import torch
import torch.nn as nn

import cifar
import conftest
import figures
from conftest import RunsCode, assert_one_line_error, run_cli, write_cifar, write_folder
from errors import UserError
from nin import NIN


# ----------------------------------------------------------------------------- helpers
def save_nin(path, blocks, num_classes, seed=0, **extra):
    conftest.save_nin(path, blocks, num_classes, seed=seed, **extra)
    return str(path)


def refused(capsys, argv, *needles, notes=0):
    """figures.main(argv) stops with exit status 1 and one error line holding needles, after
    `notes` lines of notes."""
    with pytest.raises(SystemExit) as stop:
        figures.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(lines) == notes + 1 and lines[-1].startswith("error: "), lines
    assert all(needle in lines[-1] for needle in needles), lines[-1]


def on_the_cpu(argv):
    """--device cpu, for the figures that run models."""
    return ["--device", "cpu"] if argv[0] in ("attention", "rotation-vs-object") else []


def write_metrics(run, rows):
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for epoch, test_acc in rows:
            f.write(json.dumps(dict(epoch=epoch, lr=0.1, train_loss=2.0 / epoch, train_acc=20.0 + 10 * epoch,
                                    test_acc=test_acc, seconds=1.0, images_per_s=100.0)) + "\n")
    return str(run)


def png_size(path):
    """(width, height) from the IHDR chunk, the first thing after the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def assert_png(path, inches):
    """A PNG of figsize inches x DPI pixels that shows something."""
    assert os.path.getsize(path) > 0
    assert png_size(path) == tuple(round(v * figures.DPI) for v in inches)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == png_size(path)[::-1]
    assert pixels[..., :3].var() > 0


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar(folder, 20, 30)
    return str(folder)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """A 4-block RotNet and a 3-block supervised NIN, as their scripts save them."""
    folder = tmp_path_factory.mktemp("nets")
    return save_nin(folder / "rotnet.pt", 4, 4), save_nin(folder / "supervised.pt", 3, 10, seed=1)


# ----------------------------------------------------------------------------- attention maps
def test_attention_maps_shape_and_range():
    model = NIN(4, 4, width=0.125).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    maps = figures.attention_maps(model, images)
    assert maps.shape == (3, 4, 32, 32)
    assert torch.allclose(maps.amin(dim=(2, 3)), torch.zeros(3, 4))
    assert torch.allclose(maps.amax(dim=(2, 3)), torch.ones(3, 4))


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_attention_maps_are_the_channel_mean_of_each_block(power):
    torch.manual_seed(0)
    model = NIN(3, 10, width=0.125).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(cifar.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar.STD).view(1, 3, 1, 1)
    x = (images.float() - mean) / std
    maps = figures.attention_maps(model, images, power)
    for k in range(1, 4):
        with torch.no_grad():
            a = model.features(x, k).abs().pow(power).mean(1, keepdim=True)
        a = torch.nn.functional.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
        lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
        a = (a - lo) / (hi - lo)
        torch.testing.assert_close(maps[:, k - 1], a, atol=1e-5, rtol=1e-5)


class PassThrough(nn.Module):
    """Two 'blocks' whose output is the normalised image itself, then its 2x2 average: the
    attention must peak where the image departs from the mean colour."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity(), nn.AvgPool2d(2)])
        self.anchor = nn.Parameter(torch.zeros(1))  # attention_maps finds the device here

    def features(self, x, k):
        for block in self.blocks[:k]:
            x = block(x)
        return x


def test_attention_peaks_where_the_activation_is():
    grey = torch.tensor([round(m) for m in cifar.MEAN], dtype=torch.uint8).view(3, 1, 1)
    images = grey.expand(3, 3, 32, 32).clone()
    images[0, :, 4:8, 20:24] = 255   # a bright patch up on the right
    images[1, :, 24:28, 2:6] = 0     # a dark one down on the left
    images[2] = 200                  # flat: no place stands out
    maps = figures.attention_maps(PassThrough(), images)
    assert maps.shape == (3, 2, 32, 32)
    for k in range(2):
        for i, (rows, cols) in enumerate([(range(4, 8), range(20, 24)), (range(24, 28), range(2, 6))]):
            r, c = divmod(int(maps[i, k].argmax()), 32)
            assert r in rows and c in cols, (i, k, r, c)
            assert maps[i, k, r, c] == 1 and maps[i, k, 14:18, 14:18].max() < 0.01  # the middle is calm
    assert torch.equal(maps[2], torch.zeros(2, 32, 32))  # a flat map is 0, not NaN


# ----------------------------------------------------------------------------- the figures
def test_attention_figure(nets, cifar_dir, tmp_path):
    path = figures.attention_figure(*nets, cifar_dir, str(tmp_path), images=3, power=2, device="cpu")
    assert path == str(tmp_path / "attention.png")
    columns = 1 + 4 + 3  # the image, RotNet ConvB1-4, supervised ConvB1-3
    assert_png(path, (columns * figures.ATTENTION_CELL, 3 * figures.ATTENTION_CELL + figures.ATTENTION_HEADER))


def test_attention_figure_on_an_image_folder_prepared_elsewhere(nets, tmp_path):
    # --cache as the training scripts take it: the folder is prepared (once) where it says
    pictures = write_folder(tmp_path / "pictures", classes=("cat", "dog"), per_class=10)
    out = tmp_path / "figs"
    figures.main(["attention", "--rotnet", nets[0], "--supervised", nets[1], "--data", str(pictures),
                  "--image-size", "32", "--cache", str(tmp_path / "cache"), "--images", "2", "--device", "cpu",
                  "--out", str(out)])
    cell = figures.ATTENTION_CELL
    assert_png(str(out / "attention.png"), (8 * cell, 2 * cell + figures.ATTENTION_HEADER))
    assert (tmp_path / "cache" / "manifest.json").exists()
    with pytest.raises(UserError, match="is inside the image folder"):  # its PNGs would be images of the data
        figures.attention_figure(nets[0], nets[1], str(pictures), out=str(pictures / "figs"), image_size=32,
                                 cache=str(tmp_path / "cache"))
    assert not (pictures / "figs").exists()


def test_attention_figure_shows_the_rotnets_own_images(nets, tmp_path, monkeypatch, capsys):
    # A RotNet pretrained on a folder is shown that folder (at its size, from its cache), not
    # ./data; one not beside its run's config.json (an original checkpoint) is shown ./data.
    import data
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    photos = write_folder(tmp_path / "work" / "photos", classes=("a", "b"), per_class=8, size=(20, 18))
    run = tmp_path / "run"
    run.mkdir()
    rotnet = save_nin(run / "model.pt", 4, 4, rotations=[0, 90, 180, 270])
    (run / "config.json").write_text(json.dumps(dict(  # as older runs recorded it: as typed
        data="photos", image_size=16, cache="c", val_fraction=0.25,
        data_fingerprint=data.identity(str(photos), image_size=16, val_fraction=0.25)["data_fingerprint"])))
    common = ["--supervised", nets[1], "--images", "2", "--device", "cpu", "--out", str(tmp_path / "figs")]
    figures.main(["attention", "--rotnet", rotnet, *common])
    assert "Figure 3: showing the run's own images, photos" in capsys.readouterr().err
    assert json.load(open("c/manifest.json"))["settings"]["image_size"] == 16
    assert sorted(os.listdir(".")) == ["c", "photos"]  # nothing prepared anywhere else
    figures.main(["attention", "--rotnet", rotnet, "--data", "./photos/", *common])  # named: the same images
    assert "Figure 3: showing the run's own images, photos" in capsys.readouterr().err
    assert sorted(os.listdir(".")) == ["c", "photos"]  # its cache reused
    # Its --data, relative to where it ran, holds other images from here: refused
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    write_folder(tmp_path / "elsewhere" / "photos", classes=("x", "y"), per_class=8, size=(20, 18), seed=3)
    refused(capsys, ["attention", "--rotnet", rotnet, *common], "photos (the --data", "does not hold the images the "
            "run was pretrained on", "give --data", notes=1)
    # Without a record of its images: ./data, as the other scripts take it
    write_cifar(tmp_path / "elsewhere" / "data", 20, 30)
    (run / "config.json").unlink()
    figures.main(["attention", "--rotnet", rotnet, *common])
    assert capsys.readouterr().err == ""
    cell = figures.ATTENTION_CELL
    assert_png(str(tmp_path / "figs" / "attention.png"), (8 * cell, 2 * cell + figures.ATTENTION_HEADER))


def test_filter_grid_scales_each_filter_on_its_own():
    weight = torch.randn(24, 3, 5, 5) * torch.logspace(-3, 3, 24).view(24, 1, 1, 1)
    grid = figures.filter_grid(weight)
    assert grid.shape == (4 * 6 + 1, 6 * 6 + 1, 3)  # 24 filters: 6 columns, 4 rows, 1-pixel gaps
    tiles = [grid[1 + r * 6:1 + r * 6 + 5, 1 + c * 6:1 + c * 6 + 5] for r in range(4) for c in range(6)]
    for tile in tiles:
        assert tile.min() == 0 and tile.max() == 1


def test_filters_figure(nets, tmp_path):
    assert_png(figures.filters_figure(*nets, str(tmp_path)), figures.FILTERS_SIZE)


def test_the_two_networks_swapped_are_refused(nets, tmp_path):
    rotnet_model = save_nin(tmp_path / "model.pt", 4, 4, rotations=[0, 90, 180, 270])  # as rotnet.py saves it
    with pytest.raises(UserError, match="--rotnet .*10 outputs, not a RotNet"):
        figures.filters_figure(nets[1], nets[0], str(tmp_path))
    with pytest.raises(UserError, match="--supervised .*a RotNet's, not a supervised NIN's"):
        figures.filters_figure(rotnet_model, rotnet_model, str(tmp_path))
    # A checkpoint.pt (no rotations listed, a head of 4 outputs) is known by its run's config.json.
    for name, config, wrong in (("rotnet_run", dict(arch="nin", rotations=[0, 90, 180, 270]), "--supervised"),
                                ("supervised_run", dict(classifier="supervised"), "--rotnet")):
        (tmp_path / name).mkdir()
        save_nin(tmp_path / name / "checkpoint.pt", 4, 4, optimizer={})
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        checkpoint = str(tmp_path / name / "checkpoint.pt")
        with pytest.raises(UserError, match=f"{wrong} .*checkpoint.pt: a .*, not a"):
            figures.filters_figure(*((nets[0], checkpoint) if wrong == "--supervised" else (checkpoint, nets[1])),
                                   str(tmp_path))
    assert not (tmp_path / "filters.png").exists()
    # a run's config.json speaks for its own checkpoint.pt only, not for any file put beside it
    save_nin(tmp_path / "rotnet_run" / "supervised_nin.pt", 3, 10)
    figures.filters_figure(nets[0], str(tmp_path / "rotnet_run" / "supervised_nin.pt"), str(tmp_path))


def test_curves_figure(tmp_path):
    a = write_metrics(tmp_path / "rotnet_a", [(1, 30.0), (2, 40.0), (3, 50.0)])
    b = write_metrics(tmp_path / "probe_b", [(1, None), (2, 35.0), (3, None), (4, 60.0)])  # --eval-every 2
    assert_png(figures.curves_figure([a, b], str(tmp_path / "figs")), figures.CURVES_SIZE)


def test_a_run_of_one_epoch_is_drawn_as_points(tmp_path, monkeypatch):
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.extend(plot(ax, *a, **k)))
    figures.curves_figure([write_metrics(tmp_path / "one", [(1, 30.0)])], str(tmp_path / "figs"))
    assert len(drawn) == 3 and all(line.get_marker() not in (None, "", "None") for line in drawn)


def test_rotation_vs_object(cifar_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for epoch, rotation_acc in ((1, 31.25), (2, 47.5)):  # as rotnet.py --save-every stores them
        save_nin(run / f"model_epoch{epoch:03d}.pt", 4, 4, seed=epoch, rotations=[0, 90, 180, 270],
                 metrics=dict(epoch=epoch, test_acc=rotation_acc))
    save_nin(run / "model.pt", 4, 4)  # the final model is not a snapshot
    out = str(tmp_path / "figs")
    args = ["rotation-vs-object", str(run), "--data", cifar_dir, "--probe-epochs", "1", "--device", "cpu", "--out", out]
    figures.main(args)
    assert_png(os.path.join(out, "rotation_vs_object.png"), figures.FIGURE5A_SIZE)
    table = capsys.readouterr().out.split("epoch  rotation %  object %\n")[1].splitlines()
    rows = [line.split() for line in table[:2]]
    assert [r[:2] for r in rows] == [["1", "31.25"], ["2", "47.50"]]
    probes = [json.load(open(run / "figure5a_probes" / f"epoch{e:03d}" / "results.json")) for e in (1, 2)]
    assert [(p["block"], p["classifier"], p["epochs"]) for p in probes] == [(2, "nonlinear", 1)] * 2
    assert [float(r[2]) for r in rows] == [round(p["test_acc"], 2) for p in probes]

    def no_training(*_, **__):
        raise AssertionError("a finished probe was trained again")

    monkeypatch.setattr(figures.probe, "probe", no_training)
    os.remove(os.path.join(out, "rotation_vs_object.png"))
    figures.main(args)  # every probe has its results.json: nothing is trained
    assert_png(os.path.join(out, "rotation_vs_object.png"), figures.FIGURE5A_SIZE)

    # A finished probe made otherwise is not taken for this figure's: with other epochs, on other
    # images, or on a snapshot trained anew in place.
    capsys.readouterr()
    refused(capsys, ["2" if a == "1" else a for a in args], "epoch001", "epochs 1 there, 2 here",
            "figure5a_probes to train")
    write_cifar(tmp_path / "other_data", 20, 30, seed=1)
    refused(capsys, [str(tmp_path / "other_data") if a == cifar_dir else a for a in args], "epoch001",
            "other images")
    save_nin(run / "model_epoch002.pt", 4, 4, seed=7, rotations=[0, 90, 180, 270], metrics=dict(epoch=2, test_acc=47.5))
    refused(capsys, args, "epoch002", "checkpoint_hash")
    # An AlexNet RotNet's snapshots: refused as such, not by the probe's flags, which figures.py has not
    alexnet = tmp_path / "alexnet_run"
    alexnet.mkdir()
    conftest.save_alexnet(alexnet / "model_epoch001.pt")
    refused(capsys, ["rotation-vs-object", str(alexnet), *args[2:]], "model_epoch001.pt is an AlexNet's",
            "a NIN RotNet's ConvB2")
    assert not (alexnet / "figure5a_probes").exists()


def test_rotation_vs_object_probes_on_the_runs_own_images(tmp_path, monkeypatch, capsys):
    # A RotNet pretrained on a folder: its probes run on that folder (at its size, with its
    # held-out share and cache), not on ./data; --data still chooses others.
    import data
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # (no ./data here)
    photos = write_folder(tmp_path / "work" / "photos", classes=("a", "b"), per_class=8, size=(20, 18))
    run = tmp_path / "run"
    run.mkdir()
    save_nin(run / "model_epoch001.pt", 4, 4, rotations=[0, 90, 180, 270], metrics=dict(epoch=1, test_acc=40.0))
    (run / "config.json").write_text(json.dumps(dict(  # as older runs recorded it: as typed
        data="photos", image_size=16, cache="c", val_fraction=0.25,
        data_fingerprint=data.identity(str(photos), image_size=16, val_fraction=0.25)["data_fingerprint"])))
    common = ["--probe-epochs", "1", "--device", "cpu", "--out", str(tmp_path / "figs")]
    made = lambda: json.load(open(run / "figure5a_probes" / "epoch001" / "config.json"))
    figures.main(["rotation-vs-object", str(run), *common])
    assert "probing on the run's own images, photos" in capsys.readouterr().err
    assert (made()["data"], made()["image_size"], made()["cache"], made()["val_fraction"]) == \
        (str(photos), 16, str(tmp_path / "work" / "c"), 0.25)  # where they lie (runs.restore)
    assert os.path.exists("c/manifest.json")

    # Given: others, at the run's size and share unless given; the run's cache only at its size
    refused(capsys, ["rotation-vs-object", str(run), "--data", "./data", *common], "./data: no such folder")
    shutil.rmtree(run / "figure5a_probes")
    figures.main(["rotation-vs-object", str(run), "--image-size", "12", *common])
    assert (made()["image_size"], made()["cache"], made()["val_fraction"]) == \
        (12, str(tmp_path / "work" / "prepared" / "photos-12"), 0.25)  # the default, recorded where it lies
    assert json.load(open("c/manifest.json"))["settings"]["image_size"] == 16  # not rebuilt at 12
    capsys.readouterr()
    # The run's own --data, relative to where it ran, is not here, or holds other images: refused
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    refused(capsys, ["rotation-vs-object", str(run), *common], "photos (the --data", "is not here: give --data")
    write_folder(tmp_path / "elsewhere" / "photos", classes=("x", "y"), per_class=8, size=(20, 18), seed=3)
    refused(capsys, ["rotation-vs-object", str(run), *common], "photos (the --data", "does not hold the images the "
            "run was pretrained on", "give --data", notes=1)  # (after the note of which images)
    # No record of its images (a run of other code, or its config.json lost): not guessed at
    for record in (None, "[1, 2]", json.dumps(dict(data=None))):
        (run / "config.json").unlink(missing_ok=True)
        if record:
            (run / "config.json").write_text(record)
        refused(capsys, ["rotation-vs-object", str(run), *common], "config.json does not say which images",
                "give --data")


# ----------------------------------------------------------------------------- errors
def test_missing_checkpoint_is_one_line(tmp_path):
    missing = tmp_path / "missing.pt"
    proc = run_cli("filters", "--rotnet", missing, "--supervised", missing, "--out", tmp_path, check=False,
                   timeout=120, script="figures.py")
    assert_one_line_error(proc, "error:", "missing.pt")
    assert proc.returncode == 1


def test_hostile_checkpoint_is_refused_in_one_line(nets, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "model_config": {}}, tmp_path / "hostile.pt")
    proc = run_cli("filters", "--rotnet", tmp_path / "hostile.pt", "--supervised", nets[1], "--out", tmp_path,
                   check=False, timeout=120, script="figures.py")
    assert_one_line_error(proc, "error:", "hostile.pt", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["no metrics", "no run", "no snapshots", "damaged snapshot", "no data"])
def test_other_missing_inputs_stop_with_one_message(case, nets, tmp_path, capsys):
    if case == "no run":  # a run's path mistyped: said so, not "pretrain with --save-every"
        argv, needle = ["rotation-vs-object", str(tmp_path / "rnus")], "rnus: no such folder"
    elif case == "no metrics":
        argv, needle = ["curves", str(tmp_path)], "metrics.jsonl"
    elif case == "no snapshots":
        argv, needle = ["rotation-vs-object", write_metrics(tmp_path / "run", [(1, 50.0)])], "--save-every"
    elif case == "damaged snapshot":  # cut short, as by a full disk
        run = write_metrics(tmp_path / "run", [(1, 50.0)])
        with open(nets[0], "rb") as f:
            (tmp_path / "run" / "model_epoch001.pt").write_bytes(f.read()[:1000])
        argv, needle = ["rotation-vs-object", run], "model_epoch001.pt"
    else:
        argv, needle = ["attention", "--rotnet", nets[0], "--supervised", nets[1], "--data", str(tmp_path)], "CIFAR-10"
    with pytest.raises(SystemExit) as stop:
        figures.main(argv + ["--out", str(tmp_path / "figs"), *on_the_cpu(argv)])
    assert stop.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and needle in message and "\n" not in message
    assert not os.path.exists(tmp_path / "figs")


@pytest.mark.parametrize("case", ["garbage metrics line", "snapshot without metrics", "an AlexNet", "out is a file",
                                  "too many images", "power not finite"])
def test_wrong_inputs_stop_with_one_message(case, nets, tmp_path, capsys):
    out = tmp_path / "figs"
    if case == "garbage metrics line":
        run = write_metrics(tmp_path / "run", [(1, 50.0)])
        with open(os.path.join(run, "metrics.jsonl"), "a") as f:
            f.write('{"epoch": 2, "lr"\n')
        argv, needle = ["curves", run], "line 2"
    elif case == "snapshot without metrics":
        run = write_metrics(tmp_path / "run", [(5, 50.0)])
        save_nin(tmp_path / "run" / "model_epoch005.pt", 4, 4)  # a model.pt, not a --save-every snapshot
        argv, needle = ["rotation-vs-object", run], "model_epoch005.pt"
    elif case == "an AlexNet":
        conftest.save_alexnet(tmp_path / "alexnet.pt")
        argv, needle = ["filters", "--rotnet", str(tmp_path / "alexnet.pt"), "--supervised", nets[1]], "AlexNet"
    elif case == "out is a file":
        out.write_text("")
        argv, needle = ["curves", write_metrics(tmp_path / "run", [(1, 50.0)])], "--out"
    else:
        flag = ["--images", "100000"] if case == "too many images" else ["--power", "nan"]
        argv, needle = ["attention", "--rotnet", nets[0], "--supervised", nets[1], *flag], flag[0]
    with pytest.raises(SystemExit) as stop:
        figures.main(argv + ["--out", str(out), *on_the_cpu(argv)])
    if stop.value.code == 2:  # a usage error, which argparse prints
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error:" in message and needle in message
    else:
        assert stop.value.code == 1
        message = capsys.readouterr().err.strip()
        assert message.startswith("error: ") and needle in message and "\n" not in message


def test_a_figure_that_trains_nothing_refuses_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: each rank would draw the same figure
    for argv in (["filters", "--rotnet", "r.pt", "--supervised", "s.pt"], ["curves", "runs/x"]):
        with pytest.raises(UserError, match="runs in one process: run it without torchrun"):
            figures.figure(figures.parse_args(argv))


def test_other_images_are_shown_at_the_size_the_run_learnt_at(tmp_path):
    # A CIFAR-10 run learnt at 32 whatever it records (runs made before 2026-12-07: 256)
    write_cifar(tmp_path / "cifar", 2, 2)
    write_folder(tmp_path / "photos", classes=("x", "y"), per_class=4, size=(20, 18))
    run = tmp_path / "run"
    run.mkdir()
    for recorded, data, size in ((256, "cifar", 32), (48, "photos", 48)):
        (run / "config.json").write_text(json.dumps(dict(image_size=recorded, data=str(tmp_path / data), arch="nin")))
        images, _ = figures.run_images(str(run), data_dir=str(tmp_path / "photos"))
        assert images["image_size"] == size
