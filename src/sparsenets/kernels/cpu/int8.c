/* int8 inference kernels: dynamic per-row activation quantization, the int32 → float epilogue of
 * a dense int8 product, and a block-sparse int8 linear layer Y = X·Wᵀ (+ bias).
 *
 * Quantization is symmetric: scale = amax / 127, q = round_half_even(x · (127 / amax)), so
 * |q| <= 127 and an all-zero row gets scale 0 and q = 0. The float operations are the same
 * IEEE ones as the torch reference, so both give the same bytes.
 *
 * The block-sparse weight keeps r × c blocks (row-block CSR, as in block_sparse.c). Each kept
 * block is packed once, at layer construction (in Python), as groups of 4 consecutive k for
 * every output: panel[g][o][4] = W[o][4g .. 4g+3], outputs padded to a whole number of LANES,
 * k padded to cp = ⌈c/4⌉·4. That is the operand layout of VNNI's dot product of 4 bytes.
 * Activations are quantized into tiles of MR rows, tile[g][m][4], so the micro-kernel
 * broadcasts the 4 bytes of row m at fixed offsets and walks one pointer.
 *
 * Paths, chosen at compile time (-march=native): AVX-512 VNNI, AVX-VNNI (256-bit), AVX2, and
 * a plain C one that every build also keeps (for tests, and a per-call fallback). Where the
 * build has AMX (Sapphire Rapids and later) and Linux grants the tile registers, products of 8+
 * rows with blocks at most 64 wide run on AMX tiles instead: 16 rows × cp bytes of signed
 * activations times the same panels (16 outputs × 4 k per 64-byte row) into 16 × 16 int32
 * tiles, 32 rows × 32 outputs at a time.
 * VNNI multiplies unsigned by signed bytes, so activations are stored shifted (q + 128, in
 * [1, 255]) and 128 · Σk W[o][k] is subtracted per output. AVX2 uses |w| · sign(x, w) with
 * maddubs instead (both at most 128·127, so its int16 pair sums can't saturate) and stores
 * activations unshifted.
 *
 * Accumulation is int32: exact while in_dim · 255 · 128 < 2³¹ (in_dim < 65793), checked in Python.
 */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PATH "avx512-vnni"
#define LANES 16 /* int32 outputs per vector */
#define MR 12    /* rows per register tile: 12 × 2 accumulators + 2 weight vectors of 32 */
#define SHIFTED 1
#elif defined(__AVXVNNI__)
#define PATH "avx-vnni"
#define LANES 8
#define MR 6 /* 6 × 2 accumulators + 2 weights + 1 broadcast of 16 ymm */
#define SHIFTED 1
#elif defined(__AVX2__)
#define PATH "avx2"
#define LANES 8
#define MR 4 /* 4 × 2 accumulators + 2 weights, their |w|, broadcast, temporaries, ones */
#define SHIFTED 0
#else
#define PATH "scalar"
#define LANES 8
#define MR 4
#define SHIFTED 0
#endif

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && LANES == 16 && defined(__linux__) && defined(__x86_64__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define HAVE_AMX 0
#endif

const char *i8_path(void) { return PATH; }
int i8_lanes(void) { return LANES; }
int i8_tile_rows(void) { return MR; }
/* Whether activations are stored +128 (then the caller's column sums are subtracted ×128). */
int i8_shifted(void) { return SHIFTED; }

#if HAVE_AMX
/* Linux hands out the AMX tile state only on request, once per process. */
static int amx_ready(void)
{
    static int state = -1; /* a race only asks twice */
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
}
#endif

/* Whether products run on AMX tiles (compiled in, and granted by the OS). */
int i8_amx(void)
{
#if HAVE_AMX
    return amx_ready();
#else
    return 0;
#endif
}

/* ---- quantization ------------------------------------------------------------------------ */

/* max |x[k]| of a row, compared as integers: for non-NaN floats the bits of |x| order as the
 * values do, and integer max vectorises without -ffast-math. A NaN gives a bigger-than-inf amax. */
static float row_amax(const float *x, i64 n)
{
    const uint32_t *bits = (const uint32_t *)x;
    uint32_t m = 0;
    for (i64 k = 0; k < n; k++) {
        uint32_t a = bits[k] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    float out;
    memcpy(&out, &m, sizeof out);
    return out;
}

/* q[k] = round(x[k] · inv), clamped to ±127 (a rounding of x·inv can't pass 127.5, the clamp
 * only guards non-finite input). Rounds half to even like torch.round. */
static void quantize_row(const float *x, i64 n, float inv, int8_t *q)
{
    i64 k = 0;
#if defined(__AVX512F__)
    __m512 s = _mm512_set1_ps(inv);
    __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (; k + 16 <= n; k += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), s)); /* nearest-even */
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(v));
    }
