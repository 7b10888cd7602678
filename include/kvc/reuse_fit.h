/* reuse_fit.h - fitting cross-layer KV reuse on a KV dataset (train layer): streaming
 * least-squares maps dst ~= W src + b per (layer, head, K|V), their validation statistics, and
 * the analysis that fills a reuse plan (kvc/reuse.h) from batches of a dataset.
 * Letters: L model layers, Hk KV heads, D head_dim, N rows. Matrices are row-major. */
#ifndef KVC_REUSE_FIT_H
#define KVC_REUSE_FIT_H

#include "kvc/reuse.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Default ridge, relative: the fit adds lambda*I to the centred source covariance with
 * lambda = ridge * trace(Cxx) / D, i.e. ridge times the mean per-dimension variance (times N),
 * so it does not depend on the scale of the data; the bias is not penalised. */
#define REUSE_RIDGE_DEFAULT 1e-4

/* ---- one map: dst ~= W src + b ----------------------------------------------------- */

/* Streaming least squares for one (layer, head, kind): running means and centred
 * (co)variances in double, merged batch by batch (Chan et al.), so the result does not
 * depend on how the rows were split into batches (up to rounding). */
typedef struct reuse_fit reuse_fit;

/* An empty accumulator for D-dimensional rows (with its own scratch, ~16 KiB x D). */
reuse_fit *kvc_reuse_fit_new(int d, kvc_err *err);
void kvc_reuse_fit_free(reuse_fit *f);
/* Adds n row pairs: row i of src at src + i*ld_src, of dst at dst + i*ld_dst, D floats
 * each (ld = D for (N, D) arrays; ld = Hk*D with src + h*D for head h of (N, Hk, D)). */
void kvc_reuse_fit_add(reuse_fit *f, const float *src, int64_t ld_src, const float *dst, int64_t ld_dst,
                   int64_t n);
int64_t kvc_reuse_fit_rows(const reuse_fit *f); /* rows added so far */
/* Solves (Cxx + lambda I) W^T = Cxy (lambda from ridge as above; Cholesky in double) and
 * b = mean(dst) - W mean(src), writing w (D, D) (out, in) and b (D). When src does not vary at
 * all, W = 0 and b = mean(dst). -1 with err when no rows were added, ridge < 0, or the
 * system is singular (ridge 0 with rank-deficient src). */
int kvc_reuse_fit_solve(const reuse_fit *f, double ridge, float *w, float *b, kvc_err *err);

/* Streaming validation statistics of one item: identity (dst ~= src) and, when a map is
 * given, linear (dst ~= W src + b). Zero-initialise (`reuse_eval e = {0};`). */
typedef struct {
    int64_t n;           /* rows */
    double sum_cos;      /* sum over rows of cos(src_i, dst_i) (1 when both are zero, 0 when one is) */
    double sq_dst;       /* sum |dst_i|^2 */
    double sq_identity;  /* sum |dst_i - src_i|^2 */
    double sq_linear;    /* sum |dst_i - (W src_i + b)|^2 */
} reuse_eval;

/* Adds n row pairs (strides as in kvc_reuse_fit_add). w (D, D) and b (D) may be NULL: identity
 * statistics only. */
void kvc_reuse_eval_add(reuse_eval *e, int d, const float *src, int64_t ld_src, const float *dst, int64_t ld_dst,
                    int64_t n, const float *w, const float *b);
/* Mean cosine, ||dst - src||_F / ||dst||_F and ||dst - (W src + b)||_F / ||dst||_F (0/0 = 0,
 * x/0 = inf); any output may be NULL. */
void kvc_reuse_eval_result(const reuse_eval *e, double *cos_identity, double *err_identity, double *err_linear);

/* ---- analysing a dataset ----------------------------------------------------------- */

/* The streaming analysis of a plan over batches laid out as kvc_batch gives them:
 * x[j*3 + kind] is (n, Hk, D) for stored layer j (layers[j] its model layer, ascending).
 * Only model layers l with l-1 also stored are analysed; the rest stay analysed = 0 and
 * kvc_reuse_plan_print names the missing layer. Order: add_train..., solve, add_val...,
 * finish. */
typedef struct reuse_analysis reuse_analysis;

/* Marks p->stored from layers, clears the plan's results and choices, and prepares the
 * accumulators. NULL with err when layers are out of the plan's range, not ascending, or hold
 * no consecutive pair. The plan must outlive the analysis. */
reuse_analysis *kvc_reuse_analysis_new(reuse_plan *p, const int *layers, int n_stored, kvc_err *err);
void kvc_reuse_analysis_free(reuse_analysis *a); /* NULL is fine */
/* Number of layer pairs (l-1, l) analysed. */
int kvc_reuse_analysis_pairs(const reuse_analysis *a);
/* Sets want[j*3 + kind] (n_stored*3 entries) to 1 for the K and V of every stored layer
 * the analysis reads and 0 otherwise, for kvc_batch_opts.want. */
void kvc_reuse_analysis_want(const reuse_analysis *a, unsigned char *want);
/* Adds n training rows to every pair's fit. -1 with err if a needed x[j*3+kind] is NULL or
 * the maps were already solved. */
int kvc_reuse_analysis_add_train(reuse_analysis *a, const float *const *x, int n, kvc_err *err);
/* Fits every pair's map (kvc_reuse_fit_solve) into the plan; p->ridge = ridge. */
int kvc_reuse_analysis_solve(reuse_analysis *a, double ridge, kvc_err *err);
/* Adds n validation rows to every pair's statistics (after solve). */
int kvc_reuse_analysis_add_val(reuse_analysis *a, const float *const *x, int n, kvc_err *err);
/* Writes cos/err and row counts into the plan's items and marks them analysed. -1 with err
 * if solve was not called or no validation rows were added. */
int kvc_reuse_analysis_finish(reuse_analysis *a, kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
