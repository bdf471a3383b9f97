"""The command line every script shares: the flags, declared once with one meaning
everywhere, and run_job, every script's main, which turns a problem the user can fix into one
`error: ...` line (errors.UserError, and running out of memory), and Ctrl-C, SIGTERM, a full
disk or a closed pipe into one line that says what the run kept and how to go on.
"""
import argparse
import errno
import gc
import math
import os
import re
import select
import shlex
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

import runs
from errors import UserError
from train import main_rank

# A file the run could not write: said in one line (run_job), the run's finished files kept.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
RANK_DELAY = 3.0                     # seconds a rank other than 0 waits to say an error (stop)


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
    ap.add_argument("--image-size", type=positive_int, metavar="S",
                    help="a folder's images are prepared once at S x S (shorter side to S, centre crop; "
                    "default: the network's, 32 for the NIN and 256 for the AlexNet, or the size a "
                    "--checkpoint was pretrained at)")
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


def run_job(job, single_run=False):
    """Every script's main: run the job, turn a problem the user can fix into one line
    (exit status 1), end the ranks. single_run: the job is one run (rotnet.py, a probe),
    which a stop tells to go on with --resume; a table, sweep or figure goes on by the same
    command. The ranks of a finished run leave together: a DDP model that only the garbage
    collector would free (its hooks make cycles) and a peer still at work (rank 0 writing
    files) both make gloo abort the process at teardown.
    SIGTERM stops a single process as Ctrl-C does, with the same line; not under torchrun,
    whose agent sends it to the ranks left when one fails, whose lines would bury its. (A
    worker forked from here puts SIGTERM back to its default: its parent ends it so.)"""
    runs.last_kept = None  # (this job's)
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
    except (MemoryError, RuntimeError) as err:  # (torch's OutOfMemoryError is a RuntimeError)
        asked = out_of_memory(err)
        if asked is not None:
            stop(f"error: out of memory{asked}: give a smaller --batch-size, --width or --image-size "
                 "(an image folder's)", rank_delay=True)
        if isinstance(err, MemoryError):
            raise
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
        stop(f"stopped: its standard output was closed (a pipe ended); {_kept(single_run)}", status=1)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        where = f"error: {err.filename or 'a run file'}: {err.strerror}"
        if err.errno == errno.EROFS:  # (an --out or --cache there that exists already: nothing went in)
            stop(f"{where}: give --out (or --cache) a folder that can be written to")
        fix = "make room" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
        stop(f"{where}; the files written before it are whole: {fix}, then {_go_on(single_run)}")
    except KeyboardInterrupt as err:  # the files are whole (atomic): say how to go on, not where it stopped
        how, status = ("stopped by SIGTERM", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        if not main_rank():  # Ctrl-C reaches every rank: rank 0 says it
            sys.exit(status)
        stop(f"\n{how}: {_kept(single_run)}", status=status)
    finally:
        if on_term:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def out_of_memory(err):
    """For an error that says the memory ran out (torch's allocators on the GPU and the CPU,
    Python's MemoryError): what it asked for, as " (N GiB asked for at once)" where it says,
    else ""; None for any other error."""
    text = str(err)
    if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in text:
        return None
    asked = re.search(r"[Tt]ried to allocate ([\d.]+) (bytes|[KMGT]iB)", text)
    if not asked:
        return ""
    number, unit = float(asked[1]), asked[2]
    mib = number / 2**20 if unit == "bytes" else number * 1024.0 ** ("KMGT".index(unit[0]) - 1)
    return f" ({mib / 1024:.1f} GiB asked for at once)" if mib >= 1024 else f" ({mib:.0f} MiB asked for at once)"


def _stdout_closed():
    """Whether stdout is a pipe whose reader has gone (`| head` done): the run can print no
    more, so it stops as Ctrl-C stops it. (poll says POLLERR on such a pipe's end.)"""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll (Windows), no stdout
        return False


def _kept(single_run):
    """What a run stopped midway keeps, and how to go on from it."""
    out, epochs = runs.last_kept or (None, 0)
    kept = (f"{out} is kept up to epoch {epochs}, and all finished before it" if epochs else
            f"{out} had not ended an epoch yet; what was finished before it is kept" if out else
            "no run had started yet; what was finished before is kept")
    return f"{kept} (epochs, finished runs, a folder's preparation); to go on, {_go_on(single_run)}"


def _go_on(single_run):
    """How a stopped job goes on: a single run given without --resume, by its command with
    --resume added, spelt out where it can be (run by python, not torchrun); else by the same
    command (a table, sweep or figure resumes the run it stopped by itself)."""
    if not single_run or "--resume" in sys.argv[1:]:
        return "run the same command again"
    if dist.is_torchelastic_launched():
        return "run the same torchrun command again with --resume added"
    return f"run it again with --resume: {shlex.join(['python', sys.argv[0], *sys.argv[1:], '--resume'])}"


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
