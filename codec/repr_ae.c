/* repr_ae.c - the autoencoder representation of the KV cache (kvc/kvcache.h): each K or V row
 * of a KV head is stored as the latent of a trained codec checkpoint (kvc/checkpoint.h), kept
 * as f32, f16 or KIVI-style int8/int4 per token, and read back through the decoder. Items the
 * checkpoint's cross-layer reuse plan chose are not stored at all but predicted from layer-1.
 * Layers the checkpoint did not train fall back to f16 rows (2 bytes a value), so a codec made
 * for a few layers still serves the whole model. A linear value decoder also lets attention
 * run in latent space (latent_dim / decode_latent / lift).
 * Letters: L layers, K kv heads, D head_dim, R latent, N rows in a call. */
#include "kvc/checkpoint.h"
#include "kvc/kvcache.h"
#include "repr_quant.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Floats in each of the two stack scratch buffers of encode/decode; rows go through the
 * networks in chunks of AE_SCRATCH / (widest layer) rows (>= 4, since widths <= REPR_MAX_DIM). */
#define AE_SCRATCH 4096

enum { LAT_F32 = 0, LAT_F16, LAT_INT8, LAT_INT4 };
static const char *const LAT_NAMES[] = {"f32", "f16", "int8", "int4"};

typedef struct {
    kvc_codec *c;  /* owned */
    int d, r;      /* D, R */
    int lat;       /* LAT_* */
    int bits;      /* 8 or 4 for the int forms */
    int group;     /* latent channels per quantisation group (int forms) */
    int reuse;     /* 1: follow the checkpoint's reuse plan */
    int chunk;     /* rows per pass through a network */
    float **wt;    /* (nets * 4): [net * 4 + half * 2 + layer] that layer's W transposed (in, out)
                    * when it has no activation (the fast path), else NULL */
    int form[2];   /* per kind (keys=, values=): FORM_AE through the codec, or stored without it */
} ae_repr;

/* How a kind is stored: through the codec, or (keys=/values= options) without it, as f16 or
 * per-token int8 (groups of 64 channels) / int4 (groups of 32), KIVI's value form. */
enum { FORM_AE = 0, FORM_F16, FORM_INT8, FORM_INT4 };
static const char *const FORM_NAMES[] = {"ae", "f16", "int8", "int4"};

static int prepare_fast_path(ae_repr *a, kvc_err *err);
static void release(ae_repr *a);

/* The index into c->ae of the network of (layer, kind, head). */
static int net_index(const ae_repr *a, int layer, int kind, int head) {
    return codec_index(a->c, layer, kind, a->c->slots > 1 ? head : 0);
}

/* The exported network of (layer, kind, head): shared by the heads unless per_head. */
static const ae_export *net_of(const ae_repr *a, int layer, int kind, int head) {
    return &a->c->ae[net_index(a, layer, kind, head)];
}

/* Bytes of one stored latent. */
static size_t lat_bytes(const ae_repr *a) {
    switch (a->lat) {
    case LAT_F32: return (size_t)a->r * 4;
    case LAT_F16: return (size_t)a->r * 2;
    default: return kvc_repr_qrow_bytes(a->bits, a->r, a->group);
    }
}

/* Stores latent z (R) into row. */
static void lat_encode(const ae_repr *a, const float *z, uint8_t *row) {
    if (a->lat == LAT_F32) {
        memcpy(row, z, (size_t)a->r * 4);
    } else if (a->lat == LAT_F16) {
        for (int j = 0; j < a->r; j++) {
            uint16_t h = kvc_f32_to_f16(z[j]);
            memcpy(row + 2 * j, &h, 2);
        }
    } else {
        kvc_repr_qrow_encode(z, a->r, a->group, a->bits, row);
    }
}

/* Reads a stored latent back into z (R). */
static void lat_decode(const ae_repr *a, const uint8_t *row, float *z) {
    if (a->lat == LAT_F32) {
        memcpy(z, row, (size_t)a->r * 4);
    } else if (a->lat == LAT_F16) {
        repr_f16_row(row, (size_t)a->r, z);
    } else {
        kvc_repr_qrow_decode(row, a->r, a->group, a->bits, z);
    }
}

/* Parses "FILE[,f32|f16|int8|int4][,group=G][,reuse=on|off]" into a and *path (a copy that
 * the caller frees). */
