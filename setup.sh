#!/bin/sh
# Installs the project's requirements into the active Python (3.8-3.12).
# chainer 7.8.1 is an sdist whose setup.py imports pkg_resources, so it is built
# with --no-build-isolation against a setuptools<70 installed first.
set -e
python -m pip install "setuptools>=40,<70" wheel
python -m pip install --no-build-isolation -r requirements.txt
# The package itself, editable: `import sgrad` works from any folder (pyproject.toml).
python -m pip install --no-build-isolation --no-deps -e .
# Python 3.12: NumPy has no numpy.distutils, which `import chainer` asks for; this installs a
# stand-in as a start-up hook of the environment (see sgrad/chainer_py312.py). Nothing on 3.8-3.11.
python -m sgrad.chainer_py312
# The compiled 3x3 convolution (sgrad/native.c -> sgrad/_native.so, for this CPU); without a C
# compiler it says so and the NumPy + OpenBLAS convolution runs instead.
python -m sgrad.native
python -c "import chainer, numpy; print('chainer', chainer.__version__, '/ numpy', numpy.__version__, ': ready')"
