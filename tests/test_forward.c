/* test_forward.c - the CPU forward pass against references run on the same GGUF
 * (tools/make_forward_fixtures.py): logits of an 81-token prompt vs transformers (f32),
 * greedy continuations, perplexity, and batched prefill vs one-token decoding. */
#include <math.h>

#include "fixture.h"
#include "kvc/eval.h"
#include "kvc/model.h"
#include "kvc/sampler.h"

/* Error budgets (logits are O(10..30); the reference dequantizes to f32 as we do, so the
 * remaining difference is f32 summation order). */
#define LOGIT_ABS_TOL 1e-3   /* any logit vs transformers (measured: 3.6e-5) */
#define LSE_ABS_TOL 1e-3     /* log-normaliser of a row */
#define PPL_REL_TOL_TF 2e-4  /* perplexity vs transformers (measured: < 1e-5) */
#define PPL_REL_TOL_LC 1e-2  /* perplexity vs llama.cpp (it quantizes activations) */
#define BATCH_ABS_TOL 2e-3   /* batched prefill vs token-by-token decode */

static kvc_model *load(void) {
    REQUIRE_MODEL(path);
    kvc_ops_set_threads(2);
    kvc_err err = {{0}};
    kvc_model *m = kvc_model_load(path, &err);
    cr_assert_not_null(m, "%s", err.msg);
    return m;
}

/* Runs tokens from an empty cache in one batch; returns (n, V) logits. */
static float *logits_of(kvc_model *m, const int32_t *ids, int n, int batch) {
    kvc_err err = {{0}};
    kvc_cache_shape s = kvc_model_cache_shape(m, n);
    kvc_cache *c = kvc_cache_full_new(&s, &err);
    kvc_run *r = kvc_run_new(m, batch, &err);
    cr_assert(c && r, "%s", err.msg);
    float *lg = malloc((size_t)n * m->hp.n_vocab * sizeof(float));
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    for (int i = 0; i < n; i++) pos[i] = i;
    if (batch >= n) cr_assert_eq(kvc_model_forward(m, r, c, ids, pos, n, lg, 1, &err), 0, "%s", err.msg);
    else /* feed in pieces of `batch` through separate calls, as decoding does */
        for (int i = 0; i < n; i += batch) {
            int nb = n - i < batch ? n - i : batch;
            cr_assert_eq(kvc_model_forward(m, r, c, ids + i, pos + i, nb, lg + (size_t)i * m->hp.n_vocab, 1, &err), 0);
        }
    cr_expect_eq(kvc_cache_n_tokens(c, 0), n);
    free(pos);
    kvc_run_free(r);
    kvc_cache_free(c);
    return lg;
}

static double lse(const float *row, int v) {
    double mx = row[0], s = 0;
    for (int j = 1; j < v; j++) mx = row[j] > mx ? row[j] : mx;
    for (int j = 0; j < v; j++) s += exp(row[j] - mx);
    return mx + log(s);
}

