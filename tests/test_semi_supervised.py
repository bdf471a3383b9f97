"""semi_supervised.py: the labelled subset and one tiny run end to end (CPU, tiny models)."""
import json
import os
import shutil

import pytest
import torch

import data
import semi_supervised
from conftest import REPO, RunsCode, assert_one_line_error, run_cli, save_alexnet, save_nin, write_cifar
from errors import UserError


def test_the_subset_is_the_first_k_of_each_class():
    labels = torch.tensor([3, 1, 3, 0, 1, 3, 2, 0, 1, 2] * 10 + list(range(4, 10)) * 5)
    chosen = semi_supervised.labelled_subset(labels, 2)
    for c in range(10):
        members = (labels == c).nonzero().flatten()
        assert torch.equal(chosen[labels[chosen] == c], members[:2])  # the original choice
    assert len(chosen) == 20 and torch.equal(chosen, chosen.sort().values)


def test_a_seeded_subset_is_random_but_still_k_per_class():
    labels = torch.arange(1000) % 10
    a = semi_supervised.labelled_subset(labels, 7, seed=1)
    assert torch.equal(torch.bincount(labels[a], minlength=10), torch.full((10,), 7))
    assert torch.equal(a, semi_supervised.labelled_subset(labels, 7, seed=1))
    assert not torch.equal(a, semi_supervised.labelled_subset(labels, 7, seed=2))
    assert not torch.equal(a, semi_supervised.labelled_subset(labels, 7))


def test_too_few_images_of_a_class_is_a_clear_error():
    with pytest.raises(UserError, match="class 'truck' has only 0"):
        semi_supervised.labelled_subset(torch.arange(90) % 9, 5)


def test_the_table_gives_the_conv_arms_best_epoch_as_the_original_keeps_it():
    # The original's K configs keep the conv classifier's best epoch, and the supervised NIN's last
    text = semi_supervised.markdown([dict(per_class=20, rotnet_conv=40.0, rotnet_conv_best=42.5, supervised=30.25)])
    assert "| 20 | 40.00 / 42.50 | 30.25 | +9.75 |" in text and "supervised NIN's last" in text
    text = semi_supervised.markdown([dict(per_class=20, rotnet_conv=40.0, rotnet_conv_best=None, supervised=30.25)])
    assert "| 20 | 40.00 / – | 30.25 | +9.75 |" in text  # (no metrics.jsonl to tell the best)


def test_the_figure_shows_a_small_gap_as_small():
    # One K whose arms differ by 0.2 points: not a plot filled by the gap (the axis spans 10)
    assert semi_supervised.y_limits([31.0, 30.8]) == pytest.approx((25.9, 35.9))
    assert semi_supervised.y_limits([0.5, 1.0]) == pytest.approx((0.0, 10.0))  # within 0-100
    assert semi_supervised.y_limits([99.0, 99.5]) == pytest.approx((90.0, 100.0))
    assert semi_supervised.y_limits([20.0, 80.0]) == pytest.approx((17.0, 83.0))  # wide: a margin only


