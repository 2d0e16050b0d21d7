"""Shared fixtures: small CifarNets with random but non-trivial weights; the optional peer checks' PyTorch port
of CifarNet and their measure of difference; the record of what the cross checks measured.

A test marked ``cross_check(method, ...)`` holds those methods' maps against a reference implementation, its
bounds through ``within``. ``pytest --record-checks docs/methods/cross_checks.json`` writes the largest
difference each such test measured, with the date, machine and the references' versions, into the file the
method cards (sgrad/cards.py) read; a test that did not run in full keeps its earlier entry."""
import sgrad  # noqa: F401  (before NumPy: picks OpenBLAS's kernels, as the scripts do)

import datetime
import importlib.metadata
import json
import os
import platform
import re
import sys

import chainer
import numpy as np
import pytest

from model import CifarNet, load_model
from sgrad.cli import machine_name
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


#: The test running now (``within`` records into it).
running = []


def within(difference, bound):
    """``difference < bound``; in a cross-check test the difference is also recorded for --record-checks."""
    if running:
        running[-1].user_properties.append(('difference', (difference, bound)))
    return difference < bound


@pytest.fixture(autouse=True)
def _the_running_test(request):
    running.append(request.node)
    yield
    running.pop()


def pytest_addoption(parser):
    parser.addoption('--record-checks', metavar='PATH',
                     help="write the largest difference each cross-check test measured to PATH (JSON: the method "
                          "cards' docs/methods/cross_checks.json), keeping the entries of tests that did not run "
                          "in full")


def pytest_configure(config):
    config.addinivalue_line('markers', "cross_check(*methods, against=distributions): the test holds these "
                                       "methods against a reference implementation (in those installed "
                                       "packages, whose versions are recorded; none: a reference in the test); "
                                       "its measured differences go to the cards")
    config.addinivalue_line('markers', "numerical: the test computes with the engine's kernels; .ci/run runs these "
                                       "again under each build of sgrad/native.c (AVX2, baseline x86-64) and "
                                       "under SGRAD_NATIVE=0: `pytest -m numerical`")
    config.cross_checks = {}


def record_id(item):
    """A test's entry in the record: the test function's (its cases share it) where the marker is the function's,
    the case's where a parameter carries it."""
    marked_function = any(mark.name == 'cross_check' for mark in getattr(item.function, 'pytestmark', ()))
    return re.sub(r'\[.*\]$', '', item.nodeid) if marked_function else item.nodeid


def pytest_runtest_makereport(item, call):
    """Keeps a cross-check case's recorded differences, or None where it failed or was skipped."""
    marker = item.get_closest_marker('cross_check')
    if marker is None or not (call.when == 'call' or call.excinfo):
        return
    test = item.config.cross_checks.setdefault(record_id(item), dict(
        methods=list(marker.args), references=marker.kwargs.get('against', ()), cases=[]))
    test['cases'].append(None if call.excinfo else [d for name, d in item.user_properties if name == 'difference'])


def pytest_sessionfinish(session):
    path = session.config.getoption('--record-checks')
    if not path:
        return
    record = {}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    for test, measured in session.config.cross_checks.items():
        cases = measured['cases']
        if not cases or None in cases or not all(cases):
            continue  # skipped, failed, or measured nothing: the earlier entry stays
        differences = [d for case in cases for d in case]
        worst = max(differences, key=lambda d: d[0] / d[1])
        record[test] = dict(methods=measured['methods'], cases=len(cases), difference=float('%.2g' % worst[0]),
                            bound=worst[1], date=datetime.date.today().isoformat(), machine=machine_name(),
                            python=platform.python_version(),
                            references={name: importlib.metadata.version(name) for name in measured['references']})
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write('\n')
    os.replace(path + '.tmp', path)


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


@pytest.fixture(scope='module')
def shipped64():
    """The shipped CifarNet in float64 (a module's own copy)."""
    with chainer.using_config('dtype', np.float64):
        return load_model()


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
