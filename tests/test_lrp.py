"""LRP (sgrad.lrp): each composite against a NumPy reference of zennit's rules (written from their formulas,
independently of Chainer's backward) on small models of standard links and of this project's nodes; relevance
conservation on real images through the shipped CifarNet and EfficientNet-Lite0; errors for what it has no rule
for; nothing left on the model."""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from conftest import needs_cifar10, relative_difference, within
from model import CIFAR10_MEAN, load_model
from sgrad.activations import clipped_relu, relu
from sgrad.convolution import convolution_3x3
from sgrad.data import load_image_file, load_test_images
from sgrad.depthwise import depthwise_convolution, pointwise_convolution
from sgrad.errors import InputError
from sgrad.lrp import COMPOSITES, LRP
from sgrad.saliency import Gradient, GradientEngine

pytestmark = pytest.mark.numerical

RNG = np.random.RandomState(0)
MEAN, STD = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.3, 0.25])


# ------------------------------------------------------------------ the NumPy reference (float64)
def stab(z, eps):
    return z + eps * np.where(z >= 0, 1., -1.)


def pos(a):
    return None if a is None else np.maximum(a, 0)


def neg(a):
    return None if a is None else np.minimum(a, 0)


class Dense:
    """A linear layer: fwd(x, W, b) = x W^T + b, bwd(W, g) = g W."""

    def fwd(self, x, W, b):
        return x @ W.T + (0 if b is None else b)

    def bwd(self, W, g):
        return g @ W


class Conv:
    """A convolution of (N, C, H, W) images with (O, C, k, k) weights, zero pads ((top, bottom), (left, right))
    and a stride, by windows: fwd and its adjoint bwd."""

    def __init__(self, x_shape, pads=((1, 1), (1, 1)), stride=1):
        self.x_shape, self.pads, self.stride = x_shape, pads, stride

    def fwd(self, x, W, b):
        k, s = W.shape[2], self.stride
        xp = np.pad(x, ((0, 0), (0, 0)) + self.pads)
        ho, wo = (xp.shape[2] - k) // s + 1, (xp.shape[3] - k) // s + 1
        z = sum(np.einsum('nchw,oc->nohw', xp[:, :, i:i + s * ho:s, j:j + s * wo:s], W[:, :, i, j])
                for i in range(k) for j in range(k))
        return z + (0 if b is None else b[None, :, None, None])

    def bwd(self, W, g):
        k, s = W.shape[2], self.stride
        (top, bottom), (left, right) = self.pads
        n, c, h, w = self.x_shape
        gx = np.zeros((n, c, h + top + bottom, w + left + right))
        ho, wo = g.shape[2:]
        for i in range(k):
            for j in range(k):
                gx[:, :, i:i + s * ho:s, j:j + s * wo:s] += np.einsum('nohw,oc->nchw', g, W[:, :, i, j])
        return gx[:, :, top:top + h, left:left + w]


def r_epsilon(f, x, W, b, R, eps=1e-6):
    return x * f.bwd(W, R / stab(f.fwd(x, W, b), eps))


def r_zplus(f, x, W, b, R, eps=1e-6):
    s = R / stab(f.fwd(pos(x), pos(W), pos(b)) + f.fwd(neg(x), neg(W), None), eps)
    return pos(x) * f.bwd(pos(W), s) + neg(x) * f.bwd(neg(W), s)


def r_alpha_beta(f, x, W, b, R, eps=1e-6):
    sp = R / stab(f.fwd(pos(x), pos(W), pos(b)) + f.fwd(neg(x), neg(W), None), eps)
    sn = R / stab(f.fwd(pos(x), neg(W), neg(b)) + f.fwd(neg(x), pos(W), None), eps)
    return (2 * (pos(x) * f.bwd(pos(W), sp) + neg(x) * f.bwd(neg(W), sp))
            - (pos(x) * f.bwd(neg(W), sn) + neg(x) * f.bwd(pos(W), sn)))


