"""Label scarcity (the paper's Figure 5b): with K labelled images per class, a conv
classifier on frozen RotNet features against a supervised NIN trained on the same labels.

    python semi_supervised.py --per-class 100
    python semi_supervised.py --per-class 20,100,400,1000,5000 --checkpoint runs/rotnet/model.pt

Without --checkpoint the 4-block RotNet is pretrained first (or reused from --out). The
labelled set is the first K training images of each class, as the original code chose
them (--subset-seed S: a random K per class instead). Every epoch draws --epoch-size
samples, cycling the small set, so small K still gets the full number of steps.
"""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

import cifar
import cli
import probe
import rotnet
import runs
import tables
import train
from errors import require
from models import file_hash, load_model
from nin import NIN, channels

# ----------------------------------------------------------------------------- settings
BLOCK = 2               # the paper's semi-supervised classifier sits on ConvB2
EPOCH_SIZE = 50_000     # samples per epoch, whatever K is
PAPER_CROSSOVER = 1000  # below about this many labels per class RotNet + conv wins (Fig. 5b)
PLOT_LEAST_SPAN = 10.0  # points of accuracy the figure's y axis spans at least: a 0.2 gap must not fill it
OTHER_OUT = "give the sweep another --out, or delete that folder to train it anew"  # (as tables.OTHER_OUT)


@dataclass(frozen=True)
class Sweep(runs.Run):
    width: Optional[float] = None      # the supervised NIN's; None: the --checkpoint RotNet's (else 1.0)
    out: str = "runs/semi_supervised"
    per_class: tuple = (100,)          # K: labelled images per class, one run of both arms each
    checkpoint: Optional[str] = None   # a 4-block RotNet; None: pretrain one in out
    subset_seed: Optional[int] = None  # None: the first K of each class, as the original code
    epoch_size: int = EPOCH_SIZE
    epochs_scale: float = 1.0          # each arm's own schedule x this, where epochs is not given

    def __post_init__(self):
        if self.width is None:  # (an unreadable checkpoint is a one-line error here already)
            object.__setattr__(self, "width", load_model(self.checkpoint).config["width"] if self.checkpoint else 1.0)
        if self.image_size is None:  # the size the RotNet learnt at
            object.__setattr__(self, "image_size", probe.probed_size(self.checkpoint))
        super().__post_init__()
        object.__setattr__(self, "per_class", tuple(sorted(set(self.per_class))))
        require(self.per_class and min(self.per_class) >= 1, f"--per-class: at least 1, got {list(self.per_class)}")
        require(self.epoch_size >= 2, f"--epoch-size: at least 2 (BatchNorm needs 2 a step), got {self.epoch_size}")
        require(self.subset_seed is None or -runs.SEED_LIMIT < self.subset_seed < runs.SEED_LIMIT,
                f"--subset-seed: below 2^40 in size, got {self.subset_seed}")
        require(0 < self.epochs_scale < math.inf,
                f"--epochs-scale: must be positive and finite, got {self.epochs_scale}")


def labelled_subset(labels, per_class, seed=None, classes=cifar.CLASSES):
    """Indices of K training images of each class (classes: their names, label order): the
    first K in data set order, or a random K with a seed."""
    chosen = []
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for c, name in enumerate(classes):
        members = (labels == c).nonzero().flatten()
        require(len(members) >= per_class,
                f"--per-class {per_class}: class {name!r} has only {len(members)} training images")
        if g is not None:
            members = members[torch.randperm(len(members), generator=g)]
        chosen.append(members[:per_class])
    return torch.cat(chosen).sort().values


def arm_settings(s, arm, per_class):
    """One arm for one K runs in its own folder: reused when finished, resumed when stopped."""
    kind = "conv" if arm == "rotnet_conv" else "supervised"
    out = os.path.join(s.out, f"K{per_class}_{arm}")
    return dataclasses.replace(s, out=out, resume=True), kind, probe.schedule_epochs(kind, s.epochs, s.epochs_scale)


