"""Chainer hooks that let the saliency methods work on any Chainer model.

:class:`ReLURule` (a ``FunctionHook``) makes the ReLUs of a forward pass backpropagate by a rule,
Guided Backprop's or Deconvnet's; :class:`LinkOutput` (a ``LinkHook``) captures the output of a
named link, for Grad-CAM; :class:`CallOrder` (a ``LinkHook``) lists the layers a forward
pass runs, for the model randomization check. All act only inside their ``with`` block
and change no model, function or class.
"""
import chainer
from chainer.functions.activation.clipped_relu import ClippedReLU
from chainer.functions.activation.relu import ReLU as ChainerReLU

from sgrad.activations import relu_gradient
from sgrad.errors import InputError

#: The methods that each rule of sgrad.activations.RULES makes of the gradient, for messages.
RULE_METHODS = {'guided': 'Guided Backprop', 'deconvnet': 'Deconvnet'}


def _chainer_relu_backward(node, rule):
    """The backward of F.relu's or F.clipped_relu's node by ``rule``. F.relu retains its output and
    F.clipped_relu its input, which give the same mask: 0 < x < cap exactly where 0 < y < cap."""
    def backward(indexes, grad_outputs):
        kept, = node.get_retained_outputs() if isinstance(node, ChainerReLU) else node.get_retained_inputs()
        return relu_gradient(kept, grad_outputs[0], rule, getattr(node, 'cap', None)),
    return backward


class ReLURule(chainer.FunctionHook):
    """A backward rule for every ReLU of the forward passes run inside ``with ReLURule(rule):``, ``rule``
    one of sgrad.activations.RULES: 'guided' (Guided Backprop, Springenberg et al. 2015), 'deconvnet'
    (Zeiler & Fergus 2014).

    The ReLU nodes are F.relu, F.clipped_relu (ReLU6) and this project's own (sgrad/activations.py, and
    the convolutions with a ReLU fused in), which carry a ``rule`` attribute; Chainer's get the rule as
    their backward. The rule belongs to the node, which lives only as long as its graph; the model, F.relu
    and every class stay as they are. A Chainer FunctionHook sees gradients only as arrays, which a skip
    connection shares between branches (Add's backward hands the same array to both inputs), so the rule
    is given to the node instead of being written into its gradient. ``relus`` counts the nodes that got it.
    """

    name = 'ReLURule'

    def __init__(self, rule):
        if rule not in RULE_METHODS:
            raise ValueError('no ReLU rule %r; the rules are %s' % (rule, ', '.join(RULE_METHODS)))
        self.rule, self.relus = rule, 0

    def forward_postprocess(self, function, in_data):
        if hasattr(function, 'rule'):
            function.rule = self.rule
        elif type(function) in (ChainerReLU, ClippedReLU):
            function.backward = _chainer_relu_backward(function, self.rule)
        else:
            return
        self.relus += 1

    def check(self):
        """An InputError if the forward pass had no ReLU: the rule's method would be the plain gradient."""
        if not self.relus:
            raise InputError('%s needs ReLUs (F.relu, F.clipped_relu or sgrad.activations.relu); this model has '
                             'none' % RULE_METHODS[self.rule])


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
