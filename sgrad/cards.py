"""Saliency cards (Boggust et al. 2023, arXiv:2206.02958): a page per method, by the cards' attributes
(methodology, sensitivity, faithfulness, perceptibility), generated from the code (the method's docstring and
constructor) and from the study's stored results (the results.md that evaluate_saliency.py writes in each output
folder), never written by hand: ``python evaluate_saliency.py --cards`` writes docs/methods/NAME.md again.
"""
import inspect
import json
import os
import re

from sgrad.methods import FORWARD_ONLY, METHODS
from sgrad.saliency import SmoothGrad

#: The stored results that the cards read: (what was measured on what, results folder from the project root).
RESULT_SETS = (('CIFAR-10, CifarNet', os.path.join('docs', 'evaluation')),
               ('CIFAR-10, CifarNet', os.path.join('docs', 'evaluation_rules')),
               ('photographs, EfficientNet-Lite0', os.path.join('docs', 'evaluation_imagenet')),
               ('photographs, EfficientNet-Lite0', os.path.join('docs', 'evaluation_imagenet_more')))

#: The cards' attributes: (title, the question, the study's sections that answer it).
ATTRIBUTES = (('Cost', 'how long a map takes with the study\'s settings', ('timing',)),
              ('Sensitivity', 'does the map change with what the model learned (model and data randomization), '
               'and little with what it did not (max-sensitivity, infidelity)?', ('sanity', 'data', 'robustness')),
              ('Faithfulness', 'do the pixels it ranks first matter most to the model (deletion, insertion, '
               'ROAD)?', ('deletion', 'road')),
              ('Perceptibility', 'what the map looks like: the galleries docs/gallery.png (a CIFAR-10 image) and '
               'docs/gallery_coffee.png (a photograph) show every method; SmoothGrad\'s noise level and sample '
               'count below', ('knobs',)))

#: What each method is held against, by which test (the measured differences: docs/exactness.md).
CHECKS = {
    'gradient': 'Chainer\'s standard NCHW layers on the first 1,000 CIFAR-10 test images in float64 '
                '(tests/test_exact_gradients.py), a backward pass written by hand (tests/test_any_model.py), and '
                'Captum\'s Saliency on the PyTorch port (tests/test_gradient_peers.py)',
    'grad_x_input': 'Captum\'s InputXGradient on the PyTorch port (tests/test_gradient_peers.py)',
    'guided_backprop': 'Captum\'s GuidedBackprop on the PyTorch port of CifarNet (tests/test_rule_peers.py); a '
                       'backward pass written by hand through ReLU, ReLU6 and a skip (tests/test_any_model.py)',
    'deconvnet': 'Captum\'s Deconvolution on the PyTorch port of CifarNet (tests/test_rule_peers.py); a backward '
                 'pass written by hand through ReLU, ReLU6 and a skip (tests/test_any_model.py)',
    'integrated_gradients': 'PAIR saliency\'s IntegratedGradients with its points selected (tests/test_pair.py); '
                            'Captum\'s IntegratedGradients with its riemann_middle rule (tests/test_gradient_peers.py)',
    'gradient_shap': 'Captum\'s GradientShap given the same draws (tests/test_rule_peers.py)',
    'deeplift': 'a dense-matrix reference on small models and summation-to-delta on real images '
                '(tests/test_deeplift.py); Captum\'s DeepLift on the PyTorch ports of CifarNet and, with its '
                'Rescale rule given ReLU6, EfficientNet-Lite0 (tests/test_rule_peers.py)',
    'deeplift_shap': 'the mean of DeepLIFT over its baselines (tests/test_deeplift.py); Captum\'s DeepLiftShap '
                     '(tests/test_rule_peers.py)',
    'lrp': 'a NumPy reference of every rule on small models (tests/test_lrp.py); zennit\'s composites on PyTorch '
           'ports of CifarNet and EfficientNet-Lite0, Captum\'s LRP with its epsilon rules (tests/test_lrp_peers.py)',
    'blur_ig': 'PAIR saliency\'s BlurIG (tests/test_pair.py)',
    'guided_ig': 'PAIR saliency\'s GuidedIG (tests/test_pair.py)',
    'xrai': 'PAIR saliency\'s XRAI (tests/test_pair.py)',
    'gradcam': 'PAIR saliency\'s GradCam, at the layer\'s resolution (tests/test_pair.py); the formula on a '
               'backward pass written by hand (tests/test_any_model.py)',
    'guided_gradcam': 'Captum\'s GuidedGradCam with bilinear upsampling (tests/test_gradient_peers.py)',
    'gradcam_plus_plus': 'a NumPy reference (tests/test_cam_rise.py); pytorch-grad-cam\'s GradCAMPlusPlus',
    'score_cam': 'a NumPy reference (tests/test_cam_rise.py); pytorch-grad-cam\'s ScoreCAM',
    'occlusion': 'the objective of each occluded image, recomputed (tests/test_methods.py); Captum\'s Occlusion '
                 '(tests/test_gradient_peers.py)',
    'rise': 'a plain reference loop over the same masks (tests/test_cam_rise.py)',
    'smoothgrad': 'PAIR saliency\'s GetSmoothedMask (tests/test_pair.py); the blog\'s one tiled backward '
                  '(tests/test_saliency.py)',
}

