"""How fast RotNet pretraining runs, and against what: `python rotnet.py --benchmark` times
the training step on random data of the arch's data set already on the device (the same
train_step as training, every batch built by the fused op); `--baseline` also times the same
step fed by a conventional DataLoader pipeline (baseline.py); `--sweep` times, in one run,
the variants the field uses for small models (fp32, contiguous memory, fused SGD,
torch.compile modes with and without CUDA graphs) and prints a table last.
"""
import dataclasses
import gc
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

import baseline
import cifar
import rot_kernel
from errors import UserError, require
from models import build
from rotnet import ARCHS, Pretraining
from train import Context, batches, make_optimizer, resolve_device, train_step



@dataclass(frozen=True)
class Variant:
    """One way to run the training step, as --benchmark times it (--sweep: SWEEP's)."""
    name: str = "eager"
    amp: bool = True                      # bf16 autocast (CUDA only)
    channels_last: Optional[bool] = None  # None: the device's default (CUDA: yes)
    compile: Union[bool, str] = False     # False, True (torch.compile's default mode) or a mode name
    fused_sgd: bool = False
    check_bounds: bool = False            # the op checks each batch's index: a host sync per step on CUDA
    dataloader: bool = False              # fed by baseline.py's DataLoader instead of the fused op
    cuda_only: str = ""                   # why it is skipped on the CPU ("": it runs there)


SLOW_ON_CPU = "compiling takes about a minute on the CPU (--benchmark --compile times it there)"
# What the field does for small models, against the default (the first row). The compiled
# ones come last, the slowest to compile (autotuning) at the end: a run cut short by a time
# limit still has the others (the JSON is rewritten after every row).
SWEEP = (Variant("eager"),
         Variant("eager, index checked each step", check_bounds=True),
         Variant("eager fp32", amp=False, cuda_only="the CPU default is fp32 already"),
         Variant("eager contiguous", channels_last=False, cuda_only="the CPU default is contiguous already"),
         Variant("eager fused SGD", fused_sgd=True),
         Variant("dataloader", dataloader=True),
         Variant("compile", compile=True, cuda_only=SLOW_ON_CPU),
         Variant("compile reduce-overhead", compile="reduce-overhead", cuda_only="CUDA graphs are CUDA's"),
         Variant("compile max-autotune-no-cudagraphs", compile="max-autotune-no-cudagraphs", cuda_only=SLOW_ON_CPU))


class Skipped(Exception):
    """A variant that this machine or these settings cannot run; the message says why."""


def one_line(err):
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def baseline_unfit(s: Pretraining):
    """Why the DataLoader baseline cannot run beside these settings ("" if it can)."""
    if s.arch != "nin":
        return "the DataLoader baseline is the NIN's CIFAR-10 pipeline (pad-crop 32x32), not AlexNet's"
    if any(r % 90 for r in s.rotations):
        return f"the DataLoader baseline turns by quarter turns only (the original code's), got {list(s.rotations)}"
    return ""


