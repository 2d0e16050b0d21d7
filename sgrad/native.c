/* The 3x3 convolution (pad 1, stride 1) of (C, H, W, N) activations and its gradients, computed
 * directly: no im2col, no GEMM; and the 2x2 max pooling after it, which keeps each window's first
 * maximum for its gradient. Built by `python -m sgrad.native` (setup.sh) into _native.so beside this
 * file; sgrad/native.py calls it, and the nodes of sgrad/convolution.py, pooling.py, batchnorm.py and
 * depthwise.py fall back to their NumPy + OpenBLAS path where it is absent.
 *
 * With the batch innermost, one image row of one channel is a contiguous run of W*N numbers, and in the
 * input padded by one pixel all round, (C, H+2, (W+2)*N), the tap (ky, kx) of output row h is the run
 * of padded row h + ky starting kx*N numbers in. So
 *
 *     y[o, h, j] = b[o] + sum over c, ky, kx of  W[o, c, ky, kx] * xpad[c, h + ky, j + kx*N]
 *
 * is, for every output row, sums of contiguous runs scaled by scalars. A tile keeps OB output channels
 * times VB vectors of one row in registers while the channels stream past (in chunks of CB, so that
 * the rows a chunk reads stay in the L1 cache while every block of output channels uses them); bias
 * and ReLU are applied as the tile is stored. The input gradient is the same convolution of the
 * output gradient with the kernels transposed and flipped, its ReLU mask applied while padding; the
 * weight gradient sums products of the same runs with the output gradient's rows.
 *
 * Where H and W are even, the forward and input-gradient convolutions run by Winograd F(2x2, 3x3)
 * instead (winograd_3x3): 16 multiplies per 2x2 output tile and input channel for the direct 36. Per
 * block of tiles along a tile row: the 4x4 input tiles transformed (B^T d B) for all 16 positions, then
 * 16 independent products (O x C kernels times C x columns, by the same register tiles), then the
 * output transform (A^T m A) with bias and ReLU. The lanes of a vector are images of the batch, so
 * every transform is elementwise on vectors.
 *
 * For EfficientNet-Lite0's (N, C, H, W) activations: the depthwise k x k convolution (any stride and
 * padding) and its input gradient (depthwise, depthwise_adjoint), the gradient through a ReLU or
 * ReLU6 (relu_gradient), and the matrix product of its 1x1 convolutions and of both models' linear
 * layers (product).
 *
 * Every kernel computes a number of one image by the same operations in the same order whatever the
 * batch: a vector's lanes are images (or pixels of one image) that each run the same multiply-adds, a
 * partial vector computes its lanes as a whole one does, and no sum over one image's numbers is split by
 * the batch's size (the sums over a batch, of the weight gradient and training's BatchNorm, are training's).
 *
 * For sgrad/segments.py (XRAI's segments): the merges of Felzenszwalb's graph segmentation over an image's
 * sorted edges at several scales (felzenszwalb_segments), and each segment's mask dilated by a disk
 * (dilate_labels), and the cubic resize before it, as SciPy computes it (spline_zoom_3d).
 *
 * The file is compiled twice over (float, then double) by including itself: one source, two types.
 */
#ifndef REAL
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
/* A tile's OB x VB accumulators, its VB inputs and a weight fit the vector registers: 8 x 3 of the 32
 * (AVX-512); 6 x 2 of the 16 (AVX2, SSE), where 8 x 3 spills to the stack (a CifarNet map on an AVX2
 * EPYC: 199 against 130-144 ms; 4 x 3, 5 x 2 and 3 x 4 measured between the two) */
#if VBYTES == 64
#define REGISTER_OB 8
#define REGISTER_VB 3
#else
#define REGISTER_OB 6
#define REGISTER_VB 2
#endif
#ifndef OB
#define OB REGISTER_OB /* output channels per tile */
#endif
#ifndef VB
#define VB REGISTER_VB /* vectors per tile */
#endif
#ifndef WB
#define WB (VBYTES == 64 ? 8 : 4) /* the weight gradient's tile: WB x 3 sums, 3 inputs, a gradient vector */
#endif
#ifndef DV
#define DV 4 /* the depthwise tile's vectors: of one output row, or one or two vectors of 4 or 2 rows */
#endif
#ifndef CB
#define CB 8 /* input channels per chunk (2-16 measured alike here) */
#endif

int tile_channels(void) { return OB; }

#ifndef TARGET
#define TARGET "unnamed"
#endif
/* the -march it was built for (sgrad/native.py passes it), and whether its multiply-adds round once */
const char *target(void) { return TARGET; }
#ifdef __FMA__
int fused_multiply_add(void) { return 1; }
#else
int fused_multiply_add(void) { return 0; }
#endif

/* TILE(nv) for the nv <= VB vectors of a tile, with a constant count in each branch, so that the
 * tile unrolls fully (a count above VB is dead code) */
#define BY_VECTORS(nv)                         \
    do {                                       \
        if ((nv) == VB)                        \
            TILE(VB);                          \
        else if ((nv) == 3 && VB > 3)          \
            TILE(3);                           \
        else if ((nv) == 2 && VB > 2)          \
            TILE(2);                           \
        else                                   \
            TILE(1);                           \
    } while (0)
int vector_bytes(void) { return VBYTES; }

/* Winograd F(2x2, 3x3) (Lavin and Gray, arXiv 1509.09308): a 4x4 input tile d gives a 2x2 output tile
 * Y = A^T [(G g G^T) . (B^T d B)] A. Each row of B^T combines two rows of d, +first -second or both +:
 * WINOGRAD_ROWS[xi] are those two rows and WINOGRAD_SIGN[xi] the second one's sign. A^T = [[1, 1, 1, 0],
 * [0, 1, -1, -1]] (winograd_output). */
static const int WINOGRAD_ROWS[4][2] = {{0, 2}, {1, 2}, {2, 1}, {1, 3}};
static const int WINOGRAD_SIGN[4] = {-1, 1, -1, -1};

/* Felzenszwalb and Huttenlocher's graph segmentation (IJCV 2004) as scikit-image runs it, for sgrad/segments.py:
 * the merges of the edges taken in increasing cost, for each of several scales, over one sorted edge list.
 *
 * The union-find forest keeps every component's smallest pixel as its root (a joined root points to the
 * smaller one), as scikit-image's does, so the partition and the labels follow from the merges alone; finding
 * a root here also halves the path to it (which leaves every root and the partition unchanged). */
static inline long felzenszwalb_root(long *forest, long n)
{
    while (forest[n] < n) {
        forest[n] = forest[forest[n]];
        n = forest[n];
    }
    return n;
}

/* Joins the components with roots a != b; returns the new root (the smaller). */
static inline long felzenszwalb_join(long *forest, long *size, long a, long b)
{
    long root = a < b ? a : b, other = a < b ? b : a;
    forest[other] = root;
    size[root] = size[a] + size[b];
    return root;
}

