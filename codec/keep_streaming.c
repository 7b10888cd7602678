/* keep_streaming.c - StreamingLLM retention: the attention sinks plus the most recent tokens.
 * The score is minus the position, so the oldest token outside the sinks goes first. The
 * common window (default 10) is accepted but does not change what is kept as long as the
 * budget holds sinks + window tokens (the registry checks that for token budgets): the
 * newest tokens are the last candidates anyway. */
#include "kvc/kvcache.h"

/* No per-token state: positions are all it needs, and the view carries them. */
static int streaming_init(kvc_keep *k, kvc_err *err) {
    (void)err;
    k->state_bytes = 0;
    k->needs_probs = 0;
    return 0;
}

/* No options of its own. */
static void streaming_describe(const kvc_keep *k, char *buf, size_t size) {
    (void)k, (void)buf, (void)size;
}

/* score = -position: older is higher, so evicted first. Beyond 2^24 positions nearby
 * scores may round equal; the select's tie rule (oldest first) keeps the order exact. */
static void streaming_score(kvc_keep *k, kvc_keep_view *v, float *score) {
    (void)k;
    for (int64_t i = 0; i < v->n; i++) score[i] = -(float)v->pos[i];
}

const kvc_keep_ops KVC_KEEP_STREAMING = {
    .name = "streaming",
    .usage = "StreamingLLM: keep the sinks and the newest tokens, evict the oldest (no options)",
    .option = NULL,
    .init = streaming_init,
    .free = NULL,
    .describe = streaming_describe,
    .on_append = NULL, /* keys and queries are not looked at: NULL spares the cache the work */
    .on_attend = NULL,
    .score = streaming_score,
};
