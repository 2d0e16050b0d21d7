"""Timing helpers shared by the benchmark scripts, which import this module first: it puts the
project on sys.path and imports sgrad before NumPy (sgrad picks OpenBLAS's kernels)."""
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sgrad  # noqa: E402,F401

import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402
import numpy as np  # noqa: E402

from sgrad.saliency import channel_sum_abs, noisy_copies  # noqa: E402


def interleaved_median_ms(fns, repeats):
    """Median wall time in milliseconds of each of fns over ``repeats`` rounds, after one warm-up
    round; every round runs each function once, so load on the machine hits all of them alike."""
    times = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            if round_:
                spent.append(time.perf_counter() - start)
    return [1000 * float(np.median(spent)) for spent in times]


def median_ms(fn, repeats):
    """Median wall time of fn() in milliseconds over ``repeats`` runs after one warm-up run."""
    return interleaved_median_ms([fn], repeats)[0]


def blog_smoothgrad(forward, model, x, target, noise, samples, rng):
    """The blog's code: one .backward() of S_c over the whole tiled batch, parameter gradients included."""
    xv = chainer.Variable(noisy_copies(x, noise, samples, rng))
    with chainer.using_config('train', False):
        y = forward(model, xv)
    model.cleargrads()
    F.sum(F.select_item(y, np.full(samples, target, np.int32))).backward()
    return channel_sum_abs(xv.grad)


class NodeTimer(chainer.FunctionHook):
    """Milliseconds spent in each FunctionNode's forward, by (label, shape of its first input): the
    layers of a network apart. A backward's work runs as forwards of nodes of its own (the gradient
    nodes), so nothing is counted twice; what no node does (drawing noise, Python, building the graph)
    is the rest of the wall time."""

    name = 'NodeTimer'

    def __init__(self):
        self.ms = collections.Counter()
        self._starts = []

    def forward_preprocess(self, function, in_data):
        self._starts.append(time.perf_counter())

    def forward_postprocess(self, function, in_data):
        self.ms[function.label, in_data[0].shape] += 1000 * (time.perf_counter() - self._starts.pop())
