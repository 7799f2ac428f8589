/* Block-sparse convolutions (stride 1, any kernel size, dilation and zero padding) straight
 * from NCHW tensors, without unfolding the input into patches.
 *
 * The weight is the GEMM form W (out × C·kh·kw, column k = c·kh·kw + i·kw + j) keeping only
 * some r×c blocks, stored as `values[nnz][r][c]` with a row-block CSR, as for the linear
 * kernels. The input x[n][C][H][W] is padded to Hp × Wp (pt above, pl on the left) and the
 * output has Ho = Hp − dh·(kh−1) rows of Wo = Wp − dw·(kw−1) pixels.
 *
 * Pixels are indexed on the padded-width grid, p = h·Wp + w: there, column k of W reads the
 * padded input at a fixed shift, x[c][p + i·dh·Wp + j·dw], so a run of output pixels is a
 * contiguous run of input floats and the products vectorise over pixels, with weights
 * broadcast. The grid's columns w ≥ Wo are computed but never stored. Each task pads the
 * channels it reads into its own buffer, which stays in cache (a padded copy of the whole
 * input would cost a third of a sparse forward in memory traffic).
 *
 *   bspc_forward     y = W ⊛ x + bias, only the kept blocks' columns visited.
 *   bspc_input_grad  dx = the transposed convolution of dy, walking the blocks by column-block.
 *   bspc_values_grad dW at the kept blocks only: dot products of dy and shifted x along pixels.
 *
 * The shape travels as `dims`: n, C, H, W, out, kh, kw, dh, dw, pt, pb, pl, pr, r, c.
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
#define TILE (NV * VW)             /* pixels per register tile */
#define CHUNK (2048 / TILE * TILE) /* pixels per run of the input gradient's Z rows */

typedef float vec __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));
typedef float v4 __attribute__((vector_size(4 * sizeof(float))));

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ALWAYS_INLINE inline __attribute__((always_inline))

int bspc_vector_width(void) { return VW; }
int bspc_tile_rows(void) { return MR; }

typedef struct {
    i64 n, channels, h, w, out, kh, kw, dh, dw, pt, pb, pl, pr, r, c;
    i64 hp, wp, ho, wo, taps, K, plane, L; /* L: grid pixels up to the last output pixel */
} geometry;

static geometry geometry_of(const i64 d[15])
{
    i64 hp = d[2] + d[9] + d[10], wp = d[3] + d[11] + d[12];
    i64 ho = hp - d[7] * (d[5] - 1), wo = wp - d[8] * (d[6] - 1);
    return (geometry){d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13],
                      d[14], hp, wp, ho, wo, d[5] * d[6], d[1] * d[5] * d[6], hp * wp, (ho - 1) * wp + wo};
}

static int empty(const geometry *G) { return G->n <= 0 || G->ho <= 0 || G->wo <= 0; }

/* Scratch memory kept between calls (up to KEEP bytes): a fresh buffer of megabytes costs a
 * page fault per 4 KiB on first touch, as much as a sparse product. Each thread has its own. */
#define KEEP ((size_t)64 << 20)
typedef struct {
    float *data;
    size_t bytes;
} scratch;
static __thread scratch grid_scratch, pad_scratch, z_scratch;

static float *scratch_get(scratch *s, size_t bytes)
{
    bytes = (bytes + 63) / 64 * 64 + 64; /* never empty; whole cache lines */
    if (bytes > s->bytes) {
        free(s->data);
        s->data = aligned_alloc(64, bytes);
        s->bytes = s->data ? bytes : 0;
    }
    return s->data;
}

/* Frees a buffer grown past KEEP by an unusually large call. */
static void scratch_trim(scratch *s)
{
    if (s->bytes > KEEP) {
        free(s->data);
        *s = (scratch){NULL, 0};
    }
}

