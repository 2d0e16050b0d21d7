"""Measures of saliency maps: rank correlation, SSIM, cascading model
randomization (Adebayo et al. 2018), deletion / insertion curves (Petsiuk et
al. 2018), ROAD with noisy linear imputation (Rong et al. 2022), max-sensitivity
and infidelity (Yeh et al. 2019) and the Gini index of a map's sparseness. Maps
are 2-D (H, W) arrays; batches are (N, H, W)."""
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


def relevance_order(maps):
    """Each map's pixel indices, most relevant (largest) first; ties keep their raster order."""
    return np.argsort(-np.asarray(maps).reshape(len(maps), -1), axis=1, kind='stable')


def leading_pixels(order, counts):
    """(N, K, pixels) bools: for each of the K counts, the first ``count`` pixels of each row of ``order``."""
    masks = np.zeros((len(order), len(counts), order.shape[1]), dtype=bool)
    for k, count in enumerate(counts):
        np.put_along_axis(masks[:, k], order[:, :count], True, axis=1)
    return masks


def target_probabilities(engine, batch, targets):
    """The softmax probability of class targets[i] for each image batch[i]."""
    if not len(batch):
        return np.empty(0, batch.dtype)
    return engine.probabilities(batch)[np.arange(len(batch)), targets]


def filled(images, colour):
    """Images of the same shape as (N, C, H, W) ``images``, every pixel the colour (C,)."""
    return np.broadcast_to(np.asarray(colour, images.dtype).reshape(-1, 1, 1), images.shape).copy()


def curve_canvases(images, mean_colour=None):
    """What the perturbation curves put in place of the images' pixels: black (the deletion of Petsiuk et
    al.'s paper), a blurred copy, and, given ``mean_colour`` (C,), that colour: RISE's reference code
    deletes by setting the normalised input to 0, which is the mean colour the model's input
    normalisation subtracts (CifarNet: the CIFAR-10 training mean). {name: (N, C, H, W)}."""
    canvases = {'black': np.zeros_like(images), 'blurred': blur(images)}
    if mean_colour is not None:
        canvases['mean colour'] = filled(images, mean_colour)
    return canvases


def curve_ends(engine, images, targets, mean_colour=None):
    """The probability of the target class for the images themselves and for each canvas of
    curve_canvases, {'image' or canvas name: (N,)}: where every perturbation curve starts and ends,
    whatever the pixel order."""
    batches = dict(image=images, **curve_canvases(images, mean_colour))
    probabilities = target_probabilities(engine, np.concatenate(list(batches.values())),
                                         np.tile(targets, len(batches))).reshape(len(batches), len(images))
    return dict(zip(batches, probabilities))


def perturbation_curves(engine, images, maps, targets, steps=16, ends=None, mean_colour=None):
    """The softmax probability of the target class as the most salient pixels, 1/steps of
    them at a time, are set to black ('deletion', as in the paper), to the mean colour ('mean-colour
    deletion', as RISE's reference code does, where ``mean_colour`` (C,) is given), replaced by a
    blurred copy ('blurred deletion': no black holes, which a CNN may react to whatever their place),
    or restored onto a blurred canvas ('insertion'). Ties in a map keep their raster order.
    ``ends``: curve_ends of the images, which the curves of every pixel order share (computed if not
    given). Returns {kind: (N, steps + 1) array}."""
    n, c, h, w = images.shape
    counts = np.linspace(0, h * w, steps + 1).astype(int)[1:-1]  # the inner points; the ends are ``ends``
    salient = leading_pixels(relevance_order(maps), counts).reshape(n, steps - 1, 1, h, w)
    canvases = curve_canvases(images, mean_colour)
    ends = curve_ends(engine, images, targets, mean_colour) if ends is None else ends
    # kind: (canvas, where the image is kept, the canvas's name)
    perturbations = {'deletion': ('black', ~salient), 'blurred deletion': ('blurred', ~salient),
                     'insertion': ('blurred', salient)}
    if mean_colour is not None:
        perturbations['mean-colour deletion'] = ('mean colour', ~salient)
    curves = {}
    for kind, (canvas, keep_image) in perturbations.items():
        batch = np.where(keep_image, images[:, None], canvases[canvas][:, None]).reshape(-1, c, h, w)
        inner = target_probabilities(engine, batch, np.repeat(targets, steps - 1)).reshape(n, steps - 1)
        first, last = (ends['image'], ends[canvas]) if kind != 'insertion' else (ends[canvas], ends['image'])
        curves[kind] = np.column_stack([first, inner, last])
    return curves


