"""The gradient, gradient x input, Integrated Gradients, occlusion and Guided Grad-CAM against Captum's Saliency,
InputXGradient, IntegratedGradients, Occlusion and GuidedGradCam (optional peer checks, skipped with their reason
without torch and Captum), on the PyTorch port of the shipped CifarNet (benchmarks/bench_peer.py) and 8 real
CIFAR-10 test images, each with the same settings as ours, in float64 on both sides: in float32 PyTorch's
convolutions round a batch of path points differently from one point alone, enough to flip a ReLU or max pooling
at its kink (on test image 4, one of IG's 16 points moved its gradient by 0.6%, the map by 1.5e-4 of its largest
value; ours gives an image the same gradient in any batch, and equals PyTorch's for the point alone)."""
import numpy as np
import pytest

from conftest import relative_difference, torch_cifarnet, within
from sgrad.data import load_test_images
from sgrad.saliency import (Gradient, GradientEngine, GradientXInput, GuidedGradCAM, IntegratedGradients,
                            Occlusion)

@pytest.fixture(scope='module')
def shipped(shipped64):
    """The shipped CifarNet in float64, its engine, test images 0-7 and their predicted classes."""
    engine = GradientEngine(shipped64)
    xs = load_test_images(0, 8)[0].astype(np.float64)
    return shipped64, engine, xs, engine.probabilities(xs).argmax(axis=1)


@pytest.fixture
def captum(shipped, monkeypatch):
    """captum.attr, the port, and the images and targets as tensors."""
    torch, net = torch_cifarnet(shipped[0], monkeypatch)
    import captum.attr
    _, engine, xs, targets = shipped
    return captum.attr, net.double(), torch.from_numpy(xs), torch.from_numpy(targets.astype(np.int64))


def theirs_and_ours(captum, shipped, name):
    """Captum's map and ours for one method, with the same settings: IG from black at 16 midpoints (Captum's
    'riemann_middle'); occlusion by black 4x4 patches at stride 2 over all channels; Guided Grad-CAM at res3
    (the port's body[-3]) with Captum's bilinear upsampling, which is ours (half-pixel grid, edges clamped)."""
    attr, net, xt, tt = captum
    _, engine, xs, targets = shipped
    if name == 'gradient':
        return attr.Saliency(net).attribute(xt, tt, abs=False), Gradient(engine).attribute(xs, targets)
    if name == 'grad_x_input':
        return attr.InputXGradient(net).attribute(xt, tt), GradientXInput(engine).attribute(xs, targets)
    if name == 'integrated_gradients':
        return (attr.IntegratedGradients(net).attribute(xt, target=tt, n_steps=16, method='riemann_middle'),
                IntegratedGradients(engine, 16).attribute(xs, targets))
    if name == 'occlusion':
        theirs = attr.Occlusion(net).attribute(xt, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), target=tt)
        return theirs[:, :1], Occlusion(engine, 4, 2).attribute(xs, targets)
    return (attr.GuidedGradCam(net, net.body[-3]).attribute(xt, tt, interpolate_mode='bilinear'),
            GuidedGradCAM(engine, 'res3').attribute(xs, targets))


@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.cross_check(name, against=('captum', 'torch')))
                                  for name in ('gradient', 'grad_x_input', 'integrated_gradients', 'occlusion',
                                               'guided_gradcam')])
def test_equals_captums(shipped, captum, name):
    theirs, ours = theirs_and_ours(captum, shipped, name)
    assert np.abs(ours).max() > 0
    assert within(relative_difference(ours, theirs.detach().numpy()), 1e-10)
