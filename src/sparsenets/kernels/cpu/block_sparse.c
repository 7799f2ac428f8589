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
#include <unistd.h>
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

typedef int32_t ivec __attribute__((vector_size(VW * sizeof(int32_t))));

/* Lane permutation for one butterfly stage of a VW × VW transpose (lanes VW.. are the second
 * operand's): rows i and i+h swap their off-diagonal h-blocks. */
static ALWAYS_INLINE ivec butterfly(int h, int upper)
{
    ivec m;
#pragma GCC unroll 16
    for (int l = 0; l < VW; l++) m[l] = (l / h) % 2 == 0 ? l + (upper ? h : 0) : VW + l - (upper ? 0 : h);
    return m;
}

/* Transpose VW vectors in registers: log2(VW) stages of VW two-source shuffles. */
static ALWAYS_INLINE void transpose(vec r[VW])
{
#pragma GCC unroll 4
    for (int h = VW / 2; h >= 1; h /= 2)
#pragma GCC unroll 16
        for (int i = 0; i < VW; i++)
            if ((i / h) % 2 == 0 && i + h < VW) {
                vec a = r[i], b = r[i + h];
                r[i] = __builtin_shuffle(a, b, butterfly(h, 0));
                r[i + h] = __builtin_shuffle(a, b, butterfly(h, 1));
            }
}

int bsp_vector_width(void) { return VW; }

/* The instruction set this build vectorises for, as benchmarks report it. */
const char *bsp_isa(void)
{
#if defined(__AVX512F__)
    return "AVX-512";
#elif defined(__AVX2__)
    return "AVX2";
#elif defined(__AVX__)
    return "AVX";
#elif defined(__aarch64__)
    return "NEON";
#elif defined(__SSE2__)
    return "SSE2";
#else
    return "generic";
#endif
}
int bsp_tile_rows(void) { return MR; }

/* Scratch memory reused across calls: a fresh multi-megabyte buffer costs a page fault per
 * 4 KiB on first touch, which is comparable to a sparse product. Each thread keeps two: one for
 * what a call shares among its threads (packed inputs and panels), one for a thread's own rows. */
#define WORKSPACE_KEEP ((size_t)64 << 20)
typedef struct {
    float *data;
    size_t size;
} buffer;
static __thread buffer shared_buffer, own_buffer;

static float *buffer_get(buffer *b, size_t bytes)
{
    bytes = bytes ? (bytes + 63) / 64 * 64 : 64; /* never NULL for an empty request */
    if (bytes > WORKSPACE_KEEP) return aligned_alloc(64, bytes);
    if (bytes > b->size) {
        free(b->data);
        b->data = aligned_alloc(64, bytes);
        b->size = b->data ? bytes : 0;
    }
    return b->data;
}

static void buffer_release(buffer *b, float *data)
{
    if (data != b->data) free(data);
}

