"""alexnet.py: the BN-AlexNet's layer shapes and parameter count, features(x, k), the
original code's initialisation, and loading: this project's files, the original code's
checkpoints (new and pre-1.6 file formats, with and without num_batches_tracked), and
files that are hostile, damaged or of the wrong shape.

Width 1 only where the real sizes matter (one forward pass at batch 1); else width 0.125.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import alexnet
import models
from conftest import RunsCode
from errors import UserError

SMALL = 0.125


# ----------------------------------------------------------------------------- helpers
def small_model(num_classes=4, seed=0):
    torch.manual_seed(seed)
    return alexnet.AlexNet(num_classes, width=SMALL)


def images(n=2, seed=1):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def randomise_bn(model, seed=2):
    """BN statistics and affine values unlike each other's and any layer's, so that loading
    one into another's place would show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.num_batches_tracked.fill_(1234)
    return model


class OriginalAlexNet(nn.Module):
    """The module layout of the original's architectures/AlexNet.py, written from its
    description: `_feature_blocks`, a ModuleList of unnamed nn.Sequentials [conv1, pool1,
    conv2, pool2, conv3, conv4, conv5, pool5, fc_block, classifier]."""

    def __init__(self, num_classes=4, width=1.0):
        super().__init__()
        c = [alexnet.scaled(n, width) for n in (64, 192, 384, 256, 256, 4096)]

        def conv(cin, cout, k, s, p):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride=s, padding=p), nn.BatchNorm2d(cout), nn.ReLU())

        self._feature_blocks = nn.ModuleList([
            conv(3, c[0], 11, 4, 2), nn.MaxPool2d(3, 2), conv(c[0], c[1], 5, 1, 2), nn.MaxPool2d(3, 2),
            conv(c[1], c[2], 3, 1, 1), conv(c[2], c[3], 3, 1, 1), conv(c[3], c[4], 3, 1, 1), nn.MaxPool2d(3, 2),
            nn.Sequential(nn.Flatten(), nn.Linear(c[4] * 36, c[5], bias=False), nn.BatchNorm1d(c[5]), nn.ReLU(),
                          nn.Linear(c[5], c[5], bias=False), nn.BatchNorm1d(c[5]), nn.ReLU()),
            nn.Sequential(nn.Linear(c[5], num_classes)),
        ])

    def forward(self, x):
        for block in self._feature_blocks:
            x = block(x)
        return x


# Where each of this module's layers sits in the original's _feature_blocks, by hand (not
# from alexnet.ORIGINAL_NAMES, so that a slip there cannot hide here).
ORIGINAL_PLACE = {"convs.0.conv": "0.0", "convs.0.bn": "0.1", "convs.1.conv": "2.0", "convs.1.bn": "2.1",
                  "convs.2.conv": "4.0", "convs.2.bn": "4.1", "convs.3.conv": "5.0", "convs.3.bn": "5.1",
                  "convs.4.conv": "6.0", "convs.4.bn": "6.1", "fc.0.linear": "8.1", "fc.0.bn": "8.2",
                  "fc.1.linear": "8.4", "fc.1.bn": "8.5", "head": "9.0"}


def to_original_names(state):
    out = {}
    for key, value in state.items():
        module, name = key.rsplit(".", 1)
        out[f"_feature_blocks.{ORIGINAL_PLACE[module]}.{name}"] = value
    return out


def expect_user_error(path, *words):
    with pytest.raises(UserError) as info:
        models.load_model(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------- the network
@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return alexnet.AlexNet().eval()


def test_parameter_count_at_width_1(full):
    assert sum(p.numel() for p in full.parameters()) == 57_030_724
    assert full.config == dict(arch="alexnet", num_classes=4, width=1.0)


def test_layer_shapes_at_224(full):
    x = images(1)
    with torch.no_grad():
        shapes = [tuple(full.features(x, k).shape[1:]) for k in range(1, 6)]
        pooled = full.pool(full.features(x, 5))
        logits = full(x)
    assert shapes == [(64, 55, 55), (192, 27, 27), (384, 13, 13), (256, 13, 13), (256, 13, 13)]
    assert tuple(pooled.shape) == (1, 256, 6, 6)
    assert full.fc[0].linear.in_features == 9216 and tuple(logits.shape) == (1, 4)


@pytest.mark.parametrize("width,num_classes", [(SMALL, 4), (0.3, 10), (0.1, 1000)])
def test_parameter_count_formula(width, num_classes):
    c1, c2, c3, c4, c5, h = (max(1, round(c * width)) for c in (64, 192, 384, 256, 256, 4096))
    convs = [(3, c1, 11), (c1, c2, 5), (c2, c3, 3), (c3, c4, 3), (c4, c5, 3)]
    expected = sum(cin * cout * k * k + cout + 2 * cout for cin, cout, k in convs)  # conv, bias, BN
    expected += c5 * 36 * h + 2 * h + h * h + 2 * h + h * num_classes + num_classes
    with torch.device("meta"):  # shapes only: nothing allocated
        model = alexnet.AlexNet(num_classes, width)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_features_and_forward_equal_the_layers_run_by_hand():
    model = randomise_bn(small_model()).eval()
    x = images()

    def conv_bn_relu(x, block, stride, padding):
        c, bn = block.conv, block.bn
        y = F.conv2d(x, c.weight, c.bias, stride=stride, padding=padding)
        return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))

    def linear_bn_relu(x, block):
        bn = block.bn
        y = F.linear(x, block.linear.weight)
        return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))

    def pool(x):
        return F.max_pool2d(x, 3, 2)

    with torch.no_grad():
        c = model.convs
        conv1 = conv_bn_relu(x, c[0], 4, 2)
        conv2 = conv_bn_relu(pool(conv1), c[1], 1, 2)
        conv3 = conv_bn_relu(pool(conv2), c[2], 1, 1)
        conv4 = conv_bn_relu(conv3, c[3], 1, 1)
        conv5 = conv_bn_relu(conv4, c[4], 1, 1)
        hidden = linear_bn_relu(linear_bn_relu(pool(conv5).reshape(len(x), -1), model.fc[0]), model.fc[1])
        logits = F.linear(hidden, model.head.weight, model.head.bias)
        for k, by_hand in enumerate([conv1, conv2, conv3, conv4, conv5], start=1):
            torch.testing.assert_close(model.features(x, k), by_hand, rtol=0, atol=0)
        torch.testing.assert_close(model(x), logits, rtol=1e-6, atol=1e-6)
    assert conv1.min() >= 0 and (conv1 == 0).any()  # after the ReLU


