#!/usr/bin/env python
"""Do the maps mean something? Sanity checks and faithfulness on real CIFAR-10, or on photographs.

    python evaluate_saliency.py --images 100 --deletion-images 500     # the full study
    python evaluate_saliency.py --images 8 --deletion-images 16 --road-images 8 --robustness-images 4 \
        --knob-images 4                                                # a quick look
    python evaluate_saliency.py --model efficientnet-lite0 -o docs/evaluation_imagenet   # the photographs
    mpiexec -n 2 python evaluate_saliency.py ...   # the images split over 2 processes (ChainerMN)

1. Cascading model randomization (Adebayo et al. 2018): the layers' weights are re-drawn from
   the logits down (a model's RANDOMIZATION_STAGES, or else the links its forward calls, in
   reverse); after each step, the Spearman rank correlation (of |map|, and of the signed
   map for signed methods) and the SSIM between the trained and the randomized model's maps,
   averaged over the first --images test images.
2. Deletion and insertion (Petsiuk et al. 2018): the target-class probability as the most salient
   pixels are blacked out (deletion, the paper's), set to the mean colour (RISE's code: its normalised
   input set to 0), or replaced by a blurred copy (blurred deletion), lower area is better, or
   copied onto a blurred image (insertion, higher is better), over --deletion-images
   test images. Pixels are ordered by |map|, and also by the signed map (most positive first) for
   signed methods, with a random order as baseline.
3. ROAD (Rong et al. 2022): pixels removed by noisy linear imputation from their neighbours instead
   of black (no out-of-distribution holes), most relevant first (MoRF, lower is better) and least
   relevant first (LeRF, higher is better), 10% to 90%, same orders, over --road-images images.
4. Robustness and sparseness, over --robustness-images images: max-sensitivity of each method's map
   and infidelity of its attribution (Yeh et al. 2019) under two perturbations, small Gaussian noise
   around x and the authors' noisy black baseline, each drawn the same for every method and for a
   zero and a random map (the controls), the Gini index of the map, and SmoothGrad's
   max-sensitivity against its noise level, with its noise drawn the same at x and x + d, or fresh.
5. Data randomization (Adebayo et al. 2018): each method's maps of the model and of the same network
   trained on randomly permuted labels (--random-labels-model), compared as in 1, over --data-images
   images; CifarNet only.
6. SmoothGrad's two knobs: noise level (the deletion/insertion areas) and sample count (stability: the
   rank correlation of two maps from independent noise draws), with picture grids.
7. Time per map of each method with the study's settings, over --timing-images images mapped at once
   (on a quiet machine, or the times say little).

Tables go to stdout and OUT_DIR/results.md, plots to OUT_DIR. The target class is the trained
model's prediction. A 32x32 model (CifarNet) is measured on the CIFAR-10 test set, which needs a
local copy (CHAINER_DATASET_ROOT); any other on the photographs of --photos (data/photos), as
many as there are.
"""
import argparse
import hashlib
import json
import os
import sys
import time

from sgrad import parallel
from sgrad.cli import OneLineErrorParser, finite_float, keep_freed_memory, machine_name, progress_bar, write_atomic
from sgrad.errors import InputError
parallel.share_cores()  # under mpiexec: BLAS threads per rank, before NumPy loads

import numpy as np  # noqa: E402


NOISE_LEVELS = (0., 0.05, 0.1, 0.2, 0.3, 0.5)
SAMPLE_COUNTS = (1, 5, 10, 25, 50, 100, 200)
#: SmoothGrad's noise level in the study's method list.
STUDY_NOISE = 0.1
#: The curves of sgrad.metrics.perturbation_curves, and which way their area is better.
BETTER_AREA = {'deletion': 'lower', 'mean-colour deletion': 'lower', 'blurred deletion': 'lower',
               'insertion': 'higher'}
AREA_HEADERS = ['%s AUC (%s is better)' % item for item in BETTER_AREA.items()]


def make_methods(engine, samples=1, steps=1, masks=1, names=None):
    """name -> method: every method of the project (or those ``names``, --methods), SmoothGrad being SmoothGrad of
    the gradient; ``samples`` for SmoothGrad and Gradient SHAP's draws, ``steps`` for every path method (IG, Blur
    IG, Guided IG, XRAI's IG), ``masks`` for RISE."""
    from sgrad.methods import METHODS, make_method
    from sgrad.saliency import Gradient, SmoothGrad
    methods = {name: make_method(name, engine, samples=samples, steps=steps, masks=masks) for name in METHODS}
    methods['smoothgrad'] = SmoothGrad(Gradient(engine), STUDY_NOISE, samples, 'sum_abs')
    return {name: method for name, method in methods.items() if names is None or name in names}


def method_names(names=None):
    """The names of make_methods' methods (every method, or those of ``names``), in their order."""
    from sgrad.methods import METHODS
    return [name for name in list(METHODS) + ['smoothgrad'] if names is None or name in names]


def maps_of(method, images, targets, indices, seed):
    """|map| and signed map (None for unsigned methods), each (N, H, W), of the images whose
    indices in the study are ``indices`` (SmoothGrad's noise: each image's own stream)."""
    from sgrad.saliency import attribute_each, channel_sum_abs
    attribution = attribute_each(method, images, targets, indices, seed)
    return channel_sum_abs(attribution), attribution.sum(axis=1) if method.signed else None


class Report:
    """Prints tables and collects them for results.md, section by section: each section's block ends with
    its line '_name: ..._' (end_section), and a run replaces only the blocks of the sections it ran, so
    that ``--only road`` keeps the tables of an earlier full run."""

    def __init__(self, out_dir):
        self.out_dir, self.lines, self.sections = out_dir, [], {}

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

    def end_section(self, name, line):
        """Close the section ``name``'s block with ``line`` and write results.md."""
        self.sections[name] = self.lines + ['_%s: %s_' % (name, line), '']
        self.lines = []
        self.save()

    def save(self):
        path = os.path.join(self.out_dir, 'results.md')
        blocks = {}
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                blocks = results_blocks(f.read())
        blocks.update(self.sections)
        order = sorted(blocks, key=lambda name: list(SECTIONS).index(name) if name in SECTIONS else len(SECTIONS))
        text = '\n'.join(line for name in order for line in blocks[name]) + '\n'
        write_atomic(path, lambda f: f.write(text.encode()))


