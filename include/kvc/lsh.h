/* lsh.h - SimHash codes for LSH-driven eviction (LSH-E): b fixed Gaussian projections turn a
 * vector into b sign bits, and the Hamming distance between two codes estimates the angle
 * between the vectors (E[d] = b * angle / pi), a cheap stand-in for attention. The CPU code
 * is the reference; kernels/cuda/lsh_cuda.cu holds the CUDA twins. Letters: N vectors, D dim. */
#ifndef KVC_LSH_H
#define KVC_LSH_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LSH_MIN_BITS 4
#define LSH_MAX_BITS 64

typedef struct {
    int dim, bits;
    float *proj; /* (bits, dim) standard normal entries, fixed by the seed */
} kvc_simhash;

/* Draws the projections from seed; -1 with err when bits is outside [4, 64] or dim < 1. */
int kvc_simhash_init(kvc_simhash *h, int dim, int bits, uint64_t seed, kvc_err *err);
void kvc_simhash_free(kvc_simhash *h);

/* codes[i] bit j = 1 when proj_j . x_i >= 0, for x (N, D) rows `ld` floats apart. */
void kvc_simhash_codes_cpu(const kvc_simhash *h, const float *x, int64_t ld, int64_t n, uint64_t *codes);
/* dist[i] = popcount(codes[i] ^ probe). */
void kvc_hamming_cpu(const uint64_t *codes, int64_t n, uint64_t probe, uint8_t *dist);
/* The index in [0, n) with the largest score outside the protected prefix [0, sinks) and
 * suffix [n - window, n); ties go to the oldest. -1 when nothing is eligible. */
int64_t kvc_argmax_unprotected_cpu(const float *score, int64_t n, int64_t sinks, int64_t window);

#ifdef __cplusplus
}
#endif
#endif
