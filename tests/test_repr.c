/* test_repr.c - the KV cache representations (kvc/kvcache.h): one walk over every registered
 * one through specs, checking each round trip against its error budget and its byte counts by
 * hand; the autoencoder form against the checkpoint's own networks (latent attention, reuse,
 * untrained layers, several threads at once); and bad specs and files giving clear errors. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvc/trainer.h"
#include "kvc/kvcache.h"
#include "kvc/kvquant.h"

/* Error budgets, per value (x the original, y what comes back). */
#define F16_REL 1e-3      /* f16: |y - x| <= F16_REL |x| + TINY (f16 rounding is 2^-11 relative) */
#define TINY 1e-7         /* absolute floor for values near zero */
#define STEP_SLACK 1.0001 /* int8/int4: |y - x| <= scale / 2 * STEP_SLACK + TINY, scale as stored */
#define AE_TOL 1e-5       /* ae: |y - y_ref| <= AE_TOL (1 + |y_ref|) against kvc_ae_export_run */

#define FINGERPRINT "55d17dc8d1d9a03e"
#define AE32 KVC_SOURCE_DIR "/checkpoints/smollm2-135m-ae32.h5"
#define AE16 KVC_SOURCE_DIR "/checkpoints/smollm2-135m-ae16.h5"

enum { L = 30, K = 3, D = 64, NMAX = 64 };

static kvc_repr_env model_env(void) {
    kvc_repr_env e = {.shape = {.n_layer = L, .n_head = 9, .n_head_kv = K, .head_dim = D, .rope_base = 100000,
                                .max_tokens = 4096},
                      .fingerprint = FINGERPRINT};
    return e;
}

static uint32_t rs = 2024;
static float urand(void) { rs = rs * 1664525u + 1013904223u; return (float)(rs >> 8) / 16777216.0f * 2 - 1; }

/* n rows of (K, D): random with an outlier channel, then structured rows (zeros, a constant,
 * a ramp, one spike) that stress min/max groups. */
static void fill_rows(float *x, int n) {
    for (int t = 0; t < n; t++)
        for (int i = 0; i < K * D; i++) {
            float v = 2 * urand() + urand() * urand() * 6;
            if (i % D == 7) v = v * 8 + 15;
            switch (t % 8) {
            case 3: v = 0; break;
            case 5: v = 0.3f; break;
            case 6: v = (float)(i % D) / 8 - 4; break;
            case 7: v = i % D == 11 ? 40.0f : 0.01f * urand(); break;
            default: break;
            }
            x[(size_t)t * K * D + i] = v;
        }
}

static void skip_without(const char *path) {
    if (access(path, R_OK) != 0) cr_skip_test("codec checkpoint %s is missing (it is committed under checkpoints/)", path);
}

/* The checkpoint named by an "ae:FILE,..." spec, loaded directly (the reference). */
static kvc_codec *load_codec_of(const char *spec, kvc_err *err) {
    char path[512];
    snprintf(path, sizeof path, "%s", spec + 3);
    char *comma = strchr(path, ',');
    if (comma) *comma = '\0';
    return kvc_codec_load(path, err);
}

/* ------------------------------------------------------------------------- the walk ---- */

typedef enum { C_EXACT, C_F16, C_QUANT, C_AE } check_class;

typedef struct {
    const char *spec;
    check_class cls;
    int bits, group, kchannel;    /* C_QUANT; and C_AE latents (bits 0: f16, 32: f32) */
    size_t kbytes, vbytes, kblock; /* hand-computed row bytes of K and V, block bytes of K */
    int krows;                     /* block_rows(KV_K) */
    const char *canon;             /* the canonical spec init writes */
} spec_case;

static const spec_case CASES[] = {
    {"f32", C_EXACT, 0, 0, 0, 256, 256, 0, 1, "f32"},
    {"f16", C_F16, 0, 0, 0, 128, 128, 0, 1, "f16"},
    /* int8 default: V 64 codes + 1 group x 4; K 64 codes, block 64 x (scale + min) */
    {"int8", C_QUANT, 8, 64, 1, 64, 68, 256, 32, "int8:group=64,kgroup=32,keys=channel"},
    /* int4 group 32 on D 64: 32 code bytes + 2 groups x 4 bytes */
    {"int4", C_QUANT, 4, 32, 1, 32, 40, 256, 32, "int4:group=32,kgroup=32,keys=channel"},
    {"int4:group=16,kgroup=8", C_QUANT, 4, 16, 1, 32, 48, 256, 8, "int4:group=16,kgroup=8,keys=channel"},
    {"int8:keys=token", C_QUANT, 8, 64, 0, 68, 68, 0, 1, "int8:group=64,keys=token"},
    {"int8:group=8,keys=token", C_QUANT, 8, 8, 0, 96, 96, 0, 1, "int8:group=8,keys=token"},
    {"int4:kgroup=1", C_QUANT, 4, 32, 1, 32, 40, 256, 1, "int4:group=32,kgroup=1,keys=channel"},
    /* int2 group 32 on D 64: 16 code bytes (four a byte) + 2 groups x 4 bytes */
    {"int2", C_QUANT, 2, 32, 1, 16, 24, 256, 32, "int2:group=32,kgroup=32,keys=channel"},
    {"int2:keys=token,group=16", C_QUANT, 2, 16, 0, 32, 32, 0, 1, "int2:group=16,keys=token"},
    /* ae32: R 32; f16 64 B, f32 128 B, int8 32 + 4, int4 16 + 4 (group 32), group 8: 16 + 16 */
    {"ae:" AE32 ",reuse=off", C_AE, 0, 0, 0, 64, 64, 0, 1, "ae:" AE32 ",f16,reuse=off"},
    {"ae:" AE32 ",f32,reuse=off", C_AE, 32, 0, 0, 128, 128, 0, 1, "ae:" AE32 ",f32,reuse=off"},
    {"ae:" AE32 ",int8,reuse=off", C_AE, 8, 32, 0, 36, 36, 0, 1, "ae:" AE32 ",int8,group=32,reuse=off"},
    {"ae:" AE32 ",int4,group=8,reuse=off", C_AE, 4, 8, 0, 32, 32, 0, 1, "ae:" AE32 ",int4,group=8,reuse=off"},
    {"ae:" AE16 ",int4,reuse=off", C_AE, 4, 16, 0, 12, 12, 0, 1, "ae:" AE16 ",int4,group=16,reuse=off"},
};
#define N_CASES (int)(sizeof CASES / sizeof CASES[0])

