/* test_kernels.c - the shared compute kernels (kvc/kernels.h): attention of one KV head
 * against a naive double-precision softmax, the latent and mixed forms against decoding then
 * attending, codec layers against kvc_ae_export_run and a double formula per activation, RoPE
 * against the unfused textbook rotation bit for bit, and the eviction top-k against
 * kvc_kvcache_select's marks. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/ae.h"
#include "kvc/kernels.h"
#include "kvc/kvcache.h"
#include "kvc/ops.h"

#define TEST_RNG_SEED 12345
#include "test_rand.h"

/* Attention outputs: |got - ref| <= ATTN_RTOL (|ref| + max|v|), the value scale standing in
 * where outputs cancel towards 0. Weights: |got - ref| <= PROB_ATOL + ATTN_RTOL ref. */
#define ATTN_RTOL 1e-5
#define PROB_ATOL 1e-7
/* Codec layers against kvc_ae_export_run (same GEMM and formulas): |a - b| <= DENSE_TOL (1 + |b|);
 * against the activation worked out in double: DENSE_DBL_TOL (1 + |b|). */
#define DENSE_TOL 1e-6
#define DENSE_DBL_TOL 1e-5

/* ---- attention ------------------------------------------------------------------------ */

/* kvc_attend over contiguous rows: q (Q, G, D), out (Q, G, D), probs (Q, G, T). */
static void att_exact(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *v,
                      const int32_t *kpos, int64_t t, float *out, float *probs) {
    const kvc_attn_kv kv = {.t = t, .k = k, .ldk = d, .pos = kpos, .v = v, .ldv = d};
    cr_assert_eq(kvc_attend(q, (int64_t)g * d, qpos, n_q, g, d, &kv, out, (int64_t)g * d, probs, NULL), 0);
}
static void att_latent(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *z,
                       int r, const float *w, const float *b, const int32_t *kpos, int64_t t, float *out,
                       float *probs) {
    const kvc_attn_kv kv = {.t = t, .k = k, .ldk = d, .pos = kpos, .ne = t, .z = z, .r = r, .w = w, .b = b};
    cr_assert_eq(kvc_attend(q, (int64_t)g * d, qpos, n_q, g, d, &kv, out, (int64_t)g * d, probs, NULL), 0);
}

/* Naive double attention of one query row over values vals (T, VW): out (VW), pr (T). */
static void attend_ref(const float *qr, int32_t qp, int d, const float *k, const float *vals, int vw,
                       const int32_t *kpos, int64_t t, double *out, double *pr) {
    double m = -INFINITY, l = 0;
    for (int64_t i = 0; i < t; i++) {
        double s = 0;
        for (int e = 0; e < d; e++) s += (double)qr[e] * k[i * d + e];
        pr[i] = kpos[i] <= qp ? s / sqrt((double)d) : -INFINITY;
        m = pr[i] > m ? pr[i] : m;
    }
    for (int c = 0; c < vw; c++) out[c] = 0;
    for (int64_t i = 0; i < t; i++) {
        pr[i] = pr[i] == -INFINITY ? 0 : exp(pr[i] - m);
        l += pr[i];
    }
    for (int64_t i = 0; i < t; i++) {
        if (l > 0) pr[i] /= l;
        for (int c = 0; c < vw; c++) out[c] += pr[i] * vals[i * vw + c];
    }
}

/* Gapped, increasing positions (as after eviction) starting at p0; a few keys shuffled so the
 * kernel cannot rely on order. */
static int32_t *gapped_positions(int64_t t, int32_t p0) {
    int32_t *p = calloc((size_t)(t > 0 ? t : 1), sizeof *p), at = p0;
    for (int64_t i = 0; i < t; i++) p[i] = at, at += 1 + (int32_t)urand(3);
    for (int s = 0; s < 4 && t > 1; s++) {
        int64_t a = urand(t), b = urand(t);
        int32_t x = p[a];
        p[a] = p[b], p[b] = x;
    }
    return p;
}

typedef struct {
    int n_q, g, d;
    int64_t t;
    float kscale; /* key scale: larger makes the softmax peakier */
} attn_case;

