"""The Python 3.12 stand-in for numpy.distutils (sgrad/chainer_py312.py).

CI runs the whole suite on Python 3.11 and on 3.12; these tests run on both, each
expecting what its version does: on 3.11 the real numpy.distutils and the hook unused,
on 3.12 `import chainer` failing without the hook and working with it.
"""
import importlib.util
import subprocess
import sys
import sysconfig

import pytest

from sgrad.chainer_py312 import NumpyDistutilsStandIn, install

NUMPY_LACKS_DISTUTILS = sys.version_info >= (3, 12)


def test_the_stand_in_supplies_only_the_two_modules():
    finder = NumpyDistutilsStandIn()
    spec = finder.find_spec('numpy.distutils.system_info')
    info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(info)
    assert info.get_info('blas_opt') == {}
    assert finder.find_spec('numpy.distutils').submodule_search_locations is not None  # a package
    assert finder.find_spec('numpy.linalg') is None and finder.find_spec('distutils') is None


def import_chainer_in_a_fresh_python(hook_dir=None):
    """`import chainer` in a new interpreter that sees the environment's packages but none of its
    start-up hooks, plus those in hook_dir; prints the loader of numpy.distutils.system_info."""
    code = ['import site, sys',
            'sys.path.append(%r)' % sysconfig.get_paths()['purelib'],  # no .pth files processed
            'import chainer',
            'info = sys.modules["numpy.distutils.system_info"]',
            'print(type(info.__spec__.loader).__name__, info.get_info("blas_opt") == {})']
    if hook_dir:
        code.insert(2, 'site.addsitedir(%r)' % hook_dir)  # processes the .pth that install() wrote
    return subprocess.run([sys.executable, '-S', '-c', '\n'.join(code)], capture_output=True, text=True)


def test_chainer_imports_through_the_installed_hook(tmp_path):
    install(str(tmp_path))
    proc = import_chainer_in_a_fresh_python(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    if NUMPY_LACKS_DISTUTILS:
        assert proc.stdout.split() == ['NumpyDistutilsStandIn', 'True']
    else:  # the real module wins: the hook changes nothing
        assert proc.stdout.split()[0] == 'SourceFileLoader'


@pytest.mark.skipif(not NUMPY_LACKS_DISTUTILS, reason='Python < 3.12: NumPy has numpy.distutils')
def test_without_the_hook_chainer_does_not_import_on_python_312():
    proc = import_chainer_in_a_fresh_python()
    assert proc.returncode != 0 and "No module named 'numpy.distutils'" in proc.stderr