def r_gamma(f, x, W, b, R, gamma=0.25, eps=1e-6):
    Wu, Wd = W + gamma * pos(W), W + gamma * neg(W)
    bu, bd = b + gamma * pos(b), b + gamma * neg(b)
    z = f.fwd(x, W, b)
    sp = (z > 0) * R / stab(f.fwd(pos(x), Wu, bu) + f.fwd(neg(x), Wd, None), eps)
    sn = (z < 0) * R / stab(f.fwd(pos(x), Wd, bd) + f.fwd(neg(x), Wu, None), eps)
    return (pos(x) * f.bwd(Wu, sp) + neg(x) * f.bwd(Wd, sp) + pos(x) * f.bwd(Wd, sn) + neg(x) * f.bwd(Wu, sn))


def r_box(f, x, W, b, R, low, high, eps=1e-6):
    lo, hi = np.broadcast_to(low, x.shape), np.broadcast_to(high, x.shape)
    s = R / stab(f.fwd(x, W, b) - f.fwd(lo, pos(W), pos(b)) - f.fwd(hi, neg(W), neg(b)), eps)
    return x * f.bwd(W, s) - lo * f.bwd(pos(W), s) - hi * f.bwd(neg(W), s)


def r_flat(f, x, W, b, R, eps=1e-6):
    ones = np.ones_like(W)
    return f.bwd(ones, R / stab(f.fwd(np.ones_like(x), ones, None), eps))


#: composite -> (rule of the later convolutions, of the first) given the box's bounds; linear: epsilon
REFERENCE = {
    'epsilon_plus_flat': (r_zplus, lambda low, high: r_flat),
    'epsilon_gamma_box': (r_gamma, lambda low, high: lambda *a: r_box(*a, low, high)),
    'epsilon_plus': (r_zplus, lambda low, high: r_zplus),
    'epsilon_alpha2_beta1': (r_alpha_beta, lambda low, high: r_alpha_beta),
    'epsilon': (r_epsilon, lambda low, high: r_epsilon),
}


def reference_rules(composite, eps, low, high):
    """The rules of the later convolutions and of the first, given the epsilon rule's epsilon."""
    conv_rule, first_rule = REFERENCE[composite]
    if composite == 'epsilon':
        return (lambda *a: r_epsilon(*a, eps=eps)), (lambda *a: r_epsilon(*a, eps=eps))
    return conv_rule, first_rule(low, high)


