/* keep_lsh.c - LSH-E retention: SimHash codes of the keys stand in for attention. Each token
 * keeps the b-bit code of its exact post-RoPE key; a probe code (a query's, or the newest
 * key's) is compared by Hamming distance, and the farthest tokens, the ones the probe would
 * attend to least, are evicted. One Gaussian projection (proj_seed) serves every layer and head.
 * The score of a token: its distance to the current step's probes (current), or accumulated
 * over every probe (sum, ema), or over the last W probes (obs=W); norm=mean divides a sum by the
 * probes that could see the token; est=softmax turns distances into estimated attention weights
 * (cos(pi d / b) times the key's and the probe's norms, softmax over the visible tokens) and
 * accumulates those, H2O-style, without attention weights; est=hits counts the probes that
 * land within hit * b bits of the token's code (a peak detector: attention is large only where
 * the angle is small), normally with norm=mean. gqa=mean|each|min: one probe from
 * the group's mean query, or one per query head, their distances averaged or the least taken.
 * Per-token state: the code in ceil(b/8) bytes, a float accumulator (sum, ema, softmax), and
 * the key's norm as f16 for est=softmax. */
#include "kvc/kvcache.h"
#include "kvc/lsh.h"
#include "keep_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LSH_CURRENT, LSH_SUM, LSH_EMA };
enum { EST_HAMMING, EST_SOFTMAX, EST_HITS };

typedef struct {
    int bits, nb;        /* code bits, bytes a code takes (ceil(bits / 8)) */
    int probe_key;       /* 1: probe = newest key's code; 0: the group's mean query */
    int mode;            /* LSH_CURRENT, LSH_SUM, LSH_EMA */
    float ema;           /* weight of the newest step for LSH_EMA */
    int ema_given;
    uint64_t proj_seed;
    int center;          /* 1: hash keys minus their head's running mean (see lsh_on_append) */
    int gqa_each;        /* 1: each query head of a group is its own probe; 0: their mean is */
    int gqa_min;         /* with gqa_each: a token's distance is its least over the heads */
    int norm_mean;       /* norm=mean: accumulate causally, / probes that could see the token */
    int est;             /* EST_*: accumulate distances, estimated weights, or hits */
    float hit;           /* est=hits: a probe hits a token within hit * bits of its code */
    int hit_given;
    int obs;             /* > 0: score by the last obs probes only (ring of codes) */
    int pool, pool_max;  /* pooling of the importance over neighbours */
    size_t acc_at, norm_at; /* state offsets of the accumulator and the key norm */
    kvc_qruns *runs;     /* (L * K) probe positions (norm=mean) */
    kvc_ring *ring;      /* (L * K) the last obs probes: per query per_q codes as floats' bits */
    float *mu;           /* (L * K, D) running mean of each head's post-RoPE keys */
    int64_t *mu_n;       /* (L * K) keys in that mean */
    kvc_simhash sh;      /* (bits, D) projections */
    uint64_t *probe;     /* (L * K) latest probe code per (layer, kv head) */
    uint8_t *has_probe;  /* (L * K) */
    uint64_t *step;      /* (L * K, qcap) query probe codes of each head's last step */
    int *n_step;         /* (L * K) codes held in step */
    int qcap;
} keep_lsh;

static const char *const MODE_NAMES[] = {"current", "sum", "ema"};

/* Defaults are set at the first option or in init, whichever comes first. */
static keep_lsh *lsh_impl(kvc_keep *k) {
    if (!k->impl) {
        keep_lsh *s = calloc(1, sizeof *s);
        if (!s) return NULL;
        s->bits = 16, s->probe_key = 0, s->mode = LSH_SUM, s->ema = 0.5f, s->proj_seed = 1, s->center = 0;
        s->pool = 1, s->pool_max = 1, s->hit = 0.35f;
        k->impl = s;
    }
    return k->impl;
}

