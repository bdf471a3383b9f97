"""The pieces of the training loop that every script shares, written once: the settings
every run has, where a run computes (device, precision, ranks), one SGD step, one epoch,
evaluation, and the run files (config.json, metrics.jsonl, checkpoint.pt with --resume),
plus the command-line flags and the error path every script uses.

A script's own loop reads (rotnet.pretrain, probe.train_classifier):

    first, metrics = restore(ctx, out, config, resume, model, opt, sched)
    for epoch in range(first, epochs + 1):
        loss, acc, seen = train_epoch(ctx, net, opt, train, ...)
        test_acc = evaluate(ctx, net, test, ...)
        sched.step()
        end_epoch(ctx, out, epoch_metrics(...), model, opt, sched)
"""
import argparse
import contextlib
import dataclasses
import datetime
import errno
import gc
import json
import math
import os
import pathlib
import select
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import folders
import rot_kernel
from errors import UserError
from models import read_checkpoint

try:
    import fcntl  # the lock on a run's folder (Run.claim_out)
except ImportError:  # Windows: runs are not locked
    fcntl = None

# ----------------------------------------------------------------------------- settings
MILESTONES = (0.3, 0.6, 0.8)         # lr x0.2 at these fractions of the run
LR_DECAY = 0.2
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
EVAL_BATCH = 500                     # test images per forward pass (x rotations)
SEED_LIMIT = 2**40                   # |seed| below this: seed * 100_003 + epoch seeds a generator
WIDTHS = (1 / 64, 16)                # --width: from every layer keeping a channel to 256x the weights
# A file the run could not write: said in one line (run_job), the run's finished files kept.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
RANK_DELAY = 3.0                     # seconds a rank other than 0 waits to say an error (stop)
last_kept = None                     # (out, epochs kept) of the run this job is in: what Ctrl-C keeps
# What a resumed run may set anew: where and how fast it runs, not what it computes (and a
# probe's --checkpoint path, where its weights decide: by_weights).
MAY_CHANGE_ON_RESUME = {"resume", "device", "compile", "amp", "out", "data", "cache", "download", "eval_every",
                        "save_every"}


