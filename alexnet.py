"""The BN-AlexNet of RotNet's ImageNet experiments (Gidaris et al., ICLR 2018): AlexNet with
batch norm after every conv and hidden linear layer, no LRN and no dropout.

    model = AlexNet()                    # 4 rotation classes, 57,030,724 parameters
    conv4 = model.features(x, 4)         # conv4 after its BN and ReLU, for the probes
(models.load_model reads this project's and the original code's AlexNet checkpoints.)

Expects 224x224 RGB images normalised per channel by the training images' own mean and std
(data.load: for ImageNet close to, not equal to, the usual constants).
"""
import numbers

import torch
import torch.nn as nn

from errors import UserError
from nin import init_as_pytorch_0_2_

CHANNELS = (64, 192, 384, 256, 256)  # conv1..conv5 at width 1
HIDDEN = 4096                        # the two hidden linear layers at width 1
POOLED = 6                           # pool5 is 6x6 at 224x224 input: Linear 256*6*6 -> 4096


def scaled(c, width):
    return max(1, round(c * width))


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        # The conv keeps its bias although BN cancels it: the original has it, and its
        # checkpoints carry it.
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)


class LinearBNReLU(nn.Sequential):
    def __init__(self, fin, fout):
        super().__init__()
        self.linear = nn.Linear(fin, fout, bias=False)  # BN's shift is the bias
        self.bn = nn.BatchNorm1d(fout)
        self.relu = nn.ReLU(inplace=True)


class AlexNet(nn.Module):
    """BN-AlexNet; width scales every channel count and the hidden size (small CPU tests)."""

    def __init__(self, num_classes=4, width=1.0):
        super().__init__()
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in CHANNELS)
        hidden = scaled(HIDDEN, width)
        self.convs = nn.ModuleList([
            ConvBNReLU(3, c1, 11, stride=4, padding=2),  # 224 -> 55
            ConvBNReLU(c1, c2, 5, padding=2),            # 27 (after pool1)
            ConvBNReLU(c2, c3, 3, padding=1),            # 13 (after pool2)
            ConvBNReLU(c3, c4, 3, padding=1),
            ConvBNReLU(c4, c5, 3, padding=1),
        ])
        self.pool = nn.MaxPool2d(3, stride=2)  # no padding: 55 -> 27, 27 -> 13, 13 -> 6
        self.fc = nn.Sequential(LinearBNReLU(c5 * POOLED * POOLED, hidden), LinearBNReLU(hidden, hidden))
        self.head = nn.Linear(hidden, num_classes)
        self.config = dict(arch="alexnet", num_classes=num_classes, width=width)
        init_as_pytorch_0_2_(self)  # the original sets no initialisation of its own

    def features(self, x, k):
        """conv k's output (k = 1..5) after its BN and ReLU, before any pooling."""
        if not (isinstance(k, numbers.Integral) and 1 <= k <= len(self.convs)):
            raise ValueError(f"k: AlexNet has conv1 to conv{len(self.convs)}, got {k!r}")
        for i, conv in enumerate(self.convs[:k]):
            if i in (1, 2):  # pool1 and pool2 sit in front of conv2 and conv3
                x = self.pool(x)
            x = conv(x)
        return x

    def feature_maps(self, x, k=5):
        """conv1..conv k's outputs (after BN and ReLU, before pooling), from one pass."""
        maps = []
        for i, conv in enumerate(self.convs[:k]):
            x = conv(self.pool(x) if i in (1, 2) else x)
            maps.append(x)
        return maps

    def forward(self, x):
        x = self.pool(self.features(x, 5))  # pool5
        return self.head(self.fc(x.flatten(1)))


