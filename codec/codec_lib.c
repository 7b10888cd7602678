/* codec_lib.c - the codec library for other engines (kvc/codec.h): a thin, self-contained
 * face over the autoencoder representation (codec/repr_ae.c), the transform codec
 * (codec/tc.c), the LSH code (kernels/lsh.c) and the eviction choice (kvc_kvcache_select),
 * with char-buffer errors so a caller needs no kvcodec header but codec.h. */
#include "kvc/codec.h"
#include "kvc/checkpoint.h"
#include "kvc/kvcache.h"
#include "kvc/lsh.h"
#include "kvc/tc.h"

#include "internal/h5util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kvcl_codec {
    kvc_repr *repr;  /* an autoencoder, or NULL */
    kvc_tc *tc;      /* a transform codec, or NULL */
    kvcl_info info;
    float *tmp;      /* (D) one row of scratch for heads decoded from the layer below */
};

/* Copies a kvc_err into the caller's buffer and returns -1. */
static int put_err(char *err, const kvc_err *e) {
    if (err) snprintf(err, KVCL_ERR_SIZE, "%s", e->msg);
    return -1;
}

/* 1 when path is a transform codec checkpoint (its root format attribute says so). */
static int is_transform(const char *path) {
    kvc_h5_quiet();
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return 0;
    char fmt[64] = "";
    int yes = !kvc_h5_get_str(f, "format", fmt, sizeof fmt) && !strcmp(fmt, KVC_TC_FORMAT);
    H5Fclose(f);
    return yes;
}

/* Opens a transform codec into c. */
static kvcl_codec *open_tc(const char *path, char *err) {
    kvc_err e = {{0}};
    kvc_tc *tc = kvc_tc_load(path, &e);
    if (!tc) {
        put_err(err, &e);
        return NULL;
    }
    kvcl_codec *c = calloc(1, sizeof *c);
    if (!c) {
        kvc_tc_free(tc);
        if (err) snprintf(err, KVCL_ERR_SIZE, "out of memory");
        return NULL;
    }
    c->tc = tc;
    kvcl_info *in = &c->info;
    in->n_layer = tc->n_layer, in->n_head_kv = tc->n_head_kv, in->head_dim = tc->head_dim;
    snprintf(in->model_name, sizeof in->model_name, "%s", tc->model_name);
    snprintf(in->model_fingerprint, sizeof in->model_fingerprint, "%s", tc->model_fingerprint);
    snprintf(in->storage, sizeof in->storage, "coded");
    snprintf(in->kind, sizeof in->kind, "transform");
    in->sinks = tc->sinks;
    in->mean_bits = kvc_tc_mean_bits(tc);
    return c;
}

struct kvcl_lsh {
    kvc_simhash h;
};

kvcl_codec *kvcl_open(const char *path, const char *storage, int reuse, char *err) {
    kvc_err e = {{0}};
    if (!path) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "kvcl_open: no path");
        return NULL;
    }
    if (is_transform(path)) return open_tc(path, err);
    if (!storage) storage = "f16";
    if (strcmp(storage, "f32") && strcmp(storage, "f16") && strcmp(storage, "int8") && strcmp(storage, "int4")) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "kvcl_open: storage '%s' is not f32, f16, int8 or int4", storage);
        return NULL;
    }
    kvc_codec *ck = kvc_codec_load(path, &e); /* for the shape; the representation loads it again */
    if (!ck) {
        put_err(err, &e);
        return NULL;
    }
    kvcl_codec *c = calloc(1, sizeof *c);
    if (!c) {
        kvc_codec_free(ck);
        if (err) snprintf(err, KVCL_ERR_SIZE, "out of memory");
        return NULL;
    }
    kvcl_info *in = &c->info;
    in->n_layer = ck->meta.n_layer, in->n_head_kv = ck->meta.n_head_kv, in->head_dim = ck->meta.head_dim;
    in->latent = ck->meta.ae.latent;
    snprintf(in->model_name, sizeof in->model_name, "%s", ck->meta.model_name);
    snprintf(in->model_fingerprint, sizeof in->model_fingerprint, "%s", ck->meta.model_fingerprint);
    snprintf(in->storage, sizeof in->storage, "%s", storage);
    snprintf(in->kind, sizeof in->kind, "autoencoder");
    kvc_codec_free(ck);
    char spec[1200];
    if (strchr(path, ',') || strlen(path) > 1000) {
        free(c);
        if (err) snprintf(err, KVCL_ERR_SIZE, "kvcl_open: the path may not contain ',' and must be shorter than 1000 bytes");
        return NULL;
    }
    snprintf(spec, sizeof spec, "ae:%s,%s,reuse=%s", path, storage, reuse ? "on" : "off");
    kvc_repr_env env = {{in->n_layer, in->n_head_kv, in->n_head_kv, in->head_dim, 10000.0f, 1}, NULL};
    c->repr = kvc_repr_new(spec, &env, &e);
    c->tmp = malloc((size_t)in->head_dim * sizeof(float));
    if (!c->repr || !c->tmp) {
        if (!c->repr) put_err(err, &e);
        else if (err) snprintf(err, KVCL_ERR_SIZE, "out of memory");
        kvcl_close(c);
        return NULL;
    }
    return c;
}

