/* Products for a linear layer Y = X·Wᵀ (+ bias) whose weight keeps single entries: unstructured
 * (CSR) or N:M (in every group of m consecutive inputs, n entries per output row).
 *
 * Every product is Out[rows × out_dim] = In[rows × in_dim] · Pᵀ, P sparse (out_dim × in_dim):
 *   forward         In = X,  P = W    (its CSR, or its N:M values and in-group indices)
 *   input gradient  In = dY, P = Wᵀ   (CSR: W's transposed index, values through a permutation)
 * and the values gradient is G[e] = dY[:, row(e)] · X[:, col(e)] for each stored entry e.
 *
 * The batch is the vector dimension, not the weight: In is packed transposed, in tiles of BT rows
 * (tile[k][b], zero past the last row), so a stored entry (k, w) is one broadcast and NV vector
 * FMAs `acc[o][:] += w · tile[k][:]`, its column an address, with no gathers. Each output's sum
 * stays in registers over all its entries: at these densities a row has few entries per cached
 * slice of the tile, and reloading partial sums (and mispredicting the short loops) cost more
 * than reading the tile from L2. Only inputs too wide for L2 are reduced in chunks of columns,
 * each row keeping a cursor into its entries from chunk to chunk (entries ascending by column
 * within a row keep it cache-friendly; any order is correct). The values gradient reduces VW
 * entries' partial products at once; N:M's input gradient scatters into an L1-resident chunk of
 * dXᵀ, as Wᵀ of an N:M matrix is not N:M.
 *
 * All matrices are fp32 with arbitrary (row, column) strides on input; outputs take strides too.
 * Written with GCC vector extensions, so one source builds for AVX-512, AVX2, SSE or NEON.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;
typedef int32_t i32;

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#define NV 4              /* vectors per row of a tile: BT = NV·VW batch rows (2 and 8: slower) */
#define L1_FLOATS 8192    /* 32 KiB: a slice of a tile that stays in L1 */
#define L2_FLOATS 262144  /* 1 MiB: a slice of a tile that stays in L2 */
#define SMALL_ROWS 2      /* up to this many rows, products read In as it is (no tiles) */
#define OUT_BLOCK_MAX 512 /* outputs per work item: its partial sums (≤ 128 KiB) stay in L2 */

typedef float vec __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));
typedef int32_t ivec __attribute__((vector_size(VW * sizeof(int32_t))));

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ALWAYS_INLINE inline __attribute__((always_inline))

int sn_vector_width(void) { return VW; }

/* P, the sparse factor: CSR (n == 0) or N:M. */
typedef struct {
    i64 out_dim, in_dim;
    const i64 *ptr;    /* CSR: entries of output o are ptr[o] .. ptr[o+1]-1, columns ascending */
    const i32 *col;
    const i32 *perm;   /* CSR: entry e's value is values[perm[e]] (a transposed index), or NULL */
    const uint8_t *idx; /* N:M: row o's entries j (n per group j / n) at columns (j / n)·m + idx */
    int n, m;
    const float *values, *bias;
} sparse_t;

/* ---- scratch memory -------------------------------------------------------------------- */

/* Reused across calls by each calling thread: a fresh multi-megabyte buffer costs a page fault
 * per 4 KiB on first touch, which is comparable to a sparse product. */
#define WORKSPACE_KEEP ((size_t)64 << 20)
static __thread float *workspace;
static __thread size_t workspace_size;

static float *workspace_get(size_t bytes)
{
    bytes = (bytes + 127) / 64 * 64; /* never 0: aligned_alloc(64, 0) may return NULL */
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

/* ---- tiles ----------------------------------------------------------------------------- */

static int tile_vectors(i64 rows) { return rows > 2 * VW ? NV : rows > VW ? 2 : 1; }

/* Shuffle masks, one lane per j, as constants (the shuffles need them at compile time). */
#if VW == 16
#define LANES(f, h) {f(0, h), f(1, h), f(2, h), f(3, h), f(4, h), f(5, h), f(6, h), f(7, h), \
                     f(8, h), f(9, h), f(10, h), f(11, h), f(12, h), f(13, h), f(14, h), f(15, h)}
#elif VW == 8
#define LANES(f, h) {f(0, h), f(1, h), f(2, h), f(3, h), f(4, h), f(5, h), f(6, h), f(7, h)}
#else
#define LANES(f, h) {f(0, h), f(1, h), f(2, h), f(3, h)}
#endif
/* Two-vector shuffles on lanes j: with bit h of j clear, `own` keeps a's lane and `other` takes
 * a's lane j + h; with it set, `own` takes b's lane j and `other` b's lane j - h. */