/* Channels chans[0..count) of one image, zero-padded, one after the other in buf. */
static void pad_channels(const geometry *G, const float *x, const i64 *chans, i64 count, float *buf)
{
    for (i64 s = 0; s < count; s++) {
        const float *from = x + chans[s] * G->h * G->w;
        float *to = buf + s * G->plane;
        memset(to, 0, (size_t)(G->pt * G->wp + G->pl) * sizeof(float));
        to += G->pt * G->wp + G->pl;
        for (i64 y = 0; y < G->h; y++, to += G->wp) {
            memcpy(to, from + y * G->w, (size_t)G->w * sizeof(float));
            memset(to + G->w, 0, (size_t)(y + 1 < G->h ? G->pr + G->pl : G->pr) * sizeof(float));
        }
        memset(to - G->pl, 0, (size_t)(G->pb * G->wp) * sizeof(float));
    }
}

/* Input offsets of columns [k0, k0 + count) of W: slot[c]·plane + i·dh·Wp + j·dw, where
 * slot[c] is channel c's place in a task's buffer of padded channels. */
static void column_offsets(const geometry *G, i64 k0, i64 count, const i64 *slot, i64 *off)
{
    for (i64 q = 0; q < count; q++) {
        i64 k = k0 + q, i = k / G->kw % G->kh, j = k % G->kw;
        off[q] = slot[k / G->taps] * G->plane + i * G->dh * G->wp + j * G->dw;
    }
}

/* Gives each channel of columns [k0, k0 + count) a slot (slot[c] < 0: none yet), listing the
 * new ones in chans; returns how many channels are listed now. */
static i64 assign_slots(const geometry *G, i64 k0, i64 count, i64 *slot, i64 *chans, i64 listed)
{
    for (i64 k = k0; k < k0 + count; k++)
        if (slot[k / G->taps] < 0) {
            slot[k / G->taps] = listed;
            chans[listed++] = k / G->taps;
        }
    return listed;
}

static i64 rows_padded(i64 r) { return (r + MR - 1) / MR * MR; }

/* ---- the shifted product --------------------------------------------------------------- */

/* to[m][t] = Σ_k panel[k][m] · src[off[k] + p0 + t] for MR rows and nv·VW pixels from p0. */
static ALWAYS_INLINE void shifted_tile(int nv, i64 nk, const float *panel, const i64 *off,
                                       const float *src, i64 p0, float *const to[MR])
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
        for (int v = 0; v < nv; v++) *(vec *)(to[m] + v * VW) = acc[m][v];
}

/* The same for `count` < VW pixels, one at a time. */
static void shifted_scalar(i64 count, i64 nk, const float *panel, const i64 *off, const float *src,
                           i64 p0, float *const to[MR])
{
    for (int m = 0; m < MR; m++)
        for (i64 t = 0; t < count; t++) {
            float s = 0.0f;
            for (i64 k = 0; k < nk; k++) s += panel[k * MR + m] * src[off[k] + p0 + t];
            to[m][t] = s;
        }
}

/* ---- forward ----------------------------------------------------------------------------- */

/* Stores rows m < rows of a tile of grid pixels [p0, p0 + count), those from pixel `from` on,
 * at their output pixels (grid columns w < Wo), plus bias. */
static void store_tile(const geometry *G, float tmp[MR][TILE], i64 rows, i64 p0, i64 count, i64 from,
                       const float *bias, float *y)
{
    for (i64 p = MAX(p0, from); p < p0 + count;) {
        i64 w = p % G->wp, end = MIN(p0 + count, p - w + G->wo);
        if (w >= G->wo) {
            p += G->wp - w;
            continue;
        }
        for (i64 m = 0; m < rows; m++) {
            float *to = y + m * G->ho * G->wo + p / G->wp * G->wo + w, add = bias ? bias[m] : 0.0f;
            for (i64 q = 0; q < end - p; q++) to[q] = tmp[m][p - p0 + q] + add;
        }
        p = end;
    }
}

/* Output rows [o0, o0 + rows) of one image from its padded channels (src, at off). The last
 * tile is shifted back to end at pixel L (recomputing some pixels, stored once), so no read
 * goes past the padded channels. */
