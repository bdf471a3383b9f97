"""The paper's figures from this project's runs: attention maps (Figure 3), first-layer
filters (Figure 4), training curves, and rotation vs object accuracy through pretraining
(Figure 5a).

    python figures.py attention --rotnet runs/rotnet/model.pt --supervised runs/probe/checkpoint.pt
    python figures.py filters   --rotnet runs/rotnet/model.pt --supervised runs/probe/checkpoint.pt
    python figures.py curves runs/rotnet runs/probe
    python figures.py rotation-vs-object runs/rotnet --probe-epochs 20   # trains one probe per snapshot

Each command writes one PNG into --out (default runs/figures) and prints its path.
"""
import argparse
import glob
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display, the same output on every machine
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cifar  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import listing  # noqa: E402
import probe  # noqa: E402
import rot_kernel  # noqa: E402
import rotnet  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from errors import UserError, require  # noqa: E402
from models import IMAGE_SIZE, file_hash, is_alexnet, load_model, read_checkpoint  # noqa: E402
from nin import NIN  # noqa: E402

# ----------------------------------------------------------------------------- settings
DPI = 100                      # with the sizes below (inches): PNG pixels = inches x 100
ATTENTION_CELL = 1.2           # inches per image panel of Figure 3
ATTENTION_HEADER = 0.8         # inches above the panels for the titles
ATTENTION_MAX_IMAGES = 50      # rows: 60 inches, 6,000 pixels (a renderer takes at most 65,536)
FILTERS_SIZE = (12.0, 5.0)     # Figure 4: two 4:3 grids and their titles, little white
CURVES_SIZE = (12.0, 4.6)
FIGURE5A_SIZE = (7.0, 4.6)
HEATMAP, HEATMAP_ALPHA = "jet", 0.5
PROBE_BLOCK = 2                # Figure 5(a): the non-linear classifier on ConvB2
SNAPSHOT = re.compile(r"model_epoch(\d+)\.pt$")


def need(path, what):
    if not os.path.exists(path):
        raise UserError(f"{path}: no such {what}")
    return path


def load_nin(path, device="cpu", *, is_rotnet):
    """A NIN (the figures show its blocks); an AlexNet is a one-line error. is_rotnet: True for
    --rotnet, False for --supervised, which are told apart where the file can tell
    (rotnet.not_a_rotnet, runs.trained_as)."""
    model = load_model(need(path, "checkpoint"), device)
    if not isinstance(model, NIN):
        raise UserError(f"{path} is an AlexNet: these figures show a NIN's blocks")
    if is_rotnet and (why := rotnet.not_a_rotnet(path, model)):
        raise UserError(f"--rotnet {path}: {why}, not a RotNet: is it the --supervised one?")
    if not is_rotnet and runs.trained_as(path) == runs.ROTNET:
        raise UserError(f"--supervised {path}: a RotNet's, not a supervised NIN's: is it the --rotnet one?")
    return model


