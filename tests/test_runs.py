"""runs.py and cli.py, through the scripts: nothing a stopped run finished is lost (atomic
files, a damaged checkpoint, a metrics file cut short, a full disk, Ctrl-C, SIGTERM, a closed
pipe), a run's folder is claimed and never overwritten, and everything that can be checked is
refused in one line before training starts (other settings on --resume, another script's
folder, a checkpoint that carries code, direct calls validated as the command line is).
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import data
import nin
import rotnet
import runs
import train
from errors import UserError
from conftest import REPO, assert_one_line_error, cli_command, cli_env, metrics_of, run_cli, tiny_run_flags


@pytest.fixture(scope="module")
def trained(cifar_dir, tmp_path_factory):
    """Runs trained once for the module's tests, which work on copies (copy_run): "finished"
    (1 epoch) and "stopped" (2 epochs, then its model.pt removed: a run stopped after its last
    checkpoint). Both with tiny_run_flags; a run's folder may move (--out may change on resume)."""
    root = tmp_path_factory.mktemp("trained")
    run_cli(*tiny_run_flags(cifar_dir, root / "finished", "--epochs", "1"))
    run_cli(*tiny_run_flags(cifar_dir, root / "stopped", "--epochs", "2"))
    os.remove(root / "stopped" / "model.pt")
    return root


def copy_run(trained, name, to):
    return shutil.copytree(trained / name, to)


def test_resume_from_a_damaged_checkpoint_continues_from_the_previous_one(cifar_dir, tmp_path):
    flags = lambda out: tiny_run_flags(cifar_dir, out, "--epochs", "3", "--seed", "5")
    run_cli(*flags(tmp_path / "a"))
    b = shutil.copytree(tmp_path / "a", tmp_path / "b")  # resumed, it must end as a did
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


def test_a_finished_run_is_not_overwritten_without_resume(cifar_dir, trained, tmp_path):
    out = copy_run(trained, "finished", tmp_path / "out")
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
def test_two_processes_never_train_into_one_folder(cifar_dir, trained, tmp_path):
    # Another process holds out (as a run training into it does): a run, a probe, and a
    # table's probe (which claims its folder in train_classifier) each stop at once.
    import fcntl
    out = tmp_path / "out"
    copy_run(trained, "finished", tmp_path / "net")
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
    # A run stopped before it wrote anything leaves no folder behind, nor the parents it made
    # (a table's --out, made by its first run), and the folders that were there stay.
    (tmp_path / "there").mkdir()
    proc = run_cli("--data", tmp_path / "no-data", "--out", tmp_path / "there" / "new" / "out", "--device", "cpu",
                   check=False)
    assert_one_line_error(proc, "no-data")
    assert os.listdir(tmp_path / "there") == []


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


def test_resume_with_no_good_checkpoint_says_what_to_delete(cifar_dir, trained, tmp_path):
    out = copy_run(trained, "finished", tmp_path / "out")
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


def test_resume_refuses_a_checkpoint_that_carries_code(cifar_dir, trained, tmp_path):
    from conftest import RunsCode
    out = copy_run(trained, "finished", tmp_path / "out")
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


def test_resume_keeps_the_whole_lines_of_a_metrics_file_cut_short(cifar_dir, trained, tmp_path):
    # A kill while an epoch's line is appended leaves half a line: --resume must neither fail
    # on it for ever nor lose the lines before it.
    out = copy_run(trained, "stopped", tmp_path / "out")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lr": 0.1, "train_lo')
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume"))
    assert [m["epoch"] for m in metrics_of(out)] == [1, 2]


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.5"], "lr 0.1 there, 0.5 here"),
    (["--rotations", "90,0,180,270"], "rotations"),   # the same shapes, other labels
    (["--seed", "3"], "seed"),
    (["--width", "0.25"], "width"),
])
def test_resume_refuses_other_settings(cifar_dir, trained, tmp_path, flags, named):
    # Resumed with other settings, a run would record them and train something else.
    out = copy_run(trained, "stopped", tmp_path / "out")
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume", *flags), check=False)
    assert_one_line_error(proc, str(out), named, "another --out")
    assert (out / "checkpoint.pt").read_bytes() == before
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume", "--eval-every", "2"))  # how often it tests may change


def test_a_cifar_run_resumes_whatever_image_size_it_records(cifar_dir, trained, tmp_path):
    # CIFAR-10's images are 32 x 32 whatever --image-size says (the NIN's default since
    # 2026-12-07, where runs made before record the flag's old default, 256)
    out = copy_run(trained, "stopped", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 32
    (out / "config.json").write_text(json.dumps(dict(config, image_size=256)))
    run_cli(*tiny_run_flags(cifar_dir, out, "--epochs", "2", "--resume"))
    assert (out / "model.pt").exists()


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
                                      "whole: make room, then run the same command again\n"
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no .tmp left, the previous one untouched
    assert torch.load(path, weights_only=True) == {"epoch": 1}

    def quota(*args):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "metrics.jsonl"))

    with pytest.raises(SystemExit):
        cli.run_job(quota)
    assert "metrics.jsonl: Disk quota exceeded" in capsys.readouterr().err

    def read_only(*args):  # an --out that exists on a read-only disk: nothing to resume, no room to make
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "config.json.tmp"))

    with pytest.raises(SystemExit):
        cli.run_job(read_only, single_run=True)
    assert capsys.readouterr().err == f"error: {tmp_path / 'config.json.tmp'}: Read-only file system: give --out " \
                                      "(or --cache) a folder that can be written to\n"

    def missing(*args):  # not a write that failed for want of room: a bug, with its traceback
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        cli.run_job(missing)


def test_running_out_of_memory_is_one_line_that_says_what_to_make_smaller(capsys):
    # An --image-size, --batch-size or --width too large for the machine: torch's allocator
    # refuses (the CPU's here: 1 PiB), and the user reads what to change, not a traceback
    with pytest.raises(SystemExit) as stop:
        cli.run_job(lambda: torch.empty(2**50, dtype=torch.uint8))
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: out of memory (1048576.0 GiB asked for at once): give a smaller " \
                                      "--batch-size, --width or --image-size (an image folder's)\n"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of")
    assert cli.out_of_memory(cuda) == " (20 MiB asked for at once)" and cli.out_of_memory(MemoryError()) == ""
    with pytest.raises(RuntimeError, match="same dtype"):  # any other error: a bug, with its traceback
        cli.run_job(lambda: torch.ones(2).matmul(torch.ones(2, dtype=torch.int64)))


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
    # and spells out the command that goes on: this one, with --resume
    command = err.strip().split("; to go on, run it again with --resume: ")[1]
    assert shlex.split(command) == ["python", *cli_command(*tiny_run_flags(cifar_dir, out, "--epochs", "30"))[1:],
                                    "--resume"]


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


def test_ctrl_c_says_how_to_go_on_and_names_the_run_it_stopped(tmp_path, capsys, monkeypatch):
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
        err = capsys.readouterr().err.strip()
        assert err.startswith(said) and err.endswith("; to go on, run the same command again")  # (a table: resumes)
    # A single run goes on with --resume added, the command spelt out; given --resume, the same one
    for argv, go_on in ((["rotnet.py", "--out", "a b"],
                         "run it again with --resume: python rotnet.py --out 'a b' --resume"),
                        (["rotnet.py", "--resume"], "run the same command again")):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit):
            cli.run_job(interrupted, single_run=True)
        assert capsys.readouterr().err.strip().endswith(f"; to go on, {go_on}")