/* labels[s * n_pixels + p] (s < n_scales) = the segment of pixel p at the scale scales[s] (already divided by
 * 255, as scikit-image does): edge e joins pixels ends[2e] and ends[2e + 1] and costs costs[e], the edges
 * sorted by cost. Two components merge when the edge's cost is below the smaller of their thresholds,
 * internal cost + scale / size each, rounded to float (scikit-image keeps them as C floats); then a second
 * pass over the edges merges any component smaller than min_size with its neighbour. Segments are numbered
 * in the raster order of their first pixel. Returns nonzero if out of memory. */
int felzenszwalb_segments(const int *ends, const double *costs, long n_edges, long n_pixels, const double *scales,
                          int n_scales, long min_size, long *labels)
{
    long *forest = malloc(2 * n_pixels * sizeof(long));
    double *internal = malloc(n_pixels * sizeof(double));
    if (!forest || !internal) {
        free(forest);
        free(internal);
        return 1;
    }
    long *size = forest + n_pixels;
    for (int s = 0; s < n_scales; s++) {
        double scale = scales[s];
        for (long p = 0; p < n_pixels; p++) {
            forest[p] = p;
            size[p] = 1;
            internal[p] = 0;
        }
        for (long e = 0; e < n_edges; e++) {
            long a = felzenszwalb_root(forest, ends[2 * e]), b = felzenszwalb_root(forest, ends[2 * e + 1]);
            if (a == b)
                continue;
            float threshold_a = internal[a] + scale / size[a], threshold_b = internal[b] + scale / size[b];
            if (costs[e] < (threshold_a < threshold_b ? threshold_a : threshold_b))
                internal[felzenszwalb_join(forest, size, a, b)] = costs[e];
        }
        for (long e = 0; e < n_edges; e++) {
            long a = felzenszwalb_root(forest, ends[2 * e]), b = felzenszwalb_root(forest, ends[2 * e + 1]);
            if (a != b && (size[a] < min_size || size[b] < min_size))
                felzenszwalb_join(forest, size, a, b);
        }
        long *out = labels + s * n_pixels, count = 0;
        for (long p = 0; p < n_pixels; p++) {
            long root = felzenszwalb_root(forest, p);
            out[p] = root == p ? count++ : out[root];
        }
    }
    free(forest);
    free(internal);
    return 0;
}

/* masks[l - first, y, x] = 1 (masks zeroed, (count, H, W) bytes) where a pixel of label l lies in the
 * footprint centred on (y, x): each segment's mask dilated by a footprint that is, on row dy of
 * -radius..radius, the run of columns -half_widths[dy + radius]..half_widths[dy + radius] (a disk);
 * labels (H, W) of first..first + count - 1. A run of equal labels along a row sets the rows of its dilation
 * at once. */
void dilate_labels(const long *labels, int H, int W, long first, const int *half_widths, int radius,
                   unsigned char *masks)
{
    for (int y = 0; y < H; y++) {
        const long *row = labels + (long)y * W;
        for (int x0 = 0, x1; x0 < W; x0 = x1) {
            for (x1 = x0 + 1; x1 < W && row[x1] == row[x0]; x1++)
                ;
            unsigned char *mask = masks + (row[x0] - first) * H * W;
            for (int dy = -radius; dy <= radius; dy++) {
                int r = half_widths[dy + radius], yy = y + dy;
                if (r < 0 || yy < 0 || yy >= H)
                    continue;
                int begin = x0 - r < 0 ? 0 : x0 - r, end = x1 + r > W ? W : x1 + r;
                memset(mask + (long)yy * W + begin, 1, end - begin);
            }
        }
    }
}

/* The cubic-spline resampling of an (H, W, C) image's spline coefficients (SciPy's ndimage.zoom after its
 * prefilter), with the arithmetic in SciPy's order so that the result is the same to the bit: output point
 * (i, j, k) sums over the taps (a, b, c) of 0..3 each, c fastest, coefficients[rows[i] + a, cols[j] + b,
 * channels[k] + c] * row_weights[4i + a] * column_weights[4j + b] * channel_weights[4k + c], multiplied left
 * to right and added in that order (no fused multiply-adds, which round once where SciPy rounds twice).
 * Every tap lies inside the coefficients (the caller pads them). out: (OH, OW, OC); acc: OW doubles. */
#ifndef __clang__
__attribute__((optimize("fp-contract=off")))
#endif
void spline_zoom_3d(const double *coefficients, long W, long C, const long *rows, const double *row_weights, long OH,
                    const long *cols, const double *column_weights, long OW, const long *channels,
                    const double *channel_weights, long OC, double *acc, double *out)
{
#ifdef __clang__
#pragma clang fp contract(off)
#endif
    for (long i = 0; i < OH; i++)
        for (long k = 0; k < OC; k++) {
            for (long j = 0; j < OW; j++)
                acc[j] = 0.0;
            for (int a = 0; a < 4; a++) {
                const double *row = coefficients + (rows[i] + a) * W * C;
                double wa = row_weights[4 * i + a];
                for (int b = 0; b < 4; b++)
                    for (int c = 0; c < 4; c++) {
                        const double *tap = row + channels[k] + c + b * C;
                        double wc = channel_weights[4 * k + c];
                        for (long j = 0; j < OW; j++)
                            acc[j] += tap[cols[j] * C] * wa * column_weights[4 * j + b] * wc;
                    }
            }
            for (long j = 0; j < OW; j++)
                out[(i * OW + j) * OC + k] = acc[j];
        }
}

#define REAL float
#define LANE int /* an integer as wide as REAL, for vector masks */
#define NAME(name) name##_float
#include "native.c"
#undef REAL
#undef LANE
#undef NAME
#define REAL double
#define LANE long long
#define NAME(name) name##_double
#include "native.c"

#else
typedef REAL NAME(vec) __attribute__((vector_size(VBYTES), aligned(sizeof(REAL)), may_alias));
typedef LANE NAME(lanes) __attribute__((vector_size(VBYTES), aligned(sizeof(LANE)), may_alias)); /* a comparison's result: all ones where true */
typedef unsigned char NAME(bytes) __attribute__((vector_size(VBYTES / sizeof(REAL)), aligned(1), may_alias)); /* a vector's worth of uint8 */
#define vec NAME(vec)
#define VL ((int)(VBYTES / sizeof(REAL)))

/* The tile of output channels [o0, o0 + OB) (those below O) and nv vectors of row h from column j0 on,
 * summed over input channels [c0, c1): from zero if first, else added to what y holds; bias and ReLU
 * applied if last. w: the chunk's kernels, (c1 - c0, 9, OB). The last vector of a row may be partial:
 * its loads read on into the next row (or the arrays' slack), its store stops at the row's end. */
