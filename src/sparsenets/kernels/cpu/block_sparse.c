/* Block-sparse products for a linear layer Y = X·Wᵀ (+ bias) whose weight W (out × in) keeps
 * only some r×c blocks, stored as `values[nnz][r][c]` and indexed by a row-block CSR.
 *
 *   bsp_spmm   Out = In·P, P block-sparse, its blocks listed per output block.
 *              Forward  (In = X,  P = Wᵀ, one output block per row-block of W) and
 *              input gradient (In = dY, P = W, one output block per column-block of W)
 *              are the same product, so they share this one kernel.
 *   bsp_gemv   The forward for a few input rows, reading W as stored (no packing).
 *   bsp_sddmm  Gradient of the kept blocks only: G[e] = dY[:, rows(e)]ᵀ · X[:, cols(e)].
 *
 * All matrices are fp32, row-major with a leading dimension (row stride). Shapes that don't
 * divide by the block are handled here: edge blocks are stored padded with zeros, and the
 * kernels never read or write past the true matrix bounds.
 *
 * Written with GCC vector extensions rather than intrinsics, so one source vectorises for
 * AVX-512, AVX2, SSE or NEON; VW (vector width) and MR (rows per register tile) follow the ISA.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

/* VW: floats per vector. MR: rows per register tile (MR × 2 accumulators + 2 weight vectors
 * fit the register file). GR: weight rows per pass of the few-rows kernel (GR accumulators). */
#if defined(__AVX512F__)
#define VW 16
#define MR 12
#define GR 16
#elif defined(__AVX__)
#define VW 8
#define MR 6
#define GR 8
#elif defined(__aarch64__)
#define VW 4
#define MR 12
#define GR 16
#else
#define VW 4
#define MR 6
#define GR 4
#endif

/* Vectors of 4, 8 and 16 floats, as far as the CPU has them; `vec` is the widest. Narrow blocks
 * use narrow vectors, so a 4-wide block isn't computed 16 wide. aligned(4): loads and stores
 * may be unaligned. */
#define VECTOR(n) __attribute__((vector_size(n * sizeof(float)), aligned(4), may_alias))
typedef float v4 VECTOR(4);
#if VW >= 8
typedef float v8 VECTOR(8);
#endif
#if VW >= 16
typedef float v16 VECTOR(16);
#endif
#define CAT(a, b) a##b
#define VEC(n) CAT(v, n)
typedef VEC(VW) vec;

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define ALWAYS_INLINE inline __attribute__((always_inline))

int bsp_vector_width(void) { return VW; }
int bsp_tile_rows(void) { return MR; }

/* Scratch memory reused across calls by each calling thread: a fresh multi-megabyte buffer
 * costs a page fault per 4 KiB on first touch, which is comparable to a sparse product. */
#define WORKSPACE_KEEP ((size_t)64 << 20)
static __thread float *workspace;
static __thread size_t workspace_size;

static float *workspace_get(size_t bytes)
{
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > WORKSPACE_KEEP) return aligned_alloc(64, bytes);
    if (bytes > workspace_size) {
        free(workspace);
        workspace = aligned_alloc(64, bytes);
        workspace_size = workspace ? bytes : 0;
    }
    return workspace;
}

static void workspace_release(float *buffer)
{
    if (buffer != workspace) free(buffer);
}

/* ---- Out = In·P ------------------------------------------------------------------------ */

/* Input rows are copied into tiles of MR rows, interleaved in chunks of KC columns:
 * tile[k / KC][m][k % KC]. For one k the micro-kernel then broadcasts its MR values from one
 * pointer at fixed offsets, and the copy itself is whole-vector moves. Missing rows and the
 * columns past the end are zero. */
#define KC 16
#define CHUNK (MR * KC) /* floats per chunk of a tile */

static i64 tile_size(i64 in_dim) { return (in_dim + KC - 1) / KC * CHUNK; }

typedef float chunk_vec __attribute__((vector_size(KC * sizeof(float)), aligned(4), may_alias));

static void pack_rows(i64 tile, i64 rows, const float *in, i64 ld_in, i64 in_dim, float *xp)
{
    float *dst = xp + tile * tile_size(in_dim);
    i64 n = MIN(MR, rows - tile * MR), full = in_dim / KC;
    const float *src = in + tile * MR * ld_in;
    for (i64 q = 0; q < full; q++, dst += CHUNK)
        for (int m = 0; m < MR; m++)
            *(chunk_vec *)(dst + m * KC) = m < n ? *(const chunk_vec *)(src + m * ld_in + q * KC) : (chunk_vec){0};
    if (full * KC < in_dim) {
        memset(dst, 0, CHUNK * sizeof(float));
        for (int m = 0; m < n; m++)
            memcpy(dst + m * KC, src + m * ld_in + full * KC, (in_dim - full * KC) * sizeof(float));
    }
}