def run_arm(s, dataset, arm, per_class, subset, checkpoint):
    """The arm's results.json: test_acc at the last epoch, best_test_acc at the best."""
    run, kind, epochs = arm_settings(s, arm, per_class)
    path = os.path.join(run.out, "results.json")
    if os.path.exists(path):
        return runs.read_json(path)
    runs.header(f"K={per_class}, {'RotNet + conv' if kind == 'conv' else 'supervised NIN'}: {run.out}")
    with run.claim_out():  # out held until the run ends
        torch.manual_seed(s.seed)
        if arm == "rotnet_conv":
            extractor = load_model(checkpoint)
            run = dataclasses.replace(run, width=extractor.config["width"])  # config.json: the network probed
            shape = probe.feature_shape(extractor, BLOCK, dataset.train_x.shape[-1])
            head = probe.make_classifier("conv", shape, len(dataset.classes), width=run.width)
            model = probe.Probe(extractor, BLOCK, head)
        else:
            model = NIN(blocks=3, num_classes=len(dataset.classes), width=s.width)
        describe = dict(arm=arm, per_class=per_class, classifier=kind, block=BLOCK if kind == "conv" else None,
                        checkpoint=checkpoint if kind == "conv" else None, subset_seed=s.subset_seed,
                        checkpoint_hash=file_hash(checkpoint) if kind == "conv" else None)
        return probe.train_classifier(model, run, dataset, kind=kind, epochs=epochs, describe=describe,
                                      subset=subset, epoch_size=s.epoch_size)


