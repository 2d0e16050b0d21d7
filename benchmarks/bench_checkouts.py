#!/usr/bin/env python
"""The same workloads timed in two or more checkouts of this project, interleaved: a change's cost or gain.

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python -m sgrad.native)
    python benchmarks/bench_checkouts.py /tmp/before .          # median of 7 rounds, ratios to the first

Each round runs every workload once in every checkout, one fresh process each (the checkout's own sgrad and
sgrad/_native.so, its own caches warmed by one untimed call), so that the machine's state hits all of them
alike. Prints each workload's median time per checkout and its ratio to the first checkout's. The workloads:
the maps that docs/speed.md times (SmoothGrad of CifarNet at N=100 and of EfficientNet-Lite0 at N=50, batch
10; IG; Grad-CAM), one image's gradient alone, and the NumPy path's SmoothGrad (SGRAD_NATIVE=0).
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

#: name -> (environment, Python code run in the checkout that defines work(): one timed call)
WORKLOADS = {
    'CifarNet SmoothGrad N=100': ({}, '''
from sgrad.cifarnet import load_model
from sgrad.data import load_test_image
from sgrad.saliency import smoothgrad
model, (x, _) = load_model(), load_test_image(0)
work = lambda: smoothgrad(model, x, 3, 0.1, 100, 'auto', np.random.RandomState(0))'''),
    'CifarNet IG 64 steps, 8 images': ({}, '''
from sgrad.cifarnet import load_model
from sgrad.data import load_test_images
from sgrad.saliency import GradientEngine, IntegratedGradients
images, labels = load_test_images(0, 8)
method = IntegratedGradients(GradientEngine(load_model()), 64)
work = lambda: method.attribute(images, labels)'''),
    'CifarNet gradient, one image alone': ({}, '''
from sgrad.cifarnet import load_model
from sgrad.data import load_test_images
from sgrad.saliency import GradientEngine
images, labels = load_test_images(0, 1)
engine = GradientEngine(load_model())
work = lambda: [engine.gradients(images, labels) for _ in range(20)]'''),
    'CifarNet SmoothGrad N=100, SGRAD_NATIVE=0': ({'SGRAD_NATIVE': '0'}, '''
from sgrad.cifarnet import load_model
from sgrad.data import load_test_image
from sgrad.saliency import smoothgrad
model, (x, _) = load_model(), load_test_image(0)
work = lambda: smoothgrad(model, x, 3, 0.1, 100, 'auto', np.random.RandomState(0))'''),
    'EfficientNet-Lite0 SmoothGrad N=50, batch 10': ({}, '''
from sgrad.data import PHOTOS_DIR, load_image_file
from sgrad.efficientnet import load_efficientnet_lite0
from sgrad.saliency import smoothgrad
model, (x, _) = load_efficientnet_lite0(), load_image_file(PHOTOS_DIR + '/chelsea.png', 224)
work = lambda: smoothgrad(model, x, 285, 0.1, 50, 10, np.random.RandomState(0))'''),
    'EfficientNet-Lite0 Grad-CAM, one image': ({}, '''
from sgrad.data import PHOTOS_DIR, load_image_file
from sgrad.efficientnet import load_efficientnet_lite0
from sgrad.saliency import GradCAM, GradientEngine
model, (x, _) = load_efficientnet_lite0(), load_image_file(PHOTOS_DIR + '/chelsea.png', 224)
method = GradCAM(GradientEngine(model))
work = lambda: method.attribute(x[None], 285)'''),
}

_RUNNER = '''
import sys, time, json
sys.path.insert(0, {root!r})
import sgrad
import numpy as np
{setup}
work()
start = time.perf_counter()
work()
print(json.dumps(time.perf_counter() - start))
'''


def timed(root, name):
    environment, setup = WORKLOADS[name]
    code = _RUNNER.format(root=os.path.abspath(root), setup=setup)
    result = subprocess.run([sys.executable, '-c', code], cwd=os.path.abspath(root), capture_output=True, text=True,
                            env=dict(os.environ, **environment))
    if result.returncode:
        raise SystemExit('%s in %s failed:\n%s' % (name, root, result.stderr[-2000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkouts', nargs='+', help='folders of checkouts of this project, each with its library built')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--workloads', nargs='+', choices=sorted(WORKLOADS), default=list(WORKLOADS))
    args = p.parse_args()
    times = {(root, name): [] for root in args.checkouts for name in args.workloads}
    for round_ in range(args.repeats):
        for name in args.workloads:
            for root in args.checkouts:
                times[root, name].append(timed(root, name))
        print('round %d of %d done' % (round_ + 1, args.repeats), file=sys.stderr, flush=True)
    print('median of %d interleaved rounds, s; ratio to %s' % (args.repeats, args.checkouts[0]))
    print('%-46s' % 'workload' + ''.join('%22s' % os.path.basename(os.path.abspath(r))[:20] for r in args.checkouts))
    for name in args.workloads:
        medians = [float(np.median(times[root, name])) for root in args.checkouts]
        print('%-46s' % name + ''.join('%12.3f (%5.2fx)' % (m, m / medians[0]) for m in medians))


if __name__ == '__main__':
    main()
