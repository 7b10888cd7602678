/* test_tc.c - the transform codec: the codebook kernels by hand (widths across byte
 * boundaries, ties, NaN), fitting on a synthetic capture whose layers predict each other
 * (prediction chosen, error falling with bits, the decoder rebuilding the encoder's rows bit
 * for bit), the transform-coded cache (exact sinks, bytes by hand, eviction keeping one token
 * set, attention close to the full cache), and every bad input the issue lists; on the real
 * model (skipped when absent) a capture, a fit and a forward pass through the codec. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fixture.h"
#include "kvc/codec.h"
#include "kvc/dataset.h"
#include "kvc/kvcache.h"
#include "kvc/tc.h"
#include "kvc/trainer.h"

#define TEST_RNG_SEED 4242
#include "test_rand.h"

/* ================================================================== codebooks ==== */

Test(tc, codebook_packs_mixed_widths_low_bit_first) {
    /* widths 3, 5, 8, 1, 0, 2: 19 bits, 3 bytes; levels 0, 1, 2 ... per component */
    const uint8_t bits[6] = {3, 5, 8, 1, 0, 2};
    int32_t off[6];
    float levels[8 + 32 + 256 + 2 + 4];
    int at = 0;
    for (int c = 0; c < 6; c++) {
        off[c] = at;
        for (int j = 0; bits[c] && j < (1 << bits[c]); j++) levels[at++] = (float)j;
    }
    const kvc_codebook cb = {6, bits, levels, off, kvc_codebook_row_bytes(bits, 6)};
    cr_assert_eq(cb.row_bytes, 3);
    const float y[6] = {5.2f, 17.0f, 200.4f, 0.9f, 123.0f, 2.5f}; /* 2.5: a tie, rounds down to 2 */
    uint8_t codes[3];
    kvc_codebook_quantize(&cb, y, 1, 6, codes);
    /* 5 | 17 << 3 | 200 << 8 | 1 << 16 | 2 << 17 */
    const uint32_t want = 5u | 17u << 3 | 200u << 8 | 1u << 16 | 2u << 17;
    cr_expect_eq(codes[0], want & 0xFF);
    cr_expect_eq(codes[1], (want >> 8) & 0xFF);
    cr_expect_eq(codes[2], (want >> 16) & 0xFF);
    float back[6];
    kvc_codebook_dequantize(&cb, codes, 1, back, 6);
    const float expect[6] = {5, 17, 200, 1, 0, 2};
    for (int c = 0; c < 6; c++) cr_expect_eq(back[c], expect[c], "component %d: %g", c, back[c]);
    /* out of range clamps to the end levels; NaN codes as 0 */
    const float z[6] = {-9, 99, NAN, -1, 0, 7};
    kvc_codebook_quantize(&cb, z, 1, 6, codes);
    kvc_codebook_dequantize(&cb, codes, 1, back, 6);
    const float ez[6] = {0, 31, 0, 0, 0, 3};
    for (int c = 0; c < 6; c++) cr_expect_eq(back[c], ez[c], "component %d: %g", c, back[c]);
}

/* ============================================================ a synthetic capture ==== */

enum { SL = 3, SK = 2, SD = 8, SH = 4, SN = 3072, SCTX = 512 };
#define SE (SK * SD)

/* Layer 0's keys are a random mix of 4 latent factors; layer l's keys are a fixed rotation of
 * layer l-1's plus a little noise; values are a fixed map of the keys plus noise: so the
 * predictors have something to find. */
static int synth_fresh_layer = -1; /* a layer whose keys owe nothing to the layer below (-1: none) */

static void synth_rows(int64_t n, float *k[SL], float *v[SL], float *q[SL]) {
    float mix[SE][4], rot[SE][SE], vm[SE][SE];
    uint64_t save = rs;
    rs = 7;
    for (int i = 0; i < SE; i++) {
        for (int f = 0; f < 4; f++) mix[i][f] = gauss();
        for (int j = 0; j < SE; j++) rot[i][j] = (i == j) + 0.2f * gauss(), vm[i][j] = 0.5f * gauss();
    }
    rs = save;
    for (int64_t t = 0; t < n; t++) {
        float fac[4], prev[SE];
        for (int f = 0; f < 4; f++) fac[f] = gauss();
        for (int i = 0; i < SE; i++) {
            prev[i] = 0.05f * gauss();
            for (int f = 0; f < 4; f++) prev[i] += mix[i][f] * fac[f];
        }
        for (int l = 0; l < SL; l++) {
            float cur[SE];
            if (l == synth_fresh_layer) { /* fresh factors: nothing to predict from below */
                for (int f = 0; f < 4; f++) fac[f] = gauss();
                for (int i = 0; i < SE; i++) {
                    prev[i] = 0.05f * gauss();
                    for (int f = 0; f < 4; f++) prev[i] += mix[i][f] * fac[f];
                }
            }
            for (int i = 0; i < SE; i++) {
                float a = 0.05f * gauss();
                for (int j = 0; j < SE; j++) a += (l ? rot[i][j] : (float)(i == j)) * prev[j];
                cur[i] = a;
            }
            for (int i = 0; i < SE; i++) {
                k[l][t * SE + i] = cur[i];
                float a = 0.1f * gauss();
                for (int j = 0; j < SE; j++) a += vm[i][j] * cur[j];
                v[l][t * SE + i] = a;
            }
            for (int i = 0; i < SH * SD; i++) q[l][t * SH * SD + i] = gauss();
            memcpy(prev, cur, sizeof prev);
        }
    }
}

