"""Object classifiers on RotNet features, one probe at a time; `--table N` runs one of the
paper's Tables 1-3 (CIFAR-10, NIN) and 4-5 (ImageNet, AlexNet), which tables.py composes.

    python probe.py --checkpoint runs/rotnet/model.pt --block 2 --classifier nonlinear
    python probe.py --checkpoint original.pth --block 2 --classifier conv --finetune
    python probe.py --init random --blocks 4 --block 2 --classifier conv   # random features
    python probe.py --supervised                                           # supervised NIN
    python probe.py --table 1 [--epochs-scale 0.1]                         # a whole table
    python probe.py --table 5 --data IMAGENET --checkpoint runs/alexnet/model.pt

A classifier is trained on the output of block K of a NIN (frozen, in eval mode, unless
--finetune), or of conv K of an AlexNet (frozen), with the data's labels, the network's crop
and flip augmentation and rotation 0 only, then tested. Tables 1-3 pretrain the RotNets they
need, reuse every run already finished in --out, probe, and print our numbers beside the
paper's; Tables 4 and 5 probe the AlexNet RotNet given by --checkpoint.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

import alexnet
import cli
import data
import listing
import nin
import runs
import train
from errors import require
from models import IMAGE_SIZE, NETWORKS, file_hash, is_alexnet, load_model, read_checkpoint
from nin import NIN, init_conv_

# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Schedule:
    """How a classifier is trained (the original code's configs): epochs, the lr x0.2 at the
    milestones (fractions of the run), the batch size and the crops."""
    epochs: int
    milestones: tuple
    lr: float = 0.1
    batch_size: int = 128
    recipe: data.Recipe = data.Recipe("pad-crop")


IMAGENET_CROPS = data.Recipe("random-crop", 224)  # shorter side 256, random 224 crop + flip; test: centre
SCHEDULES = {"nonlinear": Schedule(100, (0.20, 0.40, 0.45)), "linear": Schedule(100, (0.20, 0.40, 0.45)),
             "conv": Schedule(100, (0.35, 0.70, 0.85)), "supervised": Schedule(200, train.MILESTONES),
             # on a frozen AlexNet (ImageNet): Table 5's linear probes and Table 4's non-linear ones
             "alexnet-linear": Schedule(35, (5 / 35, 15 / 35, 25 / 35), 0.01, 192, IMAGENET_CROPS),
             "alexnet-nonlinear": Schedule(40, (0.25, 0.50, 0.75), 0.01, 192, IMAGENET_CROPS)}
HIDDEN = 200           # the non-linear classifier's width
LINEAR_POOLS = (12, 7, 5, 6, 6)  # Table 5: conv1..conv5 max-pooled to about 9,000 values each


@dataclass(frozen=True)
class Probing(runs.Run):
    """One probe (or, with supervised, the supervised NIN); also the base settings of a table."""
    out: str = "runs/probe"
    checkpoint: Optional[str] = None  # model.pt, checkpoint.pt or an original-format checkpoint
    block: int = 2                    # 0 with an AlexNet: linear on conv1..5, nonlinear on conv4-5 at once
    classifier: str = "nonlinear"
    finetune: bool = False
    init: str = "checkpoint"          # or "random": probe a randomly initialised NIN
    blocks: int = 4                   # with init="random"
    supervised: bool = False
    epochs_scale: float = 1.0         # the classifier's own schedule x this, where epochs is not given

    def __post_init__(self):
        super().__post_init__()
        require(self.classifier in ("nonlinear", "linear", "conv"),
                f"--classifier: nonlinear, linear or conv, got {self.classifier!r}")
        require(self.init in ("checkpoint", "random"), f"--init: checkpoint or random, got {self.init!r}")
        require(not (self.checkpoint and (self.supervised or self.init == "random")),
                f"--checkpoint: {'--supervised' if self.supervised else '--init random'} trains from random weights, "
                "so the checkpoint would not be used: give one or the other")
        require(self.blocks in (3, 4, 5), f"--blocks: 3, 4 or 5, got {self.blocks}")
        require(self.block >= 0, f"--block: at least 1 (0: every conv of an AlexNet), got {self.block}")
        require(0 < self.epochs_scale < math.inf,
                f"--epochs-scale: must be positive and finite, got {self.epochs_scale}")
        if self.image_size is None:  # the size the network learnt at (a table's: the NIN's)
            object.__setattr__(self, "image_size", probed_size(self.checkpoint))


def probed_size(checkpoint):
    """The --image-size a probe of the network in checkpoint takes by default: the one it was
    pretrained at (its run's config.json), else the one its kind is made for; the NIN's
    without a checkpoint (--init random, --supervised). Reads the file only without a record."""
    if not checkpoint:
        return IMAGE_SIZE["nin"]
    recorded = runs.pretrained_size(checkpoint)
    return recorded or IMAGE_SIZE["alexnet" if is_alexnet(read_checkpoint(checkpoint)) else "nin"]


def say_if_not_learnt_size(ctx, s):
    """A note where s (a probe, the sweep) is given an --image-size other than the one its
    checkpoint's run learnt at, on an image folder (CIFAR-10's images are 32 x 32 whatever it is
    given). Said once the data is loaded, so that a refusal stays one line."""
    learnt = runs.pretrained_size(s.checkpoint) if s.checkpoint else None
    if ctx.main and learnt and learnt != s.image_size and listing.is_image_folder(os.path.expanduser(s.data)):
        print(f"note: --image-size {s.image_size}, but {s.checkpoint} learnt at {learnt} (its run's config.json): "
              f"its features may do worse at another size; leave --image-size out to use {learnt}",
              file=sys.stderr, flush=True)


def schedule_epochs(kind, epochs=None, epochs_scale=1.0):
    """epochs if given, else the classifier's own schedule shrunk by epochs_scale."""
    return epochs or max(1, round(SCHEDULES[kind].epochs * epochs_scale))


def schedule_kind(p, on_alexnet):
    """The SCHEDULES entry probe(p) trains by (on_alexnet: its checkpoint is an AlexNet)."""
    return "supervised" if p.supervised else f"alexnet-{p.classifier}" if on_alexnet else p.classifier


# ----------------------------------------------------------------------------- classifiers
def init_linear(m):
    # the original initialisation: N(0, sqrt(2 / out_features)), zero bias
    nn.init.normal_(m.weight, 0.0, (2.0 / m.out_features) ** 0.5)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


def make_classifier(kind, feature_shape, num_classes=10, width=1.0):
    """A classifier for features of shape (C, H, W); width: that of the NIN they come from,
    whose block 3 the conv classifier copies (the supervised NIN's block 3, as the paper has it)."""
    C, H, W = feature_shape
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), init_linear(nn.Linear(C * H * W, num_classes)))
    if kind == "nonlinear":
        return nn.Sequential(
            nn.Flatten(),
            init_linear(nn.Linear(C * H * W, HIDDEN, bias=False)), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True),
            init_linear(nn.Linear(HIDDEN, HIDDEN, bias=False)), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True),
            init_linear(nn.Linear(HIDDEN, num_classes)))
    if kind == "conv":  # a fresh copy of NIN block 3, global average pooling, a linear layer
        c = nin.channels(width)[0]
        block = nn.Sequential(nin.ConvBNReLU(C, c, 3), nin.ConvBNReLU(c, c, 1), nin.ConvBNReLU(c, c, 1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), init_linear(nn.Linear(c, num_classes)))
        for m in block.modules():  # (the original's, as for the others: its classifiers set their own)
            if isinstance(m, nn.Conv2d):
                init_conv_(m)
        return block
    raise ValueError(f"classifier: expected linear, nonlinear or conv, got {kind!r}")


