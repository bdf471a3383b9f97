"""rotnet.py end to end: a short run and its files, other rotation sets, snapshots, kill and
--resume (also from a damaged checkpoint), two CPU ranks, --benchmark (with the DataLoader
baseline, baseline.py, checked against the reference op, and --sweep), bad flags, and direct
calls of pretrain() validated as the command line is.

Everything runs on the CPU with tiny models (--width 0.125) on a few hundred images that
the tests write themselves in CIFAR-10's python format.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import baseline
import benchmark
import cifar
import cli
import data
import models
import nin
import rot_kernel
import rotnet
import runs
import train
from errors import UserError
from conftest import (REPO, assert_one_line_error, cli_command, cli_env, free_port, metrics_of, run_cli,
                      tiny_run_flags, write_cifar)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """300 training and 100 test images in --data layout, shared by the command-line runs
    (which only read it)."""
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar(folder, 60, 100)
    return folder


def test_cli_short_run_writes_its_files(cifar_dir, tmp_path):
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2"))
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    assert config["torch"] == torch.__version__
    assert config["rot_kernel"] == rot_kernel.backend()
    assert config["device"] == "cpu"
    # the machine, whose instruction set and thread count can decide the last bits of a figure
    assert config["threads"] == 1  # run_cli's OMP_NUM_THREADS
    assert config["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "device_name" in config
    metrics = metrics_of(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(m) == {"epoch", "lr", "train_loss", "train_acc", "test_acc", "seconds", "images_per_s"}
        assert 0 <= m["test_acc"] <= 100 and m["train_loss"] > 0 and m["images_per_s"] > 0
    for name in ("model.pt", "checkpoint.pt"):
        model = models.load_model(out / name)
        assert isinstance(model, nin.NIN) and not model.training
        assert model.config == dict(blocks=4, num_classes=4, width=0.125)
        with torch.no_grad():
            assert tuple(model(torch.randn(3, 3, 32, 32)).shape) == (3, 4)
    saved = torch.load(out / "model.pt", weights_only=True)["model"]
    for key, value in models.load_model(out / "model.pt").state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("rotations", ["0,180", ",".join(str(r) for r in range(0, 360, 45))])
def test_cli_other_rotation_sets(cifar_dir, tmp_path, rotations):
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1", "--rotations", rotations))
    assert len(metrics_of(out)) == 1
    model = models.load_model(out / "model.pt")
    assert model.head.out_features == len(rotations.split(","))
    assert torch.load(out / "model.pt", weights_only=True)["rotations"] == [int(r) for r in rotations.split(",")]


def test_cli_save_every_keeps_tested_snapshots(cifar_dir, tmp_path):
    # The snapshots of Figure 5(a) carry their rotation accuracy, also on epochs that
    # --eval-every skips.
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--save-every", "1", "--eval-every", "2"))
    assert [m["test_acc"] is None for m in metrics_of(out)] == [True, False]
    for epoch in (1, 2):
        saved = torch.load(out / f"model_epoch{epoch:03d}.pt", weights_only=True)
        assert saved["metrics"]["epoch"] == epoch and 0 <= saved["metrics"]["test_acc"] <= 100
        models.load_model(out / f"model_epoch{epoch:03d}.pt")


def test_cli_resume_after_kill_equals_an_uninterrupted_run(cifar_dir, tmp_path):
    flags = lambda out: tiny_run_flags(cifar_dir, out, "--epochs", "4", "--eval-every", "1", "--seed", "3")
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
    assert f"resuming {out_b} after epoch {done}\n" in resumed.stderr
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
    again = run_cli(*flags(out_b), "--resume")  # finished: said so, nothing trained
    assert f"resuming {out_b} after epoch 4: it was finished; nothing is trained" in again.stderr
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith("epoch ")]
    assert torch.equal(torch.load(out_b / "model.pt", weights_only=True)["model"][key], state_b[key])


def test_a_run_stopped_while_saving_a_snapshot_redoes_that_epoch_and_its_snapshot(cifar_dir, tmp_path, monkeypatch):
    settings = lambda out: rotnet.Pretraining(data=str(cifar_dir), out=str(out), width=0.125, device="cpu",
                                              batch_size=32, epochs=2, save_every=1, resume=True)
    rotnet.pretrain(settings(tmp_path / "a"))
    real_save = rotnet.atomic_save

    def killed_while_saving(obj, path, **kw):  # the process ends mid-write: a .tmp, no file
        if path.endswith("model_epoch002.pt"):
            open(path + ".tmp", "wb").write(b"PK")
            raise KeyboardInterrupt
        real_save(obj, path, **kw)

    monkeypatch.setattr(rotnet, "atomic_save", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        rotnet.pretrain(settings(tmp_path / "b"))
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    rotnet.pretrain(settings(tmp_path / "b"))  # --resume
    for name in ("model_epoch001.pt", "model_epoch002.pt", "model.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True) for run in ("a", "b"))
        assert a["metrics"]["epoch"] == b["metrics"]["epoch"] and a["metrics"]["test_acc"] == b["metrics"]["test_acc"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]


@pytest.mark.parametrize("ranks", [1, 2])
def test_cli_cpu_ranks_with_torchrun(cifar_dir, tmp_path, ranks):
    # One process under torchrun is a rank too (process group, DDP): what a one-GPU machine can try.
    out = tmp_path / "out"
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"), launcher=launcher)
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt"]
    assert len(metrics_of(out)) == 1
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["distributed"]) == (ranks, True)
    assert sum(ln.startswith("epoch ") for ln in proc.stdout.splitlines()) == 1  # rank 0 alone reports
    models.load_model(out / "model.pt")
    # A problem every rank finds (here: --out holds a finished run) is said once, by rank 0.
    again = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"), launcher=launcher, check=False)
    errors = [ln for ln in again.stderr.splitlines() if "error:" in ln]
    assert again.returncode != 0 and len(errors) == 1 and "finished run" in errors[0], again.stderr


@pytest.mark.parametrize("n, world", [(2, 3), (1001, 2), (1502, 3), (7, 1)])
def test_evaluation_tests_every_image_once_in_as_many_passes_on_every_rank(n, world):
    shares = [list(train.batches(n, train.EVAL_BATCH * world, rank, world, least=0)) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1  # DDP's forward may be a collective
    assert sorted(i for share in shares for s in share for i in range(s.start, s.stop)) == list(range(n))


def test_every_rank_evaluates_even_with_fewer_test_images_than_ranks():
    # 2 test images on 3 ranks: each rank makes one pass, one of them of no image at all.
    images = data.Resident(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    net, passes = nin.NIN(3, 4, 0.125), []
    net.register_forward_hook(lambda module, args, out: passes[-1].append(len(args[0])))
    for rank in range(3):
        ctx = train.Context("cpu")
        ctx.rank, ctx.world = rank, 3  # (not distributed: ctx.sum adds this rank's counts alone)
        passes.append([])
        train.evaluate(ctx, net, images, recipe=data.Recipe(), mean=cifar.MEAN, std=cifar.STD, rotations=rotnet.FOUR)
    assert [len(p) for p in passes] == [1, 1, 1] and sum(map(sum, passes)) == 2 * 4, passes


def test_top1_and_top5_of_every_head_come_from_one_pass():
    # Two heads' fixed logits for 50 images: an image counts in top-k when fewer than k classes
    # score above its label (no ties in randn), counted here without topk.
    n, classes = 50, 10
    logits, targets = torch.randn(2, n, classes), torch.randint(0, classes, (n,))
    above = (logits > logits.gather(-1, targets.expand(2, n)[..., None])).sum(-1)
    passes = []

    class Fixed(torch.nn.Module):
        def forward(self, x):
            passes.append(len(x))
            return logits[:, :len(x)]

    views = dict(recipe=data.Recipe(), mean=cifar.MEAN, std=cifar.STD)
    images = data.Resident(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8))
    top1, top5 = train.evaluate(train.Context("cpu"), Fixed(), images, targets, k=(1, 5), **views)
    assert passes == [n]
    assert top1 == pytest.approx((100 * (above < 1).sum(-1) / n).tolist())
    assert top5 == pytest.approx((100 * (above < 5).sum(-1) / n).tolist())
    assert top5 != top1 and train.evaluate(train.Context("cpu"), Fixed(), images, targets, k=5, **views) == top5


def test_an_epoch_of_no_step_is_refused_before_the_run_writes_anything(tmp_path):
    # One training image makes no step (BatchNorm needs 2): refused before config.json, which
    # would make the corrected command refuse the folder as made with other settings.
    os.makedirs(tmp_path / "data")
    for i in range(2):  # a flat folder of two images: one held out for testing, one to train on
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / "data" / f"{i}.png")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no step of at least 2 images"):
        rotnet.pretrain(rotnet.Pretraining(data=str(tmp_path / "data"), out=str(out), width=0.125, device="cpu",
                                           epochs=1, image_size=32, cache=str(tmp_path / "cache"), val_fraction=0.5))
    assert not out.exists()


def test_a_problem_under_torchrun_is_said_once_without_rank_tracebacks(tmp_path):
    # Rank 0 refuses the data; rank 1, waiting for it, must not bury that line under a trace.
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = run_cli(*tiny_run_flags(tmp_path / "no-data", tmp_path / "out", "--epochs", "1"), launcher=launcher,
                   check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors[0].startswith(f"error: {tmp_path / 'no-data'}: no such folder"), proc.stderr
    # (unless torchrun, seeing rank 0 end, stops rank 1 first)
    assert errors[1:] in ([], ["error: rank 1 stopped because another rank did (its error says why)"]), proc.stderr
    assert "[rank1]: Traceback" not in proc.stderr and "[rank0]: Traceback" not in proc.stderr, proc.stderr


def test_cli_benchmark_prints_its_json(tmp_path):
    proc = run_cli("--benchmark", "--steps", "2", "--width", "0.125", "--device", "cpu", "--batch-size", "16")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "minutes_per_100_epochs", "batch_building_share"):
        assert result[key] > 0, key
    assert result["device"] == "cpu" and result["threads"] == 1


# ----------------------------------------------------------------------------- the benchmark's baseline and sweep
def test_baseline_views_equal_the_reference():
    # The DataLoader baseline builds, image by image, exactly the batch rotation_batch
    # defines, for the same crops and flips (the extreme shifts included).
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    index = torch.tensor([3, 0, 9, 3, 7, 1])
    shifts = torch.tensor([[-4, -4], [4, 4], [-4, 4], [0, 0], [2, -3], [-1, 1]])
    flips = torch.tensor([True, False, True, False, True, False])
    views = [baseline.rotated_views(images[i], dy, dx, f, rotations=rotnet.FOUR, mean=cifar.MEAN, std=cifar.STD)
             for i, (dy, dx), f in zip(index.tolist(), shifts.tolist(), flips.tolist())]
    got = torch.stack(views).flatten(0, 1)  # as the loader collates and to_device flattens
    want, labels = rot_kernel.reference.rotation_batch(images, index, shifts, flips, mean=cifar.MEAN, std=cifar.STD,
                                                       rotations=rotnet.FOUR)
    assert got.dtype == torch.float32 and got.shape == (24, 3, 32, 32)
    torch.testing.assert_close(got, want)
    assert torch.equal(labels, torch.arange(4).repeat(6))


def test_baseline_loader_batches_are_rotated_views_of_the_images():
    # A batch from the loader itself (a worker process, collation, to_device): each image's
    # four outputs are rotated_views of one source image at one of the 9 x 9 x 2 crops.
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    kw = dict(rotations=rotnet.FOUR, mean=cifar.MEAN, std=cifar.STD)
    ctx = train.Context("cpu")
    batches = iter(baseline.loader(images, batch_size=4, draws=8, workers=1, pin_memory=False, seed=0, **kw))
    x, y = baseline.to_device(ctx, *next(batches))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, torch.arange(4).repeat(4))
    candidates = [baseline.rotated_views(image, dy, dx, f, **kw) for image in images
                  for dy in range(-4, 5) for dx in range(-4, 5) for f in (False, True)]
    for b in range(4):
        assert any(torch.equal(x[4 * b:4 * b + 4], c) for c in candidates), b


def test_cli_benchmark_with_baseline_prints_both_speeds():
    proc = run_cli("--benchmark", "--baseline", "--steps", "2", "--width", "0.125", "--device", "cpu",
                   "--batch-size", "8", "--workers", "1")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["images_per_s"] > 0 and result["baseline_images_per_s"] > 0 and result["baseline_workers"] == 1
    assert result["speedup_vs_dataloader"] == pytest.approx(result["images_per_s"] / result["baseline_images_per_s"],
                                                            rel=0.02)


def test_the_per_step_index_check_is_off_unless_asked_for(monkeypatch):
    # Training's batches skip the op's index check (on CUDA a host sync per step; the CPU
    # kernel checks regardless); the sweep's "index checked" variant asks for it.
    asked = []
    op = rot_kernel.rotation_batch
    monkeypatch.setattr(rot_kernel, "rotation_batch", lambda *a, **kw: asked.append(kw["check_bounds"]) or op(*a, **kw))
    images, index = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 3])
    for check_bounds in (False, True):
        ctx = train.Context("cpu", **({"check_bounds": True} if check_bounds else {}))
        batch, _ = ctx.batch(images, index, rotations=rotnet.FOUR, mean=cifar.MEAN, std=cifar.STD)
        assert batch.shape == (8, 3, 8, 8)
    assert asked == [False, True]
    assert [v.name for v in benchmark.SWEEP if v.check_bounds] == ["eager, index checked each step"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_training_and_testing_wait_for_the_gpu_once_an_epoch_not_every_step(monkeypatch):
    # No host sync per step: the CPU queues steps ahead of the GPU. torch's sync debug mode
    # warns at every synchronizing call: an epoch (or a test pass) of twice the steps makes no
    # more of them. The sums read at the end make some: at least one, or the count shows nothing.
    monkeypatch.setattr(train, "EVAL_BATCH", 8)
    ctx = train.Context("cuda")
    pixels = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = dict(recipe=rotnet.ARCHS["nin"].recipe, mean=cifar.MEAN, std=cifar.STD, rotations=rotnet.FOUR)
    torch.manual_seed(0)
    net = ctx.prepare(nin.NIN(blocks=3, num_classes=4, width=0.125))
    opt, _ = train.make_optimizer(net.parameters(), lr=0.1, epochs=1)

    def syncs(run):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in said)

    images = data.on_device(pixels, ctx.device, stream=False)
    epoch = lambda steps: train.train_epoch(ctx, net, opt, images, epoch=1, seed=0, batch_size=8,
                                            epoch_size=8 * steps, **views)
    epoch(2)  # first: cuDNN's choice of algorithms
    few, many = syncs(lambda: epoch(3)), syncs(lambda: epoch(6))
    assert few >= 1 and many == few, (few, many)
    tests = [data.on_device(pixels[:n], ctx.device, stream=False) for n in (24, 48)]
    train.evaluate(ctx, net, tests[0], **views)  # first (its own algorithms: no backward pass)
    few, many = (syncs(lambda: train.evaluate(ctx, net, split, **views)) for split in tests)
    assert few >= 1 and many == few, (few, many)


def test_cli_sweep_writes_a_row_for_every_variant(tmp_path):
    path = tmp_path / "sweep.json"
    proc = run_cli("--benchmark", "--sweep", "--steps", "2", "--width", "0.125", "--device", "cpu",
                   "--batch-size", "8", "--workers", "1", "--json", path)
    summary = json.loads(path.read_text())
    rows = summary["rows"]
    assert [r["variant"] for r in rows] == [v.name for v in benchmark.SWEEP]
    for row, variant in zip(rows, benchmark.SWEEP):
        if variant.cuda_only:  # on the CPU: skipped, saying why
            assert row["status"] == "skipped" and row["reason"] == variant.cuda_only
        else:
            assert row["status"] == "ok", row
            assert row["images_per_s"] > 0 and row["minutes_per_100_epochs"] > 0 and row["ratio"] > 0
    assert rows[0]["ratio"] == 1.0
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    loader = rows[[r["variant"] for r in rows].index("dataloader")]
    assert loader["workers"] == 1
    assert summary["speedup_vs_dataloader"] == pytest.approx(rows[0]["images_per_s"] / loader["images_per_s"],
                                                             rel=0.02)
    # The table comes last: a header, then one line per variant, in order.
    table = proc.stdout.strip().splitlines()[-len(rows) - 1:]
    assert table[0].startswith("variant")
    assert [ln.startswith(r["variant"]) for ln, r in zip(table[1:], rows)] == [True] * len(rows)


def test_sweep_records_a_failing_variant_and_goes_on(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    variants = (benchmark.Variant("eager"), benchmark.Variant("broken", compile="no-such-mode"),
                benchmark.Variant("eager fused SGD", fused_sgd=True))
    with pytest.raises(UserError, match=r"^1 of the sweep's 3 variants failed \(broken\): their rows above say why$"):
        benchmark.sweep(rotnet.Pretraining(device="cpu", width=0.125, batch_size=8), steps=1, variants=variants,
                        workers=1, json_path=str(path))  # (after the table: an exit status that says so)
    rows = json.loads(path.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[-3:]] == ["eager", "broken", "eager"]
    assert rows[1]["error"].startswith("RuntimeError: ") and "no-such-mode" in rows[1]["error"]
    assert "\n" not in rows[1]["error"]


@pytest.mark.parametrize("settings, named", [(dict(arch="alexnet"), "AlexNet"),
                                             (dict(rotations=(0, 45, 90)), "quarter turns")])
def test_baseline_refuses_what_it_cannot_do(settings, named):
    from errors import UserError
    with pytest.raises(UserError, match=f"--baseline: .*{named}"):
        benchmark.benchmark(rotnet.Pretraining(device="cpu", width=0.125, **settings), steps=1, dataloader=True)


def test_an_unwritable_json_path_stops_before_any_timing(tmp_path):
    from errors import UserError
    s = rotnet.Pretraining(device="cpu", width=0.125)
    for run in (benchmark.benchmark, benchmark.sweep):
        with pytest.raises(UserError, match="--json .*cannot write"):
            run(s, steps=1, json_path=str(tmp_path / "missing" / "result.json"))


def test_a_compiled_model_keeps_a_static_graph_for_full_batches(monkeypatch):
    # An epoch's last batch is smaller. Compiled by default, the model would recompile for
    # it with a symbolic batch size and run every later full batch through that dynamic
    # graph; Context compiles each batch size into a static graph of its own.
    graphs, ran = [], []

    def backend(gm, example_inputs):
        graphs.append(any(isinstance(n.meta.get("example_value"), torch.SymInt)
                          for n in gm.graph.nodes if n.op == "placeholder"))
        k = len(graphs) - 1
        return lambda *args: ran.append(k) or gm.forward(*args)

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=backend, **kw))
    model = train.Context("cpu", compile=True).prepare(torch.nn.Conv2d(3, 4, 3))
    for n in (8, 8, 5, 8):
        model(torch.randn(n, 3, 6, 6))
    assert graphs == [False, False] and ran == [0, 0, 1, 0]


def test_fused_sgd_steps_as_the_default_optimizer():
    # The sweep's fused variant computes the same update (to float rounding).
    torch.manual_seed(0)
    a = torch.randn(50, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    plain, _s1 = train.make_optimizer([a], 0.1, 10)
    fused, _s2 = train.make_optimizer([b], 0.1, 10, fused=True)
    assert plain.param_groups[0]["fused"] is None and fused.param_groups[0]["fused"] is True
    for _ in range(3):
        grad = torch.randn(50)
        for p, opt in ((a, plain), (b, fused)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("flags, named", [
    (["--sweep"], "--sweep"),
    (["--baseline"], "--baseline"),
    (["--json", "x.json"], "--json"),
    (["--benchmark", "--sweep", "--compile"], "--sweep"),
    (["--benchmark", "--sweep", "--no-amp"], "--sweep"),
    (["--benchmark", "--workers", "0"], "--workers"),
    (["--rotations", "0,30"], "--rotations"),
    (["--rotations", "0,90,90"], "--rotations"),
    (["--rotations", "0,ninety"], "--rotations"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--width", "0"], "--width"),
    (["--blocks", "6"], "--blocks"),
    (["--arch", "alexnet", "--blocks", "4"], "--blocks"),  # the NIN's: not silently ignored
])
def test_bad_flags_are_usage_errors(capsys, flags, named):
    with pytest.raises(SystemExit) as exit_:
        rotnet.parse_args(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and named in err.splitlines()[-1]



# ----------------------------------------------------------------------------- nothing lost, checked first
def test_resume_from_a_damaged_checkpoint_continues_from_the_previous_one(cifar_dir, tmp_path):
    flags = lambda out: tiny_run_flags(cifar_dir, out, "--epochs", "3", "--seed", "5")
    run_cli(*flags(tmp_path / "a"))
    run_cli(*flags(tmp_path / "b"))
    b = tmp_path / "b"
    assert torch.load(b / "checkpoint.prev.pt", weights_only=True)["epoch"] == 2  # the one before is kept
    raw = (b / "checkpoint.pt").read_bytes()
    (b / "checkpoint.pt").write_bytes(raw[: len(raw) // 3])  # cut short, as a full disk would leave it
    os.remove(b / "model.pt")
    resumed = run_cli(*flags(b), "--resume")
    warning = [ln for ln in resumed.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "checkpoint.pt" in warning[0] and "epoch 2" in warning[0], resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert [int(ln.split()[1]) for ln in resumed.stdout.splitlines() if ln.startswith("epoch ")] == [3]
    state_a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    state_b = torch.load(b / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert [m["epoch"] for m in metrics_of(b)] == [1, 2, 3]


def test_a_finished_run_is_not_overwritten_without_resume(cifar_dir, tmp_path):
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"))
    before = {name: (out / name).read_bytes() for name in ("model.pt", "checkpoint.pt", "metrics.jsonl")}
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"), check=False)  # the same command again
    message = assert_one_line_error(proc, str(out), "holds a finished run (model.pt)", "another --out")
    assert "--resume" not in message  # there is nothing to continue
    assert {name: (out / name).read_bytes() for name in before} == before
    probe = run_cli("--data", cifar_dir, "--checkpoint", out / "model.pt", "--block", "1", "--epochs", "1",
                    "--device", "cpu", "--out", out, script="probe.py", check=False)  # a probe into it
    assert_one_line_error(probe, str(out), "holds a finished run")
    os.remove(out / "model.pt")  # a run stopped before its end: it can be continued
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"), check=False)
    assert_one_line_error(proc, str(out), "holds a run already (checkpoint.pt)", "add --resume", "another --out")
    os.rename(out / "checkpoint.pt", out / "checkpoint.prev.pt")  # stopped between atomic_save's renames
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"), check=False)
    assert_one_line_error(proc, str(out), "holds a run already (checkpoint.prev.pt)", "add --resume")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="runs are locked where fcntl is (not Windows)")
def test_two_processes_never_train_into_one_folder(cifar_dir, tmp_path):
    # Another process holds out (as a run training into it does): a run, a probe, and a
    # table's probe (which claims its folder in train_classifier) each stop at once.
    import fcntl
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, tmp_path / "net", "--epochs", "1"))
    os.makedirs(out)
    held = os.open(out, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1", "--resume"), check=False)
        assert_one_line_error(proc, str(out), "in use", "another --out")
        probe = run_cli("--data", cifar_dir, "--checkpoint", tmp_path / "net" / "model.pt", "--block", "1",
                        "--epochs", "1", "--device", "cpu", "--out", out, script="probe.py", check=False)
        assert_one_line_error(probe, str(out), "in use")
        assert os.listdir(out) == []
    finally:
        os.close(held)
    # A run lets its folder go when it ends, however it ends (here: refused, then finished).
    with pytest.raises(UserError, match="holds a finished run"):
        rotnet.pretrain(rotnet.Pretraining(data=str(cifar_dir), out=str(tmp_path / "net"), width=0.125,
                                           epochs=1, device="cpu"))
    for folder in (tmp_path / "net", out):
        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
        os.close(fd)


def test_an_out_that_cannot_be_made_is_one_line_before_any_data_is_read(tmp_path):
    (tmp_path / "a-file").write_text("")
    for script, extra in (("rotnet.py", []), ("probe.py", ["--init", "random"])):
        proc = run_cli("--data", tmp_path / "no-data", "--out", tmp_path / "a-file" / "out", "--device", "cpu",
                       *extra, script=script, check=False)
        assert_one_line_error(proc, "--out", "a-file", "cannot create the folder")
    # A run stopped before it wrote anything leaves no folder behind.
    proc = run_cli("--data", tmp_path / "no-data", "--out", tmp_path / "new" / "out", "--device", "cpu", check=False)
    assert_one_line_error(proc, "no-data")
    assert os.listdir(tmp_path / "new") == []


def test_run_files_are_written_whole_or_not_at_all(cifar_dir, tmp_path, monkeypatch):
    # results.json marks a finished run (the tables reuse it), and a table refuses a run whose
    # config.json it cannot read: one stopped while writing either must leave the previous
    # file, or none, never half of one.
    path = str(tmp_path / "results.json")
    runs.write_json({"test_acc": 1.0}, path)
    class Stopped:  # a file that takes half the text written to it, then the process is stopped
        def __init__(self, *args):
            self.f = open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "open", Stopped, raising=False)  # the name runs.py's writes look up
    with pytest.raises(KeyboardInterrupt):
        runs.write_json({"test_acc": 2.0}, path)
    with pytest.raises(KeyboardInterrupt):  # a run stopped while it writes its config.json
        rotnet.pretrain(rotnet.Pretraining(data=str(cifar_dir), out=str(tmp_path / "run"), width=0.125, epochs=1,
                                           device="cpu"))
    monkeypatch.undo()
    assert json.loads(open(path).read()) == {"test_acc": 1.0}
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_resume_with_no_good_checkpoint_says_what_to_delete(cifar_dir, tmp_path):
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"))
    (out / "checkpoint.pt").write_bytes(b"\0" * 100)
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1", "--resume"), check=False)
    assert_one_line_error(proc, "checkpoint.pt", f"delete {out}")
    assert proc.returncode == 1


def test_resume_into_a_missing_folder_says_it_starts_from_the_beginning(cifar_dir, tmp_path):
    out = tmp_path / "mistyped"
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1", "--resume"))
    assert f"--resume: there is no {out}: starting from the beginning" in proc.stderr
    assert [m["epoch"] for m in metrics_of(out)] == [1]
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1", "--resume"))  # now it does
    assert "there is no" not in proc.stderr


def test_resume_refuses_a_checkpoint_that_carries_code(cifar_dir, tmp_path):
    from conftest import RunsCode
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"))
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "epoch": 1}, out / "checkpoint.pt")
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1", "--resume"), check=False)
    assert_one_line_error(proc, "checkpoint.pt", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("settings, named", [
    (dict(epochs=0), "epochs"), (dict(rotations=(0, 30)), "rotations"), (dict(batch_size=0), "--batch-size"),
    (dict(width=-1.0), "width"), (dict(width=0.001), "width"), (dict(blocks=6), "blocks"), (dict(device="tpu"), "device"),
])
def test_direct_calls_are_validated_as_the_command_line_is(settings, named):
    from errors import UserError
    with pytest.raises(UserError, match=named):
        rotnet.pretrain(rotnet.Pretraining(**settings))


@pytest.mark.parametrize("settings, named", [
    (dict(width=1e-3), "--width: from 1/64 to 16"), (dict(width=1e6), "--width: from 1/64 to 16"),
    (dict(width=float("nan")), "width"), (dict(epochs_scale=float("inf")), "--epochs-scale"),
])
def test_every_script_checks_its_settings_the_same_way(settings, named):
    # width is one setting of runs.Run; a width of no channels or of a network no memory
    # holds is refused by pretraining, the probes and the sweep alike, before anything runs.
    import probe
    import semi_supervised
    for make in (rotnet.Pretraining, probe.Probing, semi_supervised.Sweep):
        if "epochs_scale" in settings and make is rotnet.Pretraining:
            continue
        with pytest.raises(UserError, match=named):
            make(**settings)
    assert rotnet.Pretraining(width=1 / 64).width == probe.Probing(width=16).width / 1024


def test_resume_keeps_the_whole_lines_of_a_metrics_file_cut_short(cifar_dir, tmp_path):
    # A kill while an epoch's line is appended leaves half a line: --resume must neither fail
    # on it for ever nor lose the lines before it.
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "3"))
    os.remove(out / "model.pt")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "lr": 0.1, "train_lo')
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "3", "--resume"))
    assert [m["epoch"] for m in metrics_of(out)] == [1, 2, 3]


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.5"], "lr 0.1 there, 0.5 here"),
    (["--rotations", "90,0,180,270"], "rotations"),   # the same shapes, other labels
    (["--seed", "3"], "seed"),
    (["--width", "0.25"], "width"),
])
def test_resume_refuses_other_settings(cifar_dir, tmp_path, flags, named):
    # Resumed with other settings, a run would record them and train something else.
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2"))
    os.remove(out / "model.pt")
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume", *flags), check=False)
    assert_one_line_error(proc, str(out), named, "another --out")
    assert (out / "checkpoint.pt").read_bytes() == before
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume", "--eval-every", "2"))  # how often it tests may change


def test_resuming_the_run_of_another_script_says_what_the_folder_holds(tmp_path):
    from errors import UserError
    out = str(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(classifier="nonlinear", block=2, lr=0.1)))
    changed = runs.changed_settings(out, dict(arch="nin", rotations=[0, 90, 180, 270], lr=0.1))
    with pytest.raises(UserError, match=f"^{out} holds the run of a probe, not of a RotNet pretraining: give"):
        runs.refuse_changed(out, changed)
    # a sweep's arm is no probe of the same name: resumed by probe.py, it would train on every label
    (tmp_path / "config.json").write_text(json.dumps(dict(arm="supervised", classifier="supervised", per_class=20)))
    changed = runs.changed_settings(out, dict(classifier="supervised", supervised=True))
    with pytest.raises(UserError, match="holds the run of a label-scarcity arm, not of a supervised NIN"):
        runs.refuse_changed(out, changed)
    # With no config.json to tell, the weights' mismatch is named by its first few keys, not all
    (tmp_path / "config.json").unlink()
    ctx, config = train.Context("cpu"), dict(epochs=2)
    other = nin.NIN(3, 10, 0.125)
    opt, sched = train.make_optimizer(other.parameters(), 0.1, 2)
    runs.end_epoch(ctx, out, dict(epoch=1), other, opt, sched)
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(40)])
    opt, sched = train.make_optimizer(model.parameters(), 0.1, 2)
    with pytest.raises(UserError, match="made with other settings") as err:
        runs.restore(ctx, out, config, True, model, opt, sched)
    assert len(str(err.value)) < 300 and str(err.value).count(", ...") == 1
    # and a shape that differs (another --width) whole
    wider = nin.NIN(3, 10, 0.25)
    opt, sched = train.make_optimizer(wider.parameters(), 0.1, 2)
    with pytest.raises(UserError, match=r"size mismatch for .*torch.Size\(\[48, 3, 5, 5\]\)\); give") as err:
        runs.restore(ctx, out, config, True, wider, opt, sched)


def test_an_epoch_that_makes_no_step_or_diverges_stops_with_one_line():
    from errors import UserError
    images = data.Resident(torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8))
    ctx = train.Context("cpu")
    views = dict(recipe=data.Recipe(), mean=(0.0,) * 3, std=(1.0,) * 3, epoch=1, seed=0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    opt, _ = train.make_optimizer(net.parameters(), 0.1, 1)
    with pytest.raises(UserError, match="no step"):  # one image: no batch of 2 (BatchNorm)
        train.train_epoch(ctx, net, opt, data.Resident(images.images[:1]), batch_size=2, **views)
    torch.nn.init.constant_(net[1].weight, float("nan"))
    with pytest.raises(UserError, match="training loss became nan in epoch 1"):
        train.train_epoch(ctx, net, opt, images, batch_size=2, **views)


@pytest.mark.parametrize("flags, named", [
    (["--lr", "inf"], "--lr"), (["--width", "nan"], "--width"), (["--batch-size", "1"], "--batch-size"),
    (["--rotations", "45"], "rotations"), (["--seed", str(2**62)], "seed"),
])
def test_settings_that_train_nothing_are_refused_before_training(cifar_dir, tmp_path, flags, named):
    proc = run_cli(*tiny_run_flags(cifar_dir, tmp_path / "out", "--epochs", "1"), *flags, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert named in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import errno
    import shutil
    path = str(tmp_path / "checkpoint.pt")
    runs.atomic_save({"epoch": 1}, path, keep_previous=True)

    def full(obj, f):  # what torch.save does when the disk fills: part of the file, then this
        open(f, "wb").write(b"PK" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 194496 vs 194416")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(SystemExit) as stop:
        cli.run_job(lambda: runs.atomic_save({"epoch": 2}, path, keep_previous=True))
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"error: {path}: No space left on device; the files written before it are " \
                                      "whole: make room, then run the same command again (a single run with --resume)\n"
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no .tmp left, the previous one untouched
    assert torch.load(path, weights_only=True) == {"epoch": 1}

    def quota(*args):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "metrics.jsonl"))

    with pytest.raises(SystemExit):
        cli.run_job(quota)
    assert "metrics.jsonl: Disk quota exceeded" in capsys.readouterr().err

    def missing(*args):  # not a write that failed for want of room: a bug, with its traceback
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        cli.run_job(missing)


def test_sigterm_stops_a_run_as_ctrl_c_does(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        cli.run_job(lambda: [os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)])
    assert stop.value.code == 143
    assert capsys.readouterr().err.strip().startswith("stopped by SIGTERM: no run had started yet; what was "
                                                      "finished before is kept")
    assert signal.getsignal(signal.SIGTERM) is before  # put back once the job ends


def test_cli_sigterm_says_how_to_go_on_in_one_line(cifar_dir, tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen(cli_command(*tiny_run_flags(cifar_dir, out, "--epochs", "30")), cwd=REPO, env=cli_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    # An epoch ended: its checkpoint written (after its metrics line: a signal between the two
    # would leave no checkpoint yet, and say so)
    while not (out / "checkpoint.pt").exists():
        assert run.poll() is None and time.monotonic() < deadline, "no epoch ended"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 143, err
    # A signal amid a later epoch's files leaves the one before: checkpoint.pt, or, between
    # atomic_save's two renames, checkpoint.prev.pt (which --resume falls back to)
    saved = [out / name for name in ("checkpoint.pt", "checkpoint.prev.pt") if (out / name).exists()][0]
    kept = torch.load(saved, weights_only=False)["epoch"]
    # (a signal just after the last rename, before end_epoch notes it, names the epoch before)
    said = [f"stopped by SIGTERM: {out} is kept up to epoch {e}, and all finished before it" for e in (kept, kept - 1)]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(tuple(said)), err


def test_cli_output_piped_into_head_stops_the_run_in_one_line(cifar_dir, tmp_path):
    out = tmp_path / "out"  # `rotnet.py ... | head -1`: head exits after the first epoch's line
    run = subprocess.Popen(cli_command(*tiny_run_flags(cifar_dir, out, "--epochs", "30")), cwd=REPO, env=cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline()
    run.stdout.close()
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 1 and "Traceback" not in err, err
    # The epoch whose line could not be printed is kept (its line is printed after its checkpoint)
    kept = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
    assert kept >= 2 and len(metrics_of(out)) == kept, err
    assert err.strip().splitlines()[-1].startswith(f"stopped: its standard output was closed (a pipe ended); {out} "
                                                   f"is kept up to epoch {kept}, "), err


def test_a_broken_pipe_not_stdouts_is_not_taken_for_it(monkeypatch):
    def worker_gone():  # (a worker's pipe, say): a bug, with its traceback
        raise BrokenPipeError(32, "Broken pipe")  # (EPIPE)

    read, write = os.pipe()
    with os.fdopen(write, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)  # a pipe, its reader still there
        assert not cli._stdout_closed()
        with pytest.raises(BrokenPipeError):
            cli.run_job(worker_gone)
        os.close(read)
        assert cli._stdout_closed()  # (what `| head` leaves once it is done)


def test_ctrl_c_says_how_to_go_on_and_names_the_run_it_stopped(tmp_path, capsys):
    # A job of several runs (a table): the message names the run under way, not the last one
    # that ended an epoch.
    ctx, model = train.Context("cpu"), torch.nn.Linear(2, 2)
    opt, sched = train.make_optimizer(model.parameters(), lr=0.1, epochs=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    def interrupted(then=None):
        runs.restore(ctx, a, {}, False, model, opt, sched)
        runs.end_epoch(ctx, a, dict(epoch=1), model, opt, sched)
        if then:
            runs.restore(ctx, then, {}, False, model, opt, sched)
        raise KeyboardInterrupt

    for then, said in ((None, f"interrupted: {a} is kept up to epoch 1, and all finished before it"),
                       (b, f"interrupted: {b} had not ended an epoch yet; what was finished before it is kept")):
        with pytest.raises(SystemExit) as stop:
            cli.run_job(lambda: interrupted(then))
        assert stop.value.code == 130
        assert capsys.readouterr().err.strip().startswith(said)


def test_the_benchmark_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # each rank would time its own whole batch
    with pytest.raises(SystemExit) as stopped:
        rotnet.main(["--benchmark", "--device", "cpu", "--steps", "1"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: --benchmark times one process's training step: "
                                                "run it without torchrun")
