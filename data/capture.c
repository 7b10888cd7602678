/* capture.c - running a model over a text and streaming every chosen layer's pre-RoPE K, V
 * and Q to an HDF5 KV dataset (docs/formats.md), in windows of ctx tokens each from an empty
 * cache. Memory stays flat: one window is buffered at a time. */
#include "kvc/dataset.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Per-window buffers the tap fills, for stored layer j at the window offset of the batch. */
typedef struct {
    int layer_slot[KVC_MAX_LAYERS]; /* model layer -> stored index, or -1 */
    float **k, **v, **q;            /* [j] (ctx, K*D) / (ctx, H*D) */
    size_t rk, rq;                  /* floats per token */
} capture_bufs;

static int capture_tap(void *ctx, int layer, const float *q, const float *k, const float *v, const int32_t *pos,
                       int n, kvc_err *err) {
    (void)err;
    capture_bufs *b = ctx;
    int j = layer < KVC_MAX_LAYERS ? b->layer_slot[layer] : -1;
    if (j < 0) return 0;
    size_t at = (size_t)pos[0]; /* positions restart at 0 in every window; a window is one batch */
    memcpy(b->k[j] + at * b->rk, k, (size_t)n * b->rk * sizeof(float));
    memcpy(b->v[j] + at * b->rk, v, (size_t)n * b->rk * sizeof(float));
    memcpy(b->q[j] + at * b->rq, q, (size_t)n * b->rq * sizeof(float));
    return 0;
}

/* Parses "all" or a list like "0,3,10-12" into ascending unique layers; returns the count or -1. */
int kvc_parse_layers(const char *s, int n_layer, int *out) {
    if (!s || n_layer < 1 || n_layer > KVC_MAX_LAYERS) return -1;
    unsigned char on[KVC_MAX_LAYERS] = {0};
    if (!strcmp(s, "all")) {
        for (int i = 0; i < n_layer; i++) on[i] = 1;
    } else {
        const char *p = s;
        while (*p) {
            char *e;
            long a = strtol(p, &e, 10), b = a;
            if (e == p) return -1;
            if (*e == '-') {
                const char *p2 = e + 1;
                b = strtol(p2, &e, 10);
                if (e == p2) return -1;
            }
            if (a < 0 || b < a || b >= n_layer) return -1;
            for (long i = a; i <= b; i++) on[i] = 1;
            if (*e == ',') e++;
            else if (*e) return -1;
            p = e;
        }
    }
    int n = 0;
    for (int i = 0; i < n_layer && i < KVC_MAX_LAYERS; i++)
        if (on[i]) out[n++] = i;
    return n;
}