class Probe(nn.Module):
    """A classifier on block `block` of a NIN (or conv `block` of an AlexNet). Frozen: the
    network stays in eval mode (its BatchNorm uses running statistics) and gets no gradients.
    Fine-tuned (a NIN): blocks 1 to `block` train with the classifier."""

    def __init__(self, extractor, block, classifier, finetune=False):
        super().__init__()
        self.extractor, self.block, self.classifier, self.finetune = extractor, block, classifier, finetune
        self.extractor.requires_grad_(False)
        if finetune:  # not the blocks after it, nor the head: DDP stops at a parameter with no gradient
            self.extractor.blocks[:block].requires_grad_(True)

    def train(self, mode=True):
        super().train(mode)
        if not self.finetune:
            self.extractor.eval()
        return self

    def forward(self, x):
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            features = self.extractor.features(x, self.block)
        return self.classifier(features)


def feature_shape(extractor, block, image_size=32):
    with torch.no_grad():
        return tuple(extractor.eval().features(torch.zeros(1, 3, image_size, image_size), block).shape[1:])


def alexnet_linear(channels, pool, num_classes):
    """Table 5's probe on one conv: max-pooled to pool x pool, normalised without affine
    parameters, one linear layer."""
    return nn.Sequential(nn.AdaptiveMaxPool2d(pool), nn.BatchNorm2d(channels, affine=False), nn.Flatten(),
                         init_linear(nn.Linear(channels * pool * pool, num_classes)))


