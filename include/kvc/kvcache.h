/* kvcache.h - the compressed KV cache (DESIGN.md §3): a *representation* (how one token's K or
 * V row of one KV head is stored and read back) times a *retention* policy (which tokens stay
 * under a budget), composed by codec/kvcache.c behind the kvc_cache interface of cache.h.
 * Each plug-in is one small struct of function pointers in its own file (codec/repr_*.c,
 * codec/keep_*.c), listed once in codec/registry.c.
 * Letters: L layers, K kv heads, G = H/K query heads per kv head, D head_dim, T tokens held by
 * one (layer, kv head), N rows in a call, R latent size. kind: KV_K (0) or KV_V (1). */
#ifndef KVC_KVCACHE_H
#define KVC_KVCACHE_H

#include "kvc/cache.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================= creation ==== */

/* Builds a cache from two specs (both "name" or "name:opt,opt=val,..."):
 *   repr: f32 | f16 | int8[:group=G,kgroup=T] | int4[:...] | ae:FILE[,f16|int8|int4][,reuse=on|off]
 *         | tc:FILE[,sinks=S] (a transform codec: every layer holds the same tokens)
 *   keep: full | streaming | h2o | l2 | random | lsh | observed | snapkv | tova, with budget=N|F
 *         (tokens, or a fraction 0<F<=1 of the reference length set by kvc_cache_set_budget),
 *         sinks=S, window=W, share=head|layer|global, floor=F, the retrieval options
 *         (kvc_keep_retrieval) and the policy's own options.
 * fingerprint: the model's (kvc_model.fingerprint), checked against a codec checkpoint; may be
 * NULL when the representation needs none. NULL with err on an unknown name, a bad option or
 * a codec for another model. */
kvc_cache *kvc_kvcache_new(const kvc_cache_shape *shape, const char *repr, const char *keep,
                       const char *fingerprint, kvc_err *err);
/* The transform-coded cache (codec/tc_cache.c) kvc_kvcache_new builds for repr "tc:OPTS":
 * OPTS = FILE[,sinks=S] names a transform codec (kvc/tc.h). */
kvc_cache *kvc_tccache_new(const kvc_cache_shape *shape, const char *opts, const char *keep,
                           const char *fingerprint, kvc_err *err);
/* Prints every representation and policy with its options (for --help). */
void kvc_kvcache_list(void *fp /* FILE * */);
/* The canonical one-line description of a cache ("repr=int8:group=32 keep=lsh:bits=16,...").*/
const char *kvc_kvcache_describe(const kvc_cache *c);

/* Counters for measures: tokens appended since the last reset and tokens held, summed over
 * every (layer, kv head), so held / (appended * L * K) is the kept fraction. */
typedef struct {
    int64_t appended;  /* tokens appended per layer since reset (the same for every layer) */
    int64_t held;      /* sum over (layer, kv head) of tokens held */
    int64_t evicted;   /* sum over (layer, kv head) of tokens evicted since reset */
    size_t bytes;      /* kvc_cache_bytes() */
    /* The retrieval side store (keep option retrieve=R), counted apart from bytes: */
    int64_t side_tokens;    /* sum over (layer, kv head) of evicted tokens it holds */
    size_t side_ram_bytes;  /* its index (codes, positions, key block scales) and, unless
                               spilled, its rows */
    size_t side_disk_bytes; /* rows written to its spill file (spill=DIR), else 0 */
    int64_t retrieved;      /* (query, layer, kv head) retrievals since reset, summed tokens */
} kvcache_stats;
void kvc_kvcache_get_stats(const kvc_cache *c, kvcache_stats *st);

/* The policy sees one layer's queries (and, when it asks, their softmax weights over the held
 * tokens) without an attention output being needed: what a cache hears when another cache
 * computes the layer (eval's shared prefill). Attention is computed only for a policy that
 * needs the weights. 0 or -1 with err. A no-op on caches that are not compressed caches. */
int kvc_kvcache_observe(kvc_cache *c, int layer, const float *q, const int32_t *pos, int n_q, kvc_err *err);

/* ================================================================ representations ==== */

typedef struct kvc_repr kvc_repr;

/* What a representation may consult when it is built. */
typedef struct {
    kvc_cache_shape shape;
    const char *fingerprint; /* may be NULL */
} kvc_repr_env;

