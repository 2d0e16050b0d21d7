"""The CIFAR-10 classifier that the saliency maps explain.

Input space: every public entry point of this module takes images as float32
arrays of shape (N, 3, 32, 32) with values in [0, 1], exactly what
``chainer.datasets.get_cifar10()`` returns.  Per-channel standardisation with the
training-set mean and standard deviation happens *inside* the network
(:func:`normalize`), and nowhere else, so training, evaluation and saliency all
see the same preprocessing and SmoothGrad's noise and gradients live in the
[0, 1] image space, as in the blog post.
"""
import os

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from sgrad.activations import fusing_activations, relu
from sgrad.batchnorm import FoldsBatchNorm, batch_normalization_relu, folded_copy
from sgrad.convolution import convolution_3x3
from sgrad.errors import WEIGHTS_ERRORS, InputError, weights_error
from sgrad.linear import Linear
from sgrad.pooling import global_max_pooling, max_pooling_2x2

#: The shipped weights that smoothgrad.py explains by default (their record: cifarnet.json beside them).
DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shipped', 'cifarnet.npz')
#: The shipped CifarNet trained on randomly permuted labels (train.py --random-labels): the data randomization
#: check's model (its record: cifarnet_random_labels.json beside it).
RANDOM_LABELS_MODEL_PATH = os.path.join(os.path.dirname(DEFAULT_MODEL_PATH), 'cifarnet_random_labels.npz')

#: CIFAR-10 training-set channel statistics (a test checks them on every fifth training image).
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer',
               'dog', 'frog', 'horse', 'ship', 'truck')


def normalize(x):
    """Standardise a [0, 1] image batch channel-wise (the only preprocessing)."""
    xp = chainer.backend.get_array_module(x)
    mean = xp.asarray(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = xp.asarray(CIFAR10_STD).reshape(1, 3, 1, 1)
    return (x - mean) / std


#: The name that model.py and earlier code import: sgrad.pooling's GlobalMaxPooling node now (its gradient
#: goes to each map's first maximum only, never split among ties).
global_max_pool = global_max_pooling


class ConvBN(FoldsBatchNorm, chainer.Chain):
    """3x3 convolution (no bias), batch normalisation, ReLU, on (C, H, W, N) activations. Folded
    (inference_copy) it computes ReLU(W' * x + b') in one node."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, out_channels, ksize=3,
                                        pad=1, nobias=True)
            self.bn = L.BatchNormalization(out_channels, axis=(1, 2, 3))

    def forward(self, x):
        folded = self.folded_parameters()
        if folded is not None:
            fuse = fusing_activations()
            h = convolution_3x3(x, *folded, relu=fuse, cache=self.kernels_cache)
            return h if fuse else relu(h)
        h = convolution_3x3(x, self.conv.W)
        if chainer.config.train and not chainer.config.in_recomputing:
            return batch_normalization_relu(h, self.bn)
        return relu(self.bn(h))


class Residual(chainer.Chain):
    """Two ConvBN blocks with an identity shortcut: x + f(f(x))."""

    def __init__(self, channels):
        super().__init__()
        with self.init_scope():
            self.block1 = ConvBN(channels, channels)
            self.block2 = ConvBN(channels, channels)

    def forward(self, x):
        return x + self.block2(self.block1(x))


class CifarNet(chainer.Chain):
    """A small ResNet for 32x32 RGB images (the 'ResNet-9' layout of the
    DAWNBench CIFAR-10 entries, narrowed for a 2-core CPU).

    prep -> [ConvBN, pool, Residual] -> [ConvBN, pool] -> [ConvBN, pool,
    Residual] -> global max pool -> linear.  ``width`` is the channel count
    of the prep layer; the stages use 2x, 4x and 8x that.
    """

    #: Its links (prep ... res3) return (C, H, W, N) activations; Grad-CAM reads them this way.
    ACTIVATION_LAYOUT = 'CHWN'

    #: The colour that its input normalisation maps to zero: what RISE's code deletes pixels to.
    MEAN_COLOUR = CIFAR10_MEAN

    #: Damps the logits of the max-pooled features; without it the initial loss
    #: is ~7 and early training diverges (the same 0.125 as the DAWNBench net).
    LOGIT_SCALE = 0.125

    def __init__(self, n_class=10, width=16):
        super().__init__()
        w = width
        with self.init_scope():
            self.prep = ConvBN(3, w)
            self.conv1 = ConvBN(w, 2 * w)
            self.res1 = Residual(2 * w)
            self.conv2 = ConvBN(2 * w, 4 * w)
            self.conv3 = ConvBN(4 * w, 8 * w)
            self.res3 = Residual(8 * w)
            self.fc = Linear(8 * w, n_class)

    def features(self, x):
        """The last convolutional block's activations, (N, 8w, 4, 4)."""
        h = F.transpose(normalize(x), (1, 2, 3, 0))   # (C, H, W, N) inside, see sgrad/convolution.py
        h = self.prep(h)
        h = self.res1(max_pooling_2x2(self.conv1(h)))
        h = max_pooling_2x2(self.conv2(h))
        h = self.res3(max_pooling_2x2(self.conv3(h)))
        return F.transpose(h, (3, 0, 1, 2))

    def inference_copy(self):
        """A copy for saliency maps: BatchNorm folded into the convolutions (same outputs, faster)."""
        return folded_copy(self)

    def head(self, features):
        """Class scores (logits) from the last block's activations."""
        return self.fc(global_max_pooling(features)) * self.LOGIT_SCALE

    def forward(self, x):
        """Class scores (logits) for a [0, 1] image batch of shape (N, 3, 32, 32)."""
        return self.head(self.features(x))

    def loss(self, x, t):
        """Logits and softmax cross-entropy against labels ``t``, like the blog's model."""
        y = self(x)
        return y, F.softmax_cross_entropy(y, t)


def load_model(path=DEFAULT_MODEL_PATH):
    """CifarNet with the weights saved in ``path`` (its width is read from the file)."""
    if not os.path.isfile(path):
        hint = ' (train one with `python train.py`)' if path == DEFAULT_MODEL_PATH else ''
        raise InputError('no trained model found at %s%s' % (path, hint))
    try:
        with np.load(path) as weights:
            width = weights['prep/conv/W'].shape[0]
        model = CifarNet(width=width)
        chainer.serializers.load_npz(path, model)
    except WEIGHTS_ERRORS as e:
        raise weights_error(path, 'CifarNet weights', e)
    return model