void kvcl_close(kvcl_codec *c) {
    if (!c) return;
    kvc_repr_free(c->repr);
    kvc_tc_free(c->tc);
    free(c->tmp);
    free(c);
}

void kvcl_get_info(const kvcl_codec *c, kvcl_info *info) { *info = c->info; }

int kvcl_check_model(const kvcl_codec *c, const char *fingerprint, int n_layer, int n_head_kv, int head_dim,
                     char *err) {
    const kvcl_info *in = &c->info;
    if (fingerprint && strcmp(fingerprint, in->model_fingerprint)) {
        if (err)
            snprintf(err, KVCL_ERR_SIZE, "codec made for model %s (fingerprint %s), not for fingerprint %s",
                     in->model_name, in->model_fingerprint, fingerprint);
        return -1;
    }
    if (n_layer != in->n_layer || n_head_kv != in->n_head_kv || head_dim != in->head_dim) {
        if (err)
            snprintf(err, KVCL_ERR_SIZE, "codec shape %d layers x %d kv heads x %d differs from the model's %d x %d x %d",
                     in->n_layer, in->n_head_kv, in->head_dim, n_layer, n_head_kv, head_dim);
        return -1;
    }
    return 0;
}

int kvcl_is_reused(const kvcl_codec *c, int layer, int head, int kind) {
    if (layer < 0 || layer >= c->info.n_layer || head < 0 || head >= c->info.n_head_kv || (kind != 0 && kind != 1))
        return 0;
    if (c->tc) return 0;
    const kvc_repr *r = c->repr;
    return r->ops->reused && r->ops->reused(r, layer, head, kind);
}

size_t kvcl_row_bytes(const kvcl_codec *c, int layer, int head, int kind) {
    if (layer < 0 || layer >= c->info.n_layer || head < 0 || head >= c->info.n_head_kv || (kind != 0 && kind != 1))
        return 0;
    if (c->tc) return 0; /* a transform codec's rows are per token: kvcl_token_bytes */
    if (kvcl_is_reused(c, layer, head, kind)) return 0;
    return c->repr->ops->row_bytes(c->repr, layer, head, kind);
}

size_t kvcl_token_bytes(const kvcl_codec *c, int layer, int kind) {
    if (c->tc) {
        if (layer < 0 || layer >= c->info.n_layer || (kind != 0 && kind != 1)) return 0;
        return (size_t)kvc_tc_row_bytes(c->tc, layer, kind);
    }
    size_t s = 0;
    for (int h = 0; h < c->info.n_head_kv; h++) s += kvcl_row_bytes(c, layer, h, kind);
    return s;
}

