"""BatchNorm in the models' convolutional blocks. Training: BatchNorm then ReLU over (C, H, W, N) activations
as one Chainer FunctionNode (``batch_normalization_relu``), one pass per channel block (sgrad.blocks.for_blocks),
sgrad.native's where it is built. Inference: the BatchNorm folded into the convolution before it
(``FoldsBatchNorm``), in the model copy that saliency maps run on (``folded_copy``).
"""
import weakref

import chainer
from chainer.backend import get_array_module

from sgrad import native
from sgrad.activations import _relu_mask
from sgrad.blocks import channel_blocks, for_blocks


class BatchNormReLU(chainer.function_node.FunctionNode):
    """Training mode: y = ReLU(gamma (x - mean) / sqrt(var + eps) + beta) over each channel of (C, H, W, N)
    activations, mean and (biased) var those of the batch, as F.batch_normalization(axis=(1, 2, 3)) then
    F.relu compute, in one pass per channel block (sgrad.native's where it is built); the running
    statistics (avg_mean, avg_var) are updated in place as Chainer's BatchNormalization link does
    (decay, unbiased var)."""

    def __init__(self, eps, decay, avg_mean, avg_var):
        self.eps, self.decay, self.avg_mean, self.avg_var = eps, decay, avg_mean, avg_var

    def forward(self, inputs):
        x, gamma, beta = inputs
        xp = get_array_module(x)
        c, count = x.shape[0], x.size // x.shape[0]
        y = xp.empty_like(x)
        mean, var = xp.empty(c, dtype=x.dtype), xp.empty(c, dtype=x.dtype)
        inv_std = xp.empty(c, dtype=x.dtype)

        def block(channels):
            values = x[channels].reshape(-1, count)
            mean[channels] = values.mean(axis=1)
            centred = values - mean[channels, None]
            var[channels] = (centred * centred).mean(axis=1)
            inv_std[channels] = 1 / xp.sqrt(var[channels] + self.eps)
            out = y[channels].reshape(-1, count)
            xp.multiply(centred, (gamma[channels] * inv_std[channels])[:, None], out=out)
            out += beta[channels, None]
            xp.maximum(out, 0, out=out)
        if native.supports(x, gamma, beta):
            for_blocks(lambda channels: native.batch_norm_relu(x, gamma, beta, self.eps, y, mean, var, inv_std,
                                                                channels), channel_blocks(x))
        else:
            for_blocks(block, channel_blocks(x))
        self.avg_mean *= self.decay
        self.avg_mean += (1 - self.decay) * mean
        self.avg_var *= self.decay
        self.avg_var += (1 - self.decay) * count / max(count - 1., 1.) * var
        self.mean, self.inv_std = mean, inv_std
        self.retain_inputs((0, 1))
        self.retain_outputs((0,))
        return y,

    def backward(self, indexes, grad_outputs):
        x, gamma = self.get_retained_inputs()
        y, = self.get_retained_outputs()
        grads = BatchNormReLUGrad(self.mean, self.inv_std).apply((x, gamma, y) + grad_outputs)
        return [grads[i] for i in indexes]


class BatchNormReLUGrad(chainer.function_node.FunctionNode):
    """The gradients of BatchNormReLU (x, gamma, beta), per channel block: with g the ReLU-masked gy and
    x^ = (x - mean) / std, gbeta = sum g, ggamma = sum g x^, gx = gamma / std (g - (gbeta + x^ ggamma) / M),
    computed as a g + b x + c per channel (no x^ buffer)."""

    def __init__(self, mean, inv_std):
        self.mean, self.inv_std = mean, inv_std

    def forward(self, inputs):
        x, gamma, y, gy = inputs
        xp = get_array_module(x)
        c, count = x.shape[0], x.size // x.shape[0]
        gx, ggamma, gbeta = xp.empty_like(x), xp.empty(c, dtype=x.dtype), xp.empty(c, dtype=x.dtype)

        def block(channels):
            values, out = x[channels].reshape(-1, count), gx[channels].reshape(-1, count)
            # a product with the mask: xp.where branches per element, 10x slower on a ReLU's random mask
            g = xp.multiply(gy[channels].reshape(-1, count), _relu_mask(y[channels].reshape(-1, count)))
            mean, inv_std = self.mean[channels], self.inv_std[channels]
            gbeta[channels] = g.sum(axis=1)
            ggamma[channels] = inv_std * (xp.einsum('ij,ij->i', g, values) - mean * gbeta[channels])
            scale = gamma[channels] * inv_std
            slope = -scale * inv_std * ggamma[channels] / count
            xp.multiply(g, scale[:, None], out=out)
            g = xp.multiply(values, slope[:, None], out=g)
            out += g
            out -= (scale * gbeta[channels] / count + slope * mean)[:, None]
        if native.supports(x, gamma, y, gy, self.mean):
            for_blocks(lambda channels: native.batch_norm_relu_grad(
                x, y, gy, gamma, self.mean, self.inv_std, gx, ggamma, gbeta, channels), channel_blocks(x))
        else:
            for_blocks(block, channel_blocks(x))
        return gx, ggamma, gbeta


