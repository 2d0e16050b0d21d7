"""Layer-wise Relevance Propagation (LRP; Bach et al. 2015, PLoS ONE 10(7): e0130140; Montavon et al. 2019,
"Layer-wise relevance propagation: an overview") on any Chainer model, as rules on every node of its forward
pass (sgrad.rules), with zennit's composites (zennit 0.5.1, Anders et al. 2021, arXiv:2106.13200).

Relevance R takes the gradient's place in one backward pass: every node on the way from the image to the class
score gets a backward that maps the relevance of its output to that of its inputs, by the node's type:

* weighted nodes, z = f(x; W, b) (every kind of convolution, linear): the composite's rule, computed by applying
  the same function afresh (sgrad.rules.FRESH_WEIGHTED) to modified inputs and weights, and its vector-Jacobian
  product J^T in x (for a convolution: the transposed convolution). With x+ = max(x, 0), x- = min(x, 0) (the
  same for W and b), stab(z) = z + e (+1 where z >= 0, else -1) and e the rule's stabilizer:

    epsilon:  R_x = x J(W)^T s,  s = R / stab(f(x; W, b))                          (e = ``epsilon``)
    z+:       R_x = x+ J(W+)^T s + x- J(W-)^T s,  s = R / stab(f(x+; W+, b+) + f(x-; W-, 0))     (zennit's ZPlus)
    alpha-beta (alpha = 2, beta = 1):  alpha [the z+ share] - beta [the same with W+ and W- swapped, b+ -> b-]
    gamma:    W^ = W + gamma W+, W_ = W + gamma W-: where f(x; W, b) > 0, the z+ share with (W^, b^) for x+
              and W_ for x-; where it is < 0, with (W_, b_) for x+ and W^ for x-; nothing where it is 0
    box (ZBox): R_x = x J(W)^T s - L J(W+)^T s - H J(W-)^T s,
              s = R / stab(f(x; W, b) - f(L; W+, b+) - f(H; W-, b-)),  L, H the bounds of x (below)
    flat:     R_x = J(1)^T (R / stab(f(1; 1, 0))), the relevance spread evenly over the receptive field

* activations (ReLU, ReLU6, leaky ReLU, sigmoid, tanh): the relevance passes unchanged (zennit's Pass).
* sums of variables (a residual x + f(x)), Sum, Mean, average pooling, y = f(x_1, ..., x_k) linear:
  R_{x_i} = x_i J_i^T (R / stab(y)), the proportional split (zennit's Norm).
* max poolings and moves (reshape, transpose, pad, im2col, get_item, ...): the plain gradient (the relevance
  goes to the window's maximum, or moves with the value).
* elementwise affine maps by constants (the input normalisation (x - mean) / std, CifarNet's LOGIT_SCALE,
  EfficientNet's 255 x / 128 - 127 / 128): the relevance passes unchanged, so that it is conserved from the
  class score down to the image: the relevance is that of the image as the model receives it (its first
  weighted node's input, moved back to the image's pixels), as zennit's on a model with its normalisation
  outside.
* BatchNorm (a FixedBatchNormalization node): an InputError asking to fold it into the convolution before
  it (sgrad.batchnorm.FoldsBatchNorm, as CifarNet's and EfficientNet-Lite0's inference copies do). zennit
  passes the relevance through an unmerged BatchNorm and its canonizer merges it; matching needs neither.
* any other node on the path: an InputError naming it.

The relevance starts at the class score, R = S_c(x) at the target logit and 0 at the others (Captum's LRP;
zennit's with attr_output = one-hot times the logits): the rules are linear in R, so the backward starts at 1
there as the gradient's does and the node that makes the logits multiplies it by them.
"""
import chainer
from chainer.backend import get_array_module
from chainer.functions.connection.convolution_2d import Convolution2DFunction
from chainer.functions.math import basic_math
from chainer.functions.normalization.batch_normalization import FixedBatchNormalization

