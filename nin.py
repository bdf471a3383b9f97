"""The paper's CIFAR-10 network: Network-In-Network with 3 to 5 conv blocks, and loading it
from this project's files or from the original code's checkpoints.

    model = NIN(blocks=4, num_classes=4)          # a RotNet
    model.features(x, 2)                          # "ConvB2": the output of block 2
(models.load_model reads this project's and the original code's NIN checkpoints.)
"""
import math
import re

import torch.nn as nn

from errors import UserError


def init_conv_(conv):
    """The original classifiers' initialisation of a conv: N(0, sqrt(2 / (k * k * out_channels)))."""
    k_h, k_w = conv.kernel_size
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k_h * k_w * conv.out_channels)))
    return conv


def channels(width):
    """The NIN's three channel counts (192, 160, 96 in the paper's) at width."""
    return tuple(max(1, round(c * width)) for c in (192, 160, 96))


def init_as_pytorch_0_2_(model):
    """The weights the original code's networks started from. It sets none of its own for them
    (NetworkInNetwork.weight_initialization, which would draw convs N(0, sqrt(2 / (k * k * out)))
    and set BN scales to 1, is never called; the AlexNet has none), so they got PyTorch
    0.2's defaults, written out here so that they do not depend on this PyTorch's: conv and
    linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (today's bound too), BN
    scales U(0, 1) (PyTorch >= 1.2 uses ones) and BN shifts 0. In module order, after
    construction: one seed, one set of weights."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = 1 / math.sqrt(m.weight[0].numel())
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.uniform_(m.weight, 0.0, 1.0)
            nn.init.zeros_(m.bias)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)  # weight 1, bias 0: the original's classifiers' (the NIN redraws them)
        self.relu = nn.ReLU(inplace=True)


class NIN(nn.Module):
    """Network-In-Network of the paper with 3 to 5 conv blocks; width scales the channels."""

    def __init__(self, blocks=4, num_classes=4, width=1.0):
        super().__init__()
        if not 3 <= blocks <= 5:
            raise ValueError(f"blocks: the paper's NIN has 3, 4 or 5 blocks, got {blocks}")
        c192, c160, c96 = channels(width)
        stages = [[ConvBNReLU(3, c192, 5), ConvBNReLU(c192, c160, 1), ConvBNReLU(c160, c96, 1),
                   nn.MaxPool2d(3, stride=2, padding=1)],
                  [ConvBNReLU(c96, c192, 5), ConvBNReLU(c192, c192, 1), ConvBNReLU(c192, c192, 1),
                   nn.AvgPool2d(3, stride=2, padding=1)]]
        stages += [[ConvBNReLU(c192, c192, 3), ConvBNReLU(c192, c192, 1), ConvBNReLU(c192, c192, 1)]
                   for _ in range(blocks - 2)]
        self.blocks = nn.ModuleList(nn.Sequential(*s) for s in stages)
        self.head = nn.Linear(c192, num_classes)
        init_as_pytorch_0_2_(self)
        self.config = dict(blocks=blocks, num_classes=num_classes, width=width)

    def features(self, x, block):
        """The output of block `block` (1-based, after its pooling)."""
        if not 1 <= block <= len(self.blocks):
            raise ValueError(f"block: expected 1 to {len(self.blocks)}, got {block}")
        for stage in self.blocks[:block]:
            x = stage(x)
        return x

    def forward(self, x):
        return self.head(self.features(x, len(self.blocks)).mean(dim=(2, 3)))


_ORIGINAL_KEY = re.compile(r"_feature_blocks\.(\d+)\.Block\d+_ConvB(\d)\.layers\.(Conv|BatchNorm)\.(\w+)$")
_ORIGINAL_HEAD = re.compile(r"_feature_blocks\.(\d+)\.Classifier\.(\w+)$")


def from_original(state):
    """A state dict of the original implementation, in this NIN's names."""
    out = {}
    for key, value in state.items():
        if m := _ORIGINAL_KEY.match(key):
            stage, conv, kind, name = m.groups()
            out[f"blocks.{stage}.{int(conv) - 1}.{'conv' if kind == 'Conv' else 'bn'}.{name}"] = value
        elif m := _ORIGINAL_HEAD.match(key):
            out[f"head.{m.group(2)}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in an original-format checkpoint")
    return out


def nin_from_saved(saved, path):
    """A NIN (train mode, CPU) from a loaded file: this project's dict with "model" and
    "model_config", or the original's {'epoch', 'network'}. Problems name path."""
    try:
        if isinstance(saved, dict) and "network" in saved:
            state = from_original(saved["network"])
            blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
            num_classes, c192 = state["head.weight"].shape
            config = dict(blocks=blocks, num_classes=num_classes, width=c192 / 192)
        elif isinstance(saved, dict) and "model" in saved and "model_config" in saved:
            state, config = saved["model"], saved["model_config"]
        elif isinstance(saved, dict) and {"model", "optimizer"} <= set(saved):  # (runs.end_epoch's, no config)
            raise ValueError("a probe's checkpoint.pt, a classifier with the network it sits on: give that network")
        else:
            raise ValueError("neither a model.pt/checkpoint.pt of this project nor an original checkpoint")
        model = NIN(**config)
        model.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:  # wrong keys, shapes, config
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: not a NIN checkpoint this project can read ({first})") from None
    return model
