/* kernels.h - compute primitives shared by every cache, the runtime and the codec library:
 * each is ONE compiled function, so two callers that feed it the same numbers get the same
 * bits back on any target (docs/portability.md). CUDA twins are declared in kvc/ops_cuda.h.
 * Letters: N rows, T keys, D head_dim, H heads. */
#ifndef KVC_KERNELS_H
#define KVC_KERNELS_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- RoPE ------------------------------------------------------------------------------
 * Rotation of adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/D), the GGUF layout, read
 * from a table of cosines and signed sines by position (grown on demand). */
typedef struct {
    float *cs;   /* (n, 2, D): per position D cosines (each pair's twice), then D signed sines */
    int64_t n;   /* positions covered: [0, n) */
    int d;
    float base;
} kvc_rope_table;

/* An empty table for head_dim d (even, >= 2) and frequency base (> 0); -1 if either is bad. */
int kvc_rope_table_init(kvc_rope_table *t, int d, float base);
/* Covers positions [0, n_pos); -1 when out of memory (the table is unchanged). */
int kvc_rope_table_reserve(kvc_rope_table *t, int64_t n_pos);
void kvc_rope_table_free(kvc_rope_table *t);
/* y (N rows, ldy apart) = x (N rows of D, ldx apart) rotated by positions pos (N), every
 * pos < t->n. y may equal x. */
void kvc_rope_rows(const kvc_rope_table *t, const float *x, int64_t ldx, const int32_t *pos, int64_t n, float *y,
                   int64_t ldy);
/* In place on x (N, H, D): every head of token i rotated by pos[i]. */
void kvc_rope_heads(const kvc_rope_table *t, float *x, const int32_t *pos, int64_t n, int h);
/* kvc_rope_heads with a table made for this call (for one-off use: a cache keeps its table).
 * -1 on a bad d or base, a negative position, or no memory. */
int kvc_rope_apply(float *x, const int32_t *pos, int64_t n, int h, int d, float base);

/* ---- attention -------------------------------------------------------------------------- */

/* a . b over d floats, summed in a fixed order (the same bits on every target). */
float kvc_dot_f32(const float *a, const float *b, int d);

/* One query head qh (D) at position qpos over T keys k (rows ldk floats apart, after RoPE) at
 * positions kpos (token j visible when kpos[j] <= qpos), scale applied to the dot products;
 * values v (rows ldv apart), or NULL for the weights only. On return sc (T) holds the softmax
 * weights (0 where not visible) and o (D), when not NULL, the weighted sum of values (zeros
 * when nothing is visible). Returns 1, or 0 when no key was visible. */
float kvc_attn_row(const float *qh, const float *k, size_t ldk, const float *v, size_t ldv, const int32_t *kpos,
                   int64_t t, int32_t qpos, int d, float scale, float *sc, float *o);

#ifdef __cplusplus
}
#endif
#endif
