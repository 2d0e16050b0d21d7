"""ROAD's imputation and curves, max-sensitivity, infidelity and the Gini index, on cases whose answer is
known, the imputation on real CIFAR-10 images against its defining equations, and max-sensitivity and
infidelity on real images against Captum's (optional: skipped without torch and captum)."""
import chainer
import numpy as np
import pytest

from model import load_model
from sgrad.data import load_test_images
from sgrad.metrics import (INFIDELITY_PERTURBATIONS, ROAD_NEIGHBOURS, gini, infidelity, infidelity_score,
                           infidelity_terms, linear_imputation, max_sensitivity, noisy_baseline_perturbations,
                           noisy_linear_imputation, road_curves)
from sgrad.saliency import Gradient, GradientEngine, channel_sum_abs


def dense_imputation(image, removed):
    """The imputation's linear system assembled entry by entry and solved densely: one equation per removed
    pixel, u_p = sum over neighbours q inside the image of w_pq x_q / sum of those w_pq (x_q = u_q if removed)."""
    h, w = removed.shape
    unknowns = {p: k for k, p in enumerate(zip(*np.nonzero(removed)))}
    result = image.astype(np.float64).copy()
    for c in range(image.shape[0]):
        a, b = np.zeros((len(unknowns), len(unknowns))), np.zeros(len(unknowns))
        for (i, j), k in unknowns.items():
            for (dy, dx), weight in ROAD_NEIGHBOURS:
                q = (i + dy, j + dx)
                if 0 <= q[0] < h and 0 <= q[1] < w:
                    a[k, k] += weight
                    if q in unknowns:
                        a[k, unknowns[q]] -= weight
                    else:
                        b[k] += weight * image[c][q]
        solution = np.linalg.solve(a, b)
        for (i, j), k in unknowns.items():
            result[c, i, j] = solution[k]
    return result


