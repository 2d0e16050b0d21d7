"""ReLU and clipped ReLU (ReLU6) as Chainer FunctionNodes that work block by block (sgrad.blocks.for_blocks)
on arrays of any layout, and the ReLU gradient node that they and the nodes with a fused ReLU (sgrad.convolution,
sgrad.depthwise) share, compiled (sgrad.native) where it is built. The ReLU nodes have a backward ``rule`` (RULES)
that sgrad.hooks.ReLURule sets for Guided Backprop and Deconvnet; ``ClipsOutput`` gives a node min(max(., 0), cap)
applied in place on its own output.
"""
import chainer
import numpy
from chainer.backend import get_array_module

from sgrad import native
from sgrad.blocks import _ranges, for_blocks, plane_blocks


#: The backward rules of a ReLU y = max(x, 0), or of y = min(max(x, 0), cap), by name (a ReLU node's ``rule``):
#: where each passes the incoming gradient gy, as (whether gy must be positive too, the y it must exceed).
#:   None, the gradient: 0 < y (< cap).
#:   'guided', Guided Backprop (Springenberg et al. 2015): 0 < y (< cap) and gy > 0.
#:   'deconvnet', Deconvnet (Zeiler & Fergus 2014): gy > 0 whatever the sign of x, i.e. ReLU(gy). With a cap,
#:     ReLU(gy) where y < cap: min(max(x, 0), cap) is min(., cap) after a ReLU, and the rule replaces the ReLU's
#:     backward only; the cap is no rectifier and keeps its gradient, 0 where it clips. (Captum's Deconvolution
#:     changes nn.ReLU modules only, so its ReLU6, an nn.Hardtanh, keeps the plain gradient 0 < x < 6.)
#: With or without a cap, Guided Backprop's mask is Deconvnet's and the gradient's together.
RULES = {None: (False, 0.), 'guided': (True, 0.), 'deconvnet': (True, -numpy.inf)}


def fusing_activations():
    """Whether the folded models fuse an activation into its convolution's node (the default: one pass and
    no pre-activation array kept). The rule-based methods (sgrad.rules) run with
    ``chainer.using_config('fuse_activations', False)``: their rules need each activation's own node."""
    return getattr(chainer.config, 'fuse_activations', True)


def _relu_mask(y, cap=None, guide=None, floor=0.):
    """Where a ReLU passes the gradient, read off its output y: y > floor (and y < cap for the clipped
    min(max(x, 0), cap)), and also guide > 0 under a rule that rectifies (guide: the incoming gradient)."""
    mask = y > floor
    if cap is not None:
        mask &= y < cap
    if guide is not None:
        mask &= guide > 0
    return mask


def _clip_in_place(y, cap):
    """min(max(y, 0), cap), in place."""
    xp = get_array_module(y)
    xp.maximum(y, 0, out=y)
    xp.minimum(y, cap, out=y)


class ClipsOutput:
    """For a FunctionNode that may apply min(max(., 0), cap) to its own output (``cap`` None: it does
    not), so that the activation needs no arrays of its own; ``rule`` as for ReLU."""

    def set_cap(self, cap):
        self.cap = cap
        if cap is not None:
            self.rule = None

    def clip_block(self, y):
        """The activation in place on a block of the output (to call in forward, which retains the
        output when there is a cap)."""
        if self.cap is not None:
            _clip_in_place(y, self.cap)

    def through_clip(self, gy):
        """The output gradient gy carried back through the activation (to call in backward)."""
        if self.cap is None:
            return gy
        y, = self.get_retained_outputs()
        return relu_gradient(y, gy, self.rule, self.cap)


class ReLUGradient(chainer.function_node.FunctionNode):
    """gy where max(., 0) passed the gradient, or min(max(., 0), cap) given a cap, read off its output y
    (floor < y, floor 0 but for Deconvnet's -inf, and y < cap), and, given a ``guide`` (the incoming
    gradient, under a rule that rectifies it), where the guide is positive; else 0: compiled
    (sgrad.native) where it can, else block by block (for_blocks) in NumPy. Linear in gy with the mask
    fixed, so its backward is itself."""

    def __init__(self, y, cap, guide=None, floor=0.):
        self.y, self.cap, self.guide, self.floor = y, cap, guide, floor

    def forward(self, inputs):
        gy, = inputs
        arrays = (gy, self.y) + (() if self.guide is None else (self.guide,))
        if native.supports(*arrays):
            g = numpy.empty_like(gy)
            for_blocks(lambda numbers: native.relu_gradient(gy, self.y, self.guide, self.cap, self.floor, g,
                                                            numbers), _ranges(g.size, g.itemsize))
            return g,
        g = get_array_module(gy).empty_like(gy)

        def block(index):
            mask = _relu_mask(self.y[index], self.cap, None if self.guide is None else self.guide[index],
                              self.floor)
            get_array_module(gy).multiply(gy[index], mask, out=g[index])
        for_blocks(block, plane_blocks(g))
        return g,

    def backward(self, indexes, grad_outputs):
        return ReLUGradient(self.y, self.cap, self.guide, self.floor).apply(grad_outputs)


def relu_gradient(y, gy, rule=None, cap=None):
    """The gradient gy carried back through a ReLU (or, with a cap, min(max(., 0), cap)) whose output is
    the variable y, by the backward ``rule`` (RULES)."""
    rectified, floor = RULES[rule]
    return ReLUGradient(y.array, cap, gy.array if rectified else None, floor).apply((gy,))[0]


class ReLU(chainer.function_node.FunctionNode):
    """ReLU; its backward follows its ``rule`` (RULES), which sgrad.hooks.ReLURule sets: the gradient by
    default, Guided Backprop's or Deconvnet's."""

    rule = None

    def forward(self, inputs):
        x, = inputs
        y = get_array_module(x).empty_like(x)

        def block(index):
            get_array_module(x).maximum(x[index], 0, out=y[index])
        for_blocks(block, plane_blocks(x))
        self.retain_outputs((0,))
        return y,

    def backward(self, indexes, grad_outputs):
        y, = self.get_retained_outputs()
        gy, = grad_outputs
        return relu_gradient(y, gy, self.rule),


def relu(x):
    """max(x, 0)."""
    return ReLU().apply((x,))[0]


class ClippedReLU(ClipsOutput, chainer.function_node.FunctionNode):
    """min(max(x, 0), cap), F.clipped_relu computed block by block (for_blocks); ``rule`` as for ReLU."""

    def __init__(self, cap):
        self.set_cap(cap)

    def forward(self, inputs):
        x, = inputs
        y = get_array_module(x).empty_like(x)

        def block(index):
            y[index] = x[index]
            self.clip_block(y[index])
        for_blocks(block, plane_blocks(y))
        self.retain_outputs((0,))
        return y,

    def backward(self, indexes, grad_outputs):
        return self.through_clip(grad_outputs[0]),


def clipped_relu(x, cap):
    """min(max(x, 0), cap)."""
    return ClippedReLU(cap).apply((x,))[0]
