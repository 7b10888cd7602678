/* keep_lsh.c - LSH-E retention: SimHash codes of the keys stand in for attention. Each token
 * keeps the b-bit code of its exact post-RoPE key; a probe code (a query's, or the newest
 * key's) is compared by Hamming distance, and the farthest tokens, the ones the probe would
 * attend to least, are evicted. One Gaussian projection (proj_seed) serves every layer and head.
 * Per-token state: the code in ceil(b/8) bytes, plus a float accumulator for score=sum|ema. */
#include "kvc/kvcache.h"
#include "kvc/lsh.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LSH_CURRENT, LSH_SUM, LSH_EMA };

typedef struct {
    int bits, nb;        /* code bits, bytes a code takes (ceil(bits / 8)) */
    int probe_key;       /* 1: probe = newest key's code; 0: the group's mean query */
    int mode;            /* LSH_CURRENT, LSH_SUM, LSH_EMA */
    float ema;           /* weight of the newest step for LSH_EMA */
    int ema_given;
    uint64_t proj_seed;
    int center;          /* 1: hash keys minus their head's running mean (see lsh_on_append) */
    int gqa_each;        /* 1: each query head of a group is its own probe; 0: their mean is */
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
        if (!strcmp(val, "mean")) s->gqa_each = 0;
        else if (!strcmp(val, "each")) s->gqa_each = 1;
        else return kvc_fail(err, "lsh: option gqa=%s: expected mean or each", val);
    } else if (!strcmp(key, "center")) {
        if (!strcmp(val, "on")) s->center = 1;
        else if (!strcmp(val, "off")) s->center = 0;
        else return kvc_fail(err, "lsh: option center=%s: expected on or off", val);
    } else if (!strcmp(key, "proj_seed")) {
        unsigned long long x = strtoull(val, &end, 10);
        if (!*val || *end || val[0] == '-') return kvc_fail(err, "lsh: option proj_seed=%s: expected an unsigned integer", val);
        s->proj_seed = x;
    } else {
        return kvc_fail(err, "lsh: unknown option '%s' (options: bits, probe, score, ema, gqa, center, proj_seed)", key);
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
    s->nb = (s->bits + 7) / 8;
    k->state_bytes = (size_t)s->nb + (s->mode == LSH_CURRENT ? 0 : sizeof(float));
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
    if (s->gqa_each) at += snprintf(buf + at, size - at, ",gqa=each");
    if (at < 0 || (size_t)at >= size) return;
    if (s->center) at += snprintf(buf + at, size - at, ",center=on");
    if (at < 0 || (size_t)at >= size) return;
    if (s->proj_seed != 1) snprintf(buf + at, size - at, ",proj_seed=%llu", (unsigned long long)s->proj_seed);
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
    memcpy(&a, st + s->nb, sizeof a);
    return a;
}

static void acc_put(const keep_lsh *s, uint8_t *st, float a) { memcpy(st + s->nb, &a, sizeof a); }

/* One step of the accumulator of tokens [0, n) against probe p. An EMA starts at its first
 * distance (a token not yet probed holds -1), so a token's value does not depend on when
 * it arrived. */
static void accumulate(const keep_lsh *s, kvc_keep_view *v, int64_t n, uint64_t p) {
    size_t sb = (size_t)s->nb + sizeof(float);
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
    size_t sb = (size_t)s->nb + sizeof(float);
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

/* Codes the new keys. With probe=key each new key in turn is one step: it becomes its head's
 * probe and, when accumulating, scores every older token (itself excluded: distance 0 says
 * nothing). */
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
        if (s->mode == LSH_EMA) acc_put(s, v->state + t * sb, -1.0f);
        if (s->probe_key) {
            if (s->mode != LSH_CURRENT) accumulate(s, v, t, c);
            s->probe[h] = c;
            s->has_probe[h] = 1;
        }
    }
}

/* With probe=query: each query of the step, its G heads' post-RoPE vectors averaged, is
 * one probe. score=current keeps the codes of every query of the step and scores a token by
 * its mean distance to them (one query per step, as in decoding, is the paper's rule; with
 * chunks, the last query alone proved a poor probe); when accumulating every query scores
 * every held token in order (tokens after a query in the same step are scored too). */