static inline __attribute__((always_inline)) void
NAME(tile)(const REAL *xpad, int H, int W, int N, const REAL *w, int nv, int c0, int c1, int first,
           int last, const REAL *bias, int relu, REAL *y, int O, int o0, int h, int j0)
{
    size_t L = (size_t)W * N, prow = L + 2 * (size_t)N, plane = (size_t)(H + 2) * prow;
    size_t ostride = (size_t)H * L;
    REAL *out = y + ((size_t)o0 * H + h) * L + j0;
    int outputs = O - o0 < OB ? O - o0 : OB;
    vec acc[OB][VB];
#pragma GCC unroll 8
    for (int o = 0; o < OB; o++)
#pragma GCC unroll 8
        for (int v = 0; v < VB; v++)
            if (v < nv)
                acc[o][v] = first || o >= outputs ? (vec){0} : *(const vec *)(out + o * ostride + v * VL);
    for (int c = c0; c < c1; c++) {
        const REAL *rows = xpad + c * plane + (size_t)h * prow + j0;
        for (int ky = 0; ky < 3; ky++)
            for (int kx = 0; kx < 3; kx++, w += OB) {
                const REAL *run = rows + ky * prow + kx * N;
                vec x[VB];
#pragma GCC unroll 8
                for (int v = 0; v < VB; v++)
                    if (v < nv)
                        x[v] = *(const vec *)(run + v * VL);
#pragma GCC unroll 8
                for (int o = 0; o < OB; o++)
#pragma GCC unroll 8
                    for (int v = 0; v < VB; v++)
                        if (v < nv)
                            acc[o][v] += w[o] * x[v];
            }
    }
    for (int o = 0; o < outputs; o++)
        for (int v = 0; v < nv; v++) {
            vec r = acc[o][v];
            if (last && bias)
                r += bias[o0 + o];
            if (last && relu) {
                __typeof__(r > 0) positive = r > 0;
                r = (vec)((__typeof__(positive))r & positive);
            }
            int left = (int)(L - j0) - v * VL;
            if (left >= VL)
                *(vec *)(out + o * ostride + v * VL) = r;
            else
                memcpy(out + o * ostride + v * VL, &r, left * sizeof(REAL));
        }
}

/* y (O, H, W*N) = the convolution of xpad (C, H+2, (W+2)*N) with the kernels wr (ceil(O/OB), C, 9, OB),
 * plus bias (or NULL), then ReLU if relu; output channels [o_begin, o_end) (o_begin a multiple of OB),
 * rows [h_begin, h_end). Both arrays need VL numbers of slack after their end. */
void NAME(convolution_3x3)(const REAL *xpad, int C, int H, int W, int N, const REAL *wr, const REAL *bias,
                           int relu, REAL *y, int O, int o_begin, int o_end, int h_begin, int h_end)
{
    int L = W * N;
    for (int h = h_begin; h < h_end; h++)
        for (int c0 = 0; c0 < C; c0 += CB) {
            int c1 = c0 + CB < C ? c0 + CB : C, first = c0 == 0, last = c1 == C;
            for (int j0 = 0; j0 < L; j0 += VB * VL) {
                int nv = (L - j0 + VL - 1) / VL;
                nv = nv < VB ? nv : VB;
                for (int o0 = o_begin; o0 < o_end; o0 += OB) {
                    const REAL *w = wr + ((size_t)(o0 / OB) * C + c0) * 9 * OB;
#define TILE(n) NAME(tile)(xpad, H, W, N, w, n, c0, c1, first, last, bias, relu, y, O, o0, h, j0)
                    BY_VECTORS(nv);
#undef TILE
                }
            }
        }
}

/* One tile of the Winograd multiply: m (outputs x nv vectors from col on, rows `cols` apart) = the sum over
 * c of u[c, o] * v[c, col...], for one transform position and OB output channels. */
static inline __attribute__((always_inline)) void
NAME(winograd_tile)(const REAL *v, size_t cols, int C, const REAL *u, int nv, REAL *m, int outputs, size_t col)
{
    vec acc[OB][VB];
#pragma GCC unroll 8
    for (int o = 0; o < OB; o++)
#pragma GCC unroll 8
        for (int k = 0; k < VB; k++)
            acc[o][k] = (vec){0};
    for (int c = 0; c < C; c++, u += OB) {
        vec x[VB];
#pragma GCC unroll 8
        for (int k = 0; k < VB; k++)
            if (k < nv)
                x[k] = *(const vec *)(v + c * cols + col + k * VL);
#pragma GCC unroll 8
        for (int o = 0; o < OB; o++)
#pragma GCC unroll 8
            for (int k = 0; k < VB; k++)
                if (k < nv)
                    acc[o][k] += u[o] * x[k];
    }
#pragma GCC unroll 8
    for (int o = 0; o < OB; o++)
#pragma GCC unroll 8
        for (int k = 0; k < VB; k++)
            if (o < outputs && k < nv)
                *(vec *)(m + o * cols + col + k * VL) = acc[o][k];
}

/* B^T d B for one vector of lanes: d[a][b] = p[a * prow + b * N], the 16 results 'stride' numbers apart. */
static inline void NAME(winograd_input)(const REAL *p, size_t prow, size_t N, REAL *out, size_t stride)
{
    vec rows[4][4], d[4][4];
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++)
            d[a][b] = *(const vec *)(p + a * prow + b * N);
    for (int xi = 0; xi < 4; xi++)
        for (int b = 0; b < 4; b++)
            rows[xi][b] = d[WINOGRAD_ROWS[xi][0]][b] + (REAL)WINOGRAD_SIGN[xi] * d[WINOGRAD_ROWS[xi][1]][b];
    for (int xi = 0; xi < 4; xi++)
        for (int nu = 0; nu < 4; nu++)
            *(vec *)(out + (xi * 4 + nu) * stride) =
                rows[xi][WINOGRAD_ROWS[nu][0]] + (REAL)WINOGRAD_SIGN[nu] * rows[xi][WINOGRAD_ROWS[nu][1]];
}

/* A^T m A for one vector of lanes: m[xi][nu] = p[(xi * 4 + nu) * stride]; y[i][j], then plus bias, ReLU. */
static inline void NAME(winograd_output)(const REAL *p, size_t stride, REAL bias, int relu, vec y[2][2])
{
    vec half[4][2];
    for (int xi = 0; xi < 4; xi++) {
        const REAL *q = p + xi * 4 * stride;
        vec m0 = *(const vec *)q, m1 = *(const vec *)(q + stride), m2 = *(const vec *)(q + 2 * stride),
            m3 = *(const vec *)(q + 3 * stride);
        half[xi][0] = m0 + m1 + m2;
        half[xi][1] = m1 - m2 - m3;
    }
    for (int j = 0; j < 2; j++) {
        vec r[2] = {half[0][j] + half[1][j] + half[2][j] + bias, half[1][j] - half[2][j] - half[3][j] + bias};
        for (int i = 0; i < 2; i++) {
            if (relu) {
                __typeof__(r[i] > 0) positive = r[i] > 0;
                r[i] = (vec)((__typeof__(positive))r[i] & positive);
            }
            y[i][j] = r[i];
        }
    }
}

/* u (16, ceil(O/OB), C, OB) = G g G^T of each kernel g of w (O, C, 3, 3), zeros for the missing output
 * channels: each transform position's kernels in the order winograd_3x3 reads them. G = [[1, 0, 0],
 * [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]. Returns 0, or -1 if its buffer cannot be had. */
