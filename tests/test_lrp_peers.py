"""Optional peer checks of LRP (sgrad.lrp): zennit's composites (and Captum's LRP, whose default rules are the
epsilon composite's with an epsilon of 1e-9) on a PyTorch port of the shipped CifarNet, built here as those
libraries need it: BatchNorm folded into the convolutions (our folded weights), each residual sum as a module of
its own (zennit's Sum, Captum's Addition_Module), the input normalisation outside (the port gets (x - mean) /
std, whose relevance is ours: sgrad.lrp passes relevance through the normalisation unchanged) and LOGIT_SCALE
folded into the classifier. Skipped without torch and zennit (Captum)."""
import sys
import types

import chainer
import numpy as np
import pytest

from conftest import needs_cifar10, relative_difference
from model import CIFAR10_MEAN, CIFAR10_STD, load_model
from sgrad.data import load_test_images
from sgrad.lrp import LRP
from sgrad.saliency import GradientEngine


def import_zennit(monkeypatch):
    """zennit 0.5.1, or a skip. Its package imports torchvision for its ResNet canonizers (zennit/torchvision.py:
    ``from torchvision.models.resnet import Bottleneck, BasicBlock``), which no torchvision built for this
    torch provides: without one, a stub module with those two classes, for the duration of the test, lets it
    import (the canonizers then match nothing, and none is used here)."""
    torch = pytest.importorskip('torch', reason='optional peer check: pip install torch==2.13.0')
    try:
        __import__('torchvision')  # a real one, if there is one that imports
    except ImportError:
        stubs = {name: types.ModuleType(name) for name in
                 ('torchvision', 'torchvision.models', 'torchvision.models.resnet')}
        stubs['torchvision.models.resnet'].Bottleneck = type('Bottleneck', (torch.nn.Module,), {})
        stubs['torchvision.models.resnet'].BasicBlock = type('BasicBlock', (torch.nn.Module,), {})
        for name, module in stubs.items():
            monkeypatch.setitem(sys.modules, name, module)
    zennit = pytest.importorskip('zennit', reason='optional peer check: pip install --no-deps zennit')
    import zennit.attribution  # noqa: F401
    import zennit.composites  # noqa: F401
    import zennit.layer  # noqa: F401
    import zennit.rules  # noqa: F401
    import zennit.types  # noqa: F401
    return torch, zennit


def torch_port(torch, model, residual_sum):
    """The PyTorch port of CifarNet ``model`` (folded) for LRP, in model's dtype: ``residual_sum`` 'zennit' (its
    Sum module on the two summands stacked) or 'captum' (its Addition_Module)."""
    nn = torch.nn
    folded = model.inference_copy()
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[folded.fc.W.dtype]

    def conv_relu(block):
        W, b = block.folded
        conv = nn.Conv2d(W.shape[1], W.shape[0], 3, padding=1, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(W))
            conv.bias.copy_(torch.from_numpy(b))
        return nn.Sequential(conv, nn.ReLU())

    class Residual(nn.Module):
        def __init__(self, res):
            super().__init__()
            self.f = nn.Sequential(conv_relu(res.block1), conv_relu(res.block2))
            if residual_sum == 'zennit':
                from zennit.layer import Sum
                self.sum = Sum()
            else:
                from captum.attr._utils.custom_modules import Addition_Module
                self.sum = Addition_Module()

        def forward(self, x):
            if residual_sum == 'zennit':
                return self.sum(torch.stack([x, self.f(x)], dim=-1))
            return self.sum(x, self.f(x))

    class Port(nn.Module):
        """The max poolings are functional: zennit gives them no rule, and Captum's epsilon rule for
        nn.MaxPool2d (the relevance times m / (m + 1e-9), m the maximum) is not the gradient where m is small."""

        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([
                conv_relu(folded.prep), conv_relu(folded.conv1), Residual(folded.res1), conv_relu(folded.conv2),
                conv_relu(folded.conv3), Residual(folded.res3)])
            self.fc = nn.Linear(*folded.fc.W.shape[::-1], dtype=dtype)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(folded.fc.W.array * folded.LOGIT_SCALE))
                self.fc.bias.copy_(torch.from_numpy(folded.fc.b.array * folded.LOGIT_SCALE))

        def forward(self, h):
            pool = torch.nn.functional.max_pool2d
            prep, conv1, res1, conv2, conv3, res3 = self.stages
            h = pool(res3(pool(conv3(pool(conv2(res1(pool(conv1(prep(h)), 2))), 2)), 2)), 4)
            return self.fc(torch.flatten(h, 1))

    return Port().eval()