def make_out(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot make the folder ({err.strerror})") from None


def save(fig, out, name):
    # No bbox_inches="tight": it would crop, and the pixel size would depend on the content.
    make_out(out)
    path = os.path.join(out, name)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(path)
    return path


# ----------------------------------------------------------------------------- Figure 3: attention
@torch.no_grad()
def attention_maps(model, images, power=1.0, mean=cifar.MEAN, std=cifar.STD):
    """For uint8 images [n, 3, S, S]: mean over channels of |output of block k|^power for every
    block k, upsampled (bilinear) to S x S and scaled to [0, 1] per map -> [n, K, S, S]. Power 1
    is the mean absolute activation, the paper's Figure 3; above 1 the strongest activations
    count more. The model sees the images as in testing (normalised, rotation 0); put it in
    eval mode."""
    device = next(model.parameters()).device
    images = images.to(device)
    x, _ = rot_kernel.rotation_batch(images, torch.arange(len(images), device=device),
                                     mean=mean, std=std, rotations=(0,))
    maps = []
    for k in range(1, len(model.blocks) + 1):
        a = model.features(x, k).float().abs().pow(power).mean(1, keepdim=True)
        a = F.interpolate(a, size=images.shape[-2:], mode="bilinear", align_corners=False)
        lo = a.amin(dim=(2, 3), keepdim=True)
        hi = a.amax(dim=(2, 3), keepdim=True)
        span = hi - lo  # (relative: an untrained block's activations may be 1e-8 in size)
        maps.append((a - lo) / span.masked_fill(span == 0, 1.0))  # a flat map stays 0, not NaN
    return torch.cat(maps, 1).cpu()


def pick_images(labels, n, classes):
    """The first test image of each class in turn (then the rest in order): varied and fixed."""
    firsts = [int((labels == c).nonzero()[0]) for c in range(classes) if (labels == c).any()]
    chosen = set(firsts)
    return (firsts + [i for i in range(len(labels)) if i not in chosen])[:n]


def attention_figure(rotnet_path, supervised_path, data_dir=None, out="runs/figures", images=6, power=1.0,
                     device="cpu", image_size=None, cache=None):
    """data_dir, image_size, cache: None, those the RotNet was pretrained on (run_images), where
    the config.json beside rotnet_path records them; else ./data, at 256."""
    nets = [("RotNet", load_nin(rotnet_path, device, is_rotnet=True)),
            ("Supervised", load_nin(supervised_path, device, is_rotnet=False))]
    run = os.path.dirname(rotnet_path) or "."
    if data_dir is None and not isinstance(runs.saved_config(run).get("data"), str):
        data_dir = "./data"  # not beside the run that made it (an original checkpoint, or moved)
    shown, pretrained_on = run_images(run, data_dir, image_size, cache, doing="Figure 3: showing")
    runs.refuse_out_in_images(out, shown["data"])
    if pretrained_on and listing.is_image_folder(shown["data"]):  # from a listing, before it is prepared
        found = data.identity(shown["data"], image_size=shown["image_size"], val_fraction=shown["val_fraction"])
        require_run_images(run, shown["data"], pretrained_on, found["data_fingerprint"])
    dataset = data.load(shown["data"], image_size=shown["image_size"], cache=shown["cache"],
                        val_fraction=shown["val_fraction"])
    require_run_images(run, shown["data"], pretrained_on, dataset.fingerprint)  # (CIFAR-10: once loaded)
    test_y = dataset.test_y if dataset.test_y is not None else torch.zeros(len(dataset.test_x), dtype=torch.int64)
    index = pick_images(test_y, images, len(dataset.classes))
    pictures = dataset.test_x[index]
    maps = [(name, attention_maps(net, pictures, power, dataset.mean, dataset.std)) for name, net in nets]
    columns = 1 + sum(m.shape[1] for _, m in maps)
    fig, axes = plt.subplots(len(index), columns, squeeze=False,
                             figsize=(columns * ATTENTION_CELL, len(index) * ATTENTION_CELL + ATTENTION_HEADER))
    for row, i in enumerate(index):
        rgb = pictures[row].permute(1, 2, 0).numpy()
        axes[row, 0].imshow(rgb, interpolation="nearest")
        axes[row, 0].set_ylabel(dataset.classes[int(test_y[i])] if dataset.classes else "", fontsize=9)
        col = 1
        for name, m in maps:
            for k in range(m.shape[1]):
                ax = axes[row, col]
                ax.imshow(rgb, interpolation="nearest")
                ax.imshow(m[row, k].numpy(), cmap=HEATMAP, alpha=HEATMAP_ALPHA, vmin=0, vmax=1,
                          interpolation="bilinear")
                if row == 0:
                    ax.set_title(f"{name}\nConvB{k + 1}", fontsize=9)
                col += 1
    axes[0, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    what = "|activation|" + (f"$^{{{power:g}}}$" if power != 1 else "")
    fig.suptitle(f"Attention maps: mean over channels of {what} of each block's output, scaled to [0, 1] per map",
                 fontsize=10)
    fig.subplots_adjust(left=0.3 / (columns * ATTENTION_CELL), right=0.99, bottom=0.01, wspace=0.05, hspace=0.05,
                        top=1 - ATTENTION_HEADER / (len(index) * ATTENTION_CELL + ATTENTION_HEADER))
    return save(fig, out, "attention.png")


# ----------------------------------------------------------------------------- Figure 4: filters
def filter_grid(weight, gap=1):
    """First-layer weights [C, 3, k, k] -> one RGB image of k x k tiles, each filter scaled to
    [0, 1] on its own (their scales differ a lot), on a white background."""
    w = weight.detach().float().cpu()
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = ((w - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1).numpy()
    n, k = len(w), w.shape[1]
    cols = math.ceil(math.sqrt(n * 4 / 3))  # a 4:3 grid: 192 filters -> 16 x 12
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (k + gap) + gap, cols * (k + gap) + gap, 3))
    for i in range(n):
        r, c = divmod(i, cols)
        grid[gap + r * (k + gap):gap + r * (k + gap) + k, gap + c * (k + gap):gap + c * (k + gap) + k] = w[i]
    return grid


def filters_figure(rotnet_path, supervised_path, out):
    fig, axes = plt.subplots(1, 2, figsize=FILTERS_SIZE, layout="constrained")
    nets = [("RotNet", rotnet_path, True), ("Supervised NIN", supervised_path, False)]
    for ax, (name, path, is_rotnet) in zip(axes, nets):
        weight = load_nin(path, is_rotnet=is_rotnet).blocks[0][0].conv.weight
        ax.imshow(filter_grid(weight), interpolation="nearest")
        ax.set_title(f"{name}: {weight.shape[0]} first-layer filters "
                     f"({weight.shape[2]}x{weight.shape[3]}x{weight.shape[1]})", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("First-layer filters, each scaled to [0, 1] on its own", fontsize=12)
    return save(fig, out, "filters.png")


# ----------------------------------------------------------------------------- training curves
def read_metrics(run_dir):
    path = need(os.path.join(run_dir, "metrics.jsonl"), "metrics file (is it a run folder?)")
    lines = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not (isinstance(row, dict) and {"epoch", "train_loss", "train_acc", "test_acc"} <= row.keys()):
                raise UserError(f"{path}, line {number}: not a metrics line of this project")
            lines.append(row)
    if not lines:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    return lines


def curves_figure(run_dirs, out):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=CURVES_SIZE, layout="constrained")
    for i, run in enumerate(run_dirs):
        metrics = read_metrics(run)
        label, color = os.path.basename(os.path.normpath(run)), f"C{i % 10}"
        epochs = [m["epoch"] for m in metrics]
        dot = dict(marker="o", ms=3) if len(epochs) == 1 else {}  # (one epoch: a line of one point shows nothing)
        ax_loss.plot(epochs, [m["train_loss"] for m in metrics], color=color, label=label, **dot)
        ax_acc.plot(epochs, [m["train_acc"] for m in metrics], color=color, label=f"{label} train", **dot)
        tested = [m for m in metrics if m.get("test_acc") is not None]  # --eval-every leaves gaps
        ax_acc.plot([m["epoch"] for m in tested], [m["test_acc"] for m in tested], color=color, ls="--",
                    marker="o" if len(tested) < 30 else None, ms=3, label=f"{label} test")
    ax_loss.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy (rotation for RotNet runs, object class for probes)", xlabel="epoch",
               ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, out, "curves.png")