static kvc_kv_info synth_info(void) {
    kvc_kv_info in = {0};
    snprintf(in.model_name, sizeof in.model_name, "synthetic");
    snprintf(in.model_fingerprint, sizeof in.model_fingerprint, "00000000000000aa");
    snprintf(in.corpus_name, sizeof in.corpus_name, "synthetic");
    snprintf(in.dtype, sizeof in.dtype, "f32");
    in.n_layer = SL, in.n_head = SH, in.n_head_kv = SK, in.head_dim = SD, in.rope_base = 10000.0f, in.ctx = SCTX;
    in.n_layers_stored = SL;
    for (int j = 0; j < SL; j++) in.layers[j] = j;
    return in;
}

/* Writes a synthetic capture of n tokens (positions restart every SCTX) to path. */
static void make_capture(const char *path, int64_t n, int layers) {
    kvc_kv_info in = synth_info();
    in.n_layers_stored = layers;
    float *k[SL], *v[SL], *q[SL];
    for (int l = 0; l < SL; l++)
        k[l] = malloc(sizeof(float) * n * SE), v[l] = malloc(sizeof(float) * n * SE), q[l] = malloc(sizeof(float) * n * SH * SD);
    synth_rows(n, k, v, q);
    kvc_err err = {{0}};
    kvc_kv_writer *w = kvc_kv_writer_open(path, &in, 256, 0, &err);
    cr_assert_not_null(w, "%s", err.msg);
    int32_t *ids = malloc(sizeof(int32_t) * n), *pos = malloc(sizeof(int32_t) * n);
    for (int64_t t = 0; t < n; t++) ids[t] = (int32_t)(t % 100), pos[t] = (int32_t)(t % SCTX);
    cr_assert_eq(kvc_kv_writer_append(w, ids, pos, (int)n, (const float *const *)k, (const float *const *)v,
                                      (const float *const *)q, &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_kv_writer_close(w, 1, &err), 0, "%s", err.msg);
    for (int l = 0; l < SL; l++) free(k[l]), free(v[l]), free(q[l]);
    free(ids), free(pos);
}

static const char *tmp(const char *tag) {
    static char buf[8][128];
    static int at;
    char *b = buf[at++ % 8];
    snprintf(b, 128, "/tmp/kvc_test_tc_%s.%d.h5", tag, (int)getpid());
    return b;
}

static kvc_tc *fit(const char *data, double bits, int predict, const char *out) {
    kvc_tc_train_opts o;
    kvc_tc_train_opts_defaults(&o);
    const char *paths[1] = {data};
    o.data = paths, o.n_data = 1, o.out = out, o.bits = bits, o.predict = predict;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_train_tc(&o, &err), 0, "%s", err.msg);
    kvc_tc *tc = kvc_tc_load(out, &err);
    cr_assert_not_null(tc, "%s", err.msg);
    return tc;
}

/* Mean relative error of the held-back rows over every part. */
static double mean_val_err(const kvc_tc *tc) {
    double s = 0;
    for (int i = 0; i < tc->n_layer * 2 * tc->groups; i++) s += tc->parts[i].val_rel_err;
    return s / (tc->n_layer * 2 * tc->groups);
}