def results_blocks(text):
    """{section: its lines} of a results.md written by Report: each block runs up to its section's
    closing line '_name: ..._', a section this version does not know included (a newer one wrote it: a run
    keeps the blocks it did not compute)."""
    blocks, lines = {}, []
    for line in text.splitlines():
        if lines or line.strip():  # a block starts at its first non-blank line
            lines.append(line)
        name = line[1:].split(':')[0] if line.startswith('_') and line.endswith('_') and ':' in line else None
        if name is not None and name.isidentifier():
            blocks[name], lines = lines + [''], []
    return blocks


class Share:
    """This rank's share of the study's images (all of them in one process): their pixels,
    targets and indices in the study (the first image's being ``offset``); per-image results go back
    to rank 0 through ``gather``. ``shards_loaded``: (shards loaded from earlier runs, shards, the seconds
    those runs took for them or None where a shard did not record them) once ``sharded`` has run over it."""

    shards_loaded = None

    def __init__(self, images, targets, comm, offset=0):
        self.comm = comm
        self.study_images, self.study_targets, self.total = images, targets, len(images)
        self.indices = offset + parallel.split(np.arange(len(images)), comm)
        self.images, self.targets = images[self.indices - offset], targets[self.indices - offset]

    def gather(self, arrays):
        """{key: per-image rows of this share} -> the same for all images, on rank 0; else None."""
        return parallel.gather_rows(arrays, self.comm)

    def progress(self, total, unit):
        """A progress function for ``total`` steps, drawn by rank 0 alone."""
        return (lambda done: progress_bar(done, total, unit)) if parallel.is_root(self.comm) else (lambda done: None)


#: The flags, beyond the maps' (--samples, --steps, --seed), that a section's per-image results depend on.
SHARD_SETTINGS = {'sanity': (), 'data': (), 'deletion': ('perturbation_steps',), 'road': ('road_noise',),
                  'robustness': ('sensitivity_radius', 'sensitivity_samples', 'infidelity_noise',
                                 'infidelity_baseline_noise', 'infidelity_samples')}


def shard_bounds(total, size, ranks):
    """(start, stop) of consecutive shards of ``total`` images, ``size`` each (one shard for 0); a last
    shard too small to split over the ranks joins the one before."""
    starts = list(range(0, total, size or total))
    if len(starts) > 1 and total - starts[-1] < ranks:
        starts.pop()
    return list(zip(starts, starts[1:] + [total]))


def section_settings(args, model, section, **more):
    """What every shard of a section depends on: the section, its flags, the methods, the model's
    weights (a digest) and ``more``."""
    flags = ('samples', 'steps', 'masks', 'seed') + SHARD_SETTINGS[section]
    return dict({flag: getattr(args, flag) for flag in flags}, section=section, methods=method_names(args.methods),
                weights=weights_digest(model), **more)


def weights_digest(model):
    """A digest of the model's weights."""
    weights = hashlib.sha1()
    for name, param in sorted(model.namedparams()):
        weights.update(name.encode() + np.ascontiguousarray(param.array).tobytes())
    return weights.hexdigest()


def shard_settings(section, images, targets):
    """A shard's settings as JSON: its section's (section_settings) and the digest of its images and its
    targets."""
    return json.dumps(dict(section, images=hashlib.sha1(images.tobytes()).hexdigest(), targets=targets.tolist()),
                      sort_keys=True)


def load_shard(path, settings):
    """({key: per-image rows}, the seconds they took or None) saved in ``path`` with these settings, or
    (None, None)."""
    if not os.path.isfile(path):
        return None, None
    with np.load(path) as saved:
        if str(saved['settings']) != settings:
            return None, None
        seconds = float(saved['seconds']) if 'seconds' in saved.files else None  # older shards did not say
        return {tuple(json.loads(name)): saved[name] for name in saved.files
                if name not in ('settings', 'seconds')}, seconds


def save_shard(path, settings, rows, seconds):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {json.dumps(list(key)): value for key, value in rows.items()}
    write_atomic(path, lambda f: np.savez_compressed(f, settings=settings, seconds=seconds, **arrays))


def sharded(args, model, section, share, compute, **settings):
    """compute(part) -> per-image results of a Share ``part`` gathered on rank 0 ({key: rows}; None on the
    other ranks), run over the share's images --shard-size at a time. Each shard's results go to
    OUT_DIR/shards/ as soon as they are done, and a rerun with the same settings loads them instead of
    computing them again, so that a long run cut short resumes where it stopped. Returns the results
    of all images on rank 0, else None. Without --shard-size, compute(share), nothing saved. ``settings``:
    what the results depend on beyond section_settings."""
    comm = share.comm
    if not args.shard_size:
        return compute(share)
    bounds = shard_bounds(share.total, args.shard_size, 1 if comm is None else comm.size)
    common = section_settings(args, model, section, **settings)
    done, loaded, earlier = [], 0, 0.
    for number, (start, stop) in enumerate(bounds, 1):
        images, targets = share.study_images[start:stop], share.study_targets[start:stop]
        path = os.path.join(args.out_dir, 'shards', '%s-%06d-%06d.npz' % (section, start, stop))
        settings = shard_settings(common, images, targets)
        rows, seconds = load_shard(path, settings) if parallel.is_root(comm) else (None, None)
        if parallel.broadcast(rows is not None, comm):
            done.append(rows)
            loaded += 1
            earlier = None if seconds is None or earlier is None else earlier + seconds
            how = 'loaded from ' + path
        else:
            began = time.time()
            rows = compute(Share(images, targets, comm, offset=start))
            if rows is not None:
                save_shard(path, settings, rows, time.time() - began)
                done.append(rows)
            how = 'computed, saved in ' + path
        if len(bounds) > 1 and parallel.is_root(comm):
            print('%s: shard %d/%d (images %d-%d) %s' % (section, number, len(bounds), start, stop - 1, how),
                  flush=True)  # a long run's log shows each shard as it ends
    share.shards_loaded = (loaded, len(bounds), earlier)
    if not parallel.is_root(comm):
        return None
    return {key: np.concatenate([rows[key] for rows in done]) for key in done[0]}


