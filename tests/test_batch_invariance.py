"""An image's gradient, and so its map, is bit for bit the same computed alone, in a batch of any size and at any
position of the batch, on every path the engine takes (the compiled kernels for this CPU, for AVX2 or for the
baseline x86-64, which .ci/run builds in turn, and the NumPy + OpenBLAS fallback, SGRAD_NATIVE=0): the kernels
are chosen by the layer's shape, never the batch's, and every sum runs in an order that the batch does not
change (sgrad.convolution.winograd_tiles, sgrad.linear, sgrad/native.c's product). Real images: CIFAR-10 test
images with the shipped CifarNet (flat regions and saturated pixels among them), photographs with
EfficientNet-Lite0."""
import numpy as np
import pytest

from conftest import skip_without_native
from model import load_model
from sgrad import native
from sgrad.data import PHOTOS_DIR, load_image_file, load_test_images
from sgrad.linear import linear
from sgrad.methods import METHODS, make_method
from sgrad.saliency import GradientEngine

pytestmark = pytest.mark.numerical


def each_alone(engine, images, targets, rule=None):
    return np.concatenate([engine.gradients(x[None], t, rule) for x, t in zip(images, targets)])


def assert_same_in_every_batch(model, images, targets, batch_sizes, rule=None):
    alone = each_alone(GradientEngine(model, batchsize=1), images, targets, rule)
    assert np.abs(alone).reshape(len(images), -1).max(axis=1).min() > 0
    for size in batch_sizes:
        batched = GradientEngine(model, batchsize=size).gradients(images, targets, rule)
        assert np.array_equal(batched, alone), 'batches of %d: %d of %d images differ' % (
            size, (batched != alone).reshape(len(images), -1).any(axis=1).sum(), len(images))
    order = np.random.RandomState(0).permutation(len(images))  # other positions in the batch, other neighbours
    shuffled = GradientEngine(model, batchsize=None).gradients(images[order], targets[order], rule)
    assert np.array_equal(shuffled, alone[order])


@pytest.fixture(scope='module')
def cifar():
    images, labels = load_test_images(0, 12)
    return load_model(), images, labels


@pytest.fixture(scope='module')
def photographs():
    """The four photographs and four noisy copies of chelsea.png (images that differ in their last digits)."""
    from sgrad.efficientnet import load_efficientnet_lite0
    photos = [load_image_file('%s/%s' % (PHOTOS_DIR, name), 224)[0]
              for name in ('chelsea.png', 'coffee.png', 'astronaut.png', 'rocket.jpg')]
    noisy = np.clip(photos[0] + np.random.RandomState(0).normal(0, 0.01, (4,) + photos[0].shape), 0, 1)
    images = np.concatenate([np.stack(photos), noisy]).astype(np.float32)
    model = load_efficientnet_lite0()
    return model, images, GradientEngine(model).probabilities(images).argmax(axis=1)


@pytest.mark.parametrize('rule', [None, 'guided'], ids=['gradient', 'guided backprop'])
def test_cifarnet_gradients_are_the_same_alone_and_in_any_batch(cifar, rule):
    model, images, labels = cifar
    assert_same_in_every_batch(model, images, labels, (2, 3, 5, 8, 12), rule)


@pytest.mark.parametrize('rule', [None, 'guided'], ids=['gradient', 'guided backprop'])
def test_efficientnet_gradients_are_the_same_alone_and_in_any_batch(photographs, rule):
    model, images, targets = photographs
    assert_same_in_every_batch(model, images, targets, (2, 3, 5), rule)


def assert_maps_of_a_batch_are_each_images_alone(method, images, targets):
    together = method.attribute(images, targets)
    alone = np.concatenate([method.attribute(x[None], t) for x, t in zip(images, targets)])
    assert np.abs(together).max() > 0
    assert np.array_equal(together, alone)


@pytest.mark.parametrize('name', sorted(METHODS))
def test_every_methods_cifarnet_map_of_a_batch_is_each_images_alone(cifar, name):
    """Their path points, noisy copies, masks and layers share the engine's batches; their own sums (a CAM's
    channel weights, IG's mean over steps) are per image too. The random methods draw per image."""
    model, images, labels = cifar
    assert_maps_of_a_batch_are_each_images_alone(make_method(name, GradientEngine(model), steps=8, samples=4,
                                                             masks=50), images[:3], labels[:3])


@pytest.mark.parametrize('name', ['integrated_gradients', 'gradcam', 'guided_backprop'])
def test_efficientnet_maps_of_a_batch_are_each_images_alone(photographs, name):
    model, images, targets = photographs
    assert_maps_of_a_batch_are_each_images_alone(make_method(name, GradientEngine(model), steps=4), images[:3],
                                                 targets[:3])


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_linear_computes_a_row_alone_as_in_any_batch(dtype):
    """sgrad.linear against Chainer's F.linear (OpenBLAS), whose rows change with the batch's size."""
    import chainer
    import chainer.functions as F
    from chainer import gradient_check
    rng = np.random.RandomState(0)
    x, W, b = rng.randn(13, 1280).astype(dtype), rng.randn(1000, 1280).astype(dtype), rng.randn(1000).astype(dtype)
    batch = linear(x, W, b).array
    np.testing.assert_allclose(batch, F.linear(x, W, b).array, rtol=0, atol=2e-5 * np.abs(batch).max())
    for i in (0, 6, 12):
        assert np.array_equal(linear(x[i:i + 1], W, b).array[0], batch[i])
    gy = rng.randn(13, 1000).astype(dtype)
    x_var, row = chainer.Variable(x), chainer.Variable(x[5:6])
    gx, = chainer.grad([linear(x_var, W, b)], [x_var], [chainer.Variable(gy)])
    g_row, = chainer.grad([linear(row, W, b)], [row], [chainer.Variable(gy[5:6])])
    assert np.array_equal(g_row.array[0], gx.array[5])
    gradient_check.check_backward(linear, (rng.randn(3, 7), rng.randn(5, 7), rng.randn(5)), rng.randn(3, 5),
                                  dtype=np.float64, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('m, k, p', [(1, 3, 1), (7, 5, 49), (13, 128, 10), (96, 16, 300)])
def test_the_product_kernel_sums_each_number_in_one_order(dtype, m, k, p):
    """sgrad/native.c's product against float64 NumPy, with the row bias and clip of a 1x1 convolution and
    the column bias of a linear layer, and each row equal computed alone or in another block of rows."""
    skip_without_native()
    rng = np.random.RandomState(k)
    a, b, row_bias, column_bias = (rng.randn(*shape).astype(dtype) for shape in ((m, k), (k, p), (m,), (p,)))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = (1e-6 if dtype == np.float32 else 1e-14) * np.abs(exact).max()
    for kwargs, expected in (({}, exact), (dict(row_bias=row_bias, cap=0.5), np.clip(exact + row_bias[:, None], 0, .5)),
                             (dict(column_bias=column_bias), exact + column_bias)):
        out = np.empty((m, p), dtype)
        native.product(a, b, out, range(m), **kwargs)
        np.testing.assert_allclose(out, expected, rtol=0, atol=bound)
        for i in {0, m // 2, m - 1}:
            row = np.empty((1, p), dtype)
            alone = {key: value[i:i + 1] if key == 'row_bias' else value for key, value in kwargs.items()}
            native.product(np.ascontiguousarray(a[i:i + 1]), b, row, range(1), **alone)
            assert np.array_equal(row[0], out[i])
