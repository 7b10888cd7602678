/* test_reuse.c - cross-layer reuse (kvc/reuse.h): the streaming least-squares fit recovers
 * known maps (exactly without noise, to the noise level with it) whatever the batching,
 * identity statistics, selection by threshold and by head count on a hand-made plan, option
 * parsing, the printed table, the apply function against hand-computed rows, and the whole
 * analysis over dataset-shaped batches with a missing layer. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/reuse_fit.h"

#define EXACT_TOL 1e-5  /* noise-free fit: W, b and relative errors, float data */
#define STREAM_TOL 1e-5 /* batched vs one-shot fit, relative to max |W| */

static uint64_t rs = 12345;
/* Uniform in [-1, 1). */
static double urand(void) {
    rs = rs * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rs >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}
/* Standard normal (Box-Muller). */
static double nrand(void) {
    double u = (urand() + 1.0) / 2.0, v = (urand() + 1.0) / 2.0;
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* x (n, D) with per-dimension offsets (so centring matters) and scales. */
static float *rand_rows(int n, int d) {
    float *x = malloc((size_t)n * d * sizeof(float));
    for (int i = 0; i < n; i++)
        for (int k = 0; k < d; k++) x[(size_t)i * d + k] = (float)(3.0 * sin(k + 1.0) + (1.0 + 0.1 * k) * urand());
    return x;
}

/* y (n, D) = W x + b + sigma * N(0, 1), computed in double; *noise_sq gets sum of noise^2. */
static float *map_rows(const float *x, int n, int d, const float *w, const float *b, double sigma, double *noise_sq) {
    float *y = malloc((size_t)n * d * sizeof(float));
    double ns = 0;
    for (int i = 0; i < n; i++)
        for (int o = 0; o < d; o++) {
            double s = b[o];
            for (int k = 0; k < d; k++) s += (double)w[(size_t)o * d + k] * x[(size_t)i * d + k];
            double e = sigma * nrand();
            ns += e * e;
            y[(size_t)i * d + o] = (float)(s + e);
        }
    if (noise_sq) *noise_sq = ns;
    return y;
}

static void rand_map(int d, float *w, float *b) {
    for (int i = 0; i < d * d; i++) w[i] = (float)(0.3 * urand());
    for (int i = 0; i < d; i++) b[i] = (float)(2.0 * urand());
}

static double max_abs_diff(const float *a, const float *b, int n) {
    double m = 0;
    for (int i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

/* ---- the fit ------------------------------------------------------------------------ */

Test(reuse, fit_recovers_known_map_without_noise) {
    const int d = 64, n = 3000, nv = 1000;
    float *w = malloc(d * d * sizeof(float)), b[64], *wf = malloc(d * d * sizeof(float)), bf[64];
    rand_map(d, w, b);
    float *x = rand_rows(n, d), *y = map_rows(x, n, d, w, b, 0, NULL);
    kvc_err err;
    reuse_fit *f = kvc_reuse_fit_new(d, &err);
    cr_assert_not_null(f, "%s", err.msg);
    kvc_reuse_fit_add(f, x, d, y, d, n);
    cr_expect_eq(kvc_reuse_fit_rows(f), n);
    cr_assert_eq(kvc_reuse_fit_solve(f, 1e-12, wf, bf, &err), 0, "%s", err.msg);
    cr_expect_lt(max_abs_diff(wf, w, d * d), EXACT_TOL, "W off by %g", max_abs_diff(wf, w, d * d));
    cr_expect_lt(max_abs_diff(bf, b, d), EXACT_TOL, "b off by %g", max_abs_diff(bf, b, d));
    cr_assert_eq(kvc_reuse_fit_solve(f, 0, wf, bf, &err), 0, "ridge 0 on full-rank data: %s", err.msg);
    cr_expect_lt(max_abs_diff(wf, w, d * d), EXACT_TOL);

    float *xv = rand_rows(nv, d), *yv = map_rows(xv, nv, d, w, b, 0, NULL);
    reuse_eval e = {0};
    kvc_reuse_eval_add(&e, d, xv, d, yv, d, nv, wf, bf);
    double cosv, eid, elin;
    kvc_reuse_eval_result(&e, &cosv, &eid, &elin);
    cr_expect_eq(e.n, nv);
    cr_expect_lt(elin, EXACT_TOL, "validation error of the exact map %g", elin);
    cr_expect_gt(eid, 0.1, "identity is not this map");
    kvc_reuse_fit_free(f);
    free(w), free(wf), free(x), free(y), free(xv), free(yv);
}

Test(reuse, fit_with_noise_reaches_the_noise_level) {
    const int d = 16, n = 20000, nv = 5000;
    const double sigma = 0.05;
    float w[256], b[16], wf[256], bf[16];
    rand_map(d, w, b);
    float *x = rand_rows(n, d), *y = map_rows(x, n, d, w, b, sigma, NULL);
    reuse_fit *f = kvc_reuse_fit_new(d, NULL);
    kvc_reuse_fit_add(f, x, d, y, d, n);
    kvc_err err;
    cr_assert_eq(kvc_reuse_fit_solve(f, REUSE_RIDGE_DEFAULT, wf, bf, &err), 0, "%s", err.msg);
    double noise_sq;
    float *xv = rand_rows(nv, d), *yv = map_rows(xv, nv, d, w, b, sigma, &noise_sq);
    reuse_eval e = {0};
    kvc_reuse_eval_add(&e, d, xv, d, yv, d, nv, wf, bf);
    double elin;
    kvc_reuse_eval_result(&e, NULL, NULL, &elin);
    double floor = sqrt(noise_sq / e.sq_dst); /* the best any map can do on these rows */
    cr_expect_gt(elin, floor * 0.98, "error %g below the noise floor %g", elin, floor);
    cr_expect_lt(elin, floor * 1.03, "error %g not near the noise floor %g", elin, floor);
    cr_expect_lt(max_abs_diff(wf, w, d * d), 0.01, "W within the noise: %g", max_abs_diff(wf, w, d * d));
    kvc_reuse_fit_free(f);
    free(x), free(y), free(xv), free(yv);
}

Test(reuse, streaming_equals_one_shot) {
    const int d = 32, n = 5000;
    float w[1024], b[32], w1[1024], b1[32], w2[1024], b2[32];
    rand_map(d, w, b);
    float *x = rand_rows(n, d), *y = map_rows(x, n, d, w, b, 0.3, NULL);
    reuse_fit *one = kvc_reuse_fit_new(d, NULL), *many = kvc_reuse_fit_new(d, NULL);
    kvc_reuse_fit_add(one, x, d, y, d, n);
    const int cuts[] = {0, 1, 8, 1031, 2055, 2056, 4000, 5000}; /* uneven batches, one of 1 row */
    for (int c = 0; c + 1 < (int)(sizeof cuts / sizeof *cuts); c++)
        kvc_reuse_fit_add(many, x + (size_t)cuts[c] * d, d, y + (size_t)cuts[c] * d, d, cuts[c + 1] - cuts[c]);
    cr_assert_eq(kvc_reuse_fit_rows(many), n);
    cr_assert_eq(kvc_reuse_fit_solve(one, REUSE_RIDGE_DEFAULT, w1, b1, NULL), 0);
    cr_assert_eq(kvc_reuse_fit_solve(many, REUSE_RIDGE_DEFAULT, w2, b2, NULL), 0);
    cr_expect_lt(max_abs_diff(w1, w2, d * d), STREAM_TOL, "W differs by %g", max_abs_diff(w1, w2, d * d));
    cr_expect_lt(max_abs_diff(b1, b2, d), STREAM_TOL, "b differs by %g", max_abs_diff(b1, b2, d));
    kvc_reuse_fit_free(one);
    kvc_reuse_fit_free(many);
    free(x), free(y);
}

Test(reuse, fit_edge_cases) {
    const int d = 4, n = 50;
    float x[200], y[200], w[16], b[4];
    kvc_err err;
    reuse_fit *f = kvc_reuse_fit_new(d, NULL);
    cr_expect_eq(kvc_reuse_fit_solve(f, 1e-4, w, b, &err), -1);
    cr_expect_not_null(strstr(err.msg, "no training rows"), "%s", err.msg);
    for (int i = 0; i < n; i++) { /* src spans 2 of 4 dimensions */
        double s = urand(), t = urand();
        float r[4] = {(float)s, (float)t, (float)(s + t), (float)(s - t)};
        memcpy(x + i * d, r, sizeof r);
        for (int k = 0; k < d; k++) y[i * d + k] = (float)(k * s - t + 1);
    }
    kvc_reuse_fit_add(f, x, d, y, d, n);
    cr_expect_eq(kvc_reuse_fit_solve(f, -1, w, b, &err), -1);
    cr_expect_not_null(strstr(err.msg, "ridge"), "%s", err.msg);
    cr_expect_eq(kvc_reuse_fit_solve(f, 0, w, b, &err), -1, "rank-deficient src, no ridge");
    cr_expect_not_null(strstr(err.msg, "singular"), "%s", err.msg);
    cr_assert_eq(kvc_reuse_fit_solve(f, 1e-6, w, b, &err), 0, "a ridge makes it solvable: %s", err.msg);
    reuse_eval e = {0};
    kvc_reuse_eval_add(&e, d, x, d, y, d, n, w, b);
    double elin;
    kvc_reuse_eval_result(&e, NULL, NULL, &elin);
    cr_expect_lt(elin, 1e-3, "y is a function of the span: %g", elin);
    kvc_reuse_fit_free(f);

    f = kvc_reuse_fit_new(d, NULL); /* constant src: W = 0, b = mean(y) */
    for (int i = 0; i < n; i++)
        for (int k = 0; k < d; k++) x[i * d + k] = 2.5f, y[i * d + k] = (float)(k + (i % 2 ? 1 : -1));
    kvc_reuse_fit_add(f, x, d, y, d, n);
    cr_assert_eq(kvc_reuse_fit_solve(f, 0, w, b, &err), 0, "%s", err.msg);
    for (int k = 0; k < d; k++) cr_expect_float_eq(b[k], (float)k, 1e-6);
    for (int k = 0; k < d * d; k++) cr_expect_eq(w[k], 0.0f);
    kvc_reuse_fit_free(f);
    cr_expect_null(kvc_reuse_fit_new(0, &err));
}

/* ---- identity statistics ------------------------------------------------------------ */

Test(reuse, identity_statistics) {
    const int d = 8, n = 100;
    float *x = rand_rows(n, d), *y = malloc(n * d * sizeof(float));
    double c, eid, elin;
    reuse_eval e = {0};
    kvc_reuse_eval_add(&e, d, x, d, x, d, n, NULL, NULL); /* x_l = x_{l-1} */
    kvc_reuse_eval_result(&e, &c, &eid, &elin);
    cr_expect_float_eq(c, 1.0, 1e-12);
    cr_expect_eq(eid, 0.0);
    cr_expect_eq(e.n, n);

    for (int i = 0; i < n * d; i++) y[i] = -x[i];
    e = (reuse_eval){0};
    kvc_reuse_eval_add(&e, d, x, d, y, d, n, NULL, NULL);
    kvc_reuse_eval_result(&e, &c, &eid, NULL);
    cr_expect_float_eq(c, -1.0, 1e-12);
    cr_expect_float_eq(eid, 2.0, 1e-12);

    for (int i = 0; i < n * d; i++) y[i] = 2 * x[i];
    e = (reuse_eval){0};
    kvc_reuse_eval_add(&e, d, x, d, y, d, n, NULL, NULL);
    kvc_reuse_eval_result(&e, &c, &eid, NULL);
    cr_expect_float_eq(c, 1.0, 1e-12);
    cr_expect_float_eq(eid, 0.5, 1e-12); /* |2x - x| / |2x| */

    float z[8] = {0}, one[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    e = (reuse_eval){0};
    kvc_reuse_eval_add(&e, d, z, d, z, d, 1, NULL, NULL);
    kvc_reuse_eval_add(&e, d, z, d, one, d, 1, NULL, NULL);
    kvc_reuse_eval_result(&e, &c, &eid, NULL);
    cr_expect_float_eq(c, 0.5, 1e-12, "zero rows: cos 1 when both are zero, 0 when one is");
    cr_expect_float_eq(eid, 1.0, 1e-12);
    free(x), free(y);
}

/* ---- apply -------------------------------------------------------------------------- */

Test(reuse, apply_matches_hand_computation) {
    const float w[9] = {1, 2, 0, 0, 1, -1, 0.5f, 0, 0}, b[3] = {0.5f, -1, 2};
    /* two rows of 3 in a stride of 5 (head 1 of (n, 2, 3) would be similar), out stride 4 */
    const float src[10] = {9, 9, 1, 2, 3, 9, 9, -1, 0, 4};
    float dst[8];
    for (int i = 0; i < 8; i++) dst[i] = -77;
    kvc_reuse_apply(3, w, b, src + 2, 5, dst, 4, 2);
    const float want[8] = {5.5f, -2, 2.5f, -77, -0.5f, -5, 1.5f, -77}; /* W x + b by hand */
    for (int i = 0; i < 8; i++) cr_expect_float_eq(dst[i], want[i], 1e-6, "dst[%d] = %g", i, dst[i]);

    kvc_err err;
    reuse_plan *p = kvc_reuse_plan_new(2, 1, 3, &err);
    cr_assert_not_null(p, "%s", err.msg);
    reuse_item *it = kvc_reuse_plan_item(p, 1, 0, KV_K);
    memcpy(it->w, w, sizeof w);
    memcpy(it->b, b, sizeof b);
    cr_expect_eq(kvc_reuse_item_predict(p, it, src + 2, 5, dst, 4, 2), -1, "NONE predicts nothing");
    it->chosen = REUSE_LINEAR;
    cr_assert_eq(kvc_reuse_item_predict(p, it, src + 2, 5, dst, 4, 2), 0);
    for (int i = 0; i < 8; i++) cr_expect_float_eq(dst[i], want[i], 1e-6);
    it->chosen = REUSE_IDENTITY;
    cr_assert_eq(kvc_reuse_item_predict(p, it, src + 2, 5, dst, 4, 2), 0);
    const float copy[8] = {1, 2, 3, -77, -1, 0, 4, -77};
    for (int i = 0; i < 8; i++) cr_expect_eq(dst[i], copy[i]);
    kvc_reuse_plan_free(p);
}

/* ---- choosing and printing ---------------------------------------------------------- */

/* L = 5, Hk = 2, layers 0 1 3 4 stored: layers 1 and 4 analysed, with these (linear,
 * identity) errors per (head, kind): */
static const double HAND[2][4][2] = {
    /* layer 1: h0.K h0.V h1.K h1.V */ {{0.10, 0.50}, {0.30, 0.90}, {0.25, 0.20}, {0.05, 0.05}},
    /* layer 4 */ {{0.15, 0.60}, {0.40, 1.00}, {0.20, 0.70}, {0.22, 0.30}},
};

static reuse_plan *hand_plan(void) {
    reuse_plan *p = kvc_reuse_plan_new(5, 2, 4, NULL);
    cr_assert_not_null(p);
    const signed char stored[5] = {1, 1, 0, 1, 1};
    memcpy(p->stored, stored, 5);
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < 4; i++) {
            reuse_item *it = kvc_reuse_plan_item(p, r ? 4 : 1, i / 2, i % 2 ? KV_V : KV_K);
            it->analysed = 1;
            it->err_linear = HAND[r][i][0];
            it->err_identity = HAND[r][i][1];
        }
    for (int h = 0; h < 2; h++) /* not analysed: must never be chosen, whatever it holds */
        kvc_reuse_plan_item(p, 2, h, KV_K)->err_linear = 0.001;
    return p;
}

static reuse_choice chosen(reuse_plan *p, int l, int h, int kind) { return kvc_reuse_plan_item(p, l, h, kind)->chosen; }

Test(reuse, plan_items_and_layout) {
    reuse_plan *p = hand_plan();
    cr_expect_eq(p->n_items, 4 * 2 * 2);
    cr_expect_null(kvc_reuse_plan_item(p, 0, 0, KV_K), "layer 0 has no item");
    cr_expect_null(kvc_reuse_plan_item(p, 5, 0, KV_K));
    cr_expect_null(kvc_reuse_plan_item(p, 1, 2, KV_K));
    cr_expect_null(kvc_reuse_plan_item(p, 1, 0, KV_Q));
    reuse_item *it = kvc_reuse_plan_item(p, 3, 1, KV_V);
    cr_expect(it->layer == 3 && it->head == 1 && it->kind == KV_V);
    cr_expect_eq(it->w, p->maps + (size_t)(((3 - 1) * 2 + 1) * 2 + 1) * (16 + 4));
    cr_expect_eq(it->b, it->w + 16);
    int a, id, lin;
    cr_expect_eq(kvc_reuse_plan_count(p, &a, &id, &lin), 8);
    cr_expect(a == 8 && id == 0 && lin == 0);
    kvc_reuse_plan_free(p);
    kvc_err err;
    cr_expect_null(kvc_reuse_plan_new(1, 2, 4, &err));
    cr_expect_not_null(strstr(err.msg, "2 layers"), "%s", err.msg);
}

Test(reuse, choose_by_threshold) {
    reuse_plan *p = hand_plan();
    reuse_option o;
    cr_assert_eq(kvc_reuse_option_parse("threshold=0.2", &o, NULL), 0);
    cr_assert_eq(kvc_reuse_plan_choose(p, &o, NULL), 0);
    cr_expect_eq(chosen(p, 1, 0, KV_K), REUSE_LINEAR);   /* 0.10 */
    cr_expect_eq(chosen(p, 1, 0, KV_V), REUSE_NONE);     /* 0.30 */
    cr_expect_eq(chosen(p, 1, 1, KV_K), REUSE_IDENTITY); /* identity 0.20 beats linear 0.25 */
    cr_expect_eq(chosen(p, 1, 1, KV_V), REUSE_IDENTITY); /* tie 0.05: identity needs no map */
    cr_expect_eq(chosen(p, 4, 0, KV_K), REUSE_LINEAR);   /* 0.15 */
    cr_expect_eq(chosen(p, 4, 0, KV_V), REUSE_NONE);
    cr_expect_eq(chosen(p, 4, 1, KV_K), REUSE_LINEAR);   /* 0.20 <= 0.2 */
    cr_expect_eq(chosen(p, 4, 1, KV_V), REUSE_NONE);     /* 0.22 */
    for (int h = 0; h < 2; h++) cr_expect_eq(chosen(p, 2, h, KV_K), REUSE_NONE, "not analysed");
    int id, lin;
    kvc_reuse_plan_count(p, NULL, &id, &lin);
    cr_expect(id == 2 && lin == 3, "identity %d linear %d", id, lin);
    cr_assert_eq(kvc_reuse_option_parse("threshold=0.01", &o, NULL), 0);
    cr_assert_eq(kvc_reuse_plan_choose(p, &o, NULL), 0);
    kvc_reuse_plan_count(p, NULL, &id, &lin);
    cr_expect(id == 0 && lin == 0, "a new choice clears the old one");
    kvc_reuse_plan_free(p);
}

Test(reuse, choose_by_heads) {
    reuse_plan *p = hand_plan();
    reuse_option o;
    kvc_err err;
    /* best errors in order: 1h1V .05, 1h0K .10, 4h0K .15, 1h1K .20 (identity), 4h1K .20, 4h1V .22 */
    cr_assert_eq(kvc_reuse_option_parse("heads=3", &o, NULL), 0);
    cr_assert_eq(kvc_reuse_plan_choose(p, &o, &err), 0, "%s", err.msg);
    cr_expect_eq(chosen(p, 1, 1, KV_V), REUSE_IDENTITY);
    cr_expect_eq(chosen(p, 1, 0, KV_K), REUSE_LINEAR);
    cr_expect_eq(chosen(p, 4, 0, KV_K), REUSE_LINEAR);
    int id, lin;
    kvc_reuse_plan_count(p, NULL, &id, &lin);
    cr_expect_eq(id + lin, 3);
    cr_assert_eq(kvc_reuse_option_parse("heads=4", &o, NULL), 0);
    cr_assert_eq(kvc_reuse_plan_choose(p, &o, NULL), 0);
    cr_expect_eq(chosen(p, 1, 1, KV_K), REUSE_IDENTITY, "tie at 0.20: the lower layer first");
    cr_expect_eq(chosen(p, 4, 1, KV_K), REUSE_NONE);
    kvc_reuse_plan_count(p, NULL, &id, &lin);
    cr_expect_eq(id + lin, 4);
    cr_assert_eq(kvc_reuse_option_parse("heads=0", &o, NULL), 0);
    cr_assert_eq(kvc_reuse_plan_choose(p, &o, NULL), 0);
    kvc_reuse_plan_count(p, NULL, &id, &lin);
    cr_expect_eq(id + lin, 0);
    cr_assert_eq(kvc_reuse_option_parse("heads=8", &o, NULL), 0);
    cr_assert_eq(kvc_reuse_plan_choose(p, &o, NULL), 0);
    kvc_reuse_plan_count(p, NULL, &id, &lin);
    cr_expect_eq(id + lin, 8, "every analysed item, none of layer 2");
    cr_assert_eq(kvc_reuse_option_parse("heads=9", &o, NULL), 0);
    cr_expect_eq(kvc_reuse_plan_choose(p, &o, &err), -1, "more than were analysed");
    cr_expect_not_null(strstr(err.msg, "only 8"), "%s", err.msg);
    kvc_reuse_plan_free(p);
}

Test(reuse, option_parsing) {
    reuse_option o;
    kvc_err err;
    char buf[64];
    cr_assert_eq(kvc_reuse_option_parse("threshold=0.2", &o, &err), 0, "%s", err.msg);
    cr_expect(o.mode == REUSE_BY_THRESHOLD && o.threshold == 0.2);
    kvc_reuse_option_format(&o, buf, sizeof buf);
    cr_expect_str_eq(buf, "threshold=0.2");
    cr_assert_eq(kvc_reuse_option_parse("heads=12", &o, &err), 0, "%s", err.msg);
    cr_expect(o.mode == REUSE_BY_HEADS && o.heads == 12);
    kvc_reuse_option_format(&o, buf, sizeof buf);
    cr_expect_str_eq(buf, "heads=12");
    cr_expect_eq(kvc_reuse_option_parse("heads=0", &o, NULL), 0);
    cr_expect_eq(kvc_reuse_option_parse("threshold=1e-3", &o, NULL), 0);
    cr_expect_eq(o.threshold, 1e-3);
    kvc_reuse_option_format(&o, buf, sizeof buf);
    cr_expect_str_eq(buf, "threshold=0.001");
    o.threshold = 0.123456789012; /* the text round-trips (a checkpoint stores it) */
    kvc_reuse_option_format(&o, buf, sizeof buf);
    reuse_option back;
    cr_assert_eq(kvc_reuse_option_parse(buf, &back, NULL), 0);
    cr_expect_eq(back.threshold, o.threshold, "%s", buf);

    static const struct { const char *s, *why; } BAD[] = {
        {"threshold=0", "> 0"}, {"threshold=-0.1", "> 0"}, {"threshold=nan", "> 0"}, {"threshold=inf", "> 0"},
        {"threshold=abc", "not a number"}, {"threshold=0.2x", "not a number"}, {"threshold=", "expected"},
        {"threshold= 0.2", "expected"}, {"heads=-1", ">= 0"}, {"heads=1.5", "whole number"},
        {"heads=", "expected"}, {"heads=99999999999", "too large"}, {"", "expected"}, {"thresh=0.2", "expected"},
        {"Threshold=0.2", "expected"}, {"heads 3", "expected"}, {"0.2", "expected"},
    };
    for (size_t i = 0; i < sizeof BAD / sizeof *BAD; i++) {
        err.msg[0] = '\0';
        cr_expect_eq(kvc_reuse_option_parse(BAD[i].s, &o, &err), -1, "'%s' accepted", BAD[i].s);
        cr_expect_not_null(strstr(err.msg, BAD[i].why), "'%s': %s", BAD[i].s, err.msg);
        cr_expect_not_null(strstr(err.msg, BAD[i].s), "message names the option: %s", err.msg);
    }
    cr_expect_eq(kvc_reuse_option_parse(NULL, &o, &err), -1);

    reuse_choice c;
    for (int k = REUSE_NONE; k <= REUSE_LINEAR; k++) {
        cr_assert_eq(kvc_reuse_choice_parse(kvc_reuse_choice_name((reuse_choice)k), &c), 0);
        cr_expect_eq(c, k);
    }
    cr_expect_str_eq(kvc_reuse_choice_name(REUSE_LINEAR), "linear");
    cr_expect_eq(kvc_reuse_choice_parse("copy", &c), -1);
}

/* Prints p into a NUL-terminated malloc'd string. */
static char *print_plan(const reuse_plan *p) {
    char *buf = NULL;
    size_t len = 0;
    FILE *fp = open_memstream(&buf, &len);
    cr_assert_not_null(fp);
    kvc_reuse_plan_print(p, fp);
    fclose(fp);
    return buf;
}

/* The line of text starting with prefix, copied into line (or "" if absent). */
static void find_line(const char *text, const char *prefix, char *line, size_t size) {
    line[0] = '\0';
    for (const char *s = text; s && *s; s = strchr(s, '\n') ? strchr(s, '\n') + 1 : NULL)
        if (strncmp(s, prefix, strlen(prefix)) == 0) {
            size_t n = strcspn(s, "\n");
            snprintf(line, size, "%.*s", (int)(n < size ? n : size - 1), s);
            return;
        }
}

Test(reuse, printed_table) {
    reuse_plan *p = hand_plan();
    reuse_option o;
    kvc_reuse_option_parse("threshold=0.2", &o, NULL);
    kvc_reuse_plan_choose(p, &o, NULL);
    char *t = print_plan(p), line[256];
    find_line(t, "layer ", line, sizeof line);
    cr_expect_str_eq(line, "layer    h0.K    h0.V     h1.K    h1.V", "%s", t);
    find_line(t, "    1 ", line, sizeof line);
    cr_expect_str_eq(line, "    1   0.100L  0.300    0.200I  0.050I", "%s", t);
    find_line(t, "    4 ", line, sizeof line);
    cr_expect_str_eq(line, "    4   0.150L  0.400    0.200L  0.220", "%s", t);
    find_line(t, "    2 ", line, sizeof line);
    cr_expect_str_eq(line, "    2  not analysed: layer 2 not stored", "%s", t);
    find_line(t, "    3 ", line, sizeof line);
    cr_expect_str_eq(line, "    3  not analysed: layer 2 not stored", "%s", t);
    cr_expect_not_null(strstr(t, "\nthreshold=0.2: 3 linear + 2 identity reused, of 8 analysed (16 items in all)\n"),
                       "%s", t);
    free(t);
    kvc_reuse_plan_free(p);

    /* SmolLM2-135M shape: 30 layers x 3 KV heads stays within 80 columns */
    p = kvc_reuse_plan_new(30, 3, 64, NULL);
    for (int i = 0; i < p->n_items; i++) {
        p->items[i].analysed = 1;
        p->items[i].err_linear = 0.01 * i;
        p->items[i].err_identity = 1.5 + i;
    }
    t = print_plan(p);
    size_t widest = 0;
    int lines = 0;
    for (const char *s = t; *s; s += strcspn(s, "\n") + (s[strcspn(s, "\n")] != 0), lines++)
        widest = strcspn(s, "\n") > widest ? strcspn(s, "\n") : widest;
    cr_expect_leq(widest, 80, "widest line %zu:\n%s", widest, t);
    cr_expect_eq(lines, 2 + 1 + 29 + 2, "header, 29 layer rows, legend:\n%s", t);
    cr_expect_not_null(strstr(t, "nothing chosen yet"), "%s", t);
    find_line(t, "   29 ", line, sizeof line);
    cr_expect_str_eq(line, "   29   1.680   1.690    1.700   1.710    1.720   1.730", "%s", t);
    free(t);
    kvc_reuse_plan_free(p);
}

/* ---- the whole analysis over dataset-shaped batches --------------------------------- */

Test(reuse, analysis_over_batches) {
    /* L = 4 with stored layers 0 1 3: only layer 1 (from 0) can be analysed. Hk = 2, D = 8.
     * Layer 1: K = W_h K0 + b_h per head, V = V0 (identity). Layer 3: noise. */
    enum { L = 4, HK = 2, D = 8, NS = 3 };
    const int layers[NS] = {0, 1, 3};
    float w[HK][D * D], b[HK][D];
    for (int h = 0; h < HK; h++) rand_map(D, w[h], b[h]);
    kvc_err err;
    reuse_plan *p = kvc_reuse_plan_new(L, HK, D, &err);
    cr_assert_not_null(p, "%s", err.msg);
    reuse_analysis *a = kvc_reuse_analysis_new(p, layers, NS, &err);
    cr_assert_not_null(a, "%s", err.msg);
    cr_expect_eq(kvc_reuse_analysis_pairs(a), 1);
    unsigned char want[NS * 3];
    kvc_reuse_analysis_want(a, want);
    const unsigned char want_ref[NS * 3] = {1, 1, 0, 1, 1, 0, 0, 0, 0};
    cr_expect_arr_eq(want, want_ref, sizeof want);
    cr_expect(p->stored[0] == 1 && p->stored[1] == 1 && p->stored[2] == 0 && p->stored[3] == 1);

    /* batches x[j*3 + kind] (n, HK, D); Q and layer 3 are not needed and left NULL */
    const int n_batch[] = {700, 300, 1, 999}, n_val = 400;
    int64_t total = 0;
    for (int t = 0; t < 5; t++) {
        int n = t < 4 ? n_batch[t] : n_val;
        float *k0 = rand_rows(n * HK, D), *v0 = rand_rows(n * HK, D), *k1 = malloc((size_t)n * HK * D * sizeof(float));
        for (int i = 0; i < n; i++)
            for (int h = 0; h < HK; h++) {
                float *yk = map_rows(k0 + ((size_t)i * HK + h) * D, 1, D, w[h], b[h], 0, NULL);
                memcpy(k1 + ((size_t)i * HK + h) * D, yk, D * sizeof(float));
                free(yk);
            }
        const float *x[NS * 3] = {k0, v0, NULL, k1, v0, NULL, NULL, NULL, NULL};
        if (t < 4) {
            cr_assert_eq(kvc_reuse_analysis_add_train(a, x, n, &err), 0, "%s", err.msg);
            total += n;
        } else {
            cr_expect_eq(kvc_reuse_analysis_add_val(a, x, n, &err), -1, "validation before solve");
            cr_expect_eq(kvc_reuse_analysis_finish(a, &err), -1, "finish before solve");
            cr_assert_eq(kvc_reuse_analysis_solve(a, 1e-10, &err), 0, "%s", err.msg);
            cr_expect_eq(kvc_reuse_analysis_add_train(a, x, n, &err), -1, "training after solve");
            cr_expect_eq(kvc_reuse_analysis_finish(a, &err), -1, "finish with no validation rows");
            const float *missing[NS * 3] = {k0, NULL, NULL, k1, v0, NULL, NULL, NULL, NULL};
            cr_expect_eq(kvc_reuse_analysis_add_val(a, missing, n, &err), -1);
            cr_expect_not_null(strstr(err.msg, "V of stored layer 0"), "%s", err.msg);
            cr_assert_eq(kvc_reuse_analysis_add_val(a, x, n, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_reuse_analysis_finish(a, &err), 0, "%s", err.msg);
        }
        free(k0), free(v0), free(k1);
    }
    for (int h = 0; h < HK; h++) {
        reuse_item *k = kvc_reuse_plan_item(p, 1, h, KV_K), *v = kvc_reuse_plan_item(p, 1, h, KV_V);
        cr_expect(k->analysed && v->analysed);
        cr_expect(k->n_train == total && k->n_val == n_val && v->n_train == total);
        cr_expect_lt(max_abs_diff(k->w, w[h], D * D), EXACT_TOL, "head %d W", h);
        cr_expect_lt(max_abs_diff(k->b, b[h], D), EXACT_TOL, "head %d b", h);
        cr_expect_lt(k->err_linear, EXACT_TOL, "head %d K err %g", h, k->err_linear);
        cr_expect_gt(k->err_identity, 0.1);
        cr_expect_eq(v->err_identity, 0.0);
        cr_expect_float_eq(v->cos_identity, 1.0, 1e-12);
        cr_expect_lt(v->err_linear, EXACT_TOL, "the map of an identity is the identity");
    }
    for (int l = 2; l < L; l++)
        for (int h = 0; h < HK; h++) cr_expect(!kvc_reuse_plan_item(p, l, h, KV_K)->analysed, "layer %d", l);
    cr_expect_eq(p->ridge, 1e-10);
    reuse_option o;
    kvc_reuse_option_parse("threshold=0.001", &o, NULL);
    cr_assert_eq(kvc_reuse_plan_choose(p, &o, NULL), 0);
    for (int h = 0; h < HK; h++) {
        cr_expect_eq(chosen(p, 1, h, KV_K), REUSE_LINEAR);
        cr_expect_eq(chosen(p, 1, h, KV_V), REUSE_IDENTITY);
    }
    char *t = print_plan(p), line[256];
    find_line(t, "    3 ", line, sizeof line);
    cr_expect_str_eq(line, "    3  not analysed: layer 2 not stored", "%s", t);
    free(t);
    kvc_reuse_analysis_free(a);
    kvc_reuse_plan_free(p);
}

Test(reuse, analysis_rejects_bad_layer_lists) {
    kvc_err err;
    reuse_plan *p = kvc_reuse_plan_new(6, 1, 4, NULL);
    const int gaps[] = {0, 2, 4}, unsorted[] = {1, 0}, outside[] = {4, 6};
    cr_expect_null(kvc_reuse_analysis_new(p, gaps, 3, &err));
    cr_expect_not_null(strstr(err.msg, "consecutive"), "%s", err.msg);
    cr_expect_null(kvc_reuse_analysis_new(p, unsorted, 2, &err));
    cr_expect_not_null(strstr(err.msg, "ascending"), "%s", err.msg);
    cr_expect_null(kvc_reuse_analysis_new(p, outside, 2, &err));
    cr_expect_not_null(strstr(err.msg, "outside"), "%s", err.msg);
    cr_expect_null(kvc_reuse_analysis_new(p, gaps, 0, &err));
    kvc_reuse_plan_free(p);
}
