/* ops_cuda.h - CUDA twins of the CPU primitives in kvc/ops.h and kvc/kernels.h. These entry points take host
 * pointers (copying in and out) so tests can compare them with the CPU reference; each
 * returns 0, or -1 with err (no device, launch failure). Present only when KVC_HAVE_CUDA. */
#ifndef KVC_OPS_CUDA_H
#define KVC_OPS_CUDA_H

#include "kvc/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if a device is usable; desc receives its name or the reason it is not. */
int kvc_cuda_device_info(char *desc, size_t cap);
int kvc_rmsnorm_cuda(float *out, const float *x, const float *g, int64_t n, int64_t e, float eps, kvc_err *err);
int kvc_swiglu_cuda(float *a, const float *b, int64_t n, kvc_err *err);
/* Q4_1 and Q8_0 blocks to f32. */
int kvc_dequantize_cuda(uint32_t type, const void *src, float *dst, int64_t n, kvc_err *err);
/* y (N, O) = x (N, I) . W^T with W (O, I) row-major, through cuBLAS. */
int kvc_matmul_cuda(float *y, const float *x, const float *w, int64_t n, int64_t o, int64_t i, kvc_err *err);

/* KIVI-style quantisation twins of kvc/kvquant.h (same arguments, host pointers). */
int kvc_kvq_quant_tokens_cuda(const float *x, int64_t n, int c, int g, int bits, uint8_t *codes, uint16_t *scale,
                          uint16_t *minv, kvc_err *err);
int kvc_kvq_quant_channels_cuda(const float *x, int g_tokens, int c, int bits, uint8_t *codes, uint16_t *scale,
                            uint16_t *minv, kvc_err *err);

/* SimHash and Hamming twins of kvc/lsh.h; proj (bits, dim) as in kvc_simhash. */
int kvc_simhash_codes_cuda(const float *proj, int dim, int bits, const float *x, int64_t ld, int64_t n, uint64_t *codes,
                       kvc_err *err);
int kvc_hamming_cuda(const uint64_t *codes, int64_t n, uint64_t probe, uint8_t *dist, kvc_err *err);

/* Twins of kvc/kernels.h (the same arguments plus err, host pointers: they copy in, run and
 * copy out); topk returns the count of indices written, or -1 with err. kvc_rope_rows_cuda
 * agrees with kvc_rope_rows bit for bit (same table, each product and sum rounded alone);
 * the others within the tolerances tests/test_kernels_cuda.c states. */
int kvc_dense_rows_cuda(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act, float slope,
                        float *y, kvc_err *err);
int kvc_rope_rows_cuda(const kvc_rope_table *t, const float *x, int64_t ldx, const int32_t *pos, int64_t n, float *y,
                       int64_t ldy, kvc_err *err);
int kvc_attend_cuda(const float *q, int64_t ldq, const int32_t *qpos, int n_q, int g, int d, const kvc_attn_kv *kv,
                    float *out, int64_t ldo, float *probs, kvc_err *err);
int64_t kvc_topk_cuda(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx,
                      kvc_err *err);
/* Twins of the codebook quantizer and decoder: the same codes and values bit for bit. */
int kvc_codebook_quantize_cuda(const kvc_codebook *cb, const float *y, int64_t n, int64_t ldy, uint8_t *codes,
                               kvc_err *err);
int kvc_codebook_dequantize_cuda(const kvc_codebook *cb, const uint8_t *codes, int64_t n, float *y, int64_t ldy,
                                 kvc_err *err);
/* The same on device pointers (every array already on the device, contiguous), queued on the
 * default stream with no final synchronisation: for a cache kept on the device, and for timing
 * the kernels without transfers. cs is a device copy of a kvc_rope_table's cs. */
int kvc_dense_rows_dev(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act, float slope,
                       float *y, kvc_err *err);
int kvc_rope_rows_dev(const float *cs, const float *x, int64_t ldx, const int32_t *pos, int64_t n, int d, float *y,
                      int64_t ldy, kvc_err *err);
int kvc_attend_dev(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *vals, int vw,
                   const float *w, const float *b, const int32_t *kpos, int64_t t, float *out, float *probs,
                   kvc_err *err);
int64_t kvc_topk_dev(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx,
                     kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
