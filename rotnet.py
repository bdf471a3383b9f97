"""RotNet pretraining: a network learns to tell which of 0, 90, 180 and 270 degrees an image
was turned by (Gidaris et al., ICLR 2018): the paper's NIN on CIFAR-10, or its AlexNet on
ImageNet or any folder of images.

    python rotnet.py --epochs 100                     # the paper's 4-block NIN on CIFAR-10
    python rotnet.py --data DIR --download            # fetch CIFAR-10 first
    python rotnet.py --data FOLDER                    # your own images, prepared once (at 32 x 32)
    python rotnet.py --arch alexnet --data IMAGENET   # the ImageNet model
    python rotnet.py --benchmark                      # training speed, no data needed
    python rotnet.py --benchmark --sweep --json P     # ... of each variant (compile, fp32, a DataLoader)
    torchrun --nproc_per_node=G rotnet.py ...         # several GPUs

The data set sits on the training device as uint8 (or is streamed to it); every batch (all
rotations of each image, cropped, flipped and normalised) is built there by
rot_kernel.rotation_batch. A run writes config.json, metrics.jsonl, checkpoint.pt (each
epoch) and model.pt to --out. What every script shares is in train.py (the loop's pieces),
runs.py (the run's files, --resume) and cli.py (flags, errors); the benchmark in benchmark.py.
"""
import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

import baseline
import data
from cli import add_common_flags, positive_int, run_job, user_path
from errors import UserError, require
from models import IMAGE_SIZE, NETWORKS, build
from runs import ROTNET, Run, atomic_save, end_epoch, epoch_metrics, restore, say_if_nothing_to_resume, trained_as
from train import (LR_DECAY, MILESTONES, Context, epoch_steps, evaluate, make_optimizer, say_if_too_few_steps,
                   say_start, train_epoch, world_size)

# ----------------------------------------------------------------------------- settings
FOUR = (0, 90, 180, 270)             # the paper's rotations
MOST_ROTATIONS = 8                   # the multiples of 45 degrees: a RotNet's head has 2 to 8 outputs


@dataclass(frozen=True)
class Arch:
    """What pretraining a network means (after the original code's configs): how images are
    cropped, the schedule (lr x decay at the milestones, fractions of the run), the batch
    size and the number of epochs."""
    recipe: data.Recipe
    lr: float
    decay: float
    milestones: tuple
    batch_size: int
    epochs: int


# CIFAR-10: 100 epochs, the second slide deck's rerun of the original, whose own 200
# the tables pretrain with (tables.PRETRAIN_EPOCHS); the milestones keep their fractions.
ARCHS = {"nin": Arch(data.Recipe("pad-crop"), lr=0.1, decay=LR_DECAY, milestones=MILESTONES, batch_size=128,
                     epochs=100),
         # ImageNet: lr 0.01 x0.1 at epochs 15, 30, 45 of 50 (the config's lr 0.1 is overridden
         # by its schedule from the first epoch); the paper's model was trained 30 epochs.
         "alexnet": Arch(data.Recipe("resized-crop", 224), lr=0.01, decay=0.1, milestones=(0.3, 0.6, 0.9),
                         batch_size=192, epochs=50)}


def check_rotations(rotations):
    rotations = tuple(rotations)
    require(2 <= len(rotations) <= MOST_ROTATIONS and len(set(rotations)) == len(rotations)
            and all(isinstance(r, int) and 0 <= r < 360 and r % 45 == 0 for r in rotations),
            f"rotations: 2 to 8 unique multiples of 45 in [0, 360) (one is nothing to tell apart), "
            f"got {list(rotations)}")
    return rotations


def not_a_rotnet(path, model):
    """Why the network `model` read from checkpoint file path is no RotNet, where that can be
    told (by trained_as, or by a head of more outputs than there are rotations); else None."""
    made_by, outputs = trained_as(path), model.config["num_classes"]
    if made_by not in (None, ROTNET):
        return f"{made_by}'s network"
    return f"a network of {outputs} outputs" if outputs > MOST_ROTATIONS else None


@dataclass(frozen=True)
class Pretraining(Run):
    arch: str = "nin"                # nin (CIFAR-10) or alexnet (ImageNet): ARCHS
    blocks: int = 4                  # of the NIN
    rotations: tuple = FOUR
    save_every: int = 0              # also keep model_epochNNN.pt every N epochs (Figure 5a)

    def __post_init__(self):
        require(self.arch in ARCHS, f"--arch: one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("epochs", "lr", "batch_size"):  # the arch's own where not given
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(ARCHS[self.arch], name))
        if self.image_size is None:
            object.__setattr__(self, "image_size", IMAGE_SIZE[self.arch])
        super().__post_init__()
        object.__setattr__(self, "rotations", check_rotations(self.rotations))
        require(self.blocks in (3, 4, 5), f"--blocks: the paper's NIN has 3, 4 or 5 blocks, got {self.blocks}")
        require(self.save_every >= 0, f"--save-every: at least 0, got {self.save_every}")