/* The step of value i of a per-token packed row (codes | scales | mins) with c channels. */
static float row_step(const uint8_t *row, int c, int g, int bits, int i) {
    uint16_t h;
    memcpy(&h, row + kvc_kvq_code_bytes(bits, c) + (size_t)(i / g) * 2, 2);
    return kvc_f16_to_f32(h);
}

/* Checks y against x for a KIVI form: every value within half its group's stored step. */
static void check_quant(const spec_case *sc, int kind, const float *x, int64_t ldx, int n, const uint8_t *rows,
                        size_t rb, const uint8_t *blk, const float *y) {
    for (int t = 0; t < n; t++)
        for (int i = 0; i < D; i++) {
            float step;
            if (kind == KV_K && sc->kchannel) {
                uint16_t h;
                memcpy(&h, blk + (size_t)i * 2, 2);
                step = kvc_f16_to_f32(h);
            } else {
                step = row_step(rows + (size_t)t * rb, D, sc->group, sc->bits, i);
            }
            float e = fabsf(y[t * D + i] - x[t * ldx + i]);
            cr_assert(e <= step / 2 * STEP_SLACK + TINY, "%s kind %d row %d ch %d: err %g > half step %g", sc->spec,
                      kind, t, i, e, step / 2);
        }
}

/* Checks an ae round trip against the checkpoint's networks run directly: y_ref = dec(enc(x)).
 * The latent error bound (f16 rounding, or half a stored step) is carried through the linear
 * decoder as sum_j |W_oj| err_j. */
static void check_ae(const spec_case *sc, const kvc_codec *c, int layer, int head, int kind, const float *x,
                     int64_t ldx, int n, const uint8_t *rows, size_t rb, const float *y) {
    const ae_export *e = &c->ae[codec_index(c, layer, kind, c->slots > 1 ? head : 0)];
    const int R = c->meta.ae.latent;
    cr_assert_eq(e->n_dec, 1, "the committed codecs have linear decoders");
    float xin[D], z[D], yref[D], zerr[D];
    for (int t = 0; t < n; t++) {
        memcpy(xin, x + t * ldx, sizeof xin);
        kvc_ae_export_run(e->enc, e->n_enc, e->leaky_slope, xin, 1, z);
        kvc_ae_export_run(e->dec, e->n_dec, e->leaky_slope, z, 1, yref);
        for (int j = 0; j < R; j++)
            zerr[j] = sc->bits == 32 ? 0
                      : sc->bits == 0 ? (float)(F16_REL * fabsf(z[j]) + TINY)
                                      : row_step(rows + (size_t)t * rb, R, sc->group, sc->bits, j) / 2 * STEP_SLACK + TINY;
        for (int o = 0; o < D; o++) {
            double bound = AE_TOL * (1 + fabs(yref[o]));
            for (int j = 0; j < R; j++) bound += fabs(e->dec[0].w[o * R + j]) * zerr[j];
            float err = fabsf(y[t * D + o] - yref[o]);
            cr_assert(err <= bound, "%s layer %d head %d kind %d row %d ch %d: err %g > %g", sc->spec, layer, head,
                      kind, t, o, err, bound);
        }
    }
}

/* Every registered representation is covered by CASES, so a new one cannot go untested. */
Test(repr, every_registered_representation_is_walked) {
    for (int i = 0; KVC_REPRS[i]; i++) {
        int seen = 0;
        for (int j = 0; j < N_CASES; j++) {
            size_t n = strlen(KVC_REPRS[i]->name);
            seen |= !strncmp(CASES[j].spec, KVC_REPRS[i]->name, n) && (CASES[j].spec[n] == '\0' || CASES[j].spec[n] == ':');
        }
        cr_assert(seen, "representation '%s' has no case in test_repr.c", KVC_REPRS[i]->name);
    }
}

