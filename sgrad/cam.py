"""Class activation maps beyond Grad-CAM: Grad-CAM++ and Score-CAM.

Both weigh the channels A_k of a convolutional layer's output, (N, C, h, w), as Grad-CAM does,
and map ReLU(sum_k w_k A_k) to the image with :func:`sgrad.saliency.upsample`; they differ from
it and from each other in the weights w_k alone. The layer is named as for Grad-CAM (``layer=None``:
the last link with a 4-D output), and one that is not 4-D is an InputError naming it
(sgrad.hooks.LinkOutput.check).
"""
import numpy as np

from sgrad.saliency import GradCAM, channel_weighted_map, upsample


def unit_range(maps):
    """Each (h, w) map of (..., h, w) scaled to [0, 1] by its minimum and maximum; a constant map becomes 0."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return np.divide(maps - low, span, out=np.zeros_like(maps), where=span > 0)


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018, arXiv:1710.11063), with the closed-form alpha of an
    exponential output exp(S_c) (the paper's eq. 19, as pytorch-grad-cam computes it):

        alpha_k^ab = g_ab^2 / (2 g_ab^2 + sum_ij A_k^ij g_ab^3)   (0 where the denominator is 0)
        w_k = sum_ab alpha_k^ab ReLU(g_ab),   map = ReLU(sum_k w_k A_k), upsampled to the image

    with g = dS_c/dA_k, the gradient of the engine's objective w.r.t. the layer's output A.
    The paper's factor exp(S_c) scales every w_k of an image alike and is left out.
    """

    @staticmethod
    def weights(feats, grads):
        """w_k, (N, C), from the layer's output A and the gradient g, both (N, C, h, w)."""
        g2 = np.square(grads)
        denominator = 2 * g2 + feats.sum(axis=(2, 3), keepdims=True) * g2 * grads
        alpha = np.divide(g2, denominator, out=np.zeros_like(g2), where=denominator != 0)
        return (alpha * np.maximum(grads, 0)).sum(axis=(2, 3))


class ScoreCAM(GradCAM):
    """Score-CAM (Wang et al. 2020, arXiv:1910.01279), as pytorch-grad-cam computes it:

        M_k = unit_range(upsample(A_k)),   w = softmax_k S_c(x * M_k),   map = ReLU(sum_k w_k A_k), upsampled

    with S_c the engine's objective (forward only) and unit_range the min-max scaling of each
    channel of each image to [0, 1]. The paper's score of a baseline image, subtracted from every
    S_c(x * M_k) of an image, cancels in the softmax. The N x C masked images are made and scored
    in chunks of the engine's batch size, so memory does not grow with the layer's channels.
    """

    def passes(self, x):
        return 0, self.engine.layer_values(x[None], self.layer).shape[1] + 1

    def layer_map(self, xs, target):
        feats = self.engine.layer_values(xs, self.layer)
        return channel_weighted_map(feats, self.weights(xs, target, feats))

    def weights(self, xs, target, feats):
        """w_k, (N, C): the softmax over the channels of the scores of the images xs masked by
        their upsampled channels feats (N, C, h, w)."""
        n, c = feats.shape[:2]
        targets = np.broadcast_to(target, n)
        scores = np.empty(n * c, dtype=np.float64)
        for chunk in self.engine.batches(n * c, xs.shape, 'masked images'):
            image, channel = np.divmod(np.arange(chunk.start, chunk.stop), c)
            masks = unit_range(upsample(feats[image, channel], xs.shape[-2:]))
            scores[chunk] = self.engine.objective_values(xs[image] * masks[:, None], targets[image])
        scores = scores.reshape(n, c)
        exps = np.exp(scores - scores.max(axis=1, keepdims=True))
        return exps / exps.sum(axis=1, keepdims=True)
