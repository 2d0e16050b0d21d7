"""Chainer FunctionNodes of the 3x3 convolution (pad 1, stride 1) on channel-major, batch-minor
(C, H, W, N) activations, CifarNet's, and of its input and weight gradients. With ``relu=True`` the ReLU is
fused in, and the node has the backward ``rule`` of a ReLU (sgrad.activations.RULES) that sgrad.hooks.ReLURule sets.

Why this layout: with activations laid out (C, H, W, N), one image row of all
channels is a contiguous run of W*N values (the batch is innermost), and a 3x3
convolution needs no im2col: the padded input's runs, shifted by kx*N numbers,
hold every tap. sgrad.native's compiled kernels (setup.sh builds them) compute the
convolution and its input and weight gradients so, directly (``direct_convolution``,
``direct_weight_gradient``; Winograd F(2x2, 3x3) where it pays, ``winograd_tiles``;
see native.c). Where they are not built, and for CuPy arrays, the convolution and its
input gradient run as GEMMs image by image (``gemm_convolution``, the same in any
batch), and the weight gradient as GEMMs over three copies of the whole batch shifted
by -1, 0 and +1 pixels along W (``row_patches``), in column blocks.
Every node passes ``chainer.gradient_check`` (tests) and works with NumPy or
CuPy arrays, block by block on every core (sgrad.blocks.for_blocks).
"""
import chainer
import chainer.functions as F
import numpy
from chainer.backend import get_array_module

from sgrad import native
from sgrad.activations import relu_gradient
from sgrad.blas import blas_threads
from sgrad.blocks import _ranges, channel_blocks, column_blocks, for_blocks, gemm, worker_count


def row_patches(x):
    """(C, H, W, N) -> (3C, (H+2)*W*N): for each channel c and kx = 0, 1, 2, the image padded by one
    row above and below, its rows shifted by kx - 1 pixels along W (zeros shifted in): row (c, kx),
    column ((hp, w, n)) holds x_padded[c, hp, w + kx, n]. A 3x3 convolution's patch for output row h
    and kernel row ky is then the column range starting at (h + ky)*W*N: three GEMMs over one buffer,
    a third of im2col's copies."""
    xp = get_array_module(x)
    c, h, w, n = x.shape
    rows = xp.empty((c, 3, h + 2, w, n), dtype=x.dtype)

    def block(channels):
        out, source = rows[channels], x[channels]
        out[:, :, [0, -1]] = 0
        out[:, 1, 1:-1] = source
        out[:, 0, 1:-1, 0] = out[:, 2, 1:-1, -1] = 0
        out[:, 0, 1:-1, 1:] = source[:, :, :-1]
        out[:, 2, 1:-1, :-1] = source[:, :, 1:]
    for_blocks(block, channel_blocks(x))
    return rows.reshape(3 * c, (h + 2) * w * n)


def _kernels_by_row(W, transposed=False):
    """(O, C, 3, 3) weights -> (3, O, 3C): for each kernel row ky, the (O, (c, kx)) matrix that meets
    row_patches' rows; or its transpose, (3, 3C, O)."""
    xp = get_array_module(W)
    o, c = W.shape[:2]
    if transposed:
        return xp.ascontiguousarray(W.transpose(2, 1, 3, 0)).reshape(3, 3 * c, o)
    return xp.ascontiguousarray(W.transpose(2, 0, 1, 3)).reshape(3, o, 3 * c)


def _column_range(columns, count):
    """(start, stop) of a slice of range(count)."""
    span = range(count)[columns]
    return span.start, span.stop


