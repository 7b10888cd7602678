/* tc_calib.c - KL calibration of a transform codec: how much does coding one layer's keys (or
 * values) move the model's next-token distribution, per unit of the distortion the trainer
 * measured? Probe sequences of the training text run through a cache where only that
 * (layer, kind) is coded (the rest exact, as the "swap one layer's cache at a time"),
 * against the exact cache. The sensitivities then weigh every part's rate-distortion curve,
 * bits move to where they lower the summed KL most at the same total, and the codec is refit
 * in closed loop with those budgets. */
#include "tc_fit.h"

#include "kvc/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROBE_CHUNK 64 /* tokens per forward call in the probes: later chunks read coded rows */

/* ---- a probe cache: exact rows, one (layer, kind) coded at each end_step ------------------- */

typedef struct {
    const kvc_tc *tc;
    int layer, kind;       /* the coded part; layer -1: nothing coded (the reference) */
    int L, K, D, E, S;
    int64_t cap;
    float *k, *v;          /* (L, cap, E) */
    int32_t *pos;          /* (cap) */
    int64_t *n;            /* (L) */
    int64_t coded;         /* tokens of the probed layer already coded */
    kvc_rope_table rope;
    float *kr, *scr;       /* (cap, E) rotated keys; codec scratch */
    uint8_t *codes;
} probe;

static int probe_append(kvc_cache *c, int layer, const float *k, const float *v, const int32_t *pos, int n,
                        kvc_err *err) {
    probe *p = c->impl;
    if (p->n[layer] + n > p->cap) return kvc_fail(err, "probe cache full");
    memcpy(p->k + ((size_t)layer * p->cap + p->n[layer]) * p->E, k, (size_t)n * p->E * sizeof(float));
    memcpy(p->v + ((size_t)layer * p->cap + p->n[layer]) * p->E, v, (size_t)n * p->E * sizeof(float));
    if (layer == 0) memcpy(p->pos + p->n[0], pos, (size_t)n * sizeof(int32_t));
    p->n[layer] += n;
    return 0;
}

static int probe_attend(kvc_cache *c, int layer, const float *q, const int32_t *qpos, int n_q, float *out,
                        kvc_err *err) {
    probe *p = c->impl;
    const int64_t T = p->n[layer];
    const float *kl = p->k + (size_t)layer * p->cap * p->E;
    memcpy(p->kr, kl, (size_t)T * p->E * sizeof(float));
    for (int h = 0; h < p->K; h++) kvc_rope_rows(&p->rope, p->kr + (size_t)h * p->D, p->E, p->pos, T, p->kr + (size_t)h * p->D, p->E);
    kvc_attn_kv kv[p->K];
    for (int h = 0; h < p->K; h++)
        kv[h] = (kvc_attn_kv){.t = T, .k = p->kr + (size_t)h * p->D, .ldk = p->E, .pos = p->pos,
                              .v = p->v + (size_t)layer * p->cap * p->E + (size_t)h * p->D, .ldv = p->E};
    return kvc_backend_cpu()->attend_layer(q, qpos, n_q, c->shape.n_head, p->K, p->D, kv, out, NULL, err);
}

/* Replaces the probed part's rows of this step (beyond the sinks) by what the codec decodes,
 * predicting from the exact rows around them. */
static int probe_end_step(kvc_cache *c, kvc_err *err) {
    probe *p = c->impl;
    if (p->layer < 0) return 0;
    const int64_t n = p->n[p->layer], E = p->E;
    int64_t first = p->coded;
    while (first < n && p->pos[first] < p->S) first++;
    const int64_t m = n - first;
    if (m > 0) {
        const size_t at = ((size_t)p->layer * p->cap + first) * E, below = at - (size_t)p->cap * E;
        float *x = (p->kind == KV_K ? p->k : p->v) + at;
        const float *kp = p->layer ? p->k + below : NULL, *vp = p->layer ? p->v + below : NULL;
        kvc_tc_encode(p->tc, p->layer, p->kind, x, kp, vp, p->k + at, m, p->codes, x, p->scr);
    }
    p->coded = n;
    (void)err;
    return 0;
}

