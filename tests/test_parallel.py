"""Past one process: train.py, evaluate_saliency.py and smoothgrad.py under `mpiexec -n 2` (ChainerMN's
naive communicator) on tiny subsets, against the same commands in one process."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import needs_cifar10
from sgrad import parallel
from sgrad.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = shutil.which('mpiexec', path=os.path.dirname(sys.executable)) or shutil.which('mpiexec')
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason='no mpiexec (pip install mpich, see requirements.txt)')


def run_script(args, ranks=None, env=None, cwd=ROOT):
    """Run a script of the project in a fresh interpreter, under `mpiexec -n ranks` if ranks is given."""
    command = [sys.executable] + args
    if ranks is not None:
        command = [MPIEXEC, '-n', str(ranks)] + command
    environment = dict(os.environ, MPLBACKEND='Agg', **(env or {}))
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def test_share_cores_gives_each_rank_its_share_of_the_cores(monkeypatch):
    for name in parallel.THREAD_VARS + parallel.SIZE_VARS + parallel.LOCAL_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    cores = len(os.sched_getaffinity(0))
    parallel.share_cores()
    assert 'OMP_NUM_THREADS' not in os.environ  # one plain process: BLAS's own default
    monkeypatch.setenv('MPI_LOCALNRANKS', '2')
    parallel.share_cores()
    assert os.environ['OMP_NUM_THREADS'] == str(max(1, cores // 2))
    monkeypatch.setenv('OMP_NUM_THREADS', '7')  # the user's choice wins
    parallel.share_cores()
    assert os.environ['OMP_NUM_THREADS'] == '7'


def test_no_communicator_for_one_plain_process(monkeypatch):
    for name in parallel.SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert parallel.create_communicator(None) is None


def test_an_unknown_communicator_is_a_one_line_error():
    with pytest.raises(InputError, match='Unrecognized communicator: "nccl_please"; CPU training uses '
                                         '--communicator naive'):
        parallel.create_communicator('nccl_please')


def test_a_missing_mpi_runtime_is_a_one_line_error():
    result = run_script(['train.py', '--communicator', 'naive'], env={'MPI4PY_LIBMPI': '/nonexistent/libmpi.so'})
    assert result.returncode == 2
    assert result.stderr.count('\n') == 1 and 'ChainerMN needs an MPI runtime' in result.stderr
    assert 'pip install mpich' in result.stderr


@needs_mpiexec
def test_a_bad_communicator_name_under_mpiexec_is_said_once():
    result = run_script(['train.py', '--communicator', 'bogus'], ranks=2)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'train.py: error: Unrecognized communicator: "bogus"; CPU training uses --communicator naive']


@needs_mpiexec
@needs_cifar10
def test_training_on_two_ranks_and_resuming(tmp_path):
    out = str(tmp_path / 'out')
    common = ['train.py', '--train-size', '256', '--test-size', '64', '-b', '64', '--width', '4', '-o', out,
              '--communicator', 'naive']
    first = run_script(common + ['-e', '1'], ranks=2)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count('saved the trained weights') == 1  # rank 0 alone prints and writes
    assert sorted(os.listdir(out)) == ['accuracy.png', 'log', 'loss.png', 'model.npz', 'snapshot_epoch_1']
    # every rank resumes from rank 0's snapshot and the run goes on to epoch 2 only
    second = run_script(common + ['-e', '2'], ranks=2)
    assert second.returncode == 0, second.stderr
    log = json.load(open(os.path.join(out, 'log')))
    assert [entry['epoch'] for entry in log] == [1, 2]
    # 256 images at a global batch of 64: 4 iterations per epoch, each rank taking 32 of 128 images
    assert [entry['iteration'] for entry in log] == [4, 8]
    assert all(np.isfinite(entry['main/loss']) and 0 <= entry['validation/main/accuracy'] <= 1 for entry in log)


def test_a_missing_resume_snapshot_is_a_one_line_error(tmp_path, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(['--resume', str(tmp_path / 'snapshot_epoch_9')])
    assert e.value.code == 2 and 'no such snapshot' in capsys.readouterr().err


@needs_mpiexec
def test_a_global_batch_that_does_not_split_is_refused():
    result = run_script(['train.py', '-b', '65', '--communicator', 'naive'], ranks=2)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ['train.py: error: --batchsize 65 does not split evenly over 2 ranks']


@needs_mpiexec
def test_maps_of_many_images_are_the_same_on_two_ranks(tmp_path):
    """Test images 0-6 (shipped, no dataset needed): one file, bit for bit one process's (the ranks'
    batches are narrower than the one process's, and each has its own share of the cores: an image's map
    is the same in any batch, on any number of threads)."""
    args = ['smoothgrad.py', '--indices', '0:7', '--samples', '6', '--noise', '0', '0.2']
    one = run_script(args + ['--save-maps', str(tmp_path / 'one.npz')])
    two = run_script(args + ['--save-maps', str(tmp_path / 'two.npz')], ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout.count('saved maps') == 1
    a, b = np.load(str(tmp_path / 'one.npz')), np.load(str(tmp_path / 'two.npz'))
    assert a['maps'].shape == (7, 2, 32, 32)
    np.testing.assert_array_equal(a['indices'], np.arange(7))
    for key in ('targets', 'indices', 'labels', 'maps', 'target_probability'):
        np.testing.assert_array_equal(a[key], b[key])
    assert json.loads(str(b['settings']))['ranks'] == 2


@needs_mpiexec
@needs_cifar10
def test_evaluation_tables_are_the_same_on_two_ranks(tmp_path, model_file):
    args = ['evaluate_saliency.py', '--model', model_file, '--images', '2', '--deletion-images', '4',
            '--road-images', '3', '--robustness-images', '2', '--knob-images', '2', '--samples', '2', '--steps', '2',
            '--perturbation-steps', '4', '--sensitivity-samples', '2', '--infidelity-samples', '3',
            '--data-images', '2', '--shard-size', '2',  # deletion in two shards
            '--only', 'sanity', 'data', 'deletion', 'road', 'robustness', 'knobs']  # times per map differ
    one = run_script(args + ['-o', str(tmp_path / 'one')])
    two = run_script(args + ['-o', str(tmp_path / 'two')], ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr

    def tables(folder):
        lines = open(os.path.join(str(tmp_path), folder, 'results.md')).read().splitlines()
        return [line for line in lines if not re.match(r'_\w+: \d+ images, \d+ s on ', line)]  # timing lines differ
    assert tables('one') == tables('two')
    assert '2 ranks' in open(str(tmp_path / 'two' / 'results.md')).read()
    assert 'deletion: shard 2/2 (images 2-3) computed' in two.stdout
    # road's last shard of one image cannot split over two ranks: it joins the first there
    assert sorted(os.listdir(str(tmp_path / 'two' / 'shards'))) == [
        'data-000000-000002.npz', 'deletion-000000-000002.npz', 'deletion-000002-000004.npz', 'road-000000-000003.npz',
        'robustness-000000-000002.npz', 'sanity-000000-000002.npz']
    assert sorted(os.listdir(str(tmp_path / 'two'))) == sorted(os.listdir(str(tmp_path / 'one')))


def test_maps_of_a_folder_in_one_process(tmp_path, capsys):
    from PIL import Image
    import smoothgrad
    folder = tmp_path / 'photos'
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ('b.png', 'a.jpg', 'c.png'):
        Image.fromarray(rng.randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(str(folder / name))
    (folder / 'notes.txt').write_text('not an image')
    out = str(tmp_path / 'maps.npz')
    assert smoothgrad.main(['--folder', str(folder), '--method', 'gradient', '--save-maps', out]) == 0
    saved = np.load(out)
    assert list(saved['files']) == ['a.jpg', 'b.png', 'c.png'] and saved['maps'].shape == (3, 1, 32, 32)
    assert 'labels' not in saved.files and np.all(saved['maps'] >= 0)
    settings = json.loads(str(saved['settings']))
    assert settings['method'] == 'gradient' and settings['ranks'] == 1


@pytest.mark.parametrize('args, message', [
    (['--indices', '0-7'], "argument --indices: expected START:STOP, got '0-7'"),
    (['--indices', '5:3'], 'test indices must satisfy 0 <= START < STOP <= 10000, got 5:3'),
    (['--indices', '0:2', '--method', 'all'], '--method all draws a gallery of one image'),
])
def test_bad_ranges_are_one_line_errors(args, message, capsys):
    import smoothgrad
    try:
        code = smoothgrad.main(args)
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count('\n') == 1
