#!/usr/bin/env python
"""The rule-based methods beside Captum's on the same network and images: DeepLIFT against Captum's DeepLift on
CifarNet's PyTorch port (benchmarks/bench_peer.py), and on EfficientNet-Lite0, where Captum's DeepLift cannot run
(the PyTorch reference applies one nn.ReLU6 module twice per block, and Captum's DeepLift keeps each module's
input on the module; nor does it list ReLU6), against Captum's plain gradient (Saliency), which is less work.

    python benchmarks/bench_rules.py                 # 100 CIFAR-10 test images, the 4 photographs
    python benchmarks/bench_rules.py --images 20 --repeats 3

Each row: milliseconds per batch, Captum's first, median of --repeats interleaved rounds, and ours / theirs
(below 1: ours is faster). Both on 2 threads; run it on a quiet machine.
"""
import argparse
import inspect

import common  # noqa: F401  (first: the project on sys.path, sgrad before NumPy)
import numpy as np

from common import interleaved_median_ms
from sgrad.data import PHOTOS_DIR, load_image_folder, load_test_images
from sgrad.deeplift import DeepLIFT
from sgrad.saliency import GradientEngine


def fixed_captum_maxpool():
    """Captum's DeepLift max pooling rule with the fix of its issue #1276 (PR #1847): where input and baseline
    are equal, the whole batch's gradient, not the first image's (grad_input[0]) broadcast."""
    import captum.attr._core.deep_lift as deep_lift
    source = inspect.getsource(deep_lift.maxpool)
    assert source.count('grad_input[0]') == 1, 'Captum changed its max pooling rule: look again at issue #1276'
    namespace = dict(vars(deep_lift))
    exec(compile(source.replace('grad_input[0]', 'grad_input'), deep_lift.__file__, 'exec'), namespace)
    return namespace['maxpool']


def copy_before_max_pools(torch, net):
    """The port with each nn.MaxPool2d behind a copy of its input: where a ReLU's output is a MaxPool2d's input,
    the hooks that Captum's DeepLift puts on that one tensor for both modules clash, and its attributions miss
    the sum they must add up to (convergence delta 0.16 on ReLU -> MaxPool2d -> Linear; 1e-7 with the copy)."""
    class Copy(torch.nn.Module):
        def forward(self, x):
            return x.clone()
    for i, module in enumerate(net.body):
        if isinstance(module, torch.nn.MaxPool2d):
            net.body[i] = torch.nn.Sequential(Copy(), module)
    return net


def cifarnet_rows(images, repeats):
    import captum.attr
    import captum.attr._core.deep_lift as deep_lift
    from bench_peer import torch_peer
    from model import load_model
    model = load_model()
    torch, net = torch_peer(model)
    net = copy_before_max_pools(torch, net)
    deep_lift.maxpool = fixed_captum_maxpool()
    xs = load_test_images(0, images)[0]
    engine = GradientEngine(model)
    targets = engine.probabilities(xs).argmax(axis=1)
    xt, tt = torch.from_numpy(xs), torch.from_numpy(targets.astype(np.int64))
    theirs = lambda: captum.attr.DeepLift(net).attribute(xt, baselines=torch.zeros_like(xt), target=tt)
    ours = lambda: DeepLIFT(engine).attribute(xs, targets)
    return [('CifarNet, %d images: DeepLIFT (Captum DeepLift)' % images,
             interleaved_median_ms([theirs, ours], repeats))]


def efficientnet_rows(repeats):
    import captum.attr
    import torch
    from sgrad.efficientnet import IMAGE_SIZE, default_weights_path, load_efficientnet_lite0
    from efficientnet_lite_pytorch import EfficientNet
    reference = EfficientNet.from_name('efficientnet-lite0')
    reference.load_state_dict(torch.load(default_weights_path(), map_location='cpu'))
    reference.eval()
    xs = load_image_folder(PHOTOS_DIR, IMAGE_SIZE)[0]
    engine = GradientEngine(load_efficientnet_lite0())
    targets = engine.probabilities(xs).argmax(axis=1)
    xt, tt = torch.from_numpy(xs * (255. / 128.) - 127. / 128.), torch.from_numpy(targets.astype(np.int64))
    theirs = lambda: captum.attr.Saliency(reference).attribute(xt, target=tt, abs=False)
    ours = lambda: DeepLIFT(engine).attribute(xs, targets)
    return [('EfficientNet-Lite0, %d photographs: DeepLIFT (Captum: the gradient)' % len(xs),
             interleaved_median_ms([theirs, ours], repeats))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=100, help='CIFAR-10 test images (default: %(default)s)')
    p.add_argument('--repeats', type=int, default=5, help='interleaved rounds (default: %(default)s)')
    args = p.parse_args()
    try:
        import torch
        import captum  # noqa: F401
    except ImportError as e:
        raise SystemExit('bench_rules.py needs torch and captum (pip install torch==2.13.0 captum): %s' % e)
    torch.set_num_threads(2)
    for name, (theirs, ours) in cifarnet_rows(args.images, args.repeats) + efficientnet_rows(args.repeats):
        print('%-66s Captum %8.1f ms   ours %8.1f ms   ours/theirs %.2f' % (name, theirs, ours, ours / theirs))


if __name__ == '__main__':
    main()
