"""XRAI's segments, the same masks as PAIR saliency's ``saliency.core.xrai._get_segments_felzenszwalb`` (with its
defaults), bit for bit and in the same order, in a fraction of its time.

PAIR resizes the image to 224x224 with values in [-1, 1], segments it by Felzenszwalb and Huttenlocher's graph
method ("Efficient graph-based image segmentation", IJCV 2004) through scikit-image's ``felzenszwalb`` at six
scales, resizes each label map back (nearest), and dilates every segment's mask by a disk. Most of that time is
scikit-image sorting the same edges again for every scale: the smoothed image, the edge costs and their order
do not depend on the scale. Here they are computed once, with the calls scikit-image makes (so the sort, ties
included, is the same), and only the merges, which do, run for each scale, in C (sgrad/native.c). The
resizing of the label maps becomes a lookup (which pixel of the 224x224 map each pixel takes) and the
dilation sets the rows of each run of equal labels at once. The cubic resize to 224x224 before it all, which
took as long as the rest at 32x32, sums its spline taps in C, in SciPy's order (resize_cubic). Where
sgrad/_native.so is not built, PAIR's own function runs.
"""
import functools

import numpy as np
from scipy import ndimage

from sgrad import native
from sgrad.pair import to_pair

#: PAIR's dilation radius (``dilation_rad``'s default), in pixels of the original image
DILATION_RADIUS = 5
#: the zeros SciPy's zoom pads an image with before its spline prefilter (mode 'grid-constant')
SPLINE_PAD = 12


def felzenszwalb_masks(image_chw):
    """XRAI's segments of one (C, H, W) image: the list of (H, W) boolean masks that PAIR's
    ``_get_segments_felzenszwalb(to_pair(image_chw))`` returns (the labels of each scale in turn, every label
    between the map's least and greatest, each dilated)."""
    from saliency.core import xrai
    image = to_pair(image_chw)
    if native.library() is None:
        return xrai._get_segments_felzenszwalb(image)
    shape = image.shape[:2]
    image = resize_cubic(xrai._normalize_image(image, xrai._FELZENSZWALB_IM_VALUE_RANGE),
                         xrai._FELZENSZWALB_IM_RESIZE)
    scales = np.array([float(scale) / 255. for scale in xrai._FELZENSZWALB_SCALE_VALUES])
    by_sigma = [native.felzenszwalb_segments(*_sorted_edges(image, sigma), image.shape[0] * image.shape[1], scales,
                                             xrai._FELZENSZWALB_MIN_SEGMENT_SIZE)
                for sigma in xrai._FELZENSZWALB_SIGMA_VALUES]
    nearest, half_widths = _nearest_pixels(image.shape[:2], shape), _disk_rows(DILATION_RADIUS)
    masks = []
    for s in range(len(scales)):  # PAIR's loops: the scales, then the sigmas
        for labels in by_sigma:
            masks.extend(native.dilate_labels(labels[s][nearest], half_widths))
    return masks


def resize_cubic(image, shape):
    """An (H, W, C) floating-point image resized to ``shape`` as PAIR's ``_normalize_image`` resizes it, to the
    bit: scikit-image's ``resize(image, shape, order=3, mode='constant', preserve_range=True,
    anti_aliasing=True)``. That is a Gaussian of sigma (factor - 1) / 2 where the image shrinks (none where
    it grows), SciPy's cubic-spline ``zoom`` with zero borders, and a clip to the image's range, in the
    image's type. Here the zoom's sum over the 4 x 4 x 4 nearest spline coefficients runs in C (after
    SciPy's own prefilter), in a fraction of the time of SciPy's general code for any rank, type and border."""
    output_shape = tuple(shape) + image.shape[2:]
    if output_shape == image.shape:  # SciPy's zoom returns the image itself where every factor is 1
        return image.copy()
    if native.library() is None or not _zoom_agrees_with_scipy():
        from skimage.transform import resize
        return resize(image, shape, order=3, mode='constant', preserve_range=True, anti_aliasing=True)
    return _zoom_cubic(image, output_shape)


def _zoom_cubic(image, output_shape):
    """resize_cubic with the zoom in C."""
    factors = np.divide(image.shape, output_shape)
    smoothed = ndimage.gaussian_filter(image, np.maximum(0, (factors - 1) / 2), cval=0, mode='grid-constant')
    coefficients = ndimage.spline_filter(np.pad(smoothed, SPLINE_PAD), 3, output=np.float64, mode='grid-constant')
    starts, weights = zip(*(_cubic_taps(n, factor) for n, factor in zip(output_shape, factors)))
    resized = native.spline_zoom_3d(coefficients, starts, weights).astype(image.dtype)
    return np.clip(resized, image.min(), image.max(), out=resized)