# ----------------------------------------------------------------------------- Figure 5(a)
def snapshots(run_dir):
    """(epoch, path) of every model_epochNNN.pt in the run, by epoch."""
    need(run_dir, "folder")
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(glob.escape(run_dir), "model_epoch*.pt"))
             if (m := SNAPSHOT.search(os.path.basename(p)))]
    if not found:
        raise UserError(f"{run_dir}: no model_epochNNN.pt; pretrain with `rotnet.py --save-every N`")
    return sorted(found)


def rotation_accuracy(path):
    """A snapshot's test rotation accuracy, which rotnet.py --save-every stores in it."""
    saved = read_checkpoint(path)
    if is_alexnet(saved):  # (the probe's own refusal would name flags figures.py has not got)
        raise UserError(f"{path} is an AlexNet's: Figure 5a probes a NIN RotNet's ConvB2")
    if not (isinstance(saved, dict) and isinstance(saved.get("metrics"), dict) and "test_acc" in saved["metrics"]):
        raise UserError(f"{path}: not a snapshot of rotnet.py --save-every (it holds no test accuracy)")
    return saved["metrics"]["test_acc"]


def object_accuracy(p):
    """Test accuracy of the probe p (Probing), trained unless its results.json is there (an
    interrupted probe resumes)."""
    results = os.path.join(p.out, "results.json")
    if not os.path.exists(results):
        probe.probe(p)
    return runs.read_json(results)["test_acc"]


