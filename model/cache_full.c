/* cache_full.c - the full-precision cache: every token's K and V in f32, nothing evicted.
 * Keys arrive before RoPE; this representation rotates them once on append (with the
 * token's stored position) so attention reads them directly. The reference every
 * compressed cache is measured against. Letters: T tokens held, K kv heads, D head_dim. */
#include "kvc/cache.h"
#include "kvc/ops.h"
#include "kvc/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *k;      /* (L, T_max, K, D) post-RoPE keys */
    float *v;      /* (L, T_max, K, D) */
    int32_t *pos;  /* (L, T_max) */
    int64_t *n;    /* (L) tokens held per layer */
    kvc_rope_table rope;
} full_impl;

static size_t row_floats(const kvc_cache *c) { return (size_t)c->shape.n_head_kv * c->shape.head_dim; }

static int full_append(kvc_cache *c, int layer, const float *k, const float *v, const int32_t *pos, int n,
                       kvc_err *err) {
    full_impl *im = c->impl;
    const size_t rf = row_floats(c), tmax = (size_t)c->shape.max_tokens;
    if (im->n[layer] + n > (int64_t)tmax)
        return kvc_fail(err, "KV cache full: layer %d holds %lld tokens, %d more exceed the capacity %zu", layer,
                        (long long)im->n[layer], n, tmax);
    int32_t pmax = 0;
    for (int t = 0; t < n; t++) {
        if (pos[t] < 0) return kvc_fail(err, "KV cache: negative position %d", pos[t]);
        pmax = pos[t] > pmax ? pos[t] : pmax;
    }
    if (kvc_rope_table_reserve(&im->rope, (int64_t)pmax + 1))
        return kvc_fail(err, "out of memory for RoPE angles up to position %d", pmax);
    size_t at = (size_t)layer * tmax + (size_t)im->n[layer];
    memcpy(im->k + at * rf, k, (size_t)n * rf * sizeof(float));
    memcpy(im->v + at * rf, v, (size_t)n * rf * sizeof(float));
    memcpy(im->pos + at, pos, (size_t)n * sizeof(int32_t));
    kvc_rope_heads(&im->rope, im->k + at * rf, pos, n, c->shape.n_head_kv);
    im->n[layer] += n;
    return 0;
}

/* Causal GQA attention: query head h reads kv head h / (H / K); token j is visible to a
 * query at position p when pos[j] <= p. */
static int full_attend(kvc_cache *c, int layer, const float *q, const int32_t *qpos, int n_q, float *out,
                       kvc_err *err) {
    full_impl *im = c->impl;
    const int H = c->shape.n_head, K = c->shape.n_head_kv, D = c->shape.head_dim;
    const size_t rf = row_floats(c), tmax = (size_t)c->shape.max_tokens;
    const int64_t T = im->n[layer];
    const float *kl = im->k + (size_t)layer * tmax * rf, *vl = im->v + (size_t)layer * tmax * rf;
    const int32_t *pl = im->pos + (size_t)layer * tmax;
    kvc_attn_kv kv[K];
    for (int g = 0; g < K; g++)
        kv[g] = (kvc_attn_kv){.t = T, .k = kl + (size_t)g * D, .ldk = (int64_t)rf, .pos = pl, .v = vl + (size_t)g * D,
                              .ldv = (int64_t)rf};
    return kvc_cache_backend(c)->attend_layer(q, qpos, n_q, H, K, D, kv, out, NULL, err);
}

static size_t full_bytes(const kvc_cache *c) {
    const full_impl *im = c->impl;
    size_t total = 0;
    for (int l = 0; l < c->shape.n_layer; l++)
        total += (size_t)im->n[l] * (2 * row_floats(c) * sizeof(float) + sizeof(int32_t));
    return total;
}

static int64_t full_n_tokens(const kvc_cache *c, int layer) { return ((const full_impl *)c->impl)->n[layer]; }

static void full_reset(kvc_cache *c) {
    full_impl *im = c->impl;
    memset(im->n, 0, (size_t)c->shape.n_layer * sizeof(int64_t));
}

static void full_free(kvc_cache *c) {
    full_impl *im = c->impl;
    if (im) {
        free(im->k);
        free(im->v);
        free(im->pos);
        free(im->n);
        kvc_rope_table_free(&im->rope);
        free(im);
    }
    free(c);
}

static const kvc_cache_ops FULL_OPS = {
    .name = "full-f32",
    .append = full_append,
    .attend = full_attend,
    .end_step = NULL,
    .bytes = full_bytes,
    .n_tokens = full_n_tokens,
    .reset = full_reset,
    .free = full_free,
};

kvc_cache *kvc_cache_full_new(const kvc_cache_shape *shape, kvc_err *err) {
    const kvc_cache_shape *s = shape;
    if (s->n_layer < 1 || s->n_head < 1 || s->n_head_kv < 1 || s->head_dim < 2 || s->head_dim % 2 ||
        s->n_head % s->n_head_kv || s->max_tokens < 1) {
        kvc_fail(err, "cache: invalid shape (layers %d, heads %d/%d, head_dim %d, capacity %d)", s->n_layer,
                 s->n_head, s->n_head_kv, s->head_dim, s->max_tokens);
        return NULL;
    }
    kvc_cache *c = calloc(1, sizeof *c);
    full_impl *im = calloc(1, sizeof *im);
    if (!c || !im) goto oom;
    c->ops = &FULL_OPS;
    c->shape = *s;
    c->impl = im;
    size_t cells = (size_t)s->n_layer * (size_t)s->max_tokens;
    size_t rf = (size_t)s->n_head_kv * (size_t)s->head_dim;
    im->k = kvc_malloc_array(cells, rf * sizeof(float));
    im->v = kvc_malloc_array(cells, rf * sizeof(float));
    im->pos = kvc_malloc_array(cells, sizeof(int32_t));
    im->n = kvc_calloc_array((size_t)s->n_layer, sizeof(int64_t));
    if (!im->k || !im->v || !im->pos || !im->n) goto oom;
    if (kvc_rope_table_init(&im->rope, s->head_dim, s->rope_base)) {
        kvc_fail(err, "cache: RoPE base %g unusable", s->rope_base);
        full_free(c);
        return NULL;
    }
    return c;
oom:
    kvc_fail(err, "out of memory for a KV cache of %d tokens", s->max_tokens);
    if (c) {
        c->impl = im;
        if (im) full_free(c); else free(c);
    } else free(im);
    return NULL;
}