# ----------------------------------------------------------------------------- the original's files
# The original (architectures/AlexNet.py) keeps its layers in `_feature_blocks`, a ModuleList
# [conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5, fc_block, classifier] of unnamed
# nn.Sequentials: a conv block is (Conv2d, BatchNorm2d, ReLU); fc_block is (Flatten, Linear,
# BatchNorm1d, ReLU, Linear, BatchNorm1d, ReLU); classifier is (Linear,).
_CONV = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_PREFIXES = [(f"_feature_blocks.{block}.0.", f"convs.{i}.conv.", _CONV) for i, block in enumerate((0, 2, 4, 5, 6))]
_PREFIXES += [(f"_feature_blocks.{block}.1.", f"convs.{i}.bn.", _BN) for i, block in enumerate((0, 2, 4, 5, 6))]
_PREFIXES += [("_feature_blocks.8.1.", "fc.0.linear.", ("weight",)), ("_feature_blocks.8.2.", "fc.0.bn.", _BN),
              ("_feature_blocks.8.4.", "fc.1.linear.", ("weight",)), ("_feature_blocks.8.5.", "fc.1.bn.", _BN),
              ("_feature_blocks.9.0.", "head.", ("weight", "bias"))]
ORIGINAL_NAMES = {theirs + name: ours + name for theirs, ours, names in _PREFIXES for name in names}


def from_original(state):
    """A state dict of the original AlexNet, in this module's names."""
    out = {}
    for key, value in state.items():
        if key not in ORIGINAL_NAMES:
            raise ValueError(f"unexpected key {key!r} in an original-format AlexNet checkpoint")
        out[ORIGINAL_NAMES[key]] = value
    return out


def config_of(state):
    """num_classes and width of a state dict in this module's names, from its shapes: the
    first width (of those each layer's size implies) that gives every layer its size."""
    try:
        sizes = [state[f"convs.{i}.conv.weight"].shape[0] for i in range(len(CHANNELS))]
        sizes.append(state["fc.0.linear.weight"].shape[0])
        num_classes = state["head.weight"].shape[0]
    except (KeyError, AttributeError, IndexError) as err:
        raise ValueError(f"not an AlexNet state dict (no usable {err})") from None
    refs = CHANNELS + (HIDDEN,)
    for width in (1.0, *(size / ref for size, ref in zip(sizes, refs))):
        if [scaled(ref, width) for ref in refs] == sizes:
            return dict(num_classes=num_classes, width=width)
    raise ValueError(f"layer sizes {sizes} fit no width of AlexNet {list(refs)}")


# ----------------------------------------------------------------------------- loading
def _check_state(model, state):
    """The first problem with loading state into model, or None."""
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    if unexpected or missing:
        return f"{'unexpected' if unexpected else 'missing'} key {(unexpected or missing)[0]!r}"
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            return f"{key} is a {type(value).__name__}, not a tensor"
        if value.shape != expected[key].shape:
            return f"{key} has shape {list(value.shape)}, expected {list(expected[key].shape)}"
    return None


def _state_dict(state):
    if not isinstance(state, dict):
        raise ValueError(f"its weights are a {type(state).__name__}, not a state dict")
    return state


def alexnet_from_saved(saved, path):
    """An AlexNet (train mode, CPU) from a loaded file: this project's dict with "model" and
    "model_config", or the original's {'epoch', 'network'}. Problems name path."""
    if not isinstance(saved, dict):
        raise UserError(f"{path}: holds a {type(saved).__name__}, not a checkpoint dict")
    try:
        if "network" in saved:  # the original code's checkpoint
            state = from_original(_state_dict(saved["network"]))
            config = config_of(state)
        elif "model" in saved and isinstance(saved.get("model_config"), dict):
            state, config = _state_dict(saved["model"]), dict(saved["model_config"])
            arch = config.pop("arch", None)
            if arch != "alexnet":
                raise ValueError(f"its model_config is for arch {arch!r}, not 'alexnet'")
        else:
            raise ValueError("neither this project's model file nor an original checkpoint")
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    try:
        model = AlexNet(**config)
    except (TypeError, ValueError, RuntimeError) as err:  # unknown keys, a width of "a", -1 classes
        first = (str(err).splitlines() or [""])[0]
        raise UserError(f"{path}: its model_config builds no AlexNet ({type(err).__name__}: {first})") from None
    # PyTorch < 0.4 (the original's) had no num_batches_tracked; it is only a counter.
    state = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}, **state}
    if problem := _check_state(model, state):
        raise UserError(f"{path}: not this AlexNet ({problem})")
    model.load_state_dict(state)
    return model