int NAME(winograd_kernels)(const REAL *w, int O, int C, REAL *u)
{
    int groups = (O + OB - 1) / OB;
    REAL *transformed = malloc((size_t)O * C * 16 * sizeof(REAL));  /* (O, C, 16): u's rows are pages apart */
    if (!transformed)
        return -1;
    for (size_t k = 0; k < (size_t)O * C; k++) {
        const REAL *g = w + k * 9;
        REAL gt[4][3], half = (REAL)0.5;  /* G g */
        for (int j = 0; j < 3; j++) {
            gt[0][j] = g[j];
            gt[1][j] = half * (g[j] + g[3 + j] + g[6 + j]);
            gt[2][j] = half * (g[j] - g[3 + j] + g[6 + j]);
            gt[3][j] = g[6 + j];
        }
        for (int i = 0; i < 4; i++) {  /* (G g) G^T */
            REAL *row = transformed + k * 16 + i * 4;
            row[0] = gt[i][0];
            row[1] = half * (gt[i][0] + gt[i][1] + gt[i][2]);
            row[2] = half * (gt[i][0] - gt[i][1] + gt[i][2]);
            row[3] = gt[i][2];
        }
    }
    for (int t = 0; t < 16; t++)
        for (int g = 0; g < groups; g++)
            for (int c = 0; c < C; c++)
                for (int o = 0; o < OB; o++, u++)
                    *u = g * OB + o < O ? transformed[((size_t)(g * OB + o) * C + c) * 16 + t] : 0;
    free(transformed);
    return 0;
}

/* The same convolution as convolution_3x3 (H and W even), by Winograd F(2x2, 3x3): u (16, ceil(O/OB), C,
 * OB) = G g G^T of the kernels, tiled. The 2x2 output tiles go in blocks of `tiles` along a tile row;
 * this call computes blocks [block_begin, block_end) of the (H/2) * ceil((W/2) / tiles) blocks. A block
 * holds the transformed input (16, C, cols) and the products (16, O, cols), cols = its tiles x N rounded
 * up to whole vectors (the lanes past N are computed from neighbouring numbers and dropped). Returns 0,
 * or -1 if its buffers cannot be had. */
int NAME(winograd_3x3)(const REAL *xpad, int C, int H, int W, int N, const REAL *u, const REAL *bias, int relu,
                       REAL *y, int O, int tiles, int block_begin, int block_end)
{
    size_t L = (size_t)W * N, prow = L + 2 * (size_t)N, plane = (size_t)(H + 2) * prow;
    size_t width = ((size_t)N + VL - 1) / VL * VL, cols = tiles * width;  /* a tile's columns; a block's */
    int row_blocks = (W / 2 + tiles - 1) / tiles, groups = (O + OB - 1) / OB;
    REAL *v = aligned_alloc(64, (16 * (size_t)C * cols * sizeof(REAL) + 63) / 64 * 64);
    REAL *m = aligned_alloc(64, (16 * (size_t)O * cols * sizeof(REAL) + 63) / 64 * 64);
    if (!v || !m) {
        free(v);
        free(m);
        return -1;
    }
    for (int block = block_begin; block < block_end; block++) {
        int ty = block / row_blocks, tx0 = block % row_blocks * tiles;
        int tx1 = tx0 + tiles < W / 2 ? tx0 + tiles : W / 2;
        size_t used = (size_t)(tx1 - tx0) * width;
        size_t span = (2 * (size_t)(tx1 - tx0) + 2) * N;  /* the numbers of a padded row that the block reads */
        const REAL *patch = xpad + 2 * (size_t)ty * prow + 2 * (size_t)tx0 * N;
        for (int c = 0; c < C; c++) {
            /* the next channel's rows, fetched ahead: too many short runs for the hardware prefetcher */
            if (c + 1 < C)
                for (int a = 0; a < 4; a++)
                    for (size_t k = 0; k < span; k += 64 / sizeof(REAL))
                        __builtin_prefetch(patch + (c + 1) * plane + a * prow + k);
            for (int tx = tx0; tx < tx1; tx++)
                for (size_t k = 0; k < width; k += VL)
                    NAME(winograd_input)(xpad + c * plane + 2 * (size_t)ty * prow + 2 * (size_t)tx * N + k, prow,
                                         N, v + c * cols + (tx - tx0) * width + k, (size_t)C * cols);
        }
        for (int t = 0; t < 16; t++)
            for (size_t col = 0; col < used; col += VB * VL) {
                int nv = (int)((used - col) / VL);
                nv = nv < VB ? nv : VB;
                for (int g = 0; g < groups; g++) {
                    const REAL *w = u + ((size_t)t * groups + g) * C * OB;
                    int outputs = O - g * OB < OB ? O - g * OB : OB;
                    const REAL *in = v + (size_t)t * C * cols;
                    REAL *out = m + ((size_t)t * O + g * OB) * cols;
#define TILE(n) NAME(winograd_tile)(in, cols, C, w, n, out, outputs, col)
                    BY_VECTORS(nv);
#undef TILE
                }
            }
        for (int o = 0; o < O; o++) {  /* a tile's last vector of lanes overlaps the one before */
            if (o + 1 < O)
                for (int i = 0; i < 2; i++)
                    for (size_t k = 0; k < span - 2 * N; k += 64 / sizeof(REAL))
                        __builtin_prefetch(y + ((size_t)(o + 1) * H + 2 * ty + i) * L + 2 * (size_t)tx0 * N + k, 1);
            for (int tx = tx0; tx < tx1; tx++)
                for (int k = 0; k < N; k += VL) {
                    int at = N >= VL && k + VL > N ? N - VL : k;
                    vec out[2][2];
                    NAME(winograd_output)(m + (size_t)o * cols + (tx - tx0) * width + at, (size_t)O * cols,
                                          bias ? bias[o] : 0, relu, out);
                    for (int i = 0; i < 2; i++)
                        for (int j = 0; j < 2; j++) {
                            REAL *to = y + ((size_t)o * H + 2 * ty + i) * L + (2 * (size_t)tx + j) * N + at;
                            if (at + VL <= N)
                                *(vec *)to = out[i][j];
                            else
                                memcpy(to, &out[i][j], (N - at) * sizeof(REAL));
                        }
                }
        }
    }
    free(v);
    free(m);
    return 0;
}

/* A vector of the n < VL numbers at p, zeros after them. */
static inline vec NAME(partial)(const REAL *p, int n)
{
    vec v = {0};
    memcpy(&v, p, n * sizeof(REAL));
    return v;
}

/* where ? a : b, lane by lane (C has no ?: on vectors); where: a comparison's all-ones or zero lanes */
static inline vec NAME(select)(NAME(lanes) where, vec a, vec b)
{
    return (vec)(((NAME(lanes))a & where) | ((NAME(lanes))b & ~where));
}

/* min(max(a, 0), cap), lane by lane: ReLU6 inside the depthwise and 1x1 convolutions */
static inline vec NAME(clip)(vec a, REAL cap)
{
    a = NAME(select)(a > 0, a, (vec){0});
    return NAME(select)(a > cap, (vec){0} + cap, a);
}

