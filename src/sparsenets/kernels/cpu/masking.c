/* Masks applied in place to fp32 tensors, for masked training that costs no extra copy.
 *
 * keep is one byte per element (a torch bool tensor), nonzero where the element is kept.
 *   sn_mask_f32         x[i] = keep[i] ? x[i] : 0     (a gradient, once per backward)
 *   sn_zero_dropped_f32 the same, but it only reads a chunk in which no dropped element is
 *                       nonzero, as is the rule for a weight the optimizer kept at zero.
 * Loops are written plainly so the compiler vectorises them for the ISA it builds for.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

#define CHUNK 16384 /* elements per scheduling unit: 64 KiB of floats, an L2-friendly piece */

static void mask_range(float *restrict x, const uint8_t *restrict keep, i64 n) {
    for (i64 i = 0; i < n; i++) x[i] = keep[i] ? x[i] : 0.0f;
}

static int has_dropped_nonzero(const float *restrict x, const uint8_t *restrict keep, i64 n) {
    const uint32_t *bits = (const uint32_t *)x;
    uint32_t any = 0;
    for (i64 i = 0; i < n; i++) any |= (keep[i] ? 0u : bits[i]) & 0x7fffffffu; /* -0.0 counts as zero */
    return any != 0;
}

void sn_mask_f32(float *x, const uint8_t *keep, i64 n, int threads) {
    i64 chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (i64 k = 0; k < chunks; k++) {
        i64 start = k * CHUNK, len = n - start < CHUNK ? n - start : CHUNK;
        mask_range(x + start, keep + start, len);
    }
}

/* Returns how many chunks had to be written. */
i64 sn_zero_dropped_f32(float *x, const uint8_t *keep, i64 n, int threads) {
    i64 chunks = (n + CHUNK - 1) / CHUNK, written = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : written) if (threads > 1)
    for (i64 k = 0; k < chunks; k++) {
        i64 start = k * CHUNK, len = n - start < CHUNK ? n - start : CHUNK;
        if (has_dropped_nonzero(x + start, keep + start, len)) {
            mask_range(x + start, keep + start, len);
            written++;
        }
    }
    return written;
}