static size_t probe_bytes(const kvc_cache *c) { (void)c; return 0; }
static int64_t probe_n_tokens(const kvc_cache *c, int layer) { return ((const probe *)c->impl)->n[layer]; }
static void probe_reset(kvc_cache *c) {
    probe *p = c->impl;
    memset(p->n, 0, (size_t)p->L * sizeof(int64_t));
    p->coded = 0;
}
static void probe_free(kvc_cache *c) {
    probe *p = c->impl;
    free(p->k), free(p->v), free(p->pos), free(p->n), free(p->kr), free(p->scr), free(p->codes);
    kvc_rope_table_free(&p->rope);
    free(p);
    free(c);
}

static const kvc_cache_ops PROBE_OPS = {
    .name = "tc-probe",
    .append = probe_append,
    .attend = probe_attend,
    .end_step = probe_end_step,
    .bytes = probe_bytes,
    .n_tokens = probe_n_tokens,
    .reset = probe_reset,
    .free = probe_free,
};

static kvc_cache *probe_new(const kvc_model *m, const kvc_tc *tc, int cap, kvc_err *err) {
    kvc_cache *c = calloc(1, sizeof *c);
    probe *p = calloc(1, sizeof *p);
    if (!c || !p) {
        free(c), free(p);
        kvc_fail(err, "out of memory");
        return NULL;
    }
    c->ops = &PROBE_OPS;
    c->shape = kvc_model_cache_shape(m, cap);
    c->impl = p;
    p->tc = tc, p->layer = -1, p->L = tc->n_layer, p->K = tc->n_head_kv, p->D = tc->head_dim, p->E = p->K * p->D;
    p->S = tc->sinks, p->cap = cap;
    const size_t lce = (size_t)p->L * cap * p->E;
    p->k = malloc(lce * sizeof(float)), p->v = malloc(lce * sizeof(float));
    p->pos = malloc((size_t)cap * sizeof(int32_t)), p->n = calloc((size_t)p->L, sizeof(int64_t));
    p->kr = malloc((size_t)cap * p->E * sizeof(float));
    p->scr = malloc(kvc_tc_scratch_floats(tc, cap) * sizeof(float));
    p->codes = malloc((size_t)cap * p->E * 2 + 16);
    if (!p->k || !p->v || !p->pos || !p->n || !p->kr || !p->scr || !p->codes ||
        kvc_rope_table_init(&p->rope, p->D, c->shape.rope_base) || kvc_rope_table_reserve(&p->rope, cap)) {
        probe_free(c);
        kvc_fail(err, "out of memory for the calibration probes");
        return NULL;
    }
    return c;
}

/* ---- the probes ------------------------------------------------------------------------- */

/* Runs the windows through c chunk by chunk; with ref == NULL records the log-probabilities
 * of every position after the first chunk into lp (windows, len - chunk, V), else returns the
 * mean KL(ref || c) over those positions. */
