"""rotnet.py end to end: a short run and its files, other rotation sets, snapshots, kill and
--resume (also from a damaged checkpoint), two CPU ranks, --benchmark, bad flags, and direct
calls of pretrain() validated as the command line is.

Everything runs on the CPU with tiny models (--width 0.125) on a few hundred images that
the tests write themselves in CIFAR-10's python format.
"""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

import models
import nin
import rot_kernel
import rotnet
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


def test_cli_two_cpu_ranks_with_torchrun(cifar_dir, tmp_path):
    out = tmp_path / "out"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"), launcher=launcher)
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt"]
    assert len(metrics_of(out)) == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert sum(ln.startswith("epoch ") for ln in proc.stdout.splitlines()) == 1  # rank 0 alone reports
    models.load_model(out / "model.pt")


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


def test_resume_with_no_good_checkpoint_says_what_to_delete(cifar_dir, tmp_path):
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"))
    (out / "checkpoint.pt").write_bytes(b"\0" * 100)
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume"), check=False)
    assert_one_line_error(proc, "checkpoint.pt", f"delete {out}")
    assert proc.returncode == 1


def test_resume_refuses_a_checkpoint_that_carries_code(cifar_dir, tmp_path):
    from conftest import RunsCode
    out = tmp_path / "out"
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "1"))
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "epoch": 1}, out / "checkpoint.pt")
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume"), check=False)
    assert_one_line_error(proc, "checkpoint.pt", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("settings, named", [
    (dict(epochs=0), "epochs"), (dict(rotations=(0, 30)), "rotations"), (dict(batch_size=0), "batch_size"),
    (dict(width=-1.0), "width"), (dict(blocks=6), "blocks"), (dict(device="tpu"), "device"),
])
def test_direct_calls_are_validated_as_the_command_line_is(settings, named):
    from errors import UserError
    with pytest.raises(UserError, match=named):
        rotnet.pretrain(rotnet.Pretraining(**settings))
