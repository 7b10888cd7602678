/* multi.c - several compressed caches measured on one shared prefill (API in kvc/eval.h):
 * the full-precision reference computes the prefill, a "tee" cache hands every layer's keys,
 * values and queries to the measured caches as well, and then each cache is compressed once and
 * answers on its own (context continuation, passkey, several facts). The model's weights run
 * once per prefill for all caches, which is what makes long contexts and 66-sample protocols
 * affordable on a small machine. Letters: V vocab, M continuation tokens, S samples. */
#include "kvc/eval.h"
#include "kvc/kvcache.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ==================================================================== the tee ==== */

typedef struct {
    kvc_cache *ref;          /* computes attention */
    kvc_cache *const *c;     /* (n) hear the same appends and queries */
    int n;
} tee_impl;

static int tee_append(kvc_cache *t, int layer, const float *k, const float *v, const int32_t *pos, int n, kvc_err *err) {
    tee_impl *im = t->impl;
    if (kvc_cache_append(im->ref, layer, k, v, pos, n, err)) return -1;
    for (int i = 0; i < im->n; i++)
        if (kvc_cache_append(im->c[i], layer, k, v, pos, n, err)) return -1;
    return 0;
}

static int tee_attend(kvc_cache *t, int layer, const float *q, const int32_t *pos, int n_q, float *out, kvc_err *err) {
    tee_impl *im = t->impl;
    if (kvc_cache_attend(im->ref, layer, q, pos, n_q, out, err)) return -1;
    for (int i = 0; i < im->n; i++)
        if (kvc_kvcache_observe(im->c[i], layer, q, pos, n_q, err)) return -1;
    return 0;
}

static int tee_end_step(kvc_cache *t, kvc_err *err) {
    tee_impl *im = t->impl;
    if (kvc_cache_end_step(im->ref, err)) return -1;
    for (int i = 0; i < im->n; i++)
        if (kvc_cache_end_step(im->c[i], err)) return -1;
    return 0;
}

static size_t tee_bytes(const kvc_cache *t) { return kvc_cache_bytes(((const tee_impl *)t->impl)->ref); }
static int64_t tee_n_tokens(const kvc_cache *t, int layer) { return kvc_cache_n_tokens(((const tee_impl *)t->impl)->ref, layer); }

static void tee_reset(kvc_cache *t) {
    tee_impl *im = t->impl;
    kvc_cache_reset(im->ref);
    for (int i = 0; i < im->n; i++) kvc_cache_reset(im->c[i]);
}

static void tee_free(kvc_cache *t) { (void)t; } /* lives on the stack of kvc_eval_multi */

static const kvc_cache_ops TEE_OPS = {"tee", tee_append, tee_attend, tee_end_step, tee_bytes, tee_n_tokens,
                                      tee_reset, tee_free, NULL, NULL, NULL};

/* ================================================================== scoring ==== */

/* Max, its first index, and log-sum-exp of one row of logits (double sums, as measures.c). */
static void row_stats(const float *x, int V, float *mx, int *arg, double *lse) {
    float m = x[0];
    int a = 0;
    for (int j = 1; j < V; j++)
        if (x[j] > m) m = x[j], a = j;
    double s = 0.0;
    for (int j = 0; j < V; j++) s += exp((double)(x[j] - m));
    *mx = m, *arg = a, *lse = log(s);
}

/* Adds rows [0, n) of measured logits lt against reference lr for targets tgt to one
 * sample's sums; kl_all (when not NULL) receives each row's KL. -1 with err on a non-finite
 * value. */