static int parse_opts(const char *opts, ae_repr *a, char **path, int *reuse_given, kvc_err *err) {
    if (!opts) return kvc_fail(err, "ae: needs a codec file (ae:FILE[,f16|int8|int4|f32][,group=G][,reuse=on|off])");
    char *buf = malloc(strlen(opts) + 1);
    if (!buf) return kvc_fail(err, "out of memory");
    strcpy(buf, opts);
    char *save = NULL, *tok = strtok_r(buf, ",", &save);
    int rc = 0, group = 0;
    *path = NULL;
    if (!tok || strchr(tok, '=')) {
        rc = kvc_fail(err, "ae: the first option must be the codec file (ae:FILE[,...]), got '%s'", tok ? tok : "");
        goto done;
    }
    if (!(*path = malloc(strlen(tok) + 1))) { rc = kvc_fail(err, "out of memory"); goto done; }
    strcpy(*path, tok);
    a->lat = LAT_F16, a->reuse = 1, *reuse_given = 0;
    while (!rc && (tok = strtok_r(NULL, ",", &save))) {
        char *eq = strchr(tok, '=');
        long x = 0;
        int found = -1;
        for (int i = 0; i < 4; i++)
            if (!strcmp(tok, LAT_NAMES[i])) found = i;
        if (found >= 0) {
            a->lat = found;
        } else if (eq && !strncmp(tok, "group=", 6)) {
            if (!(rc = kvc_repr_parse_int("ae", "group", eq + 1, 1, REPR_MAX_DIM, &x, err))) group = (int)x;
        } else if (eq && (!strncmp(tok, "keys=", 5) || !strncmp(tok, "values=", 7))) {
            const int kind = tok[0] == 'k' ? KV_K : KV_V;
            int f = -1;
            for (int i = 0; i < 4; i++)
                if (!strcmp(eq + 1, FORM_NAMES[i])) f = i;
            if (f < 0) rc = kvc_fail(err, "ae: option %s: expected ae, f16, int8 or int4", tok);
            else a->form[kind] = f;
        } else if (eq && !strncmp(tok, "reuse=", 6)) {
            if (!strcmp(eq + 1, "on")) a->reuse = 1;
            else if (!strcmp(eq + 1, "off")) a->reuse = 0;
            else rc = kvc_fail(err, "ae: option reuse=%s: expected on or off", eq + 1);
            *reuse_given = 1;
        } else {
            rc = kvc_fail(err, "ae: unknown option '%s' (known: f32, f16, int8, int4, group=G, reuse=on|off, keys=F, values=F)", tok);
        }
    }
    if (!rc && group && a->lat < LAT_INT8)
        rc = kvc_fail(err, "ae: group=%d applies to int8/int4 latents only (latent stored as %s)", group, LAT_NAMES[a->lat]);
    a->group = group;
done:
    free(buf);
    if (rc) {
        free(*path);
        *path = NULL;
    }
    return rc;
}

/* Checks the latent grouping against R once the codec is known. */
static int check_group(ae_repr *a, kvc_err *err) {
    if (a->lat < LAT_INT8) return 0;
    a->bits = a->lat == LAT_INT4 ? 4 : 8;
    if (!a->group) a->group = a->r;
    if (a->group > a->r || a->r % a->group)
        return kvc_fail(err, "ae: group=%d does not divide the codec's latent size %d", a->group, a->r);
    if (a->bits == 4 && (a->r % 2 || a->group % 2))
        return kvc_fail(err, "ae: int4 latents need an even latent size and group (latent %d, group %d)", a->r, a->group);
    return 0;
}

