/* eval_run.c - `kvcodec eval` as a library call: checks every setting against the model
 * before any work, builds the compressed cache and the full-precision reference, runs the
 * chosen measuring protocols (DESIGN.md section 5) and writes the report as JSON. */
#include "kvc/eval.h"
#include "kvc/kvcache.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A number as JSON text ("null" when not finite), in one of 24 rotating static buffers so a
 * single fprintf may hold many. */
static const char *jv(double x) {
    static char buf[24][32];
    static int at;
    char *b = buf[at++ % 24];
    if (isfinite(x)) snprintf(b, 32, "%.9g", x);
    else snprintf(b, 32, "null");
    return b;
}

/* A string as JSON text (quoted, escaped), in one of 8 rotating static buffers (long
 * strings are cut at 1000 bytes). */
static const char *js(const char *s) {
    static char buf[8][2048];
    static int at;
    char *b = buf[at++ % 8];
    size_t w = 0;
    b[w++] = '"';
    for (size_t i = 0; s && s[i] && w < 2000 && i < 1000; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') { b[w++] = '\\'; b[w++] = (char)ch; }
        else if (ch < 0x20) w += (size_t)snprintf(b + w, 8, "\\u%04x", ch);
        else b[w++] = (char)ch;
    }
    b[w++] = '"';
    b[w] = '\0';
    return b;
}

/* Writes one measure's figures as a JSON object member. */
static void json_quality(FILE *f, const char *name, const kvc_quality *q, int last) {
    fprintf(f,
            "  \"%s\": {\"tokens\": %lld, \"scored\": %lld, \"units\": %d, \"nll\": %s, \"nll_full\": %s, "
            "\"ppl\": %s, \"ppl_full\": %s, \"rise_pct\": %s, \"kl_mean\": %s, \"kl_p99\": %s, \"top1\": %s, "
            "\"bytes_per_token\": %s, \"f16_bytes_per_token\": %s, \"compression_vs_f16\": %s, \"kept_frac\": %s, "
            "\"removed_frac\": %s, \"kept_frac_scored\": %s, \"seconds\": %.3f, \"seconds_cache\": %.3f, "
            "\"tokens_per_s\": %.2f, \"rise_pct_ci95\": [%s, %s], \"kl_mean_ci95\": [%s, %s]}%s\n",
            name, (long long)q->n_tokens, (long long)q->n_scored, q->n_units, jv(q->nll), jv(q->nll_full), jv(q->ppl),
            jv(q->ppl_full), jv(q->rise_pct), jv(q->kl_mean), jv(q->kl_p99), jv(q->top1), jv(q->bytes_per_token),
            jv(q->f16_bytes_per_token), jv(q->compression), jv(q->kept_frac), jv(q->removed_frac),
            jv(q->kept_scored), q->seconds, q->seconds_cache,
            q->seconds_cache > 0 ? q->n_tokens / q->seconds_cache : 0.0, jv(q->rise_lo), jv(q->rise_hi), jv(q->kl_lo),
            jv(q->kl_hi), last ? "" : ",");
}

