/* keep_random.c - random retention, the floor every informed policy must beat: each step
 * every held token gets a fresh uniform score and the highest go. Scores come from a
 * counter-based hash of (seed, layer, head, step, position), so a run is reproducible for a
 * given seed whatever order (or thread) the cache scores its heads in. */
#include "kvc/kvcache.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct {
    uint64_t *steps; /* (L * K) score calls so far per (layer, kv head) */
} keep_random;

/* Allocates the per-head step counters; no per-token state. */
static int random_init(kvc_keep *k, kvc_err *err) {
    keep_random *r = calloc(1, sizeof *r);
    size_t heads = (size_t)(k->shape.n_layer > 0 ? k->shape.n_layer : 1) * (k->shape.n_head_kv > 0 ? k->shape.n_head_kv : 1);
    if (r) r->steps = calloc(heads, sizeof *r->steps);
    if (!r || !r->steps) {
        if (r) free(r);
        return kvc_fail(err, "out of memory");
    }
    k->impl = r;
    k->state_bytes = 0;
    k->needs_probs = 0;
    return 0;
}

/* Frees the counters. */
static void random_free(kvc_keep *k) {
    keep_random *r = k->impl;
    if (r) free(r->steps);
    free(r);
    k->impl = NULL;
}

/* The seed is what makes a random run repeatable, so it is part of the description. */
static void random_describe(const kvc_keep *k, char *buf, size_t size) {
    snprintf(buf, size, "seed=%llu", (unsigned long long)k->seed);
}

/* score[t] uniform in [0, 1) (24 bits, exact in a float), fresh every call; advances this
 * head's step counter. */
static void random_score(kvc_keep *k, kvc_keep_view *v, float *score) {
    keep_random *r = k->impl;
    uint64_t *step = &r->steps[(size_t)v->layer * k->shape.n_head_kv + v->head];
    uint64_t base = kvc_mix64(k->seed ^ kvc_mix64(((uint64_t)v->layer << 32) ^ (uint64_t)v->head ^ kvc_mix64(*step)));
    (*step)++;
    for (int64_t t = 0; t < v->n; t++) score[t] = (float)(kvc_mix64(base ^ (uint64_t)(uint32_t)v->pos[t]) >> 40) * 0x1p-24f;
}

const kvc_keep_ops KVC_KEEP_RANDOM = {
    .name = "random",
    .usage = "evict uniformly at random (the floor); seed=N makes it repeatable",
    .option = NULL,
    .init = random_init,
    .free = random_free,
    .describe = random_describe,
    .on_append = NULL, /* keys and queries are not looked at */
    .on_attend = NULL,
    .score = random_score,
};
