"""The paper's tables, one command each (`python probe.py --table N`): Tables 1-3 on CIFAR-10
with the NIN, 4 and 5 on ImageNet with the AlexNet RotNet given by --checkpoint. A table
pretrains the RotNets it needs into --out (Tables 1-3), reuses every run already finished
there, resumes a stopped one, trains its probes (probe.probe) and prints ours beside the
paper's, into tableN.md and tableN.json.
"""
import dataclasses
import os

import probe
import rotnet
import runs
import train
from errors import require
from models import file_hash, is_alexnet, read_checkpoint
from rotnet import FOUR

# ----------------------------------------------------------------------------- settings
PRETRAIN_EPOCHS = 200  # the original code's RotNet schedule, used by the tables
EIGHT = tuple(range(0, 360, 45))
PAPER_TABLE1 = {3: (85.45, 88.26, 62.09), 4: (85.07, 89.06, 86.21, 61.73),
                5: (85.04, 89.76, 86.82, 74.50, 50.37)}
PAPER_TABLE2 = {FOUR: 89.06, EIGHT: 88.51, (0, 180): 87.46, (90, 270): 85.52}
PAPER_TABLE3 = {"Supervised NIN": 92.80, "Random Init. + conv": 72.50, "RotNet + non-linear": 89.06,
                "RotNet + conv": 91.16, "RotNet + non-linear (fine-tuned)": 91.73,
                "RotNet + conv (fine-tuned)": 92.17}
PAPER_TABLE4 = (50.0, 43.8)                     # ImageNet top-1: conv4, conv5
PAPER_TABLE5 = (18.8, 31.7, 38.7, 38.2, 36.5)   # ImageNet top-1: conv1..conv5
# A run in the table's --out made otherwise is refused, naming its folder (which the user did not type)
OTHER_OUT = "give the table another --out, or delete that folder to train it anew"


# ----------------------------------------------------------------------------- the tables' runs
def rotnet_for(s, blocks, rotations=FOUR):
    """The pretraining a table (or sweep) needs, in its own folder under s.out: the original
    schedule x epochs_scale at the paper's lr, s's width."""
    out = os.path.join(s.out, f"rotnet_{blocks}blocks_rot{'-'.join(map(str, rotations))}")
    return rotnet.Pretraining(**dict(s.shared(), out=out, resume=True, lr=None,  # lr: the arch's own
                                     epochs=max(1, round(PRETRAIN_EPOCHS * s.epochs_scale))),
                              blocks=blocks, rotations=rotations)


def probe_for(s, net=None, **settings):
    """One probe of a table, on the RotNet that net pretrains (None: no RotNet), in a folder
    named after its settings, so the tables share the runs they have in common."""
    p = dataclasses.replace(s, checkpoint=net and os.path.join(net.out, "model.pt"), resume=True, **settings)
    if p.supervised:
        name = "supervised_nin"
    else:
        source = f"random_{p.blocks}blocks" if p.init == "random" else os.path.basename(net.out)
        name = f"{source}_convb{p.block}_{p.classifier}" + ("_finetuned" if p.finetune else "")
    return dataclasses.replace(p, out=os.path.join(s.out, name))


def table1(s):
    nets = {blocks: rotnet_for(s, blocks) for blocks in PAPER_TABLE1}
    rows = [(f"RotNet, {blocks} blocks", [probe_for(s, nets[blocks], block=k) for k in range(1, blocks + 1)], paper)
            for blocks, paper in PAPER_TABLE1.items()]
    return ["ConvB1", "ConvB2", "ConvB3", "ConvB4", "ConvB5"], rows, list(nets.values())


def table2(s):
    nets = {rotations: rotnet_for(s, 4, rotations) for rotations in PAPER_TABLE2}
    rows = [(f"{len(rotations)}: " + ", ".join(f"{r}°" for r in rotations), [probe_for(s, nets[rotations])], [paper])
            for rotations, paper in PAPER_TABLE2.items()]
    return ["accuracy"], rows, list(nets.values())


