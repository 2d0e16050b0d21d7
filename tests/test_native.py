"""The compiled 3x3 convolution and its gradients (sgrad/native.c) against Chainer's convolution_2d and
against the NumPy + OpenBLAS path they replace, on shapes that exercise their edges and on real images.
(The compiled pooling and BatchNorm + ReLU run under test_model's tests of those nodes, on both paths.)"""
import os

import chainer
import chainer.functions as F
import numpy as np
import pytest

from model import DEFAULT_MODEL_PATH, CifarNet
from sgrad import native, ops
from sgrad.data import load_test_image
from sgrad.saliency import GradientEngine, noisy_copies

needs_native = pytest.mark.skipif(os.environ.get('SGRAD_NATIVE') == '0', reason='SGRAD_NATIVE=0 turns it off')


@needs_native
def test_setup_builds_the_compiled_convolution():
    """setup.sh compiles it (python -m sgrad.native); every test of the model then runs through it."""
    assert native.library() is not None, 'sgrad/_native.so is missing: run `python -m sgrad.native`'
    assert native.tile_channels() > 0


def reference(x, W, b=None, relu=False, mask=None):
    """Chainer's NCHW convolution_2d on (C, H, W, N) arrays."""
    if mask is not None:
        x = x * (mask > 0)
    y = F.convolution_2d(x.transpose(3, 0, 1, 2), W, b, pad=1).array
    return (np.maximum(y, 0) if relu else y).transpose(1, 2, 3, 0)


@needs_native
@pytest.mark.parametrize('dtype, tolerance', [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize('shape, outputs', [
    ((3, 32, 32, 7), 16),    # 3 input channels (a chunk's remainder), N = 7: every vector partial
    ((17, 5, 6, 1), 3),      # fewer outputs than a tile, one image: rows shorter than a vector
    ((9, 4, 4, 25), 13),     # a row of 100 numbers: a partial last vector; a tile's remainder
    ((16, 8, 8, 100), 32),   # the model's kind of layer
])
def test_direct_convolution_equals_chainers(shape, outputs, dtype, tolerance):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(dtype)
    W = rng.randn(outputs, shape[0], 3, 3).astype(dtype)
    b = rng.randn(outputs).astype(dtype)
    mask = rng.randn(*shape).astype(dtype)
    for kwargs in ({}, {'b': b, 'relu': True}, {'mask': mask}):
        y = ops.direct_convolution(x, W, **kwargs)
        expected = reference(x, W, **kwargs)
        np.testing.assert_allclose(y, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


@needs_native
@pytest.mark.parametrize('dtype, tolerance', [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize('shape, outputs', [((3, 8, 8, 7), 16), ((17, 5, 6, 1), 3), ((9, 4, 4, 25), 13),
                                            ((16, 8, 8, 100), 32)])
def test_direct_weight_gradient_equals_chainers(shape, outputs, dtype, tolerance):
    """The weight gradient (training) against convolution_2d's, on the same edge shapes: partial vectors
    at every row's end, fewer outputs than a tile, one image."""
    rng = np.random.RandomState(1)
    x = rng.randn(*shape).astype(dtype)
    gy = rng.randn(outputs, *shape[1:]).astype(dtype)
    W = chainer.Variable(np.zeros((outputs, shape[0], 3, 3), dtype))
    y = F.convolution_2d(x.transpose(3, 0, 1, 2), W, pad=1)
    y.grad = np.ascontiguousarray(gy.transpose(3, 0, 1, 2))
    y.backward()
    np.testing.assert_allclose(ops.direct_weight_gradient(x, gy), W.grad, rtol=tolerance,
                               atol=tolerance * np.abs(W.grad).max())


@needs_native
def test_direct_convolution_declines_what_it_cannot_take():
    x = np.ones((2, 4, 4, 3))
    W = np.ones((5, 2, 3, 3))
    assert ops.direct_convolution(x.astype(np.float16), W.astype(np.float16)) is None
    assert ops.direct_convolution(x, W.astype(np.float32)) is None
    assert ops.direct_convolution(x, W) is not None
    # a transposed view is taken (copied to C order): the model's input arrives so
    view = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).transpose(1, 2, 3, 0)
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(ops.direct_convolution(view, W), ops.direct_convolution(x, W))
    assert ops.direct_weight_gradient(x, np.ones((5, 4, 4, 3), np.float32)) is None


@needs_native
def test_the_blocks_of_the_work_cover_every_output_once(monkeypatch):
    """Output channels in whole tiles, rows cut where tiles are fewer than threads: every (channel, row)
    in exactly one block, for several thread counts."""
    tile = native.tile_channels()
    for threads in ('1', '2', '3', '16'):
        monkeypatch.setenv('OMP_NUM_THREADS', threads)
        for channels, rows in ((3, 32), (tile, 4), (16, 16), (128, 4), (5 * tile + 1, 2)):
            covered = np.zeros((channels, rows), int)
            blocks = ops._output_blocks(channels, rows)
            for outputs, rows_ in blocks:
                assert outputs.start % tile == 0
                covered[outputs, rows_] += 1
            assert (covered == 1).all(), (threads, channels, rows)
            assert len(blocks) >= min(int(threads), -(-channels // tile) * rows)


@needs_native
def test_compiled_and_numpy_gradients_agree_on_real_images(monkeypatch):
    """The shipped model's input gradients on noisy copies of CIFAR-10 test images: the compiled
    convolution against the NumPy + OpenBLAS one, in float64 (in float32 the two round differently, and
    that flips the odd pooling choice within rounding of a tie, as test_exact_gradients explains; both
    paths are held to Chainer's own layers there and in test_model)."""
    with chainer.using_config('dtype', np.float64):
        model = CifarNet()
    chainer.serializers.load_npz(DEFAULT_MODEL_PATH, model)
    images = [load_test_image(i) for i in (0, 1, 7)]
    x = np.concatenate([noisy_copies(image, 0.1, 8, np.random.RandomState(i)) for i, (image, _) in enumerate(images)])
    target = np.repeat([label for _, label in images], 8)
    compiled = GradientEngine(model, batchsize=None)(x.astype(np.float64), target)
    monkeypatch.setattr(native, 'library', lambda: None)
    numpy_path = GradientEngine(model, batchsize=None)(x.astype(np.float64), target)
    np.testing.assert_allclose(compiled, numpy_path, rtol=1e-10, atol=1e-12 * np.abs(numpy_path).max())