#define OWN(j, h) (((j) & (h)) ? VW + (j) : (j))
#define OTHER(j, h) (((j) & (h)) ? VW + (j) - (h) : (j) + (h))
#define CROSS_LO(j, h) (((j) & (h)) ? VW + (j) - (h) : (j)) /* a's lane j, or b's lane j - h */
#define CROSS_HI(j, h) (((j) & (h)) ? VW + (j) : (j) + (h)) /* a's lane j + h, or b's lane j */

/* One step of a transpose: rows i and i + h swap their off-diagonal h-lane halves. */
#define TRANSPOSE_STEP(r, h)                                                      \
    do {                                                                          \
        const ivec lo = LANES(CROSS_LO, h), hi = LANES(CROSS_HI, h);              \
        for (int i = 0; i < VW; i++)                                              \
            if (!(i & (h))) {                                                     \
                vec a = r[i], b = r[i + (h)];                                     \
                r[i] = __builtin_shuffle(a, b, lo);                               \
                r[i + (h)] = __builtin_shuffle(a, b, hi);                         \
            }                                                                     \
    } while (0)

/* Transposes the VW × VW block r in registers: halves, then quarters, ... swap places. */
static ALWAYS_INLINE void transpose(vec r[VW])
{
#if VW > 8
    TRANSPOSE_STEP(r, 8);
#endif
#if VW > 4
    TRANSPOSE_STEP(r, 4);
#endif
    TRANSPOSE_STEP(r, 2);
    TRANSPOSE_STEP(r, 1);
}

/* Tile t of In (rows × dim, strides s_row, s_col) transposed: dst[k][i] = In[t·bt + i][k]. */
static void pack_tile(const float *in, i64 s_row, i64 s_col, i64 rows, i64 dim, i64 t, int bt, float *dst)
{
    i64 r0 = t * bt, n = MIN(bt, rows - r0), k_full = s_col == 1 ? dim / VW * VW : 0;
    const float *src = in + r0 * s_row;
    if (n < bt) memset(dst, 0, dim * bt * sizeof(float));
    if (s_row == 1) { /* In is stored transposed: rows of the tile are contiguous already */
        for (i64 k = 0; k < dim; k++) memcpy(dst + k * bt, src + k * s_col, n * sizeof(float));
        return;
    }
    i64 i0 = 0;
    for (; i0 + VW <= n; i0 += VW) /* whole VW × VW blocks through registers */
        for (i64 k0 = 0; k0 < k_full; k0 += VW) {
            vec r[VW];
#pragma GCC unroll 16
            for (int i = 0; i < VW; i++) r[i] = *(const vec *)(src + (i0 + i) * s_row + k0);
            transpose(r);
#pragma GCC unroll 16
            for (int k = 0; k < VW; k++) *(vec *)(dst + (k0 + k) * bt + i0) = r[k];
        }
    for (i64 k0 = 0; k0 < dim; k0 += VW) { /* the rest, VW columns at a time so it stays in L1 */
        i64 k1 = MIN(dim, k0 + VW);
        for (i64 i = k0 < k_full ? i0 : 0; i < n; i++)
            for (i64 k = k0; k < k1; k++) dst[k * bt + i] = src[i * s_row + k * s_col];
    }
}

/* out[i][o] = acc[o][i] (+ bias[o]) for the first n_rows rows and n_out outputs; out has
 * strides (o_row, o_col): row-major (transposed through registers) or column-major (copied). */
static void unpack_tile(const float *acc, i64 n_out, int bt, i64 n_rows, float *out, i64 o_row, i64 o_col,
                        const float *bias)
{
    i64 o0 = 0;
    if (o_col == 1)
        for (; o0 + VW <= n_out; o0 += VW) {
            vec b = bias ? *(const vec *)(bias + o0) : (vec){0};
            i64 i0 = 0;
            for (; i0 + VW <= n_rows; i0 += VW) {
                vec r[VW];
#pragma GCC unroll 16
                for (int o = 0; o < VW; o++) r[o] = *(const vec *)(acc + (o0 + o) * bt + i0);
                transpose(r);
#pragma GCC unroll 16
                for (int i = 0; i < VW; i++) *(vec *)(out + (i0 + i) * o_row + o0) = r[i] + b;
            }
            for (i64 i = i0; i < n_rows; i++)
                for (i64 o = o0; o < o0 + VW; o++) out[i * o_row + o] = acc[o * bt + i] + (bias ? bias[o] : 0.0f);
        }
    for (i64 o = o0; o < n_out; o++) { /* rows of acc are columns of out */
        float b = bias ? bias[o] : 0.0f;
        for (i64 i = 0; i < n_rows; i++) out[i * o_row + o * o_col] = acc[o * bt + i] + b;
    }
}