def test_one_removed_pixel_becomes_the_weighted_mean_of_its_neighbours():
    x = np.arange(3 * 5 * 5, dtype=np.float64).reshape(1, 3, 5, 5) ** 1.5
    removed = np.zeros((1, 5, 5), bool)
    removed[0, 2, 2] = True
    weights = dict(ROAD_NEIGHBOURS)  # the paper's: 1/6 sharing an edge, 1/12 sharing a corner
    assert weights == {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6,
                       (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}
    expected = sum(weight * x[0, :, 2 + dy, 2 + dx] for (dy, dx), weight in weights.items())  # weights sum to 1
    np.testing.assert_allclose(linear_imputation(x, removed)[0, :, 2, 2], expected, rtol=1e-12)


def test_a_linear_ramp_is_imputed_exactly_away_from_the_border():
    """The neighbour weights are symmetric, so a linear function is its own neighbour mean inside the image."""
    i, j = np.mgrid[:12, :10]
    x = np.stack([0.3 * i - 0.2 * j + 1, 0.1 * i + 0.05 * j, -i + 2. * j])[None]
    removed = np.zeros((1, 12, 10), bool)
    removed[0, 2:10, 3:8] = True
    removed[0, 5, 1] = True
    np.testing.assert_allclose(linear_imputation(x, removed), x, atol=1e-12)


@pytest.mark.parametrize('shape', [(7, 6), (6, 7)])  # rows as blocks, and columns (the shorter side)
def test_imputation_equals_a_dense_solve_of_its_equations_border_pixels_included(shape, monkeypatch):
    rng = np.random.RandomState(0)
    x = rng.rand(3, 3, *shape)
    removed = rng.rand(3, *shape) < 0.6
    removed[:, 0, :] = True  # a whole border row
    removed[2] = True
    removed[2, 3, 4] = False  # a single kept pixel
    monkeypatch.setattr('sgrad.metrics.IMPUTATION_BYTES', 1)  # one image per group, groups on every core
    result = linear_imputation(x, removed)
    for k in range(3):
        np.testing.assert_allclose(result[k], dense_imputation(x[k], removed[k]), rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(result[~np.broadcast_to(removed[:, None], x.shape)],
                                  x[~np.broadcast_to(removed[:, None], x.shape)])


def test_imputed_real_images_satisfy_the_neighbour_mean_equations():
    """Real CIFAR-10 images, half their pixels removed in one 16x16 hole and at random: every removed pixel
    equals the weighted mean of its neighbours (removed ones included) to 1e-12."""
    images, _ = load_test_images(0, 4)
    rng = np.random.RandomState(1)
    removed = rng.rand(4, 32, 32) < 0.35
    removed[:, 8:24, 8:24] = True
    imputed = linear_imputation(images, removed)
    h, w = removed.shape[1:]
    for n, i, j in zip(*np.nonzero(removed)):
        pairs = [(weight, imputed[n, :, i + dy, j + dx]) for (dy, dx), weight in ROAD_NEIGHBOURS
                 if 0 <= i + dy < h and 0 <= j + dx < w]
        mean = sum(weight * value for weight, value in pairs) / sum(weight for weight, _ in pairs)
        np.testing.assert_allclose(imputed[n, :, i, j], mean, atol=1e-12)
    assert imputed[:, :, 12:20, 12:20].std() > 0.01  # the hole is filled from its surroundings, not flat


def test_noisy_imputation_adds_noise_to_the_removed_pixels_only():
    images, _ = load_test_images(0, 2)
    removed = np.zeros((2, 32, 32), bool)
    removed[:, ::2] = True
    plain, noisy = linear_imputation(images, removed), noisy_linear_imputation(images, removed, 0.05)
    difference = noisy - plain
    mask = np.broadcast_to(removed[:, None], images.shape)
    assert noisy.dtype == images.dtype
    np.testing.assert_allclose(difference[~mask], 0, atol=1e-7)
    assert difference[mask].std() == pytest.approx(0.05, rel=0.05)


def bright_square_probability(batch):
    """A 'model' whose class 0 is the mean brightness of the centre square (class 1 the rest)."""
    p = batch[:, :, 12:20, 12:20].mean(axis=(1, 2, 3))
    return np.stack([p, 1 - p], axis=1)


def test_road_removes_the_relevant_square_first_for_a_map_that_marks_it():
    images = np.zeros((2, 3, 32, 32), np.float32)
    images[:, :, 12:20, 12:20] = 1
    square_map = images[:, 0].copy()
    curves = road_curves(bright_square_probability, images, square_map, np.zeros(2, int), noise=0.)
    assert curves['MoRF'].shape == curves['LeRF'].shape == (2, 9)
    # the square is 1/16 of the image: from 10% on, MoRF has removed all of it and imputed it from black
    np.testing.assert_allclose(curves['MoRF'], 0, atol=1e-6)
    # LeRF removes black background, imputed black, until the square's turn (from 1 - 1/16 on)
    np.testing.assert_allclose(curves['LeRF'], 1, atol=1e-6)


def test_road_on_the_shipped_model_ranks_the_gradient_above_its_reverse():
    """Real images and the shipped CifarNet: removing the pixels the SmoothGrad-free gradient marks
    most relevant lowers the class probability more than removing those it marks least relevant."""
    model = load_model()
    images, labels = load_test_images(0, 8)
    engine = GradientEngine(model)
    maps = channel_sum_abs(Gradient(engine).attribute(images, labels))
    curves = road_curves(engine.probabilities, images, maps, labels, fractions=(0.2, 0.5))
    assert curves['MoRF'].mean() < curves['LeRF'].mean()


def test_max_sensitivity_of_the_identity_is_the_largest_perturbation_drawn():
    x = np.random.RandomState(0).rand(3, 2, 4, 4)
    identity = lambda images: images
    streams = lambda: [np.random.RandomState([5, k]) for k in range(3)]
    largest = [max(np.linalg.norm(rng.uniform(-0.1, 0.1, x.shape[1:])) for _ in range(7)) for rng in streams()]
    absolute = max_sensitivity(identity, x, 0.1, 7, streams(), relative=False)
    np.testing.assert_allclose(absolute, largest, rtol=1e-12)
    relative = max_sensitivity(identity, x, 0.1, 7, streams())
    np.testing.assert_allclose(relative, largest / np.linalg.norm(x.reshape(3, -1), axis=1), rtol=1e-12)
    np.testing.assert_array_equal(max_sensitivity(identity, x, 0.1, 7, streams(), base=x), relative)  # maps given
    np.testing.assert_array_equal(max_sensitivity(lambda images: np.ones_like(images), x, 0.1, 3), 0)
    assert (absolute <= 0.1 * np.sqrt(32)).all()  # the corner of the ball
    # an image's draws do not depend on the images beside it
    np.testing.assert_array_equal(max_sensitivity(identity, x[1:], 0.1, 7, streams()[1:], relative=False),
                                  absolute[1:])


def test_infidelity_of_a_linear_model():
    """f(x) = <w, x>: its gradient w explains every perturbation exactly (infidelity 0); 2w only up to
    its scale, which normalize removes; unnormalized, 2w leaves E[(I.w)^2] on the same draws."""
    rng = np.random.RandomState(2)
    w, x = rng.randn(3, 5, 4), rng.rand(2, 3, 5, 4)
    scores = lambda batch: (batch * w).sum(axis=(1, 2, 3))
    gradient = np.broadcast_to(w, x.shape)
    for perturbation in INFIDELITY_PERTURBATIONS:
        np.testing.assert_allclose(infidelity(scores, x, gradient, perturbation, normalize=False), 0, atol=1e-20)
        np.testing.assert_allclose(infidelity(scores, x, 2 * gradient, perturbation), 0, atol=1e-20)
    draws = [0.1 * np.random.RandomState([7, k]).standard_normal((20, 3, 5, 4)) for k in range(2)]
    expected = [((draw * w).sum(axis=(1, 2, 3)) ** 2).mean() for draw in draws]
    streams = [np.random.RandomState([7, k]) for k in range(2)]
    np.testing.assert_allclose(infidelity(scores, x, 2 * gradient, 'gaussian', 0.1, 20, streams, normalize=False),
                               expected, rtol=1e-10)


def test_a_map_of_one_value_per_pixel_meets_the_same_draws_as_an_attribution_per_value():
    """f(x) = sum over channels and pixels of v * x: a 2-D map v is v for each of the pixel's channels,
    its exact gradient, so it explains every perturbation, unscaled; and (N, H, W), (N, 1, H, W) and the
    map repeated over the channels score alike on the same draws."""
    rng = np.random.RandomState(3)
    v, x = rng.randn(5, 4), rng.rand(2, 3, 5, 4)
    scores = lambda batch: (batch * v).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(infidelity(scores, x, np.broadcast_to(v, (2, 5, 4)), normalize=False), 0, atol=1e-20)
    other = rng.randn(2, 5, 4)
    streams = lambda: [np.random.RandomState([8, k]) for k in range(2)]
    as_2d = infidelity(scores, x, other, 'noisy baseline', samples=10, rngs=streams())
    assert as_2d.min() > 0
    for same in (other[:, None], np.repeat(other[:, None], 3, axis=1)):
        np.testing.assert_allclose(infidelity(scores, x, same, 'noisy baseline', samples=10, rngs=streams()), as_2d,
                                   rtol=1e-12)


def test_the_noisy_baseline_is_drawn_as_the_authors_code_draws_it():
    """Yeh et al.'s set_zero_infid ('Gaussian') written out value by value: randd = z * 0.2 + x, then
    min(x, randd), then max(x - 1, randd), and the model sees x - randd: a noisy black image in [0, 1]."""
    images, _ = load_test_images(0, 2)
    x = images[1].astype(np.float64)
    ours = noisy_baseline_perturbations(x, 3, np.random.RandomState(4))
    z = np.random.RandomState(4).normal(size=(3,) + x.shape)
    theirs = np.empty_like(ours)
    for s in range(3):
        for index in np.ndindex(x.shape):
            randd = z[(s,) + index] * 0.2 + x[index]
            randd = min(x[index], randd)
            theirs[(s,) + index] = max(x[index] - 1, randd)
    np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)
    perturbed = x - ours
    assert perturbed.min() >= 0 and perturbed.max() <= 1
    assert perturbed.mean() < 0.1 < x.mean()  # nearly black, whatever the image
    assert (perturbed == 0).mean() == pytest.approx(0.5, abs=0.02)  # the clipped half of the draws


@pytest.fixture(scope='module')
def real_infidelity_terms():
    """The shipped CifarNet's logits on 16 real test images for their predicted classes, and infidelity's terms
    of a zero map and of independent noise maps of each kind (one value per input value, one per pixel, one
    channel), under both perturbations, 50 draws."""
    model = load_model()
    images, _ = load_test_images(0, 16)
    engine = GradientEngine(model)
    targets = engine.probabilities(images).argmax(axis=1)
    scores = lambda batch: engine.objective_values(batch, np.tile(targets, len(batch) // len(images)))
    noise = np.random.RandomState(5)
    maps = {'zero': np.zeros(images.shape), 'random per value': noise.randn(*images.shape),
            'random per pixel': noise.randn(16, 32, 32), 'random, one channel': noise.randn(16, 1, 32, 32)}
    return {(perturbation, name): infidelity_terms(scores, images, m, perturbation, None, 50,
                                                   [np.random.RandomState([9, k]) for k in range(16)])
            for perturbation in INFIDELITY_PERTURBATIONS for name, m in maps.items()}


def mean_and_error(values):
    return values.mean(), values.std() / np.sqrt(len(values))


@pytest.mark.parametrize('perturbation', list(INFIDELITY_PERTURBATIONS))
def test_every_kind_of_map_meets_the_same_perturbations(real_infidelity_terms, perturbation):
    """Real images: every map is scored against the very same draws and score drops, whatever its kind
    (drawing one value per pixel for 2-D maps made a zero map score 12.1 instead of 8.4 and split the
    methods by kind, not by merit)."""
    drops = [real_infidelity_terms[perturbation, name][1] for name in ('zero', 'random per value',
                                                                       'random per pixel', 'random, one channel')]
    for other in drops[1:]:
        np.testing.assert_array_equal(other, drops[0])


def test_a_zero_map_and_noise_maps_score_the_same_under_small_gaussian_noise(real_infidelity_terms):
    """Real images, the small Gaussian noise: a map of independent noise, of any kind, explains nothing, so it
    scores as the zero map within their standard errors, and image by image within the 1/50 that the optimal
    scale fits of 50 draws by chance."""
    zero = infidelity_score(*real_infidelity_terms['gaussian', 'zero'])
    zero_mean, zero_error = mean_and_error(zero)
    assert zero_mean > 1  # the logits move: not a comparison of zeros
    for name in ('random per value', 'random per pixel', 'random, one channel'):
        score = infidelity_score(*real_infidelity_terms['gaussian', name])
        mean, error = mean_and_error(score)
        assert abs(mean - zero_mean) < error + zero_error, name
        assert 0.9 < (score / zero).mean() <= 1, name


def test_the_noisy_baseline_is_fitted_by_any_map_once_optimally_scaled(real_infidelity_terms):
    """Real images, the authors' noisy baseline: x - I is nearly black on every draw, so the drop f(x) - f(x - I)
    is nearly the same on every draw and the optimal scale fits it with any map whose I . Phi is nearly
    constant: a map of noise explains most of it (what the README's reading of that column rests on);
    unscaled, the paper's definition, it does not."""
    zero = infidelity_score(*real_infidelity_terms['noisy baseline', 'zero'])
    for name in ('random per value', 'random per pixel', 'random, one channel'):
        dots, drops = real_infidelity_terms['noisy baseline', name]
        assert (infidelity_score(dots, drops) / zero).mean() < 0.5, name
        assert (infidelity_score(dots, drops, normalize=False) / zero).mean() > 1, name


def yeh_infidelity(pdt, pdt_rm, rand, exp):
    """The estimator of Yeh et al.'s get_exp_infid for one image, written out: exp_sum = sum(rand * exp) per draw,
    beta = mean(pdt_diff * exp_sum) / mean(exp_sum^2), infid = mean((pdt_diff - beta * exp_sum)^2)."""
    pdt_diff = [pdt - value for value in pdt_rm]
    exp_sum = [float(np.sum(r * exp)) for r in rand]
    beta = np.mean([d * e for d, e in zip(pdt_diff, exp_sum)]) / np.mean([e * e for e in exp_sum])
    return np.mean([(d - beta * e) ** 2 for d, e in zip(pdt_diff, exp_sum)])


def test_infidelity_equals_the_authors_estimator_on_real_images(shipped_gradients):
    """The shipped model's gradient x input on real images, the noisy baseline: our infidelity equals
    Yeh et al.'s estimator (its optimal scaling included) computed image by image on the same draws."""
    model, engine, images, targets, gradient = shipped_gradients
    attribution = gradient.attribute(images, targets) * images
    streams = lambda: [np.random.RandomState([13, k]) for k in range(len(images))]
    scores = lambda batch: engine.objective_values(batch, np.tile(targets, len(batch) // len(images)))
    ours = infidelity(scores, images, attribution, 'noisy baseline', 0.2, 12, streams())
    for k, (x, rng) in enumerate(zip(images, streams())):
        rand = noisy_baseline_perturbations(x, 12, rng)
        pdt = engine.objective_values(x[None], targets[k])[0]
        pdt_rm = engine.objective_values((x - rand).astype(np.float32), targets[k])
        assert ours[k] == pytest.approx(yeh_infidelity(pdt, pdt_rm, rand, attribution[k]), rel=1e-6)


def test_gini_of_known_maps():
    maps = np.array([np.full((2, 2), 3.), [[0, 0], [0, -5.]], [[0, 0], [1, 3.]], np.zeros((2, 2))])
    np.testing.assert_allclose(gini(maps), [0, 1 - 1 / 4, 0.625, 0], atol=1e-12)
    np.testing.assert_allclose(gini(7 * maps), gini(maps), atol=1e-12)


def captum_or_skip():
    torch = pytest.importorskip('torch', reason='optional peer check: pip install torch==2.13.0')
    metrics = pytest.importorskip('captum.metrics', reason='optional peer check: pip install captum')
    return torch, metrics


@pytest.fixture(scope='module')
def shipped_gradients():
    """The shipped CifarNet, six real test images, their predicted classes and gradient attributions."""
    model = load_model()
    images, _ = load_test_images(0, 6)
    engine = GradientEngine(model)
    targets = engine.probabilities(images).argmax(axis=1)
    return model, engine, images, targets, Gradient(engine)


def test_max_sensitivity_equals_captums_on_real_images(shipped_gradients):
    """captum.metrics.sensitivity_max, given the very perturbations our per-image streams draw, on the
    shipped model's gradient maps of real images: the same relative max-sensitivity."""
    torch, captum_metrics = captum_or_skip()
    _, _, images, targets, gradient = shipped_gradients
    samples, radius = 5, 0.02
    streams = lambda: [np.random.RandomState([11, k]) for k in range(len(images))]
    # ours draws sample by sample, each image from its own stream; Captum wants them image by image
    draws = [[rng.uniform(-radius, radius, images.shape[1:]) for _ in range(samples)] for rng in streams()]
    deltas = np.asarray(draws).astype(images.dtype).reshape((-1,) + images.shape[1:])

    def explain(x):  # (B, C, H, W) -> |map| (B, H, W), each copy explained for its image's class
        return channel_sum_abs(gradient.attribute(x, np.repeat(targets, len(x) // len(targets))))
    ours = max_sensitivity(explain, images, radius, samples, streams())
    theirs = captum_metrics.sensitivity_max(
        lambda x: (torch.from_numpy(explain((x[0] if isinstance(x, tuple) else x).numpy())),),  # tuples in and out
        torch.from_numpy(images),
        perturb_func=lambda x, _: x + torch.from_numpy(deltas), perturb_radius=radius, n_perturb_samples=samples)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5)
    assert ours.min() > 0.05  # gradients of a ReLU network move: not a comparison of zeros


@pytest.mark.parametrize('perturbation', list(INFIDELITY_PERTURBATIONS))
@pytest.mark.parametrize('per_pixel', [False, True])
def test_infidelity_equals_captums_on_real_images(shipped_gradients, per_pixel, perturbation):
    """captum.metrics.infidelity (normalize=True and False), given the very perturbations our per-image
    streams draw (small Gaussian noise, or the authors' noisy baseline), on the shipped model's logits and
    gradient x input attributions of real images or their |map| (one value per pixel: Captum gets it
    repeated over the channels)."""
    torch, captum_metrics = captum_or_skip()
    model, engine, images, targets, gradient = shipped_gradients
    samples = 8
    draw, sd = INFIDELITY_PERTURBATIONS[perturbation]
    attribution = gradient.attribute(images, targets) * images
    n = len(images)
    streams = lambda: [np.random.RandomState([12, k]) for k in range(n)]
    perturbations = np.stack([draw(x, samples, rng, sd) for x, rng in zip(images, streams())])  # image by image
    perturbations = perturbations.reshape((-1,) + images.shape[1:])
    phi = channel_sum_abs(attribution) if per_pixel else attribution
    captum_phi = np.broadcast_to(phi[:, None], images.shape) if per_pixel else phi

    def logits(x):
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            return torch.from_numpy(model(x.numpy()).array.astype(np.float64))
    scores = lambda batch: engine.objective_values(batch, np.tile(targets, len(batch) // n))
    for normalize in (True, False):
        ours = infidelity(scores, images, phi, perturbation, sd, samples, streams(), normalize=normalize)
        theirs = captum_metrics.infidelity(
            logits, lambda x: (torch.from_numpy(perturbations.copy()),
                               torch.from_numpy((x.numpy() - perturbations).astype(images.dtype))),
            torch.from_numpy(images), torch.from_numpy(np.ascontiguousarray(captum_phi, np.float64)),
            target=torch.from_numpy(targets.astype(np.int64)), n_perturb_samples=samples, normalize=normalize)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5)
        assert ours.min() > 0
