"""The shipped weights (sgrad/shipped/cifarnet.npz) on the real CIFAR-10 test set."""
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


def test_integrated_gradients_completeness_on_the_shipped_model(shipped):
    x, label = load_test_image(0)
    ig = IntegratedGradients(GradientEngine(shipped, batchsize=100), steps=300)
    total, difference = ig.completeness(x, label, ig(x, label))
    assert abs(difference) > 0.1
    assert total == pytest.approx(difference, rel=0.01)
