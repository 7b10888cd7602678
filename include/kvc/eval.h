/* eval.h - quality measurements over text: perplexity with a stated protocol. */
#ifndef KVC_EVAL_H
#define KVC_EVAL_H

#include "kvc/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int ctx;        /* window length in tokens */
    int batch;      /* tokens per forward call */
    int progress;   /* 1: progress bar with ETA on stderr */
} kvc_ppl_opts;

typedef struct {
    int64_t n_tokens;  /* tokens evaluated (windows included) */
    int64_t n_scored;  /* predictions scored */
    int n_windows;
    double nll;        /* summed negative log-likelihood (nats) */
    double ppl;        /* exp(nll / n_scored) */
    double seconds;
} kvc_ppl_result;

/* Perplexity protocol: tokens are split into consecutive, non-overlapping windows of
 * opts->ctx tokens (a final window shorter than 2 tokens is dropped); each window starts
 * from an empty cache (cache_reset, no BOS added) and every token but its first is scored
 * from the window's tokens before it. The cache must hold at least ctx tokens.
 * Returns 0 or -1 with err. */
int eval_perplexity(const kvc_model *m, kvc_cache *c, const int32_t *tokens, int64_t n,
                    const kvc_ppl_opts *opts, kvc_ppl_result *res, kvc_err *err);

/* Draws a progress line "label [####    ] done/total unit  rate  ETA" on stderr. */
void progress_draw(const char *label, double done, double total, const char *unit, double t0);
void progress_end(void);

#ifdef __cplusplus
}
#endif
#endif
