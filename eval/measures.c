/* measures.c - the quality and memory protocols of DESIGN.md §5 (streaming perplexity and
 * context compression, API in kvc/eval.h): a measured cache and the full-precision reference
 * take the same chunks in lockstep, and every prediction is compared (NLL, KL, top-1).
 * Letters: V vocab, N rows scored in one chunk, L layers, K kv heads, D head_dim. */
#include "kvc/eval.h"
#include "kvc/kvcache.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ====================================================================== memory ==== */

int64_t kvc_eval_memory(const kvc_cache *c, double *bytes_per_token, double *kept, double *removed) {
    const double lk = (double)c->shape.n_layer * c->shape.n_head_kv;
    kvcache_stats st; /* also answers for the plain full cache: everything held, nothing evicted */
    kvc_kvcache_get_stats(c, &st);
    if (st.appended <= 0) {
        *bytes_per_token = *kept = *removed = NAN;
        return 0;
    }
    *bytes_per_token = (double)st.bytes / (double)st.appended;
    *kept = (double)st.held / ((double)st.appended * lk);
    *removed = (double)st.evicted / ((double)st.appended * lk);
    return st.appended;
}

double kvc_eval_f16_bytes_per_token(const kvc_cache_shape *s) { return 2.0 * s->n_layer * s->n_head_kv * s->head_dim * 2.0; }

/* ============================================================ reference store ==== */

struct kvc_ref_store {
    uint64_t key;          /* what was recorded: protocol, settings, tokens (FNV-1a) */
    int ready;             /* 1: a complete recording for key */
    size_t max_bytes;
    float *rows;           /* (cap, V) the reference's logits of every logit-producing feed */
    int64_t n, cap, at;    /* rows recorded, allocated, read so far in this run */
    int V;
    int mode;              /* this run: 0 lockstep, 1 recording, 2 replaying */
};

kvc_ref_store *kvc_ref_store_new(size_t max_bytes) {
    kvc_ref_store *s = calloc(1, sizeof *s);
    if (s) s->max_bytes = max_bytes;
    return s;
}

void kvc_ref_store_free(kvc_ref_store *s) {
    if (!s) return;
    free(s->rows);
    free(s);
}

int kvc_ref_store_ready(const kvc_ref_store *s) { return s && s->ready; }

/* FNV-1a over bytes, continuing from h. */
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

/* Chooses this run's mode: replay when the store holds this exact run, else record when the
 * rows fit (rows: logit rows the run will produce), else lockstep. */
static void ref_store_begin(kvc_ref_store *s, uint64_t key, int64_t rows, int V) {
    if (!s) return;
    s->at = 0;
    if (s->ready && s->key == key && s->V == V) {
        s->mode = 2;
        return;
    }
    s->ready = 0, s->n = 0, s->mode = 0;
    if ((size_t)rows * (size_t)V * sizeof(float) > s->max_bytes) return;
    if (rows > s->cap) {
        float *p = realloc(s->rows, (size_t)rows * V * sizeof(float));
        if (!p) return;
        s->rows = p, s->cap = rows;
    }
    s->key = key, s->V = V, s->mode = 1;
}

/* Marks a recording complete (after a run that succeeded). */
static void ref_store_end(kvc_ref_store *s, int ok) {
    if (!s) return;
    if (s->mode == 1) s->ready = ok;
    s->mode = 0;
}

/* ==================================================================== lockstep ==== */

/* State shared by both protocols: one run, logits of both caches, and the running sums. */
typedef struct {
    const kvc_model *m;
    kvc_run *run;
    int cap;              /* rows the logit buffers hold */
    int pos_cap;          /* tokens one feed may take */
    float *lt, *lr;       /* (cap, V) logits of the measured / reference cache */
    int32_t *pos;         /* (max(cap, max_batch)) positions of the tokens being fed */
    double *r_nll, *r_nllf, *r_kl; /* (cap) per-row results before they are summed in order */
    uint8_t *r_agree;     /* (cap) */
    double nll, nllf;     /* summed NLLs */
    int64_t scored, agree;
    double *kl;           /* (kl_cap) every scored token's KL, for the percentile */
    int64_t kl_cap;
    double mem_bpt, mem_kept, mem_removed; /* sums over memory readings */
    int mem_n;
    double t_cache;       /* seconds in the measured cache's forward calls */
    double *u_sum;        /* (units_cap, 3): NLL, reference NLL, KL summed per unit */
    int64_t *u_n;         /* (units_cap) predictions per unit */
    int units, units_cap;
    double mark[3];       /* the sums when the current unit began */
    int64_t mark_n;
    int64_t fed;          /* tokens fed through the measured cache */
    kvc_ref_store *store; /* NULL, or the reference recording (see ref_store_begin) */
} lockstep;

