"""The ImageNet experiments at a tiny scale: RandomResizedCrop draws, AlexNet pretraining on a
folder, Table 5's five linear probes and Table 4's two non-linear ones each trained jointly
(equal to each trained alone), and both tables end to end (CPU, width 0.125, images the tests
write).
"""
import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import alexnet
import data
import models
import probe
import rot_kernel
import train
from conftest import assert_one_line_error, metrics_of, run_cli, save_nin


def write_imagenet(root, classes=("n01", "n02", "n03"), train=8, val=3, size=(300, 260), seed=0):
    """root/train/<class>/ and root/val/<class>/ of JPEGs larger than 224."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize(size).save(root / split / c / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet") / "imagenet")


# ----------------------------------------------------------------------------- crops
def test_resized_crop_boxes_are_torchvisions_draws():
    H, W, n = 256, 256, 4000
    boxes = rot_kernel.resized_crop_boxes(n, H, W, generator=torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert boxes.dtype == torch.int64 and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all() and (h >= 1).all() and (w >= 1).all()
    area = (h * w).double() / (H * W)
    assert area.min() > 0.07 and area.max() <= 1.0 and 0.45 < area.mean() < 0.6  # U(0.08, 1), capped
    aspect = (w.double() / h.double()).log()
    assert aspect.min() >= math.log(3 / 4) - 0.05 and aspect.max() <= math.log(4 / 3) + 0.05
    again = rot_kernel.resized_crop_boxes(n, H, W, generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)  # a function of the generator's seed alone


def test_resized_crop_falls_back_to_the_centre_when_nothing_fits():
    # 1000 x 10: every box of a fitting aspect is too tall, so each draw is the fallback:
    # the full height at the widest aspect allowed, centred.
    boxes = rot_kernel.resized_crop_boxes(50, 10, 1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(boxes, torch.tensor([[0, (1000 - 13) // 2, 10, 13]]).expand(50, 4))


@pytest.mark.parametrize("kind", ["pad-crop", "random-crop", "resized-crop"])
def test_recipes_give_the_op_what_it_needs(kind):
    recipe = data.Recipe(kind, None if kind == "pad-crop" else 24)
    images = torch.randint(0, 256, (10, 3, 32, 30), dtype=torch.uint8)
    perm, view = recipe.draws(10, epoch=3, seed=1, device="cpu", H=32, W=30, count=13)
    assert sorted(perm[:10].tolist()) == list(range(10)) and len(perm) == 13
    batch, _ = rot_kernel.rotation_batch(images, perm, rotations=(0,), size=recipe.out_size(32, 30), **view)
    assert batch.shape == (13, 3, *recipe.out_size(32, 30))
    assert not batch.isnan().any()
    perm2, view2 = recipe.draws(10, epoch=3, seed=1, device="cpu", H=32, W=30, count=13)
    assert torch.equal(perm, perm2) and all(torch.equal(view[k], view2[k]) for k in view)


def test_a_crop_larger_than_the_images_is_one_clear_error():
    from errors import UserError
    with pytest.raises(UserError, match="--image-size 224"):
        data.Recipe("resized-crop", 224).check(200, 200)


# ----------------------------------------------------------------------------- probe heads
def test_linear_heads_pool_to_the_papers_sizes():
    extractor = alexnet.AlexNet(width=1.0).eval()
    heads = probe.alexnet_heads(extractor, "linear", 1000)
    assert [h[-1].in_features for h in heads.classifier] == [9216, 9408, 9600, 9216, 9216]
    assert all(h[1].weight is None for h in heads.classifier)  # BatchNorm without affine parameters
    small = probe.alexnet_heads(alexnet.AlexNet(width=0.125), "linear", 7).eval()
    assert small(torch.randn(2, 3, 224, 224)).shape == (5, 2, 7)


@pytest.mark.parametrize("block", [4, 5])
def test_nonlinear_heads(block):
    torch.manual_seed(0)
    extractor = alexnet.AlexNet(width=0.5).eval()
    head = probe.alexnet_nonlinear(extractor, block, 11)
    model = probe.Probe(extractor, block, head).eval()
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 11)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] == [128 * 6 * 6, 2048, 2048] and linears[0].bias is None
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == (block == 4)
    if convs:  # the original's init, N(0, sqrt(2 / (3 * 3 * 128))), not PyTorch's uniform one
        assert convs[0].weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.02)
    joint = probe.alexnet_heads(extractor, "nonlinear", 11).eval()
    assert joint.blocks == (4, 5) and joint(torch.randn(2, 3, 224, 224)).shape == (2, 2, 11)


@pytest.mark.parametrize("classifier, blocks", [("linear", (1, 2, 3, 4, 5)), ("nonlinear", (4, 5))])
def test_heads_trained_jointly_equal_heads_trained_one_at_a_time(classifier, blocks):
    torch.manual_seed(0)
    extractor = alexnet.AlexNet(width=0.125).eval()
    joint = probe.alexnet_heads(extractor, classifier, 5)
    alone = [probe.Probe(extractor, k, copy.deepcopy(head)) for k, head in zip(blocks, joint.classifier)]
    opt_joint = train.make_optimizer(joint.classifier.parameters(), 0.01, 10)[0]
    opts = [train.make_optimizer(m.classifier.parameters(), 0.01, 10)[0] for m in alone]
    ctx = train.Context("cpu")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same batches for both
        x, y = torch.randn(6, 3, 224, 224, generator=gen), torch.randint(0, 5, (6,), generator=gen)
        joint.train()
        train.train_step(ctx, joint, opt_joint, x, y)
        for model, opt in zip(alone, opts):
            model.train()
            train.train_step(ctx, model, opt, x, y)
    for head, model in zip(joint.classifier, alone):
        for a, b in zip(head.state_dict().values(), model.classifier.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in extractor.parameters())


# ----------------------------------------------------------------------------- end to end
def test_alexnet_pretraining_on_a_folder(imagenet, tmp_path):
    out = tmp_path / "run"
    run_cli("--arch", "alexnet", "--data", imagenet, "--cache", tmp_path / "cache", "--epochs", 2, "--width", 0.125,
            "--batch-size", 8, "--device", "cpu", "--out", out)
    metrics = metrics_of(out)
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["lr"] for m in metrics] == pytest.approx([0.01, 1e-4])
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "alexnet" and config["batch_size"] == 8 and config["lr"] == 0.01
    model = models.load_model(out / "model.pt")
    assert isinstance(model, alexnet.AlexNet) and model.head.out_features == 4


def test_a_folder_too_small_for_the_crop_is_refused_before_it_is_prepared(imagenet, tmp_path):
    # preparing ImageNet takes hours and hundreds of GB: the size is checked first
    proc = run_cli("--arch", "alexnet", "--data", imagenet, "--image-size", 64, "--cache", tmp_path / "cache",
                   "--device", "cpu", "--out", tmp_path / "run", check=False)
    assert_one_line_error(proc, "64x64", "--image-size 224")
    assert "preparing" not in proc.stderr and not (tmp_path / "cache").exists()
    net = alexnet.AlexNet(width=0.125)
    torch.save(dict(model=net.state_dict(), model_config=net.config), tmp_path / "model.pt")
    proc = run_cli("--table", 5, "--data", imagenet, "--image-size", 128, "--cache", tmp_path / "cache",
                   "--checkpoint", tmp_path / "model.pt", "--device", "cpu", "--out", tmp_path / "tables",
                   script="probe.py", check=False)
    assert_one_line_error(proc, "128x128", "--image-size 224")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("wrong, named", [(("--classifier", "conv"), "an AlexNet is probed frozen"),
                                          (("--finetune",), "an AlexNet is probed frozen"),
                                          (("--classifier", "nonlinear"), "sits on conv4 or conv5")])
def test_an_alexnet_probe_it_cannot_have_is_refused_before_the_folder_is_prepared(imagenet, tmp_path, wrong, named):
    net = alexnet.AlexNet(width=0.125)
    torch.save(dict(model=net.state_dict(), model_config=net.config), tmp_path / "model.pt")
    proc = run_cli("--data", imagenet, "--cache", tmp_path / "cache", "--checkpoint", tmp_path / "model.pt",
                   "--block", 3, *wrong, "--device", "cpu", "--out", tmp_path / "probe", script="probe.py", check=False)
    assert_one_line_error(proc, named)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("classes", [5, 6])
def test_top5_is_measured_only_above_five_classes(tmp_path, classes):
    # (of five classes or fewer, every image's class is among the top five: 100 % whatever is learnt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2 * classes, 3, 232, 232), dtype=torch.uint8, generator=gen)
    y = torch.arange(2 * classes) % classes
    dataset = data.Dataset(x, y, x, y, mean=(120.0,) * 3, std=(60.0,) * 3, classes=tuple(map(str, range(classes))))
    extractor = alexnet.AlexNet(width=0.125)
    model = probe.Probe(extractor, 1, probe.alexnet_linear(extractor.convs[0].conv.out_channels, 12, classes))
    s = probe.Probing(out=str(tmp_path / "p"), device="cpu", batch_size=4, classifier="linear", block=1)
    results = probe.train_classifier(model, s, dataset, kind="alexnet-linear", epochs=1, describe={})
    last = json.loads((tmp_path / "p" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("test_top5" in results) == ("test_top5" in last) == (classes > 5)
    if classes > 5:  # measured in the last epoch's pass
        assert results["test_top5"] == last["test_top5"] and results["test_top5"] >= results["test_acc"]


def test_both_imagenet_tables_end_to_end(imagenet, tmp_path):
    torch.manual_seed(0)
    net = alexnet.AlexNet(width=0.125)
    torch.save(dict(model=net.state_dict(), model_config=net.config), tmp_path / "model.pt")
    common = ["--data", imagenet, "--cache", tmp_path / "cache", "--checkpoint", tmp_path / "model.pt",
              "--epochs-scale", 0.03, "--batch-size", 8, "--device", "cpu", "--out", tmp_path / "tables"]
    five = run_cli("--table", 5, *common, script="probe.py")
    assert "(18.80)" in five.stdout and "(36.50)" in five.stdout
    assert "top-5 |" not in five.stdout and "Top-5 is not given: the data has 5 classes or fewer" in five.stdout
    table = json.loads((tmp_path / "tables" / "table5.json").read_text())
    assert [len(row["ours"]) for row in table["rows"]] == [5]  # (3 classes: no top-5 row)
    assert (table["checkpoint"], table["width"], table["epochs"]) == (str(tmp_path / "model.pt"), 0.125, 1)
    four = run_cli("--table", 4, *common, script="probe.py")
    assert "(50.00)" in four.stdout and "(43.80)" in four.stdout
    assert four.stdout.count("epoch 1 ") == 1  # conv4's and conv5's probes trained together
    assert [len(row["ours"]) for row in json.loads((tmp_path / "tables" / "table4.json").read_text())["rows"]] == [2]
    again = run_cli("--table", 5, *common, script="probe.py")  # reused, not trained again
    assert "epoch 1" not in again.stdout
    shutil.rmtree(tmp_path / "cache")  # (250 GB for ImageNet) is not prepared again to print the table
    again = run_cli("--table", 5, *common, script="probe.py")
    assert "epoch 1" not in again.stdout and "preparing" not in again.stderr and not (tmp_path / "cache").exists()
    moved = [f"{tmp_path}/./model.pt" if f == tmp_path / "model.pt" else f for f in common]  # the same file
    assert "epoch 1" not in run_cli("--table", 5, *moved, script="probe.py").stdout
    proc = run_cli("--table", 5, *common, "--image-size", 240, script="probe.py", check=False)  # other pixels
    assert_one_line_error(proc, "other settings", "image_size 256 there, 240 here")
    # The same path, other weights (the RotNet trained anew): the probes are not reused.
    torch.save(dict(model=alexnet.AlexNet(width=0.125).state_dict(), model_config=net.config), tmp_path / "model.pt")
    proc = run_cli("--table", 5, *common, script="probe.py", check=False)
    assert_one_line_error(proc, "made with other settings", "checkpoint_hash", "(--checkpoint holds other weights")
    save_nin(tmp_path / "nin.pt")  # a CIFAR RotNet: nothing for these tables
    common[common.index(tmp_path / "model.pt")] = tmp_path / "nin.pt"
    proc = run_cli("--table", 4, *common, script="probe.py", check=False)
    assert_one_line_error(proc, "nin.pt", "not an AlexNet")


def test_the_benchmark_runs_the_alexnet_step():
    proc = run_cli("--benchmark", "--arch", "alexnet", "--steps", 2, "--width", 0.125, "--batch-size", 4,
                   "--device", "cpu")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["arch"] == "alexnet" and result["images_per_s"] > 0 and result["minutes_per_epoch"] > 0
