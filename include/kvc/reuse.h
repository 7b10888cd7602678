/* reuse.h - cross-layer KV reuse (KV-CAR), the inference half (codec layer): a model's plan of
 * which layer's keys/values of a KV head are predicted from layer l-1's (identity, or a linear
 * map with its measured errors), choosing it, and applying a map. Fitting the maps on a
 * dataset is kvc/reuse_fit.h (train layer).
 * Letters: L model layers, Hk KV heads, D head_dim, N rows. Matrices are row-major. */
#ifndef KVC_REUSE_H
#define KVC_REUSE_H

#include <stdio.h>

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif


/* x_l_hat = W x_{l-1} + b for n rows: dst row i (at dst + i*ld_dst) from src row i (at
 * src + i*ld_src); w (D, D) (out, in), b (D). src and dst must not overlap. The CPU reference
 * for inference (each output one kvc_dot_f32: the same bits on every target). */
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

#ifdef __cplusplus
}
#endif
#endif
