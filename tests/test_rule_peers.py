"""Guided Backprop and Deconvnet against Captum's GuidedBackprop and Deconvolution (optional peer checks, skipped
with their reason without torch and Captum), on the PyTorch port of the shipped CifarNet (benchmarks/bench_peer.py)
and real CIFAR-10 test images: ours run through the folded model's fused convolution + ReLU nodes, theirs through
nn.ReLU modules."""
import numpy as np
import pytest

from conftest import relative_difference, torch_cifarnet
from model import load_model
from sgrad.data import load_test_images
from sgrad.saliency import Deconvnet, GradientEngine, GuidedBackprop


@pytest.fixture(scope='module')
def shipped():
    """The shipped CifarNet, its engine, test images 0-7 and their predicted classes."""
    model = load_model()
    engine = GradientEngine(model)
    xs, _ = load_test_images(0, 8)
    return model, engine, xs, engine.probabilities(xs).argmax(axis=1)


@pytest.fixture
def captum(shipped, monkeypatch):
    """captum.attr, torch and the shipped CifarNet's PyTorch port."""
    torch, net = torch_cifarnet(shipped[0], monkeypatch)
    import captum.attr
    return captum.attr, torch, net


@pytest.mark.parametrize('ours, theirs', [(Deconvnet, 'Deconvolution'), (GuidedBackprop, 'GuidedBackprop')])
def test_relu_rules_equal_captums(shipped, captum, ours, theirs):
    """Captum's Deconvolution gives every nn.ReLU's input the ReLU of its output gradient, its GuidedBackprop
    the ReLU of its input gradient: the same maps as ours, which are not the plain gradient's."""
    attr, torch, net = captum
    _, engine, xs, targets = shipped
    mine = ours(engine).attribute(xs, targets)
    reference = getattr(attr, theirs)(net).attribute(torch.from_numpy(xs),
                                                     target=torch.from_numpy(targets.astype(np.int64)))
    assert relative_difference(mine, reference.numpy()) < 1e-4
    assert relative_difference(engine(xs, targets), reference.numpy()) > 0.1
