"""CIFAR-10 access: the full dataset through chainer.datasets.get_cifar10(), a
few shipped test images for offline use; image files from disk, and the shipped
photographs (data/photos, from scikit-image's sample data).

All images come back as float32 (3, H, W) arrays in [0, 1], the models' input
space (see sgrad/cifarnet.py).
"""
import os

import chainer
import numpy as np

from sgrad.errors import InputError

#: Test images 0..SAMPLE_COUNT-1 and their labels, cut from the real CIFAR-10.
SAMPLES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shipped', 'cifar10_test_samples.npz')
N_TEST_IMAGES = 10000
#: Photographs for the ImageNet model, from scikit-image's sample data (see data/photos/README.md).
#: In the clone only: the scripts' examples use them, the package does not ship them.
PHOTOS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'photos')


def to_unit_range(pixels):
    """uint8 pixels -> float32 in [0, 1], with get_cifar10()'s exact arithmetic."""
    x = pixels.astype(np.float32)
    x *= 1. / 255
    return x


def cifar10_cache_path():
    """Where get_cifar10() looks for its cached copy (honours CHAINER_DATASET_ROOT)."""
    return os.path.join(chainer.dataset.get_dataset_root(),
                        'pfnet', 'chainer', 'cifar', 'cifar-10.npz')


def have_local_cifar10():
    return os.path.exists(cifar10_cache_path())


def load_cifar10():
    """(train, test) TupleDatasets of ([0, 1] image, int32 label), or an InputError that says how
    to point Chainer at a local copy when there is none and no download works."""
    try:
        return chainer.datasets.get_cifar10()
    except OSError as e:  # urllib's URLError included
        reason = getattr(e, 'reason', None) or e.strerror or e
        raise InputError('CIFAR-10 is not in %s and could not be downloaded (%s); set CHAINER_DATASET_ROOT '
                         'to a folder holding pfnet/chainer/cifar/cifar-10.npz'
                         % (chainer.dataset.get_dataset_root(), reason))


def load_test_image(index):
    """CIFAR-10 test image ``index`` and its label: shipped copy or full dataset."""
    if not 0 <= index < N_TEST_IMAGES:
        raise InputError('--index must be in 0..%d, got %d'
                         % (N_TEST_IMAGES - 1, index))
    with np.load(SAMPLES_PATH) as samples:
        if index < len(samples['y']):
            return to_unit_range(samples["x"][index]), int(samples['y'][index])
    _, test = load_cifar10()
    x, t = test[index]
    return x, int(t)


def load_test_images(start, stop):
    """CIFAR-10 test images start..stop-1 (N, 3, 32, 32) and their labels: from the shipped copy
    when they are among its images, else from the full dataset."""
    if not 0 <= start < stop <= N_TEST_IMAGES:
        raise InputError('test indices must satisfy 0 <= START < STOP <= %d, got %d:%d'
                         % (N_TEST_IMAGES, start, stop))
    with np.load(SAMPLES_PATH) as samples:
        if stop <= len(samples['y']):
            return to_unit_range(samples['x'][start:stop]), samples['y'][start:stop].astype(np.int32)
    _, test = load_cifar10()
    return chainer.dataset.concat_examples(test[start:stop])


def load_image_folder(folder, size, n=None):
    """The first n (default: all) PNG/JPEG files of ``folder`` in name order, as (N, 3, size, size)
    images (see load_image_file), and their file names."""
    if not os.path.isdir(folder):
        raise InputError('no such folder: %s' % folder)
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg')))[:n]
    if not names:
        raise InputError('no PNG or JPEG images in %s' % folder)
    return np.stack([load_image_file(os.path.join(folder, f), size)[0] for f in names]), names


def load_image_file(path, size=32):
    """An RGB image file as a [0, 1] (3, size, size) array: the shorter side resized to ``size``
    (bilinear), then the centre cropped square; ``size=None`` keeps the image as it is.

    Returns the array and the original (width, height).
    """
    from PIL import Image, UnidentifiedImageError
    if os.path.isdir(path):
        raise InputError('%s is a folder, not an image file (--folder takes a folder of images)' % path)
    if not os.path.isfile(path):
        raise InputError('image file not found: %s' % path)
    try:
        with Image.open(path) as img:
            img = img.convert('RGB')
    except (UnidentifiedImageError, OSError) as e:
        raise InputError('cannot read %s as an image (%s)' % (path, e))
    original = img.size
    if size is not None and original != (size, size):
        scale = size / min(original)
        img = img.resize([max(size, round(side * scale)) for side in original], Image.BILINEAR)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return to_unit_range(np.asarray(img).transpose(2, 0, 1)), original
