/* kvquant.h - asymmetric uniform quantisation of K/V blocks, KIVI-style: values in groups of
 * `g` consecutive channels of one token ("per token"), keys in groups of the same channel
 * across `G` consecutive tokens ("per channel", so outlier channels get their own range).
 * Codes are unsigned b-bit integers (b = 8, or 4 with two codes per byte, low nibble first);
 * each group keeps an f16 scale and an f16 minimum: x ~= min + code * scale. The CPU code is
 * the reference; kernels/cuda/kvquant_cuda.cu holds the CUDA twins.
 * Letters: N tokens, C channels (heads x head_dim, or one head's D). */
#ifndef KVC_KVQUANT_H
#define KVC_KVQUANT_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if (bits, group) is supported: bits 2, 4 or 8, group >= 1, channel counts a multiple of the
 * codes a byte holds (8 / bits). */
int kvc_kvq_params_ok(int bits, int group, int channels);
/* Bytes of codes for n values at this width (4-bit codes pack two per byte, rounded up). */
size_t kvc_kvq_code_bytes(int bits, int64_t n);

/* Per token: x (N, C) with C % g == 0 -> codes (N, code_bytes(C)), scale and min (N, C/g) as
 * f16 bit patterns. */
void kvc_kvq_quant_tokens_cpu(const float *x, int64_t n, int c, int g, int bits, uint8_t *codes, uint16_t *scale,
                          uint16_t *minv);
void kvc_kvq_dequant_tokens_cpu(const uint8_t *codes, const uint16_t *scale, const uint16_t *minv, int64_t n, int c,
                            int g, int bits, float *x);

/* Per channel: a block x (G, C) of G consecutive tokens -> codes (G, code_bytes(C)) laid out
 * token by token like the per-token form, scale and min (C) as f16 bit patterns. */
void kvc_kvq_quant_channels_cpu(const float *x, int g_tokens, int c, int bits, uint8_t *codes, uint16_t *scale,
                            uint16_t *minv);
void kvc_kvq_dequant_channels_cpu(const uint8_t *codes, const uint16_t *scale, const uint16_t *minv, int g_tokens,
                              int c, int bits, float *x);

#ifdef __cplusplus
}
#endif
#endif
