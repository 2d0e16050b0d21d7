"""Integrated Gradients, Gradient SHAP, Guided Backprop, Deconvnet, Grad-CAM, Occlusion and SmoothGrad's
aggregations, checked against hand-written NumPy references."""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest
from scipy import ndimage

from conftest import random_cifarnet, relative_difference, within
from model import load_model
from sgrad.activations import relu
from sgrad.data import load_test_images
from sgrad.errors import InputError
from sgrad.hooks import ReLURule
from sgrad.methods import METHODS, make_method
from sgrad.paths import GradientSHAP
from sgrad.saliency import (AGGREGATIONS, Deconvnet, GradCAM, Gradient, GradientEngine, GuidedBackprop,
                            IntegratedGradients, Method, Occlusion, SmoothGrad, noisy_copies, upsample)

pytestmark = pytest.mark.numerical


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


#: The backward of y = max(h, 0) by each rule of sgrad.activations.RULES, written out: g the gradient at y.
RELU_BACKWARDS = {None: lambda g, h: g * (h > 0),
                  'guided': lambda g, h: g * (h > 0) * (g > 0),
                  'deconvnet': lambda g, h: np.maximum(g, 0)}


def numpy_backprop(mlp, x, c, rule=None):
    """Hand-written backward pass of TinyMLP for one input vector, its ReLUs by ``rule``."""
    W1, b1, W2, b2, W3 = (a.array for a in (mlp.l1.W, mlp.l1.b, mlp.l2.W, mlp.l2.b, mlp.l3.W))
    h1 = W1 @ x + b1
    h2 = W2 @ np.maximum(h1, 0) + b2
    g = RELU_BACKWARDS[rule](W3[c], h2)
    g = RELU_BACKWARDS[rule](W2.T @ g, h1)
    return W1.T @ g


