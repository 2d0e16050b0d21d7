"""Shared fixtures: small CifarNets with random but non-trivial weights; the optional peer checks' PyTorch port
of CifarNet and their measure of difference."""
import sgrad  # noqa: F401  (before NumPy: picks OpenBLAS's kernels, as the scripts do)

import os
import sys

import chainer
import numpy as np
import pytest

from model import CifarNet
from sgrad.data import have_local_cifar10, load_test_image

needs_cifar10 = pytest.mark.skipif(
    not have_local_cifar10(),
    reason='no local CIFAR-10 copy (set CHAINER_DATASET_ROOT to a folder with '
           'pfnet/chainer/cifar/cifar-10.npz); not downloading 170 MB in a test')


BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


def relative_difference(ours, reference):
    """max |ours - reference| / max |reference|, printed for the record (pytest -s shows it)."""
    difference = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print('relative difference %.1e' % difference)
    return difference


def torch_cifarnet(model, monkeypatch):
    """torch and the PyTorch port of CifarNet ``model`` with its weights (benchmarks/bench_peer.py's, which
    imports Captum too); skips the calling test, with its reason, without torch or Captum."""
    pytest.importorskip('torch', reason='optional peer check: pip install torch==2.13.0')
    pytest.importorskip('captum', reason='optional peer check: pip install captum')
    monkeypatch.syspath_prepend(BENCHMARKS_DIR)
    from bench_peer import torch_peer
    return torch_peer(model)


def import_zennit(monkeypatch):
    """torch and zennit 0.5.1, or a skip; without a torchvision that imports, with bench_rules.torchvision_stubs
    for the duration of the test (the LRP ports' builders live in benchmarks/bench_rules.py too)."""
    torch = pytest.importorskip('torch', reason='optional peer check: pip install torch==2.13.0')
    monkeypatch.syspath_prepend(BENCHMARKS_DIR)
    from bench_rules import torchvision_stubs
    for name, module in torchvision_stubs(torch).items():
        monkeypatch.setitem(sys.modules, name, module)
    zennit = pytest.importorskip('zennit', reason='optional peer check: pip install --no-deps zennit')
    import zennit.attribution  # noqa: F401
    import zennit.composites  # noqa: F401
    import zennit.layer  # noqa: F401
    import zennit.rules  # noqa: F401
    import zennit.types  # noqa: F401
    return torch, zennit


def random_cifarnet(width=4, seed=0, dtype=np.float32):
    """A CifarNet with random weights and random BatchNorm statistics, so that
    eval-mode normalisation is not the identity."""
    rng = np.random.RandomState(seed)
    with chainer.using_config('dtype', dtype):
        np.random.seed(seed)
        model = CifarNet(width=width)
    for link in model.links():
        if isinstance(link, chainer.links.BatchNormalization):
            size = link.avg_mean.shape
            link.avg_mean[...] = rng.normal(0, 0.1, size)
            link.avg_var[...] = rng.uniform(0.5, 2.0, size)
            link.gamma.array[...] = rng.uniform(0.5, 1.5, size)
            link.beta.array[...] = rng.normal(0, 0.1, size)
    return model


def skip_without_native():
    """Skips the calling test where sgrad.native's compiled kernels are not there to test."""
    from sgrad import native
    if native.library() is None:
        pytest.skip('sgrad/_native.so is not built (python -m sgrad.native) or SGRAD_NATIVE=0')


@pytest.fixture(params=['winograd', 'direct', 'numpy'])
def kernel_path(request, monkeypatch):
    """Runs a test on every kind of 3x3 convolution and 2x2 max pooling: sgrad.native's compiled kernels,
    with the convolution by Winograd F(2x2, 3x3) where it applies (the default) or direct everywhere, and
    the NumPy + OpenBLAS ones."""
    from sgrad import convolution, native
    if request.param == 'numpy':
        monkeypatch.setattr(native, 'library', lambda: None)
    else:
        skip_without_native()
    monkeypatch.setattr(convolution, 'WINOGRAD', request.param == 'winograd')
    return request.param


@pytest.fixture(scope='session')
def model():
    return random_cifarnet()


@pytest.fixture(scope='session')
def image():
    """The blog's image: CIFAR-10 test image #0 (a cat), from the shipped samples."""
    x, label = load_test_image(0)
    return x


@pytest.fixture
def model_file(tmp_path, model):
    path = str(tmp_path / 'model.npz')
    chainer.serializers.save_npz(path, model)
    return path
