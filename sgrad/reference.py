"""CifarNet computed with Chainer's standard NCHW functions only.

The reference that tests hold the channel-major model against, and the
"naive Chainer" baseline of the benchmarks: same parameters, same numbers,
F.convolution_2d / F.batch_normalization / F.max_pooling_2d / F.relu.
"""
import chainer
import chainer.functions as F

from sgrad.cifarnet import normalize


def _conv_bn(block, h):
    bn = block.bn
    h = F.convolution_2d(h, block.conv.W, pad=1)
    if chainer.config.train:  # batch statistics, running averages left alone
        h = F.batch_normalization(h, bn.gamma, bn.beta, eps=bn.eps)
    else:
        h = F.fixed_batch_normalization(h, bn.gamma, bn.beta, bn.avg_mean, bn.avg_var, eps=bn.eps)
    return F.relu(h)


def _residual(res, h):
    return h + _conv_bn(res.block2, _conv_bn(res.block1, h))


def plain_chainer_forward(model, x):
    """Logits of ``model`` (a CifarNet) for [0, 1] images x (N, 3, 32, 32), NCHW throughout."""
    h = _conv_bn(model.prep, normalize(x))
    h = _residual(model.res1, F.max_pooling_2d(_conv_bn(model.conv1, h), 2))
    h = F.max_pooling_2d(_conv_bn(model.conv2, h), 2)
    h = _residual(model.res3, F.max_pooling_2d(_conv_bn(model.conv3, h), 2))
    h = F.max_pooling_2d(h, h.shape[2:])  # global max pool, the gradient to the first maximum
    return model.fc(h) * model.LOGIT_SCALE
