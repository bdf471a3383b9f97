"""A run: the settings every run shares (Run), the folder it owns (--out, claimed while it
trains) and the files it writes there, each whole or not at all:

    config.json     the settings and the machine it ran with
    metrics.jsonl   one line an epoch
    checkpoint.pt   everything --resume needs (the one before it kept as checkpoint.prev.pt)
    model.pt        a finished pretraining's network (rotnet.py), results.json a finished probe's

restore starts a run or resumes it, refusing a resume with other settings, on other images
or of another kind of run; end_epoch writes an epoch; check_reusable says whether a table or
sweep may reuse a run it finds. run_kind and trained_as tell which kind of run made a folder
or a checkpoint file (a RotNet pretraining, a probe, a supervised NIN, a sweep's arm).
"""
import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import data
import folders
import listing
import rot_kernel
from errors import UserError, require
from models import NETWORKS, read_checkpoint
from train import main_first, main_rank

try:
    import fcntl  # the lock on a run's folder (Run.claim_out)
except ImportError:  # Windows: runs are not locked
    fcntl = None

# ----------------------------------------------------------------------------- settings
SEED_LIMIT = 2**40                   # |seed| below this: seed * 100_003 + epoch seeds a generator
WIDTHS = (1 / 64, 16)                # --width: from every layer keeping a channel to 256x the weights
# What a resumed run may set anew: where and how fast it runs, not what it computes (and a
# probe's --checkpoint path, where its weights decide: by_weights).
MAY_CHANGE_ON_RESUME = {"resume", "device", "compile", "amp", "out", "data", "cache", "download", "eval_every",
                        "save_every"}
# The kinds of run (run_kind), as a refusal names them
ROTNET, PROBE, SUPERVISED, ARM = "a RotNet pretraining", "a probe", "a supervised NIN", "a label-scarcity arm"

# The run this job is in, and how many epochs it has kept: what cli says that Ctrl-C keeps
last_kept = None                     # (out, epochs) once restore has begun a run


# ----------------------------------------------------------------------------- the run and its folder
@dataclass(frozen=True)
class Run:
    """The settings every training run shares (each script adds its own); config.json
    records them. Checked when made, so a direct call is validated as the command line is."""
    data: str = "./data"              # CIFAR-10 (its folder, parent or archive) or a folder of images
    image_size: Optional[int] = None  # S x S, a folder's images (CIFAR's are 32); None: the network's
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
        # BatchNorm needs two images a step: a batch of one trains nothing (train.epoch_steps)
        require(self.epochs is None or self.epochs >= 1, f"--epochs: at least 1, got {self.epochs}")
        require(self.batch_size is None or self.batch_size >= 2, f"--batch-size: at least 2, got {self.batch_size}")
        require(self.eval_every >= 1, f"--eval-every: at least 1, got {self.eval_every}")
        require(self.lr is None or 0 < self.lr < math.inf, f"--lr: must be positive and finite, got {self.lr}")
        require(WIDTHS[0] <= self.width <= WIDTHS[1], f"--width: from 1/64 to 16 (1 is the paper's), got {self.width}")
        require(-SEED_LIMIT < self.seed < SEED_LIMIT, f"--seed: below 2^40 in size, got {self.seed}")
        require(self.device in ("auto", "cpu", "cuda"), f"--device: auto, cpu or cuda, got {self.device!r}")
        require(self.image_size is None or self.image_size >= 8, f"--image-size: at least 8, got {self.image_size}")
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
        stops before writing anything leaves no folder it made, parents included. An --out
        inside the image folder is refused (refuse_out_in_images)."""
        refuse_out_in_images(self.out, self.data)
        if not main_rank():
            self.check_out()
            yield
            return
        made = folders.folders_to_make(os.path.abspath(self.out))  # (a table's run makes the table's --out too)
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
            folders.remove_made(made)
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
        cache = self.cache or self.prepared_before()
        return main_first(ctx, lambda: data.load(self.data, image_size=self.image_size, download=self.download,
                                                 cache=cache, val_fraction=self.val_fraction, recipe=recipe,
                                                 labels_for=labels_for))

    def prepared_before(self):
        """Without --cache: the cache folder its image folder was prepared in already, by this
        run (resumed) or by the run that made its --checkpoint (a probe's, the sweep's), where
        that run's config.json records one, still there, of the same folder, size and split;
        else None (prepared/NAME-S under the current folder). Run from another folder than
        theirs, it would otherwise prepare the images again: hours, for ImageNet."""
        made_by = [self.out] if self.resume else []
        if getattr(self, "checkpoint", None):  # (the fields of Probing and Sweep)
            made_by.append(os.path.dirname(os.path.realpath(self.checkpoint)))
        here = os.path.realpath(os.path.expanduser(self.data))
        for made in map(saved_config, made_by):
            cache = made.get("cache")
            if (isinstance(cache, str) and os.path.isabs(cache) and os.path.isdir(cache)
                    and isinstance(made.get("data"), str) and os.path.realpath(made["data"]) == here
                    and (made.get("image_size"), made.get("val_fraction")) == (self.image_size, self.val_fraction)):
                return cache
        return None

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
            and listing.is_image_folder(inside):
        raise UserError(f"--out {out} is inside the image folder {images}, which is never written to (what is "
                        "written there would be listed with its images): give an --out elsewhere")


# ----------------------------------------------------------------------------- the run's files
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


def absolute(path):
    """A path recorded in a run's or a table's files: ~ expanded and made absolute, so that
    it names the same files when they are read from another folder (None stays None)."""
    return os.path.abspath(os.path.expanduser(path)) if isinstance(path, str) else path


def read_json(path):
    """A run file written by this project (results.json, config.json); a damaged one is a
    UserError that names it, not a traceback."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise UserError(f"{path} is damaged ({err}): delete its folder to run that run again") from None


