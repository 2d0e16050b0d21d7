#!/usr/bin/env python
"""SmoothGrad on EfficientNet-Lite0 at 224x224: this project against PyTorch + Captum, side by side.

    python benchmarks/bench_imagenet.py                  # N=50, one photograph, median of 7 rounds
    python benchmarks/bench_imagenet.py --repeats 1      # a quick look

1. Seconds per SmoothGrad map (data/photos/chelsea.png, N samples, noise 10%): this project at
   batch sizes 10 and 25, Chainer's stock grouped convolution for the depthwise layers (the
   model's links as they are), and PyTorch + Captum NoiseTunnel(Saliency) on
   efficientnet-lite-pytorch, the reference implementation, with the same weights.
2. Where this project's time goes: forward + backward time per kind of Chainer function
   (chainer.function_hooks.TimerHook) over one batch; and the nodes that sgrad.native compiles, with
   its kernels and with NumPy's path instead (sgrad.native switched off), interleaved in one process.
3. Peak NumPy memory of an N=200 map at --batchsize 10 (tracemalloc).

PyTorch, Captum and efficientnet-lite-pytorch are optional (`pip install torch==2.13.0 captum
efficientnet-lite-pytorch`, then `pip install "setuptools<70"` again); without them the peer row is
skipped with a message.
"""
import argparse
import collections
import os
import tracemalloc

from common import NodeTimer, interleaved_median_ms  # first: the project on sys.path, sgrad before NumPy

import chainer
import numpy as np
from chainer.function_hooks import TimerHook

from sgrad import native
from sgrad.blas import blas_kernels
from sgrad.cli import keep_freed_memory
from sgrad.data import PHOTOS_DIR, load_image_file
from sgrad.efficientnet import IMAGE_SIZE, ConvBNReLU6, default_weights_path, load_efficientnet_lite0
from sgrad.saliency import GradientEngine, noise_stdev, smoothgrad

NOISE = 0.1


def torch_peer():
    """The reference implementation with the same weights, scaling [0, 1] images inside like ours; or None."""
    try:
        import torch
        from captum.attr import NoiseTunnel, Saliency  # noqa: F401
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        print('(PyTorch + Captum peer skipped: %s)' % e)
        return None
    torch.set_num_threads(os.cpu_count())
    reference = EfficientNet.from_name('efficientnet-lite0')
    reference.load_state_dict(torch.load(default_weights_path(), map_location='cpu'))

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = reference

        def forward(self, x):
            return self.net(x * (255. / 128.) - 127. / 128.)

    return torch, Scaled().eval()


def stock_depthwise(model):
    """The same model with its depthwise layers on Chainer's own F.convolution_2d(groups=C)."""
    for link in model.links():
        if isinstance(link, ConvBNReLU6):
            link.depthwise = False
    return model


def profile(model, x, target, batchsize):
    """Milliseconds per kind of Chainer function over one batch's forward and backward."""
    xs = np.repeat(x[None], batchsize, axis=0)
    engine = GradientEngine(model, batchsize=batchsize)
    engine(xs, target)  # warm-up
    hook = TimerHook()
    with hook:
        engine(xs, target)
    totals = collections.Counter()
    for name, seconds in hook.call_history:
        totals[name] += 1000 * seconds
    return totals


#: The nodes that run on sgrad.native's kernels where it is built
COMPILED_NODES = ('DepthwiseConvolution', 'DepthwiseGradInput', 'ReLUGradient')


