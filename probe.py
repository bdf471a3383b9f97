"""Object classifiers on RotNet features: the paper's Tables 1, 2 and 3.

    python probe.py --checkpoint runs/rotnet/model.pt --block 2 --classifier nonlinear
    python probe.py --checkpoint original.pth --block 2 --classifier conv --finetune
    python probe.py --init random --blocks 4 --block 2 --classifier conv   # random features
    python probe.py --supervised                                           # supervised NIN
    python probe.py --table 1 [--epochs-scale 0.1]                         # a whole table

A classifier is trained on the output of block K of a NIN (frozen, in eval mode, unless
--finetune) with CIFAR-10 labels, crop + flip augmentation and rotation 0 only, then tested.
A table pretrains the RotNets it needs with rotnet.py, reuses every run already finished
in --out, probes, and prints our numbers beside the paper's.
"""
import argparse
import json
import os

import torch
import torch.nn as nn

import rotnet

# ----------------------------------------------------------------------------- settings
# Each classifier's schedule: epochs and where the lr drops x0.2, as fractions of the run.
SCHEDULES = {"nonlinear": (100, (0.20, 0.40, 0.45)), "linear": (100, (0.20, 0.40, 0.45)),
             "conv": (100, (0.35, 0.70, 0.85)), "supervised": (200, rotnet.MILESTONES)}
PRETRAIN_EPOCHS = 200  # the original code's RotNet schedule, used by the tables
HIDDEN = 200           # the non-linear classifier's width

FOUR, EIGHT = (0, 90, 180, 270), tuple(range(0, 360, 45))
PAPER_TABLE1 = {3: (85.45, 88.26, 62.09), 4: (85.07, 89.06, 86.21, 61.73),
                5: (85.04, 89.76, 86.82, 74.50, 50.37)}
PAPER_TABLE2 = {FOUR: 89.06, EIGHT: 88.51, (0, 180): 87.46, (90, 270): 85.52}
PAPER_TABLE3 = {"Supervised NIN": 92.80, "Random Init. + conv": 72.50, "RotNet + non-linear": 89.06,
                "RotNet + conv": 91.16, "RotNet + non-linear (fine-tuned)": 91.73,
                "RotNet + conv (fine-tuned)": 92.17}


# ----------------------------------------------------------------------------- classifiers
def init_linear(m):
    # the original initialisation: N(0, sqrt(2 / out_features)), zero bias
    nn.init.normal_(m.weight, 0.0, (2.0 / m.out_features) ** 0.5)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


def make_classifier(kind, feature_shape, num_classes=10):
    """A classifier for features of shape (C, H, W)."""
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
        width = 192
        block = nn.Sequential(rotnet.ConvBNReLU(C, width, 3), rotnet.ConvBNReLU(width, width, 1),
                              rotnet.ConvBNReLU(width, width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(width, num_classes))
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
        nn.init.zeros_(block[-1].bias)
        return block
    raise ValueError(f"classifier: expected linear, nonlinear or conv, got {kind!r}")


class Probe(nn.Module):
    """A classifier on block `block` of a NIN. Frozen: the NIN stays in eval mode (its
    BatchNorm uses running statistics) and gets no gradients."""

    def __init__(self, extractor, block, classifier, finetune=False):
        super().__init__()
        self.extractor, self.block, self.classifier, self.finetune = extractor, block, classifier, finetune
        self.extractor.requires_grad_(finetune)

    def train(self, mode=True):
        super().train(mode)
        if not self.finetune:
            self.extractor.eval()
        return self

    def forward(self, x):
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            features = self.extractor.features(x, self.block)
        return self.classifier(features)


def feature_shape(extractor, block):
    with torch.no_grad():
        return tuple(extractor.eval().features(torch.zeros(1, 3, 32, 32), block).shape[1:])


# ----------------------------------------------------------------------------- one probe
def schedule_epochs(args, kind):
    """--epochs, else the classifier's own schedule shrunk by --epochs-scale."""
    return args.epochs or max(1, round(SCHEDULES[kind][0] * args.epochs_scale))


def train_classifier(args, model, kind, out, describe, subset=None, epoch_size=None):
    """Trains model (a Probe or a NIN) on CIFAR-10 labels (of the training images in subset,
    epoch_size draws an epoch, if given); writes results.json and returns it."""
    ctx = rotnet.Context(args.device, amp=not args.no_amp, compile=args.compile)
    train_x, train_y, test_x, test_y = rotnet.load_cifar(args.data, args.download)
    if subset is not None:
        train_x, train_y = train_x[subset], train_y[subset]
    train_x, train_y, test_x, test_y = (t.to(ctx.device) for t in (train_x, train_y, test_x, test_y))
    epochs, fractions = schedule_epochs(args, kind), SCHEDULES[kind][1]
    net = ctx.prepare(model)
    opt, sched = rotnet.make_optimizer([p for p in net.parameters() if p.requires_grad], args.lr, epochs, fractions)
    config = dict(vars(args), epochs=epochs, milestones=rotnet.milestones(epochs, fractions), **describe)

    def run_epoch(epoch):
        loss, acc = rotnet.train_epoch(ctx, net, opt, train_x, train_y, epoch, args.seed, args.batch_size,
                                       epoch_size=epoch_size, desc=f"epoch {epoch}")
        return loss, acc, epoch_size or len(train_x)

    def test():
        net.eval()
        return rotnet.evaluate(ctx, net, test_x, test_y)

    # A supervised NIN's checkpoint.pt loads with rotnet.load_model, as a RotNet's does.
    extra = dict(model_config=model.config) if isinstance(model, rotnet.NIN) else None
    metrics = rotnet.fit(ctx, out, config, model, opt, sched, epochs, run_epoch, test, args.eval_every,
                         args.resume, extra_state=extra)
    results = dict(describe, test_acc=metrics["test_acc"], train_acc=metrics["train_acc"], epochs=epochs)
    if ctx.main:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"test accuracy {results['test_acc']:.2f} % ({out}/results.json)")
    return results


