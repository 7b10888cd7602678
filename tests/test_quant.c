/* test_quant.c - dequantization of every supported ggml type against blocks whose values
 * were worked out by hand, f16/bf16 conversions, and the fused quantized mat-vec against
 * dequantize-then-dot. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "kvc/ops.h"
#include "kvc/quant.h"

static void put_f16(uint8_t *p, float v) {
    uint16_t h = kvc_f32_to_f16(v);
    memcpy(p, &h, 2);
}

Test(quant, f16_and_bf16_conversions) {
    cr_expect_eq(kvc_f16_to_f32(0x3C00), 1.0f);
    cr_expect_eq(kvc_f16_to_f32(0xC000), -2.0f);
    cr_expect_eq(kvc_f16_to_f32(0x7BFF), 65504.0f);
    cr_expect_eq(kvc_f16_to_f32(0x0001), ldexpf(1.0f, -24));
    cr_expect(isinf(kvc_f16_to_f32(0x7C00)));
    cr_expect_eq(kvc_f32_to_f16(1.0f), 0x3C00);
    cr_expect_eq(kvc_f32_to_f16(1.0f + ldexpf(1.0f, -11)), 0x3C00, "tie rounds to even");
    cr_expect_eq(kvc_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3C02, "tie rounds to even (up)");
    cr_expect_eq(kvc_f32_to_f16(1e6f), 0x7C00, "overflow gives inf");
    cr_expect_eq(kvc_f32_to_f16(ldexpf(1.0f, -24)), 0x0001);
    for (uint32_t h = 0; h < 0x7C00; h++) /* every finite positive half survives a round trip */
        cr_assert_eq(kvc_f32_to_f16(kvc_f16_to_f32((uint16_t)h)), h, "half 0x%04x", h);
    cr_expect_eq(kvc_bf16_to_f32(0x3F80), 1.0f);
    cr_expect_eq(kvc_bf16_to_f32(0xC0A0), -5.0f);
}

Test(quant, plain_types) {
    uint16_t h[2] = {0x3C00, 0xC000};
    float y[2];
    cr_assert_eq(kvc_dequantize_row(GGML_T_F16, h, y, 2), 0);
    cr_expect(y[0] == 1.0f && y[1] == -2.0f);
    uint16_t b[2] = {0x3F80, 0xC0A0};
    cr_assert_eq(kvc_dequantize_row(GGML_T_BF16, b, y, 2), 0);
    cr_expect(y[0] == 1.0f && y[1] == -5.0f);
    float f[2] = {3.25f, -0.5f};
    cr_assert_eq(kvc_dequantize_row(GGML_T_F32, f, y, 2), 0);
    cr_expect(y[0] == 3.25f && y[1] == -0.5f);
}

Test(quant, q4_0_q4_1_q8_0_blocks) {
    uint8_t b0[18] = {0}, b1[20] = {0}, b8[34] = {0};
    float y[32];
    put_f16(b0, 0.5f);
    b0[2 + 3] = 0x1F;
    cr_assert_eq(kvc_dequantize_row(GGML_T_Q4_0, b0, y, 32), 0);
    cr_expect_float_eq(y[3], 3.5f, 0);    /* (15 - 8) * 0.5 */
    cr_expect_float_eq(y[19], -3.5f, 0);  /* (1 - 8) * 0.5 */
    cr_expect_float_eq(y[0], -4.0f, 0);   /* (0 - 8) * 0.5 */
    put_f16(b1, 0.5f);
    put_f16(b1 + 2, -1.0f);
    b1[4 + 3] = 0x1F;
    cr_assert_eq(kvc_dequantize_row(GGML_T_Q4_1, b1, y, 32), 0);
    cr_expect_float_eq(y[3], 6.5f, 0);    /* 15 * 0.5 - 1 */
    cr_expect_float_eq(y[19], -0.5f, 0);  /* 1 * 0.5 - 1 */
    cr_expect_float_eq(y[31], -1.0f, 0);
    put_f16(b8, 0.25f);
    b8[2 + 5] = (uint8_t)(int8_t)-100;
    b8[2 + 31] = 127;
    cr_assert_eq(kvc_dequantize_row(GGML_T_Q8_0, b8, y, 32), 0);
    cr_expect_float_eq(y[5], -25.0f, 0);
    cr_expect_float_eq(y[31], 31.75f, 0);
}

