"""XRAI's segments, the same masks as PAIR saliency's ``saliency.core.xrai._get_segments_felzenszwalb`` (with its
defaults), bit for bit and in the same order, in a fraction of its time.

PAIR resizes the image to 224x224 with values in [-1, 1], segments it by Felzenszwalb and Huttenlocher's graph
method ("Efficient graph-based image segmentation", IJCV 2004) through scikit-image's ``felzenszwalb`` at six
scales, resizes each label map back (nearest), and dilates every segment's mask by a disk. Most of that time is
scikit-image sorting the same edges again for every scale: the smoothed image, the edge costs and their order
do not depend on the scale. Here they are computed once, with the calls scikit-image makes (so the sort, ties
included, is the same), and only the merges, which do, run for each scale, in C (sgrad/native.c). The
resizing of the label maps becomes a lookup (which pixel of the 224x224 map each pixel takes) and the
dilation sets the rows of each run of equal labels at once. Where sgrad/_native.so is not built, PAIR's own
function runs.
"""
import functools

import numpy as np
from scipy import ndimage

from sgrad import native
from sgrad.pair import to_pair

#: PAIR's dilation radius (``dilation_rad``'s default), in pixels of the original image
DILATION_RADIUS = 5


def felzenszwalb_masks(image_chw):
    """XRAI's segments of one (C, H, W) image: the list of (H, W) boolean masks that PAIR's
    ``_get_segments_felzenszwalb(to_pair(image_chw))`` returns (the labels of each scale in turn, every label
    between the map's least and greatest, each dilated)."""
    from saliency.core import xrai
    image = to_pair(image_chw)
    if native.library() is None:
        return xrai._get_segments_felzenszwalb(image)
    shape = image.shape[:2]
    image = xrai._normalize_image(image, xrai._FELZENSZWALB_IM_VALUE_RANGE, xrai._FELZENSZWALB_IM_RESIZE)
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