def avg_pool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def max_pool_routing(x, g):
    """The gradient of 2x2 max pooling at x, applied to g: each window's g to its first maximum."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    routed = np.zeros(windows.shape)
    np.put_along_axis(routed, windows.argmax(-1)[..., None], g[..., None], -1)
    return routed.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)


def norm_split(parts, R, eps=1e-6):
    """zennit's Norm on a sum of parts: each part's share of R."""
    s = R / stab(sum(parts), eps)
    return [p * s for p in parts]


# ------------------------------------------------------------------ the models
def parameter(*shape):
    return RNG.normal(0, 0.5, shape)


class StandardNet(chainer.Chain):
    """Chainer's links and functions: (x - mean) / std -> conv 3x3 -> ReLU -> 2x2 max pooling -> p;
    p + ReLU(conv 3x3 (p)) -> 2x2 average pooling -> linear -> x 0.5."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 4, 3, pad=1, initialW=parameter(4, 3, 3, 3), initial_bias=parameter(4))
            self.conv2 = L.Convolution2D(4, 4, 3, pad=1, initialW=parameter(4, 4, 3, 3), initial_bias=parameter(4))
            self.fc = L.Linear(16, 3, initialW=parameter(3, 16), initial_bias=parameter(3))

    def forward(self, x):
        h = (x - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
        p = F.max_pooling_2d(F.relu(self.conv1(h)), 2)
        return self.fc(F.average_pooling_2d(p + F.relu(self.conv2(p)), 2)) * 0.5

    def reference(self, x, target, composite, eps=1e-6):
        conv_rule, first_rule = reference_rules(composite, eps, (0 - MEAN[:, None, None]) / STD[:, None, None],
                                                (1 - MEAN[:, None, None]) / STD[:, None, None])
        W1, b1, W2, b2 = (a.array for a in (self.conv1.W, self.conv1.b, self.conv2.W, self.conv2.b))
        h = (x - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
        c1 = Conv(h.shape)
        a1 = np.maximum(c1.fwd(h, W1, b1), 0)
        p = a1.reshape(len(x), 4, 4, 2, 4, 2).max(axis=(3, 5))
        c2 = Conv(p.shape)
        a2 = np.maximum(c2.fwd(p, W2, b2), 0)
        q = avg_pool(p + a2).reshape(len(x), -1)
        logits = 0.5 * Dense().fwd(q, self.fc.W.array, self.fc.b.array)
        R = np.eye(3)[target] * logits
        Rq = r_epsilon(Dense(), q, self.fc.W.array, self.fc.b.array, R, eps).reshape(len(x), 4, 2, 2)
        Rr = (p + a2) * np.repeat(np.repeat(Rq / stab(avg_pool(p + a2), 1e-6), 2, 2), 2, 3) / 4
        Rp, Ra2 = norm_split([p, a2], Rr)
        Rp = Rp + conv_rule(c2, p, W2, b2, Ra2)
        return first_rule(c1, h, W1, b1, max_pool_routing(a1, Rp))


class ProjectNet(chainer.Chain):
    """This project's nodes: 2x - 1 -> the 3x3 convolution as a 1x1 convolution of its patches (F.im2col, as
    EfficientNet-Lite0's stem) -> ReLU6 -> depthwise 3x3, stride 2, 'SAME' pads -> ReLU6 -> a; the (C, H, W, N)
    3x3 convolution -> ReLU -> 1x1 convolution -> + a -> mean over the pixels -> linear."""

    def __init__(self):
        super().__init__()
        self.W0, self.b0 = parameter(4, 3, 3, 3), parameter(4)
        self.Wd, self.bd = parameter(4, 1, 3, 3), parameter(4)
        self.W3, self.b3 = parameter(4, 4, 3, 3), parameter(4)
        self.Wp, self.bp = parameter(4, 4, 1, 1), parameter(4)
        self.Wf, self.bf = parameter(3, 4), parameter(3)

    def forward(self, x):
        h = x * 2. - 1.
        a0 = clipped_relu(pointwise_convolution(F.im2col(F.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)), 'constant'), 3),
                                                self.W0.reshape(4, 27, 1, 1), self.b0), 6.)
        a = clipped_relu(depthwise_convolution(a0, self.Wd, 2, self.bd, pads=((0, 1), (0, 1))), 6.)
        t = relu(convolution_3x3(F.transpose(a, (1, 2, 3, 0)), self.W3, self.b3))
        r = a + pointwise_convolution(F.transpose(t, (3, 0, 1, 2)), self.Wp, self.bp)
        return F.linear(F.average(r, axis=(2, 3)), self.Wf, self.bf)

    def reference(self, x, target, composite, eps=1e-6):
        conv_rule, first_rule = reference_rules(composite, eps, -1., 1.)
        Wd = np.zeros((4, 4, 3, 3))
        Wd[range(4), range(4)] = self.Wd[:, 0]  # the depthwise convolution as a full one
        h = x * 2 - 1
        c0 = Conv(h.shape)
        a0 = np.clip(c0.fwd(h, self.W0, self.b0), 0, 6)
        cd = Conv(a0.shape, ((0, 1), (0, 1)), 2)
        a = np.clip(cd.fwd(a0, Wd, self.bd), 0, 6)
        c3, cp = Conv(a.shape), Conv(a.shape, ((0, 0), (0, 0)))
        t = np.maximum(c3.fwd(a, self.W3, self.b3), 0)
        p = cp.fwd(t, self.Wp, self.bp)
        m = (a + p).mean(axis=(2, 3))
        R = np.eye(3)[target] * Dense().fwd(m, self.Wf, self.bf)
        Rm = r_epsilon(Dense(), m, self.Wf, self.bf, R, eps)
        Rr = (a + p) * (Rm / stab(m, 1e-6))[:, :, None, None] / 16
        Ra, Rp = norm_split([a, p], Rr)
        Ra = Ra + conv_rule(c3, a, self.W3, self.b3, conv_rule(cp, t, self.Wp, self.bp, Rp))
        return first_rule(c0, h, self.W0, self.b0, conv_rule(cd, a0, Wd, self.bd, Ra))


