/* test_eval.c - the measuring protocols (kvc/eval.h) on the real model: the full cache
 * against itself gives KL 0, top-1 1 and kvc_eval_perplexity's ppl; chunking changes little;
 * memory figures match the f32 layout; the passkey prompt hides the key where asked and the
 * answer check works; `kvcodec eval` refuses bad input before running. Small sizes: the
 * whole file runs in well under a minute on two busy cores. */
#include <math.h>
#include <sys/wait.h>

#include "fixture.h"
#include "kvc/eval.h"
#include "kvc/kvcache.h"

#define PPL_REL_TOL 1e-9   /* stream with chunk = ctx vs kvc_eval_perplexity: the same arithmetic */
#define CHUNK_REL_TOL 2e-4 /* stream ppl, chunk 16 vs chunk = ctx: only GEMM batch rounding differs */
#define CHUNK_KL_TOL 1e-4  /* mean KL(P_ctx-chunk || P_16-chunk) over the scored tokens, nats */

/* Loads the model (skipping without it) and the first n tokens of the eval corpus. */
static kvc_model *load(int32_t **ids, int64_t n) {
    REQUIRE_MODEL(path);
    kvc_err err = {{0}};
    kvc_model *m = kvc_model_load(path, &err);
    cr_assert_not_null(m, "%s", err.msg);
    char *text;
    size_t len;
    char corpus[1024];
    snprintf(corpus, sizeof corpus, "%s/data/corpora/eval-debian-handbook.txt", KVC_SOURCE_DIR);
    cr_assert_eq(kvc_read_file(corpus, &text, &len, &err), 0, "%s", err.msg);
    if (len > 20000) len = 20000; /* plenty for the tokens asked for */
    *ids = malloc((len + 16) * sizeof(int32_t));
    int64_t got = kvc_tokenizer_encode(m->tok, text, len, 0, *ids, (int64_t)len + 16, &err);
    free(text);
    cr_assert_geq(got, n, "corpus gave %lld tokens, need %lld (%s)", (long long)got, (long long)n, err.msg);
    return m;
}

static kvc_cache *full_cache(const kvc_model *m, int max_tokens) {
    kvc_err err = {{0}};
    kvc_cache_shape s = kvc_model_cache_shape(m, max_tokens);
    kvc_cache *c = kvc_cache_full_new(&s, &err);
    cr_assert_not_null(c, "%s", err.msg);
    return c;
}