/* gw (O, C, 9) = the weight gradient of the convolution: gw[o, c, ky*3 + kx] = sum over h, j of
 * gy[o, h, j] * xpad[c, h + ky, j + kx*N], for output channels [o_begin, o_end) and input channels
 * [c_begin, c_end). A tile of WB output channels x the three kx of one (c, ky)
 * keeps vector sums; they go through memory between strips of STEP numbers of a row, so that a strip
 * of gy stays in L1 while every (c, ky) passes over it, and are summed across lanes at the end.
 * Returns 0, or -1 (gw untouched) if the sums' memory cannot be had. */
#ifndef STEP
#define STEP 2048
#endif
int NAME(convolution_3x3_weight_grad)(const REAL *xpad, int C, int H, int W, int N, const REAL *gy, REAL *gw,
                                      int O, int o_begin, int o_end, int c_begin, int c_end)
{
    size_t L = (size_t)W * N, prow = L + 2 * (size_t)N, plane = (size_t)(H + 2) * prow;
    int channels = c_end - c_begin;
    vec *sums = malloc((size_t)channels * 3 * WB * 3 * sizeof(vec));
    if (!sums)
        return -1;
    o_end = o_end < O ? o_end : O;
    for (int o0 = o_begin; o0 < o_end; o0 += WB) {
        int outputs = o_end - o0 < WB ? o_end - o0 : WB;
        memset(sums, 0, (size_t)channels * 3 * WB * 3 * sizeof(vec));
        for (int h = 0; h < H; h++)
            for (size_t s0 = 0; s0 < L; s0 += STEP) {
                size_t s1 = s0 + STEP < L ? s0 + STEP : L;
                const REAL *g[WB];
                for (int o = 0; o < WB; o++)  /* a missing output channel repeats the last one, unused */
                    g[o] = gy + ((size_t)(o0 + (o < outputs ? o : outputs - 1)) * H + h) * L;
                for (int c = c_begin; c < c_end; c++)
                    for (int ky = 0; ky < 3; ky++) {
                        vec *sum = sums + ((size_t)(c - c_begin) * 3 + ky) * WB * 3;
                        vec acc[WB][3];
#pragma GCC unroll 8
                        for (int o = 0; o < WB; o++)
                            for (int kx = 0; kx < 3; kx++)
                                acc[o][kx] = sum[o * 3 + kx];
                        const REAL *row = xpad + c * plane + (size_t)(h + ky) * prow;
                        size_t j = s0;
                        for (; j + VL <= s1; j += VL) {
                            vec x[3];
                            for (int kx = 0; kx < 3; kx++)
                                x[kx] = *(const vec *)(row + j + kx * N);
#pragma GCC unroll 8
                            for (int o = 0; o < WB; o++) {
                                vec d = *(const vec *)(g[o] + j);
                                for (int kx = 0; kx < 3; kx++)
                                    acc[o][kx] += d * x[kx];
                            }
                        }
                        if (j < s1) {  /* the row's last, partial vector */
                            int n = (int)(s1 - j);
                            vec x[3];
                            for (int kx = 0; kx < 3; kx++)
                                x[kx] = NAME(partial)(row + j + kx * N, n);
                            for (int o = 0; o < WB; o++) {
                                vec d = NAME(partial)(g[o] + j, n);
                                for (int kx = 0; kx < 3; kx++)
                                    acc[o][kx] += d * x[kx];
                            }
                        }
#pragma GCC unroll 8
                        for (int o = 0; o < WB; o++)
                            for (int kx = 0; kx < 3; kx++)
                                sum[o * 3 + kx] = acc[o][kx];
                    }
            }
        for (int c = c_begin; c < c_end; c++)
            for (int ky = 0; ky < 3; ky++)
                for (int o = 0; o < outputs; o++)
                    for (int kx = 0; kx < 3; kx++) {
                        vec v = sums[(((size_t)(c - c_begin) * 3 + ky) * WB + o) * 3 + kx];
                        REAL total = 0;
                        for (int lane = 0; lane < VL; lane++)
                            total += v[lane];
                        gw[((size_t)(o0 + o) * C + c) * 9 + ky * 3 + kx] = total;
                    }
    }
    free(sums);
    return 0;
}
#undef STEP

/* The sum over x[0, M) of x - shift, or of (x - shift)^2 if square, or of (x - shift) * other (weights
 * NULL: none), counting only where keep > 0 if keep is given: in vectors over blocks of 1024 numbers,
 * the blocks added in double (as accurate as NumPy's pairwise sums). */
#define BLOCK 1024
static double NAME(sum)(const REAL *x, size_t M, REAL shift, int square, const REAL *other, const REAL *keep)
{
    double total = 0;
    size_t i = 0;
    for (; i + BLOCK <= M; i += BLOCK) {
        vec a = {0}, b = {0};
        for (size_t j = i; j < i + BLOCK; j += 2 * VL) {
            vec u = *(const vec *)(x + j) - shift, v = *(const vec *)(x + j + VL) - shift;
            if (square) {
                u *= u;
                v *= v;
            }
            if (other) {
                u *= *(const vec *)(other + j);
                v *= *(const vec *)(other + j + VL);
            }
            if (keep) {
                vec zero = {0};
                __typeof__(u > 0) ku = *(const vec *)(keep + j) > zero, kv = *(const vec *)(keep + j + VL) > zero;
                u = (vec)((__typeof__(ku))u & ku);
                v = (vec)((__typeof__(kv))v & kv);
            }
            a += u;
            b += v;
        }
        a += b;
        for (int lane = 0; lane < VL; lane++)
            total += a[lane];
    }
    for (; i < M; i++) {
        REAL d = x[i] - shift;
        d = square ? d * d : d;
        d = other ? d * other[i] : d;
        total += keep && !(keep[i] > 0) ? 0 : d;
    }
    return total;
}
#undef BLOCK

/* Training-mode BatchNorm then ReLU over each channel of x (C, M): y = max(gamma (x - mean) inv_std +
 * beta, 0), mean and (biased) variance those of the channel, inv_std = 1 / sqrt(var + eps); mean, var and
 * inv_std are written out; for channels [c_begin, c_end). */
void NAME(batch_norm_relu)(const REAL *x, long M, const REAL *gamma, const REAL *beta, double eps, REAL *y,
                           REAL *mean, REAL *var, REAL *inv_std, int c_begin, int c_end)
{
    for (int c = c_begin; c < c_end; c++) {
        const REAL *in = x + c * M;
        REAL *out = y + c * M;
        REAL m = (REAL)(NAME(sum)(in, M, 0, 0, NULL, NULL) / M);
        REAL v = (REAL)(NAME(sum)(in, M, m, 1, NULL, NULL) / M);
        REAL inv = (REAL)(1 / sqrt((double)v + eps)), scale = gamma[c] * inv, shift = beta[c] - m * scale;
        for (long i = 0; i < M; i++) {
            REAL r = in[i] * scale + shift;
            out[i] = r > 0 ? r : 0;
        }
        mean[c] = m;
        var[c] = v;
        inv_std[c] = inv;
    }
}

