/* Block-sparse convolutions (stride 1, any kernel size and dilation) straight from NCHW tensors,
 * without unfolding the input into patches.
 *
 * The weight is the GEMM form W (out × C·kh·kw, column k = c·kh·kw + i·kw + j) keeping only
 * some r×c blocks, stored as `values[nnz][r][c]` with a row-block CSR, as for the linear
 * kernels. The input is already padded: x[n][C][Hp][Wp], and the output has Ho = Hp − dh·(kh−1)
 * rows of Wo = Wp − dw·(kw−1) pixels.
 *
 * Pixels are indexed on the padded-width grid, p = h·Wp + w: there, column k of W reads the
 * input at a fixed shift, x[c][p + i·dh·Wp + j·dw], so a run of output pixels is a contiguous
 * run of input floats and the products vectorise over pixels, with weights broadcast. The
 * grid's columns w ≥ Wo are computed but never stored.
 *
 *   bspc_forward     y = W ⊛ x + bias, only the kept blocks' columns visited.
 *   bspc_input_grad  dx += the transposed convolution of dy, walking the blocks by column-block.
 *   bspc_values_grad dW at the kept blocks only: dot products of dy and shifted x along pixels.
 *
 * Written with GCC vector extensions, as block_sparse.c: one source for AVX-512, AVX2 and
 * 4-wide vectors. VW: floats per vector; MR × NV: the register tile of the shifted products
 * (MR output rows × NV vectors of pixels); DO × DK: the tile of dot products.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

#if defined(__AVX512F__)
#define VW 16
#define MR 8
#define DO 4
#define DK 4
#elif defined(__AVX__)
#define VW 8
#define MR 4
#define DO 3
#define DK 3
#else
#define VW 4
#define MR 4
#define DO 3
#define DK 3
#endif
#define NV 3
#define TILE (NV * VW) /* pixels per register tile */

typedef float vec __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ALWAYS_INLINE inline __attribute__((always_inline))

int bspc_vector_width(void) { return VW; }
int bspc_tile_rows(void) { return MR; }

static float hsum(vec v)
{
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* ---- the shifted product --------------------------------------------------------------- */

/* tmp[m][t] = Σ_k panel[k][m] · src[off[k] + p0 + t] for MR rows and nv·VW pixels from p0. */
static ALWAYS_INLINE void shifted_tile(int nv, i64 nk, const float *panel, const i64 *off,
                                       const float *src, i64 p0, float tmp[MR][TILE])
{
    vec acc[MR][NV];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < nv; v++) acc[m][v] = (vec){0};
    for (i64 k = 0; k < nk; k++) {
        const float *s = src + off[k] + p0;
        vec x[NV];
        for (int v = 0; v < nv; v++) x[v] = *(const vec *)(s + v * VW);
        const float *w = panel + k * MR;
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++)
            for (int v = 0; v < nv; v++) acc[m][v] += w[m] * x[v];
    }
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < nv; v++) *(vec *)&tmp[m][v * VW] = acc[m][v];
}

/* The same for `count` < VW pixels, one at a time. */
static void shifted_scalar(i64 count, i64 nk, const float *panel, const i64 *off, const float *src,
                           i64 p0, float tmp[MR][TILE])
{
    for (int m = 0; m < MR; m++)
        for (i64 t = 0; t < count; t++) {
            float s = 0.0f;
            for (i64 k = 0; k < nk; k++) s += panel[k * MR + m] * src[off[k] + p0 + t];
            tmp[m][t] = s;
        }
}

/* Rows m < rows of a tile's pixels [p0, p0 + count) that are output pixels within [lo, hi),
 * handed to `emit(m, tmp row from pixel p, p, length)` one grid row (h) at a time. */