/* Frees what lockstep_init allocated (safe on a partly built state). */
static void lockstep_free(lockstep *ls) {
    kvc_run_free(ls->run);
    free(ls->lt);
    free(ls->lr);
    free(ls->pos);
    free(ls->r_nll);
    free(ls->r_nllf);
    free(ls->r_kl);
    free(ls->r_agree);
    free(ls->kl);
    free(ls->u_sum);
    free(ls->u_n);
}

/* Closes one unit (a window or a sample): records what it scored, for the intervals. */
static int lockstep_unit(lockstep *ls, kvc_err *err) {
    if (ls->units == ls->units_cap) {
        int cap = ls->units_cap ? 2 * ls->units_cap : 64;
        double *s = realloc(ls->u_sum, (size_t)cap * 3 * sizeof(double));
        if (s) ls->u_sum = s;
        int64_t *n = realloc(ls->u_n, (size_t)cap * sizeof(int64_t));
        if (n) ls->u_n = n;
        if (!s || !n) return kvc_fail(err, "out of memory");
        ls->units_cap = cap;
    }
    double kl = 0;
    for (int64_t i = ls->mark_n; i < ls->scored; i++) kl += ls->kl[i];
    double *u = ls->u_sum + (size_t)ls->units * 3;
    u[0] = ls->nll - ls->mark[0], u[1] = ls->nllf - ls->mark[1], u[2] = kl;
    ls->u_n[ls->units++] = ls->scored - ls->mark_n;
    ls->mark[0] = ls->nll, ls->mark[1] = ls->nllf, ls->mark_n = ls->scored;
    return 0;
}

static double percentile(double *x, int64_t n, double p);

/* 95% percentile bootstrap over units of the perplexity rise and the mean KL: 2,000
 * resamples with replacement from a fixed seed (the same intervals on every run). */
static void bootstrap(const lockstep *ls, kvc_quality *q) {
    enum { B = 2000 };
    q->rise_lo = q->rise_hi = q->kl_lo = q->kl_hi = NAN;
    const int U = ls->units;
    if (U < 2) return;
    double *rise = malloc(B * sizeof(double)), *kl = malloc(B * sizeof(double));
    if (!rise || !kl) {
        free(rise), free(kl);
        return;
    }
    uint64_t rng = 0x5eedb007ull;
    for (int b = 0; b < B; b++) {
        double s0 = 0, s1 = 0, s2 = 0, n = 0;
        for (int i = 0; i < U; i++) {
            const int u = (int)kvc_rng_below(&rng, (uint64_t)U);
            s0 += ls->u_sum[u * 3], s1 += ls->u_sum[u * 3 + 1], s2 += ls->u_sum[u * 3 + 2], n += (double)ls->u_n[u];
        }
        rise[b] = n > 0 ? 100.0 * (exp((s0 - s1) / n) - 1.0) : NAN;
        kl[b] = n > 0 ? s2 / n : NAN;
    }
    q->rise_lo = percentile(rise, B, 2.5), q->rise_hi = percentile(rise, B, 97.5);
    q->kl_lo = percentile(kl, B, 2.5), q->kl_hi = percentile(kl, B, 97.5);
    free(rise), free(kl);
}

/* Allocates a run of max_batch tokens and buffers for cap rows of logits (feeds without
 * logits may be up to max_batch tokens); kl_cap is the number of predictions to be scored. Returns 0 or -1 with err (freeing all). */