static void forward_rows(const geometry *G, i64 nk, const float *panel, const i64 *off, const float *src,
                         i64 rows, const float *bias, float *y)
{
    float tmp[MR][TILE] __attribute__((aligned(64))), *to[MR];
    for (int m = 0; m < MR; m++) to[m] = tmp[m];
    i64 p0 = 0, L = G->L;
    for (; p0 + TILE <= L; p0 += TILE) {
        shifted_tile(NV, nk, panel, off, src, p0, to);
        store_tile(G, tmp, rows, p0, TILE, p0, bias, y);
    }
    if (p0 < L && L >= TILE) {
        shifted_tile(NV, nk, panel, off, src, L - TILE, to);
        store_tile(G, tmp, rows, L - TILE, TILE, p0, bias, y);
        return;
    }
    for (; p0 + VW <= L; p0 += VW) {
        shifted_tile(1, nk, panel, off, src, p0, to);
        store_tile(G, tmp, rows, p0, VW, p0, bias, y);
    }
    if (p0 < L) {
        shifted_scalar(L - p0, nk, panel, off, src, p0, to);
        store_tile(G, tmp, rows, p0, L - p0, p0, bias, y);
    }
}

/* Per row-block b, from index row_ptr[b]·c of off, chans and panels·rows_padded(r): the
 * channels its kept blocks read (n_ch[b]), the input offsets of its kept columns (nk[b], into
 * those channels padded one after the other) and its weights as panels of MR rows,
 * panel[t][k][m] = W[b·r + t·MR + m][column k], zero past the rows of W. Called by every
 * thread of a team. */
static void pack_forward(const geometry *G, i64 n_rb, const i64 *row_ptr, const i64 *col_idx,
                         const float *values, i64 *off, i64 *chans, i64 *nk, i64 *n_ch, float *panels,
                         int *failed)
{
    i64 r = G->r, c = G->c, rp = rows_padded(r);
    i64 *slot = malloc((size_t)MAX(G->channels, 1) * sizeof(i64));
    if (!slot) {
#pragma omp atomic write
        *failed = 1;
    }
    for (i64 ch = 0; slot && ch < G->channels; ch++) slot[ch] = -1;
#pragma omp for schedule(dynamic, 1)
    for (i64 b = 0; b < n_rb; b++) {
        if (!slot) continue;
        i64 base = row_ptr[b] * c, count = 0, listed = 0;
        for (i64 e = row_ptr[b]; e < row_ptr[b + 1]; e++) {
            i64 k0 = col_idx[e] * c, cols = MIN(c, G->K - k0);
            listed = assign_slots(G, k0, cols, slot, chans + base, listed);
            column_offsets(G, k0, cols, slot, off + base + count);
            count += cols;
        }
        for (i64 s = 0; s < listed; s++) slot[chans[base + s]] = -1;
        nk[b] = count, n_ch[b] = listed;
        float *panel = panels + base * rp;
        i64 rows = MIN(r, G->out - b * r), k = 0;
        for (i64 e = row_ptr[b]; e < row_ptr[b + 1]; e++)
            for (i64 q = 0; q < MIN(c, G->K - col_idx[e] * c); q++, k++)
                for (i64 m = 0; m < rp; m++)
                    panel[(m / MR) * count * MR + k * MR + m % MR] = m < rows ? values[(e * r + m) * c + q] : 0.0f;
    }
    free(slot);
}

/* y[n][out][Ho][Wo] = bias + the convolution of x[n][C][H][W] (contiguous) with the kept blocks.
 * Tasks: (image, row-block). Returns nonzero when it cannot allocate its buffers. */
