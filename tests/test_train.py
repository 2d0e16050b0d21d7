"""train.py end to end on a tiny subset of the real CIFAR-10, and its atomic save."""
import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error

import chainer
import numpy as np
import pytest

import evaluate_saliency
import smoothgrad
import train
from conftest import needs_cifar10, random_cifarnet
from model import DEFAULT_MODEL_PATH, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--train-size', '64', '--test-size', '32', '-b', '32', '--width', '4']


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
def test_resume_continues_from_the_snapshot(tmp_path, capsys):
    out = str(tmp_path / 'out')
    common = TINY + ['-o', out]
    assert train.main(common + ['-e', '1', '--model-out', str(tmp_path / 'a.npz')]) == 0
    assert 'resuming' not in capsys.readouterr().out
    # the latest snapshot in --out is loaded by itself, and says so; training goes on to epoch 2 only
    assert train.main(common + ['-e', '2', '--model-out', str(tmp_path / 'b.npz')]) == 0
    assert capsys.readouterr().out.startswith('resuming from %s (epoch 1)\n' % os.path.join(out, 'snapshot_epoch_1'))
    log = json.load(open(os.path.join(out, 'log')))
    assert [entry['epoch'] for entry in log] == [1, 2]
    # a run already past --epoch would hand back weights of more epochs than asked for: refused
    assert train.main(common + ['-e', '1']) == 2
    assert capsys.readouterr().err == (
        'train.py: error: %s is of a run already past --epoch 1 (at epoch 2); to train anew, give another --out '
        'or delete %s\n' % (os.path.join(out, 'snapshot_epoch_2'), out))


def load_weights(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


@needs_cifar10
def test_rerun_of_a_finished_run_trains_nothing_and_saves_its_weights_again(tmp_path, capsys):
    out = str(tmp_path / 'out')
    snapshot = os.path.join(out, 'snapshot_epoch_1')
    assert train.main(TINY + ['-e', '1', '-o', out]) == 0
    capsys.readouterr()
    before = file_digest(snapshot)
    assert train.main(TINY + ['-e', '1', '-o', out, '--model-out', str(tmp_path / 'again.npz')]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ('%s is of a run that already finished (epoch 1 of --epoch 1): nothing to train, saving its '
                        'weights again (a larger --epoch trains it further; to train anew, give another --out or '
                        'delete %s)' % (snapshot, out))
    assert len(lines) == 2 and lines[1].startswith('saved the trained weights to ')  # no epoch table: no training
    assert file_digest(snapshot) == before
    again, first = load_weights(str(tmp_path / 'again.npz')), load_weights(os.path.join(out, 'model.npz'))
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)


@needs_cifar10
def test_snapshot_of_other_settings_in_out_is_a_one_line_error(tmp_path, capsys):
    out = str(tmp_path / 'out')
    assert train.main(TINY + ['-e', '1', '-o', out]) == 0
    capsys.readouterr()
    errs = []
    for change in (['--train-size', '32'], ['--width', '8'], ['--random-labels', '3'], ['--no-augment']):
        assert train.main(TINY + ['-e', '2', '-o', out] + change) == 2
        errs.append(capsys.readouterr().err)
        assert errs[-1].count('\n') == 1 and errs[-1].startswith(
            'train.py: error: %s is of a run with other settings' % os.path.join(out, 'snapshot_epoch_1'))
        assert errs[-1].endswith('to train anew, give another --out or delete %s\n' % out), errs[-1]
    assert '(could not broadcast input array from shape (64,) into shape (32,))' in errs[0]  # the sampler's order
    assert '(--random-labels was None, now 3)' in errs[2] and '(--no-augment was False, now True)' in errs[3]


@needs_cifar10
def test_random_labels_permute_the_labels_of_the_same_images(tmp_path):
    """--random-labels: the same images, as many of each class, the labels shuffled among them by the seed."""
    from sgrad.data import load_cifar10
    images, labels = chainer.dataset.concat_examples(load_cifar10()[0][:500])
    permuted = train.permuted_labels(chainer.datasets.TupleDataset(images, labels), 1)
    images1, labels1 = chainer.dataset.concat_examples(permuted)
    assert np.array_equal(images1, images) and np.array_equal(np.bincount(labels1), np.bincount(labels))
    assert (labels1 == labels).mean() < 0.2  # chance is 0.1
    again = chainer.dataset.concat_examples(train.permuted_labels(chainer.datasets.TupleDataset(images, labels), 1))
    assert np.array_equal(again[1], labels1)
    out = str(tmp_path / 'out')
    assert train.main(TINY + ['-e', '1', '-o', out, '--random-labels', '1', '--no-augment']) == 0
    assert train.main(TINY + ['-e', '2', '-o', out, '--random-labels', '1', '--no-augment']) == 0  # resumes


@needs_cifar10
def test_resume_from_a_file_that_is_no_snapshot_is_a_one_line_error(tmp_path, capsys):
    png = tmp_path / 'notimage.png'
    png.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(64))
    empty = tmp_path / 'empty'
    empty.write_bytes(b'')
    for path in (str(png), str(empty), DEFAULT_MODEL_PATH):  # the last: weights, not a trainer's snapshot
        assert train.main(TINY + ['-e', '1', '-o', str(tmp_path / 'out'), '--resume', path]) == 2
        assert capsys.readouterr().err == ('train.py: error: %s is not a snapshot of train.py (those are the '
                                           'snapshot_epoch_* files in its --out folder)\n' % path)
    assert not os.path.exists(str(tmp_path / 'out'))