def table3(s):
    net = rotnet_for(s, 4)
    probes = {"Supervised NIN": probe_for(s, supervised=True),
              "Random Init. + conv": probe_for(s, init="random", classifier="conv"),
              "RotNet + non-linear": probe_for(s, net),
              "RotNet + conv": probe_for(s, net, classifier="conv"),
              "RotNet + non-linear (fine-tuned)": probe_for(s, net, finetune=True),
              "RotNet + conv (fine-tuned)": probe_for(s, net, classifier="conv", finetune=True)}
    return ["accuracy"], [(method, [p], [PAPER_TABLE3[method]]) for method, p in probes.items()], [net]


def table4(s):
    return ["conv4", "conv5"], [("RotNet + non-linear", [imagenet_probe(s, classifier="nonlinear")], PAPER_TABLE4)], []


def table5(s):
    return ["conv1", "conv2", "conv3", "conv4", "conv5"], [("RotNet + linear", [imagenet_probe(s)], PAPER_TABLE5)], []


def imagenet_probe(s, classifier="linear"):
    """The probe of the AlexNet in s.checkpoint on every conv the classifier sits on, at once
    (block 0): linear on conv1-5 (Table 5), non-linear on conv4-5 (Table 4)."""
    require(s.checkpoint, "Tables 4 and 5 probe an AlexNet RotNet: give --checkpoint (rotnet.py --arch alexnet)")
    convs = "conv1-5" if classifier == "linear" else "conv4-5"
    name = f"{os.path.basename(os.path.dirname(os.path.abspath(s.checkpoint)))}_{convs}_{classifier}"
    return dataclasses.replace(s, out=os.path.join(s.out, name), block=0, classifier=classifier, resume=True)