static int score_rows(const float *lt, const float *lr, const int32_t *tgt, int n, int V, double *nll, double *nllf,
                      double *kl, int *agree, double *kl_all, kvc_err *err) {
    double rn[n], rf[n], rk[n];
    int ra[n];
#pragma omp parallel for schedule(static) if (n > 1)
    for (int i = 0; i < n; i++) {
        const float *a = lt + (size_t)i * V, *b = lr + (size_t)i * V;
        float ma, mb;
        int aa, ab;
        double la, lb;
        row_stats(a, V, &ma, &aa, &la);
        row_stats(b, V, &mb, &ab, &lb);
        rn[i] = (double)ma + la - (double)a[tgt[i]];
        rf[i] = (double)mb + lb - (double)b[tgt[i]];
        double k = 0.0;
        for (int j = 0; j < V; j++) {
            const double pb = (double)(b[j] - mb) - lb, pa = (double)(a[j] - ma) - la;
            k += exp(pb) * (pb - pa);
        }
        rk[i] = k, ra[i] = aa == ab;
    }
    for (int i = 0; i < n; i++) {
        if (!isfinite(rn[i]) || !isfinite(rf[i]) || !isfinite(rk[i]))
            return kvc_fail(err, "non-finite log-likelihood or KL at a scored token (measured NLL %g, reference %g)", rn[i],
                            rf[i]);
        *nll += rn[i], *nllf += rf[i], *kl += rk[i], *agree += ra[i];
        if (kl_all) kl_all[i] = rk[i];
    }
    return 0;
}

/* qsort order for doubles, ascending. */
static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile of x (n, sorted here), interpolating as numpy does. */
static double pct(double *x, int64_t n, double p) {
    if (n < 1) return NAN;
    qsort(x, (size_t)n, sizeof *x, cmp_d);
    const double r = p / 100.0 * (double)(n - 1);
    const int64_t lo = (int64_t)floor(r), hi = lo + 1 < n ? lo + 1 : lo;
    return x[lo] + (r - (double)lo) * (x[hi] - x[lo]);
}

void kvc_multi_bootstrap(const double *nll, const double *nll_full, const double *kl, const int *scored, int n,
                         double rise_ci[2], double kl_ci[2]) {
    enum { B = 2000 };
    rise_ci[0] = rise_ci[1] = kl_ci[0] = kl_ci[1] = NAN;
    if (n < 2) return;
    double *rs = malloc(B * sizeof *rs), *ks = malloc(B * sizeof *ks);
    if (!rs || !ks) {
        free(rs), free(ks);
        return;
    }
    uint64_t st = 20261123;
    for (int b = 0; b < B; b++) {
        double a = 0, f = 0, k = 0, c = 0;
        for (int i = 0; i < n; i++) {
            const int j = (int)kvc_rng_below(&st, (uint64_t)n);
            a += nll[j], f += nll_full[j], k += kl[j], c += scored[j];
        }
        rs[b] = 100.0 * (exp((a - f) / c) - 1.0);
        ks[b] = k / c;
    }
    rise_ci[0] = pct(rs, B, 2.5), rise_ci[1] = pct(rs, B, 97.5);
    kl_ci[0] = pct(ks, B, 2.5), kl_ci[1] = pct(ks, B, 97.5);
    free(rs), free(ks);
}

void kvc_multi_point_free(kvc_multi_point *p) {
    free(p->s_nll), free(p->s_nll_full), free(p->s_kl), free(p->s_scored), free(p->s_agree);
    kvc_passkey_result_free(&p->passkey);
    kvc_passkey_result_free(&p->facts);
    memset(p, 0, sizeof *p);
}

/* ================================================================ protocols ==== */

typedef struct {
    const kvc_model *m;
    kvc_run *run;
    kvc_cache tee;
    tee_impl ti;
    int32_t *pos;          /* (pos_cap) */
    float *lt, *lr;        /* (M, V) */
    int max_batch;
} mstate;

/* Prefills ids[0, n) at positions 0.. through the tee in chunks (every cache holds all). */
static int prefill(mstate *ms, const int32_t *ids, int n, int chunk, kvc_err *err) {
    kvc_cache_reset(&ms->tee);
    for (int i = 0; i < ms->ti.n; i++)
        if (kvc_cache_set_budget(ms->ti.c[i], -1, err)) return -1;
    for (int b0 = 0; b0 < n; b0 += chunk) {
        const int nb = n - b0 < chunk ? n - b0 : chunk;
        if (kvc_model_forward(ms->m, ms->run, &ms->tee, ids + b0, ms->pos + b0, nb, NULL, 0, err)) return -1;
    }
    return 0;
}