Test(quant, q4_k_block) {
    uint8_t b[144] = {0};
    float y[256];
    put_f16(b, 2.0f);       /* d */
    put_f16(b + 2, 0.5f);   /* dmin */
    uint8_t *sc = b + 4, *qs = b + 16;
    const uint8_t scales[12] = {1 | (1 << 6), 2, 3, 4, 5, 6, 7, 8 | (2 << 6), 0x39, 0, 0, 0xF2};
    memcpy(sc, scales, 12);
    /* sub-block scale/min: j<4 from the low 6 bits; j=4: sc=(0x39&15)|(1<<4)=25, m=3;
     * j=7: sc=(0xF2&15)=2, m=(0xF2>>4)|(2<<4)=47 */
    qs[0] = 0xA3;
    qs[69] = 0x07;
    qs[127] = 0x90;
    cr_assert_eq(kvc_dequantize_row(GGML_T_Q4_K, b, y, 256), 0);
    cr_expect_float_eq(y[0], 2 * 1 * 3 - 0.5 * 5, 1e-6);      /* sub-block 0, low nibble */
    cr_expect_float_eq(y[32], 2 * 2 * 10 - 0.5 * 6, 1e-6);    /* sub-block 1, high nibble */
    cr_expect_float_eq(y[133], 2 * 25 * 7 - 0.5 * 3, 1e-6);   /* sub-block 4, qs[64 + 5] */
    cr_expect_float_eq(y[255], 2 * 2 * 9 - 0.5 * 47, 1e-6);   /* sub-block 7, qs[96 + 31] high */
    cr_expect_float_eq(y[1], -0.5 * 5, 1e-6);                 /* q = 0 */
}

Test(quant, q6_k_block) {
    uint8_t b[210] = {0};
    float y[256];
    uint8_t *ql = b, *qh = b + 128;
    int8_t *sc = (int8_t *)(b + 192);
    put_f16(b + 208, 0.25f);
    sc[0] = 3;
    sc[5] = -2;
    sc[14] = 1;
    ql[0] = 0x05;
    qh[0] = 0x02;           /* element 0: 5 | 2<<4 = 37 -> 5 */
    ql[17] = 0xF0;
    qh[17] = 0x30;          /* element 64+17: 15 | 3<<4 = 63 -> 31, scale sc[1+4] */
    cr_assert_eq(kvc_dequantize_row(GGML_T_Q6_K, b, y, 256), 0);
    cr_expect_float_eq(y[0], 0.25 * 3 * 5, 1e-6);
    cr_expect_float_eq(y[81], 0.25 * -2 * 31, 1e-6);
    cr_expect_float_eq(y[225], 0.25 * 1 * -32, 1e-6);  /* second half, l=1, 4th group: all zero bits */
    cr_expect_float_eq(y[16], 0.0, 1e-6);               /* sc[1] = 0 */
}

Test(quant, rejects_unsupported_type_and_bad_length) {
    uint8_t z[64] = {0};
    float y[64];
    cr_expect_eq(kvc_dequantize_row(GGML_T_Q5_0, z, y, 32), -1);
    cr_expect_eq(kvc_dequantize_row(GGML_T_Q4_1, z, y, 31), -1);
    cr_expect_eq(kvc_dequantize_row(999, z, y, 32), -1);
    cr_expect_str_eq(kvc_ggml_type_name(GGML_T_Q6_K), "Q6_K");
    cr_expect_eq(kvc_ggml_type_supported(GGML_T_Q5_K), 0);
}

/* xorshift for reproducible random blocks */
static uint32_t rng = 2463534242u;
static uint32_t next(void) { rng ^= rng << 13; rng ^= rng >> 17; rng ^= rng << 5; return rng; }
static float unit(void) { return (float)(next() & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f; }

/* The fused kernels must equal dequantize-then-dot up to f32 reassociation. */
static void check_matvec(uint32_t type, size_t block_bytes) {
    const int rows = 37, cols = 256, nb = cols / 32;
    uint8_t *w = malloc((size_t)rows * nb * block_bytes);
    for (size_t i = 0; i < (size_t)rows * nb * block_bytes; i++) w[i] = (uint8_t)next();
    for (int r = 0; r < rows * nb; r++) { /* sane scales */
        put_f16(w + r * block_bytes, 0.01f + 0.1f * fabsf(unit()));
        if (type == GGML_T_Q4_1) put_f16(w + r * block_bytes + 2, 0.2f * unit());
    }
    float x[256], y[37], row[256];
    for (int i = 0; i < cols; i++) x[i] = unit();
    kvc_matrix m = {w, type, NULL, rows, cols, nb * block_bytes};
    cr_assert_eq(kvc_matvec_quant_cpu(y, x, &m), 0);
    for (int r = 0; r < rows; r++) {
        kvc_dequantize_row(type, w + r * m.row_bytes, row, cols);
        double ref = 0, mag = 0;
        for (int i = 0; i < cols; i++) { ref += (double)row[i] * x[i]; mag += fabs((double)row[i] * x[i]); }
        cr_expect(fabs(y[r] - ref) <= 1e-5 * mag + 1e-6, "%s row %d: %g vs %g", kvc_ggml_type_name(type), r, y[r], ref);
    }
    free(w);
}

Test(quant, fused_matvec_matches_reference) {
    check_matvec(GGML_T_Q4_1, 20);
    check_matvec(GGML_T_Q8_0, 34);
}
