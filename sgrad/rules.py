"""What the rule-based methods (DeepLIFT, sgrad.deeplift; LRP) need of a forward pass: every node it ran, in
order, with its inputs, and what each node computes, by its type.

A rule-based method changes the backward pass of every node on the way from the input to the class score,
so it must know every node: a node of a type that no table here names stops it with an InputError naming the
type, never a silent plain gradient. The folded models run with their activations as nodes of their own
(``fuse_activations`` off, sgrad.activations.fusing_activations), so that every activation's input exists.
"""
import chainer
import numpy as np
from chainer.functions.activation.clipped_relu import ClippedReLU as ChainerClippedReLU
from chainer.functions.activation.leaky_relu import LeakyReLU
from chainer.functions.activation.relu import ReLU as ChainerReLU
from chainer.functions.activation.sigmoid import Sigmoid
from chainer.functions.activation.tanh import Tanh
from chainer.functions.array import (broadcast, cast, concat, copy, expand_dims, get_item, im2col, pad, reshape,
                                     select_item, split_axis, squeeze, transpose)
from chainer.functions.connection.convolution_2d import Convolution2DFunction
from chainer.functions.connection.linear import LinearFunction
from chainer.functions.math import average, basic_math, sum as chainer_sum
from chainer.functions.normalization.batch_normalization import FixedBatchNormalization
from chainer.functions.pooling.average_pooling_2d import AveragePooling2D
from chainer.functions.pooling.average_pooling_nd import AveragePoolingND
from chainer.functions.pooling.max_pooling_nd import MaxPoolingND

from sgrad import linear
from sgrad.activations import ClippedReLU, ReLU
from sgrad.convolution import Convolution3x3
from sgrad.depthwise import DepthwiseConvolution, PointwiseConvolution
from sgrad.errors import InputError
from sgrad.pooling import GlobalMaxPooling, MaxPooling2x2

