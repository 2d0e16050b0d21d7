#!/usr/bin/env python
"""SmoothGrad saliency maps for a CIFAR-10 classifier (Smilkov et al. 2017).

    python smoothgrad.py --noise 0.1 --samples 100     # test image #0, as in the blog
    python smoothgrad.py --noise 0 0.1 0.3             # the blog's comparison in one figure
    python smoothgrad.py --image cat.png --label cat   # any image, resized to 32x32

The image is tiled N times, Gaussian noise with stdev = noise * (max(x) - min(x))
is added in the model's [0, 1] input space, the whole batch is backpropagated
at once (in chunks of --batchsize), and |gradient| is summed over samples and
channels into a 32x32 map.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

from sgrad import InputError

DEFAULT_OUT = 'smoothgrad.png'


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (exit code 2), usage left to --help."""

    def error(self, message):
        self.exit(2, '%s: error: %s\n' % (self.prog, message))


def parse_args(argv=None):
    from model import CLASS_NAMES, DEFAULT_MODEL_PATH
    p = OneLineErrorParser(prog='smoothgrad.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument('--index', '-i', type=int, default=0,
                     help='CIFAR-10 test image to explain (default: %(default)s, the blog\'s image)')
    src.add_argument('--image', metavar='PATH', help='explain this PNG/JPEG instead (resized to 32x32)')
    p.add_argument('--label', '-l', metavar='C',
                   help='target class, index 0-9 or name (%s); default: the predicted class'
                   % ', '.join(CLASS_NAMES))
    p.add_argument('--noise', '-n', type=float, nargs='+', default=[0.1], metavar='LEVEL',
                   help='noise level(s) sigma / (max(x) - min(x)); several give one map each (default: 0.1)')
    p.add_argument('--samples', '-s', type=int, default=100, help='noisy samples per map (default: %(default)s)')
    p.add_argument('--batchsize', '-b', type=int, default=None,
                   help='forward/backward at most this many samples at once (default: all)')
    p.add_argument('--objective', choices=('score', 'loss'), default='score',
                   help='score: the class logit S_c (the paper, default); loss: the blog\'s softmax '
                   'cross-entropy, against the true label when --label is not given')
    p.add_argument('--seed', type=int, default=0, help='noise seed (default: %(default)s)')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL_PATH, help='weights saved by train.py')
    p.add_argument('--out', '-o', default=DEFAULT_OUT, help='figure to write (default: %(default)s)')
    p.add_argument('--save-map', metavar='PATH.npy', help='also save the raw maps, shape (len(noise), 32, 32)')
    p.add_argument('--gpu', '-g', type=int, default=-1, help='GPU id, negative for the CPU (default: %(default)s)')
    args = p.parse_args(argv)
    if any(n < 0 for n in args.noise):
        p.error('--noise must be >= 0')
    if args.samples <= 0:
        p.error('--samples must be positive')
    if args.batchsize is not None and args.batchsize <= 0:
        p.error('--batchsize must be positive')
    if args.label is not None:
        args.label = parse_label(p, args.label, CLASS_NAMES)
    for path in (args.out, args.save_map):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error('output folder does not exist: %s' % os.path.dirname(path))
    return args


def parse_label(parser, label, names):
    if label.isdigit() and int(label) < len(names):
        return int(label)
    if label in names:
        return names.index(label)
    parser.error('--label must be 0-%d or a class name, got %r' % (len(names) - 1, label))


def write_atomic(path, write):
    """Call write(file) on a temporary file beside ``path``, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def visualize(saliency_map, percentile=99):
    """PAIR's display: |map| scaled to [0, 1], clipped at the given percentile."""
    m = np.abs(saliency_map)
    vmax = np.percentile(m, percentile)
    return np.clip(m / vmax, 0, 1) if vmax > 0 else np.zeros_like(m)


def draw_figure(f, image, maps, noises, samples, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.4 * (len(maps) + 1), 2.9))
    axes[0].imshow(image.transpose(1, 2, 0))
    axes[0].set_title('input')
    for ax, m, noise in zip(axes[1:], maps, noises):
        ax.imshow(visualize(m), cmap='gray', vmin=0, vmax=1)
        ax.set_title('noise %g%%' % (100 * noise))
    for ax in axes:
        ax.axis('off')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(f, format='png', dpi=100)
    plt.close(fig)


def progress_bar(done, total):
    if sys.stderr.isatty():
        width = 30
        filled = width * done // total
        sys.stderr.write('\r[%s%s] %d/%d samples' % ('#' * filled, '.' * (width - filled), done, total))
        if done == total:
            sys.stderr.write('\n')


def load_input(args):
    """The image to explain, its true label (None for a file) and a description."""
    from sgrad.data import load_image_file, load_test_image
    if args.image:
        x, size = load_image_file(args.image)
        if size != (32, 32):
            print('note: %s is %dx%d, resized to 32x32' % (args.image, size[0], size[1]))
        return x, None, os.path.basename(args.image)
    x, label = load_test_image(args.index)
    return x, label, 'CIFAR-10 test #%d' % args.index


def run(args):
    import chainer
    from model import CLASS_NAMES, load_model
    from sgrad.saliency import GradientEngine, SmoothGrad

    x, true_label, name = load_input(args)
    model = load_model(args.model)
    device = chainer.get_device(args.gpu if args.gpu >= 0 else '@numpy')
    model.to_device(device)
    engine = GradientEngine(model, args.objective, args.batchsize)

    probs = engine.probabilities(x[None])[0]
    top = np.argsort(probs)[::-1][:3]
    truth = ' (true class: %s)' % CLASS_NAMES[true_label] if true_label is not None else ''
    print('%s%s, top-3 predictions: %s' % (name, truth, ', '.join(
        '%s %.1f%%' % (CLASS_NAMES[c], 100 * probs[c]) for c in top)))
    target = top[0] if args.label is None else args.label
    if args.objective == 'loss' and args.label is None and true_label is not None:
        target = true_label  # the blog's loss is taken against the true label

    total = len(args.noise) * args.samples
    maps = []
    for i, noise in enumerate(args.noise):
        engine.progress = lambda done, n, base=i * args.samples: progress_bar(base + done, total)
        maps.append(SmoothGrad(engine)(x, target, noise, args.samples, np.random.RandomState(args.seed)))
    maps = np.stack(maps)

    title = '%s: %s of class "%s" (p=%.2f), N=%d' % (
        name, 'SmoothGrad of S_c' if args.objective == 'score' else 'SmoothGrad of the loss',
        CLASS_NAMES[target], probs[target], args.samples)
    if args.save_map:
        write_atomic(args.save_map, lambda f: np.save(f, maps))
        print('saved maps %s to %s' % (maps.shape, args.save_map))
    write_atomic(args.out, lambda f: draw_figure(f, x, maps, args.noise, args.samples, title))
    print('saved the figure to %s' % args.out)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print('smoothgrad.py: error: %s' % e, file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