def check_fused_sgd(device):
    """Skipped unless this torch takes a fused SGD step with Nesterov momentum on device."""
    p = torch.zeros(4, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:  # torch checks the device and dtype at the first step, not when the optimizer is made
        opt, _ = make_optimizer([p], 0.1, 1, fused=True)  # (its schedule must live while it steps)
        opt.step()
    except (RuntimeError, ValueError, TypeError) as err:
        raise Skipped(f"fused SGD with Nesterov momentum: {one_line(err)}") from None


def random_images(s: Pretraining, steps):
    """Random uint8 images on the CPU standing in for the arch's data set (CIFAR-10's 32x32
    for the NIN, ImageNet's prepared 256x256 for AlexNet), as many as the timed steps draw
    up to a pool, and the number of images in an epoch of the real one."""
    epoch_images, side, pool = (50_000, 32, 50_000) if s.arch == "nin" else (1_281_167, 256, 2048)
    return torch.randint(0, 256, (min(pool, steps * s.batch_size), 3, side, side), dtype=torch.uint8), epoch_images


def seconds(ctx, fn):
    """Wall time of fn, the device work it queued included."""
    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_fused(ctx, net, opt, images, s: Pretraining, steps):
    """Seconds for `steps` training steps on batches built by the fused op (ctx.batch) from
    images on the device, and for building them alone. Each is run once untimed first."""
    arch, side = ARCHS[s.arch], images.shape[-1]
    images = images.to(ctx.device)
    perm, view = arch.recipe.draws(len(images), 1, s.seed, ctx.device, side, side, steps * s.batch_size)
    slices = [sl for _, sl in zip(range(steps), batches(len(perm), s.batch_size))]
    batch = lambda sl: ctx.batch(images, perm[sl], rotations=s.rotations, mean=cifar.MEAN, std=cifar.STD,
                                 size=arch.recipe.out_size(side, side), **{k: v[sl] for k, v in view.items()})

    def build_only():
        for sl in slices:
            batch(sl)

    def train():
        for sl in slices:
            train_step(ctx, net, opt, *batch(sl))

    net.train()
    train()  # warm-up: compilation, CUDA graph capture, cudnn.benchmark, allocator
    t_train = seconds(ctx, train)
    build_only()
    return t_train, seconds(ctx, build_only)


def time_dataloader(ctx, net, opt, images, s: Pretraining, steps, workers):
    """Seconds for `steps` training steps fed by the conventional pipeline (baseline.py:
    a DataLoader of `workers` processes on the CPU images), and for as many of its batches
    alone. Steady state: one iterator, whose first `steps` batches train untimed (worker
    start-up, the prefetch queue's first fill, cudnn.benchmark), the next `steps` are timed,
    then the batches the workers hold ready are taken untimed, and the last `steps` are only
    copied to the device (the loader alone, without the head start the queue would give it)."""
    ready = workers * baseline.PREFETCH  # the most batches the workers keep ready
    loaded = iter(baseline.loader(images, batch_size=s.batch_size, draws=(3 * steps + ready) * s.batch_size,
                                  workers=workers, pin_memory=ctx.cuda, seed=s.seed, rotations=s.rotations,
                                  mean=cifar.MEAN, std=cifar.STD))

    def load_only():
        for _ in range(steps):
            baseline.to_device(ctx, *next(loaded))

    def train():
        for _ in range(steps):
            train_step(ctx, net, opt, *baseline.to_device(ctx, *next(loaded)))

    net.train()
    train()  # warm-up
    t_train = seconds(ctx, train)
    for _ in range(ready):
        next(loaded)
    return t_train, seconds(ctx, load_only)


def measure(s: Pretraining, v: Variant, images, epoch_images, steps, workers=baseline.WORKERS):
    """Times variant v of the training step on images, with its own model and optimizer made
    from s.seed; returns its figures. Raises Skipped when it cannot run here."""
    ctx = Context(s.device, amp=v.amp, compile=v.compile, channels_last=v.channels_last, check_bounds=v.check_bounds)
    if v.cuda_only and not ctx.cuda:
        raise Skipped(v.cuda_only)
    if v.dataloader and baseline_unfit(s):
        raise Skipped(baseline_unfit(s))
    if v.fused_sgd:
        check_fused_sgd(ctx.device)
    torch.manual_seed(s.seed)
    model = build(s.arch, num_classes=len(s.rotations), width=s.width, blocks=s.blocks)
    net = ctx.prepare(model)
    opt, _ = make_optimizer(net.parameters(), s.lr, 100, fused=v.fused_sgd)
    skips = cudagraph_skips()
    t_train, t_build = (time_dataloader(ctx, net, opt, images, s, steps, workers) if v.dataloader
                        else time_fused(ctx, net, opt, images, s, steps))
    ips = steps * s.batch_size / t_train
    # batch_building_share: building `steps` batches alone over training on them; for the
    # dataloader it runs beside the step, so near 1 or above means the workers hold it back.
    return dict(device=str(ctx.device), **ctx.machine(), arch=s.arch, compile=v.compile, amp=ctx.amp,
                channels_last=ctx.channels_last, fused_sgd=v.fused_sgd, check_bounds=v.check_bounds, width=s.width,
                batch_size=s.batch_size, rotations=list(s.rotations), steps=steps,
                **(dict(workers=workers) if v.dataloader else {}), images_per_s=round(ips, 1),
                minutes_per_epoch=round(epoch_images / ips / 60, 2),
                minutes_per_100_epochs=round(100 * epoch_images / ips / 60, 2),
                batch_building_share=round(t_build / t_train, 4),
                **(dict(cudagraph_skips=cudagraph_skips() - skips) if ctx.cudagraphs else {}))


def cudagraph_skips():
    """How many graphs inductor has run without CUDA graphs so far (it logs why, and goes on):
    a reduce-overhead or max-autotune row with any did not time what its name says."""
    from torch._dynamo.utils import counters  # (torch.compiler.reset() leaves it: compared before/after)
    return counters["inductor"]["cudagraph_skips"]


def write_result(path, result):
    """The --json file; a sweep writes it again after each variant, so that one cut off keeps its rows."""
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    except OSError as err:
        raise UserError(f"--json {path}: cannot write it ({err.strerror})") from None


def benchmark(s: Pretraining, steps=100, *, dataloader=False, workers=baseline.WORKERS, json_path=None):
    """Training speed on random data of the arch's data set already on the device (CIFAR-10
    for the NIN: 32x32; ImageNet for AlexNet: 256x256 cropped to 224): images per second,
    the projected time of an epoch (and of 100), and the share of batch building. Times the
    same train_step as training. dataloader (--baseline): also the same step fed by the
    conventional DataLoader pipeline (baseline.py), and how many times faster the fused op is.
    Prints one JSON line (also written to json_path if given) and returns it."""
    require(not dataloader or not baseline_unfit(s), f"--baseline: {baseline_unfit(s)}")
    if json_path:
        write_result(json_path, {})  # a path that cannot be written stops the run before it starts
    # A full-width step on a CPU can take seconds: say what is being timed before it starts.
    print(f"timing {steps} training steps ({s.arch}, width {s.width}, {s.batch_size} images x {len(s.rotations)} "
          f"rotations) on {resolve_device(s.device)}, after {steps} untimed ones to warm up", file=sys.stderr,
          flush=True)
    images, epoch_images = random_images(s, steps)
    variant = Variant(amp=s.amp, compile=s.compile)
    result = measure(s, variant, images, epoch_images, steps, workers)
    rows = [dict(variant="fused op" + (", compiled" if s.compile else ""), status="ok", **result)]
    if dataloader:
        base = measure(s, dataclasses.replace(variant, name="dataloader", dataloader=True), images, epoch_images,
                       steps, workers)
        result.update(baseline_images_per_s=base["images_per_s"], baseline_workers=workers,
                      speedup_vs_dataloader=round(result["images_per_s"] / base["images_per_s"], 2))
        rows.append(dict(variant=f"dataloader (workers: {workers})", status="ok", **base,
                         ratio=round(base["images_per_s"] / result["images_per_s"], 3)))
    print(table_text(rows), file=sys.stderr)  # for the reader; the JSON line last, for programs
    print(json.dumps(result))
    if json_path:
        write_result(json_path, result)
    return result


def sweep(s: Pretraining, steps=100, *, variants=SWEEP, workers=baseline.WORKERS, json_path=None):
    """Times each variant in this one process on the same images, each with its own model
    and optimizer made from the same seed. A variant that cannot run here is recorded as
    skipped and one that fails as failed, with the reason; neither stops the sweep (a failed
    one makes it end in an error, after the table). Each row
    is reported on stderr as it ends (and the JSON rewritten, so a run cut short keeps what
    it measured); the table comes last, on stdout. Returns the rows."""
    ctx = Context(s.device)  # an unavailable device stops here, with one line
    if json_path:
        write_result(json_path, {})
    images, epoch_images = random_images(s, steps)
    rows = []
    for v in variants:
        row = dict(variant=v.name)
        try:
            row.update(status="ok", **measure(s, v, images, epoch_images, steps, workers))
        except Skipped as why:
            row.update(status="skipped", reason=str(why))
        except Exception as err:  # a compile error, out of memory, ...: recorded, and on to the next
            row.update(status="failed", error=one_line(err))
        gc.collect()  # the variant's model, optimizer and compiled graphs go before the next
        if ctx.cuda:
            torch.cuda.empty_cache()
        first = (rows or [row])[0]
        if row["status"] == first["status"] == "ok":
            row["ratio"] = round(row["images_per_s"] / first["images_per_s"], 3)
        rows.append(row)
        print(f"sweep: {row_text(row)}", file=sys.stderr, flush=True)
        if json_path:
            write_result(json_path, sweep_summary(s, ctx, steps, workers, rows))
    print(table_text(rows))
    failed = [r["variant"] for r in rows if r["status"] == "failed"]
    require(not failed, f"{len(failed)} of the sweep's {len(rows)} variants failed ({', '.join(failed)}): "
                        "their rows above say why")
    return rows


def table_text(rows):
    header = f"{'variant':36} {'images/s':>10} {'min/100 ep':>11} {'build share':>12} {'x first':>8}"
    return "\n".join([header] + [row_text(row) for row in rows])


def row_text(row):
    if row["status"] != "ok":
        return f"{row['variant']:36} {row['status']}: {row.get('reason') or row.get('error')}"
    skipped = f"  (without CUDA graphs {row['cudagraph_skips']}x: the log says why)" if row.get("cudagraph_skips") else ""
    return (f"{row['variant']:36} {row['images_per_s']:>10} {row['minutes_per_100_epochs']:>11} "
            f"{row['batch_building_share']:>12} {row.get('ratio', '-'):>8}{skipped}")


def sweep_summary(s: Pretraining, ctx, steps, workers, rows):
    """The sweep's JSON: where it ran, its settings, every row, and the fused op's speedup
    over the DataLoader baseline (the first row against the dataloader row)."""
    first, loader = rows[0], [r for r in rows if r["variant"] == "dataloader" and r["status"] == "ok"]
    speedup = round(first["images_per_s"] / loader[0]["images_per_s"], 2) if loader and "ratio" in loader[0] else None
    return dict(device=str(ctx.device), **ctx.machine(), torch=torch.__version__, rot_kernel=rot_kernel.backend(),
                arch=s.arch, width=s.width, batch_size=s.batch_size, steps=steps, workers=workers,
                speedup_vs_dataloader=speedup, rows=rows)


if __name__ == "__main__":  # the benchmark takes rotnet.py's settings, so it runs from there
    sys.exit("benchmark.py is run through rotnet.py: python rotnet.py --benchmark [--baseline | --sweep] "
             "(python rotnet.py --help lists the settings)")
