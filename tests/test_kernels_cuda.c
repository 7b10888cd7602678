/* test_kernels_cuda.c - the CUDA twins of kvc/kernels.h (kernels/cuda/attn_cuda.cu) against
 * the CPU kernels, at the sizes inference uses (T = 4096, D = 64, R = 32, G = 3) and at odd
 * edges (one key, no key, widths that are not tile multiples). Tolerance abs + eps*|ref|.
 * Runs where a GPU is present; elsewhere each test says it skipped and why. */
#include <criterion/criterion.h>
#include "kvc/kernels.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/ae.h"
#include "kvc/backend.h"
#ifdef KVC_HAVE_CUDA
#include "kvc/ops_cuda.h"

#define TEST_RNG_SEED 777
#include "test_rand.h"
#endif

/* Budgets, each |cuda - cpu| <= ABS + EPS |cpu|:
 * codec layers: other summation order and FMA contraction over I <= 128 products; */
#define DENSE_ABS 1e-5
#define DENSE_EPS 1e-5
/* RoPE: the same table and unfused arithmetic, so bit for bit; */
/* attention: ABS is ATTN_EPS times the largest |value| (outputs may cancel towards 0);
 * weights: PROB_ABS absolute; */
#define ATTN_EPS 1e-5
#define PROB_ABS 1e-7
/* top-k: the index lists must be identical (the keys are exact). */

#ifdef KVC_HAVE_CUDA
static void need_gpu(void) {
    char why[256];
    if (!kvc_backend_cuda_available(why, sizeof why)) cr_skip_test("CUDA parity skipped: %s", why);
}

/* Asserts |got - ref| <= abs_tol + eps |ref| everywhere and returns the worst |got - ref|. */
static double expect_close(const float *got, const float *ref, size_t n, double abs_tol, double eps, const char *what) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        cr_assert(e <= abs_tol + eps * fabs(ref[i]), "%s[%zu]: cuda %.9g cpu %.9g", what, i, got[i], ref[i]);
        worst = fmax(worst, e);
    }
    return worst;
}

Test(kernels_cuda, dense_rows) {
    need_gpu();
    /* encode 64 -> 32, decode 32 -> 64, a hidden layer per activation, and ragged widths */
    const struct { int n, in, out, act; } cs[] = {
        {4096, 64, 32, KVC_ACT_NONE}, {4096, 32, 64, KVC_ACT_NONE}, {1000, 64, 128, KVC_ACT_RELU},
        {1000, 128, 64, KVC_ACT_LEAKY_RELU}, {333, 40, 24, KVC_ACT_GELU}, {17, 24, 40, KVC_ACT_SILU}, {1, 5, 3, KVC_ACT_NONE},
    };
    kvc_err err = {{0}};
    for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++) {
        const int n = cs[c].n, in = cs[c].in, out = cs[c].out;
        float *x = randn((size_t)n * in, 1.0f), *w = randn((size_t)out * in, 1.0f / sqrtf((float)in));
        float *b = randn(out, 0.5f), *y1 = malloc((size_t)n * out * 4), *y2 = malloc((size_t)n * out * 4);
        for (int nob = 0; nob < 2; nob++) {
            kvc_dense_rows(x, n, in, w, nob ? NULL : b, out, cs[c].act, 0.1f, y1);
            cr_assert_eq(kvc_dense_rows_cuda(x, n, in, w, nob ? NULL : b, out, cs[c].act, 0.1f, y2, &err), 0, "%s", err.msg);
            double worst = expect_close(y2, y1, (size_t)n * out, DENSE_ABS, DENSE_EPS, "dense");
            if (!nob) fprintf(stderr, "dense %d x %d -> %d %s: worst %.2e\n", n, in, out, kvc_ae_act_name((kvc_act)cs[c].act), worst);
        }
        free(x), free(w), free(b), free(y1), free(y2);
    }
}

Test(kernels_cuda, rope_rows) {
    need_gpu();
    enum { N = 4096, D = 64, LD = 192 }; /* keys of one head inside rows of three heads */
    float *x = randn((size_t)N * LD, 2.0f), *a = malloc((size_t)N * D * 4), *b = malloc((size_t)N * D * 4);
    int32_t *pos = malloc(N * sizeof *pos);
    kvc_err err = {{0}};
    for (int t = 0, p = 0; t < N; t++) pos[t] = p, p += 1 + (int)urand(16); /* gaps up to 15 */
    kvc_rope_table tab;
    cr_assert_eq(kvc_rope_table_init(&tab, D, 100000.0f), 0);
    cr_assert_eq(kvc_rope_table_reserve(&tab, (int64_t)pos[N - 1] + 1), 0);
    kvc_rope_rows(&tab, x + 64, LD, pos, N, a, D);
    cr_assert_eq(kvc_rope_rows_cuda(&tab, x + 64, LD, pos, N, b, D, &err), 0, "%s", err.msg);
    kvc_rope_table_free(&tab);
    cr_assert(!memcmp(a, b, (size_t)N * D * 4), "the CUDA rotation must equal the CPU's bit for bit");
    free(x), free(a), free(b), free(pos);
}