/* Columns per chunk: `floats` worth of tile rows, whole N:M groups. */
static i64 chunk_columns(const sparse_t *p, int bt, i64 floats)
{
    i64 m = p->n ? p->m : 1;
    return MAX(m, floats / bt / m * m);
}

/* ---- entries --------------------------------------------------------------------------- */

/* Column of entry e: stored (CSR), or decoded from its in-group index (N:M, e counted from the
 * start of its row). n is a constant where inlined, so the division is a shift. */
static ALWAYS_INLINE i64 column(const int n, const sparse_t *p, const i32 *col, const uint8_t *idx, i64 e)
{
    return n ? (e / n) * p->m + idx[e] : col[e];
}

static ALWAYS_INLINE float weight(const float *values, const i32 *perm, i64 e)
{
    return values[perm ? perm[e] : e];
}

/* acc[:] += Σ w(e) · tile[col(e)][:] over entries e from `e` while e < end and col(e) < k_end;
 * returns the first entry not taken. Two accumulator sets hide the FMA latency. */
static ALWAYS_INLINE i64 spmm_run(const int nv, const int n, const sparse_t *p, const i32 *col,
                                  const uint8_t *idx, const float *values, const i32 *perm, i64 e,
                                  i64 end, i64 k_end, const float *tile, float *acc)
{
    const int bt = nv * VW;
    vec a[NV], c[NV];
    for (int v = 0; v < nv; v++) {
        a[v] = *(const vec *)(acc + v * VW);
        c[v] = (vec){0};
    }
    for (; e + 1 < end && (n || col[e + 1] < k_end); e += 2) {
        const float *x0 = tile + column(n, p, col, idx, e) * bt;
        const float *x1 = tile + column(n, p, col, idx, e + 1) * bt;
        float w0 = weight(values, perm, e), w1 = weight(values, perm, e + 1);
        for (int v = 0; v < nv; v++) {
            a[v] += w0 * *(const vec *)(x0 + v * VW);
            c[v] += w1 * *(const vec *)(x1 + v * VW);
        }
    }
    if (e < end && (n || col[e] < k_end)) {
        const float *x0 = tile + column(n, p, col, idx, e) * bt;
        float w0 = weight(values, perm, e);
        for (int v = 0; v < nv; v++) a[v] += w0 * *(const vec *)(x0 + v * VW);
        e++;
    }
    for (int v = 0; v < nv; v++) *(vec *)(acc + v * VW) = a[v] + c[v];
    return e;
}

/* ---- Out = In·Pᵀ ----------------------------------------------------------------------- */

/* Outputs o0 .. o1-1 of one tile: partial sums acc[o][bt], chunk by chunk of columns. */
static ALWAYS_INLINE void spmm_item(const int nv, const int n, const sparse_t *p, const float *tile,
                                    i64 o0, i64 o1, float *acc, i64 *cursor)
{
    const int bt = nv * VW;
    i64 kc = chunk_columns(p, bt, L2_FLOATS), per_row = n ? p->in_dim / p->m * n : 0;
    memset(acc, 0, (o1 - o0) * bt * sizeof(float));
    if (!n)
        for (i64 o = o0; o < o1; o++) cursor[o - o0] = p->ptr[o];
    for (i64 k0 = 0; k0 < p->in_dim; k0 += kc) {
        i64 k1 = MIN(p->in_dim, k0 + kc);
        for (i64 o = o0; o < o1; o++) {
            float *a = acc + (o - o0) * bt;
            if (n) {
                i64 row = o * per_row;
                spmm_run(nv, n, p, NULL, p->idx + row, p->values + row, NULL, k0 / p->m * n,
                         k1 / p->m * n, k1, tile, a);
            } else {
                i64 e = cursor[o - o0], end = p->ptr[o + 1];
                if (e < end && p->col[e] < k1)
                    cursor[o - o0] = spmm_run(nv, 0, p, p->col, NULL, p->values, p->perm, e, end, k1, tile, a);
            }
        }
    }
}

