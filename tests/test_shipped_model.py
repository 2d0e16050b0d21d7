"""The shipped weights (sgrad/shipped/cifarnet.npz, and the random-label model beside them) on the real CIFAR-10
test set."""
import json
import os

import pytest

import train
from conftest import needs_cifar10
from model import DEFAULT_MODEL_PATH, load_model
from sgrad.data import load_cifar10, load_test_image
from sgrad.saliency import GradientEngine, IntegratedGradients

REPORT = os.path.join(os.path.dirname(DEFAULT_MODEL_PATH), 'cifarnet.json')


@pytest.fixture(scope='module')
def shipped():
    return load_model()


@needs_cifar10
def test_shipped_model_reaches_the_reported_accuracy(shipped):
    with open(REPORT) as f:
        reported = json.load(f)['test_accuracy']
    _, test = load_cifar10()
    accuracy, confusion = train.evaluate(shipped.inference_copy(), test, 1000, shipped.device)
    assert confusion.sum() == 10000
    assert accuracy >= reported - 0.005, 'measured %.4f, reported %.4f' % (accuracy, reported)
    assert accuracy >= 0.85  # the floor of issue 3


@needs_cifar10
def test_the_random_label_model_memorised_its_labels_and_knows_nothing_else():
    """As its record says: every one of its training images gets the label that the permutation gave it, and the
    test set is at chance."""
    from sgrad.cifarnet import RANDOM_LABELS_MODEL_PATH
    with open(os.path.splitext(RANDOM_LABELS_MODEL_PATH)[0] + '.json') as f:
        record = json.load(f)
    model = load_model(RANDOM_LABELS_MODEL_PATH).inference_copy()
    train_set, test = load_cifar10()
    learned = train.permuted_labels(train_set[:record['training_images']], 1)  # --random-labels 1, its command
    assert '--random-labels 1 ' in record['command']
    accuracy, _ = train.evaluate(model, learned, 1000, model.device)
    assert accuracy == pytest.approx(record['training_accuracy'], abs=1e-4) and accuracy > 0.99
    accuracy, _ = train.evaluate(model, test, 1000, model.device)
    assert accuracy == pytest.approx(record['test_accuracy'], abs=1e-4) and accuracy < 0.12


def test_integrated_gradients_completeness_on_the_shipped_model(shipped):
    x, label = load_test_image(0)
    ig = IntegratedGradients(GradientEngine(shipped, batchsize=100), steps=300)
    total, difference = ig.completeness(x, label, ig(x, label))
    assert abs(difference) > 0.1
    assert total == pytest.approx(difference, rel=0.01)