/* Loads the checkpoint, checks it against the model and sizes the per-call chunks. */
static int repr_ae_init(kvc_repr *r, const char *opts, const kvc_repr_env *env, kvc_err *err) {
    ae_repr *a = calloc(1, sizeof *a);
    char *path = NULL;
    int reuse_given = 0, rc = 0;
    if (!a) return kvc_fail(err, "out of memory");
    const kvc_cache_shape *s = &env->shape;
    if ((rc = parse_opts(opts, a, &path, &reuse_given, err))) goto done;
    if (!(a->c = kvc_codec_load(path, err))) { rc = -1; goto done; }
    const char *fp = env->fingerprint ? env->fingerprint : a->c->meta.model_fingerprint;
    if ((rc = kvc_codec_check_model(a->c, fp, s->n_layer, s->n_head_kv, s->head_dim, err))) goto done;
    a->d = s->head_dim, a->r = a->c->meta.ae.latent;
    if (a->d > REPR_MAX_DIM) { rc = kvc_fail(err, "ae: head_dim %d exceeds %d", a->d, REPR_MAX_DIM); goto done; }
    if ((rc = check_group(a, err))) goto done;
    if (reuse_given && a->reuse && !a->c->reuse) {
        rc = kvc_fail(err, "ae: reuse=on but '%s' holds no reuse plan (train with --reuse, or drop reuse=on)", path);
        goto done;
    }
    int widest = a->d > a->r ? a->d : a->r;
    for (int i = 0; i < s->n_layer * 2 * a->c->slots; i++) {
        const ae_export *e = &a->c->ae[i];
        for (int j = 0; j < e->n_enc; j++) widest = e->enc[j].out > widest ? e->enc[j].out : widest;
        for (int j = 0; j < e->n_dec; j++) widest = e->dec[j].out > widest ? e->dec[j].out : widest;
    }
    if (widest > REPR_MAX_DIM) {
        rc = kvc_fail(err, "ae: '%s' has a layer %d wide; this build handles up to %d", path, widest, REPR_MAX_DIM);
        goto done;
    }
    a->chunk = AE_SCRATCH / widest;
    if ((rc = prepare_fast_path(a, err))) goto done;
    int n = snprintf(r->spec, sizeof r->spec, "ae:%s,%s", path, LAT_NAMES[a->lat]);
    if (a->lat >= LAT_INT8 && n > 0 && (size_t)n < sizeof r->spec)
        n += snprintf(r->spec + n, sizeof r->spec - (size_t)n, ",group=%d", a->group);
    if (n > 0 && (size_t)n < sizeof r->spec)
        n += snprintf(r->spec + n, sizeof r->spec - (size_t)n, ",reuse=%s", a->reuse && a->c->reuse ? "on" : "off");
    for (int k = 0; k < 2; k++)
        if (a->form[k] != FORM_AE && n > 0 && (size_t)n < sizeof r->spec)
            n += snprintf(r->spec + n, sizeof r->spec - (size_t)n, ",%s=%s", k ? "values" : "keys", FORM_NAMES[a->form[k]]);
    if (n < 0 || (size_t)n >= sizeof r->spec) { /* a cut spec would name another file in results */
        rc = kvc_fail(err, "ae: the codec path '%s' is too long for a spec (%zu bytes at most)", path,
                      sizeof r->spec - 40);
        goto done;
    }
done:
    free(path);
    if (rc) {
        release(a);
        free(a);
        return -1;
    }
    r->impl = a;
    return 0;
}

static void repr_ae_free(kvc_repr *r) {
    ae_repr *a = r->impl;
    if (!a) return;
    release(a);
    free(a);
    r->impl = NULL;
}

/* The storage form of (layer, kind): layers the codec did not train are f16. */
static int form_of(const ae_repr *a, int layer, int kind) {
    return a->c->trained[layer] ? a->form[kind] : FORM_F16;
}

/* Channels per group of the per-token int forms (KIVI's value defaults), dividing D. */
static int plain_group(const ae_repr *a, int form) { return kvc_repr_gcd(form == FORM_INT8 ? 64 : 32, a->d); }

/* Bytes of one row stored without the codec. */
static size_t plain_bytes(const ae_repr *a, int form) {
    if (form == FORM_F16) return (size_t)a->d * 2;
    return kvc_repr_qrow_bytes(form == FORM_INT8 ? 8 : 4, a->d, plain_group(a, form));
}

/* 1 when (layer, head, kind) is predicted from layer - 1 by the reuse plan. */
static int repr_ae_reused(const kvc_repr *r, int layer, int head, int kind) {
    const ae_repr *a = r->impl;
    if (!a->reuse || !a->c->reuse || layer < 1 || form_of(a, layer, kind) != FORM_AE) return 0;
    const reuse_item *it = kvc_reuse_plan_item(a->c->reuse, layer, head, kind);
    return it && it->chosen != REUSE_NONE;
}

static size_t repr_ae_row_bytes(const kvc_repr *r, int layer, int head, int kind) {
    const ae_repr *a = r->impl;
    if (repr_ae_reused(r, layer, head, kind)) return 0;
    const int f = form_of(a, layer, kind);
    return f == FORM_AE ? lat_bytes(a) : plain_bytes(a, f);
}

static int repr_ae_block_rows(const kvc_repr *r, int kind) {
    (void)r, (void)kind;
    return 1;
}

static size_t repr_ae_block_bytes(const kvc_repr *r, int layer, int head, int kind) {
    (void)r, (void)layer, (void)head, (void)kind;
    return 0;
}

/* y (n, out) = x (n, in) W^T + b with W given transposed, wt (in, out): the inner loop runs
 * over contiguous outputs, so it vectorises without reordering any sum. */