static void att_cpu(const float *q, const int32_t *qpos, int n_q, int g, int d, const kvc_attn_kv *kv, float *o,
                    float *p) {
    cr_assert_eq(kvc_attend(q, (int64_t)g * d, qpos, n_q, g, d, kv, o, (int64_t)g * d, p, NULL), 0);
}

/* One attention case, exact, latent and mixed values, with and without weights. */
static void attend_case(int n_q, int g, int d, int r, int64_t t, float kscale) {
    const int rows = n_q * g;
    kvc_err err = {{0}};
    float *q = randn((size_t)rows * d, 1.0f), *k = randn((size_t)t * d, kscale), *v = randn((size_t)t * d, 1.0f);
    float *z = randn((size_t)t * r, 1.0f), *w = randn((size_t)d * r, 0.3f), *b = randn(d, 0.5f);
    float *o1 = malloc((size_t)rows * d * 4), *o2 = malloc((size_t)rows * d * 4);
    float *p1 = malloc((size_t)rows * (t ? t : 1) * 4), *p2 = malloc((size_t)rows * (t ? t : 1) * 4);
    int32_t *kpos = malloc((size_t)(t ? t : 1) * sizeof *kpos), *qpos = malloc((size_t)n_q * sizeof *qpos);
    int32_t top = 0;
    for (int64_t i = 0; i < t; i++) kpos[i] = top, top += 1 + (int32_t)urand(3);
    if (t > 1) { int32_t s = kpos[0]; kpos[0] = kpos[t - 1], kpos[t - 1] = s; } /* not sorted */
    /* the first query sees nothing, the second about half, the others every key */
    for (int j = 0; j < n_q; j++) qpos[j] = n_q > 2 && j == 0 ? -1 : n_q > 2 && j == 1 ? top / 2 : top + j;
    double vmax = 1e-30, zmax = 1e-30;
    for (int64_t i = 0; i < t * d; i++) vmax = fmax(vmax, fabs(v[i]));
    for (int64_t i = 0; i < t; i++) /* latent outputs: the scale of the decoded values */
        for (int e = 0; e < d; e++) {
            double a = b[e];
            for (int c = 0; c < r; c++) a += (double)w[e * r + c] * z[i * r + c];
            zmax = fmax(zmax, fabs(a));
        }
    char what[96];
    for (int with_p = 0; with_p < 2; with_p++) {
        const kvc_attn_kv ex = {.t = t, .k = k, .ldk = d, .pos = kpos, .v = v, .ldv = d};
        att_cpu(q, qpos, n_q, g, d, &ex, o1, with_p ? p1 : NULL);
        cr_assert_eq(kvc_attend_cuda(q, (int64_t)g * d, qpos, n_q, g, d, &ex, o2, (int64_t)g * d, with_p ? p2 : NULL, &err),
                     0, "%s", err.msg);
        snprintf(what, sizeof what, "attend Q=%d G=%d D=%d T=%lld", n_q, g, d, (long long)t);
        double wo = expect_close(o2, o1, (size_t)rows * d, ATTN_EPS * vmax, ATTN_EPS, what);
        double wp = with_p ? expect_close(p2, p1, (size_t)rows * t, PROB_ABS, ATTN_EPS, "weights") : 0;
        const kvc_attn_kv la = {.t = t, .k = k, .ldk = d, .pos = kpos, .ne = t, .z = z, .r = r, .w = w, .b = b};
        att_cpu(q, qpos, n_q, g, d, &la, o1, with_p ? p1 : NULL);
        cr_assert_eq(kvc_attend_cuda(q, (int64_t)g * d, qpos, n_q, g, d, &la, o2, (int64_t)g * d, with_p ? p2 : NULL, &err),
                     0, "%s", err.msg);
        snprintf(what, sizeof what, "latent Q=%d G=%d D=%d R=%d T=%lld", n_q, g, d, r, (long long)t);
        double wl = expect_close(o2, o1, (size_t)rows * d, ATTN_EPS * zmax, ATTN_EPS, what);
        /* the compressed cache's mix: older rows latent, the newest exact */
        const kvc_attn_kv mx = {.t = t, .k = k, .ldk = d, .pos = kpos, .ne = t / 2, .z = z, .r = r, .w = w, .b = b,
                                .v = v + (size_t)(t / 2) * d, .ldv = d};
        att_cpu(q, qpos, n_q, g, d, &mx, o1, NULL);
        cr_assert_eq(kvc_attend_cuda(q, (int64_t)g * d, qpos, n_q, g, d, &mx, o2, (int64_t)g * d, NULL, &err), 0, "%s",
                     err.msg);
        snprintf(what, sizeof what, "mixed Q=%d G=%d D=%d R=%d T=%lld", n_q, g, d, r, (long long)t);
        expect_close(o2, o1, (size_t)rows * d, ATTN_EPS * fmax(zmax, vmax), ATTN_EPS, what);
        if (with_p) {
            expect_close(p2, p1, (size_t)rows * t, PROB_ABS, ATTN_EPS, "latent weights");
            fprintf(stderr, "%s: worst out %.2e (value scale %.2g), latent %.2e, weights %.2e\n", what, wo, vmax, wl, wp);
        }
    }
    free(q), free(k), free(v), free(z), free(w), free(b), free(o1), free(o2), free(p1), free(p2), free(kpos), free(qpos);
}

