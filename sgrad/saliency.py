"""Saliency methods on one shared, batched gradient engine.

Every method asks :class:`GradientEngine` for the input gradients of a batch;
only the engine runs the model, chunks the batch and picks the objective, and
only :func:`noisy_copies` draws noise.
"""
import chainer
import chainer.functions as F
import numpy as np

from sgrad import InputError

OBJECTIVES = ('score', 'loss')


class GradientEngine:
    """Gradients of a class objective with respect to the input, for a whole batch.

    objective:
      'score': the class score (logit) S_c(x) of the SmoothGrad paper;
      'loss':  the blog's ``model.loss``: softmax cross-entropy against class c,
               averaged over the whole batch (so each sample's gradient carries 1/N).
    batchsize: forward/backward at most this many images at a time (bounded
      memory for large N); None runs the whole batch at once.
    """

    def __init__(self, model, objective='score', batchsize=None, progress=None):
        if objective not in OBJECTIVES:
            raise InputError('objective must be one of %s, got %r' % (', '.join(OBJECTIVES), objective))
        if batchsize is not None and batchsize <= 0:
            raise InputError('--batchsize must be positive, got %d' % batchsize)
        self.model = model
        self.objective = objective
        self.batchsize = batchsize
        self.progress = progress

    def _objective(self, logits, target, n_total):
        if self.objective == 'score':
            return F.sum(F.select_item(logits, target))
        return F.sum(F.softmax_cross_entropy(logits, target, reduce='no')) / n_total

    def __call__(self, x, target):
        """d objective / d x for x of shape (N, C, H, W); target: a class or one per image."""
        n = len(x)
        target = np.broadcast_to(np.asarray(target, dtype=np.int32), (n,))
        step = self.batchsize or n
        device = self.model.device
        grads = np.empty(x.shape, dtype=np.float32)
        with chainer.using_config('train', False), chainer.using_config('enable_backprop', True):
            for start in range(0, n, step):
                stop = min(n, start + step)
                xv = chainer.Variable(device.send(np.ascontiguousarray(x[start:stop], dtype=np.float32)))
                objective = self._objective(self.model(xv), device.send(target[start:stop]), n)
                gx, = chainer.grad([objective], [xv])
                grads[start:stop] = chainer.backend.CpuDevice().send(gx.array)
                if self.progress:
                    self.progress(stop, n)
        return grads

    def probabilities(self, x):
        """Softmax class probabilities for a batch (N, C, H, W)."""
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            y = F.softmax(self.model(self.model.device.send(np.asarray(x, dtype=np.float32))))
        return chainer.backend.CpuDevice().send(y.array)


def noise_stdev(x, noise):
    """The paper's noise scale: sigma = noise * (max(x) - min(x))."""
    return noise * (float(x.max()) - float(x.min()))


def noisy_copies(x, noise, samples, rng):
    """``samples`` copies of the image x, each plus Gaussian noise N(0, sigma^2)."""
    sigma = noise_stdev(x, noise)
    eps = rng.normal(0., sigma, size=(samples,) + x.shape).astype(np.float32)
    return np.tile(x.astype(np.float32), (samples, 1, 1, 1)) + eps


def channel_sum_abs(grads):
    """The blog's map: |gradient| summed over samples and channels, (N, C, H, W) -> (H, W)."""
    return np.abs(grads).sum(axis=(0, 1))


class SmoothGrad:
    """SmoothGrad (Smilkov et al. 2017, eq. 3), the blog's way.

        M_c(x) = sum_{i=1..n} sum_channels | d S_c / dx (x + g_i) |,   g_i ~ N(0, sigma^2),
        sigma  = noise * (max(x) - min(x))

    (the paper's mean, up to the constant 1/n). All n noisy copies go through
    the engine as one batch, chunked by the engine's batchsize.
    """

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, x, target, noise=0.1, samples=100, rng=None):
        if noise < 0:
            raise InputError('noise must be >= 0, got %g' % noise)
        if samples <= 0:
            raise InputError('samples must be positive, got %d' % samples)
        rng = np.random.RandomState() if rng is None else rng
        return channel_sum_abs(self.engine(noisy_copies(x, noise, samples, rng), target))


def smoothgrad(model, x, target, noise=0.1, samples=100, batchsize=None, rng=None, objective='score'):
    """SmoothGrad map (H, W) of one [0, 1] image x (C, H, W) for class ``target``."""
    return SmoothGrad(GradientEngine(model, objective, batchsize))(x, target, noise, samples, rng)
