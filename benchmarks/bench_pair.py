#!/usr/bin/env python
"""XRAI, Blur IG and Guided IG: this project's batched methods against PAIR saliency's, on the same engine.

    python benchmarks/bench_pair.py                 # 100 CIFAR-10 test images, the 4 photographs
    python benchmarks/bench_pair.py --images 20 --photos 1     # a quick look

PAIR's methods run image by image through sgrad.pair's adapter over the same GradientEngine, with its
defaults (XRAI: 100 IG steps from each of two baselines; Blur IG: 100 steps; Guided IG: 200 steps) and
as its documentation drives them: IG's and Blur IG's steps of one image as one batch (batch_size =
steps), Guided IG one path point a call (its path is sequential). Ours: every image and step through the
engine's chunked batches at --batchsize (default: the engine's, 512 images at 32x32, 10 at 224x224).
Each row: seconds for all images and images per second, PAIR first; the ratio is PAIR's time over ours
(above 1: ours is faster); peak NumPy memory of ours (tracemalloc), which the batch size bounds; the share of
PAIR's time spent in its calls of the model (the engine's gradients, which ours computes too), and PAIR's
time over those calls' time. Where PAIR's calls are already full batches (XRAI's IG, Blur IG: 100 path
points a call) the engine computes those gradients as fast per image as in ours, and that last ratio is the
most any method on the same engine can gain without computing fewer gradients; where PAIR's calls are small
(Guided IG: one point) batching makes the gradients themselves cheaper. One round each (these runs take
minutes): run it on a quiet machine.
"""
import argparse
import time
import tracemalloc

import common  # noqa: F401  (first: the project on sys.path, sgrad before NumPy)

from sgrad.cli import keep_freed_memory
from sgrad.data import PHOTOS_DIR, load_image_folder, load_test_images
from sgrad.pair import TARGET, call_model_function, to_pair
from sgrad.paths import BlurIG, GuidedIG
from sgrad.saliency import AUTO_BATCHSIZE, GradientEngine
from sgrad.xrai import XRAI


METHODS = ('XRAI', 'Blur IG', 'Guided IG')


def pair_runs(engine, clock):
    """name -> (PAIR's mask of one image, this project's method); clock[0] adds up the seconds PAIR's calls of
    the model (the engine's gradients) take."""
    import saliency.core as pair
    model = call_model_function(engine)

    def call(*args, **kwargs):
        start = time.perf_counter()
        output = model(*args, **kwargs)
        clock[0] += time.perf_counter() - start
        return output
    return {
        'XRAI': (lambda x, t: pair.XRAI().GetMask(to_pair(x), call, {TARGET: t}, batch_size=100),
                 XRAI(engine)),
        'Blur IG': (lambda x, t: pair.BlurIG().GetMask(to_pair(x), call, {TARGET: t}, batch_size=100,
                                                       max_sigma=BlurIG(engine).sigmas(x[None])[-1]),
                    BlurIG(engine)),
        'Guided IG': (lambda x, t: pair.GuidedIG().GetMask(to_pair(x), call, {TARGET: t}), GuidedIG(engine)),
    }


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_mb(fn):
    """Peak NumPy memory of fn() in MB (tracemalloc sees NumPy's allocations)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2 ** 20


def compare(title, engine, images, targets, methods):
    print('\n%s: %d images, our batch size %s' % (title, len(images), engine.batch_step(len(images), images.shape)))
    print('%-10s %12s %12s %8s %14s %12s' % ('method', 'PAIR s', 'ours s', 'ratio', 'our peak MB', 'PAIR model'))
    clock = [0.0]
    for name, (theirs, ours) in pair_runs(engine, clock).items():
        if name not in methods:
            continue
        clock[0] = 0.0
        pair_s = timed(lambda: [theirs(x, t) for x, t in zip(images, targets)])
        ours_s = timed(lambda: ours.attribute(images, targets))
        peak = peak_mb(lambda: ours.attribute(images, targets))
        print('%-10s %12.1f %12.1f %7.2fx %14.0f %11.0f%%   (%.2f vs %.2f images/s; PAIR over its model calls %.2fx)'
              % (name, pair_s, ours_s, pair_s / ours_s, peak, 100 * clock[0] / pair_s, len(images) / pair_s,
                 len(images) / ours_s, pair_s / clock[0]), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=100, help='CIFAR-10 test images (default: %(default)s)')
    p.add_argument('--photos', type=int, default=4, help='photographs of data/photos (default: all 4)')
    p.add_argument('--batchsize', '-b', type=int, default=None, help="our engine's batch size (default: auto)")
    p.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS), help='(default: all three)')
    args = p.parse_args()
    keep_freed_memory()
    from model import load_model
    from sgrad.efficientnet import load_efficientnet_lite0
    cases = []
    if args.images:
        cases.append(('CifarNet, CIFAR-10 test images', load_model, lambda: load_test_images(0, args.images)[0]))
    if args.photos:
        cases.append(('EfficientNet-Lite0, photographs at 224x224', load_efficientnet_lite0,
                      lambda: load_image_folder(PHOTOS_DIR, 224, args.photos)[0]))
    for title, model, images in cases:
        engine = GradientEngine(model(), batchsize=args.batchsize or AUTO_BATCHSIZE)
        images = images()
        compare(title, engine, images, engine.probabilities(images).argmax(axis=1), args.methods)


if __name__ == '__main__':
    main()
