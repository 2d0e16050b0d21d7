"""Saliency methods on one shared, batched gradient engine.

The contract (as in PAIR's ``saliency`` library): a method's ``attribute(xs,
target)`` takes a batch of [0, 1] images (N, C, H, W) and returns one
attribution per image, (N, C, H, W), or (N, 1, H, W) for methods that give one
value per pixel.  Only :class:`GradientEngine` runs the model, chunks batches
and knows the objective; only :func:`noisy_copies` draws noise; so SmoothGrad
wraps any method by handing it batches of noisy copies.
"""
import contextlib

import chainer
import chainer.functions as F
import numpy as np

from sgrad.errors import InputError
from sgrad.hooks import LinkOutput, ReLURule
from sgrad.linear import row_products

OBJECTIVES = ('score', 'loss')

#: The default batch size: as many images as make about BATCH_PIXELS pixels per forward/backward,
#: 512 of 32x32 (an N=100 SmoothGrad of a CIFAR image in one pass) and 10 of 224x224.
AUTO_BATCHSIZE = 'auto'
BATCH_PIXELS = 2 ** 19


class GradientEngine:
    """Forward and backward passes of a class objective over a batch, in chunks.

    model: any chainer.Link whose ``__call__(x)`` maps images (N, C, H, W), of any size,
      to class scores (N, classes).
    objective:
      'score': the class score (logit) S_c(x) of the SmoothGrad paper;
      'loss':  the blog's ``model.loss``, softmax cross-entropy against class c.
    Each image's gradient is that of its own objective (BatchNorm is in
    inference mode, so the images of a batch do not interact).
    batchsize: at most this many images per forward/backward (bounded memory);
      'auto' (the default) about BATCH_PIXELS pixels' worth; None runs the whole batch at once.
    progress: called as progress(done, total, unit) by the outermost loop over batches; unit names
      what is counted ('noisy samples', 'path points', ...).
    A model that offers ``inference_copy()`` (CifarNet: BatchNorm folded into
    the convolutions) is used through that copy; one whose links return
    channel-major activations says so with ``ACTIVATION_LAYOUT = 'CHWN'``.
    """

    def __init__(self, model, objective='score', batchsize=AUTO_BATCHSIZE, progress=None):
        if objective not in OBJECTIVES:
            raise InputError('objective must be one of %s, got %r' % (', '.join(OBJECTIVES), objective))
        if batchsize not in (None, AUTO_BATCHSIZE) and batchsize <= 0:
            raise InputError('--batchsize must be positive, got %d' % batchsize)
        self.model = model.inference_copy() if hasattr(model, 'inference_copy') else model
        self.objective = objective
        self.batchsize = batchsize
        self.progress = progress
        self._looping = False

    def _objective(self, logits, target):
        """Per-image objective values, shape (N,)."""
        if self.objective == 'score':
            return F.select_item(logits, target)
        return F.softmax_cross_entropy(logits, target, reduce='no')

    def batches(self, n, image_shape, unit='images'):
        """Slices of range(n), each at most a batch of images of ``image_shape`` (..., H, W) long. Only
        the outermost loop reports progress, in its ``unit``: SmoothGrad's loop over noisy samples, not the
        engine's loops inside it."""
        outermost, self._looping = not self._looping, True
        try:
            step = self.batch_step(n, image_shape)
            for start in range(0, n, step):
                chunk = slice(start, min(n, start + step))
                yield chunk
                if outermost and self.progress:
                    self.progress(chunk.stop, n, unit)
        finally:
            if outermost:
                self._looping = False

    def batch_step(self, n, image_shape):
        """How many of n images of ``image_shape`` go through the model at once."""
        if self.batchsize == AUTO_BATCHSIZE:
            return max(1, BATCH_PIXELS // int(np.prod(image_shape[-2:])))
        return self.batchsize or max(n, 1)

    def _chunks(self, x, target):
        """Yield (slice, device images, device targets)."""
        target = np.broadcast_to(np.asarray(target, dtype=np.int32), (len(x),))
        device = self.model.device
        for chunk in self.batches(len(x), x.shape):
            yield chunk, device.send(np.ascontiguousarray(x[chunk])), device.send(target[chunk])

    def gradients(self, x, target, rule=None):
        """d objective / d x for every image of x (N, C, H, W); target: one class or one per image.

        rule: backpropagate by this rule instead of the gradient: through every ReLU (sgrad.hooks.ReLURule:
        'guided' for Guided Backprop, 'deconvnet' for Deconvnet), or through every node, ``rule(model,
        chunk)`` giving the hook for the forward pass of the images x[chunk] whose ``check()`` sets the rules
        once it has run (sgrad.deeplift.DeepLIFTRules).
        """
        grads = np.empty(x.shape, dtype=x.dtype)
        with chainer.using_config('train', False):
            for chunk, xs, ts in self._chunks(x, target):
                xv = chainer.Variable(xs)
                with self._rule_hook(rule, chunk) as hook:
                    logits = self.model(xv)
                if rule:
                    hook.check()
                gx, = chainer.grad([F.sum(self._objective(logits, ts))], [xv])
                grads[chunk] = chainer.backend.CpuDevice().send(gx.array)
        return grads

    __call__ = gradients

    def _rule_hook(self, rule, chunk):
        """The hook that gives the forward pass of a chunk its backward ``rule`` (see gradients)."""
        if rule is None:
            return contextlib.nullcontext()
        return ReLURule(rule) if isinstance(rule, str) else rule(self.model, chunk)

    def _layer_array(self, array):
        """A layer's output or gradient as a host array (N, C, h, w), whatever the model's activation layout."""
        array = chainer.backend.CpuDevice().send(array)
        if getattr(self.model, 'ACTIVATION_LAYOUT', 'NCHW') == 'CHWN':
            # contiguous, so that NumPy's reductions over an image's numbers run in one order for any batch
            # (on a strided view it sums otherwise than on a contiguous one, and one image's view is contiguous)
            array = np.ascontiguousarray(array.transpose(3, 0, 1, 2))
        return array

    def layer_gradients(self, x, target, layer=None):
        """The output of the link named ``layer`` (default: the last link with a 4-D output, the
        last convolutional block) and the objective's gradient w.r.t. it, both (N, C, h, w)."""
        feats, grads = [], []
        with chainer.using_config('train', False):
            for _, xs, ts in self._chunks(x, target):
                with LinkOutput(self.model, layer) as capture:
                    logits = self.model(chainer.Variable(xs))  # a Variable input, so the layer is in the graph
                capture.check()
                gh, = chainer.grad([F.sum(self._objective(logits, ts))], [capture.output])
                feats.append(self._layer_array(capture.output.array))
                grads.append(self._layer_array(gh.array))
        return np.concatenate(feats), np.concatenate(grads)

    def layer_values(self, x, layer=None):
        """The output of the link named ``layer`` (as layer_gradients), forward only, (N, C, h, w)."""
        return np.concatenate([self._layer_array(capture.output.array) for capture in self._captures(x, layer)])

    def layer_name(self, x, layer=None):
        """The name of the link whose output layer_values and layer_gradients read for images like x
        (C, H, W): ``layer``, or the one that None picks."""
        capture, = self._captures(x[None], layer)
        return capture.captured

    def _captures(self, x, layer):
        """The LinkOutput of each chunk of x, after a forward pass."""
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            for _, xs, _ in self._chunks(x, 0):
                with LinkOutput(self.model, layer) as capture:
                    self.model(xs)
                capture.check()
                yield capture

    def objective_values(self, x, target):
        """The objective of every image of x, forward only, shape (N,)."""
        values = np.empty(len(x), dtype=x.dtype)
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            for chunk, xs, ts in self._chunks(x, target):
                values[chunk] = chainer.backend.CpuDevice().send(self._objective(self.model(xs), ts).array)
        return values

    def seconds_per_image(self, x):
        """(gradient, forward pass): seconds per image of the shape of x (C, H, W), timed on one batch."""
        import time
        copies = np.repeat(x[None], min(self.batch_step(1, x.shape), 8), axis=0)
        self.gradients(copies[:1], 0)  # the first pass builds caches (folded kernels, buffers)
        seconds = []
        for work in (self.gradients, self.objective_values):
            start = time.perf_counter()
            work(copies, 0)
            seconds.append((time.perf_counter() - start) / len(copies))
        return tuple(seconds)

    def probabilities(self, x):
        """Softmax class probabilities for a batch (N, C, H, W), (N, classes)."""
        probs = []
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            for _, xs, _ in self._chunks(x, 0):
                probs.append(chainer.backend.CpuDevice().send(F.softmax(self.model(xs)).array))
        return np.concatenate(probs)


class Method:
    """A saliency method: ``attribute(xs, target)`` -> one attribution per image."""

    #: whether attributions carry a meaningful sign (drawn with a diverging colormap too)
    signed = True
    #: why SmoothGrad cannot wrap the method, or None if it can
    not_smoothable = None
    #: whether the method explains the class score only (its rules stop at the model's output: not the loss)
    score_only = False

    def __init__(self, engine):
        if self.score_only and engine.objective != 'score':
            raise InputError('%s explains the class score: its engine\'s objective must be \'score\', got %r'
                             % (type(self).__name__, engine.objective))
        self.engine = engine

    def attribute(self, xs, target):
        raise NotImplementedError

    def passes(self, x):
        """(gradients, forward passes) of the model that attributing one image like x (C, H, W) takes."""
        return 1, 0

    def __call__(self, x, target):
        """The attribution of one image x (C, H, W)."""
        return self.attribute(x[None], target)[0]


class Gradient(Method):
    """Vanilla gradient dS_c/dx (Simonyan et al. 2014)."""

    def attribute(self, xs, target):
        return self.engine(xs, target)


class GradientXInput(Method):
    """Gradient times input, x * dS_c/dx (Shrikumar et al. 2016)."""

    def attribute(self, xs, target):
        return xs * self.engine(xs, target)


class ReLURuleGradient(Method):
    """The gradient with every ReLU y = max(z, 0) backpropagating by the class's ``rule`` (sgrad.activations.RULES)
    in place of dS_c/dz = dS_c/dy [z > 0]; every other layer backpropagates its gradient."""

    rule = None

    def attribute(self, xs, target):
        return self.engine(xs, target, rule=self.rule)


class GuidedBackprop(ReLURuleGradient):
    """Guided Backprop (Springenberg et al. 2015): ReLUs pass only positive gradients of positive inputs,

        R_z = R_y [z > 0] [R_y > 0]
    """

    rule = 'guided'


class Deconvnet(ReLURuleGradient):
    """Deconvnet (Zeiler & Fergus 2014, arXiv:1311.2901) as a backward pass, as in Captum's Deconvolution: ReLUs
    pass the rectified gradient whatever the sign of their input,

        R_z = max(R_y, 0)

    and max pooling its gradient (the deconvnet's switches), convolutions and linear layers theirs (the
    transposed filters). A ReLU6 keeps its cap's gradient: R_z = max(R_y, 0) [z < 6] (sgrad.activations.RULES).
    """

    rule = 'deconvnet'


def path_sums(engine, xs, target, steps, points):
    """The Riemann sums of path integrals, sum over k < steps of w_k * dS_c/dx (p_k), for every image of xs:
    ``points(k, images)`` gives the path points p_k of those images (indices into xs) and the weights w_k
    that their gradients are multiplied by, both (len(images), C, H, W). The (step, image) pairs go
    through the engine a batch at a time and the points are made a batch at a time, so memory is bounded
    by the engine's batch size whatever the steps. Float64 sums."""
    n = len(xs)
    targets = np.broadcast_to(np.asarray(target), (n,))
    total = np.zeros(xs.shape, np.float64)
    for chunk in engine.batches(steps * n, xs.shape, 'path points'):
        steps_of, images_of = np.divmod(np.arange(chunk.start, chunk.stop), n)
        groups = [(k, images_of[steps_of == k]) for k in np.unique(steps_of)]
        inputs, weights = zip(*(points(k, images) for k, images in groups))
        grads = engine(np.concatenate(inputs), targets[images_of])
        start = 0
        for (_, images), weight in zip(groups, weights):
            total[images] += weight * grads[start:start + len(images)]
            start += len(images)
    return total


class PathMethod(Method):
    """An attribution integrated along a path from a reference image (``reference(xs)``) to the image,
    so that it adds up to S_c(x) - S_c(reference) (completeness). The reference is ``baseline`` (black
    if None; one image, or one per image (N, C, H, W)) unless a method's path defines its own; a method
    that averages over several paths (Gradient SHAP) names their ends (``path_ends``)."""

    baseline = None
    #: what the property that ``completeness`` checks is called, for its printout
    sums_to = 'completeness'

    def reference(self, xs):
        return np.broadcast_to(0 if self.baseline is None else self.baseline, xs.shape).astype(xs.dtype)

    def passes(self, x):
        return self.steps, 0

    def path_ends(self, x):
        """The starts and the ends of the paths that the attribution of x (C, H, W) averages over, (P, C, H, W)
        each: here the one path from the reference to x."""
        return self.reference(x[None]), x[None]

    def completeness(self, x, target, attribution):
        """(sum of attributions, S_c(x) - S_c(reference), or its mean over the paths): equal for an exact
        integral."""
        starts, ends = self.path_ends(x)
        values = self.engine.objective_values(np.concatenate([ends, starts]), target)
        return float(attribution.sum()), float(np.mean(values[:len(ends)] - values[len(ends):]))


#: Integrated Gradients' path points alpha_k, k = 0..m-1, by rule: 'midpoint' (k + 1/2) / m, this
#: project's (exact for a path that is linear in alpha); 'linspace' k / (m - 1), both ends, PAIR
#: saliency's (its IntegratedGradients, and XRAI's), which still divides the sum by m.
IG_POINTS = {'midpoint': lambda m: (np.arange(m) + 0.5) / m,
             'linspace': lambda m: np.linspace(0, 1, m)}


class IntegratedGradients(PathMethod):
    """Integrated Gradients (Sundararajan et al. 2017), a Riemann sum over ``steps`` points:

        IG(x) = (x - x') * 1/m sum_{k=0..m-1} dS_c/dx (x' + alpha_k * (x - x'))

    with baseline x' (black by default; one image, or one per image (N, C, H, W)) and alpha_k by the
    rule ``points`` (IG_POINTS: the midpoint rule by default). All m path points of all images go
    through the engine as chunked batches (path_sums).
    """

    def __init__(self, engine, steps=50, baseline=None, points='midpoint'):
        super().__init__(engine)
        if steps <= 0:
            raise InputError('--steps must be positive, got %d' % steps)
        self.steps, self.baseline, self.alphas = steps, baseline, IG_POINTS[points](steps)

    def attribute(self, xs, target):
        baseline = self.reference(xs)
        difference = xs - baseline

        def points(k, images):
            alpha = xs.dtype.type(self.alphas[k])
            return baseline[images] + alpha * difference[images], difference[images] / self.steps
        return path_sums(self.engine, xs, target, self.steps, points).astype(xs.dtype)


def bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of 1-D linear interpolation with pixel centres aligned (as PIL and OpenCV)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(weights, (np.arange(n_out), lo), 1 - (src - lo))
    np.add.at(weights, (np.arange(n_out), hi), src - lo)
    return weights


def upsample(maps, size):
    """Bilinear upsampling of (..., h, w) maps to (..., H, W), size = (H, W)."""
    rows, cols = bilinear_matrix(maps.shape[-2], size[0]), bilinear_matrix(maps.shape[-1], size[1])
    return rows @ maps @ cols.T


def channel_weighted_map(feats, weights):
    """ReLU(sum_k w_k A_k) of a layer's output A (N, C, h, w) and channel weights w (N, C): (N, 1, h, w)."""
    # a sum over the channel axis, in channel order for every image (einsum orders its loops by the shapes)
    return np.maximum((feats * weights.astype(feats.dtype)[:, :, None, None]).sum(axis=1, keepdims=True), 0)


class GradCAM(Method):
    """Grad-CAM (Selvaraju et al. 2017) on a convolutional layer, by default the last:
    ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of dS_c/dA_k, upsampled to the image.
    The CAM family (sgrad.cam) differs only in the channel weights.

    layer: the name of the link whose output is A (as in ``model.namedlinks()``, e.g. 'res3').
    """

    signed = False

    def __init__(self, engine, layer=None):
        super().__init__(engine)
        self.layer = layer

    @staticmethod
    def weights(feats, grads):
        """alpha_k, (N, C), from the layer's output A and the gradient dS_c/dA, both (N, C, h, w)."""
        return grads.mean(axis=(2, 3))

    def layer_map(self, xs, target):
        """The map at the layer's resolution, (N, 1, h, w)."""
        feats, grads = self.engine.layer_gradients(xs, target, self.layer)
        return channel_weighted_map(feats, self.weights(feats, grads))

    def attribute(self, xs, target):
        return upsample(self.layer_map(xs, target), xs.shape[-2:])


class GuidedGradCAM(GradCAM):
    """Guided Backprop times the upsampled Grad-CAM map (Selvaraju et al. 2017)."""

    signed = True

    def attribute(self, xs, target):
        return GuidedBackprop(self.engine).attribute(xs, target) * super().attribute(xs, target)

    def passes(self, x):
        return 2, 0


class Occlusion(Method):
    """Occlusion (Zeiler & Fergus 2014): the drop of the objective when a
    ``patch``-sized square is set to ``fill``, averaged over the patches that
    cover each pixel. All patch positions are scored as one batch.

    patch, stride: default 1/8 of the image's shorter side and half that (4 and 2 at 32x32).
    """

    def __init__(self, engine, patch=None, stride=None, fill=0.):
        super().__init__(engine)
        if (patch is not None and patch <= 0) or (stride is not None and stride <= 0):
            raise InputError('occlusion patch and stride must be positive')
        self.patch, self.stride, self.fill = patch, stride, fill

    def corners(self, h, w):
        """The patch side and the top-left corners of the patches on an h x w image."""
        patch = min(self.patch or max(1, min(h, w) // 8), h, w)
        stride = self.stride or max(1, patch // 2)
        return patch, [(i, j) for i in range(0, h - patch + 1, stride) for j in range(0, w - patch + 1, stride)]

    def passes(self, x):
        return 0, len(self.corners(*x.shape[-2:])[1]) + 1

    def attribute(self, xs, target):
        n, _, h, w = xs.shape
        patch, corners = self.corners(h, w)
        occluded = np.repeat(xs[:, None], len(corners), axis=1)       # (N, P, C, H, W)
        cover = np.zeros((len(corners), h, w), dtype=np.float32)
        for p, (i, j) in enumerate(corners):
            occluded[:, p, :, i:i + patch, j:j + patch] = self.fill
            cover[p, i:i + patch, j:j + patch] = 1
        targets = np.repeat(np.broadcast_to(target, n), len(corners))
        drops = (self.engine.objective_values(xs, target)[:, None]
                 - self.engine.objective_values(occluded.reshape((-1,) + xs.shape[1:]), targets)
                 .reshape(n, len(corners)))
        # each image's sum over patches in one order whatever the batch (a BLAS product's order depends on N)
        covers = cover.reshape(len(corners), -1).astype(drops.dtype)
        attribution = row_products(drops, covers).reshape(n, h, w) / np.maximum(cover.sum(axis=0), 1)
        return attribution[:, None].astype(np.float32)


def noise_stdev(x, noise):
    """The paper's noise scale: sigma = noise * (max(x) - min(x))."""
    return noise * (float(x.max()) - float(x.min()))


def noisy_copies(x, noise, samples, rng):
    """``samples`` copies of the image x, each plus Gaussian noise N(0, sigma^2)."""
    sigma = noise_stdev(x, noise)
    noisy = rng.normal(0., sigma, size=(samples,) + x.shape).astype(x.dtype)
    noisy += x  # the same sums as tiling x and adding, without the tiled copy (~5 ms of a CifarNet map)
    return noisy


#: The running sums over samples that the aggregations need.
SUMMANDS = {'|a|': np.abs, 'a': lambda a: a, 'a^2': np.square}

#: How SmoothGrad combines the n attributions a_i of the noisy copies: the sums it needs,
#: and the map from those sums. The sums are kept in float64 over batches of samples, so
#: memory does not grow with n (and E[a^2] - E[a]^2 loses nothing that float32 maps hold).
AGGREGATIONS = {
    'sum_abs': (('|a|',), lambda s, n: s['|a|']),                              # the blog: sum of |a_i|
    'mean': (('a',), lambda s, n: s['a'] / n),                                 # the paper, eq. 3
    'squared': (('a^2',), lambda s, n: s['a^2'] / n),                          # SmoothGrad^2 (Hooker et al.)
    'var': (('a', 'a^2'), lambda s, n: np.maximum(s['a^2'] / n - (s['a'] / n) ** 2, 0)),  # VarGrad (Adebayo)
}


class SmoothGrad(Method):
    """SmoothGrad (Smilkov et al. 2017) over any base method:

        M_c(x) = aggregate_{i=1..n} base(x + g_i),   g_i ~ N(0, sigma^2),   sigma = noise * (max(x) - min(x))

    The noisy copies are drawn and attributed in batches of the engine's batchsize (the
    same random stream as drawing all n at once), so memory is bounded for any n.
    """

    def __init__(self, base, noise=0.1, samples=100, aggregate='sum_abs', rng=None):
        super().__init__(base.engine)
        if noise < 0:
            raise InputError('noise must be >= 0, got %g' % noise)
        if samples <= 0:
            raise InputError('samples must be positive, got %d' % samples)
        if aggregate not in AGGREGATIONS:
            raise InputError('aggregate must be one of %s' % ', '.join(AGGREGATIONS))
        if base.not_smoothable:
            raise InputError('SmoothGrad does not apply to %s: %s' % (type(base).__name__, base.not_smoothable))
        self.base, self.noise, self.samples, self.aggregate = base, noise, samples, aggregate
        self.signed = base.signed and aggregate == 'mean'
        self.rng = np.random.RandomState() if rng is None else rng

    def passes(self, x):
        return tuple(self.samples * count for count in self.base.passes(x))

    def attribute(self, xs, target):
        maps = np.stack([self._aggregate(x, t) for x, t in zip(xs, np.broadcast_to(target, len(xs)))])
        if self.aggregate == 'sum_abs' and self.engine.objective == 'loss':
            maps /= self.samples  # the blog's model.loss averages the cross-entropy over the tiled batch
        return maps

    def _aggregate(self, x, target):
        summands, finish = AGGREGATIONS[self.aggregate]
        sums = dict.fromkeys(summands, 0.)
        for chunk in self.engine.batches(self.samples, x.shape, 'noisy samples'):
            attributions = self.base.attribute(noisy_copies(x, self.noise, chunk.stop - chunk.start, self.rng),
                                               target).astype(np.float64)
            for name in summands:
                sums[name] = sums[name] + SUMMANDS[name](attributions).sum(axis=0)
        return finish(sums, self.samples).astype(x.dtype)


def attribute_each(method, images, targets, keys, seed=0, progress=None):
    """``method``'s attributions of many images (N, C, H, W) for their targets (N,). SmoothGrad
    draws each image's noise from a stream of its own, RandomState([seed, key]) with ``key`` the
    image's index in its dataset, so that a map does not depend on the images computed beside it
    (nor, under mpiexec, on the rank that computes it); ``seed`` may be a sequence of integers,
    RandomState([*seed, key]). progress(done, N) after each step."""
    smooth = isinstance(method, SmoothGrad)
    step = 1 if smooth else method.engine.batch_step(len(images), images.shape)
    parts = []
    for start in range(0, len(images), step):
        if smooth:
            method.rng = np.random.RandomState(list(np.atleast_1d(seed)) + [keys[start]])
        parts.append(method.attribute(images[start:start + step], targets[start:start + step]))
        if progress:
            progress(min(len(images), start + step), len(images))
    return np.concatenate(parts)


def channel_sum_abs(attribution):
    """The blog's 2-D map: |attribution| summed over channels, (..., C, H, W) -> (..., H, W)."""
    return np.abs(attribution).sum(axis=-3)


def smoothgrad(model, x, target, noise=0.1, samples=100, batchsize=AUTO_BATCHSIZE, rng=None,
               objective='score'):
    """The blog's SmoothGrad map (H, W) of one [0, 1] image x (C, H, W) for class ``target``."""
    engine = GradientEngine(model, objective, batchsize)
    return channel_sum_abs(SmoothGrad(Gradient(engine), noise, samples, 'sum_abs', rng)(x, target))