static int lockstep_init(lockstep *ls, const kvc_model *m, int max_batch, int cap, int64_t kl_cap, kvc_err *err) {
    const size_t V = (size_t)m->hp.n_vocab;
    memset(ls, 0, sizeof *ls);
    ls->m = m;
    ls->cap = cap;
    ls->pos_cap = cap > max_batch ? cap : max_batch;
    ls->run = kvc_run_new(m, max_batch, err);
    if (!ls->run) return -1;
    ls->lt = kvc_malloc_array((size_t)cap * V, sizeof(float));
    ls->lr = kvc_malloc_array((size_t)cap * V, sizeof(float));
    ls->pos = kvc_malloc_array((size_t)ls->pos_cap, sizeof(int32_t));
    ls->r_nll = kvc_malloc_array((size_t)cap, sizeof(double));
    ls->r_nllf = kvc_malloc_array((size_t)cap, sizeof(double));
    ls->r_kl = kvc_malloc_array((size_t)cap, sizeof(double));
    ls->r_agree = kvc_malloc_array((size_t)cap, 1);
    ls->kl_cap = kl_cap > 0 ? kl_cap : 1;
    ls->kl = kvc_malloc_array((size_t)ls->kl_cap, sizeof(double));
    if (!ls->lt || !ls->lr || !ls->pos || !ls->r_nll || !ls->r_nllf || !ls->r_kl || !ls->r_agree || !ls->kl) {
        lockstep_free(ls);
        return kvc_fail(err, "out of memory for measuring buffers (%d rows of %zu logits)", cap, V);
    }
    return 0;
}

/* Feeds n tokens at positions p0.. through both caches (the measured one timed); with
 * want_logits the (n, V) logits land in ls->lt / ls->lr. Returns 0 or -1 with err. */
static int lockstep_feed(lockstep *ls, kvc_cache *c, kvc_cache *ref, const int32_t *tok, int p0, int n,
                         int want_logits, kvc_err *err) {
    if (n > ls->pos_cap || (want_logits && n > ls->cap))
        return kvc_fail(err, "internal: a feed of %d tokens exceeds the measuring buffers", n);
    for (int i = 0; i < n; i++) ls->pos[i] = p0 + i;
    double t0 = kvc_now();
    if (kvc_model_forward(ls->m, ls->run, c, tok, ls->pos, n, want_logits ? ls->lt : NULL, want_logits, err)) return -1;
    ls->t_cache += kvc_now() - t0;
    ls->fed += n;
    kvc_ref_store *st = ls->store;
    const size_t V = (size_t)ls->m->hp.n_vocab;
    if (st && st->mode == 2) { /* replay: the reference saw exactly these tokens before */
        if (!want_logits) return 0;
        if (st->at + n > st->n) return kvc_fail(err, "internal: the reference recording is shorter than this run");
        memcpy(ls->lr, st->rows + (size_t)st->at * V, (size_t)n * V * sizeof(float));
        st->at += n;
        return 0;
    }
    if (kvc_model_forward(ls->m, ls->run, ref, tok, ls->pos, n, want_logits ? ls->lr : NULL, want_logits, err)) return -1;
    if (st && st->mode == 1 && want_logits) {
        if (st->n + n > st->cap) return kvc_fail(err, "internal: more reference rows than planned");
        memcpy(st->rows + (size_t)st->n * V, ls->lr, (size_t)n * V * sizeof(float));
        st->n += n;
    }
    return 0;
}

/* Max, its first index and sum of exp(x - max) of one row of logits; the arithmetic is
 * kvc_eval_perplexity's, so a full cache here reproduces its NLL to the last bit. */
static void row_norm(const float *x, int V, float *mx, int *arg, double *s) {
    float m = x[0];
    int a = 0;
    for (int j = 1; j < V; j++)
        if (x[j] > m) { m = x[j]; a = j; }
    double sum = 0.0;
    for (int j = 0; j < V; j++) sum += exp((double)(x[j] - m));
    *mx = m;
    *arg = a;
    *s = sum;
}