static const attn_case CASES[] = {
    {1, 3, 64, 300, 1.0f},  /* decode step, crosses key blocks */
    {7, 3, 64, 1000, 3.0f}, /* a chunk with peaky weights */
    {2, 2, 32, 64, 0.3f},   /* exactly one block */
    {3, 1, 16, 5, 1.0f},    /* fewer keys than a block */
    {2, 4, 64, 130, 8.0f},  /* scores in the hundreds: the online maximum must hold */
};

/* Runs one case for the exact and latent forms and checks both against the double reference;
 * the latent form also against decoding the values then attending with kvc_attend_head_cpu. */
static void check_case(const attn_case *c, int r) {
    const int n_q = c->n_q, g = c->g, d = c->d, rows = n_q * g;
    const int64_t t = c->t;
    float *q = randn((size_t)rows * d, 1.0f), *k = randn((size_t)t * d, c->kscale);
    float *z = randn((size_t)t * r, 1.0f), *w = randn((size_t)d * r, 0.3f), *bias = randn(d, 0.5f);
    float *v = malloc((size_t)t * d * sizeof(float));
    for (int64_t i = 0; i < t; i++) /* v = W z + b, so both forms attend over the same values */
        for (int e = 0; e < d; e++) {
            float a = 0;
            for (int cc = 0; cc < r; cc++) a += w[e * r + cc] * z[i * r + cc];
            v[i * d + e] = a + bias[e];
        }
    int32_t *kpos = gapped_positions(t, 0), qpos[16];
    int32_t kmax = 0, kmin = kpos[0];
    for (int64_t i = 0; i < t; i++) kmax = kpos[i] > kmax ? kpos[i] : kmax, kmin = kpos[i] < kmin ? kpos[i] : kmin;
    /* queries: the first sees nothing, one sees about half, the rest everything */
    for (int j = 0; j < n_q; j++) qpos[j] = j == 0 && n_q > 1 ? kmin - 1 : j == 1 ? kmax / 2 : kmax + j;
    float *out = malloc((size_t)rows * d * sizeof(float)), *outl = malloc((size_t)rows * d * sizeof(float));
    float *pr = malloc((size_t)rows * t * sizeof(float)), *prl = malloc((size_t)rows * t * sizeof(float));
    double *ref = malloc((size_t)d * sizeof(double)), *refp = malloc((size_t)t * sizeof(double));
    att_exact(q, qpos, n_q, g, d, k, v, kpos, t, out, pr);
    att_latent(q, qpos, n_q, g, d, k, z, r, w, bias, kpos, t, outl, prl);
    double vmax = 0, worst = 0, worst_l = 0;
    for (int64_t i = 0; i < t * d; i++) vmax = fmax(vmax, fabs(v[i]));
    for (int row = 0; row < rows; row++) {
        attend_ref(q + row * d, qpos[row / g], d, k, v, d, kpos, t, ref, refp);
        double psum = 0;
        for (int64_t i = 0; i < t; i++) {
            float p = pr[(size_t)row * t + i];
            cr_assert(fabs(p - refp[i]) <= PROB_ATOL + ATTN_RTOL * refp[i], "case t=%lld row %d weight %lld: %g vs %g",
                      (long long)t, row, (long long)i, p, refp[i]);
            cr_assert(fabs(prl[(size_t)row * t + i] - refp[i]) <= PROB_ATOL + ATTN_RTOL * refp[i], "latent weight");
            psum += p;
        }
        int sees = qpos[row / g] >= kmin;
        cr_assert(fabs(psum - (sees ? 1.0 : 0.0)) < 1e-5, "row %d: weights sum to %g", row, psum);
        for (int e = 0; e < d; e++) {
            double tol = ATTN_RTOL * (fabs(ref[e]) + vmax);
            float o = out[row * d + e], ol = outl[row * d + e];
            cr_assert(fabs(o - ref[e]) <= tol, "case t=%lld row %d [%d]: %.9g vs ref %.9g", (long long)t, row, e, o, ref[e]);
            cr_assert(fabs(ol - o) <= tol, "latent row %d [%d]: %.9g vs decode-then-attend %.9g", row, e, ol, o);
            cr_assert(fabs(ol - ref[e]) <= tol, "latent row %d [%d]: %.9g vs ref %.9g", row, e, ol, ref[e]);
            if (!sees) cr_assert(o == 0 && ol == 0, "a query that sees no key must give 0");
            worst = fmax(worst, fabs(o - ref[e]) / (fabs(ref[e]) + vmax));
            worst_l = fmax(worst_l, fabs(ol - o) / (fabs(ref[e]) + vmax));
        }
    }
    fprintf(stderr, "attend Q=%d G=%d D=%d T=%lld: worst rel err %.2e (latent vs decoded %.2e)\n", n_q, g, d,
            (long long)t, worst, worst_l);
    free(q), free(k), free(z), free(w), free(bias), free(v), free(kpos), free(out), free(outl), free(pr), free(prl);
    free(ref), free(refp);
}

