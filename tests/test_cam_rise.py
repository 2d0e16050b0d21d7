"""Grad-CAM++ and Score-CAM (sgrad/cam.py) and RISE (sgrad/rise.py) against plainly written NumPy
references, on the shipped CifarNet with real CIFAR-10 test images and on EfficientNet-Lite0 with one
photograph; with pytorch-grad-cam installed (optional), against it on CifarNet's PyTorch port."""
import importlib.util
import os
import sys
import types

import chainer
import numpy as np
import pytest
from skimage.transform import resize

from conftest import relative_difference, torch_cifarnet, within
from model import load_model
from sgrad.errors import InputError
from sgrad.cam import GradCAMPlusPlus, ScoreCAM, unit_range
from sgrad.data import PHOTOS_DIR, load_image_file, load_test_images
from sgrad.efficientnet import IMAGE_SIZE, load_efficientnet_lite0
from sgrad.rise import RISE
from sgrad.saliency import GradientEngine, upsample

pytestmark = pytest.mark.numerical

EGYPTIAN_CAT = 285  # the photograph chelsea.png's top-1 ImageNet class


@pytest.fixture(scope='module')
def cifarnet():
    return load_model()


@pytest.fixture(scope='module')
def cifar():
    """CIFAR-10 test images 0-2 (a cat, a ship, a ship) and their labels."""
    return load_test_images(0, 3)


@pytest.fixture(scope='module')
def photo_engine():
    """EfficientNet-Lite0's engine and the photograph chelsea.png (a cat), (1, 3, 224, 224)."""
    x, _ = load_image_file(os.path.join(PHOTOS_DIR, 'chelsea.png'), IMAGE_SIZE)
    return GradientEngine(load_efficientnet_lite0()), x[None]


def gradcam_plus_plus_reference(engine, xs, targets, layer):
    """The paper's formulas in float64, channel by channel, on each image's own layer_gradients pass."""
    maps = []
    for x, t in zip(xs, targets):
        feats, grads = (a[0].astype(np.float64) for a in engine.layer_gradients(x[None], t, layer))
        cam = np.zeros(feats.shape[1:])
        for A, g in zip(feats, grads):
            denominator = 2 * g ** 2 + A.sum() * g ** 3
            alpha = np.zeros_like(g)
            alpha[denominator != 0] = g[denominator != 0] ** 2 / denominator[denominator != 0]
            cam += (alpha * np.maximum(g, 0)).sum() * A
        maps.append(upsample(np.maximum(cam, 0), x.shape[-2:]))
    return np.stack(maps)[:, None]


def score_cam_reference(engine, xs, targets, layer):
    """Score-CAM image by image and channel by channel, each masked image scored on its own."""
    maps = []
    for x, t in zip(xs, targets):
        feats = engine.layer_gradients(x[None], t, layer)[0][0]
        scores = []
        for A in feats:
            up = upsample(A, x.shape[-2:])
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else np.zeros_like(up)
            scores.append(engine.objective_values((x * mask)[None], t)[0])
        weights = np.exp(np.array(scores, np.float64) - max(scores))
        weights /= weights.sum()
        cam = sum(w * A for w, A in zip(weights, feats.astype(np.float64)))
        maps.append(upsample(np.maximum(cam, 0), x.shape[-2:]))
    return np.stack(maps)[:, None]


def rise_reference(engine, x, target, masks, p, fill=(0., 0., 0.)):
    """RISE of one image, one mask at a time, masked pixels taking the colour ``fill``."""
    total = np.zeros(x.shape[-2:], np.float64)
    for mask in masks:
        masked = np.stack([channel * mask + colour * (1 - mask) for channel, colour in zip(x, fill)])
        total += engine.probabilities(masked[None].astype(np.float32))[0, target] * mask
    return total / (len(masks) * p)


def recording_masks(rise, monkeypatch):
    """The list that every chunk of masks ``rise`` draws from now on is appended to."""
    drawn, draw = [], rise.draw_masks
    monkeypatch.setattr(rise, 'draw_masks',
                        lambda rng, count, size: drawn.append(draw(rng, count, size)) or drawn[-1])
    return drawn


class BatchSizes(chainer.LinkHook):
    """Records how many images each call of the model ``link`` gets."""

    name = 'BatchSizes'

    def __init__(self, link):
        self.link, self.sizes = link, []

    def forward_preprocess(self, args):
        if args.link is self.link:
            self.sizes.append(len(args.args[0]))