#: What the cross-check tests measured (tests/conftest.py writes it: ``pytest -m cross_check --record-checks PATH``).
CROSS_CHECKS = os.path.join('docs', 'methods', 'cross_checks.json')

#: What our figures and measurements show going wrong, by method.
FAILURES = {
    'gradient': 'scattered, noisy pixels (docs/gallery.png), the faithfulness of a random order on ROAD',
    'grad_x_input': 'the image\'s own bright pixels show through: its maps stay close under random labels',
    'guided_backprop': 'edges of the object whatever the weights: the map hardly changes when the logits layer '
                       'is re-drawn (Adebayo et al.\'s finding)',
    'deconvnet': 'what the filters respond to, as Guided Backprop: 0.73 of its map (signed 0.81) stays when the '
                 'logits layer is re-drawn',
    'deeplift_shap': 'its blurred references follow the image, so the map keeps the image\'s magnitude under '
                     'random labels (0.46 against a control of 0.04)',
    'blur_ig': 'ROAD and blurred deletion, which remove pixels towards a blur as its path does, flatter its signed '
               'map',
    'gradcam': 'coarse: CifarNet\'s res3 is 4x4, so the map is 16 cells upsampled',
    'guided_gradcam': 'its detail is Guided Backprop\'s, which fails the randomization check (signed 0.66 after '
                      'the logits layer is re-drawn)',
    'gradcam_plus_plus': 'a central blob it draws on every image: at full randomization its map is as close to '
                         'another image\'s (0.48 against 0.46)',
    'smoothgrad': 'diffuse; with fresh noise its own Monte Carlo error moves the map by 22% (max-sensitivity 0.221 '
                  'against 0.121 seeded)',
    'integrated_gradients': 'the factor x - x\' keeps the image in the map: close under random labels',
    'gradient_shap': 'adds up only in expectation over its draws (275% off with 8 draws on a photograph)',
    'deeplift': 'the factor x - x\' keeps the image in the map, as Integrated Gradients\'',
    'lrp': 'the folded biases absorb the relevance (on EfficientNet-Lite0 little of S_c(x) is left); with z+ every '
           'relevance is positive, so the signed map is the map',
    'guided_ig': 'on 32x32 images its path sum is far from S_c(x) - S_c(black) at any step count (docs/exactness.md)',
    'xrai': 'at 32x32 the segments are a few pixels across',
    'score_cam': 'the map hardly changes when the logits layer is re-drawn',
    'rise': 'many forward passes: slow on photographs; the map depends on the masks drawn',
    'occlusion': 'blocks of the patch\'s size; a black patch is itself evidence on 32x32 images',
}

#: Where the cards go, from the project root.
CARDS_DIR = os.path.join('docs', 'methods')

#: The study's name of SmoothGrad over the gradient, which wraps any method rather than being one of METHODS.
SMOOTHGRAD = 'smoothgrad'


def card_names():
    """The methods that get a card: every one of METHODS and SmoothGrad."""
    return list(METHODS) + [SMOOTHGRAD]


def tables(text):
    """The tables of a results.md: [(section, closing line, heading, header cells, rows of cells)]. Each table
    follows a '### heading' line; each section's tables end with its closing line '_section: ..._'."""
    found, pending, heading = [], [], None
    for line in text.splitlines():
        if line.startswith('### '):
            heading = line[4:]
        elif line.startswith('|') and heading is not None:
            cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
            if pending and pending[-1][0] == heading:
                if not set(''.join(cells)) <= set('-'):
                    pending[-1][2].append(cells)
            else:
                pending.append((heading, cells, []))
        elif line.startswith('_') and line.endswith('_') and ':' in line:
            section = line[1:].split(':')[0]
            found += [(section, line.strip('_')) + table for table in pending]
            pending = []
    return found