Test(tc, fit_uses_prediction_and_error_falls_with_bits, .timeout = 120) {
    const char *cap = tmp("cap"), *c1 = tmp("b1"), *c3 = tmp("b3"), *cn = tmp("np");
    make_capture(cap, SN, SL);
    kvc_tc *a = fit(cap, 1.0, 1, c1), *b = fit(cap, 3.0, 1, c3), *n = fit(cap, 3.0, 0, cn);
    cr_expect_float_eq(kvc_tc_mean_bits(a), 1.0, 1e-9);
    cr_expect_float_eq(kvc_tc_mean_bits(b), 3.0, 1e-9);
    cr_expect_eq(b->groups, 1, "the layer's heads are coded jointly by default");
    cr_expect_eq(b->sinks, 4);
    cr_expect_str_eq(b->model_fingerprint, "00000000000000aa");
    cr_expect_eq(b->parts[kvc_tc_index(b, 1, KV_K, 0)].inputs, KVC_TC_IN_KPREV);
    cr_expect_eq(b->parts[kvc_tc_index(b, 1, KV_V, 0)].inputs, KVC_TC_IN_KCUR | KVC_TC_IN_VPREV);
    cr_expect_eq(b->parts[kvc_tc_index(b, 0, KV_K, 0)].inputs, 0, "layer 0 has nothing below");
    cr_expect_eq(n->parts[kvc_tc_index(n, 1, KV_V, 0)].inputs, 0);
    const double ea = mean_val_err(a), eb = mean_val_err(b), en = mean_val_err(n);
    cr_expect(eb < ea, "3 bits (%g) must beat 1 bit (%g)", eb, ea);
    cr_expect(eb < 0.12, "3 bits on low-rank data: error %g", eb);
    /* layer 1's keys are a rotation of layer 0's: predicting them must beat coding alone */
    const double p1 = b->parts[kvc_tc_index(b, 1, KV_K, 0)].val_rel_err, q1 = n->parts[kvc_tc_index(n, 1, KV_K, 0)].val_rel_err;
    cr_expect(p1 <= q1 * 1.05, "layer 1 keys: predicted %g vs alone %g", p1, q1);
    (void)en;
    /* the codes' entropy is saved per part: positive, never above the fixed-width bits */
    for (int i = 0; i < b->n_layer * 2 * b->groups; i++) {
        const kvc_tc_part *pp = &b->parts[i];
        int sum = 0;
        for (int c = 0; c < pp->dim; c++) sum += pp->bits[c];
        cr_expect(pp->code_entropy > 0.5 * sum && pp->code_entropy <= sum + 1e-9, "part %d: entropy %g of %d bits", i,
                  pp->code_entropy, sum);
    }
    /* the decoder rebuilds exactly what the encoder said it would */
    enum { N = 64 };
    float *k[SL], *v[SL], *q[SL];
    for (int l = 0; l < SL; l++) k[l] = malloc(sizeof(float) * N * SE), v[l] = malloc(sizeof(float) * N * SE), q[l] = malloc(sizeof(float) * N * SH * SD);
    synth_rows(N, k, v, q);
    float *xh[2][SL], *yh[2][SL], *scr = malloc(sizeof(float) * kvc_tc_scratch_floats(b, N));
    uint8_t *codes = malloc((size_t)N * SE * 2);
    for (int l = 0; l < SL; l++)
        for (int kind = 0; kind < 2; kind++) {
            xh[kind][l] = malloc(sizeof(float) * N * SE), yh[kind][l] = malloc(sizeof(float) * N * SE);
            const float *kp = l ? xh[0][l - 1] : NULL, *vp = l ? xh[1][l - 1] : NULL;
            kvc_tc_encode(b, l, kind, kind ? v[l] : k[l], kp, vp, xh[0][l], N, codes, xh[kind][l], scr);
            kvc_tc_decode(b, l, kind, codes, kp, vp, xh[0][l], N, yh[kind][l], scr);
            cr_assert(!memcmp(xh[kind][l], yh[kind][l], sizeof(float) * N * SE), "layer %d kind %d", l, kind);
        }
    for (int l = 0; l < SL; l++) {
        free(k[l]), free(v[l]), free(q[l]);
        for (int kind = 0; kind < 2; kind++) free(xh[kind][l]), free(yh[kind][l]);
    }
    free(scr), free(codes);
    kvc_tc_free(a), kvc_tc_free(b), kvc_tc_free(n);
    unlink(cap), unlink(c1), unlink(c3), unlink(cn);
}

/* ================================================================ the cache ==== */

static kvc_cache_shape synth_shape(int cap) {
    kvc_cache_shape s = {SL, SH, SK, SD, 10000.0f, cap};
    return s;
}

/* Feeds `steps` chunks of the synthetic rows to both caches and returns the largest attention
 * difference relative to the value scale. */
