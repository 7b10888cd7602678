/* perplexity.c - perplexity over a token stream in fixed windows (protocol in kvc/eval.h),
 * plus the progress line shared by long-running commands. */
#include "kvc/eval.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

int kvc_eval_perplexity(const kvc_model *m, kvc_cache *c, const int32_t *tokens, int64_t n, const kvc_ppl_opts *opts,
                    kvc_ppl_result *res, kvc_err *err) {
    const int ctx = opts->ctx, V = m->hp.n_vocab;
    const int batch = opts->batch > 0 ? (opts->batch < ctx ? opts->batch : ctx) : (ctx < 512 ? ctx : 512);
    if (ctx < 2) return kvc_fail(err, "context length must be at least 2, got %d", ctx);
    if (ctx > c->shape.max_tokens) return kvc_fail(err, "context %d exceeds the cache capacity %d", ctx, c->shape.max_tokens);
    if (n < 2) return kvc_fail(err, "need at least 2 tokens to measure perplexity, got %lld", (long long)n);
    kvc_run *r = kvc_run_new(m, batch, err);
    float *logits = kvc_malloc_array((size_t)batch * V, sizeof(float));
    int32_t *pos = kvc_malloc_array((size_t)batch, sizeof(int32_t));
    if (!r || !logits || !pos) {
        kvc_run_free(r); free(logits); free(pos);
        return kvc_fail(err, "out of memory for perplexity buffers");
    }
    *res = (kvc_ppl_result){0};
    double t0 = kvc_now();
    int rc = 0;
    for (int64_t w0 = 0; w0 < n && rc == 0; w0 += ctx) {
        int len = (int)(n - w0 < ctx ? n - w0 : ctx);
        if (len < 2) break;
        kvc_cache_reset(c);
        for (int b0 = 0; b0 < len; b0 += batch) {
            int nb = len - b0 < batch ? len - b0 : batch;
            for (int i = 0; i < nb; i++) pos[i] = b0 + i;
            if (kvc_model_forward(m, r, c, tokens + w0 + b0, pos, nb, logits, 1, err)) { rc = -1; break; }
            /* row i predicts token w0 + b0 + i + 1 when that token is inside the window */
            for (int i = 0; i < nb && b0 + i + 1 < len; i++) {
                const float *row = logits + (size_t)i * V;
                float mx = row[0];
                for (int j = 1; j < V; j++) mx = row[j] > mx ? row[j] : mx;
                double s = 0.0;
                for (int j = 0; j < V; j++) s += exp((double)(row[j] - mx));
                int32_t tgt = tokens[w0 + b0 + i + 1];
                double nll = (double)mx + log(s) - (double)row[tgt];
                if (!isfinite(nll)) { rc = kvc_fail(err, "non-finite log-likelihood at token %lld", (long long)(w0 + b0 + i + 1)); break; }
                res->nll += nll;
                res->n_scored++;
            }
            res->n_tokens += nb;
            if (rc) break;
            if (opts->progress) kvc_progress_draw("ppl", (double)res->n_tokens, (double)n, "tok", t0);
        }
        res->n_windows++;
    }
    if (opts->progress) kvc_progress_end();
    res->seconds = kvc_now() - t0;
    res->ppl = res->n_scored ? exp(res->nll / (double)res->n_scored) : NAN;
    kvc_run_free(r);
    free(logits);
    free(pos);
    return rc;
}
