#!/usr/bin/env python
"""The rule-based methods beside their anchors on the same network and images. DeepLIFT against Captum's DeepLift
on CifarNet's PyTorch port (benchmarks/bench_peer.py) and on EfficientNet-Lite0's LRP port (an nn.ReLU6 module
per use: the PyTorch reference applies one twice per block, which Captum's DeepLift cannot take), with Captum's
Rescale rule registered for nn.ReLU6, which it does not list. LRP against zennit's EpsilonPlusFlat on the LRP
ports of both networks (lrp_cifarnet_port, lrp_efficientnet_port, which tests/test_lrp_peers.py and
tests/test_rule_peers.py hold equal to ours) and, with its epsilon rules, against Captum's LRP on CifarNet
(Captum's LRP refuses ReLU6).

    python benchmarks/bench_rules.py                 # 100 CIFAR-10 test images, the 4 photographs
    python benchmarks/bench_rules.py --images 20 --repeats 3

Each row: milliseconds per batch, the anchor's first, median of --repeats interleaved rounds, and ours / theirs
(below 1: ours is faster). Both on 2 threads; run it on a quiet machine.
"""
import argparse
import inspect
import sys
import types

import common  # noqa: F401  (first: the project on sys.path, sgrad before NumPy)
import numpy as np

from common import interleaved_median_ms
from sgrad.data import PHOTOS_DIR, load_image_folder, load_test_images
from sgrad.deeplift import DeepLIFT
from sgrad.lrp import LRP
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


def torchvision_stubs(torch):
    """{name: module} stubs of torchvision for importing zennit 0.5.1 without one: its package imports
    ``from torchvision.models.resnet import Bottleneck, BasicBlock`` for its ResNet canonizers, and no
    torchvision built for this torch is at hand; with these two classes its canonizers match nothing (none is
    used here). A torchvision that imports is used instead."""
    try:
        __import__('torchvision')
        return {}
    except ImportError:
        stubs = {name: types.ModuleType(name) for name in ('torchvision', 'torchvision.models',
                                                           'torchvision.models.resnet')}
        stubs['torchvision.models.resnet'].Bottleneck = type('Bottleneck', (torch.nn.Module,), {})
        stubs['torchvision.models.resnet'].BasicBlock = type('BasicBlock', (torch.nn.Module,), {})
        return stubs


def torch_dtype(torch, dtype):
    """The torch dtype of a NumPy float32 or float64 dtype: a port's weights in the model's precision."""
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def lrp_cifarnet_port(torch, model, residual_sum):
    """The PyTorch port of CifarNet ``model`` (folded) for LRP, in model's dtype: ``residual_sum`` 'zennit' (its
    Sum module on the two summands stacked) or 'captum' (its Addition_Module)."""
    nn = torch.nn
    folded = model.inference_copy()
    dtype = torch_dtype(torch, folded.fc.W.dtype)

    def conv_relu(block):
        W, b = block.folded
        conv = nn.Conv2d(W.shape[1], W.shape[0], 3, padding=1, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(W))
            conv.bias.copy_(torch.from_numpy(b))
        return nn.Sequential(conv, nn.ReLU())

    class Residual(nn.Module):
        def __init__(self, res):
            super().__init__()
            self.f = nn.Sequential(conv_relu(res.block1), conv_relu(res.block2))
            if residual_sum == 'zennit':
                from zennit.layer import Sum
                self.sum = Sum()
            else:
                from captum.attr._utils.custom_modules import Addition_Module
                self.sum = Addition_Module()

        def forward(self, x):
            if residual_sum == 'zennit':
                return self.sum(torch.stack([x, self.f(x)], dim=-1))
            return self.sum(x, self.f(x))

    class Port(nn.Module):
        """The max poolings are functional: zennit gives them no rule, and Captum's epsilon rule for
        nn.MaxPool2d (the relevance times m / (m + 1e-9), m the maximum) is not the gradient where m is small."""

        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([
                conv_relu(folded.prep), conv_relu(folded.conv1), Residual(folded.res1), conv_relu(folded.conv2),
                conv_relu(folded.conv3), Residual(folded.res3)])
            self.fc = nn.Linear(*folded.fc.W.shape[::-1], dtype=dtype)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(folded.fc.W.array * folded.LOGIT_SCALE))
                self.fc.bias.copy_(torch.from_numpy(folded.fc.b.array * folded.LOGIT_SCALE))

        def forward(self, h):
            pool = torch.nn.functional.max_pool2d
            prep, conv1, res1, conv2, conv3, res3 = self.stages
            h = pool(res3(pool(conv3(pool(conv2(res1(pool(conv1(prep(h)), 2))), 2)), 2)), 4)
            return self.fc(torch.flatten(h, 1))

    return Port().eval()


