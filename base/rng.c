/* rng.c - SplitMix64, the one seeded generator of kvcodec: the sampler, weight
 * initialisation, dataset shuffling, random eviction, passkey prompts and SimHash
 * projections all draw from it, so a seed means the same stream everywhere. */
#include "kvc/common.h"

uint64_t kvc_rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t kvc_mix64(uint64_t x) { return kvc_rng_next(&x); }

float kvc_rng_unit(uint64_t *state) { return (float)(kvc_rng_next(state) >> 40) / 16777216.0f; }

uint64_t kvc_rng_below(uint64_t *state, uint64_t n) {
    uint64_t lim = UINT64_MAX - UINT64_MAX % n, r;
    do r = kvc_rng_next(state);
    while (r >= lim);
    return r % n;
}