@needs_cifar10
def test_sizes_beyond_the_dataset_are_refused_and_help_says_0_is_all(tmp_path, capsys):
    for flag, size, message in (('--train-size', 50001, 'the 50,000 training images'),
                                ('--test-size', 10001, 'the 10,000 test images')):
        assert train.main(['-e', '1', '-o', str(tmp_path / 'out'), flag, str(size)]) == 2
        assert capsys.readouterr().err == 'train.py: error: %s %d is more than %s (0 takes them all)\n' % (
            flag, size, message)
    assert not os.path.exists(str(tmp_path / 'out'))
    with pytest.raises(SystemExit) as e:
        train.main(['--help'])
    assert e.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    assert '--train-size TRAIN_SIZE train on the first N images only, for quick runs (default 0: all 50,000)' in text
    assert '(default 0: all 10,000)' in text


class Terminal(io.StringIO):
    def isatty(self):
        return True


@needs_cifar10
def test_terminal_codes_only_on_a_terminal(tmp_path, monkeypatch):
    """A redirected log holds no ESC[J / ESC[4A (PrintReport's and ProgressBar's redraws); a terminal
    still gets the progress bar, also when resuming a snapshot of a run whose output was a file."""
    out = str(tmp_path / 'out')
    tiny = TINY + ['-b', '8', '-o', out]  # 8 iterations an epoch: the bar is drawn every 10
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py')] + tiny + ['-e', '1'],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert '\x1b' not in proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[1].startswith('1  ')  # PrintReport's row for epoch 1, plain
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stdout', terminal)
    assert train.main(tiny + ['-e', '2']) == 0
    shown = terminal.getvalue()
    assert '\x1b[J2  ' in shown and 'this epoch [' in shown and '\x1b[4A' in shown


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


@needs_cifar10
def test_ship_of_a_random_labels_run_records_what_it_memorised(tmp_path, monkeypatch):
    """--ship of a --random-labels run replaces the data randomization check's model, not the real one, and
    its record says how many of its (permuted) training labels it gets right."""
    shipped = str(tmp_path / 'models' / 'cifarnet_random_labels.npz')
    monkeypatch.setattr(train, 'RANDOM_LABELS_MODEL_PATH', shipped)
    monkeypatch.setattr(train, 'DEFAULT_MODEL_PATH', str(tmp_path / 'models' / 'untouched.npz'))
    argv = ['--train-size', '64', '-e', '1', '-b', '32', '--width', '4', '-o', str(tmp_path / 'out'), '--ship',
            '--random-labels', '2', '--no-augment']
    assert train.main(argv) == 0
    assert sorted(os.listdir(str(tmp_path / 'models'))) == ['cifarnet_random_labels.json', 'cifarnet_random_labels.npz']
    record = json.load(open(str(tmp_path / 'models' / 'cifarnet_random_labels.json')))
    model = load_model(shipped).inference_copy()
    learned = train.permuted_labels(train.load_cifar10()[0][:64], 2)
    assert record['training_accuracy'] == pytest.approx(train.evaluate(model, learned, 64, model.device)[0], abs=1e-4)
    assert record['training_images'] == 64 and record['test_images'] == 10000


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
