/* sidestore.h - where evicted tokens go when a cache retrieves them back (keep option
 * retrieve=R): per (layer, kv head) their K/V quantised KIVI-style (int4 or int8: keys per
 * channel in blocks of up to 32 tokens evicted together, values per token in groups of 32),
 * their positions, and SimHash codes of their keys after RoPE as the index. A query's code
 * finds the nearest codes (optionally re-ranked by the true logit), and those tokens are
 * decoded for that query's attention only. Rows live in RAM or, with spill=DIR, in an
 * unlinked temporary file (the index stays in RAM); both are counted apart from bytes().
 * Letters: L layers, K kv heads, G query heads per kv head, D head_dim, M tokens stored. */
#ifndef KVC_SIDESTORE_H
#define KVC_SIDESTORE_H

#include "kvc/kernels.h"
#include "kvc/kvcache.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_RETRIEVE_MAX 1024 /* retrieve=R: at most this many tokens per query and kv head */
#define KVC_SIDE_BLOCK 32     /* keys quantised per channel over blocks of this many tokens */

typedef struct kvc_side kvc_side;

/* An empty store for L layers x K kv heads of G query heads and head_dim D (even, >= 32
 * and a multiple of 32). With o->spill set, creates an unlinked temporary file in that
 * directory. NULL with err on bad options, a directory that cannot be written, or no memory. */
kvc_side *kvc_side_new(int n_layer, int n_kv, int g, int d, const kvc_keep_retrieval *o, kvc_err *err);
void kvc_side_free(kvc_side *s);
/* Forgets every token (a new sequence); the spill file is truncated. */
void kvc_side_reset(kvc_side *s);

/* Adds n evicted tokens of (layer, head): keys before RoPE k (n, D), the same after RoPE
 * krot (n, D, for the index), values v (n, D), positions pos (n). 0, or -1 with err when
 * out of memory or the spill file cannot be written (disk full). */
int kvc_side_add(kvc_side *s, int layer, int head, const float *k, const float *krot, const float *v,
                 const int32_t *pos, int n, kvc_err *err);

/* Tokens held for (layer, head). */
int64_t kvc_side_count(const kvc_side *s, int layer, int head);

/* For one query (its G heads qg (G, D) after RoPE, at position qpos) finds up to R stored
 * tokens of (layer, head) visible to it (position <= qpos): the nearest codes by Hamming
 * distance (to the code of the heads' mean, or the least over each head's code with
 * rprobe=each); with rerank=C the C*R nearest are re-ranked by max_g qg[g] . key. Writes
 * their keys after RoPE (rope: a table covering their positions) to krot (R, D), values to
 * v (R, D) and positions to pos (R), oldest first. Safe to call for different heads at once.
 * Returns the count, or -1 with err when the spill file cannot be read. */
int kvc_side_retrieve(kvc_side *s, int layer, int head, const float *qg, int32_t qpos, const kvc_rope_table *rope,
                      float *krot, float *v, int32_t *pos, kvc_err *err);

/* Bytes held in RAM (codes, positions, key block scales, and the rows unless spilled) and
 * written to disk (the spill file's rows). */
size_t kvc_side_ram_bytes(const kvc_side *s);
size_t kvc_side_disk_bytes(const kvc_side *s);
/* Tokens held over every (layer, head), and retrievals (tokens returned) since the reset. */
int64_t kvc_side_tokens(const kvc_side *s);
int64_t kvc_side_retrieved(const kvc_side *s);

#ifdef __cplusplus
}
#endif
#endif
