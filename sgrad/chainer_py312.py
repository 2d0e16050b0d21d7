"""Chainer 7.8.1 on Python 3.12: a stand-in for ``numpy.distutils.system_info``.

``import chainer`` runs chainer/_environment_check.py, whose line 6 is
``import numpy.distutils.system_info``. Chainer uses that module for one macOS-only
check (``_check_osx_numpy_backend``: warn when NumPy is linked against Apple's
Accelerate). NumPy has no ``numpy.distutils`` on Python 3.12 (``distutils`` left the
standard library), so there ``import chainer`` fails, although nothing else needs it.

:class:`NumpyDistutilsStandIn` is an import finder placed at the *end* of
``sys.meta_path``: Python asks it only after every real finder came up empty. Where
NumPy has ``numpy.distutils`` (Python 3.8-3.11) it is never used and changes nothing.
Otherwise it supplies both modules, ``get_info()`` returning ``{}`` ("no BLAS
information"), so the macOS check finds no Accelerate and stays quiet.

``setup.sh`` runs ``python -m sgrad.chainer_py312``, which installs it into the
environment as a start-up hook (a ``.pth`` file in site-packages) where NumPy lacks
``numpy.distutils``: then it is in effect for every script, whatever it imports first.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig

STAND_INS = ('numpy.distutils', 'numpy.distutils.system_info')
HOOK = 'chainer_py312_shim'   # the module's name once copied into site-packages


class NumpyDistutilsStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads empty ``numpy.distutils`` and a ``system_info`` with ``get_info() == {}``."""

    def find_spec(self, name, path=None, target=None):
        if name in STAND_INS:
            return importlib.machinery.ModuleSpec(name, self, is_package=name == STAND_INS[0])
        return None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        if module.__name__ == STAND_INS[1]:
            module.get_info = lambda name, notfound_action=0: {}


def register():
    """Append the stand-in finder to sys.meta_path (once)."""
    if not any(isinstance(finder, NumpyDistutilsStandIn) for finder in sys.meta_path):
        sys.meta_path.append(NumpyDistutilsStandIn())


def install(site_packages=None):
    """Copy this module into site-packages with a .pth line that registers it at every start-up."""
    site_packages = site_packages or sysconfig.get_paths()['purelib']
    shutil.copyfile(os.path.abspath(__file__), os.path.join(site_packages, HOOK + '.py'))
    with open(os.path.join(site_packages, HOOK + '.pth'), 'w') as f:
        f.write('import %s; %s.register()\n' % (HOOK, HOOK))
    return site_packages


def numpy_has_distutils():
    """Whether NumPy brings a real numpy.distutils (not this stand-in, once installed)."""
    spec = importlib.util.find_spec('numpy.distutils')
    return spec is not None and type(spec.loader).__name__ != NumpyDistutilsStandIn.__name__


if __name__ == '__main__':
    if numpy_has_distutils():
        print('numpy.distutils is there: Chainer imports as it is, no shim needed')
    else:
        print('numpy.distutils is missing (Python %d.%d): installed the stand-in hook into %s'
              % (sys.version_info[:2] + (install(),)))
