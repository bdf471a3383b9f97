"""rotnet.py end to end: a short run and its files, other rotation sets, snapshots, kill and
--resume, two CPU ranks, evaluation on every rank, no host sync a step (the index check off
unless asked for), the compiled model and the fused optimizer, bad flags. (The run's files, --resume's refusals and the error path: test_runs.py;
--benchmark: test_benchmark.py.)

Everything runs on the CPU with tiny models (--width 0.125) on a few hundred images that
the tests write themselves in CIFAR-10's python format.
"""
import json
import os
import re
import signal
import subprocess
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import cifar
import data
import models
import nin
import rot_kernel
import rotnet
import train
from errors import UserError
from conftest import REPO, cli_command, cli_env, free_port, metrics_of, run_cli, tiny_run_flags


def test_an_image_size_cifar_does_not_use_is_said(cifar_dir, tmp_path, capsys):
    # CIFAR-10 is 32 x 32 whatever --image-size says (it is for image folders): said, not silent
    settings = dict(data=str(cifar_dir), epochs=1, width=0.125, batch_size=32, device="cpu")
    said = lambda: [line for line in capsys.readouterr().err.splitlines() if " test images of " in line]
    rotnet.pretrain(rotnet.Pretraining(**settings, image_size=64, out=str(tmp_path / "a")))
    [line] = said()
    assert " images of 32 x 32 from " in line and line.endswith("on cpu (not at 64: --image-size is for image folders)")
    rotnet.pretrain(rotnet.Pretraining(**settings, out=str(tmp_path / "b")))  # (the NIN's own: 32)
    [line] = said()
    assert line.endswith("on cpu")


def test_cli_short_run_writes_its_files(cifar_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(*tiny_run_flags(os.path.relpath(cifar_dir, REPO), out, "--epochs", "2"))  # (run from REPO)
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt"} <= set(os.listdir(out))
    # What it trains on, said before it does: which data (a sample, the full set), how long
    assert re.search(rf"^{re.escape(str(out))}: 300 training and \d+ test images of 32 x 32 from \S+; "
                     r"10 steps an epoch, epochs 1 to 2, on cpu$", proc.stderr, re.M), proc.stderr
    # 300 images in steps of up to 32: too few for BatchNorm's running statistics, said once
    assert proc.stderr.count("note: 10 steps an epoch, 20 in all: too few for BatchNorm's running statistics") == 1
    config = json.loads((out / "config.json").read_text())
    assert config["torch"] == torch.__version__
    assert config["rot_kernel"] == rot_kernel.backend()
    assert config["device"] == "cpu"
    assert config["data"] == str(cifar_dir)  # where it lies, wherever the run's files are read from
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
