"""sgrad picks OpenBLAS's kernels from the CPU's features before NumPy loads (OpenBLAS 0.3.23 falls back
to its Prescott kernels on CPU models it does not know)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import sgrad

pytestmark = pytest.mark.numerical

AVX512 = 'fpu sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni'


@pytest.fixture
def before_numpy(monkeypatch):
    """As if NumPy were not loaded yet and the user had not chosen kernels."""
    monkeypatch.delitem(sys.modules, 'numpy')
    monkeypatch.delenv('OPENBLAS_CORETYPE', raising=False)


def cpuinfo(tmp_path, flags):
    path = tmp_path / 'cpuinfo'
    path.write_text('processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: %s\n\nprocessor\t: 1\n' % flags)
    return str(path)


@pytest.mark.parametrize('flags, kernels', [(AVX512, 'SkylakeX'), ('sse2 avx avx2 fma', 'Haswell'),
                                            ('sse2 avx', None), ('', None)])
def test_the_kernels_follow_the_cpu_features(tmp_path, before_numpy, flags, kernels):
    assert sgrad.blas.select_blas_kernels(cpuinfo(tmp_path, flags)) == kernels
    assert os.environ.get('OPENBLAS_CORETYPE') == kernels


def test_a_users_choice_and_a_loaded_numpy_are_left_alone(tmp_path, before_numpy, monkeypatch):
    monkeypatch.setenv('OPENBLAS_CORETYPE', 'Haswell')
    assert sgrad.blas.select_blas_kernels(cpuinfo(tmp_path, AVX512)) is None
    assert os.environ['OPENBLAS_CORETYPE'] == 'Haswell'
    monkeypatch.delenv('OPENBLAS_CORETYPE')
    monkeypatch.setitem(sys.modules, 'numpy', np)
    assert sgrad.blas.select_blas_kernels(cpuinfo(tmp_path, AVX512)) is None
    assert 'OPENBLAS_CORETYPE' not in os.environ


def test_no_cpuinfo_changes_nothing(tmp_path, before_numpy):
    assert sgrad.blas.select_blas_kernels(str(tmp_path / 'missing')) is None
    assert 'OPENBLAS_CORETYPE' not in os.environ


@pytest.mark.skipif(not os.path.exists('/proc/cpuinfo'), reason='no /proc/cpuinfo on this system')
def test_openblas_runs_the_kernels_chosen_and_computes_right():
    """In a fresh interpreter that imports sgrad first, as the scripts do."""
    env = {k: v for k, v in os.environ.items() if k != 'OPENBLAS_CORETYPE'}
    code = ('import os, sgrad, numpy as np\n'
            'r = np.random.RandomState(0); a, b = r.rand(300, 500).astype(np.float32), r.rand(500, 70).astype(np.float32)\n'
            'exact = a.astype(np.float64) @ b\n'
            'print(os.environ.get("OPENBLAS_CORETYPE"), sgrad.blas.blas_kernels(), np.abs(a @ b - exact).max() / exact.max())')
    chosen, running, error = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                                            check=True).stdout.split()
    if chosen == 'None':
        pytest.skip('this CPU has neither AVX-512 nor AVX2: OpenBLAS keeps its own choice (%s)' % running)
    assert running == chosen
    assert float(error) < 1e-6


@pytest.mark.skipif(sgrad.blas.blas_kernels() is None, reason='NumPy has no OpenBLAS here')
def test_blas_threads_sets_openblas_threads_for_the_block_and_restores_them():
    threads = sgrad.blas.openblas_function('openblas_get_num_threads')
    before = threads()
    with sgrad.blas.blas_threads(1):
        assert threads() == 1
        a = np.random.RandomState(0).randn(300, 300)
        np.testing.assert_allclose(a @ a.T, np.einsum('ij,kj->ik', a, a), rtol=1e-10, atol=1e-10)
    assert threads() == before