def test_one_tiny_run_writes_both_arms_and_the_figure(tmp_path):
    write_cifar(tmp_path / "data", 30, 50)
    save_nin(tmp_path / "model.pt", width=0.125)  # as wide as --width, the supervised arm's
    out = tmp_path / "out"
    # --data relative (to the repository, where run_cli runs): results.json records it absolute.
    data_dir = os.path.relpath(tmp_path / "data", REPO)
    flags = ["--per-class", "3", "--data", data_dir, "--epochs", "1", "--epoch-size", "96", "--width", "0.125",
             "--batch-size", "32", "--device", "cpu", "--out", out]
    proc = run_cli(*flags, "--checkpoint", tmp_path / "model.pt", timeout=300, script="semi_supervised.py")
    made = json.loads((out / "results.json").read_text())
    rows = made["rows"]
    assert [r["per_class"] for r in rows] == [3] and made["data"] == str(tmp_path / "data")
    assert all(0 <= rows[0][arm] <= 100 for arm in ("rotnet_conv", "supervised"))
    assert rows[0]["rotnet_conv_best"] == rows[0]["rotnet_conv"]  # (one epoch)
    assert f"| 3 | {rows[0]['rotnet_conv']:.2f} / {rows[0]['rotnet_conv']:.2f} | " in proc.stdout
    assert "K=3: RotNet + conv" in proc.stdout and (out / "semi_supervised.md").exists()
    png = (out / "semi_supervised.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for arm in ("K3_rotnet_conv", "K3_supervised"):  # one folder per arm and K, one epoch each
        metrics = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 1
    widths = [json.loads((out / arm / "config.json").read_text())["width"]
              for arm in ("K3_rotnet_conv", "K3_supervised")]
    assert widths == [0.125, 0.125]  # each records the network it trained
    # Its finished arms are reused only by the same sweep: not with another lr, or another RotNet,
    # be it another file, the sweep's own, or other weights in the same file (trained anew).
    save_nin(tmp_path / "other.pt", seed=1)
    for changed, named in ((["--checkpoint", tmp_path / "model.pt", "--lr", "0.5"], "lr"),
                           (["--checkpoint", tmp_path / "other.pt"], "checkpoint_hash"),
                           ([], "rotnet_4blocks")):
        again = run_cli(*flags, *changed, check=False, script="semi_supervised.py")
        assert_one_line_error(again, "K3_", named, "other settings", "give the sweep another --out")
    # The same weights by another path (a copy, a path written otherwise) are the same RotNet.
    shutil.copy(tmp_path / "model.pt", tmp_path / "copy.pt")
    again = run_cli(*flags, "--checkpoint", tmp_path / "copy.pt", script="semi_supervised.py")
    assert "epoch 1" not in again.stdout
    save_nin(tmp_path / "model.pt", width=0.125, seed=1)
    again = run_cli(*flags, "--checkpoint", tmp_path / "model.pt", check=False, script="semi_supervised.py")
    assert_one_line_error(again, "K3_rotnet_conv", "checkpoint_hash", "other settings")
    # nor on other images (another sample, or the folder changed since)
    save_nin(tmp_path / "model.pt", width=0.125)
    write_cifar(tmp_path / "other_data", 30, 50, seed=1)
    again = run_cli(*[tmp_path / "other_data" if f == data_dir else f for f in flags], "--checkpoint",
                    tmp_path / "model.pt", check=False, script="semi_supervised.py")
    assert_one_line_error(again, "K3_", "made on other images")


def test_an_epoch_cycles_a_small_set_in_fresh_orders():
    perm, view = data.Recipe("pad-crop").draws(30, epoch=1, seed=0, device="cpu", H=32, W=32, count=96)
    assert perm.shape == (96,) and view["shifts"].shape == (96, 2) and view["flips"].shape == (96,)
    for start in (0, 30, 60):  # three whole passes, each a permutation of its own
        assert torch.equal(perm[start:start + 30].sort().values, torch.arange(30))
    assert not torch.equal(perm[:30], perm[30:60])


def test_an_impossible_k_stops_before_anything_trains(tmp_path):
    write_cifar(tmp_path / "data", 10, 10)  # 50 training images: no class has 5000
    out = tmp_path / "out"
    proc = run_cli("--per-class", "5000", "--data", tmp_path / "data", "--epochs-scale", "0.005", "--width", "0.125",
                   "--device", "cpu", "--out", out, check=False, script="semi_supervised.py")
    assert_one_line_error(proc, "--per-class 5000", "training images")
    assert not out.exists()  # no RotNet was pretrained first


def test_a_hostile_checkpoint_is_refused_before_anything_trains(tmp_path):
    write_cifar(tmp_path / "data", 10, 10)
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "model_config": {}}, tmp_path / "model.pt")
    out = tmp_path / "out"
    proc = run_cli("--per-class", "1", "--checkpoint", tmp_path / "model.pt", "--data", tmp_path / "data",
                   "--device", "cpu", "--out", out, check=False, script="semi_supervised.py")
    assert_one_line_error(proc, "model.pt", "refused")
    assert not marker.exists() and not out.exists()


def test_an_alexnet_checkpoint_is_refused_before_anything_trains(tmp_path):
    write_cifar(tmp_path / "data", 10, 10)
    save_alexnet(tmp_path / "alexnet.pt")
    out = tmp_path / "out"
    proc = run_cli("--per-class", "1", "--checkpoint", tmp_path / "alexnet.pt", "--data", tmp_path / "data",
                   "--device", "cpu", "--out", out, check=False, script="semi_supervised.py")
    assert_one_line_error(proc, "alexnet.pt", "AlexNet", "NIN")
    assert not out.exists()


def test_a_checkpoint_that_is_no_rotnet_of_this_width_is_refused_before_anything_trains(tmp_path):
    write_cifar(tmp_path / "data", 10, 10)
    flags = ["--per-class", "1", "--data", tmp_path / "data", "--device", "cpu", "--out", tmp_path / "out"]
    save_nin(tmp_path / "model.pt", width=0.25)
    # the supervised arm is made as wide as the RotNet: without --width, by taking its width
    assert semi_supervised.Sweep(checkpoint=str(tmp_path / "model.pt")).width == 0.25
    assert semi_supervised.Sweep().width == 1.0
    proc = run_cli(*flags, "--width", "1", "--checkpoint", tmp_path / "model.pt", check=False,
                   script="semi_supervised.py")
    assert_one_line_error(proc, "--width 1.0", "0.25 wide", "leave --width out")
    # a supervised NIN's checkpoint (probe.py --supervised), known by its run's config.json, or
    # away from it by its 10 outputs
    supervised = tmp_path / "supervised"
    supervised.mkdir()
    save_nin(supervised / "checkpoint.pt", blocks=3, num_classes=10, width=0.25, optimizer={})
    shutil.copy(supervised / "checkpoint.pt", tmp_path / "copied.pt")
    (supervised / "config.json").write_text(json.dumps(dict(classifier="supervised", supervised=True)))
    for path, named in ((supervised / "checkpoint.pt", "a supervised NIN's network, not a RotNet"),
                        (tmp_path / "copied.pt", "a network of 10 outputs, not a RotNet")):
        proc = run_cli(*flags, "--checkpoint", path, check=False, script="semi_supervised.py")
        assert_one_line_error(proc, named)
    assert not (tmp_path / "out").exists()
