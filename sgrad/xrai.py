"""XRAI (Kapishnikov et al. 2019, arXiv:1906.02825): the image's Felzenszwalb segments, at six scales and
dilated, ranked greedily by the density of Integrated Gradients' attribution in what each adds to the
regions chosen before; a pixel's value is the density of the region that added it.

The attribution is this project's: Integrated Gradients from the image's darkest and brightest flat images
(PAIR's default baselines, black and white for an image that spans [0, 1]), PAIR's rule for the path points,
all images, both baselines and every step as one chunked batch. The segments and the greedy ranking are
PAIR saliency's (``saliency.core.xrai``, which uses scikit-image's ``felzenszwalb``): they do not touch
the model, their choices (resizing to 224x224 before segmenting, the six scales, a 5-pixel dilation, regions
adding fewer than 50 new pixels skipped) define XRAI's maps, and keeping them keeps ours equal to PAIR's. The
ranking is PAIR's own function; the segments are sgrad.segments', PAIR's masks bit for bit in about an eighth of
its time at 32x32 (its edges sorted once for the six scales; the cubic resize, the merges and the dilations in
C). They still take much of XRAI's time on small images, so the images are segmented and ranked on every core
at once.
"""
import numpy as np

from sgrad.blocks import for_blocks
from sgrad.errors import InputError
from sgrad.saliency import IntegratedGradients, Method
from sgrad.segments import felzenszwalb_masks


class XRAI(Method):
    """XRAI (Kapishnikov et al. 2019): the region map; for each region R_i in the greedy order, the pixels it adds get
    mean_{p in R_i \\ (R_1 u ... u R_{i-1})} max_c IG_c(p), IG averaged over the two baselines."""

    signed = False
    not_smoothable = 'its map is made of segments of the image, which every noisy copy would change'

    def __init__(self, engine, steps=100, min_pixel_diff=50, area_threshold=1.0):
        super().__init__(engine)
        if steps <= 0:
            raise InputError('--steps must be positive, got %d' % steps)
        self.steps, self.min_pixel_diff, self.area_threshold = steps, min_pixel_diff, area_threshold

    def passes(self, x):
        return 2 * self.steps, 0

    def integrated_gradients(self, xs, target):
        """IG of each image from its darkest and from its brightest flat image, averaged, its channels' maximum:
        (N, H, W)."""
        n = len(xs)
        flat = lambda values: np.broadcast_to(values.reshape(-1, 1, 1, 1), xs.shape)
        baselines = np.concatenate([flat(xs.min(axis=(1, 2, 3))), flat(xs.max(axis=(1, 2, 3)))])
        ig = IntegratedGradients(self.engine, self.steps, baselines, points='linspace')
        both = ig.attribute(np.concatenate([xs, xs]), np.tile(np.broadcast_to(target, (n,)), 2))
        return both.reshape((2,) + xs.shape).mean(axis=0).max(axis=1)

    def attribute(self, xs, target):
        from saliency.core import xrai
        h, w = xs.shape[-2:]
        if h * w < self.min_pixel_diff:
            raise InputError('XRAI needs images of at least %d pixels (a region must add that many), got %dx%d'
                             % (self.min_pixel_diff, h, w))
        if (xs.max(axis=(1, 2, 3)) == xs.min(axis=(1, 2, 3))).any():
            raise InputError('XRAI cannot segment an image of one colour')
        attributions = self.integrated_gradients(xs, target)

        def regions(i):
            return xrai.XRAI._xrai(attributions[i], felzenszwalb_masks(xs[i]), area_perc_th=self.area_threshold,
                                   min_pixel_diff=self.min_pixel_diff)[0]
        # image by image on every core: the segmentation (SciPy, NumPy, sgrad/native.c) releases the GIL for most
        # of its time
        return np.stack(for_blocks(regions, list(range(len(xs)))))[:, None].astype(xs.dtype)