Test(kernels, attend_matches_double_reference) {
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) check_case(&CASES[i], CASES[i].d / 2);
}

Test(kernels, attend_without_weights_and_without_keys) {
    /* probs NULL gives the same output; T = 0 gives zeros */
    enum { Q = 2, G = 3, D = 16, T = 100 };
    float *q = randn(Q * G * D, 1), *k = randn(T * D, 1), *v = randn(T * D, 1), a[Q * G * D], b[Q * G * D];
    float pr[Q * G * T];
    int32_t *kpos = gapped_positions(T, 3), qpos[Q] = {1000, 1001};
    att_exact(q, qpos, Q, G, D, k, v, kpos, T, a, pr);
    att_exact(q, qpos, Q, G, D, k, v, kpos, T, b, NULL);
    cr_assert(!memcmp(a, b, sizeof a), "probs=NULL must not change the output");
    for (int i = 0; i < Q * G * D; i++) b[i] = 1;
    att_exact(q, qpos, Q, G, D, k, v, kpos, 0, b, NULL);
    for (int i = 0; i < Q * G * D; i++) cr_assert_eq(b[i], 0.0f, "no keys: output must be 0");
    free(q), free(k), free(v), free(kpos);
}

/* The compressed cache's mix: rows [0, ne) as latents of W z + b, the newest rows exact. Must
 * equal attending over the decoded values within ATTN_RTOL, and the exact form must not care
 * whether keys and values sit in strided or contiguous rows (bit for bit: one function). */
Test(kernels, attend_mixed_latent_and_exact_rows_and_strided_rows) {
    enum { Q = 3, G = 3, D = 32, R = 12, T = 257, NE = 200, LD = 3 * D };
    float *q = randn(Q * G * D, 1), *z = randn(T * R, 1), *w = randn(D * R, 0.3f), *bias = randn(D, 0.5f);
    float *k = randn(T * D, 1.5f), *v = malloc(sizeof(float) * T * D), *ks = malloc(sizeof(float) * T * LD);
    float *vs = malloc(sizeof(float) * T * LD);
    for (int i = 0; i < T; i++)
        for (int e = 0; e < D; e++) {
            float a = 0;
            for (int c = 0; c < R; c++) a += w[e * R + c] * z[i * R + c];
            v[i * D + e] = a + bias[e];
            ks[i * LD + D + e] = k[i * D + e], vs[i * LD + D + e] = v[i * D + e];
        }
    int32_t *kpos = gapped_positions(T, 0), qpos[Q] = {100, 300, 100000};
    float a[Q * G * D], b[Q * G * D], c[Q * G * D], pa[Q * G * T], pb[Q * G * T];
    att_exact(q, qpos, Q, G, D, k, v, kpos, T, a, pa);
    const kvc_attn_kv mix = {.t = T, .k = k, .ldk = D, .pos = kpos, .ne = NE, .z = z, .r = R, .w = w, .b = bias,
                             .v = v + NE * D, .ldv = D};
    cr_assert_eq(kvc_attend(q, G * D, qpos, Q, G, D, &mix, b, G * D, pb, NULL), 0);
    double vmax = 0;
    for (int i = 0; i < T * D; i++) vmax = fmax(vmax, fabs(v[i]));
    for (int i = 0; i < Q * G * D; i++)
        cr_assert(fabs(a[i] - b[i]) <= ATTN_RTOL * (fabs(a[i]) + vmax), "mixed [%d]: %.9g vs decoded %.9g", i, b[i], a[i]);
    cr_assert(!memcmp(pa, pb, sizeof pa), "the weights do not depend on how values are held");
    const kvc_attn_kv strided = {.t = T, .k = ks + D, .ldk = LD, .pos = kpos, .v = vs + D, .ldv = LD};
    cr_assert_eq(kvc_attend(q, G * D, qpos, Q, G, D, &strided, c, G * D, NULL, NULL), 0);
    cr_assert(!memcmp(a, c, sizeof a), "strided rows must give the contiguous result bit for bit");
    free(q), free(z), free(w), free(bias), free(k), free(v), free(ks), free(vs), free(kpos);
}