def run_images(run_dir, data_dir=None, image_size=None, cache=None, doing="Figure 5a: probing on"):
    """Which images a figure of a run looks at (Figure 5a's probes, Figure 3's maps): by
    default the run's own, as its config.json records them (a RotNet pretrained on a folder is
    probed on that folder, not on CIFAR-10), each setting given overriding the run's. Returns
    (Probing's data settings, the fingerprint those images must have: the run's, when its own
    are used; require_run_images checks it)."""
    made = runs.saved_config(run_dir)
    theirs = made.get("data") if isinstance(made.get("data"), str) else None
    # the run's own also where --data names them (its cache is then reused, its images checked)
    own = data_dir is None or (theirs is not None and os.path.exists(theirs) and os.path.exists(data_dir)
                               and os.path.samefile(theirs, data_dir))
    if own:  # a run without a record of its images (not this project's, or damaged) is not guessed at
        recorded = os.path.join(run_dir, "config.json")
        require(isinstance(made.get("data"), str),
                f"{recorded} does not say which images the run was pretrained on: give --data")
        require(os.path.exists(made["data"]),
                f"{made['data']} (the --data {recorded} records) is not "
                "here: give --data")
        if train.main_rank():
            unchecked = "" if made.get("data_fingerprint") else " (recorded before runs recorded their " \
                "images: not checked to be the same)"
            print(f"{doing} the run's own images, {made['data']}{unchecked}; --data for others",
                  file=sys.stderr)
    # the size the network learnt at, on any images (a run that does not say: its kind's)
    size = image_size or runs.learnt_size(made) or IMAGE_SIZE.get(made.get("arch"), IMAGE_SIZE["nin"])
    # its cache only at its size: at another, prepare would rebuild it (hours, for ImageNet)
    reuse = own and size == made.get("image_size")
    images = dict(data=made["data"] if own else data_dir, image_size=size,
                  cache=cache or (made.get("cache") if reuse else None), val_fraction=made.get("val_fraction", 0.1))
    return images, made.get("data_fingerprint") if own else None


def require_run_images(run_dir, data_dir, pretrained_on, found):
    """Refuses the run's --data, as its config.json records it (run_images), where it holds
    other images from here (found: their fingerprint): it may be relative to where the run ran,
    or changed since. pretrained_on None: other images were asked for, or the run is too old
    to say."""
    require(pretrained_on is None or data.same_images(pretrained_on, found),
            f"{data_dir} (the --data {os.path.join(run_dir, 'config.json')} records) does not hold the "
            "images the run was pretrained on, as seen from here (a path relative to where it ran, or a "
            "folder changed since): give --data")


