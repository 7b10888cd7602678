/* repr_kivi.c - KIVI-style int8 / int4 representations of the KV cache (kvc/kvcache.h) on the
 * quantisers of kvc/kvquant.h: values per token in groups of `group` channels, keys per
 * channel over blocks of `kgroup` tokens (outlier key channels get their own range), or per
 * token like values with keys=token. Also the packed-row helpers of codec/repr_quant.h.
 *
 * Layouts (f16 = 2-byte f16 bit patterns, written bytewise so rows may sit unaligned):
 *   per-token row:   codes (code_bytes(D)) | scale f16 (D/group) | min f16 (D/group)
 *   channel-key row: codes (code_bytes(D)); its block: scale f16 (D) | min f16 (D)
 * Defaults: group 64 for int8 (one range per head row at D = 64: 8 bits leave room for it),
 * 32 for int4 (KIVI's choice); when the default does not divide D, gcd(default, D). kgroup 32. */
#include "kvc/kvcache.h"
#include "kvc/kvquant.h"
#include "repr_quant.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- packed rows (repr_quant.h) --------------------------------------------------------- */

size_t kvc_repr_qrow_bytes(int bits, int c, int g) { return kvc_kvq_code_bytes(bits, c) + (size_t)(c / g) * 4; }

void kvc_repr_qrow_encode(const float *x, int c, int g, int bits, uint8_t *row) {
    uint16_t sc[REPR_MAX_DIM], mn[REPR_MAX_DIM];
    const size_t cb = kvc_kvq_code_bytes(bits, c), ng = (size_t)(c / g);
    kvc_kvq_quant_tokens_cpu(x, 1, c, g, bits, row, sc, mn);
    memcpy(row + cb, sc, ng * 2);
    memcpy(row + cb + ng * 2, mn, ng * 2);
}

/* c 4-bit codes (two a byte, low nibble first) to floats; a separate pass so the loops that
 * scale them vectorise. */
static void unpack4(const uint8_t *codes, int c, float *out) {
    for (int b = 0; b < c / 2; b++) {
        out[2 * b] = (float)(codes[b] & 0x0F);
        out[2 * b + 1] = (float)(codes[b] >> 4);
    }
}

/* c 2-bit codes (four a byte, low bits first) to floats. */
static void unpack2(const uint8_t *codes, int c, float *out) {
    for (int b = 0; b < c / 4; b++)
        for (int j = 0; j < 4; j++) out[4 * b + j] = (float)((codes[b] >> (2 * j)) & 3);
}

/* x = min + code * scale exactly as kvc_kvq_dequant_tokens_cpu computes it, inlined here since
 * decode runs over every held row at every attention step. */
void kvc_repr_qrow_decode(const uint8_t *row, int c, int g, int bits, float *y) {
    const size_t cb = kvc_kvq_code_bytes(bits, c), ng = (size_t)(c / g);
    float cf[REPR_MAX_DIM];
    if (bits == 4) unpack4(row, c, cf);
    else if (bits == 2) unpack2(row, c, cf);
    for (size_t k = 0; k < ng; k++) {
        uint16_t hs, hm;
        memcpy(&hs, row + cb + k * 2, 2);
        memcpy(&hm, row + cb + (ng + k) * 2, 2);
        const float s = kvc_f16_to_f32(hs), m = kvc_f16_to_f32(hm);
        float *yk = y + k * g;
        const int j0 = (int)k * g;
        if (bits == 8) {
            for (int j = 0; j < g; j++) yk[j] = m + (float)row[j0 + j] * s;
        } else {
            for (int j = 0; j < g; j++) yk[j] = m + cf[j0 + j] * s;
        }
    }
}

int kvc_repr_parse_int(const char *repr, const char *key, const char *val, long lo, long hi, long *out, kvc_err *err) {
    char *end;
    errno = 0;
    long x = strtol(val, &end, 10);
    if (!*val || *end || errno || x < lo || x > hi)
        return kvc_fail(err, "%s: option %s=%s: expected an integer in [%ld, %ld]", repr, key, val, lo, hi);
    *out = x;
    return 0;
}