Test(eval, stream_full_cache_against_itself, .timeout = 300) {
    enum { CTX = 64, N = 2 * CTX + 40 }; /* two windows and a short third one */
    int32_t *ids;
    kvc_model *m = load(&ids, N);
    kvc_cache *c = full_cache(m, CTX), *ref = full_cache(m, CTX);
    kvc_err err = {{0}};
    kvc_measure_opts o = {.ctx = CTX, .chunk = CTX};
    kvc_quality q, q16;
    cr_assert_eq(kvc_eval_stream(m, c, ref, ids, N, &o, &q, &err), 0, "%s", err.msg);
    cr_expect_eq(q.n_scored, N - 3, "scored %lld", (long long)q.n_scored);
    cr_expect_eq(q.n_units, 3);
    cr_expect_eq(q.n_tokens, N);
    cr_expect(q.kl_mean == 0.0 && q.kl_p99 == 0.0, "KL of a cache against itself: mean %g p99 %g", q.kl_mean, q.kl_p99);
    cr_expect(q.top1 == 1.0, "top-1 %g", q.top1);
    cr_expect(q.ppl == q.ppl_full && q.rise_pct == 0.0, "ppl %.12g vs %.12g", q.ppl, q.ppl_full);
    cr_expect(q.ppl > 2.0 && q.ppl < 100.0, "implausible ppl %g", q.ppl);

    kvc_ppl_opts po = {CTX, CTX, 0};
    kvc_ppl_result pr;
    cr_assert_eq(kvc_eval_perplexity(m, c, ids, N, &po, &pr, &err), 0, "%s", err.msg);
    cr_expect_eq(pr.n_scored, q.n_scored);
    cr_expect(fabs(q.ppl / pr.ppl - 1.0) < PPL_REL_TOL, "stream ppl %.12g vs kvc_eval_perplexity %.12g", q.ppl, pr.ppl);

    /* memory of the f32 full cache: K and V rows plus one int32 position per layer and token */
    const double f32_bpt = 30.0 * (2 * 3 * 64 * 4 + 4);
    cr_expect(q.bytes_per_token == f32_bpt, "bytes/token %g, expected %g", q.bytes_per_token, f32_bpt);
    cr_expect(q.f16_bytes_per_token == 23040.0, "f16 bytes/token %g", q.f16_bytes_per_token);
    cr_expect(fabs(q.compression - 23040.0 / f32_bpt) < 1e-12, "compression %g", q.compression);
    cr_expect(q.kept_frac == 1.0 && q.removed_frac == 0.0 && q.kept_scored == 1.0, "kept %g removed %g scored %g",
              q.kept_frac, q.removed_frac, q.kept_scored);

    /* chunks of 16: both caches see the same chunks, so KL stays exactly 0; against the
     * unchunked run only float rounding of the batched products differs */
    o.chunk = 16;
    cr_assert_eq(kvc_eval_stream(m, c, ref, ids, N, &o, &q16, &err), 0, "%s", err.msg);
    cr_expect_eq(q16.n_scored, q.n_scored);
    cr_expect(q16.kl_mean == 0.0 && q16.top1 == 1.0, "chunked KL %g top-1 %g", q16.kl_mean, q16.top1);
    cr_expect(fabs(q16.ppl / q.ppl - 1.0) < CHUNK_REL_TOL, "chunk 16 ppl %.9g vs chunk %d ppl %.9g", q16.ppl, CTX, q.ppl);
    cr_expect(fabs(q16.nll - q.nll) < CHUNK_KL_TOL, "mean NLL %.9g vs %.9g", q16.nll, q.nll);
    kvc_cache_free(c);
    kvc_cache_free(ref);
    free(ids);
    kvc_model_free(m);
}

Test(eval, context_compression_memory_and_scoring, .timeout = 300) {
    enum { NC = 64, MC = 16, S = 2 };
    int32_t *ids;
    kvc_model *m = load(&ids, S * (NC + MC) + 5);
    kvc_cache *ref = full_cache(m, NC + MC), *c = full_cache(m, NC + MC);
    kvc_err err = {{0}};
    kvc_measure_opts o = {.chunk = 32, .context_len = NC, .continuation = MC, .samples = S};
    kvc_quality q;
    cr_assert_eq(kvc_eval_context(m, c, ref, ids, S * (NC + MC) + 5, &o, &q, &err), 0, "%s", err.msg);
    cr_expect_eq(q.n_units, S);
    cr_expect_eq(q.n_scored, S * (MC - 1));
    cr_expect_eq(q.n_tokens, S * (NC + MC));
    cr_expect(q.kl_mean == 0.0 && q.top1 == 1.0 && q.nll == q.nll_full, "KL %g top-1 %g", q.kl_mean, q.top1);
    /* memory right after compression: NC tokens held, f32 rows + positions */
    cr_expect(q.bytes_per_token == 30.0 * (2 * 3 * 64 * 4 + 4), "bytes/token %g", q.bytes_per_token);
    cr_expect(q.kept_frac == 1.0 && q.removed_frac == 0.0);
    cr_expect(isnan(q.kept_scored));

    /* a compressed cache: streaming keeps half of the context; an evicting cache stores each
     * kept token's f32 K and V rows and its int32 position per (layer, kv head) */
    kvc_cache_shape s = kvc_model_cache_shape(m, NC + MC);
    kvc_cache *h = kvc_kvcache_new(&s, "f32", "streaming:budget=0.5", m->fingerprint, &err);
    cr_assert_not_null(h, "%s", err.msg);
    kvc_quality qh;
    cr_assert_eq(kvc_eval_context(m, h, ref, ids, S * (NC + MC) + 5, &o, &qh, &err), 0, "%s", err.msg);
    cr_expect(qh.kept_frac == 0.5 && qh.removed_frac == 0.5, "kept %g removed %g", qh.kept_frac, qh.removed_frac);
    kvcache_stats st;
    kvc_kvcache_get_stats(h, &st);
    cr_expect_eq(st.appended, NC + MC);
    cr_expect(qh.kl_mean > 0.0 && qh.kl_p99 >= qh.kl_mean && qh.top1 < 1.0 + 1e-12, "KL %g p99 %g", qh.kl_mean,
              qh.kl_p99);
    cr_expect(fabs(qh.nll_full - q.nll_full) < 1e-12, "the reference must not depend on the measured cache");
    cr_expect(qh.bytes_per_token == 0.5 * 30 * 3 * (2 * 64 * 4 + 4), "half of the f32 rows and positions: %g bytes/token",
              qh.bytes_per_token);
    /* bootstrap intervals over the samples: around the point estimate; exactly 0 for the
     * full cache against itself */
    cr_expect(qh.rise_lo <= qh.rise_pct && qh.rise_pct <= qh.rise_hi, "rise %g in [%g, %g]", qh.rise_pct, qh.rise_lo,
              qh.rise_hi);
    cr_expect(qh.kl_lo <= qh.kl_mean && qh.kl_mean <= qh.kl_hi && qh.kl_lo > 0, "KL %g in [%g, %g]", qh.kl_mean, qh.kl_lo,
              qh.kl_hi);
    cr_expect(q.rise_lo == 0 && q.rise_hi == 0 && q.kl_lo == 0 && q.kl_hi == 0);
    o.samples = 1;
    cr_assert_eq(kvc_eval_context(m, h, ref, ids, S * (NC + MC) + 5, &o, &qh, &err), 0, "%s", err.msg);
    cr_expect(isnan(qh.rise_lo) && isnan(qh.kl_hi), "one sample has no interval");
    kvc_cache_free(h);
    kvc_cache_free(c);
    kvc_cache_free(ref);
    free(ids);
    kvc_model_free(m);
}