def randomized_maps(args, model, cascade, part):
    """{('abs' or 'signed', stage, method): maps of the images of the Share ``part``} under the trained
    model and after each step of the cascade; signed maps of signed methods only."""
    import itertools
    from sgrad.metrics import cascading_randomization
    models = itertools.chain([('trained', model)], cascading_randomization(model, cascade, args.seed))
    return stage_maps(args, models, len(cascade) + 1, part, 'models mapped (trained, then randomized)')


def stage_maps(args, models, count, part, unit):
    """{('abs' or 'signed', stage, method): maps of the images of the Share ``part``} under each of the
    ``count`` (stage, model) pairs of ``models``; signed maps of signed methods only."""
    from sgrad.saliency import GradientEngine
    progress = part.progress(count, unit)
    maps = {}
    for done, (stage, staged_model) in enumerate(models):
        progress(done)
        engine = GradientEngine(staged_model, batchsize=args.batchsize)
        for name, method in make_methods(engine, args.samples, args.steps, args.masks, args.methods).items():
            absolute, signed = maps_of(method, part.images, part.targets, part.indices, args.seed)
            maps['abs', stage, name] = absolute
            if signed is not None:
                maps['signed', stage, name] = signed
    progress(count)
    return maps


def similarity_rows(maps, stages):
    """Per image, the trained model's map against each stage's map of the same image: {(method, stage,
    measure): values}, measure 'abs' and 'signed' (Spearman of |map| and of the signed map) and 'ssim' (of
    |map|); and the control, stage 'control': the fully randomized model's map of the image before it."""
    from sgrad.metrics import spearman, ssim
    measures = (('abs', 'abs', spearman), ('signed', 'signed', spearman), ('ssim', 'abs', ssim))
    compared = [(stage, stage, 0) for stage in stages] + [('control', stages[-1], 1)]  # (row, stage, image shift)
    rows = {}
    for name in {name for _, _, name in maps}:
        for measure, kind, similarity in measures:
            if (kind, 'trained', name) not in maps:  # an unsigned method: no signed maps
                continue
            for row, stage, shift in compared:
                pairs = zip(maps[kind, 'trained', name], np.roll(maps[kind, stage, name], shift, axis=0))
                rows[name, row, measure] = np.array([similarity(a, b) for a, b in pairs])
    return rows


def sanity_check(args, model, share, report):
    import matplotlib.pyplot as plt
    from sgrad.metrics import randomization_stages
    cascade = randomization_stages(model, share.study_images[:1])
    stages = ('trained',) + tuple(label for label, _ in cascade)

    def similarities(part):
        maps = part.gather(randomized_maps(args, model, cascade, part))
        return None if maps is None else similarity_rows(maps, stages)
    # the control pairs each image with the one before it in its shard (with --shard-size), or in the study
    rows = sharded(args, model, 'sanity', share, similarities)
    if report is None:
        return

    methods = method_names(args.methods)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in methods:
        for ax, measure in zip(axes, ('abs', 'ssim')):
            ax.plot(stages, [np.mean(rows[name, stage, measure]) for stage in stages], marker='o', label=name)
    for ax, label in zip(axes, ('Spearman rank correlation of |map|', 'SSIM of |map|')):
        ax.set_xlabel('randomized from the logits down to')
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.tick_params(axis='x', labelrotation=30)
        plt.setp(ax.get_xticklabels(), horizontalalignment='right')
    axes[1].legend(fontsize=8)
    fig.suptitle('Cascading randomization, %d images' % share.total)
    # Control: the fully randomized model's map of another image. The same-image correlation
    # beyond this level comes from the image; up to it, from a pattern the method draws everywhere.
    report.table('Cascading randomization: Spearman |map| / Spearman signed / SSIM, mean over %d images'
                 % share.total, ['method'] + list(stages[1:]) + ['%s, next image (control)' % stages[-1]],
                 [[name] + [similarity_cell(rows, name, stage) for stage in stages[1:] + ('control',)]
                  for name in methods])
    report.figure('sanity_randomization.png')


def similarity_cell(rows, name, stage):
    """'Spearman |map| / Spearman signed (- if unsigned) / SSIM', means over images, of rows[name, stage, ...]."""
    signed = rows.get((name, stage, 'signed'))
    return '%.2f / %s / %.2f' % (np.mean(rows[name, stage, 'abs']), '-' if signed is None else '%.2f' % np.mean(signed),
                                 np.mean(rows[name, stage, 'ssim']))