int kvc_repr_gcd(int a, int b) {
    while (b) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* ---- the representation ----------------------------------------------------------------- */

#define KGROUP_MAX 4096
#define CH_SCRATCH 8192 /* floats gathered at once when key rows are strided (>= 2 * KGROUP_MAX) */

typedef struct {
    int bits;         /* 8, 4 or 2 */
    int d;            /* D */
    int group;        /* channels per per-token group (values; keys with keys=token) */
    int kgroup;       /* tokens per key block with keys=channel */
    int keys_channel; /* 1: keys per channel (KIVI), 0: per token */
} kivi;

/* Parses group=, kgroup=, keys= and checks them against D and the width. */
static int kivi_init(kvc_repr *r, const char *opts, const kvc_repr_env *env, kvc_err *err) {
    const char *nm = r->ops->name;
    const int bits = !strcmp(nm, "int2") ? 2 : !strcmp(nm, "int4") ? 4 : 8, d = env->shape.head_dim, per = 8 / bits;
    if (d < 1 || d > REPR_MAX_DIM) return kvc_fail(err, "%s: head_dim %d is out of range [1, %d]", nm, d, REPR_MAX_DIM);
    if (bits < 8 && d % per) return kvc_fail(err, "%s: head_dim %d is not a multiple of %d; %d-bit codes pack %d a byte", nm, d, per, bits, per);
    int group = kvc_repr_gcd(bits < 8 ? 32 : 64, d), kgroup = 32, keys_channel = 1, have_kgroup = 0;
    char buf[256];
    if (opts && strlen(opts) >= sizeof buf) return kvc_fail(err, "%s: option text too long", nm);
    if (opts) {
        strcpy(buf, opts);
        for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(tok, '=');
            long x = 0;
            if (!eq) return kvc_fail(err, "%s: option '%s' is not key=value (group=G, kgroup=T, keys=channel|token)", nm, tok);
            *eq = '\0';
            const char *key = tok, *val = eq + 1;
            if (!strcmp(key, "group")) {
                if (kvc_repr_parse_int(nm, key, val, 1, d, &x, err)) return -1;
                if (d % x) return kvc_fail(err, "%s: group=%ld does not divide head_dim %d", nm, x, d);
                if (bits < 8 && x % per)
                    return kvc_fail(err, "%s: group=%ld is not a multiple of %d (%d-bit codes pack %d a byte)", nm, x, per, bits, per);
                group = (int)x;
            } else if (!strcmp(key, "kgroup")) {
                if (kvc_repr_parse_int(nm, key, val, 1, KGROUP_MAX, &x, err)) return -1;
                kgroup = (int)x, have_kgroup = 1;
            } else if (!strcmp(key, "keys")) {
                if (!strcmp(val, "channel")) keys_channel = 1;
                else if (!strcmp(val, "token")) keys_channel = 0;
                else return kvc_fail(err, "%s: option keys=%s: expected channel or token", nm, val);
            } else {
                return kvc_fail(err, "%s: unknown option '%s' (known: group=G, kgroup=T, keys=channel|token)", nm, key);
            }
        }
    }
    if (have_kgroup && !keys_channel)
        return kvc_fail(err, "%s: kgroup applies to per-channel keys only (drop it or use keys=channel)", nm);
    kivi *q = malloc(sizeof *q);
    if (!q) return kvc_fail(err, "out of memory");
    *q = (kivi){.bits = bits, .d = d, .group = group, .kgroup = kgroup, .keys_channel = keys_channel};
    r->impl = q;
    if (keys_channel) snprintf(r->spec, sizeof r->spec, "%s:group=%d,kgroup=%d,keys=channel", nm, group, kgroup);
    else snprintf(r->spec, sizeof r->spec, "%s:group=%d,keys=token", nm, group);
    return 0;
}

static void kivi_free(kvc_repr *r) {
    free(r->impl);
    r->impl = NULL;
}

/* 1 when rows of this kind are quantised per channel across a block of tokens. */
static int is_channel(const kivi *q, int kind) { return kind == KV_K && q->keys_channel; }

static size_t kivi_row_bytes(const kvc_repr *r, int layer, int head, int kind) {
    (void)layer, (void)head;
    const kivi *q = r->impl;
    return is_channel(q, kind) ? kvc_kvq_code_bytes(q->bits, q->d) : kvc_repr_qrow_bytes(q->bits, q->d, q->group);
}

static int kivi_block_rows(const kvc_repr *r, int kind) {
    const kivi *q = r->impl;
    return is_channel(q, kind) ? q->kgroup : 1;
}

static size_t kivi_block_bytes(const kvc_repr *r, int layer, int head, int kind) {
    (void)layer, (void)head;
    const kivi *q = r->impl;
    return is_channel(q, kind) ? (size_t)q->d * 4 : 0;
}

/* Quantises a key block x (n rows, ldx apart) per channel: codes into rows, f16 scales and
 * minimums into blk. Strided rows are gathered a few channels at a time into stack scratch,
 * so nothing is allocated. */