# ----------------------------------------------------------------------------- pretraining
def pretrain(s: Pretraining):
    """RotNet pretraining; writes the run files to s.out and returns the last epoch's metrics."""
    with s.claim_out():  # out held until the run ends (checked first)
        ctx = Context(s.device, amp=s.amp, compile=s.compile)
        arch = ARCHS[s.arch]
        dataset = s.load_data(ctx, arch.recipe, recorded=dataclasses.asdict(s))  # (as config.json, below)
        train_x, test_x = data.on_device(dataset.train_x, ctx.device), data.on_device(dataset.test_x, ctx.device)
        views = dict(recipe=arch.recipe, rotations=s.rotations, mean=dataset.mean, std=dataset.std)

        torch.manual_seed(s.seed)
        model = build(s.arch, num_classes=len(s.rotations), width=s.width, blocks=s.blocks)
        net = ctx.prepare(model)
        opt, sched = make_optimizer(net.parameters(), s.lr, s.epochs, arch.milestones, arch.decay)
        config = dict(dataclasses.asdict(s), model_config=model.config, data_fingerprint=dataset.fingerprint,
                      cache=dataset.cache, networks=NETWORKS)
        steps = epoch_steps(ctx, len(train_x), s.batch_size)  # a run of no step is refused before config.json is written
        first, metrics = restore(ctx, s.out, config, s.resume, model, opt, sched)
        say_start(ctx, s.out, s.data, train_x, test_x, len(steps), s.epochs, first, s.image_size)
        say_if_too_few_steps(ctx, model, len(steps), s.epochs, first)

        def save_model(name, metrics):
            atomic_save(dict(model=model.state_dict(), model_config=model.config, rotations=list(s.rotations),
                             metrics=metrics), os.path.join(s.out, name))

        for epoch in range(first, s.epochs + 1):
            lr, t0 = opt.param_groups[0]["lr"], time.perf_counter()
            loss, acc, seen = train_epoch(ctx, net, opt, train_x, epoch=epoch, seed=s.seed, batch_size=s.batch_size,
                                          **views)
            seconds = time.perf_counter() - t0
            tested = epoch % s.eval_every == 0 or epoch == s.epochs
            test_acc = evaluate(ctx, net, test_x, **views) if tested else None
            sched.step()
            metrics = epoch_metrics(epoch, lr, loss, acc, test_acc, seen, seconds)
            # Figure 5(a)'s models, each with its rotation accuracy (every rank evaluates), saved
            # before the epoch's checkpoint: a run stopped between the two redoes the epoch
            # and its snapshot, instead of going on without it.
            if s.save_every and epoch % s.save_every == 0:
                if test_acc is None:
                    test_acc = evaluate(ctx, net, test_x, **views)
                if ctx.main:
                    save_model(f"model_epoch{epoch:03d}.pt", dict(metrics, test_acc=test_acc))
            end_epoch(ctx, s.out, metrics, model, opt, sched, model_config=model.config)
        if ctx.main:
            save_model("model.pt", metrics)
            print(f"wrote {os.path.join(s.out, 'model.pt')}", file=sys.stderr)
        ctx.barrier()  # a table's probes, on every rank, read model.pt next
        return metrics


# ----------------------------------------------------------------------------- command line
def rotation_list(text):
    try:
        return check_rotations(int(r) for r in text.split(","))
    except (ValueError, UserError) as err:
        why = str(err) if isinstance(err, UserError) else f"expected degrees separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(why) from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(ap, epochs="100; AlexNet 50", out="runs/rotnet")
    ap.add_argument("--arch", default="nin", choices=list(ARCHS),
                    help="nin: the paper's CIFAR-10 network; alexnet: its ImageNet one (RandomResizedCrop 224)")
    ap.add_argument("--blocks", type=int, choices=[3, 4, 5], help="of the NIN (default: 4)")
    ap.add_argument("--rotations", type=rotation_list, default=FOUR,
                    help="degrees, comma-separated: 0,90,180,270 (default), 0,180, 90,270 or the eight multiples of 45")
    ap.add_argument("--save-every", type=int, default=0, metavar="N",
                    help="also keep the model of every N-th epoch (model_epochNNN.pt)")
    ap.add_argument("--benchmark", action="store_true", help="time training steps on random data and exit")
    ap.add_argument("--steps", type=positive_int, default=100, help="with --benchmark: steps to time (default: 100)")
    ap.add_argument("--baseline", action="store_true",
                    help="with --benchmark: also time the step fed by a conventional DataLoader (baseline.py)")
    ap.add_argument("--sweep", action="store_true", help="with --benchmark: time each variant (fp32, contiguous, "
                    "fused SGD, the DataLoader baseline, torch.compile modes) in one run; a table at the end")
    ap.add_argument("--workers", type=positive_int, default=baseline.WORKERS,
                    help="the DataLoader baseline's worker processes (default: %(default)s)")
    ap.add_argument("--json", metavar="PATH", type=user_path,
                    help="with --benchmark: also write the result (--sweep: every row) here")
    args = ap.parse_args(argv)
    for given, flag in ((args.baseline, "--baseline"), (args.sweep, "--sweep"), (args.json, "--json")):
        if given and not args.benchmark:
            ap.error(f"{flag}: only with --benchmark")
    if args.arch == "alexnet" and args.blocks is not None:
        ap.error("--blocks: the NIN's; the AlexNet has its five convs")
    if args.sweep and (args.compile or args.no_amp):
        ap.error("--sweep: each variant sets its own precision and compilation; leave out --compile and --no-amp")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        import benchmark  # benchmark.py builds on this module's settings

        def timed():
            # Each rank would time its own whole batch and write the same --json.
            require(world_size() == 1, "--benchmark times one process's training step: run it without torchrun")
            s, timing = Pretraining.from_args(args), dict(steps=args.steps, workers=args.workers, json_path=args.json)
            return (benchmark.sweep(s, **timing) if args.sweep
                    else benchmark.benchmark(s, dataloader=args.baseline, **timing))
        run_job(timed)
    else:
        if args.resume:
            say_if_nothing_to_resume(args.out)
        run_job(lambda: pretrain(Pretraining.from_args(args)), single_run=True)


if __name__ == "__main__":
    main()