from sgrad.convolution import Convolution3x3
from sgrad.depthwise import DepthwiseConvolution, PointwiseConvolution
from sgrad.errors import InputError
from sgrad.rules import (ACTIVATIONS, CONSTANT_AFFINE, FRESH_WEIGHTED, MAXIMA, MOVES, SUMS, NodeRecorder,
                         constant_except_first, is_linear)
from sgrad.saliency import Method

#: The weighted nodes that zennit's composites treat as convolutions; the others (LinearFunction) as linear.
CONVOLUTIONS = (Convolution3x3, DepthwiseConvolution, PointwiseConvolution, Convolution2DFunction)

#: The alpha and beta of the alpha-beta rule (alpha - beta = 1: conservative).
ALPHA, BETA = 2, 1

#: Elementwise maps of their first input by constants (the others constant): the relevance passes unchanged.
BY_CONSTANTS = (basic_math.Add, basic_math.Sub, basic_math.Mul, basic_math.Div)


def stabilize(z, eps):
    """zennit's stabilizer: z + eps where z >= 0 (0 counts as positive), z - eps where z < 0."""
    return z + get_array_module(z).where(z >= 0, eps, -eps).astype(z.dtype)


def _positive(a):
    return None if a is None else get_array_module(a).maximum(a, 0)


def _negative(a):
    return None if a is None else get_array_module(a).minimum(a, 0)


class Applied:
    """A weighted node's function applied afresh to x with weights W (and bias b): its output ``z`` and
    ``vjp(g)`` = J^T g, the vector-Jacobian product in x (the function is linear in x, so J does not
    depend on x)."""

    def __init__(self, node, x, W, b=None):
        self.node = FRESH_WEIGHTED[type(node)](node)
        with chainer.using_config('enable_backprop', True):
            self.z = self.node.apply(tuple(chainer.Variable(a) for a in (x, W, b) if a is not None))[0].array

    def vjp(self, g):
        return self.node.backward((0,), (chainer.Variable(g),))[0].array


def share(node, terms, R, eps):
    """sum_k c_k x_k J_k^T s with s = R / stab(sum_k c_k z_k), z_k = the node's function of x_k with weights
    W_k and bias b_k, for terms (c_k, x_k, W_k, b_k): the relevance R of the node's output shared among the
    inputs in proportion to their contributions. A term with input 0 and no bias adds nothing and is not
    computed (x- after a ReLU)."""
    x = terms[0][1]
    applied = [(c, x_k, Applied(node, x_k, W, b)) for c, x_k, W, b in terms if b is not None or x_k.any()]
    if not applied:
        return get_array_module(x).zeros_like(x)
    s = R / stabilize(sum(c * term.z for c, _, term in applied), eps)
    return sum(c * x_k * term.vjp(s) for c, x_k, term in applied)


def epsilon_rule(node, x, W, b, R, lrp):
    return share(node, [(1, x, W, b)], R, lrp.epsilon)


def _plus_terms(x, W_plus, b, W_minus):
    """The z+ terms: x+ with (W_plus, b), x- with W_minus and no bias."""
    return [(1, _positive(x), W_plus, b), (1, _negative(x), W_minus, None)]


def zplus_rule(node, x, W, b, R, lrp):
    return share(node, _plus_terms(x, _positive(W), _positive(b), _negative(W)), R, lrp.stabilizer)


def alpha_beta_rule(node, x, W, b, R, lrp):
    positive = share(node, _plus_terms(x, _positive(W), _positive(b), _negative(W)), R, lrp.stabilizer)
    negative = share(node, _plus_terms(x, _negative(W), _negative(b), _positive(W)), R, lrp.stabilizer)
    return ALPHA * positive - BETA * negative


def gamma_rule(node, x, W, b, R, lrp):
    """zennit's generalised Gamma rule (Montavon et al. 2019, with Andeol et al.'s sign cases)."""
    g = lrp.gamma
    up, down = W + g * _positive(W), W + g * _negative(W)
    b_up, b_down = (None, None) if b is None else (b + g * _positive(b), b + g * _negative(b))
    z = Applied(node, x, W, b).z
    return (share(node, _plus_terms(x, up, b_up, down), R * (z > 0), lrp.stabilizer)
            + share(node, _plus_terms(x, down, b_down, up), R * (z < 0), lrp.stabilizer))