/* Compresses cache c once to its budget (a fraction of n_ctx) and freezes it; adds its memory
 * reading to mem (bytes/token, kept, removed, side RAM/token, side disk/token). */
static int compress(kvc_cache *c, int n_ctx, double *mem, kvc_err *err) {
    if (kvc_cache_set_budget(c, n_ctx, err) || kvc_cache_end_step(c, err)) return -1;
    double bpt, kept, removed;
    kvcache_stats st;
    if (kvc_eval_memory(c, &bpt, &kept, &removed)) {
        kvc_kvcache_get_stats(c, &st);
        mem[0] += bpt, mem[1] += kept, mem[2] += removed;
        mem[3] += (double)st.side_ram_bytes / (double)st.appended;
        mem[4] += (double)st.side_disk_bytes / (double)st.appended;
        mem[5] += 1;
    }
    return kvc_cache_set_budget(c, -1, err);
}

/* Tokens retrieved so far by c (its side store's count). */
static int64_t retrieved_of(const kvc_cache *c) {
    kvcache_stats st;
    kvc_kvcache_get_stats(c, &st);
    return st.retrieved;
}

/* The context protocol for every cache (see kvc_eval_multi). */
static int run_context(mstate *ms, kvc_cache *ref, const int32_t *tokens, int64_t n, const kvc_multi_opts *o,
                       kvc_multi_point *pts, kvc_err *err) {
    const int N = o->context_len > 0 ? o->context_len : 512, M = o->continuation > 0 ? o->continuation : 64;
    const int chunk = o->chunk > 0 ? o->chunk : 32, want = o->samples > 0 ? o->samples : 8, V = ms->m->hp.n_vocab;
    const int nc = ms->ti.n, L = ms->m->hp.n_layer, K = ms->m->hp.n_head_kv;
    if (M < 2) return kvc_fail(err, "context: the continuation must be at least 2 tokens, got %d", M);
    const int64_t avail = n / (N + M);
    if (avail < 1) return kvc_fail(err, "context: the text has %lld tokens; one sample needs %d", (long long)n, N + M);
    const int S = avail < want ? (int)avail : want;
    double *kl_all = malloc((size_t)nc * S * (M - 1) * sizeof *kl_all), (*mem)[6] = calloc((size_t)nc, sizeof *mem);
    int64_t *got = calloc((size_t)nc, sizeof *got);
    double *secs = calloc((size_t)nc, sizeof *secs);
    int rc = kl_all && mem && got && secs ? 0 : kvc_fail(err, "out of memory for %d samples", S);
    for (int i = 0; i < nc && !rc; i++) {
        kvc_multi_point *p = &pts[i];
        p->n_samples = S;
        p->s_nll = calloc((size_t)S, sizeof(double)), p->s_nll_full = calloc((size_t)S, sizeof(double));
        p->s_kl = calloc((size_t)S, sizeof(double));
        p->s_scored = calloc((size_t)S, sizeof(int)), p->s_agree = calloc((size_t)S, sizeof(int));
        if (!p->s_nll || !p->s_nll_full || !p->s_kl || !p->s_scored || !p->s_agree) rc = kvc_fail(err, "out of memory");
    }
    const double t0 = kvc_now();
    for (int s = 0; s < S && !rc; s++) {
        const int32_t *seg = tokens + (int64_t)s * (N + M);
        if (prefill(ms, seg, N, chunk, err) ||
            kvc_model_forward(ms->m, ms->run, ref, seg + N, ms->pos + N, M, ms->lr, 1, err)) {
            rc = -1;
            break;
        }
        for (int i = 0; i < nc && !rc; i++) {
            kvc_cache *c = ms->ti.c[i];
            kvc_multi_point *p = &pts[i];
            const double t1 = kvc_now();
            double dn = 0, df = 0, dk = 0;
            int ag = 0;
            if (compress(c, N, mem[i], err) || kvc_model_forward(ms->m, ms->run, c, seg + N, ms->pos + N, M, ms->lt, 1, err) ||
                score_rows(ms->lt, ms->lr, seg + N + 1, M - 1, V, &dn, &df, &dk, &ag,
                           kl_all + ((size_t)i * S + s) * (M - 1), err)) {
                rc = -1;
                break;
            }
            secs[i] += kvc_now() - t1;
            got[i] += retrieved_of(c);
            p->s_nll[s] = dn, p->s_nll_full[s] = df, p->s_kl[s] = dk, p->s_scored[s] = M - 1, p->s_agree[s] = ag;
        }
        if (o->progress) kvc_progress_draw("context", (double)(s + 1), (double)S, "samples", t0);
    }
    if (o->progress) kvc_progress_end();
    for (int i = 0; i < nc && !rc; i++) {
        kvc_multi_point *p = &pts[i];
        kvc_quality *q = &p->context;
        double a = 0, f = 0, k = 0;
        int64_t cnt = 0, ag = 0;
        for (int s = 0; s < S; s++) a += p->s_nll[s], f += p->s_nll_full[s], k += p->s_kl[s], cnt += p->s_scored[s], ag += p->s_agree[s];
        q->n_scored = cnt, q->n_units = S, q->n_tokens = (int64_t)S * (N + M);
        q->nll = a / cnt, q->nll_full = f / cnt, q->ppl = exp(q->nll), q->ppl_full = exp(q->nll_full);
        q->rise_pct = 100.0 * (q->ppl / q->ppl_full - 1.0);
        q->kl_mean = k / cnt, q->top1 = (double)ag / cnt;
        q->kl_p99 = pct(kl_all + (size_t)i * S * (M - 1), (int64_t)S * (M - 1), 99.0);
        const double nm = mem[i][5] > 0 ? mem[i][5] : NAN;
        q->bytes_per_token = mem[i][0] / nm, q->kept_frac = mem[i][1] / nm, q->removed_frac = mem[i][2] / nm;
        q->f16_bytes_per_token = kvc_eval_f16_bytes_per_token(&ms->tee.shape);
        q->compression = q->f16_bytes_per_token / q->bytes_per_token;
        q->kept_scored = NAN;
        q->seconds = kvc_now() - t0, q->seconds_cache = secs[i];
        p->side_ram_bpt = mem[i][3] / nm, p->side_disk_bpt = mem[i][4] / nm;
        p->retrieved_per_query = (double)got[i] / ((double)S * M * L * K);
        kvc_multi_bootstrap(p->s_nll, p->s_nll_full, p->s_kl, p->s_scored, S, p->rise_ci, p->kl_ci);
    }
    free(kl_all), free(mem), free(got), free(secs);
    return rc;
}

