/* dense.c - one Linear layer plus activation over many rows: the codec encoders and decoders
 * (the trainer's exported networks, the cache's representations and the codec library all
 * run through it). kernels/cuda/attn_cuda.cu holds the twin. */
#include "kvc/kernels.h"

#include <cblas.h>

#define DENSE_CHUNK 256 /* rows per GEMM */

void kvc_dense_rows(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act, float slope,
                    float *y) {
    for (int64_t i0 = 0; i0 < n; i0 += DENSE_CHUNK) {
        int nb = (int)(n - i0 < DENSE_CHUNK ? n - i0 : DENSE_CHUNK);
        float *yb = y + i0 * out;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, out, in, 1.0f, x + i0 * in, in, w, in, 0.0f, yb,
                    out);
        if (!b && act == KVC_ACT_NONE) continue;
        for (int i = 0; i < nb; i++)
            for (int j = 0; j < out; j++) {
                float *v = yb + (size_t)i * out + j;
                *v = kvc_act_apply(b ? *v + b[j] : *v, act, slope);
            }
    }
}
