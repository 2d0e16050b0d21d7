"""DeepLIFT with the Rescale rule and DeepLIFT-SHAP on any Chainer model, as rules on the nodes of its forward
pass (sgrad.rules): one forward pass of the baseline records every node's input there, then the batch's forward
pass and one backward in which each activation and max pooling backpropagates DeepLIFT's multipliers."""
import chainer
import chainer.functions as F
import numpy as np

from sgrad.errors import InputError
from sgrad.paths import gaussian_blur, largest_blur
from sgrad.rules import ACTIVATIONS, MAXIMA, NodeRecorder, is_linear, recorded_forward
from sgrad.saliency import PathMethod

#: Where |z - z'| is below this, a multiplier is the gradient (Captum's DeepLift eps).
EPS = 1e-10


def _guarded(delta):
    """Where the difference from the baseline is below EPS (the gradient serves there), and the difference with
    those entries 1, safe to divide by."""
    small = np.abs(delta) < EPS
    return small, np.where(small, 1, delta)


def rescale_backward(node, z, z_ref):
    """The Rescale rule for an activation y = f(z) whose input is z here and z_ref on the baseline: the
    gradient gy times m = (f(z) - f(z_ref)) / (z - z_ref), or f'(z) where z - z_ref is below EPS."""
    f, slope = ACTIVATIONS[type(node)]
    small, delta = _guarded(z - z_ref)
    multiplier = np.where(small, slope(node, z), (f(node, z) - f(node, z_ref)) / delta).astype(z.dtype)
    return lambda indexes, grad_outputs: (grad_outputs[0] * multiplier,)


def max_backward(node, x, x_ref):
    """DeepLIFT's rule for a max pooling y = max(x) whose input is x_ref on the baseline (Captum's): the
    difference y - y_ref splits at m = max(y, y_ref) into m - y_ref, sent to x's maximum, and y - m, sent
    to x_ref's, so that the contributions add up to gy (y - y_ref); divided by x - x_ref, that is the
    multiplier; where x - x_ref is below EPS, the gradient."""
    gradient = node.backward

    def at(inputs, grad):
        """The pooling of inputs and, given grad, its gradient there times grad."""
        fresh = MAXIMA[type(node)](node)
        with chainer.using_config('enable_backprop', True):
            y, = fresh.apply((chainer.Variable(np.ascontiguousarray(np.broadcast_to(inputs, x.shape))),))
        return y.array if grad is None else fresh.backward((0,), (grad,))[0]

    def backward(indexes, grad_outputs):
        gy, = grad_outputs
        y, y_ref = at(x, None), at(x_ref, None)
        top = np.maximum(y, y_ref)
        contributions = gradient(indexes, (gy * (top - y_ref),))[0] + at(x_ref, gy * (y - top))
        small, delta = _guarded(x - x_ref)
        return F.where(np.broadcast_to(small, x.shape), gradient(indexes, grad_outputs)[0], contributions / delta),
    return backward


class DeepLIFTRules(NodeRecorder):
    """The DeepLIFT rules for one batch's forward pass run inside its ``with`` block, given the baseline
    images ``reference`` (one (1, C, H, W) for all, or one per image); ``check()`` after the forward pass
    runs the baseline's and gives every activation and max pooling its rule. Linear nodes keep their
    gradient, which is their multiplier; any other node is an InputError."""

    def __init__(self, model, reference):
        super().__init__()
        self.model, self.reference = model, reference

    def check(self):
        nodes, baseline_nodes = self.on_path(), recorded_forward(self.model, self.reference)
        if [type(node) for node, _ in nodes] != [type(node) for node, _ in baseline_nodes]:
            raise InputError('DeepLIFT: the baseline\'s forward pass ran other functions than the image\'s')
        for (node, inputs), (_, baseline_inputs) in zip(nodes, baseline_nodes):
            if type(node) in ACTIVATIONS:
                node.backward = rescale_backward(node, inputs[0], baseline_inputs[0])
            elif type(node) in MAXIMA:
                node.backward = max_backward(node, inputs[0], baseline_inputs[0])
            elif not is_linear(node):
                raise self.unknown(node, 'DeepLIFT', 'activations (%s), max poolings and linear functions'
                                   % ', '.join(sorted({cls.__name__ for cls in ACTIVATIONS})))


