"""What the command-line scripts share: one-line argument errors, the --gpu device, files written whole,
a progress bar, and glibc's malloc kept from returning memory."""
import argparse
import ctypes
import math
import os
import sys
import tempfile

from sgrad.errors import InputError


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


def machine_name(cpuinfo='/proc/cpuinfo'):
    """'N cores of <CPU model>' (Linux), or 'N cores' where the model is not known: what timings name."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    try:
        with open(cpuinfo) as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
    except OSError:
        model = None
    return '%d cores%s' % (cores, ' of ' + model if model else '')


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