/* ---- RoPE ----------------------------------------------------------------------------- */

/* The textbook rotation, each product and the sum rounded on its own (volatile stops any
 * fusion), from the same float angles the table holds: the kernel must give exactly this on
 * every target (gcc 12 fuses a*c - b*s into vfmaddsub when it vectorises that form). */
static void rope_textbook(const float *x, int d, int32_t p, float base, float *y) {
    for (int i = 0; i < d / 2; i++) {
        float th = (float)p * powf(base, -2.0f * (float)i / (float)d), c = cosf(th), s = sinf(th);
        volatile float ac = x[2 * i] * c, bs = x[2 * i + 1] * s, as = x[2 * i] * s, bc = x[2 * i + 1] * c;
        y[2 * i] = ac - bs;
        y[2 * i + 1] = as + bc;
    }
}

Test(kernels, rope_is_the_unfused_rotation_strided_in_place_and_by_heads) {
    enum { N = 9, D = 64, LD = 80, H = 3 };
    float *x = randn(N * LD, 2.0f), a[N * D], b[N * D], want[N * D];
    const int32_t pos[N] = {0, 1, 3, 7, 100, 1001, 4095, 8191, 60000}; /* gaps, as after eviction */
    kvc_rope_table t;
    cr_assert_eq(kvc_rope_table_init(&t, D, 100000.0f), 0);
    cr_assert_eq(kvc_rope_table_reserve(&t, 60001), 0);
    for (int r = 0; r < N; r++) rope_textbook(x + r * LD, D, pos[r], 100000.0f, want + r * D);
    kvc_rope_rows(&t, x, LD, pos, N, a, D);
    cr_assert(!memcmp(a, want, sizeof a), "strided rows must equal the unfused rotation bit for bit");
    for (int r = 0; r < N; r++) memcpy(b + r * D, x + r * LD, D * sizeof(float));
    kvc_rope_rows(&t, b, D, pos, N, b, D);
    cr_assert(!memcmp(b, want, sizeof b), "in place must equal out of place");
    /* (N, H, D) by heads, as the full cache and the queries are rotated */
    float *xh = malloc(sizeof(float) * N * H * D);
    for (int r = 0; r < N; r++)
        for (int h = 0; h < H; h++) memcpy(xh + (r * H + h) * D, x + r * LD, D * sizeof(float));
    kvc_rope_heads(&t, xh, pos, N, H);
    for (int r = 0; r < N; r++)
        for (int h = 0; h < H; h++)
            cr_assert(!memcmp(xh + (r * H + h) * D, want + r * D, D * sizeof(float)), "token %d head %d", r, h);
    /* and against a double reference: the rotation itself is right */
    for (int r = 0; r < N; r++)
        for (int i = 0; i < D / 2; i++) {
            double th = (double)(float)((float)pos[r] * powf(100000.0f, -2.0f * (float)i / (float)D));
            double c = cos(th), s = sin(th), u = x[r * LD + 2 * i], w = x[r * LD + 2 * i + 1];
            cr_assert_float_eq(a[r * D + 2 * i], u * c - w * s, 1e-5 * (1 + fabs(u) + fabs(w)));
            cr_assert_float_eq(a[r * D + 2 * i + 1], u * s + w * c, 1e-5 * (1 + fabs(u) + fabs(w)));
        }
    /* bad tables are refused */
    kvc_rope_table bad;
    cr_expect_eq(kvc_rope_table_init(&bad, 63, 1e4f), -1);
    cr_expect_eq(kvc_rope_table_init(&bad, 64, 0.0f), -1);
    cr_expect_eq(kvc_rope_table_init(&bad, 64, NAN), -1);
    kvc_rope_table_free(&t);
    free(x), free(xh);
}

