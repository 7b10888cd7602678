/* tc_cache.c - the cache that holds a transform codec's rows (`--repr tc:FILE`, kvc/tc.h):
 * every layer holds the same tokens (a layer is predicted from the one below, so their token
 * sets must agree), kept in three runs by position: the first `sinks` tokens exact in f16,
 * then coded rows, then the current step's exact rows (a chunk attends to its own exact K/V,
 * DESIGN.md section 5). end_step lets the retention policy evict (one decision for the whole
 * model: every (layer, kv head)'s scores summed), then codes the step's rows layer by layer in
 * closed loop. Attention decodes each layer from the layer below, kept decoded for the step.
 * Letters: L layers, K kv heads, G query heads per kv head, D head_dim, E = K*D, T tokens. */
#include "kvc/kvcache.h"
#include "kvc/tc.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { KK = KV_K, KV = KV_V };

typedef struct {
    kvc_tc *tc;
    kvc_keep *keep;
    int L, K, H, G, D, E, S;   /* S: exact sink tokens (positions below S) */
    int *rb;                   /* (L, 2) code bytes per token */
    /* tokens, by position: [0, ns) sinks, [ns, n_old) coded, then each layer's rows of the step */
    int64_t n_old, ns, cap;
    int32_t *pos;              /* (cap) */
    int64_t n_new;             /* tokens of this step (appended at layer 0) */
    int *appended;             /* (L) 1 once the layer got this step's rows */
    uint16_t **sink;           /* [(l*2+k)] (S, E) f16 */
    uint8_t **codes;           /* [(l*2+k)] (cap, rb) coded rows of tokens ns .. n_old-1 */
    float **raw;               /* [(l*2+k)] (step cap, E) this step's exact rows */
    int64_t raw_cap;
    uint8_t **state;           /* [(l*K+h)] (cap, state_bytes) the policy's per-token state */
    /* attention scratch: decoded rows of the layer below and of this one (coded tokens) */
    float *dec[2][2];          /* [slot][kind] (cap, E) */
    int dec_layer[2];          /* layer held by each slot, -1 none */
    uint64_t version, dec_version[2];
    float *kr, *vr;            /* (T, E) keys after RoPE, values (all tokens of a layer) */
    float *scr;                /* codec scratch */
    size_t scr_floats;
    float *probs;              /* (n_q, G, T) per head, for policies that want weights */
    float *qg;                 /* (n_q, G, D) */
    float *score, *total;      /* (cap) */
    uint8_t *mask;             /* (cap) */
    int64_t qcap, pcap;
    kvc_rope_table rope;
    int64_t ref, budget, appended_total, evicted;
    char desc[1400];
} tc_impl;

static int grow(void **p, size_t n, size_t size) {
    if (!n || !size) return 0;
    void *q = realloc(*p, n * size);
    if (!q) return -1;
    *p = q;
    return 0;
}

/* Room for `need` tokens of coded rows, positions and policy state. */
static int reserve_tokens(tc_impl *im, int64_t need) {
    if (need <= im->cap) return 0;
    int64_t cap = im->cap ? im->cap : 256;
    while (cap < need) cap *= 2;
    const size_t sb = im->keep->state_bytes;
    if (grow((void **)&im->pos, (size_t)cap, sizeof(int32_t)) || grow((void **)&im->score, (size_t)cap, sizeof(float)) ||
        grow((void **)&im->total, (size_t)cap, sizeof(float)) || grow((void **)&im->mask, (size_t)cap, 1))
        return -1;
    for (int i = 0; i < im->L * 2; i++)
        if (grow((void **)&im->codes[i], (size_t)cap, (size_t)(im->rb[i] > 0 ? im->rb[i] : 1))) return -1;
    for (int i = 0; sb && i < im->L * im->K; i++)
        if (grow((void **)&im->state[i], (size_t)cap, sb)) return -1;
    for (int s = 0; s < 2; s++)
        for (int k = 0; k < 2; k++)
            if (grow((void **)&im->dec[s][k], (size_t)cap, (size_t)im->E * sizeof(float))) return -1;
    if (grow((void **)&im->kr, (size_t)cap, (size_t)im->E * sizeof(float)) ||
        grow((void **)&im->vr, (size_t)cap, (size_t)im->E * sizeof(float)))
        return -1;
    im->cap = cap;
    return 0;
}