def alexnet_nonlinear(extractor, block, num_classes):
    """Table 4's probe: on conv5, max-pool 3/2 and AlexNet's own two hidden layers (no bias,
    BN, ReLU) and a linear layer; on conv4, a fresh conv + BN + ReLU first."""
    require(block in (4, 5), f"--block {block}: the non-linear AlexNet probe sits on conv4 or conv5")
    c4, c5 = (extractor.convs[k].conv.out_channels for k in (3, 4))
    hidden = extractor.fc[0].linear.out_features
    layers = [alexnet.ConvBNReLU(c4, c5, 3, padding=1)] if block == 4 else []  # keeps its bias, as the original
    layers += [nn.MaxPool2d(3, stride=2), nn.Flatten(), alexnet.LinearBNReLU(c5 * alexnet.POOLED ** 2, hidden),
               alexnet.LinearBNReLU(hidden, hidden),
               nn.Linear(hidden, num_classes)]
    head = nn.Sequential(*layers)
    # The original's: conv weights N(0, sqrt(2 / (k * k * out))), linear ones N(0, sqrt(2 / out))
    # with biases 0, BatchNorm1d scales U(0, 1) (PyTorch 0.2's default)
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            init_conv_(m)
        elif isinstance(m, nn.Linear):
            init_linear(m)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.uniform_(m.weight, 0.0, 1.0)
    return head


class Heads(Probe):
    """Several probes on a frozen AlexNet, trained together from one forward pass of it, as
    the original trains them (Table 5's five linear ones, Table 4's two non-linear ones; the
    heads are independent, so this is training each alone, at a fraction of the cost):
    logits [heads, B, classes], their losses summed."""

    def __init__(self, extractor, blocks, heads):
        super().__init__(extractor, max(blocks), nn.ModuleList(heads))
        self.blocks = tuple(blocks)

    def forward(self, x):
        with torch.no_grad():
            maps = self.extractor.feature_maps(x, self.block)
        return torch.stack([head(maps[k - 1]) for head, k in zip(self.classifier, self.blocks)])


def alexnet_heads(extractor, classifier, num_classes):
    """--block 0 on an AlexNet: Table 5's linear probes on conv1..conv5, or Table 4's
    non-linear ones on conv4 and conv5."""
    if classifier == "linear":
        channels = [conv.conv.out_channels for conv in extractor.convs]
        heads = [alexnet_linear(c, pool, num_classes) for c, pool in zip(channels, LINEAR_POOLS)]
        return Heads(extractor, range(1, 6), heads)
    return Heads(extractor, (4, 5), [alexnet_nonlinear(extractor, k, num_classes) for k in (4, 5)])


# ----------------------------------------------------------------------------- training a classifier
def recorded_settings(s, kind, epochs, describe):
    """The settings a classifier's config.json records: s's, the schedule's lr and batch size
    where s leaves them None, its epochs, and describe (what it is, on what it trains)."""
    schedule = SCHEDULES[kind]
    return dict(dataclasses.asdict(s), lr=s.lr or schedule.lr, batch_size=s.batch_size or schedule.batch_size,
                epochs=epochs, **describe)