/* ---- codec layers --------------------------------------------------------------------- */

/* act(a) in double, for the check of each activation formula. */
static double act_ref(double a, int act, double slope) {
    switch (act) {
    case KVC_ACT_RELU: return a > 0 ? a : 0;
    case KVC_ACT_LEAKY_RELU: return a > 0 ? a : slope * a;
    case KVC_ACT_GELU: return 0.5 * a * (1 + tanh(sqrt(2 / 3.141592653589793) * (a + 0.044715 * a * a * a)));
    case KVC_ACT_SILU: return a / (1 + exp(-a));
    default: return a;
    }
}

Test(kernels, dense_rows_equals_ae_export_run) {
    enum { D = 64, H = 48, R = 16, N = 600 }; /* more rows than one GEMM block */
    kvc_err err = {{0}};
    for (int act = 0; act < KVC_ACT_COUNT; act++) {
        for (int hidden = 0; hidden <= H; hidden += H) {
            if (!hidden && act) continue;
            ae_config c;
            kvc_ae_config_defaults(&c);
            c.in_dim = D, c.hidden = hidden, c.latent = R, c.act = (kvc_act)act, c.norm = hidden ? AE_NORM_BATCH : AE_NORM_NONE;
            c.leaky_slope = 0.2f;
            ae_model *m = kvc_ae_new(&c, 11 + act, &err);
            cr_assert(m, "%s", err.msg);
            for (int i = 0; i < kvc_ae_n_tensors(m); i++) { /* non-trivial BatchNorm statistics to fold */
                ae_tensor tt = kvc_ae_tensor_at(m, i);
                if (strstr(tt.name, "running_mean")) for (int j = 0; j < tt.rows; j++) tt.data[j] = 0.3f * gauss();
                if (strstr(tt.name, "running_var")) for (int j = 0; j < tt.rows; j++) tt.data[j] = 0.5f + fabsf(gauss());
            }
            ae_export e;
            cr_assert_eq(kvc_ae_export_folded(m, &e, &err), 0, "%s", err.msg);
            float *x = randn((size_t)N * D, 1.5f), *z = malloc(N * R * 4), *z2 = malloc(N * R * 4);
            float *y = malloc((size_t)N * D * 4), *y2 = malloc((size_t)N * D * 4), *h = malloc((size_t)N * H * 4);
            kvc_ae_export_run(e.enc, e.n_enc, e.leaky_slope, x, N, z);
            kvc_ae_export_run(e.dec, e.n_dec, e.leaky_slope, z, N, y);
            for (int half = 0; half < 2; half++) { /* encode, then decode, layer by layer */
                const ae_dense *L = half ? e.dec : e.enc;
                int nl = half ? e.n_dec : e.n_enc;
                const float *in = half ? z : x;
                float *out = half ? y2 : z2;
                for (int l = 0; l < nl; l++) {
                    float *o = l == nl - 1 ? out : h;
                    kvc_dense_rows(l ? h : in, N, L[l].in, L[l].w, L[l].b, L[l].out, L[l].act, e.leaky_slope, o);
                    if (l == 0) /* the first layer (with its activation) against a double formula */
                        for (int i = 0; i < N; i += 37)
                            for (int j = 0; j < L[0].out; j++) {
                                double a = L[0].b[j];
                                for (int kk = 0; kk < L[0].in; kk++) a += (double)in[i * L[0].in + kk] * L[0].w[j * L[0].in + kk];
                                double want = act_ref(a, L[0].act, e.leaky_slope);
                                cr_assert(fabs(o[i * L[0].out + j] - want) <= DENSE_DBL_TOL * (1 + fabs(want)),
                                          "%s layer 0 [%d,%d]: %g vs %g", kvc_ae_act_name((kvc_act)act), i, j,
                                          o[i * L[0].out + j], want);
                            }
                }
            }
            double worst = 0;
            for (int i = 0; i < N * R; i++) {
                cr_assert(fabsf(z2[i] - z[i]) <= DENSE_TOL * (1 + fabsf(z[i])), "%s enc [%d]: %g vs %g",
                          kvc_ae_act_name((kvc_act)act), i, z2[i], z[i]);
                worst = fmax(worst, fabsf(z2[i] - z[i]));
            }
            for (int i = 0; i < N * D; i++) {
                cr_assert(fabsf(y2[i] - y[i]) <= DENSE_TOL * (1 + fabsf(y[i])), "%s dec [%d]: %g vs %g",
                          kvc_ae_act_name((kvc_act)act), i, y2[i], y[i]);
                worst = fmax(worst, fabsf(y2[i] - y[i]));
            }
            fprintf(stderr, "dense_rows %s hidden %d: worst |diff| to kvc_ae_export_run %.2e\n", kvc_ae_act_name((kvc_act)act),
                    hidden, worst);
            free(x), free(z), free(z2), free(y), free(y2), free(h);
            kvc_ae_export_free(&e);
            kvc_ae_free(m);
        }
    }
}

