/* keep_h2o.c - H2O retention (heavy hitters): each token accumulates the softmax weight every
 * query gave it, and the tokens with the least accumulated attention are evicted. With GQA a
 * KV head serves G query heads: their weights are summed, as are all queries of every step.
 * A token starts at 0, so new tokens rely on the recent window until they earn weight. */
#include "kvc/kvcache.h"

#include <string.h>

/* State: one float per token, the accumulated weight. */
static int h2o_init(kvc_keep *k, kvc_err *err) {
    (void)err;
    k->state_bytes = sizeof(float);
    k->needs_probs = 1;
    return 0;
}

/* No options of its own. */
static void h2o_describe(const kvc_keep *k, char *buf, size_t size) {
    (void)k, (void)buf, (void)size;
}

/* acc[t] += sum over the step's queries and the group's G heads of probs[q, g, t]. */
static void h2o_on_attend(kvc_keep *k, kvc_keep_view *v, const float *qrot, const int32_t *qpos, int n_q,
                          const float *probs) {
    (void)qpos;
    (void)qrot;
    if (!probs) return; /* the cache honours needs_probs; be safe if it did not */
    int64_t rows = (int64_t)n_q * (k->shape.n_head / k->shape.n_head_kv);
    for (int64_t t = 0; t < v->n; t++) {
        float acc, s = 0.0f;
        for (int64_t r = 0; r < rows; r++) s += probs[r * v->n + t];
        memcpy(&acc, v->state + t * sizeof(float), sizeof acc);
        acc += s;
        memcpy(v->state + t * sizeof(float), &acc, sizeof acc);
    }
}

/* score = -accumulated weight: the least attended token is evicted first. */
static void h2o_score(kvc_keep *k, kvc_keep_view *v, float *score) {
    (void)k;
    for (int64_t t = 0; t < v->n; t++) {
        float acc;
        memcpy(&acc, v->state + t * sizeof(float), sizeof acc);
        score[t] = -acc;
    }
}

const kvc_keep_ops KVC_KEEP_H2O = {
    .name = "h2o",
    .usage = "H2O: keep the tokens with the most accumulated attention (no options)",
    .option = NULL,
    .init = h2o_init,
    .free = NULL,
    .describe = h2o_describe,
    .on_append = NULL, /* new tokens start at 0: the cache zeroes their state */
    .on_attend = h2o_on_attend,
    .score = h2o_score,
};
