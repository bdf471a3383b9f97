"""RotNet pretraining on CIFAR-10: a Network-In-Network learns to tell which of 0, 90, 180
and 270 degrees an image was turned by (Gidaris et al., ICLR 2018).

    python rotnet.py --epochs 100                     # the paper's 4-block model
    python rotnet.py --data DIR --download            # fetch CIFAR-10 first
    python rotnet.py --benchmark                      # training speed, no data needed
    torchrun --nproc_per_node=G rotnet.py ...         # several GPUs

The whole data set sits on the training device as uint8; every batch (all rotations of
128 images, shifted, flipped and normalised) is built there by rot_kernel.rotation_batch.
A run writes config.json, metrics.jsonl, checkpoint.pt (each epoch) and model.pt to --out.
"""
import argparse
import ctypes
import gc
import glob
import hashlib
import json
import math
import os
import pickle
import re
import sys
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import rot_kernel

# ----------------------------------------------------------------------------- settings
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_MEAN = (125.3, 123.0, 113.9)  # per channel, 0-255 scale, as the original code
CIFAR_STD = (63.0, 62.1, 66.7)
PAD = 4                              # zero-pad 4 and crop 32: shifts in [-4, 4]
MILESTONES = (0.3, 0.6, 0.8)         # lr x0.2 at these fractions of the run
LR_DECAY = 0.2
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
EVAL_BATCH = 500                     # test images per forward pass (x rotations)


# ----------------------------------------------------------------------------- data
class DataError(Exception):
    """A data set that is missing or damaged: the message is the whole story."""