def probe(args, out=None):
    """The probe the flags describe (or the supervised NIN); returns its results."""
    out = out or args.out
    torch.manual_seed(args.seed)
    if args.supervised:
        model = rotnet.NIN(blocks=3, num_classes=10, width=args.width)
        describe = dict(classifier="supervised", block=None, checkpoint=None, finetune=True, init="random")
        return train_classifier(args, model, "supervised", out, describe)
    if args.init == "random":
        extractor = rotnet.NIN(args.blocks, num_classes=4, width=args.width)
    else:
        try:
            extractor = rotnet.load_model(args.checkpoint)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if not 1 <= args.block <= len(extractor.blocks):
        raise SystemExit(f"error: --block {args.block}: the network has blocks 1 to {len(extractor.blocks)}")
    classifier = make_classifier(args.classifier, feature_shape(extractor, args.block))
    model = Probe(extractor, args.block, classifier, args.finetune)
    describe = dict(classifier=args.classifier, block=args.block, checkpoint=args.checkpoint,
                    finetune=args.finetune, init=args.init)
    return train_classifier(args, model, args.classifier, out, describe)


# ----------------------------------------------------------------------------- tables
def check_reusable(out, **wanted):
    """A run in out (finished or stopped) is reused only if it was made with these settings."""
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        differ = [f"{k} {saved.get(k)} there, {v} here" for k, v in wanted.items() if saved.get(k) != v]
        if differ:
            raise SystemExit(f"error: {out} was made with other settings ({'; '.join(differ)}): "
                             "give this run another --out")


def pretrained(args, blocks, rotations=FOUR):
    """model.pt of a RotNet pretrained with these settings in --out, trained if missing."""
    out = os.path.join(args.out, f"rotnet_{blocks}blocks_rot{'-'.join(map(str, rotations))}")
    path = os.path.join(out, "model.pt")
    epochs = max(1, round(PRETRAIN_EPOCHS * args.epochs_scale))
    check_reusable(out, epochs=epochs, width=args.width, seed=args.seed)
    if not os.path.exists(path):
        flags = ["--data", args.data, "--epochs", str(epochs), "--batch-size", str(args.batch_size),
                 "--blocks", str(blocks), "--width", str(args.width), "--rotations", ",".join(map(str, rotations)),
                 "--seed", str(args.seed), "--device", args.device, "--out", out, "--resume",
                 "--eval-every", str(args.eval_every)]
        rotnet.pretrain(rotnet.parse_args(flags + ["--compile"] * args.compile + ["--no-amp"] * args.no_amp))
    return path


def probed(args, **settings):
    """Test accuracy of one probe, run in --out if missing (resumed if interrupted). Its
    folder is named after its settings, so the tables share the runs they have in common."""
    p = dict(supervised=False, init="checkpoint", checkpoint=None, block=2, classifier="nonlinear",
             finetune=False, blocks=4, resume=True)
    p.update(settings)
    if p["supervised"]:
        name = "supervised_nin"
    else:
        source = f"random_{p['blocks']}blocks" if p["init"] == "random" else os.path.basename(os.path.dirname(p["checkpoint"]))
        name = f"{source}_convb{p['block']}_{p['classifier']}" + ("_finetuned" if p["finetune"] else "")
    out = os.path.join(args.out, name)
    path = os.path.join(out, "results.json")
    check_reusable(out, epochs=schedule_epochs(args, "supervised" if p["supervised"] else p["classifier"]),
                   seed=args.seed)
    if not os.path.exists(path):
        probe(argparse.Namespace(**dict(vars(args), **p)), out)
    with open(path) as f:
        return json.load(f)["test_acc"]


