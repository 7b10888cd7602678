/* quant.h - ggml tensor types and their dequantization to f32 (the CPU reference). */
#ifndef KVC_QUANT_H
#define KVC_QUANT_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ggml type ids as stored in GGUF tensor infos. */
enum {
    GGML_T_F32 = 0, GGML_T_F16 = 1, GGML_T_Q4_0 = 2, GGML_T_Q4_1 = 3,
    GGML_T_Q5_0 = 6, GGML_T_Q5_1 = 7, GGML_T_Q8_0 = 8, GGML_T_Q8_1 = 9,
    GGML_T_Q2_K = 10, GGML_T_Q3_K = 11, GGML_T_Q4_K = 12, GGML_T_Q5_K = 13,
    GGML_T_Q6_K = 14, GGML_T_Q8_K = 15, GGML_T_BF16 = 30, GGML_T_COUNT = 40
};

#define QK4_0 32
#define QK4_1 32
#define QK8_0 32
#define QK_K 256

/* Block layout facts for a type. Returns 0 if known (any ggml type), -1 if not. */
int kvc_ggml_type_block(uint32_t type, uint32_t *block_elems, uint32_t *block_bytes);
/* Name such as "Q4_1", or "?" when unknown. */
const char *kvc_ggml_type_name(uint32_t type);
/* 1 if kvcodec can dequantize this type. */
int kvc_ggml_type_supported(uint32_t type);

/* Dequantizes n elements (n a multiple of the block size) of `type` from src into dst.
 * Returns 0, or -1 for an unsupported type or a bad n. */
int kvc_dequantize_row(uint32_t type, const void *src, float *dst, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
