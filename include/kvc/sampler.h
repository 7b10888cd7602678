/* sampler.h - picks the next token from logits: greedy, or temperature + top-p with a seed. */
#ifndef KVC_SAMPLER_H
#define KVC_SAMPLER_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    float temperature; /* <= 0: greedy (argmax) */
    float top_p;       /* nucleus mass in (0, 1]; 1 keeps every token */
    uint64_t rng;      /* state of the generator, seeded by kvc_sampler_init */
    int n_vocab;
    int32_t *idx;      /* (V) scratch */
    float *prob;       /* (V) scratch */
} kvc_sampler;

int kvc_sampler_init(kvc_sampler *s, int n_vocab, float temperature, float top_p, uint64_t seed, kvc_err *err);
void kvc_sampler_free(kvc_sampler *s);
/* Returns the chosen token id for one row of V logits (logits are not modified). */
int32_t kvc_sampler_sample(kvc_sampler *s, const float *logits);
/* Index of the largest value (first on ties). */
int32_t kvc_argmax_f32(const float *x, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
