"""The compiled 3x3 convolution, its gradients, BatchNorm + ReLU and 2x2 max pooling of sgrad/native.c,
EfficientNet-Lite0's depthwise convolution and ReLU6 gradient, the matrix product of the 1x1 convolutions and
linear layers (each number summed in one order whatever the batch), and the merges and dilations of XRAI's
Felzenszwalb segments and the cubic resize before them (sgrad/segments.py), through ctypes.

``python -m sgrad.native`` (run by setup.sh) compiles native.c with the C compiler into _native.so
beside it, for this machine's vector instructions (-march=native; ``--target x86-64-v3`` builds for
AVX2 + FMA, ``--target x86-64`` for the baseline, to see on this machine what another CPU computes). Where it is not built (no
compiler), or SGRAD_NATIVE=0 is set, ``library()`` is None and sgrad.convolution runs its NumPy + OpenBLAS
convolution instead; the two agree to rounding (tests); sgrad.segments calls PAIR's own segmentation. ctypes
releases the GIL during a call, so sgrad.blocks.for_blocks runs blocks of the work on every core.
"""
import ctypes
import functools
import os
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, 'native.c')
LIBRARY = os.path.join(HERE, '_native.so')
FLAGS = ['-O3', '-shared', '-fPIC', '-lm']

#: The instruction set that ``build`` compiles for by default (GCC's -march): this machine's. Others run the
#: same code on other CPUs' instructions: 'x86-64-v3' (AVX2 + FMA), 'x86-64' (SSE2, no FMA), ...
DEFAULT_TARGET = 'native'

#: Numbers past the end of an array that the kernel may read (one vector of its widest kind, 64 bytes)
SLACK_BYTES = 64

_TYPES = {numpy.dtype(numpy.float32): 'float', numpy.dtype(numpy.float64): 'double'}


def build(compiler=None, target=DEFAULT_TARGET):
    """Compile native.c into LIBRARY for the instruction set ``target`` (see DEFAULT_TARGET), through a
    temporary file: never a half-written library. Returns LIBRARY; raises CalledProcessError or OSError if
    the compiler fails or is missing."""
    compiler = compiler or os.environ.get('CC') or (sysconfig.get_config_var('CC') or 'cc').split()[0]
    handle, partial = tempfile.mkstemp(suffix='.so', dir=HERE)
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, '-march=' + target, '-DTARGET="%s"' % target, SOURCE, '-o', partial],
                       check=True)
        os.chmod(partial, 0o755)
        os.replace(partial, LIBRARY)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return LIBRARY