Test(repr, round_trips_within_budget_and_bytes_by_hand) {
    skip_without(AE32);
    skip_without(AE16);
    kvc_repr_env env = model_env();
    static float x[NMAX * K * D], y[NMAX * D];
    static uint8_t rows[NMAX * 4 * D], rows2[NMAX * 4 * D], blk[4 * D], blk2[4 * D];
    for (int ci = 0; ci < N_CASES; ci++) {
        const spec_case *sc = &CASES[ci];
        kvc_err err = {{0}};
        kvc_repr *r = kvc_repr_new(sc->spec, &env, &err);
        cr_assert_not_null(r, "%s: %s", sc->spec, err.msg);
        cr_assert_str_eq(r->spec, sc->canon);
        kvc_codec *c = NULL;
        if (sc->cls == C_AE) {
            c = load_codec_of(sc->spec, &err);
            cr_assert_not_null(c, "%s", err.msg);
        }
        cr_assert_eq(r->ops->block_rows(r, KV_K), sc->krows, "%s", sc->spec);
        cr_assert_eq(r->ops->block_rows(r, KV_V), 1, "%s", sc->spec);
        for (int layer = 0; layer < L; layer += (sc->cls == C_AE ? 1 : 7))
            for (int head = 0; head < K; head++)
                for (int kind = KV_K; kind <= KV_V; kind++) {
                    const size_t rb = r->ops->row_bytes(r, layer, head, kind);
                    const size_t bb = r->ops->block_bytes(r, layer, head, kind);
                    cr_assert_eq(rb, kind == KV_K ? sc->kbytes : sc->vbytes, "%s kind %d: row bytes %zu", sc->spec, kind, rb);
                    cr_assert_eq(bb, kind == KV_K ? sc->kblock : 0, "%s kind %d: block bytes %zu", sc->spec, kind, bb);
                    const int n = kind == KV_K ? sc->krows : 16;
                    fill_rows(x, n);
                    /* rows of one head inside (n, K, D), as the cache holds new tokens */
                    const float *xh = x + head * D;
                    const int64_t ldx = K * D;
                    r->ops->encode(r, layer, head, kind, xh, ldx, n, rows, bb ? blk : NULL);
                    const uint8_t *blks[NMAX];
                    for (int t = 0; t < n; t++) blks[t] = bb ? blk : NULL;
                    r->ops->decode(r, layer, head, kind, rows, bb ? blks : NULL, n, y);
                    /* strided and contiguous input store the same bytes */
                    static float xc[NMAX * D];
                    for (int t = 0; t < n; t++) memcpy(xc + t * D, xh + t * ldx, D * sizeof(float));
                    r->ops->encode(r, layer, head, kind, xc, D, n, rows2, bb ? blk2 : NULL);
                    cr_assert(!memcmp(rows, rows2, n * rb) && (!bb || !memcmp(blk, blk2, bb)), "%s: strided encode differs",
                              sc->spec);
                    switch (sc->cls) {
                    case C_EXACT:
                        for (int t = 0; t < n; t++)
                            for (int i = 0; i < D; i++) cr_assert_eq(y[t * D + i], xh[t * ldx + i], "%s", sc->spec);
                        break;
                    case C_F16:
                        for (int t = 0; t < n; t++)
                            for (int i = 0; i < D; i++) {
                                float xv = xh[t * ldx + i];
                                cr_assert(fabsf(y[t * D + i] - xv) <= F16_REL * fabsf(xv) + TINY, "f16: %g vs %g", y[t * D + i], xv);
                            }
                        break;
                    case C_QUANT: check_quant(sc, kind, xh, ldx, n, rows, rb, blk, y); break;
                    case C_AE: check_ae(sc, c, layer, head, kind, xh, ldx, n, rows, rb, y); break;
                    }
                }
        kvc_codec_free(c);
        kvc_repr_free(r);
    }
}

/* The decoders inline their f16 widening and dequantisation for speed: they must agree bit
 * for bit with kvc_f16_to_f32 (all 65536 patterns, NaNs as NaN) and the kvquant reference. */
