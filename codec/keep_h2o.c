/* keep_h2o.c - attention-weight retention: H2O (heavy hitters) and the presses built on the same
 * scores. A token's importance is the softmax weight queries gave it, over the G query heads of
 * its group (summed, or their maximum with gqa=max); tokens of least importance are evicted.
 *   obs=0 (H2O): weights accumulate over every query as attention runs; norm=mean divides by
 *     the number of queries that could see the token (kvpress ObservedAttention), since a sum
 *     favours old tokens that more queries saw.
 *   obs=W (SnapKV, TOVA): only the last W queries count; they are kept (per head) and scored
 *     against the held keys when the cache evicts.
 *   pool=P: importance max- or mean-pooled over P neighbouring tokens (SnapKV's smoothing).
 * Presets: observed, snapkv, tova (the kvpress defaults; see the ops tables at the end). */
#include "kvc/kvcache.h"
#include "kvc/kernels.h"
#include "keep_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define H2O_MAX_OBS 4096
#define H2O_MAX_POOL 63

typedef struct {
    int norm_mean;   /* norm=mean: / queries that could see the token */
    int gqa_max;     /* gqa=max: the largest of the G heads' weights, else their sum */
    int obs;         /* 0: every query accumulates; W: the last W queries, scored at eviction */
    int pool, pool_max;
    kvc_qruns *runs; /* (L * K) query positions each head saw (norm=mean, obs=0) */
    kvc_ring *ring;  /* (L * K) the last W queries (G * D floats each) (obs > 0) */
} keep_h2o;

/* Defaults on first use (options come before init). */
static keep_h2o *h2o_impl(kvc_keep *k) {
    if (!k->impl) {
        keep_h2o *s = calloc(1, sizeof *s);
        if (!s) return NULL;
        s->pool = 1, s->pool_max = 1;
        k->impl = s;
    }
    return k->impl;
}

static void h2o_free(kvc_keep *k);

/* norm=sum|mean, gqa=sum|max, obs=W (0..4096), pool=P (odd, 1..63), pooling=max|avg. */
static int h2o_option(kvc_keep *k, const char *key, const char *val, kvc_err *err) {
    keep_h2o *s = h2o_impl(k);
    if (!s) return kvc_fail(err, "out of memory");
    char *end;
    int rc = 0;
    if (!strcmp(key, "norm")) {
        if (!strcmp(val, "sum")) s->norm_mean = 0;
        else if (!strcmp(val, "mean")) s->norm_mean = 1;
        else rc = kvc_fail(err, "%s: option norm=%s: expected sum or mean", k->ops->name, val);
    } else if (!strcmp(key, "gqa")) {
        if (!strcmp(val, "sum")) s->gqa_max = 0;
        else if (!strcmp(val, "max")) s->gqa_max = 1;
        else rc = kvc_fail(err, "%s: option gqa=%s: expected sum or max", k->ops->name, val);
    } else if (!strcmp(key, "obs")) {
        long x = strtol(val, &end, 10);
        if (!*val || *end || x < 0 || x > H2O_MAX_OBS)
            rc = kvc_fail(err, "%s: option obs=%s: expected an integer in [0, %d]", k->ops->name, val, H2O_MAX_OBS);
        else s->obs = (int)x;
    } else if (!strcmp(key, "pool")) {
        long x = strtol(val, &end, 10);
        if (!*val || *end || x < 1 || x > H2O_MAX_POOL || x % 2 == 0)
            rc = kvc_fail(err, "%s: option pool=%s: expected an odd integer in [1, %d]", k->ops->name, val, H2O_MAX_POOL);
        else s->pool = (int)x;
    } else if (!strcmp(key, "pooling")) {
        if (!strcmp(val, "max")) s->pool_max = 1;
        else if (!strcmp(val, "avg")) s->pool_max = 0;
        else rc = kvc_fail(err, "%s: option pooling=%s: expected max or avg", k->ops->name, val);
    } else {
        rc = kvc_fail(err, "%s: unknown option '%s' (options: norm, gqa, obs, pool, pooling)", k->ops->name, key);
    }
    if (rc) h2o_free(k);
    return rc;
}

/* Per-token state: one accumulator, or G with gqa=max; none with obs (scored from keys). */
static int h2o_init(kvc_keep *k, kvc_err *err) {
    keep_h2o *s = h2o_impl(k);
    if (!s) return kvc_fail(err, "out of memory");
    const int G = k->shape.n_head / k->shape.n_head_kv;
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    if (s->obs > 0) {
        s->ring = calloc(heads, sizeof *s->ring);
        for (size_t i = 0; s->ring && i < heads; i++)
            if (kvc_ring_init(&s->ring[i], s->obs, G * k->shape.head_dim)) {
                h2o_free(k);
                return kvc_fail(err, "out of memory");
            }
        if (!s->ring) {
            h2o_free(k);
            return kvc_fail(err, "out of memory");
        }
        k->state_bytes = 0;
        k->needs_probs = 0;
        k->needs_keys = 1;
    } else {
        if (s->norm_mean && !(s->runs = calloc(heads, sizeof *s->runs))) {
            h2o_free(k);
            return kvc_fail(err, "out of memory");
        }
        k->state_bytes = (size_t)(s->gqa_max ? G : 1) * sizeof(float);
        k->needs_probs = 1;
        k->needs_keys = 0;
    }
    return 0;
}