class _CifarUnpickler(pickle.Unpickler):
    # CIFAR batches hold numpy arrays, lists and strings; anything else is not CIFAR and
    # may be code, so it is refused rather than run.
    # (_frombuffer: how protocol 5 stores arrays; it refuses object arrays.)
    ALLOWED = {(numpy_module, name) for numpy_module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def load_batch(path):
    """One CIFAR batch file (Python 2 or 3 pickle) -> uint8 [n, 3, 32, 32], int64 [n]."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        get = lambda key: batch[key] if key in batch else batch[key.encode()]
        images = np.asarray(get("data"), dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(get("labels"), dtype=np.int64)
        if len(images) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise ValueError(f"{len(images)} images but {len(labels)} labels in 0..9")
    except Exception as err:  # truncated, corrupt, or not a CIFAR batch at all
        raise DataError(f"{path} is damaged or not a CIFAR-10 batch ({type(err).__name__}: {err}); "
                        "delete it and unpack or download the data set again") from None
    return images, labels


def unpack(archive, dest):
    """Unpacks a .tar.gz into dest, refusing members that are not plain files or folders
    or that would land outside dest."""
    root = os.path.realpath(dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                target = os.path.realpath(os.path.join(root, m.name))
                if not (m.isfile() or m.isdir()) or os.path.commonpath([root, target]) != root:
                    raise DataError(f"{archive}: refusing to unpack {m.name!r} (not a plain file inside {dest})")
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **extra)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise DataError(f"{archive} is damaged ({type(err).__name__}: {err}); delete it and download it again") from None


def download(dest, url=None, md5=None):
    url, md5 = url or CIFAR_URL, md5 or CIFAR_MD5  # read at call time: a mirror can be set
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, os.path.basename(url))
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        urllib.request.urlretrieve(url, path + ".part")
    except OSError as err:
        raise DataError(f"could not download {url}: {err}") from None
    with open(path + ".part", "rb") as f:
        got = hashlib.md5(f.read()).hexdigest()
    if got != md5:
        os.remove(path + ".part")
        raise DataError(f"{url}: md5 {got} is not the expected {md5}; nothing was kept")
    os.replace(path + ".part", path)
    return path


def find_cifar(data, download_missing=False):
    """The cifar-10-batches-py folder for --data: the folder itself, a folder holding it, or
    a folder holding the archive (which is unpacked there)."""
    if os.path.isfile(os.path.join(data, "data_batch_1")):
        return data
    folder = os.path.join(data, "cifar-10-batches-py")
    if os.path.isdir(folder):
        return folder
    archives = sorted(glob.glob(os.path.join(data, "cifar-10*python.tar.gz")))
    if not archives and download_missing:
        archives = [download(data)]
    if archives:
        unpack(archives[0], data)
        if os.path.isdir(folder):
            return folder
        raise DataError(f"{archives[0]} holds no cifar-10-batches-py folder")
    raise DataError(f"CIFAR-10 not found: looked for {folder} and {data}/cifar-10-python.tar.gz; "
                    "run with --download to fetch it (or point --data at the folder)")


def load_cifar(data, download_missing=False):
    """CIFAR-10 as uint8 tensors: (train images [N,3,32,32], train labels, test images, test labels)."""
    folder = find_cifar(data, download_missing)
    parts = []
    for names in ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]):
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise DataError(f"{folder} lacks {', '.join(missing)}; unpack or download the data set again")
        batches = [load_batch(os.path.join(folder, n)) for n in names]
        parts.append(torch.from_numpy(np.concatenate([b[0] for b in batches])))
        parts.append(torch.from_numpy(np.concatenate([b[1] for b in batches])))
    return tuple(parts)


# ----------------------------------------------------------------------------- model
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)


class NIN(nn.Module):
    """Network-In-Network of the paper with 3 to 5 conv blocks; width scales the channels."""

    def __init__(self, blocks=4, num_classes=4, width=1.0):
        super().__init__()
        if not 3 <= blocks <= 5:
            raise ValueError(f"blocks: the paper's NIN has 3, 4 or 5 blocks, got {blocks}")
        c192, c160, c96 = (max(1, round(c * width)) for c in (192, 160, 96))
        stages = [[ConvBNReLU(3, c192, 5), ConvBNReLU(c192, c160, 1), ConvBNReLU(c160, c96, 1),
                   nn.MaxPool2d(3, stride=2, padding=1)],
                  [ConvBNReLU(c96, c192, 5), ConvBNReLU(c192, c192, 1), ConvBNReLU(c192, c192, 1),
                   nn.AvgPool2d(3, stride=2, padding=1)]]
        stages += [[ConvBNReLU(c192, c192, 3), ConvBNReLU(c192, c192, 1), ConvBNReLU(c192, c192, 1)]
                   for _ in range(blocks - 2)]
        self.blocks = nn.ModuleList(nn.Sequential(*s) for s in stages)
        self.head = nn.Linear(c192, num_classes)
        self.config = dict(blocks=blocks, num_classes=num_classes, width=width)
        for m in self.modules():  # the original initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.bias)

    def features(self, x, block):
        """The output of block `block` (1-based, after its pooling)."""
        if not 1 <= block <= len(self.blocks):
            raise ValueError(f"block: expected 1 to {len(self.blocks)}, got {block}")
        for stage in self.blocks[:block]:
            x = stage(x)
        return x

    def forward(self, x):
        return self.head(self.features(x, len(self.blocks)).mean(dim=(2, 3)))


_ORIGINAL_KEY = re.compile(r"_feature_blocks\.(\d+)\.Block\d+_ConvB(\d)\.layers\.(Conv|BatchNorm)\.(\w+)$")
_ORIGINAL_HEAD = re.compile(r"_feature_blocks\.(\d+)\.Classifier\.(\w+)$")


def from_original(state):
    """A state dict of the original implementation, in this NIN's names."""
    out = {}
    for key, value in state.items():
        if m := _ORIGINAL_KEY.match(key):
            stage, conv, kind, name = m.groups()
            out[f"blocks.{stage}.{int(conv) - 1}.{'conv' if kind == 'Conv' else 'bn'}.{name}"] = value
        elif m := _ORIGINAL_HEAD.match(key):
            out[f"head.{m.group(2)}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in an original-format checkpoint")
    return out


def load_model(path, device="cpu"):
    """A NIN in eval mode from this project's model.pt or checkpoint.pt, or from a
    checkpoint of the original implementation ({'epoch', 'network'})."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only found something that is not data
        raise ValueError(f"{path}: refused, it is not a plain weights file ({str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None
    if isinstance(saved, dict) and "network" in saved:
        state = from_original(saved["network"])
        blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        num_classes, c192 = state["head.weight"].shape
        config = dict(blocks=blocks, num_classes=num_classes, width=c192 / 192)
    elif isinstance(saved, dict) and "model" in saved and "model_config" in saved:
        state, config = saved["model"], saved["model_config"]
    else:
        raise ValueError(f"{path}: neither a model.pt/checkpoint.pt of this project nor an original checkpoint")
    model = NIN(**config)
    model.load_state_dict(state)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- training
def milestones(epochs, fractions=MILESTONES):
    return [max(1, round(f * epochs)) for f in fractions]


def make_optimizer(params, lr, epochs, fractions=MILESTONES):
    """SGD with Nesterov momentum and the original step schedule, stepped once per epoch."""
    opt = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones(epochs, fractions), gamma=LR_DECAY)


def epoch_draws(n, epoch, seed, device, size=None):
    """The epoch's order of n images (size draws: the images cycled in fresh orders, for a
    small labelled set), shifts and flips: a function of (seed, epoch) alone, so a resumed
    run draws exactly what the uninterrupted one did."""
    size = size or n
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    perm = torch.cat([torch.randperm(n, generator=g, device=device) for _ in range(-(-size // n))])[:size]
    shifts = torch.randint(-PAD, PAD + 1, (size, 2), generator=g, device=device)
    flips = torch.rand(size, generator=g, device=device) < 0.5
    return perm, shifts, flips


def batches(n, batch_size, rank=0, world=1):
    """Slices of one epoch: this rank's share of each global batch of batch_size."""
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if size < world:  # too small to give every rank an image
            break
        yield slice(start + rank * size // world, start + (rank + 1) * size // world)


def keep_freed_memory():
    """glibc hands big freed blocks (activations, batches) back to the OS at once, and the
    next step faults them in again page by page: on the CPU that was a third of each step.
    Keeping them mapped makes reuse free."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)     # M_MMAP_THRESHOLD: serve blocks below 1 GiB from the heap
        libc.mallopt(-1, 2**31 - 1)   # M_TRIM_THRESHOLD: and do not shrink it
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class Context:
    """Where and how a run computes: device, mixed precision, memory format, ranks."""

    def __init__(self, device="auto", amp=True, compile=False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.backends.cudnn.benchmark = True
        self.device = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.cuda = device == "cuda"
        self.amp = amp and self.cuda  # bf16 autocast; on the CPU it would only be slower
        self.channels_last = self.cuda
        self.compile = compile
        if not self.cuda:
            keep_freed_memory()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.cuda else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def prepare(self, model):
        """The model to train: moved, laid out, compiled and wrapped for the ranks."""
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        return torch.compile(model) if self.compile else model

    def batch(self, images, index, shifts=None, flips=None, rotations=(0,)):
        return rot_kernel.rotation_batch(images, index, shifts, flips, mean=CIFAR_MEAN, std=CIFAR_STD,
                                         rotations=rotations, channels_last=self.channels_last,
                                         out_dtype=torch.bfloat16 if self.amp else torch.float32)

    def sum(self, *values):
        """Sums float values over the ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


def train_epoch(ctx, model, opt, images, targets, epoch, seed, batch_size, rotations=(0,),
                epoch_size=None, desc=""):
    """One epoch over images (or epoch_size draws of them); targets are class labels
    (rotations=(0,)) or None (the rotation is the label). Returns (mean loss, accuracy %)."""
    model.train()
    perm, shifts, flips = epoch_draws(len(images), epoch, seed, ctx.device, epoch_size)
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.int64)
    seen = 0
    steps = list(batches(len(perm), batch_size, ctx.rank, ctx.world))
    for s in tqdm(steps, desc=desc, leave=False, disable=not ctx.main or None, file=sys.stderr):
        x, y = ctx.batch(images, perm[s], shifts[s], flips[s], rotations)
        if targets is not None:
            y = targets[perm[s]].repeat_interleave(len(rotations))
        with ctx.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    loss_total, correct_total, seen_total = ctx.sum(loss_sum.item(), correct.item(), seen)
    return loss_total / max(seen_total, 1), 100.0 * correct_total / max(seen_total, 1)