typedef struct {
    const char *name;  /* as written in a spec: "f16" */
    const char *usage; /* one line: its options and what it stores */
    /* Parses opts (the text after "name:", or NULL) and builds state in r->impl. -1 with err
     * on a bad option, a file that cannot be read, or a codec that does not fit env. */
    int (*init)(kvc_repr *r, const char *opts, const kvc_repr_env *env, kvc_err *err);
    void (*free)(kvc_repr *r);
    /* Bytes of one stored row of (layer, head, kind); 0 when nothing is stored for it
     * because it is predicted from layer - 1 (see reused). */
    size_t (*row_bytes)(const kvc_repr *r, int layer, int head, int kind);
    /* Rows quantised together (KIVI per-channel key groups): the cache hands encode blocks
     * of exactly this many rows and keeps rows exact (f32, counted at 4 bytes a value) until
     * a block fills. 1 for per-token forms. */
    int (*block_rows)(const kvc_repr *r, int kind);
    /* Bytes of one block's shared data (scales and minimums); 0 for per-token forms. */
    size_t (*block_bytes)(const kvc_repr *r, int layer, int head, int kind);
    /* Encodes n rows (x: n rows of D floats, ldx floats apart; keys before RoPE) into
     * rows (n * row_bytes) and the block's shared data blk (NULL when block_bytes is 0).
     * n == block_rows(kind). */
    void (*encode)(const kvc_repr *r, int layer, int head, int kind, const float *x, int64_t ldx, int n,
                   uint8_t *rows, uint8_t *blk);
    /* Decodes n stored rows into y (n, D). blks[i] is row i's block data (NULL entries when
     * block_bytes is 0; blks itself may then be NULL). */
    void (*decode)(const kvc_repr *r, int layer, int head, int kind, const uint8_t *rows,
                   const uint8_t *const *blks, int n, float *y);
    /* Optional (NULL: never). 1 when (layer, head, kind) is not stored but predicted from the
     * same head and kind of layer - 1: the cache then keeps exactly layer - 1's tokens for
     * that head and calls predict on layer - 1's decoded rows. */
    int (*reused)(const kvc_repr *r, int layer, int head, int kind);
    /* y (n, D) = prediction of (layer, head, kind) from src (n, D) of layer - 1. */
    void (*predict)(const kvc_repr *r, int layer, int head, int kind, const float *src, int n, float *y);
    /* Optional (NULL: never). R > 0 when values of (layer, head) have a linear decoder
     * y = W z + b, so attention can run in latent space: sum_i a_i y_i = W (sum_i a_i z_i) + b
     * for weights a summing to 1. Then decode_latent gives z (n, R) and linear_decoder points
     * at W (D, R) and b (D) (b may be NULL). */
    int (*latent_dim)(const kvc_repr *r, int layer, int head);
    void (*decode_latent)(const kvc_repr *r, int layer, int head, const uint8_t *rows, int n, float *z);
    void (*linear_decoder)(const kvc_repr *r, int layer, int head, const float **w, const float **b);
} kvc_repr_ops;

struct kvc_repr {
    const kvc_repr_ops *ops;
    kvc_cache_shape shape;
    char spec[1024]; /* canonical spec, filled by init (init fails rather than cut it) */
    void *impl;
};

/* ==================================================================== retention ==== */

typedef struct kvc_keep kvc_keep;

/* One (layer, kv head)'s tokens as a policy sees them, oldest first (sorted by position).
 * state: `state_bytes` bytes per token that the policy owns (scores, hash codes); the cache
 * moves them with their tokens when it compacts. New tokens' state is zeroed before
 * on_append. */
typedef struct {
    int layer, head;
    int64_t n;            /* tokens held, new ones included */
    const int32_t *pos;   /* (n) true positions */
    uint8_t *state;       /* (n, state_bytes) */
    const float *krot;    /* score only, for a policy with needs_keys: (n, D) the held keys
                             after RoPE, as the cache reads them; else NULL */
} kvc_keep_view;

/* How one budget is spread (share=): the same number of tokens in every (layer, kv head);
 * one budget per layer shared by its kv heads; or one budget for the whole cache, given to
 * the tokens with the lowest eviction scores wherever they are (AdaKV / KV-Compress). */
enum { KVC_SHARE_HEAD = 0, KVC_SHARE_LAYER = 1, KVC_SHARE_GLOBAL = 2 };

/* Budget and protection shared by every policy (parsed by the cache). */
typedef struct {
    int64_t budget_tokens; /* > 0, or 0 when given as a fraction */
    double budget_frac;    /* 0 < F <= 1 when given as a fraction, else 0 */
    int sinks;             /* first tokens never evicted (default 4) */
    int window;            /* most recent tokens never evicted (default 10; streaming: 0) */
    int share;             /* KVC_SHARE_* (share=head|layer|global, default head) */
    double floor;          /* share != head: each head keeps at least this fraction of the
                              per-head budget (floor=F, 0..1, default 0) */
} kvc_keep_budget;

/* Retrieval of evicted tokens (keep options retrieve=R,rbits=B,rstore=4|8,rerank=C,
 * rprobe=mean|each,spill=DIR): evicted K/V go to a side store (int4 or int8: keys per channel
 * in blocks of 32 tokens, values per token in groups of 32), indexed by SimHash codes of their
 * keys after RoPE; each query's code fetches the R nearest into that query's attention. */
typedef struct {
    int r;              /* tokens retrieved per (query, layer, kv head); 0: no side store */
    int bits;           /* index code bits, 8..64 (default 32) */
    int qbits;          /* stored precision, 4 or 8 (default 4) */
    int rerank;         /* >= 1: the r*rerank nearest codes are re-ranked by their true logit
                           (keys decoded from the store), the best r kept (default 1: none) */
    int probe_each;     /* 1: a token's distance is its least to the G query heads' codes;
                           0 (default): the distance to the code of their mean */
    char spill[256];    /* "" (default): rows in RAM; else a directory where an unlinked
                           temporary file holds the rows (the index stays in RAM) */
} kvc_keep_retrieval;