int kvc_eval_run(const kvc_model *m, const int32_t *ids, int64_t n, const kvc_eval_run_opts *o, kvc_eval_report *rep,
                 kvc_err *err) {
    const int ctx_train = m->hp.n_ctx_train, explicit_len = o->explicit_lengths;
    const int set = o->set, ctx = o->ctx, chunk = o->chunk, clen = o->context_len, cont = o->continuation;
    const int n_len = o->n_lengths, *lens = o->lengths;
    kvc_cache *c = NULL, *ref = NULL;
    int need = 0, status = -1;
    kvc_err e1 = {{0}};
    memset(rep, 0, sizeof *rep);
    rep->model = m->hp.name, rep->fingerprint = m->fingerprint, rep->text = o->text, rep->repr = o->repr;
    rep->keep = o->keep, rep->ctx = ctx, rep->chunk = chunk, rep->context_len = clen, rep->continuation = cont;
    rep->threads = o->threads, rep->set = set, rep->tokens = n;
    /* ---- checks before anything runs ---- */
    if ((set & KVC_M_STREAM) && ctx > ctx_train) {
        kvc_fail(err, "--ctx %d exceeds the model's context of %d tokens", ctx, ctx_train);
        goto done;
    }
    if ((set & KVC_M_CONTEXT) && clen + cont > ctx_train) {
        kvc_fail(err, "--context-len %d + --continuation %d exceed the model's context of %d tokens", clen, cont,
                 ctx_train);
        goto done;
    }
    if (set & KVC_M_STREAM) need = ctx;
    if ((set & KVC_M_CONTEXT) && clen + cont > need) need = clen + cont;
    if (set & KVC_M_PASSKEY)
        for (int i = 0; i < n_len; i++) {
            if (lens[i] > ctx_train && explicit_len) {
                kvc_fail(err, "--passkey-lengths %d exceeds the model's context of %d tokens", lens[i], ctx_train);
                goto done;
            }
            if (lens[i] > ctx_train)
                fprintf(stderr, "kvcodec eval: note: passkey length %d skipped (model context %d)\n", lens[i], ctx_train);
            else if (lens[i] + 8 > need) need = lens[i] + 8;
        }
    kvc_cache_shape shape = kvc_model_cache_shape(m, need);
    if (!(c = kvc_kvcache_new(&shape, o->repr, o->keep, m->fingerprint, err)) || !(ref = kvc_cache_full_new(&shape, err)))
        goto done;
    kvc_cache_set_backend(c, o->backend);
    kvc_cache_set_backend(ref, o->backend);
    snprintf(rep->cache, sizeof rep->cache, "%s", kvc_kvcache_describe(c));
    /* a budget that cannot fit fails here, not after minutes of work */
    if ((set & KVC_M_STREAM) && kvc_cache_set_budget(c, ctx, &e1)) {
        kvc_fail(err, "stream window %d: %s", ctx, e1.msg);
        goto done;
    }
    if ((set & KVC_M_CONTEXT) && kvc_cache_set_budget(c, clen, &e1)) {
        kvc_fail(err, "context of %d tokens: %s", clen, e1.msg);
        goto done;
    }
    for (int i = 0; (set & KVC_M_PASSKEY) && i < n_len; i++) {
        kvc_passkey_prompt p;
        if (lens[i] > ctx_train) continue;
        int bad = kvc_passkey_build(m->tok, lens[i], 0.0, "12345", &p, &e1);
        if (!bad) {
            bad = kvc_cache_set_budget(c, p.n_context, &e1);
            kvc_passkey_prompt_free(&p);
        }
        if (bad) {
            kvc_fail(err, "passkey length %d: %s", lens[i], e1.msg);
            goto done;
        }
    }
    if (kvc_cache_set_budget(c, -1, err)) goto done;
    kvc_measure_opts mo = {ctx, chunk, clen, cont, o->samples, o->progress, NULL};
    if ((set & KVC_M_STREAM) && kvc_eval_stream(m, c, ref, ids, n, &mo, &rep->stream, &e1)) {
        kvc_fail(err, "stream: %s", e1.msg);
        goto done;
    }
    if ((set & KVC_M_CONTEXT) && kvc_eval_context(m, c, ref, ids, n, &mo, &rep->context, err)) goto done;
    kvc_passkey_opts po = {o->lengths, n_len, o->depths, o->n_depths, o->trials, o->seed, chunk, 8, o->progress};
    if ((set & KVC_M_PASSKEY) && kvc_eval_passkey(m, c, ref, &po, &rep->pk, &e1)) {
        kvc_fail(err, "passkey: %s", e1.msg);
        goto done;
    }
    status = 0;
done:
    kvc_cache_free(c);
    kvc_cache_free(ref);
    return status;
}

int kvc_eval_report_json(const char *path, const kvc_eval_report *r, kvc_err *err) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return kvc_fail(err, "cannot write '%s': %s", tmp, strerror(errno));
    fprintf(f,
            "{\n  \"model\": %s, \"fingerprint\": %s, \"text\": %s, \"tokens\": %lld,\n"
            "  \"cache\": %s, \"repr\": %s, \"keep\": %s, \"threads\": %d,\n"
            "  \"ctx\": %d, \"chunk\": %d, \"context_len\": %d, \"continuation\": %d,\n",
            js(r->model), js(r->fingerprint), js(r->text), (long long)r->tokens, js(r->cache), js(r->repr), js(r->keep),
            r->threads, r->ctx,
            r->chunk, r->context_len, r->continuation);
    if (r->set & KVC_M_STREAM) json_quality(f, "stream", &r->stream, 0);
    if (r->set & KVC_M_CONTEXT) json_quality(f, "context", &r->context, 0);
    if (r->set & KVC_M_PASSKEY) {
        const kvc_passkey_result *p = &r->pk;
        fprintf(f,
                "  \"passkey\": {\"trials\": %d, \"correct\": %d, \"correct_full\": %d, \"bytes_per_token\": %s, "
                "\"compression_vs_f16\": %s, \"kept_frac\": %s, \"removed_frac\": %s, \"seconds\": %.3f, "
                "\"tokens_per_s\": %.2f, \"cells\": [",
                p->trials, p->correct, p->correct_full, jv(p->bytes_per_token), jv(p->compression),
                jv(p->kept_frac), jv(p->removed_frac), p->seconds,
                p->seconds_cache > 0 ? p->n_tokens / p->seconds_cache : 0.0);
        for (int i = 0; i < p->n_cells; i++)
            fprintf(f, "%s\n    {\"length\": %d, \"depth\": %g, \"skipped\": %s, \"trials\": %d, \"correct\": %d, "
                       "\"correct_full\": %d, \"last_answer\": %s}",
                    i ? "," : "", p->cells[i].length, p->cells[i].depth, p->cells[i].skipped ? "true" : "false",
                    p->cells[i].trials, p->cells[i].correct, p->cells[i].correct_full, js(p->cells[i].last_answer));
        fprintf(f, "]},\n");
    }
    fprintf(f, "  \"protocol\": \"DESIGN.md section 5; KL(P_full || P_cache) in nats; compression = f16 bytes / bytes\"\n}\n");
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

void kvc_eval_report_free(kvc_eval_report *rep) { kvc_passkey_result_free(&rep->pk); }