static double run_windows(const kvc_model *m, kvc_run *r, kvc_cache *c, const int32_t *ids, const int64_t *starts,
                          int windows, int len, float *lp, float *logits, int record, kvc_err *err) {
    const int V = m->hp.n_vocab;
    double kl = 0;
    int64_t cnt = 0;
    int32_t pos[PROBE_CHUNK];
    for (int w = 0; w < windows; w++) {
        kvc_cache_reset(c);
        for (int t0 = 0; t0 < len; t0 += PROBE_CHUNK) {
            const int nb = len - t0 < PROBE_CHUNK ? len - t0 : PROBE_CHUNK;
            for (int i = 0; i < nb; i++) pos[i] = t0 + i;
            if (kvc_model_forward(m, r, c, ids + starts[w] + t0, pos, nb, logits, 1, err)) return NAN;
            if (t0 == 0) continue; /* the first chunk reads nothing coded */
            for (int i = 0; i < nb; i++) {
                const float *row = logits + (size_t)i * V;
                float *ref = lp + (((size_t)w * (len - PROBE_CHUNK)) + (t0 - PROBE_CHUNK + i)) * V;
                double mx = row[0], s = 0;
                for (int j = 1; j < V; j++) mx = row[j] > mx ? row[j] : mx;
                for (int j = 0; j < V; j++) s += exp(row[j] - mx);
                const double lse = mx + log(s);
                if (record) {
                    for (int j = 0; j < V; j++) ref[j] = (float)(row[j] - lse);
                } else {
                    double d = 0;
                    for (int j = 0; j < V; j++) {
                        const double pr = exp((double)ref[j]);
                        d += pr * ((double)ref[j] - (row[j] - lse));
                    }
                    kl += d, cnt++;
                }
            }
        }
    }
    return record ? 0 : kl / (double)(cnt ? cnt : 1);
}