/* Index of the largest of x (n), the first on ties. */
static int argmax(const float *x, int n) {
    int a = 0;
    for (int j = 1; j < n; j++)
        if (x[j] > x[a]) a = j;
    return a;
}

/* Feeds the question of p to c (frozen) and generates up to gen_n tokens greedily; 1 when the
 * answer holds `want`, 0 when not, -1 with err. ans (cap bytes) receives the answer text. */
static int answer(mstate *ms, kvc_cache *c, const kvc_passkey_prompt *p, const char *want, int gen_n, char *ans, size_t cap,
                  kvc_err *err) {
    const kvc_model *m = ms->m;
    float *logits = ms->lt;
    int32_t gen[64];
    const int nq = p->n - p->n_context;
    if (kvc_model_forward(m, ms->run, c, p->ids + p->n_context, ms->pos + p->n_context, nq, logits, 0, err)) return -1;
    const int32_t eos = kvc_tokenizer_eos(m->tok);
    int ng = 0;
    for (int i = 0; i < gen_n; i++) {
        int32_t tok = argmax(logits, m->hp.n_vocab);
        if (tok == eos) break;
        gen[ng++] = tok;
        if (i + 1 < gen_n && kvc_model_forward(m, ms->run, c, &tok, ms->pos + p->n + i, 1, logits, 0, err)) return -1;
    }
    size_t len;
    char *text = kvc_tokenizer_decode(m->tok, gen, ng, &len);
    if (!text) return kvc_fail(err, "out of memory decoding an answer");
    snprintf(ans, cap, "%s", text);
    int ok = kvc_passkey_check(text, want);
    free(text);
    return ok;
}