static int reserve_scratch(tc_impl *im, int64_t rows) {
    size_t need = kvc_tc_scratch_floats(im->tc, rows);
    if (need <= im->scr_floats) return 0;
    if (grow((void **)&im->scr, need, sizeof(float))) return -1;
    im->scr_floats = need;
    return 0;
}

/* ------------------------------------------------------------------- append ------ */

static int tc_append(kvc_cache *c, int layer, const float *k, const float *v, const int32_t *pos, int n,
                     kvc_err *err) {
    tc_impl *im = c->impl;
    const int E = im->E, K = im->K, D = im->D;
    if (n < 1) return 0;
    if (im->appended[layer]) return kvc_fail(err, "tc cache: layer %d appended twice in one step", layer);
    if (layer == 0) {
        for (int t = 0; t < n; t++)
            if (pos[t] < 0 || (t > 0 && pos[t] <= pos[t - 1]) || (t == 0 && im->n_old && pos[0] <= im->pos[im->n_old - 1]))
                return kvc_fail(err, "tc cache: positions must be >= 0 and increasing");
        if (im->n_old + n > c->shape.max_tokens)
            return kvc_fail(err, "KV cache full: %lld tokens held, %d more exceed the capacity %d", (long long)im->n_old,
                            n, c->shape.max_tokens);
        if (reserve_tokens(im, im->n_old + n)) return kvc_fail(err, "out of memory growing the KV cache");
        if (n > im->raw_cap) {
            for (int i = 0; i < im->L * 2; i++)
                if (grow((void **)&im->raw[i], (size_t)n, (size_t)E * sizeof(float)))
                    return kvc_fail(err, "out of memory growing the KV cache");
            im->raw_cap = n;
        }
        memcpy(im->pos + im->n_old, pos, (size_t)n * sizeof(int32_t));
        im->n_new = n;
        if (kvc_rope_table_reserve(&im->rope, (int64_t)pos[n - 1] + 1)) return kvc_fail(err, "out of memory");
        const size_t sb = im->keep->state_bytes;
        for (int i = 0; sb && i < im->L * K; i++) memset(im->state[i] + (size_t)im->n_old * sb, 0, (size_t)n * sb);
        im->appended_total += n;
    } else if (n != im->n_new || memcmp(pos, im->pos + im->n_old, (size_t)n * sizeof(int32_t))) {
        return kvc_fail(err, "tc cache: layer %d got other tokens than layer 0 in this step (every layer must "
                             "append the same positions)", layer);
    }
    memcpy(im->raw[layer * 2 + KK], k, (size_t)n * E * sizeof(float));
    memcpy(im->raw[layer * 2 + KV], v, (size_t)n * E * sizeof(float));
    im->appended[layer] = 1;
    if (im->keep->ops->on_append) {
        float *kr = malloc((size_t)n * D * sizeof(float));
        if (!kr) return kvc_fail(err, "out of memory");
        const int64_t T = im->n_old + n;
        for (int h = 0; h < K; h++) {
            kvc_rope_rows(&im->rope, k + (size_t)h * D, E, pos, n, kr, D);
            kvc_keep_view view = {layer, h, T, im->pos, im->state[layer * K + h], NULL};
            im->keep->ops->on_append(im->keep, &view, im->n_old, kr);
        }
        free(kr);
    }
    return 0;
}

/* ------------------------------------------------------------------- decode ------ */

