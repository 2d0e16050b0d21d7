#!/usr/bin/env python
"""Do the maps mean something? Sanity checks and faithfulness on real CIFAR-10, or on photographs.

    python evaluate_saliency.py --images 100 --deletion-images 500     # the full study
    python evaluate_saliency.py --images 8 --deletion-images 16 --knob-images 4   # a quick look
    python evaluate_saliency.py --model efficientnet-lite0 -o docs/evaluation_imagenet   # the photographs

1. Cascading model randomization (Adebayo et al. 2018): the layers' weights are re-drawn from
   the logits down (a model's RANDOMIZATION_STAGES, or else the links its forward calls, in
   reverse); after each step, the Spearman rank correlation (of |map|, and of the signed
   map for signed methods) and the SSIM between the trained and the randomized model's maps,
   averaged over the first --images test images.
2. Deletion and insertion (Petsiuk et al. 2018): the target-class probability as the most salient
   pixels are blacked out (deletion) or replaced by a blurred copy (blurred deletion), lower area
   is better, or copied onto a blurred image (insertion, higher is better), over --deletion-images
   test images. Pixels are ordered by |map|, and also by the signed map (most positive first) for
   signed methods, with a random order as baseline.
3. SmoothGrad's two knobs: noise level (the three areas above) and sample count (stability: the
   rank correlation of two maps from independent noise draws), with picture grids.

Tables go to stdout and OUT_DIR/results.md, plots to OUT_DIR. The target class is the trained
model's prediction. A 32x32 model (CifarNet) is measured on the CIFAR-10 test set, which needs a
local copy (CHAINER_DATASET_ROOT); any other on the photographs of --photos (data/photos), as
many as there are.
"""
import argparse
import os
import sys
import time

import numpy as np

from sgrad import InputError, OneLineErrorParser, keep_freed_memory, progress_bar, write_atomic


NOISE_LEVELS = (0., 0.05, 0.1, 0.2, 0.3, 0.5)
SAMPLE_COUNTS = (1, 5, 10, 25, 50, 100, 200)
#: The curves of sgrad.metrics.perturbation_curves, and which way their area is better.
BETTER_AREA = {'deletion': 'lower', 'blurred deletion': 'lower', 'insertion': 'higher'}
AREA_HEADERS = ['%s AUC (%s is better)' % item for item in BETTER_AREA.items()]


def make_methods(engine, samples, steps):
    """name -> method: every method of the project, SmoothGrad being SmoothGrad of the gradient."""
    from sgrad.saliency import METHODS, Gradient, SmoothGrad, make_method
    methods = {name: make_method(name, engine, steps) for name in METHODS}
    methods['smoothgrad'] = SmoothGrad(Gradient(engine), 0.1, samples, 'sum_abs', np.random.RandomState(0))
    return methods


def maps_of(method, images, targets):
    """|map| and signed map (None for unsigned methods), each (N, H, W)."""
    from sgrad.saliency import channel_sum_abs
    attribution = method.attribute(images, targets)
    return channel_sum_abs(attribution), attribution.sum(axis=1) if method.signed else None


