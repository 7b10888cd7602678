/* repr_plain.c - the uncompressed representations of the KV cache (kvc/kvcache.h): f32
 * (exact, 4 bytes a value, the reference every other form is measured against) and f16
 * (2 bytes a value, round-to-nearest-even). Neither takes options. */
#include "kvc/kvcache.h"
#include "repr_quant.h"

#include <stdio.h>
#include <string.h>

/* Refuses any option text: the plain forms have nothing to tune. */
static int plain_init(kvc_repr *r, const char *opts, const kvc_repr_env *env, kvc_err *err) {
    (void)env;
    if (opts) return kvc_fail(err, "representation '%s' takes no options (got '%s')", r->ops->name, opts);
    snprintf(r->spec, sizeof r->spec, "%s", r->ops->name);
    r->impl = NULL;
    return 0;
}

/* Nothing to free: plain forms keep no state. */
static void plain_free(kvc_repr *r) { (void)r; }

/* Per-token forms quantise nothing across rows. */
static int plain_block_rows(const kvc_repr *r, int kind) {
    (void)r, (void)kind;
    return 1;
}

static size_t plain_block_bytes(const kvc_repr *r, int layer, int head, int kind) {
    (void)r, (void)layer, (void)head, (void)kind;
    return 0;
}

/* ---- f32 --------------------------------------------------------------------------- */

static size_t f32_row_bytes(const kvc_repr *r, int layer, int head, int kind) {
    (void)layer, (void)head, (void)kind;
    return (size_t)r->shape.head_dim * sizeof(float);
}

/* Copies n rows (ldx floats apart) into the packed rows. */
static void f32_encode(const kvc_repr *r, int layer, int head, int kind, const float *x, int64_t ldx, int n,
                       uint8_t *rows, uint8_t *blk) {
    (void)layer, (void)head, (void)kind, (void)blk;
    const size_t rb = (size_t)r->shape.head_dim * sizeof(float);
    for (int i = 0; i < n; i++) memcpy(rows + (size_t)i * rb, x + (size_t)i * ldx, rb);
}

/* Copies n packed rows back into y (n, D). */
static void f32_decode(const kvc_repr *r, int layer, int head, int kind, const uint8_t *rows,
                       const uint8_t *const *blks, int n, float *y) {
    (void)layer, (void)head, (void)kind, (void)blks;
    memcpy(y, rows, (size_t)n * r->shape.head_dim * sizeof(float));
}

const kvc_repr_ops KVC_REPR_F32 = {
    .name = "f32",
    .usage = "exact: 4 bytes a value (no options)",
    .init = plain_init,
    .free = plain_free,
    .row_bytes = f32_row_bytes,
    .block_rows = plain_block_rows,
    .block_bytes = plain_block_bytes,
    .encode = f32_encode,
    .decode = f32_decode,
};

/* ---- f16 --------------------------------------------------------------------------- */

static size_t f16_row_bytes(const kvc_repr *r, int layer, int head, int kind) {
    (void)layer, (void)head, (void)kind;
    return (size_t)r->shape.head_dim * sizeof(uint16_t);
}

/* Rounds n rows to f16 (rows are written bytewise: the cache may pack them unaligned). */
static void f16_encode(const kvc_repr *r, int layer, int head, int kind, const float *x, int64_t ldx, int n,
                       uint8_t *rows, uint8_t *blk) {
    (void)layer, (void)head, (void)kind, (void)blk;
    const int d = r->shape.head_dim;
    for (int i = 0; i < n; i++) {
        const float *xr = x + (size_t)i * ldx;
        uint8_t *o = rows + (size_t)i * d * 2;
        for (int j = 0; j < d; j++) {
            uint16_t h = kvc_f32_to_f16(xr[j]);
            memcpy(o + 2 * j, &h, 2);
        }
    }
}

/* Widens n f16 rows into y (n, D). */
static void f16_decode(const kvc_repr *r, int layer, int head, int kind, const uint8_t *rows,
                       const uint8_t *const *blks, int n, float *y) {
    (void)layer, (void)head, (void)kind, (void)blks;
    repr_f16_row(rows, (size_t)n * r->shape.head_dim, y);
}

const kvc_repr_ops KVC_REPR_F16 = {
    .name = "f16",
    .usage = "half precision: 2 bytes a value (no options)",
    .init = plain_init,
    .free = plain_free,
    .row_bytes = f16_row_bytes,
    .block_rows = plain_block_rows,
    .block_bytes = plain_block_bytes,
    .encode = f16_encode,
    .decode = f16_decode,
};
