"""probe.py: the classifiers on NIN features, one probe end to end (on this project's model
and on an original-format checkpoint), and whole tables at a tiny scale. CPU only, tiny
models, data written by the tests.
"""
import json
import os
import re

import pytest
import torch

import probe
import runs
import tables
import train
from conftest import (REPO, RunsCode, assert_one_line_error, free_port, metrics_of, run_cli, save_nin, to_original_names,
                      write_cifar)
from errors import UserError
from models import NETWORKS
from nin import NIN

FEATURES = {1: (96, 16, 16), 2: (192, 8, 8), 3: (192, 8, 8), 4: (192, 8, 8)}


def run_probe(*args, check=True):
    return run_cli(*args, check=check, timeout=600, script="probe.py")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar(folder, 40, 60)
    return folder


def expected_parameters(kind, C, H, W, classes=10):
    D = C * H * W
    if kind == "linear":
        return D * classes + classes
    if kind == "nonlinear":
        return D * 200 + 2 * 200 + 200 * 200 + 2 * 200 + 200 * classes + classes
    return 9 * C * 192 + 2 * 192 * 192 + 3 * 2 * 192 + 192 * classes + classes  # conv


@pytest.mark.parametrize("kind", ["linear", "nonlinear", "conv"])
@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_classifier_shapes_and_parameter_counts(kind, block):
    extractor = NIN(4, 4, 1.0)
    assert probe.feature_shape(extractor, block) == FEATURES[block]
    classifier = probe.make_classifier(kind, FEATURES[block])
    assert sum(p.numel() for p in classifier.parameters()) == expected_parameters(kind, *FEATURES[block])
    model = probe.Probe(extractor, block, classifier).eval()
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def test_linear_layers_use_the_original_initialisation():
    torch.manual_seed(0)
    classifier = probe.make_classifier("nonlinear", (192, 8, 8))
    first, last = classifier[1], classifier[-1]
    assert abs(first.weight.std().item() - (2 / 200) ** 0.5) < 0.01
    assert abs(last.weight.std().item() - (2 / 10) ** 0.5) < 0.05
    assert torch.equal(last.bias, torch.zeros(10))
    conv = probe.make_classifier("conv", (192, 8, 8), num_classes=10)
    assert abs(conv[-1].weight.std().item() - (2 / 10) ** 0.5) < 0.05 and torch.equal(conv[-1].bias, torch.zeros(10))


@pytest.mark.parametrize("width", [0.25, 1.0])
def test_the_conv_classifier_is_the_supervised_nins_block_3_at_any_width(width):
    # "Supervised NIN and RotNet + conv have exactly the same architecture" (the paper's Table 3)
    extractor, supervised = NIN(4, 4, width), NIN(3, 10, width)
    head = probe.make_classifier("conv", probe.feature_shape(extractor, 2), 10, width=width)
    shapes = lambda modules: [tuple(p.shape) for m in modules for p in m.parameters()]
    assert shapes([head]) == shapes([supervised.blocks[2], supervised.head])


def test_a_frozen_extractor_stays_in_eval_mode_and_gets_no_gradients():
    extractor = NIN(4, 4, 0.125)
    model = probe.Probe(extractor, 2, probe.make_classifier("conv", probe.feature_shape(extractor, 2))).train()
    assert not extractor.training and model.classifier.training
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in extractor.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    tuned = probe.Probe(extractor, 2, probe.make_classifier("conv", (24, 8, 8)), finetune=True).train()
    assert extractor.training
    tuned(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in extractor.blocks[:2].parameters())
    # blocks 3, 4 and the head are unused: not trained (the optimizer and DDP see only the rest)
    assert not any(p.requires_grad for p in [*extractor.blocks[2:].parameters(), *extractor.head.parameters()])


