"""The model: input gradients against finite differences, the fast convolution
against Chainer's, and loading weights."""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest
from chainer import gradient_check

from conftest import random_cifarnet
import model as model_module
import sgrad.cifarnet
from model import load_model, normalize
from sgrad.reference import plain_chainer_forward
from sgrad.errors import InputError
from sgrad.convolution import convolution_3x3
from sgrad.data import load_test_images
from sgrad.pooling import GlobalMaxPooling, global_max_pooling, max_pooling_2x2
from sgrad.saliency import GradientEngine, noisy_copies

pytestmark = pytest.mark.numerical


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
        assert grad[c, i, j] == pytest.approx(numeric, rel=1e-6, abs=1e-10)


def nchw_to_chwn(a):
    return a.transpose(1, 2, 3, 0)


def chwn_to_nchw(a):
    return a.transpose(3, 0, 1, 2)


@pytest.mark.parametrize('bias, relu', [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize('shape', [(2, 3, 8, 8), (1, 4, 5, 6)])
def test_convolution_3x3_matches_chainer_and_passes_gradient_check(shape, bias, relu, kernel_path):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape)
    W = rng.randn(5, shape[1], 3, 3)
    b = rng.randn(5) if bias else None
    reference = F.convolution_2d(x, W, b, pad=1)
    if relu:
        reference = F.relu(reference)
    y = convolution_3x3(nchw_to_chwn(x), W, b, relu=relu).array
    np.testing.assert_allclose(chwn_to_nchw(y), reference.array, rtol=1e-12, atol=1e-12)

    inputs = (nchw_to_chwn(x).copy(), W) + ((b,) if bias else ())
    gy = rng.randn(5, *shape[2:], shape[0])
    with chainer.using_config('train', False):
        gradient_check.check_backward(lambda *a: convolution_3x3(*a, relu=relu), inputs, gy,
                                      dtype=np.float64, atol=1e-6, rtol=1e-6)
        # the input gradient alone (saliency), where the ReLU's mask is applied inside it
        gradient_check.check_backward(lambda x: convolution_3x3(x, *inputs[1:], relu=relu), inputs[0], gy,
                                      dtype=np.float64, atol=1e-6, rtol=1e-6)


def test_max_pooling_2x2_matches_chainer_and_passes_gradient_check(kernel_path):
    rng = np.random.RandomState(0)
    x = rng.randn(3, 2, 6, 8)
    np.testing.assert_array_equal(chwn_to_nchw(max_pooling_2x2(nchw_to_chwn(x)).array), F.max_pooling_2d(x, 2).array)
    x = nchw_to_chwn(x).copy()
    gy, ggx = rng.randn(2, 3, 4, 3), rng.randn(*x.shape)
    gradient_check.check_backward(max_pooling_2x2, x, gy, dtype=np.float64)
    gradient_check.check_double_backward(max_pooling_2x2, x, gy, ggx, dtype=np.float64)


def first_and_second_backward(pool, x, gy, ggx):
    """y, the gradient gx = dy/dx^T gy, and the double backward d<ggx, gx>/dgy."""
    xv, gyv = chainer.Variable(x), chainer.Variable(gy)
    y = pool(xv)
    gx, = chainer.grad([y], [xv], grad_outputs=[gyv], enable_double_backprop=True)
    ggy, = chainer.grad([gx], [gyv], grad_outputs=[chainer.Variable(ggx)])
    return y.array, gx.array, ggy.array


def test_max_pooling_2x2_gives_a_tied_window_to_its_first_maximum_like_chainer(kernel_path):
    """Flat image regions make exact ties; finite differences are undefined there, so the
    reference is F.max_pooling_2d (the first maximum in window order, row by row)."""
    rng = np.random.RandomState(0)
    x = rng.randint(0, 3, size=(2, 3, 8, 8)).astype(np.float64)   # most windows tie, some at 0
    x[0, 0, :4, :4] = 2.                                         # whole windows tied
    gy, ggx = rng.randn(2, 3, 4, 4), rng.randn(*x.shape)
    ours = first_and_second_backward(max_pooling_2x2, *(np.ascontiguousarray(nchw_to_chwn(a)) for a in (x, gy, ggx)))
    theirs = first_and_second_backward(lambda h: F.max_pooling_2d(h, 2), x, gy, ggx)
    windows_tied = (x.reshape(2, 3, 4, 2, 4, 2) == theirs[0][:, :, :, None, :, None]).sum(axis=(3, 5)) > 1
    assert windows_tied.mean() > 0.3
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(chwn_to_nchw(a), b)
    # exactly one input of each window receives its gradient
    receivers = (chwn_to_nchw(ours[1]) != 0).reshape(2, 3, 4, 2, 4, 2).sum(axis=(3, 5))
    np.testing.assert_array_equal(receivers, 1)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('batch', [1, 8, 16, 25, 37])
def test_max_pooling_2x2_on_batches_that_end_in_a_partial_vector(kernel_path, batch, dtype):
    """The compiled pooling takes a window's N images a vector at a time (16 or 8 lanes) and the last
    N % lanes as one partial vector: each batch size here ends differently, with ties and a NaN."""
    rng = np.random.RandomState(batch)
    x = rng.randint(0, 3, size=(batch, 3, 6, 4)).astype(dtype)
    x[-1, 1, 2, 1] = np.nan
    gy, ggx = rng.randn(batch, 3, 3, 2).astype(dtype), rng.randn(*x.shape).astype(dtype)
    ours = first_and_second_backward(max_pooling_2x2, *(np.ascontiguousarray(nchw_to_chwn(a)) for a in (x, gy, ggx)))
    theirs = first_and_second_backward(lambda h: F.max_pooling_2d(h, 2), x, gy, ggx)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(chwn_to_nchw(a), b)
    assert np.isnan(chwn_to_nchw(ours[0])[-1, 1, 1, 0])


def argmax_get_item_global_max_pool(h):
    """The global max pool before the GlobalMaxPooling node: argmax, then F.get_item at the flat positions."""
    n, c = h.shape[:2]
    maps = F.reshape(h, (n * c, -1))
    first = maps.array.argmax(axis=1) + maps.shape[1] * np.arange(n * c)
    return F.reshape(F.get_item(F.reshape(maps, (-1,)), first), (n, c))


@pytest.mark.parametrize('layout', ['NCHW', 'CHWN'])
def test_global_max_pooling_passes_gradient_checks(layout):
    rng = np.random.RandomState(0)
    x = rng.randn(3, 4, 5, 6)   # no ties
    if layout == 'CHWN':        # CifarNet's maps: (C, H, W, N) arrays seen as (N, C, H, W)
        x = np.ascontiguousarray(nchw_to_chwn(x)).transpose(3, 0, 1, 2)
    gy, ggx = rng.randn(3, 4), rng.randn(3, 4, 5, 6)
    np.testing.assert_array_equal(global_max_pooling(x).array, x.max(axis=(2, 3)))
    gradient_check.check_backward(global_max_pooling, x, gy, dtype=np.float64)
    gradient_check.check_double_backward(global_max_pooling, x, gy, ggx, dtype=np.float64)
    # the gradient keeps the maps' memory layout (no copy for the convolutions below)
    xv = chainer.Variable(x)
    gx, = chainer.grad([global_max_pooling(xv)], [xv], grad_outputs=[chainer.Variable(gy)])
    assert gx.array.strides == x.strides


def test_global_max_pooling_gives_a_tie_to_its_first_maximum_like_argmax_and_get_item():
    """Ties (several equal maxima, a flat map, an all-zero map, a NaN): forward, gradient and double
    backward equal the old argmax + F.get_item formulation's, and each map's gradient lands on its first
    maximum in row-major order only."""
    rng = np.random.RandomState(0)
    x = rng.randint(0, 3, size=(2, 3, 4, 5)).astype(np.float64)   # most maps hold their maximum several times
    x[0, 0] = 0.
    x[0, 0, 1, 2] = x[0, 0, 3, 0] = 5.   # a two-way tie
    x[0, 1] = 1.                          # a flat map: twenty-way tie
    x[1, 2] = 0.                          # all zeros
    x[1, 0, 2, 3] = np.nan
    gy, ggx = rng.randn(2, 3), rng.randn(*x.shape)
    ours = first_and_second_backward(global_max_pooling, x, gy, ggx)
    theirs = first_and_second_backward(argmax_get_item_global_max_pool, x, gy, ggx)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    gx = ours[1]
    np.testing.assert_array_equal((gx != 0).reshape(6, -1).sum(axis=1), 1)
    assert gx[0, 0, 1, 2] == gy[0, 0] and gx[0, 0, 3, 0] == 0.
    assert gx[0, 1, 0, 0] == gy[0, 1] and gx[1, 2, 0, 0] == gy[1, 2] and gx[1, 0, 2, 3] == gy[1, 0]
    # the node keeps the positions, and is re-applied at another input with no state carried over
    node = GlobalMaxPooling()
    node.apply((x,))
    np.testing.assert_array_equal(node.indexes[0, :2], [1 * 5 + 2, 0])
    other = GlobalMaxPooling()
    other.apply((-x,))
    assert other.indexes[0, 0] != node.indexes[0, 0]
    assert model_module.global_max_pool is global_max_pooling   # the name that model.py exports


def test_shipped_model_logits_and_gradients_are_those_of_argmax_and_get_item(monkeypatch):
    x, labels = load_test_images(0, 8)
    net = load_model()

    def logits_and_gradients():
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            logits = net.inference_copy()(x).array
        return logits, GradientEngine(net)(x, labels), GradientEngine(net, 'loss')(x, labels)

    ours = logits_and_gradients()
    monkeypatch.setattr(sgrad.cifarnet, 'global_max_pooling', argmax_get_item_global_max_pool)
    theirs = logits_and_gradients()
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_folded_batchnorm_copy_gives_the_same_outputs(model, image):
    x = noisy_copies(image, 0.1, 4, np.random.RandomState(0))
    folded = model.inference_copy()
    with chainer.using_config('train', False):
        np.testing.assert_allclose(folded(x).array, model(x).array, rtol=1e-5, atol=1e-6)
    assert model.prep.folded is None  # the original is untouched
    with pytest.raises(RuntimeError):
        with chainer.using_config('train', True):
            folded(x)


def test_folded_copy_keeps_its_weights_when_the_model_changes(image):
    net = random_cifarnet(width=4, seed=11)
    x = noisy_copies(image, 0.1, 3, np.random.RandomState(1))
    folded = net.inference_copy()
    with chainer.using_config('train', False):
        before = folded(x).array
        for param in net.params():
            param.array *= 1.5   # as an optimizer's in-place update would
        for link in net.links():
            if isinstance(link, L.BatchNormalization):
                link.avg_var += 1.
        np.testing.assert_array_equal(folded(x).array, before)
        assert not np.allclose(net(x).array, before)
    assert not any(np.shares_memory(mine, theirs.array)
                   for mine in (p.array for p in folded.params()) for theirs in net.params())


def test_inference_copy_is_made_again_only_when_the_weights_change(image):
    """One folded copy serves every engine while the weights stay as they were; an in-place update of a
    parameter or of BatchNorm's statistics, or a parameter's new array, gives a new copy of the new weights."""
    net = random_cifarnet(width=4, seed=12)
    x = noisy_copies(image, 0.1, 3, np.random.RandomState(2))
    first = net.inference_copy()
    assert net.inference_copy() is first
    batchnorm = next(link for link in net.links() if isinstance(link, L.BatchNormalization))
    for change in (lambda: net.fc.W.array.__imul__(1.5),
                   lambda: batchnorm.avg_var.__iadd__(0.5),
                   lambda: setattr(net.prep.conv.W, 'array', net.prep.conv.W.array * 0.5)):
        before = net.inference_copy()
        change()
        after = net.inference_copy()
        assert after is not before and net.inference_copy() is after
        with chainer.using_config('train', False):
            np.testing.assert_allclose(after(x).array, net(x).array, rtol=1e-5, atol=1e-6)
            assert not np.allclose(before(x).array, after(x).array)


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



@pytest.mark.parametrize('train', [False, True])
def test_channel_major_model_equals_plain_chainer_nchw(image, train, kernel_path):
    """Outputs and parameter gradients of the model equal Chainer's standard layers on the same weights."""
    model = random_cifarnet(seed=4)  # its own: training mode updates BatchNorm's running averages
    x = noisy_copies(image, 0.1, 6, np.random.RandomState(0))
    t = np.arange(6, dtype=np.int32)
    results = []
    for forward in (lambda x: model(x), lambda x: plain_chainer_forward(model, x)):
        model.cleargrads()
        with chainer.using_config('train', train):
            y = forward(x)
            F.softmax_cross_entropy(y, t).backward()
        results.append((y.array, {name: p.grad.copy() for name, p in model.namedparams()}))
    (y, grads), (y_ref, grads_ref) = results
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for name in grads_ref:
        scale = np.abs(grads_ref[name]).max()
        np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize('train', [True, False], ids=['training', 'saliency'])
def test_the_model_in_many_small_blocks_equals_one_block_on_one_thread(image, train, monkeypatch, kernel_path):
    """The channel-major nodes' blocked, threaded work (sgrad.blocks.for_blocks: row_patches and its adjoint,
    the GEMMs in column blocks, the weight gradient summed over them, pooling, ReLU) against one block on
    one thread."""
    from sgrad import blocks
    model = random_cifarnet(seed=5, dtype=np.float64)
    x = noisy_copies(image, 0.1, 6, np.random.RandomState(0)).astype(np.float64)
    t = np.arange(6, dtype=np.int32)

    def run():
        model.cleargrads()
        xv = chainer.Variable(x)
        with chainer.using_config('train', train):
            F.softmax_cross_entropy(model(xv), t).backward()
        return [xv.grad] + [p.grad.copy() for _, p in sorted(model.namedparams())]
    monkeypatch.setattr(blocks, 'BLOCK_BYTES', 1 << 40)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    single = run()
    monkeypatch.setattr(blocks, 'BLOCK_BYTES', 4096)
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    assert len(blocks.channel_blocks(np.empty((16, 32, 32, 6)))) == 16
    for a, b in zip(run(), single):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_gemm_on_column_ranges_equals_numpy(dtype, monkeypatch):
    """sgrad.blocks.gemm on column ranges of larger matrices (what the convolution hands it): OpenBLAS's
    call with its row strides, and NumPy's product where there is no OpenBLAS, against a @ b."""
    from sgrad import blocks
    rng = np.random.RandomState(0)
    a, b = rng.randn(5, 30).astype(dtype), rng.randn(7, 40).astype(dtype)
    left, right, transposed = a[:, 3:10], b[:, 11:30], b[:, 2:9]
    for blas in (True, False):
        if not blas:
            monkeypatch.setattr(blocks, '_cblas_gemm', lambda dtype: None)
        out = np.ones((5, 50), dtype)
        blocks.gemm(left, right, out[:, 20:39])
        np.testing.assert_allclose(out[:, 20:39], left @ right, rtol=1e-5)
        blocks.gemm(left, right, out[:, 20:39], accumulate=True)
        np.testing.assert_allclose(out[:, 20:39], 2 * (left @ right), rtol=1e-5)
        assert (out[:, :20] == 1).all() and (out[:, 39:] == 1).all()
        blocks.gemm(a[:, :7], transposed, out[:, :7], transpose_b=True)
        np.testing.assert_allclose(out[:, :7], a[:, :7] @ transposed.T, rtol=1e-5)


def test_the_convolution_without_openblas_equals_it_with(monkeypatch):
    """CuPy arrays and NumPy on another BLAS take NumPy's product: the model's outputs and gradients equal
    (the compiled convolution off, so that the GEMM path runs)."""
    from sgrad import blocks, native
    monkeypatch.setattr(native, 'library', lambda: None)
    model = random_cifarnet(seed=3, dtype=np.float64)
    x = np.random.RandomState(1).rand(3, 3, 32, 32)

    def run():
        model.cleargrads()
        xv = chainer.Variable(x)
        with chainer.using_config('train', True):
            F.sum(model(xv) ** 2).backward()
        return [xv.grad] + [p.grad.copy() for _, p in sorted(model.namedparams())]
    with_blas = run()
    monkeypatch.setattr(blocks, '_cblas_gemm', lambda dtype: None)
    for a, b in zip(run(), with_blas):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize('shape', [(5, 6, 4, 3), (5, 16, 16, 5)])  # channels of 72 and of 1,280 numbers
def test_batch_normalization_relu_equals_chainers_link_then_relu(monkeypatch, kernel_path, shape):
    """Training mode on (C, H, W, N) activations, in channel blocks on two threads: the output, the
    running statistics after two steps, and the gradients of x, gamma and beta equal
    F.relu(L.BatchNormalization(axis=(1, 2, 3))(x)); and the node passes gradient_check."""
    import chainer.links as L
    from sgrad import batchnorm, blocks
    from sgrad.batchnorm import batch_normalization_relu
    monkeypatch.setattr(blocks, 'BLOCK_BYTES', 2048)
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    rng = np.random.RandomState(4)
    x = rng.randn(*shape) * 2 + 1
    gy = rng.randn(*x.shape)
    links = []
    for fused in (True, False):
        bn = L.BatchNormalization(5, axis=(1, 2, 3), dtype=np.float64)
        bn.gamma.array[...] = rng.uniform(0.5, 1.5, 5) if not links else links[0][0].gamma.array
        bn.beta.array[...] = rng.normal(0, 0.5, 5) if not links else links[0][0].beta.array
        xv = chainer.Variable(x.copy())
        with chainer.using_config('train', True):
            batch_normalization_relu(xv, bn) if fused else F.relu(bn(xv))  # the first step's statistics
            y = batch_normalization_relu(xv, bn) if fused else F.relu(bn(xv))
        y.grad = gy
        y.backward()
        links.append((bn, y.array, xv.grad))
    (fused, y, gx), (reference, y_ref, gx_ref) = links
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert (y == 0).mean() > 0.2  # the ReLU cuts
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-10, atol=1e-12)
    for name in ('avg_mean', 'avg_var'):
        np.testing.assert_allclose(getattr(fused, name), getattr(reference, name), rtol=1e-12)
    for name in ('gamma', 'beta'):
        np.testing.assert_allclose(getattr(fused, name).grad, getattr(reference, name).grad, rtol=1e-10, atol=1e-12)
    bn = L.BatchNormalization(5, axis=(1, 2, 3), dtype=np.float64)
    with chainer.using_config('train', True):
        gradient_check.check_backward(
            lambda x, gamma, beta: batchnorm.BatchNormReLU(bn.eps, bn.decay, bn.avg_mean, bn.avg_var).apply(
                (x, gamma, beta))[0], (x, rng.uniform(0.5, 1.5, 5), rng.normal(0, 0.5, 5)), gy,
            dtype=np.float64, atol=1e-6, rtol=1e-6)


def test_gemm_on_single_rows_and_columns_and_strided_columns():
    """The shapes a one-channel layer or a one-image batch hands sgrad.blocks.gemm, and a non-contiguous
    column view (NumPy's product then), against a @ b."""
    from sgrad import blocks
    rng = np.random.RandomState(1)
    for m, k, n in ((1, 4, 6), (3, 1, 5), (2, 3, 1), (1, 1, 1)):
        a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
        out = np.empty((m, n), np.float32)
        blocks.gemm(a, b, out)
        np.testing.assert_allclose(out, a @ b, rtol=1e-6)
    a, b = rng.randn(2, 3), rng.randn(3, 10)
    out = np.zeros((2, 10))
    blocks.gemm(a, b[:, ::2], out[:, ::2])
    np.testing.assert_allclose(out[:, ::2], a @ b[:, ::2], rtol=1e-12)
    assert (out[:, 1::2] == 0).all()
