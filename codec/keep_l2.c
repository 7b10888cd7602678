/* keep_l2.c - L2-norm retention (Devoto et al. 2024): keys with a small L2 norm tend to draw
 * the most attention, so the tokens whose keys have the largest norm are evicted. The norm is
 * taken of the exact post-RoPE key at append (RoPE is a rotation: the pre-RoPE norm is the
 * same) and kept, so a lossy representation does not change the choice. */
#include "kvc/kvcache.h"

#include <math.h>
#include <string.h>

/* State: one float per token, its key's norm. */
static int l2_init(kvc_keep *k, kvc_err *err) {
    (void)err;
    k->state_bytes = sizeof(float);
    k->needs_probs = 0;
    return 0;
}

/* No options of its own. */
static void l2_describe(const kvc_keep *k, char *buf, size_t size) {
    (void)k, (void)buf, (void)size;
}

/* Stores ||k|| of each new token (summed in double: D terms of mixed sizes). */
static void l2_on_append(kvc_keep *k, kvc_keep_view *v, int64_t first, const float *krot) {
    int d = k->shape.head_dim;
    for (int64_t t = first; t < v->n; t++) {
        const float *x = krot + (t - first) * d;
        double s = 0.0;
        for (int i = 0; i < d; i++) s += (double)x[i] * x[i];
        float nrm = (float)sqrt(s);
        memcpy(v->state + t * sizeof(float), &nrm, sizeof nrm);
    }
}

/* score = norm: the largest-norm key goes first. */
static void l2_score(kvc_keep *k, kvc_keep_view *v, float *score) {
    (void)k;
    for (int64_t t = 0; t < v->n; t++) memcpy(&score[t], v->state + t * sizeof(float), sizeof(float));
}

const kvc_keep_ops KVC_KEEP_L2 = {
    .name = "l2",
    .usage = "keep keys of low L2 norm, evict the largest (no options)",
    .option = NULL,
    .init = l2_init,
    .free = NULL,
    .describe = l2_describe,
    .on_append = l2_on_append,
    .on_attend = NULL, /* queries are not looked at */
    .score = l2_score,
};