/* Scores rows [0, n) of the last fed logits against targets tgt (n): NLL of both caches,
 * KL(P_ref || P_measured) and arg-max agreement; rows run in parallel, sums in row order.
 * Returns 0 or -1 with err on a non-finite NLL or too many predictions. */
static int lockstep_score(lockstep *ls, const int32_t *tgt, int n, kvc_err *err) {
    const int V = ls->m->hp.n_vocab;
    if (ls->scored + n > ls->kl_cap) return kvc_fail(err, "internal: more predictions than planned");
#pragma omp parallel for schedule(static) if (n > 1)
    for (int i = 0; i < n; i++) {
        const float *a = ls->lt + (size_t)i * V, *b = ls->lr + (size_t)i * V;
        float ma, mb;
        int aa, ab;
        double sa, sb;
        row_norm(a, V, &ma, &aa, &sa);
        row_norm(b, V, &mb, &ab, &sb);
        const double la = log(sa), lb = log(sb);
        ls->r_nll[i] = (double)ma + la - (double)a[tgt[i]];
        ls->r_nllf[i] = (double)mb + lb - (double)b[tgt[i]];
        double kl = 0.0;
        for (int j = 0; j < V; j++) {
            const double pb = (double)(b[j] - mb) - lb, pa = (double)(a[j] - ma) - la;
            kl += exp(pb) * (pb - pa);
        }
        ls->r_kl[i] = kl;
        ls->r_agree[i] = aa == ab;
    }
    for (int i = 0; i < n; i++) {
        if (!isfinite(ls->r_nll[i]) || !isfinite(ls->r_nllf[i]) || !isfinite(ls->r_kl[i]))
            return kvc_fail(err, "non-finite log-likelihood or KL at a scored token (measured NLL %g, reference %g)",
                            ls->r_nll[i], ls->r_nllf[i]);
        ls->nll += ls->r_nll[i];
        ls->nllf += ls->r_nllf[i];
        ls->agree += ls->r_agree[i];
        ls->kl[ls->scored++] = ls->r_kl[i];
    }
    return 0;
}

/* Adds one memory reading of c to the averages. */
static void lockstep_memory(lockstep *ls, const kvc_cache *c) {
    double bpt, kept, removed;
    if (!kvc_eval_memory(c, &bpt, &kept, &removed)) return;
    ls->mem_bpt += bpt;
    ls->mem_kept += kept;
    ls->mem_removed += removed;
    ls->mem_n++;
}