static void dense_t(const float *wt, const float *b, int in, int out, const float *x, int n, float *y) {
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * in;
        float *yi = y + (size_t)i * out;
        for (int o = 0; o < out; o++) yi[o] = b[o];
        for (int j = 0; j < in; j++) {
            const float xv = xi[j], *w = wt + (size_t)j * out;
            for (int o = 0; o < out; o++) yi[o] += xv * w[o];
        }
    }
}

/* Runs n rows through one half (0 encoder, 1 decoder) of network `net`, one Linear at a time:
 * layer 0 reads in and writes s1, layer 1 writes s2, the last layer writes out when out is
 * non-NULL. Layers without activation use dense_t; others kvc_ae_export_run (which allocates
 * nothing for a single layer). Returns where the result is. in may alias s2, never s1. */
static const float *run_half(const ae_repr *a, int net, int half, const float *in, int n, float *s1, float *s2,
                             float *out) {
    const ae_export *e = &a->c->ae[net];
    const ae_dense *layers = half ? e->dec : e->enc;
    const int nl = half ? e->n_dec : e->n_enc;
    const float *cur = in;
    for (int l = 0; l < nl; l++) {
        float *dst = l == nl - 1 && out ? out : (l % 2 == 0 ? s1 : s2);
        const float *wt = a->wt[(size_t)net * 4 + half * 2 + l];
        if (wt) dense_t(wt, layers[l].b, layers[l].in, layers[l].out, cur, n, dst);
        else kvc_ae_export_run(&layers[l], 1, e->leaky_slope, cur, n, dst);
        cur = dst;
    }
    return cur;
}

/* Transposes the weights of every layer without activation for dense_t. */
static int prepare_fast_path(ae_repr *a, kvc_err *err) {
    const int nets = a->c->meta.n_layer * 2 * a->c->slots;
    if (!(a->wt = calloc((size_t)nets * 4, sizeof *a->wt))) return kvc_fail(err, "out of memory");
    for (int i = 0; i < nets; i++)
        for (int half = 0; half < 2; half++) {
            const ae_export *e = &a->c->ae[i];
            const ae_dense *layers = half ? e->dec : e->enc;
            const int nl = half ? e->n_dec : e->n_enc;
            for (int l = 0; l < nl; l++) {
                const ae_dense *dl = &layers[l];
                if (dl->act != KVC_ACT_NONE) continue;
                float *wt = kvc_malloc_array((size_t)dl->in * dl->out, sizeof(float));
                if (!wt) return kvc_fail(err, "out of memory");
                for (int o = 0; o < dl->out; o++)
                    for (int j = 0; j < dl->in; j++) wt[(size_t)j * dl->out + o] = dl->w[(size_t)o * dl->in + j];
                a->wt[(size_t)i * 4 + half * 2 + l] = wt;
            }
        }
    return 0;
}

/* Frees the codec and the transposed weights (a itself stays). */
static void release(ae_repr *a) {
    if (a->wt && a->c)
        for (int i = 0; i < a->c->meta.n_layer * 2 * a->c->slots * 4; i++) free(a->wt[i]);
    free(a->wt);
    kvc_codec_free(a->c);
    a->wt = NULL, a->c = NULL;
}

/* Encodes n rows (ldx apart): through the encoder, then latent storage; f16 for untrained
 * layers. Scratch is on the stack so threads may encode different heads at once. */
static void repr_ae_encode(const kvc_repr *r, int layer, int head, int kind, const float *x, int64_t ldx, int n,
                      uint8_t *rows, uint8_t *blk) {
    (void)blk;
    const ae_repr *a = r->impl;
    const int d = a->d;
    const int f = form_of(a, layer, kind);
    if (f == FORM_F16) {
        for (int i = 0; i < n; i++)
            for (int j = 0; j < d; j++) {
                uint16_t h = kvc_f32_to_f16(x[(size_t)i * ldx + j]);
                memcpy(rows + ((size_t)i * d + j) * 2, &h, 2);
            }
        return;
    }
    if (f != FORM_AE) {
        const size_t pb = plain_bytes(a, f);
        for (int i = 0; i < n; i++)
            kvc_repr_qrow_encode(x + (size_t)i * ldx, d, plain_group(a, f), f == FORM_INT8 ? 8 : 4, rows + (size_t)i * pb);
        return;
    }
    const int net = net_index(a, layer, kind, head);
    const size_t rb = lat_bytes(a);
    float s1[AE_SCRATCH], s2[AE_SCRATCH];
    for (int i0 = 0; i0 < n; i0 += a->chunk) {
        const int cn = n - i0 < a->chunk ? n - i0 : a->chunk;
        const float *in = x + (size_t)i0 * ldx;
        if (ldx != d) {
            for (int i = 0; i < cn; i++) memcpy(s2 + (size_t)i * d, in + (size_t)i * ldx, (size_t)d * sizeof(float));
            in = s2;
        }
        const float *z = run_half(a, net, 0, in, cn, s1, s2, NULL);
        for (int i = 0; i < cn; i++) lat_encode(a, z + (size_t)i * a->r, rows + (size_t)(i0 + i) * rb);
    }
}