/* Bytes of L2 cache per core (what one thread's working set should stay under). */
static i64 l2_bytes(void)
{
    static i64 cached;
    if (!cached) {
        long size = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
        size = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        cached = size >= (64 << 10) ? size : (1 << 20);
    }
    return cached;
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

/* Pack rows row0 .. row0+n-1 (n <= MR) of In into one tile at dst. */
static void pack_tile(i64 row0, i64 n, const float *in, i64 ld_in, i64 in_dim, float *dst)
{
    i64 full = in_dim / KC;
    const float *src = in + row0 * ld_in;
    for (i64 q = 0; q < full; q++, dst += CHUNK)
        for (int m = 0; m < MR; m++)
            *(chunk_vec *)(dst + m * KC) = m < n ? *(const chunk_vec *)(src + m * ld_in + q * KC) : (chunk_vec){0};
    if (full * KC < in_dim) {
        memset(dst, 0, CHUNK * sizeof(float));
        for (int m = 0; m < n; m++)
            memcpy(dst + m * KC, src + m * ld_in + full * KC, (in_dim - full * KC) * sizeof(float));
    }
}

/* The vector width for blocks of `side` floats: the narrowest that covers it, up to VW. */
static int lanes_for(i64 side) { return side <= 4 ? 4 : side <= 8 && VW >= 8 ? 8 : VW; }

static i64 padded_side(i64 ob) { i64 l = lanes_for(ob); return (ob + l - 1) / l * l; }

/* Floats of the packed panels of nnz blocks (see bsp_pack_panels). */
i64 bsp_panel_floats(i64 nnz, i64 ib, i64 ob) { return nnz * ib * padded_side(ob); }

/* Copy the blocks of every output block into panels, in entry order: entry e becomes ib rows
 * (one per reduction index k) of the block's ob outputs, padded to a whole vector with zeros.
 * `transposed`: the stored block is (ob × ib) and must be transposed (forward, P = Wᵀ). The
 * micro-kernel then reads the weights of consecutive k as consecutive vectors. */
void bsp_pack_panels(i64 n_entries, const i64 *blk, const float *values, i64 ib, i64 ob,
                     int transposed, float *panels, int n_threads)
{
    i64 obp = padded_side(ob);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (i64 e = 0; e < n_entries; e++) {
        const float *v = values + (blk ? blk[e] : e) * ib * ob;
        float *dst = panels + e * ib * obp;
        if (transposed && ib % VW == 0 && ob % VW == 0) { /* whole squares: in registers */
            for (i64 k0 = 0; k0 < ib; k0 += VW)
                for (i64 t0 = 0; t0 < ob; t0 += VW) {
                    vec r[VW];
                    for (int t = 0; t < VW; t++) r[t] = *(const vec *)(v + (t0 + t) * ib + k0);
                    transpose(r);
                    for (int k = 0; k < VW; k++) *(vec *)(dst + (k0 + k) * obp + t0) = r[k];
                }
            continue;
        }
        if (!transposed && obp == ob) { /* rows already whole vectors: one copy of the block */
            memcpy(dst, v, ib * ob * sizeof(float));
            continue;
        }
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
 * block of the panel, written once with the bias. The k loop walks the packed input a chunk
 * at a time, so the MR broadcasts sit at fixed offsets from one pointer. Defined once per
 * vector width. */
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
            i64 k = in_blk[e] * ib, k_end = k + MIN(ib, in_dim - k);                               \
            const float *p = pp + e * ib * obp;                                                    \
            if (e + 1 < n_e) prefetch_inputs(xp, in_blk[e + 1], ib);                               \
            if (ib % KC == 0 && k_end - k == ib) { /* whole chunks: fixed offsets, unrolled */      \
                for (const float *x = xp + k / KC * CHUNK; k < k_end; k += KC, x += CHUNK)         \
                    _Pragma("GCC unroll 16") for (int kk = 0; kk < KC; kk++, p += obp) {          \
                        v##L w0 = *(const v##L *)p;                                                \
                        v##L w1 = nv > 1 ? *(const v##L *)(p + L) : w0;                            \
                        for (int m = 0; m < mr; m++) {                                             \
                            acc[m][0] += w0 * x[m * KC + kk];                                      \
                            if (nv > 1) acc[m][1] += w1 * x[m * KC + kk];                          \
                        }                                                                          \
                    }                                                                              \
                continue;                                                                          \
            }                                                                                      \
            while (k < k_end) {                                                                    \
                i64 stop = MIN(k_end, (k / KC + 1) * KC);                                          \
                const float *x = xp + k / KC * CHUNK + k % KC, *x_end = x + (stop - k);            \
                for (; x < x_end; x++, p += obp) {                                                 \
                    v##L w0 = *(const v##L *)p;                                                    \
                    v##L w1 = nv > 1 ? *(const v##L *)(p + L) : w0;                                \
                    for (int m = 0; m < mr; m++) {                                                 \
                        acc[m][0] += w0 * x[m * KC];                                               \
                        if (nv > 1) acc[m][1] += w1 * x[m * KC];                                   \
                    }                                                                              \
                }                                                                                  \
                k = stop;                                                                          \
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

/* The shape of one product, shared by its loops. */
typedef struct {
    i64 rows, in_dim, out_dim, ib, ob, obp, n_ob;
    int lanes;
    const i64 *ptr, *in_blk;
    const float *panels, *bias;
    float *out;
    i64 ld_out;
} product;

/* Output block o for the packed tiles of rows row0 .. row_end-1 (xp points at row0's tile). */
static void output_block(const product *P, i64 o, const float *xp, i64 row0, i64 row_end)
{
    i64 n_e = P->ptr[o + 1] - P->ptr[o], out0 = o * P->ob, n_out = MIN(P->ob, P->out_dim - out0);
    const float *panel = P->panels + P->ptr[o] * P->ib * P->obp;
    i64 tsize = tile_size(P->in_dim);
    for (i64 t0 = 0; t0 < P->obp && t0 < n_out; t0 += 2 * P->lanes) {
        int nv = P->obp - t0 >= 2 * P->lanes ? 2 : 1;
        const float *bias_t = P->bias ? P->bias + out0 + t0 : NULL;
        for (i64 row = row0, mr; row < row_end; row += mr) {
            mr = tile_rows(row_end - row); /* whole tiles, then the last one's rows */
            const float *x = xp + (row - row0) / MR * tsize + (row - row0) % MR * KC;
            spmm_tile_any(P->lanes, (int)mr, nv, n_e, P->in_blk + P->ptr[o], P->ib, P->in_dim, x, panel + t0,
                          P->obp, P->out + row * P->ld_out + out0 + t0, P->ld_out, n_out - t0, bias_t);
        }
    }
}

/* ---- Out = In·P for narrow output blocks ----------------------------------------------- */

/* Output blocks narrower than two vectors (4×4 and 8×8 blocks) would leave lanes idle or
 * starve the load ports in the kernel above, so here the vectors run along the batch instead:
 * a tile is NR outputs × NB vectors of input rows, the input is packed transposed (xt[k][BT])
 * and the weights are broadcast from the same panels. NR·NB = 24 accumulators on AVX-512, 12
 * on AVX2, where 8-wide blocks take two 4-output passes. */
#if VW >= 16
#define NB8 3
#define NB4 6
#elif VW >= 8
#define NB8 0
#define NB4 3
#else
#define NB8 0
#define NB4 0
#endif

#if NB4 || NB8 /* (nothing is narrow for 4-wide vectors) */
static int narrow_rows(i64 ob) { return ob > 8 ? 0 : ob <= 4 || !NB8 ? 4 : 8; }
static int narrow_vectors(int nr) { return nr == 4 ? NB4 : NB8; }

/* xt[k][b] = In[row0 + b][k] for b < n (zeros up to bt), a VW × VW square at a time. */
static void pack_transposed(i64 row0, i64 n, i64 bt, const float *in, i64 ld_in, i64 in_dim, float *xt)
{
    for (i64 k0 = 0; k0 < in_dim; k0 += VW) {
        i64 nk = MIN(VW, in_dim - k0);
        for (i64 b0 = 0; b0 < bt; b0 += VW) {
            vec r[VW];
            for (i64 b = 0; b < VW; b++) {
                const float *src = in + (row0 + b0 + b) * ld_in + k0;
                if (b0 + b < n && nk == VW) r[b] = *(const vec *)src;
                else
                    for (i64 t = 0; t < VW; t++) r[b][t] = b0 + b < n && t < nk ? src[t] : 0.0f;
            }
            transpose(r);
            for (i64 t = 0; t < nk; t++) *(vec *)(xt + (k0 + t) * bt + b0) = r[t];
        }
    }
}

#define DEFINE_NARROW_TILE(NR, NB)                                                                 \
    static void narrow_tile_##NR(i64 n_e, const i64 *in_blk, i64 ib, i64 in_dim, const float *xt,  \
                                 const float *pp, i64 ps, float *out, i64 ld_out, i64 n_rows,      \
                                 i64 n_valid, const float *bias)                                   \
    {                                                                                              \
        enum { BT = NB * VW };                                                                     \
        vec acc[NR][NB];                                                                           \
        for (int i = 0; i < NR; i++)                                                               \
            for (int v = 0; v < NB; v++) acc[i][v] = (vec){0};                                     \
        for (i64 e = 0; e < n_e; e++) {                                                            \
            i64 k = in_blk[e] * ib, k_end = k + MIN(ib, in_dim - k);                               \
            const float *p = pp + e * ib * ps, *x = xt + k * BT;                                   \
            for (; k < k_end; k++, p += ps, x += BT) {                                             \
                vec xv[NB];                                                                        \
                for (int v = 0; v < NB; v++) xv[v] = *(const vec *)(x + v * VW);                   \
                for (int i = 0; i < NR; i++)                                                       \
                    for (int v = 0; v < NB; v++) acc[i][v] += p[i] * xv[v];                        \
            }                                                                                      \
        }                                                                                          \
        float cols[NR][BT]; /* transposed store: the lanes are rows, written row by row */       \
        for (int i = 0; i < NR; i++)                                                               \
            for (int v = 0; v < NB; v++) *(vec *)(cols[i] + v * VW) = acc[i][v];                   \
        for (i64 b = 0; b < n_rows; b++)                                                           \
            for (int i = 0; i < NR && i < n_valid; i++)                                            \
                out[b * ld_out + i] = cols[i][b] + (bias ? bias[i] : 0.0f);                        \
    }

#if NB4
DEFINE_NARROW_TILE(4, NB4)
#endif
#if NB8
DEFINE_NARROW_TILE(8, NB8)
#endif

static void narrow_block(const product *P, int nr, i64 o, const float *xt, i64 row0, i64 n_rows)
{
    i64 n_e = P->ptr[o + 1] - P->ptr[o], out0 = o * P->ob, n_out = MIN(P->ob, P->out_dim - out0);
    const float *panel = P->panels + P->ptr[o] * P->ib * P->obp;
    const i64 *blocks = P->in_blk + P->ptr[o];
    const float *bias = P->bias ? P->bias + out0 : NULL;
    float *out = P->out + row0 * P->ld_out + out0;
    for (i64 h = 0; h < n_out; h += nr) { /* passes of nr outputs */
        const float *bias_h = bias ? bias + h : NULL;
#if NB4
        if (nr == 4)
            narrow_tile_4(n_e, blocks, P->ib, P->in_dim, xt, panel + h, P->obp, out + h, P->ld_out, n_rows,
                          n_out - h, bias_h);
#endif
#if NB8
        if (nr == 8)
            narrow_tile_8(n_e, blocks, P->ib, P->in_dim, xt, panel + h, P->obp, out + h, P->ld_out, n_rows,
                          n_out - h, bias_h);
#endif
    }
}

/* The product for narrow output blocks: threads take batch tiles when there are enough of
 * them (each packs its own), else share all packed tiles and split the output blocks. */
static int narrow_spmm(const product *P, int nr, const float *in, i64 ld_in, int n_threads)
{
    i64 bt = narrow_vectors(nr) * VW, n_bt = (P->rows + bt - 1) / bt, tsize = P->in_dim * bt;
    int by_rows = n_bt >= 2 * n_threads;
    float *shared = by_rows ? NULL : buffer_get(&own_buffer, n_bt * tsize * sizeof(float));
    if (!by_rows && !shared) return -1;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        if (by_rows) {
            float *xt = buffer_get(&own_buffer, tsize * sizeof(float));
            if (!xt) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (i64 t = 0; t < n_bt; t++) {
                if (!xt) continue;
                i64 row0 = t * bt, n = MIN(bt, P->rows - row0);
                pack_transposed(row0, n, bt, in, ld_in, P->in_dim, xt);
                for (i64 o = 0; o < P->n_ob; o++) narrow_block(P, nr, o, xt, row0, n);
            }
            if (xt) buffer_release(&own_buffer, xt);
        } else {
#pragma omp for schedule(static)
            for (i64 t = 0; t < n_bt; t++)
                pack_transposed(t * bt, MIN(bt, P->rows - t * bt), bt, in, ld_in, P->in_dim, shared + t * tsize);
#pragma omp for schedule(dynamic, 4) collapse(2)
            for (i64 o = 0; o < P->n_ob; o++)
                for (i64 t = 0; t < n_bt; t++)
                    narrow_block(P, nr, o, shared + t * tsize, t * bt, MIN(bt, P->rows - t * bt));
        }
    }
    if (shared) buffer_release(&own_buffer, shared);
    return failed ? -1 : 0;
}

#endif /* NB4 || NB8 */

/* The product for output blocks a vector or wider.
 * Many rows: each thread takes groups of row tiles small enough to stay in its L2 cache,
 * packs them itself and runs every output block over them, so the inputs are read from
 * memory once and the panels (in L1/L2) are reused by every tile of the group.
 * Few rows: all rows are packed once and the threads share out the output blocks. */
static int wide_spmm(const product *P, const float *in, i64 ld_in, int n_threads)
{
    i64 rows = P->rows, n_tiles = (rows + MR - 1) / MR, tsize = tile_size(P->in_dim);
    i64 group_tiles = MIN(n_tiles, l2_bytes() / 2 / (tsize * (i64)sizeof(float)) + 1);
    i64 n_groups = (n_tiles + group_tiles - 1) / group_tiles;
    int by_rows = n_groups >= n_threads && n_tiles >= 4 * n_threads;
    n_groups = (n_groups + n_threads - 1) / n_threads * n_threads; /* even shares */
    float *shared = by_rows ? NULL : buffer_get(&own_buffer, n_tiles * tsize * sizeof(float));
    if (!by_rows && !shared) return -1;
    /* Runs split the rows too when there are too few output blocks to keep every thread busy. */
    i64 n_runs = MIN(n_tiles, (4 * n_threads + P->n_ob - 1) / P->n_ob);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        if (by_rows) {
            float *xp = buffer_get(&own_buffer, ((n_tiles + n_groups - 1) / n_groups) * tsize * sizeof(float));
            if (!xp) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1) /* dynamic: a thread the OS delays doesn't hold up the rest */
            for (i64 g = 0; g < n_groups; g++) {
                if (!xp) continue;
                i64 first = g * n_tiles / n_groups, last = (g + 1) * n_tiles / n_groups;
                for (i64 t = first; t < last; t++)
                    pack_tile(t * MR, MIN(MR, rows - t * MR), in, ld_in, P->in_dim, xp + (t - first) * tsize);
                for (i64 o = 0; o < P->n_ob; o++) output_block(P, o, xp, first * MR, MIN(rows, last * MR));
            }
            if (xp) buffer_release(&own_buffer, xp);
        } else {
#pragma omp for schedule(static)
            for (i64 t = 0; t < n_tiles; t++)
                pack_tile(t * MR, MIN(MR, rows - t * MR), in, ld_in, P->in_dim, shared + t * tsize);
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (i64 o = 0; o < P->n_ob; o++)
                for (i64 run = 0; run < n_runs; run++) {
                    i64 first = run * n_tiles / n_runs, last = (run + 1) * n_tiles / n_runs;
                    output_block(P, o, shared + first * tsize, first * MR, MIN(rows, last * MR));
                }
        }
    }
    if (shared) buffer_release(&own_buffer, shared);
    return failed ? -1 : 0;
}

