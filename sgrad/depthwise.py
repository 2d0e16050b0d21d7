"""EfficientNet-Lite0's depthwise-separable convolution on (N, C, H, W) images, as Chainer FunctionNodes: the
depthwise convolution (``depthwise_convolution``: any kernel size, stride and zero padding, with no padded copy
or im2col buffer; sgrad.native's compiled kernel where it is built, else band matrices or windows in NumPy) and
the 1x1 convolution (``pointwise_convolution``: one matrix product per image, the same in any batch), each with the bias and an
optional ReLU6 fused in (sgrad.activations.ClipsOutput). Their gradients are nodes too, so every order of
derivative exists; all work block by block (sgrad.blocks.for_blocks).
"""
import chainer
import chainer.functions as F
import numpy
from chainer.backend import get_array_module

from sgrad import native
from sgrad.activations import ClipsOutput, _clip_in_place
from sgrad.blas import blas_threads
from sgrad.blocks import _ranges, for_blocks, plane_blocks, worker_count


NO_PADDING = ((0, 0), (0, 0))


def _padded_shape(shape, pads):
    return tuple(shape[:2]) + tuple(size + sum(pad) for size, pad in zip(shape[2:], pads))


def _pad(a, pads):
    """(N, C, H, W) ``a`` with pads ((top, bottom), (left, right)) of zeros; a itself without padding."""
    if pads == NO_PADDING:
        return a
    padded = get_array_module(a).zeros(_padded_shape(a.shape, pads), dtype=a.dtype)
    padded[_interior(a.shape, pads)] = a
    return padded


def _interior(shape, pads):
    """The index of the unpadded part of a padded array."""
    return (Ellipsis,) + tuple(slice(pad[0], pad[0] + size) for size, pad in zip(shape[2:], pads))


def _phases(a, stride):
    """The stride x stride subsampled phases a[:, :, p::stride, q::stride], each contiguous, keyed (p, q):
    every kernel position then reads a unit-stride window of one phase."""
    xp = get_array_module(a)
    return {(p, q): xp.ascontiguousarray(a[:, :, p::stride, q::stride]) for p in range(stride) for q in range(stride)}


def _window(phases, ky, kx, stride, out_shape):
    """The (N, C, oH, oW) part of the input that kernel position (ky, kx) meets."""
    oy, ox = ky // stride, kx // stride
    return phases[ky % stride, kx % stride][:, :, oy:oy + out_shape[0], ox:ox + out_shape[1]]


#: Input widths up to which the depthwise convolution runs as matrix products with band matrices
#: (below) rather than as one multiply-add per kernel position: measured on EfficientNet-Lite0's layers,
#: the band products win up to 56 pixels and lose at 112, where each output column's k taps sit in
#: a matrix column of 112 rows.
BAND_MAX_WIDTH = 64


def _band_matrices(W, width, stride):
    """T (C, k, width, oW) with T[c, ky, ox * stride + kx, ox] = W[c, 0, ky, kx]: one row of the depthwise
    convolution's kernel as a band matrix, so that a row of the output is (input row) @ T[c, ky]; or
    None for inputs wider than BAND_MAX_WIDTH."""
    if width > BAND_MAX_WIDTH:
        return None
    xp = get_array_module(W)
    c, _, k, _ = W.shape
    out_width = (width - k) // stride + 1
    T = xp.zeros((c, k, width, out_width), dtype=W.dtype)
    columns = xp.arange(out_width)
    for kx in range(k):
        T[:, :, columns * stride + kx, columns] = W[:, 0, :, kx, None]
    return T


def _cached_bands(W, width, stride, cache, transposed=False):
    """_band_matrices(W, width, stride), each matrix transposed (contiguous) if ``transposed``; kept in
    ``cache``, a dict that belongs to this W (or None: made anew), for the next batch."""
    key = (width, stride, transposed)
    if cache is not None and key in cache:
        return cache[key]
    bands = _band_matrices(W, width, stride)
    if transposed and bands is not None:
        bands = get_array_module(W).ascontiguousarray(bands.transpose(0, 1, 3, 2))
    if cache is not None:
        cache[key] = bands
    return bands


def _kernel_rows(a, ky, stride, out_height):
    """The rows of (N, C, H, W) ``a`` that kernel row ky meets, one per output row (a strided view)."""
    return a[:, :, ky:ky + (out_height - 1) * stride + 1:stride]


