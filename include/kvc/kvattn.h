/* kvattn.h - the inference hot paths of the compressed cache, on many rows at once: codec
 * layers (encode/decode), RoPE on decoded keys at their true (gapped) positions, attention of
 * one KV head over its held tokens (values exact or as latents of a linear decoder), and the
 * eviction top-k. The CPU code (kernels/kvattn.c) is the reference; kernels/cuda/kvattn_cuda.cu
 * holds the CUDA twins (declared in kvc/ops_cuda.h).
 * Letters: N rows, I/O layer input/output width, T keys held, D head_dim, G query heads per KV
 * head, Q query tokens, R latent size. Row-major throughout. */
#ifndef KVC_KVATTN_H
#define KVC_KVATTN_H

#include "kvc/ae.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One exported codec layer: y (N, O) = act(x (N, I) W^T + b) with W (O, I), b (O) (NULL: no
 * bias), act an ae_act, slope the leaky_relu negative slope. Computes exactly what
 * kvc_ae_export_run computes for one ae_dense (same GEMM, same activation formulas). */
void kvc_dense_rows_cpu(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act, float slope,
                    float *y);

/* Attention of one KV head: queries q (Q, G, D) at positions qpos (Q) over keys k (T, D) (after
 * RoPE) at positions kpos (T), causal by position (key i visible to query j when
 * kpos[i] <= qpos[j]; kpos need not be sorted), scale 1/sqrt(D), values v (T, D):
 * out (Q, G, D). When probs is non-NULL it receives the softmax weights (Q, G, T), 0 for keys
 * not visible. A query that sees no key gets a zero output (and zero weights). */
void kvc_attend_head_cpu(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *v,
                     const int32_t *kpos, int64_t t, float *out, float *probs);

/* The same attention with values held as latents z (T, R) of a linear decoder W (D, R), b (D)
 * (b may be NULL): out = W (sum_i a_i z_i) + b, which equals attending over the decoded values
 * since the weights a_i sum to 1. A query that sees no key gets a zero output. */
void kvc_attend_latent_cpu(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *z,
                       int r, const float *w, const float *b, const int32_t *kpos, int64_t t, float *out,
                       float *probs);

/* The indices of the kk highest scores among [sinks, n - window), ordered by score, highest
 * first, ties by lower index first: the tokens kvc_kvcache_select marks for eviction when
 * kk = n - keep. Writes min(kk, candidates) indices to idx (kk) and returns that count (0 when
 * protection leaves nothing). Scores must not be NaN; -0 and +0 tie. */
int64_t kvc_topk_unprotected_cpu(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx);

#ifdef __cplusplus
}
#endif
#endif
