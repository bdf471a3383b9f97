"""The training loop's pieces that every script shares, written once: the schedule's
constants, where a run computes (device, precision, ranks), one SGD step, one epoch,
evaluation. A run's settings and folder (config.json, metrics.jsonl, checkpoint.pt, --resume)
are runs.py's; the flags and the error path every script shares are cli.py's.

A script's own loop reads (rotnet.pretrain, probe.train_classifier):

    steps = epoch_steps(ctx, len(train), batch_size)  # refuses a run of no step before restore writes
    first, metrics = runs.restore(ctx, out, config, resume, model, opt, sched)
    say_start(ctx, out, data, train, test, len(steps), epochs, first, image_size)
    say_if_too_few_steps(ctx, model, len(steps), epochs, first)
    for epoch in range(first, epochs + 1):
        loss, acc, seen = train_epoch(ctx, net, opt, train, ...)
        test_acc = evaluate(ctx, net, test, ...)
        sched.step()
        runs.end_epoch(ctx, out, runs.epoch_metrics(...), model, opt, sched)
"""
import datetime
import math
import os
import pathlib
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import rot_kernel
from errors import require

# ----------------------------------------------------------------------------- settings
MILESTONES = (0.3, 0.6, 0.8)         # lr x0.2 at these fractions of the run
LR_DECAY = 0.2
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
EVAL_BATCH = 500                     # test images per forward pass (x rotations)
SETTLED_STEPS = 30                   # BatchNorm's running statistics (momentum 0.1) keep 4 % of their start


# ----------------------------------------------------------------------------- where a run computes
def main_first(ctx, get):
    """get() on rank 0 first (which may download or prepare), then on the others; one
    process: get()."""
    if not ctx.distributed:
        return get()
    got = get() if ctx.main else None
    dist.barrier()
    return got if got is not None else get()