/* qsort order for doubles, ascending. */
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile (0..100) of x (n, sorted here) by linear interpolation between the
 * order statistics at ranks floor and ceil of p/100 * (n - 1) (numpy's default). */
static double percentile(double *x, int64_t n, double p) {
    if (n < 1) return NAN;
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    double r = p / 100.0 * (double)(n - 1);
    int64_t lo = (int64_t)floor(r), hi = lo + 1 < n ? lo + 1 : lo;
    return x[lo] + (r - (double)lo) * (x[hi] - x[lo]);
}

/* Turns the sums into the reported figures. */
static void lockstep_finish(lockstep *ls, const kvc_cache *c, int units, double t0, kvc_quality *q) {
    const double ns = (double)ls->scored;
    q->n_tokens = ls->fed;
    q->n_scored = ls->scored;
    q->n_units = units;
    q->nll = ns > 0 ? ls->nll / ns : NAN;
    q->nll_full = ns > 0 ? ls->nllf / ns : NAN;
    q->ppl = exp(q->nll);
    q->ppl_full = exp(q->nll_full);
    q->rise_pct = 100.0 * (q->ppl / q->ppl_full - 1.0);
    double kl = 0.0;
    for (int64_t i = 0; i < ls->scored; i++) kl += ls->kl[i];
    q->kl_mean = ns > 0 ? kl / ns : NAN;
    q->kl_p99 = percentile(ls->kl, ls->scored, 99.0);
    q->top1 = ns > 0 ? (double)ls->agree / ns : NAN;
    bootstrap(ls, q);
    q->f16_bytes_per_token = kvc_eval_f16_bytes_per_token(&c->shape);
    q->bytes_per_token = ls->mem_n ? ls->mem_bpt / ls->mem_n : NAN;
    q->compression = q->f16_bytes_per_token / q->bytes_per_token;
    q->kept_frac = ls->mem_n ? ls->mem_kept / ls->mem_n : NAN;
    q->removed_frac = ls->mem_n ? ls->mem_removed / ls->mem_n : NAN;
    q->seconds = kvc_now() - t0;
    q->seconds_cache = ls->t_cache;
}

/* Checks that both caches hold `need` tokens and the reference never evicts. */
static int check_caches(const kvc_cache *c, const kvc_cache *ref, int need, const char *what, kvc_err *err) {
    if (!c || !ref) return kvc_fail(err, "%s: a measured and a reference cache are needed", what);
    if (need > c->shape.max_tokens || need > ref->shape.max_tokens)
        return kvc_fail(err, "%s needs room for %d tokens; the caches hold %d and %d", what, need, c->shape.max_tokens,
                        ref->shape.max_tokens);
    if (ref->ops->set_budget) /* only caches that never evict lack it */
        return kvc_fail(err, "%s: the reference must be a cache that never evicts (kvc_cache_full_new)", what);
    return 0;
}

/* ============================================================ streaming perplexity ==== */

int kvc_eval_stream(const kvc_model *m, kvc_cache *c, kvc_cache *ref, const int32_t *tokens, int64_t n,
                const kvc_measure_opts *o, kvc_quality *q, kvc_err *err) {
    const int ctx = o->ctx > 0 ? o->ctx : 512;
    int chunk = o->chunk > 0 ? o->chunk : 32;
    if (chunk > ctx) chunk = ctx;
    memset(q, 0, sizeof *q);
    q->kept_scored = NAN;
    if (ctx < 2) return kvc_fail(err, "stream: the window must be at least 2 tokens, got %d", ctx);
    if (n < 2) return kvc_fail(err, "stream: need at least 2 tokens, got %lld", (long long)n);
    if (check_caches(c, ref, ctx, "stream", err)) return -1;
    /* predictions: every token but each window's first (a last window of 1 token is dropped) */
    int64_t planned = 0;
    for (int64_t w0 = 0; w0 < n; w0 += ctx) {
        int64_t len = n - w0 < ctx ? n - w0 : ctx;
        if (len >= 2) planned += len - 1;
    }
    lockstep ls;
    if (lockstep_init(&ls, m, chunk, chunk, planned, err)) return -1;
    int64_t rows = 0; /* logit rows the reference produces: every token fed */
    for (int64_t w0 = 0; w0 < n; w0 += ctx) rows += n - w0 < ctx ? (n - w0 >= 2 ? n - w0 : 0) : ctx;
    uint64_t key = fnv(1469598103934665603ull, "stream", 6);
    key = fnv(key, &ctx, sizeof ctx), key = fnv(key, &chunk, sizeof chunk), key = fnv(key, &n, sizeof n);
    key = fnv(key, tokens, (size_t)n * sizeof *tokens);
    ls.store = o->ref_store;
    ref_store_begin(ls.store, key, rows, m->hp.n_vocab);
    const double t0 = kvc_now();
    double kept_w = 0.0;
    int windows = 0, rc = 0;
    for (int64_t w0 = 0; w0 < n && rc == 0; w0 += ctx) {
        const int len = (int)(n - w0 < ctx ? n - w0 : ctx);
        if (len < 2) break;
        kvc_cache_reset(c);
        kvc_cache_reset(ref);
        if (kvc_cache_set_budget(c, ctx, err)) { rc = -1; break; }
        for (int b0 = 0; b0 < len; b0 += chunk) {
            const int nb = len - b0 < chunk ? len - b0 : chunk;
            /* row i predicts token b0 + i + 1 when it is inside the window */
            const int ns = b0 + nb < len ? nb : nb - 1;
            if (lockstep_feed(&ls, c, ref, tokens + w0 + b0, b0, nb, 1, err) ||
                lockstep_score(&ls, tokens + w0 + b0 + 1, ns, err)) {
                rc = -1;
                break;
            }
            double bpt, kept, removed;
            if (ns > 0 && kvc_eval_memory(c, &bpt, &kept, &removed)) kept_w += kept * ns;
            if (o->progress) kvc_progress_draw("stream", (double)(w0 + b0 + nb), (double)n, "tok", t0);
        }
        if (rc || (rc = lockstep_unit(&ls, err))) break;
        lockstep_memory(&ls, c);
        windows++;
    }
    if (o->progress) kvc_progress_end();
    ref_store_end(ls.store, rc == 0);
    lockstep_finish(&ls, c, windows, t0, q);
    q->kept_scored = ls.scored ? kept_w / (double)ls.scored : NAN;
    lockstep_free(&ls);
    return rc;
}

/* ============================================================ context compression ==== */

int kvc_eval_context(const kvc_model *m, kvc_cache *c, kvc_cache *ref, const int32_t *tokens, int64_t n,
                 const kvc_measure_opts *o, kvc_quality *q, kvc_err *err) {
    const int N = o->context_len > 0 ? o->context_len : 512, M = o->continuation > 0 ? o->continuation : 64;
    const int chunk = o->chunk > 0 ? o->chunk : 32, want = o->samples > 0 ? o->samples : 8;
    memset(q, 0, sizeof *q);
    q->kept_scored = NAN;
    if (M < 2) return kvc_fail(err, "context: the continuation must be at least 2 tokens, got %d", M);
    if (check_caches(c, ref, N + M, "context", err)) return -1;
    const int64_t avail = n / (N + M);
    if (avail < 1)
        return kvc_fail(err, "context: the text has %lld tokens; one sample needs %d (context %d + continuation %d)",
                        (long long)n, N + M, N, M);
    const int S = avail < want ? (int)avail : want;
    lockstep ls;
    if (lockstep_init(&ls, m, chunk > M ? chunk : M, M, (int64_t)S * (M - 1), err)) return -1;
    uint64_t key = fnv(1469598103934665603ull, "context", 7);
    key = fnv(key, &N, sizeof N), key = fnv(key, &M, sizeof M), key = fnv(key, &S, sizeof S);
    key = fnv(key, &chunk, sizeof chunk), key = fnv(key, tokens, (size_t)S * (N + M) * sizeof *tokens);
    ls.store = o->ref_store;
    ref_store_begin(ls.store, key, (int64_t)S * M, m->hp.n_vocab);
    const double t0 = kvc_now();
    int rc = 0, s = 0;
    for (; s < S && rc == 0; s++) {
        const int32_t *seg = tokens + (int64_t)s * (N + M);
        kvc_cache_reset(c);
        kvc_cache_reset(ref);
        if (kvc_cache_set_budget(c, -1, err)) { rc = -1; break; }
        for (int b0 = 0; b0 < N && rc == 0; b0 += chunk) {
            const int nb = N - b0 < chunk ? N - b0 : chunk;
            rc = lockstep_feed(&ls, c, ref, seg + b0, b0, nb, 0, err);
            if (o->progress) kvc_progress_draw("context", (double)s * (N + M) + b0 + nb, (double)S * (N + M), "tok", t0);
        }
        if (rc) break;
        /* one-shot compression of the context to the budget, then a frozen cache */
        double tc = kvc_now();
        if (kvc_cache_set_budget(c, N, err) || kvc_cache_end_step(c, err)) { rc = -1; break; }
        ls.t_cache += kvc_now() - tc;
        lockstep_memory(&ls, c);
        if (kvc_cache_set_budget(c, -1, err) || lockstep_feed(&ls, c, ref, seg + N, N, M, 1, err) ||
            lockstep_score(&ls, seg + N + 1, M - 1, err) || lockstep_unit(&ls, err)) {
            rc = -1;
            break;
        }
        if (o->progress) kvc_progress_draw("context", (double)(s + 1) * (N + M), (double)S * (N + M), "tok", t0);
    }
    if (o->progress) kvc_progress_end();
    ref_store_end(ls.store, rc == 0);
    lockstep_finish(&ls, c, s, t0, q);
    lockstep_free(&ls);
    return rc;
}
