/* kvquant.c - CPU reference of KIVI-style K/V quantisation (kvc/kvquant.h): min/max per
 * group, f16 scale and minimum, round-to-nearest codes; 4-bit codes packed two per byte and
 * 2-bit codes four per byte, low bits first. */
#include "kvc/kvquant.h"

#include <math.h>

int kvc_kvq_params_ok(int bits, int group, int channels) {
    if (bits != 2 && bits != 4 && bits != 8) return 0;
    if (group < 1 || channels < 1) return 0;
    if (channels % (8 / bits)) return 0;
    return 1;
}

size_t kvc_kvq_code_bytes(int bits, int64_t n) { return (size_t)((n * bits + 7) / 8); }

/* Scale and minimum of a group with range [lo, hi] as stored in f16: the minimum rounded down
 * and the scale up, so every value lies in [min, min + (2^b - 1) scale] and its error is at
 * most scale / 2. */
static void group_params(float lo, float hi, int bits, uint16_t *scale, uint16_t *minv, float *s, float *m) {
    const float levels = (float)((1 << bits) - 1);
    uint16_t mh = kvc_f32_to_f16(lo);
    if (kvc_f16_to_f32(mh) > lo) /* one f16 step down, so the minimum never exceeds the data */
        mh = (mh & 0x8000) ? (uint16_t)(mh + 1) : (mh == 0 ? 0x8001 : (uint16_t)(mh - 1));
    *minv = mh;
    *m = kvc_f16_to_f32(mh);
    float span = hi - *m;
    float sc = span > 0 ? span / levels : 0.0f;
    uint16_t h = kvc_f32_to_f16(sc);
    if (kvc_f16_to_f32(h) * levels < span && h < 0x7BFF) h++; /* next f16 up: never clip the top */
    *scale = h;
    *s = kvc_f16_to_f32(h);
}

/* Code of value v for a group (s, m); clamped to the code range. */
static unsigned code_of(float v, float s, float m, int bits) {
    if (!(s > 0)) return 0;
    float q = rintf((v - m) / s);
    float top = (float)((1 << bits) - 1);
    q = q < 0 ? 0 : q > top ? top : q;
    return (unsigned)q;
}

/* Code i of a row of `bits`-wide codes packed low bits first (8 / bits codes a byte). */
static void put_code(uint8_t *row, int i, unsigned q, int bits) {
    if (bits == 8) {
        row[i] = (uint8_t)q;
        return;
    }
    const int per = 8 / bits, sh = (i % per) * bits;
    const unsigned mask = ((1u << bits) - 1u) << sh;
    row[i / per] = (uint8_t)((row[i / per] & ~mask) | (q << sh));
}

static unsigned get_code(const uint8_t *row, int i, int bits) {
    if (bits == 8) return row[i];
    const int per = 8 / bits;
    return (row[i / per] >> ((i % per) * bits)) & ((1u << bits) - 1u);
}

void kvc_kvq_quant_tokens_cpu(const float *x, int64_t n, int c, int g, int bits, uint8_t *codes, uint16_t *scale,
                          uint16_t *minv) {
    const size_t rb = kvc_kvq_code_bytes(bits, c);
    const int ng = c / g;
    for (int64_t t = 0; t < n; t++) {
        const float *xr = x + (size_t)t * c;
        uint8_t *cr = codes + (size_t)t * rb;
        for (int j = 0; j < ng; j++) {
            float lo = xr[j * g], hi = lo;
            for (int i = 1; i < g; i++) {
                float v = xr[j * g + i];
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
            }
            float s, m;
            group_params(lo, hi, bits, &scale[(size_t)t * ng + j], &minv[(size_t)t * ng + j], &s, &m);
            for (int i = 0; i < g; i++) put_code(cr, j * g + i, code_of(xr[j * g + i], s, m, bits), bits);
        }
    }
}

void kvc_kvq_dequant_tokens_cpu(const uint8_t *codes, const uint16_t *scale, const uint16_t *minv, int64_t n, int c,
                            int g, int bits, float *x) {
    const size_t rb = kvc_kvq_code_bytes(bits, c);
    const int ng = c / g;
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < ng; j++) {
            float s = kvc_f16_to_f32(scale[(size_t)t * ng + j]), m = kvc_f16_to_f32(minv[(size_t)t * ng + j]);
            for (int i = 0; i < g; i++)
                x[(size_t)t * c + j * g + i] = m + (float)get_code(codes + (size_t)t * rb, j * g + i, bits) * s;
        }
}

void kvc_kvq_quant_channels_cpu(const float *x, int g_tokens, int c, int bits, uint8_t *codes, uint16_t *scale,
                            uint16_t *minv) {
    const size_t rb = kvc_kvq_code_bytes(bits, c);
    for (int ch = 0; ch < c; ch++) {
        float lo = x[ch], hi = lo;
        for (int t = 1; t < g_tokens; t++) {
            float v = x[(size_t)t * c + ch];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        float s, m;
        group_params(lo, hi, bits, &scale[ch], &minv[ch], &s, &m);
        for (int t = 0; t < g_tokens; t++) put_code(codes + (size_t)t * rb, ch, code_of(x[(size_t)t * c + ch], s, m, bits), bits);
    }
}

void kvc_kvq_dequant_channels_cpu(const uint8_t *codes, const uint16_t *scale, const uint16_t *minv, int g_tokens,
                              int c, int bits, float *x) {
    const size_t rb = kvc_kvq_code_bytes(bits, c);
    for (int t = 0; t < g_tokens; t++)
        for (int ch = 0; ch < c; ch++)
            x[(size_t)t * c + ch] = kvc_f16_to_f32(minv[ch]) + (float)get_code(codes + (size_t)t * rb, ch, bits) *
                                                                  kvc_f16_to_f32(scale[ch]);
}