def measured(root, name):
    """{section: [(result set, closing line, heading, header, rows)]}: the rows of method ``name`` (its own and
    its signed map's) in the results stored under the project root ``root``."""
    found = {}
    for label, folder in RESULT_SETS:
        path = os.path.join(root, folder, 'results.md')
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as f:
                for section, closing, heading, header, rows in tables(f.read()):
                    mine = [row for row in rows if row[0] == name or row[0].startswith(name + ' (')]
                    if mine:
                        found.setdefault(section, []).append((label, closing, heading, header, mine))
    return found


def cross_checks(root, name):
    """[(test, entry)]: the recorded cross checks of method ``name`` under the project root ``root``, by test."""
    path = os.path.join(root, CROSS_CHECKS)
    if not os.path.isfile(path):
        return []
    with open(path, encoding='utf-8') as f:
        record = json.load(f)
    return sorted((test, entry) for test, entry in record.items() if name in entry['methods'])


def exactness(root, name):
    """The card's exactness: what the method is held against, and the differences the tests measured."""
    checks = cross_checks(root, name)
    rows = [['`%s`' % test.replace('::', ' :: '),
             ', '.join('%s %s' % item for item in sorted(entry['references'].items())) or 'written in the test',
             str(entry['cases']), '%.1e' % entry['difference'], '%.0e' % entry['bound'],
             '%s, %s, Python %s' % (entry['date'], entry['machine'], entry['python'])] for test, entry in checks]
    text = ['Held against %s; how, and why where a convention differs: [exactness.md](../exactness.md).'
            % CHECKS[name], '']
    if not rows:
        return text + ['No measured difference recorded yet.']
    return text + ['The largest relative difference each test measured, max |ours - reference| / max |reference| '
                   'over its cases (recorded by `pytest -m cross_check --record-checks %s`; the test fails above '
                   'its bound):' % CROSS_CHECKS.replace(os.sep, '/'), ''] + markdown_table(
        ['test', 'reference', 'cases', 'difference', 'bound', 'measured'], rows)


def markdown_table(header, rows):
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(row) + ' |'
                                                                             for row in rows]


def methodology(name):
    """The card's methodology: the class's docstring (its formula and reference), its hyperparameters and their
    defaults, and what it needs of the model."""
    cls = SmoothGrad if name == SMOOTHGRAD else METHODS[name]
    parameters = [p for p in inspect.signature(cls).parameters.values() if p.name not in ('engine', 'base')]
    needs = ['forward passes only' if name in FORWARD_ONLY else 'the gradient of the class score or of the loss']
    if cls.score_only:
        needs = ['the class score, not the loss']
    if 'layer' in inspect.signature(cls).parameters:
        needs.append('a convolutional layer\'s output (`--layer`; by default the last link with a 4-D output)')
    signed = 'no: the study\'s SmoothGrad is the blog\'s sum of |gradients|' if name == SMOOTHGRAD else \
        ('yes' if cls.signed else 'no')
    return ['```', inspect.getdoc(cls), '```', '',
            '- Code: `%s.py`, `%s`.' % (cls.__module__.replace('.', '/'), cls.__name__),
            '- Hyperparameters and their defaults: %s.' % (', '.join('`%s=%r`' % (p.name, p.default)
                                                                    for p in parameters) or 'none'),
            '- What it needs of the model: %s.' % '; '.join(needs),
            '- SmoothGrad can wrap it (`--smooth`): %s.' % ('no, ' + cls.not_smoothable if cls.not_smoothable
                                                          else 'yes'),
            '- Signed maps: %s.' % signed]


def title(cls):
    """A method's name and reference: its docstring's first words up to the citation that closes them."""
    words = ' '.join(inspect.getdoc(cls).split('\n\n')[0].split())
    cited = re.match(r'(.*?\([^()]*\d{4}[^()]*\))', words)
    return cited.group(1) if cited else words.split(': ')[0]


def card(root, name):
    """The text of method ``name``'s card, from the code and the results stored under the project root ``root``."""
    cls = SmoothGrad if name == SMOOTHGRAD else METHODS[name]
    text = ['# `%s`: %s' % (name, title(cls)), '',
            '_Generated by `python evaluate_saliency.py --cards` from the code and the stored results; do not '
            'edit._', '', '## Methodology', ''] + methodology(name) + ['']
    text += ['## Exactness', ''] + exactness(root, name) + ['', '## Known failure modes', '']
    failures = FAILURES.get(name, 'none seen yet')
    text += [failures[0].upper() + failures[1:] + '.', '']
    results = measured(root, name)
    for attribute, question, sections in ATTRIBUTES:
        text += ['## %s' % attribute, '', '_%s_' % question, '']
        entries = [entry for section in sections for entry in results.get(section, [])]
        for label, closing, heading, header, rows in entries:
            text += ['**%s** (%s; %s)' % (heading, label, closing), ''] + markdown_table(header, rows) + ['']
        if not entries and sections != ('knobs',):
            text += ['Not measured yet.', '']
    return '\n'.join(text).rstrip() + '\n'


