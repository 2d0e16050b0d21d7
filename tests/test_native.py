"""The compiled 3x3 convolution and its gradients (sgrad/native.c) against Chainer's convolution_2d and
against the NumPy + OpenBLAS path they replace, on shapes that exercise their edges and on real images.
(The compiled pooling and BatchNorm + ReLU run under test_model's tests of those nodes, on both paths.)"""
import os

import chainer
import chainer.functions as F
import numpy as np
import pytest

from conftest import needs_cifar10
from model import DEFAULT_MODEL_PATH, CifarNet
from sgrad import convolution, native
from sgrad.data import load_cifar10, load_test_image
from sgrad.metrics import spearman
from sgrad.saliency import Gradient, GradientEngine, SmoothGrad, noisy_copies

pytestmark = pytest.mark.numerical

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


def _check_against_chainer(shape, outputs, dtype, tolerance):
    """convolution.direct_convolution against reference on random arrays: plain, with bias and ReLU, masked."""
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(dtype)
    W = rng.randn(outputs, shape[0], 3, 3).astype(dtype)
    b = rng.randn(outputs).astype(dtype)
    mask = rng.randn(*shape).astype(dtype)
    for kwargs in ({}, {'b': b, 'relu': True}, {'mask': mask}):
        y = convolution.direct_convolution(x, W, **kwargs)
        expected = reference(x, W, **kwargs)
        np.testing.assert_allclose(y, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


@needs_native
@pytest.mark.parametrize('dtype, tolerance', [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize('shape, outputs', [
    ((3, 32, 32, 7), 16),    # 3 input channels (a chunk's remainder), N = 7: every vector partial
    ((17, 5, 6, 1), 3),      # fewer outputs than a tile, one image: rows shorter than a vector
    ((9, 4, 4, 25), 13),     # a row of 100 numbers: a partial last vector; a tile's remainder
    ((16, 8, 8, 100), 32),   # the model's kind of layer
])
def test_direct_convolution_equals_chainers(shape, outputs, dtype, tolerance, monkeypatch):
    monkeypatch.setattr(convolution, 'WINOGRAD', False)
    _check_against_chainer(shape, outputs, dtype, tolerance)


@needs_native
@pytest.mark.parametrize('dtype, tolerance', [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize('shape, outputs, columns', [
    ((8, 2, 2, 16), 8, 128),      # one 2x2 tile, whole vectors
    ((12, 6, 10, 13), 13, 128),   # N = 13: each tile's last vector partial; a tile's remainder of outputs
    ((12, 6, 10, 13), 3, 32),     # blocks of 2 tiles along rows of 5: the last block short; 3 outputs
    ((9, 4, 4, 25), 13, 128),
    ((32, 16, 16, 100), 64, 128),  # the model's kind of layer
])
def test_winograd_convolution_equals_chainers(shape, outputs, columns, dtype, tolerance, monkeypatch):
    """Winograd F(2x2, 3x3), the kernel for most of the model's layers, on the edges of its blocking: one
    tile, lanes past N in every tile, blocks that do not divide a tile row, outputs not a whole tile."""
    monkeypatch.setattr(convolution, '_WINOGRAD_COLUMNS', columns)
    assert convolution.winograd_tiles(shape, dtype) > 0
    _check_against_chainer(shape, outputs, dtype, tolerance)


@needs_native
def test_winograd_kernels_are_G_g_Gt():
    """The kernel transform against G g G^T spelled out (Lavin and Gray's G), on a transposed, flipped view
    (the input gradient's kernels), with the missing outputs of the last tile zero."""
    G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    W = np.random.RandomState(2).randn(9, 13, 3, 3)
    view = W.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    U = native.winograd_kernels(view)
    tile = native.tile_channels()
    got = U.transpose(0, 1, 3, 2).reshape(16, -1, 9)
    np.testing.assert_allclose(got[:, :13], np.einsum('ik,ockl,jl->ijoc', G, view, G).reshape(16, 13, 9),
                               rtol=1e-14, atol=1e-14)
    assert U.shape == (16, -(-13 // tile), 9, tile) and not got[:, 13:].any()


@needs_native
def test_winograd_is_chosen_by_the_layer_never_by_the_batch():
    """Odd sizes and few input channels take the direct kernel; CIFAR's other layers take Winograd, at any
    batch size (one image, or one more than a vector's lanes, wastes lanes but rounds as the others)."""
    f32 = np.float32
    for n in (1, 2, native.vector_lanes(f32) + 1, 25, 100):
        assert convolution.winograd_tiles((16, 32, 32, n), f32) and convolution.winograd_tiles((128, 4, 4, n), f32)
        assert not convolution.winograd_tiles((16, 5, 6, n), f32)
        assert not convolution.winograd_tiles((3, 32, 32, n), f32)


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
    np.testing.assert_allclose(convolution.direct_weight_gradient(x, gy), W.grad, rtol=tolerance,
                               atol=tolerance * np.abs(W.grad).max())


@needs_native
def test_direct_convolution_declines_what_it_cannot_take():
    x = np.ones((2, 4, 4, 3))
    W = np.ones((5, 2, 3, 3))
    assert convolution.direct_convolution(x.astype(np.float16), W.astype(np.float16)) is None
    assert convolution.direct_convolution(x, W.astype(np.float32)) is None
    assert convolution.direct_convolution(x, W) is not None
    # a transposed view is taken (copied to C order): the model's input arrives so
    view = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).transpose(1, 2, 3, 0)
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(convolution.direct_convolution(view, W), convolution.direct_convolution(x, W))
    assert convolution.direct_weight_gradient(x, np.ones((5, 4, 4, 3), np.float32)) is None


@needs_native
def test_the_blocks_of_the_work_cover_every_output_once(monkeypatch):
    """Output channels in whole tiles, rows cut where tiles are fewer than threads: every (channel, row)
    in exactly one block, for several thread counts."""
    tile = native.tile_channels()
    for threads in ('1', '2', '3', '16'):
        monkeypatch.setenv('OMP_NUM_THREADS', threads)
        for channels, rows in ((3, 32), (tile, 4), (16, 16), (128, 4), (5 * tile + 1, 2)):
            covered = np.zeros((channels, rows), int)
            blocks = convolution._output_blocks(channels, rows)
            for outputs, rows_ in blocks:
                assert outputs.start % tile == 0
                covered[outputs, rows_] += 1
            assert (covered == 1).all(), (threads, channels, rows)
            assert len(blocks) >= min(int(threads), -(-channels // tile) * rows)


def _shipped(dtype):
    with chainer.using_config('dtype', dtype):
        model = CifarNet()
    chainer.serializers.load_npz(DEFAULT_MODEL_PATH, model)
    return model


@needs_native
def test_compiled_and_numpy_gradients_agree_on_real_images(monkeypatch):
    """The shipped model's input gradients on noisy copies of CIFAR-10 test images: the compiled
    convolution against the NumPy + OpenBLAS one, in float64 (in float32 the two round differently, and
    that flips the odd pooling choice within rounding of a tie, as test_exact_gradients explains; both
    paths are held to Chainer's own layers there and in test_model)."""
    model = _shipped(np.float64)
    images = [load_test_image(i) for i in (0, 1, 7)]
    x = np.concatenate([noisy_copies(image, 0.1, 8, np.random.RandomState(i)) for i, (image, _) in enumerate(images)])
    target = np.repeat([label for _, label in images], 8)
    compiled = GradientEngine(model, batchsize=None)(x.astype(np.float64), target)
    monkeypatch.setattr(native, 'library', lambda: None)
    numpy_path = GradientEngine(model, batchsize=None)(x.astype(np.float64), target)
    np.testing.assert_allclose(compiled, numpy_path, rtol=1e-10, atol=1e-12 * np.abs(numpy_path).max())


@needs_native
@needs_cifar10
def test_winograd_float32_maps_match_the_exact_ones_on_real_images(monkeypatch):
    """Issue 13's bar for Winograd's float32 rounding, on 24 CIFAR-10 test images and the shipped weights:
    the input gradients within 1e-5 of their maximum of the float64 ones (exact to 1e-8, test_exact_gradients)
    on at least 95% of the images (the others are the ReLU or pooling choices within rounding of a tie that
    test_exact_gradients describes: the direct kernel flips them too), and every SmoothGrad map's Spearman
    correlation with the float64 map above 0.9999. Measured: median gradient error 2.6e-7 (direct 3.8e-7),
    lowest Spearman 0.9999995."""
    _, test = load_cifar10()
    images, labels = (np.stack(a) for a in zip(*(test[i] for i in range(24))))
    results = {}
    for name, dtype in (('exact', np.float64), ('winograd', np.float32)):
        engine = GradientEngine(_shipped(dtype).inference_copy(), batchsize=None)
        x = images.astype(dtype)
        maps = [SmoothGrad(Gradient(engine), 0.1, 20, rng=np.random.RandomState(i))(x[i], labels[i])
                for i in range(len(x))]
        results[name] = engine(x, labels).astype(np.float64), np.stack(maps).astype(np.float64)
        assert name == 'exact' or convolution.winograd_tiles((16, 32, 32, len(x)), dtype)
    (exact, exact_maps), (gradients, maps) = results['exact'], results['winograd']
    flat = lambda a: np.abs(a).reshape(len(a), -1).max(axis=1)
    errors = flat(gradients - exact) / flat(exact)
    assert np.mean(errors < 1e-5) >= 0.95, errors
    assert min(spearman(m.ravel(), e.ravel()) for m, e in zip(maps, exact_maps)) > 0.9999


@needs_native
def test_an_inference_copy_keeps_its_rearranged_kernels():
    """The folded weights never change, so each block keeps its kernels as the compiled convolution reads
    them (forward and input gradient) after the first map; the second map is the same to the bit. The
    model that trains keeps none (its weights change every step)."""
    model = _shipped(np.float32)
    engine = GradientEngine(model, batchsize=None)
    x = noisy_copies(load_test_image(0)[0], 0.1, 16, np.random.RandomState(0))
    first = engine(x, 3)
    caches = [block.kernels_cache for block in engine.model.links() if hasattr(block, 'kernels_cache')]
    assert caches and all(cache['forward'] and cache['input'] for cache in caches)
    np.testing.assert_array_equal(engine(x, 3), first)
    assert all(block.kernels_cache is None for block in model.links() if hasattr(block, 'kernels_cache'))