/* Decoded rows (before RoPE) of the coded tokens [ns, n_old) of `layer` into a memo slot,
 * from the layer below's (decoded first when the memo does not hold it). Returns the slot,
 * or -1 when out of memory. */
static int decode_layer(tc_impl *im, int layer) {
    for (int s = 0; s < 2; s++)
        if (im->dec_layer[s] == layer && im->dec_version[s] == im->version) return s;
    int below = -1;
    if (layer > 0) {
        below = decode_layer(im, layer - 1);
        if (below < 0) return -1;
    }
    const int slot = below == 0 ? 1 : 0;
    const int64_t m = im->n_old - im->ns;
    if (m > 0) {
        if (reserve_scratch(im, m)) return -1;
        const float *kp = below >= 0 ? im->dec[below][KK] + (size_t)im->ns * im->E : NULL;
        const float *vp = below >= 0 ? im->dec[below][KV] + (size_t)im->ns * im->E : NULL;
        float *dk = im->dec[slot][KK] + (size_t)im->ns * im->E, *dv = im->dec[slot][KV] + (size_t)im->ns * im->E;
        kvc_tc_decode(im->tc, layer, KK, im->codes[layer * 2 + KK], kp, vp, NULL, m, dk, im->scr);
        kvc_tc_decode(im->tc, layer, KV, im->codes[layer * 2 + KV], kp, vp, dk, m, dv, im->scr);
    }
    /* the sinks' rows, for the layer above's attention (they are never predicted from) */
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < (size_t)im->ns * im->E; i++) im->dec[slot][k][i] = kvc_f16_to_f32(im->sink[layer * 2 + k][i]);
    im->dec_layer[slot] = layer;
    im->dec_version[slot] = im->version;
    return slot;
}

/* ------------------------------------------------------------------- attend ------ */

static int tc_attend(kvc_cache *c, int layer, const float *q, const int32_t *qpos, int n_q, float *out,
                     kvc_err *err) {
    tc_impl *im = c->impl;
    const int K = im->K, G = im->G, D = im->D, H = im->H, E = im->E;
    const int64_t nr = im->appended[layer] ? im->n_new : 0, T = im->n_old + nr;
    if (reserve_tokens(im, T)) return kvc_fail(err, "out of memory in attention");
    const int slot = decode_layer(im, layer);
    if (slot < 0) return kvc_fail(err, "out of memory decoding the KV cache");
    /* keys and values of every held token: sinks and coded ones decoded, the step's exact */
    memcpy(im->kr, im->dec[slot][KK], (size_t)im->n_old * E * sizeof(float));
    memcpy(im->vr, im->dec[slot][KV], (size_t)im->n_old * E * sizeof(float));
    if (nr) {
        memcpy(im->kr + (size_t)im->n_old * E, im->raw[layer * 2 + KK], (size_t)nr * E * sizeof(float));
        memcpy(im->vr + (size_t)im->n_old * E, im->raw[layer * 2 + KV], (size_t)nr * E * sizeof(float));
    }
    const kvc_backend *be = kvc_cache_backend(c);
    for (int h = 0; h < K; h++)
        if (be->rope_rows(&im->rope, im->kr + (size_t)h * D, E, im->pos, T, im->kr + (size_t)h * D, E, err)) return -1;
    /* the probabilities each policy may want, per kv head */
    const int want = im->keep->needs_probs;
    if (want && (int64_t)n_q * G * T * K > im->pcap) {
        if (grow((void **)&im->probs, (size_t)n_q * G * T * K, sizeof(float))) return kvc_fail(err, "out of memory");
        im->pcap = (int64_t)n_q * G * T * K;
    }
    kvc_attn_kv kv[K];
    float *probs[K];
    for (int h = 0; h < K; h++) {
        kv[h] = (kvc_attn_kv){.t = T, .k = im->kr + (size_t)h * D, .ldk = E, .pos = im->pos, .v = im->vr + (size_t)h * D,
                              .ldv = E};
        probs[h] = want ? im->probs + (size_t)h * n_q * G * T : NULL;
    }
    if (be->attend_layer(q, qpos, n_q, H, K, D, kv, out, probs, err)) return -1;
    if (im->keep->ops->on_attend) {
        if ((int64_t)n_q * G * D > im->qcap) {
            if (grow((void **)&im->qg, (size_t)n_q * G * D, sizeof(float))) return kvc_fail(err, "out of memory");
            im->qcap = (int64_t)n_q * G * D;
        }
        for (int h = 0; h < K; h++) {
            for (int t = 0; t < n_q; t++)
                memcpy(im->qg + (size_t)t * G * D, q + ((size_t)t * H + (size_t)h * G) * D, (size_t)G * D * sizeof(float));
            kvc_keep_view view = {layer, h, T, im->pos, im->state[layer * K + h], NULL};
            im->keep->ops->on_attend(im->keep, &view, im->qg, qpos, n_q, probs[h]);
        }
    }
    return 0;
}

