/* codebook.c - scalar codebooks per component with variable widths (0-8 bits): the quantizer
 * of the transform codec. Component c of a row is coded as the index of its nearest level
 * among 2^bits[c] levels, the indices of a row packed low bit first into row_bytes bytes.
 * kernels/cuda/codebook_cuda.cu holds the twins. Letters: N rows, C components. */
#include "kvc/kernels.h"

#include <string.h>

int kvc_codebook_row_bytes(const uint8_t *bits, int c) {
    int64_t total = 0;
    for (int i = 0; i < c; i++) total += bits[i];
    return (int)((total + 7) / 8);
}

/* Index of the level nearest y among lv[0, n) (ascending): the number of midpoints below y,
 * found by bisection; the midpoint itself rounds down. NaN gives 0. */
static inline int nearest(const float *lv, int n, float y) {
    int lo = 0, hi = n - 1; /* the answer is in [lo, hi] */
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        float cut = 0.5f * (lv[mid] + lv[mid + 1]);
        if (y > cut) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

void kvc_codebook_quantize(const kvc_codebook *cb, const float *y, int64_t n, int64_t ldy, uint8_t *codes) {
    for (int64_t r = 0; r < n; r++) {
        const float *yr = y + r * ldy;
        uint8_t *out = codes + r * cb->row_bytes;
        memset(out, 0, (size_t)cb->row_bytes);
        int64_t at = 0; /* bit position */
        for (int c = 0; c < cb->c; c++) {
            const int b = cb->bits[c];
            if (!b) continue;
            uint32_t q = (uint32_t)nearest(cb->levels + cb->off[c], 1 << b, yr[c]);
            /* a code spans at most two bytes (b <= 8) */
            out[at >> 3] |= (uint8_t)(q << (at & 7));
            if ((at & 7) + b > 8) out[(at >> 3) + 1] |= (uint8_t)(q >> (8 - (at & 7)));
            at += b;
        }
    }
}

void kvc_codebook_dequantize(const kvc_codebook *cb, const uint8_t *codes, int64_t n, float *y, int64_t ldy) {
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *in = codes + r * cb->row_bytes;
        float *yr = y + r * ldy;
        int64_t at = 0;
        for (int c = 0; c < cb->c; c++) {
            const int b = cb->bits[c];
            if (!b) {
                yr[c] = 0.0f;
                continue;
            }
            uint32_t w = in[at >> 3];
            if ((at & 7) + b > 8) w |= (uint32_t)in[(at >> 3) + 1] << 8;
            const uint32_t q = (w >> (at & 7)) & ((1u << b) - 1u);
            yr[c] = cb->levels[cb->off[c] + (int)q];
            at += b;
        }
    }
}
