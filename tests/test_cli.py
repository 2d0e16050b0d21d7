"""smoothgrad.py end to end: the figure, the raw maps, and one-line errors on bad input."""
import importlib.util
import os
import subprocess
import sys

import chainer
import numpy as np
import pytest

import smoothgrad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(argv, capsys):
    """smoothgrad.main in-process: (exit code, stdout, stderr)."""
    try:
        code = smoothgrad.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_figure_and_maps(tmp_path, model_file, capsys):
    png, npy = str(tmp_path / 'fig.png'), str(tmp_path / 'maps.npy')
    code, out, err = run_cli(['--model', model_file, '--noise', '0', '0.1', '0.3', '--samples', '8',
                              '--batchsize', '3', '--out', png, '--save-map', npy], capsys)
    assert code == 0, err
    assert 'top-3 predictions' in out and 'true class: cat' in out
    with open(png, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    maps = np.load(npy)
    assert maps.shape == (3, 32, 32) and (maps >= 0).all()
    assert sorted(os.listdir(str(tmp_path))) == ['fig.png', 'maps.npy', 'model.npz']  # no temporary files


def test_cli_seed_reproduces_the_map(tmp_path, model_file, capsys):
    maps = []
    for seed in (1, 1, 2):
        npy = str(tmp_path / ('m%d.npy' % len(maps)))
        code, _, err = run_cli(['--model', model_file, '--samples', '6', '--seed', str(seed),
                                '--out', str(tmp_path / 'f.png'), '--save-map', npy], capsys)
        assert code == 0, err
        maps.append(np.load(npy))
    np.testing.assert_array_equal(maps[0], maps[1])
    assert not np.allclose(maps[0], maps[2])


def test_cli_image_file_is_resized_and_label_by_name(tmp_path, model_file, capsys):
    from PIL import Image
    img = str(tmp_path / 'big.png')
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 48, 3), dtype=np.uint8)).save(img)
    code, out, err = run_cli(['--model', model_file, '--image', img, '--label', 'ship', '--samples', '4',
                              '--out', str(tmp_path / 'f.png')], capsys)
    assert code == 0, err
    assert 'resized and centre-cropped to 32x32' in out and 'big.png' in out


