"""Blocked, threaded work for the project's FunctionNodes (sgrad.convolution, sgrad.activations,
sgrad.batchnorm, sgrad.pooling, sgrad.depthwise) and for metrics' and XRAI's loops over images.

Every node works block by block (``for_blocks``): blocks of about a megabyte (channel ranges of (C, H, W, N)
activations, column ranges of a GEMM's product, images or channel ranges of (N, C, H, W) ones), so that the
several passes made over each stay in a core's cache, spread over threads, so that NumPy's single-threaded
loops and OpenBLAS's one-thread small products use every core. ``gemm``: one OpenBLAS call on column ranges
of matrices, with no temporary.
"""
import concurrent.futures
import ctypes
import functools
import math
import os

import numpy

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