Test(repr, fast_decoders_match_the_references_bit_for_bit) {
    kvc_repr_env env = model_env();
    kvc_err err = {{0}};
    kvc_repr *r = kvc_repr_new("f16", &env, &err);
    cr_assert_not_null(r, "%s", err.msg);
    static uint8_t all[65536 * 2];
    static float y[65536];
    for (uint32_t h = 0; h < 65536; h++) memcpy(all + 2 * h, &(uint16_t){(uint16_t)h}, 2);
    r->ops->decode(r, 0, 0, KV_V, all, NULL, 65536 / D, y);
    for (uint32_t h = 0; h < 65536; h++) {
        float ref = kvc_f16_to_f32((uint16_t)h);
        cr_assert(isnan(ref) ? isnan(y[h]) : !memcmp(&ref, &y[h], 4), "f16 %04x: %g vs %g", h, y[h], ref);
    }
    kvc_repr_free(r);
    const char *specs[] = {"int8:group=16,kgroup=8", "int4:group=16,kgroup=8", "int4:keys=token"};
    enum { T = 8 };
    static float x[T * D], yr[T * D], yq[T * D];
    static uint8_t rows[T * 2 * D], blk[4 * D];
    for (int s = 0; s < 3; s++) {
        r = kvc_repr_new(specs[s], &env, &err);
        cr_assert_not_null(r, "%s", err.msg);
        const int bits = specs[s][3] == '8' ? 8 : 4, g = s < 2 ? 16 : 32;
        for (int kind = KV_K; kind <= KV_V; kind++) {
            const int nb = r->ops->block_rows(r, kind);
            const size_t rb = r->ops->row_bytes(r, 0, 0, kind), cb = kvc_kvq_code_bytes(bits, D);
            for (int i = 0; i < T * D; i++) x[i] = 3 * urand() + (i % D == 5 ? 20 : 0);
            for (int t = 0; t < T; t += nb) r->ops->encode(r, 0, 0, kind, x + t * D, D, nb, rows + t * rb, blk);
            const uint8_t *blks[T];
            for (int t = 0; t < T; t++) blks[t] = blk;
            r->ops->decode(r, 0, 0, kind, rows, blks, T, yq);
            for (int t = 0; t < T; t++) {
                uint16_t sc[D], mn[D];
                if (nb > 1) {
                    memcpy(sc, blk, 2 * D), memcpy(mn, blk + 2 * D, 2 * D);
                    kvc_kvq_dequant_channels_cpu(rows + t * rb, sc, mn, 1, D, bits, yr + t * D);
                } else {
                    memcpy(sc, rows + t * rb + cb, 2 * (D / g)), memcpy(mn, rows + t * rb + cb + 2 * (D / g), 2 * (D / g));
                    kvc_kvq_dequant_tokens_cpu(rows + t * rb, sc, mn, 1, D, g, bits, yr + t * D);
                }
            }
            cr_assert(!memcmp(yr, yq, sizeof yr), "%s kind %d: decode differs from kvquant", specs[s], kind);
        }
        kvc_repr_free(r);
    }
}

/* Quantisation is not free: int4 keys per channel beat per token on outlier channels, and
 * the errors are in the range KIVI reports, so the budget checks above are not vacuous. */
Test(repr, int4_channel_keys_beat_token_keys_on_outliers) {
    kvc_repr_env env = model_env();
    kvc_err err = {{0}};
    kvc_repr *ch = kvc_repr_new("int4", &env, &err), *tok = kvc_repr_new("int4:keys=token", &env, &err);
    cr_assert(ch && tok, "%s", err.msg);
    static float x[32 * D], y[32 * D];
    static uint8_t rows[32 * D], blk[4 * D];
    for (int t = 0; t < 32; t++)
        for (int i = 0; i < D; i++) x[t * D + i] = urand() + (i % 13 == 2 ? 30 + 5 * urand() : 0);
    double rel[2];
    for (int m = 0; m < 2; m++) {
        kvc_repr *r = m ? tok : ch;
        r->ops->encode(r, 0, 0, KV_K, x, D, m ? 1 : 32, rows, blk);
        if (m)
            for (int t = 1; t < 32; t++) r->ops->encode(r, 0, 0, KV_K, x + t * D, D, 1, rows + t * 40, NULL);
        const uint8_t *blks[32];
        for (int t = 0; t < 32; t++) blks[t] = blk;
        r->ops->decode(r, 0, 0, KV_K, rows, m ? NULL : blks, 32, y);
        double se = 0, sx = 0;
        for (int i = 0; i < 32 * D; i++) se += (y[i] - x[i]) * (y[i] - x[i]), sx += x[i] * x[i];
        rel[m] = sqrt(se / sx);
    }
    cr_log_info("int4 keys: per-channel rel err %.4f, per-token %.4f", rel[0], rel[1]);
    cr_assert(rel[0] < 0.5 * rel[1], "channel %g vs token %g", rel[0], rel[1]);
    cr_assert(rel[1] < 0.1 && rel[0] > 1e-4, "channel %g token %g", rel[0], rel[1]);
    kvc_repr_free(ch);
    kvc_repr_free(tok);
}

/* After eviction a decode call mixes rows of several key blocks: each row is read with its
 * own block's scales (blocks of very different ranges make a mix-up visible). */