def data_randomization(args, model, share, report):
    """Each method's maps of the model against those of the same network trained on random labels."""
    random_labels = args.random_labels_link
    stages = ('trained', 'random labels')

    def similarities(part):
        maps = part.gather(stage_maps(args, zip(stages, (model, random_labels)), len(stages), part,
                                      'models mapped (true labels, then random)'))
        return None if maps is None else similarity_rows(maps, stages)
    rows = sharded(args, model, 'data', share, similarities, random_labels=weights_digest(random_labels))
    if report is None:
        return
    import matplotlib.pyplot as plt
    methods = method_names(args.methods)
    fig, ax = plt.subplots(figsize=(11, 4))
    for offset, (stage, label) in enumerate((('random labels', 'random-label model, same image'),
                                             ('control', 'random-label model, next image (control)'))):
        ax.bar(np.arange(len(methods)) + 0.4 * offset - 0.2, [np.mean(rows[name, stage, 'abs']) for name in methods],
               0.4, label=label)
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels(methods, rotation=30, horizontalalignment='right')
    ax.set_ylabel('Spearman rank correlation of |map|\nwith the real model\'s map')
    ax.grid(True, axis='y', alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle('Data randomization, %d images: the further the first bar stands above the second, the more the '
                 'map stays when the labels mean nothing' % share.total)
    report.table('Data randomization: the maps of the model trained on random labels against the real model\'s, '
                 'Spearman |map| / Spearman signed / SSIM, mean over %d images' % share.total,
                 ['method', 'random labels, same image', 'random labels, next image (control)'],
                 [[name, similarity_cell(rows, name, 'random labels'), similarity_cell(rows, name, 'control')]
                  for name in methods])
    report.figure('data_randomization.png')


def timing(args, model, share, report):
    """Seconds per map of each method with the study's settings, timed on rank 0 over the section's images at once
    (after a first map of one image: caches, folded kernels), and the passes through the model it counts."""
    if report is None:
        return
    from sgrad.saliency import GradientEngine
    engine = GradientEngine(model, batchsize=args.batchsize)
    images, targets = share.study_images, share.study_targets
    indices = np.arange(len(images))
    engine(images, targets)  # the engine's caches for a batch of this shape
    rows = []
    for name, method in make_methods(engine, args.samples, args.steps, args.masks, args.methods).items():
        maps_of(method, images[:1], targets[:1], indices[:1], args.seed)
        start = time.perf_counter()
        maps_of(method, images, targets, indices, args.seed)
        seconds = (time.perf_counter() - start) / len(images)
        gradients, forwards = method.passes(images[0])
        rows.append([name, '%.3g' % seconds, '%d gradients, %d forward passes' % (gradients, forwards)])
    report.table('Time per map, %dx%d images, %d at once (samples %d, steps %d, masks %d)'
                 % (images.shape[2], images.shape[3], len(images), args.samples, args.steps, args.masks),
                 ['method', 'seconds per map', 'passes through the model per map'], rows)


def mean_and_error(values):
    """The mean of per-image values and its standard error."""
    return np.mean(values), np.std(values) / np.sqrt(len(values))


def mean_cell(values):
    """'mean ± standard error' of per-image values, as a table cell: three decimals, none from 100 on (where the
    third decimal is float32 rounding, which differs with the batches' sizes)."""
    mean, error = mean_and_error(values)
    return ('%.3f ± %.3f' if abs(mean) < 100 else '%.0f ± %.0f') % (mean, error)


def auc_cells(curves):
    """The area under each kind of perturbation curve as 'mean ± standard error' table cells."""
    from sgrad.metrics import area_under_curve
    return [mean_cell(area_under_curve(curves[kind])) for kind in BETTER_AREA]


def pixel_orders(model, names=None):
    """[(label, line style)] of every pixel order a faithfulness section measures: each method's |map| (of every
    method, or those ``names``), the signed map of signed methods (evidence for the class first, evidence against
    it last) and a random order as baseline."""
    from sgrad.saliency import GradientEngine
    orders = []
    for k, (name, method) in enumerate(make_methods(GradientEngine(model), names=names).items()):
        orders.append((name, dict(color='C%d' % k)))
        if method.signed:
            orders.append((name + ' (signed)', dict(color='C%d' % k, linestyle='--')))
    return orders + [('random (baseline)', dict(color='black', linestyle=':'))]


def pixel_order_curves(args, model, share, curves_of, unit):
    """The curves of every pixel order (pixel_orders) for a share's images: curves_of(engine, maps) ->
    {kind: curves of the images}. Returns {(label, kind): curves of all images} on rank 0, else None."""
    from sgrad.saliency import GradientEngine
    engine = GradientEngine(model, batchsize=args.batchsize)
    methods = make_methods(engine, args.samples, args.steps, args.masks, args.methods)
    orders = [label for label, _ in pixel_orders(model, args.methods)]
    steps = len(methods) + len(orders)
    progress = share.progress(steps, 'steps (maps, then %s)' % unit)
    maps = []  # in the order of pixel_orders
    for done, method in enumerate(methods.values()):
        progress(done)
        abs_maps, signed_maps = maps_of(method, share.images, share.targets, share.indices, args.seed)
        maps += [abs_maps] if signed_maps is None else [abs_maps, signed_maps]
    maps.append(np.stack([np.random.RandomState([args.seed, index, 1]).rand(*abs_maps.shape[1:])
                          for index in share.indices]))  # each image's own stream, as SmoothGrad's noise
    curves = {}  # (order, kind) -> curves of this share's images
    for done, (label, order_maps) in enumerate(zip(orders, maps), start=len(methods)):
        progress(done)
        for kind, values in curves_of(engine, order_maps).items():
            curves[label, kind] = values
    progress(steps)
    return share.gather(curves)


def plot_curves(orderings, curves, kinds, fraction, titles):
    """One panel per kind of curve, the mean curve of every ordering; returns the axes by kind."""
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(6 * len(kinds) - 1, 4))
    axes = dict(zip(kinds, fig.subplots(1, len(kinds))))
    for name, style in orderings:
        for kind, ax in axes.items():
            ax.plot(fraction, curves[name, kind].mean(axis=0), label=name, **style)
    for kind, ax in axes.items():
        ax.set_xlabel('fraction of pixels')
        ax.set_ylabel('probability of the target class')
        ax.set_title(titles[kind])
        ax.grid(True, alpha=0.3)
    axes[kinds[-1]].legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))


def mean_colour(model, share):
    """The colour that mean-colour deletion fills in, (C,): the model's MEAN_COLOUR (the colour its input
    normalisation maps to zero, as RISE's code deletes to), or else the mean colour of the study's images."""
    colour = getattr(model, 'MEAN_COLOUR', None)
    return np.asarray(share.study_images.mean(axis=(0, 2, 3)) if colour is None else colour, np.float32)


