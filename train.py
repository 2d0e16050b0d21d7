#!/usr/bin/env python
"""Train model.py's CifarNet on CIFAR-10 (Chainer Trainer idiom).

    python train.py                         # full run, weights -> result/model.npz
    python train.py --train-size 512 -e 1   # quick smoke run (also -> result/model.npz)
    python smoothgrad.py --model result/model.npz        # explain the model just trained
    python train.py --evaluate sgrad/shipped/cifarnet.npz
    python train.py --ship                  # full run that replaces the shipped model
    python train.py --random-labels 1 --train-size 5000 --no-augment -o result_random   # memorise noise

--random-labels SEED trains on the training labels permuted by that seed: the model of the data
randomization check (Adebayo et al. 2018), which can only memorise its training images.

The shipped sgrad/shipped/cifarnet.npz is replaced only with --ship, which also measures
the new model on the whole test set and records that accuracy in
sgrad/shipped/cifarnet.json beside it.

Past one process (ChainerMN, data parallel; the global batch --batchsize is split over the ranks):

    mpiexec -n 2 python train.py --communicator naive

CIFAR-10 comes from the unchanged chainer.datasets.get_cifar10(); set
CHAINER_DATASET_ROOT to a folder holding pfnet/chainer/cifar/cifar-10.npz to
use a local copy instead of downloading it.
"""
import argparse
import glob
import json
import os
import re
import shlex
import sys

from sgrad import parallel
parallel.share_cores()  # under mpiexec: BLAS threads per rank, before NumPy loads

import matplotlib  # noqa: E402
matplotlib.use('Agg')

import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
import chainermn  # noqa: E402  (ships with chainer; MPI is loaded only for a communicator)
import numpy as np  # noqa: E402
from chainer import training  # noqa: E402
from chainer.training import extensions  # noqa: E402

from model import CLASS_NAMES, CifarNet, DEFAULT_MODEL_PATH, load_model  # noqa: E402
from sgrad.cifarnet import RANDOM_LABELS_MODEL_PATH  # noqa: E402
from sgrad.cli import (OneLineErrorParser, finite_float, get_device, keep_freed_memory,  # noqa: E402
                       write_atomic)
from sgrad.errors import InputError, WEIGHTS_ERRORS  # noqa: E402
from sgrad.data import load_cifar10  # noqa: E402


def random_crop_flip(rng, pad=4):
    """Standard CIFAR augmentation: random crop of a zero-padded image, random horizontal flip."""
    def transform(example):
        x, t = example
        c, h, w = x.shape
        padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
        padded[:, pad:pad + h, pad:pad + w] = x
        top, left = rng.randint(0, 2 * pad + 1, size=2)
        x = padded[:, top:top + h, left:left + w]
        if rng.randint(2):
            x = x[:, :, ::-1]
        return np.ascontiguousarray(x), t
    return transform


def permuted_labels(dataset, seed):
    """The (image, label) pairs of ``dataset`` with the labels permuted by RandomState(seed): the same
    images and the same number of each class, no label tied to its image any more."""
    images, labels = chainer.dataset.concat_examples(dataset)
    return chainer.datasets.TupleDataset(images, labels[np.random.RandomState(seed).permutation(len(labels))])


class RunSettings(training.Extension):
    """The settings that decide what a run learns (which images, which labels, which augmentation, the
    network's width), kept in its snapshots: resuming a snapshot under other settings is refused, naming
    them, not a run that silently learns something else."""

    trigger = (1, 'epoch')

    def __init__(self, settings):
        self.settings = settings

    def __call__(self, trainer):
        pass

    def serialize(self, serializer):
        if not isinstance(serializer, chainer.serializer.Deserializer):
            serializer('settings', np.frombuffer(json.dumps(self.settings, sort_keys=True).encode(), np.uint8))
            return
        stored = json.loads(bytes(serializer('settings', None)).decode())
        changed = sorted(key for key in self.settings if stored.get(key) != self.settings[key])
        if changed:
            raise ValueError(', '.join('--%s was %s, now %s' % (key.replace('_', '-'), stored.get(key),
                                                                self.settings[key]) for key in changed))


