"""Optional peer checks of LRP (sgrad.lrp): zennit's composites (and Captum's LRP, whose default rules are the
epsilon composite's with an epsilon of 1e-9) on a PyTorch port of the shipped CifarNet, built here as those
libraries need it: BatchNorm folded into the convolutions (our folded weights), each residual sum as a module of
its own (zennit's Sum, Captum's Addition_Module), the input normalisation outside (the port gets (x - mean) /
std, whose relevance is ours: sgrad.lrp passes relevance through the normalisation unchanged) and LOGIT_SCALE
folded into the classifier; and zennit's on a port of EfficientNet-Lite0 on a photograph. Skipped without torch
and zennit (Captum)."""

import chainer
import numpy as np
import pytest

from conftest import BENCHMARKS_DIR, import_zennit, needs_cifar10, relative_difference, within
from model import CIFAR10_MEAN, CIFAR10_STD, load_model
from sgrad.data import load_test_images
from sgrad.lrp import LRP
from sgrad.saliency import GradientEngine


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


@pytest.mark.cross_check('lrp', against=('zennit', 'torch'))
@needs_cifar10
@pytest.mark.parametrize('composite', ['epsilon_plus_flat', 'epsilon_gamma_box', 'epsilon_plus',
                                       'epsilon_alpha2_beta1', 'epsilon'])
def test_lrp_equals_zennits_composites_on_cifar10(cifar, composite, monkeypatch):
    """zennit's Gradient attributor with attr_output = one-hot times the logits (so its relevance starts at
    S_c(x), as ours), on 8 test images, float32 on both sides (float64 for the epsilon composite, DTYPES)."""
    torch, zennit = import_zennit(monkeypatch)
    from zennit.attribution import Gradient
    model, engine, xs, targets = cifar[DTYPES.get(composite, np.float32)]
    from bench_rules import lrp_cifarnet_port
    port = lrp_cifarnet_port(torch, model, 'zennit')
    h = normalized(torch, xs).requires_grad_()
    onehot = torch.nn.functional.one_hot(torch.from_numpy(targets.astype(np.int64)), 10).to(h.dtype)
    with Gradient(port, zennit_composite(zennit, torch, composite, xs)) as attributor:
        logits, theirs = attributor(h, attr_output=lambda output: onehot * output)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        assert relative_difference(model.inference_copy()(xs).array, logits.detach().numpy()) < 1e-5
    ours = LRP(engine, composite).attribute(xs, targets)
    assert within(relative_difference(ours, theirs.numpy()), 1e-4)


@pytest.mark.cross_check('lrp', against=('captum', 'torch'))
@needs_cifar10
def test_lrp_epsilon_equals_captums_lrp_on_cifar10(cifar, monkeypatch):
    """Captum's LRP with its default rules (epsilon 1e-9 on convolutions, linear layers and its Addition_Module;
    ReLU passes; the port's max poolings are functional, so their gradient) is our epsilon composite with epsilon
    and stabilizer 1e-9; in float64 (DTYPES)."""
    pytest.importorskip('torch', reason='optional peer check: pip install torch==2.13.0')
    pytest.importorskip('captum', reason='optional peer check: pip install captum')
    import torch
    from captum.attr import LRP as CaptumLRP
    model, engine, xs, targets = cifar[DTYPES['epsilon']]
    monkeypatch.syspath_prepend(BENCHMARKS_DIR)
    from bench_rules import lrp_cifarnet_port
    port = lrp_cifarnet_port(torch, model, 'captum')
    theirs = CaptumLRP(port).attribute(normalized(torch, xs).requires_grad_(),
                                       target=torch.from_numpy(targets.astype(np.int64)))
    ours = LRP(engine, 'epsilon', epsilon=1e-9, stabilizer=1e-9).attribute(xs, targets)
    assert within(relative_difference(ours, theirs.detach().numpy()), 1e-4)


@pytest.mark.cross_check('lrp', against=('zennit', 'torch'))
@pytest.mark.parametrize('composite', ['epsilon_plus_flat', 'epsilon_gamma_box'])
def test_lrp_equals_zennits_composites_on_efficientnet(composite, monkeypatch):
    """EfficientNet-Lite0 (ReLU6: zennit's Pass; depthwise and 1x1 convolutions; the stem, ours a 1x1
    convolution of its patches, gets the flat or box rule with the padding zero; global average pooling:
    Norm) on a photograph, float32 on both sides: unlike the gradient (tests/test_efficientnet.py), LRP does not
    depend on which side of 0 or 6 a ReLU6 input rounds to (its relevance passes)."""
    torch, zennit = import_zennit(monkeypatch)
    from zennit.attribution import Gradient
    from sgrad.data import load_image_file
    from sgrad.efficientnet import load_efficientnet_lite0
    model = load_efficientnet_lite0()
    x = load_image_file('data/photos/chelsea.png', 224)[0][None]
    engine = GradientEngine(model)
    target = engine.probabilities(x).argmax(axis=1)
    scale = lambda image: torch.from_numpy(image * np.float32(255. / 128.) - np.float32(127. / 128.))
    h = scale(x).requires_grad_()
    if composite == 'epsilon_gamma_box':
        composite_ = zennit.composites.EpsilonGammaBox(low=scale(np.zeros_like(x)), high=scale(np.ones_like(x)))
    else:
        composite_ = zennit.composites.EpsilonPlusFlat()
    onehot = torch.nn.functional.one_hot(torch.from_numpy(target.astype(np.int64)), 1000).to(h.dtype)
    from bench_rules import lrp_efficientnet_port
    with Gradient(lrp_efficientnet_port(torch, model), composite_) as attributor:
        logits, theirs = attributor(h, attr_output=lambda output: onehot * output)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        assert relative_difference(model.inference_copy()(x).array, logits.detach().numpy()) < 1e-5
    assert within(relative_difference(LRP(engine, composite).attribute(x, target), theirs.numpy()), 1e-4)