/* bits=B (4..64), probe=query|key, score=current|sum|ema, ema=A (0<A<1), proj_seed=N. */
static int lsh_parse(keep_lsh *s, const char *key, const char *val, kvc_err *err) {
    char *end;
    if (!strcmp(key, "bits")) {
        long b = strtol(val, &end, 10);
        if (!*val || *end || b < LSH_MIN_BITS || b > LSH_MAX_BITS)
            return kvc_fail(err, "lsh: option bits=%s: expected an integer in [%d, %d]", val, LSH_MIN_BITS, LSH_MAX_BITS);
        s->bits = (int)b;
    } else if (!strcmp(key, "probe")) {
        if (!strcmp(val, "query")) s->probe_key = 0;
        else if (!strcmp(val, "key")) s->probe_key = 1;
        else return kvc_fail(err, "lsh: option probe=%s: expected query or key", val);
    } else if (!strcmp(key, "score")) {
        int m = -1;
        for (int i = 0; i < 3; i++)
            if (!strcmp(val, MODE_NAMES[i])) m = i;
        if (m < 0) return kvc_fail(err, "lsh: option score=%s: expected current, sum or ema", val);
        s->mode = m;
    } else if (!strcmp(key, "ema")) {
        double a = strtod(val, &end);
        if (!*val || *end || !(a > 0.0 && a < 1.0))
            return kvc_fail(err, "lsh: option ema=%s: expected a weight strictly between 0 and 1", val);
        s->ema = (float)a, s->ema_given = 1;
    } else if (!strcmp(key, "gqa")) {
        if (!strcmp(val, "mean")) s->gqa_each = 0, s->gqa_min = 0;
        else if (!strcmp(val, "each")) s->gqa_each = 1, s->gqa_min = 0;
        else if (!strcmp(val, "min")) s->gqa_each = 1, s->gqa_min = 1;
        else return kvc_fail(err, "lsh: option gqa=%s: expected mean, each or min", val);
    } else if (!strcmp(key, "norm")) {
        if (!strcmp(val, "sum")) s->norm_mean = 0;
        else if (!strcmp(val, "mean")) s->norm_mean = 1;
        else return kvc_fail(err, "lsh: option norm=%s: expected sum or mean", val);
    } else if (!strcmp(key, "est")) {
        if (!strcmp(val, "hamming")) s->est = EST_HAMMING;
        else if (!strcmp(val, "softmax")) s->est = EST_SOFTMAX;
        else if (!strcmp(val, "hits")) s->est = EST_HITS;
        else return kvc_fail(err, "lsh: option est=%s: expected hamming, softmax or hits", val);
    } else if (!strcmp(key, "hit")) {
        double a = strtod(val, &end);
        if (!*val || *end || !(a > 0.0 && a < 1.0)) return kvc_fail(err, "lsh: option hit=%s: expected a fraction in (0, 1)", val);
        s->hit = (float)a, s->hit_given = 1;
    } else if (!strcmp(key, "obs")) {
        long x = strtol(val, &end, 10);
        if (!*val || *end || x < 0 || x > 4096) return kvc_fail(err, "lsh: option obs=%s: expected an integer in [0, 4096]", val);
        s->obs = (int)x;
    } else if (!strcmp(key, "pool")) {
        long x = strtol(val, &end, 10);
        if (!*val || *end || x < 1 || x > 63 || x % 2 == 0) return kvc_fail(err, "lsh: option pool=%s: expected an odd integer in [1, 63]", val);
        s->pool = (int)x;
    } else if (!strcmp(key, "pooling")) {
        if (!strcmp(val, "max")) s->pool_max = 1;
        else if (!strcmp(val, "avg")) s->pool_max = 0;
        else return kvc_fail(err, "lsh: option pooling=%s: expected max or avg", val);
    } else if (!strcmp(key, "center")) {
        if (!strcmp(val, "on")) s->center = 1;
        else if (!strcmp(val, "off")) s->center = 0;
        else return kvc_fail(err, "lsh: option center=%s: expected on or off", val);
    } else if (!strcmp(key, "proj_seed")) {
        unsigned long long x = strtoull(val, &end, 10);
        if (!*val || *end || val[0] == '-') return kvc_fail(err, "lsh: option proj_seed=%s: expected an unsigned integer", val);
        s->proj_seed = x;
    } else {
        return kvc_fail(err, "lsh: unknown option '%s' (options: bits, probe, score, ema, gqa, norm, est, obs, pool, "
                             "pooling, center, proj_seed)", key);
    }
    return 0;
}

