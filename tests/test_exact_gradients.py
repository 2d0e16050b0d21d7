"""The engine's input gradients against the plain NCHW Chainer reference, on real images.

Random test tensors never tie; photographs do: flat regions (saturated sky, uniform
backgrounds, black borders) give identical neighbourhoods, hence identical convolution
outputs and exact ties in max pooling. These tests run the shipped weights on CIFAR-10
test images and on a synthetic image of flat regions.

They run in float64. In float32 the engine's model (BatchNorm folded into the
convolutions) rounds differently from the reference (BatchNorm after the convolution);
on about 0.5% of the test images that flips a ReLU or a pooling choice whose input is
within rounding of the threshold, and the gradients there differ by up to 3% of their
maximum. Both are the same network within float32 rounding; float64 removes that
ambiguity, so any remaining difference is a rule that differs, as the tie rule did.

They compare with the direct kernel, as the reference convolves: Winograd's four outputs of a 2x2 tile (a
pooling window of CifarNet) are sums of different terms, so two outputs equal in exact arithmetic (the same
3x3 patch) can differ in the last bit, and a pooling tie between them then goes to the larger. Built without
FMA, that happened in one window of the first 1000 test images (test image 376: its gradient moved by
0.33%); test_winograd_parts_from_the_direct_kernel_only_at_exact_ties holds that it happens there alone.
"""
import chainer
import chainer.functions as F
import numpy as np
import pytest

from conftest import needs_cifar10, within
from model import normalize
from sgrad import convolution, native
from sgrad.data import load_cifar10, load_test_image
from sgrad.reference import _conv_bn, plain_chainer_forward
from sgrad.saliency import GradientEngine

pytestmark = pytest.mark.numerical

TOLERANCE = 1e-8   # float64 rounding is 1e-16; a wrong rule at one tie costs percents


def flat_regions_image():
    """Sky, ground, a saturated white block and a black frame: piecewise constant, like a photograph's
    uniform areas."""
    x = np.zeros((3, 32, 32))
    x[:, 2:-2, 2:-2] = np.array([0.45, 0.65, 0.95])[:, None, None]
    x[:, 20:-2, 2:-2] = np.array([0.35, 0.3, 0.2])[:, None, None]
    x[:, 12:20, 12:18] = 1.
    return x


@pytest.fixture
def direct_kernel(monkeypatch):
    monkeypatch.setattr(convolution, 'WINOGRAD', False)


def gradient_gaps(model, images, batchsize=250):
    """Per image: max |engine gradient - reference gradient| / max |reference gradient|, for the
    predicted class."""
    engine = GradientEngine(model, batchsize=batchsize)
    targets = engine.probabilities(images).argmax(axis=1).astype(np.int32)
    ours = engine(images, targets)
    reference = np.empty_like(ours)
    with chainer.using_config('train', False):
        for start in range(0, len(images), batchsize):
            chunk = slice(start, start + batchsize)
            x = chainer.Variable(images[chunk])
            gx, = chainer.grad([F.sum(F.select_item(plain_chainer_forward(model, x), targets[chunk]))], [x])
            reference[chunk] = gx.array
    flat = lambda a: np.abs(a).reshape(len(a), -1).max(axis=1)
    return flat(ours - reference) / flat(reference)


def tied_windows_of_the_first_pool(model, images):
    """How many 2x2 windows of the first max pooling have two or more equal positive maxima."""
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        h = _conv_bn(model.conv1, _conv_bn(model.prep, normalize(images))).array
    windows = h.reshape(h.shape[:2] + (16, 2, 16, 2))
    top = windows.max(axis=(3, 5), keepdims=True)
    return int((((windows == top).sum(axis=(3, 5)) > 1) & (top[:, :, :, 0, :, 0] > 0)).sum())


@pytest.mark.cross_check('gradient', against=('chainer',))
@pytest.mark.parametrize('name', ['CIFAR-10 test image 1', 'flat regions'])
def test_engine_gradient_equals_the_reference_on_images_with_ties(shipped64, name, direct_kernel):
    x = load_test_image(1)[0].astype(np.float64) if name.startswith('CIFAR') else flat_regions_image()
    assert tied_windows_of_the_first_pool(shipped64, x[None]) > 0  # the case under test is there
    gap, = gradient_gaps(shipped64, x[None])
    assert within(gap, TOLERANCE)


@pytest.mark.cross_check('gradient', against=('chainer',))
@needs_cifar10
def test_engine_gradient_equals_the_reference_on_1000_test_images(shipped64, direct_kernel):
    _, test = load_cifar10()
    images = np.stack([test[i][0] for i in range(1000)]).astype(np.float64)
    assert tied_windows_of_the_first_pool(shipped64, images) > 1000
    gaps = gradient_gaps(shipped64, images)
    worst = int(gaps.argmax())
    assert within(gaps.max(), TOLERANCE), '%d images off, worst: test image %d (%.2g)' % (
        (gaps >= TOLERANCE).sum(), worst, gaps[worst])


@needs_cifar10
def test_winograd_parts_from_the_direct_kernel_only_at_exact_ties(shipped64, monkeypatch):
    """The first pooled layer (conv1, Winograd's where it is on) computed both ways from the same input: a
    pooling window's first maximum differs only where the direct kernel's values tie exactly, and the
    windows' maxima agree to rounding. Counted over the first 1000 test images in float64."""
    _, test = load_cifar10()
    images = np.stack([test[i][0] for i in range(1000)]).astype(np.float64)
    folded = shipped64.inference_copy()
    windows = {}
    for winograd in (True, False):
        monkeypatch.setattr(convolution, 'WINOGRAD', winograd)
        assert native.library() is None or bool(convolution.winograd_tiles((16, 32, 32, 1), np.float64)) == winograd
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            h = folded.conv1(folded.prep(F.transpose(normalize(images), (1, 2, 3, 0)))).array  # (C, H, W, N)
        c, height, width, n = h.shape
        windows[winograd] = h.reshape(c, height // 2, 2, width // 2, 2, n).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)
    direct, winograd = windows[False], windows[True]
    np.testing.assert_allclose(winograd.max(axis=1), direct.max(axis=1), rtol=1e-14, atol=1e-14)
    parted = np.flatnonzero(winograd.argmax(axis=1) != direct.argmax(axis=1))
    top = direct.max(axis=1, keepdims=True)
    tied = ((direct == top).sum(axis=1) > 1) & (top[:, 0] > 0)
    assert tied.sum() > 1000  # exact ties are common on real images
    assert tied[parted].all(), 'windows without a tie parted: %s' % direct[parted[~tied[parted]]][:3]
    print('%d of %d tied windows parted' % (len(parted), tied.sum()))