Test(kernels_cuda, attend_inference_sizes) {
    need_gpu();
    attend_case(1, 3, 64, 32, 4096, 1.0f);  /* decode step */
    attend_case(32, 3, 64, 32, 4096, 2.0f); /* a chunk of 32 queries */
}

Test(kernels_cuda, attend_edges) {
    need_gpu();
    attend_case(3, 3, 64, 32, 1, 1.0f);   /* one key */
    attend_case(4, 1, 16, 8, 77, 4.0f);   /* ragged tiles, peaky weights */
    attend_case(5, 8, 128, 48, 300, 1.0f); /* wide heads: smaller key tiles */
    attend_case(2, 3, 64, 32, 0, 1.0f);   /* nothing held: zeros */
}

/* Scores with many ties (and -0 beside +0) over n tokens; the CUDA index list must equal the
 * CPU's for several k, sinks and windows. */
static void topk_case(int64_t n, int levels) {
    float *s = malloc((size_t)n * sizeof *s);
    int64_t *a = malloc((size_t)n * sizeof *a), *b = malloc((size_t)n * sizeof *b);
    kvc_err err = {{0}};
    for (int64_t i = 0; i < n; i++) {
        s[i] = levels ? (float)(urand(levels) - levels / 2) : gauss();
        if (s[i] == 0 && urand(2)) s[i] = -0.0f;
    }
    const int64_t ks[4] = {1, 7, n / 10 + 1, n};
    for (int c = 0; c < 4; c++) {
        int64_t sinks = urand(8), window = urand(32);
        int64_t na = kvc_topk(s, n, sinks, window, ks[c], a);
        int64_t nb = kvc_topk_cuda(s, n, sinks, window, ks[c], b, &err);
        cr_assert_eq(nb, na, "n %lld k %lld: cuda gave %lld indices, cpu %lld (%s)", (long long)n, (long long)ks[c],
                     (long long)nb, (long long)na, err.msg);
        for (int64_t i = 0; i < na; i++)
            cr_assert_eq(b[i], a[i], "n %lld k %lld: idx[%lld] cuda %lld cpu %lld", (long long)n, (long long)ks[c],
                         (long long)i, (long long)b[i], (long long)a[i]);
    }
    free(s), free(a), free(b);
}

Test(kernels_cuda, topk) {
    need_gpu();
    topk_case(4096, 50);     /* one shared-memory chunk merge plus a global step */
    topk_case(100000, 0);    /* many global bitonic steps, distinct scores */
    topk_case(100000, 7);    /* heavy ties */
    topk_case(3, 2);
    topk_case(2049, 1000);   /* just past a chunk */
}

/* The codebook twins: the same codes and values bit for bit, widths 0-8 mixed. */
Test(kernels_cuda, codebook) {
    need_gpu();
    enum { C = 192, N = 5000 };
    uint8_t bits[C];
    int32_t off[C];
    static float levels[C * 256];
    int at = 0;
    for (int c = 0; c < C; c++) {
        bits[c] = (uint8_t)(c % 9);
        off[c] = at;
        float v = -2.0f;
        for (int j = 0; bits[c] && j < (1 << bits[c]); j++) levels[at++] = v += 4.0f / (1 << bits[c]) * (0.5f + urand(2));
    }
    const kvc_codebook cb = {C, bits, levels, off, kvc_codebook_row_bytes(bits, C)};
    float *y = randn((size_t)N * C, 1.5f), *a = malloc(sizeof(float) * N * C), *b = malloc(sizeof(float) * N * C);
    uint8_t *ca = malloc((size_t)N * cb.row_bytes), *cc = malloc((size_t)N * cb.row_bytes);
    kvc_err err = {{0}};
    kvc_codebook_quantize(&cb, y, N, C, ca);
    cr_assert_eq(kvc_codebook_quantize_cuda(&cb, y, N, C, cc, &err), 0, "%s", err.msg);
    cr_assert(!memcmp(ca, cc, (size_t)N * cb.row_bytes), "codes differ");
    kvc_codebook_dequantize(&cb, ca, N, a, C);
    cr_assert_eq(kvc_codebook_dequantize_cuda(&cb, ca, N, b, C, &err), 0, "%s", err.msg);
    cr_assert(!memcmp(a, b, sizeof(float) * N * C), "decoded values differ");
    free(y), free(a), free(b), free(ca), free(cc);
}

#else
Test(kernels_cuda, not_built) { cr_skip_test("CUDA parity skipped: this build has no CUDA backend (nvcc not found)"); }
#endif
