"""The saliency metrics on cases whose answer is known."""
import json
import os
import re

import chainer
import chainer.functions as F
import numpy as np
import pytest

import evaluate_saliency
from conftest import needs_cifar10, random_cifarnet
from test_cli import USER_MODEL
from model import load_model
from sgrad.data import load_test_images
from sgrad.metrics import (area_under_curve, blur, cascading_randomization, curve_ends, perturbation_curves,
                           randomization_stages, ranks, spearman, ssim)
from sgrad.saliency import Gradient, GradientEngine, channel_sum_abs


def test_ranks_average_ties():
    np.testing.assert_array_equal(ranks(np.array([3., 1., 3., 2.])), [2.5, 0, 2.5, 1])


def test_identical_maps_have_correlation_and_ssim_one():
    m = np.random.RandomState(0).rand(32, 32)
    assert spearman(m, m) == pytest.approx(1)
    assert spearman(m, 3 * m ** 2 + 1) == pytest.approx(1)  # monotone transforms keep the ranks
    assert spearman(m, -m) == pytest.approx(-1)
    assert ssim(m, m) == pytest.approx(1)
    assert ssim(m, np.random.RandomState(1).rand(32, 32)) < 0.2


class WeightedPixels(chainer.Chain):
    """Logit 0 = sum(w * x) - bias, logit 1 = 0: class 0's probability falls as its evidence goes."""

    def __init__(self, w, bias):
        super().__init__()
        self.w, self.bias = w, bias

    def __call__(self, x):
        s = F.sum(x * self.w, axis=(1, 2, 3)) - self.bias
        return F.stack([s, s * 0], axis=1)


def test_oracle_ordering_beats_random_on_deletion_and_insertion():
    rng = np.random.RandomState(0)
    # Only one region matters, through a checkerboard pattern: black and blur both erase it.
    checkerboard = (-1.) ** np.add.outer(np.arange(7), np.arange(8))
    images = rng.rand(8, 3, 16, 16).astype(np.float32)
    images[..., 2:9, 4:12] = 0.5 + rng.uniform(0.3, 0.45, (8, 3, 1, 1)) * checkerboard
    w = np.zeros((1, 3, 16, 16), np.float32)
    w[..., 2:9, 4:12] = rng.rand(1, 3, 7, 8) * 0.5 * checkerboard
    engine = GradientEngine(WeightedPixels(w, 8.))
    targets = np.zeros(8, np.int32)
    oracle_maps, random_maps = channel_sum_abs(images * w), rng.rand(8, 16, 16)
    oracle = perturbation_curves(engine, images, oracle_maps, targets, steps=8)
    random = perturbation_curves(engine, images, random_maps, targets, steps=8)
    assert sorted(oracle) == ['blurred deletion', 'deletion', 'insertion']
    untouched = oracle['deletion'][:, 0]
    assert (untouched > 0.99).all()  # the untouched images are confidently class 0
    for kind in ('deletion', 'blurred deletion'):
        assert area_under_curve(oracle[kind]).mean() < area_under_curve(random[kind]).mean() - 0.1
        np.testing.assert_allclose(oracle[kind][:, 0], untouched)
    assert area_under_curve(oracle['insertion']).mean() > area_under_curve(random['insertion']).mean() + 0.1
    # the curves end where they must: everything deleted / everything restored
    for kind in oracle:
        np.testing.assert_allclose(oracle[kind][:, -1], random[kind][:, -1])
    np.testing.assert_allclose(oracle['insertion'][:, -1], untouched, rtol=1e-5)
    np.testing.assert_allclose(oracle['blurred deletion'][:, -1], oracle['insertion'][:, 0])


