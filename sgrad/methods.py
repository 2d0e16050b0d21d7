"""Every method of the project by its command-line name, and ``make_method``, which builds one with the
options it takes. 'smoothgrad' (SmoothGrad over the gradient) is not here: SmoothGrad wraps any of them."""
import inspect

from sgrad.cam import GradCAMPlusPlus, ScoreCAM
from sgrad.deeplift import DeepLIFT, DeepLIFTSHAP
from sgrad.lrp import LRP
from sgrad.paths import BlurIG, GradientSHAP, GuidedIG
from sgrad.rise import RISE
from sgrad.saliency import (Deconvnet, GradCAM, Gradient, GradientXInput, GuidedBackprop, GuidedGradCAM,
                            IntegratedGradients, Occlusion)
from sgrad.xrai import XRAI

METHODS = {
    'gradient': Gradient,
    'grad_x_input': GradientXInput,
    'guided_backprop': GuidedBackprop,
    'deconvnet': Deconvnet,
    'integrated_gradients': IntegratedGradients,
    'gradient_shap': GradientSHAP,
    'deeplift': DeepLIFT,
    'deeplift_shap': DeepLIFTSHAP,
    'lrp': LRP,
    'blur_ig': BlurIG,
    'guided_ig': GuidedIG,
    'xrai': XRAI,
    'gradcam': GradCAM,
    'guided_gradcam': GuidedGradCAM,
    'gradcam_plus_plus': GradCAMPlusPlus,
    'score_cam': ScoreCAM,
    'occlusion': Occlusion,
    'rise': RISE,
}


#: The methods that run forward passes only, no gradient.
FORWARD_ONLY = ('occlusion', 'score_cam', 'rise')


def make_method(name, engine, **options):
    """The method ``name`` on ``engine``, given those of ``options`` that its constructor takes (steps,
    samples, baseline, layer, patch, stride, masks, composite, ...); an option that is None keeps the method's default."""
    cls = METHODS[name]
    takes = inspect.signature(cls).parameters
    return cls(engine, **{key: value for key, value in options.items() if key in takes and value is not None})