static void lsh_free(kvc_keep *k);

/* Takes one option; on a bad one frees what the options built, since the registry drops
 * the half-made policy without calling free. */
static int lsh_option(kvc_keep *k, const char *key, const char *val, kvc_err *err) {
    keep_lsh *s = lsh_impl(k);
    if (!s) return kvc_fail(err, "out of memory");
    if (lsh_parse(s, key, val, err)) {
        lsh_free(k);
        return -1;
    }
    return 0;
}

/* Frees the projections and probe tables. */
static void lsh_free(kvc_keep *k) {
    keep_lsh *s = k->impl;
    if (!s) return;
    kvc_simhash_free(&s->sh);
    free(s->probe);
    free(s->has_probe);
    free(s->step);
    free(s->n_step);
    free(s->mu);
    free(s->mu_n);
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    for (size_t i = 0; s->runs && i < heads; i++) kvc_qruns_free(&s->runs[i]);
    for (size_t i = 0; s->ring && i < heads; i++) kvc_ring_free(&s->ring[i]);
    free(s->runs), free(s->ring);
    free(s);
    k->impl = NULL;
}

/* Draws the projection, sizes the per-token state and the per-head probe tables. */
static int lsh_init(kvc_keep *k, kvc_err *err) {
    keep_lsh *s = lsh_impl(k);
    if (!s) return kvc_fail(err, "out of memory");
    if (s->ema_given && s->mode != LSH_EMA) {
        lsh_free(k);
        return kvc_fail(err, "lsh: option ema= needs score=ema");
    }
    if (kvc_simhash_init(&s->sh, k->shape.head_dim, s->bits, s->proj_seed, err)) {
        lsh_free(k);
        return -1;
    }
    size_t heads = (size_t)(k->shape.n_layer > 0 ? k->shape.n_layer : 1) * (k->shape.n_head_kv > 0 ? k->shape.n_head_kv : 1);
    s->probe = calloc(heads, sizeof *s->probe);
    s->has_probe = calloc(heads, 1);
    s->n_step = calloc(heads, sizeof *s->n_step);
    s->mu = calloc(heads * (size_t)k->shape.head_dim, sizeof *s->mu);
    s->mu_n = calloc(heads, sizeof *s->mu_n);
    if (!s->probe || !s->has_probe || !s->n_step || !s->mu || !s->mu_n) {
        lsh_free(k);
        return kvc_fail(err, "out of memory");
    }
    const char *bad = NULL;
    if (s->probe_key && (s->norm_mean || s->est || s->obs || s->gqa_each))
        bad = "probe=key takes none of norm=mean, est=softmax|hits, obs= or gqa=each|min";
    else if (s->obs && (s->mode != LSH_SUM || s->norm_mean || s->est))
        bad = "obs= scores by the window alone: it takes neither score=current|ema, norm=mean nor est=softmax|hits";
    else if (s->hit_given && s->est != EST_HITS)
        bad = "hit= needs est=hits";
    else if ((s->norm_mean || s->est) && s->mode != LSH_SUM)
        bad = "norm=mean and est=softmax|hits accumulate: they need score=sum";
    if (bad) {
        lsh_free(k);
        return kvc_fail(err, "lsh: %s", bad);
    }
    const int g = k->shape.n_head / k->shape.n_head_kv, per_q = s->gqa_each ? g : 1;
    if (s->norm_mean && !(s->runs = calloc(heads, sizeof *s->runs))) {
        lsh_free(k);
        return kvc_fail(err, "out of memory");
    }
    if (s->obs) {
        s->ring = calloc(heads, sizeof *s->ring);
        for (size_t i = 0; s->ring && i < heads; i++)
            if (kvc_ring_init(&s->ring[i], s->obs, per_q * 2)) { /* a code as two floats' bits */
                free(s->ring), s->ring = NULL;
                break;
            }
        if (!s->ring) {
            lsh_free(k);
            return kvc_fail(err, "out of memory");
        }
    }
    s->nb = (s->bits + 7) / 8;
    s->acc_at = (size_t)s->nb;
    s->norm_at = s->acc_at + (s->mode == LSH_CURRENT || s->obs ? 0 : sizeof(float));
    k->state_bytes = s->norm_at + (s->est == EST_SOFTMAX ? sizeof(uint16_t) : 0);
    k->needs_probs = 0;
    return 0;
}

