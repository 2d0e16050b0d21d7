"""Chainer FunctionNodes behind the model: 3x3 convolution and 2x2 max pooling
on channel-major, batch-minor (C, H, W, N) activations, and a ReLU. The ReLU nodes
(``ReLU``, and the convolution with ``relu=True``) have a ``guided`` switch that
sgrad.hooks.GuidedReLU turns on for Guided Backprop.

Why this layout: with activations laid out (C, H, W, N), one image row of all
channels is a contiguous run of W*N values (the batch is innermost). A 3x3
convolution then needs no im2col: three copies of the input, shifted by -1, 0
and +1 pixels along W (``row_patches``, (3C, (H+2)*W*N)), hold every patch, the
kernel row ky being an offset of ky*W*N columns into the same buffer; three
GEMMs, W_ky (O, 3C) @ those columns, accumulate in place in the (O, H*W*N)
result, which is already the next layer's (C, H, W, N) input. None of the large
transposes that Chainer's NCHW ``convolution_2d`` pays for (about a quarter of
its CPU time), a third of im2col's copies, and a third of its buffer.
Where sgrad.native's compiled kernel is built (setup.sh does), it computes the convolution and its
input and weight gradients directly instead (``direct_convolution``, ``direct_weight_gradient``: no
patches, no GEMM; see native.c); the GEMM path stays for CuPy arrays and where no C compiler was at hand.
Every node passes ``chainer.gradient_check`` (tests) and works with NumPy or
CuPy arrays.

Every node works block by block (``for_blocks``): blocks of about a megabyte (channel ranges of
(C, H, W, N) activations, column ranges of a GEMM's product, images or channel ranges of (N, C,
H, W) ones), so that the several passes made over each stay in a core's cache, spread over
threads, so that NumPy's single-threaded loops and OpenBLAS's one-thread small products use
every core.
"""
import concurrent.futures
import ctypes
import functools
import math
import os
import weakref

import chainer
import chainer.functions as F
import numpy
from chainer.backend import get_array_module

from sgrad import native
from sgrad.blas import blas_threads, openblas_function


#: Bytes of one block of blocked work (for_blocks): small enough that a block's input, output and
#: temporaries stay in a core's L2 cache (4 MB per core here) across the passes made over it.
BLOCK_BYTES = 1 << 20


#: The machine's cores (os.cpu_count() reads /sys each time; worker_count() is asked for every node)
CORES = os.cpu_count() or 1


def worker_count():
    """Threads for blocked work: the BLAS thread count the user (or sgrad.parallel, one per rank's
    share of the cores) set in OMP_NUM_THREADS or OPENBLAS_NUM_THREADS, else the machine's cores."""
    for name in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            pass
    return CORES


_pool = None


def for_blocks(work, blocks):
    """[work(block) for block in blocks], spread over worker_count() threads. NumPy's loops and BLAS
    release the GIL, so the elementwise passes, which NumPy runs on one core, and the many small
    matrix products, which OpenBLAS runs on one thread each, then use every core."""
    global _pool
    workers = min(worker_count(), len(blocks))
    if workers == 1:
        return [work(block) for block in blocks]
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(worker_count())

    def share(k):
        return [work(block) for block in blocks[k::workers]]
    # the calling thread takes a share itself: one hand-off to a pool thread fewer (each costs tens of
    # microseconds here, the order of a small layer's work in chunks of 25 images)
    with blas_threads(1):  # each block's products on its own thread
        others = [_pool.submit(share, k) for k in range(1, workers)]
        shares = [share(0)] + [other.result() for other in others]  # re-raises a block's exception
    results = [None] * len(blocks)
    for k, part in enumerate(shares):
        results[k::workers] = part
    return results


