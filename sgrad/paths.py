"""Integrated gradients along other paths than the straight line: Blur IG's path of ever blurrier copies
of the image, and Guided IG's path that moves the features with the smallest gradients first; and Gradient
SHAP's straight lines from baselines drawn at random. All are batched over images on the one GradientEngine:
Blur IG's and Gradient SHAP's (step, image) pairs in chunks (path_sums), Guided IG's images stepping
together, one engine call per step for all of them."""
import math

import numpy as np
from scipy import ndimage

from sgrad.errors import InputError
from sgrad.saliency import PathMethod, path_sums


#: PAIR's largest blur in Blur IG, for a 224-pixel image.
MAX_SIGMA_AT_224 = 50.


def gaussian_blur(xs, sigma):
    """(N, C, H, W) images blurred plane by plane by a Gaussian of ``sigma`` pixels, zero outside the
    image (scipy.ndimage.gaussian_filter, as PAIR's Blur IG); sigma 0 is the image itself."""
    return xs if sigma == 0 else ndimage.gaussian_filter(xs, sigma=(0, 0, sigma, sigma), mode='constant')


def largest_blur(xs):
    """PAIR's largest blur, 50 pixels at 224x224, scaled with the shorter side of the images xs (..., H, W):
    7.1 pixels at 32x32, where a 32-pixel image is a flat blur long before sigma 50."""
    return MAX_SIGMA_AT_224 * min(xs.shape[-2:]) / 224


class BlurIG(PathMethod):
    """Blur IG (Xu et al. 2020, arXiv:2004.03383): integrated gradients along the path of blurred
    copies x(sigma) = G_sigma * x from the image (sigma = 0) to its blur at ``max_sigma``,

        BlurIG(x) = - sum_{k=0..m-1} (sigma_{k+1} - sigma_k) * dx/dsigma (sigma_k) * dS_c/dx (x(sigma_k))

    with sigma_k = k max_sigma / m (or sqrt(k max_sigma / m) with ``sqrt``) and dx/dsigma by a forward
    difference of ``grad_step``: PAIR saliency's BlurIG, whose defaults these are, except that ``max_sigma``
    None scales PAIR's 50 pixels at 224x224 with the image's shorter side (largest_blur). The attributions
    add up to S_c(x) - S_c(x(max_sigma)).
    """

    def __init__(self, engine, steps=100, max_sigma=None, grad_step=0.01, sqrt=False):
        super().__init__(engine)
        if steps <= 0:
            raise InputError('--steps must be positive, got %d' % steps)
        self.steps, self.max_sigma, self.grad_step, self.sqrt = steps, max_sigma, grad_step, sqrt

    def sigmas(self, xs):
        """sigma_0 .. sigma_m for images of the shape of xs."""
        largest = self.max_sigma or largest_blur(xs)
        fractions = np.arange(self.steps + 1) * largest / self.steps
        return np.sqrt(fractions) if self.sqrt else fractions

    def reference(self, xs):
        return gaussian_blur(xs, self.sigmas(xs)[-1])

    def attribute(self, xs, target):
        dtype, sigmas = xs.dtype.type, self.sigmas(xs)

        def points(k, images):
            point = gaussian_blur(xs[images], sigmas[k])
            slope = (gaussian_blur(xs[images], sigmas[k] + self.grad_step) - point) / dtype(self.grad_step)
            return point, -(sigmas[k + 1] - sigmas[k]) * slope
        return path_sums(self.engine, xs, target, self.steps, points).astype(xs.dtype)


