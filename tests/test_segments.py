"""sgrad.segments against PAIR's ``saliency.core.xrai._get_segments_felzenszwalb``: the same boolean masks, bit
for bit and in the same order, on real CIFAR-10 test images, on the shipped photographs (at 224x224 and one at
its own, non-square size), on piecewise-constant images (exact ties among the edge costs), on saturated,
grey and non-square images; and the label maps against scikit-image's ``felzenszwalb`` itself at other scales,
sigmas and minimum sizes, including a merge that only the float rounding of its threshold decides; and the cubic
resize before the segmentation against scikit-image's, bit for bit."""
import os

import numpy as np
import pytest

from sgrad import native
from sgrad.data import PHOTOS_DIR, load_image_file, load_test_images
from sgrad.pair import to_pair
from sgrad.segments import _sorted_edges, _zoom_agrees_with_scipy, felzenszwalb_masks, resize_cubic

pytestmark = pytest.mark.numerical

xrai = pytest.importorskip('saliency.core.xrai', reason="PAIR's saliency is in requirements.txt: sh setup.sh")

needs_native = pytest.mark.skipif(
    native.library() is None,
    reason='sgrad/_native.so is not built (python -m sgrad.native) or SGRAD_NATIVE=0: felzenszwalb_masks then '
           "calls PAIR's own function")


def assert_same_masks(image):
    """felzenszwalb_masks(image) == PAIR's masks of the (C, H, W) image: as many, in the same order, each equal."""
    ours, theirs = felzenszwalb_masks(image), xrai._get_segments_felzenszwalb(to_pair(image))
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype == bool and a.shape == b.shape == image.shape[1:], k
        assert np.array_equal(a, b), 'mask %d of %d differs' % (k, len(theirs))


def normalized(image_chw, resize_shape=None):
    """PAIR's image before its segmentation: (H, W, C), -1 to 1, resized to resize_shape by PAIR's own code."""
    return xrai._normalize_image(to_pair(image_chw), xrai._FELZENSZWALB_IM_VALUE_RANGE, resize_shape)


def piecewise_constant(blocks, cell, seed):
    """A (3, blocks * cell, blocks * cell) image of cell x cell squares, each of one of three grey levels per
    channel."""
    levels = np.random.RandomState(seed).randint(0, 3, (3, blocks, blocks)) / 2.
    return np.kron(levels, np.ones((cell, cell))).astype(np.float32)


@needs_native
def test_cifar_images():
    xs, _ = load_test_images(0, 20)
    for x in xs:
        assert_same_masks(x)


@needs_native
@pytest.mark.parametrize('name', sorted(f for f in os.listdir(PHOTOS_DIR) if not f.endswith('.md')))
def test_photographs(name):
    assert_same_masks(load_image_file(os.path.join(PHOTOS_DIR, name), 224)[0])


@needs_native
def test_a_photograph_at_its_own_size():
    """300x451: segmented at 224x224, the label maps resized up, unequally along the two axes."""
    image = load_image_file(os.path.join(PHOTOS_DIR, 'chelsea.png'), None)[0]
    assert image.shape[1:] == (300, 451)
    assert_same_masks(image)


@needs_native
@pytest.mark.parametrize('blocks, cell, ties', [(4, 8, 0.001), (7, 32, 0.1)])
def test_flat_regions(blocks, cell, ties):
    """Runs of edges cost exactly the same (zero inside a square, one value along a stretch of border): the
    merges follow the sort's order among ties, which must be scikit-image's. At 224x224 the resize keeps the
    squares flat and over a fifth of the edges tie at a nonzero cost; resized up from 32x32, fewer."""
    for seed in range(3):
        image = piecewise_constant(blocks, cell, seed)
        costs = _sorted_edges(normalized(image, xrai._FELZENSZWALB_IM_RESIZE), xrai._FELZENSZWALB_SIGMA_VALUES[0])[1]
        nonzero = costs[costs > 0]
        assert len(nonzero) - len(np.unique(nonzero)) > ties * len(costs)
        assert_same_masks(image)


@needs_native
def test_saturated_grey_and_non_square_images():
    xs, _ = load_test_images(20, 26)
    for x in xs[:3]:
        saturated = np.clip((x - np.median(x)) * 6 + 0.5, 0, 1)  # large areas at exactly 0 or 1
        assert ((saturated == 0) | (saturated == 1)).mean() > 0.1
        assert_same_masks(saturated)
    assert_same_masks(xs[3].mean(axis=0, keepdims=True))  # one channel
    assert_same_masks(np.ascontiguousarray(xs[4][:, 4:28, :]))  # 24x32
    assert_same_masks(xs[5][:, :, ::-1])  # not C-contiguous