def _output_blocks(channels, rows):
    """(output channels, rows) slice pairs for the direct convolution (for its weight gradient: (output
    channels, input channels)), at least one per thread: ranges of whole tiles of output channels, and
    rows cut too where there are fewer tiles than threads."""
    workers, tile = worker_count(), native.tile_channels()
    tiles = -(-channels // tile)
    parts = min(tiles, workers)
    row_parts = min(rows, -(-workers // parts))
    return [(slice(tile * (tiles * i // parts), tile * (tiles * (i + 1) // parts)),
             slice(rows * k // row_parts, rows * (k + 1) // row_parts))
            for i in range(parts) for k in range(row_parts)]


def _padded(x, mask=None):
    """x (C, H, W, N) padded by a zero pixel all round, (C, (H+2)*(W+2)*N), where mask > 0 if a mask is
    given, for sgrad.native's kernels."""
    c, h, w, n = x.shape
    xpad = native.empty_with_slack((c, (h + 2) * (w + 2) * n), x.dtype)
    for_blocks(lambda channels: native.pad(x, mask, xpad, channels), channel_blocks(x))
    return xpad


def direct_weight_gradient(x, gy):
    """The gradient with respect to the (O, C, 3, 3) kernels of the 3x3 convolution of (C, H, W, N) x
    whose output gradient is gy (O, H, W, N), by sgrad.native's compiled kernel on every core; None
    where it cannot take these arrays."""
    if not native.supports(x, gy, contiguous=False):
        return None
    x, gy = numpy.ascontiguousarray(x), numpy.ascontiguousarray(gy)
    o, c = gy.shape[0], x.shape[0]
    xpad, gw = _padded(x), numpy.empty((o, c, 9), x.dtype)
    for_blocks(lambda block: native.weight_grad(xpad, x.shape, gy, gw, *block), _output_blocks(o, c))
    return gw.reshape(o, c, 3, 3)


def direct_convolution(x, W, b=None, relu=False, mask=None, cache=None):
    """The 3x3 convolution (pad 1) of (C, H, W, N) x with (O, C, 3, 3) kernels W, plus b, then ReLU if
    ``relu``, of x where ``mask`` > 0 only if a mask is given, by sgrad.native's compiled kernels on
    every core: Winograd F(2x2, 3x3) where it pays (winograd_tiles), else the direct one; None where
    they cannot take these arrays (not built, CuPy, another dtype). ``cache``: a dict that keeps W's
    rearranged kernels for the next call, for weights that do not change (an inference copy's)."""
    if W.dtype != x.dtype or not native.supports(x, *(a for a in (b, mask) if a is not None), contiguous=False):
        return None
    # a transposed view (the model's input; the gradient from the global max pool) is copied once
    x, b, mask = (None if a is None else numpy.ascontiguousarray(a) for a in (x, b, mask))
    c, h, w, n = x.shape
    xpad = _padded(x, mask)
    y = native.empty_with_slack((W.shape[0], h, w, n), x.dtype)
    tiles = winograd_tiles(x.shape, x.dtype)
    if tiles:
        kernels = _kernels(native.winograd_kernels, W, cache)
        blocks = h // 2 * -(-(w // 2) // tiles)
        parts = min(blocks, worker_count())
        for_blocks(lambda part: native.winograd(xpad, x.shape, kernels, b, relu, y, tiles, part),
                   [range(blocks * i // parts, blocks * (i + 1) // parts) for i in range(parts)])
        return y
    kernels = _kernels(native.tile_kernels, W, cache)
    for_blocks(lambda block: native.convolve(xpad, x.shape, kernels, b, relu, y, *block),
               _output_blocks(W.shape[0], h))
    return y


def _kernels(rearrange, W, cache):
    """rearrange(W), kept in cache (a dict, or None: not kept) for the next call."""
    if cache is None:
        return rearrange(W)
    if rearrange not in cache:
        cache[rearrange] = rearrange(W)
    return cache[rearrange]


#: Whether direct_convolution may use Winograd F(2x2, 3x3) (tests switch it off to check the other kernel).
WINOGRAD = True

#: Columns (2x2 output tiles x lanes) that a Winograd block aims at: its buffers (16 x (C + O) x columns)
#: stay in the L2 cache
_WINOGRAD_COLUMNS = 128


def winograd_tiles(shape, dtype):
    """2x2 output tiles per block of sgrad.native's Winograd convolution of (C, H, W, N) inputs, or 0 where
    the direct kernel is the better one: odd H or W, or fewer than 8 input channels, where the transforms
    cost more than the multiplies saved. The choice is the layer's, never the batch's: Winograd's sums
    round otherwise than the direct kernel's, and an image must get the same result in a batch of any
    size (a batch that does not fill its last vector of lanes computes the empty lanes for nothing)."""
    c, h, w, n = shape
    lanes = native.vector_lanes(dtype)
    width = -(-n // lanes) * lanes
    if not WINOGRAD or h % 2 or w % 2 or c < 8:
        return 0
    return max(1, _WINOGRAD_COLUMNS // width)


def _image_blocks(x):
    """Slices of the images of (C, H, W, N) x, about BLOCK_BYTES of float64 row patches each, at least one per
    thread."""
    c, h, w, n = x.shape
    return _ranges(n, 8 * 3 * c * (h + 2) * w)


def _wide(a):
    """float32 as float64 (the GEMM path's sums, rounded once at the end; see gemm_convolution)."""
    xp = get_array_module(a)
    return a.astype(xp.float64) if a.dtype == xp.float32 else a


def gemm_convolution(x, W, b=None, relu=False):
    """The 3x3 convolution (pad 1) of (C, H, W, N) x by GEMMs, the path where the compiled kernels are not
    built: each image's row patches (C, kx = 0..2 rows shifted by kx - 1 pixels, H+2 padded rows of W) times
    the kernels of each kernel row ky, y_n = sum over ky of W_ky (O, 3C) @ its patches from row ky on, one
    stacked matmul per ky over a block of images.

    An image's products have one shape in any batch and run on one BLAS thread, so that they sum in one order:
    OpenBLAS picks its kernels and threads by the matrices' sizes. Even so its kernels round equal columns of a
    product differently by their position (the edges of its register tiles): two pixels with the same 3x3
    patch, in a flat region, differed in the last bit, and a max pooling's tie went to the other pixel than
    the compiled kernel's. float32 images are therefore convolved in float64 and rounded once: equal patches
    then round to the same float32 (unless a float32 rounding boundary falls between their float64 sums, a
    chance of the order of 1e-8)."""
    xp = get_array_module(x)
    c, h, w, n = x.shape
    kernels, bias = _wide(_kernels_by_row(W)), None if b is None else _wide(b)
    y = xp.empty((W.shape[0], h, w, n), dtype=x.dtype)

    def block(images):
        image = _wide(x[..., images]).transpose(3, 0, 1, 2)               # (n, C, H, W)
        rows = xp.zeros((image.shape[0], c, 3, h + 2, w), dtype=image.dtype)
        rows[:, :, 1, 1:-1] = image
        rows[:, :, 0, 1:-1, 1:] = image[..., :-1]
        rows[:, :, 2, 1:-1, :-1] = image[..., 1:]
        rows = rows.reshape(image.shape[0], 3 * c, (h + 2) * w)
        out = sum(kernels[ky] @ rows[:, :, ky * w:(ky + h) * w] for ky in range(3))  # (n, O, H*W)
        if bias is not None:
            out += bias[:, None]
        if relu:
            xp.maximum(out, 0, out=out)
        y[..., images] = out.reshape(-1, W.shape[0], h, w).transpose(1, 2, 3, 0)
    with blas_threads(1):
        for_blocks(block, _image_blocks(x))
    return y


def gemm_input_gradient(gy, W, x_shape):
    """The input gradient of the 3x3 convolution of x (x_shape) whose output gradient is gy (O, H, W, N), by
    GEMMs as gemm_convolution: each image's row-patch gradient, sum over ky of W_ky^T gy placed ky rows down,
    its three shifted copies summed back."""
    xp = get_array_module(gy)
    c, h, w, n = x_shape
    kernels = _wide(_kernels_by_row(W, transposed=True))
    gx = xp.empty(x_shape, dtype=gy.dtype)

    def block(images):
        g = xp.ascontiguousarray(_wide(gy[..., images]).transpose(3, 0, 1, 2)).reshape(-1, gy.shape[0], h * w)
        rows = xp.zeros((g.shape[0], 3 * c, (h + 2) * w), dtype=g.dtype)
        for ky in range(3):
            rows[:, :, ky * w:(ky + h) * w] += kernels[ky] @ g
        rows = rows.reshape(g.shape[0], c, 3, h + 2, w)[:, :, :, 1:-1]
        out = rows[:, :, 1].copy()
        out[..., :-1] += rows[:, :, 0, :, 1:]
        out[..., 1:] += rows[:, :, 2, :, :-1]
        gx[..., images] = out.transpose(1, 2, 3, 0)
    with blas_threads(1):
        for_blocks(block, _image_blocks(gx))
    return gx


class Convolution3x3(chainer.function_node.FunctionNode):
    """y = W * x (+ b) (then ReLU if ``relu``), 3x3 kernel, pad 1, stride 1, (C, H, W, N) layout.

    By sgrad.native's compiled kernel where it is built (direct_convolution); else by GEMMs
    (gemm_convolution).
    """

    def __init__(self, relu=False, cache=None):
        self.relu, self.cache = relu, cache
        if relu:
            self.rule = None

    def _cache(self, direction):
        """The part of the cache for 'forward' or 'input' (gradient), or None without a cache."""
        return None if self.cache is None else self.cache.setdefault(direction, {})

    def forward(self, inputs):
        x, W = inputs[:2]
        self.x_shape = x.shape
        self.retain_inputs((0, 1))
        if self.relu:
            self.retain_outputs((0,))
        b = inputs[2] if len(inputs) == 3 else None
        y = direct_convolution(x, W, b, self.relu, cache=self._cache('forward'))
        if y is None:
            y = gemm_convolution(x, W, b, self.relu)
        return y,

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy, = grad_outputs
        if self.relu:
            y, = self.get_retained_outputs()
            if indexes == (0,) and self.rule is None:  # saliency: the ReLU's mask applied inside the input gradient
                return Convolution3x3InputGrad(self.x_shape, y.array, self._cache('input')).apply((W, gy))
            gy = relu_gradient(y, gy, self.rule)
        ret = []
        if 0 in indexes:
            ret.append(Convolution3x3InputGrad(self.x_shape, cache=self._cache('input')).apply((W, gy))[0])
        if 1 in indexes:
            ret.append(Convolution3x3WeightGrad(x.array, W.shape).apply((gy,))[0])
        if 2 in indexes:
            ret.append(F.sum(gy, axis=(1, 2, 3)))
        return ret


class Convolution3x3InputGrad(chainer.function_node.FunctionNode):
    """Gradient with respect to the input, of the convolution, or given ``relu_output`` (the output of
    ReLU(convolution)) of the convolution and its ReLU: the adjoint of a 3x3 convolution is the
    convolution with kernels transposed and flipped, which sgrad.native computes (the ReLU's mask
    applied as it pads gy). Without it: by GEMMs (gemm_input_gradient)."""

    def __init__(self, x_shape, relu_output=None, cache=None):
        self.x_shape = x_shape
        self.relu_output, self.cache = relu_output, cache

    def forward(self, inputs):
        W, gy = inputs
        g = direct_convolution(gy, W.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1], mask=self.relu_output,
                               cache=self.cache)
        if g is not None:
            return g,
        if self.relu_output is not None:
            gy = gy * (self.relu_output > 0)
        return gemm_input_gradient(gy, W, self.x_shape),


class Convolution3x3WeightGrad(chainer.function_node.FunctionNode):
    """Gradient with respect to the weights, of the convolution of x: by sgrad.native where it is built
    (direct_weight_gradient); else gW_ky = gy row_patches_ky^T, summed over column blocks."""

    def __init__(self, x, W_shape):
        self.x, self.W_shape = x, W_shape

    def forward(self, inputs):
        gy, = inputs
        gW = direct_weight_gradient(self.x, gy)
        if gW is not None:
            return gW,
        rows = row_patches(self.x)
        xp = get_array_module(gy)
        o, c = self.W_shape[:2]
        shift = gy.shape[2] * gy.shape[3]  # W*N: one row of the image
        gy = gy.reshape(o, -1)

        def block(columns):
            start, stop = _column_range(columns, gy.shape[1])
            part = xp.empty((3, o, 3 * c), dtype=gy.dtype)
            for ky in range(3):
                gemm(gy[:, start:stop], rows[:, ky * shift + start:ky * shift + stop], part[ky],
                     transpose_b=True)
            return part
        parts = for_blocks(block, column_blocks(gy))
        gW = sum(parts[1:], parts[0]).reshape(3, o, c, 3)
        return xp.ascontiguousarray(gW.transpose(1, 2, 0, 3)),


def convolution_3x3(x, W, b=None, relu=False, cache=None):
    """3x3, pad 1, stride 1 convolution of (C, H, W, N) activations, optionally with bias and ReLU.
    ``cache``: a dict in which the compiled kernels keep their rearrangements of W (forward and input
    gradient), for weights that stay as they are between calls (an inference copy's); None: none kept."""
    inputs = (x, W) if b is None else (x, W, b)
    return Convolution3x3(relu, cache).apply(inputs)[0]