int bspc_forward(const i64 dims[15], const float *x, const i64 *row_ptr, const i64 *col_idx,
                 const float *values, const float *bias, float *y, int n_threads)
{
    geometry G = geometry_of(dims);
    i64 r = G.r, c = G.c, n_rb = (G.out + r - 1) / r, nnz = row_ptr[n_rb];
    if (empty(&G)) return 0;
    i64 *index = malloc((size_t)(2 * nnz * c + 2 * n_rb + 1) * sizeof(i64));
    float *panels = malloc((size_t)(nnz * c * rows_padded(r) + 1) * sizeof(float));
    int failed = !index || !panels;
    if (!failed) {
        i64 *off = index, *chans = off + nnz * c, *nk = chans + nnz * c, *n_ch = nk + n_rb;
#pragma omp parallel num_threads(n_threads)
        {
            pack_forward(&G, n_rb, row_ptr, col_idx, values, off, chans, nk, n_ch, panels, &failed);
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (i64 img = 0; img < G.n; img++)
                for (i64 b = 0; b < n_rb; b++) {
                    float *buf = scratch_get(&pad_scratch, (size_t)(n_ch[b] * G.plane) * sizeof(float));
                    if (failed || !buf) {
#pragma omp atomic write
                        failed = 1;
                        continue;
                    }
                    i64 base = row_ptr[b] * c;
                    pad_channels(&G, x + img * G.channels * G.h * G.w, chans + base, n_ch[b], buf);
                    for (i64 o0 = b * r; o0 < MIN(G.out, (b + 1) * r); o0 += MR)
                        forward_rows(&G, nk[b], panels + base * rows_padded(r) + (o0 - b * r) * nk[b], off + base,
                                     buf, MIN(MR, MIN(G.out, (b + 1) * r) - o0), bias ? bias + o0 : NULL,
                                     y + (img * G.out + o0) * G.ho * G.wo);
                }
            scratch_trim(&pad_scratch);
        }
    }
    free(index);
    free(panels);
    return failed;
}

/* ---- gradients --------------------------------------------------------------------------- */

/* Floats per row of the grid gradient: whole vectors, so its rows are aligned. */
static i64 grid_stride(const geometry *G) { return (G->ho * G->wp + VW - 1) / VW * VW; }

/* dy[n][out][Ho][Wo] on the padded-width grid: g[n][out][grid_stride] holding pixel h·Wp + w,
 * zero at w ≥ Wo and past the last pixel, then `slack` zeros after the last image, so whole
 * tiles can be read past the end of a row. Called by every thread of a team. */
static void grid_grad(const geometry *G, const float *dy, i64 slack, float *g)
{
    i64 ldg = grid_stride(G), rows = G->n * G->out;
#pragma omp for schedule(static)
    for (i64 row = 0; row <= rows; row++) {
        float *to = g + row * ldg;
        if (row == rows) {
            memset(to, 0, (size_t)slack * sizeof(float));
            continue;
        }
        for (i64 h = 0; h < G->ho; h++) {
            memcpy(to + h * G->wp, dy + (row * G->ho + h) * G->wo, (size_t)G->wo * sizeof(float));
            memset(to + h * G->wp + G->wo, 0, (size_t)(G->wp - G->wo) * sizeof(float));
        }
        memset(to + G->ho * G->wp, 0, (size_t)(ldg - G->ho * G->wp) * sizeof(float));
    }
}

/* One column-block's share of the padded input gradient of one image, dxp (channels from
 * c_lo on): Z = the block-column's weights (panel) times the image's rows of the grid
 * gradient (src, at off), a run of CHUNK pixels at a time into z[c][chunk], then
 * dxp[c(k)][p + shift(k)] += Z[k][p] row by row. (Rows of one channel overlap: adding them
 * tile by tile would have each load wait for the stores just made.) */
