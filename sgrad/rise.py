"""RISE: saliency from the class probabilities of randomly masked copies of an image."""
import numpy as np

from sgrad.errors import InputError
from sgrad.saliency import Method, bilinear_matrix

#: Images of at most this many pixels a side (CIFAR-10's 32) get SMALL_IMAGE_CELLS cells a side by
#: default, larger ones (ImageNet's 224) the paper's PAPER_CELLS.
SMALL_IMAGE_SIDE = 64
SMALL_IMAGE_CELLS = 4
PAPER_CELLS = 7


class RISE(Method):
    """RISE, Randomized Input Sampling for Explanation (Petsiuk et al. 2018, arXiv:1806.07421):

        S_c(x) = 1 / (N p) sum_{i=1..N} P_c(x * M_i) M_i

    with P_c the softmax probability of class c (whatever the engine's objective) and M_i random
    masks made as the authors' ``generate_masks`` makes them: an s x s grid of cells, each on with
    probability p, upsampled bilinearly to s + 1 cells a side, shifted by 0 .. cell - 1 pixels in
    each direction and cropped to H x W (cell = ceil(H / s), ceil(W / s)). The upsampling is
    sgrad.saliency.bilinear_matrix's, the CAMs' interpolation (half-pixel centres, edges held:
    scikit-image's resize with mode='edge'), which makes a chunk of masks two batched matrix
    products; the reference's mode='reflect' differs only in the upsampled grid's outer half cells.

    The masks are drawn from RandomState(seed) and applied in chunks of the engine's batch size, so
    memory does not grow with N; every call draws the same masks, so that an image's map does not depend
    on the images explained beside it (nor on the rank under mpiexec). Masked pixels are black, the
    paper's x * M; RISE's code masks the normalised input, so ``fill`` (C,) fills them with a colour
    (the model's MEAN_COLOUR reproduces that code).

    masks: N, default 4000 (xplique's default, with s = 7 and p = 0.5; RISE's PyTorch notebook uses 6000).
    cells: s; default 7 (the paper's, at 224x224: cells of 32 pixels, a ResNet's last feature map)
      or, for images of at most 64 pixels a side, 4 (at 32x32: cells of 8 pixels, CifarNet's last
      feature map).
    """

    signed = False

    def __init__(self, engine, masks=4000, cells=None, p=0.5, seed=0, fill=None):
        super().__init__(engine)
        if masks <= 0:
            raise InputError('--masks must be positive, got %d' % masks)
        if cells is not None and cells <= 0:
            raise InputError('--cells must be positive, got %d' % cells)
        if not 0 < p <= 1:
            raise InputError('the probability p of a cell being on must be in (0, 1], got %g' % p)
        self.masks, self.cells, self.p, self.seed, self.fill = masks, cells, p, seed, fill

    def passes(self, x):
        return 0, self.masks

    def attribute(self, xs, target):
        targets = np.broadcast_to(target, len(xs))
        sums = np.zeros((len(xs),) + xs.shape[-2:], dtype=np.float64)
        rng = np.random.RandomState(self.seed)
        fill = np.zeros(xs.shape[1], xs.dtype) if self.fill is None else np.asarray(self.fill, xs.dtype)
        for chunk in self.engine.batches(self.masks, xs.shape, 'masks'):
            masks = self.draw_masks(rng, chunk.stop - chunk.start, xs.shape[-2:])[:, None]
            for x, t, total in zip(xs, targets, sums):
                masked = x * masks + fill[:, None, None] * (1 - masks)
                probabilities = self.engine.probabilities(masked)[:, t]
                total += np.tensordot(probabilities, masks[:, 0], axes=1)
        return (sums / (self.masks * self.p))[:, None].astype(xs.dtype)

    def draw_masks(self, rng, count, size):
        """``count`` masks of size (H, W) from ``rng``: the grids of all, then their (row, column) shifts."""
        cells = self.cells or (SMALL_IMAGE_CELLS if min(size) <= SMALL_IMAGE_SIDE else PAPER_CELLS)
        cell = [-(-side // cells) for side in size]
        grids = (rng.random_sample((count, cells, cells)) < self.p).astype(np.float32)
        shifts = rng.randint(0, cell, size=(count, 2))
        # cropping a grid upsampled to s + 1 cells is taking a window of the interpolation matrices' rows
        rows, cols = (bilinear_matrix(cells, (cells + 1) * c) for c in cell)
        windows = np.arange(size[0])[None] + shifts[:, :1], np.arange(size[1])[None] + shifts[:, 1:]
        return rows[windows[0]] @ grids @ cols[windows[1]].transpose(0, 2, 1)
