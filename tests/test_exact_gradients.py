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
"""
import chainer
import chainer.functions as F
import numpy as np
import pytest

from conftest import needs_cifar10, within
from model import normalize
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
def test_engine_gradient_equals_the_reference_on_images_with_ties(shipped64, name):
    x = load_test_image(1)[0].astype(np.float64) if name.startswith('CIFAR') else flat_regions_image()
    assert tied_windows_of_the_first_pool(shipped64, x[None]) > 0  # the case under test is there
    gap, = gradient_gaps(shipped64, x[None])
    assert within(gap, TOLERANCE)


@pytest.mark.cross_check('gradient', against=('chainer',))
@needs_cifar10
def test_engine_gradient_equals_the_reference_on_1000_test_images(shipped64):
    _, test = load_cifar10()
    images = np.stack([test[i][0] for i in range(1000)]).astype(np.float64)
    assert tied_windows_of_the_first_pool(shipped64, images) > 1000
    gaps = gradient_gaps(shipped64, images)
    worst = int(gaps.argmax())
    assert within(gaps.max(), TOLERANCE), '%d images off, worst: test image %d (%.2g)' % (
        (gaps >= TOLERANCE).sum(), worst, gaps[worst])
