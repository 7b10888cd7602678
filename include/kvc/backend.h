/* backend.h - the compute backends behind the kernels (DESIGN.md section 6): the CPU reference
 * always, CUDA when built with nvcc. A backend is a small table of the hot paths a cache runs
 * at every step, chosen when the cache is set up (`--device cpu|cuda`, as ggml picks a backend
 * per graph); each entry computes what the kernel of kvc/kernels.h of the same name computes
 * (the CPU table calls them; the CUDA table calls their twins, kvc/ops_cuda.h).
 * Letters: Q query tokens, H query heads, K KV heads, G = H/K, D head_dim, T keys held. */
#ifndef KVC_BACKEND_H
#define KVC_BACKEND_H

#include "kvc/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_backend {
    const char *name; /* "cpu" or "cuda" */
    /* kvc_rope_rows, returning 0 or -1 with err. y must not alias x on CUDA. */
    int (*rope_rows)(const kvc_rope_table *t, const float *x, int64_t ldx, const int32_t *pos, int64_t n, float *y,
                     int64_t ldy, kvc_err *err);
    /* Attention of every query head of one layer: q and out (Q, H, D), qpos (Q); kv[K] what
     * each KV head holds (query head h reads kv[h / G]); probs NULL or probs[k] NULL for no
     * weights, else (Q, G, T_k) for KV head k. The same numbers as kvc_attend per head. */
    int (*attend_layer)(const float *q, const int32_t *qpos, int n_q, int h, int k, int d, const kvc_attn_kv *kv,
                        float *out, float *const *probs, kvc_err *err);
    /* kvc_dense_rows, returning 0 or -1 with err. */
    int (*dense_rows)(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act, float slope,
                      float *y, kvc_err *err);
    /* kvc_topk; -1 with err on failure. */
    int64_t (*topk)(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx,
                    kvc_err *err);
} kvc_backend;

/* The CPU reference (never NULL). */
const kvc_backend *kvc_backend_cpu(void);
/* "cpu" or "cuda". NULL with err when the name is unknown, the build has no CUDA, or no CUDA
 * device can be used now (the reason is in err). */
const kvc_backend *kvc_backend_find(const char *name, kvc_err *err);

/* 1 if this build includes the CUDA backend. */
int kvc_backend_cuda_compiled(void);
/* 1 if a CUDA device can be used now; desc receives its name or why not. */
int kvc_backend_cuda_available(char *desc, size_t cap);
/* 0 if this CPU has every instruction-set extension the build was compiled for; else -1 and
 * why names every one missing and what to do. Safe to call on any x86-64 CPU. The CLI refuses
 * to start on -1 unless KVC_CPU_CHECK=warn. */
int kvc_cpu_check(char *why, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