def assert_same_resize(image, shape):
    """resize_cubic(image, shape) == scikit-image's resize with PAIR's arguments, to the bit and in the same type."""
    from skimage.transform import resize
    theirs = resize(image, shape, order=3, mode='constant', preserve_range=True, anti_aliasing=True)
    ours = resize_cubic(image, shape)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), 'largest difference %g' % np.abs(ours - theirs).max()


@needs_native
def test_the_compiled_zoom_runs_here():
    """Where it did not give SciPy's bits, resize_cubic would call scikit-image and the tests below would not
    test it."""
    assert _zoom_agrees_with_scipy()


@needs_native
def test_resize_equals_scikit_image_s():
    """PAIR's normalized images (float32, -1 to 1) of 100 CIFAR-10 test images resized up to 224x224, the
    shipped photographs at 224x224 (unchanged), one at its own size (shrunk, Gaussian first), flat squares, a
    grey image, and float64 noise shrunk and grown unequally along the two axes."""
    for x in load_test_images(0, 100)[0]:
        assert_same_resize(normalized(x), (224, 224))
    for name in sorted(f for f in os.listdir(PHOTOS_DIR) if not f.endswith('.md')):
        assert_same_resize(normalized(load_image_file(os.path.join(PHOTOS_DIR, name), 224)[0]), (224, 224))
    assert_same_resize(normalized(load_image_file(os.path.join(PHOTOS_DIR, 'chelsea.png'), None)[0]), (224, 224))
    assert_same_resize(normalized(piecewise_constant(4, 8, 0)), (224, 224))
    assert_same_resize(normalized(load_test_images(0, 1)[0][0].mean(axis=0, keepdims=True)), (224, 224))
    noise = np.random.RandomState(1).uniform(-1, 1, (230, 41, 3))
    assert_same_resize(noise, (224, 224))
    assert_same_resize(noise, (57, 300))


@needs_native
def test_the_compiled_zoom_refuses_taps_outside_the_coefficients():
    weights = np.full((2, 4), 0.25)
    with pytest.raises(ValueError, match='axis 1'):
        native.spline_zoom_3d(np.zeros((8, 8, 4)), [np.array([0, 4]), np.array([0, 5]), np.array([0, 0])],
                              [weights] * 3)


def labels(image, scale, sigma, min_size):
    """Our label map of an (H, W, C) image, as scikit-image's felzenszwalb returns it."""
    ends, costs = _sorted_edges(image, sigma)
    h, w = image.shape[:2]
    return native.felzenszwalb_segments(ends, costs, h * w, np.array([float(scale) / 255.]), min_size)[0].reshape(h, w)


@needs_native
def test_label_maps_equal_scikit_image_s():
    """At scales, sigmas and minimum sizes other than PAIR's, on CIFAR images and on noise of four levels."""
    from skimage.segmentation import felzenszwalb
    rng = np.random.RandomState(0)
    images = [to_pair(x).astype(np.float64) for x in load_test_images(26, 29)[0]]
    images += [rng.randint(0, 4, (40, 50, 3)) / 3. for _ in range(3)]
    for image in images:
        for scale, sigma, min_size in [(1, 0.8, 20), (30, 0.5, 1), (300, 1.5, 60), (2000, 0, 5)]:
            assert np.array_equal(labels(image, scale, sigma, min_size),
                                  felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size))


@needs_native
def test_the_threshold_is_rounded_to_float():
    """Two pixels 0.1 apart at scale 25.5 (threshold 0 + 25.5 / 255 / 1 = 0.1 in double): the cost, 0.1, is not
    below 0.1, but scikit-image holds the threshold in a C float, float(0.1) > 0.1, so they merge."""
    from skimage.segmentation import felzenszwalb
    image = np.array([[[0.], [0.1]]])
    assert np.float32(0.1) > 0.1 and 25.5 / 255. == 0.1
    assert felzenszwalb(image, scale=25.5, sigma=0, min_size=1).tolist() == [[0, 0]]
    assert labels(image, 25.5, 0, 1).tolist() == [[0, 0]]


def test_without_the_compiled_library_pair_s_function_runs(monkeypatch):
    x = load_test_images(0, 1)[0][0]
    monkeypatch.setattr(native, 'library', lambda: None)
    ours, theirs = felzenszwalb_masks(x), xrai._get_segments_felzenszwalb(to_pair(x))
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    assert_same_resize(normalized(x), (224, 224))