@pytest.mark.cross_check('gradcam_plus_plus')
@pytest.mark.parametrize('layer', [None, 'conv2'])
def test_gradcam_plus_plus_equals_the_papers_formulas(cifarnet, cifar, layer):
    """Default layer res3 (128 maps of 4x4) and conv2 (64 of 8x8), each image for its label."""
    xs, labels = cifar
    engine = GradientEngine(cifarnet)
    ours = GradCAMPlusPlus(engine, layer).attribute(xs, labels)
    assert ours.shape == (3, 1, 32, 32) and ours.dtype == np.float32 and (ours >= 0).all() and ours.max() > 0
    assert within(relative_difference(ours, gradcam_plus_plus_reference(engine, xs, labels, layer)), 1e-5)


@pytest.mark.cross_check('score_cam')
def test_score_cam_equals_masked_images_scored_one_at_a_time(cifarnet, cifar):
    """res3's 128 channels on two images, one target for both: the engine's 256 masked images go in chunks of 100."""
    xs = cifar[0][:2]
    engine = GradientEngine(cifarnet, batchsize=100)
    ours = ScoreCAM(engine).attribute(xs, 3)
    assert ours.shape == (2, 1, 32, 32) and ours.dtype == np.float32 and ours.max() > 0
    assert within(relative_difference(ours, score_cam_reference(engine, xs, [3, 3], None)), 1e-5)


def test_score_cam_masks_scale_each_channel_to_unit_range_and_a_constant_channel_to_zero():
    maps = np.array([[[3., 3.], [3., 3.]], [[-1., 3.], [0., 1.]]], np.float32)
    np.testing.assert_array_equal(unit_range(maps), [[[0, 0], [0, 0]], [[0, 1], [.25, .5]]])


@pytest.mark.cross_check('rise')
def test_rise_equals_a_loop_over_its_masks_and_explains_every_image_with_the_same_masks(cifarnet, cifar,
                                                                                        monkeypatch):
    xs, labels = cifar
    engine = GradientEngine(cifarnet, batchsize=32)
    rise = RISE(engine, masks=70)
    drawn = recording_masks(rise, monkeypatch)
    ours = rise.attribute(xs[:2], labels[:2])
    assert [len(m) for m in drawn] == [32, 32, 6]
    masks = np.concatenate(drawn)
    for x, label, attribution in zip(xs[:2], labels[:2], ours):
        assert within(relative_difference(attribution[0], rise_reference(engine, x, label, masks, 0.5)), 1e-5)
    np.testing.assert_array_equal(rise.attribute(xs[1:2], labels[1]), ours[1:])  # the same masks in every call
    filled = RISE(engine, masks=70, fill=cifarnet.MEAN_COLOUR).attribute(xs[:1], labels[0])  # as RISE's code
    reference = rise_reference(engine, xs[0], labels[0], masks, 0.5, cifarnet.MEAN_COLOUR)
    assert within(relative_difference(filled[0, 0], reference), 1e-5)
    assert relative_difference(filled[0, 0], ours[0, 0]) > 1e-2


@pytest.mark.parametrize('size, cells, expected_cells', [((32, 32), None, 4), ((224, 224), None, 7),
                                                         ((30, 45), 6, 6)])
