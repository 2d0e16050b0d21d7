"""This project's batched methods against Google PAIR's ``saliency`` library (the SmoothGrad authors'), PAIR's
methods driven through sgrad.pair's adapter over the same engine, on real CIFAR-10 test images with the
shipped CifarNet and on a photograph with EfficientNet-Lite0. PAIR computes one image at a time, a few path
points per call; ours many images and steps per batch: the engine gives an image the same gradient in a batch
of any size (tests/test_batch_invariance.py), so the two differ by the methods' arithmetic alone."""
import numpy as np
import pytest

from conftest import relative_difference, within
from model import load_model
from sgrad.data import PHOTOS_DIR, load_image_file, load_test_images
from sgrad.pair import TARGET, call_model_function, from_pair, to_pair
from sgrad.paths import BlurIG, GuidedIG
from sgrad.saliency import GradCAM, Gradient, GradientEngine, IntegratedGradients, SmoothGrad
from sgrad.xrai import XRAI

pytestmark = pytest.mark.numerical

pair = pytest.importorskip('saliency.core', reason="PAIR's saliency is in requirements.txt: sh setup.sh")


def close(ours, theirs, rtol=1e-5):
    """Equal to ``rtol`` of the reference map's largest value, and not a comparison of zeros."""
    assert np.abs(theirs).max() > 0
    assert within(relative_difference(ours, theirs), rtol)


@pytest.fixture(scope='module')
def cifar():
    """The shipped CifarNet's engine, 3 real test images and their predicted classes."""
    engine = GradientEngine(load_model())
    images, _ = load_test_images(0, 3)
    return engine, images, engine.probabilities(images).argmax(axis=1)


@pytest.fixture(scope='module')
def photograph():
    """EfficientNet-Lite0's engine, a 224x224 photograph and its predicted class."""
    from sgrad.efficientnet import load_efficientnet_lite0
    engine = GradientEngine(load_efficientnet_lite0())
    image, _ = load_image_file('%s/chelsea.png' % PHOTOS_DIR, 224)
    return engine, image[None], engine.probabilities(image[None]).argmax(axis=1)


def pair_masks(engine, images, targets, method, **kwargs):
    """PAIR's ``method`` (a saliency.core class) image by image through the adapter, in our layout."""
    call = call_model_function(engine)
    return np.stack([from_pair(method().GetMask(to_pair(x), call, {TARGET: t}, **kwargs))
                     for x, t in zip(images, targets)])


@pytest.mark.cross_check('integrated_gradients', against=('saliency',))
@pytest.mark.parametrize('case', ['cifar', 'photograph'])
def test_integrated_gradients_equal_pair_s_with_its_rule_for_the_path_points(case, request):
    """PAIR puts its m points at k / (m - 1), both ends included, and divides by m; ours by default at
    (k + 1/2) / m. With PAIR's rule selected ours equals PAIR's; the two rules differ by more than that."""
    engine, images, targets = request.getfixturevalue(case)
    steps = 16 if case == 'cifar' else 6
    theirs = pair_masks(engine, images, targets, pair.IntegratedGradients, x_steps=steps, batch_size=steps)
    close(IntegratedGradients(engine, steps, points='linspace').attribute(images, targets), theirs)
    midpoint = IntegratedGradients(engine, steps).attribute(images, targets)
    assert np.abs(midpoint - theirs).max() > 1e-3 * np.abs(theirs).max()


@pytest.mark.cross_check('blur_ig', against=('saliency',))
@pytest.mark.parametrize('case', ['cifar', 'photograph'])
def test_blur_ig_equals_pair_s(case, request):
    engine, images, targets = request.getfixturevalue(case)
    steps = 20 if case == 'cifar' else 5
    for sqrt in (False, True):
        # PAIR weighs a batch of steps by the last step's sigma difference: right for sqrt only one step a call
        theirs = pair_masks(engine, images, targets, pair.BlurIG, steps=steps, sqrt=sqrt,
                            batch_size=steps if not sqrt else 1)
        close(BlurIG(engine, steps, max_sigma=50, sqrt=sqrt).attribute(images, targets), theirs)


def test_blur_ig_adds_up_to_the_score_change_from_the_blurred_image(cifar):
    """Completeness, the better the more steps (a left Riemann sum): within 5% at 200 steps on real images,
    closer than at 50. The default largest blur at 32x32 is 50 * 32 / 224 pixels."""
    engine, images, targets = cifar
    assert BlurIG(engine).sigmas(images)[-1] == pytest.approx(50 * 32 / 224)
    errors = {}
    for steps in (50, 200):
        method = BlurIG(engine, steps)
        for i, (x, t, attribution) in enumerate(zip(images, targets, method.attribute(images, targets))):
            total, difference = method.completeness(x, t, attribution)
            assert abs(difference) > 1
            errors[steps, i] = abs(total - difference) / abs(difference)
    assert max(errors[200, i] for i in range(3)) < 0.05
    assert sum(errors[200, i] for i in range(3)) < sum(errors[50, i] for i in range(3))