Test(repr, key_rows_of_several_blocks_decode_with_their_own_block) {
    kvc_repr_env env = model_env();
    kvc_err err = {{0}};
    kvc_repr *r = kvc_repr_new("int4:kgroup=4", &env, &err);
    cr_assert_not_null(r, "%s", err.msg);
    enum { NB = 3, T = 4 };
    static float x[NB * T * D], y[NB * T * D];
    static uint8_t rows[NB * T * D / 2], mixed[NB * T * D / 2], blk[NB][4 * D];
    for (int i = 0; i < NB * T * D; i++) x[i] = urand() * (i / (T * D) == 1 ? 50.0f : 1.0f) + (i / (T * D)) * 7.0f;
    for (int b = 0; b < NB; b++) r->ops->encode(r, 0, 0, KV_K, x + b * T * D, D, T, rows + b * T * D / 2, blk[b]);
    /* row order b0t0, b1t0, b2t0, b0t1, ... */
    const uint8_t *blks[NB * T];
    int src[NB * T];
    for (int i = 0; i < NB * T; i++) {
        int b = i % NB, t = i / NB;
        src[i] = b * T + t;
        blks[i] = blk[b];
        memcpy(mixed + i * D / 2, rows + src[i] * D / 2, D / 2);
    }
    r->ops->decode(r, 0, 0, KV_K, mixed, blks, NB * T, y);
    for (int i = 0; i < NB * T; i++)
        for (int c = 0; c < D; c++) {
            uint16_t h;
            memcpy(&h, blks[i] + c * 2, 2);
            float e = fabsf(y[i * D + c] - x[src[i] * D + c]);
            cr_assert(e <= kvc_f16_to_f32(h) / 2 * STEP_SLACK + TINY, "row %d ch %d: err %g", i, c, e);
        }
    kvc_repr_free(r);
}

/* ----------------------------------------------------------------- autoencoder paths ---- */

/* Attention in latent space: W (sum_i a_i z_i) + b equals sum_i a_i decode(z_i) for weights
 * summing to 1, for f16 and int8 latents (quantisation is inside both sides alike). */
Test(repr, latent_lift_equals_weighted_decode) {
    skip_without(AE32);
    kvc_repr_env env = model_env();
    const char *specs[] = {"ae:" AE32, "ae:" AE32 ",int8,group=8"};
    enum { N = 40 };
    static float x[N * K * D], y[N * D], z[N * 32];
    static uint8_t rows[N * 128];
    for (int s = 0; s < 2; s++) {
        kvc_err err = {{0}};
        kvc_repr *r = kvc_repr_new(specs[s], &env, &err);
        cr_assert_not_null(r, "%s", err.msg);
        cr_assert_not_null(r->ops->latent_dim);
        for (int layer = 0; layer < L; layer += 3)
            for (int head = 0; head < K; head++) {
                const int R = r->ops->latent_dim(r, layer, head);
                cr_assert_eq(R, r->ops->reused(r, layer, head, KV_V) ? 0 : 32, "%s layer %d", specs[s], layer);
                if (!R) continue;
                fill_rows(x, N);
                const size_t rb = r->ops->row_bytes(r, layer, head, KV_V);
                r->ops->encode(r, layer, head, KV_V, x + head * D, K * D, N, rows, NULL);
                r->ops->decode(r, layer, head, KV_V, rows, NULL, N, y);
                r->ops->decode_latent(r, layer, head, rows, N, z);
                float a[N], asum = 0, zs[32] = {0}, out[D];
                for (int i = 0; i < N; i++) asum += a[i] = 0.05f + fabsf(urand());
                for (int i = 0; i < N; i++) a[i] /= asum;
                for (int i = 0; i < N; i++)
                    for (int j = 0; j < R; j++) zs[j] += a[i] * z[i * R + j];
                const float *W, *B;
                r->ops->linear_decoder(r, layer, head, &W, &B);
                for (int o = 0; o < D; o++) { /* W zs + b: attention in latent space */
                    float acc = 0;
                    for (int j = 0; j < R; j++) acc += W[o * R + j] * zs[j];
                    out[o] = acc + (B ? B[o] : 0.0f);
                }
                for (int o = 0; o < D; o++) {
                    double ref = 0;
                    for (int i = 0; i < N; i++) ref += (double)a[i] * y[i * D + o];
                    cr_assert(fabs(out[o] - ref) <= AE_TOL * (1 + fabs(ref)), "%s layer %d head %d ch %d: %g vs %g",
                              specs[s], layer, head, o, out[o], ref);
                }
                (void)rb;
            }
        kvc_repr_free(r);
    }
}

/* reuse=on follows the checkpoint's plan: ae32's threshold 0.25 chose 25 key items; those
 * store nothing and predict exactly as kvc_reuse_item_predict; reuse=off stores every item. */