Test(forward, logits_match_transformers, .timeout = 300) {
    kvc_model *m = load();
    const int V = m->hp.n_vocab;
    char *fx = fixture_read("logits_ref.txt");
    int n;
    int32_t *ids = parse_ids(find_line(fx, "tokens "), "tokens", &n);
    cr_assert(n >= 64, "prompt of %d tokens", n);
    float *lg = logits_of(m, ids, n, n);
    double worst = 0;
    int argmax_ok = 0;
    for (const char *p = find_line(fx, "row "); p; p = find_line(p + 1, "row ")) {
        int pos, am;
        double ref_lse;
        int used;
        cr_assert_eq(sscanf(p, "row %d %d %lf%n", &pos, &am, &ref_lse, &used), 3);
        const float *row = lg + (size_t)pos * V;
        argmax_ok += kvc_argmax_f32(row, V) == am;
        cr_expect_eq(kvc_argmax_f32(row, V), am, "argmax differs at position %d", pos);
        cr_expect(fabs(lse(row, V) - ref_lse) < LSE_ABS_TOL, "LSE at %d: %f vs %f", pos, lse(row, V), ref_lse);
        const char *q = p + used;
        for (int k = 0; k < 20; k++) {
            int id;
            double ref;
            int u2;
            cr_assert_eq(sscanf(q, " %d:%lf%n", &id, &ref, &u2), 2);
            q += u2;
            double d = fabs(row[id] - ref);
            worst = d > worst ? d : worst;
            cr_expect(d < LOGIT_ABS_TOL, "logit[%d][%d] = %f, reference %f", pos, id, row[id], ref);
        }
    }
    cr_expect_eq(argmax_ok, n);
    /* three full rows, every vocabulary entry */
    int r0, r1, r2;
    cr_assert_eq(sscanf(find_line(fx, "full_rows"), "full_rows %d %d %d", &r0, &r1, &r2), 3);
    FILE *fp = fopen(fixture_path("logits_ref_rows.f32"), "rb");
    cr_assert_not_null(fp);
    float *ref = malloc((size_t)V * sizeof(float));
    int rows[3] = {r0, r1, r2};
    for (int k = 0; k < 3; k++) {
        cr_assert_eq(fread(ref, sizeof(float), (size_t)V, fp), (size_t)V);
        const float *row = lg + (size_t)rows[k] * V;
        double mx = 0;
        for (int j = 0; j < V; j++) mx = fmax(mx, fabs(row[j] - ref[j]));
        worst = mx > worst ? mx : worst;
        cr_expect(mx < LOGIT_ABS_TOL, "row %d: max |dlogit| %g", rows[k], mx);
    }
    fclose(fp);
    cr_log_info("max |logit - transformers| = %.2e over %d positions", worst, n);
    free(ref); free(lg); free(ids); free(fx);
    kvc_model_free(m);
}

Test(forward, greedy_continuations_match, .timeout = 300) {
    kvc_model *m = load();
    char *fx = fixture_read("greedy_ref.txt");
    int cases = 0;
    for (const char *p = find_line(fx, "prompt "); p; p = find_line(p + 1, "prompt ")) {
        int n, ng;
        int32_t *ids = parse_ids(p, "prompt", &n);
        int32_t *want = parse_ids(find_line(p, "gen "), "gen", &ng);
        kvc_err err = {{0}};
        kvc_cache_shape s = kvc_model_cache_shape(m, n + ng);
        kvc_cache *c = kvc_cache_full_new(&s, &err);
        kvc_run *r = kvc_run_new(m, n, &err);
        float *lg = malloc((size_t)m->hp.n_vocab * sizeof(float));
        int32_t *pos = malloc((size_t)n * sizeof *pos);
        for (int i = 0; i < n; i++) pos[i] = i;
        cr_assert_eq(kvc_model_forward(m, r, c, ids, pos, n, lg, 0, &err), 0, "%s", err.msg);
        for (int g = 0; g < ng; g++) {
            int32_t tok = kvc_argmax_f32(lg, m->hp.n_vocab), p2 = n + g;
            cr_expect_eq(tok, want[g], "case %d step %d: got %d, reference %d", cases, g, tok, want[g]);
            if (tok != want[g]) break;
            cr_assert_eq(kvc_model_forward(m, r, c, &tok, &p2, 1, lg, 0, &err), 0);
        }
        free(pos); free(lg); kvc_run_free(r); kvc_cache_free(c); free(ids); free(want);
        cases++;
    }
    cr_expect_eq(cases, 3);
    free(fx);
    kvc_model_free(m);
}