def train_classifier(model, s: runs.Run, dataset, *, kind, epochs, describe, subset=None, epoch_size=None):
    """Trains model (a Probe, Heads or a NIN) on the labels of dataset (of the training
    images in subset, epoch_size draws an epoch, if given) as SCHEDULES[kind] says, into
    s.out, which the caller holds (Run.claim_out); writes results.json and returns it."""
    ctx = train.Context(s.device, amp=s.amp, compile=s.compile)
    schedule = SCHEDULES[kind]
    recorded = recorded_settings(s, kind, epochs, describe)
    lr, batch_size = recorded["lr"], recorded["batch_size"]
    schedule.recipe.check(*dataset.train_x.shape[-2:])
    train_x, train_y = dataset.train_x, dataset.train_y
    if subset is not None:
        train_x, train_y = train_x[subset], train_y[subset]
    train_x, test_x = data.on_device(train_x, ctx.device), data.on_device(dataset.test_x, ctx.device)
    train_y, test_y = train_y.to(ctx.device), dataset.test_y.to(ctx.device)
    views = dict(recipe=schedule.recipe, mean=dataset.mean, std=dataset.std)
    # The ImageNet tables give top-5 too; of 5 classes or fewer it is 100 % whatever is learnt
    ks = (1, 5) if kind.startswith("alexnet") and len(dataset.classes) > 5 else (1,)
    net = ctx.prepare(model)
    trained = [p for p in net.parameters() if p.requires_grad]
    opt, sched = train.make_optimizer(trained, lr, epochs, schedule.milestones)
    config = dict(recorded, networks=NETWORKS, milestones=train.milestones(epochs, schedule.milestones),
                  data_fingerprint=dataset.fingerprint, cache=dataset.cache)
    # A supervised NIN's checkpoint.pt loads with models.load_model, as a RotNet's does.
    extra = dict(model_config=model.config) if isinstance(model, NIN) else {}
    steps = train.epoch_steps(ctx, epoch_size or len(train_x), batch_size)  # a run of no step: refused before config.json
    first, metrics = runs.restore(ctx, s.out, config, s.resume, model, opt, sched)
    train.say_start(ctx, s.out, s.data, train_x, test_x, len(steps), epochs, first, s.image_size)
    train.say_if_too_few_steps(ctx, model, len(steps), epochs, first)
    for epoch in range(first, epochs + 1):
        lr, t0 = opt.param_groups[0]["lr"], time.perf_counter()
        loss, acc, seen = train.train_epoch(ctx, net, opt, train_x, train_y, epoch=epoch, seed=s.seed,
                                             batch_size=batch_size, epoch_size=epoch_size, **views)
        seconds = time.perf_counter() - t0
        tested = epoch % s.eval_every == 0 or epoch == epochs
        test_acc, *top5 = train.evaluate(ctx, net, test_x, test_y, k=ks, **views) if tested else (None,)
        sched.step()
        metrics = dict(runs.epoch_metrics(epoch, lr, loss, acc, test_acc, seen, seconds),
                       **({"test_top5": top5[0]} if top5 else {}))
        runs.end_epoch(ctx, s.out, metrics, model, opt, sched, **extra)
    results = dict(describe, test_acc=metrics["test_acc"], train_acc=metrics["train_acc"], epochs=epochs)
    best = best_epoch(s.out) if ctx.main else None
    if best:
        results.update(best_test_acc=best[0], best_epoch=best[1])
    if 5 in ks:  # the last epoch's (from a checkpoint older than that record: measured now)
        top5 = metrics.get("test_top5")
        results["test_top5"] = top5 if top5 is not None else train.evaluate(ctx, net, test_x, test_y, k=5, **views)
    if ctx.main:
        runs.write_json(results, os.path.join(s.out, "results.json"))
        accuracy = results["test_acc"] if isinstance(results["test_acc"], list) else [results["test_acc"]]
        also = f", the best {best[0]:.2f} at epoch {best[1]}" if best and best[1] != epochs else ""
        print(f"test accuracy {', '.join(f'{a:.2f}' for a in accuracy)} %{also} ({s.out}/results.json)")
    ctx.barrier()  # tables and sweeps read results.json next, on every rank
    return results


def best_epoch(out):
    """(test accuracy, epoch) of the best tested epoch in out/metrics.jsonl, the first of equals.
    The original's CIFAR classifiers keep that one (best_metric = prec1), so the paper's CIFAR
    figures are the best over epochs on the test set. None where epochs have several (heads),
    or out has no metrics.jsonl (a run copied without it)."""
    best, path = None, os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:  # (a finished run's lines are whole)
            m = json.loads(line)
            if isinstance(m.get("test_acc"), (int, float)) and (best is None or m["test_acc"] > best[0]):
                best = (m["test_acc"], m["epoch"])
    return best


