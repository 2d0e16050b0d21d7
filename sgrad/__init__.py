"""SmoothGrad and the other attribution methods on any Chainer model: the package behind smoothgrad.py,
model.py, train.py and evaluate_saliency.py.

Importing sgrad before NumPy (every script and the tests do) also picks OpenBLAS's kernels: see
``sgrad.blas.select_blas_kernels``.
"""
from sgrad.blas import select_blas_kernels

select_blas_kernels()
