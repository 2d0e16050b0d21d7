"""Measures of saliency maps: rank correlation, SSIM, cascading model
randomization (Adebayo et al. 2018) and deletion / insertion curves (Petsiuk et
al. 2018). Maps are 2-D (H, W) arrays; batches are (N, H, W)."""
import copy

import chainer
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sgrad.hooks import CallOrder


def ranks(values):
    """Ranks 0..n-1 of a 1-D array, ties given their average rank."""
    order = np.argsort(values, kind='stable')
    ranked = np.empty(len(values), dtype=np.float64)
    ranked[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranked)
    return (sums / counts)[inverse]


def spearman(a, b):
    """Spearman rank correlation of two maps (0 when either is constant)."""
    ra, rb = ranks(np.ravel(a)), ranks(np.ravel(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.


def normalize01(m):
    """A map scaled to [0, 1] (a constant map to 0)."""
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m, dtype=np.float64)


def ssim(a, b, window=7):
    """Structural similarity (Wang et al. 2004) of two maps, each first scaled to [0, 1];
    mean over all window x window patches, C1 = 0.01^2, C2 = 0.03^2."""
    a, b = normalize01(np.asarray(a, np.float64)), normalize01(np.asarray(b, np.float64))
    pa, pb = sliding_window_view(a, (window, window)), sliding_window_view(b, (window, window))
    mu_a, mu_b = pa.mean(axis=(-2, -1)), pb.mean(axis=(-2, -1))
    var_a, var_b = pa.var(axis=(-2, -1)), pb.var(axis=(-2, -1))
    cov = (pa * pb).mean(axis=(-2, -1)) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def randomization_stages(model, x):
    """The cascade of Adebayo et al. for ``model``: its ``RANDOMIZATION_STAGES`` ((label, link names) from
    the logits down), or else each link its forward calls directly, in the reverse order of the calls on
    images x."""
    stages = getattr(model, 'RANDOMIZATION_STAGES', None)
    if stages is None:
        with chainer.using_config('train', False), chainer.no_backprop_mode(), CallOrder(model) as calls:
            model(x)
        stages = [(name, (name,)) for name in reversed(calls.order)]
    return tuple(stages)


def cascading_randomization(model, stages, seed=0):
    """Yield (stage label, model copy) with the weights of each stage's links re-drawn from their
    initialisers one stage after another, cumulatively (the paper's order: from the logits down).
    BatchNorm's statistics and affine parameters stay trained."""
    model = copy.deepcopy(model)
    links = dict(model.namedlinks(skipself=True))
    np.random.seed(seed)
    for label, names in stages:
        for name in names:
            for link in links['/' + name].links():
                if isinstance(link, (chainer.links.Convolution2D, chainer.links.Linear)):
                    link.W.initializer = chainer.initializers.LeCunNormal()
                    link.W.initialize(link.W.shape)
                    if link.b is not None:
                        link.b.initialize(link.b.shape)
        yield label, copy.deepcopy(model)


def blur(x, k=5):
    """A box blur of (..., H, W) images with edge padding (the insertion curve's starting canvas)."""
    pad = k // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(pad, pad), (pad, pad)], mode='edge')
    return sliding_window_view(padded, (k, k), axis=(-2, -1)).mean(axis=(-2, -1)).astype(x.dtype)


def perturbation_curves(engine, images, maps, targets, steps=16):
    """The softmax probability of the target class as the most salient pixels, 1/steps of
    them at a time, are set to black ('deletion', as in the paper), replaced by a blurred copy
    ('blurred deletion': no black holes, which a CNN may react to whatever their place), or
    restored onto a blurred canvas ('insertion'). Returns {kind: (N, steps + 1) array}."""
    n, c, h, w = images.shape
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind='stable')
    counts = np.linspace(0, h * w, steps + 1).astype(int)
    salient = np.zeros((n, steps + 1, h * w), dtype=bool)
    for k, count in enumerate(counts):
        np.put_along_axis(salient[:, k], order[:, :count], True, axis=1)
    salient = salient.reshape(n, steps + 1, 1, h, w)
    blurred = blur(images)
    perturbations = {'deletion': (np.zeros_like(images), ~salient),
                     'blurred deletion': (blurred, ~salient),
                     'insertion': (blurred, salient)}
    curves = {}
    for kind, (canvas, keep_image) in perturbations.items():
        batch = np.where(keep_image, images[:, None], canvas[:, None]).reshape(-1, c, h, w)
        probs = engine.probabilities(batch)[np.arange(len(batch)), np.repeat(targets, steps + 1)]
        curves[kind] = probs.reshape(n, steps + 1)
    return curves


def area_under_curve(curves):
    """Trapezoidal area under (N, K) curves on [0, 1], one value per curve."""
    return ((curves[:, 1:] + curves[:, :-1]) / 2).mean(axis=1)