def _convolve_block(x, W, bands, stride, out):
    """out = the depthwise convolution of the padded block x: for each kernel row, the input rows it
    meets times its band matrix (narrow inputs: BLAS multiplies at its full rate), or one multiply-add
    per kernel position over a window (wide ones); no im2col buffer either way."""
    xp = get_array_module(x)
    k = W.shape[2]
    if bands is not None:
        xp.matmul(_kernel_rows(x, 0, stride, out.shape[2]), bands[:, 0], out=out)
        for ky in range(1, k):
            out += xp.matmul(_kernel_rows(x, ky, stride, out.shape[2]), bands[:, ky])
        return
    phases = _phases(x, stride)
    term = xp.empty_like(out)
    for position in range(k * k):
        ky, kx = divmod(position, k)
        xp.multiply(_window(phases, ky, kx, stride, out.shape[2:]), W[None, :, 0, ky, kx, None, None],
                    out=term if position else out)
        if position:
            out += term


def _adjoint_block(gy, W, bands_t, stride, padded_shape):
    """The adjoint of _convolve_block in x: the gradient of the padded block. Stride 1, narrow: the
    output-sized gradient, padded by k - 1 rows, times the transposed band matrices, row-flipped;
    otherwise each kernel row (position) adds its product to the rows (window) it met."""
    xp = get_array_module(gy)
    k = W.shape[2]
    n, c, h, w = padded_shape
    if bands_t is not None and stride == 1:
        rows = xp.zeros((n, c, gy.shape[2] + 2 * (k - 1), gy.shape[3]), dtype=gy.dtype)
        rows[:, :, k - 1:k - 1 + gy.shape[2]] = gy
        gx = xp.matmul(rows[:, :, k - 1:k - 1 + h], bands_t[:, 0])
        for ky in range(1, k):
            gx += xp.matmul(rows[:, :, k - 1 - ky:k - 1 - ky + h], bands_t[:, ky])
        return gx
    if bands_t is not None:
        gx = xp.zeros(padded_shape, dtype=gy.dtype)
        for ky in range(k):
            _kernel_rows(gx, ky, stride, gy.shape[2])[...] += xp.matmul(gy, bands_t[:, ky])
        return gx
    phases = {(p, q): xp.zeros((n, c, -(-(h - p) // stride), -(-(w - q) // stride)), dtype=gy.dtype)
              for p in range(stride) for q in range(stride)}
    term = xp.empty_like(gy)
    for ky in range(k):
        for kx in range(k):
            xp.multiply(gy, W[None, :, 0, ky, kx, None, None], out=term)
            _window(phases, ky, kx, stride, gy.shape[2:])[...] += term
    if stride == 1:
        return phases[0, 0]
    gx = xp.empty(padded_shape, dtype=gy.dtype)
    for (p, q), phase in phases.items():
        gx[:, :, p::stride, q::stride] = phase
    return gx


def _plane_ranges(a):
    """Ranges of the planes (image * C + channel) of (N, C, H, W) a, about BLOCK_BYTES each and at least
    one per thread, for sgrad.native's depthwise kernels."""
    return [range(part.start, part.stop) for part in _ranges(a.shape[0] * a.shape[1], a.itemsize * a[0, 0].size)]


def _native_depthwise(x, W, stride, pads, b, cap, out_size):
    """The depthwise convolution (out_size: its (oH, oW)) by sgrad.native's compiled kernel on every core,
    or None where it cannot take these arrays."""
    if W.dtype != x.dtype or not native.supports(x, W, *(() if b is None else (b,)), contiguous=False):
        return None
    x, W, b = (None if a is None else numpy.ascontiguousarray(a) for a in (x, W, b))
    y = numpy.empty(x.shape[:2] + tuple(out_size), x.dtype)
    for_blocks(lambda planes: native.depthwise(x, W, stride, pads, b, cap, y, planes), _plane_ranges(y))
    return y


def _depthwise_forward(x, W, stride, pads, b=None, cap=None, cache=None):
    """y[n, c] = sum over kernel positions of W[c, 0, ky, kx] * (x[n, c] zero-padded by pads) shifted
    (+ b[c], then clipped to [0, cap] when cap is given): by the compiled kernel, else block by block
    (for_blocks) in NumPy."""
    xp = get_array_module(x)
    h, w = _padded_shape(x.shape, pads)[2:]
    k = W.shape[2]
    out_size = (h - k) // stride + 1, (w - k) // stride + 1
    y = _native_depthwise(x, W, stride, pads, b, cap, out_size)
    if y is not None:
        return y
    y = xp.empty(x.shape[:2] + out_size, dtype=x.dtype)
    bands = _cached_bands(W, w, stride, cache)

    def block(index):
        images, channels = index
        out = y[index]
        _convolve_block(_pad(x[index], pads), W[channels], None if bands is None else bands[channels], stride, out)
        if b is not None:
            out += b[channels, None, None]
        if cap is not None:
            _clip_in_place(out, cap)
    for_blocks(block, plane_blocks(x))
    return y


def _depthwise_grad_input(gy, W, stride, pads, x_shape, cache=None):
    """The adjoint of _depthwise_forward in x (without bias and clip): compiled, else block by block."""
    gx = _native_depthwise_grad_input(gy, W, stride, pads, x_shape)
    if gx is not None:
        return gx
    xp = get_array_module(gy)
    bands_t = _cached_bands(W, _padded_shape(x_shape, pads)[3], stride, cache, transposed=True)
    gx = xp.empty(x_shape, dtype=gy.dtype)

    def block(index):
        images, channels = index
        shape = _padded_shape(gx[index].shape, pads)
        padded = _adjoint_block(gy[index], W[channels], None if bands_t is None else bands_t[channels], stride, shape)
        gx[index] = padded[_interior(gx[index].shape, pads)]
    for_blocks(block, plane_blocks(gx))
    return gx


def _native_depthwise_grad_input(gy, W, stride, pads, x_shape):
    """The adjoint by sgrad.native, or None where it cannot take these arrays. At stride 1 (and pads of
    at most k - 1) it is the depthwise convolution of gy with the kernels flipped, padded by k - 1 - (the
    forward's pads); otherwise each output gradient is scattered to where its taps read."""
    if W.dtype != gy.dtype or not native.supports(gy, W, contiguous=False):
        return None
    k = W.shape[2]
    if stride == 1 and max(before for before, _ in pads) < k:
        flipped = tuple((k - 1 - before, k - 1 - after) for before, after in pads)
        return _native_depthwise(gy, W[:, :, ::-1, ::-1], 1, flipped, None, None, x_shape[2:])
    gy, W = numpy.ascontiguousarray(gy), numpy.ascontiguousarray(W)
    gx = numpy.empty(x_shape, gy.dtype)
    for_blocks(lambda planes: native.depthwise_adjoint(gy, W, stride, pads, gx, planes), _plane_ranges(gx))
    return gx


def _depthwise_grad_weight(x, gy, stride, pads, k):
    """dL/dW[c, 0, ky, kx] = sum over n, i, j of gy * the window of the padded x at (ky, kx)."""
    xp = get_array_module(x)
    phases = _phases(_pad(x, pads), stride)
    gW = xp.empty((x.shape[1], 1, k, k), dtype=x.dtype)
    for ky in range(k):
        for kx in range(k):
            gW[:, 0, ky, kx] = xp.einsum('ncij,ncij->c', _window(phases, ky, kx, stride, gy.shape[2:]), gy)
    return gW


class DepthwiseConvolution(ClipsOutput, chainer.function_node.FunctionNode):
    """Depthwise convolution of (N, C, H, W) images with W (C, 1, k, k) (and a bias b (C,)), zero
    padding pads ((top, bottom), (left, right)), a stride: what F.convolution_2d(F.pad(x, ...), W, b,
    stride=s, groups=C) computes, without the padded copy, im2col buffer and batched matrix products
    of one row: by sgrad.native's compiled kernel where it is built, else in NumPy (band matrices or
    windows, below); with ``cap`` (6 for ReLU6) followed by F.clipped_relu(., cap), done in place on the
    output (``rule`` as for ReLU). ``cache``: a dict kept with a fixed W (a folded model's) for its
    band matrices. Its backward is built from the two nodes below, and theirs from these three, so
    every order of derivative exists."""

    def __init__(self, stride, pads=NO_PADDING, cap=None, cache=None):
        self.stride, self.pads, self.cache = stride, pads, cache
        self.set_cap(cap)

    def forward(self, inputs):
        x, W = inputs[:2]
        self.retain_inputs((0, 1))
        if self.cap is not None:
            self.retain_outputs((0,))
        b = inputs[2] if len(inputs) == 3 else None
        return _depthwise_forward(x, W, self.stride, self.pads, b, self.cap, self.cache),

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy = self.through_clip(grad_outputs[0])
        ret = []
        if 0 in indexes:
            ret.append(DepthwiseGradInput(self.stride, self.pads, x.shape, self.cache).apply((gy, W))[0])
        if 1 in indexes:
            ret.append(DepthwiseGradWeight(self.stride, self.pads, W.shape[2]).apply((x, gy))[0])
        if 2 in indexes:
            ret.append(F.sum(gy, axis=(0, 2, 3)))
        return ret


class DepthwiseGradInput(chainer.function_node.FunctionNode):
    """gx = the adjoint of the depthwise convolution applied to gy; linear in gy and in W."""

    def __init__(self, stride, pads, x_shape, cache=None):
        self.stride, self.pads, self.x_shape, self.cache = stride, pads, x_shape, cache

    def forward(self, inputs):
        gy, W = inputs
        self.retain_inputs((0, 1))
        return _depthwise_grad_input(gy, W, self.stride, self.pads, self.x_shape, self.cache),

    def backward(self, indexes, grad_outputs):
        gy, W = self.get_retained_inputs()
        ggx, = grad_outputs
        ret = []
        if 0 in indexes:
            ret.append(DepthwiseConvolution(self.stride, self.pads, cache=self.cache).apply((ggx, W))[0])
        if 1 in indexes:
            ret.append(DepthwiseGradWeight(self.stride, self.pads, W.shape[2]).apply((ggx, gy))[0])
        return ret


class DepthwiseGradWeight(chainer.function_node.FunctionNode):
    """gW from the input x and gy; linear in each."""

    def __init__(self, stride, pads, ksize):
        self.stride, self.pads, self.ksize = stride, pads, ksize

    def forward(self, inputs):
        x, gy = inputs
        self.retain_inputs((0, 1))
        return _depthwise_grad_weight(x, gy, self.stride, self.pads, self.ksize),

    def backward(self, indexes, grad_outputs):
        x, gy = self.get_retained_inputs()
        ggW, = grad_outputs
        ret = []
        if 0 in indexes:
            ret.append(DepthwiseGradInput(self.stride, self.pads, x.shape).apply((gy, ggW))[0])
        if 1 in indexes:
            ret.append(DepthwiseConvolution(self.stride, self.pads).apply((x, ggW))[0])
        return ret


def depthwise_convolution(x, W, stride=1, b=None, cap=None, pads=NO_PADDING, cache=None):
    """F.convolution_2d(F.pad(x, pads), W, b, stride=stride, groups=C) for W of shape (C, 1, k, k);
    with ``cap``, then F.clipped_relu(., cap). ``cache``: see DepthwiseConvolution."""
    node = DepthwiseConvolution(stride, tuple(map(tuple, pads)), cap, cache)
    return node.apply((x, W) if b is None else (x, W, b))[0]


class PointwiseConvolution(ClipsOutput, chainer.function_node.FunctionNode):
    """1x1 convolution of (N, C, H, W) images with W (O, C, 1, 1) (and a bias b (O,)): for each image
    one matrix product W (O, C) @ x (C, H*W), with none of the im2col copy and transposes of Chainer's
    convolution_2d, by sgrad.native's product kernel where it is built (the bias and clip inside), else
    OpenBLAS; with ``cap``, then F.clipped_relu(., cap) in place (``rule`` as for ReLU). The input
    gradient is the 1x1 convolution of gy with W transposed, so every order of derivative exists."""

    def __init__(self, cap=None):
        self.set_cap(cap)

    def forward(self, inputs):
        x, W = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        n, c, h, w = x.shape
        xp = get_array_module(x)
        images, weights = x.reshape(n, c, h * w), W.reshape(W.shape[:2])
        y = xp.empty((n, W.shape[0], h * w), dtype=x.dtype)
        compiled = native.supports(x, W, *(() if b is None else (b,)), contiguous=False)
        if compiled:
            images, weights = numpy.ascontiguousarray(images), numpy.ascontiguousarray(weights)

        def block(index):
            if compiled:
                for i in range(n)[index[0]]:
                    native.product(weights, images[i], y[i], range(W.shape[0])[index[1]], row_bias=b, cap=self.cap)
                return
            out = y[index]
            xp.matmul(weights[index[1]], images[index[0]], out=out)
            if b is not None:
                out += b[index[1], None]
            self.clip_block(out)
        # an image's product the same in every batch: the compiled kernel's sums run in one order; OpenBLAS's
        # do for one shape of product on one thread, and the blocks' shapes depend on the image's size only
        blocks = plane_blocks(y)
        if compiled and len(blocks) < worker_count():  # fewer images than cores: each image's rows shared out
            parts = -(-worker_count() // n)
            o = W.shape[0]
            blocks = [(slice(i, i + 1), slice(o * k // parts, o * (k + 1) // parts)) for i in range(n)
                      for k in range(parts)]
        with blas_threads(1):
            for_blocks(block, blocks)
        self.retain_inputs((0, 1))
        if self.cap is not None:
            self.retain_outputs((0,))
        return y.reshape(n, -1, h, w),

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy = self.through_clip(grad_outputs[0])
        ret = []
        if 0 in indexes:
            ret.append(pointwise_convolution(gy, F.transpose(W, (1, 0, 2, 3))))
        if 1 in indexes:
            ret.append(F.reshape(F.tensordot(gy, x, axes=((0, 2, 3), (0, 2, 3))), W.shape))
        if 2 in indexes:
            ret.append(F.sum(gy, axis=(0, 2, 3)))
        return ret


def pointwise_convolution(x, W, b=None, cap=None):
    """F.convolution_2d(x, W, b) for W of shape (O, C, 1, 1); with ``cap``, then F.clipped_relu(., cap)."""
    return PointwiseConvolution(cap).apply((x, W) if b is None else (x, W, b))[0]