# ------------------------------------------------------------------ against the reference
@pytest.mark.cross_check('lrp')
@pytest.mark.parametrize('composite', sorted(COMPOSITES))
@pytest.mark.parametrize('net', [StandardNet, ProjectNet], ids=['standard links', 'project nodes'])
def test_each_composite_equals_the_numpy_reference(net, composite):
    """In float64, so that the comparison is of the rules (float32 denominators near the stabilizer differ);
    epsilon 0.01 for the epsilon composite, so that its epsilon is seen."""
    with chainer.using_config('dtype', np.float64):
        model = net()
    xs = RNG.uniform(0, 1, (3, 3, 8, 8))
    eps = 0.01 if composite == 'epsilon' else 1e-6
    targets = np.array([0, 1, 2])
    mine = LRP(GradientEngine(model), composite, epsilon=eps).attribute(xs, targets)
    reference = model.reference(xs, targets, composite, eps)
    assert within(relative_difference(mine, reference), 1e-10)
    assert relative_difference(mine, Gradient(GradientEngine(model)).attribute(xs, targets) * xs) > 0.01


@pytest.mark.cross_check('lrp')
def test_box_bounds_are_the_image_range_through_the_normalisation():
    """low and high are images, seen by the box layer through (x - mean) / std."""
    with chainer.using_config('dtype', np.float64):
        model = StandardNet()
    xs = RNG.uniform(0, 1, (2, 3, 8, 8))
    low, high = np.full((3, 1, 1), -0.5), np.array([1.5, 2., 2.5]).reshape(3, 1, 1)
    mine = LRP(GradientEngine(model), 'epsilon_gamma_box', low=low, high=high).attribute(xs, 1)
    REFERENCE['box_test'] = (r_gamma, lambda lo, hi: lambda *a: r_box(*a, (low - MEAN[:, None, None]) / STD[
        :, None, None], (high - MEAN[:, None, None]) / STD[:, None, None]))
    try:
        assert within(relative_difference(mine, model.reference(xs, np.array([1, 1]), 'box_test')), 1e-10)
    finally:
        del REFERENCE['box_test']