static void input_grad_block(const geometry *G, i64 b, i64 nk, i64 chunk, const float *panel, const i64 *off,
                             const float *src, float *dxp, i64 c_lo, float *z)
{
    i64 c = G->c, cols = MIN(c, G->K - b * c), lg = G->ho * G->wp;
    if (nk == 0) return;
    for (i64 p0 = 0; p0 < lg; p0 += chunk) {
        i64 len = MIN(chunk, lg - p0);
        for (i64 t = 0; t < (cols + MR - 1) / MR; t++) {
            float *to[MR];
            for (i64 q = 0; q < len; q += TILE) {
                for (int m = 0; m < MR; m++) to[m] = z + (t * MR + m) * chunk + q;
                shifted_tile(NV, nk, panel + t * nk * MR, off, src, p0 + q, to);
            }
        }
        for (i64 m = 0; m < cols; m++) {
            i64 col = b * c + m, shift = col / G->kw % G->kh * G->dh * G->wp + col % G->kw * G->dw;
            /* Z is zero at the grid's columns w ≥ Wo; only the plane's end must not be passed. */
            i64 end = MIN(len, G->plane - shift - p0);
            float *to = dxp + (col / G->taps - c_lo) * G->plane + p0 + shift;
            const float *from = z + m * chunk;
            for (i64 q = 0; q < end; q++) to[q] += from[q];
        }
    }
}

/* Per column-block b, from index t_ptr[b]·r of off and panels·rows_padded(c): the offsets of
 * the rows o of its kept blocks into the grid gradient (nk[b] of them) and the panel
 * panel[t][o][m] = W[o][b·c + t·MR + m]. Called by every thread of a team. */
static void pack_input_grad(const geometry *G, i64 n_cb, const i64 *t_ptr, const i64 *t_row,
                            const i64 *t_block, const float *values, i64 *off, i64 *nk, float *panels)
{
    i64 r = G->r, c = G->c, cp = rows_padded(c), ldg = grid_stride(G);
#pragma omp for schedule(dynamic, 1)
    for (i64 b = 0; b < n_cb; b++) {
        i64 base = t_ptr[b] * r, count = 0;
        for (i64 e = t_ptr[b]; e < t_ptr[b + 1]; e++)
            for (i64 q = 0; q < MIN(r, G->out - t_row[e] * r); q++) off[base + count++] = (t_row[e] * r + q) * ldg;
        nk[b] = count;
        float *panel = panels + base * cp;
        i64 cols = MIN(c, G->K - b * c), k = 0;
        for (i64 e = t_ptr[b]; e < t_ptr[b + 1]; e++)
            for (i64 q = 0; q < MIN(r, G->out - t_row[e] * r); q++, k++)
                for (i64 m = 0; m < cp; m++)
                    panel[(m / MR) * count * MR + k * MR + m % MR] = m < cols ? values[(t_block[e] * r + q) * c + m] : 0.0f;
    }
}

/* dx[n][C][H][W] = the transposed convolution of dy[n][out][Ho][Wo] (every element written).
 * Tasks: (image, run of column-blocks starting and ending on a channel boundary); each
 * accumulates its channels, padded, in its own buffer and writes their unpadded part. */
