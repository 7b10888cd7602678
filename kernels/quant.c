/* quant.c - ggml block formats and their dequantization to f32: the CPU reference for
 * every quantized weight kvcodec reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K). */
#include "kvc/quant.h"

#include <string.h>

typedef struct {
    uint32_t id, block_elems, block_bytes;
    const char *name;
    int supported;
} type_info;

/* Layouts follow the ggml block structs (little-endian, packed). */
static const type_info TYPES[] = {
    {GGML_T_F32, 1, 4, "F32", 1},
    {GGML_T_F16, 1, 2, "F16", 1},
    {GGML_T_Q4_0, QK4_0, 2 + QK4_0 / 2, "Q4_0", 1},
    {GGML_T_Q4_1, QK4_1, 4 + QK4_1 / 2, "Q4_1", 1},
    {GGML_T_Q5_0, 32, 22, "Q5_0", 0},
    {GGML_T_Q5_1, 32, 24, "Q5_1", 0},
    {GGML_T_Q8_0, QK8_0, 2 + QK8_0, "Q8_0", 1},
    {GGML_T_Q8_1, 32, 36, "Q8_1", 0},
    {GGML_T_Q2_K, QK_K, 84, "Q2_K", 0},
    {GGML_T_Q3_K, QK_K, 110, "Q3_K", 0},
    {GGML_T_Q4_K, QK_K, 144, "Q4_K", 1},
    {GGML_T_Q5_K, QK_K, 176, "Q5_K", 0},
    {GGML_T_Q6_K, QK_K, 210, "Q6_K", 1},
    {GGML_T_Q8_K, QK_K, 292, "Q8_K", 0},
    {24, 1, 1, "I8", 0},
    {25, 1, 2, "I16", 0},
    {26, 1, 4, "I32", 0},
    {27, 1, 8, "I64", 0},
    {28, 1, 8, "F64", 0},
    {GGML_T_BF16, 1, 2, "BF16", 1},
};

static const type_info *find_type(uint32_t type) {
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].id == type) return &TYPES[i];
    return NULL;
}

int kvc_ggml_type_block(uint32_t type, uint32_t *block_elems, uint32_t *block_bytes) {
    const type_info *t = find_type(type);
    if (!t) return -1;
    *block_elems = t->block_elems;
    *block_bytes = t->block_bytes;
    return 0;
}

const char *kvc_ggml_type_name(uint32_t type) {
    const type_info *t = find_type(type);
    return t ? t->name : "?";
}

int kvc_ggml_type_supported(uint32_t type) {
    const type_info *t = find_type(type);
    return t && t->supported;
}

static float rd_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return kvc_f16_to_f32(h);
}

/* Q4_0: d(f16) qs[16]; x = (nibble - 8) * d; low nibbles are elements 0..15. */
static void deq_q4_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        float d = rd_f16(b);
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = ((qs[j] & 0xF) - 8) * d;
            y[j + 16] = ((qs[j] >> 4) - 8) * d;
        }
    }
}

/* Q4_1: d(f16) m(f16) qs[16]; x = nibble * d + m. */
static void deq_q4_1(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 20, y += 32) {
        float d = rd_f16(b), m = rd_f16(b + 2);
        const uint8_t *qs = b + 4;
        for (int j = 0; j < 16; j++) {
            y[j] = (qs[j] & 0xF) * d + m;
            y[j + 16] = (qs[j] >> 4) * d + m;
        }
    }
}

/* Q8_0: d(f16) qs[32] (int8); x = q * d. */
static void deq_q8_0(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 34, y += 32) {
        float d = rd_f16(b);
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) y[j] = qs[j] * d;
    }
}

/* Unpacks the j-th 6-bit (scale, min) pair of a Q4_K super-block's 12 scale bytes. */
static void q4k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* Q4_K: d(f16) dmin(f16) scales[12] qs[128]; 8 sub-blocks of 32 with 6-bit scale/min;
 * sub-block pairs share 32 bytes (low nibbles first, then high). */
static void deq_q4_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 144) {
        float d = rd_f16(b), dmin = rd_f16(b + 2);
        const uint8_t *scales = b + 4, *q = b + 16;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, q += 32) {
            uint8_t sc, m;
            q4k_scale_min(is, scales, &sc, &m);
            float d1 = d * sc, m1 = dmin * m;
            q4k_scale_min(is + 1, scales, &sc, &m);
            float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

/* Q6_K: ql[128] qh[64] scales[16](int8) d(f16); 16 sub-blocks of 16, 6-bit values - 32. */
static void deq_q6_k(const uint8_t *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 210) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = rd_f16(b + 208);
        for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

int kvc_dequantize_row(uint32_t type, const void *src, float *dst, int64_t n) {
    const type_info *t = find_type(type);
    if (!t || !t->supported || n < 0 || n % t->block_elems) return -1;
    const uint8_t *b = src;
    int64_t nb = n / t->block_elems;
    switch (type) {
    case GGML_T_F32: memcpy(dst, src, (size_t)n * 4); break;
    case GGML_T_F16: for (int64_t i = 0; i < n; i++) dst[i] = rd_f16(b + 2 * i); break;
    case GGML_T_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, b + 2 * i, 2);
            dst[i] = kvc_bf16_to_f32(h);
        }
        break;
    case GGML_T_Q4_0: deq_q4_0(b, dst, nb); break;
    case GGML_T_Q4_1: deq_q4_1(b, dst, nb); break;
    case GGML_T_Q8_0: deq_q8_0(b, dst, nb); break;
    case GGML_T_Q4_K: deq_q4_k(b, dst, nb); break;
    case GGML_T_Q6_K: deq_q6_k(b, dst, nb); break;
    default: return -1;
    }
    return 0;
}