#elif defined(__AVX2__)
    __m256 s = _mm256_set1_ps(inv);
    __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    for (; k + 8 <= n; k += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), s));
        v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(w, w));
    }
#endif
    for (; k < n; k++) {
        /* Adding and taking off 1.5·2²³ rounds half to even (for |v| < 2²²; bigger values are
         * clamped anyway), without a libm call. */
        float v = x[k] * inv, r = (v + 12582912.0f) - 12582912.0f;
        r = __builtin_fabsf(v) < 4194304.0f ? r : v;
        q[k] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : r == r ? r : 0);
    }
}

/* Symmetric scale of a row and the multiplier that quantizes it (0 for an all-zero row). */
static ALWAYS_INLINE float row_scale(const float *x, i64 n, float *inv)
{
    float amax = row_amax(x, n);
    *inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    return amax / 127.0f;
}

/* q (rows × cols, row stride ld_q) and scale (rows) of x (row stride ld_x). */
void i8_quantize_rows(i64 rows, const float *x, i64 ld_x, i64 cols, int8_t *q, i64 ld_q, float *scale,
                      int n_threads)
{
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (i64 i = 0; i < rows; i++) {
        float inv;
        scale[i] = row_scale(x + i * ld_x, cols, &inv);
        quantize_row(x + i * ld_x, cols, inv, q + i * ld_q);
    }
}

/* out[i][j] = acc[i][j] · sx[i] · sw[j] + bias[j]: the epilogue of an int32 product. */
void i8_dequant(i64 rows, i64 cols, const int32_t *acc, i64 ld_acc, const float *sx, const float *sw,
                const float *bias, float *out, i64 ld_out, int n_threads)
{
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (i64 i = 0; i < rows; i++) {
        const int32_t *a = acc + i * ld_acc;
        float *o = out + i * ld_out, s = sx[i];
        if (bias)
            for (i64 j = 0; j < cols; j++) o[j] = (float)a[j] * (s * sw[j]) + bias[j];
        else
            for (i64 j = 0; j < cols; j++) o[j] = (float)a[j] * (s * sw[j]);
    }
}

/* ---- block-sparse product ------------------------------------------------------------------ */

/* The shape of one block-sparse product, shared by its loops. */
typedef struct {
    i64 rows, in_dim, out_dim, r, c, cp, rp, n_cb, kp;
    const i64 *row_ptr, *col_idx;
    const int8_t *panels;   /* nnz × (cp/4) × rp × 4 */
    const int32_t *colsum;  /* n_row_blocks · rp: Σk of each output's kept weights */
    const float *w_scale, *bias, *sx;
    const uint8_t *xq;      /* the tiles: n_tiles × (kp/4) × MR × 4 */
    float *out;
    i64 ld_out;
} product;

/* Quantize row i of x into `row` (kp bytes): column k of column-block b goes to padded column
 * b·cp + k%c; pad columns hold q = 0. */
static void quantize_padded(const product *P, const float *x, i64 ld_x, i64 i, int8_t *row)
{
    const float *src = x + i * ld_x;
    float inv;
    ((float *)P->sx)[i] = row_scale(src, P->in_dim, &inv);
    if (P->cp == P->c) {
        quantize_row(src, P->in_dim, inv, row);
        memset(row + P->in_dim, 0, P->kp - P->in_dim);
    } else {
        memset(row, 0, P->kp);
        for (i64 b = 0; b < P->n_cb; b++)
            quantize_row(src + b * P->c, MIN(P->c, P->in_dim - b * P->c), inv, row + b * P->cp);
    }
}

