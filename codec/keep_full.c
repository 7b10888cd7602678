/* keep_full.c - the "full" retention policy: every token stays. It is the baseline every
 * evicting policy is measured against, so it holds no state and never asks for scores
 * (k->evicts is 0; the registry refuses budget, sinks and window for it). */
#include "kvc/kvcache.h"

/* Nothing to build: no per-token state, no attention weights needed. */
static int full_init(kvc_keep *k, kvc_err *err) {
    (void)err;
    k->state_bytes = 0;
    k->needs_probs = 0;
    return 0;
}

/* No options of its own: writes nothing. */
static void full_describe(const kvc_keep *k, char *buf, size_t size) {
    (void)k, (void)buf, (void)size;
}

const kvc_keep_ops KVC_KEEP_FULL = {
    .name = "full",
    .usage = "keep every token (no options; the baseline)",
    .option = NULL,
    .init = full_init,
    .free = NULL,
    .describe = full_describe,
    .on_append = NULL, /* keys, queries and scores are never needed (k->evicts is 0), and */
    .on_attend = NULL, /* NULL hooks spare the cache the RoPE and gathering it does for them */
    .score = NULL,
};
