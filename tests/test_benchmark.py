"""benchmark.py and baseline.py: `rotnet.py --benchmark` (its JSON, --baseline, --sweep, a variant
that fails, the refusals), and the DataLoader baseline checked against the reference op.
"""
import json

import pytest
import torch

import baseline
import benchmark
import cifar
import rot_kernel
import rotnet
import train
from errors import UserError
from conftest import run_cli


def test_cli_benchmark_prints_its_json(tmp_path):
    proc = run_cli("--benchmark", "--steps", "2", "--width", "0.125", "--device", "cpu", "--batch-size", "16")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "minutes_per_100_epochs", "batch_building_share"):
        assert result[key] > 0, key
    assert result["device"] == "cpu" and result["threads"] == 1


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


def test_a_cuda_graphs_row_that_ran_without_them_says_so(monkeypatch, capsys):
    # Inductor may run a graph without CUDA graphs (it logs why and goes on): the row's name
    # would then claim what it did not time. Simulated: a timing during which inductor skips.
    from torch._dynamo.utils import counters

    def timed_with_skips(*args):
        counters["inductor"]["cudagraph_skips"] += 2
        return 1.0, 0.01
    monkeypatch.setattr(benchmark, "time_fused", timed_with_skips)
    variants = (benchmark.Variant("eager"), benchmark.Variant("graphs", compile="reduce-overhead"))
    rows = benchmark.sweep(rotnet.Pretraining(device="cpu", width=0.125, batch_size=8), steps=1, variants=variants)
    assert "cudagraph_skips" not in rows[0] and rows[1]["cudagraph_skips"] == 2
    table = capsys.readouterr().out.splitlines()
    assert "without CUDA graphs" not in table[-2] and table[-1].endswith("(without CUDA graphs 2x: the log says why)")


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


def test_the_benchmark_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # each rank would time its own whole batch
    with pytest.raises(SystemExit) as stopped:
        rotnet.main(["--benchmark", "--device", "cpu", "--steps", "1"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: --benchmark times one process's training step: "
                                                "run it without torchrun")
