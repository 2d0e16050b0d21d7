#!/usr/bin/env python
"""Milliseconds per SmoothGrad map (one image, N samples): the per-sample loop
against one batched backward pass, for several chunk sizes.

    python benchmarks/bench_smoothgrad.py            # N=100, median of 7 runs after a warm-up

Prints a table with each variant's ratio to the per-sample loop. Timing does not
depend on the weights, so a random CifarNet of the shipped width stands in when
no trained model exists.
"""
import argparse
import os

from common import blog_smoothgrad, median_ms  # first: the project on sys.path, sgrad before NumPy

import numpy as np

from model import DEFAULT_MODEL_PATH, CifarNet, load_model
from sgrad.data import load_test_image
from sgrad.saliency import smoothgrad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--samples', '-n', type=int, default=100)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--chunks', type=int, nargs='+', default=[10, 25, 50])
    args = p.parse_args()

    model = load_model() if os.path.exists(DEFAULT_MODEL_PATH) else CifarNet()
    x, _ = load_test_image(0)
    target, noise, n = 3, 0.1, args.samples

    def smoothgrad_with(batchsize):
        return lambda: smoothgrad(model, x, target, noise, n, batchsize, np.random.RandomState(0))

    variants = [('per-sample loop (chunk 1)', smoothgrad_with(1))]
    variants += [('batched, chunks of %d' % c, smoothgrad_with(c)) for c in args.chunks if c < n]
    variants += [('batched, all %d at once' % n, smoothgrad_with(None)),
                 ('blog: .backward(), all at once',
                  lambda: blog_smoothgrad(CifarNet.__call__, model, x, target, noise, n, np.random.RandomState(0)))]

    print('SmoothGrad, one 32x32 image, N=%d, median of %d runs (%s)' % (
        n, args.repeats, 'trained model' if os.path.exists(DEFAULT_MODEL_PATH) else 'random weights'))
    results = [(name, median_ms(fn, args.repeats)) for name, fn in variants]
    loop_ms = results[0][1]
    print('%-38s %12s %16s' % ('variant', 'ms per map', 'speed-up vs loop'))
    for name, ms in results:
        print('%-38s %12.1f %15.2fx' % (name, ms, loop_ms / ms))


if __name__ == '__main__':
    main()