class Report:
    """Prints tables and collects them for results.md."""

    def __init__(self, out_dir):
        self.out_dir, self.lines = out_dir, []

    def table(self, title, header, rows):
        text = ['### ' + title, '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        text += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
        print('\n'.join(text) + '\n')
        self.lines += text + ['']

    def figure(self, name):
        import matplotlib.pyplot as plt
        write_atomic(os.path.join(self.out_dir, name),
                     lambda f: plt.savefig(f, format='png', dpi=100, bbox_inches='tight'))
        plt.close('all')
        self.lines += ['![%s](%s)' % (name, name), '']

    def save(self):
        text = '\n'.join(self.lines) + '\n'
        write_atomic(os.path.join(self.out_dir, 'results.md'), lambda f: f.write(text.encode()))


def sanity_check(args, model, images, targets, report):
    import matplotlib.pyplot as plt
    from sgrad.metrics import cascading_randomization, randomization_stages, spearman, ssim
    from sgrad.saliency import GradientEngine
    cascade = randomization_stages(model, images[:1])
    stages = ('trained',) + tuple(label for label, _ in cascade)
    progress = lambda done: progress_bar(done, len(stages), 'models mapped (trained, then randomized)')
    progress(0)
    trained = {name: maps_of(m, images, targets)
               for name, m in make_methods(GradientEngine(model, batchsize=args.batchsize),
                                           args.samples, args.steps).items()}
    progress(1)

    def similarity(maps_a, maps_b):
        """Mean over images of Spearman(|map|), Spearman(signed map) (None if unsigned), SSIM(|map|)."""
        (abs_a, signed_a), (abs_b, signed_b) = maps_a, maps_b
        return (np.mean([spearman(a, b) for a, b in zip(abs_a, abs_b)]),
                np.mean([spearman(a, b) for a, b in zip(signed_a, signed_b)]) if signed_a is not None else None,
                np.mean([ssim(a, b) for a, b in zip(abs_a, abs_b)]))

    curves = {name: [similarity(maps, maps)] for name, maps in trained.items()}
    randomized_models = cascading_randomization(model, cascade, args.seed)
    for done, (_, randomized) in enumerate(randomized_models, start=2):
        methods = make_methods(GradientEngine(randomized, batchsize=args.batchsize), args.samples, args.steps)
        randomized_maps = {name: maps_of(method, images, targets) for name, method in methods.items()}
        for name, maps in randomized_maps.items():
            curves[name].append(similarity(trained[name], maps))
        progress(done)
    # Control: the fully randomized model's map of the *next* image. The same-image correlation
    # beyond this level comes from the image; up to it, from a pattern the method draws everywhere.
    other_image = {name: similarity(trained[name], [None if m is None else np.roll(m, 1, axis=0) for m in maps])
                   for name, maps in randomized_maps.items()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in curves.items():
        axes[0].plot(stages, [v[0] for v in values], marker='o', label=name)
        axes[1].plot(stages, [v[2] for v in values], marker='o', label=name)
    for ax, label in zip(axes, ('Spearman rank correlation of |map|', 'SSIM of |map|')):
        ax.set_xlabel('randomized from the logits down to')
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.tick_params(axis='x', labelrotation=30)
        plt.setp(ax.get_xticklabels(), horizontalalignment='right')
    axes[1].legend(fontsize=8)
    fig.suptitle('Cascading randomization, %d images' % len(images))
    cell = lambda v: '%.2f / %s / %.2f' % (v[0], '-' if v[1] is None else '%.2f' % v[1], v[2])
    report.table('Cascading randomization: Spearman |map| / Spearman signed / SSIM, mean over %d images'
                 % len(images), ['method'] + list(stages[1:]) + ['%s, next image (control)' % stages[-1]],
                 [[name] + [cell(v) for v in values[1:]] + [cell(other_image[name])]
                  for name, values in curves.items()])
    report.figure('sanity_randomization.png')


def auc_cells(curves):
    """The area under each kind of perturbation curve as 'mean ± standard error' table cells."""
    from sgrad.metrics import area_under_curve
    areas = [area_under_curve(curves[kind]) for kind in BETTER_AREA]
    return ['%.3f ± %.3f' % (a.mean(), a.std() / np.sqrt(len(a))) for a in areas]


def deletion_insertion(args, model, images, targets, report):
    import matplotlib.pyplot as plt
    from sgrad.metrics import perturbation_curves
    from sgrad.saliency import GradientEngine
    engine = GradientEngine(model, batchsize=args.batchsize)
    methods = make_methods(engine, args.samples, args.steps)
    # each method's maps, then the curves of every ordering: |map|, the signed map and random
    steps = 2 * len(methods) + sum(m.signed for m in methods.values()) + 1
    progress = lambda done: progress_bar(done, steps, 'steps (maps, then curves)')
    orderings = []  # (label, maps, line style)
    for done, (name, method) in enumerate(methods.items()):
        progress(done)
        abs_maps, signed_maps = maps_of(method, images, targets)
        orderings.append((name, abs_maps, dict(color='C%d' % done)))
        if signed_maps is not None:  # evidence for the class first, evidence against it last
            orderings.append((name + ' (signed)', signed_maps, dict(color='C%d' % done, linestyle='--')))
    random_maps = np.random.RandomState(args.seed).rand(*abs_maps.shape)
    orderings.append(('random (baseline)', random_maps, dict(color='black', linestyle=':')))
    rows, fig = [], plt.figure(figsize=(17, 4))
    axes = dict(zip(BETTER_AREA, fig.subplots(1, len(BETTER_AREA))))
    fraction = np.linspace(0, 1, args.perturbation_steps + 1)
    for done, (name, maps, style) in enumerate(orderings, start=len(methods)):
        progress(done)
        curves = perturbation_curves(engine, images, maps, targets, args.perturbation_steps)
        rows.append([name] + auc_cells(curves))
        for kind, ax in axes.items():
            ax.plot(fraction, curves[kind].mean(axis=0), label=name, **style)
    progress(steps)
    for kind, ax in axes.items():
        ax.set_xlabel('fraction of pixels')
        ax.set_ylabel('probability of the target class')
        ax.set_title('%s (%s is better)' % (kind, BETTER_AREA[kind]))
        ax.grid(True, alpha=0.3)
    axes['insertion'].legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
    report.table('Deletion and insertion AUC over %d images (mean ± s.e.)' % len(images),
                 ['pixel order'] + AREA_HEADERS, rows)
    report.figure('deletion_insertion.png')


def knobs(args, model, images, targets, report):
    import matplotlib.pyplot as plt
    from sgrad.metrics import perturbation_curves, spearman
    from sgrad.saliency import Gradient, GradientEngine, SmoothGrad
    engine = GradientEngine(model, batchsize=args.batchsize)

    def smoothgrad_maps(noise, samples, seed):
        method = SmoothGrad(Gradient(engine), noise, samples, 'sum_abs', np.random.RandomState(seed))
        return maps_of(method, images, targets)[0]

    steps = len(NOISE_LEVELS) + len(SAMPLE_COUNTS)
    progress = lambda done: progress_bar(done, steps, 'settings (noise levels, then sample counts)')
    noise_maps, rows = {}, []
    for done, noise in enumerate(NOISE_LEVELS):
        progress(done)
        noise_maps[noise] = maps = smoothgrad_maps(noise, args.samples, args.seed)
        curves = perturbation_curves(engine, images, maps, targets, args.perturbation_steps)
        rows.append(['%g%%' % (100 * noise)] + auc_cells(curves))
    report.table('Noise level: SmoothGrad (N=%d) over %d images' % (args.samples, len(images)),
                 ['noise'] + AREA_HEADERS, rows)
    sample_maps, rows = {}, []
    for done, samples in enumerate(SAMPLE_COUNTS, start=len(NOISE_LEVELS)):
        progress(done)
        a, b = smoothgrad_maps(0.1, samples, args.seed), smoothgrad_maps(0.1, samples, args.seed + 1)
        sample_maps[samples] = a
        rows.append([samples, '%.3f' % np.mean([spearman(x, y) for x, y in zip(a, b)])])
    progress(steps)
    report.table('Sample count: stability of SmoothGrad (noise 10%%), the Spearman correlation of two maps from '
                 'independent noise, mean over %d images' % len(images), ['samples N', 'stability'], rows)

    from smoothgrad import visualize
    for title, maps, fmt, name in (('noise level (N=%d)' % args.samples, noise_maps, 'noise %g%%', 'knob_noise.png'),
                                   ('samples (noise 10%)', sample_maps, 'N=%d', 'knob_samples.png')):
        shown = min(len(images), 4)
        fig, axes = plt.subplots(shown, len(maps) + 1, figsize=(1.6 * (len(maps) + 1), 1.7 * shown), squeeze=False)
        for row in range(shown):
            axes[row, 0].imshow(images[row].transpose(1, 2, 0))
            for col, (key, m) in enumerate(maps.items(), start=1):
                axes[row, col].imshow(visualize(m[row][None]), cmap='gray', vmin=0, vmax=1)
                if row == 0:
                    axes[row, col].set_title(fmt % (100 * key if 'noise' in fmt else key), fontsize=8)
        for ax in axes.ravel():
            ax.axis('off')
        fig.suptitle('SmoothGrad, ' + title, fontsize=9)
        report.figure(name)


def load_images(explained, photos, n):
    """The first n CIFAR-10 test images for a 32x32 model, else the photographs of a folder."""
    from sgrad.data import PHOTOS_DIR, have_local_cifar10, load_cifar10, load_image_file
    if explained.image_size == 32:
        if not have_local_cifar10():
            raise InputError('no local CIFAR-10 copy: set CHAINER_DATASET_ROOT (see README)')
        _, test = load_cifar10()
        return np.stack([test[i][0] for i in range(n)])
    folder = photos or PHOTOS_DIR
    if not os.path.isdir(folder):
        raise InputError('--photos: no such folder: %s' % folder)
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg')))[:n]
    if not names:
        raise InputError('no PNG or JPEG images in %s' % folder)
    return np.stack([load_image_file(os.path.join(folder, f), explained.image_size)[0] for f in names])


def main(argv=None):
    p = OneLineErrorParser(prog='evaluate_saliency.py', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=100, help='test images for the randomization check')
    p.add_argument('--deletion-images', type=int, default=500, help='test images for deletion/insertion')
    p.add_argument('--knob-images', type=int, default=50, help='test images for the noise and sample sweeps')
    p.add_argument('--only', nargs='+', choices=('sanity', 'deletion', 'knobs'),
                   default=['sanity', 'deletion', 'knobs'])
    p.add_argument('--samples', type=int, default=25, help='SmoothGrad samples (default: %(default)s)')
    p.add_argument('--steps', type=int, default=16, help='Integrated Gradients steps (default: %(default)s)')
    p.add_argument('--perturbation-steps', type=int, default=16, help='points of each deletion/insertion curve')
    p.add_argument('--batchsize', '-b', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--model', '-m', default=None, metavar='PATH|efficientnet-lite0',
                   help='CifarNet weights (default: the shipped model), efficientnet-lite0, or with --arch '
                   'the weights of that class')
    p.add_argument('--arch', metavar='FILE.py:Class', help='your own chainer.Chain, as in smoothgrad.py')
    p.add_argument('--photos', default=None, metavar='DIR',
                   help='the images for a model that is not 32x32 (default: data/photos)')
    p.add_argument('--out-dir', '-o', default=os.path.join('results', 'saliency'))
    args = p.parse_args(argv)
    for name in ('images', 'deletion_images', 'knob_images', 'samples', 'steps', 'perturbation_steps',
                 'batchsize'):
        if getattr(args, name) <= 0:
            p.error('--%s must be positive' % name.replace('_', '-'))

    from sgrad.models import load_explained
    from sgrad.saliency import GradientEngine
    n_max = max(args.images, args.deletion_images, args.knob_images)
    try:
        explained = load_explained(args.model, args.arch)
        images = load_images(explained, args.photos, n_max)
    except InputError as e:
        print('evaluate_saliency.py: error: %s' % e, file=sys.stderr)
        return 2
    model = explained.link
    os.makedirs(args.out_dir, exist_ok=True)
    targets = GradientEngine(model, batchsize=args.batchsize).probabilities(images).argmax(axis=1).astype(np.int32)

    report = Report(args.out_dir)
    sections = {'sanity': (sanity_check, args.images), 'deletion': (deletion_insertion, args.deletion_images),
                'knobs': (knobs, args.knob_images)}
    for name in args.only:
        section, n = sections[name]
        start = time.time()
        section(args, model, images[:n], targets[:n], report)
        line = '%s: %d images, %.0f s on this machine' % (name, min(n, len(images)), time.time() - start)
        print(line + '\n')
        report.lines += ['_%s_' % line, '']
        report.save()  # after every section, so a long run that is cut keeps what it finished
    print('tables and plots in %s' % args.out_dir)
    return 0


if __name__ == '__main__':
    keep_freed_memory()
    sys.exit(main())