#define FOR_VALID(rows, p0, count, lo, hi, wp, wo, emit)                                           \
    do {                                                                                           \
        i64 a_ = MAX(p0, lo), b_ = MIN((p0) + (count), hi);                                        \
        for (i64 p_ = a_; p_ < b_;) {                                                              \
            i64 w_ = p_ % (wp), end_ = MIN(b_, p_ - w_ + (wo));                                     \
            if (w_ < (wo))                                                                         \
                for (int m_ = 0; m_ < (rows); m_++) emit(m_, &tmp[m_][p_ - (p0)], p_, end_ - p_);  \
            p_ += w_ < (wo) ? end_ - p_ : (wp) - w_;                                               \
        }                                                                                          \
    } while (0)

/* Computes the pixels [lo, hi) of the grid (L of them in all) for one MR-row panel, calling
 * `emit` on every stored pixel. The last tile is shifted back to end at hi when the range is
 * long enough (recomputing some pixels, emitted once), so no read goes past pixel L − 1. */
#define SHIFTED_RANGE(lo, hi, L, nk, panel, off, src, rows, wp, wo, emit)                          \
    do {                                                                                           \
        float tmp[MR][TILE] __attribute__((aligned(64)));                                         \
        i64 p0 = (lo);                                                                             \
        for (; p0 + TILE <= (hi); p0 += TILE) {                                                    \
            shifted_tile(NV, nk, panel, off, src, p0, tmp);                                        \
            FOR_VALID(rows, p0, TILE, lo, hi, wp, wo, emit);                                       \
        }                                                                                          \
        if (p0 < (hi) && (hi) >= TILE) {                                                           \
            shifted_tile(NV, nk, panel, off, src, (hi) - TILE, tmp);                               \
            FOR_VALID(rows, (hi) - TILE, TILE, p0, hi, wp, wo, emit);                              \
        } else if (p0 < (hi)) {                                                                    \
            for (; p0 + VW <= (hi); p0 += VW) {                                                    \
                shifted_tile(1, nk, panel, off, src, p0, tmp);                                     \
                FOR_VALID(rows, p0, VW, lo, hi, wp, wo, emit);                                     \
            }                                                                                      \
            if (p0 < (hi)) {                                                                       \
                shifted_scalar((hi) - p0, nk, panel, off, src, p0, tmp);                           \
                FOR_VALID(rows, p0, (hi) - p0, lo, hi, wp, wo, emit);                              \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* Columns [k0, k0 + c) of W, cut at K, as input offsets: x[c][p + i·dh·Wp + j·dw]. */
static i64 column_offsets(i64 k0, i64 c, i64 K, i64 kh, i64 kw, i64 dh, i64 dw, i64 wp, i64 plane,
                          i64 *off)
{
    i64 n = MIN(c, K - k0);
    for (i64 q = 0; q < n; q++) {
        i64 k = k0 + q, ch = k / (kh * kw), i = k / kw % kh, j = k % kw;
        off[q] = ch * plane + i * dh * wp + j * dw;
    }
    return n;
}

static i64 rows_padded(i64 r) { return (r + MR - 1) / MR * MR; }

/* ---- forward ----------------------------------------------------------------------------- */

/* Per row-block b: the input offsets of its kept columns (nk[b] of them, from off + row_ptr[b]·c)
 * and its weights as panels of MR rows, panel[t][k][m] = W[b·r + t·MR + m][column k] (zero past
 * the rows of W), from panels + row_ptr[b]·c·rows_padded(r). */
static void pack_forward(i64 n_rb, i64 r, i64 c, i64 out, i64 K, i64 kh, i64 kw, i64 dh, i64 dw,
                         i64 wp, i64 plane, const i64 *row_ptr, const i64 *col_idx,
                         const float *values, i64 *off, i64 *nk, float *panels, int n_threads)
{
    i64 rp = rows_padded(r);
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (i64 b = 0; b < n_rb; b++) {
        i64 base = row_ptr[b] * c, count = 0;
        for (i64 e = row_ptr[b]; e < row_ptr[b + 1]; e++)
            count += column_offsets(col_idx[e] * c, c, K, kh, kw, dh, dw, wp, plane, off + base + count);
        nk[b] = count;
        float *panel = panels + base * rp;
        i64 rows = MIN(r, out - b * r), k = 0;
        for (i64 e = row_ptr[b]; e < row_ptr[b + 1]; e++)
            for (i64 q = 0; q < MIN(c, K - col_idx[e] * c); q++, k++)
                for (i64 m = 0; m < rp; m++)
                    panel[(m / MR) * count * MR + k * MR + m % MR] = m < rows ? values[(e * r + m) * c + q] : 0.0f;
    }
}

/* y[n][out][Ho][Wo] = bias + the convolution of x[n][C][Hp][Wp] (contiguous) with the kept blocks.
 * Returns nonzero when it cannot allocate its buffers. */
int bspc_forward(i64 n, i64 channels, i64 hp, i64 wp, const float *x, i64 out, i64 kh, i64 kw,
                 i64 dh, i64 dw, i64 r, i64 c, const i64 *row_ptr, const i64 *col_idx,
                 const float *values, const float *bias, float *y, int n_threads)
{
    i64 ho = hp - dh * (kh - 1), wo = wp - dw * (kw - 1), K = channels * kh * kw;
    i64 n_rb = (out + r - 1) / r, nnz = row_ptr[n_rb], plane = hp * wp;
    i64 L = (ho - 1) * wp + wo; /* grid pixels up to the last output pixel */
    if (n <= 0 || ho <= 0 || wo <= 0) return 0;
    i64 *off = malloc((size_t)MAX(nnz * c, 1) * sizeof(i64) + (size_t)MAX(n_rb, 1) * sizeof(i64));
    float *panels = malloc((size_t)MAX(nnz * c * rows_padded(r), 1) * sizeof(float));
    if (!off || !panels) {
        free(off);
        free(panels);
        return 1;
    }
    i64 *nk = off + nnz * c;
    pack_forward(n_rb, r, c, out, K, kh, kw, dh, dw, wp, plane, row_ptr, col_idx, values, off, nk,
                 panels, n_threads);
    /* Tasks: (image, row tile, run of pixels), enough runs to share among the threads. */
    i64 n_rt = (r + MR - 1) / MR, tiles = (L + TILE - 1) / TILE;
    i64 runs = MIN(tiles, MAX(1, (8 * n_threads + n * n_rb * n_rt - 1) / (n * n_rb * n_rt)));
    i64 run = (tiles + runs - 1) / runs * TILE;
    runs = (L + run - 1) / run;
#pragma omp parallel for schedule(dynamic, 1) collapse(4) num_threads(n_threads)
    for (i64 img = 0; img < n; img++)
        for (i64 b = 0; b < n_rb; b++)
            for (i64 t = 0; t < n_rt; t++)
                for (i64 s = 0; s < runs; s++) {
                    i64 o0 = b * r + t * MR, rows = MIN(MIN(MR, r - t * MR), out - o0);
                    if (rows <= 0) continue;
                    i64 lo = s * run, hi = MIN(L, lo + run), k = nk[b];
                    const float *src = x + img * channels * plane;
                    const float *panel = panels + row_ptr[b] * c * rows_padded(r) + t * k * MR;
                    float *dst = y + (img * out + o0) * ho * wo;
#define STORE(m, from, p, len)                                                                     \
    do {                                                                                           \
        float *to_ = dst + (m) * ho * wo + (p) / wp * wo + (p) % wp;                               \
        float add_ = bias ? bias[o0 + (m)] : 0.0f;                                                 \
        for (i64 q_ = 0; q_ < (len); q_++) to_[q_] = (from)[q_] + add_;                            \
    } while (0)
                    SHIFTED_RANGE(lo, hi, L, k, panel, off + row_ptr[b] * c, src, rows, wp, wo, STORE);
#undef STORE
                }
    free(off);
    free(panels);
    return 0;
}

/* ---- gradients --------------------------------------------------------------------------- */

/* dy[n][out][Ho][Wo] on the padded-width grid: g[n][out][Ho·Wp], zero at w ≥ Wo, and `slack`
 * zeros after the last image, so whole tiles can be read past the end of the last row. */
static float *grid_grad(i64 n, i64 out, i64 ho, i64 wo, i64 wp, const float *dy, i64 slack, int n_threads)
{
    i64 lg = ho * wp;
    float *g = malloc((size_t)(n * out * lg + slack) * sizeof(float));
    if (!g) return NULL;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (i64 row = 0; row < n * out; row++)
        for (i64 h = 0; h < ho; h++) {
            float *to = g + row * lg + h * wp;
            memcpy(to, dy + (row * ho + h) * wo, (size_t)wo * sizeof(float));
            memset(to + wo, 0, (size_t)(wp - wo) * sizeof(float));
        }
    memset(g + n * out * lg, 0, (size_t)slack * sizeof(float));
    return g;
}

/* dx[n][C][Hp][Wp] += the transposed convolution of dy (zeroed by the caller).
 *
 * Per column-block, Z[k][p] = Σ_o W[o][k] · dy[o][p] is the shifted product with the roles
 * swapped (rows: columns k of W; sums: the rows o of its kept blocks), and each tile of Z is
 * added at once to dx[c(k)][p + shift(k)]. Threads take (image, run of column-blocks) where a
 * run starts and ends on a channel boundary, so no two write the same input channel. */
int bspc_input_grad(i64 n, i64 channels, i64 hp, i64 wp, const float *dy, i64 out, i64 kh, i64 kw,
                    i64 dh, i64 dw, i64 r, i64 c, const i64 *t_ptr, const i64 *t_row,
                    const i64 *t_block, const float *values, float *dx, int n_threads)
{
    i64 ho = hp - dh * (kh - 1), wo = wp - dw * (kw - 1), K = channels * kh * kw, taps = kh * kw;
    i64 n_cb = (K + c - 1) / c, nnz = t_ptr[n_cb], plane = hp * wp, lg = ho * wp;
    if (n <= 0 || ho <= 0 || wo <= 0 || nnz == 0) return 0;
    i64 cp = rows_padded(c);
    float *g = grid_grad(n, out, ho, wo, wp, dy, TILE, n_threads);
    i64 *off = malloc((size_t)(nnz * r + n_cb + 1) * sizeof(i64));
    float *panels = malloc((size_t)(nnz * r * cp) * sizeof(float));
    if (!g || !off || !panels) {
        free(g);
        free(off);
        free(panels);
        return 1;
    }
    i64 *groups = off + nnz * r, n_groups = 0; /* column-blocks starting a run of whole channels */
    for (i64 b = 0; b < n_cb; b++)
        if (b * c % taps == 0) groups[n_groups++] = b;
    groups[n_groups] = n_cb;
    /* Per column-block: the rows o of its kept blocks (as offsets into g) and the panel
     * panel[t][o][m] = W[o][b·c + t·MR + m]. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (i64 b = 0; b < n_cb; b++) {
        i64 base = t_ptr[b] * r, count = 0;
        for (i64 e = t_ptr[b]; e < t_ptr[b + 1]; e++)
            for (i64 q = 0; q < MIN(r, out - t_row[e] * r); q++) off[base + count++] = (t_row[e] * r + q) * lg;
        float *panel = panels + base * cp;
        i64 cols = MIN(c, K - b * c), k = 0;
        for (i64 e = t_ptr[b]; e < t_ptr[b + 1]; e++)
            for (i64 q = 0; q < MIN(r, out - t_row[e] * r); q++, k++)
                for (i64 m = 0; m < cp; m++)
                    panel[(m / MR) * count * MR + k * MR + m % MR] =
                        m < cols ? values[(t_block[e] * r + q) * c + m] : 0.0f;
    }
    i64 n_rt = (c + MR - 1) / MR;
#pragma omp parallel for schedule(dynamic, 1) collapse(2) num_threads(n_threads)
    for (i64 img = 0; img < n; img++)
        for (i64 gi = 0; gi < n_groups; gi++)
            for (i64 b = groups[gi]; b < groups[gi + 1]; b++) {
                i64 k = (t_ptr[b + 1] - t_ptr[b]) * r, cols = MIN(c, K - b * c);
                for (i64 e = t_ptr[b]; e < t_ptr[b + 1]; e++) k -= MAX(0, (t_row[e] + 1) * r - out);
                const float *src = g + img * out * lg;
                for (i64 t = 0; t < n_rt; t++) {
                    i64 k0 = b * c + t * MR, rows = MIN(MR, cols - t * MR);
                    if (rows <= 0 || k == 0) continue;
                    i64 shift[MR];
                    float *chan[MR];
                    for (i64 m = 0; m < rows; m++) {
                        i64 col = k0 + m, i = col / kw % kh, j = col % kw;
                        shift[m] = i * dh * wp + j * dw;
                        chan[m] = dx + (img * channels + col / taps) * plane;
                    }
                    const float *panel = panels + t_ptr[b] * r * cp + t * k * MR;
#define ADD(m, from, p, len)                                                                       \
    do {                                                                                           \
        float *to_ = chan[m] + (p) + shift[m];                                                     \
        for (i64 q_ = 0; q_ < (len); q_++) to_[q_] += (from)[q_];                                  \
    } while (0)
                    /* Z is zero at the grid's columns w ≥ Wo, so whole tiles are added where
                     * they stay inside the channel's plane, and only the last ones pixel-row by
                     * pixel-row. g has TILE zeros of slack: tiles may read past its last pixel. */
                    float tmp[MR][TILE] __attribute__((aligned(64)));
                    i64 p0 = 0;
                    for (; p0 + TILE <= lg - dw * (kw - 1); p0 += TILE) {
                        shifted_tile(NV, k, panel, off + t_ptr[b] * r, src, p0, tmp);
                        for (i64 m = 0; m < rows; m++) {
                            float *to = chan[m] + p0 + shift[m];
                            for (int q = 0; q < TILE; q++) to[q] += tmp[m][q];
                        }
                    }
                    for (; p0 < lg; p0 += TILE) {
                        shifted_tile(NV, k, panel, off + t_ptr[b] * r, src, p0, tmp);
                        FOR_VALID(rows, p0, TILE, 0, lg, wp, wo, ADD);
                    }
#undef ADD
                }
            }
    free(g);
    free(off);
    free(panels);
    return 0;
}

/* acc += the DO × DK dot products, lane by lane, of rows of g (at go[a]) and of x (at xo[b]) over
 * pixels [0, L). The last partial vector is read ending at L, with the lanes already counted
 * zeroed in g, so nothing is read past pixel L − 1 (L < VW: pixel by pixel, into lane 0). */
static void dot_tile(i64 L, const float *g, const i64 go[DO], const float *x, const i64 xo[DK],
                     vec acc[DO][DK])
{
    vec sum[DO][DK];
    for (int a = 0; a < DO; a++)
        for (int b = 0; b < DK; b++) sum[a][b] = acc[a][b];
    i64 p = 0;
    for (; p + VW <= L; p += VW) {
        vec gv[DO], xv[DK];
        for (int a = 0; a < DO; a++) gv[a] = *(const vec *)(g + go[a] + p);
        for (int b = 0; b < DK; b++) xv[b] = *(const vec *)(x + xo[b] + p);
        for (int a = 0; a < DO; a++)
            for (int b = 0; b < DK; b++) sum[a][b] += gv[a] * xv[b];
    }
    if (p < L && L >= VW) {
        float tail[DO][VW];
        for (int a = 0; a < DO; a++)
            for (int t = 0; t < VW; t++) tail[a][t] = L - VW + t >= p ? g[go[a] + L - VW + t] : 0.0f;
        for (int a = 0; a < DO; a++)
            for (int b = 0; b < DK; b++) sum[a][b] += *(const vec *)tail[a] * *(const vec *)(x + xo[b] + L - VW);
    } else
        for (; p < L; p++)
            for (int a = 0; a < DO; a++)
                for (int b = 0; b < DK; b++) sum[a][b][0] += g[go[a] + p] * x[xo[b] + p];
    for (int a = 0; a < DO; a++)
        for (int b = 0; b < DK; b++) acc[a][b] = sum[a][b];
}

/* grad[e][q][m] = Σ_n Σ_pixels dy[n][row q of block e][p] · x[n][c(k)][p + shift(k)], k the
 * block's column m; zero past the bounds of W. */
int bspc_values_grad(i64 n, i64 channels, i64 hp, i64 wp, const float *x, const float *dy, i64 out,
                     i64 kh, i64 kw, i64 dh, i64 dw, i64 r, i64 c, i64 nnz, const i64 *row_idx,
                     const i64 *col_idx, float *grad, int n_threads)
{
    i64 ho = hp - dh * (kh - 1), wo = wp - dw * (kw - 1), K = channels * kh * kw;
    i64 plane = hp * wp, lg = ho * wp, L = (ho - 1) * wp + wo;
    memset(grad, 0, (size_t)(nnz * r * c) * sizeof(float));
    if (n <= 0 || ho <= 0 || wo <= 0 || nnz == 0) return 0;
    float *g = grid_grad(n, out, ho, wo, wp, dy, 0, n_threads);
    if (!g) return 1;
    i64 n_ot = (r + DO - 1) / DO, n_kt = (c + DK - 1) / DK;
    int failed = 0;
    /* A task: DO rows of a block against all its columns, image by image, so the rows of dy
     * and x it reads stay in L1 across the column tiles; sums stay in vectors until the end. */
#pragma omp parallel for schedule(dynamic, 1) collapse(2) num_threads(n_threads)
    for (i64 e = 0; e < nnz; e++)
        for (i64 ot = 0; ot < n_ot; ot++) {
            i64 o0 = row_idx[e] * r + ot * DO, rows = MIN(MIN(DO, r - ot * DO), out - o0);
            i64 cols = MIN(c, K - col_idx[e] * c), tiles = (cols + DK - 1) / DK, go[DO];
            vec(*acc)[DO][DK] = calloc((size_t)n_kt, sizeof(*acc));
            if (!acc) failed = 1;
            if (rows <= 0 || !acc) {
                free(acc);
                continue;
            }
            /* A partial tile repeats its last row or column; those sums are dropped. */
            for (int a = 0; a < DO; a++) go[a] = (o0 + MIN(a, rows - 1)) * lg;
            for (i64 img = 0; img < n; img++)
                for (i64 kt = 0; kt < tiles; kt++) {
                    i64 xo[DK], w = MIN(DK, cols - kt * DK);
                    column_offsets(col_idx[e] * c + kt * DK, w, K, kh, kw, dh, dw, wp, plane, xo);
                    for (i64 b = w; b < DK; b++) xo[b] = xo[w - 1];
                    dot_tile(L, g + img * out * lg, go, x + img * channels * plane, xo, acc[kt]);
                }
            float *dst = grad + (e * r + ot * DO) * c;
            for (i64 kt = 0; kt < tiles; kt++)
                for (i64 a = 0; a < rows; a++)
                    for (i64 b = 0; b < MIN(DK, cols - kt * DK); b++) dst[a * c + kt * DK + b] = hsum(acc[kt][a][b]);
            free(acc);
        }
    free(g);
    return failed;
}