#: The comparison page's columns: (heading, result set, section, the columns' headers or indices (1, -1: the
#: table's first stage and its last, the control), whether the number is the first of 'a / b / c' cells).
COMPARED = (
    ('logits layer randomized, Spearman of \\|map\\| (control)', 'CIFAR-10, CifarNet', 'sanity', (1, -1), True),
    ('random labels, Spearman of \\|map\\| (control)', 'CIFAR-10, CifarNet', 'data', (-2, -1), True),
    ('ROAD LeRF - MoRF (higher is better)', 'CIFAR-10, CifarNet', 'road', ('LeRF - MoRF (higher is better)',), False),
    ('insertion AUC (higher is better)', 'CIFAR-10, CifarNet', 'deletion', ('insertion AUC (higher is better)',),
     False),
    ('max-sensitivity (lower is better)', 'CIFAR-10, CifarNet', 'robustness', ('max-sensitivity (lower is better)',),
     False),
    ('seconds per map, CifarNet', 'CIFAR-10, CifarNet', 'timing', ('seconds per map',), False),
    ('seconds per map, EfficientNet-Lite0', 'photographs, EfficientNet-Lite0', 'timing', ('seconds per map',), False))


def compared_cell(results, label, section, columns, first):
    """The method's cell(s) of its unsigned row in the first table of ``section`` from result set ``label`` that
    has those columns."""
    for entry_label, _, _, header, rows in results.get(section, []):
        if entry_label == label and all(isinstance(column, int) or column in header for column in columns):
            cells = [rows[0][column if isinstance(column, int) else header.index(column)] for column in columns]
            cells = [cell.split(' / ')[0] if first else cell.split(' ± ')[0] for cell in cells]
            return cells[0] if len(cells) == 1 else '%s (%s)' % tuple(cells)
    return '-'


def largest_difference(root, name):
    """The largest relative difference of the method's recorded cross checks, and against what."""
    checks = cross_checks(root, name)
    if not checks:
        return '-'
    test, entry = max(checks, key=lambda check: check[1]['difference'])
    return '%.0e (%s)' % (entry['difference'], ', '.join(sorted(entry['references'])) or 'a reference in the test')


def comparison(root):
    """The page that compares every method by every measure: docs/methods/README.md."""
    header = ['method'] + [heading for heading, _, _, _, _ in COMPARED] + ['largest difference from a reference']
    rows = [['[%s](%s.md)' % (name, name)] + [compared_cell(measured(root, name), *column[1:])
                                             for column in COMPARED] + [largest_difference(root, name)]
            for name in card_names()]
    return '\n'.join(['# The methods, side by side', '',
                      '_Generated by `python evaluate_saliency.py --cards` from the stored results; do not edit._',
                      '', 'Each method\'s card has the whole tables, with the number of images, the machine and the '
                      'settings; `-`: not measured yet. The randomization columns give the Spearman correlation '
                      'of the map with the map of the same image by the model with its logits layer re-drawn (or '
                      'trained on random labels), and in brackets the control, the fully randomized (random-label) '
                      'model\'s map of another image: a method near its control sees what the model learned; '
                      'one near 1 draws the image whatever the model learned.', ''] + markdown_table(header, rows) + [
        '', 'Every method on one CIFAR-10 image and on a photograph (`python smoothgrad.py --method all --samples 50 '
        '--steps 32 --masks 2000`, and `python smoothgrad.py --method all --image data/photos/coffee.png`):', '',
        '![every method on CIFAR-10 test image 0](../gallery.png)', '',
        '![every method on a photograph](../gallery_coffee.png)']) + '\n'


def write_cards(root):
    """Write every method's card, and the page that compares them, into docs/methods under the project root
    ``root``; return their paths."""
    from sgrad.cli import write_atomic
    folder = os.path.join(root, CARDS_DIR)
    os.makedirs(folder, exist_ok=True)
    pages = [(name + '.md', card(root, name)) for name in card_names()] + [('README.md', comparison(root))]
    for page, text in pages:
        write_atomic(os.path.join(folder, page), lambda f, data=text.encode(): f.write(data))
    return [os.path.join(folder, page) for page, _ in pages]
