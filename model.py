"""The CIFAR-10 classifier that the saliency maps explain: CifarNet, a small ResNet (sgrad/cifarnet.py).

It is defined in the package, so that ``pip install .`` gives it to code in any folder
(``from sgrad.cifarnet import load_model``); this module hands the same names to the scripts
beside it and to ``from model import load_model`` in the clone. Images are float32 (N, 3, 32, 32)
in [0, 1]; the network standardises them itself (``normalize``).
"""
from sgrad.cifarnet import (CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES, DEFAULT_MODEL_PATH,  # noqa: F401
                            CifarNet, global_max_pool, load_model, normalize)
