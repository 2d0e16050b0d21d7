"""2x2, stride 2 max pooling of channel-major (C, H, W, N) activations (CifarNet's) and its gradient, as
Chainer FunctionNodes: sgrad.native's compiled kernels where they are built, else the elementwise maximum of the
window's four strided views in NumPy, block by block (sgrad.blocks.for_blocks). And CifarNet's global max
pooling, (N, C, H, W) -> (N, C), with its gradient to each map's first maximum.
"""
import functools

import chainer
import numpy
from chainer.backend import get_array_module

from sgrad import native
from sgrad.blocks import channel_blocks, for_blocks


#: The four positions of a 2x2 window, as strided views of the (C, H, W, N) activations.
_WINDOW = [(slice(None), slice(dy, None, 2), slice(dx, None, 2)) for dy in (0, 1) for dx in (0, 1)]


class MaxPooling2x2(chainer.function_node.FunctionNode):
    """2x2, stride 2 max pooling of (C, H, W, N) activations (even H, W), as the
    elementwise maximum of the window's four strided views.

    The gradient goes to one input per window: the first maximum in window
    order (row by row), the rule of F.max_pooling_2d and the other frameworks.
    Ties are common on photographs: flat regions (sky, backgrounds, borders)
    give identical neighbourhoods, hence identical convolution outputs.
    """

    def forward(self, inputs):
        x, = inputs
        xp = get_array_module(x)
        y = xp.empty_like(x[_WINDOW[0]])
        self.retain_inputs((0,))
        self.retain_outputs((0,))
        self.first = None
        if native.supports(x) and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
            self.first = numpy.empty(y.shape, numpy.uint8)
            for_blocks(lambda channels: native.max_pooling_2x2(x, y, self.first, channels), channel_blocks(x))
            return y,

        def block(channels):
            out = y[channels]
            xp.maximum(x[channels][_WINDOW[0]], x[channels][_WINDOW[1]], out=out)
            for w in _WINDOW[2:]:
                xp.maximum(out, x[channels][w], out=out)
        for_blocks(block, channel_blocks(x))
        return y,

    def backward(self, indexes, grad_outputs):
        x, = self.get_retained_inputs()
        y, = self.get_retained_outputs()
        return MaxPooling2x2Grad(x.array, y.array, self.first).apply(grad_outputs)


def first_maximum_masks(x, y):
    """For each window position, where it holds the window's first maximum (exactly one per window; a
    NaN is its window's maximum, as in F.max_pooling_2d); in channel blocks."""
    xp = get_array_module(y)
    masks = [xp.empty(y.shape, dtype=bool) for _ in _WINDOW]

    def block(channels):
        taken = None
        for w, mask in zip(_WINDOW, masks):
            mask[channels] = (x[channels][w] == y[channels]) | xp.isnan(x[channels][w])
            if taken is None:
                taken = mask[channels].copy()
            else:
                mask[channels] &= ~taken
                taken |= mask[channels]
    for_blocks(block, channel_blocks(y))
    return masks


class MaxPooling2x2Grad(chainer.function_node.FunctionNode):
    """Scatters the pooled gradient to each window's first maximum (``first``: its window position, from
    the compiled forward; else found again from x and y); linear in the gradient, so its own backward
    gathers with the same masks."""

    def __init__(self, x, y, first=None):
        self.x, self.y, self.first = x, y, first
        self.x_shape = x.shape

    @functools.cached_property
    def masks(self):
        if self.first is None:
            return first_maximum_masks(self.x, self.y)
        return [self.first == position for position in range(len(_WINDOW))]

    def forward(self, inputs):
        gy, = inputs
        xp = get_array_module(gy)
        gx = xp.empty(self.x_shape, dtype=gy.dtype)
        if self.first is not None and native.supports(gy):
            for_blocks(lambda channels: native.max_pooling_2x2_grad(gy, self.first, gx, channels), channel_blocks(gx))
            return gx,
        masks = self.masks

        def block(channels):
            for w, mask in zip(_WINDOW, masks):
                xp.multiply(gy[channels], mask[channels], out=gx[channels][w])
        for_blocks(block, channel_blocks(gy))
        return gx,

    def backward(self, indexes, grad_outputs):
        ggx, = grad_outputs
        return sum(ggx[w] * mask.astype(ggx.dtype) for w, mask in zip(_WINDOW, self.masks)),


def max_pooling_2x2(x):
    return MaxPooling2x2().apply((x,))[0]


class GlobalMaxPooling(chainer.function_node.FunctionNode):
    """(N, C, ...) -> (N, C), the maximum of each map (CifarNet's head), and ``indexes`` (N, C): the flat
    position in its map of each first maximum (row-major order; a NaN is its map's maximum, as in argmax).

    The gradient goes to that one position, never split among ties (F.max would split it; on flat images
    whole feature maps tie). Given ``indexes`` (an earlier forward's) it takes the values there instead:
    the linear map that GlobalMaxPoolingGrad's own backward is. No state outside the node, so the
    pooling's gradient at another input is that of ``GlobalMaxPooling().apply((x,))``.

    One argmax and one gather: F.max_pooling_2d made the same choice through an im2col (a fiftieth of a
    CifarNet map's time), F.select_item indexes with a Python range (6 ms a map).
    """

    def __init__(self, indexes=None):
        self.indexes = indexes

    def forward(self, inputs):
        x, = inputs
        self.retain_inputs((0,))  # its layout, for the gradient's (see GlobalMaxPoolingGrad)
        if self.indexes is None:
            self.indexes = x.reshape(x.shape[0] * x.shape[1], -1).argmax(axis=1).reshape(x.shape[:2])
        return x[map_positions(self.indexes, x.shape)],

    def backward(self, indexes, grad_outputs):
        x, = self.get_retained_inputs()
        return GlobalMaxPoolingGrad(x.array, self.indexes).apply(grad_outputs)


def map_positions(indexes, shape):
    """The index tuple of the (N, C) flat positions ``indexes`` in (N, C, ...) arrays of ``shape``."""
    xp = get_array_module(indexes)
    n, c = shape[:2]
    return (xp.arange(n)[:, None], xp.arange(c)[None, :]) + tuple(xp.unravel_index(indexes, shape[2:]))


class GlobalMaxPoolingGrad(chainer.function_node.FunctionNode):
    """Scatters the pooled gradient gy (N, C) to each map's first maximum (``indexes``), zeros elsewhere,
    in x's memory layout (CifarNet's maps are (C, H, W, N) arrays seen as (N, C, H, W): the convolutions
    below then take the gradient as it is, with no copy). Linear in gy, so its own backward gathers at the
    same positions."""

    def __init__(self, x, indexes):
        self.x, self.indexes = x, indexes

    def forward(self, inputs):
        gy, = inputs
        gx = get_array_module(gy).zeros_like(self.x, dtype=gy.dtype)
        gx[map_positions(self.indexes, gx.shape)] = gy
        return gx,

    def backward(self, indexes, grad_outputs):
        return GlobalMaxPooling(self.indexes).apply(grad_outputs)


def global_max_pooling(x):
    """(N, C, ...) -> (N, C), each map's maximum; its gradient goes to the map's first maximum only."""
    return GlobalMaxPooling().apply((x,))[0]
