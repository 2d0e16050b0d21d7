#!/usr/bin/env python
"""SmoothGrad saliency maps for a CIFAR-10 classifier or any Chainer model (Smilkov et al. 2017).

    python smoothgrad.py --noise 0.1 --samples 100     # test image #0, as in the blog
    python smoothgrad.py --noise 0 0.1 0.3             # the blog's comparison in one figure
    python smoothgrad.py --image cat.png --label cat   # any image, resized and cropped to 32x32
    python smoothgrad.py --model efficientnet-lite0 --image data/photos/chelsea.png --noise 0 0.1 0.2
    python smoothgrad.py --arch mynet.py:Net --model result/model.npz --image x.png   # your own model
    python smoothgrad.py --model efficientnet-lite0 --method all   # every method on a photograph (~1 min)
    python smoothgrad.py --indices 0:10000 --save-maps maps.npz    # maps of many images, no figure
    mpiexec -n 2 python smoothgrad.py --indices 0:10000            # ... split over 2 processes

The image is tiled N times, Gaussian noise with stdev = noise * (max(x) - min(x))
is added in the model's [0, 1] input space, the noisy batch is backpropagated
at once (--batchsize copies at a time, drawn as they are needed, so memory does
not grow with N), and |gradient| is summed over samples and channels into a
map of the image's size (32x32 for CifarNet, 224x224 for EfficientNet-Lite0).
"""
import argparse
import json
import os
import sys
import textwrap

from sgrad import parallel
from sgrad.cli import OneLineErrorParser, finite_float, get_device, keep_freed_memory, progress_bar, write_atomic
from sgrad.errors import InputError
from sgrad.methods import FORWARD_ONLY
parallel.share_cores()  # under mpiexec: BLAS threads per rank, before NumPy loads

import numpy as np  # noqa: E402

DEFAULT_OUT = 'smoothgrad.png'
DEFAULT_MAPS = 'smoothgrad_maps.npz'
DEFAULT_SAMPLES = 100

#: The methods whose --baseline may be a set of images (a folder) or 'blurred'.
SETS_OF_BASELINES = ('gradient_shap', 'deeplift_shap')

#: --method all on an image of this side or more (a photograph): the settings not given on the command line,
#: lowered so that a 224x224 gallery of every method takes about a minute on 2 cores, and the methods that
#: are forward passes alone (each noisy copy repeats all of them) left unsmoothed.
PHOTO_GALLERY_SIDE = 64
PHOTO_GALLERY = {'samples': 8, 'steps': 8, 'masks': 500}

#: Work of more model passes than this gets a time estimate first (printed when above ESTIMATE_SECONDS).
ESTIMATE_PASSES = 200
ESTIMATE_SECONDS = 10


def index_range(text):
    """argparse type: 'START:STOP' -> (START, STOP)."""
    try:
        start, stop = (int(part) for part in text.split(':'))
    except ValueError:
        raise argparse.ArgumentTypeError('expected START:STOP, got %r' % text)
    return start, stop