@functools.lru_cache(maxsize=None)
def _zoom_agrees_with_scipy():
    """Whether the C zoom gives SciPy's bits on this machine, tried once on a small random image. SciPy compiled
    with fused multiply-adds (as compilers may do on other processors) rounds differently; then
    resize_cubic calls scikit-image itself."""
    from skimage.transform import resize
    image = np.random.RandomState(0).uniform(-1, 1, (5, 7, 3))
    theirs = resize(image, (37, 30), order=3, mode='constant', preserve_range=True, anti_aliasing=True)
    return np.array_equal(_zoom_cubic(image, (37, 30, 3)), theirs)


def _cubic_taps(n, factor):
    """Along one axis, for each of n output pixels, SciPy's first tap (in the padded coefficients) and the
    cubic B-spline's 4 weights at the point it samples, in SciPy's arithmetic (ni_splines.c): the point
    ((k + 0.5) factor - 0.5) + pad, its fraction x, the weights (1 - x)^3 / 6, (3 x^2 (x - 2) + 4) / 6,
    the same of 1 - x, then 1 minus the other three."""
    point = (np.arange(n) + 0.5) * factor - 0.5 + SPLINE_PAD
    x = point - np.floor(point)
    y, z = x, 1.0 - x
    weights = np.empty((n, 4))
    weights[:, 0] = z * z * z / 6.0
    weights[:, 1] = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
    weights[:, 2] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
    weights[:, 3] = 1.0 - weights[:, 0] - weights[:, 1] - weights[:, 2]
    return np.floor(point).astype(int) - 1, weights


def _sorted_edges(image, sigma):
    """The 8-connected grid's edges of an (H, W, C) image in increasing cost, as scikit-image's felzenszwalb
    sorts them: the image as float64, smoothed (Gaussian of ``sigma`` along rows and columns, borders
    reflected), the costs the Euclidean distances between neighbours' colours, listed right, down, down-right
    then up-right neighbours, ordered by NumPy's default argsort. Returns ends (E, 2) int32, the two pixels
    (raster indices) of each edge, and costs (E,) float64."""
    from skimage.util import img_as_float64
    image = ndimage.gaussian_filter(img_as_float64(image), [sigma, sigma, 0], mode='reflect', truncate=4.0)
    h, w = image.shape[:2]

    def distance(a, b):
        return np.sqrt(np.sum((a - b) * (a - b), axis=-1))
    costs = np.hstack([distance(image[:, 1:], image[:, :w - 1]).ravel(),
                       distance(image[1:], image[:h - 1]).ravel(),
                       distance(image[1:, 1:], image[:h - 1, :w - 1]).ravel(),
                       distance(image[1:, :w - 1], image[:h - 1, 1:]).ravel()]).astype(float)
    pixels = np.arange(h * w, dtype=np.int32).reshape(h, w)

    def pairs(a, b):
        return np.stack([a.ravel(), b.ravel()], axis=1)
    ends = np.concatenate([pairs(pixels[:, 1:], pixels[:, :w - 1]), pairs(pixels[1:], pixels[:h - 1]),
                           pairs(pixels[1:, 1:], pixels[:h - 1, :w - 1]),
                           pairs(pixels[:h - 1, 1:], pixels[1:, :w - 1])])
    order = np.argsort(costs)
    return ends[order], costs[order]


@functools.lru_cache(maxsize=16)
def _nearest_pixels(shape, original_shape):
    """For each pixel of an image of original_shape, the raster index of the pixel of a ``shape`` map that PAIR's
    nearest-neighbour resize of the map to original_shape gives it: that same resize applied to the indices (a
    point it would fill with 0 past the border takes pixel 0, whose label is 0). (H, W) int, read-only."""
    from skimage.transform import resize
    nearest = resize(np.arange(shape[0] * shape[1]).reshape(shape), original_shape, order=0, preserve_range=True,
                     mode='constant', anti_aliasing=False).astype(int)
    nearest.flags.writeable = False
    return nearest


@functools.lru_cache(maxsize=4)
def _disk_rows(radius):
    """scikit-image's disk(radius), PAIR's dilation footprint, as the half widths of its centred rows."""
    from skimage.morphology import disk
    footprint = disk(radius).astype(bool)
    half_widths = footprint.sum(axis=1) // 2
    runs = np.abs(np.arange(-radius, radius + 1))[None, :] <= half_widths[:, None]
    if footprint.shape != (2 * radius + 1,) * 2 or not np.array_equal(footprint, runs):
        raise ValueError('the dilation footprint is not rows of columns centred on the middle one')
    return half_widths.astype(np.intc)