def box_rule(node, x, W, b, R, lrp, low, high):
    terms = [(1, x, W, b), (-1, low, _positive(W), _positive(b)), (-1, high, _negative(W), _negative(b))]
    return share(node, terms, R, lrp.stabilizer)


def flat_rule(node, x, W, b, R, lrp, ones):
    return share(node, [(1, ones, get_array_module(W).ones_like(W), None)], R, lrp.stabilizer)


#: zennit's composites by name: (rule of convolutions, of linear nodes, of the first of the given kinds or
#: None). The first is the first such node of the forward pass (zennit: the first module registered).
COMPOSITES = {
    'epsilon_plus_flat': (zplus_rule, epsilon_rule, flat_rule, tuple(FRESH_WEIGHTED)),
    'epsilon_gamma_box': (gamma_rule, epsilon_rule, box_rule, CONVOLUTIONS),
    'epsilon_plus': (zplus_rule, epsilon_rule, None, ()),
    'epsilon_alpha2_beta1': (alpha_beta_rule, epsilon_rule, None, ()),
    'epsilon': (epsilon_rule, epsilon_rule, None, ()),
}


def pass_backward(indexes, grad_outputs):
    """The relevance passes unchanged to the first input (the others are constants)."""
    return tuple(grad_outputs[0] if index == 0 else None for index in indexes)


def weighted_backward(node, inputs, rule):
    """The backward of a weighted node (inputs x, W[, b]) by ``rule``(node, x, W, b, R)."""
    x, W = inputs[:2]
    b = inputs[2] if len(inputs) == 3 else None

    def backward(indexes, grad_outputs):
        return tuple(chainer.Variable(rule(node, x, W, b, grad_outputs[0].array)) if index == 0 else None
                     for index in indexes)
    return backward


def norm_backward(node, inputs, eps):
    """zennit's Norm rule for a linear node y = f(x_1, ..., x_k): R_i = x_i J_i^T (R / stab(y)), J_i^T by the
    node's own gradient."""
    gradient = node.backward
    y = node.forward(tuple(inputs))[0]

    def backward(indexes, grad_outputs):
        grads = gradient(indexes, (chainer.Variable(grad_outputs[0].array / stabilize(y, eps)),))
        if len(grads) != len(indexes):  # a gradient of every input
            grads = [grads[index] for index in indexes]
        return tuple(None if g is None else chainer.Variable(inputs[index] * g.array)
                     for index, g in zip(indexes, grads))
    return backward