def parse_args(argv=None):
    from sgrad.models import EFFICIENTNET
    from sgrad.lrp import COMPOSITES
    from sgrad.methods import METHODS
    from sgrad.saliency import AGGREGATIONS
    p = OneLineErrorParser(prog='smoothgrad.py', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument('--index', '-i', type=int, default=0,
                     help='CIFAR-10 test image to explain (default: %(default)s, the blog\'s image; for '
                     'EfficientNet-Lite0 the default is data/photos/chelsea.png)')
    src.add_argument('--image', metavar='PATH', help='explain this PNG/JPEG instead (its shorter side resized '
                     'to the model\'s input size, 32 for CifarNet, 224 for EfficientNet-Lite0, then centre-cropped)')
    src.add_argument('--indices', metavar='START:STOP', type=index_range,
                     help='maps of CIFAR-10 test images START..STOP-1 into one .npz (--save-maps), no figure')
    src.add_argument('--folder', metavar='DIR',
                     help='maps of every PNG/JPEG image in DIR (name order) into one .npz (--save-maps), no figure')
    p.add_argument('--label', '-l', metavar='C',
                   help='target class, an index or a name (CIFAR-10: airplane, ..., truck; ImageNet: tabby, '
                   'espresso, ...); default: the predicted class')
    p.add_argument('--method', choices=('smoothgrad',) + tuple(METHODS) + ('all',), default='smoothgrad',
                   help='saliency method (default: smoothgrad, i.e. SmoothGrad of the gradient); '
                   'all: a gallery of every method, plain and smoothed')
    p.add_argument('--smooth', action='store_true', help='apply SmoothGrad to the chosen method')
    p.add_argument('--aggregate', choices=tuple(AGGREGATIONS), default='sum_abs',
                   help='how SmoothGrad combines the samples: sum_abs (the blog, default), mean (the paper), '
                   'squared (SmoothGrad^2), var (VarGrad)')
    p.add_argument('--noise', '-n', type=finite_float, nargs='+', default=[0.1], metavar='LEVEL',
                   help='noise level(s) sigma / (max(x) - min(x)); several give one map each (default: 0.1)')
    p.add_argument('--samples', '-s', type=int,
                   help='noisy samples per map, and gradient_shap\'s draws (default: %d; %d in a photograph\'s '
                   '--method all gallery)' % (DEFAULT_SAMPLES, PHOTO_GALLERY['samples']))
    p.add_argument('--steps', type=int,
                   help='path methods\' steps: integrated_gradients (default 50), blur_ig (100), guided_ig (200), '
                   'xrai (100 per baseline); %d each in a photograph\'s --method all gallery' % PHOTO_GALLERY['steps'])
    p.add_argument('--baseline', metavar='black|blurred|PATH|DIR',
                   help='integrated_gradients, guided_ig, deeplift: baseline image (default: black); gradient_shap: '
                   'what its baselines are drawn from, black (default), blurred copies of the image, an image or a '
                   'folder of images (training images, say); deeplift_shap: its baselines, a folder of images or '
                   'blurred (default: the image blurred at --samples levels)')
    p.add_argument('--layer', metavar='NAME',
                   help='gradcam, guided_gradcam, gradcam_plus_plus, score_cam: the link whose output is weighed, '
                   'a name from model.namedlinks() (default: the last link with a 4-D output; res3 for CifarNet)')
    p.add_argument('--composite', choices=tuple(COMPOSITES), default='epsilon_plus_flat',
                   help='lrp: the rules by layer, as zennit\'s composites: epsilon_plus_flat (z+ on convolutions, '
                   'epsilon on linear layers, flat on the first; the default), epsilon_gamma_box (gamma, epsilon, '
                   'box on the first convolution), epsilon_plus, epsilon_alpha2_beta1, epsilon (everywhere)')
    p.add_argument('--patch', type=int, help='occlusion: patch side in pixels (default: 1/8 of the image side)')
    p.add_argument('--stride', type=int, help='occlusion: patch stride in pixels (default: half the patch)')
    p.add_argument('--masks', type=int, help='rise: random masks per map (default: 4000; %d in a photograph\'s '
                   '--method all gallery)' % PHOTO_GALLERY['masks'])
    p.add_argument('--batchsize', '-b', type=int,
                   help='forward/backward (and draw noise for) at most this many images at once; '
                   'memory grows with it, not with --samples (default: about 2^19 pixels, 512 images at '
                   '32x32, 10 at 224x224)')
    p.add_argument('--objective', choices=('score', 'loss'), default='score',
                   help='score: the class logit S_c (the paper, default); loss: the blog\'s softmax '
                   'cross-entropy, against the true label when --label is not given')
    p.add_argument('--seed', type=int, default=0, help='noise seed (default: %(default)s)')
    p.add_argument('--model', '-m', metavar='PATH|%s' % EFFICIENTNET,
                   help='CifarNet weights saved by train.py (default: the shipped sgrad/shipped/cifarnet.npz), '
                   '%s (ImageNet), or with --arch the weights of that class' % EFFICIENTNET)
    p.add_argument('--arch', metavar='FILE.py:Class',
                   help='explain your own chainer.Chain: the class, built with no arguments; it may set '
                   'CLASS_NAMES and IMAGE_SIZE (the side images are resized and centre-cropped to)')
    p.add_argument('--size', type=int, metavar='N',
                   help='with --arch: resize and centre-crop images to NxN (default: the class\'s IMAGE_SIZE, '
                   'else the image as it is)')
    p.add_argument('--random-weights', action='store_true',
                   help='with --arch and no --model: explain the randomly initialised network (a sanity check, '
                   'not an explanation of a trained model)')
    p.add_argument('--out', '-o', default=DEFAULT_OUT, help='figure to write (default: %(default)s)')
    p.add_argument('--save-map', metavar='PATH.npy',
                   help='also save the raw |maps| summed over channels, shape (len(noise), H, W)')
    p.add_argument('--save-maps', metavar='PATH.npz', default=DEFAULT_MAPS,
                   help='with --indices or --folder: the file of maps (images, noise levels, H, W) with the '
                   'indices or file names, targets, labels and settings (default: %(default)s)')
    p.add_argument('--communicator', metavar='NAME',
                   help='with --indices or --folder under mpiexec: the ChainerMN communicator; the images are '
                   'split over the ranks (default: naive when mpiexec starts more than one process)')
    p.add_argument('--gpu', '-g', type=int, default=-1, help='GPU id, negative for the CPU (default: %(default)s)')
    args = p.parse_args(argv)
    args.many = args.indices is not None or args.folder is not None
    if any(n < 0 for n in args.noise):
        p.error('--noise must be >= 0')
    if args.baseline and (args.baseline == 'blurred' or os.path.isdir(args.baseline)) and \
            args.method not in SETS_OF_BASELINES:
        p.error('--baseline %s is a set of baselines: for --method %s'
                % (args.baseline, ' or '.join(SETS_OF_BASELINES)))
    if (args.size or args.random_weights) and not args.arch:
        p.error('--size and --random-weights are for --arch models (CifarNet takes 32x32 images, '
                'EfficientNet-Lite0 224x224, both with trained weights)')
    for name in ('samples', 'steps', 'batchsize', 'patch', 'stride', 'masks', 'size'):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error('--%s must be positive' % name)
    if args.method != 'all' and args.samples is None:  # the gallery picks its own (gallery)
        args.samples = DEFAULT_SAMPLES
    if args.method == 'all' and (args.save_map or args.many):
        p.error('--method all draws a gallery of one image; --save-map, --indices and --folder take one method')
    for path in (args.out, args.save_map, args.save_maps if args.many else None):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error('output folder does not exist: %s' % os.path.dirname(path))
    return args


def visualize(attribution, signed=False, percentile=99):
    """PAIR's display of a (C, H, W) attribution as a 2-D map in [0, 1] (or [-1, 1] if signed):
    summed over channels (of |a| unless signed), divided by its 99th percentile, clipped. An unsigned
    map is first lowered by its minimum, which is 0 for the gradient methods and RISE's floor (the
    probability that almost every masked copy keeps) for RISE."""
    from sgrad.saliency import channel_sum_abs
    m = attribution.sum(axis=0) if signed else channel_sum_abs(attribution)
    if not signed:
        m = m - m.min()
    vmax = np.percentile(np.abs(m), percentile)
    return np.clip(m / vmax, -1, 1) if vmax > 0 else np.zeros_like(m)


def draw_grid(f, rows, title):
    """A PNG of panels: rows of (heading, kind, data), kind 'image', 'abs', 'signed' or 'overlay'
    (data: the image and the attribution); None is blank."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ncols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.3 * ncols, 2.3 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, panel in zip(ax_row, row + [None] * (ncols - len(row))):
            ax.axis('off')
            if panel is None:
                continue
            heading, kind, data = panel
            if kind == 'image':
                ax.imshow(data.transpose(1, 2, 0))
            elif kind == 'abs':
                ax.imshow(visualize(data), cmap='gray', vmin=0, vmax=1)
            elif kind == 'overlay':
                image, attribution = data
                ax.imshow(image.transpose(1, 2, 0))
                ax.imshow(visualize(attribution), cmap='inferno', vmin=0, vmax=1, alpha=0.6)
            else:
                ax.imshow(visualize(data, signed=True), cmap='bwr', vmin=-1, vmax=1)
            ax.set_title(heading, fontsize=9)
    title = fit_title(fig, title)
    title_height = title.get_window_extent(fig.canvas.get_renderer()).height / fig.dpi + 0.15
    fig.set_figheight(2.3 * len(rows) + title_height)
    title.set_y(1 - 0.05 / fig.get_figheight())  # its top 0.05 inch below the figure's, however tall the figure
    fig.tight_layout(rect=(0, 0, 1, 1 - title_height / fig.get_figheight()))
    fig.savefig(f, format='png', dpi=100)
    plt.close(fig)


def fit_title(fig, text, fontsize=10):
    """The figure's title, wrapped at spaces until it is no wider than the figure."""
    renderer = fig.canvas.get_renderer()
    for width in range(len(text), 0, -4):
        title = fig.suptitle(textwrap.fill(text, width), fontsize=fontsize)
        if title.get_window_extent(renderer).width <= 0.96 * fig.bbox.width:
            break
    return title


def load_input(args, explained):
    """The image to explain, its true label (None for a file) and a description."""
    from sgrad.data import PHOTOS_DIR, load_image_file, load_test_image
    path = args.image
    if path is None and explained.image_size not in (None, 32):
        path = os.path.join(PHOTOS_DIR, 'chelsea.png')  # a photograph for a photograph model
    if path:
        x, size = load_image_file(path, explained.image_size)
        if explained.image_size and size != (explained.image_size,) * 2:
            print('note: %s is %dx%d, resized and centre-cropped to %dx%d'
                  % (path, size[0], size[1], explained.image_size, explained.image_size))
        return x, None, os.path.basename(path)
    x, label = load_test_image(args.index)
    return x, label, 'CIFAR-10 test #%d' % args.index


def load_baseline(args, explained, shape):
    """--baseline: None for the method's default, 'blurred', the image of a file (C, H, W) or those of a folder
    (M, C, H, W); black, given, is a black image of ``shape`` (C, H, W) (for deeplift_shap, a set of one)."""
    from sgrad.data import load_image_file, load_image_folder
    if args.baseline in (None, 'blurred'):
        return args.baseline
    if args.baseline == 'black':
        return np.zeros(shape, np.float32)
    if os.path.isdir(args.baseline):
        return load_image_folder(args.baseline, explained.image_size)[0]
    return load_image_file(args.baseline, explained.image_size)[0]


def method_options(args, baseline):
    """The command line's options of the methods, by their constructors' names (None: the method's default)."""
    return dict(steps=args.steps, samples=args.samples, baseline=baseline, layer=args.layer, patch=args.patch,
                stride=args.stride, masks=args.masks, composite=args.composite)


def top_regions(x, attribution, share):
    """The image with only its ``share`` percent most salient pixels by the map kept, the rest darkened to a
    fifth: XRAI's figures show its top regions this way."""
    m = attribution.sum(axis=0)
    keep = m >= np.percentile(m, 100 - share)
    return np.where(keep, x, 0.2 * x)


def variants(args, engine, x, name, smooth, baseline=None):
    """One row's (heading, method) pairs: the plain method, or SmoothGrad of it at each noise level.
    A CAM's heading names the layer it weighs."""
    from sgrad.lrp import LRP
    from sgrad.methods import make_method
    from sgrad.saliency import GradCAM, SmoothGrad
    base = make_method(name, engine, **method_options(args, baseline))
    if isinstance(base, GradCAM):
        name = '%s at %s' % (name, engine.layer_name(x, base.layer))
    if isinstance(base, LRP):
        name = '%s, %s' % (name, base.composite)
    if not smooth:
        return [(name, base)]
    return [('%s, noise %g%%' % ('SmoothGrad' if name == 'gradient' else 'smoothed', 100 * noise),
             SmoothGrad(base, noise, args.samples, args.aggregate, np.random.RandomState(args.seed)))
            for noise in args.noise]


def method_row(x, target, row):
    """Panels and attributions of one row of variants; a path method's completeness is printed."""
    from sgrad.saliency import PathMethod
    from sgrad.lrp import LRP
    from sgrad.xrai import XRAI
    panels, attributions = [], []
    for heading, method in row:
        attribution = method(x, target)
        if isinstance(method, PathMethod):
            total, difference = method.completeness(x, target, attribution)
            print('%s %s: sum of attributions %.4f, S_c(x) - S_c(reference) %.4f (%.2f%% off)'
                  % (heading, method.sums_to, total, difference,
                     100 * abs(total - difference) / max(abs(difference), 1e-12)))
        if isinstance(method, LRP):
            total, score = method.conservation(x, target, attribution)
            print('%s conservation: sum of relevances %.4f, S_c(x) %.4f (%.1f%% of it; biases absorb the rest)'
                  % (heading, total, score, 100 * total / score if score else float('nan')))
        panels.append((heading, 'abs', attribution))
        if method.signed:
            panels.append(('signed', 'signed', attribution))
        if isinstance(method, XRAI):
            panels += [('top %d%% regions' % share, 'image', top_regions(x, attribution, share)) for share in (10, 30)]
        attributions.append(attribution)
    return panels, attributions


def with_overlays(panels, image):
    """Each |map| panel followed by the map laid over the photograph, as the paper shows them."""
    out = []
    for heading, kind, data in panels:
        out.append((heading, kind, data))
        if kind == 'abs':
            out.append(('over the image', 'overlay', (image, data)))
    return out


def announce_time(engine, x, methods):
    """Print how long the methods will take on x when it is more than a few seconds: the model passes
    they take (Method.passes) times the seconds of a gradient and of a forward pass, measured on x."""
    gradients, forwards = np.sum([method.passes(x) for method in methods], axis=0)
    if gradients + forwards <= ESTIMATE_PASSES:
        return
    gradient_s, forward_s = engine.seconds_per_image(x)
    seconds = gradients * gradient_s + forwards * forward_s
    if seconds > ESTIMATE_SECONDS:
        print('this takes about %s: %d gradients (%.0f ms each) and %d forward passes (%.0f ms each)'
              % ('%.0f s' % seconds if seconds < 120 else '%.0f min' % (seconds / 60), gradients,
                 1000 * gradient_s, forwards, 1000 * forward_s))


def gallery(args, engine, x, baseline):
    """(plain, smoothed) variants of every method, smoothed at the highest noise level ([] where it is
    not smoothed), and the title's note on the settings. On a photograph the settings not given are lowered
    (PHOTO_GALLERY) and the forward-only methods left unsmoothed, so that it takes about a minute; the note
    says so."""
    from sgrad.methods import METHODS
    noise = max(args.noise)
    args.noise = [noise if noise > 0 else 0.1]
    photo = min(x.shape[1:]) >= PHOTO_GALLERY_SIDE
    lowered = {name: value for name, value in PHOTO_GALLERY.items() if photo and getattr(args, name) is None}
    for name, value in lowered.items():
        setattr(args, name, value)
    args.samples = args.samples or DEFAULT_SAMPLES
    rows = []
    skipped = [name for name, cls in METHODS.items() if cls.score_only and engine.objective != 'score']
    for name, cls in METHODS.items():
        if name in skipped:
            continue
        smoothed = not cls.not_smoothable and not (photo and name in FORWARD_ONLY)
        rows.append((variants(args, engine, x, name, False, baseline),
                     variants(args, engine, x, name, True, baseline) if smoothed else []))
    note = ', smoothed with noise %g%%, N=%d (%s)' % (100 * args.noise[0], args.samples, args.aggregate)
    if lowered:
        note += '; lowered for a %dx%d gallery: %s, %s unsmoothed' % (
            x.shape[1], x.shape[2], ', '.join('%s %d' % item for item in lowered.items()), ', '.join(FORWARD_ONLY))
    elif photo:
        note += '; %s unsmoothed' % ', '.join(FORWARD_ONLY)
    if skipped:
        note += '; %s left out (they explain the class score, not the loss)' % ', '.join(skipped)
    return rows, note


def run(args, comm=None):
    from sgrad.models import class_name, load_explained, parse_label, probe
    from sgrad.saliency import AUTO_BATCHSIZE, GradientEngine, channel_sum_abs

    explained = load_explained(args.model, args.arch, args.random_weights, args.size)
    model = explained.link
    model.to_device(get_device(args.gpu))
    if args.many:
        return run_many(args, explained, comm)
    x, true_label, name = load_input(args, explained)
    if args.method in ('guided_ig', 'all') and min(x.shape[1:]) >= PHOTO_GALLERY_SIDE:
        print("note: Guided IG's float32 map of a %dx%d image depends on the rounding of the machine's kernels "
              '(another CPU or SGRAD_NATIVE=0 gives another map): docs/exactness.md, "Guided IG on photographs"'
              % x.shape[1:])
    baseline = load_baseline(args, explained, x.shape)
    engine = GradientEngine(model, args.objective, args.batchsize or AUTO_BATCHSIZE, progress_bar)

    probs = probe(explained, engine, x[None])[0]
    label = None if args.label is None else parse_label(explained, args.label, len(probs))
    top = np.argsort(probs)[::-1][:3]
    truth = ' (true class: %s)' % class_name(explained, true_label) if true_label is not None else ''
    print('%s, %s%s, top-3 predictions: %s' % (explained.description, name, truth, ', '.join(
        '%s %.1f%%' % (class_name(explained, c), 100 * probs[c]) for c in top)))
    target = top[0] if label is None else label
    if args.objective == 'loss' and label is None and true_label is not None:
        target = true_label  # the blog's loss is taken against the true label
    title = '%s: %s for class "%s" (p=%.2f)' % (
        name, 'class score S_c' if args.objective == 'score' else 'the loss', class_name(explained, target),
        probs[target])

    input_panel = ('input', 'image', x)
    if args.method == 'all':
        rows, note = gallery(args, engine, x, baseline)
        title += note
    else:
        smooth = args.smooth or args.method == 'smoothgrad'
        # one row: the method, plain or smoothed at each noise level
        rows = [(variants(args, engine, x, 'gradient' if args.method == 'smoothgrad' else args.method, smooth,
                          baseline), [])]
        if smooth:
            title += ', N=%d (%s)' % (args.samples, args.aggregate)
    announce_time(engine, x, [method for plain, smoothed in rows for _, method in plain + smoothed])
    figure_rows = []
    for plain, smoothed in rows:
        panels, attributions = method_row(x, target, plain)
        if args.method == 'all':  # the map (and its signed one), the smoothed map, XRAI's regions
            smoothed_map = method_row(x, target, smoothed)[0][:1] if smoothed else []
            figure_rows.append([input_panel] + panels[:2] + [None] * (2 - len(panels[:2])) + smoothed_map
                               + panels[2:])
        else:
            figure_rows.append([input_panel] + (with_overlays(panels, x) if min(x.shape[1:]) >= 64 else panels))
    if args.save_map:
        maps = np.stack([channel_sum_abs(a) for a in attributions])
        write_atomic(args.save_map, lambda f: np.save(f, maps))
        print('saved maps %s to %s' % (maps.shape, args.save_map))
    write_atomic(args.out, lambda f: draw_grid(f, figure_rows, title))
    print('saved the figure to %s' % args.out)


def load_many(args, explained):
    """The images of --indices or --folder: images, their keys (test indices, or positions in the
    folder), true labels (None for files) and file names (None for CIFAR-10)."""
    from sgrad.data import load_image_folder, load_test_images
    if args.folder is not None:
        images, files = load_image_folder(args.folder, explained.image_size)
        return images, np.arange(len(images)), None, files
    images, labels = load_test_images(*args.indices)
    return images, np.arange(*args.indices), labels, None


def run_many(args, explained, comm):
    """Maps of many images into one .npz, the images split over the ranks under mpiexec. SmoothGrad
    draws each image's noise from a stream of its own, so the file is the same for any rank count."""
    from sgrad.models import parse_label, probe
    from sgrad.methods import make_method
    from sgrad.saliency import AUTO_BATCHSIZE, GradientEngine, SmoothGrad, attribute_each, channel_sum_abs
    images, keys, labels, files = load_many(args, explained)
    if comm is not None and len(images) < comm.size:
        raise InputError('%d images cannot be split over %d ranks' % (len(images), comm.size))
    mine = parallel.split(np.arange(len(images)), comm)
    engine = GradientEngine(explained.link, args.objective, args.batchsize or AUTO_BATCHSIZE)
    probs = probe(explained, engine, images[mine])
    if args.label is not None:
        targets = np.full(len(mine), parse_label(explained, args.label, probs.shape[1]), np.int32)
    elif args.objective == 'loss' and labels is not None:
        targets = labels[mine]  # the blog's loss is taken against the true label
    else:
        targets = probs.argmax(axis=1).astype(np.int32)
    base = make_method('gradient' if args.method == 'smoothgrad' else args.method, engine,
                       **method_options(args, load_baseline(args, explained, images.shape[1:])))
    smooth = args.smooth or args.method == 'smoothgrad'
    methods = [SmoothGrad(base, noise, args.samples, args.aggregate) for noise in args.noise] if smooth else [base]
    maps = []
    for level, method in enumerate(methods):
        def progress(done, total, level=level):  # rank 0 draws the bar of its own share
            if parallel.is_root(comm):
                progress_bar(level * total + done, len(methods) * total, 'images mapped%s'
                             % (' (rank 0 of %d)' % comm.size if comm else ''))
        maps.append(channel_sum_abs(attribute_each(method, images[mine], targets, keys[mine], args.seed, progress)))
    rows = parallel.gather_rows({'maps': np.stack(maps, axis=1), 'targets': targets,
                                 'target_probability': probs[np.arange(len(mine)), targets]}, comm)
    if rows is None:
        return
    settings = {name: getattr(args, name) for name in (
        'method', 'smooth', 'noise', 'samples', 'aggregate', 'steps', 'baseline', 'layer', 'patch', 'stride',
        'masks', 'composite', 'objective', 'label', 'seed', 'model', 'arch')}
    settings.update(model_description=explained.description, ranks=comm.size if comm else 1)
    saved = dict(rows, settings=json.dumps(settings))
    saved.update({'indices': keys} if files is None else {'files': np.array(files)})
    if labels is not None:
        saved['labels'] = labels
    write_atomic(args.save_maps, lambda f: np.savez(f, **saved))
    print('saved maps %s of %d images to %s' % (rows['maps'].shape, len(images), args.save_maps))


def main(argv=None):
    args = parse_args(argv)
    try:
        comm = parallel.create_communicator(args.communicator) if args.many else None
        if not args.many and parallel.launched_ranks() > 1:
            raise InputError('one image runs in one process; mpiexec splits many images: --indices or --folder')
        run(args, comm)
    except InputError as e:
        if parallel.is_first_rank():  # every rank meets the same error; one says it
            print('smoothgrad.py: error: %s' % e, file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    keep_freed_memory()
    sys.exit(main())