def require(ok, message):
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class Run:
    """The settings every training run shares (each script adds its own); config.json
    records them. Checked when made, so a direct call is validated as the command line is."""
    data: str = "./data"              # CIFAR-10 (its folder, parent or archive) or a folder of images
    image_size: int = 256            # S: a folder's images are prepared at S x S (CIFAR is 32)
    cache: Optional[str] = None      # where a folder is prepared (None: prepared/NAME-S)
    val_fraction: float = 0.1        # of a folder without val/: held out for testing
    out: str = "runs/rotnet"
    width: float = 1.0               # channel multiplier of the networks a run builds (1.0: the paper's)
    epochs: Optional[int] = None      # None (and batch_size, lr): the run's own schedule
    batch_size: Optional[int] = None  # source images per step (before rotations)
    lr: Optional[float] = None        # the original code's where not given
    seed: int = 0
    device: str = "auto"
    amp: bool = True                 # bf16 autocast on CUDA
    compile: bool = False
    resume: bool = False
    eval_every: int = 1
    download: bool = False

    def __post_init__(self):
        # BatchNorm needs two images a step: a batch of one trains nothing (train.batches)
        require(self.epochs is None or self.epochs >= 1, f"--epochs: at least 1, got {self.epochs}")
        require(self.batch_size is None or self.batch_size >= 2, f"--batch-size: at least 2, got {self.batch_size}")
        require(self.eval_every >= 1, f"--eval-every: at least 1, got {self.eval_every}")
        require(self.lr is None or 0 < self.lr < math.inf, f"--lr: must be positive and finite, got {self.lr}")
        require(WIDTHS[0] <= self.width <= WIDTHS[1], f"--width: from 1/64 to 16 (1 is the paper's), got {self.width}")
        require(-SEED_LIMIT < self.seed < SEED_LIMIT, f"--seed: below 2^40 in size, got {self.seed}")
        require(self.device in ("auto", "cpu", "cuda"), f"--device: auto, cpu or cuda, got {self.device!r}")
        require(self.image_size >= 8, f"--image-size: at least 8, got {self.image_size}")
        require(0 < self.val_fraction < 1, f"--val-fraction: between 0 and 1, got {self.val_fraction}")

    def check_out(self):
        """Without resume a run starts afresh: refused if out holds a run already, whose files
        it would overwrite (hours of training lost to a command run again without --resume)."""
        held = [n for n in ("model.pt", "results.json", "checkpoint.pt", "checkpoint.prev.pt")  # (.prev alone:
                if os.path.exists(os.path.join(self.out, n))]  # stopped between atomic_save's renames)
        if held and not self.resume:
            if not held[0].startswith("checkpoint"):  # finished: there is nothing to continue
                raise UserError(f"{self.out} holds a finished run ({held[0]}): give another --out, or delete it "
                                "to train again")
            raise UserError(f"{self.out} holds a run already ({held[0]}): add --resume to continue it, or give "
                            "another --out (or delete it to start again)")

    @contextlib.contextmanager
    def claim_out(self):
        """out, made and held while the run trains (rank 0 holds it for the ranks), then
        check_out: two processes training into one folder would overwrite each other's
        checkpoints and interleave their metrics. A lock on the folder itself, which the OS
        lets go however the process ends, so a killed run never leaves it held. A run that
        stops before writing anything leaves no folder it made. An --out inside the image
        folder is refused (refuse_out_in_images)."""
        refuse_out_in_images(self.out, self.data)
        if not main_rank():
            self.check_out()
            yield
            return
        made = not os.path.isdir(self.out)
        try:
            os.makedirs(self.out, exist_ok=True)
            folder = os.open(self.out, os.O_RDONLY)
        except OSError as err:  # under /proc, below a file, no permission: said before any data is read
            reason = "a file of that name exists" if isinstance(err, FileExistsError) else err.strerror or err
            raise UserError(f"--out {self.out}: cannot create the folder ({reason})") from None
        try:
            if fcntl:
                try:
                    fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(f"{self.out} is in use: another process is training into it; wait for it "
                                    "to end, or give another --out") from None
                except OSError:  # a file system without locks: the run goes on unlocked
                    pass
            self.check_out()
            yield
        except BaseException:
            if made and not os.listdir(self.out):
                os.rmdir(self.out)
            raise
        finally:
            os.close(folder)

    def load_data(self, ctx, recipe=None, labels_for=None, recorded=None):
        """The data set (one rank prepares or downloads it, the others wait, then reuse it);
        recipe: how the run will crop it (a folder too small for it is refused unprepared);
        labels_for: the run that needs labels (a folder without is refused unprepared);
        recorded: the settings the run's config.json will record (default: the Run fields).
        A --resume with other settings or on other images is refused first: restore would,
        after hours of preparing."""
        self.check_resumed_data(ctx, self.shared() if recorded is None else recorded)
        return main_first(ctx, lambda: data.load(self.data, image_size=self.image_size, download=self.download,
                                                 cache=self.cache, val_fraction=self.val_fraction, recipe=recipe,
                                                 labels_for=labels_for))

    def check_resumed_data(self, ctx, recorded):
        """Refuses, as restore would, a resume of a checkpoint in out made with other settings
        than recorded or on images since changed (from a listing): before the data is
        prepared, which may take hours. Restore checks the rest once it has read the checkpoint."""
        checkpoints = [os.path.join(self.out, name) for name in ("checkpoint.pt", "checkpoint.prev.pt")]
        if not (self.resume and any(map(os.path.exists, checkpoints))):
            return
        # (a Run field left None is resolved by the script, and recorded so)
        changed = changed_settings(self.out, {k: v for k, v in recorded.items() if v is not None})
        if not changed and "data_fingerprint" in saved_config(self.out):
            fingerprint = self.data_identity(ctx)["data_fingerprint"]
            changed = changed_settings(self.out, dict(data_fingerprint=fingerprint))
        refuse_changed(self.out, changed)

    def data_identity(self, ctx, labels_for=None):
        """data.identity of the run's data (for check_reusable), found without preparing it."""
        return main_first(ctx, lambda: data.identity(self.data, image_size=self.image_size, download=self.download,
                                                     val_fraction=self.val_fraction, labels_for=labels_for))

    @classmethod
    def from_args(cls, args):
        """The settings of this class that the parsed flags give (--no-amp is amp=False; a
        flag left at None keeps the setting's default)."""
        given = dict(vars(args), amp=not getattr(args, "no_amp", False))
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if given.get(f.name) is not None})

    def shared(self):
        """Just the Run fields: what a script hands on to a run it starts."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Run)}


def refuse_out_in_images(out, images):
    """Refuses an --out inside the image folder `images` (--data): the folder is never written
    to, and what a run wrote there would be listed with its images (a folder, as one more class)."""
    inside = os.path.realpath(os.path.expanduser(images))  # (--data=~/pictures reaches here as typed)
    if os.path.commonpath([os.path.realpath(os.path.expanduser(out)), inside]) == inside \
            and folders.is_image_folder(inside):
        raise UserError(f"--out {out} is inside the image folder {images}, which is never written to (what is "
                        "written there would be listed with its images): give an --out elsewhere")


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
                rotations=(0,), epoch_size=None, desc=None):
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
    bar = tqdm(steps, desc=desc or f"epoch {epoch}", leave=False, disable=not ctx.main or None, file=sys.stderr)
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
    # Stopped here, before end_epoch: checkpoint.pt keeps the last good epoch.
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


# ----------------------------------------------------------------------------- run files
def atomic_save(obj, path, keep_previous=False):
    """Written whole or not at all; with keep_previous the file it replaces stays as
    NAME.prev.pt, so a checkpoint damaged later still leaves a good one to resume from."""
    try:
        torch.save(obj, path + ".tmp")
    except RuntimeError as err:  # how torch.save says a write failed ("unexpected pos ...")
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else
                      f"could not write it ({str(err).splitlines()[0]})", path) from None
    if keep_previous and os.path.exists(path):
        os.replace(path, path[:-3] + ".prev.pt")
    os.replace(path + ".tmp", path)


def write_json(obj, path):
    """A run file (config.json, results.json, a table), written whole or not at all:
    results.json marks a finished run, which the tables and sweeps then reuse, and a table
    refuses a run whose config.json it cannot read, so a run stopped while writing one must
    leave the previous file or none, never half of one."""
    write_text(json.dumps(obj, indent=1), path)


def write_text(text, path):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_json(path):
    """A run file written by this project (results.json, config.json); a damaged one is a
    UserError that names it, not a traceback."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise UserError(f"{path} is damaged ({err}): delete its folder to run that run again") from None


