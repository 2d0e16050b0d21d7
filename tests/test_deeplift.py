"""DeepLIFT (Rescale) and DeepLIFT-SHAP: against a reference written with dense matrices on small models of
standard links and of this project's nodes (ReLU, ReLU6, max and average pooling, a residual sum), and their
summation-to-delta on real images through the shipped CifarNet and EfficientNet-Lite0; and how DeepLIFT and
LRP refuse a function they have no rule for."""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from conftest import needs_cifar10, relative_difference, within
from model import load_model
from sgrad.activations import clipped_relu
from sgrad.data import load_image_file, load_test_images
from sgrad.deeplift import DeepLIFT, DeepLIFTSHAP
from sgrad.depthwise import depthwise_convolution
from sgrad.errors import InputError
from sgrad.lrp import LRP
from sgrad.saliency import GradientEngine, Gradient

pytestmark = pytest.mark.numerical

RNG = np.random.RandomState(0)


class SmallNet(chainer.Chain):
    """conv 3x3 -> ReLU (or ReLU6) -> 2x2 max pooling -> depthwise 3x3 + residual -> ReLU6 -> 2x2 average -> linear."""

    def __init__(self, relu6):
        super().__init__()
        self.relu6 = relu6
        with self.init_scope():
            self.conv = L.Convolution2D(3, 4, 3, pad=1, initialW=RNG.normal(0, 0.5, (4, 3, 3, 3)),
                                        initial_bias=RNG.normal(0, 0.2, 4))
            self.depthwise = chainer.Parameter(RNG.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32))
            self.fc = L.Linear(16, 3, initialW=RNG.normal(0, 0.5, (3, 16)), initial_bias=RNG.normal(0, 0.2, 3))

    def layers(self):
        """The network as its pieces, (kind, function) from the image on: kind 'linear', 'max' (2x2 max
        pooling) or the cap of a ReLU (inf for ReLU)."""
        cap = 6. if self.relu6 else np.inf
        activation = (lambda h: F.clipped_relu(h, cap)) if self.relu6 else F.relu
        return [('linear', self.conv), (cap, activation), ('max', lambda h: F.max_pooling_2d(h, 2)),
                ('linear', lambda h: h + depthwise_convolution(h, self.depthwise, pads=((1, 1), (1, 1)))),
                (6., lambda h: clipped_relu(h, 6.)), ('linear', lambda h: F.average_pooling_2d(h, 2)),
                ('linear', self.fc)]

    def forward(self, x):
        for _, layer in self.layers():
            x = layer(x)
        return x


def dense(function, x):
    """The Jacobian of a linear (affine) function at x, (outputs, inputs), column by column."""
    x = x.astype(np.float64)
    f = lambda v: function(chainer.Variable(v.astype(np.float32))).array.astype(np.float64).ravel()
    base = f(x)
    return np.stack([f(x + basis.reshape(x.shape)) - base for basis in np.eye(x.size)], axis=1)


def first_maxima(z):
    """The 0/1 matrix that picks each 2x2 window's first maximum (row by row) of z (1, C, H, W)."""
    _, c, h, w = z.shape
    index = np.arange(z.size).reshape(z.shape)[0]
    windows = z[0].reshape(c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)
    positions = index.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)
    picks = np.zeros((len(windows), z.size))
    picks[np.arange(len(windows)), positions[np.arange(len(windows)), windows.argmax(axis=1)]] = 1
    return picks


def reference_deeplift(net, x, x_ref, target):
    """DeepLIFT written out: the forward passes of x and x_ref layer by layer, then the multipliers as a
    product of matrices from the class score down: a linear layer's Jacobian, an activation's diagonal of
    (f(z) - f(z')) / (z - z'), a max pooling's split of the output difference at max(y, y') between the two
    maxima (Captum's rule); finally (x - x_ref) times the multipliers."""
    steps = []
    with chainer.using_config('train', False):
        for kind, layer in net.layers():
            y, y_ref = layer(x).array, layer(x_ref).array
            steps.append((kind, layer, x, x_ref, y, y_ref))
            x, x_ref = y, y_ref
    multipliers = np.eye(x.size)[target][None]          # d S_c / d logits, (1, classes)
    for kind, layer, z, z_ref, y, y_ref in reversed(steps):
        delta = (z - z_ref).astype(np.float64).ravel()
        if kind == 'linear':
            jacobian = dense(layer, z)
        elif kind == 'max':  # each output's difference, split at max(y, y'), to the positions of the two maxima
            own, other = first_maxima(z), first_maxima(z_ref)
            y64, y_ref64 = y.astype(np.float64).ravel(), y_ref.astype(np.float64).ravel()
            top = np.maximum(y64, y_ref64)
            split = own * (top - y_ref64)[:, None] + other * (y64 - top)[:, None]
            jacobian = np.where(delta == 0, own, split / np.where(delta == 0, 1, delta))
        else:  # a ReLU with cap ``kind``
            ratio = (y - y_ref).astype(np.float64).ravel() / np.where(delta == 0, 1, delta)
            slope = ((z > 0) & (z < kind)).ravel()
            jacobian = np.diag(np.where(delta == 0, slope, ratio))
        multipliers = multipliers @ jacobian
    return (steps[0][2] - steps[0][3]) * multipliers.reshape(steps[0][2].shape)