@pytest.mark.parametrize("k", [0, 6, -1, 2.5, 2.0, "conv1", None])
def test_features_rejects_a_bad_k(k):
    with pytest.raises(ValueError, match=f"got {k!r}"):
        small_model().features(images(1), k)


def test_initialisation_is_the_originals():
    # The original sets none: PyTorch 0.2's defaults, U(+-1/sqrt(fan_in)) and BN scale U(0, 1).
    model = small_model()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = 1 / m.weight[0].numel() ** 0.5
            for p in (m.weight, m.bias) if m.bias is not None else (m.weight,):
                assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert 0 <= m.weight.min() and m.weight.max() < 1 and m.weight.std() > 0.1
            assert (m.bias == 0).all() and (m.running_mean == 0).all() and (m.running_var == 1).all()


def test_training_step_runs():
    model = small_model()
    loss = F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- the original's checkpoints
def test_original_names_are_the_original_layout():
    ours = small_model().state_dict()
    theirs = OriginalAlexNet(width=SMALL).state_dict()
    assert set(alexnet.ORIGINAL_NAMES) == set(theirs)
    for key, value in theirs.items():
        assert ours[alexnet.ORIGINAL_NAMES[key]].shape == value.shape, key


@pytest.mark.parametrize("old_pytorch", [False, True], ids=["current", "pytorch-0.3"])
def test_original_checkpoint_round_trip(tmp_path, old_pytorch):
    model = randomise_bn(small_model(num_classes=4, seed=3)).eval()
    state = to_original_names(model.state_dict())
    replica = OriginalAlexNet(width=SMALL)
    replica.load_state_dict(state)  # strict: these are exactly the original's names and shapes
    x = images()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(replica.eval()(x), expected)  # ...and they mean the same layers
    if old_pytorch:  # PyTorch 0.2/0.3 wrote no num_batches_tracked, in the pre-1.6 format
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "model_net_epoch30"
    torch.save({"epoch": 30, "network": state}, path, _use_new_zipfile_serialization=not old_pytorch)
    loaded = models.load_model(path)
    assert not loaded.training and loaded.config == dict(arch="alexnet", num_classes=4, width=SMALL)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        for k in range(1, 6):
            assert torch.equal(loaded.features(x, k), model.features(x, k))