@torch.no_grad()
def evaluate(ctx, forward, images, targets=None, rotations=(0,)):
    """Accuracy in % over every rotation of every image (no augmentation)."""
    correct = seen = 0
    for s in batches(len(images), EVAL_BATCH * ctx.world, ctx.rank, ctx.world):
        index = torch.arange(s.start, s.stop, device=ctx.device)
        x, y = ctx.batch(images, index, rotations=rotations)
        if targets is not None:
            y = targets[index].repeat_interleave(len(rotations))
        with ctx.autocast():
            correct += (forward(x).argmax(1) == y).sum().item()
        seen += len(y)
    correct, seen = ctx.sum(correct, seen)
    return 100.0 * correct / max(seen, 1)


# ----------------------------------------------------------------------------- runs and files
def atomic_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_states():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def start_run(ctx, out, config, resume):
    """Prepares --out; returns the checkpoint to resume from (or None)."""
    ckpt_path = os.path.join(out, "checkpoint.pt")
    ckpt = None
    if resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    elif resume and ctx.main and os.path.isdir(out):
        print(f"no checkpoint in {out}: starting from the beginning", file=sys.stderr)
    if ctx.main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dict(config, torch=torch.__version__, rot_kernel=rot_kernel.backend(),
                           device=str(ctx.device), world_size=ctx.world,
                           device_name=torch.cuda.get_device_name(ctx.device) if ctx.cuda else None), f, indent=1)
        # Keep exactly the epochs the checkpoint holds: a kill between the two writes of
        # an epoch leaves a metrics line the checkpoint has not got.
        done = ckpt["epoch"] if ckpt else 0
        path = os.path.join(out, "metrics.jsonl")
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        with open(path, "w") as f:
            f.writelines(ln + "\n" for ln in lines if ln and json.loads(ln)["epoch"] <= done)
    return ckpt


