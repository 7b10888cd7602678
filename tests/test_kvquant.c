/* test_kvquant.c - KIVI-style K/V quantisation: every value within half a step of its group's
 * scale (the error budget), exact constant groups, 4-bit packing by hand, byte counts, and
 * the relative error on heavy-tailed data with outlier channels at 8 and 4 bits. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/kvquant.h"

#define STEP_SLACK 1.0001 /* |x - x_hat| <= scale/2 * STEP_SLACK + 1e-7 */

static uint32_t rs = 12345;
static float urand(void) { rs = rs * 1664525u + 1013904223u; return (float)(rs >> 8) / 16777216.0f * 2 - 1; }

/* Heavy-tailed rows with a few outlier channels, like real keys. */
static void fill(float *x, int n, int c) {
    for (int t = 0; t < n; t++)
        for (int i = 0; i < c; i++) {
            float v = urand() + 0.3f * urand() * urand() * 8;
            if (i % 17 == 3) v = v * 12 + 20; /* outlier channel */
            x[t * c + i] = v;
        }
}

Test(kvquant, per_token_error_is_within_half_a_step) {
    enum { N = 37, C = 192, G = 32 };
    static float x[N * C], y[N * C];
    static uint8_t codes[N * C];
    static uint16_t sc[N * C / G], mn[N * C / G];
    fill(x, N, C);
    for (int bits = 4; bits <= 8; bits += 4) {
        cr_assert(kvc_kvq_params_ok(bits, G, C));
        kvc_kvq_quant_tokens_cpu(x, N, C, G, bits, codes, sc, mn);
        kvc_kvq_dequant_tokens_cpu(codes, sc, mn, N, C, G, bits, y);
        double se = 0, sx = 0;
        for (int t = 0; t < N; t++)
            for (int i = 0; i < C; i++) {
                float s = kvc_f16_to_f32(sc[t * (C / G) + i / G]);
                float e = fabsf(x[t * C + i] - y[t * C + i]);
                cr_assert(e <= s / 2 * STEP_SLACK + 1e-7f, "%d bits: token %d ch %d err %g step %g", bits, t, i, e, s);
                se += (double)e * e;
                sx += (double)x[t * C + i] * x[t * C + i];
            }
        cr_log_info("per-token %d-bit relative error %.4f", bits, sqrt(se / sx));
        /* outlier channels share token groups here, which is why keys are quantised per channel */
        cr_expect(sqrt(se / sx) < (bits == 8 ? 0.01 : 0.15), "%d bits: rel err %g", bits, sqrt(se / sx));
    }
}

Test(kvquant, per_channel_error_is_within_half_a_step) {
    enum { GT = 64, C = 192 };
    static float x[GT * C], y[GT * C];
    static uint8_t codes[GT * C];
    uint16_t sc[C], mn[C];
    fill(x, GT, C);
    for (int bits = 4; bits <= 8; bits += 4) {
        kvc_kvq_quant_channels_cpu(x, GT, C, bits, codes, sc, mn);
        kvc_kvq_dequant_channels_cpu(codes, sc, mn, GT, C, bits, y);
        double se = 0, sx = 0;
        for (int t = 0; t < GT; t++)
            for (int i = 0; i < C; i++) {
                float s = kvc_f16_to_f32(sc[i]), e = fabsf(x[t * C + i] - y[t * C + i]);
                cr_assert(e <= s / 2 * STEP_SLACK + 1e-7f, "%d bits: token %d ch %d err %g step %g", bits, t, i, e, s);
                se += (double)e * e;
                sx += (double)x[t * C + i] * x[t * C + i];
            }
        cr_log_info("per-channel %d-bit relative error %.4f", bits, sqrt(se / sx));
        cr_expect(sqrt(se / sx) < (bits == 8 ? 0.005 : 0.08), "%d bits: rel err %g", bits, sqrt(se / sx));
    }
}