def test_a_probe_writes_every_file(cifar_dir, tmp_path):
    save_nin(tmp_path / "model.pt", blocks=3, width=0.125)
    out = tmp_path / "probe"
    # --width and --blocks are for a NIN made here: a checkpoint's network keeps its own
    proc = run_probe("--checkpoint", tmp_path / "model.pt", "--block", 2, "--classifier", "nonlinear", "--data",
                     cifar_dir, "--epochs", 2, "--device", "cpu", "--out", out, "--batch-size", 32, "--width", 0.5,
                     "--blocks", 5)
    assert f"{out}: 200 training and 60 test images of 32 x 32 from {cifar_dir}; 7 steps an epoch, epochs 1 to 2, " \
        "on cpu\n" \
        in proc.stderr
    assert sorted(os.listdir(out)) == ["checkpoint.prev.pt", "checkpoint.pt", "config.json", "metrics.jsonl",
                                       "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["block"] == 2 and results["classifier"] == "nonlinear"
    assert results["checkpoint"] == str(tmp_path / "model.pt") and 0 <= results["test_acc"] <= 100
    assert [m["epoch"] for m in metrics_of(out)] == [1, 2]
    assert {"epoch", "lr", "train_loss", "train_acc", "test_acc"} <= set(metrics_of(out)[0])
    config = json.loads((out / "config.json").read_text())  # what was probed, and how it ran
    assert (config["width"], config["blocks"], config["amp"], config["device"]) == (0.125, 3, False, "cpu")


@pytest.mark.parametrize("classifier", ["conv", "linear"])
def test_probing_an_original_format_checkpoint(cifar_dir, tmp_path, classifier):
    model = save_nin(tmp_path / "ours.pt", blocks=3)
    original = dict(epoch=200, network=to_original_names(model.state_dict(), 3))
    torch.save(original, tmp_path / "original.pth")
    out = tmp_path / "probe"
    run_probe("--checkpoint", tmp_path / "original.pth", "--block", 3, "--classifier", classifier,
              "--data", cifar_dir, "--epochs", 1, "--device", "cpu", "--out", out, "--batch-size", 32, "--finetune")
    assert json.loads((out / "results.json").read_text())["finetune"] is True


def test_bad_arguments(cifar_dir, tmp_path):
    proc = run_probe("--data", cifar_dir, "--device", "cpu", check=False)
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr
    save_nin(tmp_path / "model.pt", blocks=3)
    proc = run_probe("--checkpoint", tmp_path / "model.pt", "--block", 4, "--data", cifar_dir, "--device", "cpu",
                     "--out", tmp_path / "o", check=False)
    assert_one_line_error(proc, "--block 4")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = run_probe("--checkpoint", tmp_path / "junk.pt", "--data", cifar_dir, "--device", "cpu",
                     "--out", tmp_path / "o", check=False)
    assert_one_line_error(proc, "junk.pt")
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "model_config": {}}, tmp_path / "hostile.pt")
    proc = run_probe("--checkpoint", tmp_path / "hostile.pt", "--data", cifar_dir, "--device", "cpu",
                     "--out", tmp_path / "o", check=False)
    assert_one_line_error(proc, "hostile.pt", "refused")
    assert not marker.exists() and not (tmp_path / "o").exists()
    proc = run_probe("--init", "random", "--blocks", 3, "--block", 4, "--data", cifar_dir, "--device", "cpu",
                     "--out", tmp_path / "o", check=False)  # a random NIN of 3 blocks has no block 4
    assert_one_line_error(proc, "--block 4", "1 to 3")


@pytest.mark.parametrize("flags, named", [
    (["--supervised"], "--supervised trains from random weights"),
    (["--init", "random"], "--init random trains from random weights"),
    (["--table", "3"], "Table 3 pretrains its own RotNets"),
])
def test_a_checkpoint_that_would_not_be_used_is_refused(cifar_dir, tmp_path, flags, named):
    save_nin(tmp_path / "model.pt")
    proc = run_probe("--checkpoint", tmp_path / "model.pt", *flags, "--data", cifar_dir, "--device", "cpu",
                     "--out", tmp_path / "o", check=False)
    assert_one_line_error(proc, named)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, named", [
    (["--finetune"], "--finetune: Table 3"), (["--classifier", "conv"], "--classifier: Table 3"),
    (["--block", "3"], "--block: Table 3"), (["--init", "random"], "--init: Table 3"),
    (["--supervised", "--blocks", "5"], "--blocks, --supervised: Table 3"),
])
def test_a_table_refuses_what_its_probes_set_themselves(cifar_dir, tmp_path, flags, named):
    # passed on to every probe, they would retrain its rows as other probes under the paper's labels
    proc = run_probe("--table", 3, *flags, "--data", cifar_dir, "--device", "cpu", "--out", tmp_path / "o",
                     "--epochs-scale", 0.005, "--width", 0.125, check=False)
    assert_one_line_error(proc, named, "leave")
    assert not (tmp_path / "o").exists()


def test_a_tables_rotnet_is_reused_only_at_its_batch_size(cifar_dir, tmp_path):
    # --batch-size reaches a table's RotNets too (rotnet_for): one made at another is not reused
    s = probe.Probing(data=cifar_dir, out=str(tmp_path), epochs_scale=0.005, width=0.125, device="cpu",
                      batch_size=64)
    _, rows, nets = tables.table3(s)
    made_on = s.data_identity(train.Context("cpu"), labels_for="a probe")
    os.makedirs(nets[0].out)
    with open(os.path.join(nets[0].out, "config.json"), "w") as f:
        json.dump(dict(epochs=nets[0].epochs, width=0.125, seed=0, batch_size=128, networks=NETWORKS, **made_on), f)
    with pytest.raises(UserError, match="rotnet_4blocks.* other settings \\(batch_size 128 there, 64 here\\)"):
        tables.run_plan(nets, [p for _, probes, _ in rows for p in probes])