/* One instantiation per tile width, for CSR and N:M with n = 1, 2, 4 (other n at run time). */
#define DISPATCH(fn, nv, n, ...)                                                 \
    switch ((nv) * 8 + ((n) == 0 ? 0 : (n) == 1 ? 1 : (n) == 2 ? 2 : (n) == 4 ? 3 : 4)) { \
    case 8: fn(1, 0, __VA_ARGS__); break;                                          \
    case 9: fn(1, 1, __VA_ARGS__); break;                                          \
    case 10: fn(1, 2, __VA_ARGS__); break;                                         \
    case 11: fn(1, 4, __VA_ARGS__); break;                                         \
    case 12: fn(1, n, __VA_ARGS__); break;                                         \
    case 16: fn(2, 0, __VA_ARGS__); break;                                         \
    case 17: fn(2, 1, __VA_ARGS__); break;                                         \
    case 18: fn(2, 2, __VA_ARGS__); break;                                         \
    case 19: fn(2, 4, __VA_ARGS__); break;                                         \
    case 20: fn(2, n, __VA_ARGS__); break;                                         \
    case 32: fn(NV, 0, __VA_ARGS__); break;                                        \
    case 33: fn(NV, 1, __VA_ARGS__); break;                                        \
    case 34: fn(NV, 2, __VA_ARGS__); break;                                        \
    case 35: fn(NV, 4, __VA_ARGS__); break;                                        \
    default: fn(NV, n, __VA_ARGS__); break;                                        \
    }

static void spmm_item_any(int nv, const sparse_t *p, const float *tile, i64 o0, i64 o1, float *acc, i64 *cursor)
{
    int n = p->n;
    DISPATCH(spmm_item, nv, n, p, tile, o0, o1, acc, cursor)
}

/* Out = In·Pᵀ (+ bias) for a few rows: one dot product per output, In read where it lies. */
static void spmm_small(const sparse_t *p, i64 rows, const float *in, i64 s_row, i64 s_col, float *out,
                       i64 o_row, i64 o_col, int n_threads)
{
    i64 per_row = p->n ? p->in_dim / p->m * p->n : 0;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (i64 o = 0; o < p->out_dim; o++) {
        i64 first = p->n ? o * per_row : p->ptr[o], end = p->n ? first + per_row : p->ptr[o + 1];
        for (i64 b = 0; b < rows; b++) {
            const float *x = in + b * s_row;
            float s0 = 0.0f, s1 = 0.0f;
            i64 e = first;
            for (; e + 1 < end; e += 2) {
                i64 k0 = p->n ? column(p->n, p, NULL, p->idx + first, e - first) : p->col[e];
                i64 k1 = p->n ? column(p->n, p, NULL, p->idx + first, e + 1 - first) : p->col[e + 1];
                s0 += weight(p->values, p->perm, e) * x[k0 * s_col];
                s1 += weight(p->values, p->perm, e + 1) * x[k1 * s_col];
            }
            if (e < end) {
                i64 k0 = p->n ? column(p->n, p, NULL, p->idx + first, e - first) : p->col[e];
                s0 += weight(p->values, p->perm, e) * x[k0 * s_col];
            }
            out[b * o_row + o * o_col] = s0 + s1 + (p->bias ? p->bias[o] : 0.0f);
        }
    }
}