/* Checks the arguments every block call shares. */
static int check_args(const kvcl_codec *c, int layer, int kind, int n, const void *a, const void *b, char *err) {
    if (layer < 0 || layer >= c->info.n_layer || (kind != 0 && kind != 1) || n < 0 || (n > 0 && (!a || !b))) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "kvcl: bad arguments (layer %d of %d, kind %d, n %d)", layer,
                          c->info.n_layer, kind, n);
        return -1;
    }
    return 0;
}

int kvcl_encode(const kvcl_codec *c, int layer, int kind, const float *x, int n, uint8_t *out, char *err) {
    if (check_args(c, layer, kind, n, x, out, err)) return -1;
    if (c->tc) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "kvcl_encode: a transform codec predicts from decoded rows: use kvcl_encode_ctx");
        return -1;
    }
    const int K = c->info.n_head_kv, D = c->info.head_dim;
    const size_t tb = kvcl_token_bytes(c, layer, kind);
    size_t off = 0;
    for (int h = 0; h < K; h++) {
        size_t rb = kvcl_row_bytes(c, layer, h, kind);
        if (!rb) continue;
        /* rows of head h are token-major in x; the representation writes them contiguously,
         * so encode one token at a time into its slot of out */
        for (int t = 0; t < n; t++)
            c->repr->ops->encode(c->repr, layer, h, kind, x + ((size_t)t * K + h) * D, D, 1, out + (size_t)t * tb + off,
                                 NULL);
        off += rb;
    }
    return 0;
}

int kvcl_decode(const kvcl_codec *c, int layer, int kind, const uint8_t *in, int n, const float *below, float *y,
                char *err) {
    if (check_args(c, layer, kind, n, in, y, err)) return -1;
    if (c->tc) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "kvcl_decode: a transform codec predicts from decoded rows: use kvcl_decode_ctx");
        return -1;
    }
    const int K = c->info.n_head_kv, D = c->info.head_dim;
    const size_t tb = kvcl_token_bytes(c, layer, kind);
    size_t off = 0;
    for (int h = 0; h < K; h++) {
        size_t rb = kvcl_row_bytes(c, layer, h, kind);
        if (!rb) {
            if (!below) {
                if (err)
                    snprintf(err, KVCL_ERR_SIZE, "kvcl_decode: layer %d head %d is reused from layer %d: pass its decoded rows",
                             layer, h, layer - 1);
                return -1;
            }
            for (int t = 0; t < n; t++)
                c->repr->ops->predict(c->repr, layer, h, kind, below + ((size_t)t * K + h) * D, 1,
                                      y + ((size_t)t * K + h) * D);
            continue;
        }
        for (int t = 0; t < n; t++)
            c->repr->ops->decode(c->repr, layer, h, kind, in + (size_t)t * tb + off, NULL, 1, y + ((size_t)t * K + h) * D);
        off += rb;
    }
    return 0;
}

int kvcl_needs(const kvcl_codec *c, int layer, int kind) {
    if (layer < 0 || layer >= c->info.n_layer || (kind != 0 && kind != 1)) return 0;
    if (c->tc) {
        int m = 0;
        for (int g = 0; g < c->tc->groups; g++) m |= c->tc->parts[kvc_tc_index(c->tc, layer, kind, g)].inputs;
        return (m & KVC_TC_IN_KPREV ? KVCL_NEED_BELOW_K : 0) | (m & KVC_TC_IN_KCUR ? KVCL_NEED_THIS_K : 0) |
               (m & KVC_TC_IN_VPREV ? KVCL_NEED_BELOW_V : 0);
    }
    for (int h = 0; h < c->info.n_head_kv; h++)
        if (kvcl_is_reused(c, layer, h, kind)) return kind ? KVCL_NEED_BELOW_V : KVCL_NEED_BELOW_K;
    return 0;
}

