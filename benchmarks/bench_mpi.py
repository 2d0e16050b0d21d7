#!/usr/bin/env python
"""One process against `mpiexec -n 2` (ChainerMN, naive communicator), each script as a user runs it.

    python benchmarks/bench_mpi.py          # with CHAINER_DATASET_ROOT set (docs/setup.md)

1. Training: `train.py` on the first --train-images images at the recipe's global batch 128
   (64 per rank on 2 ranks), images/s of its steady epochs (epochs 2..--epochs, from the
   elapsed times in its log: the start-up and the first epoch's warm-up left out).
2. Evaluation: `evaluate_saliency.py --only deletion` on --eval-images test images, images/s of the
   whole command.
3. Maps: `smoothgrad.py --indices 0:--map-images` (SmoothGrad, N=100), maps/s of the whole command.
Beside them, the single-process training rate of the PyTorch peer of benchmarks/bench_peer.py
(skipped with a message without torch). The variants run one after another, --rounds times, and
each number is the median over the rounds. Run it on a quiet machine: nothing else running.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sgrad  # noqa: E402  (before NumPy: picks OpenBLAS's kernels, as the scripts do)

import numpy as np  # noqa: E402


def command(ranks, script_args):
    """A project script in one plain process (ranks 1) or under mpiexec."""
    python = [sys.executable] + script_args
    if ranks == 1:
        return python
    mpiexec = shutil.which('mpiexec', path=os.path.dirname(sys.executable)) or 'mpiexec'
    return [mpiexec, '-n', str(ranks)] + python + ['--communicator', 'naive']


def timed(args):
    """Run a command in the project's folder; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, MPLBACKEND='Agg'))
    return time.perf_counter() - start


def training_rate(ranks, images, epochs):
    with tempfile.TemporaryDirectory() as out:
        timed(command(ranks, ['train.py', '--train-size', str(images), '--test-size', '100', '-e', str(epochs),
                              '-o', out]))
        elapsed = [entry['elapsed_time'] for entry in json.load(open(os.path.join(out, 'log')))]
    return images * (epochs - 1) / (elapsed[-1] - elapsed[0])


def evaluation_rate(ranks, images):
    with tempfile.TemporaryDirectory() as out:
        return images / timed(command(ranks, ['evaluate_saliency.py', '--only', 'deletion', '--deletion-images',
                                              str(images), '-o', out]))


def map_rate(ranks, images):
    with tempfile.TemporaryDirectory() as out:
        return images / timed(command(ranks, ['smoothgrad.py', '--indices', '0:%d' % images, '--samples', '100',
                                              '--save-maps', os.path.join(out, 'maps.npz')]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--train-images', type=int, default=6400)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--eval-images', type=int, default=48)
    p.add_argument('--map-images', type=int, default=100, help='at most 100: the shipped test images')
    p.add_argument('--rounds', type=int, default=1)
    args = p.parse_args()

    rates = {}  # (task, ranks) -> images/s of each round
    tasks = {'training (train.py)': lambda r: training_rate(r, args.train_images, args.epochs),
             'evaluation (evaluate_saliency.py --only deletion)': lambda r: evaluation_rate(r, args.eval_images),
             'maps (smoothgrad.py --indices, N=100)': lambda r: map_rate(r, args.map_images)}
    for _ in range(args.rounds):
        for task, rate in tasks.items():
            for ranks in (1, 2):
                rates.setdefault((task, ranks), []).append(rate(ranks))

    cores = len(os.sched_getaffinity(0))
    print('%d cores, OpenBLAS kernels: %s; one process: BLAS on all cores; 2 ranks: %s BLAS thread(s) each '
          '(sgrad.parallel)' % (cores, sgrad.blas.blas_kernels(), os.environ.get('OMP_NUM_THREADS', max(1, cores // 2))))
    print('%-52s %12s %12s %8s' % ('images/s (median of %d round(s))' % args.rounds, '1 process', '2 ranks',
                                   'speed-up'))
    for task in tasks:
        one, two = (float(np.median(rates[task, ranks])) for ranks in (1, 2))
        print('%-52s %12.2f %12.2f %7.2fx' % (task, one, two, two / one))

    from bench_peer import torch_peer, torch_training_rate
    from model import CifarNet
    peer = torch_peer(CifarNet())
    if peer:
        xb = np.random.RandomState(1).rand(128, 3, 32, 32).astype(np.float32)
        tb = np.random.RandomState(2).randint(0, 10, 128).astype(np.int32)
        torch_rate = torch_training_rate(peer[0], 16, xb, tb, 7)
        two = float(np.median(rates['training (train.py)', 2]))
        print('PyTorch peer, one process, training step at batch 128 (bench_peer.py): %.1f images/s; '
              'train.py on 2 ranks: %.2fx of it' % (torch_rate, two / torch_rate))


if __name__ == '__main__':
    main()
