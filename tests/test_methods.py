"""Integrated Gradients, Guided Backprop, Grad-CAM, Occlusion and SmoothGrad's
aggregations, checked against hand-written NumPy references."""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from sgrad.activations import relu
from sgrad.hooks import GuidedReLU
from sgrad.methods import METHODS, make_method
from sgrad.saliency import (AGGREGATIONS, GradCAM, Gradient, GradientEngine, GuidedBackprop, IntegratedGradients,
                            Method, Occlusion, SmoothGrad, noisy_copies, upsample)


class TinyMLP(chainer.Chain):
    """x -> relu(W1 x + b1) -> relu(W2 h + b2) -> W3 h + b3, through this project's relu or F.relu."""

    def __init__(self, sizes=(12, 7, 5, 3), seed=0, activation=relu):
        super().__init__()
        self.activation = activation
        np.random.seed(seed)
        with self.init_scope():
            self.l1 = L.Linear(sizes[0], sizes[1], initial_bias=0.1)
            self.l2 = L.Linear(sizes[1], sizes[2], initial_bias=0.1)
            self.l3 = L.Linear(sizes[2], sizes[3])

    def __call__(self, x):
        return self.l3(self.activation(self.l2(self.activation(self.l1(x)))))


def numpy_backprop(mlp, x, c, guided):
    """Hand-written backward pass of TinyMLP for one input vector."""
    W1, b1, W2, b2, W3 = (a.array for a in (mlp.l1.W, mlp.l1.b, mlp.l2.W, mlp.l2.b, mlp.l3.W))
    h1 = W1 @ x + b1
    h2 = W2 @ np.maximum(h1, 0) + b2
    g = W3[c]
    g = g * (h2 > 0) * ((g > 0) if guided else 1)
    g = W2.T @ g
    g = g * (h1 > 0) * ((g > 0) if guided else 1)
    return W1.T @ g


@pytest.mark.parametrize('activation', [relu, F.relu], ids=['sgrad.activations.relu', 'F.relu'])
def test_guided_backprop_equals_numpy_reference_and_leaves_nothing_changed(activation):
    mlp = TinyMLP(activation=activation)
    xs = np.random.RandomState(1).randn(5, 12).astype(np.float32)
    engine = GradientEngine(mlp)
    relu_before, backward_before = F.relu, chainer.functions.activation.relu.ReLU.backward
    guided = GuidedBackprop(engine).attribute(xs, 2)
    for x, g in zip(xs, guided):
        np.testing.assert_allclose(g, numpy_backprop(mlp, x, 2, guided=True), rtol=1e-5, atol=1e-7)
    # afterwards everything is plain again: no hook left, F.relu and its class as they were
    assert not chainer.get_function_hooks() and F.relu is relu_before
    assert chainer.functions.activation.relu.ReLU.backward is backward_before
    vanilla = Gradient(engine).attribute(xs, 2)
    for x, g in zip(xs, vanilla):
        np.testing.assert_allclose(g, numpy_backprop(mlp, x, 2, guided=False), rtol=1e-5, atol=1e-7)
    assert not np.allclose(guided, vanilla)


