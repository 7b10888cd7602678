/* sampler.c - greedy and temperature/top-p sampling with a seeded xorshift generator, so a
 * given seed reproduces the same text. */
#include "kvc/sampler.h"

#include <math.h>
#include <stdlib.h>

int32_t kvc_argmax_f32(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

int kvc_sampler_init(kvc_sampler *s, int n_vocab, float temperature, float top_p, uint64_t seed, kvc_err *err) {
    if (!(top_p > 0.0f && top_p <= 1.0f)) return kvc_fail(err, "top-p must be in (0, 1], got %g", top_p);
    if (!(temperature >= 0.0f) || !isfinite(temperature)) return kvc_fail(err, "temperature must be >= 0");
    s->temperature = temperature;
    s->top_p = top_p;
    s->rng = seed;
    s->n_vocab = n_vocab;
    s->idx = malloc((size_t)n_vocab * sizeof *s->idx);
    s->prob = malloc((size_t)n_vocab * sizeof *s->prob);
    if (!s->idx || !s->prob) {
        kvc_sampler_free(s);
        return kvc_fail(err, "out of memory");
    }
    return 0;
}

void kvc_sampler_free(kvc_sampler *s) {
    free(s->idx);
    free(s->prob);
    s->idx = NULL;
    s->prob = NULL;
}

static const float *g_prob; /* qsort comparator context (sampling is single-threaded) */
static int cmp_desc(const void *a, const void *b) {
    float pa = g_prob[*(const int32_t *)a], pb = g_prob[*(const int32_t *)b];
    return pa < pb ? 1 : pa > pb ? -1 : (*(const int32_t *)a - *(const int32_t *)b);
}

int32_t kvc_sampler_sample(kvc_sampler *s, const float *logits) {
    const int V = s->n_vocab;
    if (s->temperature <= 0.0f) return kvc_argmax_f32(logits, V);
    float mx = logits[kvc_argmax_f32(logits, V)];
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        s->prob[i] = expf((logits[i] - mx) / s->temperature);
        sum += s->prob[i];
    }
    for (int i = 0; i < V; i++) s->prob[i] = (float)(s->prob[i] / sum);
    /* candidates above a cutoff that cannot be in the nucleus are dropped before sorting */
    int n = 0;
    float cut = s->top_p < 1.0f ? (1.0f - s->top_p) / (float)(V - 1) : 0.0f;
    for (int i = 0; i < V; i++)
        if (s->prob[i] >= cut) s->idx[n++] = i;
    g_prob = s->prob;
    qsort(s->idx, (size_t)n, sizeof *s->idx, cmp_desc);
    double mass = 0.0;
    int keep = n;
    for (int i = 0; i < n; i++) {
        mass += s->prob[s->idx[i]];
        if (mass >= s->top_p) { keep = i + 1; break; }
    }
    float r = kvc_rng_unit(&s->rng) * (float)mass;
    double acc = 0.0;
    for (int i = 0; i < keep; i++) {
        acc += s->prob[s->idx[i]];
        if (r < acc) return s->idx[i];
    }
    return s->idx[keep - 1];
}