/* "bits=B,probe=P,score=S" plus ",ema=A" for score=ema and ",proj_seed=N" when not 1. */
static void lsh_describe(const kvc_keep *k, char *buf, size_t size) {
    const keep_lsh *s = k->impl;
    int at = snprintf(buf, size, "bits=%d,probe=%s,score=%s", s->bits, s->probe_key ? "key" : "query", MODE_NAMES[s->mode]);
    if (at < 0 || (size_t)at >= size) return;
    if (s->mode == LSH_EMA) at += snprintf(buf + at, size - at, ",ema=%g", s->ema);
    if (at < 0 || (size_t)at >= size) return;
    if (s->gqa_each && !s->gqa_min) at += snprintf(buf + at, size - at, ",gqa=each");
    if (at < 0 || (size_t)at >= size) return;
    if (s->center) at += snprintf(buf + at, size - at, ",center=on");
    if (at < 0 || (size_t)at >= size) return;
    if (s->proj_seed != 1) at += snprintf(buf + at, size - at, ",proj_seed=%llu", (unsigned long long)s->proj_seed);
    if (at < 0 || (size_t)at >= size) return;
    if (s->gqa_min) at += snprintf(buf + at, size - at, ",gqa=min");
    if (at < 0 || (size_t)at >= size) return;
    if (s->norm_mean) at += snprintf(buf + at, size - at, ",norm=mean");
    if (at < 0 || (size_t)at >= size) return;
    if (s->est) at += snprintf(buf + at, size - at, ",est=%s", s->est == EST_SOFTMAX ? "softmax" : "hits");
    if (at < 0 || (size_t)at >= size) return;
    if (s->est == EST_HITS && s->hit != 0.35f) at += snprintf(buf + at, size - at, ",hit=%g", s->hit);
    if (at < 0 || (size_t)at >= size) return;
    if (s->obs) at += snprintf(buf + at, size - at, ",obs=%d", s->obs);
    if (at < 0 || (size_t)at >= size) return;
    if (s->pool > 1) snprintf(buf + at, size - at, ",pool=%d,pooling=%s", s->pool, s->pool_max ? "max" : "avg");
}

/* ---- per-token state: code bytes (little-endian), then the float accumulator ---- */

static uint64_t code_get(const keep_lsh *s, const uint8_t *st) {
    uint64_t c = 0;
    for (int b = 0; b < s->nb; b++) c |= (uint64_t)st[b] << (8 * b);
    return c;
}

static void code_put(const keep_lsh *s, uint8_t *st, uint64_t c) {
    for (int b = 0; b < s->nb; b++) st[b] = (uint8_t)(c >> (8 * b));
}

static float acc_get(const keep_lsh *s, const uint8_t *st) {
    float a;
    memcpy(&a, st + s->acc_at, sizeof a);
    return a;
}

static void acc_put(const keep_lsh *s, uint8_t *st, float a) { memcpy(st + s->acc_at, &a, sizeof a); }

/* The key norm kept for est=softmax (f16). */
static float norm_get(const keep_lsh *s, const uint8_t *st) {
    uint16_t h;
    memcpy(&h, st + s->norm_at, sizeof h);
    return kvc_f16_to_f32(h);
}

/* One step of the accumulator of tokens [0, n) against probe p. An EMA starts at its first
 * distance (a token not yet probed holds -1), so a token's value does not depend on when
 * it arrived. */