def lrp_efficientnet_port(torch, model):
    """A PyTorch port of EfficientNet-Lite0 ``model`` (folded, in its dtype) for zennit: each convolution a
    Conv2d that pads its input the 'SAME' way inside its forward (so that zennit's rules see the padding as part
    of the convolution, as on efficientnet_lite_pytorch's Conv2dStaticSamePadding), each residual sum zennit's
    Sum, the [-1, 1] scaling outside."""
    nn = torch.nn
    from zennit.layer import Sum
    from sgrad.efficientnet import same_pads
    folded = model.inference_copy()
    dtype = torch_dtype(torch, folded.fc.W.dtype)

    class SameConv(nn.Conv2d):
        def forward(self, x):
            (top, bottom), (left, right) = same_pads(x.shape, self.kernel_size[0], self.stride[0])
            return super().forward(torch.nn.functional.pad(x, (left, right, top, bottom)))

    def conv(link):
        W, b = link.folded
        groups = link.conv.groups
        layer = SameConv(W.shape[1] * groups, W.shape[0], link.ksize, link.stride, groups=groups, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(W))
            layer.bias.copy_(torch.from_numpy(b))
        return nn.Sequential(layer, nn.ReLU6()) if link.activation else layer

    class Block(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.f = nn.Sequential(*([conv(block.expand)] if hasattr(block, 'expand') else []),
                                   conv(block.depthwise), conv(block.project))
            self.sum = Sum() if block.shortcut else None

        def forward(self, x):
            return self.f(x) if self.sum is None else self.sum(torch.stack([x, self.f(x)], dim=-1))

    class Port(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv(folded.stem)
            self.blocks = nn.Sequential(*[Block(block) for block in folded.blocks])
            self.head = conv(folded.head)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(*folded.fc.W.shape[::-1], dtype=dtype)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(folded.fc.W.array))
                self.fc.bias.copy_(torch.from_numpy(folded.fc.b.array))

        def forward(self, h):
            return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(h)))), 1))

    return Port().eval()


def zennit_lrp(torch, port, composite, classes):
    """zennit's LRP of images (normalised as the port takes them) for their targets: its Gradient attributor with
    the relevance starting at the class score (attr_output = one-hot times the logits), as a user runs it."""
    from zennit.attribution import Gradient

    def attribute(h, targets):
        onehot = torch.nn.functional.one_hot(targets, classes).to(h.dtype)
        with Gradient(port, composite) as attributor:
            return attributor(h.requires_grad_(), attr_output=lambda output: onehot * output)[1]
    return attribute