def normalized(torch, xs):
    return torch.from_numpy((xs - CIFAR10_MEAN.reshape(3, 1, 1)) / CIFAR10_STD.reshape(3, 1, 1))


@pytest.fixture(scope='module')
def cifar():
    """CifarNet and 8 test images in float32 and in float64 (by dtype): (model, engine, images, targets)."""
    xs, _ = load_test_images(0, 8)
    setups = {}
    for dtype in (np.float32, np.float64):
        with chainer.using_config('dtype', dtype):
            model = load_model()
        engine = GradientEngine(model)
        setups[dtype] = model, engine, xs.astype(dtype), engine.probabilities(xs.astype(dtype)).argmax(axis=1)
    return setups


#: The epsilon rule's relevance ratios R / (z + epsilon) where z is near 0 amplify float32's rounding
#: (measured against zennit: 1.8e-4 with epsilon 1e-6, against Captum 7.7e-3 with 1e-9; the other composites
#: agree to 1e-6 in float32): so the epsilon composite is compared in float64.
DTYPES = {'epsilon': np.float64}


def zennit_composite(zennit, torch, name, xs):
    """zennit's composite of that name, with its defaults; the box's bounds the image range [0, 1] normalised."""
    from zennit import composites, rules, types as ztypes
    if name == 'epsilon_gamma_box':
        low, high = (normalized(torch, np.full(xs.shape, value, xs.dtype)) for value in (0., 1.))
        return composites.EpsilonGammaBox(low=low, high=high)
    if name == 'epsilon':
        return composites.LayerMapComposite(composites.layer_map_base() + [
            (ztypes.Convolution, rules.Epsilon()), (torch.nn.Linear, rules.Epsilon())])
    return {'epsilon_plus_flat': composites.EpsilonPlusFlat, 'epsilon_plus': composites.EpsilonPlus,
            'epsilon_alpha2_beta1': composites.EpsilonAlpha2Beta1}[name]()


@needs_cifar10
@pytest.mark.parametrize('composite', ['epsilon_plus_flat', 'epsilon_gamma_box', 'epsilon_plus',
                                       'epsilon_alpha2_beta1', 'epsilon'])
def test_lrp_equals_zennits_composites_on_cifar10(cifar, composite, monkeypatch):
    """zennit's Gradient attributor with attr_output = one-hot times the logits (so its relevance starts at
    S_c(x), as ours), on 8 test images, float32 on both sides (float64 for the epsilon composite, DTYPES)."""
    torch, zennit = import_zennit(monkeypatch)
    from zennit.attribution import Gradient
    model, engine, xs, targets = cifar[DTYPES.get(composite, np.float32)]
    port = torch_port(torch, model, 'zennit')
    h = normalized(torch, xs).requires_grad_()
    onehot = torch.nn.functional.one_hot(torch.from_numpy(targets.astype(np.int64)), 10).to(h.dtype)
    with Gradient(port, zennit_composite(zennit, torch, composite, xs)) as attributor:
        logits, theirs = attributor(h, attr_output=lambda output: onehot * output)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        assert relative_difference(model.inference_copy()(xs).array, logits.detach().numpy()) < 1e-5
    ours = LRP(engine, composite).attribute(xs, targets)
    assert relative_difference(ours, theirs.numpy()) < 1e-4


@needs_cifar10
def test_lrp_epsilon_equals_captums_lrp_on_cifar10(cifar):
    """Captum's LRP with its default rules (epsilon 1e-9 on convolutions, linear layers and its Addition_Module;
    ReLU passes; the port's max poolings are functional, so their gradient) is our epsilon composite with epsilon
    and stabilizer 1e-9; in float64 (DTYPES)."""
    pytest.importorskip('torch', reason='optional peer check: pip install torch==2.13.0')
    pytest.importorskip('captum', reason='optional peer check: pip install captum')
    import torch
    from captum.attr import LRP as CaptumLRP
    model, engine, xs, targets = cifar[DTYPES['epsilon']]
    port = torch_port(torch, model, 'captum')
    theirs = CaptumLRP(port).attribute(normalized(torch, xs).requires_grad_(), target=torch.from_numpy(targets.astype(np.int64)))
    ours = LRP(engine, 'epsilon', epsilon=1e-9, stabilizer=1e-9).attribute(xs, targets)
    assert relative_difference(ours, theirs.detach().numpy()) < 1e-4
