/* lsh.c - CPU reference of SimHash codes, Hamming distances and the eviction choice of
 * LSH-E (kvc/lsh.h). Projections come from a seeded generator so codes are reproducible. */
#include "kvc/lsh.h"

#include <math.h>
#include <stdlib.h>

#define LSH_TWO_PI 6.283185307179586

int kvc_simhash_init(kvc_simhash *h, int dim, int bits, uint64_t seed, kvc_err *err) {
    h->proj = NULL;
    if (bits < LSH_MIN_BITS || bits > LSH_MAX_BITS)
        return kvc_fail(err, "LSH bits must be in [%d, %d], got %d", LSH_MIN_BITS, LSH_MAX_BITS, bits);
    if (dim < 1) return kvc_fail(err, "LSH dimension must be >= 1");
    h->dim = dim;
    h->bits = bits;
    h->proj = malloc((size_t)dim * bits * sizeof(float));
    if (!h->proj) return kvc_fail(err, "out of memory");
    uint64_t s = seed;
    for (int i = 0; i < dim * bits; i += 2) { /* Box-Muller pairs */
        double u1 = ((double)(kvc_rng_next(&s) >> 11) + 1.0) / 9007199254740993.0, u2 = (double)(kvc_rng_next(&s) >> 11) / 9007199254740992.0;
        double r = sqrt(-2.0 * log(u1));
        h->proj[i] = (float)(r * cos(LSH_TWO_PI * u2));
        if (i + 1 < dim * bits) h->proj[i + 1] = (float)(r * sin(LSH_TWO_PI * u2));
    }
    return 0;
}

void kvc_simhash_free(kvc_simhash *h) {
    free(h->proj);
    h->proj = NULL;
}

void kvc_simhash_codes_cpu(const kvc_simhash *h, const float *x, int64_t ld, int64_t n, uint64_t *codes) {
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * ld;
        uint64_t c = 0;
        for (int j = 0; j < h->bits; j++) {
            const float *p = h->proj + (size_t)j * h->dim;
            float d = 0.0f; /* sequential sum: the CUDA twin adds in the same order */
            for (int k = 0; k < h->dim; k++) d += p[k] * xi[k];
            if (d >= 0.0f) c |= 1ull << j;
        }
        codes[i] = c;
    }
}

void kvc_hamming_cpu(const uint64_t *codes, int64_t n, uint64_t probe, uint8_t *dist) {
    for (int64_t i = 0; i < n; i++) dist[i] = (uint8_t)__builtin_popcountll(codes[i] ^ probe);
}

int64_t kvc_argmax_unprotected_cpu(const float *score, int64_t n, int64_t sinks, int64_t window) {
    int64_t best = -1;
    for (int64_t i = sinks; i < n - window; i++)
        if (best < 0 || score[i] > score[best]) best = i;
    return best;
}