def cifarnet_rows(images, repeats):
    """(name, peer, (peer's ms, ours)) on CifarNet's ports: DeepLIFT, and LRP beside zennit and Captum."""
    import captum.attr
    import captum.attr._core.deep_lift as deep_lift
    from bench_peer import torch_peer
    from model import CIFAR10_MEAN, CIFAR10_STD, load_model
    model = load_model()
    torch, net = torch_peer(model)
    net = copy_before_max_pools(torch, net)
    deep_lift.maxpool = fixed_captum_maxpool()
    xs = load_test_images(0, images)[0]
    engine = GradientEngine(model)
    targets = engine.probabilities(xs).argmax(axis=1)
    xt, tt = torch.from_numpy(xs), torch.from_numpy(targets.astype(np.int64))
    normalised = lambda: torch.from_numpy((xs - CIFAR10_MEAN.reshape(3, 1, 1)) / CIFAR10_STD.reshape(3, 1, 1))
    from zennit.composites import EpsilonPlusFlat
    zennit = zennit_lrp(torch, lrp_cifarnet_port(torch, model, 'zennit'), EpsilonPlusFlat(), 10)
    captum_port = lrp_cifarnet_port(torch, model, 'captum')
    runs = [
        ('DeepLIFT', 'Captum DeepLift', lambda: captum.attr.DeepLift(net).attribute(xt, baselines=torch.zeros_like(xt),
                                                                                      target=tt),
         lambda: DeepLIFT(engine).attribute(xs, targets)),
        ('LRP epsilon_plus_flat', 'zennit EpsilonPlusFlat', lambda: zennit(normalised(), tt),
         lambda: LRP(engine).attribute(xs, targets)),
        ('LRP epsilon', 'Captum LRP', lambda: captum.attr.LRP(captum_port).attribute(normalised().requires_grad_(),
                                                                                     target=tt),
         lambda: LRP(engine, 'epsilon', epsilon=1e-9, stabilizer=1e-9).attribute(xs, targets))]
    return [('CifarNet, %d images: %s' % (images, name), peer, interleaved_median_ms([theirs, ours], repeats))
            for name, peer, theirs, ours in runs]


def efficientnet_rows(repeats):
    """The same on EfficientNet-Lite0 and the photographs, on the LRP port: DeepLIFT beside Captum's DeepLift with
    its Rescale rule registered for nn.ReLU6, LRP beside zennit."""
    import captum.attr
    import captum.attr._core.deep_lift as deep_lift
    import torch
    from sgrad.efficientnet import IMAGE_SIZE, load_efficientnet_lite0
    from zennit.composites import EpsilonPlusFlat
    deep_lift.SUPPORTED_NON_LINEAR[torch.nn.ReLU6] = deep_lift.nonlinear
    xs = load_image_folder(PHOTOS_DIR, IMAGE_SIZE)[0]
    model = load_efficientnet_lite0()
    port = lrp_efficientnet_port(torch, model)
    engine = GradientEngine(model)
    targets = engine.probabilities(xs).argmax(axis=1)
    xt, tt = torch.from_numpy(xs * (255. / 128.) - 127. / 128.), torch.from_numpy(targets.astype(np.int64))
    zennit = zennit_lrp(torch, port, EpsilonPlusFlat(), 1000)
    black = torch.full_like(xt, -127. / 128.)
    runs = [('DeepLIFT', 'Captum DeepLift', lambda: captum.attr.DeepLift(port).attribute(xt, baselines=black,
                                                                                          target=tt),
             lambda: DeepLIFT(engine).attribute(xs, targets)),
            ('LRP epsilon_plus_flat', 'zennit EpsilonPlusFlat', lambda: zennit(xt.clone(), tt),
             lambda: LRP(engine).attribute(xs, targets))]
    return [('EfficientNet-Lite0, %d photographs: %s' % (len(xs), name), peer,
             interleaved_median_ms([theirs, ours], repeats)) for name, peer, theirs, ours in runs]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=100, help='CIFAR-10 test images (default: %(default)s)')
    p.add_argument('--repeats', type=int, default=5, help='interleaved rounds (default: %(default)s)')
    args = p.parse_args()
    try:
        import torch
        import captum  # noqa: F401
        sys.modules.update(torchvision_stubs(torch))
        import zennit  # noqa: F401
    except ImportError as e:
        raise SystemExit('bench_rules.py needs torch, captum and zennit (pip install torch==2.13.0 captum; '
                         'pip install --no-deps zennit): %s' % e)
    torch.set_num_threads(2)
    for name, peer, (theirs, ours) in cifarnet_rows(args.images, args.repeats) + efficientnet_rows(args.repeats):
        print('%-52s %-22s %8.1f ms   ours %8.1f ms   ours/theirs %.2f' % (name, peer, theirs, ours, ours / theirs))


if __name__ == '__main__':
    main()
