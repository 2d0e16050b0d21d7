"""The evaluation's measures against independent implementations, on the shipped model's maps of real CIFAR-10
test images: Spearman against scipy, SSIM against scikit-image, the deletion area against RISE's ``auc``, and
(optional peer checks, skipped with their reason where absent) ROAD's imputation, max-sensitivity and the Gini
index against Quantus 0.6. Captum's max-sensitivity and infidelity are in test_road_and_robustness.py."""
import numpy as np
import pytest

from model import load_model
from sgrad.data import load_test_images
from sgrad.metrics import (area_under_curve, gini, linear_imputation, max_sensitivity, perturbation_curves,
                           spearman, ssim)
from sgrad.saliency import Gradient, GradientEngine, SmoothGrad, channel_sum_abs

QUANTUS_REASON = ('optional peer check: Quantus 0.6 asks for NumPy 2, so install it beside the project without its '
                  'dependencies: pip install --no-deps --target DIR quantus==0.6.0 && pip install pandas '
                  'opencv-python-headless scikit-learn "numpy<2", then PYTHONPATH=DIR pytest')


@pytest.fixture(scope='module')
def real_maps():
    """The shipped CifarNet, 8 real test images, their predicted classes, and two kinds of map: the gradient's
    |map| (speckled) and SmoothGrad's (smooth, N=10)."""
    model = load_model()
    images, _ = load_test_images(0, 8)
    engine = GradientEngine(model)
    targets = engine.probabilities(images).argmax(axis=1)
    gradient = Gradient(engine)
    smooth = SmoothGrad(gradient, 0.1, 10, rng=np.random.RandomState(0))
    maps = {'gradient': channel_sum_abs(gradient.attribute(images, targets)),
            'smoothgrad': channel_sum_abs(smooth.attribute(images, targets))}
    return engine, images, targets, maps


def test_spearman_and_ssim_equal_scipy_and_scikit_image(real_maps):
    stats = pytest.importorskip('scipy.stats', reason='scipy comes with scikit-image (requirements.txt)')
    metrics = pytest.importorskip('skimage.metrics', reason='scikit-image is in requirements.txt')
    _, _, _, maps = real_maps
    a, b = maps['gradient'], maps['smoothgrad']
    for x, y in zip(a, b):
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x.ravel(), y.ravel())[0], abs=1e-12)
        # ours: each map scaled to [0, 1], the mean over all 7x7 windows inside the map, population variances
        scaled = [(m - m.min()) / (m.max() - m.min()) for m in (x.astype(np.float64), y.astype(np.float64))]
        theirs = metrics.structural_similarity(*scaled, win_size=7, data_range=1., use_sample_covariance=False)
        assert ssim(x, y) == pytest.approx(theirs, abs=1e-12)
    assert 0.1 < np.mean([spearman(x, y) for x, y in zip(a, b)]) < 0.9  # different maps: not a comparison of equals


def rise_auc(arr):
    """RISE's evaluation.auc (Petsiuk et al.'s code), written out: the trapezoid rule over [0, 1]."""
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


def test_deletion_area_equals_rise_s_auc(real_maps):
    engine, images, targets, maps = real_maps
    curves = perturbation_curves(engine, images, maps['smoothgrad'], targets, steps=8)['deletion'].astype(np.float64)
    np.testing.assert_allclose(area_under_curve(curves), [rise_auc(curve) for curve in curves], rtol=1e-12)


def quantus_or_skip():
    return pytest.importorskip('quantus', reason=QUANTUS_REASON)


def test_road_imputation_equals_quantus_s_sparse_solve(real_maps):
    """Quantus's noisy_linear_imputation (the ROAD authors' sparse solve) without its noise, on real images with
    a SmoothGrad map's most relevant 30% and a random 50% of the pixels removed."""
    quantus = quantus_or_skip()
    _, images, _, maps = real_maps
    order = np.argsort(-maps['smoothgrad'].reshape(len(images), -1), axis=1, kind='stable')
    for fraction, orders in ((0.3, order), (0.5, np.argsort(np.random.RandomState(1).rand(len(images), 1024)))):
        removed = np.zeros((len(images), 1024), bool)
        np.put_along_axis(removed, orders[:, :int(fraction * 1024)], True, axis=1)
        ours = linear_imputation(images, removed.reshape(-1, 32, 32))
        for image, mask, mine in zip(images, removed, ours):
            theirs = quantus.functions.perturb_func.noisy_linear_imputation(
                image.astype(np.float64), np.flatnonzero(mask), noise=0.)
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-12)


def test_max_sensitivity_equals_quantus_s(real_maps):
    """Quantus's MaxSensitivity (Frobenius norms, the difference of the maps, the largest over the draws), given
    the very draws our per-image streams make, on the gradient's |map| of real images."""
    quantus = quantus_or_skip()
    engine, images, targets, _ = real_maps
    samples, radius = 4, 0.02
    streams = lambda: [np.random.RandomState([21, k]) for k in range(len(images))]
    draws = iter(np.stack([[rng.uniform(-radius, radius, images.shape[1:]) for _ in range(samples)]
                           for rng in streams()], axis=1))  # (samples, N, C, H, W): one batch of draws a step
    explain = lambda x: channel_sum_abs(Gradient(engine).attribute(x.astype(np.float32), targets))
    ours = max_sensitivity(explain, images, radius, samples, streams())
    metric = quantus.MaxSensitivity(nr_samples=samples, normalise=False, abs=False, disable_warnings=True,
                                    return_nan_when_prediction_changes=False,
                                    perturb_func=lambda arr, **_: arr + next(draws).reshape(arr.shape))
    metric.explain_batch = lambda model, x, y: explain(x)
    theirs = metric.evaluate_batch(model=None, x_batch=images, y_batch=targets, a_batch=explain(images))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours.min() > 0.05


def test_gini_equals_quantus_s_sparseness(real_maps):
    """Quantus's Sparseness adds 1e-7 to every value before its Gini index; given the maps less 1e-7, it
    computes ours."""
    quantus = quantus_or_skip()
    _, images, _, maps = real_maps
    for kind, m in maps.items():
        theirs = quantus.Sparseness(disable_warnings=True).evaluate_batch(x_batch=images, a_batch=m - 1e-7)
        np.testing.assert_allclose(gini(m), theirs, rtol=1e-6, err_msg=kind)
