"""PAIR saliency's methods on any Chainer model: ``call_model_function(engine)`` is the function that every
method of Google PAIR's ``saliency`` library (``saliency.core``: IntegratedGradients, BlurIG, GuidedIG, XRAI,
GradCam, Occlusion, GetSmoothedMask, ...) calls for gradients, answered by this project's GradientEngine:

    import saliency.core as pair
    from sgrad.pair import call_model_function, to_pair
    mask = pair.GuidedIG().GetMask(to_pair(x), call_model_function(engine), {'target': c})

PAIR's images are channels-last, (H, W, C) and batches (B, H, W, C); the engine's are (N, C, H, W).
The tests drive PAIR's methods through it to hold this project's own batched methods to PAIR's results.
"""
import numpy as np

#: The key of call_model_args that names the explained class.
TARGET = 'target'


def to_pair(x):
    """A (C, H, W) image, or (N, C, H, W) images, channels-last as PAIR takes them."""
    return np.moveaxis(np.asarray(x), -3, -1)


def from_pair(x):
    """PAIR's channels-last (H, W, C) or (B, H, W, C) back to the engine's layout."""
    return np.moveaxis(np.asarray(x), -1, -3)


def call_model_function(engine, layer=None):
    """PAIR's call_model_function(x_value_batch, call_model_args, expected_keys) over ``engine``: input
    gradients of the class call_model_args['target'] (INPUT_OUTPUT_GRADIENTS), the values and gradients of
    the link named ``layer`` (CONVOLUTION_LAYER_VALUES / _OUTPUT_GRADIENTS; None: the last 4-D one, as
    GradCAM), or the class's softmax probability (OUTPUT_LAYER_VALUES)."""
    from saliency.core import base

    def call(x_value_batch, call_model_args=None, expected_keys=None):
        x = np.ascontiguousarray(from_pair(np.asarray(x_value_batch, np.float32)))
        target = call_model_args[TARGET]
        output = {}
        if base.INPUT_OUTPUT_GRADIENTS in expected_keys:
            output[base.INPUT_OUTPUT_GRADIENTS] = to_pair(engine(x, target))
        if {base.CONVOLUTION_LAYER_VALUES, base.CONVOLUTION_OUTPUT_GRADIENTS} & set(expected_keys):
            values, gradients = engine.layer_gradients(x, target, layer)
            output[base.CONVOLUTION_LAYER_VALUES] = to_pair(values)
            output[base.CONVOLUTION_OUTPUT_GRADIENTS] = to_pair(gradients)
        if base.OUTPUT_LAYER_VALUES in expected_keys:
            output[base.OUTPUT_LAYER_VALUES] = engine.probabilities(x)[:, target]
        return output
    return call
