"""SmoothGrad: batching, chunking, noise scale, seeds, and the blog's own code as reference."""
import os
import subprocess
import sys
import tracemalloc

import chainer
import numpy as np
import pytest

from conftest import relative_difference, within
from sgrad.errors import InputError
from sgrad.saliency import (Gradient, GradientEngine, IntegratedGradients, SmoothGrad, channel_sum_abs, noise_stdev,
                            noisy_copies, smoothgrad)

pytestmark = pytest.mark.numerical


@pytest.mark.parametrize('objective', ['score', 'loss'])
def test_batched_gradients_equal_the_per_sample_loop(model, image, objective):
    noisy = noisy_copies(image, 0.1, 6, np.random.RandomState(0))
    engine = GradientEngine(model, objective)
    batched = engine(noisy, 3)
    looped = np.concatenate([engine(noisy[i:i + 1], 3) for i in range(len(noisy))])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5 * np.abs(looped).max())


@pytest.mark.parametrize('objective', ['score', 'loss'])
@pytest.mark.parametrize('batchsize', [1, 7, 32])
def test_chunked_equals_unchunked(model, image, objective, batchsize):
    args = dict(noise=0.2, samples=32, objective=objective)
    whole = smoothgrad(model, image, 4, rng=np.random.RandomState(5), **args)
    chunked = smoothgrad(model, image, 4, rng=np.random.RandomState(5), batchsize=batchsize, **args)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)


def peak_memory(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_smoothgrad_memory_is_bounded_by_the_batchsize_not_the_samples(model, image):
    """Noise is drawn batch by batch: fifty times the samples, about the same peak."""
    peaks = {n: peak_memory(lambda: smoothgrad(model, image, 3, 0.1, n, batchsize=20,
                                               rng=np.random.RandomState(0)))
             for n in (40, 2000)}
    all_copies = 2000 * image.nbytes  # what drawing the noise at once held, twice over in float64
    assert peaks[2000] < 1.2 * peaks[40]
    assert peaks[2000] < all_copies / 2


def test_progress_is_reported_over_the_samples(model, image):
    reports = []
    engine = GradientEngine(model, batchsize=8, progress=lambda *report: reports.append(report))
    SmoothGrad(Gradient(engine), 0.1, 20)(image, 3)
    assert reports == [(8, 20, 'noisy samples'), (16, 20, 'noisy samples'),
                       (20, 20, 'noisy samples')]  # the engine's inner loops report nothing
    reports.clear()
    IntegratedGradients(engine, steps=6)(image, 3)
    assert reports == [(6, 6, 'path points')]


def test_zero_noise_is_n_times_the_vanilla_gradient(model, image):
    engine = GradientEngine(model)
    vanilla = channel_sum_abs(engine(image[None], 2)[0])
    assert vanilla.shape == (32, 32) and vanilla.max() > 0
    # equal up to float32 rounding: BLAS blocks a 10-image batch differently from one image
    smoothed = channel_sum_abs(SmoothGrad(Gradient(engine), noise=0., samples=10)(image, 2))
    np.testing.assert_allclose(smoothed, 10 * vanilla, rtol=1e-5)


def test_noisy_copies_are_the_blogs_tiled_image_plus_float32_noise_bit_for_bit(image):
    """The published maps' numbers: np.tile(x) + the RandomState's normal draws cast to x's dtype."""
    sigma = noise_stdev(image, 0.1)
    blog = np.tile(image, (5, 1, 1, 1)) + np.random.RandomState(4).normal(0., sigma, (5,) + image.shape).astype(
        image.dtype)
    noisy = noisy_copies(image, 0.1, 5, np.random.RandomState(4))
    assert noisy.dtype == image.dtype and noisy.shape == blog.shape
    np.testing.assert_array_equal(noisy, blog)


def test_noise_has_the_papers_stdev(image):
    noise = 0.15
    noisy = noisy_copies(image, noise, 400, np.random.RandomState(0))
    eps = noisy - image[None]
    expected = noise * (image.max() - image.min())
    assert noise_stdev(image, noise) == pytest.approx(expected)
    assert eps.std() == pytest.approx(expected, rel=0.01)
    assert abs(eps.mean()) < 0.01 * expected
    # independent per sample and per pixel
    assert abs(np.corrcoef(eps[0].ravel(), eps[1].ravel())[0, 1]) < 0.05


def test_seed_reproduces_and_different_seeds_differ(model, image):
    a = smoothgrad(model, image, 1, 0.1, 8, rng=np.random.RandomState(7))
    b = smoothgrad(model, image, 1, 0.1, 8, rng=np.random.RandomState(7))
    c = smoothgrad(model, image, 1, 0.1, 8, rng=np.random.RandomState(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.cross_check('smoothgrad')
def test_loss_objective_equals_the_blogs_code(model, image):
    """The blog's lines (Chainer 2, global NumPy RNG, loss.backward()) as the reference."""
    N_sample, noise, t, seed = 20, 0.1, 3, 123

    np.random.seed(seed)
    x = image
    xs = np.tile(x, (N_sample, 1, 1, 1))
    stdev = noise * (np.max(x) - np.min(x))
    xs = xs + np.random.normal(0, stdev, xs.shape).astype(np.float32)
    x_var = chainer.Variable(xs)
    with chainer.using_config('train', False):
        y, loss = model.loss(x_var, np.full(N_sample, t, dtype=np.int32))
    model.cleargrads()
    loss.backward()
    blog_map = np.sum(np.abs(x_var.grad), axis=(0, 1))

    ours = smoothgrad(model, image, t, noise, N_sample, rng=np.random.RandomState(seed), objective='loss')
    np.testing.assert_allclose(ours, blog_map, rtol=1e-5)
    assert within(relative_difference(ours, blog_map), 1e-5)  # and its largest difference, for the record


def test_bad_arguments_raise_input_error(model, image):
    with pytest.raises(InputError):
        smoothgrad(model, image, 0, noise=-0.1)
    with pytest.raises(InputError):
        smoothgrad(model, image, 0, samples=0)
    with pytest.raises(InputError):
        GradientEngine(model, objective='logit')


PAGE_FAULTS = '''
import resource, sys
import numpy as np
from sgrad.cli import keep_freed_memory
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
for _ in range(11):
    if _ == 1:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(2 ** 24, np.float32)  # 64 MB, written, freed
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_in_new_pages():
    """What the scripts gain at 224x224: a freed 64 MB array's memory serves the next one."""
    faults = {}
    for mode in ('default', 'keep'):
        proc = subprocess.run([sys.executable, '-c', PAGE_FAULTS, mode], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, proc.stderr
        faults[mode] = int(proc.stdout)
    assert faults['default'] >= 50 and faults['keep'] < faults['default'] / 10, faults  # >= 50: even with huge pages


def test_the_default_batch_holds_about_2_to_the_19_pixels():
    """512 CIFAR images (N=100 in one pass), 10 photographs at 224x224: memory per pass, not per image."""
    engine = GradientEngine(None)
    assert [c.stop - c.start for c in engine.batches(25, (3, 224, 224))] == [10, 10, 5]
    assert [c.stop - c.start for c in engine.batches(600, (3, 32, 32))] == [512, 88]
