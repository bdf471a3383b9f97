"""tools/gpu_check.sh's bookkeeping, which a GPU session relies on and cannot debug there:
the time budget (--seconds), and what `collect` brings back. The stages themselves need a GPU."""
import os
import shutil
import subprocess
import tarfile

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "tools", "gpu_check.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def gpu_check(cwd, *args, env=None):
    """Runs the script from cwd (it works on the repository it is run in) as the device would."""
    os.makedirs(cwd / "tools", exist_ok=True)
    shutil.copy(SCRIPT, cwd / "tools" / "gpu_check.sh")
    done = subprocess.run(["bash", "tools/gpu_check.sh", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)
    return done.returncode, done.stdout + done.stderr


def test_a_stage_that_would_start_with_less_than_it_needs_is_skipped_and_collect_still_runs(tmp_path):
    rc, output = gpu_check(tmp_path, tmp_path / "gc", "--seconds", 3, "bench", "runs", "oops", "collect")
    summary = (tmp_path / "gc" / "summary.log").read_text()
    assert rc == 0, output
    for stage in ("bench", "rotnet", "table3", "table1", "table2", "semi"):  # runs: its five stages
        assert f"== {stage} skipped: " in summary
    assert "== unknown stage oops" in summary
    assert "== collect exit 0" in summary and summary.rstrip().splitlines()[-1].startswith("== done")
    assert not (tmp_path / "gc" / "bench.log").exists()


@pytest.mark.parametrize("seconds", ["abc", "-5", ""])
def test_seconds_must_be_a_whole_number(tmp_path, seconds):
    rc, output = gpu_check(tmp_path, tmp_path / "gc", "--seconds", seconds, "env")
    assert rc == 2 and "--seconds: a whole number of seconds" in output
    assert not (tmp_path / "gc" / "env.log").exists()


def test_collect_brings_back_the_checkpoints_of_unfinished_runs_only(tmp_path):
    runs = {"rotnet": ["checkpoint.pt", "checkpoint.prev.pt", "model.pt", "metrics.jsonl"],  # finished
            "tables/probe_a": ["checkpoint.pt", "results.json"],                              # finished
            "tables/probe b": ["checkpoint.pt", "checkpoint.prev.pt", "config.json"],        # cut off
            "semi/arm": ["checkpoint.prev.pt", "checkpoint.pt.tmp"]}                         # cut off mid-save
    for folder, files in runs.items():
        os.makedirs(tmp_path / "runs" / "gpu" / folder)
        for name in files:
            (tmp_path / "runs" / "gpu" / folder / name).write_text(name)
    rc, output = gpu_check(tmp_path, tmp_path / "gc", "collect")
    assert rc == 0, output
    with tarfile.open(tmp_path / "gc" / "runs_results.tgz") as tar:
        back = {m.name for m in tar.getmembers() if m.isfile()}
    assert back == {"runs/gpu/rotnet/model.pt", "runs/gpu/rotnet/metrics.jsonl", "runs/gpu/tables/probe_a/results.json",
                    "runs/gpu/tables/probe b/checkpoint.pt", "runs/gpu/tables/probe b/checkpoint.prev.pt",
                    "runs/gpu/tables/probe b/config.json", "runs/gpu/semi/arm/checkpoint.prev.pt"}


def test_a_stage_of_several_commands_fails_if_any_fails(tmp_path):
    # `check` runs the independent checker, then its timing table: a failed check followed by
    # a table that prints fine must still fail the stage.
    os.makedirs(tmp_path / ".device")
    (tmp_path / ".device" / "gpu_check.py").write_text(
        "import sys\nprint('FAILURES: 1 case differs' if '--perf' not in sys.argv else 'timings')\n"
        "sys.exit(0 if '--perf' in sys.argv else 1)\n")
    rc, output = gpu_check(tmp_path, "--stage", "check", tmp_path / "gc")
    assert rc == 1 and "FAILURES" in output and "timings" in output, output


def fake_tools(tmp_path, **scripts):
    """Stand-ins on PATH for the device's tools (name: bash body), each recording its calls in
    calls.NAME first; returns the environment that puts them there."""
    bin_dir = tmp_path / "bin"
    os.makedirs(bin_dir, exist_ok=True)
    for name, body in scripts.items():
        fake = bin_dir / name
        fake.write_text(f'#!/usr/bin/env bash\necho "caching=${{PYTORCH_NO_CUDA_MEMORY_CACHING:-}} $*" '
                        f'>> "{tmp_path}/calls.{name}"\n{body}\n')
        fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def calls_of(tmp_path, name):
    path = tmp_path / f"calls.{name}"
    return path.read_text().splitlines() if path.exists() else []


def test_sanitize_runs_each_tool_on_the_operators_kernels_and_a_hazard_fails_it(tmp_path):
    # A stand-in compute-sanitizer that reports a race.
    env = fake_tools(tmp_path, **{"compute-sanitizer": '[[ " $* " != *" racecheck "* ]]'})
    rc, output = gpu_check(tmp_path, "--stage", "sanitize", tmp_path / "gc", env=env)
    assert rc == 1, output  # racecheck found a hazard
    probe, *calls = calls_of(tmp_path, "compute-sanitizer")  # first, whether it works here at all
    assert "--tool memcheck" in probe and "torch.cuda.synchronize()" in probe
    assert (tmp_path / "build" / "works.compute-sanitizer").read_text().strip() == "yes"
    assert [c.split("--tool ")[1].split()[0] for c in calls] == ["memcheck", "racecheck", "synccheck"]
    for call in calls:
        assert "--error-exitcode 1" in call and call.endswith(".device/gpu_check.py --quick")
        assert "--kernel-name kns=rot_kernel" in call
    assert calls[0].startswith("caching=1 ") and all(c.startswith("caching= ") for c in calls[1:])


def test_a_tool_that_fails_on_this_machine_is_said_unavailable_not_a_finding(tmp_path):
    # As on the gVisor machines: compute-sanitizer refuses the device (and the program then
    # fails), ncu prints an error and exits as the program did, 0.
    env = fake_tools(tmp_path, **{"compute-sanitizer": 'echo "========= Error: Device not supported"; exit 1',
                                  "ncu": 'echo "==ERROR== Failed to initialize the profiler: LibraryNotLoaded"'})
    said = []
    for stage in ("sanitize", "ncu", "sanitize"):  # the second sanitize: the answer is kept
        rc, output = gpu_check(tmp_path, "--stage", stage, tmp_path / "gc", env=env)
        assert rc == 75 and "does not work on this machine: skipped" in output, output
        said.append(output)
    assert "Device not supported" in said[0] and "(exit 1;" in said[0]  # what the tool said, when tried
    assert "LibraryNotLoaded" in said[1] and "(exit 0;" in said[1]
    assert "Device not supported" not in said[2]  # not tried again
    assert len(calls_of(tmp_path, "compute-sanitizer")) == 1 and len(calls_of(tmp_path, "ncu")) == 1
    assert not (tmp_path / "gc" / "ncu_after.csv").exists()

    # `before` still runs the old operator's benchmark, and the summary says why it is not a failure.
    old = tmp_path / ".device" / "before" / "rot_kernel"
    os.makedirs(old)
    (old / "__init__.py").write_text("backend = lambda: 'cpu (prebuilt)'\n")  # built without its CUDA kernel
    (old / "_C.fake.so").write_text("")
    (old / "bench.py").write_text("import sys\nopen(sys.argv[-1], 'w').write('{}')\n")
    rc, output = gpu_check(tmp_path, tmp_path / "gc1", "before", env=env)  # no "before" to time: a failure
    assert "does not load with its CUDA kernel" in output and "== before exit 1" in output, output
    assert not (tmp_path / "gc1" / "bench_cuda_before.json").exists()
    (old / "__init__.py").write_text("backend = lambda: 'cpu+cuda (prebuilt)'\n")
    rc, output = gpu_check(tmp_path, tmp_path / "gc2", "before", env=env)
    summary = (tmp_path / "gc2" / "summary.log").read_text()
    assert rc == 0 and "== before exit 75: its tool does not work on this machine" in summary, output
    assert (tmp_path / "gc2" / "bench_cuda_before.json").exists()
    assert len(calls_of(tmp_path, "ncu")) == 1  # the kept answer: not tried again
