/* cache.c - argument checks and dispatch for the KV cache interface (kvc/cache.h); every
 * implementation is reached only through these functions. */
#include "kvc/cache.h"

int kvc_cache_append(kvc_cache *c, int layer, const float *k, const float *v, const int32_t *pos, int n, kvc_err *err) {
    if (layer < 0 || layer >= c->shape.n_layer) return kvc_fail(err, "kvc_cache_append: layer %d out of range", layer);
    if (n < 0 || (n > 0 && (!k || !v || !pos))) return kvc_fail(err, "kvc_cache_append: bad arguments");
    if (n == 0) return 0;
    return c->ops->append(c, layer, k, v, pos, n, err);
}

int kvc_cache_attend(kvc_cache *c, int layer, const float *q, const int32_t *pos, int n_q, float *out, kvc_err *err) {
    if (layer < 0 || layer >= c->shape.n_layer) return kvc_fail(err, "kvc_cache_attend: layer %d out of range", layer);
    if (n_q < 0 || (n_q > 0 && (!q || !pos || !out))) return kvc_fail(err, "kvc_cache_attend: bad arguments");
    if (n_q == 0) return 0;
    return c->ops->attend(c, layer, q, pos, n_q, out, err);
}

int kvc_cache_end_step(kvc_cache *c, kvc_err *err) { return c->ops->end_step ? c->ops->end_step(c, err) : 0; }

size_t kvc_cache_bytes(const kvc_cache *c) { return c->ops->bytes(c); }

int64_t kvc_cache_n_tokens(const kvc_cache *c, int layer) {
    if (layer < 0 || layer >= c->shape.n_layer) return -1;
    return c->ops->n_tokens(c, layer);
}

void kvc_cache_reset(kvc_cache *c) { c->ops->reset(c); }

int kvc_cache_set_budget(kvc_cache *c, int64_t ref_tokens, kvc_err *err) {
    if (ref_tokens == 0) return kvc_fail(err, "kvc_cache_set_budget: reference length 0");
    return c->ops->set_budget ? c->ops->set_budget(c, ref_tokens, err) : 0;
}

void kvc_cache_free(kvc_cache *c) {
    if (c) c->ops->free(c);
}

void kvc_cache_set_backend(kvc_cache *c, const kvc_backend *be) {
    if (c) c->backend = be;
}

const kvc_backend *kvc_cache_backend(const kvc_cache *c) {
    return c && c->backend ? c->backend : kvc_backend_cpu();
}