def batch_normalization_relu(x, bn):
    """Training mode: F.relu(bn(x)) for a chainer.links.BatchNormalization ``bn`` over axes (1, 2, 3) of
    (C, H, W, N) activations, bn's running statistics updated as bn(x) updates them."""
    return BatchNormReLU(bn.eps, bn.decay, bn.avg_mean, bn.avg_var).apply((x, bn.gamma, bn.beta))[0]


class FoldsBatchNorm:
    """For a Chain with links ``conv`` (no bias) and ``bn``: fold_batchnorm() merges the inference-mode
    BatchNorm into the convolution, W' = s W, b' = beta - s mean, s = gamma / sqrt(var + eps), and the
    block's forward then uses folded_parameters()."""

    folded = None

    #: Once folded, the compiled kernels' rearrangements of the folded weights (sgrad.convolution.convolution_3x3)
    kernels_cache = None

    def fold_batchnorm(self):
        bn = self.bn
        scale = bn.gamma.array / self.xp.sqrt(bn.avg_var + bn.eps)
        self.folded = (self.conv.W.array * scale[:, None, None, None], bn.beta.array - bn.avg_mean * scale)
        self.kernels_cache = {}

    def folded_parameters(self):
        """(W', b') once folded, else None."""
        if self.folded is not None and chainer.config.train:
            raise RuntimeError('a model with folded BatchNorm is for inference only')
        return self.folded


def folded_copy(model):
    """A copy of model for saliency maps: every FoldsBatchNorm block folded (same outputs, faster). The
    links and parameters are new objects holding copies of the arrays, and the folded weights are
    computed from the running statistics once, so a later update of model leaves the copy as it was (the
    statistics' arrays themselves stay shared, read only by the folding). Made in a millisecond:
    Chainer's share-mode copy, then new parameters (copy.deepcopy took 8-12 ms, a twentieth of a map).

    While model's weights stay as they were (the same arrays, equal to what the copy was made from), a
    later call returns the same copy, with the kernels its convolutions rearranged: a loop of
    smoothgrad() calls, one GradientEngine each, then folds and rearranges once (a fresh copy cost a
    CifarNet map 5.7 of 57 ms; the check, 0.2 ms). So treat the copy as read-only."""
    arrays = _weights(model)
    made = _FOLDED_COPIES.get(model)
    if made is not None and _unchanged(made[0], arrays):
        return made[1]
    copy = model.copy(mode='share')
    for link in copy.links():
        own = [(name[1:], param) for name, param in link.namedparams(include_uninit=False) if name.count('/') == 1]
        with link.init_scope():
            for name, param in own:
                setattr(link, name, chainer.Parameter(param.array.copy()))
        if isinstance(link, FoldsBatchNorm):
            link.fold_batchnorm()
    _FOLDED_COPIES[model] = ([(a, a.copy()) for a in arrays], copy)
    return copy


#: model -> ((array, its value then), the folded copy made of them), for folded_copy
_FOLDED_COPIES = weakref.WeakKeyDictionary()


def _weights(model):
    """The arrays a folded copy is made of: model's parameters and array-valued persistent values (the
    BatchNorm statistics)."""
    persistent = (getattr(link, name) for link in model.links() for name in link._persistent)
    return [p.array for p in model.params(include_uninit=False)] + [
        a for a in persistent if isinstance(a, chainer.get_array_types())]


def _unchanged(then, arrays):
    """Whether ``arrays`` are the arrays of ``then`` ((array, copy) pairs), each still equal to its copy."""
    return len(then) == len(arrays) and all(
        a is was and bool(get_array_module(a).array_equal(a, value)) for (was, value), a in zip(then, arrays))