def test_guided_relu_hook_is_scoped():
    mlp = TinyMLP()
    x = chainer.Variable(np.random.RandomState(2).randn(1, 12).astype(np.float32))
    with GuidedReLU() as guide:
        gx_guided, = chainer.grad([mlp(x)[0, 1]], [x])
    assert guide.relus == 2
    gx_plain, = chainer.grad([mlp(x)[0, 1]], [x])
    np.testing.assert_allclose(gx_guided.array[0], numpy_backprop(mlp, x.array[0], 1, True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gx_plain.array[0], numpy_backprop(mlp, x.array[0], 1, False), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', sorted(METHODS))
def test_every_method_batched_equals_per_image_loop(model, image, name):
    xs = noisy_copies(image, 0.1, 3, np.random.RandomState(0))
    method = make_method(name, GradientEngine(model, batchsize=64), steps=8)
    batched = method.attribute(xs, 3)
    looped = np.concatenate([method.attribute(xs[i:i + 1], 3) for i in range(len(xs))])
    assert batched.shape[0] == 3 and batched.shape[-2:] == (32, 32)
    # atol: occlusion subtracts float32 logits of size ~1, so its drops carry ~1e-7 rounding
    np.testing.assert_allclose(batched, looped, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_completeness_on_a_random_network(model, image):
    ig = IntegratedGradients(GradientEngine(model, batchsize=100), steps=300)
    attribution = ig(image, 3)
    total, difference = ig.completeness(image, 3, attribution)
    assert abs(difference) > 1e-3
    assert total == pytest.approx(difference, rel=0.01)


def test_integrated_gradients_of_a_linear_model_is_exact():
    mlp = L.Linear(12, 3)
    x = np.random.RandomState(3).randn(12).astype(np.float32)
    baseline = np.random.RandomState(4).randn(12).astype(np.float32)
    attribution = IntegratedGradients(GradientEngine(mlp), steps=3, baseline=baseline)(x, 1)
    np.testing.assert_allclose(attribution, (x - baseline) * mlp.W.array[1], rtol=1e-5)


def test_layer_gradients_follow_the_global_max_pool(model, image):
    """CifarNet's default Grad-CAM layer is res3, read from its (C, H, W, N) layout."""
    feats, grads = GradientEngine(model).layer_gradients(image[None], 4)
    assert feats.shape == grads.shape == (1, model.fc.W.shape[1], 4, 4)
    flat_f, flat_g = feats[0].reshape(len(feats[0]), -1), grads[0].reshape(len(grads[0]), -1)
    winners = flat_f.argmax(axis=1)
    expected = np.zeros_like(flat_g)
    expected[np.arange(len(winners)), winners] = model.fc.W.array[4] * model.LOGIT_SCALE
    np.testing.assert_allclose(flat_g, expected, rtol=1e-6)


def test_gradcam_equals_its_formula(model, image):
    engine = GradientEngine(model)
    feats, grads = engine.layer_gradients(image[None], 4, 'res3')
    cam = np.maximum((grads.mean(axis=(2, 3), keepdims=True) * feats).sum(axis=1, keepdims=True), 0)
    np.testing.assert_allclose(GradCAM(engine).attribute(image[None], 4), upsample(cam, (32, 32)), rtol=1e-6)
    assert upsample(np.ones((1, 1, 4, 4)), (32, 24)) == pytest.approx(np.ones((1, 1, 32, 24)))


class PixelSum(chainer.Chain):
    """Logit 0 = sum of weighted pixels: occlusion drops are then known exactly."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def __call__(self, x):
        return F.concat([F.sum(x * self.weights, axis=(1, 2, 3), keepdims=False)[:, None]] * 2, axis=1)


@pytest.mark.parametrize('size, patch, stride, expected_patch, expected_stride', [
    (8, 4, 2, 4, 2), (64, None, None, 8, 4), (32, None, 3, 4, 3)])
def test_occlusion_equals_mean_patch_drop(size, patch, stride, expected_patch, expected_stride):
    """By default the patch is 1/8 of the image side and the stride half of it."""
    rng = np.random.RandomState(5)
    x, weights = rng.rand(1, 3, size, size).astype(np.float32), rng.randn(1, 3, size, size).astype(np.float32)
    attribution = Occlusion(GradientEngine(PixelSum(weights)), patch, stride).attribute(x, 0)[0, 0]
    contribution = (x * weights)[0].sum(axis=0)
    corners = range(0, size - expected_patch + 1, expected_stride)
    drops = np.zeros((size, size))
    covers = np.zeros((size, size))
    for a in corners:
        for b in corners:
            drops[a:a + expected_patch, b:b + expected_patch] += contribution[a:a + expected_patch,
                                                                           b:b + expected_patch].sum()
            covers[a:a + expected_patch, b:b + expected_patch] += 1
    np.testing.assert_allclose(attribution, drops / np.maximum(covers, 1), rtol=1e-4, atol=1e-5)


class Doubling(Method):
    """A base method with known attributions: 2 x."""

    def attribute(self, xs, target):
        return 2 * xs


@pytest.mark.parametrize('batchsize', [None, 5, 16])
@pytest.mark.parametrize('aggregate', sorted(AGGREGATIONS))
def test_smoothgrad_aggregations_equal_numpy(image, aggregate, batchsize):
    """All 16 samples at once, or accumulated over batches of 5 (the same noise either way)."""
    a = 2 * noisy_copies(image, 0.2, 16, np.random.RandomState(9))
    expected = {'sum_abs': np.abs(a).sum(0), 'mean': a.mean(0), 'squared': (a ** 2).mean(0),
                'var': ((a - a.mean(0)) ** 2).mean(0)}[aggregate]
    engine = GradientEngine(None, batchsize=batchsize)
    smoothed = SmoothGrad(Doubling(engine), 0.2, 16, aggregate, np.random.RandomState(9))(image, 0)
    np.testing.assert_allclose(smoothed, expected, rtol=1e-5, atol=1e-6)