int kvc_capture(const kvc_model *m, const int32_t *ids, int64_t n_tokens, const kvc_capture_opts *o,
                kvc_capture_result *res, kvc_err *err) {
    const kvc_hparams *hp = &m->hp;
    const int ctx = o->ctx;
    if (ctx < 2 || o->chunk < 1 || o->gzip < 0 || o->gzip > 9 || n_tokens < 1)
        return kvc_fail(err, "capture: need ctx >= 2, chunk >= 1, gzip 0..9 and at least one token");
    if (strcmp(o->dtype, "f16") && strcmp(o->dtype, "f32")) return kvc_fail(err, "capture: dtype must be f16 or f32");
    kvc_kv_info info = {0};
    info.n_layers_stored = kvc_parse_layers(o->layers ? o->layers : "all", hp->n_layer, info.layers);
    if (info.n_layers_stored <= 0)
        return kvc_fail(err, "bad --layers '%s' (the model has layers 0..%d)", o->layers, hp->n_layer - 1);
    snprintf(info.model_name, sizeof info.model_name, "%s", hp->name);
    snprintf(info.model_fingerprint, sizeof info.model_fingerprint, "%s", m->fingerprint);
    snprintf(info.corpus_name, sizeof info.corpus_name, "%s", o->corpus_name ? o->corpus_name : "");
    snprintf(info.corpus_sha256, sizeof info.corpus_sha256, "%s", o->corpus_sha256 ? o->corpus_sha256 : "");
    snprintf(info.dtype, sizeof info.dtype, "%s", o->dtype);
    info.n_layer = hp->n_layer;
    info.n_head = hp->n_head;
    info.n_head_kv = hp->n_head_kv;
    info.head_dim = hp->head_dim;
    info.rope_base = hp->rope_base;
    info.ctx = ctx;

    int rc = 0;
    capture_bufs cb = {0};
    const int J = info.n_layers_stored;
    cb.rk = (size_t)hp->n_head_kv * hp->head_dim;
    cb.rq = (size_t)hp->n_head * hp->head_dim;
    for (int i = 0; i < KVC_MAX_LAYERS; i++) cb.layer_slot[i] = -1;
    cb.k = calloc((size_t)J, sizeof(float *));
    cb.v = calloc((size_t)J, sizeof(float *));
    cb.q = calloc((size_t)J, sizeof(float *));
    int oom = !cb.k || !cb.v || !cb.q;
    for (int j = 0; j < J && !oom; j++) {
        cb.layer_slot[info.layers[j]] = j;
        cb.k[j] = kvc_malloc_array((size_t)ctx * cb.rk, sizeof(float));
        cb.v[j] = kvc_malloc_array((size_t)ctx * cb.rk, sizeof(float));
        cb.q[j] = kvc_malloc_array((size_t)ctx * cb.rq, sizeof(float));
        oom = !cb.k[j] || !cb.v[j] || !cb.q[j];
    }
    kvc_cache_shape shape = kvc_model_cache_shape(m, ctx);
    kvc_cache *c = oom ? NULL : kvc_cache_full_new(&shape, err);
    kvc_run *r = c ? kvc_run_new(m, ctx, err) : NULL;
    int32_t *pos = malloc((size_t)ctx * sizeof *pos);
    kvc_kv_writer *w = NULL;
    if (!r || !pos) {
        rc = oom || !pos ? kvc_fail(err, "out of memory for capture buffers of %d tokens", ctx) : -1;
        goto done;
    }
    kvc_run_set_tap(r, capture_tap, &cb);
    w = kvc_kv_writer_open(o->out, &info, o->chunk, o->gzip, err);
    if (!w) { rc = -1; goto done; }
    for (int i = 0; i < ctx; i++) pos[i] = i;
    double t0 = kvc_now();
    for (int64_t w0 = 0; w0 < n_tokens; w0 += ctx) {
        int len_w = (int)(n_tokens - w0 < ctx ? n_tokens - w0 : ctx);
        kvc_cache_reset(c);
        if (kvc_model_forward(m, r, c, ids + w0, pos, len_w, NULL, 0, err) ||
            kvc_kv_writer_append(w, ids + w0, pos, len_w, (const float *const *)cb.k, (const float *const *)cb.v,
                                 (const float *const *)cb.q, err)) {
            if (o->progress) kvc_progress_end();
            kvc_kv_writer_close(w, 0, NULL);
            w = NULL;
            size_t l = strlen(err->msg);
            snprintf(err->msg + l, sizeof err->msg - l, " (nothing was written to %s)", o->out);
            rc = -1;
            goto done;
        }
        if (o->progress) kvc_progress_draw("capture", (double)(w0 + len_w), (double)n_tokens, "tok", t0);
    }
    if (o->progress) kvc_progress_end();
    if (kvc_kv_writer_close(w, 1, err)) { w = NULL; rc = -1; goto done; }
    w = NULL;
    if (res) {
        res->n_tokens = n_tokens;
        res->n_layers = J;
        res->seconds = kvc_now() - t0;
    }
done:
    if (w) kvc_kv_writer_close(w, 0, NULL);
    free(pos);
    kvc_run_free(r);
    kvc_cache_free(c);
    for (int j = 0; j < J; j++) {
        if (cb.k) free(cb.k[j]);
        if (cb.v) free(cb.v[j]);
        if (cb.q) free(cb.q[j]);
    }
    free(cb.k), free(cb.v), free(cb.q);
    return rc;
}
