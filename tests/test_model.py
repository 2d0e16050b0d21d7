"""The model: input gradients against finite differences, the fast convolution
against Chainer's, and loading weights."""
import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from conftest import random_cifarnet
from model import load_model, normalize
from sgrad import InputError
from sgrad.ops import Convolution3x3, convolution_3x3
from sgrad.saliency import GradientEngine


@pytest.mark.parametrize('objective', ['score', 'loss'])
def test_input_gradient_matches_central_differences(image, objective):
    model = random_cifarnet(dtype=np.float64)
    x = image.astype(np.float64)[None]
    target = 3
    engine = GradientEngine(model, objective)
    grad = engine(x, target)[0]

    def objective_value(x):
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            y = model(x)
            if objective == 'score':
                return float(y.array[0, target])
            return float(F.softmax_cross_entropy(y, np.array([target], np.int32)).array)

    rng = np.random.RandomState(1)
    eps = 1e-5
    for _ in range(6):
        c, i, j = rng.randint(3), rng.randint(32), rng.randint(32)
        plus, minus = x.copy(), x.copy()
        plus[0, c, i, j] += eps
        minus[0, c, i, j] -= eps
        numeric = (objective_value(plus) - objective_value(minus)) / (2 * eps)
        assert grad[c, i, j] == pytest.approx(numeric, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize('shape', [(2, 3, 16, 16), (1, 4, 17, 20)])
def test_fast_convolution_matches_chainer_forward_and_backward(shape):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape)
    W = rng.randn(5, shape[1], 3, 3)
    gy = rng.randn(shape[0], 5, *shape[2:])
    y = Convolution3x3().apply((x, W))[0].array
    np.testing.assert_allclose(y, F.convolution_2d(x, W, pad=1).array, rtol=1e-12)
    gradient_check.check_backward(lambda x, W: Convolution3x3().apply((x, W)), (x, W), gy,
                                  dtype=np.float64, atol=1e-6, rtol=1e-6)


def test_convolution_dispatch_falls_back_on_small_maps():
    x = np.random.RandomState(0).randn(2, 3, 4, 4).astype(np.float32)
    W = np.random.RandomState(1).randn(6, 3, 3, 3).astype(np.float32)
    y = convolution_3x3(x, W)
    assert not isinstance(y.creator, Convolution3x3)  # Chainer's own kernel
    np.testing.assert_allclose(y.array, F.convolution_2d(x, W, pad=1).array, rtol=1e-6)


def test_normalize_standardises_the_training_statistics():
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
    x = np.broadcast_to(mean, (1, 3, 2, 2))
    np.testing.assert_allclose(normalize(x), 0, atol=1e-7)


def test_model_outputs_logits_and_blog_style_loss(model, image):
    x = np.stack([image, image[:, ::-1]])
    t = np.array([3, 5], np.int32)
    with chainer.using_config('train', False):
        y, loss = model.loss(x, t)
        reference = F.softmax_cross_entropy(model(x), t)
    assert y.shape == (2, 10)
    assert float(loss.array) == pytest.approx(float(reference.array), rel=1e-6)


def test_load_model_round_trip_and_width_from_file(tmp_path, image):
    wide = random_cifarnet(width=6, seed=3)
    path = str(tmp_path / 'w6.npz')
    chainer.serializers.save_npz(path, wide)
    loaded = load_model(path)
    assert loaded.prep.conv.W.shape[0] == 6
    with chainer.using_config('train', False):
        np.testing.assert_array_equal(loaded(image[None]).array, wide(image[None]).array)


def test_load_model_rejects_other_architectures(tmp_path):
    path = str(tmp_path / 'other.npz')
    chainer.serializers.save_npz(path, chainer.links.Linear(3, 2))
    with pytest.raises(InputError, match='does not hold CifarNet weights'):
        load_model(path)
    with pytest.raises(InputError, match='no trained model'):
        load_model(str(tmp_path / 'missing.npz'))

