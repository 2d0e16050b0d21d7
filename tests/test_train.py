"""train.py end to end on a tiny subset of the real CIFAR-10, and its atomic save."""
import hashlib
import json
import os
import urllib.error

import chainer
import numpy as np
import pytest

import evaluate_saliency
import smoothgrad
import train
from conftest import needs_cifar10, random_cifarnet
from model import DEFAULT_MODEL_PATH, load_model


def file_digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@needs_cifar10
def test_train_runs_end_to_end_and_smoothgrad_loads_the_model(tmp_path, capsys):
    """A quick run writes OUT/model.npz and leaves the shipped model alone."""
    out = str(tmp_path / 'out')
    model_path = os.path.join(out, 'model.npz')
    shipped = {path: file_digest(path) for path in (DEFAULT_MODEL_PATH, train.shipped_record_path())}
    code = train.main(['--train-size', '96', '--test-size', '64', '-e', '2', '-b', '32', '--width', '4',
                       '--seed', '1', '-o', out])
    assert code == 0
    assert {path: file_digest(path) for path in shipped} == shipped
    log = json.load(open(os.path.join(out, 'log')))
    assert [entry['epoch'] for entry in log] == [1, 2]
    assert all(np.isfinite(entry['main/loss']) and 'validation/main/accuracy' in entry for entry in log)
    assert os.path.exists(os.path.join(out, 'loss.png')) and os.path.exists(os.path.join(out, 'accuracy.png'))
    assert os.path.exists(os.path.join(out, 'snapshot_epoch_2'))

    png = str(tmp_path / 'map.png')
    assert smoothgrad.main(['--model', model_path, '--samples', '4', '--out', png]) == 0
    assert os.path.getsize(png) > 0

    assert train.main(['--evaluate', model_path, '--test-size', '64']) == 0
    printed = capsys.readouterr().out
    assert 'test accuracy' in printed and 'airplane' in printed and 'truck' in printed


@needs_cifar10
def test_resume_continues_from_the_snapshot(tmp_path):
    out = str(tmp_path / 'out')
    common = ['--train-size', '64', '--test-size', '32', '-b', '32', '--width', '4', '-o', out]
    assert train.main(common + ['-e', '1', '--model-out', str(tmp_path / 'a.npz')]) == 0
    # the latest snapshot in --out is loaded by itself; training goes on to epoch 2 only
    assert train.main(common + ['-e', '2', '--model-out', str(tmp_path / 'b.npz')]) == 0
    log = json.load(open(os.path.join(out, 'log')))
    assert [entry['epoch'] for entry in log] == [1, 2]


def test_interrupted_save_leaves_no_model_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'model.npz')

    def half_written(f, obj):
        f.write(b'PK\x03\x04 partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(chainer.serializers, 'save_npz', half_written)
    with pytest.raises(KeyboardInterrupt):
        train.save_npz_atomic(path, random_cifarnet())
    assert os.listdir(str(tmp_path)) == []


def test_one_cycle_schedule_warms_up_and_decays():
    schedule = train.one_cycle_lr(0.2, 100, warmup_fraction=0.25)

    class Stub:
        pass

    trainer = Stub()
    trainer.updater = Stub()
    optimizer = Stub()
    trainer.updater.get_optimizer = lambda name: optimizer
    lrs = []
    for it in range(101):
        trainer.updater.iteration = it
        schedule(trainer)
        lrs.append(optimizer.lr)
    assert lrs[0] == 0 and lrs[25] == pytest.approx(0.2) and lrs[100] == 0
    assert np.all(np.diff(lrs[:26]) > 0) and np.all(np.diff(lrs[25:]) < 0)


def test_bad_training_flags_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(['--epoch', '0'])
    assert e.value.code == 2
    assert capsys.readouterr().err == 'train.py: error: --epoch must be positive\n'


@needs_cifar10
def test_ship_replaces_the_shipped_model_and_its_record(tmp_path, monkeypatch):
    shipped = str(tmp_path / 'models' / 'cifarnet.npz')
    monkeypatch.setattr(train, 'DEFAULT_MODEL_PATH', shipped)
    argv = ['--train-size', '64', '-e', '1', '-b', '32', '--width', '4', '-o', str(tmp_path / 'out'), '--ship']
    assert train.main(argv) == 0
    record = json.load(open(str(tmp_path / 'models' / 'cifarnet.json')))
    assert record['command'] == 'python train.py ' + ' '.join(argv) and record['test_images'] == 10000
    model = load_model(shipped).inference_copy()
    _, test = train.load_cifar10()
    accuracy, _ = train.evaluate(model, test, 1000, model.device)
    assert record['test_accuracy'] == pytest.approx(accuracy, abs=1e-4)


@pytest.mark.parametrize('script, argv', [
    (train, ['--lr', 'nan']), (train, ['--weight-decay', 'inf']), (train, ['--label-smoothing', '-inf']),
    (train, ['--label-smoothing', '1']), (train, ['--ship', '--test-size', '100']),
    (smoothgrad, ['--noise', 'NaN']), (evaluate_saliency, ['--images', 'nan'])])
def test_non_finite_and_out_of_range_numbers_exit_2_with_one_line(capsys, script, argv):
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and ': error: ' in err, err


def test_missing_dataset_without_network_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    def offline(url):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(chainer.dataset.download, 'cached_download', offline)
    monkeypatch.setattr(chainer.dataset.download, '_dataset_root', str(tmp_path))
    assert train.main(['-e', '1', '-o', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'CHAINER_DATASET_ROOT' in err and 'no network' in err
    assert not os.path.exists(str(tmp_path / 'out'))