Test(kvquant, constant_groups_are_exact_and_packing_is_low_nibble_first) {
    float x[8] = {1.5f, 1.5f, 1.5f, 1.5f, 0.0f, 1.0f, 2.0f, 3.0f}, y[8];
    uint8_t codes[4];
    uint16_t sc[2], mn[2];
    kvc_kvq_quant_tokens_cpu(x, 1, 8, 4, 4, codes, sc, mn);
    kvc_kvq_dequant_tokens_cpu(codes, sc, mn, 1, 8, 4, 4, y);
    for (int i = 0; i < 4; i++) cr_expect_eq(y[i], 1.5f, "constant group must be exact");
    cr_expect_eq(kvc_f16_to_f32(sc[0]), 0.0f);
    /* group 2: min 0, span 3 over 15 steps: scale 0.2 (f16 rounded up), codes 0, 5, 10, 15 */
    cr_expect_eq(codes[2], (uint8_t)(0 | (5 << 4)), "codes[2] = 0x%02x", codes[2]);
    cr_expect_eq(codes[3], (uint8_t)(10 | (15 << 4)), "codes[3] = 0x%02x", codes[3]);
    for (int i = 4; i < 8; i++) cr_expect(fabsf(y[i] - x[i]) < 2e-3f, "%g vs %g", y[i], x[i]);
}

Test(kvquant, byte_counts_and_parameter_checks) {
    cr_expect_eq(kvc_kvq_code_bytes(8, 64), 64);
    cr_expect_eq(kvc_kvq_code_bytes(4, 64), 32);
    cr_expect_eq(kvc_kvq_code_bytes(4, 63), 32);
    cr_expect(kvc_kvq_params_ok(4, 32, 64));
    cr_expect(!kvc_kvq_params_ok(3, 32, 64));
    cr_expect(!kvc_kvq_params_ok(4, 0, 64));
    cr_expect(!kvc_kvq_params_ok(4, 32, 63));
}

#ifdef KVC_HAVE_CUDA
#include "kvc/backend.h"
#include "kvc/ops_cuda.h"

/* The CUDA twins use the same integer f16 rounding and IEEE division, so codes, scales and
 * minima must equal the CPU reference exactly. */
Test(kvquant, cuda_twins_match_the_cpu_exactly) {
    char why[256];
    if (!kvc_backend_cuda_available(why, sizeof why)) cr_skip_test("CUDA parity skipped: %s", why);
    enum { N = 300, C = 192, G = 32 };
    static float x[N * C];
    static uint8_t c1[N * C], c2[N * C];
    static uint16_t s1[N * C], s2[N * C], m1[N * C], m2[N * C];
    fill(x, N, C);
    kvc_err err = {{0}};
    for (int bits = 2; bits <= 8; bits *= 2) {
        size_t rb = kvc_kvq_code_bytes(bits, C);
        kvc_kvq_quant_tokens_cpu(x, N, C, G, bits, c1, s1, m1);
        cr_assert_eq(kvc_kvq_quant_tokens_cuda(x, N, C, G, bits, c2, s2, m2, &err), 0, "%s", err.msg);
        cr_expect_eq(memcmp(c1, c2, N * rb), 0, "per-token %d-bit codes differ", bits);
        cr_expect_eq(memcmp(s1, s2, N * (C / G) * 2), 0);
        cr_expect_eq(memcmp(m1, m2, N * (C / G) * 2), 0);
        kvc_kvq_quant_channels_cpu(x, 64, C, bits, c1, s1, m1);
        cr_assert_eq(kvc_kvq_quant_channels_cuda(x, 64, C, bits, c2, s2, m2, &err), 0, "%s", err.msg);
        cr_expect_eq(memcmp(c1, c2, 64 * rb), 0, "per-channel %d-bit codes differ", bits);
        cr_expect_eq(memcmp(s1, s2, C * 2), 0);
        cr_expect_eq(memcmp(m1, m2, C * 2), 0);
    }
}
#else
Test(kvquant, cuda_twins_match_the_cpu_exactly) { cr_skip_test("CUDA parity skipped: this build has no CUDA backend"); }
#endif
