"""Guided Backprop, Deconvnet, Gradient SHAP, DeepLIFT and DeepLIFT-SHAP against Captum's GuidedBackprop,
Deconvolution, GradientShap, DeepLift and DeepLiftShap (optional peer checks, skipped with their reason without
torch and Captum), on the PyTorch port of the shipped CifarNet (benchmarks/bench_peer.py) and real CIFAR-10 test
images: ours run through the folded model's fused convolution + ReLU nodes, theirs through nn.ReLU modules."""
import numpy as np
import pytest
from chainer.dataset import concat_examples

from conftest import import_zennit, needs_cifar10, relative_difference, torch_cifarnet, within
from model import load_model
from sgrad.data import load_cifar10, load_test_images
from sgrad.deeplift import DeepLIFT, DeepLIFTSHAP
from sgrad.paths import GradientSHAP
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


@pytest.mark.cross_check('deconvnet', 'guided_backprop', against=('captum', 'torch'))
@pytest.mark.parametrize('ours, theirs', [(Deconvnet, 'Deconvolution'), (GuidedBackprop, 'GuidedBackprop')])
def test_relu_rules_equal_captums(shipped, captum, ours, theirs):
    """Captum's Deconvolution gives every nn.ReLU's input the ReLU of its output gradient, its GuidedBackprop
    the ReLU of its input gradient: the same maps as ours, which are not the plain gradient's."""
    attr, torch, net = captum
    _, engine, xs, targets = shipped
    mine = ours(engine).attribute(xs, targets)
    reference = getattr(attr, theirs)(net).attribute(torch.from_numpy(xs),
                                                     target=torch.from_numpy(targets.astype(np.int64)))
    assert within(relative_difference(mine, reference.numpy()), 1e-4)
    assert relative_difference(engine(xs, targets), reference.numpy()) > 0.1


@pytest.mark.cross_check('gradient_shap', against=('captum', 'torch'))
@pytest.mark.parametrize('distribution', ['blurred', pytest.param('training images', marks=needs_cifar10)])
def test_gradient_shap_equals_captums_given_our_draws(shipped, captum, monkeypatch, distribution):
    """Captum's GradientShap with the same baselines, alphas and noise as ours. Captum draws them itself, the
    baselines' indices by np.random.choice and the alphas by np.random.uniform (NumPy's global generator),
    the noise by torch.normal; the test patches those three samplers to return our draws (GradientSHAP.draw),
    in Captum's order: row i * n + k is image i's draw k. Training images: the first 100 as the baselines'
    set, Captum given the index of the one we drew; blurred copies, which depend on the image: the set of
    every image's n copies, Captum given each in turn."""
    attr, torch, net = captum
    _, engine, xs, targets = shipped
    xs, targets, n = xs[:4], targets[:4], 16
    images = 'blurred' if distribution == 'blurred' else concat_examples(load_cifar10()[0][:100])[0]
    shap = GradientSHAP(engine, n, images, stdev=0.03, seed=5)
    mine = shap.attribute(xs, targets)
    baselines, alphas, noise = zip(*(shap.draw(k, xs) for k in range(n)))
    rows = lambda draws: np.tile(np.asarray(draws), (len(xs),) + (1,) * (np.ndim(draws) - 1))  # image by image
    if distribution == 'blurred':
        pool, picks = np.stack(baselines, axis=1).reshape((-1,) + xs.shape[1:]), np.arange(len(xs) * n)
    else:
        pool = images
        picks = rows([np.flatnonzero((images == drawn[0]).all(axis=(1, 2, 3)))[0] for drawn in baselines])

    def choice(count, size):
        assert (count, size) == (len(pool), len(xs) * n)
        return picks

    def uniform(low, high, size):
        assert (low, high, size) == (0., 1., len(xs) * n)
        return rows(alphas)

    def normal(mean, std):
        assert mean == 0 and tuple(std.shape) == (len(xs) * n,) + xs.shape[1:]
        return torch.from_numpy(rows(noise))
    monkeypatch.setattr(np.random, 'choice', choice)
    monkeypatch.setattr(np.random, 'uniform', uniform)
    monkeypatch.setattr(torch, 'normal', normal)
    reference = attr.GradientShap(net).attribute(torch.from_numpy(xs), torch.from_numpy(pool), n_samples=n,
                                                 stdevs=0.03, target=torch.from_numpy(targets.astype(np.int64)))
    assert within(relative_difference(mine, reference.detach().numpy()), 1e-4)