def log_epoch(ctx, out, metrics):
    if not ctx.main:
        return
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()), flush=True)


def fit(ctx, out, config, model, opt, sched, epochs, run_epoch, evaluate_fn, eval_every=1,
        resume=False, extra_state=None, after_epoch=None):
    """The loop every script shares: one metrics line and one atomic checkpoint per epoch,
    --resume. run_epoch(epoch) -> (loss, accuracy, images seen); evaluate_fn() -> test
    accuracy. Returns the last epoch's metrics."""
    ckpt = start_run(ctx, out, config, resume)
    first, metrics = 1, {}
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"])
        first, metrics = ckpt["epoch"] + 1, ckpt["metrics"]
    for epoch in range(first, epochs + 1):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        loss, acc, seen = run_epoch(epoch)
        seconds = time.perf_counter() - t0
        test_acc = evaluate_fn() if epoch % eval_every == 0 or epoch == epochs else None
        sched.step()
        metrics = dict(epoch=epoch, lr=lr, train_loss=loss, train_acc=acc, test_acc=test_acc,
                       seconds=round(seconds, 3), images_per_s=round(seen / seconds, 1))
        log_epoch(ctx, out, metrics)
        if ctx.main:
            atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                             epoch=epoch, rng=rng_states(), metrics=metrics, **(extra_state or {})),
                        os.path.join(out, "checkpoint.pt"))
            if after_epoch:
                after_epoch(epoch, metrics)
    return metrics


# ----------------------------------------------------------------------------- pretraining
def pretrain(args, ctx=None):
    """RotNet pretraining as the command line describes it; returns the final metrics."""
    ctx = ctx or Context(args.device, amp=not args.no_amp, compile=args.compile)
    rotations = tuple(args.rotations)
    if args.download and ctx.world > 1:  # one rank fetches, the others wait for it
        if ctx.main:
            find_cifar(args.data, True)
        dist.barrier()
    train_x, _, test_x, _ = load_cifar(args.data, args.download)
    train_x, test_x = train_x.to(ctx.device), test_x.to(ctx.device)

    torch.manual_seed(args.seed)
    model = NIN(args.blocks, num_classes=len(rotations), width=args.width)
    net = ctx.prepare(model)
    opt, sched = make_optimizer(net.parameters(), args.lr, args.epochs)
    config = dict(vars(args), rotations=list(rotations), model_config=model.config)

    def run_epoch(epoch):
        loss, acc = train_epoch(ctx, net, opt, train_x, None, epoch, args.seed, args.batch_size,
                                rotations, desc=f"epoch {epoch}")
        return loss, acc, len(train_x)

    def test():
        net.eval()
        return evaluate(ctx, net, test_x, rotations=rotations)

    def save_model(name, metrics):
        atomic_save(dict(model=model.state_dict(), model_config=model.config, rotations=list(rotations),
                         metrics=metrics), os.path.join(args.out, name))

    def snapshot(epoch, metrics):  # --save-every: the models of Figure 5(a), each with its
        if args.save_every and epoch % args.save_every == 0:  # rotation accuracy
            save_model(f"model_epoch{epoch:03d}.pt",
                       metrics if metrics["test_acc"] is not None else dict(metrics, test_acc=test()))

    metrics = fit(ctx, args.out, config, model, opt, sched, args.epochs, run_epoch, test,
                  args.eval_every, args.resume, extra_state=dict(model_config=model.config),
                  after_epoch=snapshot)
    if ctx.main:
        save_model("model.pt", metrics)
        print(f"wrote {os.path.join(args.out, 'model.pt')}", file=sys.stderr)
    return metrics