Test(eval, passkey_prompt_and_check, .timeout = 120) {
    REQUIRE_MODEL(path);
    kvc_err err = {{0}};
    kvc_model *m = kvc_model_load(path, &err);
    cr_assert_not_null(m, "%s", err.msg);
    const double depths[] = {0.0, 0.3, 0.5, 1.0};
    for (int i = 0; i < 4; i++) {
        kvc_passkey_prompt p;
        cr_assert_eq(kvc_passkey_build(m->tok, 600, depths[i], "53817", &p, &err), 0, "%s", err.msg);
        cr_expect(p.n <= 600 && p.n > 600 - 25, "length %d", p.n);
        size_t len;
        char *key = kvc_tokenizer_decode(m->tok, p.ids + p.key_at, p.key_len, &len);
        cr_expect_str_eq(key, "53817");
        free(key);
        /* the needle starts at the sentence boundary nearest to depth * filler (one filler
         * sentence is at most 20 tokens) */
        double at = (double)(p.needle_at - p.filler_start) / p.filler_len;
        cr_expect(fabs(at - depths[i]) <= 20.0 / p.filler_len, "depth %g: needle at %g of the filler", depths[i], at);
        if (depths[i] == 0.0) cr_expect_eq(p.needle_at, p.filler_start);
        if (depths[i] == 1.0) cr_expect_eq(p.needle_at, p.filler_start + p.filler_len);
        char *tail = kvc_tokenizer_decode(m->tok, p.ids + p.n_context, p.n - p.n_context, &len);
        cr_expect(len > 15 && !strcmp(tail + len - 15, "The pass key is"), "question '%s'", tail);
        free(tail);
        kvc_passkey_prompt_free(&p);
    }
    kvc_passkey_prompt p;
    cr_expect_eq(kvc_passkey_build(m->tok, 40, 0.5, "53817", &p, &err), -1);
    cr_expect(strstr(err.msg, "cannot hold") != NULL, "%s", err.msg);
    cr_expect_eq(kvc_passkey_check(" 53817. Remember", "53817"), 1);
    cr_expect_eq(kvc_passkey_check("53817", "53817"), 1);
    cr_expect_eq(kvc_passkey_check(" 5381 7", "53817"), 0);
    cr_expect_eq(kvc_passkey_check(" 53818.", "53817"), 0);
    cr_expect_eq(kvc_passkey_check("", "53817"), 0);
    kvc_model_free(m);
}