/* ----------------------------------------------------------------- end_step ------ */

/* Removes the tokens marked in mask[0, n_old + n_new) from every run and array. */
static void compact(tc_impl *im, const uint8_t *mask) {
    const int64_t n = im->n_old + im->n_new, E = im->E;
    const size_t sb = im->keep->state_bytes;
    int64_t w = 0, ws = 0, wc = 0, wr = 0;
    for (int64_t i = 0; i < n; i++) {
        const int sink = i < im->ns, coded = !sink && i < im->n_old;
        if (!mask[i]) {
            for (int j = 0; j < im->L * 2; j++) {
                if (sink && ws != i) memmove(im->sink[j] + ws * E, im->sink[j] + i * E, (size_t)E * sizeof(uint16_t));
                if (coded && wc != i - im->ns)
                    memmove(im->codes[j] + wc * im->rb[j], im->codes[j] + (i - im->ns) * im->rb[j], (size_t)im->rb[j]);
                if (!sink && !coded && wr != i - im->n_old)
                    memmove(im->raw[j] + wr * E, im->raw[j] + (i - im->n_old) * E, (size_t)E * sizeof(float));
            }
            for (int j = 0; sb && j < im->L * im->K; j++)
                if (w != i) memmove(im->state[j] + w * sb, im->state[j] + i * sb, sb);
            im->pos[w] = im->pos[i];
            ws += sink, wc += coded, wr += !sink && !coded, w++;
        }
    }
    im->evicted += n - w;
    im->ns = ws;
    im->n_old = ws + wc;
    im->n_new = wr;
}

/* Codes this step's rows layer by layer: sinks in f16, the others in closed loop. */
static int code_step(tc_impl *im) {
    const int64_t E = im->E, nn = im->n_new;
    int64_t first = 0; /* the step's first token that is not a sink */
    while (first < nn && im->pos[im->n_old + first] < im->S) first++;
    const int64_t m = nn - first;
    float *buf = NULL;
    if (m > 0) {
        if (reserve_scratch(im, m)) return -1;
        if (!(buf = malloc((size_t)m * E * 4 * sizeof(float)))) return -1;
    }
    float *pk = buf, *pv = buf ? buf + m * E : NULL, *dk = buf ? buf + 2 * m * E : NULL, *dv = buf ? buf + 3 * m * E : NULL;
    for (int l = 0; l < im->L; l++) {
        for (int k = 0; k < 2; k++) {
            const float *raw = im->raw[l * 2 + k];
            for (int64_t i = 0; i < first; i++) /* new sinks: exact in f16, in position order */
                for (int64_t j = 0; j < E; j++) im->sink[l * 2 + k][(im->ns + i) * E + j] = kvc_f32_to_f16(raw[i * E + j]);
        }
        if (m > 0) {
            uint8_t *ck = im->codes[l * 2 + KK] + (im->n_old - im->ns) * im->rb[l * 2 + KK];
            uint8_t *cv = im->codes[l * 2 + KV] + (im->n_old - im->ns) * im->rb[l * 2 + KV];
            kvc_tc_encode(im->tc, l, KK, im->raw[l * 2 + KK] + first * E, l ? pk : NULL, l ? pv : NULL, NULL, m, ck, dk,
                          im->scr);
            kvc_tc_encode(im->tc, l, KV, im->raw[l * 2 + KV] + first * E, l ? pk : NULL, l ? pv : NULL, dk, m, cv, dv,
                          im->scr);
            float *t = pk;
            pk = dk, dk = t;
            t = pv, pv = dv, dv = t;
        }
    }
    free(buf);
    im->ns += first;
    im->n_old += nn;
    im->n_new = 0;
    return 0;
}

