/* test_kvcache.c - the compressed cache (codec/kvcache.c) as a whole: exact reproduction of
 * the full cache through the codec path, true positions after eviction, exact budgets for
 * every policy, bytes() against hand counts, reuse chains, and bad specs. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/kvcache.h"
#include "fixture.h"
#include "kvc/eval.h"
#include "kvc/model.h"

/* A small model-like shape: 3 layers, 4 query heads over 2 kv heads, head_dim 8. */
static kvc_cache_shape small_shape(int max_tokens) {
    kvc_cache_shape s = {3, 4, 2, 8, 10000.0f, max_tokens};
    return s;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float frand(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (float)((rng_state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

/* Feeds n_steps steps of `chunk` random tokens through both caches (every layer: append then
 * attend) and returns the largest |difference| of the attention outputs. */
static float run_pair(kvc_cache *a, kvc_cache *b, int n_steps, int chunk, int32_t *pos0) {
    const kvc_cache_shape s = a->shape;
    const int K = s.n_head_kv, H = s.n_head, D = s.head_dim;
    float *k = malloc(sizeof(float) * chunk * K * D), *v = malloc(sizeof(float) * chunk * K * D);
    float *q = malloc(sizeof(float) * chunk * H * D), *oa = malloc(sizeof(float) * chunk * H * D),
          *ob = malloc(sizeof(float) * chunk * H * D);
    int32_t *pos = malloc(sizeof(int32_t) * chunk);
    float worst = 0.0f;
    kvc_err err;
    for (int st = 0; st < n_steps; st++) {
        for (int t = 0; t < chunk; t++) pos[t] = (*pos0)++;
        for (int l = 0; l < s.n_layer; l++) {
            for (int i = 0; i < chunk * K * D; i++) k[i] = frand(), v[i] = frand();
            for (int i = 0; i < chunk * H * D; i++) q[i] = 2.0f * frand();
            cr_assert_eq(kvc_cache_append(a, l, k, v, pos, chunk, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_append(b, l, k, v, pos, chunk, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_attend(a, l, q, pos, chunk, oa, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_attend(b, l, q, pos, chunk, ob, &err), 0, "%s", err.msg);
            for (int i = 0; i < chunk * H * D; i++) {
                float d = fabsf(oa[i] - ob[i]);
                worst = d > worst ? d : worst;
            }
        }
        cr_assert_eq(kvc_cache_end_step(a, &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_cache_end_step(b, &err), 0, "%s", err.msg);
    }
    free(k), free(v), free(q), free(oa), free(ob), free(pos);
    return worst;
}

/* The default model, or a skipped test when setup has not fetched it. */
static kvc_model *load_model_or_skip(void) {
    REQUIRE_MODEL(path);
    kvc_err err;
    kvc_model *m = kvc_model_load(path, &err);
    cr_assert_not_null(m, "%s", err.msg);
    return m;
}

Test(kvcache, f32_full_reproduces_full_cache_exactly) {
    kvc_cache_shape s = small_shape(256);
    kvc_err err;
    kvc_cache *full = kvc_cache_full_new(&s, &err);
    kvc_cache *kc = kvc_kvcache_new(&s, "f32", "full", NULL, &err);
    cr_assert_not_null(kc, "%s", err.msg);
    int32_t p = 0;
    cr_expect_eq(run_pair(full, kc, 10, 7, &p), 0.0f, "f32 through the codec path must be bit-exact");
    /* single-token steps (exact decoding) too */
    cr_expect_eq(run_pair(full, kc, 20, 1, &p), 0.0f);
    cr_expect_eq(kvc_cache_n_tokens(kc, 2), 90);
    kvc_cache_free(full);
    kvc_cache_free(kc);
}

/* The backend seam: the same caches with their hot paths on CUDA agree with the CPU within
 * the attention twins' budget (1e-5 of the value scale; values here are in [-1, 1]): the full
 * cache, and a compressed one that evicts (H2O needs the weights back from the device). */
Test(kvcache, cuda_backend_agrees_with_cpu) {
    kvc_err err = {{0}};
    const kvc_backend *be = kvc_backend_find("cuda", &err);
    if (!be) cr_skip_test("CUDA backend skipped: %s", err.msg);
    kvc_cache_shape s = small_shape(256);
    const char *keeps[2] = {"full", "h2o:budget=40,sinks=2,window=4"};
    for (int i = 0; i < 2; i++) {
        kvc_cache *a = i ? kvc_kvcache_new(&s, "f32", keeps[i], NULL, &err) : kvc_cache_full_new(&s, &err);
        kvc_cache *b = i ? kvc_kvcache_new(&s, "f32", keeps[i], NULL, &err) : kvc_cache_full_new(&s, &err);
        cr_assert(a && b, "%s", err.msg);
        kvc_cache_set_backend(b, be);
        cr_assert_str_eq(kvc_cache_backend(b)->name, "cuda");
        if (i) cr_assert_eq(kvc_cache_set_budget(a, 1, &err) | kvc_cache_set_budget(b, 1, &err), 0, "%s", err.msg);
        int32_t p = 0;
        float d = run_pair(a, b, 10, 7, &p);
        cr_expect(d < 1e-5f, "%s: max |cpu - cuda| %g", keeps[i], d);
        kvc_cache_free(a), kvc_cache_free(b);
    }
}

Test(kvcache, f16_full_close_to_full_cache) {
    kvc_cache_shape s = small_shape(256);
    kvc_err err;
    kvc_cache *full = kvc_cache_full_new(&s, &err);
    kvc_cache *kc = kvc_kvcache_new(&s, "f16", "full", NULL, &err);
    cr_assert_not_null(kc, "%s", err.msg);
    int32_t p = 0;
    float d = run_pair(full, kc, 8, 16, &p);
    cr_expect(d > 0.0f && d < 2e-3f, "f16 rows: max |diff| %g, budget 2e-3", d);
    /* bytes: f16 K and V, no positions (nothing is evicted, so none are stored) */
    size_t want = (size_t)128 * s.n_layer * s.n_head_kv * s.head_dim * 2 * 2;
    cr_expect_eq(kvc_cache_bytes(kc), want, "bytes %zu, want %zu", kvc_cache_bytes(kc), want);
    kvc_cache_free(full);
    kvc_cache_free(kc);
}

/* After eviction, attention over what the cache kept must equal a full cache that holds
 * exactly the kept tokens at their true positions. The streaming policy makes the kept set
 * known: the sinks and the newest tokens. */
Test(kvcache, evicted_tokens_leave_gaps_and_keep_true_positions) {
    kvc_cache_shape s = small_shape(512);
    const int K = s.n_head_kv, H = s.n_head, D = s.head_dim, L = s.n_layer;
    kvc_err err;
    kvc_cache *kc = kvc_kvcache_new(&s, "f32", "streaming:budget=24,sinks=4,window=0", NULL, &err);
    cr_assert_not_null(kc, "%s", err.msg);
    cr_assert_eq(kvc_cache_set_budget(kc, 100, &err), 0, "%s", err.msg);
    const int steps = 10, chunk = 8, n = steps * chunk;
    float *k = malloc(sizeof(float) * n * L * K * D), *v = malloc(sizeof(float) * n * L * K * D);
    for (int i = 0; i < n * L * K * D; i++) k[i] = frand(), v[i] = frand();
    int32_t pos[64];
    float q[8 * 4 * 8], oa[8 * 4 * 8], ob[8 * 4 * 8];
    for (int st = 0; st < steps; st++) {
        for (int t = 0; t < chunk; t++) pos[t] = st * chunk + t;
        for (int l = 0; l < L; l++) {
            const size_t at = ((size_t)l * n + (size_t)st * chunk) * K * D;
            cr_assert_eq(kvc_cache_append(kc, l, k + at, v + at, pos, chunk, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_attend(kc, l, q, pos, chunk, oa, &err), 0);
        }
        cr_assert_eq(kvc_cache_end_step(kc, &err), 0, "%s", err.msg);
        for (int l = 0; l < L; l++) cr_assert_eq(kvc_cache_n_tokens(kc, l), (st + 1) * chunk < 24 ? (st + 1) * chunk : 24);
    }
    /* the kept set: positions 0..3 and n-20..n-1; a query at a new position */
    kvc_cache *ref = kvc_cache_full_new(&s, &err);
    for (int l = 0; l < L; l++) {
        for (int t = 0; t < n; t++) {
            if (t >= 4 && t < n - 20) continue;
            int32_t p = t;
            const size_t at = ((size_t)l * n + (size_t)t) * K * D;
            cr_assert_eq(kvc_cache_append(ref, l, k + at, v + at, &p, 1, &err), 0);
        }
    }
    int32_t qp = n + 5;
    for (int i = 0; i < H * D; i++) q[i] = 3.0f * frand();
    for (int l = 0; l < L; l++) {
        cr_assert_eq(kvc_cache_attend(kc, l, q, &qp, 1, oa, &err), 0);
        cr_assert_eq(kvc_cache_attend(ref, l, q, &qp, 1, ob, &err), 0);
        cr_expect_arr_eq(oa, ob, sizeof(float) * H * D, "layer %d: attention over kept tokens differs", l);
    }
    kvcache_stats st;
    kvc_kvcache_get_stats(kc, &st);
    cr_expect_eq(st.appended, n);
    cr_expect_eq(st.held, 24 * L * K);
    cr_expect_eq(st.evicted, (int64_t)(n - 24) * L * K);
    /* f32 rows + positions */
    cr_expect_eq(st.bytes, (size_t)24 * L * K * (2 * D * 4 + 4));
    free(k), free(v);
    kvc_cache_free(kc);
    kvc_cache_free(ref);
}

/* Every policy in the table, through the real cache: the budget holds exactly after every
 * step and the sinks and the window are never evicted. */
Test(kvcache, every_policy_holds_its_budget) {
    kvc_cache_shape s = small_shape(1024);
    const int K = s.n_head_kv, H = s.n_head, D = s.head_dim, L = s.n_layer;
    for (int p = 0; KVC_KEEPS[p]; p++) {
        const char *nm = KVC_KEEPS[p]->name;
        char spec[128];
        int evicts = strcmp(nm, "full") != 0;
        snprintf(spec, sizeof spec, evicts ? "%s:budget=0.25,sinks=3,window=5" : "%s", nm);
        kvc_err err;
        kvc_cache *kc = kvc_kvcache_new(&s, "f16", spec, NULL, &err);
        cr_assert_not_null(kc, "%s: %s", spec, err.msg);
        cr_assert_eq(kvc_cache_set_budget(kc, 128, &err), 0, "%s", err.msg);
        const int chunk = 5;
        float k[5 * 2 * 8], v[5 * 2 * 8], q[5 * 4 * 8], o[5 * 4 * 8];
        int32_t pos[5];
        int seen = 0;
        for (int st = 0; st < 40; st++) {
            for (int t = 0; t < chunk; t++) pos[t] = seen + t;
            for (int l = 0; l < L; l++) {
                for (int i = 0; i < chunk * K * D; i++) k[i] = frand(), v[i] = frand();
                for (int i = 0; i < chunk * H * D; i++) q[i] = frand();
                cr_assert_eq(kvc_cache_append(kc, l, k, v, pos, chunk, &err), 0, "%s", err.msg);
                cr_assert_eq(kvc_cache_attend(kc, l, q, pos, chunk, o, &err), 0, "%s", err.msg);
                for (int i = 0; i < chunk * H * D; i++) cr_assert(isfinite(o[i]));
            }
            seen += chunk;
            cr_assert_eq(kvc_cache_end_step(kc, &err), 0, "%s", err.msg);
            int64_t want = evicts && seen > 32 ? 32 : seen;
            kvcache_stats stt;
            kvc_kvcache_get_stats(kc, &stt);
            cr_assert_eq(stt.held, want * L * K, "%s: step %d holds %lld, want %lld", spec, st,
                         (long long)stt.held, (long long)want * L * K);
        }
        kvc_cache_free(kc);
    }
}

Test(kvcache, hold_then_compress_once) {
    kvc_cache_shape s = small_shape(512);
    kvc_err err;
    kvc_cache *kc = kvc_kvcache_new(&s, "int8", "l2:budget=0.25,sinks=2,window=4", NULL, &err);
    cr_assert_not_null(kc, "%s", err.msg);
    kvc_cache *full = kvc_cache_full_new(&s, &err);
    cr_assert_eq(kvc_cache_set_budget(kc, -1, &err), 0);
    int32_t p = 0;
    run_pair(full, kc, 8, 16, &p); /* 128 tokens held, none evicted */
    cr_expect_eq(kvc_cache_n_tokens(kc, 0), 128);
    /* bytes by hand, per (layer, kv head): int8 values per token in one group of 8 (8 codes +
     * f16 scale + f16 min), keys per channel in 4 blocks of 32 tokens (8 codes a token, a
     * block of 8 f16 scales + 8 f16 minimums), a uint16 block index per key token (the policy
     * evicts, so blocks get holes), an int32 position and the policy's state per token */
    kvc_keep *kp = kvc_keep_new("l2:budget=0.25,sinks=2,window=4", &s, &err);
    cr_assert_not_null(kp, "%s", err.msg);
    size_t per_head = 128 * (12 + 8) + 4 * 32 + 128 * 2 + 128 * 4 + 128 * kp->state_bytes;
    kvc_keep_free(kp);
    cr_expect_eq(kvc_cache_bytes(kc), per_head * s.n_layer * s.n_head_kv, "bytes %zu, want %zu", kvc_cache_bytes(kc),
                 per_head * s.n_layer * s.n_head_kv);
    cr_assert_eq(kvc_cache_set_budget(kc, 128, &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_cache_end_step(kc, &err), 0);
    cr_expect_eq(kvc_cache_n_tokens(kc, 0), 32);
    cr_assert_eq(kvc_cache_set_budget(kc, -1, &err), 0);
    run_pair(full, kc, 1, 16, &p); /* frozen: grows again */
    cr_expect_eq(kvc_cache_n_tokens(kc, 0), 48);
    kvc_cache_free(kc);
    kvc_cache_free(full);
}

Test(kvcache, bad_specs_and_budgets) {
    kvc_cache_shape s = small_shape(64);
    kvc_err err;
    struct { const char *repr, *keep, *msg; } bad[] = {
        {"f99", "full", "unknown representation"},
        {"f16", "lru:budget=8", "unknown retention policy"},
        {"f16", "lsh", "needs a budget"},
        {"f16", "full:budget=8", "takes no budget"},
        {"f16", "h2o:budget=8,sinks=4,window=10", "smaller than sinks"},
        {"f16", "h2o:budget=8,color=red", "color"},
        {"f16", "streaming:budget=-3", "budget"},
        {"f16", "streaming:budget=150%", "percentage"},
        {"f16", "lsh:budget=16,bits=3", "bits"},
        {"f16", "lsh:budget=16,bits=65", "bits"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err.msg[0] = '\0';
        kvc_cache *c = kvc_kvcache_new(&s, bad[i].repr, bad[i].keep, NULL, &err);
        cr_expect_null(c, "%s / %s should fail", bad[i].repr, bad[i].keep);
        cr_expect(strstr(err.msg, bad[i].msg) != NULL, "%s / %s: message '%s' lacks '%s'", bad[i].repr, bad[i].keep,
                  err.msg, bad[i].msg);
        kvc_cache_free(c);
    }
    /* a fraction that resolves below sinks + window is caught when the reference is known */
    kvc_cache *c = kvc_kvcache_new(&s, "f16", "lsh:budget=0.125,sinks=4,window=10", NULL, &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_expect_eq(kvc_cache_set_budget(c, 64, &err), -1);
    cr_expect(strstr(err.msg, "smaller than sinks 4 + window 10") != NULL, "%s", err.msg);
    cr_expect_eq(kvc_cache_set_budget(c, 1024, &err), 0, "%s", err.msg);
    /* positions must grow */
    float k[2 * 8] = {0}, v[2 * 8] = {0};
    int32_t p5 = 5, p3 = 3;
    cr_expect_eq(kvc_cache_append(c, 0, k, v, &p5, 1, &err), 0);
    cr_expect_eq(kvc_cache_append(c, 0, k, v, &p3, 1, &err), -1);
    kvc_cache_free(c);
}

/* The default model: the codec path with exact rows reproduces the full cache's logits bit
 * for bit, and the committed codec with reuse runs and stays close. */
Test(kvcache, model_logits_identity_and_codec, .timeout = 300) {
    kvc_err err;
    kvc_model *m = load_model_or_skip();
    const char *text = "The Debian package manager keeps track of installed software, its versions and "
                       "the files each package owns, so that upgrades and removals stay consistent.";
    int32_t *ids = malloc(sizeof(int32_t) * 256);
    int64_t n = kvc_tokenizer_encode(m->tok, text, strlen(text), 0, ids, 256, &err);
    cr_assert(n > 16 && n <= 256, "%s", err.msg);
    const int V = m->hp.n_vocab;
    kvc_cache_shape s = kvc_model_cache_shape(m, 256);
    kvc_cache *full = kvc_cache_full_new(&s, &err);
    kvc_cache *kc = kvc_kvcache_new(&s, "f32", "full", m->fingerprint, &err);
    cr_assert_not_null(kc, "%s", err.msg);
    char ck[512];
    snprintf(ck, sizeof ck, "ae:%s/checkpoints/smollm2-135m-ae32.h5", KVC_SOURCE_DIR);
    kvc_cache *ae = kvc_kvcache_new(&s, ck, "full", m->fingerprint, &err);
    cr_assert_not_null(ae, "%s", err.msg);
    kvc_run *r = kvc_run_new(m, 8, &err);
    float *la = malloc(sizeof(float) * 8 * V), *lb = malloc(sizeof(float) * 8 * V), *lc = malloc(sizeof(float) * 8 * V);
    int32_t pos[8];
    int agree = 0, total = 0;
    for (int64_t i = 0; i < n; i += 8) {
        int nb = n - i < 8 ? (int)(n - i) : 8;
        for (int t = 0; t < nb; t++) pos[t] = (int32_t)(i + t);
        cr_assert_eq(kvc_model_forward(m, r, full, ids + i, pos, nb, la, 1, &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_model_forward(m, r, kc, ids + i, pos, nb, lb, 1, &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_model_forward(m, r, ae, ids + i, pos, nb, lc, 1, &err), 0, "%s", err.msg);
        cr_assert_arr_eq(la, lb, sizeof(float) * nb * V, "logits differ at chunk %lld", (long long)i);
        for (int t = 0; t < nb; t++) {
            int a = 0, b = 0;
            for (int j = 1; j < V; j++) {
                if (la[(size_t)t * V + j] > la[(size_t)t * V + a]) a = j;
                if (lc[(size_t)t * V + j] > lc[(size_t)t * V + b]) b = j;
            }
            agree += a == b;
            total++;
        }
    }
    /* the latent-32 codec keeps most greedy choices on this sentence (measured 24 of 29) */
    cr_expect(agree * 10 >= total * 7, "ae32 top-1 agreement %d/%d", agree, total);
    /* memory: reused heads store nothing, so the codec holds less than f16 latents of all heads */
    size_t all_latent = (size_t)n * s.n_layer * s.n_head_kv * 2 * 32 * 2;
    cr_expect(kvc_cache_bytes(ae) < all_latent, "ae32 bytes %zu, f16 latents everywhere %zu", kvc_cache_bytes(ae), all_latent);
    free(la), free(lb), free(lc), free(ids);
    kvc_run_free(r);
    kvc_cache_free(full), kvc_cache_free(kc), kvc_cache_free(ae);
    kvc_model_free(m);
}

/* A sweep replays the reference's recorded logits instead of rerunning it: the figures must be
 * the same as measuring in lockstep, and a different run must not replay a stale recording. */
Test(kvcache, reference_store_replays_identical_figures, .timeout = 300) {
    kvc_err err;
    kvc_model *m = load_model_or_skip();
    char *text = NULL;
    size_t len = 0;
    cr_assert_eq(kvc_read_file(KVC_SOURCE_DIR "/data/corpora/eval-debian-handbook.txt", &text, &len, &err), 0);
    if (len > 4000) len = 4000;
    int32_t *ids = malloc(sizeof(int32_t) * 4000);
    int64_t n = kvc_tokenizer_encode(m->tok, text, len, 0, ids, 4000, &err);
    cr_assert(n >= 3 * 80, "%s", err.msg);
    kvc_cache_shape s = kvc_model_cache_shape(m, 128);
    kvc_cache *ref = kvc_cache_full_new(&s, &err);
    kvc_cache *c = kvc_kvcache_new(&s, "int4", "h2o:budget=0.5", m->fingerprint, &err);
    cr_assert_not_null(c, "%s", err.msg);
    kvc_ref_store *st = kvc_ref_store_new((size_t)1 << 30);
    kvc_measure_opts lock = {0, 16, 64, 16, 3, 0, NULL}, rec = lock;
    rec.ref_store = st;
    kvc_quality a, b, d;
    cr_assert_eq(kvc_eval_context(m, c, ref, ids, n, &lock, &a, &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_ref_store_ready(st), 0);
    cr_assert_eq(kvc_eval_context(m, c, ref, ids, n, &rec, &b, &err), 0, "%s", err.msg); /* records */
    cr_assert_eq(kvc_ref_store_ready(st), 1);
    cr_assert_eq(kvc_eval_context(m, c, ref, ids, n, &rec, &d, &err), 0, "%s", err.msg); /* replays */
    const kvc_quality *q[2] = {&b, &d};
    for (int i = 0; i < 2; i++) {
        cr_expect_eq(q[i]->n_scored, a.n_scored);
        cr_expect_eq(q[i]->nll, a.nll, "run %d: nll %.17g vs %.17g", i, q[i]->nll, a.nll);
        cr_expect_eq(q[i]->nll_full, a.nll_full);
        cr_expect_eq(q[i]->kl_mean, a.kl_mean);
        cr_expect_eq(q[i]->kl_p99, a.kl_p99);
        cr_expect_eq(q[i]->top1, a.top1);
    }
    /* other settings: the store must not replay (a fresh recording, same figures as lockstep) */
    kvc_measure_opts other = rec, other_lock = lock;
    other.continuation = other_lock.continuation = 12;
    kvc_quality e, g;
    cr_assert_eq(kvc_eval_context(m, c, ref, ids, n, &other, &e, &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_eval_context(m, c, ref, ids, n, &other_lock, &g, &err), 0, "%s", err.msg);
    cr_expect_eq(e.nll_full, g.nll_full);
    cr_expect_eq(e.kl_mean, g.kl_mean);
    kvc_ref_store_free(st);
    kvc_cache_free(c), kvc_cache_free(ref);
    free(ids), free(text);
    kvc_model_free(m);
}

/* Heads the codec predicts from the layer below keep exactly that layer's tokens: with the
 * committed ae32 codec (25 reused key items) and an evicting policy, every step succeeds (the
 * cache refuses a reused head whose tokens are out of step with its source), every (layer,
 * head) holds the budget and attention stays finite. */
Test(kvcache, reused_heads_follow_the_layer_below_under_eviction) {
    kvc_cache_shape s = {30, 9, 3, 64, 100000.0f, 512};
    kvc_err err;
    char ck[512];
    snprintf(ck, sizeof ck, "ae:%s/checkpoints/smollm2-135m-ae32.h5,int8", KVC_SOURCE_DIR);
    kvc_cache *c = kvc_kvcache_new(&s, ck, "lsh:budget=24,sinks=2,window=4", "55d17dc8d1d9a03e", &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_assert_eq(kvc_cache_set_budget(c, 64, &err), 0, "%s", err.msg);
    const int K = 3, H = 9, D = 64, chunk = 8;
    float *k = malloc(sizeof(float) * chunk * K * D), *v = malloc(sizeof(float) * chunk * K * D);
    float *q = malloc(sizeof(float) * chunk * H * D), *o = malloc(sizeof(float) * chunk * H * D);
    int32_t pos[8];
    for (int st = 0; st < 12; st++) {
        for (int t = 0; t < chunk; t++) pos[t] = st * chunk + t;
        for (int l = 0; l < s.n_layer; l++) {
            for (int i = 0; i < chunk * K * D; i++) k[i] = frand(), v[i] = frand();
            for (int i = 0; i < chunk * H * D; i++) q[i] = frand();
            cr_assert_eq(kvc_cache_append(c, l, k, v, pos, chunk, &err), 0, "%s", err.msg);
            cr_assert_eq(kvc_cache_attend(c, l, q, pos, chunk, o, &err), 0, "%s", err.msg);
            for (int i = 0; i < chunk * H * D; i++) cr_assert(isfinite(o[i]), "layer %d: non-finite output", l);
        }
        cr_assert_eq(kvc_cache_end_step(c, &err), 0, "step %d: %s", st, err.msg);
        kvcache_stats stt;
        kvc_kvcache_get_stats(c, &stt);
        int64_t want = (st + 1) * chunk < 24 ? (st + 1) * chunk : 24;
        cr_assert_eq(stt.held, want * s.n_layer * K, "step %d: held %lld", st, (long long)stt.held);
    }
    free(k), free(v), free(q), free(o);
    kvc_cache_free(c);
}

/* ============================================= budgets shared across heads (AdaKV) ==== */

/* One budget for a layer's heads or for the whole cache: the total held is exactly the sum of
 * the per-head budgets after every step, each head keeps its sinks and window (and the floor),
 * heads end up holding different counts, and bytes() counts each head's count. */
Test(kvcache, shared_budgets_hold_the_total_and_count_per_head_sizes) {
    kvc_cache_shape s = small_shape(1024);
    const int K = s.n_head_kv, H = s.n_head, D = s.head_dim, L = s.n_layer;
    const char *specs[4] = {"h2o:budget=0.25,sinks=3,window=5,norm=mean,share=layer",
                            "h2o:budget=0.25,sinks=3,window=5,share=global",
                            "lsh:budget=0.25,sinks=3,window=5,norm=mean,share=global,floor=0.9",
                            "streaming:budget=0.25,sinks=3,window=5,share=global"};
    for (int sp = 0; sp < 4; sp++) {
        kvc_err err = {{0}};
        kvc_cache *kc = kvc_kvcache_new(&s, "f16", specs[sp], NULL, &err);
        cr_assert_not_null(kc, "%s: %s", specs[sp], err.msg);
        cr_assert_eq(kvc_cache_set_budget(kc, 128, &err), 0, "%s", err.msg);
        kvc_keep *kp = kvc_keep_new(specs[sp], &s, &err);
        const size_t sb = kp->state_bytes;
        kvc_keep_free(kp);
        float k[5 * 2 * 8], v[5 * 2 * 8], q[5 * 4 * 8], o[5 * 4 * 8];
        int32_t pos[5];
        int seen = 0, uneven = 0;
        for (int st = 0; st < 40; st++) {
            for (int t = 0; t < 5; t++) pos[t] = seen + t;
            for (int l = 0; l < L; l++) {
                for (int i = 0; i < 5 * K * D; i++) k[i] = frand() * (1.0f + (float)(l * K + i % K)), v[i] = frand();
                for (int i = 0; i < 5 * H * D; i++) q[i] = frand() * (1.0f + (float)l);
                cr_assert_eq(kvc_cache_append(kc, l, k, v, pos, 5, &err), 0, "%s", err.msg);
                cr_assert_eq(kvc_cache_attend(kc, l, q, pos, 5, o, &err), 0, "%s", err.msg);
            }
            seen += 5;
            cr_assert_eq(kvc_cache_end_step(kc, &err), 0, "%s", err.msg);
            kvcache_stats stt;
            kvc_kvcache_get_stats(kc, &stt);
            const int64_t want = seen > 32 ? 32 : seen;
            cr_assert_eq(stt.held, want * L * K, "%s: step %d holds %lld, want %lld", specs[sp], st, (long long)stt.held,
                         (long long)want * L * K);
            for (int l = 0; l < L; l++) uneven |= kvc_cache_n_tokens(kc, l) != want;
            /* f16 rows and a position per token, the policy's state, a count per head */
            size_t bytes = (size_t)stt.held * (4 * D + 4 + sb) + (size_t)L * K * 4;
            if (!strncmp(specs[sp], "lsh", 3)) { /* probe runs: one run of query positions per head */
                cr_expect_geq(kvc_cache_bytes(kc), bytes, "%s", specs[sp]);
            } else if (!strstr(specs[sp], "norm=mean")) {
                cr_expect_eq(kvc_cache_bytes(kc), bytes, "%s: bytes %zu, want %zu", specs[sp], kvc_cache_bytes(kc), bytes);
            }
        }
        if (!strstr(specs[sp], "streaming")) cr_expect(uneven, "%s: every layer held the same count", specs[sp]);
        cr_expect(!strstr(specs[sp], "streaming") || !uneven, "streaming ranks positions alike in every head");
        if (strstr(specs[sp], "floor=0.9")) { /* each head keeps >= ceil(0.9 * 32) = 29 */
            for (int l = 0; l < L; l++) cr_expect_geq(kvc_cache_n_tokens(kc, l), 29);
        }
        kvc_cache_free(kc);
    }
}

/* Shared budgets and retrieval need every head to own its tokens: a reuse plan is refused. */
Test(kvcache, shared_budgets_and_retrieval_refuse_reuse_chains) {
    kvc_cache_shape s = {30, 9, 3, 64, 100000.0f, 512};
    char ck[512];
    snprintf(ck, sizeof ck, "ae:%s/checkpoints/smollm2-135m-ae32.h5,int8", KVC_SOURCE_DIR);
    const char *keeps[2] = {"h2o:budget=24,share=layer", "streaming:budget=24,retrieve=8"};
    for (int i = 0; i < 2; i++) {
        kvc_err err = {{0}};
        kvc_cache *c = kvc_kvcache_new(&s, ck, keeps[i], "55d17dc8d1d9a03e", &err);
        cr_expect_null(c, "%s accepted with a reuse plan", keeps[i]);
        cr_expect(strstr(err.msg, "without cross-layer reuse") && strstr(err.msg, "reuse=off"), "%s: %s", keeps[i], err.msg);
        kvc_cache_free(c);
    }
}

/* A cache that only hears the queries (kvc_kvcache_observe, as in a shared prefill) makes the
 * same choices as one that attends: same kept tokens, same attention afterwards, bit for bit. */
Test(kvcache, observing_queries_matches_attending) {
    kvc_cache_shape s = small_shape(256);
    const int K = s.n_head_kv, H = s.n_head, D = s.head_dim, L = s.n_layer;
    const char *keeps[3] = {"h2o:budget=0.25,norm=mean", "lsh:budget=0.25", "snapkv:budget=0.5,obs=8,window=8"};
    for (int sp = 0; sp < 3; sp++) {
        kvc_err err = {{0}};
        kvc_cache *a = kvc_kvcache_new(&s, "f32", keeps[sp], NULL, &err), *b = kvc_kvcache_new(&s, "f32", keeps[sp], NULL, &err);
        cr_assert(a && b, "%s", err.msg);
        static float k[8 * 2 * 8], v[8 * 2 * 8], q[8 * 4 * 8], oa[8 * 4 * 8], ob[8 * 4 * 8];
        int32_t pos[8];
        for (int st = 0; st < 8; st++) {
            for (int t = 0; t < 8; t++) pos[t] = st * 8 + t;
            for (int l = 0; l < L; l++) {
                for (int i = 0; i < 8 * K * D; i++) k[i] = frand(), v[i] = frand();
                for (int i = 0; i < 8 * H * D; i++) q[i] = 2.0f * frand();
                cr_assert_eq(kvc_cache_append(a, l, k, v, pos, 8, &err) | kvc_cache_append(b, l, k, v, pos, 8, &err), 0);
                cr_assert_eq(kvc_cache_attend(a, l, q, pos, 8, oa, &err), 0, "%s", err.msg);
                cr_assert_eq(kvc_kvcache_observe(b, l, q, pos, 8, &err), 0, "%s", err.msg);
            }
            cr_assert_eq(kvc_cache_end_step(a, &err) | kvc_cache_end_step(b, &err), 0);
        }
        cr_assert_eq(kvc_cache_set_budget(a, 64, &err) | kvc_cache_set_budget(b, 64, &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_cache_end_step(a, &err) | kvc_cache_end_step(b, &err), 0, "%s", err.msg);
        int32_t qp = 70;
        for (int i = 0; i < H * D; i++) q[i] = 2.0f * frand();
        for (int l = 0; l < L; l++) {
            cr_assert_eq(kvc_cache_n_tokens(a, l), kvc_cache_n_tokens(b, l));
            cr_assert_eq(kvc_cache_attend(a, l, q, &qp, 1, oa, &err) | kvc_cache_attend(b, l, q, &qp, 1, ob, &err), 0);
            cr_expect_arr_eq(oa, ob, sizeof(float) * H * D, "%s layer %d: other tokens kept", keeps[sp], l);
        }
        kvc_cache_free(a), kvc_cache_free(b);
    }
}

/* ======================================================= retrieval of evicted tokens ==== */

#define RD 32 /* the side store quantises values in groups of 32 channels */

/* Streaming keeps positions 0..3 and 44..63 of 64; the query points at evicted token 30's key
 * (after RoPE), so retrieval (rerank: the true logit decides among the nearest codes) brings
 * token 30 back: attention then matches a full cache holding the kept tokens plus token 30
 * within int8's error, while without retrieval it does not. RAM and spill stores give the same
 * output bit for bit, and their bytes are counted by hand. */
Test(kvcache, retrieval_brings_back_the_evicted_token_a_query_points_at) {
    kvc_cache_shape s = {2, 4, 2, RD, 10000.0f, 128};
    const int K = 2, H = 4, G = 2, L = 2, n = 64;
    static float k[2][64 * 2 * RD], v[2][64 * 2 * RD], q[4 * RD], o[4][4 * RD];
    for (int l = 0; l < L; l++)
        for (int i = 0; i < n * K * RD; i++) k[l][i] = frand(), v[l][i] = frand();
    int32_t pos[64];
    for (int t = 0; t < n; t++) pos[t] = t;
    const char *keeps[4] = {"streaming:budget=24,sinks=4,window=0,retrieve=1,rerank=8,rstore=int8",
                            "streaming:budget=24,sinks=4,window=0,retrieve=1,rerank=8,rstore=int8,spill=/tmp",
                            "streaming:budget=24,sinks=4,window=0", NULL};
    kvc_cache *c[3];
    kvc_err err = {{0}};
    for (int i = 0; i < 3; i++) {
        c[i] = kvc_kvcache_new(&s, "f32", keeps[i], NULL, &err);
        cr_assert_not_null(c[i], "%s: %s", keeps[i], err.msg);
        cr_assert_eq(kvc_cache_set_budget(c[i], 100, &err), 0);
        for (int l = 0; l < L; l++) cr_assert_eq(kvc_cache_append(c[i], l, k[l], v[l], pos, n, &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_cache_end_step(c[i], &err), 0, "%s: %s", keeps[i], err.msg);
    }
    /* the reference: kept tokens and token 30, exact */
    kvc_cache *ref = kvc_cache_full_new(&s, &err);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < n; t++) {
            if (t >= 4 && t < 44 && t != 30) continue;
            cr_assert_eq(kvc_cache_append(ref, l, k[l] + (size_t)t * K * RD, v[l] + (size_t)t * K * RD, &pos[t], 1, &err), 0);
        }
    kvc_rope_table rt;
    cr_assert_eq(kvc_rope_table_init(&rt, RD, 10000.0f) | kvc_rope_table_reserve(&rt, 128), 0);
    int32_t qp = 64;
    for (int l = 0; l < L; l++) {
        for (int h = 0; h < K; h++) { /* each head's queries point at its own token-30 key */
            float kr[RD];
            kvc_rope_rows(&rt, k[l] + ((size_t)30 * K + h) * RD, RD, &pos[30], 1, kr, RD);
            for (int g = 0; g < G; g++)
                for (int d = 0; d < RD; d++) q[(h * G + g) * RD + d] = 4.0f * kr[d] + 0.05f * frand();
        }
        for (int i = 0; i < 3; i++) cr_assert_eq(kvc_cache_attend(c[i], l, q, &qp, 1, o[i], &err), 0, "%s", err.msg);
        cr_assert_eq(kvc_cache_attend(ref, l, q, &qp, 1, o[3], &err), 0);
        float with = 0, without = 0;
        for (int i = 0; i < H * RD; i++) {
            with = fmaxf(with, fabsf(o[0][i] - o[3][i]));
            without = fmaxf(without, fabsf(o[2][i] - o[3][i]));
        }
        cr_expect(with < 0.03f, "layer %d: with retrieval max |diff| %g (int8 budget 0.03)", l, with);
        cr_expect(without > 0.1f, "layer %d: without retrieval max |diff| only %g: the test cannot tell", l, without);
        cr_expect_arr_eq(o[0], o[1], sizeof(float) * H * RD, "layer %d: spilled rows read back differently", l);
    }
    kvcache_stats sa, sb, sc;
    kvc_kvcache_get_stats(c[0], &sa), kvc_kvcache_get_stats(c[1], &sb), kvc_kvcache_get_stats(c[2], &sc);
    cr_expect_eq(sa.side_tokens, 40 * L * K);
    cr_expect_eq(sa.retrieved, L * K, "one token per (layer, kv head) for the one query");
    /* per token: 32-bit code + position; row: 32 int8 key codes + 32 value codes + f16 scale
     * and minimum of one value group; per block of up to 32 tokens: its first index and f16
     * scale and minimum per channel (blocks of 32 and 8 tokens) */
    const size_t row = 32 + 32 + 4, blocks = 2 * (8 + RD * 2 * 2);
    cr_expect_eq(sa.side_ram_bytes, (size_t)L * K * (40 * (8 + row) + blocks), "RAM side bytes %zu", sa.side_ram_bytes);
    cr_expect_eq(sa.side_disk_bytes, 0);
    cr_expect_eq(sb.side_disk_bytes, (size_t)L * K * 40 * row, "disk side bytes %zu", sb.side_disk_bytes);
    cr_expect_eq(sb.side_ram_bytes, (size_t)L * K * (40 * 8 + blocks + 16), "spilled RAM side bytes %zu", sb.side_ram_bytes);
    cr_expect_eq(sc.side_tokens, 0);
    cr_expect_eq(sa.bytes, sc.bytes, "the side store is not in bytes()");
    kvc_rope_table_free(&rt);
    for (int i = 0; i < 3; i++) kvc_cache_free(c[i]);
    kvc_cache_free(ref);
}

#include <signal.h>
#include <sys/resource.h>

/* A side store that cannot be written: a spill directory that does not exist fails at creation,
 * and a file that cannot grow (here a 4 KiB file-size limit) fails the step that evicts, each
 * with one line that names the spill file. */
Test(kvcache, a_side_store_that_cannot_be_written_is_an_error) {
    kvc_cache_shape s = {2, 4, 2, RD, 10000.0f, 256};
    kvc_err err = {{0}};
    cr_expect_null(kvc_kvcache_new(&s, "f16", "streaming:budget=24,retrieve=4,spill=/nonexistent/kvc", NULL, &err));
    cr_expect(strstr(err.msg, "cannot create a spill file in '/nonexistent/kvc'") && !strchr(err.msg, '\n'), "%s", err.msg);
    signal(SIGXFSZ, SIG_IGN); /* each test runs in its own process */
    struct rlimit rl = {4096, 4096};
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
    kvc_cache *c = kvc_kvcache_new(&s, "f16", "streaming:budget=24,retrieve=4,spill=/tmp", NULL, &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_assert_eq(kvc_cache_set_budget(c, 100, &err), 0);
    static float k[200 * 2 * RD], v[200 * 2 * RD];
    int32_t pos[200];
    for (int t = 0; t < 200; t++) pos[t] = t;
    for (int i = 0; i < 200 * 2 * RD; i++) k[i] = frand(), v[i] = frand();
    for (int l = 0; l < 2; l++) cr_assert_eq(kvc_cache_append(c, l, k, v, pos, 200, &err), 0);
    cr_expect_eq(kvc_cache_end_step(c, &err), -1, "176 evicted tokens x 4 heads do not fit in 4 KiB");
    cr_expect(strstr(err.msg, "cannot write its spill file in '/tmp'"), "%s", err.msg);
    kvc_cache_free(c);
}