def load_resume_checkpoint(ctx, out):
    """The newest good checkpoint in out: checkpoint.pt, else (damaged or cut short) the
    one before it. None when out has none; a UserError when none of them is good."""
    path = os.path.join(out, "checkpoint.pt")
    problems = []
    for p in [p for p in (path, path[:-3] + ".prev.pt") if os.path.exists(p)]:
        try:
            ckpt = read_checkpoint(p)
            require(isinstance(ckpt, dict) and {"model", "optimizer", "scheduler", "epoch", "rng"} <= set(ckpt),
                    f"{p}: not a checkpoint of this project")
        except UserError as err:
            problems.append(str(err))
            continue
        if problems and ctx.main:
            print(f"warning: {problems[0]}; resuming from {p} (epoch {ckpt['epoch']}) instead", file=sys.stderr)
        return ckpt
    require(not problems, f"{problems[0] if problems else path}; there is no earlier good checkpoint: "
            f"delete {out} (or run without --resume into another --out) to start again")
    return None


def header(text):
    """A line above the epoch lines of one run of several (a table's, a sweep's), naming it."""
    if main_rank():
        print(f"== {text}", flush=True)


def say_if_nothing_to_resume(out):
    """The --resume a user gave, to an --out that does not exist (mistyped, say): the run starts
    from the beginning, which is said rather than done silently. (restore says so of a folder
    that holds other files; the tables resume every run, so that one stays quiet.)"""
    if main_rank() and not os.path.exists(out):
        print(f"--resume: there is no {out}: starting from the beginning", file=sys.stderr)