def main_rank():
    """True in the process that writes the run files and prints: rank 0, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size():
    """How many ranks this process is one of (torchrun's WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(device != "cuda" or torch.cuda.is_available(), "--device cuda but no CUDA device is available")
    return device


def cpu_name():
    """The CPU's model name as Linux reports it (None elsewhere)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)


class Context:
    """Where and how a run computes: device, mixed precision, memory format, compilation,
    ranks. compile is False, True (torch.compile's default mode) or a torch.compile mode
    name; channels_last None is the device's default (CUDA: yes). check_bounds: the op
    checks every batch's index on the host, a sync per step on CUDA (off: batch says why)."""

    def __init__(self, device="auto", amp=True, compile=False, channels_last=None, check_bounds=False):
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        # Under torchrun even one process runs as a rank (process group, DDP), so that a
        # one-GPU machine tries the multi-GPU path.
        self.distributed = self.world > 1 or dist.is_torchelastic_launched()
        self.cuda = resolve_device(device) == "cuda"
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.backends.cudnn.benchmark = True
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.amp = amp and self.cuda  # bf16 autocast; on the CPU it would only be slower
        self.channels_last = self.cuda if channels_last is None else channels_last
        self.compile = compile
        self.check_bounds = check_bounds
        # These modes replay CUDA graphs, whose outputs the next replay overwrites: each
        # batch marks a new step, so that the previous step's outputs are let go explicitly.
        self.cudagraphs = compile in ("reduce-overhead", "max-autotune")
        if not self.cuda:
            data.keep_freed_memory()
        if self.distributed and not dist.is_initialized():
            # device_id: NCCL's collectives (the barriers) know their GPU. The timeout covers
            # rank 0 preparing an image folder while the others wait (load_data): NCCL's
            # default, 10 minutes, would end them first.
            backend = dict(backend="nccl", device_id=self.device) if self.cuda else dict(backend="gloo")
            dist.init_process_group(**backend, timeout=datetime.timedelta(hours=3))

    @property
    def main(self):
        return self.rank == 0

    def machine(self):
        """What a run's last bits depend on besides its settings, for config.json: the chip,
        and on the CPU the thread count and the instruction set torch dispatches to (each
        can sum in its own order, so the same seed may give other figures elsewhere)."""
        if self.cuda:
            return dict(device_name=torch.cuda.get_device_name(self.device))
        return dict(device_name=cpu_name(), threads=torch.get_num_threads(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability())

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def prepare(self, model):
        """The model to train: moved, laid out, compiled and wrapped for the ranks."""
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if self.distributed:
            model = nn.parallel.DistributedDataParallel(model)
        if not self.compile:
            return model
        # Compiled afresh: no graphs, recompile counts or CUDA graph pools carried over from the
        # runs before it in this process (a table's probes, the benchmark's variants); past
        # dynamo's recompile limit a model would silently run eager.
        torch.compiler.reset()
        # dynamic=False: an epoch's last, smaller batch gets a graph of its own. By default
        # dynamo would recompile for it with a symbolic batch size, and every full batch after
        # it would run that slower dynamic graph (the one --benchmark never times).
        return torch.compile(model, mode=None if self.compile is True else self.compile, dynamic=False)

    def batch(self, images, index, *, rotations=(0,), mean, std, **view):
        """The step's batch: view is the crop and flip (shifts, boxes, flips, size)."""
        # check_bounds=False by default: every index and box here is drawn inside the split,
        # and the op's range check would cost a host sync per step on CUDA.
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return rot_kernel.rotation_batch(images, index, mean=mean, std=std, rotations=rotations,
                                         channels_last=self.channels_last, check_bounds=self.check_bounds,
                                         out_dtype=torch.bfloat16 if self.amp else torch.float32, **view)

    def barrier(self):
        """The ranks wait for each other: after rank 0 has written what every rank reads
        next (a RotNet's model.pt, a probe's results.json)."""
        if self.distributed:
            dist.barrier()

    def sum(self, values):
        """Sums numbers (a list or a tensor) over the ranks: one host sync, so once an epoch."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()


# ----------------------------------------------------------------------------- the loop's pieces
def milestones(epochs, fractions=MILESTONES):
    return [max(1, round(f * epochs)) for f in fractions]


def make_optimizer(params, lr, epochs, fractions=MILESTONES, decay=LR_DECAY, fused=False):
    """SGD with Nesterov momentum and the original step schedule, stepped once per epoch;
    fused: one fused kernel for the whole update."""
    # fused=None, not False, when off: torch then picks its own default (foreach on CUDA).
    opt = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True,
                          fused=fused or None)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones(epochs, fractions), gamma=decay)


def batches(n, batch_size, rank=0, world=1, least=1):
    """Slices of one epoch: this rank's share of each global batch of batch_size; a last
    batch too small to give every rank `least` images is left out."""
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if size < least * world:
            break
        yield slice(start + rank * size // world, start + (rank + 1) * size // world)


def epoch_steps(ctx, n, batch_size):
    """This rank's slices of an epoch of n draws, refused when they make no step. Runs call
    it before writing anything too: a refused run leaves no config.json to be refused by."""
    steps = list(batches(n, batch_size, ctx.rank, ctx.world, least=2))  # BatchNorm needs 2
    require(steps, f"{n} training images an epoch make no step of at least 2 images a rank "
                   f"(--batch-size {batch_size}, {ctx.world} rank(s)): BatchNorm needs 2")
    return steps


def say_start(ctx, out, data, train, test, steps, epochs, first=1, image_size=None):
    """One line before a run trains: its folder, the images it found where (the full set or a
    sample, a folder's readable files) and their size, its steps and epochs, and its device.
    image_size: the size asked for, said where the images have another (CIFAR-10's, whatever
    is asked). Said where epochs first..epochs are still to train, after restore and every
    refusal (an error stays one line)."""
    if ctx.main and first <= epochs:
        size = train.shape[-1]
        unused = f" (not at {image_size}: --image-size is for image folders)" if image_size not in (None, size) else ""
        ranks = f" x {ctx.world} ranks" if ctx.distributed else ""
        to_train = f"epoch {first}" if first == epochs else f"epochs {first} to {epochs}"
        print(f"{out}: {len(train):,} training and {len(test):,} test images of {size} x {size} from {data}; "
              f"{steps:,} step{'s' * (steps != 1)} an epoch, {to_train}, on {ctx.device}{ranks}{unused}",
              file=sys.stderr, flush=True)


def say_if_too_few_steps(ctx, model, steps, epochs, first=1):
    """A note where a run makes too few steps in all for the BatchNorm running statistics it
    trains, which testing uses, to settle: its test accuracy then says little (a RotNet's
    sits at chance), which a user of a tiny folder would otherwise take for a bug. Said
    where epochs first..epochs are still to train, after restore (an error stays one line)."""
    if first > epochs:
        return
    model.train()  # (a frozen feature extractor stays in eval mode: its statistics are not trained)
    trained = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
                  for m in model.modules())
    if ctx.main and trained and steps * epochs < SETTLED_STEPS:
        print(f"note: {steps} step{'s' * (steps != 1)} an epoch, {steps * epochs} in all: too few for BatchNorm's "
              f"running statistics, which testing uses, to settle (about {SETTLED_STEPS}), so the test accuracy "
              "will say little; a smaller --batch-size, or more --epochs, makes more", file=sys.stderr, flush=True)


def train_step(ctx, net, opt, x, y):
    """One SGD step on a built batch; returns the logits and the loss (on the device). A
    network of several heads gives logits [heads, B, classes]: their losses are summed."""
    with ctx.autocast():
        logits = net(x)
    # bf16 logits: softmax and its sum in float32
    if logits.dim() == 3:
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.repeat(len(logits))) * len(logits)
    else:
        loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return logits, loss


def hits(logits, y, k=1):
    """How many of y are the top class (k=1) or among the top k: one count, or one per head."""
    if k == 1:
        return (logits.argmax(-1) == y).sum(-1)
    return (logits.topk(min(k, logits.shape[-1]), dim=-1).indices == y[:, None]).any(-1).sum(-1)


def percent(correct, total):
    """100 * correct / total, for one count or one per head."""
    return [100.0 * c / max(total, 1) for c in correct] if isinstance(correct, list) else 100.0 * correct / max(total, 1)


def train_epoch(ctx, net, opt, images, targets=None, *, recipe, mean, std, epoch, seed, batch_size,
                rotations=(0,), epoch_size=None):
    """One epoch over images (a data.Resident or Streamed split; epoch_size draws of it if
    given), viewed as the recipe says; targets are class labels (rotations=(0,)) or None
    (the rotation is the label). Returns (mean loss, accuracy % (one per head), source
    images seen), summed over the ranks."""
    net.train()
    H, W = images.shape[-2:]
    perm, view = recipe.draws(len(images), epoch, seed, ctx.device, H, W, epoch_size)
    size = recipe.out_size(H, W)
    # Sums stay on the device: reading them every step would make the CPU wait for the GPU.
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.int64)
    outputs = seen = 0
    steps = epoch_steps(ctx, len(perm), batch_size)
    bar = tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not ctx.main or None, file=sys.stderr)
    for s, (source, index) in zip(bar, images.batches(perm, steps)):
        x, y = ctx.batch(source, index, rotations=rotations, mean=mean, std=std, size=size,
                         **{k: v[s] for k, v in view.items()})
        if targets is not None:
            y = targets[perm[s]].repeat_interleave(len(rotations))
        logits, loss = train_step(ctx, net, opt, x, y)
        loss_sum += loss.detach() * len(y)
        correct = correct + hits(logits, y)
        outputs += len(y)
        seen += s.stop - s.start
    heads = correct.dim() == 1  # one count per head
    loss_sum, *correct, outputs, seen = ctx.sum([loss_sum.item(), *correct.reshape(-1).tolist(), outputs, seen])
    # Stopped here, before runs.end_epoch: checkpoint.pt keeps the last good epoch.
    require(math.isfinite(loss_sum), f"the training loss became {loss_sum} in epoch {epoch}: training diverged "
                                     "(try a lower --lr); the epochs before it are kept")
    return loss_sum / max(outputs, 1), percent(correct if heads else correct[0], outputs), int(seen)


@torch.no_grad()
def evaluate(ctx, net, images, targets=None, *, recipe, mean, std, rotations=(0,), k=1):
    """Top-k accuracy in % (one per head) over every rotation of every image of a
    data.Resident or Streamed split, seen as the recipe tests (no augmentation), in eval mode;
    k a tuple (1, 5): one such accuracy per k, from the same pass."""
    net.eval()
    H, W = images.shape[-2:]
    ks = k if isinstance(k, tuple) else (k,)
    correct, seen = torch.zeros((), device=ctx.device, dtype=torch.int64), 0
    # least=0: every image is tested, and every rank makes as many forward passes (some
    # perhaps of no image: DDP's forward may sync buffers, a collective all ranks must join)
    steps = list(batches(len(images), EVAL_BATCH * ctx.world, ctx.rank, ctx.world, least=0))
    order = torch.arange(len(images), device=ctx.device)
    for s, (source, index) in zip(steps, images.batches(order, steps)):
        x, y = ctx.batch(source, index, rotations=rotations, mean=mean, std=std, size=recipe.out_size(H, W),
                         **recipe.test_view(s.stop - s.start, H, W, ctx.device))
        if targets is not None:
            y = targets[order[s]].repeat_interleave(len(rotations))
        with ctx.autocast():
            logits = net(x)
        correct = correct + torch.stack([hits(logits, y, j) for j in ks])  # [k] or [k, head]
        seen += len(y)
    correct = correct.expand(len(ks)) if correct.dim() == 0 else correct  # (no image at all)
    *counts, seen = ctx.sum([*correct.reshape(-1).tolist(), seen])
    per_k = [percent(c, seen) for c in torch.tensor(counts).reshape(correct.shape).tolist()]
    return tuple(per_k) if isinstance(k, tuple) else per_k[0]