@pytest.mark.parametrize('case', [
    'missing model', 'missing image', 'not an image', 'negative noise', 'nan noise', 'infinite noise', 'zero samples',
    'index out of range', 'other architecture', 'bad label', 'missing output folder', 'no such layer',
    'zero patch', 'zero masks', 'a CAM on a dense layer', 'smoothed XRAI', 'a GPU without CuPy', 'a folder as image',
    'weights not an npz', 'blurred baselines for IG', 'smoothed Gradient SHAP'])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, model_file, capsys, case):
    out_png = str(tmp_path / 'out.png')
    other = str(tmp_path / 'other.npz')
    chainer.serializers.save_npz(other, chainer.links.Linear(4, 2))
    not_image = str(tmp_path / 'notes.png')
    with open(not_image, 'w') as f:
        f.write('not a picture')
    argv = {
        'missing model': ['--model', str(tmp_path / 'nope.npz')],
        'missing image': ['--image', str(tmp_path / 'nope.png')],
        'not an image': ['--image', not_image],
        'negative noise': ['--noise', '-1'],
        'nan noise': ['--noise', '0.1', 'nan'],
        'infinite noise': ['--noise', 'inf'],
        'zero samples': ['--samples', '0'],
        'index out of range': ['--index', '10000'],
        'other architecture': ['--model', other],
        'bad label': ['--label', 'unicorn'],
        'missing output folder': ['--out', str(tmp_path / 'no' / 'such' / 'dir.png')],
        'no such layer': ['--method', 'gradcam', '--layer', 'res9'],
        'zero patch': ['--method', 'occlusion', '--patch', '0'],
        'zero masks': ['--method', 'rise', '--masks', '0'],
        'a CAM on a dense layer': ['--method', 'score_cam', '--layer', 'fc'],
        'smoothed XRAI': ['--method', 'xrai', '--smooth', '--steps', '2'],
        'a GPU without CuPy': ['--gpu', '0'],
        'a folder as image': ['--image', str(tmp_path)],
        'weights not an npz': ['--model', not_image],
        'blurred baselines for IG': ['--method', 'integrated_gradients', '--baseline', 'blurred'],
        'smoothed Gradient SHAP': ['--method', 'gradient_shap', '--smooth'],
    }[case]
    if case == 'a GPU without CuPy' and importlib.util.find_spec('cupy') is not None:
        pytest.skip('CuPy is installed here')
    if '--model' not in argv:
        argv = ['--model', model_file] + argv
    if '--out' not in argv:
        argv = argv + ['--out', out_png, '--save-map', str(tmp_path / 'out.npy')]
    before = set(os.listdir(str(tmp_path)))
    code, out, err = run_cli(argv + ['--samples', '2'] if case != 'zero samples' else argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('smoothgrad.py: error: '), err
    assert set(os.listdir(str(tmp_path))) == before  # nothing written, not even a temporary file
    expected = {'a folder as image': 'is a folder, not an image file', 'weights not an npz': '(not an .npz file)',
                'a GPU without CuPy': 'not installed (Chainer',
                'blurred baselines for IG': '--baseline blurred is a set of baselines: for --method gradient_shap',
                'smoothed Gradient SHAP': 'SmoothGrad does not apply to GradientSHAP'}
    assert expected.get(case, '') in lines[0]


def test_cli_as_a_process_reports_missing_model(tmp_path):
    """The real entry point: exit status 2 and a one-line message, no traceback."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'smoothgrad.py'), '--model',
                           str(tmp_path / 'none.npz'), '--out', str(tmp_path / 'x.png')],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and 'no trained model found' in proc.stderr
    assert not os.path.exists(str(tmp_path / 'x.png'))


def test_cli_methods_and_gallery(tmp_path, model_file, capsys):
    png = str(tmp_path / 'ig.png')
    code, out, err = run_cli(['--model', model_file, '--method', 'integrated_gradients', '--steps', '16',
                              '--out', png], capsys)
    assert code == 0, err
    assert 'completeness' in out and os.path.exists(png)
    npy = str(tmp_path / 'gb.npy')
    code, _, err = run_cli(['--model', model_file, '--method', 'guided_backprop', '--smooth', '--aggregate', 'var',
                            '--noise', '0.1', '0.2', '--samples', '4', '--out', png, '--save-map', npy], capsys)
    assert code == 0, err
    assert np.load(npy).shape == (2, 32, 32)
    code, _, err = run_cli(['--model', model_file, '--method', 'gradcam', '--layer', 'conv2', '--out', png,
                            '--save-map', npy], capsys)
    assert code == 0, err
    assert np.load(npy).shape == (1, 32, 32)
    for method, extra in (('blur_ig', ['--steps', '8']), ('guided_ig', ['--steps', '8']), ('xrai', ['--steps', '4']),
                          ('gradcam_plus_plus', []), ('score_cam', ['--layer', 'conv3']), ('rise', ['--masks', '64']),
                          ('deconvnet', []), ('gradient_shap', ['--samples', '8'])):
        code, out, err = run_cli(['--model', model_file, '--method', method, '--out', png, '--save-map', npy] + extra,
                                 capsys)
        assert code == 0, err
        assert np.load(npy).shape == (1, 32, 32) and np.abs(np.load(npy)).max() > 0
        assert ('%s completeness' % method in out) == (method in ('blur_ig', 'guided_ig', 'gradient_shap'))
    gallery = str(tmp_path / 'all.png')
    code, _, err = run_cli(['--model', model_file, '--method', 'all', '--samples', '2', '--steps', '4',
                            '--out', gallery], capsys)
    assert code == 0, err
    from PIL import Image
    with Image.open(gallery) as img:
        assert img.size[1] > 3.5 * img.size[0]  # a row for each of the methods, four columns


@pytest.mark.parametrize('method, sums_to', [('gradient_shap', 'completeness'),
                                             ('deeplift_shap', 'summation-to-delta')])
def test_cli_shap_methods_take_their_baselines_from_the_given_set(tmp_path, model_file, capsys, method, sums_to):
    """--baseline black, blurred, an image or a folder of images: each a different map; --samples draws (Gradient
    SHAP) or blurs (DeepLIFT-SHAP)."""
    from PIL import Image
    from sgrad.data import load_test_images
    folder = tmp_path / 'baselines'
    folder.mkdir()
    for k, image in enumerate(load_test_images(50, 53)[0]):
        Image.fromarray((255 * image.transpose(1, 2, 0)).round().astype(np.uint8)).save(str(folder / ('%d.png' % k)))
    maps = []
    for baseline in ('black', 'blurred', str(folder / '0.png'), str(folder)):
        npy = str(tmp_path / 'm.npy')
        code, out, err = run_cli(['--model', model_file, '--method', method, '--baseline', baseline,
                                  '--samples', '6', '--out', str(tmp_path / 'f.png'), '--save-map', npy], capsys)
        assert code == 0 and '%s %s' % (method, sums_to) in out, err
        maps.append(np.load(npy))
    assert all(not np.allclose(a, b) for k, a in enumerate(maps) for b in maps[k + 1:])


def test_cli_rejects_zero_steps(tmp_path, model_file, capsys):
    code, _, err = run_cli(['--model', model_file, '--method', 'integrated_gradients', '--steps', '0',
                            '--out', str(tmp_path / 'x.png')], capsys)
    assert code == 2 and err.strip().count('\n') == 0 and not os.path.exists(str(tmp_path / 'x.png'))


def test_cli_explains_a_photograph_with_efficientnet(tmp_path, capsys):
    png, npy = str(tmp_path / 'coffee.png'), str(tmp_path / 'coffee.npy')
    code, out, err = run_cli(['--model', 'efficientnet-lite0', '--image', os.path.join(ROOT, 'data', 'photos',
                                                                                     'coffee.png'),
                              '--samples', '2', '--out', png, '--save-map', npy], capsys)
    assert code == 0, err
    assert 'top-3 predictions: espresso' in out and 'centre-cropped to 224x224' in out
    assert np.load(npy).shape == (1, 224, 224)


def test_cli_says_that_guided_ig_on_a_photograph_depends_on_the_kernels_rounding(tmp_path, capsys):
    """docs/exactness.md: Guided IG amplifies float32 rounding on photographs; a CIFAR-10 image gets no note."""
    photo = ['--model', 'efficientnet-lite0', '--image', os.path.join(ROOT, 'data', 'photos', 'coffee.png')]
    for argv, noted in ((photo, True), ([], False)):
        code, out, err = run_cli(argv + ['--method', 'guided_ig', '--steps', '2', '--out', str(tmp_path / 'g.png')],
                                 capsys)
        assert code == 0, err
        assert ("note: Guided IG's float32 map of a 224x224 image depends on the rounding" in out) == noted


USER_MODEL = '''
import chainer, chainer.functions as F, chainer.links as L

class Net(chainer.Chain):
    CLASS_NAMES = ('left', 'right')
    IMAGE_SIZE = 16

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 4, 3, pad=1)
            self.conv2 = L.Convolution2D(4, 4, 3, pad=1)
            self.fc = L.Linear(None, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))))
'''


def test_cli_explains_a_users_own_model(tmp_path, capsys):
    source, weights = write_user_model(tmp_path, USER_MODEL)
    npy = str(tmp_path / 'm.npy')
    for method in ('smoothgrad', 'guided_backprop', 'gradcam'):
        code, out, err = run_cli(['--arch', '%s:Net' % source, '--model', weights, '--image',
                                  os.path.join(ROOT, 'data', 'photos', 'rocket.jpg'), '--label', 'right',
                                  '--method', method, '--samples', '3', '--out', str(tmp_path / 'f.png'),
                                  '--save-map', npy], capsys)
        assert code == 0, err
        assert 'Net from net.npz' in out and np.load(npy).shape == (1, 16, 16)
    code, _, err = run_cli(['--arch', '%s:Nope' % source, '--out', str(tmp_path / 'g.png')], capsys)
    assert code == 2 and "has no chainer.Link class 'Nope'" in err
    other = str(tmp_path / 'other.npz')
    chainer.serializers.save_npz(other, chainer.links.Linear(3, 2))
    code, _, err = run_cli(['--arch', '%s:Net' % source, '--model', other, '--out', str(tmp_path / 'g.png')], capsys)
    assert code == 2 and err.count('\n') == 1 and 'does not hold Net weights' in err, err
    assert not os.path.exists(str(tmp_path / 'g.png'))


def write_user_model(tmp_path, source):
    """mynet.py holding ``source`` and Net's weights (made at 16x16) beside it: (module path, weights path)."""
    path = tmp_path / 'mynet.py'
    path.write_text(source)
    namespace = {}
    exec(USER_MODEL, namespace)
    net = namespace['Net']()
    net(np.zeros((1, 3, 16, 16), np.float32))  # L.Linear(None, ...) takes its size from the first call
    weights = str(tmp_path / 'net.npz')
    chainer.serializers.save_npz(weights, net)
    return str(path), weights


def test_cli_a_users_model_without_image_size_constructor_defaults_or_weights(tmp_path, capsys):
    source, weights = write_user_model(tmp_path, USER_MODEL.replace('    IMAGE_SIZE = 16\n', '') + """
class NeedsWidth(Net):
    def __init__(self, width, *args, scale=1, **kwargs):
        super().__init__()
""")
    photo, out = os.path.join(ROOT, 'data', 'photos', 'rocket.jpg'), str(tmp_path / 'f.png')
    common = ['--image', photo, '--samples', '2', '--out', out]
    code, _, err = run_cli(['--arch', source + ':Net', '--model', weights] + common, capsys)
    assert code == 2 and err.count('\n') == 1, err
    assert 'Net from net.npz cannot take a 640x427 image' in err and 'set IMAGE_SIZE on the class, or pass --size N' in err
    code, _, err = run_cli(['--arch', source + ':NeedsWidth', '--model', weights] + common, capsys)
    assert code == 2 and err.count('\n') == 1 and 'NeedsWidth needs constructor arguments (width)' in err, err
    code, _, err = run_cli(['--arch', source + ':Net'] + common, capsys)
    assert code == 2 and err.count('\n') == 1 and 'no weights given' in err and '--random-weights' in err, err
    assert not os.path.exists(out)  # the refused runs wrote nothing
    code, out_text, err = run_cli(['--arch', source + ':Net', '--model', weights, '--size', '16'] + common, capsys)
    assert code == 0 and os.path.exists(out), err
    code, out_text, err = run_cli(['--arch', source + ':Net', '--random-weights', '--size', '24'] + common, capsys)
    assert code == 0 and 'Net (random weights)' in out_text, err
    code, _, err = run_cli(['--random-weights'] + common, capsys)
    assert code == 2 and 'for --arch models' in err


def test_cli_gallery_of_a_photograph_lowers_what_is_not_given_and_says_so(tmp_path, capsys, monkeypatch):
    source, _ = write_user_model(tmp_path, USER_MODEL)
    drawn = {}
    monkeypatch.setattr(smoothgrad, 'draw_grid', lambda f, rows, title: drawn.update(rows=rows, title=title))
    argv = ['--arch', source + ':Net', '--random-weights', '--size', '64', '--method', 'all', '--out',
            str(tmp_path / 'g.png'), '--image', os.path.join(ROOT, 'data', 'photos', 'coffee.png')]
    code, _, err = run_cli(argv + ['--samples', '3'], capsys)
    assert code == 0, err
    assert 'N=3' in drawn['title'] and 'lowered for a 64x64 gallery: steps 8, masks 500' in drawn['title']
    assert 'occlusion, score_cam, rise unsmoothed' in drawn['title']
    headings = {row[1][0]: [panel[0] for panel in row if panel] for row in drawn['rows']}
    assert headings['rise'] == ['input', 'rise'] and headings['occlusion'] == ['input', 'occlusion', 'signed']
    assert headings['gradcam at conv2'] == ['input', 'gradcam at conv2', 'smoothed, noise 10%']
    code, _, err = run_cli(argv[:3] + ['--size', '16'] + argv[5:], capsys)  # a 16x16 gallery: nothing lowered
    assert code == 0 and 'lowered' not in drawn['title'] and 'N=100' in drawn['title'], err


def test_the_readme_s_own_model_example_runs(tmp_path, capsys):
    """The README's mynet.py, as written there, with weights saved as it says, explained on a photograph."""
    import re
    with open(os.path.join(ROOT, 'README.md')) as f:
        source = next(block for block in re.findall(r'```python\n(.*?)```', f.read(), re.S) if '# mynet.py' in block)
    (tmp_path / 'mynet.py').write_text(source)
    namespace = {}
    exec(source, namespace)
    net = namespace['Net']()
    net(np.zeros((1, 3, net.IMAGE_SIZE, net.IMAGE_SIZE), np.float32))  # L.Linear(None, ...) sizes itself
    chainer.serializers.save_npz(str(tmp_path / 'mynet.npz'), net)
    code, out, err = run_cli(['--arch', str(tmp_path / 'mynet.py') + ':Net', '--model', str(tmp_path / 'mynet.npz'),
                              '--image', os.path.join(ROOT, 'data', 'photos', 'coffee.png'), '--method', 'gradcam',
                              '--out', str(tmp_path / 'f.png')], capsys)
    assert code == 0, err
    assert 'Net from mynet.npz, coffee.png' in out and ('cat' in out or 'dog' in out)


def test_a_gallery_of_the_loss_leaves_out_the_methods_of_the_class_score(model):
    """DeepLIFT, DeepLIFT-SHAP and LRP explain the class score only: --method all --objective loss leaves them
    out and its title says so; with the score they are in."""
    from sgrad.saliency import GradientEngine
    x = np.random.RandomState(0).uniform(0, 1, (3, 32, 32)).astype(np.float32)
    for objective, expected in (('loss', False), ('score', True)):
        args = smoothgrad.parse_args(['--method', 'all', '--objective', objective])
        rows, note = smoothgrad.gallery(args, GradientEngine(model, objective), x, None)
        headings = [plain[0][0] for plain, _ in rows]
        assert [any(h.startswith(name) for h in headings) for name in ('deeplift', 'lrp')] == [expected] * 2
        assert ('deeplift, deeplift_shap, lrp left out' in note) != expected