def restore(ctx, out, config, resume, model, opt, sched):
    """Prepares --out (config.json; metrics.jsonl trimmed to the checkpoint) and, with
    resume, loads the newest good checkpoint into model, opt, sched and the RNGs.
    Returns (the first epoch to run, the metrics of the last epoch done)."""
    ckpt = load_resume_checkpoint(ctx, out) if resume else None
    global last_kept
    last_kept = (out, ckpt["epoch"] if ckpt else 0)  # (a job of several runs is in this one now)
    if resume and ckpt is None and ctx.main and os.path.isdir(out) and os.listdir(out):
        print(f"no checkpoint in {out}: starting from the beginning", file=sys.stderr)
    if ckpt:
        refuse_changed(out, changed_settings(out, config))
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            # the first mismatch, past "Error(s) in loading"
            detail = (lines[1] if len(lines) > 1 else lines[0]).rstrip(".")
            if detail.startswith(("Missing key(s)", "Unexpected key(s)")):  # (every key: the first three)
                keys = detail.split(", ")
                detail = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise UserError(f"{out}/checkpoint.pt was made with other settings ({detail}); "
                            "give this run another --out") from None
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if ctx.cuda and isinstance(ckpt["rng"].get("cuda"), torch.Tensor):  # made on a GPU
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], ctx.device)
        if ctx.main:
            done = isinstance(config.get("epochs"), int) and ckpt["epoch"] >= config["epochs"]
            print(f"resuming {out} after epoch {ckpt['epoch']}" + (": it was finished; nothing is trained, its "
                  "last epoch's files are written again" if done else ""), file=sys.stderr)
    if ctx.main:
        os.makedirs(out, exist_ok=True)
        # amp as it ran (bf16 autocast is for CUDA only, whatever --no-amp says), and the layout
        write_json(dict(config, amp=ctx.amp, channels_last=ctx.channels_last, torch=torch.__version__,
                        rot_kernel=rot_kernel.backend(), device=str(ctx.device),
                        world_size=ctx.world, distributed=ctx.distributed, **ctx.machine()),
                   os.path.join(out, "config.json"))
        # Keep exactly the epochs the checkpoint holds: a kill between the two writes of
        # an epoch leaves a metrics line the checkpoint has not got, a kill while appending
        # it half a line. Read whole before the file is replaced.
        done = ckpt["epoch"] if ckpt else 0
        path = os.path.join(out, "metrics.jsonl")
        lines = [ln for ln in (open(path).read().splitlines() if os.path.exists(path) else [])
                 if (e := epoch_of(ln)) is not None and e <= done]
        write_text("".join(ln + "\n" for ln in lines), path)
    return (ckpt["epoch"] + 1, ckpt["metrics"]) if ckpt else (1, {})


def refuse_changed(out, changed):
    """The one-line refusal of a resume with the settings in changed ({setting: (there, here)})."""
    if "kind" in changed:
        there, here = changed["kind"]
        raise UserError(f"{out} holds the run of {there}, not of {here}: give this run another --out")
    other_images = changed.pop("data_fingerprint", None)  # (said last: a setting changed may be why)
    differ = "; ".join(setting_change(k, there, here) for k, (there, here) in changed.items())
    require(not changed, f"{out} was made with other settings ({differ}): resume it with its own, "
                         "or give this run another --out")
    require(not other_images,
            f"{out} was trained on other images: the data in --data changed since (images added, removed or "
            "edited, held out otherwise, or another CIFAR-10 archive found there: --data may name the archive itself); "
            "resumed, it would test on images it trained on. Give this run another --out")


def setting_change(name, there, here):
    """How a refusal names one setting a run was made with (there) and the one asked for (here)."""
    said = f"{name} {there} there, {here} here"
    return said + " (--checkpoint holds other weights: trained anew?)" if name == "checkpoint_hash" else said