/* Decodes n stored rows into y (n, D): latents back to floats, then the decoder. */
static void repr_ae_decode(const kvc_repr *r, int layer, int head, int kind, const uint8_t *rows,
                      const uint8_t *const *blks, int n, float *y) {
    (void)blks;
    const ae_repr *a = r->impl;
    const int d = a->d;
    const int f = form_of(a, layer, kind);
    if (f == FORM_F16) {
        repr_f16_row(rows, (size_t)n * d, y);
        return;
    }
    if (f != FORM_AE) {
        const size_t pb = plain_bytes(a, f);
        for (int i = 0; i < n; i++)
            kvc_repr_qrow_decode(rows + (size_t)i * pb, d, plain_group(a, f), f == FORM_INT8 ? 8 : 4, y + (size_t)i * d);
        return;
    }
    const int net = net_index(a, layer, kind, head);
    const size_t rb = lat_bytes(a);
    float s1[AE_SCRATCH], s2[AE_SCRATCH];
    for (int i0 = 0; i0 < n; i0 += a->chunk) {
        const int cn = n - i0 < a->chunk ? n - i0 : a->chunk;
        for (int i = 0; i < cn; i++) lat_decode(a, rows + (size_t)(i0 + i) * rb, s2 + (size_t)i * a->r);
        run_half(a, net, 1, s2, cn, s1, s2, y + (size_t)i0 * d);
    }
}

/* y (n, D) = the reuse plan's prediction of (layer, head, kind) from layer - 1's rows src. */
static void repr_ae_predict(const kvc_repr *r, int layer, int head, int kind, const float *src, int n, float *y) {
    const ae_repr *a = r->impl;
    const reuse_item *it = kvc_reuse_plan_item(a->c->reuse, layer, head, kind);
    kvc_reuse_item_predict(a->c->reuse, it, src, a->d, y, a->d, n);
}

/* R when the values of (layer, head) are stored as latents of a single linear decoder. */
static int repr_ae_latent_dim(const kvc_repr *r, int layer, int head) {
    const ae_repr *a = r->impl;
    if (form_of(a, layer, KV_V) != FORM_AE || repr_ae_reused(r, layer, head, KV_V)) return 0;
    const ae_export *e = net_of(a, layer, KV_V, head);
    return e->n_dec == 1 && e->dec[0].act == KVC_ACT_NONE ? a->r : 0;
}

/* Stored value latents of (layer, head) back to floats: z (n, R). */
static void repr_ae_decode_latent(const kvc_repr *r, int layer, int head, const uint8_t *rows, int n, float *z) {
    (void)layer, (void)head;
    const ae_repr *a = r->impl;
    const size_t rb = lat_bytes(a);
    for (int i = 0; i < n; i++) lat_decode(a, rows + (size_t)i * rb, z + (size_t)i * a->r);
}

/* The value decoder of (layer, head) as y = W z + b: W (D, R) and b (D) (valid when
 * latent_dim > 0), for attention in latent space. */
static void repr_ae_linear_decoder(const kvc_repr *r, int layer, int head, const float **w, const float **b) {
    const ae_repr *a = r->impl;
    const ae_dense *dl = &a->c->ae[net_index(a, layer, KV_V, head)].dec[0];
    *w = dl->w;
    *b = dl->b;
}

const kvc_repr_ops KVC_REPR_AE = {
    .name = "ae",
    .usage = "autoencoder latents of a codec: ae:FILE[,f16|int8|int4|f32][,group=G][,reuse=on|off]"
             "[,keys=F][,values=F] (default f16, group = latent, reuse on; untrained layers as f16; "
             "keys=/values= f16|int8|int4 store that kind without the codec, ae through it)",
    .init = repr_ae_init,
    .free = repr_ae_free,
    .row_bytes = repr_ae_row_bytes,
    .block_rows = repr_ae_block_rows,
    .block_bytes = repr_ae_block_bytes,
    .encode = repr_ae_encode,
    .decode = repr_ae_decode,
    .reused = repr_ae_reused,
    .predict = repr_ae_predict,
    .latent_dim = repr_ae_latent_dim,
    .decode_latent = repr_ae_decode_latent,
    .linear_decoder = repr_ae_linear_decoder,
};