def label_smoothing_cross_entropy(eps):
    """Softmax cross-entropy against (1 - eps) one-hot + eps uniform targets."""
    def lossfun(y, t):
        log_p = F.log_softmax(y)
        nll = -F.select_item(log_p, t)
        return F.mean((1 - eps) * nll - eps * F.mean(log_p, axis=1))
    return lossfun


def one_cycle_lr(peak, total_iterations, warmup_fraction=0.25):
    """Linear warm-up from 0 to ``peak``, then linear decay to 0 (stateless, so --resume is exact)."""
    warmup = max(1, int(total_iterations * warmup_fraction))

    @training.make_extension(trigger=(1, 'iteration'), priority=training.PRIORITY_WRITER)
    def set_lr(trainer):
        it = trainer.updater.iteration
        if it < warmup:
            lr = peak * it / warmup
        else:
            lr = peak * max(0., (total_iterations - it) / (total_iterations - warmup))
        trainer.updater.get_optimizer('main').lr = lr
    return set_lr


def mean_over_ranks(comm, keys):
    """Each iteration, replace the observed ``keys`` by their mean over the ranks, so that the log
    reports the global batch (ChainerMN's ObservationAggregator fails on CPUs without ChainerX)."""
    @training.make_extension(trigger=(1, 'iteration'), priority=training.PRIORITY_EDITOR)
    def aggregate(trainer):
        values = np.array([float(trainer.observation[key].array) for key in keys])
        for key, mean in zip(keys, comm.allreduce_obj(values) / comm.size):
            trainer.observation[key] = mean
    return aggregate


