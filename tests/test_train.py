"""train.py end to end on a tiny subset of the real CIFAR-10, and its atomic save."""
import json
import os

import chainer
import numpy as np
import pytest

import smoothgrad
import train
from conftest import needs_cifar10, random_cifarnet


@needs_cifar10
def test_train_runs_end_to_end_and_smoothgrad_loads_the_model(tmp_path, capsys):
    out, model_path = str(tmp_path / 'out'), str(tmp_path / 'model.npz')
    code = train.main(['--train-size', '96', '--test-size', '64', '-e', '2', '-b', '32', '--width', '4',
                       '--seed', '1', '-o', out, '--model-out', model_path])
    assert code == 0
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