# ------------------------------------------------------------------ errors, and nothing left behind
def test_batchnorm_must_be_folded_and_the_objective_be_the_score():
    class WithBatchNorm(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.conv, self.bn, self.fc = L.Convolution2D(3, 2, 3), L.BatchNormalization(2), L.Linear(2, 2)

        def forward(self, x):
            return self.fc(F.average(F.relu(self.bn(self.conv(x))), axis=(2, 3)))

    x = RNG.uniform(0, 1, (1, 3, 5, 5)).astype(np.float32)
    with pytest.raises(InputError, match='fold BatchNorm into the convolution before it'):
        LRP(GradientEngine(WithBatchNorm())).attribute(x, 0)
    with pytest.raises(InputError, match="objective must be 'score'"):
        LRP(GradientEngine(WithBatchNorm(), 'loss'))
    with pytest.raises(InputError, match='composite must be one of'):
        LRP(GradientEngine(WithBatchNorm()), 'epsilon_plus_box')


# ------------------------------------------------------------------ real images
def without_biases(model):
    """model with every folded bias 0 (each BatchNorm's beta = its mean times its scale) and the classifier's."""
    for link in model.links():
        if isinstance(link, L.BatchNormalization):
            link.beta.array[...] = link.avg_mean * link.gamma.array / np.sqrt(link.avg_var + link.eps)
    model.fc.b.array[...] = 0
    return model


def relevance_gaps(engine, xs, targets, composite, **options):
    """(sum of the relevances - S_c(x)) / |S_c(x)| of each image."""
    method = LRP(engine, composite, **options)
    conservation = [method.conservation(x, target, attribution)
                    for x, target, attribution in zip(xs, targets, method.attribute(xs, targets))]
    gaps = np.array([(total - score) / abs(score) for total, score in conservation])
    print('%s: relevance - S_c = %s S_c' % (composite, np.array2string(gaps, precision=4)))
    return gaps


@pytest.fixture(scope='module')
def cifar():
    xs, _ = load_test_images(0, 8)
    engines = {biases: GradientEngine(load_model() if biases else without_biases(load_model()))
               for biases in (True, False)}
    return engines, xs, engines[True].probabilities(xs).argmax(axis=1)


@needs_cifar10
@pytest.mark.parametrize('composite', sorted(COMPOSITES))
def test_relevance_is_conserved_where_no_bias_absorbs_it_on_cifar10(cifar, composite):
    """CifarNet on 8 test images: with its biases (BatchNorm's, folded, and the classifier's) they absorb
    much of the relevance, and the images keep less than S_c(x) (measured: 35-60% less with epsilon_plus_flat,
    70-94% with epsilon_gamma_box, 45-69% epsilon_plus, 80-97% epsilon_alpha2_beta1, 10-184% epsilon); without
    them, every composite conserves it (the stabilizer absorbs the rest) but alpha-beta, whose alpha share of
    an output with no negative contribution is not offset by a beta share (measured: up to 1.3%)."""
    engines, xs, targets = cifar
    assert (relevance_gaps(engines[True], xs, targets, composite) < -0.05).all()
    gaps = relevance_gaps(engines[False], xs, targets, composite)
    if composite == 'epsilon_alpha2_beta1':
        assert np.abs(gaps).max() > 1e-3
    else:
        assert np.abs(gaps).max() < 1e-3


@needs_cifar10
def test_lrp_0_is_gradient_times_input_on_a_bias_free_cifarnet(cifar):
    """Without biases and with epsilon -> 0, LRP of a ReLU network is the gradient times the input (Ancona et
    al. 2018); here the input of the first convolution, (x - mean) / std, whose gradient is std times the image's:
    so (x - mean) times the image's gradient. In float64, where an epsilon of 1e-30 changes nothing else."""
    _, xs, targets = cifar
    with chainer.using_config('dtype', np.float64):
        engine = GradientEngine(without_biases(load_model()))
    xs = xs.astype(np.float64)
    lrp0 = LRP(engine, 'epsilon', epsilon=1e-30, stabilizer=1e-30).attribute(xs, targets)
    assert relative_difference(lrp0, (xs - CIFAR10_MEAN.reshape(3, 1, 1)) * engine(xs, targets)) < 1e-12


@pytest.mark.parametrize('composite', sorted(COMPOSITES))
def test_relevance_is_conserved_where_no_bias_absorbs_it_on_a_photograph(composite):
    """EfficientNet-Lite0 on a photograph: with its biases the image keeps almost none of S_c(x) (measured: 87%
    less with epsilon, 99% with epsilon_gamma_box, over 99.9% with the others); without them the composites of
    the gamma and epsilon rules conserve it, z+ loses the relevance of outputs with no positive contribution
    (0.3%: the 1x1 projections, which have no activation, have negative outputs), and alpha-beta is far off."""
    x = load_image_file('data/photos/chelsea.png', 224)[0][None]
    from sgrad.efficientnet import load_efficientnet_lite0
    engine = GradientEngine(load_efficientnet_lite0())
    target = engine.probabilities(x).argmax(axis=1)
    assert (relevance_gaps(engine, x, target, composite) < -0.5).all()
    gaps = relevance_gaps(GradientEngine(without_biases(load_efficientnet_lite0())), x, target, composite)
    tolerance = {'epsilon_plus': 1e-2, 'epsilon_plus_flat': 1e-2}.get(composite, 1e-3)
    if composite == 'epsilon_alpha2_beta1':
        assert np.abs(gaps).max() > 1
    else:
        assert np.abs(gaps).max() < tolerance


@needs_cifar10
def test_the_model_keeps_its_gradient_and_its_fused_nodes(cifar):
    engines, xs, targets = cifar
    engine = engines[True]
    before = engine(xs, targets)
    LRP(engine, 'epsilon_gamma_box').attribute(xs, targets)
    assert np.array_equal(engine(xs, targets), before)
    assert chainer.config.__dict__.get('fuse_activations', True)