@pytest.fixture
def captum_deeplift(captum, monkeypatch):
    """Captum's DeepLift as it works on CifarNet's port (benchmarks/bench_rules.py), by two changes, neither of
    its rules' arithmetic: a copy before each nn.MaxPool2d (copy_before_max_pools: Captum's hooks on a ReLU's
    output that is a MaxPool2d's input clash), and the fix of Captum issue #1276 (fixed_captum_maxpool)."""
    attr, torch, net = captum
    import captum.attr._core.deep_lift as deep_lift
    from bench_rules import copy_before_max_pools, fixed_captum_maxpool
    monkeypatch.setattr(deep_lift, 'maxpool', fixed_captum_maxpool())
    return attr, torch, copy_before_max_pools(torch, net)


@pytest.mark.cross_check('deeplift', against=('captum', 'torch'))
@needs_cifar10
@pytest.mark.parametrize('baseline', ['black', 'grey', 'test image 100'])
def test_deeplift_equals_captums(shipped, captum_deeplift, baseline):
    attr, torch, net = captum_deeplift
    _, engine, xs, targets = shipped
    image = {'black': np.zeros(xs.shape[1:], np.float32), 'grey': np.full(xs.shape[1:], 0.5, np.float32),
             'test image 100': load_test_images(100, 101)[0][0]}[baseline]
    mine = DeepLIFT(engine, image).attribute(xs, targets)
    reference, delta = attr.DeepLift(net).attribute(
        torch.from_numpy(xs), baselines=torch.from_numpy(np.repeat(image[None], len(xs), axis=0)),
        target=torch.from_numpy(targets.astype(np.int64)), return_convergence_delta=True)
    assert float(delta.abs().max()) < 1e-4 * float(np.abs(mine).sum(axis=(1, 2, 3)).max())
    assert within(relative_difference(mine, reference.detach().numpy()), 1e-4)


@pytest.mark.cross_check('deeplift_shap', against=('captum', 'torch'))
@needs_cifar10
def test_deeplift_shap_equals_captums(shipped, captum_deeplift):
    attr, torch, net = captum_deeplift
    _, engine, xs, targets = shipped
    baselines = np.concatenate([np.zeros((1,) + xs.shape[1:], np.float32), load_test_images(100, 103)[0]])
    mine = DeepLIFTSHAP(engine, baselines).attribute(xs, targets)
    reference = attr.DeepLiftShap(net).attribute(torch.from_numpy(xs), baselines=torch.from_numpy(baselines),
                                                 target=torch.from_numpy(targets.astype(np.int64)))
    assert within(relative_difference(mine, reference.detach().numpy()), 1e-4)


@pytest.mark.cross_check('deeplift', against=('captum', 'torch'))
@pytest.mark.parametrize('baseline', ['black', 'blurred'])
def test_deeplift_equals_captums_on_efficientnet_with_its_rescale_rule_for_relu6(monkeypatch, baseline):
    """EfficientNet-Lite0 on a photograph, against Captum's DeepLift on the LRP port (benchmarks/bench_rules.py:
    an nn.ReLU6 module per use, unlike the PyTorch reference, which applies one twice per block; residual sums
    as modules), with Captum's own Rescale rule (its ``nonlinear``) registered for nn.ReLU6, which it does not
    list. DeepLIFT does not depend on the input's affine scaling, which the port takes outside. In float64: the
    Rescale multipliers (f(z) - f(z')) / (z - z') amplify float32's rounding where z' is close to z (2.6e-4 from
    the blurred baseline in float32; 1.6e-13 in float64)."""
    torch, _ = import_zennit(monkeypatch)
    pytest.importorskip('captum', reason='optional peer check: pip install captum')
    import captum.attr
    import captum.attr._core.deep_lift as deep_lift
    import chainer
    from bench_rules import lrp_efficientnet_port
    from sgrad.data import load_image_file
    from sgrad.efficientnet import load_efficientnet_lite0
    from sgrad.paths import gaussian_blur
    monkeypatch.setitem(deep_lift.SUPPORTED_NON_LINEAR, torch.nn.ReLU6, deep_lift.nonlinear)
    with chainer.using_config('dtype', np.float64):
        model = load_efficientnet_lite0()
    engine = GradientEngine(model)
    x = load_image_file('data/photos/chelsea.png', 224)[0][None].astype(np.float64)
    target = engine.probabilities(x).argmax(axis=1)
    image = np.zeros_like(x) if baseline == 'black' else gaussian_blur(x, 20)
    mine = DeepLIFT(engine, image[0]).attribute(x, target)
    scaled = lambda images: torch.from_numpy(images * (255. / 128.) - 127. / 128.)
    reference = captum.attr.DeepLift(lrp_efficientnet_port(torch, model)).attribute(
        scaled(x), baselines=scaled(image), target=torch.from_numpy(target.astype(np.int64)))
    assert within(relative_difference(mine, reference.detach().numpy()), 1e-8)