static void lsh_on_attend(kvc_keep *k, kvc_keep_view *v, const float *qrot, const int32_t *qpos, int n_q,
                          const float *probs) {
    (void)probs, (void)qpos;
    keep_lsh *s = k->impl;
    if (s->probe_key || n_q < 1) return;
    int d = k->shape.head_dim, g = k->shape.n_head / k->shape.n_head_kv;
    size_t h = (size_t)v->layer * k->shape.n_head_kv + v->head;
    const size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    const int per_q = s->gqa_each ? g : 1; /* probe codes each query gives */
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
    float mean[d];
    uint64_t codes[per_q];
    if (s->mode == LSH_CURRENT) s->n_step[h] = 0;
    for (int q = 0; q < n_q; q++) {
        if (s->gqa_each) {
            kvc_simhash_codes_cpu(&s->sh, qrot + (size_t)q * g * d, d, g, codes);
        } else {
            for (int i = 0; i < d; i++) {
                float m = 0.0f;
                for (int j = 0; j < g; j++) m += qrot[((size_t)q * g + j) * d + i];
                mean[i] = m / (float)g;
            }
            kvc_simhash_codes_cpu(&s->sh, mean, d, 1, codes);
        }
        if (s->mode != LSH_CURRENT) {
            if (per_q == 1) accumulate(s, v, v->n, codes[0]);
            else accumulate_mean(s, v, v->n, codes, per_q);
        } else {
            for (int j = 0; j < per_q; j++) s->step[h * (size_t)s->qcap + (size_t)s->n_step[h]++] = codes[j];
        }
        s->probe[h] = codes[per_q - 1];
        s->has_probe[h] = 1;
    }
}

/* Higher = farther from the probe = evicted first: the current Hamming distance, or the
 * sum / EMA of the distances so far (0 for a token no probe has seen yet). */
static void lsh_score(kvc_keep *k, kvc_keep_view *v, float *score) {
    keep_lsh *s = k->impl;
    size_t sb = k->state_bytes, h = (size_t)v->layer * k->shape.n_head_kv + v->head;
    for (int64_t t = 0; t < v->n; t++) {
        const uint8_t *st = v->state + t * sb;
        if (s->mode == LSH_CURRENT && !s->probe_key && s->n_step[h] > 0) {
            const uint64_t c = code_get(s, st), *p = s->step + h * (size_t)s->qcap;
            int sum = 0;
            for (int q = 0; q < s->n_step[h]; q++) sum += __builtin_popcountll(c ^ p[q]);
            score[t] = (float)sum / (float)s->n_step[h];
        } else if (s->mode == LSH_CURRENT) {
            score[t] = s->has_probe[h] ? (float)__builtin_popcountll(code_get(s, st) ^ s->probe[h]) : 0.0f;
        } else {
            float a = acc_get(s, st);
            score[t] = a < 0.0f ? 0.0f : a;
        }
    }
}

/* A new sequence: no probe, no key mean. */
static void lsh_reset(kvc_keep *k) {
    keep_lsh *s = k->impl;
    size_t heads = (size_t)k->shape.n_layer * k->shape.n_head_kv;
    memset(s->has_probe, 0, heads);
    memset(s->n_step, 0, heads * sizeof *s->n_step);
    memset(s->mu, 0, heads * (size_t)k->shape.head_dim * sizeof *s->mu);
    memset(s->mu_n, 0, heads * sizeof *s->mu_n);
}

const kvc_keep_ops KVC_KEEP_LSH = {
    .name = "lsh",
    .usage = "LSH-E: evict keys whose SimHash code is farthest from the probe; bits=4..64 (16), "
             "probe=query|key, score=sum|current|ema (sum), ema=A (0.5), gqa=mean|each (mean), center=on|off (off), proj_seed=N (1)",
    .option = lsh_option,
    .init = lsh_init,
    .free = lsh_free,
    .describe = lsh_describe,
    .on_append = lsh_on_append,
    .on_attend = lsh_on_attend,
    .score = lsh_score,
    .reset = lsh_reset,
};
