"""nin.py: the NIN's layers, shapes, parameter counts and initialisation, and loading this
project's checkpoints and the original code's (old and new file formats, hostile files)."""
import pytest
import torch

import models
import nin
from conftest import RunsCode, paper_convs, to_original_names
from errors import UserError


@pytest.mark.parametrize("blocks", [3, 4, 5])
def test_nin_feature_and_output_shapes(blocks):
    model = nin.NIN(blocks, num_classes=10, width=1.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for k in range(1, blocks + 1):
            expected = (2, 96, 16, 16) if k == 1 else (2, 192, 8, 8)
            assert tuple(model.features(x, k).shape) == expected, k
        assert tuple(model(x).shape) == (2, 10)


@pytest.mark.parametrize("blocks", [3, 4, 5])
@pytest.mark.parametrize("classes", [4, 10])
def test_nin_has_the_papers_layers_and_parameter_count(blocks, classes):
    model = nin.NIN(blocks, num_classes=classes, width=1.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(o, i, k, k) for k, i, o in paper_convs(blocks)]
    assert all(c.bias is None for c in convs)
    expected = sum(k * k * i * o + 2 * o for k, i, o in paper_convs(blocks)) + 192 * classes + classes
    assert sum(p.numel() for p in model.parameters()) == expected


def test_nin_initialisation_is_the_original_one():
    # PyTorch 0.2's defaults, which the original code's NIN got (it never calls its
    # weight_initialization): U(+-1/sqrt(fan_in)) weights and head bias, BN scales U(0, 1)
    torch.manual_seed(0)
    model = nin.NIN(4, num_classes=4, width=1.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv, (k, cin, _) in zip(convs, paper_convs(4)):
        bound = (k * k * cin) ** -0.5
        w = conv.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound  # >= 15,000 draws
        assert abs(w.std().item() - bound / 3 ** 0.5) < 0.02 * bound and abs(w.mean().item()) < 0.02 * bound
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert 0 <= bn.weight.min() and bn.weight.max() <= 1 and 0.3 < bn.weight.mean() < 0.7
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    bound = 192 ** -0.5
    assert model.head.bias.abs().max() <= bound and model.head.bias.abs().max() > 0.3 * bound
    assert model.head.weight.abs().max() <= bound


@pytest.mark.parametrize("blocks", [2, 6])
def test_nin_refuses_a_block_count_the_paper_lacks(blocks):
    with pytest.raises(ValueError, match="blocks"):
        nin.NIN(blocks=blocks)


@pytest.mark.parametrize("block", [0, 5])
def test_features_refuses_a_block_the_model_lacks(block):
    model = nin.NIN(4, width=0.125)
    with pytest.raises(ValueError, match="block"):
        model.features(torch.zeros(1, 3, 32, 32), block)



@pytest.mark.parametrize("blocks", [3, 4, 5])
@pytest.mark.parametrize("width", [1.0, 0.125])
def test_load_model_reads_an_original_checkpoint(tmp_path, blocks, width):
    torch.manual_seed(blocks)
    original = nin.NIN(blocks, num_classes=10, width=width)
    with torch.no_grad():  # BN statistics unlike any other layer's, so a swap would show
        for bn in (m for m in original.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0), bn.num_batches_tracked.fill_(123)
        original.head.bias.normal_()
    path = tmp_path / "original.pth.tar"
    torch.save({"epoch": 7, "network": to_original_names(original.state_dict(), blocks)}, path)
    model = models.load_model(path)
    assert model.config == dict(blocks=blocks, num_classes=10, width=width)
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), original.eval()(x))


def test_load_model_reads_an_old_pytorch_original_checkpoint(tmp_path):
    # The original code ran on PyTorch 0.3: no num_batches_tracked, the pre-1.6 file format.
    original = nin.NIN(4, num_classes=4, width=0.125).eval()
    state = {k: v for k, v in to_original_names(original.state_dict(), 4).items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 200, "network": state}, tmp_path / "old.pth.tar", _use_new_zipfile_serialization=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models.load_model(tmp_path / "old.pth.tar")(x), original(x))


def test_load_model_refuses_weights_that_are_not_finite(tmp_path):
    # A RotNet that diverged: refused when read, not an epoch into a probe as a NaN loss
    model = nin.NIN(3, 4, 0.125)
    state = model.state_dict()
    state["blocks.1.0.conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(dict(model=state, model_config=model.config), tmp_path / "model.pt")
    with pytest.raises(UserError, match=r"model.pt: its weights are not all finite \(NaN or inf\)"):
        models.load_model(tmp_path / "model.pt")


def test_load_model_refuses_a_checkpoint_that_carries_code(tmp_path):
    config = dict(blocks=3, num_classes=4, width=0.125)
    torch.save({"model": RunsCode(tmp_path / "control"), "model_config": config}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # the payload is live without weights_only
    assert (tmp_path / "control").exists()
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "model_config": config}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="refused"):
        models.load_model(tmp_path / "model.pt")
    assert not marker.exists()