static double feed(kvc_cache *a, kvc_cache *b, int steps, int chunk, int32_t *p0) {
    float *k[SL], *v[SL], *q[SL];
    for (int l = 0; l < SL; l++)
        k[l] = malloc(sizeof(float) * chunk * SE), v[l] = malloc(sizeof(float) * chunk * SE), q[l] = malloc(sizeof(float) * chunk * SH * SD);
    float *oa = malloc(sizeof(float) * chunk * SH * SD), *ob = malloc(sizeof(float) * chunk * SH * SD);
    int32_t pos[512];
    double worst = 0;
    kvc_err err = {{0}};
    for (int st = 0; st < steps; st++) {
        synth_rows(chunk, k, v, q);
        for (int t = 0; t < chunk; t++) pos[t] = (*p0)++;
        for (int l = 0; l < SL; l++) {
            cr_assert_eq(kvc_cache_append(a, l, k[l], v[l], pos, chunk, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_append(b, l, k[l], v[l], pos, chunk, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_attend(a, l, q[l], pos, chunk, oa, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_attend(b, l, q[l], pos, chunk, ob, &err), 0, "%s", err.msg);
            for (int i = 0; i < chunk * SH * SD; i++) worst = fmax(worst, fabs(oa[i] - ob[i]));
        }
        cr_assert_eq(kvc_cache_end_step(a, &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_cache_end_step(b, &err), 0, "%s", err.msg);
    }
    for (int l = 0; l < SL; l++) free(k[l]), free(v[l]), free(q[l]);
    free(oa), free(ob);
    return worst;
}

/* The tc cache against attention computed by hand over what it should hold: every earlier
 * step's rows as the codec decodes them (coded layer by layer in closed loop, sinks rounded
 * to f16), the current step's rows exact. The same kernels on the same numbers, except that
 * the cache decodes all held rows in one GEMM where the encoder decoded each step's rows in
 * one of their own, and OpenBLAS blocks a row's sum differently by the matrix's row count:
 * agreement to float rounding (TC_REF_TOL of outputs that are O(1) here), not bit for bit. */
#define TC_REF_TOL 2e-5
static double against_reference(const kvc_tc *tc, kvc_cache *c, int steps, int chunk) {
    const int T = steps * chunk;
    float *kr[SL], *vr[SL], *k[SL], *v[SL], *q[SL];
    for (int l = 0; l < SL; l++) {
        kr[l] = malloc(sizeof(float) * T * SE), vr[l] = malloc(sizeof(float) * T * SE);
        k[l] = malloc(sizeof(float) * chunk * SE), v[l] = malloc(sizeof(float) * chunk * SE);
        q[l] = malloc(sizeof(float) * chunk * SH * SD);
    }
    float *krot = malloc(sizeof(float) * T * SE), *oa = malloc(sizeof(float) * chunk * SH * SD);
    float *ob = malloc(sizeof(float) * chunk * SH * SD), *scr = malloc(sizeof(float) * kvc_tc_scratch_floats(tc, chunk));
    float *dk[SL], *dv[SL];
    for (int l = 0; l < SL; l++) dk[l] = malloc(sizeof(float) * chunk * SE), dv[l] = malloc(sizeof(float) * chunk * SE);
    uint8_t *codes = malloc((size_t)chunk * SE * 2);
    int32_t pos[1024];
    kvc_err err = {{0}};
    double worst = 0;
    for (int st = 0; st < steps; st++) {
        const int t0 = st * chunk;
        synth_rows(chunk, k, v, q);
        for (int t = 0; t < chunk; t++) pos[t0 + t] = t0 + t;
        for (int l = 0; l < SL; l++) {
            memcpy(kr[l] + (size_t)t0 * SE, k[l], sizeof(float) * chunk * SE);
            memcpy(vr[l] + (size_t)t0 * SE, v[l], sizeof(float) * chunk * SE);
            cr_assert_eq(kvc_cache_append(c, l, k[l], v[l], pos + t0, chunk, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_attend(c, l, q[l], pos + t0, chunk, oa, &err), 0, "%s", err.msg);
            /* by hand: rotate every held key, attend with kvc_attend per query row */
            memcpy(krot, kr[l], sizeof(float) * (t0 + chunk) * SE);
            cr_assert_eq(kvc_rope_apply(krot, pos, t0 + chunk, SK, SD, 10000.0f), 0);
            for (int t = 0; t < chunk; t++)
                for (int hq = 0; hq < SH; hq++) {
                    const int h = hq / (SH / SK);
                    const kvc_attn_kv kv = {.t = t0 + chunk, .k = krot + h * SD, .ldk = SE, .pos = pos, .v = vr[l] + h * SD,
                                            .ldv = SE};
                    kvc_attend(q[l] + ((size_t)t * SH + hq) * SD, SD, pos + t0 + t, 1, 1, SD, &kv,
                               ob + ((size_t)t * SH + hq) * SD, SD, NULL, NULL);
                }
            for (int i = 0; i < chunk * SH * SD; i++) worst = fmax(worst, fabs(oa[i] - ob[i]));
        }
        cr_assert_eq(kvc_cache_end_step(c, &err), 0, "%s", err.msg);
        /* what the cache now holds for this step's rows */
        int first = 0;
        while (first < chunk && pos[t0 + first] < tc->sinks) first++;
        for (int l = 0; l < SL; l++) {
            for (int i = 0; i < first * SE; i++) {
                kr[l][(size_t)t0 * SE + i] = kvc_f16_to_f32(kvc_f32_to_f16(k[l][i]));
                vr[l][(size_t)t0 * SE + i] = kvc_f16_to_f32(kvc_f32_to_f16(v[l][i]));
            }
            const int m = chunk - first;
            if (!m) continue;
            kvc_tc_encode(tc, l, KV_K, k[l] + first * SE, l ? dk[l - 1] : NULL, l ? dv[l - 1] : NULL, NULL, m, codes, dk[l], scr);
            kvc_tc_encode(tc, l, KV_V, v[l] + first * SE, l ? dk[l - 1] : NULL, l ? dv[l - 1] : NULL, dk[l], m, codes, dv[l], scr);
            memcpy(kr[l] + (size_t)(t0 + first) * SE, dk[l], sizeof(float) * m * SE);
            memcpy(vr[l] + (size_t)(t0 + first) * SE, dv[l], sizeof(float) * m * SE);
        }
    }
    for (int l = 0; l < SL; l++) free(kr[l]), free(vr[l]), free(k[l]), free(v[l]), free(q[l]), free(dk[l]), free(dv[l]);
    free(krot), free(oa), free(ob), free(scr), free(codes);
    return worst;
}

Test(tc, cache_holds_what_the_codec_decodes_and_counts_bytes, .timeout = 120) {
    const char *cap = tmp("cap2"), *c4 = tmp("b4");
    make_capture(cap, SN, SL);
    kvc_tc *tc = fit(cap, 4.0, 1, c4);
    kvc_cache_shape s = synth_shape(1024);
    kvc_err err = {{0}};
    char spec[256];
    snprintf(spec, sizeof spec, "tc:%s", c4);
    kvc_cache *c = kvc_kvcache_new(&s, spec, "full", "00000000000000aa", &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_expect(!strncmp(kvc_kvcache_describe(c), "repr=tc:", 8) && strstr(kvc_kvcache_describe(c), ",sinks=4 keep=full"),
              "%s", kvc_kvcache_describe(c));
    const double d = against_reference(tc, c, 6, 20);
    cr_expect(d < TC_REF_TOL, "tc cache vs the rows the codec decodes: worst |diff| %g", d);
    /* bytes by hand: 4 sinks in f16 for K and V of every layer, then the coded rows */
    size_t want = (size_t)SL * 2 * 4 * SE * 2;
    for (int l = 0; l < SL; l++)
        for (int kind = 0; kind < 2; kind++) want += (size_t)(120 - 4) * kvc_tc_row_bytes(tc, l, kind);
    cr_expect_eq(kvc_cache_bytes(c), want, "bytes %zu, want %zu", kvc_cache_bytes(c), want);
    cr_expect_eq(kvc_cache_n_tokens(c, 2), 120);
    kvcache_stats st;
    kvc_kvcache_get_stats(c, &st);
    cr_expect_eq(st.appended, 120);
    cr_expect_eq(st.held, 120 * SL * SK);
    kvc_cache_free(c);
    /* eviction: one token set for the whole model, the budget held exactly */
    kvc_cache *e = kvc_kvcache_new(&s, spec, "streaming:budget=50,sinks=4", "00000000000000aa", &err);
    kvc_cache *f2 = kvc_cache_full_new(&s, &err);
    cr_assert_not_null(e, "%s", err.msg);
    cr_assert_eq(kvc_cache_set_budget(e, 1, &err), 0, "%s", err.msg);
    int32_t p = 0;
    feed(f2, e, 6, 20, &p);
    for (int l = 0; l < SL; l++) cr_expect_eq(kvc_cache_n_tokens(e, l), 50, "layer %d", l);
    kvc_kvcache_get_stats(e, &st);
    cr_expect_eq(st.evicted, 70 * SL * SK);
    /* streaming keeps the 4 sinks and the newest 46: bytes by hand, positions counted */
    size_t we = (size_t)SL * 2 * 4 * SE * 2 + 50 * sizeof(int32_t);
    for (int l = 0; l < SL; l++)
        for (int kind = 0; kind < 2; kind++) we += (size_t)46 * kvc_tc_row_bytes(tc, l, kind);
    cr_expect_eq(kvc_cache_bytes(e), we, "bytes %zu, want %zu", kvc_cache_bytes(e), we);
    kvc_cache_free(e), kvc_cache_free(f2);
    kvc_tc_free(tc);
    unlink(cap), unlink(c4);
}

/* ========================================================== the codec library ==== */

/* kvc/codec.h opens a transform codec by its format, says what each layer predicts from, and
 * codes a chain of layers in closed loop exactly as kvc_tc_encode does. */
Test(tc, codec_library_codes_a_chain_of_layers, .timeout = 120) {
    const char *cap = tmp("cap4"), *c2 = tmp("lib2");
    make_capture(cap, SN, SL);
    kvc_tc *tc = fit(cap, 2.0, 1, c2);
    char err[KVCL_ERR_SIZE];
    kvcl_codec *c = kvcl_open(c2, NULL, 0, err);
    cr_assert_not_null(c, "%s", err);
    kvcl_info in;
    kvcl_get_info(c, &in);
    cr_expect_str_eq(in.kind, "transform");
    cr_expect_eq(in.sinks, 4);
    cr_expect_float_eq(in.mean_bits, 2.0, 1e-9);
    cr_expect_eq(kvcl_token_bytes(c, 1, KVCL_KEY), (size_t)kvc_tc_row_bytes(tc, 1, KV_K));
    cr_expect_eq(kvcl_needs(c, 0, KVCL_KEY), 0);
    cr_expect_eq(kvcl_needs(c, 0, KVCL_VALUE), KVCL_NEED_THIS_K);
    cr_expect_eq(kvcl_needs(c, 2, KVCL_VALUE), KVCL_NEED_THIS_K | KVCL_NEED_BELOW_V);
    enum { N = 16 };
    float *k[SL], *v[SL], *q[SL], *dk[SL], *dv[SL], *yk = malloc(sizeof(float) * N * SE);
    float *ref = malloc(sizeof(float) * N * SE), *scr = malloc(sizeof(float) * kvc_tc_scratch_floats(tc, N));
    uint8_t *codes = malloc((size_t)N * SE * 2), *rc = malloc((size_t)N * SE * 2);
    for (int l = 0; l < SL; l++)
        k[l] = malloc(sizeof(float) * N * SE), v[l] = malloc(sizeof(float) * N * SE), q[l] = malloc(sizeof(float) * N * SH * SD),
        dk[l] = malloc(sizeof(float) * N * SE), dv[l] = malloc(sizeof(float) * N * SE);
    synth_rows(N, k, v, q);
    for (int l = 0; l < SL; l++) {
        kvcl_context ctx = {l ? dk[l - 1] : NULL, l ? dv[l - 1] : NULL, NULL};
        cr_assert_eq(kvcl_encode_ctx(c, l, KVCL_KEY, k[l], N, &ctx, codes, dk[l], err), 0, "%s", err);
        kvc_tc_encode(tc, l, KV_K, k[l], ctx.below_k, ctx.below_v, NULL, N, rc, ref, scr);
        cr_expect(!memcmp(codes, rc, (size_t)N * kvcl_token_bytes(c, l, KVCL_KEY)), "layer %d key codes", l);
        cr_assert_eq(kvcl_decode_ctx(c, l, KVCL_KEY, codes, N, &ctx, yk, err), 0, "%s", err);
        cr_expect(!memcmp(yk, dk[l], sizeof(float) * N * SE), "layer %d: decode rebuilds the encoder's keys", l);
        ctx.this_k = dk[l];
        cr_assert_eq(kvcl_encode_ctx(c, l, KVCL_VALUE, v[l], N, &ctx, codes, dv[l], err), 0, "%s", err);
        /* a value without this layer's keys cannot be decoded */
        kvcl_context bad = ctx;
        bad.this_k = NULL;
        cr_expect_eq(kvcl_decode_ctx(c, l, KVCL_VALUE, codes, N, &bad, yk, err), -1);
        cr_expect_not_null(strstr(err, "this_k"), "%s", err);
    }
    cr_expect_eq(kvcl_encode(c, 1, KVCL_KEY, k[1], N, codes, err), -1, "the context-free call must refuse");
    cr_expect_not_null(strstr(err, "kvcl_encode_ctx"), "%s", err);
    for (int l = 0; l < SL; l++) free(k[l]), free(v[l]), free(q[l]), free(dk[l]), free(dv[l]);
    free(yk), free(ref), free(scr), free(codes), free(rc);
    kvcl_close(c);
    /* `kvcodec inspect` summarises the checkpoint: the rate, bytes per token, a row per layer */
    char cmd[1024], line[512];
    snprintf(cmd, sizeof cmd, "'%s' inspect '%s'", KVC_BINARY, c2);
    FILE *pp = popen(cmd, "r");
    cr_assert_not_null(pp);
    int code_bytes = 0;
    for (int l = 0; l < SL; l++) code_bytes += kvc_tc_row_bytes(tc, l, KV_K) + kvc_tc_row_bytes(tc, l, KV_V);
    char want[64];
    snprintf(want, sizeof want, "%d code bytes per token", code_bytes);
    int saw_rate = 0, rows = 0;
    while (fgets(line, sizeof line, pp)) {
        if (strstr(line, "2.000 bits per coefficient") && strstr(line, want)) saw_rate = 1;
        int l;
        double kb;
        if (sscanf(line, " %d | %lf", &l, &kb) == 2 && l == rows && fabs(kb - 2.0) < 1e-9) rows++;
    }
    cr_expect_eq(pclose(pp), 0);
    cr_expect(saw_rate, "inspect names the rate and %s", want);
    cr_expect_eq(rows, SL, "one row per layer at 2 bits");
    kvc_tc_free(tc);
    unlink(cap), unlink(c2);
}

/* A layer whose keys have nothing to do with the layer below: its key predictor cannot lower
 * the held-back error, so the trainer drops it and codes the keys alone; its values still
 * predict from its keys, and the other layers keep their predictors. */
Test(tc, a_predictor_that_does_not_pay_is_dropped, .timeout = 120) {
    const char *cap = tmp("fresh"), *c3 = tmp("fresh3");
    synth_fresh_layer = 2;
    make_capture(cap, SN, SL);
    synth_fresh_layer = -1;
    kvc_tc *tc = fit(cap, 3.0, 1, c3);
    cr_expect_eq(tc->parts[kvc_tc_index(tc, 1, KV_K, 0)].inputs, KVC_TC_IN_KPREV, "layer 1 keys follow layer 0's");
    cr_expect_eq(tc->parts[kvc_tc_index(tc, 2, KV_K, 0)].inputs, 0, "layer 2 keys: the predictor must be dropped");
    cr_expect_eq(tc->parts[kvc_tc_index(tc, 2, KV_V, 0)].inputs & KVC_TC_IN_KCUR, KVC_TC_IN_KCUR,
                 "layer 2 values still predict from their keys");
    cr_expect_eq(tc->parts[kvc_tc_index(tc, 2, KV_K, 0)].n_feat, 0);
    cr_expect_null(tc->parts[kvc_tc_index(tc, 2, KV_K, 0)].pred_w);
    cr_expect_float_eq(kvc_tc_mean_bits(tc), 3.0, 1e-9, "the refit spends the same bits");
    kvc_tc_free(tc);
    unlink(cap), unlink(c3);
}

/* ============================================================== bad input ==== */

Test(tc, bad_inputs_are_refused_with_one_line) {
    const char *cap = tmp("cap3"), *part = tmp("part"), *c2 = tmp("b2"), *none = "/nonexistent/dir/x.h5";
    make_capture(cap, SN, SL);
    kvc_tc_train_opts o;
    kvc_tc_train_opts_defaults(&o);
    const char *paths[1] = {cap};
    o.data = paths, o.n_data = 1, o.out = c2;
    kvc_err err = {{0}};
    o.bits = 9;
    cr_expect_eq(kvc_train_tc(&o, &err), -1);
    cr_expect_not_null(strstr(err.msg, "--bits 9 out of range"), "%s", err.msg);
    o.bits = 0.1;
    cr_expect_eq(kvc_train_tc(&o, &err), -1);
    o.bits = 2;
    o.out = cap;
    cr_expect_eq(kvc_train_tc(&o, &err), -1);
    cr_expect_not_null(strstr(err.msg, "would overwrite the capture"), "%s", err.msg);
    o.out = c2;
    /* a capture without every layer cannot be chained */
    make_capture(part, SN, 2);
    paths[0] = part;
    cr_expect_eq(kvc_train_tc(&o, &err), -1);
    cr_expect_not_null(strstr(err.msg, "must hold every layer"), "%s", err.msg);
    /* too few rows to fit a transform */
    make_capture(part, 40, SL);
    cr_expect_eq(kvc_train_tc(&o, &err), -1);
    cr_expect_not_null(strstr(err.msg, "too few"), "%s", err.msg);
    unlink(part);
    paths[0] = cap;
    o.out = none;
    cr_expect_eq(kvc_train_tc(&o, &err), -1);
    cr_expect_not_null(strstr(err.msg, "cannot create"), "%s", err.msg);
    o.out = c2;
    cr_assert_eq(kvc_train_tc(&o, &err), 0, "%s", err.msg);
    /* a codec for another model, another layer count, a missing file, a file of another kind */
    kvc_cache_shape s = synth_shape(256);
    char spec[256];
    snprintf(spec, sizeof spec, "tc:%s", c2);
    cr_expect_null(kvc_kvcache_new(&s, spec, "full", "1111111111111111", &err));
    cr_expect_not_null(strstr(err.msg, "trained for model 'synthetic'"), "%s", err.msg);
    kvc_cache_shape s4 = s;
    s4.n_layer = 4;
    cr_expect_null(kvc_kvcache_new(&s4, spec, "full", NULL, &err));
    cr_expect_not_null(strstr(err.msg, "differs from the model"), "%s", err.msg);
    cr_expect_null(kvc_kvcache_new(&s, "tc:/no/such/codec.h5", "full", NULL, &err));
    cr_expect_not_null(strstr(err.msg, "cannot open transform codec"), "%s", err.msg);
    snprintf(spec, sizeof spec, "tc:%s", cap);
    cr_expect_null(kvc_kvcache_new(&s, spec, "full", NULL, &err));
    cr_expect_not_null(strstr(err.msg, "is not a transform codec"), "%s", err.msg);
    cr_expect_null(kvc_kvcache_new(&s, "tc:", "full", NULL, &err));
    snprintf(spec, sizeof spec, "tc:%s,sinks=4,sinks=2", c2);
    cr_expect_null(kvc_kvcache_new(&s, spec, "full", NULL, &err));
    cr_expect_not_null(strstr(err.msg, "sinks given twice"), "%s", err.msg);
    snprintf(spec, sizeof spec, "tc:%s,bogus=1", c2);
    cr_expect_null(kvc_kvcache_new(&s, spec, "full", NULL, &err));
    cr_expect_not_null(strstr(err.msg, "unknown option"), "%s", err.msg);
    for (const char *m = err.msg; *m; m++) cr_expect_neq(*m, '\n', "one line");
    /* keep options this cache cannot honour are refused, not ignored */
    snprintf(spec, sizeof spec, "tc:%s", c2);
    static const char *const refused[] = {"streaming:budget=50,retrieve=4", "h2o:budget=50,share=layer", "snapkv:budget=80"};
    for (int i = 0; i < 3; i++) {
        cr_expect_null(kvc_kvcache_new(&s, spec, refused[i], NULL, &err), "%s", refused[i]);
        cr_expect_not_null(strstr(err.msg, "takes no retrieve="), "%s: %s", refused[i], err.msg);
    }
    unlink(cap), unlink(c2);
}

/* ============================================================= the real model ==== */

Test(tc, real_model_capture_fit_and_forward, .timeout = 600) {
    REQUIRE_MODEL(path);
    kvc_err err = {{0}};
    kvc_model *m = kvc_model_load(path, &err);
    cr_assert_not_null(m, "%s", err.msg);
    char *text;
    size_t len;
    cr_assert_eq(kvc_read_file(KVC_SOURCE_DIR "/data/corpora/train-python-docs.txt", &text, &len, &err), 0);
    int32_t *ids = malloc(sizeof(int32_t) * (len + 16));
    int64_t n = kvc_tokenizer_encode(m->tok, text, len, 0, ids, (int64_t)len + 16, &err);
    cr_assert(n > 3000);
    const char *cap = tmp("real"), *codec = tmp("realtc");
    kvc_capture_opts co = {cap, "f16", "all", "train-python-docs.txt", "", 512, 256, 0, 0};
    kvc_capture_result cr;
    cr_assert_eq(kvc_capture(m, ids, 1536, &co, &cr, &err), 0, "%s", err.msg);
    kvc_tc_train_opts o;
    kvc_tc_train_opts_defaults(&o);
    const char *paths[1] = {cap};
    o.data = paths, o.n_data = 1, o.out = codec, o.bits = 3;
    cr_assert_eq(kvc_train_tc(&o, &err), 0, "%s", err.msg);
    /* eval text (not trained on): logits through the codec close to the full cache's */
    char *et;
    size_t el;
    cr_assert_eq(kvc_read_file(KVC_SOURCE_DIR "/data/corpora/eval-debian-handbook.txt", &et, &el, &err), 0);
    int64_t ne = kvc_tokenizer_encode(m->tok, et, el < 20000 ? el : 20000, 0, ids, (int64_t)len + 16, &err);
    cr_assert(ne > 300);
    kvc_cache_shape s = kvc_model_cache_shape(m, 192);
    char spec[256];
    snprintf(spec, sizeof spec, "tc:%s", codec);
    kvc_cache *full = kvc_cache_full_new(&s, &err), *c = kvc_kvcache_new(&s, spec, "full", m->fingerprint, &err);
    cr_assert(full && c, "%s", err.msg);
    kvc_run *r = kvc_run_new(m, 64, &err);
    const int V = m->hp.n_vocab;
    float *la = malloc(sizeof(float) * 64 * V), *lb = malloc(sizeof(float) * 64 * V);
    int32_t pos[64];
    double kl = 0;
    int cnt = 0;
    for (int t0 = 0; t0 < 192; t0 += 64) {
        for (int i = 0; i < 64; i++) pos[i] = t0 + i;
        cr_assert_eq(kvc_model_forward(m, r, full, ids + t0, pos, 64, la, 1, &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_model_forward(m, r, c, ids + t0, pos, 64, lb, 1, &err), 0, "%s", err.msg);
        for (int i = 0; t0 && i < 64; i++, cnt++) {
            double ma = -INFINITY, mb = -INFINITY, sa = 0, sb = 0, d = 0;
            for (int j = 0; j < V; j++) ma = fmax(ma, la[i * V + j]), mb = fmax(mb, lb[i * V + j]);
            for (int j = 0; j < V; j++) sa += exp(la[i * V + j] - ma), sb += exp(lb[i * V + j] - mb);
            for (int j = 0; j < V; j++) {
                double pa = exp(la[i * V + j] - ma) / sa;
                d += pa * ((la[i * V + j] - ma - log(sa)) - (lb[i * V + j] - mb - log(sb)));
            }
            kl += d;
        }
    }
    kl /= cnt;
    /* 3 bits from a 1,536-token capture; the protocol figures are in docs/transform.md */
    cr_expect(kl < 0.1, "mean KL to the full cache %g", kl);
    cr_expect(kl > 0, "a lossy codec cannot be exact");
    const double f16 = 192.0 * m->hp.n_layer * m->hp.n_head_kv * m->hp.head_dim * 2 * 2;
    const double ratio = f16 / (double)kvc_cache_bytes(c);
    cr_expect(ratio > 3.5, "bytes against f16: %.2fx", ratio);
    fprintf(stderr, "real model, 3 bits from 1,536 captured tokens: KL %.4f, %.2fx smaller than f16\n", kl, ratio);
    kvc_run_free(r), kvc_cache_free(full), kvc_cache_free(c);
    free(la), free(lb), free(ids), free(text), free(et);
    kvc_model_free(m);
    unlink(cap), unlink(codec);
}
