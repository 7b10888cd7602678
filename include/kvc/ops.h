/* ops.h - CPU compute primitives of the runtime (the reference every CUDA twin is checked
 * against). Dimension letters: N tokens, E embedding, I input, O output, H heads, D head_dim. */
#ifndef KVC_OPS_H
#define KVC_OPS_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A weight matrix W (O, I), row-major (each output row contiguous over I), as the GGUF
 * stores it: `q` points at the original (possibly quantized) rows, `f` at an f32 copy
 * (NULL when not materialised). */
typedef struct {
    const void *q;   /* (O, I) in `type` blocks */
    uint32_t type;   /* ggml type id of q */
    const float *f;  /* (O, I) f32, or NULL */
    int64_t rows;    /* O */
    int64_t cols;    /* I */
    size_t row_bytes;
} kvc_matrix;

/* Sets the thread count used by ops (OpenMP and OpenBLAS). */
void kvc_ops_set_threads(int n);
int kvc_ops_get_threads(void);
/* The kernel family OpenBLAS chose for this CPU (e.g. "Haswell"). */
const char *kvc_ops_blas_core(void);
/* OpenBLAS picks kernels from the CPU model when it loads and falls back to its SSE3
 * "Prescott" kernels on models it does not know (common in virtual machines), which makes
 * GEMMs 2-3x slower. Returns the core to ask for instead (via OPENBLAS_CORETYPE) when that
 * happened and the CPU supports it, else NULL. */
const char *kvc_ops_blas_better_core(void);
/* The instruction set of the fused decode kernels chosen for this CPU at run time: "avx512",
 * "avx2" or "c" (the environment variable KVC_CPU_KERNELS=c|avx2|avx512 caps the choice). */
const char *kvc_ops_cpu_kernels(void);

/* y (N, O) = x (N, I) . W^T. Uses an OpenBLAS GEMM on the f32 copy for N > 1 (or when no
 * fused kernel exists for W's type) and the fused dequantize-and-dot kernel for N == 1. */
void kvc_matmul_cpu(float *y, const float *x, const kvc_matrix *w, int64_t n);
/* y (O) = W . x computed straight from W's quantized blocks (f32 accumulation). Returns -1
 * if W's type has no fused kernel. */
int kvc_matvec_quant_cpu(float *y, const float *x, const kvc_matrix *w);

/* out (N, E) = x / rms(x) * g, per row; eps inside the root. */
void kvc_rmsnorm_cpu(float *out, const float *x, const float *g, int64_t n, int64_t e, float eps);
/* a (N, F) = silu(a) * b, in place. */
void kvc_swiglu_cpu(float *a, const float *b, int64_t n);
/* In-place softmax of one row of n values; returns the log of the normaliser (logsumexp). */
double kvc_softmax_cpu(float *x, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
