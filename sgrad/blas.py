"""NumPy's OpenBLAS: which kernels it runs (chosen from the CPU's features before NumPy loads) and how many
threads. ``import sgrad`` calls select_blas_kernels, so every script imports sgrad before NumPy."""
import contextlib
import ctypes
import functools
import glob
import os
import sys

#: OpenBLAS kernel sets by the CPU features (Linux /proc/cpuinfo flags) they need, fastest first.
BLAS_KERNELS = ((('avx512f', 'avx512bw', 'avx512vl', 'avx512dq', 'avx512cd'), 'SkylakeX'),
                (('avx2', 'fma'), 'Haswell'))


def select_blas_kernels(cpuinfo='/proc/cpuinfo'):
    """Name the kernels NumPy's OpenBLAS should run, from the CPU's features, in OPENBLAS_CORETYPE.

    OpenBLAS 0.3.23 (in NumPy 1.26's wheels) picks its kernels by CPU model, and on a model it does
    not know, such as the AVX-512 Xeon of an earlier session, it falls back to Prescott's SSE3 kernels:
    benchmarks/bench_peer.py printed sgemm at 51 GFLOP/s there against 240 with the AVX-512
    (SkylakeX) ones (docs/speed.md). OpenBLAS reads the variable when it loads, so this acts
    only before NumPy is imported; a value the user set is left alone. Returns the kernel set
    named, or None (nothing changed; Windows and macOS have no /proc/cpuinfo).
    """
    if 'OPENBLAS_CORETYPE' in os.environ or 'numpy' in sys.modules:
        return None
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return None
    for needed, kernels in BLAS_KERNELS:
        if set(needed) <= set(flags):
            os.environ['OPENBLAS_CORETYPE'] = kernels
            return kernels
    return None


@functools.lru_cache(maxsize=None)
def openblas_function(name):
    """The ctypes function ``name`` of NumPy's OpenBLAS (its 64-bit-integer build suffixes names with
    64_), or None where NumPy has another BLAS."""
    import numpy as np
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), 'numpy.libs', 'libopenblas*.so*')
    for path in glob.glob(libs):
        lib = ctypes.CDLL(path)  # the copy NumPy loaded: the same path gives the same handle
        for symbol in (name + '64_', name):
            if hasattr(lib, symbol):
                return getattr(lib, symbol)
    return None


def blas_kernels():
    """The kernel set NumPy's OpenBLAS runs ('SkylakeX', 'Prescott', ...), or None where NumPy has
    another BLAS."""
    corename = openblas_function('openblas_get_corename')
    if corename is None:
        return None
    corename.restype = ctypes.c_char_p
    return corename().decode()


@contextlib.contextmanager
def blas_threads(count):
    """OpenBLAS runs ``count`` threads per call inside the block. For callers that run threads of their
    own (sgrad.blocks.for_blocks): OpenBLAS's idle threads wait for work by spinning, and took the cores
    from those threads (about a quarter of the samples of `perf record` were their sched_yield)."""
    get, set_ = openblas_function('openblas_get_num_threads'), openblas_function('openblas_set_num_threads')
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(count)
    try:
        yield
    finally:
        set_(before)