@pytest.mark.cross_check('deeplift')
@pytest.mark.parametrize('relu6', [False, True], ids=['ReLU', 'ReLU6'])
def test_deeplift_equals_the_dense_reference_on_a_small_model(relu6):
    net = SmallNet(relu6)
    xs = RNG.uniform(0, 1, (3, 3, 8, 8)).astype(np.float32) * 4 - 1
    baseline = RNG.uniform(0, 1, (3, 8, 8)).astype(np.float32)
    mine = DeepLIFT(GradientEngine(net), baseline=baseline).attribute(xs, 1)
    for x, attribution in zip(xs, mine):
        reference = reference_deeplift(net, x[None], baseline[None], 1)[0]
        assert within(relative_difference(attribution, reference), 1e-5)
    assert relative_difference(mine, Gradient(GradientEngine(net)).attribute(xs, 1) * (xs - baseline)) > 0.01


def assert_sums_to_delta(method, xs, targets, tolerance):
    maps = method.attribute(xs, targets)
    for x, target, attribution in zip(xs, targets, maps):
        total, difference = method.completeness(x, target, attribution)
        assert abs(total - difference) <= tolerance * max(abs(difference), 1), (total, difference)
    return maps


@pytest.fixture(scope='module')
def cifar():
    model = load_model()
    engine = GradientEngine(model)
    xs, _ = load_test_images(0, 8)
    return engine, xs, engine.probabilities(xs).argmax(axis=1)


@needs_cifar10
@pytest.mark.parametrize('baseline', ['black', 'grey', 'test image 100'])
def test_deeplift_sums_to_the_difference_of_scores_on_cifar10(cifar, baseline):
    """Summation-to-delta through CifarNet's convolutions, ReLUs, 2x2 max poolings, residual sums and global
    max pooling, on real test images: only the max pooling rule makes the sum exact."""
    engine, xs, targets = cifar
    image = {'black': None, 'grey': np.full(xs.shape[1:], 0.5, np.float32),
             'test image 100': load_test_images(100, 101)[0][0]}[baseline]
    maps = assert_sums_to_delta(DeepLIFT(engine, image), xs, targets, 1e-4)
    assert np.isfinite(maps).all()


@pytest.mark.cross_check('deeplift_shap')
@needs_cifar10
def test_deeplift_shap_is_the_mean_of_deeplift_over_its_baselines(cifar):
    engine, xs, targets = cifar
    baselines = load_test_images(100, 103)[0]
    shap = assert_sums_to_delta(DeepLIFTSHAP(engine, baselines), xs[:4], targets[:4], 1e-4)
    mean = np.mean([DeepLIFT(engine, b).attribute(xs[:4], targets[:4]) for b in baselines], axis=0)
    assert within(relative_difference(shap, mean), 1e-6)
    blurred = DeepLIFTSHAP(engine, samples=3)
    assert_sums_to_delta(blurred, xs[:2], targets[:2], 1e-4)
    assert blurred.passes(xs[0]) == (6, 0)


def test_deeplift_sums_to_the_difference_of_scores_on_a_photograph():
    """EfficientNet-Lite0 (ReLU6, depthwise convolutions, residual sums, global average pooling) on a
    photograph, from black and from its blur."""
    from sgrad.efficientnet import load_efficientnet_lite0
    from sgrad.paths import gaussian_blur
    x = load_image_file('data/photos/chelsea.png', 224)[0][None]
    engine = GradientEngine(load_efficientnet_lite0())
    target = engine.probabilities(x).argmax(axis=1)
    for baseline in (None, gaussian_blur(x, 20)[0]):
        assert_sums_to_delta(DeepLIFT(engine, baseline), x, target, 1e-3)


@pytest.mark.parametrize('method, name', [(DeepLIFT, 'DeepLIFT'), (LRP, 'LRP')])
def test_a_function_without_a_rule_is_an_error_naming_it_and_its_link(method, name):
    class Gate(chainer.Chain):
        def forward(self, h):
            return h * F.sigmoid(h)   # a product of two variables, as in squeeze-excite

    class Gated(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.gate = Gate()
                self.fc = L.Linear(12, 2)

        def forward(self, x):
            return self.fc(self.gate(F.reshape(x, (len(x), -1))))

    with pytest.raises(InputError, match="%s has no rule for Mul .* in link 'gate'" % name):
        method(GradientEngine(Gated())).attribute(RNG.uniform(0, 1, (2, 3, 2, 2)).astype(np.float32), 0)


def test_deeplift_explains_the_score_not_the_loss():
    """The loss's softmax cross-entropy lies outside the model's nodes: no rule, no summation-to-delta."""
    for method in (DeepLIFT, DeepLIFTSHAP):
        with pytest.raises(InputError, match="objective must be 'score'"):
            method(GradientEngine(SmallNet(False), objective='loss'))


@needs_cifar10
def test_the_model_keeps_its_gradient_and_its_fused_nodes(cifar):
    """After DeepLIFT nothing of its rules is left: the gradient is the same array as before, and the folded
    model runs its fused convolution + ReLU nodes again."""
    engine, xs, targets = cifar
    before = engine(xs, targets)
    DeepLIFT(engine).attribute(xs, targets)
    assert np.array_equal(engine(xs, targets), before)
    assert chainer.config.__dict__.get('fuse_activations', True)
