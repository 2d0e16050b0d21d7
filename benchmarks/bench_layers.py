#!/usr/bin/env python
"""CifarNet's 3x3 convolutions one by one: the forward by Winograd F(2x2, 3x3) against the direct kernel.

    python benchmarks/bench_layers.py                 # N=100 and N=25, median of 11 interleaved rounds
    python benchmarks/bench_layers.py -n 100 --repeats 5

Each layer of the shipped model (its weights, bias and ReLU) on an input of its shape, (C, H, W, N)
float32, timed as sgrad.convolution.direct_convolution with sgrad.convolution.WINOGRAD on and off in turn. Layers that
Winograd does not take (the 3-channel first one, batches that fill their last vector poorly) run the
direct kernel both ways. Needs the compiled kernels (python -m sgrad.native).
"""
import argparse
import os
import sys

from common import interleaved_median_ms  # first: the project on sys.path, sgrad before NumPy

import numpy as np

from bench_peer import convolution_blocks
from model import DEFAULT_MODEL_PATH, CifarNet, load_model
from sgrad import convolution, native
from sgrad.blas import blas_kernels
from sgrad.cli import keep_freed_memory


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--samples', '-n', type=int, nargs='+', default=[100, 25], help='batch sizes N')
    p.add_argument('--repeats', type=int, default=11)
    args = p.parse_args()
    keep_freed_memory()
    if native.library() is None:
        sys.exit('bench_layers: the compiled kernels are not built (python -m sgrad.native)')
    model = load_model() if os.path.exists(DEFAULT_MODEL_PATH) else CifarNet()
    rng = np.random.RandomState(0)
    print('CifarNet 3x3 convolutions, forward with bias and ReLU, float32, ms (median of %d interleaved rounds; '
          'OpenBLAS kernels: %s)' % (args.repeats, blas_kernels()))
    for n in args.samples:
        print('\nN = %d' % n)
        print('%-14s %-18s %10s %10s %8s' % ('layer', '(C, H, W) -> O', 'direct', 'Winograd', 'ratio'))
        totals = np.zeros(2)
        for name, block, size in convolution_blocks(model):
            W = block.conv.W.array
            o, c = W.shape[:2]
            x, b = rng.rand(c, size, size, n).astype(np.float32), rng.randn(o).astype(np.float32)

            def run(winograd):
                convolution.WINOGRAD = winograd
                convolution.direct_convolution(x, W, b, relu=True)
            times = np.array(interleaved_median_ms([lambda: run(False), lambda: run(True)], args.repeats))
            convolution.WINOGRAD = True
            totals += times
            taken = convolution.winograd_tiles(x.shape, x.dtype) > 0
            print('%-14s %-18s %10.1f %10.1f %8s' % (name, '(%d, %d, %d) -> %d' % (c, size, size, o), *times,
                                                     '%.2f' % (times[1] / times[0]) if taken else '(direct)'))
        print('%-14s %-18s %10.1f %10.1f %8.2f' % ('all', '', *totals, totals[1] / totals[0]))


if __name__ == '__main__':
    main()