def test_a_run_is_reused_only_where_its_record_matches(tmp_path):
    # a run of an older version, whose networks started otherwise (no record of it): not reused
    (tmp_path / "config.json").write_text(json.dumps(dict(epochs=3, seed=0, checkpoint_hash="ab12")))
    with pytest.raises(UserError, match=r"other settings \(networks \(unrecorded: an older version\) there, "
                                        r"original-init here\)"):
        runs.check_reusable(str(tmp_path), epochs=3, seed=0, checkpoint_hash="ab12")
    record = lambda **saved: (tmp_path / "config.json").write_text(json.dumps(dict(saved, networks=NETWORKS)))
    record(epochs=3, seed=0, checkpoint_hash="ab12", data_fingerprint="cd34")
    runs.check_reusable(str(tmp_path), epochs=3, seed=0, checkpoint_hash="ab12", data_fingerprint="cd34")
    with pytest.raises(UserError, match="other settings \\(epochs 3 there, 4 here\\)"):
        runs.check_reusable(str(tmp_path), epochs=4, seed=0, checkpoint_hash="ab12")
    record(epochs=3, checkpoint_hash="ef56", data_fingerprint="cd34")
    with pytest.raises(UserError, match=r"checkpoint_hash ef56 there, ab12 here \(--checkpoint holds other weights"):
        runs.check_reusable(str(tmp_path), epochs=3, checkpoint_hash="ab12")
    record(epochs=3)  # (no hash recorded: said so, not that the weights differ)
    with pytest.raises(UserError, match=r"checkpoint_hash \(unrecorded: an older version\) there, ab12 here\)"):
        runs.check_reusable(str(tmp_path), epochs=3, checkpoint_hash="ab12")
    with pytest.raises(UserError, match="made on other images"):
        runs.check_reusable(str(tmp_path), epochs=3, data_fingerprint="0000")
    # The weights decide, however the checkpoint's path is written.
    record(checkpoint="a/model.pt", checkpoint_hash="ef56")
    runs.check_reusable(str(tmp_path), checkpoint="./a/model.pt", checkpoint_hash="ef56")
    with pytest.raises(UserError, match="checkpoint_hash ef56 there, 0000 here"):
        runs.check_reusable(str(tmp_path), checkpoint="a/model.pt", checkpoint_hash="0000")
    # and so on --resume (restore's changed_settings), by the path where no weights are recorded
    changed = lambda **here: set(runs.changed_settings(str(tmp_path), here))
    (tmp_path / "config.json").write_text(json.dumps(dict(checkpoint="a/model.pt")))
    assert changed(checkpoint="b.pt", checkpoint_hash="ef56") == {"checkpoint"}
    (tmp_path / "config.json").write_text(json.dumps(dict(checkpoint="a/model.pt", checkpoint_hash="ef56")))
    assert changed(checkpoint="b.pt", checkpoint_hash="ef56") == set()
    assert changed(checkpoint="a/model.pt", checkpoint_hash="0000") == {"checkpoint_hash"}


def test_the_best_epoch_is_given_beside_the_last_as_the_papers_figures_are(tmp_path):
    lines = [dict(epoch=1, test_acc=30.0), dict(epoch=2, test_acc=45.5), dict(epoch=3, test_acc=None),
             dict(epoch=4, test_acc=45.5), dict(epoch=5, test_acc=40.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert probe.best_epoch(str(tmp_path)) == (45.5, 2)  # the first of equals; untested epochs skipped
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, test_acc=[1.0, 2.0])) + "\n")
    assert probe.best_epoch(str(tmp_path)) is None  # several heads: no one best
    text = tables.format_table(3, ["accuracy"], [("RotNet + conv", [40.0], [91.16], [45.5])], "data")
    assert "| RotNet + conv | 40.00 / 45.50 (91.16) |" in text and "last epoch / the best epoch" in text
    text = tables.format_table(5, ["conv1"], [("RotNet", [18.0], [18.8], None)], "data")
    assert "| RotNet | 18.00 (18.80) |" in text and "best" not in text


