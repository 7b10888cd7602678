/* kernels.h - the compute primitives every cache, the runtime, the trainer and the codec
 * library share: each is ONE compiled function (kernels/), so two callers that feed it the
 * same numbers get the same bits back on any target (docs/portability.md). Their CUDA twins
 * (kvc/ops_cuda.h) take the same arguments; kvc/backend.h chooses between the two.
 * Letters: N rows, T keys, D head_dim, G query heads per KV head, Q query tokens, R latent
 * width, I/O layer input/output width. Row-major throughout. */
#ifndef KVC_KERNELS_H
#define KVC_KERNELS_H

#include <math.h>

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

/* An empty table for head_dim d (even, >= 2) and frequency base (finite, > 0); -1 if either
 * is bad. */
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

/* What one KV head holds, as attention reads it. Keys k (T rows, ldk floats apart, after
 * RoPE) at positions pos (T; key j is visible to a query at position p when pos[j] <= p;
 * need not be sorted). Values: rows [0, ne) as latents z (ne, R) of a linear decoder
 * y = W z + b (W (D, R), b (D) or NULL), rows [ne, T) exact in v (T - ne rows, ldv apart);
 * ne = 0 for exact values only. v may be NULL when ne == T or when only weights are wanted. */
typedef struct {
    int64_t t;
    const float *k;
    int64_t ldk;
    const int32_t *pos;
    int64_t ne;
    const float *z;
    int r;
    const float *w;
    const float *b;
    const float *v;
    int64_t ldv;
} kvc_attn_kv;

/* Causal attention of one KV head's G query heads for Q query tokens: q (Q rows of G*D
 * floats, ldq apart: token t's head g at q + t*ldq + g*D) at positions qpos (Q), scale
 * 1/sqrt(D), into out (same layout, ldo apart). Two passes per row: scores (kvc_dot_f32),
 * softmax in float, then the weighted sum of values, exact rows in key order and latent rows
 * through W once: out = W (sum_j<ne a_j z_j) + b (sum_j<ne a_j) + sum_j>=ne a_j v_j. A query
 * that sees no key gets a zero output. probs (Q, G, T), when not NULL, receives the softmax
 * weights (0 where not visible). sc: scratch of T + R floats, or NULL to allocate. Single
 * threaded: callers split heads and tokens over threads. Returns 0, or -1 only when sc is
 * NULL and T + R floats cannot be allocated. */
int kvc_attend(const float *q, int64_t ldq, const int32_t *qpos, int n_q, int g, int d, const kvc_attn_kv *kv,
               float *out, int64_t ldo, float *probs, float *sc);

/* ---- dense layers (codec encoders/decoders) --------------------------------------------- */

typedef enum { KVC_ACT_NONE = 0, KVC_ACT_RELU, KVC_ACT_LEAKY_RELU, KVC_ACT_GELU, KVC_ACT_SILU, KVC_ACT_COUNT } kvc_act;

#define KVC_GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define KVC_GELU_C 0.044715f

#ifdef __CUDACC__
#define KVC_HOST_DEVICE __host__ __device__
#else
#define KVC_HOST_DEVICE
#endif

/* The activation formulas of every codec (the trainer's forward, exported layers, the cache,
 * and the CUDA twins, which compile this same definition for the device): ReLU keeping NaN,
 * LeakyReLU, tanh-form GELU (as nn.GELU(approximate='tanh')), SiLU. */
static inline KVC_HOST_DEVICE float kvc_act_apply(float a, int act, float slope) {
    switch (act) {
    case KVC_ACT_RELU: return a > 0 ? a : 0.0f * a; /* 0 * a keeps NaN */
    case KVC_ACT_LEAKY_RELU: return a > 0 ? a : slope * a;
    case KVC_ACT_GELU: return 0.5f * a * (1.0f + tanhf(KVC_GELU_K * (a + KVC_GELU_C * a * a * a)));
    case KVC_ACT_SILU: return a / (1.0f + expf(-a));
    default: return a;
    }
}

/* y (N, O) = act(x (N, I) W^T + b) with W (O, I), b (O) or NULL, slope the LeakyReLU slope.
 * OpenBLAS GEMMs over blocks of rows. */
void kvc_dense_rows(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act, float slope,
                    float *y);

/* ---- scalar codebooks (the transform codec's quantizer) --------------------------------- */

/* Component c of a row (of C) is coded on bits[c] in [0, 8] bits as the index of its nearest
 * level among levels[off[c] .. off[c] + 2^bits[c]) (ascending); 0 bits: not stored, decoded as
 * 0. A row's indices are packed low bit first, component by component, into row_bytes
 * bytes. */
typedef struct {
    int c;
    const uint8_t *bits;   /* (C) */
    const float *levels;   /* every component's levels, ascending within a component */
    const int32_t *off;    /* (C) */
    int row_bytes;         /* kvc_codebook_row_bytes(bits, c) */
} kvc_codebook;

/* ceil(sum bits / 8). */
int kvc_codebook_row_bytes(const uint8_t *bits, int c);
/* codes (N, row_bytes) for rows y (N, C; ldy floats apart): nearest level, ties to the lower
 * one (the midpoint rounds down); NaN codes as 0. */
void kvc_codebook_quantize(const kvc_codebook *cb, const float *y, int64_t n, int64_t ldy, uint8_t *codes);
/* y (N, C; ldy apart) = the levels the codes name (0 for components of 0 bits). */
void kvc_codebook_dequantize(const kvc_codebook *cb, const uint8_t *codes, int64_t n, float *y, int64_t ldy);

/* ---- eviction top-k --------------------------------------------------------------------- */

/* The indices of the kk highest scores among [sinks, n - window), ordered by score, highest
 * first, ties by lower index first (-0 and +0 tie). Writes min(kk, candidates) indices to
 * idx (kk) and returns that count (0 when protection leaves nothing). O(n log kk), no
 * allocation. Scores must not be NaN. */
int64_t kvc_topk(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx);

#ifdef __cplusplus
}
#endif
#endif
