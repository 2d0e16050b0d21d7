#!/usr/bin/env python
"""This project against naive Chainer, PyTorch + Captum and the FLOP bound, side by side.

    python benchmarks/bench_peer.py                 # SmoothGrad N=100, training images/s, peak memory

1. ms per SmoothGrad map (one image, N samples, median of --repeats rounds after a warm-up round, each
   round running every variant once, so that load on the machine hits all of them alike):
   naive Chainer (standard NCHW layers, the blog's .backward() on the tiled batch), this project
   (whole batch and chunks), PyTorch + Captum NoiseTunnel(Saliency) on the identical network and
   weights, and the FLOP bound (forward + input backward at the measured float32 GEMM rate).
2. Where a map's time goes: milliseconds per node (each layer's convolution, its gradient, ...) and
   outside the nodes.
3. Training images/s (batch 128, MomentumSGD): naive Chainer, this project, PyTorch.
4. Peak memory of one N=1000 map (tracemalloc, NumPy buffers), whole batch against chunks of 100.

PyTorch and Captum are optional (`pip install torch==2.13.0 captum`, then `pip install
"setuptools<70"` again, since torch pulls a setuptools that Chainer 7.8.1 cannot import with);
without them their rows are skipped with a message.
"""
import argparse
import os
import time
import tracemalloc

from common import NodeTimer, blog_smoothgrad, interleaved_median_ms, median_ms  # first: the project on sys.path, sgrad before NumPy

import chainer
import chainer.functions as F
import numpy as np

from model import CIFAR10_MEAN, CIFAR10_STD, DEFAULT_MODEL_PATH, CifarNet, load_model
from sgrad import native
from sgrad.blas import blas_kernels
from sgrad.cli import keep_freed_memory, machine_name
from sgrad.data import load_test_image
from sgrad.convolution import winograd_tiles
from sgrad.reference import plain_chainer_forward
from sgrad.saliency import GradientEngine, noise_stdev, smoothgrad


def naive_chainer_smoothgrad(model, x, target, noise, samples, rng):
    """The blog's code on Chainer's standard NCHW layers."""
    return blog_smoothgrad(plain_chainer_forward, model, x, target, noise, samples, rng)


def convolution_blocks(model):
    """(name, block, input image size) of each 3x3 convolution's block, in order."""
    size = 32
    for name in ('prep', 'conv1', 'res1', 'conv2', 'conv3', 'res3'):
        block = getattr(model, name)
        if name.startswith('res'):
            yield name + '.block1', block.block1, size
            yield name + '.block2', block.block2, size
        else:
            yield name, block, size
        if name in ('conv1', 'conv2', 'conv3'):
            size //= 2  # the pool after these blocks


def convolutions(model):
    """(output channels, input channels, image size) of each 3x3 convolution, in order."""
    for _, block, size in convolution_blocks(model):
        yield block.conv.W.shape[:2] + (size,)


def forward_flops(model):
    """Multiply-adds x 2 of one image's forward pass (convolutions and the classifier)."""
    return 2 * (sum(o * c * 9 * size * size for o, c, size in convolutions(model)) + model.fc.W.size)


def winograd_flops(model, n):
    """Multiply-adds x 2 of one image's forward and input backward as this project computes them at batch n:
    16 instead of 36 per 2x2 output tile and input channel in the convolutions that run by Winograd
    F(2x2, 3x3) (sgrad.convolution.winograd_tiles; the input backward's input channels are the layer's outputs)."""
    macs = 0
    for o, c, size in convolutions(model):
        for inputs in (c, o):  # forward, input backward
            fraction = 16 / 36 if winograd_tiles((inputs, size, size, n), np.float32) else 1
            macs += fraction * o * c * 9 * size * size
    return 2 * (macs + 2 * model.fc.W.size)


def gemm_gflops():
    a = np.random.rand(2048, 2048).astype(np.float32)
    seconds = median_ms(lambda: a @ a, 5) / 1000
    return 2 * 2048 ** 3 / seconds / 1e9