static int spmm(const sparse_t *p, i64 rows, const float *in, i64 s_row, i64 s_col, float *out, i64 o_row, i64 o_col,
                int n_threads)
{
    if (rows == 0 || p->out_dim == 0) return 0;
    if (rows <= SMALL_ROWS) {
        spmm_small(p, rows, in, s_row, s_col, out, o_row, o_col, n_threads);
        return 0;
    }
    int nv = tile_vectors(rows), bt = nv * VW;
    i64 n_tiles = (rows + bt - 1) / bt, tile_size = p->in_dim * bt;
    /* Split the outputs only as far as needed to keep every thread busy. */
    i64 splits = MAX(1, (4 * n_threads + n_tiles - 1) / n_tiles);
    i64 ob = MIN(OUT_BLOCK_MAX, (p->out_dim + splits - 1) / splits);
    ob = (ob + 15) / 16 * 16;
    i64 n_ob = (p->out_dim + ob - 1) / ob;
    i64 scratch = (ob * bt + 2 * ob + 15) / 16 * 16; /* partial sums, then the i64 cursors */
    float *xp = workspace_get((n_tiles * tile_size + n_threads * scratch) * sizeof(float));
    if (!xp) return -1;
    float *scratches = xp + n_tiles * tile_size;

#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        float *acc = scratches + omp_get_thread_num() * scratch;
#else
        float *acc = scratches;
#endif
        i64 *cursor = (i64 *)(acc + ob * bt);
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < n_tiles; t++) pack_tile(in, s_row, s_col, rows, p->in_dim, t, bt, xp + t * tile_size);
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (i64 t = 0; t < n_tiles; t++)
            for (i64 b = 0; b < n_ob; b++) {
                i64 o0 = b * ob, o1 = MIN(p->out_dim, o0 + ob);
                spmm_item_any(nv, p, xp + t * tile_size, o0, o1, acc, cursor);
                unpack_tile(acc, o1 - o0, bt, MIN(bt, rows - t * bt), out + t * bt * o_row + o0 * o_col, o_row, o_col,
                            p->bias ? p->bias + o0 : NULL);
            }
    }
    workspace_release(xp);
    return 0;
}

/* Out[rows × out_dim] (strides o_row, o_col) = In[rows × in_dim] · Wᵀ (+ bias), W in CSR.
 * With perm, entry e's value is values[perm[e]]: W is then another matrix's transposed index. */
int sn_csr_spmm(i64 rows, const float *in, i64 s_row, i64 s_col, i64 in_dim, float *out, i64 o_row, i64 o_col,
                i64 out_dim, const i64 *ptr, const i32 *col, const i32 *perm, const float *values,
                const float *bias, int n_threads)
{
    sparse_t p = {out_dim, in_dim, ptr, col, perm, NULL, 0, 1, values, bias};
    return spmm(&p, rows, in, s_row, s_col, out, o_row, o_col, n_threads);
}

/* The same with W in N:M form: values and in-group indices (out_dim × in_dim/m·n), in_dim % m == 0. */
int sn_nm_spmm(i64 rows, const float *in, i64 s_row, i64 s_col, i64 in_dim, float *out, i64 o_row, i64 o_col,
               i64 out_dim, int n, int m, const uint8_t *idx, const float *values, const float *bias,
               int n_threads)
{
    sparse_t p = {out_dim, in_dim, NULL, NULL, NULL, idx, n, m, values, bias};
    return spmm(&p, rows, in, s_row, s_col, out, o_row, o_col, n_threads);
}

/* ---- G[e] = dY[:, row(e)] · X[:, col(e)] ------------------------------------------------ */

/* One fold: vectors i and i + h become one, lanes with bit h clear summing vector i's pairs
 * of lanes h apart, the others vector i + h's. */
#define FOLD_STEP(s, h)                                                                          \
    do {                                                                                         \
        const ivec own = LANES(OWN, h), other = LANES(OTHER, h);                                 \
        for (int i = 0; i < (h); i++)                                                            \
            s[i] = __builtin_shuffle(s[i], s[i + (h)], own) + __builtin_shuffle(s[i], s[i + (h)], other); \
    } while (0)

/* Lane i of the result is the sum of the lanes of s[i]: VW - 1 folds instead of VW
 * horizontal sums. */
static ALWAYS_INLINE vec lane_sums(vec s[VW])
{
#if VW > 8
    FOLD_STEP(s, 8);
#endif
#if VW > 4
    FOLD_STEP(s, 4);
#endif
    FOLD_STEP(s, 2);
    FOLD_STEP(s, 1);
    return s[0];
}

/* grad[e0 .. e0+count) (+)= the lane sums of the first count partial products. */
static ALWAYS_INLINE void flush(vec s[VW], int count, float *grad, int first)
{
    for (int i = count; i < VW; i++) s[i] = (vec){0};
    vec sums = lane_sums(s);
    if (count == VW) {
        if (!first) sums += *(const vec *)grad;
        *(vec *)grad = sums;
        return;
    }
    for (int i = 0; i < count; i++) grad[i] = first ? sums[i] : grad[i] + sums[i];
}

/* The entries of outputs o0 .. o1-1 (consecutive in storage), summed over every tile: per entry
 * a vector of partial products, VW of them reduced at once. */