def deletion_insertion(args, model, share, report):
    from sgrad.metrics import curve_ends, perturbation_curves
    from sgrad.saliency import GradientEngine
    colour = mean_colour(model, share)

    def curves_of(part):
        ends = curve_ends(GradientEngine(model, batchsize=args.batchsize), part.images, part.targets, colour)
        return pixel_order_curves(args, model, part, lambda engine, maps: perturbation_curves(
            engine, part.images, maps, part.targets, args.perturbation_steps, ends, colour), 'curves')
    orderings = pixel_orders(model, args.methods)
    curves = sharded(args, model, 'deletion', share, curves_of, mean_colour=colour.tolist())
    if report is None:
        return
    plot_curves(orderings, curves, list(BETTER_AREA), np.linspace(0, 1, args.perturbation_steps + 1),
                {kind: '%s (%s is better)' % (kind, better) for kind, better in BETTER_AREA.items()})
    report.table('Deletion and insertion AUC over %d images (mean ± s.e.); black is 0 in every channel, the mean '
                 'colour (%s)' % (share.total, ', '.join('%.4f' % v for v in colour)),
                 ['pixel order'] + AREA_HEADERS,
                 [[name] + auc_cells({kind: curves[name, kind] for kind in BETTER_AREA}) for name, _ in orderings])
    report.figure('deletion_insertion.png')


def road(args, model, share, report):
    from sgrad.metrics import ROAD_FRACTIONS, road_curves

    def curves_of(part):
        rngs = lambda: [np.random.RandomState([args.seed, index, 2]) for index in part.indices]
        return pixel_order_curves(args, model, part, lambda engine, maps: road_curves(
            engine.probabilities, part.images, maps, part.targets, noise=args.road_noise, rngs=rngs()), 'ROAD curves')
    orderings = pixel_orders(model, args.methods)
    curves = sharded(args, model, 'road', share, curves_of)
    if report is None:
        return
    plot_curves(orderings, curves, ['MoRF', 'LeRF'], ROAD_FRACTIONS,
                {'MoRF': 'MoRF: most relevant removed first (lower is better)',
                 'LeRF': 'LeRF: least relevant removed first (higher is better)'})
    rows = []
    for name, _ in orderings:
        morf, lerf = curves[name, 'MoRF'].mean(axis=1), curves[name, 'LeRF'].mean(axis=1)
        rows.append([name, mean_cell(morf), mean_cell(lerf), mean_cell(lerf - morf)])
    report.table('ROAD over %d images, pixels removed by noisy linear imputation (noise %g), mean probability of '
                 'the target class over %d%%-%d%% removed (mean ± s.e.)'
                 % (share.total, args.road_noise, 100 * ROAD_FRACTIONS[0], 100 * ROAD_FRACTIONS[-1]),
                 ['pixel order', 'MoRF (lower is better)', 'LeRF (higher is better)', 'LeRF - MoRF (higher is better)'],
                 rows)
    report.figure('road.png')


#: Where the robustness section's draws come from: each image's streams RandomState([seed, index, stream]).
SENSITIVITY_STREAM, RANDOM_MAP_STREAM, FRESH_NOISE_STREAM = 3, 6, 7
#: Infidelity's perturbations (sgrad.metrics.INFIDELITY_PERTURBATIONS): their draws' stream, the flag of their sd and
#: their name in the tables.
INFIDELITY_RUNS = {'gaussian': (4, 'infidelity_noise', 'Gaussian noise'),
                   'noisy baseline': (5, 'infidelity_baseline_noise', 'noisy baseline')}
#: SmoothGrad's noise around x and around x + d in max-sensitivity: 'same' reuses the image's draws (a seeded
#: SmoothGrad); 'fresh' draws anew for every map (what Captum or Quantus measure around an unseeded one);
#: 'floor': fresh draws at radius 0, the Monte Carlo noise that 'fresh' cannot go below.
SENSITIVITY_CONVENTIONS = {'same': 'same noise at x and x + d', 'fresh': 'fresh noise for every map',
                           'floor': 'fresh noise, radius 0 (Monte Carlo floor)'}
#: The infidelity rows that explain nothing: every map must do better than these to explain anything.
INFIDELITY_CONTROLS = ('zero map (control)', 'random map (control)')


def infidelity_header(args, perturbation):
    _, flag, name = INFIDELITY_RUNS[perturbation]
    return 'infidelity, %s sd %g' % (name, getattr(args, flag))