static int tc_end_step(kvc_cache *c, kvc_err *err) {
    tc_impl *im = c->impl;
    for (int l = 0; l < im->L; l++)
        if (!im->appended[l] && im->n_new)
            return kvc_fail(err, "tc cache: layer %d did not get this step's tokens", l);
    const int64_t n = im->n_old + im->n_new;
    const kvc_keep_budget *b = &im->keep->budget;
    if (im->keep->evicts && im->ref >= 1 && n > im->budget) {
        /* one decision for every layer and head: their scores summed */
        for (int64_t i = 0; i < n; i++) im->total[i] = 0;
        for (int l = 0; l < im->L; l++)
            for (int h = 0; h < im->K; h++) {
                kvc_keep_view view = {l, h, n, im->pos, im->state[l * im->K + h], NULL};
                im->keep->ops->score(im->keep, &view, im->score);
                for (int64_t i = 0; i < n; i++) im->total[i] += im->score[i];
            }
        kvc_kvcache_select(im->total, n, im->budget, b->sinks, b->window, im->mask);
        compact(im, im->mask);
    }
    if (im->n_new && code_step(im)) return kvc_fail(err, "out of memory coding the KV cache");
    memset(im->appended, 0, (size_t)im->L * sizeof(int));
    im->version++;
    return 0;
}

/* ------------------------------------------------------------ bookkeeping ------ */

static size_t tc_bytes(const kvc_cache *c) {
    const tc_impl *im = c->impl;
    size_t total = 0;
    for (int l = 0; l < im->L; l++)
        for (int k = 0; k < 2; k++) {
            total += (size_t)im->ns * im->E * sizeof(uint16_t);
            total += (size_t)(im->n_old - im->ns) * im->rb[l * 2 + k];
            if (im->appended[l]) total += (size_t)im->n_new * im->E * sizeof(float);
        }
    const int64_t held = im->n_old + im->n_new;
    total += (size_t)held * im->keep->state_bytes * im->L * im->K;
    if (im->keep->evicts) total += (size_t)held * sizeof(int32_t); /* gaps: positions are data */
    return total;
}

static int64_t tc_n_tokens(const kvc_cache *c, int layer) {
    const tc_impl *im = c->impl;
    return im->n_old + (im->appended[layer] ? im->n_new : 0);
}

static void tc_reset(kvc_cache *c) {
    tc_impl *im = c->impl;
    im->n_old = im->ns = im->n_new = 0;
    memset(im->appended, 0, (size_t)im->L * sizeof(int));
    im->appended_total = im->evicted = 0;
    im->version++;
    if (im->keep->ops->reset) im->keep->ops->reset(im->keep);
}