/* Quantize row i of x into its place in the tiles (via `row_tmp`, kp bytes). */
static void quantize_into_tile(const product *P, const float *x, i64 ld_x, i64 i, int8_t *row_tmp)
{
    quantize_padded(P, x, ld_x, i, row_tmp);
    uint8_t *dst = (uint8_t *)P->xq + (i / MR) * P->kp * MR + (i % MR) * 4;
    const uint32_t flip = SHIFTED ? 0x80808080u : 0; /* q + 128 in each byte: flip its top bit */
    i64 g = 0;
#if defined(__AVX512F__)
    /* 16 groups of 4 bytes at a time, to their rows in 16 consecutive groups of the tile */
    const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(MR * 4));
    for (; g + 16 <= P->kp / 4; g += 16) {
        __m512i words = _mm512_xor_si512(_mm512_loadu_si512(row_tmp + 4 * g), _mm512_set1_epi32((int)flip));
        _mm512_i32scatter_epi32(dst + g * MR * 4, offsets, words, 1);
    }
#endif
    for (; g < P->kp / 4; g++) {
        uint32_t word;
        memcpy(&word, row_tmp + 4 * g, 4);
        word ^= flip;
        memcpy(dst + g * MR * 4, &word, 4);
    }
}

/* Fill the rows past the end of the last tile with q = 0, so tiles are always whole. */
static void pad_last_tile(const product *P)
{
    i64 used = P->rows % MR;
    if (!used) return;
    uint8_t *tile = (uint8_t *)P->xq + (P->rows / MR) * P->kp * MR;
    for (i64 g = 0; g < P->kp / 4; g++) memset(tile + g * MR * 4 + used * 4, SHIFTED ? 0x80 : 0, (MR - used) * 4);
}

/* y = (acc - shift·colsum) · sx · sw + bias for n valid outputs of one row; generic vectors so
 * every path gets a vector epilogue. */
typedef int32_t vi __attribute__((vector_size(LANES * 4), aligned(4), may_alias));
typedef float vf __attribute__((vector_size(LANES * 4), aligned(4), may_alias));