#: Elementwise activations y = f(z) by node type: (f, f') as NumPy functions of the node and z.
ACTIVATIONS = {
    ReLU: (lambda node, z: np.maximum(z, 0), lambda node, z: z > 0),
    ChainerReLU: (lambda node, z: np.maximum(z, 0), lambda node, z: z > 0),
    ClippedReLU: (lambda node, z: np.clip(z, 0, node.cap), lambda node, z: (z > 0) & (z < node.cap)),
    ChainerClippedReLU: (lambda node, z: np.clip(z, 0, node.cap), lambda node, z: (z > 0) & (z < node.cap)),
    LeakyReLU: (lambda node, z: np.where(z >= 0, z, node.slope * z), lambda node, z: np.where(z >= 0, 1, node.slope)),
    Sigmoid: (lambda node, z: 1 / (1 + np.exp(-z)), lambda node, z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
    Tanh: (lambda node, z: np.tanh(z), lambda node, z: 1 - np.tanh(z) ** 2),
}

#: Max poolings (their output is one of their inputs, picked by the values), each with a new node of the same
#: pooling, to apply to other inputs.
MAXIMA = {
    MaxPooling2x2: lambda node: MaxPooling2x2(),
    GlobalMaxPooling: lambda node: GlobalMaxPooling(),
    MaxPoolingND: lambda node: MaxPoolingND(node.ndim, node.ksize, node.stride, node.pad, node.cover_all),
}

#: Nodes with weights, linear in their input at inference (a folded model's convolutions carry no activation).
WEIGHTED = (Convolution3x3, DepthwiseConvolution, PointwiseConvolution, Convolution2DFunction, LinearFunction,
            FixedBatchNormalization)

#: Sums of their inputs, or of an input's elements.
SUMS = (basic_math.Add, basic_math.Sub, chainer_sum.Sum, average.Mean, AveragePooling2D, AveragePoolingND)

#: Elementwise affine maps of one input by constants.
CONSTANT_AFFINE = (basic_math.AddConstant, basic_math.SubFromConstant, basic_math.MulConstant, basic_math.Neg)

#: Nodes that move, copy or pick values without changing them.
MOVES = (transpose.Transpose, reshape.Reshape, get_item.GetItem, pad.Pad, im2col.Im2Col, concat.Concat,
         split_axis.SplitAxis, broadcast.BroadcastTo, broadcast.Broadcast, copy.Copy, cast.Cast, squeeze.Squeeze,
         expand_dims.ExpandDims, select_item.SelectItem)


def constant_except_first(node):
    """Whether every input of node but the first is a constant or a parameter (a leaf of the graph, not computed
    from the image), as a layer's weights or a normalisation's mean: then node is a function of its first input."""
    return all(var.creator is None for var in node.inputs[1:])


def is_linear(node):
    """Whether node's output is linear (affine) in the inputs that the gradient reaches through it."""
    if getattr(node, 'cap', None) is not None or getattr(node, 'relu', False):
        return False  # a convolution with its activation fused in: run the model with fuse_activations off
    if isinstance(node, WEIGHTED) or type(node) in (basic_math.Mul, basic_math.Div):
        return constant_except_first(node)
    return isinstance(node, SUMS + CONSTANT_AFFINE + MOVES)


class CallingLinks(chainer.LinkHook):
    """The links whose forward is running, outermost first: ``path()``, as 'res3/block1/conv'."""

    name = 'CallingLinks'

    def __init__(self):
        self.stack = []

    def forward_preprocess(self, args):
        self.stack.append(args.link.name)

    def forward_postprocess(self, args):
        self.stack.pop()

    def path(self):
        return '/'.join(name for name in self.stack if name)


class NodeRecorder(chainer.FunctionHook):
    """Inside its ``with`` block: the folded models' activations as nodes of their own, and ``nodes``, each
    (node, input arrays) of the forward pass in the order they ran, with the link each ran in (for messages)."""

    name = 'NodeRecorder'

    def __init__(self):
        self.nodes, self.links = [], {}
        self._unfused = chainer.using_config('fuse_activations', False)
        self._calling = CallingLinks()

    def __enter__(self):
        self._unfused.__enter__()
        self._calling.__enter__()
        return super().__enter__()

    def __exit__(self, *args):
        super().__exit__(*args)
        self._calling.__exit__(*args)
        self._unfused.__exit__(*args)

    def forward_postprocess(self, function, in_data):
        self.nodes.append((function, in_data))
        self.links[id(function)] = self._calling.path()

    def on_path(self):
        """The recorded nodes that the gradient of the output reaches (some input a variable), after the forward
        pass: nodes on constants alone (a normalisation's mean, say) are not on it."""
        return [(node, inputs) for node, inputs in self.nodes
                if node.inputs is not None and any(var.requires_grad for var in node.inputs)]

    def unknown(self, node, method, known):
        """The InputError for a node of the forward pass that ``method`` has no rule for, naming the link it ran in."""
        link = self.links.get(id(node))
        return InputError('%s has no rule for %s (%s)%s; it knows %s'
                          % (method, type(node).__name__, type(node).__module__,
                             ' in link %r' % link if link else ' in the model\'s own forward', known))


def recorded_forward(model, x):
    """model's forward pass on the images x (N, C, H, W) under a NodeRecorder: its nodes on the gradient's path."""
    with NodeRecorder() as recorder:
        model(chainer.Variable(x))
    return recorder.on_path()


#: The nodes with weights, each with a new node of the same function (its stride, padding, groups ...; no
#: activation fused in, no cache of rearranged weights), to apply to other inputs and weights (the LRP rules).
FRESH_WEIGHTED = {
    Convolution3x3: lambda node: Convolution3x3(),
    DepthwiseConvolution: lambda node: DepthwiseConvolution(node.stride, node.pads),
    PointwiseConvolution: lambda node: PointwiseConvolution(),
    Convolution2DFunction: lambda node: Convolution2DFunction(
        (node.sy, node.sx), (node.ph, node.pw), node.cover_all, dilate=(node.dy, node.dx), groups=node.groups),
    LinearFunction: lambda node: LinearFunction(),
    linear.LinearFunction: lambda node: linear.LinearFunction(),
}