static void tc_free(kvc_cache *c) {
    if (!c) return;
    tc_impl *im = c->impl;
    if (im) {
        for (int i = 0; i < im->L * 2; i++) {
            if (im->sink) free(im->sink[i]);
            if (im->codes) free(im->codes[i]);
            if (im->raw) free(im->raw[i]);
        }
        for (int i = 0; im->state && i < im->L * im->K; i++) free(im->state[i]);
        for (int s = 0; s < 2; s++) free(im->dec[s][0]), free(im->dec[s][1]);
        free(im->sink), free(im->codes), free(im->raw), free(im->state), free(im->rb), free(im->appended);
        free(im->pos), free(im->kr), free(im->vr), free(im->scr), free(im->probs), free(im->qg), free(im->score);
        free(im->total), free(im->mask);
        kvc_rope_table_free(&im->rope);
        kvc_tc_free(im->tc);
        kvc_keep_free(im->keep);
        free(im);
    }
    free(c);
}

static int tc_set_budget(kvc_cache *c, int64_t ref, kvc_err *err) {
    tc_impl *im = c->impl;
    if (!im->keep->evicts) return 0;
    if (ref < 0) {
        im->ref = -1;
        return 0;
    }
    const kvc_keep_budget *b = &im->keep->budget;
    int64_t budget = b->budget_tokens > 0 ? b->budget_tokens : (int64_t)llround(b->budget_frac * (double)ref);
    if (budget < (int64_t)b->sinks + b->window || budget < 1)
        return kvc_fail(err, "budget %lld tokens is smaller than sinks %d + window %d: raise the budget or lower "
                             "sinks/window", (long long)budget, b->sinks, b->window);
    im->ref = ref;
    im->budget = budget;
    return 0;
}

static void tc_stats(const kvc_cache *c, int64_t *appended, int64_t *held, int64_t *evicted) {
    const tc_impl *im = c->impl;
    *appended = im->appended_total;
    *held = (im->n_old + im->n_new) * im->L * im->K;
    *evicted = im->evicted * im->L * im->K;
}

static const char *tc_describe(const kvc_cache *c) { return ((const tc_impl *)c->impl)->desc; }

static const kvc_cache_ops TC_OPS = {
    .name = "transform",
    .append = tc_append,
    .attend = tc_attend,
    .end_step = tc_end_step,
    .bytes = tc_bytes,
    .n_tokens = tc_n_tokens,
    .reset = tc_reset,
    .free = tc_free,
    .set_budget = tc_set_budget,
    .stats = tc_stats,
    .describe = tc_describe,
};

/* ----------------------------------------------------------------- creation ------ */

/* Parses "FILE[,sinks=S]" into the file and the sink count (-1: the checkpoint's). */
static int parse_spec(const char *opts, char *path, size_t cap, int *sinks, kvc_err *err) {
    *sinks = -1;
    if (!opts || !*opts) return kvc_fail(err, "tc: name the codec file: tc:FILE[,sinks=S]");
    const char *comma = strchr(opts, ',');
    size_t len = comma ? (size_t)(comma - opts) : strlen(opts);
    if (len == 0 || len >= cap) return kvc_fail(err, "tc: codec path empty or too long");
    memcpy(path, opts, len);
    path[len] = '\0';
    for (const char *p = comma; p && *p;) {
        p++;
        const char *end = strchr(p, ',');
        size_t tl = end ? (size_t)(end - p) : strlen(p);
        char tok[64];
        if (tl >= sizeof tok) return kvc_fail(err, "tc: option too long");
        memcpy(tok, p, tl);
        tok[tl] = '\0';
        char *e;
        if (!strncmp(tok, "sinks=", 6)) {
            long v = strtol(tok + 6, &e, 10);
            if (e == tok + 6 || *e || v < 0 || v > 1024) return kvc_fail(err, "tc: sinks=%s: an integer 0-1024", tok + 6);
            if (*sinks >= 0) return kvc_fail(err, "tc: sinks given twice");
            *sinks = (int)v;
        } else {
            return kvc_fail(err, "tc: unknown option '%s' (known: sinks=S)", tok);
        }
        p = end;
    }
    return 0;
}

