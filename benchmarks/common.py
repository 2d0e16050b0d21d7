"""Timing helpers shared by the benchmark scripts."""
import os
import sys
import time

import chainer
import chainer.functions as F
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sgrad.saliency import channel_sum_abs, noisy_copies  # noqa: E402


def median_ms(fn, repeats):
    """Median wall time of fn() in milliseconds over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def blog_smoothgrad(forward, model, x, target, noise, samples, rng):
    """The blog's code: one .backward() of S_c over the whole tiled batch, parameter gradients included."""
    xv = chainer.Variable(noisy_copies(x, noise, samples, rng))
    with chainer.using_config('train', False):
        y = forward(model, xv)
    model.cleargrads()
    F.sum(F.select_item(y, np.full(samples, target, np.int32))).backward()
    return channel_sum_abs(xv.grad)