static void encode_key_block(const kivi *q, const float *x, int64_t ldx, int n, uint8_t *rows, uint8_t *blk) {
    const int d = q->d, bits = q->bits;
    uint16_t sc[REPR_MAX_DIM], mn[REPR_MAX_DIM];
    if (ldx == d) {
        kvc_kvq_quant_channels_cpu(x, n, d, bits, rows, sc, mn);
    } else {
        float buf[CH_SCRATCH];
        uint8_t cbuf[CH_SCRATCH];
        const size_t rb = kvc_kvq_code_bytes(bits, d);
        int cc = CH_SCRATCH / n;
        cc -= cc % 4; /* a multiple of 4, so 2- and 4-bit chunks start on a byte */
        if (cc > d) cc = d;
        for (int c0 = 0; c0 < d; c0 += cc) {
            const int w = d - c0 < cc ? d - c0 : cc;
            const size_t wb = kvc_kvq_code_bytes(bits, w), off = kvc_kvq_code_bytes(bits, c0);
            for (int t = 0; t < n; t++) memcpy(buf + (size_t)t * w, x + (size_t)t * ldx + c0, (size_t)w * sizeof(float));
            kvc_kvq_quant_channels_cpu(buf, n, w, bits, cbuf, sc + c0, mn + c0);
            for (int t = 0; t < n; t++) memcpy(rows + (size_t)t * rb + off, cbuf + (size_t)t * wb, wb);
        }
    }
    memcpy(blk, sc, (size_t)d * 2);
    memcpy(blk + (size_t)d * 2, mn, (size_t)d * 2);
}

/* Encodes n rows: a whole key block per channel, or each row per token. */
static void kivi_encode(const kvc_repr *r, int layer, int head, int kind, const float *x, int64_t ldx, int n,
                        uint8_t *rows, uint8_t *blk) {
    (void)layer, (void)head;
    const kivi *q = r->impl;
    if (is_channel(q, kind)) {
        encode_key_block(q, x, ldx, n, rows, blk);
        return;
    }
    const size_t rb = kvc_repr_qrow_bytes(q->bits, q->d, q->group);
    for (int i = 0; i < n; i++) kvc_repr_qrow_encode(x + (size_t)i * ldx, q->d, q->group, q->bits, rows + (size_t)i * rb);
}

/* Decodes n rows into y (n, D); channel keys read each row's block (consecutive rows of one
 * block reuse the scales already unpacked). */
static void kivi_decode(const kvc_repr *r, int layer, int head, int kind, const uint8_t *rows,
                        const uint8_t *const *blks, int n, float *y) {
    (void)layer, (void)head;
    const kivi *q = r->impl;
    const int d = q->d;
    if (!is_channel(q, kind)) {
        const size_t rb = kvc_repr_qrow_bytes(q->bits, d, q->group);
        for (int i = 0; i < n; i++) kvc_repr_qrow_decode(rows + (size_t)i * rb, d, q->group, q->bits, y + (size_t)i * d);
        return;
    }
    /* x = min + code * scale as kvc_kvq_dequant_channels_cpu computes it, with the block's f16
     * scales widened once per block rather than twice per value */
    float sc[REPR_MAX_DIM], mn[REPR_MAX_DIM];
    const uint8_t *have = NULL;
    const size_t rb = kvc_kvq_code_bytes(q->bits, d);
    for (int i = 0; i < n; i++) {
        if (blks[i] != have) {
            have = blks[i];
            repr_f16_row(have, (size_t)d, sc);
            repr_f16_row(have + (size_t)d * 2, (size_t)d, mn);
        }
        const uint8_t *c = rows + (size_t)i * rb;
        float *yi = y + (size_t)i * d;
        if (q->bits == 8) {
            for (int j = 0; j < d; j++) yi[j] = mn[j] + (float)c[j] * sc[j];
        } else {
            float cf[REPR_MAX_DIM];
            if (q->bits == 4) unpack4(c, d, cf);
            else unpack2(c, d, cf);
            for (int j = 0; j < d; j++) yi[j] = mn[j] + cf[j] * sc[j];
        }
    }
}

const kvc_repr_ops KVC_REPR_INT8 = {
    .name = "int8",
    .usage = "8-bit KIVI: values per token in groups (group=G, default 64), keys per channel over "
             "kgroup=T tokens (default 32) or keys=token; f16 scale+min per group",
    .init = kivi_init,
    .free = kivi_free,
    .row_bytes = kivi_row_bytes,
    .block_rows = kivi_block_rows,
    .block_bytes = kivi_block_bytes,
    .encode = kivi_encode,
    .decode = kivi_decode,
};

const kvc_repr_ops KVC_REPR_INT4 = {
    .name = "int4",
    .usage = "4-bit KIVI: as int8 with group default 32 (even groups; two codes a byte)",
    .init = kivi_init,
    .free = kivi_free,
    .row_bytes = kivi_row_bytes,
    .block_rows = kivi_block_rows,
    .block_bytes = kivi_block_bytes,
    .encode = kivi_encode,
    .decode = kivi_decode,
};

const kvc_repr_ops KVC_REPR_INT2 = {
    .name = "int2",
    .usage = "2-bit KIVI: as int4 with group default 32 (groups a multiple of 4; four codes a byte)",
    .init = kivi_init,
    .free = kivi_free,
    .row_bytes = kivi_row_bytes,
    .block_rows = kivi_block_rows,
    .block_bytes = kivi_block_bytes,
    .encode = kivi_encode,
    .decode = kivi_decode,
};