/* Out[rows × out_dim] = In[rows × in_dim] · P (+ bias).
 * Output block o (ob columns) sums the entries ptr[o] .. ptr[o+1]-1; entry e multiplies
 * input block in_blk[e] (ib columns of In) by stored block blk[e] (or e if blk is NULL).
 * `panels`: the entries already packed by bsp_pack_panels (kept between calls when the
 * weights don't change), or NULL to pack them here. Returns -1 when memory ran out. */
int bsp_spmm(i64 rows, const float *in, i64 ld_in, i64 in_dim, float *out, i64 ld_out,
             i64 out_dim, i64 ib, i64 ob, const i64 *ptr, const i64 *in_blk, const i64 *blk,
             const float *values, int transposed, const float *panels, const float *bias, int n_threads)
{
    i64 n_ob = (out_dim + ob - 1) / ob; /* an empty output block gets its bias or zeros */
    if (n_ob == 0 || rows == 0) return 0;
    product P = {rows, in_dim, out_dim, ib, ob, padded_side(ob), n_ob, lanes_for(ob), ptr, in_blk,
                 panels, bias, out, ld_out};
    float *own = NULL;
    if (!panels) {
        i64 nnz = ptr[n_ob];
        own = buffer_get(&shared_buffer, bsp_panel_floats(nnz, ib, ob) * sizeof(float));
        if (!own) return -1;
        bsp_pack_panels(nnz, blk, values, ib, ob, transposed, own, n_threads);
        P.panels = own;
    }
#if NB4 || NB8
    int nr = narrow_rows(ob);
    int status = nr ? narrow_spmm(&P, nr, in, ld_in, n_threads) : wide_spmm(&P, in, ld_in, n_threads);
#else
    int status = wide_spmm(&P, in, ld_in, n_threads);
#endif
    if (own) buffer_release(&shared_buffer, own);
    return status;
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
    vec acc[GR > VW ? GR : VW];
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
    if (nr == VW) { /* one transpose sums VW accumulators at once */
        transpose(acc);
        vec sum = acc[0];
        for (int j = 1; j < VW; j++) sum += acc[j];
        for (int j = 0; j < VW; j++) y[j] = sum[j] + tail[j] + (bias ? bias[j] : 0.0f);
        return;
    }
    for (int j = 0; j < nr; j++) y[j] = hsum(acc[j]) + tail[j] + (bias ? bias[j] : 0.0f);
}