@pytest.mark.parametrize("table", [1, 3])
def test_a_whole_table_at_a_tiny_scale(cifar_dir, tmp_path, table):
    # One pretraining epoch per RotNet and one epoch per probe: the plumbing, not the numbers.
    # --data relative (to the repository, where run_probe runs): table.json records it absolute.
    data_dir = os.path.relpath(cifar_dir, REPO)
    flags = ["--table", table, "--data", data_dir, "--out", tmp_path, "--epochs-scale", 0.005, "--width", 0.125,
             "--device", "cpu", "--batch-size", 32]
    first = run_probe(*flags)
    paper = {1: ["85.45", "89.76", "50.37"], 3: ["92.80", "72.50", "92.17"]}[table]
    assert all(f"({p})" in first.stdout for p in paper), first.stdout
    saved = json.loads((tmp_path / f"table{table}.json").read_text())
    assert len(saved["rows"]) == {1: 3, 3: 6}[table] and saved["data"] == str(cifar_dir)
    assert all(0 <= acc <= 100 for row in saved["rows"] for acc in row["ours"])
    # Each probe's best epoch, but the supervised NIN's, whose last the original keeps
    assert all(row["best"] == row["ours"] for row in saved["rows"] if row["name"] != "Supervised NIN")
    assert all("best" not in row for row in saved["rows"] if row["name"] == "Supervised NIN")
    assert table == 1 or re.search(r"\| Supervised NIN \| \d+\.\d\d \(92\.80\) \|", first.stdout)
    assert (tmp_path / f"table{table}.md").read_text().strip() in first.stdout
    # A second call reuses every finished run: no training, the same table.
    again = run_probe(*flags)
    assert "epoch 1" not in again.stdout and json.loads((tmp_path / f"table{table}.json").read_text()) == saved
    # nor with --out written otherwise (the RotNets' paths recorded in the probes differ), nor
    # with an --image-size CIFAR does not use
    again = run_probe(*[f"{tmp_path}/." if f == tmp_path else f for f in flags], "--image-size", 32)
    assert "epoch 1" not in again.stdout
    # Nor are the RotNets needed once their probes are finished: they may be deleted.
    for model in tmp_path.glob("rotnet_*/model.pt"):
        model.unlink()
    again = run_probe(*flags)
    assert "epoch 1" not in again.stdout and json.loads((tmp_path / f"table{table}.json").read_text()) == saved
    assert not list(tmp_path.glob("rotnet_*/model.pt"))
    # Runs made at another scale are not silently taken for this one.
    other = run_probe(*[0.01 if f == 0.005 else f for f in flags], check=False)
    assert_one_line_error(other, "other settings", "epochs", "give the table another --out, or delete that folder")
    other = run_probe(*flags, "--lr", 0.5, check=False)  # nor at another learning rate
    assert_one_line_error(other, "other settings", "lr")
    # Nor on other images: another sample, or the folder changed since (its labels differ here).
    write_cifar(tmp_path / "other_data", 40, 60, seed=1)
    other = run_probe(*[tmp_path / "other_data" if f == data_dir else f for f in flags], check=False)
    assert_one_line_error(other, "rotnet_", "made on other images")
    # A results.json damaged (by hand, or a disk) stops the table before anything trains.
    damaged = next(tmp_path.glob("*/results.json"))
    damaged.write_text('{"test_acc": ')
    proc = run_probe(*flags, check=False)
    assert_one_line_error(proc, str(damaged), "damaged")


def test_a_table_on_two_cpu_ranks(cifar_dir, tmp_path):
    # Under torchrun every rank reads what rank 0 writes (the RotNet's model.pt, each probe's
    # results.json) and the fine-tuned rows train only the blocks they run (DDP stops at a
    # parameter with no gradient); rank 0 alone writes and prints the table.
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = run_cli("--table", 3, "--data", cifar_dir, "--out", tmp_path, "--epochs-scale", 0.005, "--width", 0.125,
                   "--device", "cpu", "--batch-size", 32, launcher=launcher, timeout=600, script="probe.py")
    saved = json.loads((tmp_path / "table3.json").read_text())
    assert len(saved["rows"]) == 6 and proc.stdout.count("| Table 3 |") == 1
    assert json.loads((tmp_path / "supervised_nin" / "config.json").read_text())["world_size"] == 2


def test_too_few_steps_for_the_batchnorm_a_probe_trains_is_said(capsys):
    # Its test accuracy would say little; a linear probe on frozen features trains no BatchNorm
    ctx, net = train.Context("cpu"), NIN(3, 4, 0.125)
    for classifier, finetune, said in (("linear", False, False), ("linear", True, True), ("nonlinear", False, True)):
        head = probe.make_classifier(classifier, probe.feature_shape(net, 1), 10, 0.125)
        train.say_if_too_few_steps(ctx, probe.Probe(net, 1, head, finetune), steps=2, epochs=14)
        err = capsys.readouterr().err
        assert ("note: 2 steps an epoch, 28 in all: too few for BatchNorm's running statistics" in err) == said, err
    train.say_if_too_few_steps(ctx, net, steps=2, epochs=15)  # 30: settled
    train.say_if_too_few_steps(ctx, net, steps=2, epochs=3, first=4)  # a finished run resumed: nothing to train
    assert capsys.readouterr().err == ""