Test(repr, reuse_plan_items_store_nothing_and_predict) {
    skip_without(AE32);
    kvc_repr_env env = model_env();
    kvc_err err = {{0}};
    kvc_repr *on = kvc_repr_new("ae:" AE32, &env, &err), *off = kvc_repr_new("ae:" AE32 ",reuse=off", &env, &err);
    kvc_codec *c = kvc_codec_load(AE32, &err);
    cr_assert(on && off && c, "%s", err.msg);
    cr_assert_not_null(c->reuse);
    cr_assert_str_eq(on->spec, "ae:" AE32 ",f16,reuse=on");
    enum { N = 9 };
    float src[N * D], y[N * D], yref[N * D];
    int n_k = 0, n_v = 0;
    for (int layer = 0; layer < L; layer++)
        for (int head = 0; head < K; head++)
            for (int kind = KV_K; kind <= KV_V; kind++) {
                const reuse_item *it = layer ? kvc_reuse_plan_item(c->reuse, layer, head, kind) : NULL;
                const int want = it && it->chosen != REUSE_NONE;
                cr_assert_eq(on->ops->reused(on, layer, head, kind), want, "layer %d head %d kind %d", layer, head, kind);
                cr_assert_eq(off->ops->reused(off, layer, head, kind), 0);
                cr_assert_eq(off->ops->row_bytes(off, layer, head, kind), 64u);
                cr_assert_eq(on->ops->row_bytes(on, layer, head, kind), want ? 0u : 64u);
                if (!want) continue;
                *(kind == KV_K ? &n_k : &n_v) += 1;
                for (int i = 0; i < N * D; i++) src[i] = 3 * urand();
                on->ops->predict(on, layer, head, kind, src, N, y);
                cr_assert_eq(kvc_reuse_item_predict(c->reuse, it, src, D, yref, D, N), 0);
                for (int i = 0; i < N * D; i++) cr_assert(fabsf(y[i] - yref[i]) <= 1e-6f * (1 + fabsf(yref[i])));
            }
    cr_log_info("ae32 reuse plan: %d K and %d V items reused", n_k, n_v);
    cr_assert_eq(n_k, 25, "the committed ae32 plan (threshold 0.25) reuses 25 key items, got %d", n_k);
    kvc_repr_free(on);
    kvc_repr_free(off);
    kvc_codec_free(c);
}

/* A hand-made checkpoint with a hidden layer (BatchNorm, leaky ReLU), one network per head,
 * trained for layers 0 and 2 only: untrained layers fall back to f16 rows, each head decodes
 * through its own networks, and the nonlinear decoder offers no latent attention. */
Test(repr, per_head_nonlinear_codec_and_untrained_layers) {
    skip_without(AE32);
    kvc_err err = {{0}};
    kvc_codec *base = kvc_codec_load(AE32, &err);
    cr_assert_not_null(base, "%s", err.msg);
    kvc_codec_meta meta = base->meta;
    kvc_codec_free(base);
    meta.per_head = 1;
    meta.ae.hidden = 48;
    meta.ae.latent = 24;
    meta.ae.norm = AE_NORM_BATCH;
    meta.ae.act = KVC_ACT_LEAKY_RELU;
    kvc_codec *c = kvc_codec_new(&meta, &err);
    cr_assert_not_null(c, "%s", err.msg);
    for (int layer = 0; layer <= 2; layer += 2) {
        c->trained[layer] = 1;
        for (int kind = 0; kind < 2; kind++)
            for (int s = 0; s < K; s++) {
                ae_model *m = kvc_ae_new(&meta.ae, 100 + layer * 10 + kind * 3 + s, &err);
                cr_assert_not_null(m, "%s", err.msg);
                cr_assert_eq(kvc_ae_export_folded(m, &c->ae[codec_index(c, layer, kind, s)], &err), 0, "%s", err.msg);
                kvc_ae_free(m);
            }
    }
    char path[64];
    snprintf(path, sizeof path, "/tmp/test_repr_%d.h5", (int)getpid());
    cr_assert_eq(kvc_codec_save(path, c, NULL, NULL, &err), 0, "%s", err.msg);
    char spec[128];
    snprintf(spec, sizeof spec, "ae:%s,f32", path);
    kvc_repr_env env = model_env();
    kvc_repr *r = kvc_repr_new(spec, &env, &err);
    unlink(path);
    cr_assert_not_null(r, "%s", err.msg);
    enum { N = 12 };
    static float x[N * K * D], y[N * D], z[N * D], yref[N * D], xc[N * D];
    static uint8_t rows[N * 4 * D];
    for (int layer = 0; layer < 4; layer++)
        for (int head = 0; head < K; head++)
            for (int kind = 0; kind < 2; kind++) {
                const int tr = layer == 0 || layer == 2;
                cr_assert_eq(r->ops->row_bytes(r, layer, head, kind), tr ? 24u * 4 : (size_t)D * 2);
                cr_assert_eq(r->ops->latent_dim(r, layer, head), 0, "nonlinear decoders have no latent path");
                cr_assert_eq(r->ops->reused(r, layer, head, kind), 0, "no plan, nothing reused");
                fill_rows(x, N);
                r->ops->encode(r, layer, head, kind, x + head * D, K * D, N, rows, NULL);
                r->ops->decode(r, layer, head, kind, rows, NULL, N, y);
                for (int t = 0; t < N; t++) memcpy(xc + t * D, x + t * K * D + head * D, D * sizeof(float));
                if (!tr) {
                    for (int i = 0; i < N * D; i++) cr_assert(fabsf(y[i] - xc[i]) <= F16_REL * fabsf(xc[i]) + TINY);
                    continue;
                }
                const ae_export *e = &c->ae[codec_index(c, layer, kind, head)];
                kvc_ae_export_run(e->enc, e->n_enc, e->leaky_slope, xc, N, z);
                kvc_ae_export_run(e->dec, e->n_dec, e->leaky_slope, z, N, yref);
                for (int i = 0; i < N * D; i++)
                    cr_assert(fabsf(y[i] - yref[i]) <= AE_TOL * (1 + fabsf(yref[i])), "layer %d head %d: %g vs %g", layer,
                              head, y[i], yref[i]);
                if (head == 1) { /* heads really use their own networks */
                    const ae_export *e0 = &c->ae[codec_index(c, layer, kind, 0)];
                    kvc_ae_export_run(e0->enc, e0->n_enc, e0->leaky_slope, xc, N, z);
                    kvc_ae_export_run(e0->dec, e0->n_dec, e0->leaky_slope, z, N, yref);
                    double diff = 0;
                    for (int i = 0; i < N * D; i++) diff += fabsf(y[i] - yref[i]);
                    cr_assert(diff > 1e-2, "head 1 decoded with head 0's network");
                }
            }
    kvc_repr_free(r);
    kvc_codec_free(c);
}