static ALWAYS_INLINE void store_row(const int shifted, vi acc, const int32_t *colsum, float sx, const float *sw,
                                    const float *bias, float *y, i64 n)
{
    if (n >= LANES) {
        vi a = acc;
        if (shifted) a -= *(const vi *)colsum * 128;
        vf v = __builtin_convertvector(a, vf) * (sx * *(const vf *)sw);
        if (bias) v += *(const vf *)bias;
        *(vf *)y = v;
        return;
    }
    for (i64 t = 0; t < n; t++) {
        int32_t a = acc[t] - (shifted ? 128 * colsum[t] : 0);
        y[t] = (float)a * (sx * sw[t]) + (bias ? bias[t] : 0.0f);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
typedef __m512i wvec;
#define LOADW(p) _mm512_loadu_si512((const void *)(p))
#define ZERO() _mm512_setzero_si512()
#define PREP(w) (w)
#define BCAST(p) _mm512_set1_epi32(*(const int32_t *)(p))
#define DOT(acc, x, w, wp) _mm512_dpbusd_epi32(acc, x, w)
#elif defined(__AVXVNNI__)
typedef __m256i wvec;
#define LOADW(p) _mm256_loadu_si256((const __m256i *)(p))
#define ZERO() _mm256_setzero_si256()
#define PREP(w) (w)
#define BCAST(p) _mm256_set1_epi32(*(const int32_t *)(p))
#define DOT(acc, x, w, wp) _mm256_dpbusd_avx_epi32(acc, x, w)
#elif defined(__AVX2__)
typedef __m256i wvec;
#define LOADW(p) _mm256_loadu_si256((const __m256i *)(p))
#define ZERO() _mm256_setzero_si256()
#define PREP(w) _mm256_abs_epi8(w) /* |w| as unsigned: -128 becomes 128, still right */
#define BCAST(p) _mm256_set1_epi32(*(const int32_t *)(p))
/* |w|·sign(x, w) = w·x per byte; pairs summed to int16 (≤ 2·128·127, no saturation), then to int32 */
#define DOT(acc, x, w, wp) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wp, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1)))
#endif

#ifdef DOT
/* mr rows × nv vectors of LANES outputs of one row-block, summed over its n_e kept blocks.
 * x: the tile at this tile's first row; w: the first block's panel at the first output. */
static ALWAYS_INLINE void simd_tile(const int mr, const int nv, const product *P, i64 n_e, const i64 *cols,
                                    const uint8_t *x, const int8_t *w, const int32_t *colsum, const float *sx,
                                    const float *sw, const float *bias, float *y, i64 n_valid)
{
    wvec acc[MR][2];
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) acc[m][v] = ZERO();
    const i64 groups = P->cp / 4, panel = P->cp * P->rp, step = P->rp * 4;
    for (i64 e = 0; e < n_e; e++, w += panel) {
        const uint8_t *xg = x + cols[e] * groups * MR * 4;
        const int8_t *wg = w;
        if (e + 1 < n_e) /* the next block's activations: a jump the prefetcher can't guess */
            for (i64 g = 0; g < groups * MR * 4; g += 64) _mm_prefetch((const char *)(x + cols[e + 1] * groups * MR * 4 + g), _MM_HINT_T0);
        for (i64 g = 0; g < groups; g++, xg += MR * 4, wg += step) {
            wvec w0 = LOADW(wg), w1 = nv > 1 ? LOADW(wg + LANES * 4) : w0;
            wvec p0 = PREP(w0), p1 = nv > 1 ? PREP(w1) : p0;
            (void)p0, (void)p1;
            for (int m = 0; m < mr; m++) {
                wvec b = BCAST(xg + m * 4);
                acc[m][0] = DOT(acc[m][0], b, w0, p0);
                if (nv > 1) acc[m][1] = DOT(acc[m][1], b, w1, p1);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv && v * LANES < n_valid; v++) {
            vi a;
            memcpy(&a, &acc[m][v], sizeof a);
            store_row(SHIFTED, a, colsum + v * LANES, sx[m], sw + v * LANES, bias ? bias + v * LANES : NULL,
                      y + m * P->ld_out + v * LANES, MIN(LANES, n_valid - v * LANES));
        }
}

#define TILE_CASE(M)                                                                              \
    case M:                                                                                       \
        if (nv == 2) simd_tile(M, 2, P, n_e, cols, x, w, colsum, sx, sw, bias, y, n_valid);       \
        else simd_tile(M, 1, P, n_e, cols, x, w, colsum, sx, sw, bias, y, n_valid);               \
        break;

/* Row counts a tile is compiled for; other counts are split into these. */
static int tile_rows(i64 left) { return left >= MR ? MR : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

static void simd_any(int mr, int nv, const product *P, i64 n_e, const i64 *cols, const uint8_t *x,
                     const int8_t *w, const int32_t *colsum, const float *sx, const float *sw, const float *bias,
                     float *y, i64 n_valid)
{
    switch (mr) {
        TILE_CASE(MR)
#if MR > 4
        TILE_CASE(4)
#endif
        TILE_CASE(2)
        TILE_CASE(1)
    }
}
#endif

/* Plain C: the same operands, one output at a time. */
static void scalar_tile(int mr, const product *P, i64 n_e, const i64 *cols, const uint8_t *x, const int8_t *w,
                        const int32_t *colsum, const float *sx, const float *sw, const float *bias, float *y,
                        i64 n_out)
{
    const i64 groups = P->cp / 4, panel = P->cp * P->rp;
    for (int m = 0; m < mr; m++)
        for (i64 o = 0; o < n_out; o++) {
            int32_t acc = 0;
            for (i64 e = 0; e < n_e; e++) {
                const uint8_t *xg = x + cols[e] * groups * MR * 4 + m * 4;
                const int8_t *wg = w + e * panel + o * 4;
                for (i64 g = 0; g < groups; g++)
                    for (int j = 0; j < 4; j++) {
                        int32_t xv = SHIFTED ? (int32_t)xg[g * MR * 4 + j] : (int32_t)(int8_t)xg[g * MR * 4 + j];
                        acc += xv * wg[g * P->rp * 4 + j];
                    }
            }
            if (SHIFTED) acc -= 128 * colsum[o];
            y[m * P->ld_out + o] = (float)acc * (sx[m] * sw[o]) + (bias ? bias[o] : 0.0f);
        }
}

/* Outputs of row-block rb for rows row0 .. row_end-1 of one tile. */
static void row_block(const product *P, i64 rb, i64 row0, i64 row_end, int scalar)
{
    i64 n_e = P->row_ptr[rb + 1] - P->row_ptr[rb], out0 = rb * P->r, n_out = MIN(P->r, P->out_dim - out0);
    const i64 *cols = P->col_idx + P->row_ptr[rb];
    const int8_t *w = P->panels + P->row_ptr[rb] * P->cp * P->rp;
    const int32_t *colsum = P->colsum + rb * P->rp;
    const float *sw = P->w_scale + out0, *bias = P->bias ? P->bias + out0 : NULL;
    const uint8_t *tile = P->xq + row0 / MR * P->kp * MR;
#ifndef DOT
    scalar = 1; /* no vector path compiled */
#endif
    if (scalar) {
        scalar_tile((int)(row_end - row0), P, n_e, cols, tile + row0 % MR * 4, w, colsum, P->sx + row0, sw, bias,
                    P->out + row0 * P->ld_out + out0, n_out);
        return;
    }
#ifdef DOT
    for (i64 t0 = 0; t0 < n_out; t0 += 2 * LANES) {
        int nv = n_out - t0 > LANES ? 2 : 1;
        for (i64 row = row0, mr; row < row_end; row += mr) {
            mr = tile_rows(row_end - row);
            simd_any((int)mr, nv, P, n_e, cols, tile + (row % MR) * 4, w + t0 * 4, colsum + t0, P->sx + row, sw + t0,
                     bias ? bias + t0 : NULL, P->out + row * P->ld_out + out0 + t0, n_out - t0);
        }
    }
#endif
}

#if HAVE_AMX
/* Rows per AMX unit: two 16-row activation tiles share each weight tile. */
#define AMX_ROWS 32

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Tiles 0-3: int32 results (16 rows × 16 outputs) for rows 0-15/16-31 × outputs 0-15/16-31;
 * 4-5: activations (16 rows × cp bytes); 6-7: weights (cp/4 groups × 16 outputs × 4 bytes). */
static void amx_configure(i64 cp)
{
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = t >= 6 ? (uint8_t)(cp / 4) : 16;
        cfg.colsb[t] = t == 4 || t == 5 ? (uint16_t)cp : 64;
    }
    _tile_loadconfig(&cfg);
}

/* Activations for AMX: per unit of AMX_ROWS rows, column-block by column-block, AMX_ROWS × cp
 * bytes each, so a tile load reads whole cache lines. Signed (tdpbssd multiplies s8 by s8). */
static void quantize_for_amx(const product *P, const float *x, i64 ld_x, i64 i)
{
    const float *src = x + i * ld_x;
    float inv;
    ((float *)P->sx)[i] = row_scale(src, P->in_dim, &inv);
    int8_t *dst = (int8_t *)P->xq + (i / AMX_ROWS) * AMX_ROWS * P->kp + (i % AMX_ROWS) * P->cp;
    for (i64 b = 0; b < P->n_cb; b++, dst += AMX_ROWS * P->cp) { /* straight into place: no copy */
        i64 n = MIN(P->c, P->in_dim - b * P->c);
        quantize_row(src + b * P->c, n, inv, dst);
        if (n < P->cp) memset(dst + n, 0, P->cp - n);
    }
}

/* Outputs of row-block rb for rows row0 .. row_end-1 (row0 a multiple of AMX_ROWS). */
static void amx_row_block(const product *P, i64 rb, i64 row0, i64 row_end)
{
    i64 n_e = P->row_ptr[rb + 1] - P->row_ptr[rb], out0 = rb * P->r, n_out = MIN(P->r, P->out_dim - out0);
    const i64 *cols = P->col_idx + P->row_ptr[rb];
    const int8_t *w = P->panels + P->row_ptr[rb] * P->cp * P->rp, *x = (const int8_t *)P->xq + row0 * P->kp;
    const float *sw = P->w_scale + out0, *bias = P->bias ? P->bias + out0 : NULL;
    const i64 panel = P->cp * P->rp, ld_w = P->rp * 4;
    int32_t c[AMX_ROWS][32] __attribute__((aligned(64)));
    for (i64 t0 = 0; t0 < n_out; t0 += 32) {
        int two = n_out - t0 > 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (i64 e = 0; e < n_e; e++) {
            const int8_t *a = x + cols[e] * AMX_ROWS * P->cp, *b = w + e * panel + t0 * 4;
            if (e + 1 < n_e) /* the next block's activations: a jump the prefetcher can't guess */
                for (i64 l = 0; l < AMX_ROWS * P->cp; l += 64)
                    _mm_prefetch((const char *)(x + cols[e + 1] * AMX_ROWS * P->cp + l), _MM_HINT_T0);
            _tile_loadd(4, a, P->cp);
            _tile_loadd(5, a + 16 * P->cp, P->cp);
            _tile_loadd(6, b, ld_w);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(2, 5, 6);
            if (two) {
                _tile_loadd(7, b + 64, ld_w);
                _tile_dpbssd(1, 4, 7);
                _tile_dpbssd(3, 5, 7);
            }
        }
        _tile_stored(0, &c[0][0], sizeof c[0]);
        _tile_stored(1, &c[0][16], sizeof c[0]);
        _tile_stored(2, &c[16][0], sizeof c[0]);
        _tile_stored(3, &c[16][16], sizeof c[0]);
        for (i64 m = 0; m < row_end - row0; m++)
            for (i64 v = 0; v < 2 && t0 + v * 16 < n_out; v++) {
                vi a;
                memcpy(&a, &c[m][v * 16], sizeof a);
                i64 o = t0 + v * 16;
                store_row(0, a, NULL, P->sx[row0 + m], sw + o, bias ? bias + o : NULL,
                          P->out + (row0 + m) * P->ld_out + out0 + o, MIN(16, n_out - o));
            }
    }
}
#endif

/* One row-block of outputs for rows [row0, row_end), on AMX tiles where they run, else vectors. */
static void any_row_block(const product *P, i64 rb, i64 row0, i64 row_end, int scalar, int amx)
{
#if HAVE_AMX
    if (amx) {
        amx_row_block(P, rb, row0, row_end);
        return;
    }
#else
    (void)amx;
#endif
    row_block(P, rb, row0, row_end, scalar);
}

/* Row i of x into the activation layout of the path that runs. */
static void quantize_unit_row(const product *P, const float *x, i64 ld_x, i64 i, int8_t *tmp, int amx)
{
#if HAVE_AMX
    if (amx) {
        quantize_for_amx(P, x, ld_x, i);
        return;
    }
#endif
    (void)amx;
    quantize_into_tile(P, x, ld_x, i, tmp);
}

/* Scratch reused across calls (a fresh multi-megabyte buffer costs a page fault per 4 KiB);
 * one bigger than SCRATCH_KEEP is allocated for the call and freed after it. */
#define SCRATCH_KEEP ((size_t)64 << 20)
static __thread uint8_t *scratch;
static __thread size_t scratch_size;

static uint8_t *scratch_get(size_t bytes)
{
    bytes = (bytes + 63) / 64 * 64 + 64;
    if (bytes > SCRATCH_KEEP) return aligned_alloc(64, bytes);
    if (bytes > scratch_size) {
        free(scratch);
        scratch = aligned_alloc(64, bytes);
        scratch_size = scratch ? bytes : 0;
    }
    return scratch;
}

static void scratch_release(uint8_t *buf)
{
    if (buf != scratch) free(buf);
}

/* Out (rows × out_dim, row stride ld_out) = dequant(quant(X) · Wᵀ) + bias for the packed blocks.
 * mode 0: the fastest path (AMX where granted), 1: the plain C loops, 2: the vector path without
 * AMX. Returns 0, or -1 when the scratch memory can't be allocated. */
int i8_bsp_linear(i64 rows, const float *x, i64 ld_x, i64 in_dim, i64 out_dim, i64 r, i64 c,
                  const i64 *row_ptr, const i64 *col_idx, const int8_t *panels, const int32_t *colsum,
                  const float *w_scale, const float *bias, float *out, i64 ld_out, int mode, int n_threads)
{
    if (rows <= 0) return 0;
    i64 cp = (c + 3) / 4 * 4, n_cb = (in_dim + c - 1) / c, kp = n_cb * cp;
    int amx = 0;
#if HAVE_AMX
    /* One tile spans a block's k; below 8 rows most of a 16-row tile would be padding, and the
     * vector path is faster. */
    amx = mode == 0 && cp <= 64 && rows >= 8 && amx_ready();
    const i64 unit = amx ? AMX_ROWS : MR;       /* rows per unit of work */
#else
    const i64 unit = MR;
#endif
    i64 n_units = (rows + unit - 1) / unit, n_rb = (out_dim + r - 1) / r;
    size_t x_bytes = (size_t)(n_units * unit * kp);
    uint8_t *buf = scratch_get(x_bytes + rows * sizeof(float) + n_threads * (size_t)(kp + 64));
    if (!buf) return -1;
    product P = {rows, in_dim, out_dim, r, c, cp, (r + LANES - 1) / LANES * LANES, n_cb, kp, row_ptr, col_idx,
                 panels, colsum, w_scale, bias, (float *)(buf + x_bytes), buf, out, ld_out};
    int8_t *row_tmp = (int8_t *)(buf + x_bytes + rows * sizeof(float));
    int scalar = mode == 1;
#if HAVE_AMX
    if (amx && rows % AMX_ROWS) { /* the rows past the end: zero activations */
        int8_t *last = (int8_t *)buf + (rows / AMX_ROWS) * AMX_ROWS * kp;
        for (i64 b = 0; b < n_cb; b++)
            memset(last + b * AMX_ROWS * cp + (rows % AMX_ROWS) * cp, 0, (AMX_ROWS - rows % AMX_ROWS) * cp);
    }
#endif
    /* Scheduled dynamically: a thread the OS delays on a busy machine doesn't hold up the rest. */
#pragma omp parallel num_threads(n_threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        int8_t *tmp = row_tmp + me * (kp + 64);
#if HAVE_AMX
        if (amx) amx_configure(cp); /* tile configuration is per thread */
#endif
        if (n_units >= 2 * n_threads) {
            /* Enough units to share: a thread quantizes a unit's rows and at once computes all of
             * their outputs, while the activations are in its L1 cache. */
#pragma omp for schedule(dynamic, 1)
            for (i64 t = 0; t < n_units; t++) {
                i64 row0 = t * unit, row_end = MIN(rows, row0 + unit);
                for (i64 i = row0; i < row_end; i++) {
                    quantize_unit_row(&P, x, ld_x, i, tmp, amx);
                }
                if (row_end == rows && !amx) pad_last_tile(&P);
                for (i64 rb = 0; rb < n_rb; rb++) any_row_block(&P, rb, row0, row_end, scalar, amx);
            }
        } else {
            /* Few rows: quantize them all, then share the row-blocks. */
#pragma omp for schedule(static)
            for (i64 i = 0; i < rows; i++) {
                quantize_unit_row(&P, x, ld_x, i, tmp, amx);
            }
#pragma omp single
            if (!amx) pad_last_tile(&P);
            i64 units = n_units * n_rb;
#pragma omp for schedule(dynamic, 4)
            for (i64 u = 0; u < units; u++) {
                i64 t = u / n_rb, row0 = t * unit;
                any_row_block(&P, u % n_rb, row0, MIN(rows, row0 + unit), scalar, amx);
            }
        }
#if HAVE_AMX
        if (amx) _tile_release();
#endif
    }
    scratch_release(buf);
    return 0;
}