/* Passkey (facts = 0: the same prompts and keys as kvc_eval_passkey) or several facts
 * (facts = 1: cells by length) for every cache. */
static int run_prompts(mstate *ms, kvc_cache *ref, const kvc_multi_opts *o, int facts, kvc_multi_point *pts, kvc_err *err) {
    static const int dl[] = {1024, 2048};
    static const double dd[] = {0.0, 0.25, 0.5, 0.75, 1.0}, none[] = {-1.0};
    const int *lengths = o->n_lengths > 0 ? o->lengths : dl, nl = o->n_lengths > 0 ? o->n_lengths : 2;
    const double *depths = facts ? none : o->n_depths > 0 ? o->depths : dd;
    const int nd = facts ? 1 : o->n_depths > 0 ? o->n_depths : 5, trials = o->trials > 0 ? o->trials : 3;
    const int chunk = o->chunk > 0 ? o->chunk : 32, gen_n = o->gen_tokens > 0 ? o->gen_tokens : 8, nc = ms->ti.n;
    const int L = ms->m->hp.n_layer, K = ms->m->hp.n_head_kv;
    uint64_t rng = (o->seed ? o->seed : 1) + (uint64_t)facts;
    double (*mem)[6] = calloc((size_t)nc, sizeof *mem);
    int64_t *got = calloc((size_t)nc, sizeof *got), queries = 0;
    if (!mem || !got) {
        free(mem), free(got);
        return kvc_fail(err, "out of memory");
    }
    int rc = 0;
    for (int i = 0; i < nc && !rc; i++) {
        kvc_passkey_result *r = facts ? &pts[i].facts : &pts[i].passkey;
        memset(r, 0, sizeof *r);
        r->bytes_per_token = r->compression = r->kept_frac = r->removed_frac = NAN;
        if (!(r->cells = kvc_calloc_array((size_t)nl * nd, sizeof *r->cells))) rc = kvc_fail(err, "out of memory");
        r->n_cells = nl * nd;
        for (int a = 0; r->cells && a < nl; a++)
            for (int b = 0; b < nd; b++) {
                kvc_passkey_cell *cell = &r->cells[a * nd + b];
                cell->length = lengths[a], cell->depth = depths[b], cell->skipped = lengths[a] > ms->m->hp.n_ctx_train;
            }
    }
    const double t0 = kvc_now();
    double done = 0, total = 0;
    for (int a = 0; a < nl; a++) total += (double)lengths[a] * nd * trials;
    for (int ci = 0; ci < nl * nd && !rc; ci++) {
        const int length = lengths[ci / nd];
        if (length > ms->m->hp.n_ctx_train) continue;
        for (int tr = 0; tr < trials && !rc; tr++) {
            char key[8];
            kvc_passkey_prompt p;
            if (facts) {
                rc = kvc_facts_build(ms->m->tok, length, o->n_facts > 0 ? o->n_facts : 4, &rng, &p, key, err);
            } else {
                snprintf(key, sizeof key, "%05d", (int)(10000 + kvc_rng_next(&rng) % 90000));
                rc = kvc_passkey_build(ms->m->tok, length, depths[ci % nd], key, &p, err);
            }
            if (rc) break;
            if (p.n + gen_n > ms->tee.shape.max_tokens) {
                rc = kvc_fail(err, "a prompt of %d tokens does not fit the caches (%d)", p.n + gen_n, ms->tee.shape.max_tokens);
                kvc_passkey_prompt_free(&p);
                break;
            }
            char ans[64];
            int okf = prefill(ms, p.ids, p.n_context, chunk, err) ? -1 : answer(ms, ref, &p, key, gen_n, ans, sizeof ans, err);
            for (int i = 0; i < nc && okf >= 0; i++) {
                kvc_passkey_result *r = facts ? &pts[i].facts : &pts[i].passkey;
                kvc_passkey_cell *cell = &r->cells[ci];
                const double t1 = kvc_now();
                int ok = compress(ms->ti.c[i], p.n_context, mem[i], err) ? -1
                         : answer(ms, ms->ti.c[i], &p, key, gen_n, cell->last_answer, sizeof cell->last_answer, err);
                if (ok < 0) {
                    okf = -1;
                    break;
                }
                r->seconds_cache += kvc_now() - t1;
                got[i] += retrieved_of(ms->ti.c[i]);
                r->n_tokens += p.n;
                cell->trials++, cell->correct += ok, cell->correct_full += okf;
                r->trials++, r->correct += ok, r->correct_full += okf;
            }
            queries += p.n - p.n_context + gen_n - 1;
            kvc_passkey_prompt_free(&p);
            if (okf < 0) rc = -1;
            done += length;
            if (o->progress) kvc_progress_draw(facts ? "facts" : "passkey", done, total, "tok", t0);
        }
    }
    if (o->progress) kvc_progress_end();
    for (int i = 0; i < nc; i++) {
        kvc_passkey_result *r = facts ? &pts[i].facts : &pts[i].passkey;
        if (mem[i][5] > 0) {
            r->bytes_per_token = mem[i][0] / mem[i][5], r->kept_frac = mem[i][1] / mem[i][5];
            r->removed_frac = mem[i][2] / mem[i][5];
            r->compression = kvc_eval_f16_bytes_per_token(&ms->tee.shape) / r->bytes_per_token;
            pts[i].side_ram_bpt_pk = mem[i][3] / mem[i][5], pts[i].side_disk_bpt_pk = mem[i][4] / mem[i][5];
            if (queries > 0 && !(pts[i].n_samples > 0)) pts[i].retrieved_per_query = (double)got[i] / ((double)queries * L * K);
        }
        r->seconds = kvc_now() - t0;
    }
    free(mem), free(got);
    return rc;
}