def compiled_against_numpy(model, x, target, batchsize, rounds):
    """Median ms per batch of each of COMPILED_NODES (NodeTimer sums over one forward + input backward),
    with sgrad.native's kernels and with NumPy's path, the two interleaved round by round."""
    xs = np.repeat(x[None], batchsize, axis=0)
    engine = GradientEngine(model, batchsize=batchsize)
    engine(xs, target)  # warm-up (and the folded copy's caches)
    supports = native.supports
    totals = {True: collections.defaultdict(list), False: collections.defaultdict(list)}
    try:
        for _ in range(rounds):
            for compiled in (True, False):
                native.supports = supports if compiled else (lambda *arrays, **kwargs: False)
                timer = NodeTimer()
                with timer:
                    engine(xs, target)
                for label in COMPILED_NODES:
                    totals[compiled][label].append(sum(ms for (name, _), ms in timer.ms.items() if name == label))
    finally:
        native.supports = supports
    return {label: (np.median(totals[True][label]), np.median(totals[False][label])) for label in COMPILED_NODES}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--samples', '-n', type=int, default=50)
    p.add_argument('--repeats', type=int, default=7, help='interleaved timed rounds (default: %(default)s)')
    p.add_argument('--skip-stock', action='store_true', help='skip the slow stock-depthwise row')
    p.add_argument('--malloc-default', action='store_true',
                   help="leave glibc's malloc as it is (the scripts call sgrad.cli.keep_freed_memory())")
    args = p.parse_args()
    if not args.malloc_default:
        keep_freed_memory()

    model = load_efficientnet_lite0()
    x, _ = load_image_file(os.path.join(PHOTOS_DIR, 'chelsea.png'), IMAGE_SIZE)
    target = int(GradientEngine(model).probabilities(x[None]).argmax())
    n = args.samples
    rows = [('this project, batch 10', lambda: smoothgrad(model, x, target, NOISE, n, 10, np.random.RandomState(0))),
            ('this project, batch 25', lambda: smoothgrad(model, x, target, NOISE, n, 25, np.random.RandomState(0)))]
    if not args.skip_stock:
        stock = stock_depthwise(load_efficientnet_lite0())
        rows.append(('Chainer stock depthwise (groups=C), batch 10',
                     lambda: smoothgrad(stock, x, target, NOISE, n, 10, np.random.RandomState(0))))
    peer = torch_peer()
    if peer:
        torch, net = peer
        from captum.attr import NoiseTunnel, Saliency
        xt = torch.from_numpy(x[None].copy())
        tunnel = NoiseTunnel(Saliency(net))
        rows.append(('PyTorch + Captum NoiseTunnel(Saliency)',
                     lambda: tunnel.attribute(xt, nt_type='smoothgrad', nt_samples=n,
                                              stdevs=noise_stdev(x, NOISE), target=target)))
    medians = interleaved_median_ms([fn for _, fn in rows], args.repeats)
    results = [(name, ms / 1000) for (name, _), ms in zip(rows, medians)]
    reference = dict(results).get('PyTorch + Captum NoiseTunnel(Saliency)')
    print('SmoothGrad of EfficientNet-Lite0, chelsea.png 224x224, N=%d, median of %d interleaved rounds '
          '(OpenBLAS kernels: %s)' % (n, args.repeats, blas_kernels()))
    print('%-48s %10s %14s' % ('variant', 's per map', 'x PyTorch time'))
    for name, seconds in results:
        print('%-48s %10.2f %14s' % (name, seconds, '%.2f' % (seconds / reference) if reference else '-'))

    print('\nWhere the time goes: one batch of 10, forward + input backward, ms per kind of function')
    totals = profile(model, x, target, 10)
    for label, ms in totals.most_common(8):
        print('%-48s %10.0f %13.0f%%' % (label, ms, 100 * ms / sum(totals.values())))

    if native.library() is not None:
        print('\nThe compiled nodes, one batch of 10, ms (NodeTimer; median of %d interleaved rounds)' % args.repeats)
        print('%-48s %10s %14s' % ('node', 'compiled', 'NumPy path'))
        for label, (compiled, numpy_path) in compiled_against_numpy(model, x, target, 10, args.repeats).items():
            print('%-48s %10.1f %14.1f' % (label, compiled, numpy_path))

    print('\nPeak NumPy memory of one N=200 map at --batchsize 10 (tracemalloc)')
    tracemalloc.start()
    smoothgrad(model, x, target, NOISE, 200, 10, np.random.RandomState(0))
    print('%-48s %7.0f MB' % ('this project', tracemalloc.get_traced_memory()[1] / 2 ** 20))
    tracemalloc.stop()


if __name__ == '__main__':
    main()