static ALWAYS_INLINE void sddmm_item(const int nv, const int n, const sparse_t *p, i64 n_tiles,
                                     const float *gp, const float *xp, i64 o0, i64 o1, float *grad)
{
    const int bt = nv * VW;
    i64 per_row = n ? p->in_dim / p->m * n : 0;
    i64 first_entry = n ? o0 * per_row : p->ptr[o0];
    vec s[VW];
    for (i64 t = 0; t < n_tiles; t++) {
        const float *tile = xp + t * p->in_dim * bt, *gy = gp + t * p->out_dim * bt;
        i64 done = first_entry;
        int count = 0;
        for (i64 o = o0; o < o1; o++) {
            i64 start = n ? o * per_row : p->ptr[o], end = n ? start + per_row : p->ptr[o + 1];
            const uint8_t *idx = n ? p->idx + start : NULL;
            const i32 *col = n ? NULL : p->col + start;
            vec d[NV];
            for (int v = 0; v < nv; v++) d[v] = *(const vec *)(gy + o * bt + v * VW);
            for (i64 e = start; e < end; e++) {
                const float *x = tile + column(n, p, col, idx, e - start) * bt;
                vec sum = d[0] * *(const vec *)x;
                for (int v = 1; v < nv; v++) sum += d[v] * *(const vec *)(x + v * VW);
                s[count++] = sum;
                if (count == VW) {
                    flush(s, VW, grad + done, t == 0);
                    done += VW;
                    count = 0;
                }
            }
        }
        if (count) flush(s, count, grad + done, t == 0);
    }
}

static void sddmm_item_any(int nv, const sparse_t *p, i64 n_tiles, const float *gp, const float *xp, i64 o0,
                           i64 o1, float *grad)
{
    int n = p->n;
    DISPATCH(sddmm_item, nv, n, p, n_tiles, gp, xp, o0, o1, grad)
}

static void sddmm_small(const sparse_t *p, i64 rows, const float *gy, i64 g_row, i64 g_col, const float *x,
                        i64 x_row, i64 x_col, float *grad, int n_threads)
{
    i64 per_row = p->n ? p->in_dim / p->m * p->n : 0;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (i64 o = 0; o < p->out_dim; o++) {
        i64 first = p->n ? o * per_row : p->ptr[o], end = p->n ? first + per_row : p->ptr[o + 1];
        for (i64 e = first; e < end; e++) {
            i64 k = p->n ? column(p->n, p, NULL, p->idx + first, e - first) : p->col[e];
            float s = 0.0f;
            for (i64 b = 0; b < rows; b++) s += gy[b * g_row + o * g_col] * x[b * x_row + k * x_col];
            grad[e] = s;
        }
    }
}

static int sddmm(const sparse_t *p, i64 rows, const float *gy, i64 g_row, i64 g_col, const float *x,
                 i64 x_row, i64 x_col, float *grad, int n_threads)
{
    if (rows <= SMALL_ROWS) {
        sddmm_small(p, rows, gy, g_row, g_col, x, x_row, x_col, grad, n_threads);
        return 0;
    }
    int nv = tile_vectors(rows), bt = nv * VW;
    i64 n_tiles = (rows + bt - 1) / bt;
    i64 splits = 4 * n_threads, ob = (p->out_dim + splits - 1) / splits;
    ob = MAX(1, MIN(OUT_BLOCK_MAX, ob));
    i64 n_ob = (p->out_dim + ob - 1) / ob;
    i64 x_size = n_tiles * p->in_dim * bt, g_size = n_tiles * p->out_dim * bt;
    float *xp = workspace_get((x_size + g_size) * sizeof(float));
    if (!xp) return -1;
    float *gp = xp + x_size;

#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < 2 * n_tiles; t++) {
            if (t < n_tiles) pack_tile(x, x_row, x_col, rows, p->in_dim, t, bt, xp + t * p->in_dim * bt);
            else pack_tile(gy, g_row, g_col, rows, p->out_dim, t - n_tiles, bt, gp + (t - n_tiles) * p->out_dim * bt);
        }
#pragma omp for schedule(dynamic, 1)
        for (i64 b = 0; b < n_ob; b++)
            sddmm_item_any(nv, p, n_tiles, gp, xp, b * ob, MIN(p->out_dim, (b + 1) * ob), grad);
    }
    workspace_release(xp);
    return 0;
}