static void accumulate(const keep_lsh *s, kvc_keep_view *v, int64_t n, uint64_t p) {
    const size_t sb = s->norm_at + (s->est == EST_SOFTMAX ? sizeof(uint16_t) : 0);
    for (int64_t t = 0; t < n; t++) {
        uint8_t *st = v->state + t * sb;
        float d = (float)__builtin_popcountll(code_get(s, st) ^ p), a = acc_get(s, st);
        if (s->mode == LSH_SUM) a += d;
        else a = a < 0.0f ? d : s->ema * d + (1.0f - s->ema) * a;
        acc_put(s, st, a);
    }
}

/* One step of the accumulators against m probes at once: the mean distance to them. */
static void accumulate_mean(const keep_lsh *s, kvc_keep_view *v, int64_t n, const uint64_t *p, int m) {
    const size_t sb = s->norm_at + (s->est == EST_SOFTMAX ? sizeof(uint16_t) : 0);
    for (int64_t t = 0; t < n; t++) {
        uint8_t *st = v->state + t * sb;
        const uint64_t c = code_get(s, st);
        int sum = 0;
        for (int i = 0; i < m; i++) sum += __builtin_popcountll(c ^ p[i]);
        float d = (float)sum / (float)m, a = acc_get(s, st);
        if (s->mode == LSH_SUM) a += d;
        else a = a < 0.0f ? d : s->ema * d + (1.0f - s->ema) * a;
        acc_put(s, st, a);
    }
}

/* The new path of one probe step (causal: only tokens the query can see, pos <= qpos), used by
 * gqa=min, norm=mean and est=softmax: per token the combined distance to the m probe codes p
 * (their mean, or the least with gqa=min) is added to the accumulator; with est=softmax the
 * estimated weights are (per probe, a softmax over the visible tokens of
 * |k| |q_j| cos(pi d / b) / sqrt(D)), their mean or, with gqa=min, their maximum. w: (m, n)
 * scratch for the weights. */
static void accumulate_causal(const keep_lsh *s, kvc_keep_view *v, const uint64_t *p, const float *qn, int m,
                              int32_t qpos, int d, float *w) {
    const size_t sb = s->norm_at + (s->est == EST_SOFTMAX ? sizeof(uint16_t) : 0);
    const int64_t n = v->n;
    if (s->est != EST_SOFTMAX) {
        const float within = s->hit * (float)s->bits;
        for (int64_t t = 0; t < n; t++) {
            if (v->pos[t] > qpos) continue;
            uint8_t *st = v->state + t * sb;
            const uint64_t c = code_get(s, st);
            int sum = 0, least = 65;
            for (int j = 0; j < m; j++) {
                int dj = __builtin_popcountll(c ^ p[j]);
                sum += dj, least = dj < least ? dj : least;
            }
            const float dist = s->gqa_min ? (float)least : (float)sum / (float)m;
            acc_put(s, st, acc_get(s, st) + (s->est == EST_HITS ? (float)(dist <= within) : dist));
        }
        return;
    }
    const float pi_b = 3.14159265358979f / (float)s->bits, inv_sqrt_d = 1.0f / sqrtf((float)d);
    for (int j = 0; j < m; j++) {
        float *wj = w + (size_t)j * n, mx = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            if (v->pos[t] > qpos) continue;
            const uint8_t *st = v->state + t * sb;
            const int dist = __builtin_popcountll(code_get(s, st) ^ p[j]);
            wj[t] = norm_get(s, st) * qn[j] * cosf(pi_b * (float)dist) * inv_sqrt_d;
            mx = wj[t] > mx ? wj[t] : mx;
        }
        if (mx == -INFINITY) return;
        for (int64_t t = 0; t < n; t++)
            if (v->pos[t] <= qpos) sum += (wj[t] = expf(wj[t] - mx));
        for (int64_t t = 0; t < n; t++)
            if (v->pos[t] <= qpos) wj[t] /= sum;
    }
    for (int64_t t = 0; t < n; t++) {
        if (v->pos[t] > qpos) continue;
        float a = 0.0f;
        for (int j = 0; j < m; j++) a = s->gqa_min ? fmaxf(a, w[(size_t)j * n + t]) : a + w[(size_t)j * n + t] / (float)m;
        uint8_t *st = v->state + t * sb;
        acc_put(s, st, acc_get(s, st) + a);
    }
}