def torch_peer(model):
    """The same network with the same weights in PyTorch, or None if torch/captum are missing."""
    try:
        import torch
        import torch.nn as nn
        from captum.attr import NoiseTunnel, Saliency  # noqa: F401
    except ImportError as e:
        print('(PyTorch + Captum peer skipped: %s; pip install torch==2.13.0 captum)' % e)
        return None
    torch.set_num_threads(2)

    def conv_bn(block):
        o, c = block.conv.W.shape[:2]
        conv = nn.Conv2d(c, o, 3, padding=1, bias=False)
        bn = nn.BatchNorm2d(o, eps=block.bn.eps, momentum=1 - block.bn.decay)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(block.conv.W.array))
            bn.weight.copy_(torch.from_numpy(block.bn.gamma.array))
            bn.bias.copy_(torch.from_numpy(block.bn.beta.array))
            bn.running_mean.copy_(torch.from_numpy(block.bn.avg_mean))
            bn.running_var.copy_(torch.from_numpy(block.bn.avg_var))
        return nn.Sequential(conv, bn, nn.ReLU())

    class Residual(nn.Module):
        def __init__(self, res):
            super().__init__()
            self.f = nn.Sequential(conv_bn(res.block1), conv_bn(res.block2))

        def forward(self, x):
            return x + self.f(x)

    class TorchCifarNet(nn.Module):
        def __init__(self):
            super().__init__()
            # a module per use (Captum's DeepLift keeps each module's input on it) and the global max pool as
            # one (its DeepLift rule is for nn.MaxPool2d modules): CifarNet's last maps are 4x4
            self.body = nn.Sequential(conv_bn(model.prep), conv_bn(model.conv1), nn.MaxPool2d(2),
                                      Residual(model.res1), conv_bn(model.conv2), nn.MaxPool2d(2),
                                      conv_bn(model.conv3), nn.MaxPool2d(2), Residual(model.res3),
                                      nn.MaxPool2d(4), nn.Flatten())
            self.fc = nn.Linear(*model.fc.W.shape[::-1])
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(model.fc.W.array))
                self.fc.bias.copy_(torch.from_numpy(model.fc.b.array))
            self.register_buffer('mean', torch.from_numpy(CIFAR10_MEAN).view(1, 3, 1, 1))
            self.register_buffer('std', torch.from_numpy(CIFAR10_STD).view(1, 3, 1, 1))

        def forward(self, x):
            h = self.body((x - self.mean) / self.std)
            return self.fc(h) * model.LOGIT_SCALE

    return torch, TorchCifarNet().eval()