static void h2o_free(kvc_keep *k) {
    keep_h2o *s = k->impl;
    if (!s) return;
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    for (size_t i = 0; s->runs && i < heads; i++) kvc_qruns_free(&s->runs[i]);
    for (size_t i = 0; s->ring && i < heads; i++) kvc_ring_free(&s->ring[i]);
    free(s->runs), free(s->ring);
    free(s);
    k->impl = NULL;
}

/* The options that differ from plain H2O's ("norm=mean,obs=64,pool=5,pooling=avg"). */
static void h2o_describe(const kvc_keep *k, char *buf, size_t size) {
    const keep_h2o *s = k->impl;
    int at = 0;
    buf[0] = '\0';
#define ADD(...)                                                                                                  \
    do {                                                                                                          \
        int w = snprintf(buf + at, size - (size_t)at, "%s", at ? "," : "");                                      \
        if (w > 0 && (size_t)(at + w) < size) at += w;                                                            \
        w = snprintf(buf + at, size - (size_t)at, __VA_ARGS__);                                                   \
        if (w > 0 && (size_t)(at + w) < size) at += w;                                                            \
    } while (0)
    if (s->norm_mean) ADD("norm=mean");
    if (s->gqa_max) ADD("gqa=max");
    if (s->obs) ADD("obs=%d", s->obs);
    if (s->pool > 1) ADD("pool=%d,pooling=%s", s->pool, s->pool_max ? "max" : "avg");
#undef ADD
}

/* obs=0: acc[t] (or acc[t][g]) += the weights of the step's queries; obs=W: the queries join
 * the head's window. */
static void h2o_on_attend(kvc_keep *k, kvc_keep_view *v, const float *qrot, const int32_t *qpos, int n_q,
                          const float *probs) {
    keep_h2o *s = k->impl;
    const int G = k->shape.n_head / k->shape.n_head_kv, D = k->shape.head_dim;
    const size_t h = (size_t)v->layer * k->shape.n_head_kv + v->head;
    if (s->obs > 0) {
        for (int q = 0; q < n_q; q++) kvc_ring_push(&s->ring[h], qrot + (size_t)q * G * D, qpos ? qpos[q] : 0);
        return;
    }
    if (!probs) return; /* the cache honours needs_probs; be safe if it did not */
    if (s->norm_mean && qpos) kvc_qruns_add(&s->runs[h], qpos, n_q); /* out of memory: counts run short */
    const int na = s->gqa_max ? G : 1;
    for (int64_t t = 0; t < v->n; t++) {
        float acc[na];
        memcpy(acc, v->state + (size_t)t * na * sizeof(float), sizeof acc);
        for (int q = 0; q < n_q; q++)
            for (int g = 0; g < G; g++) acc[s->gqa_max ? g : 0] += probs[((size_t)q * G + g) * v->n + t];
        memcpy(v->state + (size_t)t * na * sizeof(float), acc, sizeof acc);
    }
}

/* The window's importance of every held token into imp (n): each kept query's softmax over the
 * keys it can see, summed over the queries, per head (w: G * n scratch), combined over heads;
 * norm=mean divides by the queries that saw the token. */
static void window_importance(const keep_h2o *s, const kvc_ring *ring, const kvc_keep_view *v, int G, int D,
                              float *imp, float *w, int32_t *cnt) {
    const int64_t n = v->n;
    const float scale = 1.0f / sqrtf((float)D);
    memset(w, 0, (size_t)G * n * sizeof *w);
    memset(cnt, 0, (size_t)n * sizeof *cnt);
    for (int i = 0; i < ring->n; i++) {
        int32_t qp;
        const float *q = kvc_ring_at(ring, i, &qp);
        for (int64_t t = 0; t < n; t++) cnt[t] += v->pos[t] <= qp;
        for (int g = 0; g < G; g++) {
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < n; t++) {
                if (v->pos[t] > qp) continue;
                imp[t] = kvc_dot_f32(q + (size_t)g * D, v->krot + (size_t)t * D, D) * scale;
                mx = imp[t] > mx ? imp[t] : mx;
            }
            if (mx == -INFINITY) continue;
            for (int64_t t = 0; t < n; t++)
                if (v->pos[t] <= qp) sum += (imp[t] = expf(imp[t] - mx));
            for (int64_t t = 0; t < n; t++)
                if (v->pos[t] <= qp) w[(size_t)g * n + t] += imp[t] / sum;
        }
    }
    for (int64_t t = 0; t < n; t++) {
        float a = 0.0f;
        for (int g = 0; g < G; g++) a = s->gqa_max ? fmaxf(a, w[(size_t)g * n + t]) : a + w[(size_t)g * n + t];
        imp[t] = s->norm_mean ? (cnt[t] ? a / (float)cnt[t] : 0.0f) : a;
    }
}