/* ---- eviction top-k ------------------------------------------------------------------- */

Test(kernels, topk_agrees_with_kvcache_select) {
    int64_t idx[400];
    uint8_t mark[400];
    float score[400];
    int big = 0;
    for (int it = 0; it < 600; it++) {
        int64_t n = 1 + urand(400), keep = urand(n + 2), sinks = urand(8), window = urand(20);
        int levels = 1 + (int)urand(it % 3 ? 1000 : 4); /* few levels: many ties */
        for (int64_t i = 0; i < n; i++) {
            score[i] = (float)(urand(levels) - levels / 2) * 0.25f;
            if (score[i] == 0 && urand(2)) score[i] = -0.0f; /* -0 and +0 tie */
        }
        int64_t marked = kvc_kvcache_select(score, n, keep, (int)sinks, (int)window, mark);
        int64_t kk = n - keep, got = kvc_topk(score, n, sinks, window, kk, idx);
        cr_assert_eq(got, marked, "n %lld keep %lld sinks %lld window %lld: %lld indices, select marked %lld",
                     (long long)n, (long long)keep, (long long)sinks, (long long)window, (long long)got,
                     (long long)marked);
        big += marked > 8; /* kvc_kvcache_select's sorting path, not only its arg-max path */
        int64_t seen = 0;
        for (int64_t j = 0; j < got; j++) {
            cr_assert(idx[j] >= sinks && idx[j] < n - window, "index %lld is protected", (long long)idx[j]);
            cr_assert(mark[idx[j]], "n %lld: index %lld chosen but not marked by kvc_kvcache_select", (long long)n,
                      (long long)idx[j]);
            if (j) { /* ranked: higher score first, ties the older first */
                float a = score[idx[j - 1]], b = score[idx[j]];
                cr_assert(a > b || (a == b && idx[j - 1] < idx[j]), "order at %lld", (long long)j);
            }
            seen++;
        }
        cr_assert_eq(seen, marked);
    }
    cr_assert(big > 100, "too few cases with more than 8 evictions (%d)", big);
}

Test(kernels, topk_by_hand) {
    const float s[10] = {9, 1, 5, 5, 7, -1, 5, 8, 2, 9};
    int64_t idx[10];
    /* candidates [2, 8): 5 5 7 -1 5 8 -> 7 (8), 4 (7), then the 5s oldest first: 2, 3, 6 */
    cr_assert_eq(kvc_topk(s, 10, 2, 2, 4, idx), 4);
    const int64_t want[4] = {7, 4, 2, 3};
    for (int i = 0; i < 4; i++) cr_assert_eq(idx[i], want[i], "idx[%d] = %lld", i, (long long)idx[i]);
    cr_assert_eq(kvc_topk(s, 10, 2, 2, 100, idx), 6, "capped by the candidates");
    cr_assert_eq(kvc_topk(s, 10, 5, 5, 3, idx), 0, "protection leaves nothing");
    cr_assert_eq(kvc_topk(s, 10, 0, 0, 0, idx), 0);
}
