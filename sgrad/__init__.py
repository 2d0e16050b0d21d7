"""Helpers behind smoothgrad.py, model.py, train.py and evaluate_saliency.py.

Importing sgrad before NumPy (every script and the tests do) also picks OpenBLAS's kernels: see
``select_blas_kernels``.
"""
import argparse
import contextlib
import ctypes
import functools
import glob
import math
import os
import sys
import tempfile
import zipfile

#: OpenBLAS kernel sets by the CPU features (Linux /proc/cpuinfo flags) they need, fastest first.
BLAS_KERNELS = ((('avx512f', 'avx512bw', 'avx512vl', 'avx512dq', 'avx512cd'), 'SkylakeX'),
                (('avx2', 'fma'), 'Haswell'))


def select_blas_kernels(cpuinfo='/proc/cpuinfo'):
    """Name the kernels NumPy's OpenBLAS should run, from the CPU's features, in OPENBLAS_CORETYPE.

    OpenBLAS 0.3.23 (in NumPy 1.26's wheels) picks its kernels by CPU model, and on a model it does
    not know, such as this machine's Xeon (AVX-512), it falls back to Prescott's SSE3 kernels:
    benchmarks/bench_peer.py printed sgemm at 51 GFLOP/s there against 240 with the AVX-512
    (SkylakeX) ones (README, "Speed"). OpenBLAS reads the variable when it loads, so this acts
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
def _openblas_function(name):
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
    corename = _openblas_function('openblas_get_corename')
    if corename is None:
        return None
    corename.restype = ctypes.c_char_p
    return corename().decode()


@contextlib.contextmanager
def blas_threads(count):
    """OpenBLAS runs ``count`` threads per call inside the block. For callers that run threads of their
    own (sgrad.ops.for_blocks): OpenBLAS's idle threads wait for work by spinning, and took the cores
    from those threads (about a quarter of the samples of `perf record` were their sched_yield)."""
    get, set_ = _openblas_function('openblas_get_num_threads'), _openblas_function('openblas_set_num_threads')
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(count)
    try:
        yield
    finally:
        set_(before)


select_blas_kernels()


class InputError(ValueError):
    """Bad user input: the scripts report it in one line and exit with code 2."""


#: What reading an .npz of weights raises when the file is not one, or holds another architecture.
WEIGHTS_ERRORS = (KeyError, ValueError, OSError, zipfile.BadZipFile)


def weights_error(path, what, error):
    """The InputError for a weights file that could not be read as ``what`` (one of WEIGHTS_ERRORS)."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return InputError('%s does not hold %s (%s)' % (path, what, reason))


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (exit code 2); the usage is in --help."""

    def error(self, message):
        self.exit(2, '%s: error: %s\n' % (self.prog, message))


def finite_float(text):
    """argparse type: a float that is neither NaN nor infinite (both parse as floats)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError('not a number: %r' % text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError('must be a finite number, got %r' % text)
    return value


def get_device(gpu):
    """Chainer's device for a --gpu flag (negative: the CPU), or an InputError."""
    import importlib.util
    import chainer
    if gpu >= 0 and importlib.util.find_spec('cupy') is None:
        raise InputError('cannot use GPU %d: CuPy is not installed (Chainer 7.8.1 needs CuPy 7.x, which needs '
                         'NumPy < 2; this project has not been run on a GPU)' % gpu)
    try:
        return chainer.get_device(gpu if gpu >= 0 else '@numpy')
    except Exception as e:  # CuPy missing, no such GPU: Chainer raises several kinds
        raise InputError('cannot use GPU %d (%s)' % (gpu, ' '.join(str(e).split())))


def write_atomic(path, write):
    """Call write(file) on a temporary file beside ``path``, then rename it into place:
    an interrupted write never leaves a half-written ``path`` (nor the temporary file)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def progress_bar(done, total, unit='images'):
    """Redraw ``[####......] done/total unit`` on stderr when it is a terminal (logs stay clean)."""
    if sys.stderr.isatty():
        width = 30
        filled = width * done // total
        sys.stderr.write('\r[%s%s] %d/%d %s' % ('#' * filled, '.' * (width - filled), done, total, unit))
        if done == total:
            sys.stderr.write('\n')


def keep_freed_memory():
    """Ask glibc's malloc to keep large freed blocks for reuse rather than hand them back to the OS.

    Every forward/backward pass allocates and frees arrays of many MB. By default glibc serves each
    from a fresh mmap, whose pages the kernel must map and zero on first touch: at 224x224 that was
    half of the CPU time, spent in the kernel. The scripts call this once at start; it changes how
    memory is reused, not what is computed. Returns False where there is no glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))