def format_table(number, columns, rows, measured_on):
    """Markdown: each cell 'ours (paper)', in % of test accuracy (top-1 unless a row says), or,
    where rows give the best epoch's too (the CIFAR tables), 'last / best (paper)'; measured_on:
    the --data ours were measured on."""
    data_set = "ImageNet" if number in (4, 5) else "CIFAR-10"
    lines = [f"| Table {number} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, ours, paper, best in rows:
        cells = [f"{o:.2f}" + (f" / {b:.2f}" if b is not None else "") + (f" ({p:.2f})" if p else "")
                 for o, p, b in zip(ours, paper or [None] * len(ours), best or [None] * len(ours))]
        lines.append(f"| {name} | " + " | ".join(cells + ["–"] * (len(columns) - len(ours))) + " |")
    which = (" at the last epoch / the best epoch (the paper's probes are the best epoch's: the original "
             "keeps that one; its supervised NIN keeps the last)" if any(best for *_, best in rows) else "")
    return "\n".join(lines) + (f"\n\nTest accuracy, %: ours on {measured_on}{which}, the paper's on {data_set} in "
                               "brackets.\n")


def run_plan(nets, probes, imagenet=False):
    """Runs the probes that are not finished (a stopped one resumes), first pretraining the
    RotNets they need; every folder's settings and images are checked before anything trains.
    A RotNet whose probes are all finished is not needed: its model.pt may be deleted. Returns
    each probe's results, by folder."""
    # (no run made on other images is reused; a folder without labels is refused before its RotNets train)
    made_on = probes[0].data_identity(train.Context(probes[0].device), labels_for="a probe")
    for net in nets:
        runs.check_reusable(net.out, epochs=net.epochs, width=net.width, seed=net.seed, batch_size=net.batch_size,
                            identity=made_on, fix=OTHER_OUT)
    finished = lambda p: os.path.exists(os.path.join(p.out, "results.json"))
    for p in probes:
        kind = probe.schedule_kind(p, imagenet)
        lr, batch_size = p.lr or probe.SCHEDULES[kind].lr, p.batch_size or probe.SCHEDULES[kind].batch_size
        # Tables 4 and 5 probe the file --checkpoint names, known by its weights (its path may be
        # written otherwise, the file trained anew since); the other tables probe the RotNets they
        # train themselves, checked above, each named in its probes' folders.
        which = (dict(checkpoint=p.checkpoint, checkpoint_hash=file_hash(p.checkpoint)) if imagenet
                 else {} if p.checkpoint else dict(width=p.width))  # (no RotNet: it trains a NIN of this width)
        runs.check_reusable(p.out, epochs=probe.schedule_epochs(kind, p.epochs, p.epochs_scale), seed=p.seed, lr=lr,
                            batch_size=batch_size, identity=made_on, fix=OTHER_OUT, **which)
    needed = {p.checkpoint for p in probes if not finished(p)}
    for net in nets:
        model = os.path.join(net.out, "model.pt")
        if model in needed and not os.path.exists(model):
            runs.header(f"pretraining {net.out} ({net.epochs} epoch{'s' * (net.epochs != 1)})")
            rotnet.pretrain(net)
    results = {}
    for p in probes:
        if not finished(p):
            runs.header(f"probing into {p.out}")
            probe.probe(p)
        results[p.out] = runs.read_json(os.path.join(p.out, "results.json"))
    return results


# What a table's probes each set themselves (probe_for, imagenet_probe): a table given one refuses it
ONE_PROBE = ("block", "classifier", "finetune", "init", "blocks", "supervised")


def run_table(number, s: probe.Probing):
    runs.refuse_out_in_images(s.out, s.data)  # (before the data, and naming the --out given)
    default = {f.name: f.default for f in dataclasses.fields(probe.Probing)}
    given = [f"--{name}" for name in ONE_PROBE if getattr(s, name) != default[name]]
    require(not given, f"{', '.join(given)}: Table {number} sets each of its probes' own; leave "
                       f"{'it' if len(given) == 1 else 'them'} out (or run that probe alone, without --table)")
    require(number in (4, 5) or not s.checkpoint,
            f"Table {number} pretrains its own RotNets (in --out): --checkpoint is for Tables 4 and 5 "
            "and single probes")
    if number in (4, 5) and s.checkpoint:  # (without one, imagenet_probe says to give it)
        require(is_alexnet(read_checkpoint(s.checkpoint)),
                f"{s.checkpoint} is not an AlexNet: Tables 4 and 5 probe an AlexNet RotNet (rotnet.py --arch alexnet)")
    columns, rows, nets = {1: table1, 2: table2, 3: table3, 4: table4, 5: table5}[number](s)
    results = run_plan(nets, [p for _, probes, _ in rows for p in probes], imagenet=number in (4, 5))

    def ours(probes, key):  # one number per probe (Table 5's one probe has five)
        values = [results[p.out][key] for p in probes]
        return [v for value in values for v in (value if isinstance(value, list) else [value])]

    if not train.main_rank():
        return
    # The CIFAR tables also give each probe's best epoch, as the paper's figures are: the
    # original's CIFAR probes keep it (best_metric), where its supervised NINs and ImageNet
    # probes keep their last
    best = lambda probes: ([None if p.supervised else results[p.out].get("best_test_acc") for p in probes]
                           if number in (1, 2, 3) else None)
    table = [(name, ours(probes, "test_acc"), paper, best(probes)) for name, probes, paper in rows]
    top5 = number in (4, 5) and all("test_top5" in results[p.out] for _, probes, _ in rows for p in probes)
    if top5:
        table += [(f"{name}, top-5", ours(probes, "test_top5"), None, None) for name, probes, _ in rows]
    text = format_table(number, columns, table, s.data)
    if number in (4, 5) and not top5:
        text += "Top-5 is not given: the data has 5 classes or fewer, whose top 5 holds every image's class.\n"
    print(text)
    # table1.md, table2.md, ...: the tables share one --out and its pretrained RotNets
    runs.write_text(text, os.path.join(s.out, f"table{number}.md"))
    if number in (4, 5):  # the network probed is the checkpoint's, as its probe recorded it
        probed = runs.read_json(os.path.join(rows[0][1][0].out, "config.json"))
        made = dict(checkpoint=runs.absolute(s.checkpoint), width=probed["width"], epochs=probed["epochs"])
    else:  # --epochs, if given, is the probes' (the RotNets keep 200 x epochs_scale)
        made = dict(epochs_scale=s.epochs_scale, width=s.width, epochs=s.epochs)
    runs.write_json(dict(table=number, columns=columns, **made, seed=s.seed, data=runs.absolute(s.data),
                         rows=[dict(name=n, ours=o, paper=p, **({"best": b} if b and None not in b else {}))
                               for n, o, p, b in table]),
                    os.path.join(s.out, f"table{number}.json"))