def table1(args):
    rows = []
    for blocks, paper in PAPER_TABLE1.items():
        model = pretrained(args, blocks)
        ours = [probed(args, checkpoint=model, block=k) for k in range(1, blocks + 1)]
        rows.append((f"RotNet, {blocks} blocks", ours, paper))
    return ["ConvB1", "ConvB2", "ConvB3", "ConvB4", "ConvB5"], rows


def table2(args):
    rows = []
    for rotations, paper in PAPER_TABLE2.items():
        ours = probed(args, checkpoint=pretrained(args, 4, rotations), block=2)
        rows.append((f"{len(rotations)}: " + ", ".join(f"{r}°" for r in rotations), [ours], [paper]))
    return ["accuracy"], rows


def table3(args):
    model = pretrained(args, 4)
    runs = {"Supervised NIN": dict(supervised=True),
            "Random Init. + conv": dict(init="random", classifier="conv"),
            "RotNet + non-linear": dict(checkpoint=model),
            "RotNet + conv": dict(checkpoint=model, classifier="conv"),
            "RotNet + non-linear (fine-tuned)": dict(checkpoint=model, finetune=True),
            "RotNet + conv (fine-tuned)": dict(checkpoint=model, classifier="conv", finetune=True)}
    rows = [(method, [probed(args, **settings)], [PAPER_TABLE3[method]]) for method, settings in runs.items()]
    return ["accuracy"], rows


def format_table(number, columns, rows):
    """Markdown: each cell 'ours (paper)', in % of CIFAR-10 test accuracy."""
    lines = [f"| Table {number} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, ours, paper in rows:
        cells = [f"{o:.2f} ({p:.2f})" for o, p in zip(ours, paper)] + ["–"] * (len(columns) - len(ours))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nOurs, with the paper's number in brackets (CIFAR-10 test accuracy, %).\n"


def run_table(args):
    columns, rows = {1: table1, 2: table2, 3: table3}[args.table](args)
    text = format_table(args.table, columns, rows)
    print(text)
    # table1.md, table2.md, ...: the tables share one --out and its pretrained RotNets
    with open(os.path.join(args.out, f"table{args.table}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"table{args.table}.json"), "w") as f:
        json.dump(dict(table=args.table, columns=columns, epochs_scale=args.epochs_scale, width=args.width,
                       rows=[dict(name=n, ours=o, paper=p) for n, o, p in rows]), f, indent=1)


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rotnet.add_common_flags(ap, epochs=None, out=None)
    ap.add_argument("--checkpoint", help="model.pt, checkpoint.pt or an original-format checkpoint")
    ap.add_argument("--block", type=int, default=2, help="which block's output to classify (1-based)")
    ap.add_argument("--classifier", default="nonlinear", choices=["nonlinear", "linear", "conv"])
    ap.add_argument("--finetune", action="store_true", help="train the feature extractor as well")
    ap.add_argument("--init", default="checkpoint", choices=["checkpoint", "random"],
                    help="random: probe a randomly initialised NIN (--blocks, --width)")
    ap.add_argument("--blocks", type=int, default=4, choices=[3, 4, 5], help="with --init random")
    ap.add_argument("--width", type=float, default=1.0, help="NIN width for --init random, --supervised, --table")
    ap.add_argument("--supervised", action="store_true", help="train the 3-block NIN from scratch with labels")
    ap.add_argument("--table", type=int, choices=[1, 2, 3], help="run everything one of the paper's tables needs")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="shrink every schedule in proportion")
    args = ap.parse_args(argv)
    if args.table is None and not args.supervised and args.init == "checkpoint" and not args.checkpoint:
        ap.error("give --checkpoint PATH, --init random, --supervised or --table N")
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be at least 1")
    if args.epochs_scale <= 0 or args.width <= 0:
        ap.error("--epochs-scale and --width must be positive")
    args.out = args.out or ("runs/tables" if args.table else "runs/probe")
    return args


def main(argv=None):
    args = parse_args(argv)
    rotnet.run_job(run_table if args.table else probe, args)


if __name__ == "__main__":
    main()