class LRPRules(NodeRecorder):
    """The LRP rules of ``lrp`` (an LRP method) for one batch's forward pass run inside its ``with`` block;
    ``check()`` after the forward pass gives every node on the path its rule (see the module's docstring)."""

    def __init__(self, lrp):
        super().__init__()
        self.lrp = lrp

    def check(self):
        nodes = self.on_path()
        if not nodes:
            raise InputError('LRP: the model\'s output does not depend on its input')
        self.recorded = {id(node): inputs for node, inputs in self.nodes}
        _, _, first_rule, first_kinds = COMPOSITES[self.lrp.composite]
        self.first = next((node for node, _ in nodes if isinstance(node, first_kinds) and is_linear(node)), None)
        for node, inputs in nodes:
            rule = self.backward_rule(node, inputs)
            if rule is not None:
                node.backward = rule
        self.start_at_the_score(nodes[-1][0])

    def backward_rule(self, node, inputs):
        """node's backward by its rule, or None to keep its gradient."""
        kind = type(node)
        if kind in ACTIVATIONS:
            return pass_backward
        if kind in MAXIMA or isinstance(node, MOVES):
            return None
        if isinstance(node, FixedBatchNormalization):
            raise InputError('LRP: fold BatchNorm into the convolution before it (as sgrad.batchnorm.FoldsBatchNorm '
                             'does: W\' = s W, b\' = beta - s mean, s = gamma / sqrt(var + eps)); found %s in '
                             'link %r' % (kind.__name__, self.links.get(id(node))))
        if kind in FRESH_WEIGHTED and is_linear(node):
            return weighted_backward(node, inputs, self.weighted_rule(node))
        if is_linear(node) and (isinstance(node, CONSTANT_AFFINE)
                                or (isinstance(node, BY_CONSTANTS) and constant_except_first(node))):
            return pass_backward
        if isinstance(node, SUMS) and is_linear(node):
            return norm_backward(node, inputs, self.lrp.stabilizer)
        raise self.unknown(node, 'LRP', 'activations (%s), weighted nodes (%s), max poolings, sums, moves and '
                           'elementwise affine maps by constants'
                           % (', '.join(sorted({cls.__name__ for cls in ACTIVATIONS})),
                              ', '.join(cls.__name__ for cls in FRESH_WEIGHTED)))

    def weighted_rule(self, node):
        """The rule of a weighted node, rule(node, x, W, b, R), by the composite."""
        convolution_rule, linear_rule, first_rule, _ = COMPOSITES[self.lrp.composite]
        lrp = self.lrp
        if node is self.first and first_rule is box_rule:
            low, high = self.bounds(node)
            return lambda *args: box_rule(*args, lrp, low, high)
        if node is self.first and first_rule is flat_rule:
            ones = self.ones(node)
            return lambda *args: flat_rule(*args, lrp, ones)
        rule = convolution_rule if isinstance(node, CONVOLUTIONS) else linear_rule
        return lambda *args: rule(*args, lrp)

    def _front(self, node, kinds):
        """The recorded nodes of ``kinds``, each a function of its first input alone, that lead to node's first
        input, in the order they ran, and the variable they start from."""
        chain, var = [], node.inputs[0]
        while var.creator is not None and isinstance(var.creator, kinds) and constant_except_first(var.creator):
            chain.append(var.creator)
            var = var.creator.inputs[0]
        return chain[::-1], var

    def _through(self, chain, array):
        """array through the nodes of chain (the recorded constants as their other inputs)."""
        for node in chain:
            array = node.forward((array,) + tuple(self.recorded[id(node)][1:]))[0]
        return array

    def bounds(self, node):
        """The box rule's L and H: the images ``low`` and ``high`` (the image range [0, 1] by default) as the
        node sees them, through the nodes before it, which must be moves and elementwise affine maps by
        constants (the model's input normalisation)."""
        chain, var = self._front(node, MOVES + CONSTANT_AFFINE + BY_CONSTANTS)
        if var.creator is not None:
            raise InputError('LRP: the box rule is for a first layer that sees the image through elementwise '
                             'maps by constants and moves only; %s comes before it' % type(var.creator).__name__)
        x = self.recorded[id(node)][0]
        xp = get_array_module(x)
        return tuple(self._through(chain, xp.ascontiguousarray(xp.broadcast_to(xp.asarray(bound, x.dtype),
                                                                                 var.shape)))
                     for bound in (self.lrp.low, self.lrp.high))

    def ones(self, node):
        """The flat rule's input of ones: ones before the moves that lead to the node (a padding stays zero, as
        in a convolution that pads its input)."""
        chain, var = self._front(node, MOVES)
        x = self.recorded[id(node)][0]
        return self._through(chain, get_array_module(x).ones(var.shape, x.dtype))

    def start_at_the_score(self, last):
        """The node that makes the logits multiplies the relevance that reaches them (1 at the target's, as the
        gradient) by them: R = S_c(x) at the target."""
        output = last.outputs[0]()
        variable = None if output is None else output.get_variable_or_none()
        if variable is None:
            raise InputError('LRP: the model\'s output is not the output of the last function of its forward pass')
        scores, rule = variable.array, last.backward
        last.backward = lambda indexes, grad_outputs: rule(indexes, (grad_outputs[0] * scores,) + grad_outputs[1:])


