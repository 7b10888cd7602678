/* cache.h - the KV cache interface every attention layer goes through (DESIGN.md §3).
 * Attention never touches K/V memory directly: layers append new tokens' keys (before
 * RoPE) and values with their positions, then ask the cache to attend. A cache is a
 * representation x a retention policy; this header is the contract they all keep. */
#ifndef KVC_CACHE_H
#define KVC_CACHE_H

#include "kvc/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Shape of the model the cache serves. */
typedef struct {
    int n_layer;
    int n_head;      /* query heads */
    int n_head_kv;   /* key/value heads (GQA: n_head % n_head_kv == 0) */
    int head_dim;
    float rope_base; /* RoPE frequency base; rotation on adjacent pairs (GGUF layout) */
    int max_tokens;  /* capacity in tokens per layer the caller may append */
} kvc_cache_shape;

typedef struct kvc_cache kvc_cache;

/* The operations a cache implementation provides. Shapes (per call):
 *   k, v : (n, n_head_kv, head_dim)  keys before RoPE, values
 *   q    : (n_q, n_head, head_dim)   queries after RoPE
 *   out  : (n_q, n_head, head_dim)
 *   pos  : (n) / (n_q) absolute token positions */
typedef struct {
    const char *name;
    int (*append)(kvc_cache *c, int layer, const float *k, const float *v,
                  const int32_t *pos, int n, kvc_err *err);
    int (*attend)(kvc_cache *c, int layer, const float *q, const int32_t *pos, int n_q,
                  float *out, kvc_err *err);
    int (*end_step)(kvc_cache *c, kvc_err *err);
    size_t (*bytes)(const kvc_cache *c);
    int64_t (*n_tokens)(const kvc_cache *c, int layer);
    void (*reset)(kvc_cache *c);
    void (*free)(kvc_cache *c);
    /* Optional (NULL: the cache never evicts). See kvc_cache_set_budget. */
    int (*set_budget)(kvc_cache *c, int64_t ref_tokens, kvc_err *err);
    /* Optional: tokens appended since reset, tokens held and evicted summed over every
     * (layer, kv head) (NULL: held = appended x layers x kv heads, nothing evicted). */
    void (*stats)(const kvc_cache *c, int64_t *appended, int64_t *held, int64_t *evicted);
    /* Optional: a canonical one-line description ("repr=... keep=..."; NULL: the name). */
    const char *(*describe)(const kvc_cache *c);
} kvc_cache_ops;

struct kvc_cache {
    const kvc_cache_ops *ops;
    kvc_cache_shape shape;
    int n_threads;
    const kvc_backend *backend; /* where attention and RoPE run; NULL: the CPU */
    void *impl;
};

/* Creates the full-precision (f32) cache with room for shape->max_tokens per layer. */
kvc_cache *kvc_cache_full_new(const kvc_cache_shape *shape, kvc_err *err);

/* Thin dispatchers (check arguments, then call ops). Each returns 0 or -1 with err.
 * append: the keys/values of n new tokens for one layer.
 * attend: causal attention of n_q queries over everything the layer holds whose position
 *         is <= the query's position; softmax scale 1/sqrt(head_dim).
 * end_step: called once after all layers processed a step (where policies evict). */
int kvc_cache_append(kvc_cache *c, int layer, const float *k, const float *v,
                 const int32_t *pos, int n, kvc_err *err);
int kvc_cache_attend(kvc_cache *c, int layer, const float *q, const int32_t *pos, int n_q,
                 float *out, kvc_err *err);
int kvc_cache_end_step(kvc_cache *c, kvc_err *err);
size_t kvc_cache_bytes(const kvc_cache *c);           /* bytes really held, side data included */
int64_t kvc_cache_n_tokens(const kvc_cache *c, int layer);
void kvc_cache_reset(kvc_cache *c);                   /* drop all tokens, keep allocations */
/* Eviction control for measuring protocols. ref_tokens >= 1: from the next end_step on, the
 * retention policy evicts down to its budget, a fraction budget being taken of ref_tokens;
 * ref_tokens < 0: hold every token (no eviction) until set again (prefill before a one-shot
 * compression, or a frozen cache after it). -1 with err when the budget does not fit (smaller
 * than sinks + window). A no-op returning 0 on caches that never evict. */
int kvc_cache_set_budget(kvc_cache *c, int64_t ref_tokens, kvc_err *err);
void kvc_cache_free(kvc_cache *c);
/* Runs the cache's hot paths (RoPE on read, attention) on backend be (kvc_backend_find);
 * NULL: the CPU. The held data stay in host memory either way. */
void kvc_cache_set_backend(kvc_cache *c, const kvc_backend *be);
/* The backend a cache runs on (never NULL). */
const kvc_backend *kvc_cache_backend(const kvc_cache *c);

#ifdef __cplusplus
}
#endif
#endif