@pytest.mark.parametrize("width,num_classes", [(1.0, 4), (SMALL, 4), (0.1, 1000), (0.3, 10), (0.01, 2)])
def test_config_of_original_infers_width_and_classes(width, num_classes):
    with torch.device("meta"):
        state = alexnet.AlexNet(num_classes, width).state_dict()
    config = alexnet.config_of(alexnet.from_original(to_original_names(state)))
    assert config["num_classes"] == num_classes
    with torch.device("meta"):  # the inferred width builds exactly these layers
        rebuilt = alexnet.AlexNet(**config).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_from_original_names_an_unexpected_key(tmp_path):
    state = to_original_names(small_model().state_dict())
    state["_feature_blocks.3.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"_feature_blocks\.3\.0\.weight"):
        alexnet.from_original(state)
    torch.save({"epoch": 1, "network": state}, tmp_path / "extra.pt")
    expect_user_error(tmp_path / "extra.pt", "_feature_blocks.3.0.weight")


def test_an_original_checkpoint_missing_a_layer_is_refused(tmp_path):
    state = to_original_names(small_model().state_dict())
    del state["_feature_blocks.8.4.weight"]
    torch.save({"epoch": 1, "network": state}, tmp_path / "short.pt")
    expect_user_error(tmp_path / "short.pt", "fc.1.linear.weight")


# ----------------------------------------------------------------------------- this project's files
def test_project_file_round_trip(tmp_path):
    model = randomise_bn(small_model(num_classes=10, seed=4)).eval()
    torch.save({"model": model.state_dict(), "model_config": model.config, "epoch": 3}, tmp_path / "model.pt")
    loaded = models.load_model(tmp_path / "model.pt", device="cpu")
    assert not loaded.training and loaded.config == model.config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_alexnet_from_saved_takes_a_loaded_dict():
    model = small_model()
    saved = {"model": model.state_dict(), "model_config": model.config}
    built = alexnet.alexnet_from_saved(saved, "in-memory")
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("case,words", [
    ("nin", ["not a NIN checkpoint"]),
    ("no-arch", ["not a NIN checkpoint"]),
    ("wrong-width", ["convs.0.conv.weight", "shape [8, 3, 11, 11]", "expected [16, 3, 11, 11]"]),
    ("bad-config", ["model_config", "depth"]),
    ("negative-classes", ["model_config"]),
    ("text-width", ["model_config"]),
    ("not-a-dict", ["neither"]),
    ("weights-not-a-dict", ["list"]),
    ("neither", ["neither"]),
    ("not-a-tensor", ["head.bias", "int"]),
])
def test_a_file_of_the_wrong_content_is_a_user_error(tmp_path, case, words):
    model = small_model()
    state, config = model.state_dict(), model.config
    saved = {
        "nin": lambda: {"model": state, "model_config": dict(config, arch="nin")},
        "no-arch": lambda: {"model": state, "model_config": dict(blocks=4, num_classes=4, width=SMALL)},
        "wrong-width": lambda: {"model": state, "model_config": dict(config, width=0.25)},
        "bad-config": lambda: {"model": state, "model_config": dict(config, depth=3)},
        "negative-classes": lambda: {"model": state, "model_config": dict(config, num_classes=-1)},
        "text-width": lambda: {"model": state, "model_config": dict(config, width="wide")},
        "not-a-dict": lambda: torch.zeros(3),
        "weights-not-a-dict": lambda: {"epoch": 1, "network": [1, 2]},
        "neither": lambda: {"state_dict": state},
        "not-a-tensor": lambda: {"model": dict(state, **{"head.bias": 7}), "model_config": config},
    }[case]()
    torch.save(saved, tmp_path / "model.pt")
    expect_user_error(tmp_path / "model.pt", *words)


# ----------------------------------------------------------------------------- hostile and damaged files
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_that_carries_code_is_refused_unrun(tmp_path, zipfile):
    control, marker = tmp_path / "control-ran", tmp_path / "payload-ran"
    state = to_original_names(small_model().state_dict())
    torch.save({"epoch": 1, "network": dict(state, payload=RunsCode(control))}, tmp_path / "control.pt",
               _use_new_zipfile_serialization=zipfile)
    torch.load(tmp_path / "control.pt", weights_only=False)  # without weights_only it runs
    assert control.exists()
    torch.save({"epoch": 1, "network": dict(state, payload=RunsCode(marker))}, tmp_path / "hostile.pt",
               _use_new_zipfile_serialization=zipfile)
    message = expect_user_error(tmp_path / "hostile.pt", "refused")
    assert "weights_only` set to `False`" not in message  # torch's advice to load it anyway
    assert not marker.exists()


def damaged_files(tmp_path):
    model = small_model()
    saved = {"model": model.state_dict(), "model_config": model.config}
    torch.save(saved, tmp_path / "good.pt")
    torch.save(saved, tmp_path / "good-legacy.pt", _use_new_zipfile_serialization=False)
    good, legacy = (tmp_path / "good.pt").read_bytes(), (tmp_path / "good-legacy.pt").read_bytes()
    return {
        "truncated.pt": good[: len(good) // 2],
        "truncated-legacy.pt": legacy[: len(legacy) // 2],
        "garbage.pt": b"\x00\xffnot pickle, not zip" * 200,
        "empty.pt": b"",
        "text.pt": b"hello, this is not a checkpoint\n",
    }


@pytest.mark.parametrize("name, why", [("truncated.pt", "damaged or cut short"), ("truncated-legacy.pt", "damaged"),
                                       ("garbage.pt", ""), ("empty.pt", "cut short"),
                                       ("text.pt", "not a file torch.save wrote"), ("missing.pt", "no such file"),
                                       ("a-folder", "a folder")])
def test_an_unreadable_file_is_a_user_error_naming_it(tmp_path, name, why):
    files = damaged_files(tmp_path)
    path = tmp_path / name
    if name in files:
        path.write_bytes(files[name])
    elif name == "a-folder":
        path.mkdir()
    message = expect_user_error(path, "not a readable checkpoint", why)
    assert not message.rstrip(")").endswith(("(", ": ")), message  # a reason, not a bare number or nothing