/* score = -importance (pooled): the least attended token is evicted first. */
static void h2o_score(kvc_keep *k, kvc_keep_view *v, float *score) {
    keep_h2o *s = k->impl;
    const int G = k->shape.n_head / k->shape.n_head_kv, D = k->shape.head_dim;
    const size_t h = (size_t)v->layer * k->shape.n_head_kv + v->head;
    const int64_t n = v->n;
    float *tmp = s->pool > 1 || s->obs > 0 ? malloc((size_t)(n > 0 ? n : 1) * (size_t)(G + 1) * sizeof *tmp) : NULL;
    int32_t *cnt = s->obs > 0 ? malloc((size_t)(n > 0 ? n : 1) * sizeof *cnt) : NULL;
    if (s->obs > 0 && v->krot && tmp && cnt) {
        window_importance(s, &s->ring[h], v, G, D, score, tmp, cnt);
    } else if (s->obs > 0) { /* out of memory (or no keys): keep the newest, like StreamingLLM */
        for (int64_t t = 0; t < n; t++) score[t] = (float)v->pos[t];
    } else {
        const int na = s->gqa_max ? G : 1;
        for (int64_t t = 0; t < n; t++) {
            float acc[na], a = 0.0f;
            memcpy(acc, v->state + (size_t)t * na * sizeof(float), sizeof acc);
            for (int g = 0; g < na; g++) a = s->gqa_max ? fmaxf(a, acc[g]) : a + acc[g];
            if (s->norm_mean) {
                const int64_t c = kvc_qruns_count(&s->runs[h], v->pos[t]) * (s->gqa_max ? 1 : G);
                a = c > 0 ? a / (float)c : 0.0f;
            }
            score[t] = a;
        }
    }
    if (tmp && s->pool > 1) kvc_pool_scores(score, n, s->pool, s->pool_max, tmp);
    for (int64_t t = 0; t < n; t++) score[t] = -score[t];
    free(tmp), free(cnt);
}

/* A new sequence: no queries seen. */
static void h2o_reset(kvc_keep *k) {
    keep_h2o *s = k->impl;
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    for (size_t i = 0; s->runs && i < heads; i++) s->runs[i].n = 0;
    for (size_t i = 0; s->ring && i < heads; i++) s->ring[i].n = s->ring[i].head = 0;
}

/* The window's queries (and positions) and the query runs. */
static size_t h2o_extra_bytes(const kvc_keep *k) {
    const keep_h2o *s = k->impl;
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    size_t b = 0;
    for (size_t i = 0; s->runs && i < heads; i++) b += (size_t)s->runs[i].n * 2 * sizeof(int32_t);
    for (size_t i = 0; s->ring && i < heads; i++)
        b += (size_t)s->ring[i].n * ((size_t)s->ring[i].width * sizeof(float) + sizeof(int32_t));
    return b;
}

#define H2O_OPS(nm, use, dflt)                                                                                    \
    {                                                                                                             \
        .name = nm, .usage = use, .option = h2o_option, .init = h2o_init, .free = h2o_free,                      \
        .describe = h2o_describe, .on_append = NULL, .on_attend = h2o_on_attend, .score = h2o_score,             \
        .reset = h2o_reset, .extra_bytes = h2o_extra_bytes, .defaults = dflt                                     \
    }

const kvc_keep_ops KVC_KEEP_H2O = H2O_OPS(
    "h2o",
    "H2O: keep the most attended tokens; norm=sum|mean (sum; mean: / queries that saw the token), "
    "gqa=sum|max (sum), obs=W (0: every query; W: the last W, scored from the keys), pool=P (1, odd), "
    "pooling=max|avg (max)",
    NULL);
/* kvpress ObservedAttentionPress: mean weight over the queries that saw the token, no protection. */
const kvc_keep_ops KVC_KEEP_OBSERVED =
    H2O_OPS("observed", "ObservedAttention: h2o with norm=mean,sinks=0,window=0 (its options may override)",
            "norm=mean,sinks=0,window=0");
/* kvpress SnapKVPress: the last 64 queries, mean-pooled over 5 tokens, the 64 newest kept. */
const kvc_keep_ops KVC_KEEP_SNAPKV =
    H2O_OPS("snapkv", "SnapKV: h2o with obs=64,pool=5,pooling=avg,sinks=0,window=64 (its options may override)",
            "obs=64,pool=5,pooling=avg,sinks=0,window=64");
/* kvpress TOVAPress: the last query's weights, the newest token kept. */
const kvc_keep_ops KVC_KEEP_TOVA =
    H2O_OPS("tova", "TOVA: h2o with obs=1,sinks=0,window=1 (its options may override)", "obs=1,sinks=0,window=1");