def rotation_vs_object_figure(run_dir, data_dir=None, out="runs/figures", probe_epochs=None, device="cpu",
                              image_size=None, cache=None):
    """data_dir, image_size, cache: None, the run's own (run_images)."""
    found = snapshots(run_dir)
    accuracies = [rotation_accuracy(path) for _, path in found]  # every snapshot read before any probe trains
    images, pretrained_on = run_images(run_dir, data_dir, image_size, cache)
    runs.refuse_out_in_images(out, images["data"])
    probes = [probe.Probing(checkpoint=path, block=PROBE_BLOCK, classifier="nonlinear", **images, device=device,
                            resume=True, epochs=probe_epochs,
                            out=os.path.join(run_dir, "figure5a_probes", f"epoch{epoch:03d}")) for epoch, path in found]
    made_on = probes[0].data_identity(train.Context(device), labels_for="a probe")
    require_run_images(run_dir, images["data"], pretrained_on, made_on["data_fingerprint"])
    # A probe made otherwise is not reused: with other --probe-epochs, on a snapshot since trained
    # anew in place, or on other images (the snapshot's path may change: the run moved).
    fix = f"delete {os.path.join(run_dir, 'figure5a_probes')} to train its probes anew"
    for p in probes:
        runs.check_reusable(p.out, epochs=probe.schedule_epochs("nonlinear", probe_epochs),
                            checkpoint=p.checkpoint, checkpoint_hash=file_hash(p.checkpoint), identity=made_on,
                            fix=fix)
    make_out(out)  # and --out made
    rows = [(epoch, rot, object_accuracy(p)) for (epoch, _), rot, p in zip(found, accuracies, probes)]
    if not train.main_rank():  # under torchrun the ranks trained the probes; rank 0 draws
        return None
    print("epoch  rotation %  object %")
    for epoch, rot, obj in rows:
        print(f"{epoch:5d}  {rot:10.2f}  {obj:8.2f}")
    epochs, rot, obj = zip(*rows)
    fig, ax = plt.subplots(figsize=FIGURE5A_SIZE, layout="constrained")
    ax.plot(epochs, rot, "o-", label="rotation prediction (test)")
    ax.plot(epochs, obj, "s-", label=f"object classification (non-linear probe on ConvB{PROBE_BLOCK})")
    ax.set(title=f"Rotation vs object accuracy through pretraining ({os.path.basename(os.path.normpath(run_dir))})",
           xlabel="pretraining epoch", ylabel="test accuracy (%)")
    ax.set_ylim(0, 100)  # both accuracies on one fixed scale, comparable between runs
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    return save(fig, out, "rotation_vs_object.png")


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name, help, runs_models=False):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--out", default="runs/figures", type=cli.user_path,
                       help="folder for the PNG (default: runs/figures)")
        if runs_models:
            p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run")
        return p

    def networks(p):
        p.add_argument("--rotnet", required=True, type=cli.user_path,
                       help="a RotNet model.pt, checkpoint.pt or original checkpoint")
        p.add_argument("--supervised", required=True, type=cli.user_path,
                       help="a supervised NIN (probe.py --supervised: checkpoint.pt)")

    def images(p, help, whose):  # as the training scripts take them; by default, the run's own (run_images)
        p.add_argument("--data", type=cli.user_path, help=help)
        p.add_argument("--image-size", type=cli.positive_int, help=f"S of an image folder (default: {whose}, else 32)")
        p.add_argument("--cache", type=cli.user_path, help=f"where the image folder is prepared (default: {whose}, "
                       "for its own images at its size; else prepared/NAME-S)")

    p = command("attention", "Figure 3: attention maps of every block of both networks on a few test images",
                runs_models=True)
    networks(p)
    images(p, "CIFAR-10 or an image folder, whose test images are shown (default: the RotNet's own, as the "
           "config.json beside --rotnet records them; else ./data)", whose="the RotNet's")
    p.add_argument("--images", type=cli.positive_int, default=6,
                   help=f"how many test images (rows; at most {ATTENTION_MAX_IMAGES})")
    p.add_argument("--power", type=cli.positive_float, default=1.0,
                   help="p in mean over channels of |activation|^p (default 1: the mean absolute activation; "
                   "a larger p lets the strongest activations stand out more)")
    p = command("filters", "Figure 4: the first-layer 5x5 filters of both networks")
    networks(p)
    p = command("curves", "training curves (loss, train and test accuracy) of runs, from their metrics.jsonl")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", type=cli.user_path)
    p = command("rotation-vs-object",
                "Figure 5(a): rotation and object accuracy of every model_epochNNN.pt of a run "
                "(rotnet.py --save-every N). Trains one non-linear probe on ConvB2 PER SNAPSHOT, in "
                "RUN_DIR/figure5a_probes/epochNNN, and reuses those already finished; probes made with other "
                "settings (--probe-epochs, other images) are refused, not overwritten: the error names the "
                "folder to delete to train them anew.",
                runs_models=True)
    p.add_argument("run", metavar="RUN_DIR")
    images(p, "CIFAR-10 or an image folder (default: the run's own, as its config.json records it)",
           whose="the run's")
    p.add_argument("--probe-epochs", type=cli.positive_int, default=None,
                   help="epochs of each probe (default: probe.py's full schedule, 100)")
    args = ap.parse_args(argv)
    if getattr(args, "images", 0) > ATTENTION_MAX_IMAGES:
        ap.error(f"--images: at most {ATTENTION_MAX_IMAGES}, got {args.images}")
    return args


def figure(args):
    # Only Figure 5(a)'s probes train, and they may share the work out over torchrun's ranks;
    # the other figures are one process's work, which more ranks would only repeat.
    require(args.command == "rotation-vs-object" or train.world_size() == 1,
            f"figures.py {args.command} runs in one process: run it without torchrun")
    if args.command == "filters":
        return filters_figure(args.rotnet, args.supervised, args.out)
    if args.command == "curves":
        return curves_figure(args.runs, args.out)
    device = train.resolve_device(args.device)
    if args.command == "attention":
        return attention_figure(args.rotnet, args.supervised, data_dir=args.data, out=args.out, images=args.images,
                                power=args.power, device=device, image_size=args.image_size, cache=args.cache)
    return rotation_vs_object_figure(args.run, args.data, args.out, probe_epochs=args.probe_epochs, device=device,
                                     image_size=args.image_size, cache=args.cache)


def main(argv=None):
    args = parse_args(argv)
    cli.run_job(lambda: figure(args))


if __name__ == "__main__":
    main()
