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
import json
import os

import torch

import probe
import rotnet

# ----------------------------------------------------------------------------- settings
BLOCK = 2               # the paper's semi-supervised classifier sits on ConvB2
EPOCH_SIZE = 50_000     # samples per epoch, whatever K is
PAPER_CROSSOVER = 1000  # below about this many labels per class RotNet + conv wins (Fig. 5b)


def labelled_subset(labels, per_class, seed=None):
    """Indices of K training images of each class: the first K in data set order, or a
    random K with a seed."""
    chosen = []
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for c in range(10):
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise SystemExit(f"error: --per-class {per_class}: class {c} has only {len(members)} training images")
        if g is not None:
            members = members[torch.randperm(len(members), generator=g)]
        chosen.append(members[:per_class])
    return torch.cat(chosen).sort().values


def run_arm(args, arm, per_class, subset, checkpoint):
    """One arm for one K, in its own folder: reused when finished, resumed when stopped."""
    out = os.path.join(args.out, f"K{per_class}_{arm}")
    path = os.path.join(out, "results.json")
    kind = "conv" if arm == "rotnet_conv" else "supervised"
    probe.check_reusable(out, epochs=probe.schedule_epochs(args, kind), seed=args.seed,
                         epoch_size=args.epoch_size, subset_seed=args.subset_seed)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["test_acc"]
    torch.manual_seed(args.seed)
    if arm == "rotnet_conv":
        extractor = rotnet.load_model(checkpoint)
        model = probe.Probe(extractor, BLOCK, probe.make_classifier("conv", probe.feature_shape(extractor, BLOCK)))
    else:
        model = rotnet.NIN(blocks=3, num_classes=10, width=args.width)
    describe = dict(arm=arm, per_class=per_class, classifier=kind, block=BLOCK if kind == "conv" else None,
                    checkpoint=checkpoint if kind == "conv" else None, subset_seed=args.subset_seed)
    run_args = argparse.Namespace(**dict(vars(args), resume=True))
    return probe.train_classifier(run_args, model, kind, out, describe, subset, args.epoch_size)["test_acc"]


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
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title(f"Label scarcity (Figure 5b)\nthe paper: RotNet + conv wins below ~{PAPER_CROSSOVER} "
                 "labels per class", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(rows):
    lines = ["| labels per class | RotNet + conv | Supervised NIN | gap |", "|---|---|---|---|"]
    lines += [f"| {r['per_class']} | {r['rotnet_conv']:.2f} | {r['supervised']:.2f} | "
              f"{r['rotnet_conv'] - r['supervised']:+.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep(args):
    """Both arms for every K; rank 0 writes the results, the table and the figure."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    checkpoint = args.checkpoint or probe.pretrained(args, 4)
    try:
        rotnet.load_model(checkpoint)  # an unreadable checkpoint stops here, not after a run
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    labels = rotnet.load_cifar(args.data, args.download)[1]
    rows = []
    for k in args.per_class:
        subset = labelled_subset(labels, k, args.subset_seed)
        row = dict(per_class=k, rotnet_conv=run_arm(args, "rotnet_conv", k, subset, checkpoint),
                   supervised=run_arm(args, "supervised", k, subset, checkpoint))
        rows.append(row)
        if main_rank:
            print(f"K={k}: RotNet + conv {row['rotnet_conv']:.2f} %, supervised {row['supervised']:.2f} %, "
                  f"gap {row['rotnet_conv'] - row['supervised']:+.2f}", flush=True)
    if not main_rank:
        return
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(rows=rows, checkpoint=checkpoint, epoch_size=args.epoch_size), f, indent=1)
    with open(os.path.join(args.out, "semi_supervised.md"), "w") as f:
        f.write(markdown(rows))
    plot(rows, os.path.join(args.out, "semi_supervised.png"))
    print(markdown(rows) + f"\nwrote {args.out}/results.json, semi_supervised.md, semi_supervised.png")


def main(argv=None):
    args = parse_args(argv)
    rotnet.run_job(sweep, args)


def per_class_list(text):
    try:
        return sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rotnet.add_common_flags(ap, epochs=None, out="runs/semi_supervised")
    ap.add_argument("--per-class", required=True, type=per_class_list,
                    help="labelled images per class, e.g. 100 or 20,100,400,1000,5000")
    ap.add_argument("--checkpoint", help="a RotNet (model.pt or original format); default: pretrain one")
    ap.add_argument("--subset-seed", type=int, help="draw a random K per class instead of the first K")
    ap.add_argument("--epoch-size", type=int, default=EPOCH_SIZE, help="samples drawn per epoch")
    ap.add_argument("--width", type=float, default=1.0, help="NIN width (pretraining and supervised arm)")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="shrink every schedule in proportion")
    args = ap.parse_args(argv)
    if min(args.per_class) < 1 or args.epoch_size < 1 or (args.epochs is not None and args.epochs < 1):
        ap.error("--per-class, --epoch-size and --epochs must be at least 1")
    if args.epochs_scale <= 0 or args.width <= 0:
        ap.error("--epochs-scale and --width must be positive")
    os.makedirs(args.out, exist_ok=True)
    return args


if __name__ == "__main__":
    main()