/* The gradients of batch_norm_relu: with g = gy where y > 0, x^ = (x - mean) inv_std and M numbers a
 * channel, gbeta = sum g, ggamma = sum g x^, gx = gamma inv_std (g - (gbeta + x^ ggamma) / M); for
 * channels [c_begin, c_end). */
void NAME(batch_norm_relu_grad)(const REAL *x, const REAL *y, const REAL *gy, long M, const REAL *gamma,
                                const REAL *mean, const REAL *inv_std, REAL *gx, REAL *ggamma, REAL *gbeta,
                                int c_begin, int c_end)
{
    for (int c = c_begin; c < c_end; c++) {
        const REAL *in = x + c * M, *out = y + c * M, *g = gy + c * M;
        REAL m = mean[c], inv = inv_std[c];
        REAL sum_g = (REAL)NAME(sum)(g, M, 0, 0, NULL, out);
        REAL sum_gx = (REAL)(inv * NAME(sum)(in, M, m, 0, g, out));
        REAL scale = gamma[c] * inv, slope = -scale * inv * sum_gx / M;
        REAL offset = -(scale * sum_g / M) - slope * m;
        REAL *d = gx + c * M;
        for (long i = 0; i < M; i++)
            d[i] = (out[i] > 0 ? g[i] * scale : 0) + in[i] * slope + offset;
        ggamma[c] = sum_gx;
        gbeta[c] = sum_g;
    }
}

/* x (C, H, W*N) -> xpad (C, H+2, (W+2)*N), zeros all round, for channels [c_begin, c_end); where mask
 * is not NULL, each number is kept only where mask (same shape as x) is positive (a ReLU's gradient). */
void NAME(pad)(const REAL *x, const REAL *mask, int H, int W, int N, REAL *xpad, int c_begin, int c_end)
{
    size_t L = (size_t)W * N, prow = L + 2 * (size_t)N;
    for (int c = c_begin; c < c_end; c++) {
        REAL *plane = xpad + (size_t)c * (H + 2) * prow;
        memset(plane, 0, (prow + N) * sizeof(REAL));
        for (int h = 0; h < H; h++) {
            REAL *row = plane + (h + 1) * prow + N;
            size_t at = ((size_t)c * H + h) * L;
            if (mask)
                for (size_t j = 0; j < L; j++)
                    row[j] = mask[at + j] > 0 ? x[at + j] : 0;
            else
                memcpy(row, x + at, L * sizeof(REAL));
            memset(row + L, 0, 2 * N * sizeof(REAL));  /* this row's right pad, the next one's left */
        }
        memset(plane + (H + 1) * prow + N, 0, (prow - N) * sizeof(REAL));
    }
}

/* The first maximum of VL windows, whose four positions' numbers are w[0..3]: the largest (a NaN if any),
 * and in *first its position (0-3), as one vector's selects */
static inline __attribute__((always_inline)) vec NAME(window_maxima)(const vec w[4], NAME(bytes) *first)
{
    vec m = w[0];
    NAME(lanes) k = {0};
    for (int p = 1; p < 4; p++) {
        NAME(lanes) take = ((w[p] > m) | (w[p] != w[p])) & (m == m);
        m = NAME(select)(take, w[p], m);
        k = (p & take) | (k & ~take);
    }
    *first = __builtin_convertvector(k, NAME(bytes));
    return m;
}

/* VL windows' gradients g sent to their first maxima: out[p] = g where first == p, else 0 */
static inline __attribute__((always_inline)) void NAME(window_scatter)(vec g, NAME(bytes) first, vec out[4])
{
    NAME(lanes) positions = __builtin_convertvector(first, NAME(lanes));
    for (int p = 0; p < 4; p++)
        out[p] = NAME(select)(positions == p, g, (vec){0});
}

/* y (C, H/2, W/2, N) = the maximum of each 2x2 window (stride 2) of x (C, H, W, N), and first (y's
 * shape) = the position in the window (0-3, row by row) of its first maximum, for channels
 * [c_begin, c_end). A NaN is the maximum of its window, the first NaN if several. The N images of a
 * window run a vector at a time, the last N % VL as one partial vector: as a loop over N, whose
 * scalar remainder took a mispredicted branch per number, N = 25 took 6 times as long per image as N = 32. */
void NAME(max_pooling_2x2)(const REAL *x, int H, int W, int N, REAL *y, unsigned char *first, int c_begin,
                           int c_end)
{
    size_t row = (size_t)W * N;
    int whole = N - N % VL, rest = N - whole;
    for (int c = c_begin; c < c_end; c++)
        for (int oh = 0; oh < H / 2; oh++)
            for (int ow = 0; ow < W / 2; ow++) {
                const REAL *top = x + ((size_t)c * H + 2 * oh) * row + 2 * (size_t)ow * N, *bottom = top + row;
                const REAL *const window[4] = {top, top + N, bottom, bottom + N};
                size_t at = (((size_t)c * (H / 2) + oh) * (W / 2) + ow) * N;
                vec w[4];
                for (int n = 0; n < whole; n += VL) {
                    for (int p = 0; p < 4; p++)
                        w[p] = *(const vec *)(window[p] + n);
                    *(vec *)(y + at + n) = NAME(window_maxima)(w, (NAME(bytes) *)(first + at + n));
                }
                if (rest) {
                    NAME(bytes) positions;
                    for (int p = 0; p < 4; p++)
                        w[p] = NAME(partial)(window[p] + whole, rest);
                    vec m = NAME(window_maxima)(w, &positions);
                    memcpy(y + at + whole, &m, rest * sizeof(REAL));
                    memcpy(first + at + whole, &positions, rest);
                }
            }
}

/* gx (C, H, W, N) = gy (C, H/2, W/2, N) at each window's first maximum (first, from max_pooling_2x2),
 * zero elsewhere, for channels [c_begin, c_end); the last N % VL images as one partial vector, as above. */
void NAME(max_pooling_2x2_grad)(const REAL *gy, const unsigned char *first, int H, int W, int N, REAL *gx,
                                int c_begin, int c_end)
{
    size_t row = (size_t)W * N;
    int whole = N - N % VL, rest = N - whole;
    for (int c = c_begin; c < c_end; c++)
        for (int oh = 0; oh < H / 2; oh++)
            for (int ow = 0; ow < W / 2; ow++) {
                REAL *top = gx + ((size_t)c * H + 2 * oh) * row + 2 * (size_t)ow * N, *bottom = top + row;
                REAL *const window[4] = {top, top + N, bottom, bottom + N};
                size_t at = (((size_t)c * (H / 2) + oh) * (W / 2) + ow) * N;
                vec out[4];
                for (int n = 0; n < whole; n += VL) {
                    NAME(window_scatter)(*(const vec *)(gy + at + n), *(const NAME(bytes) *)(first + at + n), out);
                    for (int p = 0; p < 4; p++)
                        *(vec *)(window[p] + n) = out[p];
                }
                if (rest) {
                    NAME(bytes) positions = {0};
                    memcpy(&positions, first + at + whole, rest);
                    NAME(window_scatter)(NAME(partial)(gy + at + whole, rest), positions, out);
                    for (int p = 0; p < 4; p++)
                        memcpy(window[p] + whole, &out[p], rest * sizeof(REAL));
                }
            }
}