def save_npz_atomic(path, model):
    """save_npz through a temporary file and a rename: never a half-written model."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: chainer.serializers.save_npz(f, model))


def ship(model, test, device, argv, train=None):
    """Replace the shipped weights and their record (the .json beside them) with this model's, the accuracy
    measured on the whole test set: the real model's (sgrad/shipped/cifarnet.npz), or, given the training set
    of a --random-labels run, the data randomization check's (cifarnet_random_labels.npz), whose record also
    says how much of that training set it memorised."""
    inference = model.inference_copy()
    path = DEFAULT_MODEL_PATH if train is None else RANDOM_LABELS_MODEL_PATH
    accuracy, confusion = evaluate(inference, test, 500, device)
    record = {'command': 'python train.py ' + ' '.join(shlex.quote(a) for a in argv),
              'test_accuracy': round(float(accuracy), 4), 'test_images': int(confusion.sum()),
              'evaluated_with': 'python train.py --evaluate %s' % os.path.relpath(path, os.path.dirname(
                  os.path.abspath(__file__)))}
    if train is not None:
        record.update(training_accuracy=round(float(evaluate(inference, train, 500, device)[0]), 4),
                      training_images=len(train), training_labels='permuted (--random-labels)')
    save_npz_atomic(path, model)
    text = json.dumps(record, indent=2) + '\n'
    write_atomic(shipped_record_path(path), lambda f: f.write(text.encode()))
    print('replaced the shipped model %s (test accuracy %.2f%%%s)' % (
        path, 100 * accuracy, '' if train is None else ', %.2f%% of its %d training labels memorised'
        % (100 * record['training_accuracy'], len(train))))


#: The trainer's snapshots in --out, one per epoch (the latest is kept).
SNAPSHOT_PREFIX = 'snapshot_epoch_'
SNAPSHOT_NAME = SNAPSHOT_PREFIX + '{.updater.epoch}'


def latest_snapshot(out):
    """The snapshot of the latest epoch in the folder ``out``, or None: where a rerun resumes."""
    epochs = {int(m.group(1)): path for path in glob.glob(os.path.join(glob.escape(out), SNAPSHOT_PREFIX + '*'))
              for m in [re.search(re.escape(SNAPSHOT_PREFIX) + r'(\d+)$', path)] if m}
    return epochs[max(epochs)] if epochs else None


def resume(trainer, f, path, epochs, advice=''):
    """Load the snapshot ``f`` (the bytes of the file ``path``; None: an empty file) into ``trainer`` and
    return its epoch. An InputError in one line, ending in ``advice``, if it is no snapshot, or one of
    a run with other settings or past ``epochs``."""
    try:  # without allow_pickle: a file that is no .npz is refused, and none of its pickles is run
        is_snapshot = f is not None and 'updater/iteration' in getattr(np.load(f), 'files', ())
    except WEIGHTS_ERRORS + (EOFError,):
        is_snapshot = False
    if not is_snapshot:
        raise InputError('%s is not a snapshot of train.py (those are the %s* files in its --out folder)'
                         % (path, SNAPSHOT_PREFIX))
    f.seek(0)
    try:
        chainer.serializers.load_npz(f, trainer)
    except (KeyError, ValueError, TypeError) as e:  # a missing entry, or an array of another shape
        raise InputError('%s is of a run with other settings (--train-size, --random-labels, --no-augment, --width '
                         'or the number of processes) and cannot be resumed (%s)%s'
                         % (path, str(e).strip("'").splitlines()[0], advice))
    epoch = trainer.updater.epoch
    if epoch > epochs:
        raise InputError('%s is of a run already past --epoch %d (at epoch %d)%s' % (path, epochs, epoch, advice))
    return epoch


class WithoutCursorCodes:
    """A stream that drops the terminal's cursor codes written to it: Chainer's PrintReport starts each
    line with ESC[J (to clear the ProgressBar below it) even when its output is a file or a pipe."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        return self.stream.write(re.sub(r'\x1b\[\d*[A-Za-z]', '', text))

    def flush(self):
        self.stream.flush()


def error_line(error):
    """Report an InputError in one line on stderr, once under mpiexec (every rank meets it); exit code 2."""
    if parallel.is_first_rank():
        print('train.py: error: %s' % error, file=sys.stderr)
    return 2


def shipped_record_path(path=None):
    """The record beside shipped weights (default: the real model's)."""
    return os.path.splitext(path or DEFAULT_MODEL_PATH)[0] + '.json'


def evaluate(model, dataset, batchsize, device):
    """Accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    confusion = np.zeros((10, 10), dtype=np.int64)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, len(dataset), batchsize):
            x, t = chainer.dataset.concat_examples(
                dataset[start:start + batchsize], device)
            pred = chainer.backend.CpuDevice().send(model(x).array.argmax(axis=1))
            np.add.at(confusion, (chainer.backend.CpuDevice().send(t), pred), 1)
    return np.trace(confusion) / confusion.sum(), confusion


def print_evaluation(accuracy, confusion):
    print('test accuracy: %.2f%% (%d / %d)' % (100 * accuracy, np.trace(confusion), confusion.sum()))
    print('%-12s %8s   %s' % ('class', 'accuracy', 'most confused with'))
    for c, name in enumerate(CLASS_NAMES):
        row = confusion[c].copy()
        per_class = row[c] / max(1, row.sum())
        row[c] = -1
        print('%-12s %7.1f%%   %s (%d)' % (name, 100 * per_class, CLASS_NAMES[row.argmax()], row.max()))


def parse_args(argv=None):
    p = OneLineErrorParser(prog='train.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batchsize', '-b', type=int, default=128, help='minibatch size (default: %(default)s)')
    p.add_argument('--epoch', '-e', type=int, default=16, help='epochs to train (default: %(default)s)')
    p.add_argument('--gpu', '-g', type=int, default=-1, help='GPU id, negative for the CPU (default: %(default)s)')
    p.add_argument('--out', '-o', default='result',
                   help='folder for logs, plots and snapshots (default: %(default)s)')
    p.add_argument('--resume', '-r', default='',
                   help='resume from this snapshot (the latest one in --out is picked up by itself)')
    p.add_argument('--seed', type=int, default=0, help='random seed for weights, shuffling and augmentation')
    p.add_argument('--model-out', help='where the final weights go (default: OUT/model.npz)')
    p.add_argument('--ship', action='store_true',
                   help='also replace the shipped model (%s) and its accuracy record (cifarnet.json), '
                   'measured on the whole test set' % os.path.relpath(DEFAULT_MODEL_PATH))
    p.add_argument('--width', type=int, default=16,
                   help='channels of the first layer; stages use 2x, 4x, 8x (default: %(default)s)')
    p.add_argument('--lr', type=finite_float, default=0.2,
                   help='peak learning rate of the one-cycle schedule (default: %(default)s)')
    p.add_argument('--weight-decay', type=finite_float, default=5e-4,
                   help='L2 weight decay coefficient (default: %(default)s)')
    p.add_argument('--label-smoothing', type=finite_float, default=0.1,
                   help='weight of the uniform target in the loss (default: %(default)s)')
    p.add_argument('--train-size', type=int, default=0,
                   help='train on the first N images only, for quick runs (default 0: all 50,000)')
    p.add_argument('--test-size', type=int, default=0,
                   help='evaluate on the first N test images only (default 0: all 10,000)')
    p.add_argument('--communicator', metavar='NAME',
                   help='ChainerMN communicator for data-parallel training under mpiexec (naive on CPUs; '
                   'default: naive when mpiexec starts more than one process, else one plain process)')
    p.add_argument('--random-labels', type=int, metavar='SEED',
                   help='train on the training labels permuted by this seed (the data randomization check)')
    p.add_argument('--no-augment', action='store_true',
                   help='no random crops and flips (memorising random labels is slow with them)')
    p.add_argument('--evaluate', metavar='MODEL', help='only print test accuracy and per-class table of MODEL')
    args = p.parse_args(argv)
    for name in ('batchsize', 'epoch', 'width'):
        if getattr(args, name) <= 0:
            p.error('--%s must be positive' % name)
    if args.train_size < 0 or args.test_size < 0:
        p.error('--train-size and --test-size must be >= 0')
    if args.lr <= 0 or args.weight_decay < 0 or not 0 <= args.label_smoothing < 1:
        p.error('need --lr > 0, --weight-decay >= 0 and 0 <= --label-smoothing < 1')
    if args.ship and args.test_size:
        p.error('--ship records the accuracy on the whole test set: drop --test-size')
    if args.resume and not os.path.isfile(args.resume):
        p.error('--resume: no such snapshot: %s' % args.resume)
    if args.model_out is None:
        args.model_out = os.path.join(args.out, 'model.npz')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.evaluate and parallel.launched_ranks() > 1:
            raise InputError('--evaluate runs in one process, not under mpiexec')
        comm = None if args.evaluate else parallel.create_communicator(args.communicator)
        if comm is not None and args.batchsize % comm.size:
            raise InputError('--batchsize %d does not split evenly over %d ranks'
                             % (args.batchsize, comm.size))
        device = get_device(args.gpu)
        model = load_model(args.evaluate) if args.evaluate else None
        train, test = load_cifar10()
        for flag, size, dataset, name in (('train', args.train_size, train, 'training'),
                                          ('test', args.test_size, test, 'test')):
            if size > len(dataset):
                raise InputError('--%s-size %d is more than the %s %s images (0 takes them all)'
                                 % (flag, size, format(len(dataset), ','), name))
    except InputError as e:
        return error_line(e)
    if args.test_size:
        test = test[:args.test_size]

    if args.evaluate:
        model = model.inference_copy()  # BatchNorm folded: same predictions, faster
        model.to_device(device)
        print_evaluation(*evaluate(model, test, 500, device))
        return 0

    if args.train_size:
        train = train[:args.train_size]
    if args.random_labels is not None:
        train = permuted_labels(train, args.random_labels)
    learned = train  # the whole training set, which --ship of a --random-labels run measures
    first_rank = parallel.is_root(comm)
    batchsize = args.batchsize
    if comm is not None:
        # each rank trains on its shard at its share of the global batch; the multi-node optimizer
        # averages the ranks' gradients, which is the gradient of the global batch
        batchsize //= comm.size
        train = chainermn.scatter_dataset(train, comm, shuffle=True, seed=args.seed)
        shard = chainermn.scatter_dataset(test, comm)
    np.random.seed(args.seed)  # the weights: the same on every rank
    rng = np.random.RandomState(args.seed + (comm.rank if comm else 0))  # augmentation and order
    device.use()
    model = CifarNet(width=args.width)
    model.to_device(device)
    classifier = L.Classifier(model, lossfun=label_smoothing_cross_entropy(args.label_smoothing))

    optimizer = chainer.optimizers.MomentumSGD(lr=0., momentum=0.9)
    if comm is not None:
        optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
    optimizer.setup(classifier)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(args.weight_decay))

    train_iter = chainer.iterators.SerialIterator(
        train if args.no_augment else chainer.datasets.TransformDataset(train, random_crop_flip(rng)), batchsize,
        order_sampler=chainer.iterators.ShuffleOrderSampler(rng))
    test_iter = chainer.iterators.SerialIterator(test if comm is None else shard, 500, repeat=False,
                                                 shuffle=False)

    updater = training.updaters.StandardUpdater(train_iter, optimizer, device=device)
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)
    total_iterations = args.epoch * -(-len(train) // batchsize)

    trainer.extend(one_cycle_lr(args.lr, total_iterations))
    trainer.extend(RunSettings({key: getattr(args, key) for key in ('train_size', 'random_labels', 'no_augment',
                                                                      'width')}))
    evaluator = extensions.Evaluator(test_iter, classifier, device=device)
    if comm is not None:
        evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)
        # BatchNorm's running statistics: the ranks' average, before each evaluation and snapshot
        trainer.extend(chainermn.extensions.AllreducePersistent(model, comm), trigger=(1, 'epoch'))
        trainer.extend(mean_over_ranks(comm, ('main/loss', 'main/accuracy')))
    trainer.extend(evaluator)
    tty = sys.stdout.isatty()
    if first_rank:
        trainer.extend(extensions.snapshot(filename=SNAPSHOT_NAME, n_retains=1), trigger=(1, 'epoch'))
        trainer.extend(extensions.LogReport(trigger=(1, 'epoch')))
        trainer.extend(extensions.observe_lr(), trigger=(1, 'epoch'))
        trainer.extend(extensions.PlotReport(['main/loss', 'validation/main/loss'], 'epoch', filename='loss.png'))
        trainer.extend(extensions.PlotReport(['main/accuracy', 'validation/main/accuracy'], 'epoch',
                                             filename='accuracy.png'))
        trainer.extend(extensions.PrintReport(['epoch', 'main/loss', 'validation/main/loss', 'main/accuracy',
                                               'validation/main/accuracy', 'lr', 'elapsed_time'],
                                              out=sys.stdout if tty else WithoutCursorCodes(sys.stdout)))

    path = args.resume or latest_snapshot(args.out)  # rank 0's path is the one read
    snapshot = parallel.broadcast_file(path, comm)
    finished = False
    if snapshot is not None or args.resume:
        # a snapshot found in --out by itself: say how to start anew instead
        anew = '' if args.resume else '; to train anew, give another --out or delete %s' % args.out
        try:
            epoch = resume(trainer, snapshot, path, args.epoch, anew)
        except InputError as e:
            return error_line(e)
        finished = epoch == args.epoch
        if first_rank and finished:
            print('%s is of a run that already finished (epoch %d of --epoch %d): nothing to train, saving its '
                  'weights again (a larger --epoch trains it further%s)' % (path, epoch, args.epoch, anew))
        elif first_rank:
            print('resuming from %s (epoch %d)' % (path, epoch))
    if first_rank and tty:
        # a bar redrawn in place is for a terminal only. Added after the snapshot is loaded: it has no
        # state to resume, and a snapshot of a run whose output was a file has none for it
        trainer.extend(extensions.ProgressBar(update_interval=10))
    if not finished:
        trainer.run()

    if first_rank:
        save_npz_atomic(args.model_out, model)
        print('saved the trained weights to %s (explain them: python smoothgrad.py --model %s)'
              % (args.model_out, args.model_out))
        if args.ship:
            ship(model, test, device, argv, None if args.random_labels is None else learned)  # no --test-size
    return 0


if __name__ == '__main__':
    keep_freed_memory()
    sys.exit(main())
