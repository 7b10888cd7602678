/* multi_run.c - kvc_eval_multi from specs (the caches built and checked before any work) and
 * its results as CSV: one row per point, and per-sample sums for the bootstrap intervals. */
#include "kvc/eval.h"
#include "kvc/kvcache.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int kvc_eval_multi_run(const kvc_model *m, const int32_t *ids, int64_t n, const char *const *repr,
                       const char *const *keep, int n_points, int what, const kvc_multi_opts *o,
                       const kvc_backend *backend, kvc_multi_point *pts, char *desc, size_t desc_size, kvc_err *err) {
    static const int dl[] = {1024, 2048};
    const int *lens = o->n_lengths > 0 ? o->lengths : dl, nl = o->n_lengths > 0 ? o->n_lengths : 2;
    const int N = o->context_len > 0 ? o->context_len : 512, M = o->continuation > 0 ? o->continuation : 64;
    const int ctx = m->hp.n_ctx_train, gen = o->gen_tokens > 0 ? o->gen_tokens : 8;
    int need = 0, rc = 0;
    memset(pts, 0, (size_t)n_points * sizeof *pts);
    if (n_points < 1) return kvc_fail(err, "no point to measure");
    if (what & KVC_MULTI_CONTEXT) {
        if (N + M > ctx) return kvc_fail(err, "--context-len %d + --continuation %d exceed the model's context of %d", N, M, ctx);
        need = N + M;
    }
    if (what & (KVC_MULTI_PASSKEY | KVC_MULTI_FACTS))
        for (int i = 0; i < nl; i++) {
            if (lens[i] > ctx) return kvc_fail(err, "prompt length %d exceeds the model's context of %d tokens", lens[i], ctx);
            need = lens[i] + gen > need ? lens[i] + gen : need;
        }
    kvc_cache_shape shape = kvc_model_cache_shape(m, need);
    kvc_cache **c = calloc((size_t)n_points, sizeof *c), *ref = kvc_cache_full_new(&shape, err);
    if (!c || !ref) {
        free(c), kvc_cache_free(ref);
        return c ? -1 : kvc_fail(err, "out of memory");
    }
    kvc_cache_set_backend(ref, backend);
    kvc_err e1 = {{0}};
    for (int i = 0; i < n_points && !rc; i++) {
        if (!(c[i] = kvc_kvcache_new(&shape, repr[i], keep[i], m->fingerprint, &e1))) {
            rc = kvc_fail(err, "point %d (%s / %s): %s", i + 1, repr[i], keep[i], e1.msg);
            break;
        }
        kvc_cache_set_backend(c[i], backend);
        snprintf(desc + (size_t)i * desc_size, desc_size, "%s", kvc_kvcache_describe(c[i]));
        /* a budget that cannot fit fails now, not after the prefill */
        if ((what & KVC_MULTI_CONTEXT) && kvc_cache_set_budget(c[i], N, &e1))
            rc = kvc_fail(err, "point %d (%s), context of %d tokens: %s", i + 1, keep[i], N, e1.msg);
        for (int j = 0; !rc && (what & (KVC_MULTI_PASSKEY | KVC_MULTI_FACTS)) && j < nl; j++) {
            kvc_passkey_prompt p;
            int bad = kvc_passkey_build(m->tok, lens[j], 0.0, "12345", &p, &e1);
            if (!bad) {
                bad = kvc_cache_set_budget(c[i], p.n_context, &e1);
                kvc_passkey_prompt_free(&p);
            }
            if (bad) rc = kvc_fail(err, "point %d (%s), prompts of %d tokens: %s", i + 1, keep[i], lens[j], e1.msg);
        }
        if (!rc && kvc_cache_set_budget(c[i], -1, err)) rc = -1;
    }
    if (!rc) rc = kvc_eval_multi(m, c, n_points, ref, ids, n, what, o, pts, err);
    for (int i = 0; i < n_points; i++) kvc_cache_free(c[i]);
    free(c);
    kvc_cache_free(ref);
    return rc;
}

/* A number as CSV text ("" when not finite), in one of 16 rotating buffers. */
static const char *cv(double x) {
    static char buf[16][32];
    static int at;
    char *b = buf[at++ % 16];
    if (isfinite(x)) snprintf(b, 32, "%.6g", x);
    else b[0] = '\0';
    return b;
}

/* "1024:3/5;2048:1/5" (correct/trials per length, measured or full) into b. */
static void per_length(const kvc_passkey_result *r, int full, char *b, size_t cap) {
    size_t at = 0;
    b[0] = '\0';
    for (int i = 0; r->cells && i < r->n_cells; i++) {
        const int len = r->cells[i].length;
        int first = 1;
        for (int j = 0; j < i; j++) first &= r->cells[j].length != len;
        if (!first) continue;
        int ok = 0, tr = 0;
        for (int j = i; j < r->n_cells; j++)
            if (r->cells[j].length == len) ok += full ? r->cells[j].correct_full : r->cells[j].correct, tr += r->cells[j].trials;
        int w = snprintf(b + at, cap - at, "%s%d:%d/%d", at ? ";" : "", len, ok, tr);
        if (w < 0 || (size_t)w >= cap - at) break;
        at += (size_t)w;
    }
}