@functools.lru_cache(maxsize=None)
def library():
    """The loaded library with its functions' argument types set, or None (not built, built from an older
    native.c, or disabled with SGRAD_NATIVE=0)."""
    if os.environ.get('SGRAD_NATIVE') == '0' or not os.path.exists(LIBRARY):
        return None
    if os.path.getmtime(LIBRARY) < os.path.getmtime(SOURCE):
        warnings.warn('sgrad/_native.so is older than sgrad/native.c: rebuild it with `python -m sgrad.native`; '
                      'the NumPy + OpenBLAS convolution runs meanwhile')
        return None
    lib = ctypes.CDLL(LIBRARY)
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.tile_channels.restype = lib.vector_bytes.restype = lib.fused_multiply_add.restype = ctypes.c_int
    lib.target.restype = ctypes.c_char_p
    for kind in _TYPES.values():
        getattr(lib, 'convolution_3x3_' + kind).argtypes = [pointer] + [integer] * 4 + [pointer] * 2 + [
            integer, pointer] + [integer] * 5
        getattr(lib, 'winograd_3x3_' + kind).restype = ctypes.c_int
        getattr(lib, 'winograd_3x3_' + kind).argtypes = [pointer] + [integer] * 4 + [pointer] * 2 + [
            integer, pointer] + [integer] * 4
        getattr(lib, 'winograd_kernels_' + kind).restype = ctypes.c_int
        getattr(lib, 'winograd_kernels_' + kind).argtypes = [pointer] + [integer] * 2 + [pointer]
        getattr(lib, 'pad_' + kind).argtypes = [pointer] * 2 + [integer] * 3 + [pointer] + [integer] * 2
        getattr(lib, 'convolution_3x3_weight_grad_' + kind).restype = ctypes.c_int
        getattr(lib, 'convolution_3x3_weight_grad_' + kind).argtypes = [pointer] + [integer] * 4 + [pointer] * 2 + [
            integer] * 5
        getattr(lib, 'batch_norm_relu_' + kind).argtypes = [pointer, ctypes.c_long] + [pointer] * 2 + [
            ctypes.c_double] + [pointer] * 4 + [integer] * 2
        getattr(lib, 'batch_norm_relu_grad_' + kind).argtypes = [pointer] * 3 + [ctypes.c_long] + [pointer] * 6 + [
            integer] * 2
        getattr(lib, 'max_pooling_2x2_' + kind).argtypes = [pointer] + [integer] * 3 + [pointer] * 2 + [integer] * 2
        getattr(lib, 'max_pooling_2x2_grad_' + kind).argtypes = [pointer] * 2 + [integer] * 3 + [pointer] + [
            integer] * 2
        getattr(lib, 'relu_gradient_' + kind).argtypes = [pointer] * 3 + [ctypes.c_double] * 2 + [pointer] + [
            ctypes.c_long] * 2
        getattr(lib, 'depthwise_' + kind).restype = ctypes.c_int
        getattr(lib, 'depthwise_' + kind).argtypes = [pointer] + [integer] * 3 + [pointer] + [integer] * 4 + [
            pointer, ctypes.c_double, pointer] + [integer] * 4
        getattr(lib, 'product_' + kind).argtypes = [pointer, integer, pointer] + [integer] * 3 + [pointer] * 2 + [
            ctypes.c_double, pointer] + [integer] * 3
        getattr(lib, 'depthwise_adjoint_' + kind).restype = ctypes.c_int
        getattr(lib, 'depthwise_adjoint_' + kind).argtypes = [pointer] + [integer] * 3 + [pointer] + [
            integer] * 4 + [pointer] + [integer] * 4
    lib.felzenszwalb_segments.restype = ctypes.c_int
    lib.felzenszwalb_segments.argtypes = [pointer] * 2 + [ctypes.c_long] * 2 + [pointer, integer, ctypes.c_long,
                                                                                pointer]
    lib.dilate_labels.argtypes = [pointer] + [integer] * 2 + [ctypes.c_long, pointer, integer, pointer]
    lib.spline_zoom_3d.argtypes = [pointer] + [ctypes.c_long] * 2 + ([pointer] * 2 + [ctypes.c_long]) * 3 + [
        pointer] * 2
    return lib


def supports(*arrays, contiguous=True):
    """Whether the kernels can take these arrays: NumPy, one floating type (float32 or float64), and C order
    unless ``contiguous`` is False (for a caller that makes them contiguous)."""
    return (library() is not None and all(isinstance(a, numpy.ndarray) for a in arrays)
            and (not contiguous or all(a.flags.c_contiguous for a in arrays))
            and len({a.dtype for a in arrays}) == 1 and arrays[0].dtype in _TYPES)


