"""Chainer FunctionNodes behind the model: a faster CPU 3x3 convolution and the
Guided Backprop ReLU.

Convolution.

Chainer's CPU convolution builds an im2col buffer of shape (N, C, kh, kw, H, W)
and then calls ``numpy.tensordot``, which first copies that buffer into a
(N*H*W, C*kh*kw) layout.  Multiplying the weight matrix against each image's
(C*kh*kw, H*W) slice with a batched ``matmul`` uses the buffer as it is and
writes the output directly in NCHW order, so the largest copy of every
convolution disappears.  Forward and backward compute the same numbers as
``F.convolution_2d``; they are used only for NumPy arrays.
"""
import contextlib

import chainer
import chainer.functions as F
import numpy as np
from chainer.utils import conv

chainer.global_config.guided_relu = False


def _im2col(x):
    """(N, C, H, W) -> (N, C*9, H*W) patches of a 3x3, pad-1, stride-1 conv."""
    n, c, h, w = x.shape
    padded = np.zeros((n, c, h + 2, w + 2), dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    col = np.empty((n, c, 3, 3, h, w), dtype=x.dtype)
    for ky in range(3):
        for kx in range(3):
            col[:, :, ky, kx] = padded[:, :, ky:ky + h, kx:kx + w]
    return col.reshape(n, c * 9, h * w)


class Convolution3x3(chainer.function_node.FunctionNode):
    """y = W * x for a 3x3 kernel, pad 1, stride 1, no bias (CPU only)."""

    def forward_cpu(self, inputs):
        x, W = inputs
        n, _, h, w = x.shape
        col = _im2col(x)
        self.retain_inputs((0, 1))
        self._col = col
        y = np.matmul(W.reshape(W.shape[0], -1), col)
        return y.reshape(n, W.shape[0], h, w),

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy, = grad_outputs
        ret = []
        if 0 in indexes:
            ret.append(Convolution3x3Grad(x.shape).apply((W, gy))[0])
        if 1 in indexes:
            ret.append(Convolution3x3WeightGrad(self._col, W.shape)
                       .apply((gy,))[0])
        return ret


class Convolution3x3Grad(chainer.function_node.FunctionNode):
    """Gradient with respect to the input: col2im(W^T gy)."""

    def __init__(self, x_shape):
        self.x_shape = x_shape

    def forward_cpu(self, inputs):
        W, gy = inputs
        n, c, h, w = self.x_shape
        o = W.shape[0]
        gcol = np.matmul(W.reshape(o, -1).T, gy.reshape(n, o, h * w))
        gcol = gcol.reshape(n, c, 3, 3, h, w)
        return conv.col2im_cpu(gcol, 1, 1, 1, 1, h, w),

    def backward(self, indexes, grad_outputs):
        raise NotImplementedError('double backprop is not supported')


class Convolution3x3WeightGrad(chainer.function_node.FunctionNode):
    """Gradient with respect to the weights: sum_n gy[n] col[n]^T."""

    def __init__(self, col, W_shape):
        self.col = col
        self.W_shape = W_shape

    def forward_cpu(self, inputs):
        gy, = inputs
        n, o = gy.shape[:2]
        gW = np.matmul(gy.reshape(n, o, -1),
                       self.col.transpose(0, 2, 1)).sum(axis=0)
        return gW.reshape(self.W_shape),

    def backward(self, indexes, grad_outputs):
        raise NotImplementedError('double backprop is not supported')


#: Below this many output pixels per image, the per-image products are too small
#: for BLAS and Chainer's single large GEMM is faster (measured on 2 cores).
MIN_PIXELS_FOR_BATCHED_GEMM = 256


def convolution_3x3(x, W):
    """3x3, pad 1, stride 1 convolution without bias.

    Uses :class:`Convolution3x3` for NumPy inputs with large feature maps and
    ``F.convolution_2d`` otherwise (GPU arrays, small maps).
    """
    h, w = x.shape[2:]
    if isinstance(x.array if isinstance(x, chainer.Variable) else x,
                  np.ndarray) and h * w >= MIN_PIXELS_FOR_BATCHED_GEMM:
        return Convolution3x3().apply((x, W))[0]
    return F.convolution_2d(x, W, pad=1)


class GuidedReLU(chainer.function_node.FunctionNode):
    """ReLU whose backward passes a gradient only where both the forward input
    and the incoming gradient are positive (Springenberg et al. 2015)."""

    def forward(self, inputs):
        x, = inputs
        self.retain_inputs((0,))
        return chainer.backend.get_array_module(x).maximum(x, 0),

    def backward(self, indexes, grad_outputs):
        x, = self.get_retained_inputs()
        gy, = grad_outputs
        return gy * ((x.array > 0) & (gy.array > 0)).astype(gy.dtype),


def relu(x):
    """F.relu, or GuidedReLU inside a :func:`guided_backprop` block."""
    if chainer.config.guided_relu:
        return GuidedReLU().apply((x,))[0]
    return F.relu(x)


@contextlib.contextmanager
def guided_backprop():
    """Within this block the model's ReLUs backpropagate the Guided Backprop way.

    A Chainer config switch (like ``train``): the model object and F.relu stay as they are.
    """
    with chainer.using_config('guided_relu', True):
        yield