# ----------------------------------------------------------------------------- resuming and reusing a run
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
            finished = isinstance(config.get("epochs"), int) and ckpt["epoch"] >= config["epochs"]
            print(f"resuming {out} after epoch {ckpt['epoch']}" + (": it was finished; nothing is trained, its "
                  "last epoch's files are written again" if finished else ""), file=sys.stderr)
    if ctx.main:
        os.makedirs(out, exist_ok=True)
        # the data and cache where they lie (read from another folder, a relative path would
        # name other files), amp as it ran (bf16 autocast is for CUDA only, whatever --no-amp
        # says), and the layout
        where = {k: absolute(config[k]) for k in ("data", "cache") if k in config}
        write_json(dict(config, **where, amp=ctx.amp, channels_last=ctx.channels_last, torch=torch.__version__,
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


def learnt_size(config):
    """The --image-size a run learnt at, as its config records it; None where that does not
    tell (no record, or a run on CIFAR-10, whose images are 32 x 32 whatever it records)."""
    size, images = config.get("image_size"), config.get("data")
    if isinstance(images, str) and os.path.exists(images) and not listing.is_image_folder(images):
        return None  # CIFAR-10 (runs made before 2026-12-07 record the flag's old default, 256)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def pretrained_size(path):
    """learnt_size of the run that made the network in checkpoint file path (its config.json
    beside it); None for the original code's files, or a file copied out of its run."""
    return learnt_size(saved_config(os.path.dirname(os.path.realpath(path))))


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
    if not (isinstance(config.get("data"), str) and listing.is_image_folder(config["data"])):
        may_change = may_change | {"image_size"}  # CIFAR-10's images are 32 x 32 whatever it says
    as_saved = lambda v: json.loads(json.dumps(v))  # tuples as lists, as config.json holds them
    return {k: (saved[k], as_saved(v)) for k, v in config.items() if k in saved and k not in may_change
            and not (data.same_images(saved[k], v) if k == "data_fingerprint" else saved[k] == as_saved(v))}


def check_reusable(out, identity=None, fix="give this run another --out", **wanted):
    """A run in out (finished or stopped) is reused only if it was made with these settings
    (and, given identity, Run.data_identity, on these images prepared so), and, if finished, its
    results.json is whole (a damaged one stops here, before any training). fix: what the
    refusal tells the user to do."""
    wanted = dict(wanted, networks=NETWORKS, **identity or {})
    data_fingerprint = wanted.pop("data_fingerprint", None)
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        saved = read_json(path)
        if by_weights(saved, wanted):
            wanted.pop("checkpoint", None)
        # (a run of an older version lacks a record of how its networks started: not reused)
        differ = [setting_change(k, saved[k], v) if k in saved else
                  f"{k} (unrecorded: an older version) there, {v} here" for k, v in wanted.items() if saved.get(k) != v]
        require(not differ, f"{out} was made with other settings ({'; '.join(differ)}): {fix}")
        require(data_fingerprint is None or data.same_images(saved.get("data_fingerprint"), data_fingerprint),
                f"{out} was made on other images than --data holds now (images added, removed or edited, held out "
                f"otherwise, or another data set), so its numbers are not this data's: {fix}")
    if os.path.exists(os.path.join(out, "results.json")):
        read_json(os.path.join(out, "results.json"))


# ----------------------------------------------------------------------------- an epoch's lines and files
def header(text):
    """A line above the epoch lines of one run of several (a table's, a sweep's), naming it."""
    if main_rank():
        print(f"== {text}", flush=True)


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