Test(eval, passkey_full_cache_in_lockstep, .timeout = 300) {
    REQUIRE_MODEL(path);
    kvc_err err = {{0}};
    kvc_model *m = kvc_model_load(path, &err);
    cr_assert_not_null(m, "%s", err.msg);
    kvc_cache *c = full_cache(m, 300), *ref = full_cache(m, 300);
    const int lengths[] = {256, 99999}; /* the second is beyond the model's context: skipped */
    const double depths[] = {0.5};
    kvc_passkey_opts o = {lengths, 2, depths, 1, 2, 7, 64, 8, 0};
    kvc_passkey_result r;
    cr_assert_eq(kvc_eval_passkey(m, c, ref, &o, &r, &err), 0, "%s", err.msg);
    cr_expect_eq(r.n_cells, 2);
    cr_expect(r.cells[1].skipped && r.cells[1].trials == 0);
    cr_expect_eq(r.trials, 2);
    cr_expect_eq(r.correct, r.correct_full, "the same cache twice: %d vs %d correct", r.correct, r.correct_full);
    /* SmolLM2-135M recalls a key from a 256-token prompt (measured: 2 of 2) */
    cr_expect_eq(r.correct, 2, "full cache found %d of 2 keys; last answer '%s'", r.correct, r.cells[0].last_answer);
    cr_expect(r.kept_frac == 1.0 && r.bytes_per_token == 30.0 * (2 * 3 * 64 * 4 + 4));
    kvc_passkey_result_free(&r);
    kvc_cache_free(c);
    kvc_cache_free(ref);
    kvc_model_free(m);
}

/* Runs `kvcodec eval ARGS` from the source tree; returns the exit status, stderr in err. */
static int run_eval(const char *args, char *err, size_t cap) {
    char cmd[2048], ep[64];
    snprintf(ep, sizeof ep, "/tmp/kvc_eval_err.%d", getpid());
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' eval %s >/dev/null 2>%s", KVC_SOURCE_DIR, KVC_BINARY, args, ep);
    int st = system(cmd);
    FILE *f = fopen(ep, "rb");
    size_t n = f ? fread(err, 1, cap - 1, f) : 0;
    err[n] = '\0';
    if (f) fclose(f);
    unlink(ep);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

Test(eval, cli_bad_input, .timeout = 300) {
    REQUIRE_MODEL(path);
    static const struct {
        const char *args, *needle;
        int status;
    } cases[] = {
        {"--repr nope", "unknown representation 'nope'", 1},
        {"--keep bogus", "unknown retention policy 'bogus'", 1},
        {"--keep streaming:budget=0.02 --tokens 600", "smaller than sinks 4 + window 10", 1},
        {"--keep streaming:budget=0.05 --measures context --context-len 100 --tokens 600", "context of 100 tokens", 1},
        {"--ctx 9000 --tokens 600", "exceeds the model's context of 8192", 1},
        {"--measures passkey --passkey-lengths 1024,16384", "16384 exceeds the model's context", 1},
        {"--measures stream,foo", "unknown measure 'foo'", 2},
        {"--measures passkey --passkey-depths 0,1.5", "invalid --passkey-depths", 2},
        {"--chunk 0", "--chunk must be at least 1", 2},
        /* shared-prefill runs (several points, facts) */
        {"--keep 'h2o:budget=0.25;h2o:budget=0.02' --measures context --tokens 1200",
         "point 2 (h2o:budget=0.02), context of 512 tokens: budget 0.02 of 512 tokens = 10 is smaller than sinks 4 + window 10", 1},
        {"--keep 'streaming:budget=0.25,retrieve=5000' --measures facts", "retrieve=5000", 1},
        {"--keep 'streaming:budget=0.25,retrieve=0,rerank=4' --measures facts", "need retrieve=R", 1},
        {"--keep 'streaming:budget=0.25,retrieve=8,spill=/nonexistent/kvc' --measures facts",
         "cannot create a spill file in '/nonexistent/kvc'", 1},
        {"--keep 'full;h2o:budget=0.5' --measures stream", "drop it from --measures", 2},
        {"--keep 'full;;h2o:budget=0.5' --measures context", "an empty item", 2},
        {"--repr 'f16;int8' --keep 'full;h2o:budget=0.5;l2:budget=0.5' --measures context", "--repr has 2 items", 2},
        {"--measures facts --facts 9", "--facts must be in 1..8", 2},
        {"--keep h2o:budget=0.5 --measures context --csv /tmp/x.csv", "--csv and --per-sample need a shared prefill", 2},
        {"--prefill both", "--prefill must be cache or shared", 2},
        {"--keep 'full;h2o:budget=0.5' --measures context --csv /nonexistent/dir/x.csv", "cannot write '/nonexistent/dir/x.csv", 1},
    };
    char err[4096];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int st = run_eval(cases[i].args, err, sizeof err);
        cr_expect_eq(st, cases[i].status, "eval %s: exit %d (stderr: %s)", cases[i].args, st, err);
        cr_expect(strstr(err, cases[i].needle) != NULL, "eval %s: stderr lacks '%s': %s", cases[i].args,
                  cases[i].needle, err);
        cr_expect(strncmp(err, "kvcodec eval:", 13) == 0, "eval %s: %s", cases[i].args, err);
    }
}