def test_every_curve_point_is_its_perturbed_image_s_probability():
    """Real CIFAR-10 images, the shipped model, a gradient map's order: each point of each curve (the
    end points, which all orders share, included) is the target probability of that perturbed image
    computed on its own."""
    model = load_model()
    images, _ = load_test_images(0, 3)
    engine = GradientEngine(model)
    targets = engine.probabilities(images).argmax(axis=1)
    maps = channel_sum_abs(Gradient(engine).attribute(images, targets))
    steps = 4
    colour = np.array([0.2, 0.5, 0.7], np.float32)
    curves = perturbation_curves(engine, images, maps, targets, steps, mean_colour=colour)
    assert sorted(curves) == ['blurred deletion', 'deletion', 'insertion', 'mean-colour deletion']
    for i, (image, target) in enumerate(zip(images, targets)):
        ranking = sorted(range(32 * 32), key=lambda p: -maps[i].ravel()[p])  # ties: raster order
        for k in range(steps + 1):
            salient = np.zeros(32 * 32, bool)
            salient[ranking[:k * 32 * 32 // steps]] = True
            salient = salient.reshape(32, 32)
            expected = {'deletion': np.where(salient, 0, image),
                        'mean-colour deletion': np.where(salient, colour[:, None, None], image),
                        'blurred deletion': np.where(salient, blur(image), image),
                        'insertion': np.where(salient, image, blur(image))}
            for kind, x in expected.items():
                p = engine.probabilities(x[None].astype(np.float32))[0, target]
                assert curves[kind][i, k] == pytest.approx(p, rel=1e-5, abs=1e-7), (kind, i, k)
    ends = curve_ends(engine, images, targets, colour)
    given = perturbation_curves(engine, images, maps, targets, steps, ends, colour)
    for kind in curves:
        np.testing.assert_array_equal(given[kind], curves[kind])
    ends_only = perturbation_curves(engine, images, maps, targets, 1, ends, colour)
    np.testing.assert_array_equal(ends_only['deletion'], np.column_stack([ends['image'], ends['black']]))
    np.testing.assert_array_equal(ends_only['mean-colour deletion'], np.column_stack([ends['image'],
                                                                                      ends['mean colour']]))


def test_area_under_curve_of_known_curves():
    curves = np.array([[1., 1., 1.], [1., 0.5, 0.], [0., 0., 0.]])
    np.testing.assert_allclose(area_under_curve(curves), [1., 0.5, 0.])


def test_cascading_randomization_is_cumulative_and_decorrelates_gradients(image):
    model = random_cifarnet(width=4, seed=2)
    before = model.fc.W.array.copy()
    cascade = randomization_stages(model, image[None])
    assert [label for label, _ in cascade] == ['fc', 'res3', 'conv3', 'conv2', 'res1', 'conv1', 'prep']
    stages = list(cascading_randomization(model, cascade))
    np.testing.assert_array_equal(model.fc.W.array, before)  # the model itself is untouched
    (first_name, first), (last_name, last) = stages[0], stages[-1]
    assert first_name == 'fc' and last_name == 'prep'
    assert not np.allclose(first.fc.W.array, before)
    np.testing.assert_array_equal(first.prep.conv.W.array, model.prep.conv.W.array)
    assert not np.allclose(last.prep.conv.W.array, model.prep.conv.W.array)
    np.testing.assert_array_equal(last.fc.W.array, first.fc.W.array)  # earlier steps stay randomized

    def gradient_map(m):
        return channel_sum_abs(Gradient(GradientEngine(m))(image, 3))
    assert spearman(gradient_map(model), gradient_map(model)) == pytest.approx(1)
    assert spearman(gradient_map(model), gradient_map(last)) < 0.5


def test_evaluate_saliency_makes_every_method_with_the_studys_options(model):
    """The study's methods are the registry's, plus SmoothGrad: --samples are SmoothGrad's and Gradient SHAP's
    draws, --steps the path methods', --masks RISE's."""
    from sgrad.methods import METHODS
    methods = evaluate_saliency.make_methods(GradientEngine(model), samples=7, steps=5, masks=9)
    assert list(methods) == list(METHODS) + ['smoothgrad']
    assert methods['gradient_shap'].samples == methods['smoothgrad'].samples == 7
    assert methods['integrated_gradients'].steps == methods['blur_ig'].steps == 5 and methods['rise'].masks == 9


def test_evaluate_saliency_rejects_bad_arguments():
    for bad in (['--images', '0'], ['--road-images', '0'], ['--sensitivity-radius', '-1'],
                ['--infidelity-noise', 'nan'], ['--only', 'nothing']):
        with pytest.raises(SystemExit) as e:
            evaluate_saliency.main(bad)
        assert e.value.code == 2


@needs_cifar10
def test_evaluate_saliency_end_to_end(tmp_path, model_file):
    out = str(tmp_path / 'eval')
    assert evaluate_saliency.main(['--model', model_file, '--images', '2', '--deletion-images', '3',
                                   '--data-images', '2', '--random-labels-model', model_file, '--timing-images', '2',
                                   '--road-images', '2', '--robustness-images', '2', '--knob-images', '1',
                                   '--samples', '2', '--steps', '2', '--perturbation-steps', '4',
                                   '--sensitivity-samples', '2', '--infidelity-samples', '3', '-o', out]) == 0
    assert sorted(os.listdir(out)) == ['data_randomization.png', 'deletion_insertion.png', 'knob_noise.png',
                                       'knob_samples.png', 'results.md', 'road.png', 'sanity_randomization.png',
                                       'sensitivity_noise.png']
    text = open(os.path.join(out, 'results.md')).read()
    for expected in ('Cascading randomization', 'next image (control)', 'random (baseline)', 'Data randomization',
                     'Time per map, 32x32 images, 2 at once', '| smoothgrad | ',
                     'integrated_gradients (signed)', 'blurred deletion AUC', 'Sample count', 'LeRF - MoRF',
                     'max-sensitivity (lower is better)', 'Gini', 'against the noise level', 'mean-colour deletion',
                     'zero map (control)', 'random map (control)', 'noisy baseline sd 0.2, as it is',
                     'fresh noise, radius 0 (Monte Carlo floor)'):
        assert expected in text


@needs_cifar10
def test_evaluate_saliency_of_some_methods(tmp_path, model_file):
    """--methods: the tables hold those methods' rows (and the controls) alone; without SmoothGrad, no table of its
    noise levels; the shards record the methods, so that a rerun with the same --methods loads them."""
    out = str(tmp_path / 'eval')
    argv = ['--model', model_file, '--methods', 'deconvnet', 'gradcam', '--only', 'sanity', 'road', 'robustness',
            '--images', '2', '--road-images', '2', '--robustness-images', '2', '--steps', '2',
            '--sensitivity-samples', '1', '--infidelity-samples', '2', '--shard-size', '2', '-o', out]
    assert evaluate_saliency.main(argv) == 0
    text = open(os.path.join(out, 'results.md')).read()
    rows = {line.split(' | ')[0].lstrip('| ') for line in text.splitlines() if line.startswith('| ')}
    assert rows - {'method', 'pixel order', '---'} == {'deconvnet', 'deconvnet (signed)', 'gradcam',
                                                       'random (baseline)'} | set(evaluate_saliency.INFIDELITY_CONTROLS)
    assert 'SmoothGrad (N=' not in text and not os.path.exists(os.path.join(out, 'sensitivity_noise.png'))
    with np.load(os.path.join(out, 'shards', 'road-000000-000002.npz')) as shard:
        assert json.loads(str(shard['settings']))['methods'] == ['deconvnet', 'gradcam']


def test_evaluate_saliency_on_photographs_with_a_users_model(tmp_path):
    """Any model: the photographs at its IMAGE_SIZE, its randomization cascade from its call order.
    Runs of single sections fill one results.md, in the sections' order, a rerun replacing its block."""
    source = tmp_path / 'net.py'
    source.write_text(USER_MODEL)
    out = str(tmp_path / 'eval')
    run = lambda *args: evaluate_saliency.main(['--arch', '%s:Net' % source, '--random-weights', '--images', '2',
                                                '--deletion-images', '3',
                                                '--samples', '2', '--steps', '2', '-o', out] + list(args))
    assert run('--only', 'deletion', '--perturbation-steps', '2') == 0
    assert run('--only', 'sanity') == 0
    text = open(os.path.join(out, 'results.md')).read()
    assert '| fc | conv2 | conv1 | conv1, next image (control) |' in text.replace('method | ', '')
    assert text.index('Cascading randomization') < text.index('_sanity: 2 images') < text.index('Deletion and')
    assert run('--only', 'deletion', '--perturbation-steps', '4') == 0
    text = open(os.path.join(out, 'results.md')).read()
    assert text.count('Deletion and insertion') == text.count('_deletion: 3 images') == 1
    assert text.count('Cascading randomization') == 1 and 'random (baseline)' in text
    assert evaluate_saliency.results_blocks(text).keys() == {'sanity', 'deletion'}


def test_shard_bounds():
    assert evaluate_saliency.shard_bounds(10, 0, 1) == [(0, 10)]
    assert evaluate_saliency.shard_bounds(10, 4, 1) == [(0, 4), (4, 8), (8, 10)]
    assert evaluate_saliency.shard_bounds(9, 4, 2) == [(0, 4), (4, 9)]  # a last shard of 1 cannot split over 2
    assert evaluate_saliency.shard_bounds(3, 5, 2) == [(0, 3)]


@needs_cifar10
def test_a_sharded_section_resumes_and_equals_an_unsharded_run(tmp_path, model_file, capsys):
    """Shards are saved as they finish; a rerun loads them, computes a missing one again, and recomputes
    them all when a setting changes; the tables equal those of a run without shards."""
    args = ['--model', model_file, '--only', 'robustness', '--robustness-images', '5', '--samples', '2',
            '--steps', '2', '--sensitivity-samples', '1', '--infidelity-samples', '2']
    tables = lambda out: [line for line in open(os.path.join(out, 'results.md')).read().splitlines()
                          if not re.match(r'_\w+: \d+ images, \d+ s on ', line)]  # timing lines differ
    plain, out = str(tmp_path / 'plain'), str(tmp_path / 'sharded')
    assert evaluate_saliency.main(args + ['-o', plain]) == 0
    assert not os.path.exists(os.path.join(plain, 'shards'))
    assert evaluate_saliency.main(args + ['-o', out, '--shard-size', '2']) == 0
    shards = sorted(os.listdir(os.path.join(out, 'shards')))
    assert shards == ['robustness-000000-000002.npz', 'robustness-000002-000004.npz',
                      'robustness-000004-000005.npz']
    assert tables(out) == tables(plain)
    os.remove(os.path.join(out, 'shards', shards[1]))
    capsys.readouterr()
    assert evaluate_saliency.main(args + ['-o', out, '--shard-size', '2']) == 0
    printed = capsys.readouterr().out
    assert printed.count('loaded from') == 2 and 'robustness: shard 2/3 (images 2-3) computed, saved' in printed
    earlier = sum(float(np.load(os.path.join(out, 'shards', shards[i]))['seconds']) for i in (0, 2))
    assert 'robustness: 5 images, ' in printed
    assert '(2 of its 3 shards done by earlier runs, which took %.0f s)' % earlier in printed
    assert tables(out) == tables(plain)
    with np.load(os.path.join(out, 'shards', shards[0])) as saved:  # a shard from before shards kept their time
        legacy = {name: saved[name] for name in saved.files if name != 'seconds'}
    np.savez_compressed(os.path.join(out, 'shards', shards[0]), **legacy)
    assert evaluate_saliency.main(args + ['-o', out, '--shard-size', '2']) == 0
    assert '(3 of its 3 shards done by earlier runs)' in capsys.readouterr().out
    assert evaluate_saliency.main(args + ['-o', out, '--shard-size', '2', '--infidelity-noise', '0.2']) == 0
    printed = capsys.readouterr().out
    assert 'loaded from' not in printed and printed.count('computed, saved in') == 3
    assert 'earlier runs' not in printed


def test_the_mean_colour_is_what_each_model_s_input_normalisation_maps_to_zero():
    """Mean-colour deletion fills in the colour that RISE's code deletes to, its normalised input's 0."""
    from model import CifarNet, normalize
    from sgrad.efficientnet import EfficientNetLite0
    from sgrad.metrics import filled
    x = filled(np.zeros((1, 3, 4, 4), np.float32), CifarNet.MEAN_COLOUR)
    np.testing.assert_allclose(normalize(x), 0, atol=1e-7)
    x = filled(np.zeros((1, 3, 4, 4), np.float32), EfficientNetLite0.MEAN_COLOUR)
    np.testing.assert_allclose(x * (255. / 128.) - 127. / 128., 0, atol=1e-7)  # its stem's input scaling


@needs_cifar10
def test_cifarnet_s_mean_colour_is_the_training_set_s():
    from model import CifarNet
    from sgrad.data import load_cifar10
    train, _ = load_cifar10()
    images = np.stack([train[i][0] for i in range(0, len(train), 5)])  # every fifth: 10,000 images
    np.testing.assert_allclose(images.mean(axis=(0, 2, 3)), CifarNet.MEAN_COLOUR, atol=2e-3)


def test_a_run_keeps_the_blocks_of_sections_it_does_not_know(tmp_path):
    """A results.md block of a section that a newer version wrote ('_future: ..._') survives a run of this one,
    which rewrites the file with its own sections."""
    path = tmp_path / 'results.md'
    path.write_text('### Later\n\n| a |\n|---|\n| 1 |\n\n_future: 1 images, 1 s_\n')
    report = evaluate_saliency.Report(str(tmp_path))
    report.table('Now', ['b'], [[2]])
    report.end_section('sanity', '2 images, 1 s')
    text = path.read_text()
    assert evaluate_saliency.results_blocks(text).keys() == {'sanity', 'future'}
    assert '| 1 |' in text and '_future: 1 images, 1 s_' in text and text.index('Now') < text.index('Later')