@pytest.mark.cross_check('guided_ig', against=('saliency',))
@pytest.mark.parametrize('case', ['cifar', 'photograph'])
def test_guided_ig_equals_pair_s(case, request):
    """PAIR's path is sequential, one gradient a call; ours steps every image together."""
    engine, images, targets = request.getfixturevalue(case)
    steps = 40 if case == 'cifar' else 6
    theirs = pair_masks(engine, images, targets, pair.GuidedIG, x_steps=steps)
    close(GuidedIG(engine, steps).attribute(images, targets), theirs)


@pytest.mark.cross_check('xrai', against=('saliency',))
@pytest.mark.parametrize('case', ['cifar', 'photograph'])
def test_xrai_equals_pair_s(case, request):
    engine, images, targets = request.getfixturevalue(case)
    steps = 10 if case == 'cifar' else 3
    call = call_model_function(engine)
    for x, t, ours in zip(images, targets, XRAI(engine, steps).attribute(images, targets)):
        theirs = pair.XRAI().GetMask(to_pair(x), call, {TARGET: t}, batch_size=steps,
                                     extra_parameters=pair.XRAIParameters(steps=steps))
        close(ours[0], theirs)
        assert len(np.unique(theirs)) > 3  # regions of different densities: not a flat map


@pytest.mark.cross_check('gradcam', against=('saliency',))
def test_gradcam_equals_pair_s_at_the_layer_s_resolution(cifar):
    """The 4x4 maps of `res3` are equal. Resized to the image the conventions differ: PAIR divides the map by its
    maximum and resizes with scikit-image (bilinear, the border mirrored); ours keeps the score's units and
    interpolates as PIL and OpenCV do (the border pixels take the edge value). Inside the border ring of half a
    cell (4 pixels) the two resized maps agree up to that scale."""
    engine, images, targets = cifar
    call = call_model_function(engine)
    method = GradCAM(engine)
    for low, high, x, t in zip(method.layer_map(images, targets), method.attribute(images, targets), images, targets):
        close(low[0], pair.GradCam().GetMask(to_pair(x), call, {TARGET: t}, should_resize=False, three_dims=False))
        theirs = pair.GradCam().GetMask(to_pair(x), call, {TARGET: t}, three_dims=False)
        close((high[0] / low.max())[4:-4, 4:-4], theirs[4:-4, 4:-4])
        assert np.abs(high[0] / low.max() - theirs).max() > 1e-3  # the border: a convention, not an error


@pytest.mark.cross_check('smoothgrad', against=('saliency',))
@pytest.mark.parametrize('aggregate, magnitude', [('squared', True), ('mean', False)])
def test_smoothgrad_equals_pair_s_get_smoothed_mask_on_the_same_noise(cifar, monkeypatch, aggregate, magnitude):
    """PAIR's GetSmoothedMask (magnitude: the mean of squared gradients, SmoothGrad^2; else their mean), given
    the very noise our stream draws (PAIR draws from np.random, channels-last, one sample at a time)."""
    engine, images, targets = cifar
    x, t, samples, noise = images[0], targets[0], 10, 0.15
    ours = SmoothGrad(Gradient(engine), noise, samples, aggregate, np.random.RandomState(3))(x, t)
    sigma = noise * (x.max() - x.min())
    draws = iter(to_pair(np.random.RandomState(3).normal(0., sigma, (samples,) + x.shape).astype(np.float32)))
    monkeypatch.setattr(pair.base.np.random, 'normal', lambda loc, scale, size: next(draws))
    theirs = from_pair(pair.GradientSaliency().GetSmoothedMask(
        to_pair(x), call_model_function(engine), {TARGET: t}, stdev_spread=noise, nsamples=samples,
        magnitude=magnitude))
    close(ours, theirs)


def test_xrai_refuses_images_too_small_or_flat_to_segment(cifar):
    from sgrad.errors import InputError
    engine, images, targets = cifar
    with pytest.raises(InputError, match='at least 50 pixels'):
        XRAI(engine, 2).attribute(images[:, :, :6, :6].copy(), targets)
    with pytest.raises(InputError, match='one colour'):
        XRAI(engine, 2).attribute(np.full_like(images[:1], 0.5), targets[:1])