/* The shared prefill (kvc_eval_multi): every cache hears the reference's prefill, so with f32
 * rows its figures equal kvc_eval_context's run through the cache itself (the prefill is exact
 * either way and the compression sees the same weights: the same logits, sums within 1e-13);
 * the full cache gives KL 0; intervals bracket the point estimate. */
Test(eval, shared_prefill_matches_the_context_protocol, .timeout = 300) {
    enum { N = 96, M = 16, S = 3 };
    int32_t *ids;
    kvc_model *m = load(&ids, S * (N + M));
    kvc_err err = {{0}};
    kvc_cache_shape sh = kvc_model_cache_shape(m, N + M);
    const char *keeps[3] = {"full", "h2o:budget=0.25,norm=mean", "lsh:budget=0.25,norm=mean,est=softmax"};
    kvc_cache *c[3], *ref = full_cache(m, N + M);
    for (int i = 0; i < 3; i++) cr_assert_not_null(c[i] = kvc_kvcache_new(&sh, "f32", keeps[i], NULL, &err), "%s", err.msg);
    kvc_multi_opts o = {.chunk = 32, .context_len = N, .continuation = M, .samples = S};
    kvc_multi_point pts[3];
    cr_assert_eq(kvc_eval_multi(m, c, 3, ref, ids, S * (N + M), KVC_MULTI_CONTEXT, &o, pts, &err), 0, "%s", err.msg);
    cr_expect(pts[0].context.kl_mean == 0.0 && pts[0].context.rise_pct == 0.0, "full: KL %g", pts[0].context.kl_mean);
    for (int i = 1; i < 3; i++) {
        kvc_measure_opts mo = {.chunk = 32, .context_len = N, .continuation = M, .samples = S};
        kvc_quality q;
        kvc_cache *alone = kvc_kvcache_new(&sh, "f32", keeps[i], NULL, &err), *r2 = full_cache(m, N + M);
        cr_assert_eq(kvc_eval_context(m, alone, r2, ids, S * (N + M), &mo, &q, &err), 0, "%s", err.msg);
        const kvc_quality *p = &pts[i].context;
        cr_expect_eq(p->n_scored, q.n_scored);
        /* the same logits; the sums associate per sample here, per row there: the last bits */
        cr_expect(fabs(p->nll - q.nll) <= 1e-13 * q.nll && fabs(p->nll_full - q.nll_full) <= 1e-13 * q.nll_full,
                  "%s: nll %.17g vs %.17g", keeps[i], p->nll, q.nll);
        cr_expect(fabs(p->kl_mean - q.kl_mean) <= 1e-12 * q.kl_mean, "%s: KL %.17g vs %.17g", keeps[i], p->kl_mean, q.kl_mean);
        cr_expect_eq(p->top1, q.top1);
        cr_expect_eq(p->bytes_per_token, q.bytes_per_token, "%s: bytes/token", keeps[i]);
        cr_expect(p->kl_mean > 0 && pts[i].kl_ci[0] <= p->kl_mean && p->kl_mean <= pts[i].kl_ci[1],
                  "%s: KL %g outside [%g, %g]", keeps[i], p->kl_mean, pts[i].kl_ci[0], pts[i].kl_ci[1]);
        double sum = 0;
        for (int s = 0; s < S; s++) sum += pts[i].s_kl[s];
        cr_expect(fabs(sum / p->n_scored - p->kl_mean) < 1e-12, "per-sample sums add up");
        kvc_cache_free(alone), kvc_cache_free(r2);
    }
    for (int i = 0; i < 3; i++) kvc_multi_point_free(&pts[i]), kvc_cache_free(c[i]);
    kvc_cache_free(ref);
    free(ids);
    kvc_model_free(m);
}