/* Opens path's temporary sibling for writing (name into tmp). */
static FILE *open_tmp(const char *path, char *tmp, size_t cap, kvc_err *err) {
    snprintf(tmp, cap, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) kvc_fail(err, "cannot write '%s': %s", tmp, strerror(errno));
    return f;
}

/* Flushes, syncs and renames a temporary file onto path. */
static int close_tmp(FILE *f, const char *tmp, const char *path, kvc_err *err) {
    int bad = ferror(f);
    bad |= fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return kvc_fail(err, "cannot write '%s': %s", path, strerror(e));
    }
    return 0;
}

int kvc_multi_write_csv(const char *path, const char *samples_path, const char *model, const char *text,
                        const kvc_multi_opts *o, int what, const char *const *repr, const char *const *keep,
                        const char *desc, size_t desc_size, const kvc_multi_point *pts, int n_points, kvc_err *err) {
    char tmp[4200];
    FILE *f = open_tmp(path, tmp, sizeof tmp, err);
    if (!f) return -1;
    fprintf(f, "model,text,repr,keep,cache,chunk,context_len,continuation,samples,n_scored,ppl,ppl_full,rise_pct,rise_lo,"
               "rise_hi,kl_mean,kl_lo,kl_hi,kl_p99,top1,kept_frac,bytes_per_token,ratio_vs_f16,side_ram_bpt,side_disk_bpt,"
               "retrieved_per_query,passkey_correct,passkey_trials,passkey_full,passkey_by_length,passkey_full_by_length,"
               "facts_correct,facts_trials,facts_full,facts_by_length,facts_full_by_length,seconds_cache\n");
    for (int i = 0; i < n_points; i++) {
        const kvc_multi_point *p = &pts[i];
        const kvc_quality *q = &p->context;
        const int ctx = (what & KVC_MULTI_CONTEXT) != 0;
        char pk[256], pkf[256], fa[256], faf[256];
        per_length(&p->passkey, 0, pk, sizeof pk), per_length(&p->passkey, 1, pkf, sizeof pkf);
        per_length(&p->facts, 0, fa, sizeof fa), per_length(&p->facts, 1, faf, sizeof faf);
        const double bpt = ctx ? q->bytes_per_token : p->passkey.trials ? p->passkey.bytes_per_token : p->facts.bytes_per_token;
        const double kept = ctx ? q->kept_frac : p->passkey.trials ? p->passkey.kept_frac : p->facts.kept_frac;
        fprintf(f, "\"%s\",\"%s\",\"%s\",\"%s\",\"%s\",%d,%d,%d,%d,%lld,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,"
                   "%d,%d,%d,%s,%s,%d,%d,%d,%s,%s,%.2f\n",
                model, text, repr[i], keep[i], desc + (size_t)i * desc_size, o->chunk, o->context_len, o->continuation,
                ctx ? q->n_units : 0, ctx ? (long long)q->n_scored : 0LL, cv(ctx ? q->ppl : NAN), cv(ctx ? q->ppl_full : NAN),
                cv(ctx ? q->rise_pct : NAN), cv(p->rise_ci[0]), cv(p->rise_ci[1]), cv(ctx ? q->kl_mean : NAN),
                cv(p->kl_ci[0]), cv(p->kl_ci[1]), cv(ctx ? q->kl_p99 : NAN), cv(ctx ? q->top1 : NAN), cv(kept), cv(bpt),
                cv(ctx ? q->compression : p->passkey.trials ? p->passkey.compression : p->facts.compression),
                cv(ctx ? p->side_ram_bpt : p->side_ram_bpt_pk), cv(ctx ? p->side_disk_bpt : p->side_disk_bpt_pk),
                cv(p->retrieved_per_query), p->passkey.correct, p->passkey.trials, p->passkey.correct_full, pk, pkf,
                p->facts.correct, p->facts.trials, p->facts.correct_full, fa, faf,
                q->seconds_cache + p->passkey.seconds_cache + p->facts.seconds_cache);
    }
    if (close_tmp(f, tmp, path, err)) return -1;
    if (!samples_path || !(what & KVC_MULTI_CONTEXT)) return 0;
    if (!(f = open_tmp(samples_path, tmp, sizeof tmp, err))) return -1;
    fprintf(f, "point,repr,keep,sample,scored,nll_sum,nll_full_sum,kl_sum,top1_agree\n");
    for (int i = 0; i < n_points; i++)
        for (int s = 0; s < pts[i].n_samples; s++)
            fprintf(f, "%d,\"%s\",\"%s\",%d,%d,%.9g,%.9g,%.9g,%d\n", i + 1, repr[i], keep[i], s, pts[i].s_scored[s],
                    pts[i].s_nll[s], pts[i].s_nll_full[s], pts[i].s_kl[s], pts[i].s_agree[s]);
    return close_tmp(f, tmp, samples_path, err);
}