def empty_with_slack(shape, dtype):
    """An uninitialised C-order array with SLACK_BYTES of memory after its end, for the kernel to read."""
    size = int(numpy.prod(shape))
    return numpy.empty(size + SLACK_BYTES // numpy.dtype(dtype).itemsize, dtype)[:size].reshape(shape)


def _kernel(name, dtype):
    """native.c's function ``name`` for arrays of ``dtype`` (its float or double version)."""
    return getattr(library(), name + '_' + _TYPES[numpy.dtype(dtype)])


def pad(x, mask, xpad, channels):
    """xpad[channels] = x[channels] (C, H, W, N) padded by a zero pixel all round, as (C, H+2, (W+2)*N);
    times mask > 0 where a mask (x's shape) is given."""
    c, h, w, n = x.shape
    _kernel('pad', x.dtype)(
        x.ctypes.data, None if mask is None else mask.ctypes.data, h, w, n, xpad.ctypes.data,
        channels.start, min(channels.stop, c))


def convolve(xpad, x_shape, kernels, bias, relu, y, outputs, rows):
    """y[outputs, rows] of the convolution of the padded input xpad (see pad) with ``kernels`` (tiled
    by tile_kernels), plus bias (or None), then ReLU if ``relu``."""
    c, h, w, n = x_shape
    _kernel('convolution_3x3', xpad.dtype)(
        xpad.ctypes.data, c, h, w, n, kernels.ctypes.data, None if bias is None else bias.ctypes.data,
        int(relu), y.ctypes.data, y.shape[0], outputs.start, min(outputs.stop, y.shape[0]), rows.start,
        min(rows.stop, h))


def winograd(xpad, x_shape, kernels, bias, relu, y, tiles, blocks):
    """The blocks ``blocks`` (a range) of y = the convolution of the padded input xpad (see pad) with
    ``kernels`` (from winograd_kernels), plus bias (or None), then ReLU if ``relu``, by Winograd F(2x2, 3x3),
    ``tiles`` 2x2 output tiles a block (see sgrad.convolution.winograd_tiles)."""
    c, h, w, n = x_shape
    if _kernel('winograd_3x3', xpad.dtype)(
            xpad.ctypes.data, c, h, w, n, kernels.ctypes.data, None if bias is None else bias.ctypes.data,
            int(relu), y.ctypes.data, y.shape[0], tiles, blocks.start, blocks.stop):
        raise MemoryError("no memory for the Winograd convolution's buffers")


def weight_grad(xpad, x_shape, gy, gw, outputs, channels):
    """gw[outputs, channels] (gw: (O, C, 9)) = the weight gradient of the convolution of the padded
    input xpad (see pad) whose output gradient is gy (O, H, W, N)."""
    c, h, w, n = x_shape
    o = gy.shape[0]
    if _kernel('convolution_3x3_weight_grad', gy.dtype)(
            xpad.ctypes.data, c, h, w, n, gy.ctypes.data, gw.ctypes.data, o, outputs.start, min(outputs.stop, o),
            channels.start, min(channels.stop, c)):
        raise MemoryError("no memory for the weight gradient's sums")


def batch_norm_relu(x, gamma, beta, eps, y, mean, var, inv_std, channels):
    """Training-mode BatchNorm then ReLU over each channel of x (C, ...): y[channels], and the channels'
    batch mean, (biased) var and 1 / sqrt(var + eps)."""
    _kernel('batch_norm_relu', x.dtype)(
        x.ctypes.data, x.size // x.shape[0], gamma.ctypes.data, beta.ctypes.data, eps, y.ctypes.data,
        mean.ctypes.data, var.ctypes.data, inv_std.ctypes.data, channels.start, min(channels.stop, x.shape[0]))


def batch_norm_relu_grad(x, y, gy, gamma, mean, inv_std, gx, ggamma, gbeta, channels):
    """The gradients of batch_norm_relu, gx[channels], ggamma[channels], gbeta[channels]."""
    _kernel('batch_norm_relu_grad', x.dtype)(
        x.ctypes.data, y.ctypes.data, gy.ctypes.data, x.size // x.shape[0], gamma.ctypes.data, mean.ctypes.data,
        inv_std.ctypes.data, gx.ctypes.data, ggamma.ctypes.data, gbeta.ctypes.data, channels.start,
        min(channels.stop, x.shape[0]))


def max_pooling_2x2(x, y, first, channels):
    """y[channels] = the 2x2, stride-2 max pooling of x[channels] (C, H, W, N), first[channels] (uint8,
    y's shape) = the window position (0-3, row by row) of each window's first maximum."""
    c, h, w, n = x.shape
    _kernel('max_pooling_2x2', x.dtype)(
        x.ctypes.data, h, w, n, y.ctypes.data, first.ctypes.data, channels.start, min(channels.stop, c))


def max_pooling_2x2_grad(gy, first, gx, channels):
    """gx[channels] = gy[channels] at each window's first maximum, zero elsewhere."""
    c, h, w, n = gx.shape
    _kernel('max_pooling_2x2_grad', gy.dtype)(
        gy.ctypes.data, first.ctypes.data, h, w, n, gx.ctypes.data, channels.start, min(channels.stop, c))


def relu_gradient(gy, y, guide, cap, floor, g, numbers):
    """g[numbers] (a slice of the flat arrays) = gy where floor < y (< cap unless cap is None) and guide > 0
    (unless guide is None), else 0."""
    _kernel('relu_gradient', gy.dtype)(
        gy.ctypes.data, y.ctypes.data, None if guide is None else guide.ctypes.data, cap or 0., floor,
        g.ctypes.data, numbers.start, min(numbers.stop, g.size))


def depthwise(x, W, stride, pads, bias, cap, y, planes):
    """y (N, C, oH, oW) at the planes ``planes`` (a range of image * C + channel) = the depthwise convolution
    of x (N, C, H, W) with W (C, 1, k, k), zero-padded by pads ((top, bottom), (left, right)), plus bias
    (or None), clipped to [0, cap] unless cap is None."""
    n, c, h, w = x.shape
    if _kernel('depthwise', x.dtype)(
            x.ctypes.data, c, h, w, W.ctypes.data, W.shape[2], stride, pads[0][0], pads[1][0],
            None if bias is None else bias.ctypes.data, cap or 0., y.ctypes.data, y.shape[2], y.shape[3],
            planes.start, min(planes.stop, n * c)):
        raise MemoryError("no memory for the depthwise convolution's buffer")


def depthwise_adjoint(gy, W, stride, pads, gx, planes):
    """gx (N, C, H, W) at the planes ``planes`` = the adjoint of depthwise (no bias or clip) applied to gy."""
    n, c, oh, ow = gy.shape
    if _kernel('depthwise_adjoint', gy.dtype)(
            gy.ctypes.data, c, oh, ow, W.ctypes.data, W.shape[2], stride, pads[0][0], pads[1][0], gx.ctypes.data,
            gx.shape[2], gx.shape[3], planes.start, min(planes.stop, n * c)):
        raise MemoryError("no memory for the depthwise convolution's buffer")


def product(a, b, out, rows, row_bias=None, column_bias=None, cap=None):
    """out[rows] = a[rows] @ b (2-D arrays whose rows are contiguous), plus row_bias (a's rows) or column_bias
    (b's columns) if given, clipped to [0, cap] unless cap is None; each number summed over k in order, in
    any tile, so that a row of out is the same whatever the matrices' sizes (see native.c)."""
    (m, k), p = a.shape, b.shape[1]
    stride = lambda matrix: matrix.strides[0] // matrix.itemsize
    _kernel('product', a.dtype)(
        a.ctypes.data, stride(a), b.ctypes.data, stride(b), k, p,
        None if row_bias is None else row_bias.ctypes.data, None if column_bias is None else column_bias.ctypes.data,
        cap or 0., out.ctypes.data, stride(out), rows.start, min(rows.stop, m))


def build_description():
    """What the loaded library was built for, as 'x86-64-v3: 32-byte vectors, fused multiply-add', or None
    where none is loaded."""
    if library() is None:
        return None
    return '%s: %d-byte vectors, %s' % (library().target().decode(), library().vector_bytes(),
                                        'fused multiply-add' if library().fused_multiply_add() else 'no FMA')


def tile_channels():
    """Output channels per tile of the kernel (OB in native.c)."""
    return library().tile_channels()


def vector_lanes(dtype):
    """Numbers of ``dtype`` in one of the kernels' vectors."""
    return library().vector_bytes() // numpy.dtype(dtype).itemsize


def tile_kernels(W):
    """(O, C, 3, 3) kernels -> (ceil(O / T), C, 9, T), T = tile_channels(), zeros for the missing output
    channels: each tile's kernels in the order the kernel reads them."""
    o, c = W.shape[:2]
    tile = tile_channels()
    groups = -(-o // tile)
    tiled = numpy.zeros((groups * tile, c, 9), W.dtype)
    tiled[:o] = W.reshape(o, c, 9)
    return numpy.ascontiguousarray(tiled.reshape(groups, tile, c, 9).transpose(0, 2, 3, 1))


def winograd_kernels(W):
    """(O, C, 3, 3) kernels (any strides) -> G g G^T of each, (16, ceil(O / T), C, T) with T =
    tile_channels() and zeros for the missing output channels, as winograd reads them."""
    o, c = W.shape[:2]
    W = numpy.ascontiguousarray(W)
    transformed = numpy.empty((16, -(-o // tile_channels()), c, tile_channels()), W.dtype)
    if _kernel('winograd_kernels', W.dtype)(W.ctypes.data, o, c, transformed.ctypes.data):
        raise MemoryError("no memory for the Winograd kernels' transform")
    return transformed


def felzenszwalb_segments(ends, costs, n_pixels, scales, min_size):
    """Felzenszwalb's segments of n_pixels pixels at each of ``scales`` (float64, each divided by 255), from the
    edges sorted by cost: ends (E, 2) int32 (the pixels each joins), costs (E,) float64. Returns the labels
    (len(scales), n_pixels), C long: the segments numbered in the raster order of their first pixel."""
    labels = numpy.empty((len(scales), n_pixels), numpy.dtype('l'))
    ends, costs, scales = (numpy.ascontiguousarray(a, t) for a, t in
                           ((ends, numpy.int32), (costs, numpy.float64), (scales, numpy.float64)))
    if library().felzenszwalb_segments(ends.ctypes.data, costs.ctypes.data, len(costs), n_pixels, scales.ctypes.data,
                                       len(scales), min_size, labels.ctypes.data):
        raise MemoryError("no memory for the segmentation's union-find forest")
    return labels


def dilate_labels(labels, half_widths):
    """One boolean mask (H, W) of each label from labels.min() to labels.max() (labels (H, W), C long),
    dilated by the footprint whose row dy of -r..r (r = len(half_widths) // 2) is the run of columns
    -half_widths[dy + r]..half_widths[dy + r] (negative: an empty row): (count, H, W) bool."""
    labels = numpy.ascontiguousarray(labels, numpy.dtype('l'))
    half_widths = numpy.ascontiguousarray(half_widths, numpy.intc)
    first = int(labels.min())
    masks = numpy.zeros((int(labels.max()) - first + 1,) + labels.shape, bool)
    library().dilate_labels(labels.ctypes.data, labels.shape[0], labels.shape[1], first, half_widths.ctypes.data,
                            len(half_widths) // 2, masks.ctypes.data)
    return masks


def spline_zoom_3d(coefficients, starts, weights):
    """Cubic-spline resampling of (H, W, C) float64 spline coefficients as SciPy's ndimage.zoom computes it
    (sgrad/native.c): starts, one per axis, the first of the 4 taps of each output coordinate (every tap
    inside the coefficients); weights, one per axis, (len(starts[axis]), 4) float64. Returns the
    (len(starts[0]), len(starts[1]), len(starts[2])) float64 image."""
    coefficients = numpy.ascontiguousarray(coefficients, numpy.float64)
    starts = [numpy.ascontiguousarray(s, numpy.dtype('l')) for s in starts]
    weights = [numpy.ascontiguousarray(w, numpy.float64) for w in weights]
    for axis, (s, w) in enumerate(zip(starts, weights)):
        if w.shape != (len(s), 4) or len(s) and (s.min() < 0 or s.max() + 4 > coefficients.shape[axis]):
            raise ValueError('axis %d: the taps must lie inside the coefficients, 4 weights each' % axis)
    shape = tuple(len(s) for s in starts)
    out, acc = numpy.empty(shape), numpy.empty(shape[1])
    axes = [arg for s, w in zip(starts, weights) for arg in (s.ctypes.data, w.ctypes.data, len(s))]
    library().spline_zoom_3d(coefficients.ctypes.data, coefficients.shape[1], coefficients.shape[2], *axes,
                             acc.ctypes.data, out.ctypes.data)
    return out


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(prog='python -m sgrad.native', description='Compiles sgrad/native.c.')
    parser.add_argument('--target', default=os.environ.get('SGRAD_TARGET', DEFAULT_TARGET),
                        help="the instruction set, as GCC's -march names it: native (the default, this CPU's), "
                             "x86-64-v3 (AVX2 + FMA), x86-64 (the baseline, no FMA); or $SGRAD_TARGET")
    try:
        print('built', build(target=parser.parse_args().target), 'for', build_description())
    except (OSError, subprocess.CalledProcessError) as error:
        print(f'sgrad.native: not built ({error}); the NumPy + OpenBLAS convolution will be used', file=sys.stderr)
