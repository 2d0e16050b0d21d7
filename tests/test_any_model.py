"""Every method on a model written the usual Chainer way, against a backward pass chained by hand.

SmallResNet uses Chainer's standard links and functions only (L.Convolution2D, F.relu,
F.clipped_relu, a skip connection, F.max_pooling_2d, L.Linear) and runs on a
non-square crop of a real CIFAR-10 image. The reference backward pass takes each
linear operation's vector-Jacobian product from Chainer on that operation alone
and writes the activations' rules (plain, Guided Backprop's, Deconvnet's) out by hand.
"""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from conftest import relative_difference, within
from sgrad.errors import InputError
from sgrad.hooks import ReLURule
from sgrad.methods import METHODS, make_method
from sgrad.saliency import Deconvnet, GradCAM, Gradient, GradientEngine, GuidedBackprop, SmoothGrad, upsample

pytestmark = pytest.mark.numerical

TARGET = 1


class SmallResNet(chainer.Chain):
    """conv -> ReLU -> conv -> ReLU6, plus a skip connection -> 2x2 max pool -> linear."""

    def __init__(self, seed=0):
        super().__init__()
        np.random.seed(seed)  # Chainer's initializers draw from NumPy's global generator
        with chainer.using_config('dtype', np.float64):
            with self.init_scope():
                self.conv1 = L.Convolution2D(3, 6, 3, pad=1, initial_bias=0.05)
                self.conv2 = L.Convolution2D(6, 6, 3, pad=1)
                self.fc = L.Linear(None, 3)
        self.conv2.W.array *= 6  # so that some ReLU6 inputs pass its cap

    def forward(self, x):
        h1 = F.relu(self.conv1(x))
        h2 = F.clipped_relu(self.conv2(h1), 6.)
        return self.fc(F.max_pooling_2d(h1 + h2, 2))


class NoReLU(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(3, 2, 3, pad=1)
            self.fc = L.Linear(None, 3)

    def forward(self, x):
        return self.fc(F.tanh(self.conv(x)))


@pytest.fixture(scope='module')
def net():
    return SmallResNet()


@pytest.fixture(scope='module')
def crop(image):
    """A 12x18 crop of the blog's cat: real pixels, not square."""
    return image[:, 8:20, 6:24].astype(np.float64)


def vjp(f, x, gy):
    """The vector-Jacobian product gy^T df/dx of one operation, from Chainer."""
    xv = chainer.Variable(x)
    gx, = chainer.grad([f(xv)], [xv], grad_outputs=[chainer.Variable(gy)])
    return gx.array


def relu_passes(z, g, rule, cap=np.inf):
    """Where a ReLU of input z (with a cap: min(max(z, 0), cap), ReLU6) passes its gradient g, by ``rule``:
    the gradient (None), Guided Backprop's or Deconvnet's (which keeps the cap's own gradient)."""
    return {None: (z > 0) & (z < cap), 'guided': (z > 0) & (z < cap) & (g > 0), 'deconvnet': (z < cap) & (g > 0)}[rule]


def hand_backward(net, x, rule=None):
    """d logit_TARGET / dx for one image, the activations' backward rules written out; also the
    ReLU6 layer's input z2 and gradient (Grad-CAM on conv2) and the gradient at the skip's sum."""
    x = x[None]
    with chainer.no_backprop_mode():
        z1 = net.conv1(x).array
        h1 = np.maximum(z1, 0)
        z2 = net.conv2(h1).array
        r = h1 + np.clip(z2, 0, 6)
        p = F.max_pooling_2d(r, 2).array
    one_hot = np.eye(3)[[TARGET]]
    g_r = vjp(lambda r: F.max_pooling_2d(r, 2), r, vjp(net.fc, p, one_hot))
    g_z2 = g_r * relu_passes(z2, g_r, rule, 6.)        # ReLU6 on the residual branch
    g_h1 = g_r + vjp(net.conv2, h1, g_z2)              # the skip hands g_r to both branches
    g_z1 = g_h1 * relu_passes(z1, g_h1, rule)
    return vjp(net.conv1, x, g_z1)[0], z2[0], g_z2[0], g_r


def test_the_case_is_there(net, crop):
    _, z2, _, g_r = hand_backward(net, crop, 'guided')
    assert (z2 > 6).any() and (z2 < 0).any()   # ReLU6 clips on both sides
    assert (g_r < 0).any() and (g_r > 0).any()  # the shared skip gradient has both signs
    # positive gradients meet ReLU6 inputs on both sides of its range: Deconvnet's rule at 0 and at the cap
    assert ((z2 < 0) & (g_r[0] > 0)).any() and ((z2 > 6) & (g_r[0] > 0)).any()


@pytest.mark.cross_check('gradient')
def test_gradient_equals_the_hand_backward_and_finite_differences(net, crop):
    engine = GradientEngine(net)
    grad = engine(crop[None], TARGET)[0]
    reference = hand_backward(net, crop)[0]
    np.testing.assert_allclose(grad, reference, rtol=1e-10, atol=1e-12)
    assert within(relative_difference(grad, reference), 1e-10)  # and its largest difference, for the record
    rng, eps = np.random.RandomState(0), 1e-6
    for _ in range(5):
        c, i, j = rng.randint(3), rng.randint(12), rng.randint(18)
        plus, minus = crop.copy(), crop.copy()
        plus[c, i, j] += eps
        minus[c, i, j] -= eps
        values = engine.objective_values(np.stack([plus, minus]), TARGET)
        assert grad[c, i, j] == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-5, abs=1e-9)


