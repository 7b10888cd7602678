/* keep_util.h - pieces several retention policies share (private to codec/): the runs of
 * query positions a (layer, kv head) has seen, so a token's score can be normalised by the
 * number of queries that could see it (ObservedAttention's mean instead of H2O's sum); a ring
 * of the last W queries or probes (SnapKV's observation window); pooling of scores over
 * neighbouring tokens (SnapKV's smoothing). */
#ifndef KVC_KEEP_UTIL_H
#define KVC_KEEP_UTIL_H

#include "kvc/kvcache.h"

/* Query positions seen, as merged runs [lo, hi]. */
typedef struct {
    int32_t *lo, *hi; /* (cap) */
    int n, cap;
} kvc_qruns;

/* Records queries at positions qpos (n_q, ascending); 0, or -1 when out of memory. */
int kvc_qruns_add(kvc_qruns *r, const int32_t *qpos, int n_q);
/* How many recorded queries sit at a position >= p (they could see a token at p). */
int64_t kvc_qruns_count(const kvc_qruns *r, int32_t p);
void kvc_qruns_free(kvc_qruns *r);

/* The last `cap` items of `width` floats and their positions, oldest first when read. */
typedef struct {
    float *x;       /* (cap, width) */
    int32_t *pos;   /* (cap) */
    int cap, width, n, head; /* head: slot of the oldest */
} kvc_ring;

/* An empty ring; -1 when out of memory (cap, width >= 1). */
int kvc_ring_init(kvc_ring *r, int cap, int width);
void kvc_ring_free(kvc_ring *r);
/* Pushes one item (dropping the oldest when full). */
void kvc_ring_push(kvc_ring *r, const float *x, int32_t pos);
/* Item i (0 = oldest held) and its position. */
const float *kvc_ring_at(const kvc_ring *r, int i, int32_t *pos);

/* Pools x (n) in place over windows of k neighbours (k odd; 1: nothing): the maximum, or the
 * mean with the window's missing neighbours at the ends counted as 0 (avg_pool1d with zero
 * padding). tmp: n floats of scratch. */
void kvc_pool_scores(float *x, int64_t n, int k, int use_max, float *tmp);

#endif