int kvc_eval_multi(const kvc_model *m, kvc_cache *const *c, int n_c, kvc_cache *ref, const int32_t *tokens, int64_t n,
                   int what, const kvc_multi_opts *o, kvc_multi_point *pts, kvc_err *err) {
    memset(pts, 0, (size_t)n_c * sizeof *pts);
    if (n_c < 1 || !ref) return kvc_fail(err, "multi: at least one measured cache and a reference are needed");
    if (ref->ops->set_budget) return kvc_fail(err, "multi: the reference must be a cache that never evicts");
    const int chunk = o->chunk > 0 ? o->chunk : 32, M = o->continuation > 0 ? o->continuation : 64;
    mstate ms = {.m = m};
    ms.ti = (tee_impl){ref, c, n_c};
    ms.tee = (kvc_cache){.ops = &TEE_OPS, .shape = ref->shape, .impl = &ms.ti};
    for (int i = 0; i < n_c; i++)
        if (c[i]->shape.max_tokens < ref->shape.max_tokens)
            return kvc_fail(err, "multi: cache %d holds %d tokens, the reference %d", i, c[i]->shape.max_tokens,
                            ref->shape.max_tokens);
    ms.max_batch = chunk > M ? chunk : M;
    ms.run = kvc_run_new(m, ms.max_batch, err);
    if (!ms.run) return -1;
    const int V = m->hp.n_vocab, pc = ref->shape.max_tokens + 64;
    ms.pos = kvc_malloc_array((size_t)pc, sizeof(int32_t));
    ms.lt = kvc_malloc_array((size_t)M * V, sizeof(float));
    ms.lr = kvc_malloc_array((size_t)M * V, sizeof(float));
    int rc = ms.pos && ms.lt && ms.lr ? 0 : kvc_fail(err, "out of memory for measuring buffers");
    for (int i = 0; i < pc && !rc; i++) ms.pos[i] = i;
    if (!rc && (what & KVC_MULTI_CONTEXT)) rc = run_context(&ms, ref, tokens, n, o, pts, err);
    if (!rc && (what & KVC_MULTI_PASSKEY)) rc = run_prompts(&ms, ref, o, 0, pts, err);
    if (!rc && (what & KVC_MULTI_FACTS)) rc = run_prompts(&ms, ref, o, 1, pts, err);
    kvc_run_free(ms.run);
    free(ms.pos), free(ms.lt), free(ms.lr);
    return rc;
}