@pytest.mark.parametrize('method, rule', [(GuidedBackprop, 'guided'), (Deconvnet, 'deconvnet')])
@pytest.mark.parametrize('activation', [relu, F.relu], ids=['sgrad.activations.relu', 'F.relu'])
def test_relu_rules_equal_numpy_reference_and_leave_nothing_changed(activation, method, rule):
    mlp = TinyMLP(activation=activation)
    xs = np.random.RandomState(1).randn(5, 12).astype(np.float32)
    engine = GradientEngine(mlp)
    relu_before, backward_before = F.relu, chainer.functions.activation.relu.ReLU.backward
    ruled = method(engine).attribute(xs, 2)
    references = {name: np.stack([numpy_backprop(mlp, x, 2, name) for x in xs]) for name in RELU_BACKWARDS}
    np.testing.assert_allclose(ruled, references[rule], rtol=1e-5, atol=1e-7)
    assert all(not np.allclose(ruled, reference) for name, reference in references.items() if name != rule)
    # afterwards everything is plain again: no hook left, F.relu and its class as they were
    assert not chainer.get_function_hooks() and F.relu is relu_before
    assert chainer.functions.activation.relu.ReLU.backward is backward_before
    np.testing.assert_allclose(Gradient(engine).attribute(xs, 2), references[None], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('method', [Gradient, GuidedBackprop, Deconvnet])
def test_relu_rules_through_cifarnets_fused_convolutions(image, method, kernel_path):
    """CifarNet folded (3x3 convolutions with the ReLU fused in, the rule applied inside the node, by the
    compiled kernels or NumPy) against unfolded (this project's ReLU nodes after BatchNorm), in float64 on a
    real CIFAR-10 image."""
    net = random_cifarnet(dtype=np.float64)
    folded, unfolded = GradientEngine(net), GradientEngine(net)
    unfolded.model = net  # the model as it is, not its inference_copy()
    x = image[None].astype(np.float64)
    fused, plain = method(folded).attribute(x, 3), method(unfolded).attribute(x, 3)
    assert np.abs(fused - plain).max() < 1e-9 * np.abs(plain).max()


@pytest.mark.parametrize('rule', ['guided', 'deconvnet'])
def test_relu_rule_hook_is_scoped(rule):
    mlp = TinyMLP()
    x = chainer.Variable(np.random.RandomState(2).randn(1, 12).astype(np.float32))
    with ReLURule(rule) as relus:
        gx_ruled, = chainer.grad([mlp(x)[0, 1]], [x])
    assert relus.relus == 2
    gx_plain, = chainer.grad([mlp(x)[0, 1]], [x])
    np.testing.assert_allclose(gx_ruled.array[0], numpy_backprop(mlp, x.array[0], 1, rule), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gx_plain.array[0], numpy_backprop(mlp, x.array[0], 1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', sorted(METHODS))
def test_every_method_batched_equals_per_image_loop(model, image, name):
    xs = noisy_copies(image, 0.1, 3, np.random.RandomState(0))
    method = make_method(name, GradientEngine(model, batchsize=64), steps=8)
    batched = method.attribute(xs, 3)
    looped = np.concatenate([method.attribute(xs[i:i + 1], 3) for i in range(len(xs))])
    assert batched.shape[0] == 3 and batched.shape[-2:] == (32, 32)
    np.testing.assert_array_equal(batched, looped)  # the engine's and the methods' sums do not see the batch


def test_integrated_gradients_completeness_on_a_random_network(model, image):
    ig = IntegratedGradients(GradientEngine(model, batchsize=100), steps=300)
    attribution = ig(image, 3)
    total, difference = ig.completeness(image, 3, attribution)
    assert abs(difference) > 1e-3
    assert total == pytest.approx(difference, rel=0.01)


def gradient_shap_reference(engine, x, target, samples, baselines, stdev, seed):
    """Gradient SHAP of one image written out: draw k from RandomState([seed, k]) (a blur sigma up to 50 pixels
    at 224, or the index of a baseline; alpha; the noise), one engine call per draw, the mean in float64."""
    total = np.zeros(x.shape)
    for k in range(samples):
        rng = np.random.RandomState([seed, k])
        if isinstance(baselines, str):
            sigma = rng.uniform(0, 50 * 32 / 224)
            baseline = ndimage.gaussian_filter(x, (0, sigma, sigma), mode='constant')
        else:
            baseline = baselines[rng.randint(len(baselines))]
        alpha = rng.uniform()
        noisy = x + rng.normal(0, stdev, x.shape)
        point = (baseline + alpha * (noisy - baseline)).astype(np.float32)
        total += (noisy - baseline) * engine(point[None], target)[0]
    return total / samples


@pytest.mark.cross_check('gradient_shap')
@pytest.mark.parametrize('baselines', ['black', 'blurred', 'images'])
def test_gradient_shap_equals_a_loop_over_its_draws(model, baselines):
    """Gradient SHAP of three real CIFAR-10 test images, their draws split over batches of 7 points, against
    the loop above; baselines black, blurred copies of each image, or ten other test images."""
    xs, _ = load_test_images(0, 3)
    images = {'black': np.zeros((1,) + xs.shape[1:], np.float32), 'blurred': 'blurred',
              'images': load_test_images(50, 60)[0]}[baselines]
    engine = GradientEngine(model, batchsize=7)
    ours = GradientSHAP(engine, 10, baselines if baselines != 'images' else images, 0.05, seed=4).attribute(xs, 3)
    for x, attribution in zip(xs, ours):
        expected = gradient_shap_reference(engine, x, 3, 10, images, 0.05, 4)
        assert within(relative_difference(attribution, expected), 1e-5)


def test_gradient_shap_adds_up_to_the_mean_score_difference_in_expectation():
    """On the shipped CifarNet and real test images, against ten other test images as baselines: 400 draws
    of alpha bring the sum of the attributions within 6% of the mean of S_c(x) - S_c(x'_k) over the same
    draws, and that mean is the average over the baselines drawn (each S_c(x) - S_c(x'_k) by its own pass)."""
    xs, _ = load_test_images(0, 2)
    baselines = load_test_images(50, 60)[0]
    engine = GradientEngine(load_model())
    targets = engine.probabilities(xs).argmax(axis=1)
    shap = GradientSHAP(engine, 400, baselines, seed=1)
    for x, target, attribution in zip(xs, targets, shap.attribute(xs, targets)):
        total, difference = shap.completeness(x, target, attribution)
        picks = [np.random.RandomState([1, k]).randint(len(baselines)) for k in range(400)]
        drops = engine.objective_values(x[None], target)[0] - engine.objective_values(baselines, target)
        assert difference == pytest.approx(drops[picks].mean(), rel=1e-5)
        assert abs(difference) > 0.5 and total == pytest.approx(difference, rel=0.06)


@pytest.mark.parametrize('options, message', [(dict(baseline='grey'), "baselines are 'black', 'blurred' or images"),
                                              (dict(samples=0), '--samples must be positive'),
                                              (dict(stdev=-1), 'stdev must be >= 0')])
def test_gradient_shap_refuses_bad_options(model, options, message):
    with pytest.raises(InputError, match=message):
        GradientSHAP(GradientEngine(model), **options)


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


@pytest.mark.cross_check('occlusion')
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
    reference = drops / np.maximum(covers, 1)
    np.testing.assert_allclose(attribution, reference, rtol=1e-4, atol=1e-5)
    assert within(relative_difference(attribution, reference), 1e-5)  # and its largest difference, for the record


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