class GradientSHAP(PathMethod):
    """Gradient SHAP (Lundberg & Lee 2017, arXiv:1705.07874), Expected Gradients (Erion et al. 2019,
    arXiv:1906.10670) when ``stdev`` is 0: the mean over n = ``samples`` draws of

        (x + eps_k - x'_k) * dS_c/dx (x'_k + alpha_k (x + eps_k - x'_k)),   alpha_k ~ U(0, 1),   eps_k ~ N(0, stdev^2)

    with the baselines x'_k drawn from a distribution, ``baseline``: 'black'; 'blurred', the image blurred by
    a Gaussian of sigma_k ~ U(0, largest_blur) (Blur IG's largest blur); or images drawn uniformly, one
    (C, H, W) or a set (M, C, H, W) such as training images. In expectation over alpha it is Integrated
    Gradients averaged over the baselines, adding up to the mean of S_c(x + eps_k) - S_c(x'_k), which
    ``completeness`` compares with the same draws. The noise eps_k moves the image, not the path point,
    as Captum's GradientShap (its NoiseTunnel over InputBaselineXGradient) and shap's GradientExplainer
    add it: with noise Gradient SHAP is SmoothGrad's mean over noisy copies of Expected Gradients, which is
    why SmoothGrad does not wrap it. ``stdev`` is in the image's units, as Captum's ``stdevs`` (default 0).

    Draw k (baseline, alpha_k, eps_k, the same for every image) comes from RandomState([seed, k]) alone, so
    every call draws the same (an image's map does not depend on the images beside it), any draw can be made
    again where it is needed, and the (draw, image) pairs go through the engine in chunks (path_sums).
    """

    not_smoothable = 'with noise (stdev) it is the mean over noisy copies already'

    def __init__(self, engine, samples=50, baseline='black', stdev=0., seed=0):
        super().__init__(engine)
        if samples <= 0:
            raise InputError('--samples must be positive, got %d' % samples)
        if stdev < 0:
            raise InputError('the noise stdev must be >= 0, got %g' % stdev)
        if baseline is None or isinstance(baseline, str):
            if baseline not in (None, 'black', 'blurred'):
                raise InputError("Gradient SHAP's baselines are 'black', 'blurred' or images, got %r" % baseline)
            self.baselines = 'blurred' if baseline == 'blurred' else np.zeros((1, 1, 1, 1), np.float32)
        else:
            images = np.asarray(baseline)
            self.baselines = images[None] if images.ndim == 3 else images
        self.samples, self.stdev, self.seed = samples, stdev, seed

    def passes(self, x):
        return self.samples, 0

    def draw(self, k, xs):
        """Draw k for the images xs (N, C, H, W): their baselines x'_k (N, C, H, W), alpha_k and eps_k
        (C, H, W; 0 without noise)."""
        rng = np.random.RandomState([self.seed, k])
        if isinstance(self.baselines, str):
            baselines = gaussian_blur(xs, rng.uniform(0, largest_blur(xs)))
        else:
            baselines = np.broadcast_to(self.baselines[rng.randint(len(self.baselines))], xs.shape)
        alpha = rng.uniform()
        noise = rng.normal(0, self.stdev, xs.shape[1:]).astype(xs.dtype) if self.stdev else 0
        return baselines.astype(xs.dtype), xs.dtype.type(alpha), noise

    def attribute(self, xs, target):
        def points(k, images):
            baselines, alpha, noise = self.draw(k, xs[images])
            difference = xs[images] + noise - baselines
            return baselines + alpha * difference, difference / self.samples
        return path_sums(self.engine, xs, target, self.samples, points).astype(xs.dtype)

    def path_ends(self, x):
        draws = [self.draw(k, x[None]) for k in range(self.samples)]
        return (np.concatenate([baselines for baselines, _, _ in draws]),
                np.stack([x + noise for _, _, noise in draws]))