/* Codes the new keys (and keeps their norms for est=softmax). With probe=key each new key in
 * turn is one step: it becomes its head's probe and, when accumulating, scores every older
 * token (itself excluded: distance 0 says nothing). */
static void lsh_on_append(kvc_keep *k, kvc_keep_view *v, int64_t first, const float *krot) {
    keep_lsh *s = k->impl;
    size_t sb = k->state_bytes, h = (size_t)v->layer * k->shape.n_head_kv + v->head;
    int d = k->shape.head_dim;
    float kc[d];
    for (int64_t t = first; t < v->n; t++) {
        uint64_t c;
        const float *kt = krot + (t - first) * d;
        if (s->center) {
            /* q.k = q.(k - mu) + q.mu and q.mu is the same for every token, so hashing the
             * centred key ranks tokens as attention does while removing the direction all
             * keys share (which otherwise makes most codes alike). mu: the running mean of
             * the head's keys so far, this one included. */
            float *mu = s->mu + h * (size_t)d;
            int64_t m = ++s->mu_n[h];
            for (int i = 0; i < d; i++) {
                mu[i] += (kt[i] - mu[i]) / (float)m;
                kc[i] = kt[i] - mu[i];
            }
            kt = kc;
        }
        kvc_simhash_codes_cpu(&s->sh, kt, d, 1, &c);
        code_put(s, v->state + t * sb, c);
        if (s->est == EST_SOFTMAX) {
            float nn = 0.0f;
            for (int i = 0; i < d; i++) nn += kt[i] * kt[i];
            uint16_t hn = kvc_f32_to_f16(sqrtf(nn));
            memcpy(v->state + t * sb + s->norm_at, &hn, sizeof hn);
        }
        if (s->mode == LSH_EMA) acc_put(s, v->state + t * sb, -1.0f);
        if (s->probe_key) {
            if (s->mode != LSH_CURRENT) accumulate(s, v, t, c);
            s->probe[h] = c;
            s->has_probe[h] = 1;
        }
    }
}

/* With probe=query: each query of the step, its G heads' post-RoPE vectors averaged (or each
 * head on its own with gqa=each|min), is one probe. score=current keeps the codes of every
 * query of the step and scores a token by its mean distance to them (one query per step, as
 * in decoding, is the paper's rule; with chunks, the last query alone proved a poor probe);
 * when accumulating every query scores every held token in order (the default sum scores
 * tokens after a query in the same step too; gqa=min, norm=mean and est=softmax only the
 * tokens the query can see); obs=W keeps the last W probes instead. */