kvc_cache *kvc_tccache_new(const kvc_cache_shape *s, const char *opts, const char *keep, const char *fingerprint,
                           kvc_err *err) {
    char path[1024];
    int sinks;
    if (parse_spec(opts, path, sizeof path, &sinks, err)) return NULL;
    kvc_cache *c = calloc(1, sizeof *c);
    tc_impl *im = calloc(1, sizeof *im);
    if (!c || !im) {
        free(c), free(im);
        kvc_fail(err, "out of memory");
        return NULL;
    }
    c->ops = &TC_OPS;
    c->shape = *s;
    c->impl = im;
    im->L = s->n_layer, im->K = s->n_head_kv, im->H = s->n_head, im->G = s->n_head / s->n_head_kv, im->D = s->head_dim;
    im->E = im->K * im->D;
    im->ref = -1;
    im->dec_layer[0] = im->dec_layer[1] = -1;
    if (!(im->tc = kvc_tc_load(path, err))) goto fail;
    if (kvc_tc_check_model(im->tc, fingerprint, s->n_layer, s->n_head_kv, s->head_dim, err)) goto fail;
    im->S = sinks >= 0 ? sinks : im->tc->sinks;
    if (!(im->keep = kvc_keep_new(keep && *keep ? keep : "full", s, err))) goto fail;
    /* this cache decides once for the model and keeps no side store: refuse what it would ignore */
    if (im->keep->retrieval.r > 0 || im->keep->budget.share != KVC_SHARE_HEAD || im->keep->needs_keys) {
        kvc_fail(err, "a transform codec's cache takes no retrieve=, share= or window-of-queries policy (obs=, snapkv, tova)");
        goto fail;
    }
    im->rb = calloc((size_t)im->L * 2, sizeof(int));
    im->appended = calloc((size_t)im->L, sizeof(int));
    im->sink = calloc((size_t)im->L * 2, sizeof *im->sink);
    im->codes = calloc((size_t)im->L * 2, sizeof *im->codes);
    im->raw = calloc((size_t)im->L * 2, sizeof *im->raw);
    im->state = calloc((size_t)im->L * im->K, sizeof *im->state);
    if (!im->rb || !im->appended || !im->sink || !im->codes || !im->raw || !im->state) goto oom;
    for (int i = 0; i < im->L * 2; i++) {
        im->rb[i] = kvc_tc_row_bytes(im->tc, i / 2, i % 2);
        if (im->S && !(im->sink[i] = malloc((size_t)im->S * im->E * sizeof(uint16_t)))) goto oom;
    }
    if (kvc_rope_table_init(&im->rope, im->D, s->rope_base) || kvc_rope_table_reserve(&im->rope, s->max_tokens)) goto oom;
    char kd[256] = "", tcs[1100];
    if (im->keep->ops->describe) im->keep->ops->describe(im->keep, kd, sizeof kd);
    snprintf(tcs, sizeof tcs, "tc:%s,sinks=%d", path, im->S);
    const kvc_keep_budget *b = &im->keep->budget;
    int n;
    if (im->keep->evicts) {
        char bud[48];
        if (b->budget_tokens > 0) snprintf(bud, sizeof bud, "%lld", (long long)b->budget_tokens);
        else snprintf(bud, sizeof bud, "%g", b->budget_frac);
        n = snprintf(im->desc, sizeof im->desc, "repr=%s keep=%s:budget=%s,sinks=%d,window=%d%s%s", tcs,
                     im->keep->ops->name, bud, b->sinks, b->window, kd[0] ? "," : "", kd);
    } else {
        n = snprintf(im->desc, sizeof im->desc, "repr=%s keep=%s", tcs, im->keep->ops->name);
    }
    if (n < 0 || (size_t)n >= sizeof im->desc) {
        kvc_fail(err, "tc: the codec path is too long for a description");
        goto fail;
    }
    return c;
oom:
    kvc_fail(err, "out of memory");
fail:
    tc_free(c);
    return NULL;
}