/* Out[rows × out_dim] = In · Wᵀ (+ bias), W's blocks (r × c) stored in row-block order. */
void bsp_gemv(i64 rows, const float *in, i64 ld_in, i64 in_dim, float *out, i64 ld_out,
              i64 out_dim, i64 r, i64 c, const i64 *ptr, const i64 *in_blk, const float *values,
              const float *bias, int n_threads)
{
    i64 n_ob = (out_dim + r - 1) / r;
    /* static: each thread reads the same blocks every call, so they stay in its caches */
#pragma omp parallel for schedule(static) num_threads(n_threads)
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

/* The batch is taken in chunks whose packed inputs fit in L2: for each chunk, X is copied
 * column-block by column-block (Xp[C][b][0..cp), padded to whole vectors) and dY row-block by
 * row-block (Yp[R][b][0..r)), so a block's gradient reads both as two contiguous streams. */
typedef struct {
    i64 rows, n_out, n_in, r, c, cp, n_rb, n_cb;
} sddmm_shape;

static void pack_columns(const float *src, i64 ld, i64 b0, i64 nb, i64 width, i64 side, i64 padded,
                         i64 block, float *dst)
{
    i64 col0 = block * side, n = MIN(side, width - col0);
    src += b0 * ld + col0;
    if (n == padded && n % 4 == 0) { /* whole blocks: vector moves, not a memcpy call per row */
        for (i64 b = 0; b < nb; b++, dst += padded, src += ld)
            for (i64 t = 0; t < n; t += 4) *(v4 *)(dst + t) = *(const v4 *)(src + t);
        return;
    }
    for (i64 b = 0; b < nb; b++, dst += padded, src += ld) {
        memcpy(dst, src, n * sizeof(float));
        for (i64 t = n; t < padded; t++) dst[t] = 0.0f;
    }
}

/* mr rows × nv vectors of L columns of a block's gradient over nb packed batch rows, added to
 * g (or written, for the first chunk). The two vectors are two halves of one block row, or,
 * for blocks one vector wide, the same row of two blocks of a row-block, which share their dY
 * broadcasts (x0/g0 and x1/g1). */
#define DEFINE_SDDMM_TILE(L)                                                                       \
    static ALWAYS_INLINE void sddmm_tile_##L(const int mr, const int nv, i64 nb, const float *yp, \
                                             i64 r, const float *x0, const float *x1, i64 cp,      \
                                             float *g0, float *g1, i64 ldg, int first)             \
    {                                                                                              \
        v##L acc[MR][2];                                                                           \
        for (int m = 0; m < mr; m++) {                                                             \
            acc[m][0] = first ? (v##L){0} : *(const v##L *)(g0 + m * ldg);                         \
            if (nv > 1) acc[m][1] = first ? (v##L){0} : *(const v##L *)(g1 + m * ldg);             \
        }                                                                                          \
        for (i64 b = 0; b < nb; b++, yp += r, x0 += cp, x1 += cp) {                                \
            v##L a = *(const v##L *)x0;                                                            \
            v##L c = nv > 1 ? *(const v##L *)x1 : a;                                               \
            for (int m = 0; m < mr; m++) {                                                         \
                acc[m][0] += a * yp[m];                                                            \
                if (nv > 1) acc[m][1] += c * yp[m];                                                \
            }                                                                                      \
        }                                                                                          \
        for (int m = 0; m < mr; m++) {                                                             \
            *(v##L *)(g0 + m * ldg) = acc[m][0];                                                   \
            if (nv > 1) *(v##L *)(g1 + m * ldg) = acc[m][1];                                       \
        }                                                                                          \
    }

#define SDDMM_CASE(L, M)                                                                     \
    case L * 100 + M:                                                                        \
        if (nv == 2) sddmm_tile_##L(M, 2, nb, yp, r, x0, x1, cp, g0, g1, ldg, first);        \
        else sddmm_tile_##L(M, 1, nb, yp, r, x0, x1, cp, g0, g1, ldg, first);                \
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

static void sddmm_tile_any(int lanes, int mr, int nv, i64 nb, const float *yp, i64 r, const float *x0,
                           const float *x1, i64 cp, float *g0, float *g1, i64 ldg, int first)
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

/* The gradients of one block, or of two blocks one vector wide in the same row-block (x1/g1),
 * over one chunk: padded r × cp tiles, rows of MR, vectors along c. */
static void sddmm_unit(const sddmm_shape *S, i64 nb, const float *yp, const float *x0, const float *x1,
                       float *g0, float *g1, int first)
{
    int lanes = lanes_for(S->c);
    for (i64 m0 = 0, mr; m0 < S->r; m0 += mr) {
        mr = tile_rows(S->r - m0);
        float *row0 = g0 + m0 * S->cp;
        if (x1) {
            sddmm_tile_any(lanes, (int)mr, 2, nb, yp + m0, S->r, x0, x1, S->cp, row0, g1 + m0 * S->cp, S->cp, first);
            continue;
        }
        for (i64 t0 = 0; t0 < S->cp; t0 += 2 * lanes) {
            int nv = S->cp - t0 >= 2 * lanes ? 2 : 1;
            sddmm_tile_any(lanes, (int)mr, nv, nb, yp + m0, S->r, x0 + t0, x0 + t0 + lanes, S->cp, row0 + t0,
                           row0 + t0 + lanes, S->cp, first);
        }
    }
}

/* grad[e] (r × c) for every kept block e at (blk_row[e], blk_col[e]); padding stays zero. */
int bsp_sddmm(i64 rows, const float *gy, i64 ld_gy, const float *x, i64 ld_x, i64 n_out,
              i64 n_in, i64 r, i64 c, i64 nnz, const i64 *blk_row, const i64 *blk_col,
              float *grad, int n_threads)
{
    sddmm_shape S = {rows, n_out, n_in, r, c, padded_side(c), (n_out + r - 1) / r, (n_in + c - 1) / c};
    if (nnz == 0) return 0;
    if (rows == 0) {
        memset(grad, 0, nnz * r * c * sizeof(float));
        return 0;
    }
    /* Batch rows per chunk: the chunk's packed X and dY take half of L2. */
    i64 per_row = (S.n_cb * S.cp + S.n_rb * r) * (i64)sizeof(float);
    i64 chunk = MIN(rows, l2_bytes() / 2 / per_row);
    chunk = chunk < 16 ? MIN(rows, 16) : chunk;
    i64 xp_floats = S.n_cb * chunk * S.cp, yp_floats = S.n_rb * chunk * r;
    float *xp = buffer_get(&shared_buffer, (xp_floats + yp_floats) * sizeof(float));
    if (!xp) return -1;
    float *yp = xp + xp_floats;
    /* The padded gradient, or grad itself when no padding is needed. */
    float *g = S.cp == c ? grad : malloc(nnz * r * S.cp * sizeof(float));
    /* Work units: blocks one vector wide go in pairs from the same row-block (they share dY). */
    i64 *unit = malloc((nnz + 1) * sizeof(i64)), n_units = 0;
    if (!g || !unit) {
        if (g != grad) free(g);
        free(unit);
        buffer_release(&shared_buffer, xp);
        return -1;
    }
    int pairs = S.cp == lanes_for(c);
    for (i64 e = 0; e < nnz; e += unit[n_units] - e) {
        unit[n_units++] = e;
        unit[n_units] = e + (pairs && e + 1 < nnz && blk_row[e + 1] == blk_row[e] ? 2 : 1);
    }
#pragma omp parallel num_threads(n_threads)
    for (i64 b0 = 0; b0 < rows; b0 += chunk) {
        i64 nb = MIN(chunk, rows - b0);
#pragma omp for schedule(static) nowait
        for (i64 cb = 0; cb < S.n_cb; cb++) pack_columns(x, ld_x, b0, nb, n_in, c, S.cp, cb, xp + cb * chunk * S.cp);
#pragma omp for schedule(static)
        for (i64 rb = 0; rb < S.n_rb; rb++) pack_columns(gy, ld_gy, b0, nb, n_out, r, r, rb, yp + rb * chunk * r);
#pragma omp for schedule(static) /* static: each thread keeps its blocks' gradients in cache */
        for (i64 u = 0; u < n_units; u++) {
            i64 e = unit[u], pair = unit[u + 1] - e == 2;
            sddmm_unit(&S, nb, yp + blk_row[e] * chunk * r, xp + blk_col[e] * chunk * S.cp,
                       pair ? xp + blk_col[e + 1] * chunk * S.cp : NULL, g + e * r * S.cp,
                       pair ? g + (e + 1) * r * S.cp : NULL, b0 == 0);
        }
    }
    free(unit);
    if (g != grad) {
        for (i64 e = 0; e < nnz; e++)
            for (i64 m = 0; m < r; m++) memcpy(grad + (e * r + m) * c, g + (e * r + m) * S.cp, c * sizeof(float));
        free(g);
    }
    buffer_release(&shared_buffer, xp);
    return 0;
}
