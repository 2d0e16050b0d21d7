"""Chainer's linear layer with every image's output computed the same way in a batch of any size.

A BLAS picks its kernel, blocking and threads by the matrices' sizes: OpenBLAS sums a row of x @ W.T in
another order for one row than for ten, and for two threads than for one (2.5e-5 of a logit here), so the
same image got another gradient in another batch. ``linear`` computes each row on its own: by
sgrad.native's product kernel, whose sums run in one order whatever the shapes, or, where it is not built,
by one single-threaded BLAS product of the same (1, K) @ (K, O) shape per row. The nodes subclass Chainer's
LinearFunction and LinearGradData, so the rule-based methods treat them as Chainer's; ``Linear`` is
``L.Linear`` (the same parameters, the same saved names) computed by ``linear``.
"""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy
from chainer.functions.connection import linear as chainer_linear

from sgrad import native
from sgrad.blas import blas_threads
from sgrad.blocks import for_blocks, worker_count


def row_products(a, b, column_bias=None):
    """a @ b (+ column_bias), each row of the result computed alone (see the module's docstring): by the
    compiled kernel over blocks of rows on every core, else one single-threaded BLAS product a row; None
    for arrays neither can take (CuPy, mixed types)."""
    if not isinstance(a, numpy.ndarray) or len({a.dtype, b.dtype}) > 1:
        return None
    a, b = numpy.ascontiguousarray(a), numpy.ascontiguousarray(b)
    out = numpy.empty((a.shape[0], b.shape[1]), a.dtype)
    workers = max(1, min(worker_count(), a.shape[0]))
    blocks = [range(a.shape[0] * i // workers, a.shape[0] * (i + 1) // workers) for i in range(workers)]
    if native.supports(a, b):
        for_blocks(lambda rows: native.product(a, b, out, rows, column_bias=column_bias), blocks)
        return out

    def block(rows):
        with blas_threads(1):
            for i in rows:
                numpy.matmul(a[i:i + 1], b, out=out[i:i + 1])
                if column_bias is not None:
                    out[i] += column_bias
    for_blocks(block, blocks)
    return out


class LinearFunction(chainer_linear.LinearFunction):
    """y = x W^T + b, each row by row_products (Chainer's own computation where it cannot take the arrays)."""

    def forward(self, inputs):
        x, W = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        if b is not None and b.dtype != x.dtype:
            return super().forward(inputs)
        y = row_products(x, W.T, b)
        if y is None:
            return super().forward(inputs)
        self.retain_inputs((0, 1))
        return y,

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy, = grad_outputs
        ret = []
        if 0 in indexes:
            ret.append(LinearGradData().apply((W, gy))[0])
        if 1 in indexes:
            ret.append(chainer_linear.LinearGradWeight(W.dtype).apply((x, gy))[0])
        if 2 in indexes:
            ret.append(F.sum(gy, axis=0))
        return ret


class LinearGradData(chainer_linear.LinearGradData):
    """gx = gy W, each row by row_products."""

    def forward(self, inputs):
        W, gy = inputs
        gx = row_products(gy, W)
        if gx is None:
            return super().forward(inputs)
        self.retain_inputs((0, 1))
        return gx,


def linear(x, W, b=None):
    """F.linear(x, W, b), an image's row the same in any batch; x's axes after the first are flattened."""
    if x.ndim > 2:
        x = F.reshape(x, (x.shape[0], -1))
    return LinearFunction().apply((x, W) if b is None else (x, W, b))[0]


class Linear(L.Linear):
    """L.Linear computed by ``linear``."""

    def forward(self, x, n_batch_axes=1):
        if self.W.array is None:
            self._initialize_params(x.size // x.shape[0])
        if n_batch_axes != 1:
            return super().forward(x, n_batch_axes)
        return linear(x, self.W, self.b)