static void lsh_on_attend(kvc_keep *k, kvc_keep_view *v, const float *qrot, const int32_t *qpos, int n_q,
                          const float *probs) {
    (void)probs;
    keep_lsh *s = k->impl;
    if (s->probe_key || n_q < 1) return;
    int d = k->shape.head_dim, g = k->shape.n_head / k->shape.n_head_kv;
    size_t h = (size_t)v->layer * k->shape.n_head_kv + v->head;
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    const int per_q = s->gqa_each ? g : 1; /* probe codes each query gives */
    const int causal = s->gqa_min || s->norm_mean || s->est;
    if (s->mode == LSH_CURRENT && n_q * per_q > s->qcap) {
        const int want = n_q * per_q;
        uint64_t *p = realloc(s->step, heads * (size_t)want * sizeof *p);
        if (!p) n_q = s->qcap / per_q; /* out of memory: keep the probes there is room for */
        else {
            /* re-lay rows for the wider stride */
            for (size_t i = heads; i-- > 0;)
                memmove(p + i * (size_t)want, p + i * (size_t)s->qcap, (size_t)s->qcap * sizeof *p);
            s->step = p;
            s->qcap = want;
        }
        if (n_q < 1) return;
    }
    float mean[d], qn[per_q];
    uint64_t codes[per_q];
    const int soft = s->est == EST_SOFTMAX;
    float *w = soft ? malloc((size_t)per_q * (size_t)(v->n > 0 ? v->n : 1) * sizeof *w) : NULL;
    if (soft && !w) return; /* out of memory: this step is not counted */
    if (s->norm_mean && qpos) kvc_qruns_add(&s->runs[h], qpos, n_q);
    if (s->mode == LSH_CURRENT) s->n_step[h] = 0;
    for (int q = 0; q < n_q; q++) {
        const float *vec = qrot + (size_t)q * g * d;
        if (s->gqa_each) {
            kvc_simhash_codes_cpu(&s->sh, vec, d, g, codes);
        } else {
            for (int i = 0; i < d; i++) {
                float m = 0.0f;
                for (int j = 0; j < g; j++) m += qrot[((size_t)q * g + j) * d + i];
                mean[i] = m / (float)g;
            }
            kvc_simhash_codes_cpu(&s->sh, mean, d, 1, codes);
            vec = mean;
        }
        if (soft)
            for (int j = 0; j < per_q; j++) {
                float nn = 0.0f;
                for (int i = 0; i < d; i++) nn += vec[(size_t)j * d + i] * vec[(size_t)j * d + i];
                qn[j] = sqrtf(nn);
            }
        if (s->obs) {
            float packed[2 * per_q]; /* the codes' bits, carried by the ring's floats */
            memcpy(packed, codes, sizeof codes);
            kvc_ring_push(&s->ring[h], packed, qpos ? qpos[q] : 0);
        } else if (causal) {
            accumulate_causal(s, v, codes, qn, per_q, qpos ? qpos[q] : INT32_MAX, d, w);
        } else if (s->mode != LSH_CURRENT) {
            if (per_q == 1) accumulate(s, v, v->n, codes[0]);
            else accumulate_mean(s, v, v->n, codes, per_q);
        } else {
            for (int j = 0; j < per_q; j++) s->step[h * (size_t)s->qcap + (size_t)s->n_step[h]++] = codes[j];
        }
        s->probe[h] = codes[per_q - 1];
        s->has_probe[h] = 1;
    }
    free(w);
}

/* obs=W: a token's mean distance to the window's probes that can see it (its combined
 * distance per probe as in accumulate_causal); b when none can. */
static float window_distance(const keep_lsh *s, const kvc_ring *r, uint64_t c, int32_t pos, int per_q) {
    float sum = 0.0f;
    int cnt = 0;
    for (int i = 0; i < r->n; i++) {
        int32_t qp;
        uint64_t codes[per_q];
        memcpy(codes, kvc_ring_at(r, i, &qp), sizeof codes);
        if (pos > qp) continue;
        int tot = 0, least = 65;
        for (int j = 0; j < per_q; j++) {
            int dj = __builtin_popcountll(c ^ codes[j]);
            tot += dj, least = dj < least ? dj : least;
        }
        sum += s->gqa_min ? (float)least : (float)tot / (float)per_q;
        cnt++;
    }
    return cnt ? sum / (float)cnt : (float)s->bits;
}

/* Higher = farther from the probe = evicted first: the current Hamming distance, the sum /
 * EMA of the distances so far (0 for a token no probe has seen yet; norm=mean: / the probes
 * that could see it), the window's mean distance, or minus the accumulated estimated weight
 * (est=softmax); then pooled over neighbours with pool=P. */