/* Bootstrap: samples that all agree give an interval of one point; spread ones bracket it. */
Test(eval, bootstrap_intervals_over_samples) {
    double nll[4] = {2, 2, 2, 2}, nf[4] = {1, 1, 1, 1}, kl[4] = {0.5, 0.5, 0.5, 0.5}, r[2], k[2];
    int sc[4] = {10, 10, 10, 10};
    kvc_multi_bootstrap(nll, nf, kl, sc, 4, r, k);
    const double rise = 100.0 * (exp(0.1) - 1.0);
    cr_expect(fabs(r[0] - rise) < 1e-9 && fabs(r[1] - rise) < 1e-9, "[%g, %g] vs %g", r[0], r[1], rise);
    cr_expect(fabs(k[0] - 0.05) < 1e-12 && fabs(k[1] - 0.05) < 1e-12);
    double kl2[4] = {0.1, 0.9, 0.3, 0.7};
    kvc_multi_bootstrap(nll, nf, kl2, sc, 4, r, k);
    cr_expect(k[0] < 0.05 && k[1] > 0.05 && k[0] >= 0.01 && k[1] <= 0.09, "[%g, %g]", k[0], k[1]);
    kvc_multi_bootstrap(nll, nf, kl2, sc, 1, r, k);
    cr_expect(isnan(r[0]) && isnan(k[1]), "one sample: no interval");
}

/* Several facts: every door appears once with its own code, at spread-out places, the asked
 * door's code is the answer and its fact is where needle_at says; too short a length or too
 * many facts are refused. */
Test(eval, facts_prompt_holds_every_fact_once, .timeout = 120) {
    REQUIRE_MODEL(path);
    kvc_err err = {{0}};
    kvc_model *m = kvc_model_load(path, &err);
    cr_assert_not_null(m, "%s", err.msg);
    uint64_t rng = 3;
    for (int trial = 0; trial < 4; trial++) {
        kvc_passkey_prompt p;
        char ans[8];
        cr_assert_eq(kvc_facts_build(m->tok, 600, 5, &rng, &p, ans, &err), 0, "%s", err.msg);
        cr_expect(p.n <= 600 && p.n > 500, "%d tokens", p.n);
        size_t len;
        char *text = kvc_tokenizer_decode(m->tok, p.ids, p.n_context, &len);
        char *q = kvc_tokenizer_decode(m->tok, p.ids + p.n_context, p.n - p.n_context, &len);
        int facts = 0;
        for (const char *at = text; (at = strstr(at, " door is ")); at++) facts++;
        cr_expect_eq(facts, 5, "%s", text);
        char door[64];
        cr_assert_eq(sscanf(q, "\n\nWhat is the code of the %63s", door), 1, "question: %s", q);
        char fact[128];
        snprintf(fact, sizeof fact, "The code of the %s door is %s.", door, ans);
        cr_expect(strstr(text, fact) != NULL, "the asked fact '%s' is missing", fact);
        char *at_needle = kvc_tokenizer_decode(m->tok, p.ids + p.needle_at, 8, &len);
        cr_expect(strstr(at_needle, door) != NULL, "needle_at points at '%s', not the %s door", at_needle, door);
        free(text), free(q), free(at_needle);
        kvc_passkey_prompt_free(&p);
    }
    kvc_passkey_prompt p;
    char ans[8];
    cr_expect_eq(kvc_facts_build(m->tok, 60, 5, &rng, &p, ans, &err), -1);
    cr_expect(strstr(err.msg, "cannot hold the intro, 5 facts and the question"), "%s", err.msg);
    cr_expect_eq(kvc_facts_build(m->tok, 600, 9, &rng, &p, ans, &err), -1);
    cr_expect(strstr(err.msg, "9 facts per prompt (1..8)"), "%s", err.msg);
    kvc_model_free(m);
}