def _ranges(count, item_bytes):
    """Slices that cover range(count), each about BLOCK_BYTES of items of ``item_bytes`` and at least one
    per thread."""
    size = max(1, min(BLOCK_BYTES // item_bytes, -(-count // worker_count())))
    return [slice(i, i + size) for i in range(0, count, size)]


def plane_blocks(a):
    """(images, channels) slice pairs that cover the (N, C, ...) array a, about BLOCK_BYTES each: groups
    of whole images (at least one block per thread) where an image is smaller, else channel ranges of
    one image. One block for a GPU array (CuPy runs each operation over the whole array at once)."""
    if not isinstance(a, numpy.ndarray):
        return [(slice(None), slice(None))]
    n, c = a.shape[:2]
    channel = a.itemsize * math.prod(a.shape[2:])
    if c * channel <= BLOCK_BYTES:
        return [(images, slice(None)) for images in _ranges(n, c * channel)]
    channels = max(1, BLOCK_BYTES // channel)
    return [(slice(i, i + 1), slice(k, k + channels)) for i in range(n) for k in range(0, c, channels)]


def channel_blocks(a):
    """Slices of the first axis of a (the channels of (C, H, W, N) activations), about BLOCK_BYTES each
    and at least one per thread; one for a GPU array."""
    if not isinstance(a, numpy.ndarray):
        return [slice(None)]
    return _ranges(a.shape[0], a.itemsize * math.prod(a.shape[1:]))


def column_blocks(a):
    """Slices of the columns of the matrix a, about BLOCK_BYTES of it each and at least one per thread;
    one for a GPU array."""
    if not isinstance(a, numpy.ndarray):
        return [slice(None)]
    return _ranges(a.shape[1], a.itemsize * a.shape[0])


@functools.lru_cache(maxsize=None)
def _cblas_gemm(dtype):
    """NumPy's OpenBLAS cblas_sgemm / cblas_dgemm for float32 / float64, its argument types set, or None."""
    name = {numpy.dtype(numpy.float32): 'cblas_sgemm', numpy.dtype(numpy.float64): 'cblas_dgemm'}.get(dtype)
    function = openblas_function(name) if name else None
    if function is not None:
        size = ctypes.c_int64 if function.__name__.endswith('64_') else ctypes.c_int  # the 64-bit-integer build
        scalar = numpy.ctypeslib.as_ctypes_type(dtype)
        function.restype = None
        function.argtypes = [ctypes.c_int] * 3 + [size] * 3 + [scalar, ctypes.c_void_p, size, ctypes.c_void_p, size,
                                                                scalar, ctypes.c_void_p, size]
    return function


_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE = 101, 111, 112  # CBLAS's enumerations


def gemm(a, b, out, accumulate=False, transpose_b=False):
    """out = a @ b, or a @ b.T with ``transpose_b``, plus the old out with ``accumulate``: one BLAS call
    on matrices whose rows are contiguous (column ranges of C-contiguous matrices are), with no
    temporary; NumPy's product on other arrays (CuPy, another BLAS)."""
    function = _cblas_gemm(out.dtype) if isinstance(out, numpy.ndarray) else None
    matrices = (a, b, out)
    if (function is None or any(m.dtype != out.dtype for m in matrices)
            or any(m.shape[1] > 1 and m.strides[1] != m.itemsize for m in matrices)):
        product = a @ (b.T if transpose_b else b)
        if accumulate:
            out += product
        else:
            out[...] = product
        return
    rows = lambda m: m.strides[0] // m.itemsize if m.shape[0] > 1 else max(1, m.shape[1])  # BLAS's leading dimension
    function(_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE if transpose_b else _NO_TRANSPOSE, out.shape[0], out.shape[1],
             a.shape[1], 1., a.ctypes.data, rows(a), b.ctypes.data, rows(b), 1. if accumulate else 0.,
             out.ctypes.data, rows(out))


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


def row_patches_adjoint(rows, shape):
    """The adjoint of :func:`row_patches`: (3C, (H+2)*W*N) -> (C, H, W, N), the shifted copies summed
    back (the padding rows dropped), in channel blocks."""
    xp = get_array_module(rows)
    c, h, w, n = shape
    rows = rows.reshape(c, 3, h + 2, w, n)
    x = xp.empty(shape, dtype=rows.dtype)

    def block(channels):
        source, out = rows[channels, :, 1:-1], x[channels]
        out[...] = source[:, 1]
        out[:, :, :-1] += source[:, 0, :, 1:]
        out[:, :, 1:] += source[:, 2, :, :-1]
    for_blocks(block, channel_blocks(x))
    return x


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
    the direct kernel is the better one: odd H or W; fewer than 8 input channels, where the transforms
    cost more than the multiplies saved; a batch that fills its last vector of lanes by less than 3/4
    (each tile computes whole vectors: N = 1 would waste 15 of 16 float32 lanes)."""
    c, h, w, n = shape
    lanes = native.vector_lanes(dtype)
    width = -(-n // lanes) * lanes
    if not WINOGRAD or h % 2 or w % 2 or c < 8 or 3 * width > 4 * n:
        return 0
    return max(1, _WINOGRAD_COLUMNS // width)


def _relu_mask(y, cap=None, guide=None):
    """Where a ReLU passes the gradient, read off its output y: y > 0 (and y < cap for the clipped
    min(max(x, 0), cap)), and also guide > 0 under Guided Backprop (guide: the incoming gradient)."""
    mask = y > 0
    if cap is not None:
        mask &= y < cap
    if guide is not None:
        mask &= guide > 0
    return mask


def _clip_in_place(y, cap):
    """min(max(y, 0), cap), in place."""
    xp = get_array_module(y)
    xp.maximum(y, 0, out=y)
    xp.minimum(y, cap, out=y)


class ClipsOutput:
    """For a FunctionNode that may apply min(max(., 0), cap) to its own output (``cap`` None: it does
    not), so that the activation needs no arrays of its own; ``guided`` as for ReLU."""

    def set_cap(self, cap):
        self.cap = cap
        if cap is not None:
            self.guided = False

    def clip_block(self, y):
        """The activation in place on a block of the output (to call in forward, which retains the
        output when there is a cap)."""
        if self.cap is not None:
            _clip_in_place(y, self.cap)

    def through_clip(self, gy):
        """The output gradient gy carried back through the activation (to call in backward)."""
        if self.cap is None:
            return gy
        y, = self.get_retained_outputs()
        return relu_gradient(y, gy, self.guided, self.cap)


class ReLUGradient(chainer.function_node.FunctionNode):
    """gy where max(., 0) passed the gradient, or min(max(., 0), cap) given a cap, read off its output y
    (0 < y, and y < cap), and, given a ``guide`` (Guided Backprop: the incoming gradient), where the
    guide is positive; else 0: compiled (sgrad.native) where it can, else block by block (for_blocks)
    in NumPy. Linear in gy with the mask fixed, so its backward is itself."""

    def __init__(self, y, cap, guide=None):
        self.y, self.cap, self.guide = y, cap, guide

    def forward(self, inputs):
        gy, = inputs
        arrays = (gy, self.y) + (() if self.guide is None else (self.guide,))
        if native.supports(*arrays):
            g = numpy.empty_like(gy)
            for_blocks(lambda numbers: native.relu_gradient(gy, self.y, self.guide, self.cap, g, numbers),
                       _ranges(g.size, g.itemsize))
            return g,
        g = get_array_module(gy).empty_like(gy)

        def block(index):
            mask = _relu_mask(self.y[index], self.cap, None if self.guide is None else self.guide[index])
            get_array_module(gy).multiply(gy[index], mask, out=g[index])
        for_blocks(block, plane_blocks(g))
        return g,

    def backward(self, indexes, grad_outputs):
        return ReLUGradient(self.y, self.cap, self.guide).apply(grad_outputs)


def relu_gradient(y, gy, guided, cap=None):
    """The gradient gy carried back through a ReLU (or, with a cap, min(max(., 0), cap)) whose output is
    the variable y; with ``guided``, the Guided Backprop rule."""
    return ReLUGradient(y.array, cap, gy.array if guided else None).apply((gy,))[0]


class Convolution3x3(chainer.function_node.FunctionNode):
    """y = W * x (+ b) (then ReLU if ``relu``), 3x3 kernel, pad 1, stride 1, (C, H, W, N) layout.

    By sgrad.native's compiled kernel where it is built (direct_convolution); else y[:, h] = sum over
    ky of W_ky (O, 3C) @ the row_patches of row h + ky, three GEMMs accumulated in place on each column
    block of y, bias and ReLU applied to the block while it is fresh, and the row_patches buffer, which
    the GEMM weight gradient needs, is kept in training mode (otherwise built if that gradient is asked
    for).
    """

    def __init__(self, relu=False, cache=None):
        self.relu, self.cache = relu, cache
        if relu:
            self.guided = False

    def _cache(self, direction):
        """The part of the cache for 'forward' or 'input' (gradient), or None without a cache."""
        return None if self.cache is None else self.cache.setdefault(direction, {})

    def forward(self, inputs):
        x, W = inputs[:2]
        self.x_shape = x.shape
        self.retain_inputs((0, 1))
        if self.relu:
            self.retain_outputs((0,))
        y = direct_convolution(x, W, inputs[2] if len(inputs) == 3 else None, self.relu,
                               cache=self._cache('forward'))
        if y is not None:
            self.rows = None  # the weight gradient has its own compiled kernel
            return y,
        xp = get_array_module(x)
        c, h, w, n = x.shape
        rows, kernels = row_patches(x), _kernels_by_row(W)
        y = xp.empty((W.shape[0], h * w * n), dtype=x.dtype)

        def block(columns):
            start, stop = _column_range(columns, y.shape[1])
            out = y[:, start:stop]
            for ky in range(3):
                gemm(kernels[ky], rows[:, ky * w * n + start:ky * w * n + stop], out, accumulate=ky > 0)
            if len(inputs) == 3:
                out += inputs[2][:, None]
            if self.relu:
                xp.maximum(out, 0, out=out)
        for_blocks(block, column_blocks(y))
        self.rows = rows if chainer.config.train else None
        return y.reshape((W.shape[0],) + x.shape[1:]),

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy, = grad_outputs
        if self.relu:
            y, = self.get_retained_outputs()
            if indexes == (0,) and not self.guided:  # saliency: the ReLU's mask applied inside the input gradient
                return Convolution3x3InputGrad(self.x_shape, y.array, self._cache('input')).apply((W, gy))
            gy = relu_gradient(y, gy, self.guided)
        ret = []
        if 0 in indexes:
            ret.append(Convolution3x3InputGrad(self.x_shape, cache=self._cache('input')).apply((W, gy))[0])
        if 1 in indexes:
            ret.append(Convolution3x3WeightGrad(x.array, self.rows, W.shape).apply((gy,))[0])
        if 2 in indexes:
            ret.append(F.sum(gy, axis=(1, 2, 3)))
        return ret


class Convolution3x3InputGrad(chainer.function_node.FunctionNode):
    """Gradient with respect to the input, of the convolution, or given ``relu_output`` (the output of
    ReLU(convolution)) of the convolution and its ReLU: the adjoint of a 3x3 convolution is the
    convolution with kernels transposed and flipped, which sgrad.native computes (the ReLU's mask
    applied as it pads gy). Without it: the row_patches gradient, sum over ky of W_ky^T gy placed ky
    rows down (each column block of it summed from the gy columns that reach it), then
    row_patches_adjoint."""

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
        xp = get_array_module(gy)
        c, h, w, n = self.x_shape
        gy = gy.reshape(gy.shape[0], -1)
        kernels, shift = _kernels_by_row(W, transposed=True), w * n
        g_rows = xp.empty((3 * c, (h + 2) * shift), dtype=gy.dtype)

        def block(columns):
            start, stop = _column_range(columns, g_rows.shape[1])
            # kernel row 1 reaches every row but the two padding rows: it writes, the other two add
            g_rows[:, start:max(start, min(stop, shift))] = 0
            g_rows[:, min(stop, max(start, g_rows.shape[1] - shift)):stop] = 0
            for ky in (1, 0, 2):
                first, last = max(start, ky * shift), min(stop, ky * shift + gy.shape[1])
                if first < last:
                    gemm(kernels[ky], gy[:, first - ky * shift:last - ky * shift], g_rows[:, first:last],
                         accumulate=ky != 1)
        for_blocks(block, column_blocks(g_rows))
        return row_patches_adjoint(g_rows, self.x_shape),


class Convolution3x3WeightGrad(chainer.function_node.FunctionNode):
    """Gradient with respect to the weights, of the convolution of x: by sgrad.native where it is built
    (direct_weight_gradient); else gW_ky = gy row_patches_ky^T, summed over column blocks (``rows``: the
    forward's row_patches of x, or None to build them)."""

    def __init__(self, x, rows, W_shape):
        self.x, self.rows = x, rows
        self.W_shape = W_shape

    def forward(self, inputs):
        gy, = inputs
        gW = direct_weight_gradient(self.x, gy)
        if gW is not None:
            return gW,
        if self.rows is None:
            self.rows = row_patches(self.x)
        xp = get_array_module(gy)
        o, c = self.W_shape[:2]
        shift = gy.shape[2] * gy.shape[3]  # W*N: one row of the image
        gy = gy.reshape(o, -1)

        def block(columns):
            start, stop = _column_range(columns, gy.shape[1])
            part = xp.empty((3, o, 3 * c), dtype=gy.dtype)
            for ky in range(3):
                gemm(gy[:, start:stop], self.rows[:, ky * shift + start:ky * shift + stop], part[ky],
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


#: The four positions of a 2x2 window, as strided views of the (C, H, W, N) activations.
_WINDOW = [(slice(None), slice(dy, None, 2), slice(dx, None, 2)) for dy in (0, 1) for dx in (0, 1)]


class MaxPooling2x2(chainer.function_node.FunctionNode):
    """2x2, stride 2 max pooling of (C, H, W, N) activations (even H, W), as the
    elementwise maximum of the window's four strided views.

    The gradient goes to one input per window: the first maximum in window
    order (row by row), the rule of F.max_pooling_2d and the other frameworks.
    Ties are common on photographs: flat regions (sky, backgrounds, borders)
    give identical neighbourhoods, hence identical convolution outputs.
    """

    def forward(self, inputs):
        x, = inputs
        xp = get_array_module(x)
        y = xp.empty_like(x[_WINDOW[0]])
        self.retain_inputs((0,))
        self.retain_outputs((0,))
        self.first = None
        if native.supports(x) and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
            self.first = numpy.empty(y.shape, numpy.uint8)
            for_blocks(lambda channels: native.max_pooling_2x2(x, y, self.first, channels), channel_blocks(x))
            return y,

        def block(channels):
            out = y[channels]
            xp.maximum(x[channels][_WINDOW[0]], x[channels][_WINDOW[1]], out=out)
            for w in _WINDOW[2:]:
                xp.maximum(out, x[channels][w], out=out)
        for_blocks(block, channel_blocks(x))
        return y,

    def backward(self, indexes, grad_outputs):
        x, = self.get_retained_inputs()
        y, = self.get_retained_outputs()
        return MaxPooling2x2Grad(x.array, y.array, self.first).apply(grad_outputs)


def first_maximum_masks(x, y):
    """For each window position, where it holds the window's first maximum (exactly one per window; a
    NaN is its window's maximum, as in F.max_pooling_2d); in channel blocks."""
    xp = get_array_module(y)
    masks = [xp.empty(y.shape, dtype=bool) for _ in _WINDOW]

    def block(channels):
        taken = None
        for w, mask in zip(_WINDOW, masks):
            mask[channels] = (x[channels][w] == y[channels]) | xp.isnan(x[channels][w])
            if taken is None:
                taken = mask[channels].copy()
            else:
                mask[channels] &= ~taken
                taken |= mask[channels]
    for_blocks(block, channel_blocks(y))
    return masks


class MaxPooling2x2Grad(chainer.function_node.FunctionNode):
    """Scatters the pooled gradient to each window's first maximum (``first``: its window position, from
    the compiled forward; else found again from x and y); linear in the gradient, so its own backward
    gathers with the same masks."""

    def __init__(self, x, y, first=None):
        self.x, self.y, self.first = x, y, first
        self.x_shape = x.shape

    @functools.cached_property
    def masks(self):
        if self.first is None:
            return first_maximum_masks(self.x, self.y)
        return [self.first == position for position in range(len(_WINDOW))]

    def forward(self, inputs):
        gy, = inputs
        xp = get_array_module(gy)
        gx = xp.empty(self.x_shape, dtype=gy.dtype)
        if self.first is not None and native.supports(gy):
            for_blocks(lambda channels: native.max_pooling_2x2_grad(gy, self.first, gx, channels), channel_blocks(gx))
            return gx,
        masks = self.masks

        def block(channels):
            for w, mask in zip(_WINDOW, masks):
                xp.multiply(gy[channels], mask[channels], out=gx[channels][w])
        for_blocks(block, channel_blocks(gy))
        return gx,

    def backward(self, indexes, grad_outputs):
        ggx, = grad_outputs
        return sum(ggx[w] * mask.astype(ggx.dtype) for w, mask in zip(_WINDOW, self.masks)),


def max_pooling_2x2(x):
    return MaxPooling2x2().apply((x,))[0]


class ReLU(chainer.function_node.FunctionNode):
    """ReLU; with ``guided`` (set by sgrad.hooks.GuidedReLU) its backward passes a gradient
    only where both the forward input and the incoming gradient are positive
    (Springenberg et al. 2015)."""

    guided = False

    def forward(self, inputs):
        x, = inputs
        y = get_array_module(x).empty_like(x)

        def block(index):
            get_array_module(x).maximum(x[index], 0, out=y[index])
        for_blocks(block, plane_blocks(x))
        self.retain_outputs((0,))
        return y,

    def backward(self, indexes, grad_outputs):
        y, = self.get_retained_outputs()
        gy, = grad_outputs
        return relu_gradient(y, gy, self.guided),


def relu(x):
    """max(x, 0)."""
    return ReLU().apply((x,))[0]


class ClippedReLU(ClipsOutput, chainer.function_node.FunctionNode):
    """min(max(x, 0), cap), F.clipped_relu computed block by block (for_blocks); ``guided`` as for ReLU."""

    def __init__(self, cap):
        self.set_cap(cap)

    def forward(self, inputs):
        x, = inputs
        y = get_array_module(x).empty_like(x)

        def block(index):
            y[index] = x[index]
            self.clip_block(y[index])
        for_blocks(block, plane_blocks(y))
        self.retain_outputs((0,))
        return y,

    def backward(self, indexes, grad_outputs):
        return self.through_clip(grad_outputs[0]),


def clipped_relu(x, cap):
    """min(max(x, 0), cap)."""
    return ClippedReLU(cap).apply((x,))[0]


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
    output (``guided`` as for ReLU). ``cache``: a dict kept with a fixed W (a folded model's) for its
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
    convolution_2d; with ``cap``, then F.clipped_relu(., cap) in place (``guided`` as for ReLU). The
    input gradient is the 1x1 convolution of gy with W transposed, so every order of derivative exists."""

    def __init__(self, cap=None):
        self.set_cap(cap)

    def forward(self, inputs):
        x, W = inputs[:2]
        n, c, h, w = x.shape
        xp = get_array_module(x)
        images, weights = x.reshape(n, c, h * w), W.reshape(W.shape[:2])
        y = xp.empty((n, W.shape[0], h * w), dtype=x.dtype)

        def block(index):
            out = y[index]
            xp.matmul(weights[index[1]], images[index[0]], out=out)
            if len(inputs) == 3:
                out += inputs[2][index[1], None]
            self.clip_block(out)
        for_blocks(block, plane_blocks(y))
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


class FoldsBatchNorm:
    """For a Chain with links ``conv`` (no bias) and ``bn``: fold_batchnorm() merges the inference-mode
    BatchNorm into the convolution, W' = s W, b' = beta - s mean, s = gamma / sqrt(var + eps), and the
    block's forward then uses folded_parameters()."""

    folded = None

    #: Once folded, the compiled kernels' rearrangements of the folded weights (sgrad.ops.convolution_3x3)
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