class GuidedIG(PathMethod):
    """Guided IG (Kapishnikov et al. 2021, arXiv:2106.09788): from the baseline x' (black by default) to x,
    each of ``steps`` steps moves the features of smallest |dS_c/dx| (a ``fraction`` of them at a time,
    repeatedly) towards x until the path has covered (k + 1) / m of the L1 distance, no feature leaving
    the band of +-``max_dist`` around the straight line's alpha; the attribution sums the gradient at each
    step times the move of each feature:

        GuidedIG(x) = sum over moves of dS_c/dx (x_k) * (x_after - x_before)

    PAIR saliency's guided_ig_impl, run for all images at once in float64: one engine call per step for
    every image, each image's inner moves vectorised over the images still moving.
    """

    #: PAIR's tolerance of the L1 distance still to go.
    EPSILON = 1e-9

    def __init__(self, engine, steps=200, baseline=None, fraction=0.25, max_dist=0.02):
        super().__init__(engine)
        if steps <= 0:
            raise InputError('--steps must be positive, got %d' % steps)
        self.steps, self.baseline, self.fraction, self.max_dist = steps, baseline, fraction, max_dist

    def attribute(self, xs, target):
        n = len(xs)
        flat = lambda a: a.reshape(n, -1)
        x_input, baseline = flat(xs.astype(np.float64)), flat(self.reference(xs).astype(np.float64))
        difference = x_input - baseline
        l1_total = np.abs(difference).sum(axis=1)
        with np.errstate(divide='ignore', invalid='ignore'):
            inverse = np.where(difference != 0, 1 / difference, np.nan)
        x = baseline.copy()
        attribution = np.zeros_like(x)
        targets = np.broadcast_to(np.asarray(target), (n,))
        for step in range(self.steps):
            moving = l1_total > 0  # an image equal to its baseline keeps a zero attribution
            if not moving.any():
                break
            gradient = np.zeros_like(x)
            gradient[moving] = flat(self.engine(x[moving].reshape((-1,) + xs.shape[1:]).astype(xs.dtype),
                                                targets[moving])).astype(np.float64)
            self._step(step, x, gradient, attribution, moving, x_input, baseline, difference, inverse, l1_total)
        return attribution.reshape(xs.shape).astype(xs.dtype)

    def _step(self, step, x, gradient, attribution, moving, x_input, baseline, difference, inverse, l1_total):
        """One step of every moving image's path, x and attribution updated in place."""
        alpha = (step + 1.) / self.steps
        alpha_min, alpha_max = max(alpha - self.max_dist, 0.), min(alpha + self.max_dist, 1.)
        x_min, x_max = baseline + alpha_min * difference, baseline + alpha_max * difference
        l1_target = l1_total * (1 - (step + 1) / self.steps)
        selectable = gradient.copy()
        while moving.any():
            rows = np.flatnonzero(moving)
            before = x[rows]
            position = (before - baseline[rows]) * inverse[rows]   # each feature's alpha on the straight line
            position[np.isnan(position)] = alpha_max
            behind = position < alpha_min
            x[rows] = np.where(behind, x_min[rows], before)        # features left behind the band catch up
            l1_current = np.abs(x[rows] - x_input[rows]).sum(axis=1)
            arrived = np.array([math.isclose(t, c, rel_tol=self.EPSILON, abs_tol=self.EPSILON)
                                for t, c in zip(l1_target[rows], l1_current)], bool)
            attribution[rows[arrived]] += (x[rows[arrived]] - before[arrived]) * gradient[rows[arrived]]
            moving[rows[arrived]] = False
            rows, before, l1_current = rows[~arrived], before[~arrived], l1_current[~arrived]
            if not len(rows):
                break
            grad = selectable[rows]
            grad[x[rows] == x_max[rows]] = np.inf                 # features at the band's edge stay
            selectable[rows] = grad
            threshold = np.quantile(np.abs(grad), self.fraction, axis=1, method='lower')
            chosen = (np.abs(grad) <= threshold[:, None]) & (grad != np.inf)
            l1_chosen = (np.abs(x[rows] - x_max[rows]) * chosen).sum(axis=1)
            with np.errstate(divide='ignore', invalid='ignore'):
                gamma = np.where(l1_chosen > 0, (l1_current - l1_target[rows]) / l1_chosen, np.inf)
            whole = gamma > 1                                     # the chosen features go all the way to x_max
            moved = np.where(whole[:, None], x_max[rows], x[rows] + (x_max[rows] - x[rows]) * gamma[:, None])
            x[rows] = np.where(chosen, moved, x[rows])
            attribution[rows] += (x[rows] - before) * gradient[rows]
            moving[rows[~whole]] = False