/* Depthwise k x k convolution of (N, C, H, W) images, stride s, zero padding pt rows above and pl
 * columns left (the bottom and right ones follow from the output size), EfficientNet-Lite0's layers.
 * Each plane (image, channel) is copied once into a zero-padded buffer whose rows are split into their
 * s column phases (padded column j at phase j % s, index j / s, a run of M numbers per phase): tap
 * (ky, kx) of output row i then reads a contiguous run, padded row i*s + ky, phase kx % s, from kx / s
 * on, and a tile of DV vectors (DV at the top of the file) sums the k*k taps in registers:
 *
 *     y[i, j] = b + sum over ky, kx of  w[ky, kx] * xpad[i*s + ky, j*s + kx]      (then clipped to [0, cap])
 */
/* The buffer's numbers per phase of a row, with a vector of slack for a row's last, partial vector */
static inline int NAME(phase_run)(int oW, int k, int s) { return oW + (k - 1) / s + VL; }

/* The first unpadded column ix whose padded column ix + pl lies in phase q */
static inline int NAME(phase_first)(int q, int pl, int s) { return ((q - pl) % s + s) % s; }

/* buf (rows, s, M) = the plane x (H, W) zero-padded (pt, pl) to rows x columns, its rows split into
 * column phases */
static void NAME(phased_plane)(const REAL *x, int H, int W, int s, int pt, int pl, REAL *buf, int rows,
                               int columns, int M)
{
    memset(buf, 0, (size_t)rows * s * M * sizeof(REAL));
    for (int iy = 0; iy < H && iy + pt < rows; iy++) {
        REAL *row = buf + (size_t)(iy + pt) * s * M;
        const REAL *in = x + (size_t)iy * W;
        int width = W < columns - pl ? W : columns - pl;
        if (width <= 0)
            break;
        if (s == 1)
            memcpy(row + pl, in, width * sizeof(REAL));
        else
            for (int q = 0; q < s; q++) { /* the columns of phase q, without a division per number */
                int ix = NAME(phase_first)(q, pl, s);
                for (REAL *to = row + q * M + (ix + pl) / s; ix < width; ix += s)
                    *to++ = in[ix];
            }
    }
}

/* nr output rows x nv vectors (nr * nv <= DV) from out on (rows a step apart in the buffer, oW apart in
 * the output; left numbers of a row remain): bias + the taps (run offsets off, weights w), clipped to
 * [0, cap] if cap > 0. Several rows of a narrow plane give the FMAs independent chains to overlap. */
static inline __attribute__((always_inline)) void
NAME(depthwise_tile)(const REAL *rows, size_t step, const size_t *off, const REAL *w, int taps, int nr, int nv,
                     REAL bias, REAL cap, REAL *out, int oW, int left)
{
    vec acc[DV][DV];
#pragma GCC unroll 8
    for (int r = 0; r < DV; r++)
#pragma GCC unroll 8
        for (int v = 0; v < DV; v++)
            if (r < nr && v < nv)
                acc[r][v] = (vec){0} + bias;
    for (int t = 0; t < taps; t++) {
        const REAL *run = rows + off[t];
#pragma GCC unroll 8
        for (int r = 0; r < DV; r++)
#pragma GCC unroll 8
            for (int v = 0; v < DV; v++)
                if (r < nr && v < nv)
                    acc[r][v] += w[t] * *(const vec *)(run + r * step + v * VL);
    }
#pragma GCC unroll 8
    for (int r = 0; r < DV; r++)
#pragma GCC unroll 8
        for (int v = 0; v < DV; v++)
            if (r < nr && v < nv) {
                vec a = acc[r][v];
                if (cap > 0)
                    a = NAME(clip)(a, cap);
                REAL *to = out + (size_t)r * oW + v * VL;
                if (left - v * VL >= VL)
                    *(vec *)to = a;
                else
                    memcpy(to, &a, (left - v * VL) * sizeof(REAL));
            }
}

/* y[p] (oH, oW) for the planes p in [p_begin, p_end) of x (N*C planes (H, W)), kernels w (C, k, k),
 * bias (C,) or NULL, cap > 0 to clip; pads pt, pl >= 0. Returns nonzero if the buffer cannot be allocated. */
int NAME(depthwise)(const REAL *x, int C, int H, int W, const REAL *w, int k, int s, int pt, int pl,
                    const REAL *bias, double cap, REAL *y, int oH, int oW, int p_begin, int p_end)
{
    int M = NAME(phase_run)(oW, k, s), rows = (oH - 1) * s + k, taps = k * k;
    int vectors = (oW + VL - 1) / VL, together = vectors >= DV ? 1 : DV / vectors; /* rows per tile */
    size_t step = (size_t)s * s * M;
    REAL *buf = malloc((size_t)rows * s * M * sizeof(REAL));
    size_t *off = malloc(taps * sizeof(size_t));
    if (!buf || !off) {
        free(buf);
        free(off);
        return 1;
    }
    for (int t = 0; t < taps; t++)
        off[t] = (size_t)(t / k) * s * M + (size_t)(t % k % s) * M + t % k / s;
    for (int p = p_begin; p < p_end; p++) {
        int c = p % C;
        NAME(phased_plane)(x + (size_t)p * H * W, H, W, s, pt, pl, buf, rows, (oW - 1) * s + k, M);
        for (int i = 0; i < oH;) {
            const REAL *in = buf + i * step;
            REAL *out = y + ((size_t)p * oH + i) * oW;
#define TILE(nr, nv) NAME(depthwise_tile)(in + j, step, off, w + (size_t)c * taps, taps, nr, nv, \
                                          bias ? bias[c] : 0, (REAL)cap, out + j, oW, oW - j)
            if (together == 4 && oH - i >= 4) {  /* one vector a row */
                int j = 0;
                TILE(4, 1);
                i += 4;
            } else if (together == 2 && oH - i >= 2) {  /* two vectors a row */
                int j = 0;
                TILE(2, 2);
                i += 2;
            } else {
                for (int j = 0; j < oW; j += DV * VL) {
                    int nv = (oW - j + VL - 1) / VL;
                    if (nv >= DV)
                        TILE(1, DV);
                    else if (nv == 3)
                        TILE(1, 3);
                    else if (nv == 2)
                        TILE(1, 2);
                    else
                        TILE(1, 1);
                }
                i += 1;
            }
#undef TILE
        }
    }
    free(buf);
    free(off);
    return 0;
}

/* The adjoint of depthwise in x (no bias, no clip), for any stride: each output gradient, times its
 * tap's weight, is added to the padded, phased buffer where that tap read, then the buffer's interior
 * is copied out (zero where no tap read). gx[p] (H, W) for planes [p_begin, p_end) of gy (N*C planes
 * (oH, oW)). (For stride 1 the depthwise convolution of gy with the flipped kernels is faster.) */