/* The shared run's CSV: one row per point with its figures, intervals, side-store bytes and
 * per-length accuracy; per-sample sums in the second file; written whole or not at all. */
Test(eval, multi_csv_rows_and_samples) {
    kvc_multi_point p[2];
    memset(p, 0, sizeof p);
    double nll[2] = {3.0, 3.5}, nf[2] = {2.9, 3.4}, kl[2] = {0.4, 0.6};
    int sc[2] = {63, 63}, ag[2] = {60, 58};
    for (int i = 0; i < 2; i++) {
        p[i].n_samples = 2, p[i].s_nll = nll, p[i].s_nll_full = nf, p[i].s_kl = kl, p[i].s_scored = sc, p[i].s_agree = ag;
        p[i].context = (kvc_quality){.n_units = 2, .n_scored = 126, .ppl = 25.0, .ppl_full = 24.0, .rise_pct = 4.1667,
                                     .kl_mean = 0.0079, .kl_p99 = 0.1, .top1 = 0.94, .kept_frac = 0.25,
                                     .bytes_per_token = 5850, .compression = 3.94};
        p[i].rise_ci[0] = 1, p[i].rise_ci[1] = 7, p[i].kl_ci[0] = 0.006, p[i].kl_ci[1] = 0.01;
        p[i].side_ram_bpt = i ? 5969 : 0, p[i].retrieved_per_query = i ? 16 : 0;
    }
    kvc_passkey_cell cells[2] = {{.length = 1024, .trials = 5, .correct = 4, .correct_full = 5},
                                 {.length = 2048, .trials = 5, .correct = 1, .correct_full = 3}};
    p[1].passkey = (kvc_passkey_result){.cells = cells, .n_cells = 2, .trials = 10, .correct = 5, .correct_full = 8};
    const char *repr[2] = {"f16", "f16"}, *keep[2] = {"streaming:budget=0.25", "streaming:budget=0.25,retrieve=16"};
    char desc[2][64] = {"a", "b"}, path[64], spath[64];
    snprintf(path, sizeof path, "/tmp/kvc_multi.%d.csv", getpid());
    snprintf(spath, sizeof spath, "/tmp/kvc_multi_s.%d.csv", getpid());
    kvc_multi_opts o = {.chunk = 32, .context_len = 512, .continuation = 64, .samples = 2};
    kvc_err err = {{0}};
    cr_assert_eq(kvc_multi_write_csv(path, spath, "m", "t", &o, KVC_MULTI_CONTEXT | KVC_MULTI_PASSKEY, repr, keep,
                                     &desc[0][0], 64, p, 2, &err), 0, "%s", err.msg);
    char *text;
    size_t len;
    cr_assert_eq(kvc_read_file(path, &text, &len, &err), 0);
    int lines = 0;
    for (size_t i = 0; i < len; i++) lines += text[i] == '\n';
    cr_expect_eq(lines, 3, "%s", text);
    cr_expect(strstr(text, "\"streaming:budget=0.25,retrieve=16\",\"b\",32,512,64,2,126,25,24,4.1667,1,7,0.0079,0.006,0.01"),
              "%s", text);
    cr_expect(strstr(text, ",5969,0,16,5,10,8,1024:4/5;2048:1/5,1024:5/5;2048:3/5,"), "%s", text);
    free(text);
    cr_assert_eq(kvc_read_file(spath, &text, &len, &err), 0);
    cr_expect(strstr(text, "2,\"f16\",\"streaming:budget=0.25,retrieve=16\",1,63,3.5,3.4,0.6,58"), "%s", text);
    free(text);
    unlink(path), unlink(spath);
    cr_expect_eq(kvc_multi_write_csv("/nonexistent/dir/x.csv", NULL, "m", "t", &o, KVC_MULTI_CONTEXT, repr, keep,
                                     &desc[0][0], 64, p, 2, &err), -1);
    cr_expect(strstr(err.msg, "cannot write '/nonexistent/dir/x.csv.tmp"), "%s", err.msg);
}