def torch_training_rate(torch, width, xb, tb, steps):
    """Images/s of PyTorch's training step (MomentumSGD) on the batch xb, tb, a fresh network of
    CifarNet's layout and width: the median of ``steps`` steps."""
    tnet = torch_peer(CifarNet(width=width))[1].train()
    topt = torch.optim.SGD(tnet.parameters(), lr=0.01, momentum=0.9)
    xt, tt = torch.from_numpy(xb), torch.from_numpy(tb.astype(np.int64))

    def torch_step():
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tnet(xt), tt).backward()
        topt.step()
    return len(xb) / median_ms(torch_step, steps) * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--samples', '-n', type=int, default=100)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--train-steps', type=int, default=7, help='timed training steps per variant')
    p.add_argument('--skip-memory', action='store_true')
    p.add_argument('--malloc-default', action='store_true',
                   help="leave glibc's malloc as it is (the scripts call sgrad.cli.keep_freed_memory())")
    args = p.parse_args()
    if not args.malloc_default:
        keep_freed_memory()

    trained = os.path.exists(DEFAULT_MODEL_PATH)
    model = load_model() if trained else CifarNet()
    x, _ = load_test_image(0)
    target, noise, n = 3, 0.1, args.samples
    peer = torch_peer(model)
    gflops = gemm_gflops()
    flops = forward_flops(model)
    print('CifarNet width %d, %.1f MFLOP forward per image (%s); float32 GEMM %.0f GFLOP/s on %s '
          '(OpenBLAS kernels: %s)' % (model.prep.conv.W.shape[0], flops / 1e6, 'trained' if trained else
                                      'random weights', gflops, machine_name(), blas_kernels()))

    rows = [('naive Chainer (NCHW layers, .backward())',
             lambda: naive_chainer_smoothgrad(model, x, target, noise, n, np.random.RandomState(0))),
            ('this project, whole batch', lambda: smoothgrad(model, x, target, noise, n, None,
                                                             np.random.RandomState(0))),
            ('this project, chunks of 25', lambda: smoothgrad(model, x, target, noise, n, 25,
                                                              np.random.RandomState(0)))]
    if peer:
        torch, net = peer
        from captum.attr import NoiseTunnel, Saliency
        xt = torch.from_numpy(x[None].copy())
        sigma = noise_stdev(x, noise)
        tunnel = NoiseTunnel(Saliency(net))
        rows.append(('PyTorch 2.13 + Captum NoiseTunnel(Saliency)',
                     lambda: tunnel.attribute(xt, nt_type='smoothgrad', nt_samples=n, stdevs=sigma, target=target)))
        # same network and weights: the noise-free gradients agree
        ours = GradientEngine(model)(x[None], target)[0]
        theirs = Saliency(net).attribute(xt, target=target, abs=False)[0].numpy()
        print('same-network check: max |grad difference| / max |grad| = %.1e'
              % (np.abs(ours - theirs).max() / np.abs(ours).max()))
    results = list(zip([name for name, _ in rows], interleaved_median_ms([fn for _, fn in rows], args.repeats)))
    bound = 1000 * n * 2 * flops / (gflops * 1e9)
    results.append(('FLOP bound (forward + input backward)', bound))
    if native.library() is not None:
        results.append(("FLOP bound, Winograd's multiplies", 1000 * n * winograd_flops(model, n) / (gflops * 1e9)))
    reference = dict(results).get('PyTorch 2.13 + Captum NoiseTunnel(Saliency)')
    print('\nSmoothGrad, one image, N=%d, median of %d interleaved rounds' % (n, args.repeats))
    print('%-46s %12s %14s' % ('variant', 'ms per map', 'x PyTorch time'))
    for name, ms in results:
        print('%-46s %12.1f %14s' % (name, ms, '%.2f' % (ms / reference) if reference else '-'))

    print('\nWhere the time goes: this project, whole batch, ms per map, the mean of %d maps' % args.repeats)
    timer, start = NodeTimer(), time.perf_counter()
    with timer:
        for _ in range(args.repeats):
            smoothgrad(model, x, target, noise, n, None, np.random.RandomState(0))
    wall = 1000 * (time.perf_counter() - start) / args.repeats
    nodes = timer.ms.most_common()
    rows = [('%s %s' % key, ms) for key, ms in nodes[:12]] + [('other nodes', sum(ms for _, ms in nodes[12:]))]
    rows = [(name, ms / args.repeats) for name, ms in rows]
    rows.append(('outside the nodes (noise, Python, the graph)', wall - sum(ms for _, ms in rows)))
    print('%-46s %12s %14s' % ('node, shape of its first input', 'ms per map', 'share of time'))
    for name, ms in rows:
        print('%-46s %12.1f %13.0f%%' % (name, ms, 100 * ms / wall))

    print('\nTraining, batch 128, MomentumSGD, images/s (median of %d steps)' % args.train_steps)
    xb = np.random.RandomState(1).rand(128, 3, 32, 32).astype(np.float32)
    tb = np.random.RandomState(2).randint(0, 10, 128).astype(np.int32)
    train_rows = []
    for name, forward in (('naive Chainer (NCHW layers)', plain_chainer_forward),
                          ('this project', lambda m, x: m(x))):
        net = CifarNet(width=model.prep.conv.W.shape[0])
        optimizer = chainer.optimizers.MomentumSGD(0.01)
        optimizer.setup(net)

        def step(net=net, optimizer=optimizer, forward=forward):
            net.cleargrads()
            F.softmax_cross_entropy(forward(net, xb), tb).backward()
            optimizer.update()
        train_rows.append((name, 128 / median_ms(step, args.train_steps) * 1000))
    if peer:
        train_rows.append(('PyTorch 2.13', torch_training_rate(peer[0], model.prep.conv.W.shape[0], xb, tb,
                                                               args.train_steps)))
    torch_rate = dict(train_rows).get('PyTorch 2.13')
    print('%-46s %12s %14s' % ('variant', 'images/s', 'x PyTorch rate'))
    for name, rate in train_rows:
        print('%-46s %12.1f %14s' % (name, rate, '%.2f' % (rate / torch_rate) if torch_rate else '-'))

    if not args.skip_memory:
        print('\nPeak NumPy memory of one N=1000 map (tracemalloc)')
        for name, fn in (('naive Chainer, whole batch',
                          lambda: naive_chainer_smoothgrad(model, x, target, noise, 1000, np.random.RandomState(0))),
                         ('this project, whole batch',
                          lambda: smoothgrad(model, x, target, noise, 1000, None, np.random.RandomState(0))),
                         ('this project, chunks of 100',
                          lambda: smoothgrad(model, x, target, noise, 1000, 100, np.random.RandomState(0)))):
            tracemalloc.start()
            fn()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print('%-46s %9.0f MB' % (name, peak / 2 ** 20))


if __name__ == '__main__':
    main()