static void lsh_score(kvc_keep *k, kvc_keep_view *v, float *score) {
    keep_lsh *s = k->impl;
    size_t sb = k->state_bytes, h = (size_t)v->layer * k->shape.n_head_kv + v->head;
    const int g = k->shape.n_head / k->shape.n_head_kv, per_q = s->gqa_each ? g : 1;
    for (int64_t t = 0; t < v->n; t++) {
        const uint8_t *st = v->state + t * sb;
        if (s->obs) {
            score[t] = window_distance(s, &s->ring[h], code_get(s, st), v->pos[t], per_q);
        } else if (s->mode == LSH_CURRENT && !s->probe_key && s->n_step[h] > 0) {
            const uint64_t c = code_get(s, st), *p = s->step + h * (size_t)s->qcap;
            int sum = 0;
            for (int q = 0; q < s->n_step[h]; q++) sum += __builtin_popcountll(c ^ p[q]);
            score[t] = (float)sum / (float)s->n_step[h];
        } else if (s->mode == LSH_CURRENT) {
            score[t] = s->has_probe[h] ? (float)__builtin_popcountll(code_get(s, st) ^ s->probe[h]) : 0.0f;
        } else {
            float a = acc_get(s, st);
            a = a < 0.0f ? 0.0f : a;
            if (s->norm_mean) {
                const int64_t c = kvc_qruns_count(&s->runs[h], v->pos[t]);
                a = c > 0 ? a / (float)c : (s->est ? 0.0f : (float)s->bits);
            }
            score[t] = s->est ? -a : a; /* weights and hits are importance: the least goes first */
        }
    }
    if (s->pool > 1 && v->n > 0) { /* pool the importance M - score (>= 0), M the largest score */
        float *tmp = malloc((size_t)v->n * sizeof *tmp), mx = score[0];
        if (!tmp) return; /* out of memory: unpooled */
        for (int64_t t = 1; t < v->n; t++) mx = score[t] > mx ? score[t] : mx;
        for (int64_t t = 0; t < v->n; t++) score[t] = mx - score[t];
        kvc_pool_scores(score, v->n, s->pool, s->pool_max, tmp);
        for (int64_t t = 0; t < v->n; t++) score[t] = mx - score[t];
        free(tmp);
    }
}

/* A new sequence: no probe, no key mean, no probe positions or window. */
static void lsh_reset(kvc_keep *k) {
    keep_lsh *s = k->impl;
    size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    memset(s->has_probe, 0, heads);
    memset(s->n_step, 0, heads * sizeof *s->n_step);
    memset(s->mu, 0, heads * (size_t)k->shape.head_dim * sizeof *s->mu);
    memset(s->mu_n, 0, heads * sizeof *s->mu_n);
    for (size_t i = 0; s->runs && i < heads; i++) s->runs[i].n = 0;
    for (size_t i = 0; s->ring && i < heads; i++) s->ring[i].n = s->ring[i].head = 0;
}

/* The probe window's codes and positions, and the probe runs. */
static size_t lsh_extra_bytes(const kvc_keep *k) {
    const keep_lsh *s = k->impl;
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    const int g = k->shape.n_head / k->shape.n_head_kv, per_q = s->gqa_each ? g : 1;
    size_t b = 0;
    for (size_t i = 0; s->runs && i < heads; i++) b += (size_t)s->runs[i].n * 2 * sizeof(int32_t);
    for (size_t i = 0; s->ring && i < heads; i++) b += (size_t)s->ring[i].n * ((size_t)per_q * s->nb + sizeof(int32_t));
    return b;
}

const kvc_keep_ops KVC_KEEP_LSH = {
    .name = "lsh",
    .usage = "LSH-E: evict keys whose SimHash code is farthest from the probe; bits=4..64 (16), "
             "probe=query|key, score=sum|current|ema (sum), ema=A (0.5), gqa=mean|each|min (mean), "
             "norm=sum|mean (sum), est=hamming|softmax|hits (hamming), hit=F (0.35), obs=W (0), pool=P (1), pooling=max|avg (max), "
             "center=on|off (off), proj_seed=N (1)",
    .option = lsh_option,
    .init = lsh_init,
    .free = lsh_free,
    .describe = lsh_describe,
    .on_append = lsh_on_append,
    .on_attend = lsh_on_attend,
    .score = lsh_score,
    .reset = lsh_reset,
    .extra_bytes = lsh_extra_bytes,
};