def saved_config(out):
    """out's config.json; {} when there is none, or it cannot be read."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


ROTNET, PROBE, SUPERVISED, ARM = "a RotNet pretraining", "a probe", "a supervised NIN", "a label-scarcity arm"


def run_kind(config):
    """What a run trains, from its config (config.json): ROTNET, PROBE, SUPERVISED or ARM (one
    of the sweep's, either kind); None for a config that does not say."""
    if "rotations" in config:
        return ROTNET
    if "arm" in config:
        return ARM
    return SUPERVISED if config.get("classifier") == "supervised" else PROBE if "classifier" in config else None


def trained_as(path):
    """run_kind of the run that made the network in checkpoint file path: a RotNet's model.pt
    (and its snapshots) list their rotations, and a run's checkpoint.pt lies beside its
    config.json. None where neither tells: the original code's files, any other file (the
    folder's config.json speaks for its run's own files only), one copied out of its run."""
    saved = read_checkpoint(path)
    if isinstance(saved, dict) and "rotations" in saved:
        return ROTNET
    path = os.path.realpath(path)
    if os.path.basename(path) not in ("checkpoint.pt", "checkpoint.prev.pt"):
        return None
    kind = run_kind(saved_config(os.path.dirname(path)))
    return None if kind == PROBE else kind  # (a probe's own checkpoint.pt holds no network alone)


def by_weights(saved, here):
    """Whether a probe's checkpoint is told by its weights, where both records hold their hash
    (checkpoint_hash), rather than by its path, which may be written otherwise or moved."""
    return "checkpoint_hash" in saved and "checkpoint_hash" in here


def changed_settings(out, config):
    """{setting: (there, here)} for those in config that differ from what out's run was made
    with (its config.json): resumed with others, a run would train something else than it records.
    (None to compare with: the checkpoint's shapes are still checked.)"""
    saved = saved_config(out)
    there, here = run_kind(saved), run_kind(config)
    if there and here and there != here:
        return {"kind": (there, here)}  # (every other setting would differ too)
    may_change = MAY_CHANGE_ON_RESUME | ({"checkpoint"} if by_weights(saved, config) else set())
    as_saved = lambda v: json.loads(json.dumps(v))  # tuples as lists, as config.json holds them
    return {k: (saved[k], as_saved(v)) for k, v in config.items() if k in saved and k not in may_change
            and not (data.same_images(saved[k], v) if k == "data_fingerprint" else saved[k] == as_saved(v))}


def epoch_of(line):
    """The epoch of a metrics.jsonl line; None for a line that is not one (cut short)."""
    try:
        epoch = json.loads(line)["epoch"]
    except (ValueError, TypeError, KeyError):
        return None
    return epoch if isinstance(epoch, int) else None


def end_epoch(ctx, out, metrics, model, opt, sched, **extra):
    """One metrics.jsonl line, then checkpoint.pt (atomic, the previous one kept): everything
    --resume needs; then one stdout line, last, so that a closed stdout (`| head`) stops the
    run with the epoch kept. Rank 0 writes."""
    if not ctx.main:
        return
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    # the run's own GPU only: resumed on a machine with fewer GPUs, a state for each would not fit
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(ctx.device) if ctx.cuda else None}
    atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     epoch=metrics["epoch"], rng=rng, metrics=metrics, **extra),
                os.path.join(out, "checkpoint.pt"), keep_previous=True)
    global last_kept
    last_kept = (out, metrics["epoch"])
    number = lambda v: f"{v:.4g}" if isinstance(v, float) else ",".join(map(number, v)) if isinstance(v, list) else f"{v}"
    print(" ".join(f"{k} {number(v)}" for k, v in metrics.items()), flush=True)


def epoch_metrics(epoch, lr, loss, acc, test_acc, seen, seconds):
    return dict(epoch=epoch, lr=lr, train_loss=loss, train_acc=acc, test_acc=test_acc,
                seconds=round(seconds, 3), images_per_s=round(seen / seconds, 1))


# ----------------------------------------------------------------------------- command line
def positive(kind):
    """An argparse type: a number of this kind above 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({kind.__name__}), got {text!r}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"must be positive and finite, got {value}")
        return value
    return parse


positive_int, positive_float = positive(int), positive(float)


def user_path(text):
    """A path flag: ~ expanded, as the shell does not in --out=~/runs."""
    return os.path.expanduser(text)


def add_common_flags(ap, epochs, out, scaled=False, out_help=None, width_of_checkpoint=False):
    """The flags every script shares, declared once, with the same meaning everywhere; out_help:
    what --out's help says of its default, where out (None) leaves it to the script;
    width_of_checkpoint: --width defaults to None, the --checkpoint's width (the sweep's)."""
    ap.add_argument("--data", default="./data", type=user_path,
                    help="CIFAR-10 (its folder, the folder holding it or its archive) or a folder of images: "
                    "train/<class>/ + val/<class>/, <class>/ folders, or unlabelled images (default: ./data)")
    ap.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --data if it is missing")
    ap.add_argument("--image-size", type=positive_int, default=256, metavar="S",
                    help="a folder's images are prepared once at S x S (shorter side to S, centre crop; "
                    "default: 256)")
    ap.add_argument("--cache", type=user_path, help="where a folder is prepared (default: prepared/NAME-S)")
    ap.add_argument("--val-fraction", type=positive_float, default=0.1,
                    help="share of a folder held out for testing when it has no val/ (a fixed, seeded split; "
                    "default: 0.1)")
    ap.add_argument("--epochs", type=positive_int, help=f"default: {epochs}")
    ap.add_argument("--batch-size", type=positive_int,
                    help="source images per step, before rotations (default: the original's: 128; AlexNet 192)")
    ap.add_argument("--lr", type=positive_float, help="default: the original's (0.1; AlexNet 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=positive_float, default=None if width_of_checkpoint else 1.0,
                    help="channel multiplier of the networks this run builds, 1/64 to 16 (1.0 is the paper's "
                    "NIN; default: " + ("the --checkpoint's, else 1.0)" if width_of_checkpoint else
                                        "1.0; a --checkpoint keeps its own)"))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=out, type=user_path,
                    help=f"folder for config.json, metrics.jsonl, checkpoint.pt and results (default: {out_help or out})")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--eval-every", type=positive_int, default=1, help="test every N epochs (and after the last)")
    if scaled:
        ap.add_argument("--epochs-scale", type=positive_float, default=1.0,
                        help="shrink every schedule in proportion (milestones included)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler ending the job), raised where the run is, as Ctrl-C is."""