kvc_tc *kvc_tc_calibrate(const kvc_tc_train_opts *o, const kvc_tc *tc, kvc_err *err) {
    const int L = tc->n_layer, P = L * 2 * tc->groups, dg = tc->heads_per_group * tc->head_dim;
    const int len = o->cal_len, windows = o->cal_samples;
    if (len <= PROBE_CHUNK) {
        kvc_fail(err, "--cal-len %d: the probes need more than %d tokens", len, PROBE_CHUNK);
        return NULL;
    }
    kvc_model *m = kvc_model_load(o->model, err);
    if (!m) return NULL;
    kvc_tc *out = NULL;
    kvc_cache *c = NULL;
    kvc_run *r = NULL;
    int32_t *ids = NULL;
    float *lp = NULL, *logits = NULL;
    double *sens = calloc((size_t)P, sizeof(double));
    double *layer_bits = malloc((size_t)L * 2 * sizeof(double));
    int64_t starts[256];
    char *text = NULL;
    size_t tlen = 0;
    for (int i = 0; i < P; i++)
        if (!tc->parts[i].rd) {
            kvc_fail(err, "calibration needs the fit's rate-distortion curves (fit with keep_rd)");
            kvc_model_free(m);
            free(sens), free(layer_bits);
            return NULL;
        }
    if (!sens || !layer_bits || windows > 256) {
        kvc_fail(err, windows > 256 ? "--cal-samples at most 256" : "out of memory");
        goto done;
    }
    if (strcmp(m->fingerprint, tc->model_fingerprint)) {
        kvc_fail(err, "--model %s (fingerprint %s) is not the model of the capture (%s)", o->model, m->fingerprint,
                 tc->model_fingerprint);
        goto done;
    }
    if (kvc_read_file(o->cal_text, &text, &tlen, err)) goto done;
    int64_t cap = (int64_t)tlen + 16, n;
    if (!(ids = malloc((size_t)cap * sizeof(int32_t)))) {
        kvc_fail(err, "out of memory");
        goto done;
    }
    if ((n = kvc_tokenizer_encode(m->tok, text, tlen, 0, ids, cap, err)) < 0) goto done;
    if (n < (int64_t)len * windows) {
        kvc_fail(err, "--cal-text has %lld tokens, fewer than %d probe sequences of %d", (long long)n, windows, len);
        goto done;
    }
    for (int w = 0; w < windows; w++) starts[w] = (n - len) * w / (windows > 1 ? windows - 1 : 1);
    const int V = m->hp.n_vocab;
    lp = malloc((size_t)windows * (len - PROBE_CHUNK) * V * sizeof(float));
    logits = malloc((size_t)PROBE_CHUNK * V * sizeof(float));
    if (!lp || !logits || !(c = probe_new(m, tc, len, err)) || !(r = kvc_run_new(m, PROBE_CHUNK, err))) {
        if (!err->msg[0]) kvc_fail(err, "out of memory");
        goto done;
    }
    probe *pp = c->impl;
    /* the reference, then one probe per part: its KL per unit of the distortion it has now */
    if (isnan(run_windows(m, r, c, ids, starts, windows, len, lp, logits, 1, err))) goto done;
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 2; k++) {
            pp->layer = l, pp->kind = k;
            double kl = run_windows(m, r, c, ids, starts, windows, len, lp, logits, 0, err);
            if (isnan(kl)) goto done;
            sens[l * 2 + k] = kl;
            if (o->report) fprintf(o->report, "calibration: layer %2d %s coded alone: KL %.5f\n", l, k ? "V" : "K", kl);
            if (o->progress) kvc_progress_draw("kl probes", l * 2 + k + 1, L * 2, "part", 0);
        }
    if (o->progress) kvc_progress_end();
    /* the distortion each part has at its bits now, from its rate-distortion curve */
    kvc_tc_train_opts o2 = *o;
    o2.keep_rd = 0;
    int64_t total = 0, *bud = calloc((size_t)L * 2, sizeof(int64_t));
    double *w = malloc((size_t)L * 2 * sizeof(double));
    if (!bud || !w) {
        free(bud), free(w);
        kvc_fail(err, "out of memory");
        goto done;
    }
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 2; k++) {
            double d = 0;
            for (int g = 0; g < tc->groups; g++) {
                const kvc_tc_part *p = &tc->parts[kvc_tc_index(tc, l, k, g)];
                int64_t bg = 0;
                for (int i = 0; i < dg; i++) bg += p->bits[i];
                d += p->rd[bg];
                bud[l * 2 + k] += bg;
            }
            total += bud[l * 2 + k];
            /* KL per unit of weighted distortion; a floor keeps a part that measured ~0 in play */
            w[l * 2 + k] = fmax(sens[l * 2 + k], 1e-7) / fmax(d, 1e-30);
            bud[l * 2 + k] = 0;
        }
    /* greedy over every part: the next bit goes where w * (distortion fall) is largest */
    for (int64_t spent = 0; spent < total; spent++) {
        int best = -1;
        double gain = 0;
        for (int i = 0; i < L * 2; i++) {
            if (bud[i] >= 8 * (int64_t)dg * tc->groups) continue;
            const double *tr = tc->parts[kvc_tc_index(tc, i / 2, i % 2, 0)].rd;
            const int64_t b = bud[i] / tc->groups;
            const double g = w[i] * (tr[b] - tr[b + 1]) * tc->groups;
            if (best < 0 || g > gain) best = i, gain = g;
        }
        if (best < 0) break;
        bud[best] += tc->groups;
        spent += tc->groups - 1;
    }
    for (int i = 0; i < L * 2; i++) layer_bits[i] = (double)bud[i] / (dg * tc->groups);
    free(bud), free(w);
    o2.layer_bits = layer_bits;
    o2.report = o->report;
    if (o->report) {
        fprintf(o->report, "calibration: bits per coefficient by layer (K / V):\n");
        for (int l = 0; l < L; l++) fprintf(o->report, "  layer %2d: %.2f / %.2f\n", l, layer_bits[l * 2], layer_bits[l * 2 + 1]);
    }
    if (!(out = kvc_tc_fit(&o2, err))) goto done;
    snprintf(out->calibrated, sizeof out->calibrated, "kl");
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 2; k++)
            for (int g = 0; g < out->groups; g++) out->parts[kvc_tc_index(out, l, k, g)].kl_sens = sens[l * 2 + k];
done:
    if (c) kvc_cache_free(c);
    kvc_run_free(r);
    free(sens), free(layer_bits), free(ids), free(lp), free(logits), free(text);
    kvc_model_free(m);
    return out;
}
