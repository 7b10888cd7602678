/* test_rand.h - the seeded random numbers several tests draw from (a 64-bit LCG, Box-Muller
 * normals), so each test file states only its seed: define TEST_RNG_SEED before including. */
#ifndef KVC_TEST_RAND_H
#define KVC_TEST_RAND_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef TEST_RNG_SEED
#define TEST_RNG_SEED 1
#endif

static uint64_t rs = TEST_RNG_SEED;

/* Standard normal. */
static inline float gauss(void) {
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    double u1 = ((rs >> 11) + 1.0) / 9007199254740993.0;
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    double u2 = (rs >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Uniform integer in [0, n). */
static inline int64_t urand(int64_t n) {
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return (int64_t)((rs >> 33) % (uint64_t)n);
}

/* n normals times scale, malloc'd (at least one element). */
static inline float *randn(size_t n, float scale) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    for (size_t i = 0; i < n; i++) a[i] = scale * gauss();
    return a;
}

#endif