def _terminated(signum, frame):
    raise Terminated


def run_job(job):
    """Every script's main: run the job, turn a problem the user can fix into one line
    (exit status 1), end the ranks. The ranks of a finished run leave together: a DDP model
    that only the garbage collector would free (its hooks make cycles) and a peer still at
    work (rank 0 writing files) both make gloo abort the process at teardown.
    SIGTERM stops a single process as Ctrl-C does, with the same line; not under torchrun,
    whose agent sends it to the ranks left when one fails, whose lines would bury its. (A
    worker forked from here puts SIGTERM back to its default: its parent ends it so.)"""
    global last_kept
    last_kept = None  # (this job's)
    on_term = "TORCHELASTIC_RUN_ID" not in os.environ and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_term else None
    try:
        result = job()
        if dist.is_initialized():
            gc.collect()
            dist.barrier()
        return result
    except UserError as err:
        stop(f"error: {err}", rank_delay=True)
    except RuntimeError as err:
        # A rank whose peer has stopped (rank 0 refusing the data, say) fails in its next
        # collective ("Connection reset by peer"): one line, not a traceback that buries
        # the peer's own error.
        if not (dist.is_initialized() and "peer" in str(err)):
            raise
        stop(f"error: rank {dist.get_rank()} stopped because another rank did (its error says why)",
             rank_delay=True)
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe (a worker's): not this
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nothing left to flush at exit)
        stop(f"stopped: its standard output was closed (a pipe ended); {_kept()}", status=1)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        stop(f"error: {err.filename or 'a run file'}: {err.strerror}; the files written before it are whole: "
             "make room, then run the same command again (a single run with --resume)")
    except KeyboardInterrupt as err:  # the files are whole (atomic): say how to go on, not where it stopped
        how, status = ("stopped by SIGTERM", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        if not main_rank():  # Ctrl-C reaches every rank: rank 0 says it
            sys.exit(status)
        stop(f"\n{how}: {_kept()}", status=status)
    finally:
        if on_term:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def _stdout_closed():
    """Whether stdout is a pipe whose reader has gone (`| head` done): the run can print no
    more, so it stops as Ctrl-C stops it. (poll says POLLERR on such a pipe's end.)"""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll (Windows), no stdout
        return False


def _kept():
    """What a run stopped midway keeps, and how to go on from it."""
    out, epochs = last_kept or (None, 0)
    kept = (f"{out} is kept up to epoch {epochs}, and all finished before it" if epochs else
            f"{out} had not ended an epoch yet; what was finished before it is kept" if out else
            "no run had started yet; what was finished before is kept")
    return (f"{kept} (epochs, finished runs, a folder's preparation); the same command goes on from it "
            "(a single run with --resume)")


def stop(message, status=1, rank_delay=False):
    """Says message and exits. Said here, before run_job ends the ranks, not at exit as
    sys.exit(message) would: under torchrun a peer learns of this rank's end at once, and
    its own line must not come first. rank_delay: a rank other than 0 says it only after
    RANK_DELAY seconds. Most problems every rank finds alike (a finished --out, bad data),
    and torchrun ends the other ranks as soon as rank 0 stops, so the line is said once; a
    problem of this rank alone is still said, a little later."""
    if rank_delay and not main_rank() and os.environ.get("TORCHELASTIC_RUN_ID"):
        time.sleep(RANK_DELAY)
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)