/* The cache calls encode/decode from several OpenMP threads on different heads: results are
 * bit-identical to one thread (no shared scratch). */
Test(repr, threads_encode_and_decode_independently) {
    skip_without(AE32);
    kvc_repr_env env = model_env();
    const char *specs[] = {"ae:" AE32 ",int4", "int8", "int4:keys=token"};
    enum { N = 32, ITEMS = L * K * 2 };
    static float x[N * K * D];
    static float y1[ITEMS][N * D], y2[ITEMS][N * D];
    fill_rows(x, N);
    for (int s = 0; s < 3; s++) {
        kvc_err err = {{0}};
        kvc_repr *r = kvc_repr_new(specs[s], &env, &err);
        cr_assert_not_null(r, "%s", err.msg);
        for (int pass = 0; pass < 2; pass++) {
#pragma omp parallel for num_threads(4) schedule(dynamic, 1) if (pass)
            for (int item = 0; item < ITEMS; item++) {
                const int layer = item / (K * 2), head = item / 2 % K, kind = item % 2;
                if (r->ops->reused && r->ops->reused(r, layer, head, kind)) continue; /* nothing stored */
                uint8_t rows[N * 4 * D], blk[4 * D];
                const uint8_t *blks[N];
                const int nb = r->ops->block_rows(r, kind);
                for (int t = 0; t < N; t++) blks[t] = blk;
                for (int t0 = 0; t0 < N; t0 += nb)
                    r->ops->encode(r, layer, head, kind, x + (size_t)t0 * K * D + head * D, K * D, nb,
                                   rows + t0 * r->ops->row_bytes(r, layer, head, kind), blk);
                /* N is one key block for int8, so one blk serves every row */
                r->ops->decode(r, layer, head, kind, rows, blks, N, pass ? y2[item] : y1[item]);
            }
        }
        cr_assert(!memcmp(y1, y2, sizeof y1), "%s: threaded results differ", specs[s]);
        kvc_repr_free(r);
    }
}

/* -------------------------------------------------------------------------- bad input ---- */

/* spec must fail with a message containing want. */
static void expect_error(const char *spec, const kvc_repr_env *env, const char *want) {
    kvc_err err = {{0}};
    kvc_repr *r = kvc_repr_new(spec, env, &err);
    cr_assert_null(r, "'%s' was accepted", spec);
    cr_assert(strstr(err.msg, want), "'%s': message '%s' lacks '%s'", spec, err.msg, want);
}

Test(repr, bad_specs_are_clear_errors) {
    kvc_repr_env env = model_env();
    expect_error("nosuch", &env, "unknown representation 'nosuch'");
    expect_error("f16:group=8", &env, "takes no options");
    expect_error("int8:foo=1", &env, "unknown option 'foo'");
    expect_error("int8:group", &env, "not key=value");
    expect_error("int8:group=48", &env, "group=48 does not divide head_dim 64");
    expect_error("int8:group=0", &env, "expected an integer in [1, 64]");
    expect_error("int4:group=1", &env, "not a multiple of 2");
    expect_error("int2:group=2", &env, "not a multiple of 4");
    expect_error("int8:kgroup=0", &env, "[1, 4096]");
    expect_error("int8:kgroup=5000", &env, "[1, 4096]");
    expect_error("int8:kgroup=x", &env, "kgroup=x");
    expect_error("int8:keys=row", &env, "expected channel or token");
    expect_error("int8:keys=token,kgroup=16", &env, "kgroup applies to per-channel keys only");
    kvc_repr_env odd = env;
    odd.shape.head_dim = 63;
    expect_error("int4", &odd, "not a multiple of 2");
    expect_error("int2", &odd, "not a multiple of 4");
    expect_error("ae", &env, "needs a codec file");
    expect_error("ae:/nonexistent/codec.h5", &env, "cannot open codec '/nonexistent/codec.h5'");
}

