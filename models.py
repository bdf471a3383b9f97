"""The networks this project trains, by name, and loading any of them from any checkpoint
this project reads.

    model = build("nin", num_classes=4, width=1.0, blocks=4)   # or "alexnet"
    model = load_model("runs/rotnet/model.pt")   # NIN or AlexNet: model.pt, checkpoint.pt,
                                                 # or a checkpoint of the original code

Every file is read with torch.load(weights_only=True): one that carries code is refused,
never run. Any problem is a UserError of one line that names the file.
"""
import hashlib
import pickle

import torch

from alexnet import AlexNet, alexnet_from_saved
from errors import UserError, require
from nin import NIN, nin_from_saved


# How the networks start, recorded in every run's config.json: a run made before (the NIN's convs
# N(0, sqrt(2 / n)), a conv classifier 192 wide at any --width) lacks it and is not reused.
NETWORKS = "original-init"
# The size a folder's images are prepared at for each network unless --image-size says
# otherwise: what it was made for (the NIN CIFAR-10's 32 x 32: at 256 its 128 x 4 images of a
# step would keep about 280 GB of activations, in fp32; the AlexNet ImageNet's 256, for its 224 crops).
IMAGE_SIZE = {"nin": 32, "alexnet": 256}


def build(arch, num_classes, width=1.0, blocks=4):
    """A fresh network: the paper's NIN (blocks 3-5) or the original's BN-AlexNet."""
    return NIN(blocks, num_classes, width) if arch == "nin" else AlexNet(num_classes, width)


def read_checkpoint(path):
    """torch.load with weights_only=True; anything unreadable is a UserError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only met something that is not plain data
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        why = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(boilerplate)]
        why = why[0] if why else type(err).__name__
        if "GLOBAL" in why:  # a class or function: possibly code, never run
            raise UserError(f"{path}: refused, it holds objects that are not plain weights ({why})") from None
        # (torch's unpickler names only the byte it stopped at: "Unsupported operand 123")
        raise UserError(f"{path}: not a readable checkpoint (not a file torch.save wrote)") from None
    except FileNotFoundError:
        raise UserError(f"{path}: not a readable checkpoint (no such file)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: not a readable checkpoint (a folder; give the model.pt or checkpoint.pt "
                        "in it)") from None
    except KeyError:  # the legacy format's magic number read from a file that has none
        raise UserError(f"{path}: not a readable checkpoint (not a file torch.save wrote)") from None
    except Exception as err:  # truncated, garbage: torch raises many kinds
        first = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise UserError(f"{path}: not a readable checkpoint (damaged or cut short: {first})") from None


def is_alexnet(saved):
    if not isinstance(saved, dict):
        return False
    if isinstance(saved.get("model_config"), dict):
        return saved["model_config"].get("arch") == "alexnet"
    # the original's AlexNet starts with an unnamed conv block; its NIN names its blocks
    return isinstance(saved.get("network"), dict) and "_feature_blocks.0.0.weight" in saved["network"]


def file_hash(path):
    """Which weights a file holds, wherever it lies: the start of its SHA-256 (a probe records
    it, so one trained on other weights of the same path is not reused)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_model(path, device="cpu"):
    """A NIN or an AlexNet in eval mode, from this project's files or the original code's."""
    saved = read_checkpoint(path)
    model = alexnet_from_saved(saved, path) if is_alexnet(saved) else nin_from_saved(saved, path)
    # A network that diverged: probed, its features would make the probe's loss NaN an epoch later
    require(all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()),
            f"{path}: its weights are not all finite (NaN or inf): the run that made it diverged")
    return model.to(device).eval()