typedef struct {
    const char *name;  /* as written in a spec: "lsh" */
    const char *usage; /* one line: its own options */
    /* Takes one policy-specific option key=val (common ones are handled by the cache);
     * -1 with err when the key is unknown or the value out of range. May be NULL. */
    int (*option)(kvc_keep *k, const char *key, const char *val, kvc_err *err);
    /* After all options: builds state (k->impl), fills k->state_bytes, checks ranges. */
    int (*init)(kvc_keep *k, kvc_err *err);
    void (*free)(kvc_keep *k);
    /* Appends the canonical text of its own options ("bits=16,probe=query") to buf. */
    void (*describe)(const kvc_keep *k, char *buf, size_t size);
    /* The three hooks below may be NULL (the cache then skips the work of preparing their
     * arguments); score may be NULL only for a policy that never evicts.
     * New tokens [first, v->n) arrived; krot (n_new, D) are their exact keys after RoPE. */
    void (*on_append)(kvc_keep *k, kvc_keep_view *v, int64_t first, const float *krot);
    /* Queries of one step attended: qrot (n_q, G, D) after RoPE at positions qpos (n_q);
     * when needs_probs, probs (n_q, G, v->n) holds their softmax weights over the held tokens
     * (0 where a token was not visible: v->pos[i] > qpos[q]), else NULL. */
    void (*on_attend)(kvc_keep *k, kvc_keep_view *v, const float *qrot, const int32_t *qpos, int n_q,
                      const float *probs);
    /* Writes an eviction score for every held token: the cache evicts the highest scores
     * outside the sinks and the window (ties: the oldest) until the budget holds. */
    void (*score)(kvc_keep *k, kvc_keep_view *v, float *score);
    /* May be NULL. The cache was emptied (kvc_cache_reset): forget per-head state kept outside
     * the tokens (probes, running means). */
    void (*reset)(kvc_keep *k);
    /* May be NULL (0). Bytes of state the policy holds outside the tokens that grows with use
     * (a window of recent queries or probe codes), counted by bytes(). */
    size_t (*extra_bytes)(const kvc_keep *k);
    /* May be NULL. Options applied before the user's: a preset of another policy's code
     * ("snapkv" is H2O's code with "obs=64,pool=5,..."); sinks= and window= may appear. */
    const char *defaults;
} kvc_keep_ops;

struct kvc_keep {
    const kvc_keep_ops *ops;
    kvc_cache_shape shape;
    kvc_keep_budget budget;
    int evicts;        /* 0 for the full policy: budget options are refused */
    int needs_probs;   /* on_attend wants attention weights */
    int needs_keys;    /* score wants the held keys after RoPE (kvc_keep_view.krot) */
    kvc_keep_retrieval retrieval; /* retrieve=0 unless asked */
    size_t state_bytes;
    uint64_t seed;     /* seed=... (default 1) for policies that draw random numbers */
    void *impl;
};

/* Marks in evict[0..n) the n - keep held tokens with the highest scores, never one of the
 * first `sinks` or the last `window` (ties: the oldest goes first). Returns how many were
 * marked: fewer than n - keep only when protection leaves too few candidates. */
int64_t kvc_kvcache_select(const float *score, int64_t n, int64_t keep, int sinks, int window, uint8_t *evict);

/* One budget shared by n_heads heads (share=layer|global): marks in evict[h][0..n[h]) the
 * tokens to evict so that keep tokens stay in all, never one of a head's first `sinks` or last
 * `window`, and each head keeping at least min_keep tokens (or all it holds); among the
 * rest the highest scores go first across heads (ties: the lower position in its head, then
 * the lower head). Returns how many were marked: fewer than sum(n) - keep only when
 * protection and floors leave too few candidates; -1 when out of memory. */
int64_t kvc_kvcache_select_shared(const float *const *score, const int64_t *n, int n_heads, int64_t keep, int sinks,
                                  int window, int64_t min_keep, uint8_t *const *evict);

/* ===================================================================== registry ==== */

extern const kvc_repr_ops *const KVC_REPRS[]; /* NULL-terminated */
extern const kvc_keep_ops *const KVC_KEEPS[]; /* NULL-terminated */
const kvc_repr_ops *kvc_repr_find(const char *name);
const kvc_keep_ops *kvc_keep_find(const char *name);

/* Builds a representation / policy from a spec alone (used by the cache and by tests that
 * exercise one plug-in). NULL with err on a bad spec. */
kvc_repr *kvc_repr_new(const char *spec, const kvc_repr_env *env, kvc_err *err);
void kvc_repr_free(kvc_repr *r);
kvc_keep *kvc_keep_new(const char *spec, const kvc_cache_shape *shape, kvc_err *err);
void kvc_keep_free(kvc_keep *k);

#ifdef __cplusplus
}
#endif
#endif