def robustness(args, model, share, report):
    import itertools
    import matplotlib.pyplot as plt
    from sgrad.metrics import gini, infidelity_score, infidelity_terms, max_sensitivity
    from sgrad.saliency import Gradient, GradientEngine, SmoothGrad, attribute_each, channel_sum_abs
    # SmoothGrad's max-sensitivity against its noise level, where SmoothGrad is among the methods
    noise_levels = NOISE_LEVELS[1:] if 'smoothgrad' in method_names(args.methods) else []

    def compute(part):
        engine = GradientEngine(model, batchsize=args.batchsize)
        methods = make_methods(engine, args.samples, args.steps, args.masks, args.methods)
        streams = lambda stream: [np.random.RandomState([args.seed, index, stream]) for index in part.indices]

        def sensitivity(method, convention='same', maps=None):
            """Max-sensitivity of the |map| under a SENSITIVITY_CONVENTIONS convention for SmoothGrad's noise;
            ``maps``: the images' own |maps|, where they are drawn already ('same' alone)."""
            calls = itertools.count()
            fresh = lambda: (args.seed, FRESH_NOISE_STREAM, next(calls))
            seed = (lambda: args.seed) if convention == 'same' else fresh
            explain = lambda images: channel_sum_abs(attribute_each(method, images, part.targets, part.indices, seed()))
            radius = 0. if convention == 'floor' else args.sensitivity_radius
            return max_sensitivity(explain, part.images, radius, args.sensitivity_samples, streams(SENSITIVITY_STREAM),
                                   base=maps)
        # the explained class's score of each image of a batch of whole copies of the part (infidelity's draws)
        scores = lambda batch: engine.objective_values(batch, np.tile(part.targets, len(batch) // len(part.targets)))

        def infidelities(name, explanation):
            """Both perturbations' infidelity, each on the same draws for every method and control, optimally
            scaled and as it is (the paper's definition)."""
            for perturbation, (stream, flag, _) in INFIDELITY_RUNS.items():
                terms = infidelity_terms(scores, part.images, explanation, perturbation, getattr(args, flag),
                                         args.infidelity_samples, streams(stream))
                for normalize in (True, False):
                    results['infidelity', perturbation, normalize, name] = infidelity_score(*terms, normalize)
        progress = part.progress(len(methods) + len(noise_levels), 'steps (methods, then SmoothGrad noise levels)')
        results = {}
        for done, (name, method) in enumerate(methods.items()):
            progress(done)
            attribution = attribute_each(method, part.images, part.targets, part.indices, args.seed)
            maps = channel_sum_abs(attribution)
            results['sensitivity', name] = sensitivity(method, maps=maps)
            infidelities(name, attribution if method.signed else maps)
            results['gini', name] = gini(maps)
        random_maps = np.stack([rng.standard_normal(part.images.shape[1:]) for rng in streams(RANDOM_MAP_STREAM)])
        for name, explanation in zip(INFIDELITY_CONTROLS, (np.zeros_like(random_maps), random_maps)):
            infidelities(name, explanation)
        for done, noise in enumerate(noise_levels, start=len(methods)):
            progress(done)
            smoothgrad = SmoothGrad(Gradient(engine), noise, args.samples, 'sum_abs')
            for convention in SENSITIVITY_CONVENTIONS:
                results['sensitivity', noise, convention] = (
                    results['sensitivity', 'smoothgrad'] if (noise, convention) == (STUDY_NOISE, 'same')
                    else sensitivity(smoothgrad, convention))
        progress(len(methods) + len(noise_levels))
        return part.gather(results)
    methods = method_names(args.methods)
    results = sharded(args, model, 'robustness', share, compute)
    if report is None:
        return

    label = lambda name: 'smoothgrad (%s)' % SENSITIVITY_CONVENTIONS['same'] if name == 'smoothgrad' else name
    report.table('Robustness and sparseness over %d images (mean ± s.e.): max-sensitivity of the map (relative, '
                 'radius %g, %d draws), Gini index' % (share.total, args.sensitivity_radius, args.sensitivity_samples),
                 ['method', 'max-sensitivity (lower is better)', 'Gini (sparser)'],
                 [[label(name), mean_cell(results['sensitivity', name]), mean_cell(results['gini', name])]
                  for name in methods])

    signed = {name: method.signed for name, method in make_methods(GradientEngine(model), names=methods).items()}

    def cell(perturbation, normalize, name):
        """The infidelity over the zero map's, image by image (the zero map: its own, in parentheses); as it
        is, only for attributions in the score's units (signed ones)."""
        values, zero = (results['infidelity', perturbation, normalize, key] for key in (name, INFIDELITY_CONTROLS[0]))
        if name == INFIDELITY_CONTROLS[0]:
            return '1 (%s)' % mean_cell(values)
        if not (normalize or signed.get(name)):
            return '-'
        return mean_cell(np.divide(values, zero, out=np.ones_like(values), where=zero > 0))
    report.table('Infidelity over %d images relative to the zero map\'s, image by image (mean ± s.e.; 1 explains '
                 'nothing, 0 everything), %d draws of each perturbation, the same for every row; as it is (the '
                 'paper\'s definition) only where the attribution is in the score\'s units'
                 % (share.total, args.infidelity_samples),
                 ['method'] + ['%s, %s (lower is better)' % (infidelity_header(args, perturbation), scaling)
                               for perturbation in INFIDELITY_RUNS for scaling in ('optimally scaled', 'as it is')],
                 [[name] + [cell(perturbation, normalize, name) for perturbation in INFIDELITY_RUNS
                            for normalize in (True, False)] for name in methods + list(INFIDELITY_CONTROLS)])
    if not noise_levels:
        return
    report.table('SmoothGrad (N=%d): max-sensitivity against the noise level, %d images, by how SmoothGrad\'s noise '
                 'is drawn at x and x + d' % (args.samples, share.total),
                 ['noise'] + list(SENSITIVITY_CONVENTIONS.values()),
                 [['%g%%' % (100 * noise)] + [mean_cell(results['sensitivity', noise, convention])
                                              for convention in SENSITIVITY_CONVENTIONS] for noise in noise_levels])
    plt.figure(figsize=(5.5, 3.5))
    for convention, description in SENSITIVITY_CONVENTIONS.items():
        means, errors = zip(*[mean_and_error(results['sensitivity', noise, convention]) for noise in noise_levels])
        plt.errorbar([100 * noise for noise in noise_levels], means, yerr=errors, marker='o', label=description)
    if 'gradient' in methods:
        plt.axhline(np.mean(results['sensitivity', 'gradient']), color='gray', linestyle=':',
                    label='gradient (no noise)')
    plt.xlabel('SmoothGrad noise level (%)')
    plt.ylabel('max-sensitivity of the map (relative)')
    plt.grid(True, alpha=0.3)
    plt.legend(fontsize=7)
    report.figure('sensitivity_noise.png')


def knobs(args, model, share, report):
    import matplotlib.pyplot as plt
    from sgrad.metrics import curve_ends, perturbation_curves, spearman
    from sgrad.saliency import Gradient, GradientEngine, SmoothGrad
    engine = GradientEngine(model, batchsize=args.batchsize)
    colour = mean_colour(model, share)
    ends = curve_ends(engine, share.images, share.targets, colour)

    def smoothgrad_maps(noise, samples, seed):
        method = SmoothGrad(Gradient(engine), noise, samples, 'sum_abs')
        return maps_of(method, share.images, share.targets, share.indices, seed)[0]

    steps = len(NOISE_LEVELS) + len(SAMPLE_COUNTS)
    progress = share.progress(steps, 'settings (noise levels, then sample counts)')
    results = {}  # per-image rows of this share: maps, curves, stability
    for done, noise in enumerate(NOISE_LEVELS):
        progress(done)
        results['noise', noise] = maps = smoothgrad_maps(noise, args.samples, args.seed)
        for kind, values in perturbation_curves(engine, share.images, maps, share.targets,
                                                args.perturbation_steps, ends, colour).items():
            results['curves', noise, kind] = values
    for done, samples in enumerate(SAMPLE_COUNTS, start=len(NOISE_LEVELS)):
        progress(done)
        a, b = smoothgrad_maps(STUDY_NOISE, samples, args.seed), smoothgrad_maps(STUDY_NOISE, samples, args.seed + 1)
        results['samples', samples] = a
        results['stability', samples] = np.array([spearman(x, y) for x, y in zip(a, b)])
    progress(steps)
    results = share.gather(results)
    if report is None:
        return
    report.table('Noise level: SmoothGrad (N=%d) over %d images' % (args.samples, share.total),
                 ['noise'] + AREA_HEADERS,
                 [['%g%%' % (100 * noise)] + auc_cells({kind: results['curves', noise, kind] for kind in BETTER_AREA})
                  for noise in NOISE_LEVELS])
    report.table('Sample count: stability of SmoothGrad (noise 10%%), the Spearman correlation of two maps from '
                 'independent noise, mean over %d images' % share.total, ['samples N', 'stability'],
                 [[samples, '%.3f' % results['stability', samples].mean()] for samples in SAMPLE_COUNTS])
    noise_maps = {noise: results['noise', noise] for noise in NOISE_LEVELS}
    sample_maps = {samples: results['samples', samples] for samples in SAMPLE_COUNTS}
    from smoothgrad import visualize
    for title, maps, fmt, name in (('noise level (N=%d)' % args.samples, noise_maps, 'noise %g%%', 'knob_noise.png'),
                                   ('samples (noise 10%)', sample_maps, 'N=%d', 'knob_samples.png')):
        shown = min(share.total, 4)
        fig, axes = plt.subplots(shown, len(maps) + 1, figsize=(1.6 * (len(maps) + 1), 1.7 * shown), squeeze=False)
        for row in range(shown):
            axes[row, 0].imshow(share.study_images[row].transpose(1, 2, 0))
            for col, (key, m) in enumerate(maps.items(), start=1):
                axes[row, col].imshow(visualize(m[row][None]), cmap='gray', vmin=0, vmax=1)
                if row == 0:
                    axes[row, col].set_title(fmt % (100 * key if 'noise' in fmt else key), fontsize=8)
        for ax in axes.ravel():
            ax.axis('off')
        fig.suptitle('SmoothGrad, ' + title, fontsize=9)
        report.figure(name)


#: The sections, in the order they run, and the flag that sizes each.
SECTIONS = {'sanity': sanity_check, 'data': data_randomization, 'deletion': deletion_insertion, 'road': road,
            'robustness': robustness, 'knobs': knobs, 'timing': timing}
SECTION_SIZES = {'sanity': 'images', 'data': 'data_images', 'deletion': 'deletion_images', 'road': 'road_images',
                 'robustness': 'robustness_images', 'knobs': 'knob_images', 'timing': 'timing_images'}


def load_images(explained, photos, n):
    """The first n CIFAR-10 test images for a 32x32 model, else the photographs of a folder."""
    from sgrad.data import PHOTOS_DIR, have_local_cifar10, load_cifar10, load_image_folder
    if explained.image_size == 32:
        if not have_local_cifar10():
            raise InputError('no local CIFAR-10 copy: set CHAINER_DATASET_ROOT (see README)')
        _, test = load_cifar10()
        return np.stack([test[i][0] for i in range(n)])
    return load_image_folder(photos or PHOTOS_DIR, explained.image_size, n)[0]


def main(argv=None):
    p = OneLineErrorParser(prog='evaluate_saliency.py', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=100, help='test images for the randomization check')
    p.add_argument('--data-images', type=int, default=100, help='test images for the data randomization check')
    p.add_argument('--random-labels-model', metavar='PATH',
                   help='the data randomization check\'s CifarNet trained on random labels (default: the shipped '
                   'sgrad/shipped/cifarnet_random_labels.npz)')
    p.add_argument('--deletion-images', type=int, default=500, help='test images for deletion/insertion')
    p.add_argument('--knob-images', type=int, default=50, help='test images for the noise and sample sweeps')
    p.add_argument('--timing-images', type=int, default=8,
                   help='images for the time per map, mapped at once (default: %(default)s; run it on a quiet machine)')
    p.add_argument('--road-images', type=int, default=500, help='test images for ROAD')
    p.add_argument('--robustness-images', type=int, default=50,
                   help='test images for max-sensitivity, infidelity and sparseness')
    p.add_argument('--only', nargs='+', choices=tuple(SECTIONS),
                   help='run these sections only (default: all; data only for CifarNet)')
    p.add_argument('--methods', nargs='+', choices=method_names(), metavar='NAME',
                   help='study these methods only (default: all of them: %s); a run of other methods into the '
                   'same --out-dir recomputes its shards' % ', '.join(method_names()))
    p.add_argument('--samples', type=int, default=25,
                   help='SmoothGrad samples and Gradient SHAP draws (default: %(default)s)')
    p.add_argument('--steps', type=int, default=16,
                   help='steps of the path methods: Integrated Gradients, Blur IG, Guided IG and XRAI\'s IG '
                   '(default: %(default)s)')
    p.add_argument('--masks', type=int, default=1000, help='RISE\'s random masks (default: %(default)s)')
    p.add_argument('--perturbation-steps', type=int, default=16, help='points of each deletion/insertion curve')
    p.add_argument('--road-noise', type=finite_float, default=0.01,
                   help="sd of ROAD's imputation noise, [0, 1] image space (default: %(default)s)")
    p.add_argument('--sensitivity-radius', type=finite_float, default=0.02,
                   help='max-sensitivity: L-infinity radius of the perturbations (default: %(default)s, as Captum)')
    p.add_argument('--sensitivity-samples', type=int, default=10, help='max-sensitivity: draws (default: %(default)s)')
    p.add_argument('--infidelity-noise', type=finite_float, default=0.1,
                   help='infidelity: sd of the small Gaussian noise around x (default: %(default)s)')
    p.add_argument('--infidelity-baseline-noise', type=finite_float, default=0.2,
                   help="infidelity: sd of the noisy black baseline, as in Yeh et al.'s code (default: %(default)s)")
    p.add_argument('--infidelity-samples', type=int, default=50, help='infidelity: draws (default: %(default)s)')
    p.add_argument('--batchsize', '-b', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--model', '-m', default=None, metavar='PATH|efficientnet-lite0',
                   help='CifarNet weights (default: the shipped model), efficientnet-lite0, or with --arch '
                   'the weights of that class')
    p.add_argument('--arch', metavar='FILE.py:Class', help='your own chainer.Chain, as in smoothgrad.py')
    p.add_argument('--random-weights', action='store_true',
                   help='with --arch and no --model: the randomly initialised network (a test of the tool)')
    p.add_argument('--photos', default=None, metavar='DIR',
                   help='the images for a model that is not 32x32 (default: data/photos)')
    p.add_argument('--out-dir', '-o', default=os.path.join('results', 'saliency'))
    p.add_argument('--shard-size', type=int, default=0, metavar='K',
                   help='save results every K images in OUT_DIR/shards/, and on a rerun with the same settings load '
                   'the shards already done (default: no shards; the knobs are never sharded, and the randomization '
                   'check\'s control pairs each image with the one before it in its shard)')
    p.add_argument('--communicator', metavar='NAME',
                   help='ChainerMN communicator under mpiexec, the images split over the ranks (default: naive '
                   'when mpiexec starts more than one process)')
    p.add_argument('--cards', action='store_true',
                   help='only write the saliency cards, docs/methods/NAME.md, from the code and the results stored '
                   'in docs/evaluation* (no model is run)')
    args = p.parse_args(argv)
    if args.cards:
        from sgrad.cards import write_cards
        paths = write_cards(os.path.dirname(os.path.abspath(__file__)))
        print('wrote %d cards in %s' % (len(paths), os.path.dirname(paths[0])))
        return 0
    for name in ('images', 'data_images', 'deletion_images', 'knob_images', 'road_images', 'robustness_images',
                 'timing_images',
                 'samples', 'steps', 'masks', 'perturbation_steps', 'batchsize', 'sensitivity_samples',
                 'infidelity_samples'):
        if getattr(args, name) <= 0:
            p.error('--%s must be positive' % name.replace('_', '-'))

    from sgrad.models import load_explained, probe
    from sgrad.saliency import GradientEngine
    for name in ('road_noise', 'sensitivity_radius', 'infidelity_noise', 'infidelity_baseline_noise', 'shard_size'):
        if getattr(args, name) < 0:
            p.error('--%s must not be negative' % name.replace('_', '-'))
    sections = {name: (SECTIONS[name], getattr(args, size)) for name, size in SECTION_SIZES.items()}
    try:
        comm = parallel.create_communicator(args.communicator)
        ranks = 1 if comm is None else comm.size
        if args.random_weights and not args.arch:
            raise InputError('--random-weights is for --arch models')
        explained = load_explained(args.model, args.arch, args.random_weights)
        args.only = args.only or [name for name in SECTIONS if name != 'data' or explained.description == 'CifarNet']
        if 'data' in args.only:
            if explained.description != 'CifarNet':
                raise InputError('--only data: the data randomization check has a random-label model for CifarNet '
                                 'only (train.py --random-labels)')
            from sgrad.cifarnet import RANDOM_LABELS_MODEL_PATH, load_model
            args.random_labels_link = load_model(args.random_labels_model or RANDOM_LABELS_MODEL_PATH)
        images = load_images(explained, args.photos, max(sections[name][1] for name in args.only))
        targets = probe(explained, GradientEngine(explained.link, batchsize=args.batchsize), images).argmax(
            axis=1).astype(np.int32)
        if 0 < args.shard_size < ranks:
            raise InputError('shards of %d images cannot be split over %d ranks' % (args.shard_size, ranks))
        fewest = min(min(sections[name][1], len(images)) for name in args.only)
        if fewest < ranks:
            raise InputError('%d images cannot be split over %d ranks' % (fewest, ranks))
    except InputError as e:
        if parallel.is_first_rank():  # every rank meets the same error; one says it
            print('evaluate_saliency.py: error: %s' % e, file=sys.stderr)
        return 2
    model = explained.link

    report = None  # rank 0 alone writes the tables and plots
    if parallel.is_root(comm):
        os.makedirs(args.out_dir, exist_ok=True)
        report = Report(args.out_dir)
    for name in args.only:
        section, n = sections[name]
        start = time.time()
        share = Share(images[:n], targets[:n], comm)
        section(args, model, share, report)
        if report is not None:
            line = '%d images, %.0f s on %s%s' % (min(n, len(images)), time.time() - start, machine_name(),
                                                 ', %d ranks' % ranks if comm else '')
            if share.shards_loaded and share.shards_loaded[0]:
                loaded, shards, earlier = share.shards_loaded
                line += ' (%d of its %d shards done by earlier runs%s)' % (
                    loaded, shards, '' if earlier is None else ', which took %.0f s' % earlier)
            print('%s: %s\n' % (name, line))
            report.end_section(name, line)  # writes results.md: a long run that is cut keeps what it finished
    if report is not None:
        print('tables and plots in %s' % args.out_dir)
    return 0


if __name__ == '__main__':
    keep_freed_memory()
    sys.exit(main())