class DeepLIFT(PathMethod):
    """DeepLIFT with the Rescale rule (Shrikumar et al. 2017, arXiv:1704.02685), as Captum's DeepLift:

        DeepLIFT(x) = (x - x') * m,   sum of DeepLIFT(x) = S_c(x) - S_c(x')   (summation-to-delta)

    with baseline x' (black by default; one image, or one per image (N, C, H, W)) and m the gradient of S_c
    with each activation's derivative f'(z) replaced by its multiplier (f(z) - f(z')) / (z - z'), z' its input
    on the baseline, and each max pooling's by the rule of max_backward; linear layers, sums and moves keep
    their gradient. One forward pass of the baseline per batch, then one forward and one backward.
    """

    sums_to = 'summation-to-delta'

    score_only = True  # the loss's softmax lies outside the model's nodes, with no rule

    def __init__(self, engine, baseline=None):
        super().__init__(engine)
        self.baseline = baseline

    def passes(self, x):
        return 2, 0  # the baseline's forward pass builds its graph too (its nodes on the gradient's path)

    def baselines(self, xs):
        """The baseline images: (1, C, H, W) if one serves every image of xs, else one per image."""
        if self.baseline is None:
            return np.zeros((1,) + xs.shape[1:], xs.dtype)
        baseline = np.asarray(self.baseline, xs.dtype)
        return baseline[None] if baseline.ndim == 3 else baseline

    def attribute(self, xs, target):
        return self.contributions(xs, target, self.baselines(xs))

    def contributions(self, xs, target, baselines):
        """(x - x') * m for the images xs and baselines (1 or N, C, H, W)."""
        def rules(model, chunk):
            return DeepLIFTRules(model, baselines if len(baselines) == 1 else baselines[chunk])
        return (xs - baselines) * self.engine(xs, target, rule=rules)


class DeepLIFTSHAP(DeepLIFT):
    """DeepLIFT-SHAP (Lundberg & Lee 2017, arXiv:1705.07874; Captum's DeepLiftShap): DeepLIFT averaged over a
    set of baselines x'_1..x'_M,

        DeepLIFTSHAP(x) = 1/M sum_k DeepLIFT(x; x'_k),   summing to the mean of S_c(x) - S_c(x'_k)

    ``baseline``: images (M, C, H, W), such as training images, or 'blurred' (the default): the image blurred by
    Gaussians of sigma_k = k / M of Blur IG's largest blur (sgrad.paths.largest_blur), k = 1..M = ``samples``.
    One DeepLIFT pass per baseline, each for the whole batch.
    """

    def __init__(self, engine, baseline='blurred', samples=10):
        super().__init__(engine, baseline)
        if samples <= 0:
            raise InputError('--samples must be positive, got %d' % samples)
        if isinstance(baseline, str) and baseline != 'blurred':
            raise InputError("DeepLIFT-SHAP's baselines are 'blurred' or images, got %r" % baseline)
        self.samples = samples

    def passes(self, x):
        return 2 * len(self.baseline_set(x[None])), 0

    def baseline_set(self, xs):
        """The M baselines, each (1 or N, C, H, W)."""
        if self.baseline is None or isinstance(self.baseline, str):
            return [gaussian_blur(xs, k * largest_blur(xs) / self.samples) for k in range(1, self.samples + 1)]
        images = np.asarray(self.baseline, xs.dtype)
        return [image[None] for image in (images[None] if images.ndim == 3 else images)]

    def attribute(self, xs, target):
        baselines = self.baseline_set(xs)
        total = sum(self.contributions(xs, target, baseline).astype(np.float64) for baseline in baselines)
        return (total / len(baselines)).astype(xs.dtype)

    def path_ends(self, x):
        starts = np.concatenate([np.broadcast_to(b, (1,) + x.shape) for b in self.baseline_set(x[None])])
        return starts, np.broadcast_to(x, starts.shape)
