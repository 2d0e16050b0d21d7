"""ReLU and clipped ReLU (ReLU6) as Chainer FunctionNodes that work block by block (sgrad.blocks.for_blocks)
on arrays of any layout, and the ReLU gradient node that they and the nodes with a fused ReLU (sgrad.convolution,
sgrad.depthwise) share, compiled (sgrad.native) where it is built. The ReLU nodes have a ``guided`` switch that
sgrad.hooks.GuidedReLU turns on for Guided Backprop; ``ClipsOutput`` gives a node min(max(., 0), cap) applied in
place on its own output.
"""
import chainer
import numpy
from chainer.backend import get_array_module

from sgrad import native
from sgrad.blocks import _ranges, for_blocks, plane_blocks


def _relu_mask(y, cap=None, guide=None):
    """Where a ReLU passes the gradient, read off its output y: y > 0 (and y < cap for the clipped
    min(max(x, 0), cap)), and also guide > 0 under Guided Backprop (guide: the incoming gradient)."""
    mask = y > 0
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
    not), so that the activation needs no arrays of its own; ``guided`` as for ReLU."""

    def set_cap(self, cap):
        self.cap = cap
        if cap is not None:
            self.guided = False

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
        return relu_gradient(y, gy, self.guided, self.cap)


class ReLUGradient(chainer.function_node.FunctionNode):
    """gy where max(., 0) passed the gradient, or min(max(., 0), cap) given a cap, read off its output y
    (0 < y, and y < cap), and, given a ``guide`` (Guided Backprop: the incoming gradient), where the
    guide is positive; else 0: compiled (sgrad.native) where it can, else block by block (for_blocks)
    in NumPy. Linear in gy with the mask fixed, so its backward is itself."""

    def __init__(self, y, cap, guide=None):
        self.y, self.cap, self.guide = y, cap, guide

    def forward(self, inputs):
        gy, = inputs
        arrays = (gy, self.y) + (() if self.guide is None else (self.guide,))
        if native.supports(*arrays):
            g = numpy.empty_like(gy)
            for_blocks(lambda numbers: native.relu_gradient(gy, self.y, self.guide, self.cap, g, numbers),
                       _ranges(g.size, g.itemsize))
            return g,
        g = get_array_module(gy).empty_like(gy)

        def block(index):
            mask = _relu_mask(self.y[index], self.cap, None if self.guide is None else self.guide[index])
            get_array_module(gy).multiply(gy[index], mask, out=g[index])
        for_blocks(block, plane_blocks(g))
        return g,

    def backward(self, indexes, grad_outputs):
        return ReLUGradient(self.y, self.cap, self.guide).apply(grad_outputs)


def relu_gradient(y, gy, guided, cap=None):
    """The gradient gy carried back through a ReLU (or, with a cap, min(max(., 0), cap)) whose output is
    the variable y; with ``guided``, the Guided Backprop rule."""
    return ReLUGradient(y.array, cap, gy.array if guided else None).apply((gy,))[0]


class ReLU(chainer.function_node.FunctionNode):
    """ReLU; with ``guided`` (set by sgrad.hooks.GuidedReLU) its backward passes a gradient
    only where both the forward input and the incoming gradient are positive
    (Springenberg et al. 2015)."""

    guided = False

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
        return relu_gradient(y, gy, self.guided),


def relu(x):
    """max(x, 0)."""
    return ReLU().apply((x,))[0]


class ClippedReLU(ClipsOutput, chainer.function_node.FunctionNode):
    """min(max(x, 0), cap), F.clipped_relu computed block by block (for_blocks); ``guided`` as for ReLU."""

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