/* grad[e] = Σ_b dY[b][row(e)] · X[b][col(e)] for every stored entry of W (CSR). */
int sn_csr_sddmm(i64 rows, const float *gy, i64 g_row, i64 g_col, const float *x, i64 x_row, i64 x_col,
                 i64 out_dim, i64 in_dim, const i64 *ptr, const i32 *col, float *grad, int n_threads)
{
    sparse_t p = {out_dim, in_dim, ptr, col, NULL, NULL, 0, 1, NULL, NULL};
    return sddmm(&p, rows, gy, g_row, g_col, x, x_row, x_col, grad, n_threads);
}

/* The same for W in N:M form; grad is laid out as the values (out_dim × in_dim/m·n). */
int sn_nm_sddmm(i64 rows, const float *gy, i64 g_row, i64 g_col, const float *x, i64 x_row, i64 x_col,
                i64 out_dim, i64 in_dim, int n, int m, const uint8_t *idx, float *grad, int n_threads)
{
    sparse_t p = {out_dim, in_dim, NULL, NULL, NULL, idx, n, m, NULL, NULL};
    return sddmm(&p, rows, gy, g_row, g_col, x, x_row, x_col, grad, n_threads);
}

/* ---- dX = dY·W for N:M W ---------------------------------------------------------------- */

/* Wᵀ of an N:M matrix is not N:M, so the input gradient scatters instead: a chunk of columns of
 * dXᵀ (one tile) stays in L1 while every output's entries in that chunk add w · dYᵀ[o] to it. */
static ALWAYS_INLINE void nm_input_grad_item(const int nv, const int n, const sparse_t *p, const float *gy,
                                             i64 k0, i64 k1, float *acc)
{
    const int bt = nv * VW;
    i64 per_row = p->in_dim / p->m * n, j0 = k0 / p->m * n, j1 = k1 / p->m * n;
    memset(acc, 0, (k1 - k0) * bt * sizeof(float));
    float *base = acc - k0 * bt;
    for (i64 o = 0; o < p->out_dim; o++) {
        const uint8_t *idx = p->idx + o * per_row;
        const float *values = p->values + o * per_row;
        vec d[NV];
        for (int v = 0; v < nv; v++) d[v] = *(const vec *)(gy + o * bt + v * VW);
        for (i64 j = j0; j < j1; j++) {
            float *a = base + column(n, p, NULL, idx, j) * bt, w = values[j];
            for (int v = 0; v < nv; v++) *(vec *)(a + v * VW) += w * d[v];
        }
    }
}

static void nm_input_grad_any(int nv, const sparse_t *p, const float *gy, i64 k0, i64 k1, float *acc)
{
    int n = p->n;
    DISPATCH(nm_input_grad_item, nv, n, p, gy, k0, k1, acc)
}

/* dX[rows × in_dim] = dY[rows × out_dim] · W, W in N:M form. */
int sn_nm_input_grad(i64 rows, const float *gy, i64 g_row, i64 g_col, i64 out_dim, float *dx, i64 ld_dx,
                     i64 in_dim, int n, int m, const uint8_t *idx, const float *values, int n_threads)
{
    sparse_t p = {out_dim, in_dim, NULL, NULL, NULL, idx, n, m, values, NULL};
    if (rows == 0 || in_dim == 0) return 0;
    int nv = tile_vectors(rows), bt = nv * VW;
    i64 n_tiles = (rows + bt - 1) / bt, kc = chunk_columns(&p, bt, L1_FLOATS), n_chunks = (in_dim + kc - 1) / kc;
    i64 g_size = n_tiles * out_dim * bt;
    float *gp = workspace_get((g_size + n_threads * kc * bt) * sizeof(float));
    if (!gp) return -1;
    float *scratches = gp + g_size;

#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        float *acc = scratches + omp_get_thread_num() * kc * bt;
#else
        float *acc = scratches;
#endif
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < n_tiles; t++) pack_tile(gy, g_row, g_col, rows, out_dim, t, bt, gp + t * out_dim * bt);
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (i64 t = 0; t < n_tiles; t++)
            for (i64 c = 0; c < n_chunks; c++) {
                i64 k0 = c * kc, k1 = MIN(in_dim, k0 + kc);
                nm_input_grad_any(nv, &p, gp + t * out_dim * bt, k0, k1, acc);
                unpack_tile(acc, k1 - k0, bt, MIN(bt, rows - t * bt), dx + t * bt * ld_dx + k0, ld_dx, 1, NULL);
            }
    }
    workspace_release(gp);
    return 0;
}