int bspc_input_grad(const i64 dims[15], const float *dy, const i64 *t_ptr, const i64 *t_row, const i64 *t_block,
                    const float *values, float *dx, int n_threads)
{
    geometry G = geometry_of(dims);
    i64 r = G.r, c = G.c, n_cb = (G.K + c - 1) / c, nnz = t_ptr[n_cb], cp = rows_padded(c);
    i64 ldg = grid_stride(&G), chunk = MIN(CHUNK, (G.ho * G.wp + TILE - 1) / TILE * TILE);
    if (G.n <= 0) return 0;
    if (empty(&G) || nnz == 0) {
        memset(dx, 0, (size_t)(G.n * G.channels * G.h * G.w) * sizeof(float));
        return 0;
    }
    float *g = scratch_get(&grid_scratch, (size_t)(G.n * G.out * ldg + TILE) * sizeof(float));
    i64 *index = malloc((size_t)(nnz * r + 2 * n_cb + 1) * sizeof(i64));
    float *panels = malloc((size_t)(nnz * r * cp) * sizeof(float));
    int failed = !g || !index || !panels;
    if (!failed) {
        i64 *off = index, *nk = off + nnz * r, *groups = nk + n_cb, n_groups = 0;
        for (i64 b = 0; b < n_cb; b++)
            if (b * c % G.taps == 0) groups[n_groups++] = b;
        groups[n_groups] = n_cb;
#pragma omp parallel num_threads(n_threads)
        {
            grid_grad(&G, dy, TILE, g);
            pack_input_grad(&G, n_cb, t_ptr, t_row, t_block, values, off, nk, panels);
            float *z = scratch_get(&z_scratch, (size_t)(rows_padded(c) * chunk) * sizeof(float));
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (i64 img = 0; img < G.n; img++)
                for (i64 gi = 0; gi < n_groups; gi++) {
                    i64 c_lo = groups[gi] * c / G.taps, c_hi = MIN(G.channels, groups[gi + 1] * c / G.taps);
                    float *dxp = scratch_get(&pad_scratch, (size_t)((c_hi - c_lo) * G.plane) * sizeof(float));
                    if (!z || !dxp) {
#pragma omp atomic write
                        failed = 1;
                        continue;
                    }
                    memset(dxp, 0, (size_t)((c_hi - c_lo) * G.plane) * sizeof(float));
                    for (i64 b = groups[gi]; b < groups[gi + 1]; b++)
                        input_grad_block(&G, b, nk[b], chunk, panels + t_ptr[b] * r * cp, off + t_ptr[b] * r,
                                         g + img * G.out * ldg, dxp, c_lo, z);
                    for (i64 ch = c_lo; ch < c_hi; ch++)
                        for (i64 y = 0; y < G.h; y++)
                            memcpy(dx + ((img * G.channels + ch) * G.h + y) * G.w,
                                   dxp + (ch - c_lo) * G.plane + (y + G.pt) * G.wp + G.pl, (size_t)G.w * sizeof(float));
                }
            scratch_trim(&pad_scratch);
        }
    }
    scratch_trim(&grid_scratch);
    free(index);
    free(panels);
    return failed;
}

/* sums = the DO × DK dot products, lane by lane, of rows of g (at go[a]) and of x (at xo[b])
 * over pixels [0, L). The last partial vector is read ending at L, with the lanes already
 * counted zeroed in g, so nothing is read past pixel L − 1 (L < VW: pixel by pixel). */
static void dot_tile(i64 L, const float *g, const i64 go[DO], const float *x, const i64 xo[DK],
                     vec sums[DO][DK])
{
    vec sum[DO][DK];
    for (int a = 0; a < DO; a++)
        for (int b = 0; b < DK; b++) sum[a][b] = (vec){0};
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
        for (int b = 0; b < DK; b++) sums[a][b] = sum[a][b];
}

/* The lanes of v folded into 4 (a full horizontal sum per dot product would cost as much again). */
static ALWAYS_INLINE v4 fold(vec v)
{
    union {
        vec v;
        v4 q[VW / 4];
    } u = {v};
    v4 s = u.q[0];
    for (int i = 1; i < VW / 4; i++) s += u.q[i];
    return s;
}

/* One image's share of a task of the values gradient: the kept blocks [e0, e1), with the
 * channels they read padded in buf (at slot[c]); part[e][q][m] holds 4 partial sums of
 * grad[e][q][m]. */
static void values_grad_image(const geometry *G, i64 e0, i64 e1, const float *g, const float *buf, const i64 *slot,
                              const i64 *row_idx, const i64 *col_idx, v4 *part)
{
    i64 r = G->r, c = G->c, ldg = grid_stride(G);
    for (i64 e = e0; e < e1; e++) {
        i64 cols = MIN(c, G->K - col_idx[e] * c);
        for (i64 q0 = 0; q0 < MIN(r, G->out - row_idx[e] * r); q0 += DO) {
            i64 o0 = row_idx[e] * r + q0, rows = MIN(MIN(DO, r - q0), G->out - o0), go[DO];
            /* A partial tile repeats its last row or column; those sums are dropped. */
            for (int a = 0; a < DO; a++) go[a] = (o0 + MIN(a, rows - 1)) * ldg;
            for (i64 m0 = 0; m0 < cols; m0 += DK) {
                i64 xo[DK], w = MIN(DK, cols - m0);
                column_offsets(G, col_idx[e] * c + m0, w, slot, xo);
                for (i64 b = w; b < DK; b++) xo[b] = xo[w - 1];
                vec sums[DO][DK];
                dot_tile(G->L, g, go, buf, xo, sums);
                for (i64 a = 0; a < rows; a++)
                    for (i64 b = 0; b < w; b++) part[((e - e0) * r + q0 + a) * c + m0 + b] += fold(sums[a][b]);
            }
        }
    }
}