Test(forward, perplexity_matches_references, .timeout = 600) {
    kvc_model *m = load();
    char *fx = fixture_read("eval_tokens_head.txt");
    int n;
    int32_t *ids = parse_ids(find_line(fx, "tokens "), "tokens", &n);
    char *pf = fixture_read("ppl_ref.txt");
    double tf = 0, lc = 0;
    int ctx = 0, ntok = 0;
    for (const char *p = find_line(pf, "ppl "); p; p = find_line(p + 1, "ppl ")) {
        char ref[32];
        int c, t, cnt;
        double nll, ppl;
        cr_assert_eq(sscanf(p, "ppl ref=%31s ctx=%d tokens=%d count=%d nll=%lf ppl=%lf", ref, &c, &t, &cnt, &nll, &ppl), 6);
        if (t != n) continue; /* the 16k figures are checked by bench/, not here */
        ctx = c;
        ntok = t;
        if (!strcmp(ref, "transformers")) tf = ppl;
        else if (!strcmp(ref, "llamacpp")) lc = ppl;
    }
    cr_assert(tf > 0 && lc > 0 && ntok == n, "fixture lacks the %d-token figures", n);
    kvc_err err = {{0}};
    kvc_cache_shape s = kvc_model_cache_shape(m, ctx);
    kvc_cache *c = kvc_cache_full_new(&s, &err);
    kvc_ppl_opts o = {ctx, 128, 0};
    kvc_ppl_result res;
    cr_assert_eq(kvc_eval_perplexity(m, c, ids, n, &o, &res, &err), 0, "%s", err.msg);
    cr_expect_eq(res.n_scored, n - n / ctx);
    cr_expect(fabs(res.ppl / tf - 1) < PPL_REL_TOL_TF, "ppl %f vs transformers %f", res.ppl, tf);
    cr_expect(fabs(res.ppl / lc - 1) < PPL_REL_TOL_LC, "ppl %f vs llama.cpp %f", res.ppl, lc);
    cr_log_info("ppl %.4f (transformers %.4f, llama.cpp %.4f)", res.ppl, tf, lc);
    kvc_cache_free(c);
    free(ids); free(fx); free(pf);
    kvc_model_free(m);
}

Test(forward, batched_prefill_equals_token_by_token, .timeout = 300) {
    kvc_model *m = load();
    char *fx = fixture_read("eval_tokens_head.txt");
    int n;
    int32_t *ids = parse_ids(find_line(fx, "tokens "), "tokens", &n);
    const int T = 40, V = m->hp.n_vocab;
    float *a = logits_of(m, ids, T, T), *b = logits_of(m, ids, T, 1), *c3 = logits_of(m, ids, T, 7);
    double mx = 0, mx3 = 0;
    for (size_t i = 0; i < (size_t)T * V; i++) {
        mx = fmax(mx, fabs(a[i] - b[i]));
        mx3 = fmax(mx3, fabs(a[i] - c3[i]));
    }
    cr_expect(mx < BATCH_ABS_TOL, "batch 40 vs 1: max |d| %g", mx);
    cr_expect(mx3 < BATCH_ABS_TOL, "batch 40 vs 7: max |d| %g", mx3);
    free(a); free(b); free(c3); free(ids); free(fx);
    kvc_model_free(m);
}

Test(forward, rejects_bad_tokens_and_overflowing_cache) {
    kvc_model *m = load();
    kvc_err err = {{0}};
    kvc_cache_shape s = kvc_model_cache_shape(m, 4);
    kvc_cache *c = kvc_cache_full_new(&s, &err);
    kvc_run *r = kvc_run_new(m, 8, &err);
    int32_t ids[6] = {1, 2, 3, 4, 5, 6}, pos[6] = {0, 1, 2, 3, 4, 5};
    int32_t bad = m->hp.n_vocab;
    cr_expect_eq(kvc_model_forward(m, r, c, &bad, pos, 1, NULL, 0, &err), -1);
    cr_expect(strstr(err.msg, "out of range") != NULL, "%s", err.msg);
    cr_expect_eq(kvc_model_forward(m, r, c, ids, pos, 6, NULL, 0, &err), -1);
    cr_expect(strstr(err.msg, "KV cache full") != NULL, "%s", err.msg);
    kvc_run_free(r);
    kvc_cache_free(c);
    kvc_model_free(m);
}
