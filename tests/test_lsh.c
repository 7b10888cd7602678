/* test_lsh.c - SimHash codes estimate angles (E[d]/b = angle/pi), sharper with more bits;
 * codes are reproducible from the seed; Hamming distances and the protected arg-max by hand;
 * bad bit counts rejected; CUDA twins equal the CPU bit for bit where a GPU exists. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/lsh.h"

#define TEST_RNG_SEED 99
#include "test_rand.h"

#define PI_D 3.141592653589793
#define ANGLE_TOL 0.03 /* |mean d/b - angle/pi| over 400 pairs at b = 64 */

/* Fills x and y (D) with unit vectors at angle theta. */
static void pair_at(float *x, float *y, int d, double theta) {
    float z[256];
    double nx = 0, dot = 0, nz = 0;
    for (int i = 0; i < d; i++) { x[i] = gauss(); z[i] = gauss(); nx += x[i] * x[i]; }
    for (int i = 0; i < d; i++) x[i] /= (float)sqrt(nx);
    for (int i = 0; i < d; i++) dot += z[i] * x[i];
    for (int i = 0; i < d; i++) { z[i] -= (float)dot * x[i]; nz += z[i] * z[i]; }
    for (int i = 0; i < d; i++) y[i] = (float)(cos(theta) * x[i] + sin(theta) * z[i] / sqrt(nz));
}

/* Mean |d/b - angle/pi| over pairs at several angles, for b bits. */
static double angle_error(int bits, uint64_t seed) {
    enum { D = 64, PAIRS = 400 };
    kvc_simhash h;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_simhash_init(&h, D, bits, seed, &err), 0, "%s", err.msg);
    const double angles[4] = {0.2, 0.8, 1.6, 2.6};
    double total = 0;
    for (int a = 0; a < 4; a++) {
        double mean = 0;
        for (int p = 0; p < PAIRS; p++) {
            float xy[2 * D];
            uint64_t c[2];
            pair_at(xy, xy + D, D, angles[a]);
            kvc_simhash_codes_cpu(&h, xy, D, 2, c);
            mean += __builtin_popcountll(c[0] ^ c[1]) / (double)bits;
        }
        mean /= PAIRS;
        if (bits == 64) cr_expect(fabs(mean - angles[a] / PI_D) < ANGLE_TOL, "angle %.1f: mean d/b %.4f, expected %.4f",
                                  angles[a], mean, angles[a] / PI_D);
        /* per-pair error shrinks with b: measure it on single pairs */
        for (int p = 0; p < PAIRS; p++) {
            float xy[2 * D];
            uint64_t c[2];
            pair_at(xy, xy + D, D, angles[a]);
            kvc_simhash_codes_cpu(&h, xy, D, 2, c);
            total += fabs(__builtin_popcountll(c[0] ^ c[1]) / (double)bits - angles[a] / PI_D);
        }
    }
    kvc_simhash_free(&h);
    return total / (4 * PAIRS);
}

Test(lsh, hamming_estimates_the_angle_and_sharpens_with_more_bits) {
    double e8 = angle_error(8, 1), e16 = angle_error(16, 1), e64 = angle_error(64, 1);
    cr_log_info("mean |d/b - angle/pi| per pair: 8 bits %.4f, 16 bits %.4f, 64 bits %.4f", e8, e16, e64);
    cr_expect(e64 < e16 && e16 < e8, "error should fall with bits: %g %g %g", e8, e16, e64);
}

