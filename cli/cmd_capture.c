/* cmd_capture.c - `kvcodec capture`: runs the model over a text in windows of --ctx tokens
 * (each from an empty cache) and streams every chosen layer's pre-RoPE K, V and Q to an HDF5
 * KV dataset (docs/formats.md). Memory stays flat: one window is buffered at a time. */
#include "cli.h"

#include "kvc/dataset.h"
#include "kvc/eval.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

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
static int parse_layers(const char *s, int n_layer, int *out) {
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

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

int cmd_capture(int argc, char **argv) {
    const char *model = cli_default_model(), *text = "data/corpora/train-python-docs.txt", *out = NULL;
    const char *dtype = "f16", *layers_s = "all";
    int ctx = 512, threads = cli_default_threads(), chunk = 256, gzip = 0;
    uint64_t n_tokens = 65536;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"text", ARG_STR, &text, "FILE", "UTF-8 text to run (default: data/corpora/train-python-docs.txt)", 0},
        {"tokens", ARG_U64, &n_tokens, "N", "tokens to capture from the start of the text (default 65536)", 0},
        {"out", ARG_STR, &out, "FILE.h5", "KV dataset to write", 1},
        {"dtype", ARG_STR, &dtype, "f16|f32", "storage precision (default f16)", 0},
        {"layers", ARG_STR, &layers_s, "LIST", "layers to store: all, or e.g. 0,5,10-12 (default all)", 0},
        {"ctx", ARG_INT, &ctx, "N", "window length; each window starts from an empty cache (default 512)", 0},
        {"chunk", ARG_INT, &chunk, "N", "HDF5 chunk length in tokens (default 256)", 0},
        {"gzip", ARG_INT, &gzip, "0-9", "gzip level with byte shuffle; 0 = none (default 0)", 0},
        ARG_THREADS(&threads, "all cores"),
        {0},
    };
    int rc = args_parse("capture", "--out kv.h5 [--text T] [--tokens N] [--dtype f16|f32] [--layers LIST]",
                        "Runs the model over the text and writes every chosen layer's pre-RoPE K, V and Q\n"
                        "to an HDF5 KV dataset (schema: docs/formats.md).",
                        specs, argc, argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (strcmp(dtype, "f16") && strcmp(dtype, "f32")) return cli_error("capture", "--dtype must be f16 or f32"), 2;
    if (ctx < 2 || chunk < 1 || gzip < 0 || gzip > 9 || threads < 1 || n_tokens < 1)
        return cli_error("capture", "need --ctx >= 2, --chunk >= 1, --gzip 0..9, --threads >= 1, --tokens >= 1"), 2;
    kvc_kv_info info = {0};
    kvc_model *m;
    int32_t *ids;
    int64_t n;
    if (cli_text_and_model(text, model, threads, info.corpus_sha256, &m, &ids, &n)) return 1;
    if ((int64_t)n_tokens > n) {
        fprintf(stderr, "kvcodec capture: note: the text has only %lld tokens; capturing all of them\n", (long long)n);
        n_tokens = (uint64_t)n;
    }
    const kvc_hparams *hp = &m->hp;
    info.n_layers_stored = parse_layers(layers_s, hp->n_layer, info.layers);
    if (info.n_layers_stored <= 0) {
        cli_error("capture", "bad --layers '%s' (the model has layers 0..%d)", layers_s, hp->n_layer - 1);
        free(ids); kvc_model_free(m); /* hp points into m: report first */
        return 2;
    }
    snprintf(info.model_name, sizeof info.model_name, "%s", hp->name);
    snprintf(info.model_fingerprint, sizeof info.model_fingerprint, "%s", m->fingerprint);
    snprintf(info.corpus_name, sizeof info.corpus_name, "%s", base_name(text));
    snprintf(info.dtype, sizeof info.dtype, "%s", dtype);
    info.n_layer = hp->n_layer;
    info.n_head = hp->n_head;
    info.n_head_kv = hp->n_head_kv;
    info.head_dim = hp->head_dim;
    info.rope_base = hp->rope_base;
    info.ctx = ctx;

    kvc_err err = {{0}};
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
        cb.k[j] = malloc((size_t)ctx * cb.rk * sizeof(float));
        cb.v[j] = malloc((size_t)ctx * cb.rk * sizeof(float));
        cb.q[j] = malloc((size_t)ctx * cb.rq * sizeof(float));
        oom = !cb.k[j] || !cb.v[j] || !cb.q[j];
    }
    kvc_cache_shape shape = kvc_model_cache_shape(m, ctx);
    kvc_cache *c = oom ? NULL : kvc_cache_full_new(&shape, &err);
    kvc_run *r = c ? kvc_run_new(m, ctx, &err) : NULL;
    int32_t *pos = malloc((size_t)ctx * sizeof *pos);
    kvc_kv_writer *w = NULL;
    if (!r || !pos) { rc = cli_error("capture", "%s", err.msg[0] ? err.msg : "out of memory"); goto done; }
    kvc_run_set_tap(r, capture_tap, &cb);
    w = kvc_kv_writer_open(out, &info, chunk, gzip, &err);
    if (!w) { rc = cli_error("capture", "%s", err.msg); goto done; }
    for (int i = 0; i < ctx; i++) pos[i] = i;
    double t0 = kvc_now();
    int show = isatty(2);
    for (int64_t w0 = 0; w0 < (int64_t)n_tokens; w0 += ctx) {
        int len_w = (int)((int64_t)n_tokens - w0 < ctx ? (int64_t)n_tokens - w0 : ctx);
        kvc_cache_reset(c);
        if (kvc_model_forward(m, r, c, ids + w0, pos, len_w, NULL, 0, &err) ||
            kvc_kv_writer_append(w, ids + w0, pos, len_w, (const float *const *)cb.k, (const float *const *)cb.v,
                             (const float *const *)cb.q, &err)) {
            if (show) kvc_progress_end();
            kvc_kv_writer_close(w, 0, NULL);
            w = NULL;
            rc = cli_error("capture", "%s (nothing was written to %s)", err.msg, out);
            goto done;
        }
        if (show) kvc_progress_draw("capture", (double)(w0 + len_w), (double)n_tokens, "tok", t0);
    }
    if (show) kvc_progress_end();
    if (kvc_kv_writer_close(w, 1, &err)) { w = NULL; rc = cli_error("capture", "%s", err.msg); goto done; }
    w = NULL;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double el = kvc_now() - t0;
    printf("captured %llu tokens x %d layers (K, V, Q; %s) from %s into %s in %.1f s (%.0f tok/s); peak RSS %.0f MiB\n",
           (unsigned long long)n_tokens, J, dtype, info.corpus_name, out, el, (double)n_tokens / el,
           ru.ru_maxrss / 1024.0);
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
    free(cb.k); free(cb.v); free(cb.q);
    free(ids);
    kvc_model_free(m);
    return rc;
}