def test_rise_masks_are_crops_of_bilinearly_upsampled_grids(cifarnet, size, cells, expected_cells):
    """As RISE's generate_masks: grid cells on with probability p, the grid upsampled to (s + 1) cells of
    ceil(side / s) pixels, cropped at a shift of 0 .. cell - 1. skimage's resize, order=1, with
    mode='edge' (the reference code's mode='reflect' differs in the grid's outer half cells)."""
    masks = RISE(GradientEngine(cifarnet), cells=cells, p=0.3).draw_masks(np.random.RandomState(1), 20, size)
    rng = np.random.RandomState(1)
    grids = (rng.random_sample((20, expected_cells, expected_cells)) < 0.3).astype(np.float32)
    cell = [-(-side // expected_cells) for side in size]
    shifts = rng.randint(0, cell, size=(20, 2))
    upsampled = [(expected_cells + 1) * c for c in cell]
    for mask, grid, (i, j) in zip(masks, grids, shifts):
        expected = resize(grid, upsampled, order=1, mode='edge', anti_aliasing=False)[i:i + size[0], j:j + size[1]]
        np.testing.assert_allclose(mask, expected, atol=1e-6)
    assert masks.shape == (20,) + size and masks.dtype == np.float32
    assert 0.2 < masks.mean() < 0.4 and masks.min() == 0 and masks.max() == 1


def test_the_engine_never_sees_more_images_than_its_batchsize(cifarnet, cifar, monkeypatch):
    """RISE: 70 masks in chunks of 32 for each of 3 images; Score-CAM: 3 x 128 masked images in chunks
    of 32, after one pass of the 3 images for the layer's output."""
    xs, labels = cifar
    engine = GradientEngine(cifarnet, batchsize=32)
    rise = RISE(engine, masks=70)
    drawn = recording_masks(rise, monkeypatch)
    with BatchSizes(engine.model) as calls:
        rise.attribute(xs, labels)
    assert max(calls.sizes) == 32 and sum(calls.sizes) == 3 * 70 and max(map(len, drawn)) == 32
    with BatchSizes(engine.model) as calls:
        ScoreCAM(engine).attribute(xs, labels)
    assert calls.sizes == [3] + [32] * 12


@pytest.mark.cross_check('gradcam_plus_plus', 'score_cam', 'rise')
def test_cams_and_rise_on_a_photograph(photo_engine, monkeypatch):
    """EfficientNet-Lite0, chelsea.png for 'Egyptian cat': Grad-CAM++ on the head (1280 maps of 7x7),
    Score-CAM on blocks/1 (24 maps of 56x56, in chunks of 10 at 224x224), RISE with its 7 cells of 32 pixels."""
    engine, x = photo_engine
    ours = GradCAMPlusPlus(engine).attribute(x, EGYPTIAN_CAT)
    assert within(relative_difference(ours, gradcam_plus_plus_reference(engine, x, [EGYPTIAN_CAT], None)), 1e-5)
    ours = ScoreCAM(engine, 'blocks/1').attribute(x, EGYPTIAN_CAT)
    assert within(relative_difference(ours, score_cam_reference(engine, x, [EGYPTIAN_CAT], 'blocks/1')), 1e-5)
    rise = RISE(engine, masks=12)
    drawn = recording_masks(rise, monkeypatch)
    ours = rise.attribute(x, EGYPTIAN_CAT)
    assert ours.shape == (1, 1, 224, 224) and [len(m) for m in drawn] == [10, 2]
    reference = rise_reference(engine, x[0], EGYPTIAN_CAT, np.concatenate(drawn), 0.5)
    assert within(relative_difference(ours[0, 0], reference), 1e-5)


@pytest.mark.parametrize('method', [GradCAMPlusPlus, ScoreCAM])
def test_a_cam_on_a_layer_that_is_not_convolutional_names_it(cifarnet, cifar, method):
    engine = GradientEngine(cifarnet)
    with pytest.raises(InputError) as error:
        method(engine, 'fc').attribute(cifar[0][:1], 3)
    assert str(error.value) == "link 'fc' returned shape (1, 10), not (N, C, h, w)"
    with pytest.raises(InputError, match="^the model has no link named 'res4'; it has: conv1, "):
        method(engine, 'res4').attribute(cifar[0][:1], 3)


def test_rise_without_masks(cifarnet):
    with pytest.raises(InputError) as error:
        RISE(GradientEngine(cifarnet), masks=0)
    assert str(error.value) == '--masks must be positive, got 0'


def torchvision_stand_in():
    """Modules under torchvision's names holding the names pytorch_grad_cam imports from it at import
    time, for helpers that these checks never call (preprocess_image, SESS, a detection target):
    PyPI's torchvision does not import beside this torch build. Each raises if called."""
    def absent(*args, **kwargs):
        raise ImportError('torchvision is not installed')
    names = ('torchvision', 'torchvision.transforms', 'torchvision.transforms.functional', 'torchvision.ops')
    modules = {name: types.ModuleType(name) for name in names}
    for name in ('Compose', 'Normalize', 'ToTensor'):
        setattr(modules['torchvision.transforms'], name, absent)
    modules['torchvision.transforms.functional'].resize = absent
    modules['torchvision.ops'].box_iou = absent
    return modules


@pytest.fixture
def grad_cam_peer(cifarnet, monkeypatch):
    """pytorch_grad_cam, torch and CifarNet's PyTorch port with the same weights (benchmarks/bench_peer.py)."""
    torch, net = torch_cifarnet(cifarnet, monkeypatch)
    if importlib.util.find_spec('torchvision') is None:
        for name, module in torchvision_stand_in().items():
            monkeypatch.setitem(sys.modules, name, module)
    cams = pytest.importorskip('pytorch_grad_cam', reason='optional peer check: pip install --no-deps '
                                                          'grad-cam==1.5.7 ttach')
    return cams, torch, net


def as_pytorch_grad_cam_scales(ours, feats, weights):
    """Our map scaled as pytorch-grad-cam scales its maps: ReLU(sum_k w_k A_k) min-max scaled before the
    bilinear resize, which is linear and keeps constants, so the same as our map scaled by those two."""
    low = np.maximum(np.einsum('nchw,nc->nhw', feats, weights), 0)[:, None]
    return (ours - low.min(axis=(2, 3), keepdims=True)) / np.ptp(low, axis=(2, 3), keepdims=True)


@pytest.mark.cross_check('gradcam_plus_plus', against=('grad-cam', 'torch'))
def test_gradcam_plus_plus_against_pytorch_grad_cam(cifarnet, cifar, grad_cam_peer):
    """pytorch-grad-cam adds 1e-6 to alpha's denominator, which moves its weights by ~5e-3 here (gradients
    down to 1e-4). Fed A / 1000 and g * 1000, its code returns 1000 times the weights of the formula with
    1e-12 in place of that 1e-6: so scaled, it gives ours, and so does its low-resolution map."""
    cams, torch, net = grad_cam_peer
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    xs, labels = cifar
    feats, grads = GradientEngine(cifarnet).layer_gradients(xs, labels)
    weights = GradCAMPlusPlus.weights(feats, grads)
    cam = cams.GradCAMPlusPlus(net, [net.body[-3]])  # res3, before the pooling and flattening
    theirs = cam(torch.from_numpy(xs), [ClassifierOutputTarget(int(t)) for t in labels])
    their_feats, their_grads = (a[0].numpy() for a in (cam.activations_and_grads.activations,
                                                       cam.activations_and_grads.gradients))
    assert relative_difference(feats, their_feats) < 1e-5 and relative_difference(grads, their_grads) < 1e-5
    assert relative_difference(weights, cam.get_cam_weights(None, None, None, their_feats, their_grads)) < 1e-2
    scaled = cam.get_cam_weights(None, None, None, their_feats / 1e3, their_grads * 1e3) / 1e3
    assert relative_difference(weights, scaled) < 1e-5
    ours = as_pytorch_grad_cam_scales(GradCAMPlusPlus(GradientEngine(cifarnet)).attribute(xs, labels), feats, weights)
    exact = cam.get_cam_image(None, None, None, their_feats / 1e3, their_grads * 1e3)
    assert within(relative_difference(ours[:, 0], scale_cam_image(np.maximum(exact, 0), (32, 32))), 1e-5)
    assert relative_difference(ours[:, 0], theirs) < 0.1  # their 1e-6 moves the scaled maps by a few %


@pytest.mark.cross_check('score_cam', against=('grad-cam', 'torch'))
def test_score_cam_against_pytorch_grad_cam(cifarnet, cifar, grad_cam_peer, monkeypatch):
    """Their masks are upsampled with UpsamplingBilinear2d, whose pixel grid is aligned at the corners;
    with the half-pixel grid of OpenCV, PIL and sgrad.saliency.upsample instead, the weights agree."""
    cams, torch, net = grad_cam_peer
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    xs, labels = cifar[0][:2], cifar[1][:2]
    engine = GradientEngine(cifarnet)
    feats = engine.layer_values(xs)
    weights = ScoreCAM(engine).weights(xs, labels, feats)
    cam = cams.ScoreCAM(net, [net.body[-3]])  # res3
    cam.batch_size = 128  # masked images per forward pass (their default, 16, only takes longer)
    xt, targets = torch.from_numpy(xs), [ClassifierOutputTarget(int(t)) for t in labels]
    with torch.no_grad():
        cam.activations_and_grads(xt)
    their_feats = cam.activations_and_grads.activations[0].numpy()
    assert relative_difference(feats, their_feats) < 1e-5
    assert relative_difference(weights, cam.get_cam_weights(xt, None, targets, their_feats, None)) > 0.1
    monkeypatch.setattr(torch.nn, 'UpsamplingBilinear2d',
                        lambda size: torch.nn.Upsample(size=size, mode='bilinear', align_corners=False))
    their_weights = cam.get_cam_weights(xt, None, targets, their_feats, None)
    assert relative_difference(weights, their_weights) < 1e-5
    ours = as_pytorch_grad_cam_scales(ScoreCAM(engine).attribute(xs, labels), feats, weights)
    theirs = (their_weights[:, :, None, None] * their_feats).sum(axis=1)  # their get_cam_image, on these weights
    assert within(relative_difference(ours[:, 0], scale_cam_image(np.maximum(theirs, 0), (32, 32))), 1e-5)