Test(repr, bad_codecs_are_clear_errors) {
    skip_without(AE32);
    kvc_repr_env env = model_env();
    char path[64], spec[96];
    snprintf(path, sizeof path, "/tmp/test_repr_text_%d.h5", (int)getpid());
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("this is not an HDF5 file\n", f);
    fclose(f);
    snprintf(spec, sizeof spec, "ae:%s", path);
    expect_error(spec, &env, "not a readable HDF5 file");
    unlink(path);
    expect_error("ae:" AE32 ",bogus", &env, "unknown option 'bogus'");
    expect_error("ae:" AE32 ",reuse=maybe", &env, "expected on or off");
    expect_error("ae:" AE32 ",int4,group=5", &env, "group=5 does not divide the codec's latent size 32");
    expect_error("ae:" AE32 ",f16,group=8", &env, "applies to int8/int4 latents only");
    kvc_repr_env other = env;
    other.fingerprint = "0000000000000000";
    expect_error("ae:" AE32, &other, "fingerprint");
    kvc_repr_env small = env;
    small.shape.head_dim = 32;
    small.fingerprint = NULL; /* shapes are checked even without a fingerprint */
    expect_error("ae:" AE32, &small, "head_dim 64) disagree with the model (30, 3, 32)");
    kvc_repr_env nofp = env;
    nofp.fingerprint = NULL;
    kvc_err err = {{0}};
    kvc_repr *r = kvc_repr_new("ae:" AE32, &nofp, &err);
    cr_assert_not_null(r, "no fingerprint given: only shapes are checked (%s)", err.msg);
    kvc_repr_free(r);
}

/* keys=/values= store one kind without the codec: int4 values per token (groups of 32) next to
 * codec keys. Those rows round-trip within half a step of their group, take the hand-counted
 * bytes, are never reused and offer no latent attention; the codec's kind is unchanged. */
Test(repr, ae_kinds_stored_without_the_codec) {
    skip_without(AE32);
    kvc_repr_env env = model_env();
    kvc_err err = {{0}};
    kvc_repr *r = kvc_repr_new("ae:" AE32 ",int8,values=int4", &env, &err);
    kvc_repr *base = kvc_repr_new("ae:" AE32 ",int8", &env, &err);
    cr_assert(r && base, "%s", err.msg);
    cr_assert_str_eq(r->spec, "ae:" AE32 ",int8,group=32,reuse=on,values=int4");
    float x[NMAX * K * D], y[NMAX * D], yb[NMAX * D];
    fill_rows(x, NMAX);
    uint8_t rows[NMAX * 64], rb_[NMAX * 64];
    for (int layer = 0; layer < L; layer += 7)
        for (int head = 0; head < K; head++) {
            /* values: 32 codes + 2 groups x (f16 scale + f16 min) */
            cr_assert_eq(r->ops->row_bytes(r, layer, head, KV_V), 40u);
            cr_assert_eq(r->ops->reused(r, layer, head, KV_V), 0);
            cr_assert_eq(r->ops->latent_dim(r, layer, head), 0);
            r->ops->encode(r, layer, head, KV_V, x + head * D, K * D, NMAX, rows, NULL);
            r->ops->decode(r, layer, head, KV_V, rows, NULL, NMAX, y);
            for (int t = 0; t < NMAX; t++)
                for (int g = 0; g < 2; g++) {
                    float mn = INFINITY, mx = -INFINITY;
                    for (int i = g * 32; i < g * 32 + 32; i++) {
                        float v = x[(size_t)t * K * D + head * D + i];
                        mn = v < mn ? v : mn, mx = v > mx ? v : mx;
                    }
                    float step = (mx - mn) / 15.0f, tol = 0.5f * step * 1.001f + 1e-3f * (fabsf(mx) + fabsf(mn)) + 1e-6f;
                    for (int i = g * 32; i < g * 32 + 32; i++)
                        cr_assert(fabsf(y[t * D + i] - x[(size_t)t * K * D + head * D + i]) <= tol,
                                  "layer %d head %d token %d channel %d", layer, head, t, i);
                }
            /* keys still go through the codec, byte for byte as without the option */
            cr_assert_eq(r->ops->row_bytes(r, layer, head, KV_K), base->ops->row_bytes(base, layer, head, KV_K));
            cr_assert_eq(r->ops->reused(r, layer, head, KV_K), base->ops->reused(base, layer, head, KV_K));
            if (r->ops->reused(r, layer, head, KV_K)) continue;
            r->ops->encode(r, layer, head, KV_K, x + head * D, K * D, NMAX, rows, NULL);
            base->ops->encode(base, layer, head, KV_K, x + head * D, K * D, NMAX, rb_, NULL);
            cr_assert_arr_eq(rows, rb_, (size_t)NMAX * r->ops->row_bytes(r, layer, head, KV_K));
            r->ops->decode(r, layer, head, KV_K, rows, NULL, NMAX, y);
            base->ops->decode(base, layer, head, KV_K, rb_, NULL, NMAX, yb);
            cr_assert_arr_eq(y, yb, sizeof(float) * NMAX * D);
        }
    /* keys=f16: no key item is reused any more */
    kvc_repr *kf = kvc_repr_new("ae:" AE32 ",keys=f16", &env, &err);
    cr_assert_not_null(kf, "%s", err.msg);
    for (int layer = 1; layer < L; layer++)
        for (int head = 0; head < K; head++) {
            cr_assert_eq(kf->ops->reused(kf, layer, head, KV_K), 0);
            cr_assert_eq(kf->ops->row_bytes(kf, layer, head, KV_K), 128u);
        }
    expect_error("ae:" AE32 ",values=int2", &env, "expected ae, f16, int8 or int4");
    kvc_repr_free(kf);
    kvc_repr_free(r);
    kvc_repr_free(base);
}