@pytest.mark.cross_check('guided_backprop', 'deconvnet')
@pytest.mark.parametrize('method, rule', [(GuidedBackprop, 'guided'), (Deconvnet, 'deconvnet')])
def test_relu_rules_on_relu_relu6_and_a_skip_connection(net, crop, method, rule):
    ruled = method(GradientEngine(net))(crop, TARGET)
    reference = hand_backward(net, crop, rule)[0]
    np.testing.assert_allclose(ruled, reference, rtol=1e-10, atol=1e-12)
    assert within(relative_difference(ruled, reference), 1e-10)  # and its largest difference, for the record
    for other in {None, 'guided', 'deconvnet'} - {rule}:
        assert not np.allclose(ruled, hand_backward(net, crop, other)[0])


def test_deconvnet_keeps_the_relu6_cap():
    """At a ReLU6 input above the cap Deconvnet passes nothing, below 0 the positive gradient."""
    x = chainer.Variable(np.array([[-2., 3., 7., -1., 8.]]))
    with chainer.using_config('train', False), ReLURule('deconvnet'):
        y = F.clipped_relu(x, 6.)
    gx, = chainer.grad([y], [x], grad_outputs=[chainer.Variable(np.array([[1., 1., 1., -1., -1.]]))])
    np.testing.assert_array_equal(gx.array, [[1., 1., 0., 0., 0.]])


@pytest.mark.parametrize('method, name', [(GuidedBackprop, 'Guided Backprop'), (Deconvnet, 'Deconvnet')])
def test_relu_rules_without_relus_are_an_error(crop, method, name):
    with pytest.raises(InputError, match='%s needs ReLUs' % name):
        method(GradientEngine(NoReLU()))(crop.astype(np.float32), 0)


@pytest.mark.cross_check('gradcam')
def test_gradcam_on_a_named_link_and_by_default_the_last_convolution(net, crop):
    _, z2, g_z2, _ = hand_backward(net, crop)
    # dS/dz2 is the gradient at conv2's output, i.e. before the ReLU6
    cam = np.maximum((g_z2.mean(axis=(1, 2), keepdims=True) * z2).sum(axis=0), 0)
    expected = upsample(cam[None], (12, 18))
    engine = GradientEngine(net)
    for cam in (GradCAM(engine, 'conv2')(crop, TARGET), GradCAM(engine)(crop, TARGET)):
        np.testing.assert_allclose(cam, expected, rtol=1e-10, atol=1e-12)
        assert within(relative_difference(cam, expected), 1e-10)  # and its largest difference, for the record
    assert GradCAM(engine, 'conv1')(crop, TARGET).shape == (1, 12, 18)


@pytest.mark.parametrize('layer, message', [('conv9', "no link named 'conv9'; it has: conv1, conv2, fc"),
                                            ('fc', "'fc' returned shape")])
def test_gradcam_on_a_wrong_layer_is_an_error(net, crop, layer, message):
    with pytest.raises(InputError, match=message):
        GradCAM(GradientEngine(net), layer)(crop, TARGET)


@pytest.mark.parametrize('name', sorted(METHODS) + ['smoothgrad'])
def test_every_method_runs_at_any_image_size(net, crop, name):
    engine = GradientEngine(net, batchsize=16)
    method = (SmoothGrad(Gradient(engine), 0.1, 8, rng=np.random.RandomState(0)) if name == 'smoothgrad'
              else make_method(name, engine, steps=4))
    attribution = method.attribute(np.stack([crop, crop[:, ::-1]]), TARGET)
    assert attribution.shape[0] == 2 and attribution.shape[-2:] == (12, 18)
    assert np.isfinite(attribution).all() and np.abs(attribution).max() > 0


@pytest.mark.parametrize('name', sorted(METHODS) + ['smoothgrad'])
def test_passes_counts_the_model_calls_a_map_takes(net, crop, name, monkeypatch):
    """Method.passes (which the CLI's time estimate multiplies by measured seconds) against the images
    that actually go through the model, with and without a backward pass."""
    engine = GradientEngine(net, batchsize=16)
    method = (SmoothGrad(Gradient(engine), 0.1, 5, rng=np.random.RandomState(0)) if name == 'smoothgrad'
              else make_method(name, engine, steps=4, masks=20))
    counted = {True: 0, False: 0}
    forward = net.forward

    def counting_forward(x):
        counted[chainer.config.enable_backprop] += len(x)
        return forward(x)
    monkeypatch.setattr(net, 'forward', counting_forward)
    expected = method.passes(crop)
    counted.update({True: 0, False: 0})  # passes() may itself look at the model (Score-CAM's channels)
    method.attribute(crop[None], TARGET)
    assert (counted[True], counted[False]) == expected