def y_limits(accuracies, least=PLOT_LEAST_SPAN):
    """The figure's accuracy axis: the accuracies with a margin, widened around them to span
    at least `least` points, kept within 0-100 %."""
    lo, hi = min(accuracies), max(accuracies)
    grow = max(least - (hi - lo), 0.1 * (hi - lo)) / 2
    lo, hi = lo - grow, hi + grow
    shift = max(-lo, 0.0) - max(hi - 100.0, 0.0)
    return lo + shift, hi + shift


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ks = [r["per_class"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    ax.plot(ks, [r["rotnet_conv"] for r in rows], "o-", label="RotNet + conv (frozen ConvB2)")
    ax.plot(ks, [r["supervised"] for r in rows], "s--", label="Supervised NIN")
    if min(ks) <= PAPER_CROSSOVER <= max(ks):
        ax.axvline(PAPER_CROSSOVER, color="gray", lw=0.8, ls=":")
    ax.set_ylim(*y_limits([r[arm] for r in rows for arm in ("rotnet_conv", "supervised")]))
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Label scarcity (Figure 5b)\nthe paper: RotNet + conv wins below ~{PAPER_CROSSOVER} "
                 "labels per class", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(rows):
    lines = ["| labels per class | RotNet + conv, last / best | Supervised NIN | gap |", "|---|---|---|---|"]
    best = lambda r: "–" if r["rotnet_conv_best"] is None else f"{r['rotnet_conv_best']:.2f}"
    lines += [f"| {r['per_class']} | {r['rotnet_conv']:.2f} / {best(r)} | {r['supervised']:.2f} | "
              f"{r['rotnet_conv'] - r['supervised']:+.2f} |" for r in rows]
    return "\n".join(lines) + ("\n\nTest accuracy, %, at each arm's last epoch, and the conv arm's best: the original "
                               "keeps the conv classifier's best epoch and the supervised NIN's last. The gap: the "
                               "last epochs'.\n")


def sweep(s: Sweep):
    """Both arms for every K; rank 0 writes the results, the table and the figure. Every K,
    the checkpoint and every folder's settings are checked before anything trains."""
    runs.refuse_out_in_images(s.out, s.data)  # (before the data, and naming the --out given)
    ctx = train.Context(s.device)  # the ranks (each run makes its own Context, with s's precision)
    dataset = s.load_data(ctx, labels_for="the label-scarcity sweep")
    probe.say_if_not_learnt_size(ctx, s)
    subsets = {k: labelled_subset(dataset.train_y, k, s.subset_seed, dataset.classes) for k in s.per_class}
    made_on = s.data_identity(ctx)  # no run made on other images is reused
    net = None if s.checkpoint else tables.rotnet_for(s, 4)
    checkpoint = s.checkpoint or os.path.join(net.out, "model.pt")
    if s.checkpoint:  # (an unreadable checkpoint stops here, not after a run)
        given = load_model(s.checkpoint)
        require(isinstance(given, NIN), f"{s.checkpoint} is an AlexNet: the sweep trains on a NIN RotNet's ConvB2 "
                                        "(Figure 5b)")
        why = rotnet.not_a_rotnet(s.checkpoint, given)
        require(not why, f"{s.checkpoint}: {why}, not a RotNet: the sweep's conv arms train on a RotNet's ConvB2")
        # the two arms compare how a network learnt, not how wide it is: the supervised NIN is as wide
        require(channels(given.config["width"]) == channels(s.width),
                f"--width {s.width!r}: the RotNet in --checkpoint is {given.config['width']!r} wide, and the "
                "supervised NIN it is compared with must be as wide: leave --width out to take the RotNet's")
    else:
        runs.check_reusable(net.out, epochs=net.epochs, width=net.width, seed=net.seed, batch_size=net.batch_size,
                            identity=made_on, fix=OTHER_OUT)
    # The RotNet the conv arms train on is known by its weights (not by how its path is written;
    # a file trained anew in place is another), or by its path until the sweep has trained it
    weights = dict(checkpoint=checkpoint, **({"checkpoint_hash": file_hash(checkpoint)}
                                             if os.path.exists(checkpoint) else {}))
    for k in s.per_class:
        for arm in ("rotnet_conv", "supervised"):
            run, kind, epochs = arm_settings(s, arm, k)
            schedule = probe.SCHEDULES[kind]
            # what the arm trains from: the RotNet's checkpoint, or a NIN of this width
            source = weights if kind == "conv" else dict(width=s.width)
            runs.check_reusable(run.out, epochs=epochs, seed=s.seed, epoch_size=s.epoch_size,
                                subset_seed=s.subset_seed, lr=s.lr or schedule.lr,
                                batch_size=s.batch_size or schedule.batch_size,
                                identity=made_on, fix=OTHER_OUT, **source)
    if net and not os.path.exists(checkpoint):
        runs.header(f"pretraining {net.out} ({net.epochs} epoch{'s' * (net.epochs != 1)})")
        rotnet.pretrain(net)
    rows = []
    for k in s.per_class:
        conv = run_arm(s, dataset, "rotnet_conv", k, subsets[k], checkpoint)
        supervised = run_arm(s, dataset, "supervised", k, subsets[k], checkpoint)
        # (no best where metrics.jsonl could not tell it, and on ranks but 0, whose rows are not written)
        row = dict(per_class=k, rotnet_conv=conv["test_acc"], rotnet_conv_best=conv.get("best_test_acc"),
                   supervised=supervised["test_acc"])
        rows.append(row)
        if ctx.main:
            print(f"K={k}: RotNet + conv {row['rotnet_conv']:.2f} %, supervised {row['supervised']:.2f} %, "
                  f"gap {row['rotnet_conv'] - row['supervised']:+.2f}", flush=True)
    if not ctx.main:
        return
    os.makedirs(s.out, exist_ok=True)
    runs.write_json(dict(rows=rows, checkpoint=runs.absolute(checkpoint), data=runs.absolute(s.data), width=s.width,
                         seed=s.seed, subset_seed=s.subset_seed, epochs=s.epochs, epochs_scale=s.epochs_scale,
                         epoch_size=s.epoch_size),
                    os.path.join(s.out, "results.json"))
    runs.write_text(markdown(rows), os.path.join(s.out, "semi_supervised.md"))
    plot(rows, os.path.join(s.out, "semi_supervised.png"))
    print(markdown(rows) + f"\nwrote {s.out}/results.json, semi_supervised.md, semi_supervised.png")


def per_class_list(text):
    try:
        values = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if values[0] < 1:
        raise argparse.ArgumentTypeError(f"every K must be at least 1, got {values[0]}")
    return tuple(values)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_flags(ap, epochs="each arm's own schedule (the RotNet pretrained without --checkpoint keeps "
                         "its 200 x --epochs-scale)", out="runs/semi_supervised", scaled=True,
                         width_of_checkpoint=True)
    ap.add_argument("--per-class", required=True, type=per_class_list,
                    help="labelled images per class, e.g. 100 or 20,100,400,1000,5000")
    ap.add_argument("--checkpoint", type=cli.user_path,
                    help="a RotNet (model.pt or original format; the supervised NIN is made as wide); default: "
                         "pretrain one")
    ap.add_argument("--subset-seed", type=int, help="draw a random K per class instead of the first K")
    ap.add_argument("--epoch-size", type=cli.positive_int, default=EPOCH_SIZE,
                    help=f"labelled images drawn per epoch, with repeats (default: {EPOCH_SIZE:,}, the size of "
                    "CIFAR-10's training set, whatever K: a small --per-class still trains for full epochs)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.run_job(lambda: sweep(Sweep.from_args(args)))


if __name__ == "__main__":
    main()