class LRP(Method):
    """Layer-wise Relevance Propagation (Bach et al. 2015; Montavon et al. 2019) with one of zennit's composites
    (``composite``):

        'epsilon_plus_flat'     (EpsilonPlusFlat): z+ on convolutions, epsilon on linear nodes, flat on the first
                                weighted node
        'epsilon_gamma_box'     (EpsilonGammaBox): gamma on convolutions, epsilon on linear nodes, box on the first
                                convolution
        'epsilon_plus'          (EpsilonPlus): z+ on convolutions, epsilon on linear nodes
        'epsilon_alpha2_beta1'  (EpsilonAlpha2Beta1): alpha-beta (2, 1) on convolutions, epsilon on linear nodes
        'epsilon'               epsilon on every weighted node (Captum's LRP with its defaults)

    with the rules of the module's docstring: ``epsilon`` is the epsilon rule's, ``stabilizer`` every other
    rule's (1e-6 both, as zennit's; Captum's is 1e-9), ``gamma`` the gamma rule's; ``low`` and ``high`` the box
    rule's bounds as images (scalars or arrays that broadcast to (C, H, W); the image range [0, 1] by default),
    which the box layer sees through the model's input normalisation: the nodes before it (elementwise maps by
    constants and moves) applied to them, e.g. CifarNet's (0 - mean) / std and (1 - mean) / std per channel,
    EfficientNet-Lite0's -127/128 and 1, padded with zeros and cut into patches as its stem's input (zennit's
    ZBox with those bounds, as a zennit user normalises them). The flat rule's ones are ones before the moves
    (a padding stays 0, as in a convolution that pads). The first layer is the first node of the forward pass
    of the kinds the composite names (zennit: the first such module registered in the model).

    The relevance starts at the class score S_c(x) and adds up to it where no bias absorbs any
    (``conservation``): every rule but alpha-beta conserves it up to its stabilizer and, for z+, the relevance
    of outputs with no positive contribution. The folded models' biases absorb much of it: on 8 CIFAR-10 test
    images CifarNet's images keep 40-65% of S_c(x) with epsilon_plus_flat, 6-30% with epsilon_gamma_box; on a
    photograph EfficientNet-Lite0's keeps 13% with epsilon, 1.3% with epsilon_gamma_box, under 0.1% with the
    others (tests/test_lrp.py; with the biases zeroed, S_c(x) to 1e-4, and to 0.3% with z+ on EfficientNet).
    Equal to zennit's composites (tests/test_lrp_peers.py: 1e-6 relative in float32) and, for 'epsilon' with
    epsilon and stabilizer 1e-9, to Captum's LRP with its default rules where the max poolings are not modules.

    One forward pass and one backward, whose rules apply each weighted node's function again: 1 to 5 times
    (epsilon, flat: 1; z+ and box: 1 to 3; gamma: 3 to 5) and as many transposed (about 2 to 4 times the time of
    a gradient).
    """

    signed = True
    score_only = True

    def __init__(self, engine, composite='epsilon_plus_flat', epsilon=1e-6, gamma=0.25, low=None, high=None,
                 stabilizer=1e-6):
        super().__init__(engine)
        if composite not in COMPOSITES:
            raise InputError('LRP\'s composite must be one of %s, got %r' % (', '.join(COMPOSITES), composite))
        self.composite, self.epsilon, self.gamma, self.stabilizer = composite, epsilon, gamma, stabilizer
        self.low, self.high = 0. if low is None else low, 1. if high is None else high

    def passes(self, x):
        return 1, 0

    def attribute(self, xs, target):
        return self.engine(xs, target, rule=lambda model, chunk: LRPRules(self))

    def conservation(self, x, target, attribution):
        """(sum of the relevances of the image x (C, H, W), S_c(x)): equal where no bias absorbs relevance."""
        return float(attribution.sum()), float(self.engine.objective_values(x[None], target)[0])
