"""Chainer hooks that let the saliency methods work on any Chainer model.

:class:`GuidedReLU` (a ``FunctionHook``) makes the ReLUs of a forward pass backpropagate
the Guided Backprop way; :class:`LinkOutput` (a ``LinkHook``) captures the output of a
named link, for Grad-CAM; :class:`CallOrder` (a ``LinkHook``) lists the layers a forward
pass runs, for the model randomization check. All act only inside their ``with`` block
and change no model, function or class.
"""
import chainer
from chainer.functions.activation.clipped_relu import ClippedReLU
from chainer.functions.activation.relu import ReLU as ChainerReLU

from sgrad.errors import InputError


def _guided_relu_backward(node):
    """F.relu's backward, passing only where the output and the incoming gradient are positive."""
    def backward(indexes, grad_outputs):
        y, = node.get_retained_outputs()
        gy, = grad_outputs
        return gy * ((y.array > 0) & (gy.array > 0)).astype(gy.dtype),
    return backward


def _guided_clipped_relu_backward(node):
    """F.clipped_relu's (ReLU6's) backward, passing where 0 < x < cap and the gradient is positive."""
    def backward(indexes, grad_outputs):
        x, = node.get_retained_inputs()
        gy, = grad_outputs
        return gy * ((x.array > 0) & (x.array < node.cap) & (gy.array > 0)).astype(gy.dtype),
    return backward


#: Chainer's own ReLU nodes and the guided backward each gets.
GUIDED_BACKWARDS = {ChainerReLU: _guided_relu_backward, ClippedReLU: _guided_clipped_relu_backward}


class GuidedReLU(chainer.FunctionHook):
    """Guided Backprop (Springenberg et al. 2015) for the forward passes run inside ``with GuidedReLU():``.

    Every ReLU node created in the block backpropagates only positive gradients of
    positive inputs: F.relu, F.clipped_relu (ReLU6: where 0 < x < cap) and this
    project's own ReLU nodes (``guided`` attribute: sgrad/activations.py, and the
    convolutions with a ReLU fused in). The rule belongs to
    the node, which lives only as long as its graph; the model, F.relu and every
    class stay as they are. A Chainer FunctionHook sees gradients only as arrays,
    which a skip connection shares between branches (Add's backward hands the same
    array to both inputs), so the rule is given to the node instead of being
    written into its gradient. ``relus`` counts the nodes that got it.
    """

    name = 'GuidedReLU'

    def __init__(self):
        self.relus = 0

    def forward_postprocess(self, function, in_data):
        if hasattr(function, 'guided'):
            function.guided = True
        elif type(function) in GUIDED_BACKWARDS:
            function.backward = GUIDED_BACKWARDS[type(function)](function)
        else:
            return
        self.relus += 1

    def check(self):
        """An InputError if the forward pass had no ReLU: Guided Backprop would be the plain gradient."""
        if not self.relus:
            raise InputError('Guided Backprop needs ReLUs (F.relu, F.clipped_relu or sgrad.activations.relu); '
                             'this model has none')


def link_names(model):
    """{link: name} for every link of ``model``, names without the leading slash ('res3/block1')."""
    return {link: name.lstrip('/') for name, link in model.namedlinks(skipself=True)}


class LinkOutput(chainer.LinkHook):
    """Captures the output of the link named ``layer`` (as in ``model.namedlinks()``, e.g. 'res3'),
    or, with ``layer=None``, of the last link to return a 4-D array (the last convolutional block)."""

    name = 'LinkOutput'

    def __init__(self, model, layer=None):
        self.names = link_names(model)
        if layer is not None and layer.lstrip('/') not in self.names.values():
            raise InputError('the model has no link named %r; it has: %s'
                             % (layer, ', '.join(sorted(self.names.values()))))
        self.layer = None if layer is None else layer.lstrip('/')
        self.output = self.captured = None

    def forward_postprocess(self, args):
        name = self.names.get(args.link)
        if name is None or not isinstance(args.out, chainer.Variable):
            return
        if name == self.layer or (self.layer is None and args.out.ndim == 4):
            self.output, self.captured = args.out, name

    def check(self):
        """An InputError unless a 4-D (N, C, h, w) output was captured."""
        if self.output is None and self.layer is None:
            raise InputError('no link returned a 4-D (N, C, h, w) output: name a layer')
        if self.output is None:
            raise InputError('link %r was not called through chainer.Link.__call__ (a Chain that overrides '
                             '__call__ instead of defining forward() hides its output from hooks)' % self.layer)
        if self.output.ndim != 4:
            raise InputError('link %r returned shape %s, not (N, C, h, w)' % (self.layer, self.output.shape))


class CallOrder(chainer.LinkHook):
    """The names of the links that ``model``'s forward calls directly (not from inside another of its
    links), in the order of their first call: the layers from the input to the logits."""

    name = 'CallOrder'

    def __init__(self, model):
        self.names = link_names(model)
        self.depth, self.order = 0, []

    def forward_preprocess(self, args):
        if args.link in self.names:
            if self.depth == 0 and self.names[args.link] not in self.order:
                self.order.append(self.names[args.link])
            self.depth += 1

    def forward_postprocess(self, args):
        if args.link in self.names:
            self.depth -= 1