def benchmark(args):
    """Training speed on random CIFAR-size data already on the device: images per second,
    the projected time of 100 epochs of CIFAR-10, and the share of batch building."""
    ctx = Context(args.device, amp=not args.no_amp, compile=args.compile)
    rotations = tuple(args.rotations)
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, device=ctx.device)
    torch.manual_seed(args.seed)
    model = NIN(args.blocks, num_classes=len(rotations), width=args.width)
    net = ctx.prepare(model)
    opt, _ = make_optimizer(net.parameters(), args.lr, 100)
    perm, shifts, flips = epoch_draws(len(images), 1, args.seed, ctx.device)
    steps = [s for _, s in zip(range(args.steps), batches(len(images), args.batch_size))]
    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)

    def build():
        for s in steps:
            ctx.batch(images, perm[s], shifts[s], flips[s], rotations)

    def train():
        net.train()
        for s in steps:
            x, y = ctx.batch(images, perm[s], shifts[s], flips[s], rotations)
            with ctx.autocast():
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def timed(fn):
        fn()  # warm-up: compilation, cudnn.benchmark, allocator
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    t_train, t_build = timed(train), timed(build)
    ips = len(steps) * args.batch_size / t_train
    result = dict(device=str(ctx.device), compile=args.compile, amp=ctx.amp, width=args.width, blocks=args.blocks,
                  batch_size=args.batch_size, rotations=list(rotations), steps=len(steps),
                  images_per_s=round(ips, 1), minutes_per_100_epochs=round(100 * 50_000 / ips / 60, 2),
                  batch_building_share=round(t_build / t_train, 4))
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- command line
def rotation_list(text):
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected degrees separated by commas, got {text!r}") from None


def add_common_flags(ap, epochs, out):
    """The flags every script shares, with the same meaning everywhere."""
    ap.add_argument("--data", default="./data", help="CIFAR-10 folder (or the folder holding it or its archive)")
    ap.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --data if it is missing")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--batch-size", type=int, default=128, help="source images per step (before rotations)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=out, help="folder for config.json, metrics.jsonl, checkpoint.pt and results")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--eval-every", type=int, default=1, help="test every N epochs (and after the last)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(ap, epochs=100, out="runs/rotnet")
    ap.add_argument("--blocks", type=int, default=4, choices=[3, 4, 5])
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 is the paper's NIN)")
    ap.add_argument("--rotations", type=rotation_list, default=(0, 90, 180, 270),
                    help="degrees, comma-separated: 0,90,180,270 (default), 0,180, 90,270 or the eight multiples of 45")
    ap.add_argument("--save-every", type=int, default=0, metavar="N",
                    help="also keep the model of every N-th epoch (model_epochNNN.pt)")
    ap.add_argument("--benchmark", action="store_true", help="time training steps on random data and exit")
    ap.add_argument("--steps", type=int, default=100, help="with --benchmark: steps to time")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_every", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.width <= 0 or args.save_every < 0:
        ap.error("--width must be positive and --save-every at least 0")
    if not (1 <= len(args.rotations) <= 8 and len(set(args.rotations)) == len(args.rotations)
            and all(0 <= r < 360 and r % 45 == 0 for r in args.rotations)):
        ap.error(f"--rotations: unique multiples of 45 in [0, 360), got {list(args.rotations)}")
    return args


def run_job(job, args):
    """Every script's main: run the job, turn a data problem into one line, end the ranks.
    The ranks of a finished run leave together: a DDP model that only the garbage collector
    would free (its hooks make cycles) and a peer still at work (rank 0 writing files) both
    make gloo abort the process at teardown."""
    try:
        job(args)
        if dist.is_initialized():
            gc.collect()
            dist.barrier()
    except DataError as err:
        sys.exit(f"error: {err}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    run_job(benchmark if args.benchmark else pretrain, args)


if __name__ == "__main__":
    main()