int NAME(depthwise_adjoint)(const REAL *gy, int C, int oH, int oW, const REAL *w, int k, int s, int pt, int pl,
                            REAL *gx, int H, int W, int p_begin, int p_end)
{
    int M = NAME(phase_run)(oW, k, s), rows = (oH - 1) * s + k, width = (oW - 1) * s + k;
    REAL *buf = malloc((size_t)rows * s * M * sizeof(REAL));
    if (!buf)
        return 1;
    for (int p = p_begin; p < p_end; p++) {
        const REAL *kernel = w + (size_t)(p % C) * k * k;
        memset(buf, 0, (size_t)rows * s * M * sizeof(REAL));
        for (int i = 0; i < oH; i++) {
            const REAL *g = gy + ((size_t)p * oH + i) * oW;
            for (int ky = 0; ky < k; ky++)
                for (int kx = 0; kx < k; kx++) {
                    REAL *run = buf + (size_t)(i * s + ky) * s * M + (size_t)(kx % s) * M + kx / s;
                    REAL weight = kernel[ky * k + kx];
                    for (int j = 0; j < oW; j++)
                        run[j] += weight * g[j];
                }
        }
        REAL *out = gx + (size_t)p * H * W;
        int read = W < width - pl ? W : width - pl; /* the columns some tap read */
        for (int iy = 0; iy < H; iy++) {
            REAL *to = out + (size_t)iy * W;
            memset(to, 0, W * sizeof(REAL));
            if (iy + pt >= rows)
                continue;
            const REAL *row = buf + (size_t)(iy + pt) * s * M;
            for (int q = 0; q < s; q++) {
                int ix = NAME(phase_first)(q, pl, s);
                for (const REAL *from = row + q * M + (ix + pl) / s; ix < read; ix += s)
                    to[ix] = *from++;
            }
        }
    }
    free(buf);
    return 0;
}

/* The matrix product of EfficientNet-Lite0's 1x1 convolutions (one image at a time) and of any model's
 * linear layers (a batch's rows), written out so that each number's sum runs in one order whatever the
 * shapes around it: BLAS libraries pick their kernels, blocking and threads by the matrices' sizes, so the
 * same row could sum in another order in a batch of another size. Here
 *
 *     out[m, p] = sum over k, in order, of a[m, k] * b[k, p]   (then + bias[m] or bias[p], clipped to [0, cap])
 *
 * computed for one lane of one vector by the same multiply-adds in every tile: a tile holds OB rows of
 * out times VB vectors of its columns in registers while k runs. A row's last vector may be partial: its
 * loads read on into the next row of b (the last row of b only its own numbers), its store stops at the
 * row's end. Rows [m_begin, m_end). */
static inline __attribute__((always_inline)) void
NAME(product_tile)(const REAL *a, size_t lda, int rows, const REAL *b, size_t ldb, int K, int nv, int left,
                   const REAL *row_bias, const REAL *column_bias, REAL cap, REAL *out, size_t ldo)
{
    vec acc[OB][VB];
#pragma GCC unroll 8
    for (int o = 0; o < OB; o++)
#pragma GCC unroll 8
        for (int v = 0; v < VB; v++)
            acc[o][v] = (vec){0};
    int whole = left >= nv * VL ? K : K - 1; /* rows of b read as whole vectors */
    for (int k = 0; k < K; k++) {
        vec x[VB];
#pragma GCC unroll 8
        for (int v = 0; v < VB; v++)
            if (v < nv)
                x[v] = k < whole || left - v * VL >= VL ? *(const vec *)(b + k * ldb + v * VL)
                                                        : NAME(partial)(b + k * ldb + v * VL, left - v * VL);
#pragma GCC unroll 8
        for (int o = 0; o < OB; o++) {
            REAL scale = a[(o < rows ? o : 0) * lda + k];
#pragma GCC unroll 8
            for (int v = 0; v < VB; v++)
                if (v < nv)
                    acc[o][v] += scale * x[v];
        }
    }
    for (int o = 0; o < rows; o++)
        for (int v = 0; v < nv; v++) {
            vec r = acc[o][v];
            if (row_bias)
                r += row_bias[o];
            if (column_bias) {
                int n = left - v * VL < VL ? left - v * VL : VL;
                r += NAME(partial)(column_bias + v * VL, n);
            }
            if (cap > 0)
                r = NAME(clip)(r, cap);
            REAL *to = out + o * ldo + v * VL;
            if (left - v * VL >= VL)
                *(vec *)to = r;
            else
                memcpy(to, &r, (left - v * VL) * sizeof(REAL));
        }
}

#ifndef PRODUCT_BYTES
#define PRODUCT_BYTES 16384
#endif
void NAME(product)(const REAL *a, int lda, const REAL *b, int ldb, int K, int P, const REAL *row_bias,
                   const REAL *column_bias, double cap, REAL *out, int ldo, int m_begin, int m_end)
{
    /* strips of columns whose part of b stays in the L1 cache while every tile of rows passes over it */
    int strip = (int)(PRODUCT_BYTES / sizeof(REAL)) / (K > 0 ? K : 1) / (VB * VL) * (VB * VL);
    strip = strip > VB * VL ? strip : VB * VL;
    for (int s0 = 0; s0 < P; s0 += strip)
        for (int m0 = m_begin; m0 < m_end; m0 += OB) {
            int rows = m_end - m0 < OB ? m_end - m0 : OB;
            for (int p0 = s0; p0 < P && p0 < s0 + strip; p0 += VB * VL) {
                int nv = (P - p0 + VL - 1) / VL;
                nv = nv < VB ? nv : VB;
#define TILE(n) NAME(product_tile)(a + (size_t)m0 * lda, lda, rows, b + p0, ldb, K, n, P - p0,          \
                                   row_bias ? row_bias + m0 : NULL, column_bias ? column_bias + p0 : NULL, \
                                   (REAL)cap, out + (size_t)m0 * ldo + p0, ldo)
                BY_VECTORS(nv);
#undef TILE
            }
        }
}

/* g = gy where a ReLU passed the gradient, read off its output y: floor < y (floor 0, or -inf under
 * Deconvnet's rule) and y < cap if cap > 0, and guide > 0 where a guide is given (a rule that rectifies the
 * gradient: Guided Backprop, Deconvnet); else 0. For the numbers [begin, end). */
void NAME(relu_gradient)(const REAL *gy, const REAL *y, const REAL *guide, double cap, double floor, REAL *g,
                         long begin, long end)
{
    REAL top = cap > 0 ? (REAL)cap : (REAL)INFINITY, bottom = (REAL)floor;
    if (guide)
        for (long i = begin; i < end; i++)
            g[i] = y[i] > bottom && y[i] < top && guide[i] > 0 ? gy[i] : 0;
    else
        for (long i = begin; i < end; i++)
            g[i] = y[i] > bottom && y[i] < top ? gy[i] : 0;
}
#undef vec
#undef VL
#endif
