/* reuse.h - cross-layer KV reuse (KV-CAR): how well layer l's keys/values of a KV head are
 * predicted from layer l-1's (identity, or a least-squares linear map fitted on training rows
 * and measured on validation rows), which items to reuse, and applying a map (CPU reference).
 * Letters: L model layers, Hk KV heads, D head_dim, N rows. Matrices are row-major. */
#ifndef KVC_REUSE_H
#define KVC_REUSE_H

#include <stdio.h>

#include "kvc/common.h"
#include "kvc/dataset.h" /* KV_K, KV_V */

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

/* x_l_hat = W x_{l-1} + b for n rows: dst row i (at dst + i*ld_dst) from src row i (at
 * src + i*ld_src); w (D, D) (out, in), b (D). src and dst must not overlap. The CPU reference
 * for inference (float accumulation, vectorised over the D inputs). */
void kvc_reuse_apply(int d, const float *w, const float *b, const float *src, int64_t ld_src, float *dst,
                 int64_t ld_dst, int64_t n);

/* ---- a model's plan ---------------------------------------------------------------- */

typedef enum { REUSE_NONE = 0, REUSE_IDENTITY = 1, REUSE_LINEAR = 2 } reuse_choice;
/* "none", "identity", "linear" (checkpoints store these names); "?" when out of range. */
const char *kvc_reuse_choice_name(reuse_choice c);
/* Parses one of those names into *out; -1 if unknown. */
int kvc_reuse_choice_parse(const char *s, reuse_choice *out);

/* Layer l, KV head h, K or V: predicted from the same head and kind of layer l-1. */
typedef struct {
    int layer;           /* l, 1 .. L-1 */
    int head;            /* 0 .. Hk-1 */
    int kind;            /* KV_K or KV_V */
    int analysed;        /* 1 when the fields below were measured (layers l-1 and l both stored) */
    int64_t n_train, n_val;
    double cos_identity; /* mean cosine of rows of x_l and x_{l-1} (validation) */
    double err_identity; /* ||x_l - x_{l-1}||_F / ||x_l||_F (validation) */
    double err_linear;   /* ||x_l - (W x_{l-1} + b)||_F / ||x_l||_F (validation) */
    reuse_choice chosen;
    float *w;            /* (D, D) (out, in), points into the plan */
    float *b;            /* (D), points into the plan */
} reuse_item;

/* Which items to reuse. THRESHOLD: every analysed item whose best error is <= threshold.
 * HEADS: the `heads` analysed items with the smallest best error (ties: lower layer, then
 * head, then K before V). The best error is min(err_linear, err_identity); identity is chosen
 * when err_identity <= err_linear (as good, and needs no map), linear otherwise. */
typedef enum { REUSE_BY_THRESHOLD = 0, REUSE_BY_HEADS = 1 } reuse_mode;
typedef struct {
    reuse_mode mode;
    double threshold; /* > 0 */
    int heads;        /* >= 0 */
} reuse_option;

/* Parses "threshold=X" (X finite, > 0) or "heads=N" (integer N >= 0); -1 with err otherwise.
 * Whether N items exist is checked by kvc_reuse_plan_choose. */
int kvc_reuse_option_parse(const char *s, reuse_option *o, kvc_err *err);
/* Writes the canonical text of o ("threshold=0.2", "heads=12") into buf (size >= 40); it
 * parses back to the same option. */
void kvc_reuse_option_format(const reuse_option *o, char *buf, size_t size);

typedef struct {
    int n_layer, n_head_kv, head_dim; /* L, Hk, D */
    int n_items;                      /* (L-1) * Hk * 2 */
    reuse_item *items;                /* (L-1, Hk, 2): index ((l-1)*Hk + h)*2 + kind */
    float *maps;                      /* (n_items, D*D + D): each item's w then b */
    signed char *stored;              /* (L) layer captured in the analysed dataset: 1, 0, or -1 unknown */
    double ridge;                     /* ridge the maps were fitted with (NaN until solved) */
    int chosen_set;                   /* 1 after kvc_reuse_plan_choose */
    reuse_option option;              /* the option of the last kvc_reuse_plan_choose */
} reuse_plan;

/* An empty plan: no item analysed, all chosen NONE, maps zero, stored unknown. L >= 2,
 * Hk >= 1, D >= 1. A checkpoint reader fills items and maps directly. */
reuse_plan *kvc_reuse_plan_new(int n_layer, int n_head_kv, int head_dim, kvc_err *err);
void kvc_reuse_plan_free(reuse_plan *p); /* NULL is fine */
/* The item for (layer, head, kind), or NULL if out of range (layer 0 has none). */
reuse_item *kvc_reuse_plan_item(reuse_plan *p, int layer, int head, int kind);
/* Returns the number of items analysed; also stores it and the numbers chosen as identity /
 * linear through the pointers (any may be NULL). */
int kvc_reuse_plan_count(const reuse_plan *p, int *n_analysed, int *n_identity, int *n_linear);
/* Sets every item's `chosen` by the option; clears earlier choices. -1 with err when
 * heads=N asks for more items than were analysed. */
int kvc_reuse_plan_choose(reuse_plan *p, const reuse_option *o, kvc_err *err);
/* Prints the layer x head table: rows layers 1..L-1, per KV head a K and a V column with
 * the best error, marked L (linear map chosen) or I (identity chosen); then a legend and
 * counts. Layers not analysed say why. */
void kvc_reuse_plan_print(const reuse_plan *p, FILE *fp);
/* dst = the chosen prediction of item it from src (strides as in kvc_reuse_apply): a copy for
 * IDENTITY, W src + b for LINEAR. -1 (nothing written) for NONE. */
int kvc_reuse_item_predict(const reuse_plan *p, const reuse_item *it, const float *src, int64_t ld_src, float *dst,
                       int64_t ld_dst, int64_t n);

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