/* grad[e][q][m] = Σ_n Σ_pixels dy[n][row q of block e][p] · x[n][c(k)][p + shift(k)], k the
 * block's column m; zero past the bounds of W. Tasks: runs of blocks of one row-block, image
 * by image, so that an image's rows of dy (shared by the blocks) and of x (shared by a block's
 * rows) are read from memory once. */
int bspc_values_grad(const i64 dims[15], const float *x, const float *dy, i64 nnz, const i64 *row_idx,
                     const i64 *col_idx, float *grad, int n_threads)
{
    geometry G = geometry_of(dims);
    i64 r = G.r, c = G.c, ldg = grid_stride(&G);
    memset(grad, 0, (size_t)(nnz * r * c) * sizeof(float));
    if (empty(&G) || nnz == 0) return 0;
    /* Runs of up to `most` blocks: enough tasks for the threads, partial sums within L2. */
    i64 most = MAX(1, MIN((nnz + 4 * n_threads - 1) / (4 * n_threads), (i64)(1 << 20) / (r * c * 16)));
    i64 *starts = malloc((size_t)(nnz + 1) * sizeof(i64)), n_tasks = 0;
    float *g = scratch_get(&grid_scratch, (size_t)(G.n * G.out * ldg) * sizeof(float));
    int failed = !starts || !g;
    if (!failed) {
        for (i64 e = 0; e < nnz; e++)
            if (e == 0 || row_idx[e] != row_idx[e - 1] || e - starts[n_tasks - 1] == most) starts[n_tasks++] = e;
        starts[n_tasks] = nnz;
#pragma omp parallel num_threads(n_threads)
        {
            grid_grad(&G, dy, 0, g);
#pragma omp for schedule(dynamic, 1)
            for (i64 t = 0; t < n_tasks; t++) {
                i64 e0 = starts[t], e1 = starts[t + 1], listed = 0;
                v4 *part = calloc((size_t)((e1 - e0) * r * c), sizeof(v4));
                i64 *slot = malloc((size_t)G.channels * 2 * sizeof(i64)), *chans = slot + G.channels;
                float *buf = NULL;
                if (part && slot) {
                    for (i64 ch = 0; ch < G.channels; ch++) slot[ch] = -1;
                    for (i64 e = e0; e < e1; e++)
                        listed = assign_slots(&G, col_idx[e] * c, MIN(c, G.K - col_idx[e] * c), slot, chans, listed);
                    buf = scratch_get(&pad_scratch, (size_t)(listed * G.plane) * sizeof(float));
                }
                if (buf) {
                    for (i64 img = 0; img < G.n; img++) {
                        pad_channels(&G, x + img * G.channels * G.h * G.w, chans, listed, buf);
                        values_grad_image(&G, e0, e1, g + img * G.out * ldg, buf, slot, row_idx, col_idx, part);
                    }
                    for (i64 i = 0; i < (e1 - e0) * r * c; i++)
                        grad[e0 * r * c + i] = part[i][0] + part[i][1] + part[i][2] + part[i][3];
                } else {
#pragma omp atomic write
                    failed = 1;
                }
                free(part);
                free(slot);
            }
            scratch_trim(&pad_scratch);
        }
    }
    scratch_trim(&grid_scratch);
    free(starts);
    return failed;
}