def probe(s: Probing):
    """The probe s describes (or the supervised NIN); returns its results."""
    require(s.supervised or s.init == "random" or s.checkpoint, "a probe needs a --checkpoint (or --init random)")
    with s.claim_out():  # out held until the run ends (checked first)
        extractor = load_model(s.checkpoint) if not s.supervised and s.init == "checkpoint" else None
        if extractor is not None:  # config.json records the network probed, not --width and --blocks
            s = dataclasses.replace(s, width=extractor.config["width"],
                                    blocks=extractor.config.get("blocks", s.blocks))
        on_alexnet = isinstance(extractor, alexnet.AlexNet)
        blocks = (len(extractor.convs) if on_alexnet else len(extractor.blocks)) if extractor else s.blocks
        require(s.supervised or s.block <= blocks, f"--block {s.block}: the network has blocks 1 to {blocks}")
        if on_alexnet:  # (all checked before the data, whose preparation may take hours)
            require(not s.finetune and s.classifier in ("linear", "nonlinear"),
                    "an AlexNet is probed frozen, by the linear or nonlinear classifier (Tables 5 and 4)")
            require(s.classifier == "linear" or s.block in (0, 4, 5),
                    f"--block {s.block}: the non-linear AlexNet probe (--classifier nonlinear, the default) sits "
                    "on conv4 or conv5; --classifier linear probes any of conv1-5")
        else:
            require(s.supervised or s.block >= 1, "--block 0 (every conv at once) is for an AlexNet")
        kind = schedule_kind(s, on_alexnet)
        if s.supervised:
            describe = dict(classifier="supervised", block=None, checkpoint=None, finetune=True, init="random")
        else:
            describe = dict(classifier=s.classifier, block=s.block, checkpoint=s.checkpoint, finetune=s.finetune,
                            init=s.init, checkpoint_hash=file_hash(s.checkpoint) if extractor else None)
        schedule = dict(kind=kind, describe=describe, epochs=schedule_epochs(kind, s.epochs, s.epochs_scale))
        ctx = train.Context(s.device)
        dataset = s.load_data(ctx, SCHEDULES[kind].recipe,
                              labels_for="the supervised NIN" if s.supervised else "a probe",
                              recorded=recorded_settings(s, **schedule))
        say_if_not_learnt_size(ctx, s)
        classes, size = len(dataset.classes), dataset.train_x.shape[-1]
        torch.manual_seed(s.seed)
        if s.supervised:
            return train_classifier(NIN(blocks=3, num_classes=classes, width=s.width), s, dataset, **schedule)
        if on_alexnet:
            if s.block == 0:
                return train_classifier(alexnet_heads(extractor, s.classifier, classes), s, dataset, **schedule)
            channels = extractor.convs[s.block - 1].conv.out_channels
            head = (alexnet_linear(channels, LINEAR_POOLS[s.block - 1], classes) if s.classifier == "linear"
                    else alexnet_nonlinear(extractor, s.block, classes))
            return train_classifier(Probe(extractor, s.block, head), s, dataset, **schedule)
        extractor = extractor or NIN(s.blocks, num_classes=4, width=s.width)
        classifier = make_classifier(s.classifier, feature_shape(extractor, s.block, size), classes,
                                     width=extractor.config["width"])
        model = Probe(extractor, s.block, classifier, s.finetune)
        return train_classifier(model, s, dataset, **schedule)


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_flags(ap, epochs="the classifier's own schedule (a table's RotNets keep their 200 x "
                         "--epochs-scale)", out=None, scaled=True, out_help="runs/tables with --table, else runs/probe")
    ap.add_argument("--checkpoint", type=cli.user_path,
                    help="model.pt, checkpoint.pt or an original-format checkpoint")
    ap.add_argument("--block", type=int, default=2,
                    help="which block's (or AlexNet conv's) output to classify, 1-based; 0, on an AlexNet: every "
                         "conv the classifier sits on, at once (linear: conv1..conv5, Table 5; nonlinear: conv4 "
                         "and conv5, Table 4)")
    ap.add_argument("--classifier", default="nonlinear", choices=["nonlinear", "linear", "conv"])
    ap.add_argument("--finetune", action="store_true", help="train the feature extractor as well")
    ap.add_argument("--init", default="checkpoint", choices=["checkpoint", "random"],
                    help="random: probe a randomly initialised NIN (--blocks, --width)")
    ap.add_argument("--blocks", type=int, default=4, choices=[3, 4, 5], help="with --init random")
    ap.add_argument("--supervised", action="store_true", help="train the 3-block NIN from scratch with labels")
    ap.add_argument("--table", type=int, choices=[1, 2, 3, 4, 5],
                    help="run everything one of the paper's tables needs (4 and 5: probe the AlexNet in "
                         "--checkpoint); --epochs and --lr are then its probes', --batch-size its probes' and "
                         "its RotNets' (which keep 200 x --epochs-scale epochs)")
    args = ap.parse_args(argv)
    if (args.table in (None, 4, 5)) and not args.supervised and args.init == "checkpoint" and not args.checkpoint:
        ap.error("give --checkpoint PATH, --init random, --supervised or --table N (4 and 5 with --checkpoint)")
    args.out = args.out or ("runs/tables" if args.table else "runs/probe")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        import tables  # tables.py is made of this module's probes
        cli.run_job(lambda: tables.run_table(args.table, Probing.from_args(args)))
    else:
        if args.resume:
            runs.say_if_nothing_to_resume(args.out)
        cli.run_job(lambda: probe(Probing.from_args(args)), single_run=True)


if __name__ == "__main__":
    main()