Test(lsh, codes_are_reproducible_and_negation_flips_every_bit) {
    enum { D = 64, N = 50 };
    float x[N * D], nx[N * D];
    for (int i = 0; i < N * D; i++) { x[i] = gauss(); nx[i] = -x[i]; }
    kvc_simhash a, b, c;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_simhash_init(&a, D, 16, 7, &err), 0);
    cr_assert_eq(kvc_simhash_init(&b, D, 16, 7, &err), 0);
    cr_assert_eq(kvc_simhash_init(&c, D, 16, 8, &err), 0);
    uint64_t ca[N], cb[N], cc[N], cn[N];
    kvc_simhash_codes_cpu(&a, x, D, N, ca);
    kvc_simhash_codes_cpu(&b, x, D, N, cb);
    kvc_simhash_codes_cpu(&c, x, D, N, cc);
    kvc_simhash_codes_cpu(&a, nx, D, N, cn);
    cr_expect_eq(memcmp(ca, cb, sizeof ca), 0, "same seed, same codes");
    cr_expect_neq(memcmp(ca, cc, sizeof ca), 0, "another seed, other codes");
    for (int i = 0; i < N; i++) {
        cr_expect_eq(ca[i] >> 16, 0, "only the low 16 bits may be set");
        cr_expect_eq(ca[i] ^ cn[i], 0xFFFFull, "row %d: -x must flip every bit", i);
    }
    kvc_simhash_free(&a); kvc_simhash_free(&b); kvc_simhash_free(&c);
}

Test(lsh, hamming_and_protected_argmax_by_hand) {
    uint64_t codes[4] = {0x0, 0xF, 0xFF00000000000000ull, 0x5};
    uint8_t d[4];
    kvc_hamming_cpu(codes, 4, 0x1, d);
    cr_expect(d[0] == 1 && d[1] == 3 && d[2] == 9 && d[3] == 1);
    float s[8] = {9, 9, 1, 5, 5, 2, 9, 9};
    cr_expect_eq(kvc_argmax_unprotected_cpu(s, 8, 2, 2), 3, "sinks 0-1 and window 6-7 protected; tie goes to the oldest");
    cr_expect_eq(kvc_argmax_unprotected_cpu(s, 8, 0, 0), 0);
    cr_expect_eq(kvc_argmax_unprotected_cpu(s, 8, 4, 4), -1, "nothing eligible");
}

Test(lsh, rejects_bad_bit_counts) {
    kvc_simhash h;
    kvc_err err = {{0}};
    cr_expect_eq(kvc_simhash_init(&h, 64, 3, 1, &err), -1);
    cr_expect(strstr(err.msg, "[4, 64]") != NULL, "%s", err.msg);
    cr_expect_eq(kvc_simhash_init(&h, 64, 65, 1, &err), -1);
    cr_expect_eq(kvc_simhash_init(&h, 0, 16, 1, &err), -1);
}

#ifdef KVC_HAVE_CUDA
#include "kvc/backend.h"
#include "kvc/ops_cuda.h"

/* Same sequential, unfused sums on both sides: codes must be identical. */
Test(lsh, cuda_twins_match_the_cpu_exactly) {
    char why[256];
    if (!kvc_backend_cuda_available(why, sizeof why)) cr_skip_test("CUDA parity skipped: %s", why);
    enum { D = 64, N = 1000, LD = 3 * 64 };
    static float x[N * LD];
    for (int i = 0; i < N * LD; i++) x[i] = gauss();
    kvc_simhash h;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_simhash_init(&h, D, 64, 3, &err), 0);
    static uint64_t c1[N], c2[N];
    static uint8_t d1[N], d2[N];
    kvc_simhash_codes_cpu(&h, x + D, LD, N, c1); /* head 1 of (N, 3, D) rows */
    cr_assert_eq(kvc_simhash_codes_cuda(h.proj, D, 64, x + D, LD, N, c2, &err), 0, "%s", err.msg);
    cr_expect_eq(memcmp(c1, c2, sizeof c1), 0, "SimHash codes differ");
    kvc_hamming_cpu(c1, N, c1[7], d1);
    cr_assert_eq(kvc_hamming_cuda(c1, N, c1[7], d2, &err), 0, "%s", err.msg);
    cr_expect_eq(memcmp(d1, d2, sizeof d1), 0);
    kvc_simhash_free(&h);
}
#else
Test(lsh, cuda_twins_match_the_cpu_exactly) { cr_skip_test("CUDA parity skipped: this build has no CUDA backend"); }
#endif