/* Gather the blocks of one output block into a contiguous panel [e][ib][obp] whose rows
 * (one per reduction index k) hold the block's outputs, padded to obp with zeros.
 * `transposed`: the stored block is (ob × ib) and must be transposed (forward, P = Wᵀ). */
static void pack_panel(i64 n_e, const i64 *blk, i64 first, const float *values, i64 ib,
                       i64 ob, i64 obp, int transposed, float *panel)
{
    for (i64 e = 0; e < n_e; e++) {
        i64 b = blk ? blk[first + e] : first + e;
        const float *v = values + b * ib * ob;
        float *dst = panel + e * ib * obp;
        for (i64 k = 0; k < ib; k++) {
            float *row = dst + k * obp;
            if (transposed)
                for (i64 t = 0; t < ob; t++) row[t] = v[t * ib + k];
            else
                memcpy(row, v + k * ob, ob * sizeof(float));
            for (i64 t = ob; t < obp; t++) row[t] = 0.0f;
        }
    }
}

/* The vector width for blocks of `side` floats: the narrowest that covers it, up to VW. */
static int lanes_for(i64 side) { return side <= 4 ? 4 : side <= 8 && VW >= 8 ? 8 : VW; }

/* Row counts a register tile is instantiated for; other counts are split into these. */
static int tile_rows(i64 left) { return left >= MR ? MR : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

static ALWAYS_INLINE void prefetch_inputs(const float *xp, i64 block, i64 ib)
{
    /* The next block's inputs: a jump in the column index the hardware prefetcher can't guess. */
    uint64_t first = block * ib / KC, last = ((block + 1) * ib - 1) / KC;
    const char *next = (const char *)(xp + first * CHUNK);
    for (uint64_t line = 0; line < (last - first + 1) * CHUNK * sizeof(float); line += 64)
        __builtin_prefetch(next + line);
}

/* One register tile of L-float vectors: mr rows × nv vectors of outputs, summed over every
 * block of the panel, written once with the bias. Defined once per vector width. */
#define DEFINE_SPMM_TILE(L)                                                                        \
    static ALWAYS_INLINE void spmm_tile_##L(const int mr, const int nv, i64 n_e,                  \
                                            const i64 *in_blk, i64 ib, i64 in_dim, const float *xp, \
                                            const float *pp, i64 obp, float *out, i64 ld_out,      \
                                            i64 n_valid, const float *bias)                        \
    {                                                                                              \
        v##L acc[MR][2];                                                                           \
        for (int m = 0; m < mr; m++)                                                               \
            for (int v = 0; v < nv; v++) acc[m][v] = (v##L){0};                                    \
        for (i64 e = 0; e < n_e; e++) {                                                            \
            i64 col0 = in_blk[e] * ib, kmax = MIN(ib, in_dim - col0);                              \
            const float *p = pp + e * ib * obp;                                                    \
            if (e + 1 < n_e) prefetch_inputs(xp, in_blk[e + 1], ib);                               \
            for (uint64_t k = col0; k < (uint64_t)(col0 + kmax); k++, p += obp) {                  \
                const float *x = xp + k / KC * CHUNK + k % KC;                                     \
                v##L w0 = *(const v##L *)p;                                                        \
                v##L w1 = nv > 1 ? *(const v##L *)(p + L) : w0;                                    \
                for (int m = 0; m < mr; m++) {                                                     \
                    acc[m][0] += w0 * x[m * KC];                                                   \
                    if (nv > 1) acc[m][1] += w1 * x[m * KC];                                       \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int m = 0; m < mr; m++) {                                                             \
            float *o = out + m * ld_out;                                                           \
            if (n_valid >= nv * L) {                                                               \
                for (int v = 0; v < nv; v++) {                                                     \
                    v##L y = acc[m][v];                                                            \
                    if (bias) y += *(const v##L *)(bias + v * L);                                  \
                    *(v##L *)(o + v * L) = y;                                                      \
                }                                                                                  \
            } else { /* a partial tile at the edge of the matrix or of a narrow block */           \
                float tmp[2 * L];                                                                  \
                memcpy(tmp, acc[m], nv * L * sizeof(float));                                       \
                for (i64 t = 0; t < n_valid; t++) o[t] = tmp[t] + (bias ? bias[t] : 0.0f);         \
            }                                                                                      \
        }                                                                                          \
    }

/* Only the widest vectors need two per row: a narrower width means the block fits in one. */
#define SPMM_CASE(L, M)                                                                           \
    case L * 100 + M:                                                                                     \
        if (L == VW && nv == 2)                                                                   \
            spmm_tile_##L(M, 2, n_e, in_blk, ib, in_dim, xp, pp, obp, out, ld_out, n_valid, bias); \
        else                                                                                      \
            spmm_tile_##L(M, 1, n_e, in_blk, ib, in_dim, xp, pp, obp, out, ld_out, n_valid, bias); \
        break;
#if MR > 8
#define SPMM_CASES(L) SPMM_CASE(L, 1) SPMM_CASE(L, 2) SPMM_CASE(L, 4) SPMM_CASE(L, 8) SPMM_CASE(L, MR)
#else
#define SPMM_CASES(L) SPMM_CASE(L, 1) SPMM_CASE(L, 2) SPMM_CASE(L, 4) SPMM_CASE(L, MR)
#endif

DEFINE_SPMM_TILE(4)
#if VW >= 8
DEFINE_SPMM_TILE(8)
#endif
#if VW >= 16
DEFINE_SPMM_TILE(16)
#endif

/* Dispatch to the instantiated tile; mr is one of tile_rows' counts. */
static void spmm_tile_any(int lanes, int mr, int nv, i64 n_e, const i64 *in_blk, i64 ib, i64 in_dim,
                          const float *xp, const float *pp, i64 obp, float *out, i64 ld_out,
                          i64 n_valid, const float *bias)
{
    switch (lanes * 100 + mr) {
        SPMM_CASES(4)
#if VW >= 8
        SPMM_CASES(8)
#endif
#if VW >= 16
        SPMM_CASES(16)
#endif
    }
}

/* Out[rows × out_dim] = In[rows × in_dim] · P (+ bias).
 * Output block o (ob columns) sums the entries ptr[o] .. ptr[o+1]-1; entry e multiplies
 * input block in_blk[e] (ib columns of In) by stored block blk[e] (or e if blk is NULL). */
int bsp_spmm(i64 rows, const float *in, i64 ld_in, i64 in_dim, float *out, i64 ld_out,
             i64 out_dim, i64 ib, i64 ob, const i64 *ptr, const i64 *in_blk, const i64 *blk,
             const float *values, int transposed, const float *bias, int n_threads)
{
    i64 n_ob = (out_dim + ob - 1) / ob; /* an empty output block gets its bias or zeros */
    i64 n_tiles = (rows + MR - 1) / MR;
    if (n_ob == 0 || n_tiles == 0) return 0;
    int lanes = lanes_for(ob);
    i64 obp = (ob + lanes - 1) / lanes * lanes;
    i64 max_e = 0;
    for (i64 o = 0; o < n_ob; o++) max_e = ptr[o + 1] - ptr[o] > max_e ? ptr[o + 1] - ptr[o] : max_e;

    i64 n_runs = MIN(n_tiles, (4 * n_threads + n_ob - 1) / n_ob);
    i64 tiles_per_run = (n_tiles + n_runs - 1) / n_runs;
    i64 panel_size = (max_e * ib * obp + 15) / 16 * 16; /* whole cache lines per thread */
    i64 xp_size = n_tiles * tile_size(in_dim);
    float *xp = workspace_get((xp_size + n_threads * panel_size) * sizeof(float));
    if (!xp) return -1;
    float *panels = xp + xp_size;

#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        float *panel = panels + omp_get_thread_num() * panel_size;
#else
        float *panel = panels;
#endif
#pragma omp for schedule(dynamic, 4) /* dynamic: a thread the OS delays doesn't hold up the rest */
        for (i64 t = 0; t < n_tiles; t++) pack_rows(t, rows, in, ld_in, in_dim, xp);

        /* Work items are (output block, run of row tiles); runs split the rows only when there
         * are too few output blocks to keep every thread busy. A thread repacks its panel only
         * when its output block changes. */
        i64 packed = -1;
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (i64 o = 0; o < n_ob; o++) {
            for (i64 run = 0; run < n_runs; run++) {
                i64 n_e = ptr[o + 1] - ptr[o];
                i64 out0 = o * ob, n_out = MIN(ob, out_dim - out0);
                if (packed != o) {
                    pack_panel(n_e, blk, ptr[o], values, ib, ob, obp, transposed, panel);
                    packed = o;
                }
                for (i64 t0 = 0; t0 < obp && t0 < n_out; t0 += 2 * lanes) {
                    int nv = obp - t0 >= 2 * lanes ? 2 : 1;
                    const float *bias_t = bias ? bias + out0 + t0 : NULL;
                    i64 row_end = MIN(rows, (run + 1) * tiles_per_run * MR);
                    for (i64 row = run * tiles_per_run * MR, mr; row < row_end; row += mr) {
                        mr = tile_rows(row_end - row); /* whole tiles, then the last one's rows */
                        const float *x = xp + row / MR * tile_size(in_dim) + row % MR * KC;
                        spmm_tile_any(lanes, (int)mr, nv, n_e, in_blk + ptr[o], ib, in_dim, x, panel + t0,
                                      obp, out + row * ld_out + out0 + t0, ld_out, n_out - t0, bias_t);
                    }
                }
            }
        }
    }
    workspace_release(xp);
    return 0;
}

/* ---- Out = In·Wᵀ for a few rows ------------------------------------------------------------ */

/* With few input rows, transposing the blocks would cost more than the product itself, so
 * this path reads W as stored: each output is a dot product along a block row (contiguous). */
static ALWAYS_INLINE float hsum(vec v)
{
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* nr consecutive outputs of one output block for one input row: each pass over the blocks
 * reads nr block rows, nr·c contiguous floats per block. */
static ALWAYS_INLINE void gemv_rows(const int nr, i64 n_e, const i64 *in_blk, const float *blocks,
                                    i64 r, i64 c, i64 in_dim, const float *x, float *y,
                                    const float *bias, i64 ahead)
{
    vec acc[GR];
    float tail[GR];
    for (int j = 0; j < nr; j++) {
        acc[j] = (vec){0};
        tail[j] = 0.0f;
    }
    for (i64 e = 0; e < n_e; e++) {
        i64 col0 = in_blk[e] * c;
        i64 kmax = MIN(c, in_dim - col0);
        const float *w = blocks + e * r * c;
        const float *xx = x + col0;
        if (e + 2 < n_e) /* blocks are pages apart: too far for the hardware prefetcher */
            for (i64 line = 0; line < ahead * (i64)sizeof(float); line += 64)
                __builtin_prefetch((const char *)(w + 2 * r * c) + line);
        i64 k = 0;
        for (; k + VW <= kmax; k += VW) {
            vec xv = *(const vec *)(xx + k);
            for (int j = 0; j < nr; j++) acc[j] += *(const vec *)(w + j * c + k) * xv;
        }
        for (; k < kmax; k++)
            for (int j = 0; j < nr; j++) tail[j] += w[j * c + k] * xx[k];
    }
    for (int j = 0; j < nr; j++) y[j] = hsum(acc[j]) + tail[j] + (bias ? bias[j] : 0.0f);
}

/* Out[rows × out_dim] = In · Wᵀ (+ bias), W's blocks (r × c) stored in row-block order. */
void bsp_gemv(i64 rows, const float *in, i64 ld_in, i64 in_dim, float *out, i64 ld_out,
              i64 out_dim, i64 r, i64 c, const i64 *ptr, const i64 *in_blk, const float *values,
              const float *bias, int n_threads)
{
    i64 n_ob = (out_dim + r - 1) / r;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (i64 o = 0; o < n_ob; o++) {
        i64 n_e = ptr[o + 1] - ptr[o];
        const float *blocks = values + ptr[o] * r * c;
        const i64 *cols = in_blk + ptr[o];
        i64 n_out = MIN(r, out_dim - o * r);
        for (i64 b = 0; b < rows; b++) {
            const float *x = in + b * ld_in;
            float *y = out + b * ld_out + o * r;
            for (i64 j = 0, nr; j < n_out; j += nr) {
                const float *bias_j = bias ? bias + o * r + j : NULL;
                const float *w = blocks + j * c;
                i64 left = n_out - j; /* passes of GR rows, then halves for the rest */
                nr = left >= GR ? GR : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                /* The first pass fetches whole blocks ahead; later passes then read from cache. */
                i64 ahead = j == 0 ? r * c : nr * c;
                switch (nr) {
#if GR >= 16
                case 16: gemv_rows(16, n_e, cols, w, r, c, in_dim, x, y + j, bias_j, ahead); break;
#endif
#if GR >= 8
                case 8: gemv_rows(8, n_e, cols, w, r, c, in_dim, x, y + j, bias_j, ahead); break;
#endif
                case 4: gemv_rows(4, n_e, cols, w, r, c, in_dim, x, y + j, bias_j, ahead); break;
                case 2: gemv_rows(2, n_e, cols, w, r, c, in_dim, x, y + j, bias_j, ahead); break;
                default: gemv_rows(1, n_e, cols, w, r, c, in_dim, x, y + j, bias_j, ahead); break;
                }
            }
        }
    }
}

/* ---- G[e] = dY[:, rows(e)]ᵀ · X[:, cols(e)] ------------------------------------------------ */

/* mr rows × nv vectors of L columns of one block's gradient, reduced over all input rows. */
#define DEFINE_SDDMM_TILE(L)                                                                       \
    static ALWAYS_INLINE void sddmm_tile_##L(const int mr, const int nv, i64 rows, const float *gy, \
                                             i64 ld_gy, const float *x, i64 ld_x, float *g, i64 ldg) \
    {                                                                                              \
        v##L acc[MR][2];                                                                           \
        for (int m = 0; m < mr; m++)                                                               \
            for (int v = 0; v < nv; v++) acc[m][v] = (v##L){0};                                    \
        for (i64 b = 0; b < rows; b++, gy += ld_gy, x += ld_x) {                                   \
            v##L x0 = *(const v##L *)x;                                                            \
            v##L x1 = nv > 1 ? *(const v##L *)(x + L) : x0;                                        \
            for (int m = 0; m < mr; m++) {                                                         \
                acc[m][0] += x0 * gy[m];                                                           \
                if (nv > 1) acc[m][1] += x1 * gy[m];                                               \
            }                                                                                      \
        }                                                                                          \
        for (int m = 0; m < mr; m++)                                                               \
            for (int v = 0; v < nv; v++) *(v##L *)(g + m * ldg + v * L) = acc[m][v];               \
    }

#define SDDMM_CASE(L, M)                                                    \
    case L * 100 + M:                                                       \
        if (L == VW && nv == 2) sddmm_tile_##L(M, 2, rows, gy, ld_gy, x, ld_x, g, ldg); \
        else sddmm_tile_##L(M, 1, rows, gy, ld_gy, x, ld_x, g, ldg);        \
        break;
#if MR > 8
#define SDDMM_CASES(L) SDDMM_CASE(L, 1) SDDMM_CASE(L, 2) SDDMM_CASE(L, 4) SDDMM_CASE(L, 8) SDDMM_CASE(L, MR)
#else
#define SDDMM_CASES(L) SDDMM_CASE(L, 1) SDDMM_CASE(L, 2) SDDMM_CASE(L, 4) SDDMM_CASE(L, MR)
#endif

DEFINE_SDDMM_TILE(4)
#if VW >= 8
DEFINE_SDDMM_TILE(8)
#endif
#if VW >= 16
DEFINE_SDDMM_TILE(16)
#endif

static void sddmm_tile_any(int lanes, int mr, int nv, i64 rows, const float *gy, i64 ld_gy,
                           const float *x, i64 ld_x, float *g, i64 ldg)
{
    switch (lanes * 100 + mr) {
        SDDMM_CASES(4)
#if VW >= 8
        SDDMM_CASES(8)
#endif
#if VW >= 16
        SDDMM_CASES(16)
#endif
    }
}

/* grad[e] (r × c) for every kept block e at (blk_row[e], blk_col[e]); padding stays zero. */
void bsp_sddmm(i64 rows, const float *gy, i64 ld_gy, const float *x, i64 ld_x, i64 n_out,
               i64 n_in, i64 r, i64 c, i64 nnz, const i64 *blk_row, const i64 *blk_col,
               float *grad, int n_threads)
{
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (i64 e = 0; e < nnz; e++) {
        i64 row0 = blk_row[e] * r, col0 = blk_col[e] * c;
        i64 n_r = MIN(r, n_out - row0), n_c = MIN(c, n_in - col0);
        float *g = grad + e * r * c;
        memset(g, 0, r * c * sizeof(float));
        for (i64 m0 = 0, mr; m0 < n_r; m0 += mr) {
            mr = tile_rows(n_r - m0);
            const float *gy0 = gy + row0 + m0;
            i64 t0 = 0;
            while (n_c - t0 >= 4) { /* the widest vectors that fit, then scalars */
                int lanes = n_c - t0 >= VW ? VW : n_c - t0 >= 8 ? 8 : 4;
                int nv = lanes == VW && n_c - t0 >= 2 * VW ? 2 : 1;
                sddmm_tile_any(lanes, (int)mr, nv, rows, gy0, ld_gy, x + col0 + t0, ld_x, g + m0 * c + t0, c);
                t0 += nv * lanes;
            }
            for (i64 m = 0; m < mr; m++)
                for (i64 t = t0; t < n_c; t++) {
                    float s = 0.0f;
                    for (i64 b = 0; b < rows; b++) s += gy0[b * ld_gy + m] * x[b * ld_x + col0 + t];
                    g[(m0 + m) * c + t] = s;
                }
        }
    }
}