def area_under_curve(curves):
    """Trapezoidal area under (N, K) curves on [0, 1], one value per curve."""
    return ((curves[:, 1:] + curves[:, :-1]) / 2).mean(axis=1)


#: ROAD's neighbour weights (Rong et al. 2022): 1/6 for the four pixels that share an edge, 1/12 for the
#: four that share a corner.
ROAD_NEIGHBOURS = tuple(((dy, dx), 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))

#: The fractions of pixels removed along a ROAD curve (the paper's 10% to 90%).
ROAD_FRACTIONS = tuple(np.round(np.arange(1, 10) / 10, 1))


def _neighbour_sum(a):
    """sum over the 8 neighbours (dy, dx) inside the image of weight * a[..., i + dy, j + dx], for (..., H, W) a."""
    h, w = a.shape[-2:]
    total = np.zeros(a.shape, dtype=np.float64)
    for (dy, dx), weight in ROAD_NEIGHBOURS:
        total[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] += \
            weight * a[..., max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return total


def _diagonal(blocks, offset):
    """A writable view of the ``offset``-th diagonal of the last two axes of a C-contiguous (..., W, W) array."""
    w = blocks.shape[-1]
    flat = blocks.reshape(blocks.shape[:-2] + (w * w,))
    return flat[..., offset if offset >= 0 else -offset * w::w + 1][..., :w - abs(offset)]


def _imputation_blocks(removed):
    """linear_imputation's system over the whole pixel grid, one block per image row, for (B, H, W) bools
    ``removed``: a removed pixel's row is d_p at p and -w_pq at each removed neighbour q; a kept pixel's
    row is the identity. Returns the diagonal blocks (B, H, W, W), which couple a row to itself, and
    the blocks that couple row i to row i - 1 as their three diagonals (B, H, 3, W): [..., k, j] is the
    entry of (i, j) and (i - 1, j + k - 1) (row 0's are zero). The block below row i is the transpose
    of the block above row i + 1: the system is symmetric."""
    b, h, w = removed.shape
    r = removed.astype(np.float64)
    weights = dict(ROAD_NEIGHBOURS)
    diagonal_blocks = np.zeros((b, h, w, w))
    _diagonal(diagonal_blocks, 0)[...] = np.where(removed, _neighbour_sum(np.ones((h, w))), 1.)
    _diagonal(diagonal_blocks, 1)[...] = _diagonal(diagonal_blocks, -1)[...] = \
        -weights[0, 1] * r[..., :-1] * r[..., 1:]
    here, above = r[:, 1:], r[:, :-1]
    lower = np.zeros((b, h, 3, w))
    lower[:, 1:, 0, 1:] = -weights[-1, -1] * here[..., 1:] * above[..., :-1]
    lower[:, 1:, 1] = -weights[-1, 0] * here * above
    lower[:, 1:, 2, :-1] = -weights[-1, 1] * here[..., :-1] * above[..., 1:]
    return diagonal_blocks, lower


def _times_lower(lower, m, transposed=False):
    """The product of a row-coupling block, given by its three diagonals (B, 3, W), or of its
    transpose, with (B, W, K) matrices m."""
    product = lower[:, 1, :, None] * m
    before, after = (lower[:, 0], lower[:, 2]) if not transposed else (lower[:, 2], lower[:, 0])
    product[:, 1:] += (before[:, 1:] if not transposed else before[:, :-1])[..., None] * m[:, :-1]
    product[:, :-1] += (after[:, :-1] if not transposed else after[:, 1:])[..., None] * m[:, 1:]
    return product


def _solve_row_by_row(diagonal_blocks, lower, rhs):
    """Solve the symmetric block-tridiagonal systems of _imputation_blocks for (B, H, W, K) right-hand
    sides by block Gaussian elimination down the rows and back substitution up them (the block Thomas
    algorithm); no pivoting across rows is needed, the system being symmetric positive definite."""
    b, h, w, _ = diagonal_blocks.shape
    identity = np.broadcast_to(np.eye(w), (b, w, w))
    eliminated = np.empty_like(diagonal_blocks)  # S_i^-1 U_i, U_i the block above row i + 1
    partial = np.empty_like(rhs)  # S_i^-1 y_i
    schur, y = diagonal_blocks[:, 0], rhs[:, 0]
    for i in range(h - 1):
        upper = _times_lower(lower[:, i + 1], identity, transposed=True)
        solved = np.linalg.solve(schur, np.concatenate([upper, y], axis=-1))
        eliminated[:, i], partial[:, i] = solved[..., :w], solved[..., w:]
        schur = diagonal_blocks[:, i + 1] - _times_lower(lower[:, i + 1], eliminated[:, i])
        y = rhs[:, i + 1] - _times_lower(lower[:, i + 1], partial[:, i])
    solution = np.empty_like(rhs)
    solution[:, -1] = np.linalg.solve(schur, y)
    for i in range(h - 2, -1, -1):
        solution[:, i] = partial[:, i] - eliminated[:, i] @ solution[:, i + 1]
    return solution


#: Bytes of block matrices per group of images that linear_imputation solves at once.
IMPUTATION_BYTES = 16 << 20


def linear_imputation(images, removed):
    """ROAD's linear imputation: every removed pixel of (N, C, H, W) images (``removed``: (N, H, W) bools)
    becomes the weighted mean of its neighbours inside the image (ROAD_NEIGHBOURS), removed neighbours
    included, channel by channel. The removed values u therefore solve the sparse linear system
    d_p u_p - sum_{q removed} w_pq u_q = sum_{q kept} w_pq x_q (d_p: the weights of p's neighbours), symmetric
    and positive definite while any pixel is kept. Solved directly (exact to rounding), with the image's
    rows of pixels as the blocks of a block-tridiagonal system: O(H W^3) per image, all channels at once,
    groups of images on every core (sgrad.blocks.for_blocks). Float64 result."""
    from sgrad.blocks import for_blocks
    x = np.asarray(images, np.float64)
    removed = np.asarray(removed, bool)
    if x.shape[-1] > x.shape[-2]:  # the shorter side as the block size; the weights are symmetric
        return linear_imputation(x.swapaxes(-1, -2), removed.swapaxes(-1, -2)).swapaxes(-1, -2)
    rhs = np.where(removed[:, None], _neighbour_sum(np.where(removed[:, None], 0., x)), 0.).transpose(0, 2, 3, 1)
    imputed = x.copy()

    def solve(group):
        solution = _solve_row_by_row(*_imputation_blocks(removed[group]), np.ascontiguousarray(rhs[group]))
        imputed[group] = np.where(removed[group, None], solution.transpose(0, 3, 1, 2), x[group])
    size = max(1, IMPUTATION_BYTES // (2 * x[0, 0].size * x.shape[-1] * 8))
    for_blocks(solve, [slice(i, i + size) for i in range(0, len(x), size)])
    return imputed


def image_streams(rngs, n):
    """One random stream per image: ``rngs`` as given, or RandomState(i) for image i. Drawing image by
    image keeps an image's draws independent of the images beside it (and of the rank under mpiexec)."""
    return [np.random.RandomState(i) for i in range(n)] if rngs is None else rngs


def noisy_linear_imputation(images, removed, noise=0.01, rngs=None):
    """linear_imputation plus N(0, noise^2) on every removed value (ROAD's NoisyLinearImputer, here in the
    [0, 1] image space), so that the imputed values carry no trace of the removal's shape; same dtype.
    ``rngs``: one stream per image (image_streams)."""
    imputed = linear_imputation(images, removed)
    masks = np.broadcast_to(np.asarray(removed, bool)[:, None], imputed.shape)
    for image, mask, rng in zip(imputed, masks, image_streams(rngs, len(imputed))):
        image[mask] += noise * rng.standard_normal(int(mask.sum()))
    return imputed.astype(np.asarray(images).dtype)


def road_curves(probabilities, images, maps, targets, fractions=ROAD_FRACTIONS, noise=0.01, rngs=None):
    """ROAD (Rong et al. 2022): the target-class probability after removing the most relevant ('MoRF') or the
    least relevant ('LeRF') fraction of each image's pixels by the map and imputing them
    (noisy_linear_imputation, ``rngs`` one stream per image). Ties in a map keep their raster order
    (relevance_order); the authors' code breaks them by adding 1e-4 noise to the map instead (an
    independent recomputation found the areas moved by at most 0.001). ``probabilities(batch)`` gives (B, classes).
    Returns {'MoRF': (N, F), 'LeRF': (N, F)}; a faithful map makes MoRF fall fast and LeRF stay high."""
    n, c, h, w = images.shape
    order = relevance_order(maps)
    counts = [int(round(fraction * h * w)) for fraction in fractions]
    rngs = image_streams(rngs, n)
    curves = {}
    for kind, ranked in (('MoRF', order), ('LeRF', order[:, ::-1])):
        removed = leading_pixels(ranked, counts).reshape(n, len(fractions), h, w)
        batches = [noisy_linear_imputation(images, removed[:, k], noise, rngs) for k in range(len(fractions))]
        probs = probabilities(np.concatenate(batches))
        curves[kind] = probs[np.arange(len(probs)), np.tile(targets, len(fractions))].reshape(len(fractions), n).T
    return curves


def max_sensitivity(explain, images, radius=0.02, samples=10, rngs=None, relative=True, base=None):
    """Max-sensitivity (Yeh et al. 2019), by Monte Carlo: for each image x, the largest ||Phi(x + d) - Phi(x)||_2
    over ``samples`` draws of d uniform in the L-infinity ball of ``radius`` (in the [0, 1] image space;
    x + d is not clipped). ``explain(images)`` gives their attributions Phi (one per image). With
    ``relative``, divided by ||Phi(x)||_2, which makes methods of different scales comparable: that is
    captum.metrics.sensitivity_max with its default perturbation and norm_ord='fro' (a test holds the two
    equal on the same draws), except for an all-zero Phi(x), where Captum divides by 1 and this gives 0;
    the paper's definition is relative=False. ``rngs``: one stream per image (image_streams). ``base``:
    explain(images), where the caller has it already."""
    images = np.asarray(images)
    rngs = image_streams(rngs, len(images))
    base = np.asarray(explain(images) if base is None else base, np.float64).reshape(len(images), -1)
    worst = np.zeros(len(images))
    for _ in range(samples):
        draws = np.stack([rng.uniform(-radius, radius, images.shape[1:]) for rng in rngs])
        shifted = images + draws.astype(images.dtype)
        change = np.asarray(explain(shifted), np.float64).reshape(len(images), -1) - base
        worst = np.maximum(worst, np.linalg.norm(change, axis=1))
    if relative:
        scale = np.linalg.norm(base, axis=1)
        worst = np.divide(worst, scale, out=np.zeros_like(worst), where=scale > 0)
    return worst


def gaussian_perturbations(x, samples, rng, sd=0.1):
    """Infidelity's small Gaussian noise around x: I ~ N(0, sd^2) for every input value, (samples,) + x.shape
    (the perturbation of Captum's documentation example of captum.metrics.infidelity)."""
    return sd * rng.standard_normal((samples,) + x.shape)


def noisy_baseline_perturbations(x, samples, rng, sd=0.2):
    """Infidelity's noisy baseline, as Yeh et al.'s code draws it (infid_sen_utils.set_zero_infid, 'Gaussian'):
    I = clip(x + sd z, x - 1, x) for every input value, z ~ N(0, 1). That is I = x - x0 with x0 = clip(-sd z,
    0, 1) a noisy black image: the perturbed input x - I is nearly black. (samples,) + x.shape."""
    x = np.asarray(x, np.float64)
    return np.clip(x + sd * rng.standard_normal((samples,) + x.shape), x - 1, x)


#: Infidelity's perturbations by name: (draws, their default sd).
INFIDELITY_PERTURBATIONS = {'gaussian': (gaussian_perturbations, 0.1),
                            'noisy baseline': (noisy_baseline_perturbations, 0.2)}


def infidelity_terms(scores, images, attributions, perturbation='gaussian', sd=None, samples=50, rngs=None):
    """The Monte Carlo terms of infidelity, (I . Phi, f(x) - f(x - I)), each (samples, N), for ``samples``
    draws of I per image by INFIDELITY_PERTURBATIONS[perturbation] (standard deviation ``sd``, default its
    own), for every input value: the same draws whatever the attribution. (N, C, H, W) attributions meet I
    element by element; a map of one value per pixel, (N, H, W) or (N, 1, H, W), gives that value to each
    of the pixel's channels. ``scores(batch)`` gives the explained class's score f of each image (B,).
    ``rngs``: one stream per image (image_streams)."""
    draw, default_sd = INFIDELITY_PERTURBATIONS[perturbation]
    images = np.asarray(images)
    n = len(images)
    phi = np.asarray(attributions, np.float64)
    phi = phi.reshape(phi.shape[:-2] + (1,) * (4 - phi.ndim) + phi.shape[-2:])  # (N, C or 1, H, W)
    perturbations = np.stack([draw(x, samples, rng, default_sd if sd is None else sd)
                              for x, rng in zip(images, image_streams(rngs, n))], axis=1)  # (S, N, C, H, W)
    perturbed = (images[None] - perturbations).astype(images.dtype).reshape((-1,) + images.shape[1:])
    drops = np.asarray(scores(images), np.float64)[None] - np.asarray(scores(perturbed), np.float64).reshape(samples, n)
    return (perturbations * phi[None]).reshape(samples, n, -1).sum(axis=2), drops


def infidelity_score(dots, drops, normalize=True):
    """Infidelity (Yeh et al. 2019) from its terms (infidelity_terms): the mean over draws of (I . Phi -
    (f(x) - f(x - I)))^2, per image. With ``normalize``, Phi is first scaled by the beta that minimises it,
    beta = E[I.Phi dF] / E[(I.Phi)^2] (per image, on the same draws), so that a map's scale does not count:
    the estimator of the authors' code and of captum.metrics.infidelity with normalize=True (a test holds
    ours equal to both on the same draws); normalize=False is the paper's definition."""
    if normalize:
        square = (dots ** 2).mean(axis=0)
        beta = np.divide((dots * drops).mean(axis=0), square, out=np.zeros(dots.shape[1]), where=square > 0)
        dots = beta * dots
    return ((dots - drops) ** 2).mean(axis=0)


def infidelity(scores, images, attributions, perturbation='gaussian', sd=None, samples=50, rngs=None,
               normalize=True):
    """Infidelity E_I[(I . Phi - (f(x) - f(x - I)))^2] of each image's attribution Phi, by Monte Carlo:
    infidelity_score of infidelity_terms (see both)."""
    return infidelity_score(*infidelity_terms(scores, images, attributions, perturbation, sd, samples, rngs),
                            normalize)


def gini(maps):
    """The Gini index of |map| (Hurley & Rickard 2009; for attributions, Chalasani et al. 2020), one value
    per map of (N, H, W): 0 for a uniform map, 1 - 1/n for a single non-zero pixel of n; 0 for an all-zero
    map. Higher is sparser."""
    values = np.sort(np.abs(np.asarray(maps, np.float64)).reshape(len(maps), -1), axis=1)
    d = values.shape[1]
    total = values.sum(axis=1)
    weights = (d - np.arange(1, d + 1) + 0.5) / d
    share = np.divide(values, total[:, None], out=np.zeros_like(values), where=total[:, None] > 0)
    return np.where(total > 0, 1 - 2 * (share * weights).sum(axis=1), 0.)