/* -1 with err when ctx lacks a row (layer, kind) needs. */
static int check_ctx(const kvcl_codec *c, int layer, int kind, const kvcl_context *ctx, char *err) {
    const int need = kvcl_needs(c, layer, kind);
    const char *miss = (need & KVCL_NEED_BELOW_K) && (!ctx || !ctx->below_k)   ? "below_k (the layer below's keys)"
                       : (need & KVCL_NEED_BELOW_V) && (!ctx || !ctx->below_v) ? "below_v (the layer below's values)"
                       : (need & KVCL_NEED_THIS_K) && (!ctx || !ctx->this_k)   ? "this_k (this layer's decoded keys)"
                                                                               : NULL;
    if (miss) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "kvcl: layer %d %s predicts from %s: pass it in the context", layer,
                          kind ? "values" : "keys", miss);
        return -1;
    }
    return 0;
}

int kvcl_encode_ctx(const kvcl_codec *c, int layer, int kind, const float *x, int n, const kvcl_context *ctx,
                    uint8_t *out, float *decoded, char *err) {
    if (check_args(c, layer, kind, n, x, out, err) || check_ctx(c, layer, kind, ctx, err)) return -1;
    if (!c->tc) {
        if (kvcl_encode(c, layer, kind, x, n, out, err)) return -1;
        return decoded ? kvcl_decode_ctx(c, layer, kind, out, n, ctx, decoded, err) : 0;
    }
    const size_t e = (size_t)c->info.n_head_kv * c->info.head_dim;
    float *scr = malloc(kvc_tc_scratch_floats(c->tc, n) * sizeof(float)), *own = NULL;
    if (!decoded) decoded = own = malloc((size_t)(n > 0 ? n : 1) * e * sizeof(float));
    if (!scr || !decoded) {
        free(scr), free(own);
        if (err) snprintf(err, KVCL_ERR_SIZE, "out of memory");
        return -1;
    }
    kvc_tc_encode(c->tc, layer, kind, x, ctx ? ctx->below_k : NULL, ctx ? ctx->below_v : NULL, ctx ? ctx->this_k : NULL,
                  n, out, decoded, scr);
    free(scr), free(own);
    return 0;
}

int kvcl_decode_ctx(const kvcl_codec *c, int layer, int kind, const uint8_t *in, int n, const kvcl_context *ctx,
                    float *y, char *err) {
    if (check_args(c, layer, kind, n, in, y, err) || check_ctx(c, layer, kind, ctx, err)) return -1;
    if (!c->tc) return kvcl_decode(c, layer, kind, in, n, ctx ? (kind ? ctx->below_v : ctx->below_k) : NULL, y, err);
    float *scr = malloc(kvc_tc_scratch_floats(c->tc, n) * sizeof(float));
    if (!scr) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "out of memory");
        return -1;
    }
    kvc_tc_decode(c->tc, layer, kind, in, ctx ? ctx->below_k : NULL, ctx ? ctx->below_v : NULL, ctx ? ctx->this_k : NULL,
                  n, y, scr);
    free(scr);
    return 0;
}

kvcl_lsh *kvcl_lsh_new(int dim, int bits, uint64_t seed, char *err) {
    kvc_err e = {{0}};
    kvcl_lsh *h = calloc(1, sizeof *h);
    if (!h) {
        if (err) snprintf(err, KVCL_ERR_SIZE, "out of memory");
        return NULL;
    }
    if (kvc_simhash_init(&h->h, dim, bits, seed, &e)) {
        put_err(err, &e);
        free(h);
        return NULL;
    }
    return h;
}

void kvcl_lsh_free(kvcl_lsh *h) {
    if (!h) return;
    kvc_simhash_free(&h->h);
    free(h);
}

void kvcl_lsh_hash(const kvcl_lsh *h, const float *x, int64_t ld, int64_t n, uint64_t *codes) {
    kvc_simhash_codes_cpu(&h->h, x, ld, n, codes);
}

void kvcl_lsh_score(const uint64_t *codes, int64_t n, uint64_t probe, float *score) {
    for (int64_t i = 0; i < n; i++) score[i] = (float)__builtin_popcountll(codes[i] ^ probe);
}

int64_t kvcl_select(const float *score, int64_t n, int64_t keep, int sinks, int window, uint8_t *evict) {
    return kvc_kvcache_select(score, n, keep, sinks, window, evict);
}
