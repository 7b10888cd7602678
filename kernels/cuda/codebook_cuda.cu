/* codebook_cuda.cu - CUDA twins of kernels/codebook.c: the transform codec's per-component
 * scalar quantizer (nearest of 2^bits levels, midpoints rounding down) and its decoder, one
 * thread per row, bit for bit the CPU's codes and values. */
#include "kvc/ops_cuda.h"

#include <cuda_runtime.h>
#include <stdint.h>

#include "internal/cuda_check.h"

static unsigned rows_blocks(int64_t n) { return (unsigned)((n + 127) / 128); }

__device__ static int nearest_dev(const float *lv, int n, float y) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        float cut = __fmul_rn(0.5f, __fadd_rn(lv[mid], lv[mid + 1]));
        if (y > cut) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

__global__ void cb_quantize_kernel(int c, const uint8_t *bits, const float *levels, const int32_t *off, int row_bytes,
                                   const float *y, int64_t n, int64_t ldy, uint8_t *codes) {
    int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r >= n) return;
    const float *yr = y + r * ldy;
    uint8_t *out = codes + r * row_bytes;
    for (int i = 0; i < row_bytes; i++) out[i] = 0;
    int64_t at = 0;
    for (int k = 0; k < c; k++) {
        const int b = bits[k];
        if (!b) continue;
        uint32_t q = (uint32_t)nearest_dev(levels + off[k], 1 << b, yr[k]);
        out[at >> 3] |= (uint8_t)(q << (at & 7));
        if ((at & 7) + b > 8) out[(at >> 3) + 1] |= (uint8_t)(q >> (8 - (at & 7)));
        at += b;
    }
}

__global__ void cb_dequantize_kernel(int c, const uint8_t *bits, const float *levels, const int32_t *off, int row_bytes,
                                     const uint8_t *codes, int64_t n, float *y, int64_t ldy) {
    int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r >= n) return;
    const uint8_t *in = codes + r * row_bytes;
    float *yr = y + r * ldy;
    int64_t at = 0;
    for (int k = 0; k < c; k++) {
        const int b = bits[k];
        if (!b) {
            yr[k] = 0.0f;
            continue;
        }
        uint32_t w = in[at >> 3];
        if ((at & 7) + b > 8) w |= (uint32_t)in[(at >> 3) + 1] << 8;
        yr[k] = levels[off[k] + (int)((w >> (at & 7)) & ((1u << b) - 1u))];
        at += b;
    }
}

/* Device copies of a codebook's tables. */
typedef struct {
    uint8_t *bits;
    float *levels;
    int32_t *off;
} dev_cb;

static int cb_upload(const kvc_codebook *cb, dev_cb *d, kvc_err *err) {
    int64_t nl = 0;
    for (int k = 0; k < cb->c; k++) nl = cb->off[k] + (1 << cb->bits[k]) > nl ? cb->off[k] + (1 << cb->bits[k]) : nl;
    CUDA_CHECK(cudaMalloc(&d->bits, (size_t)cb->c));
    CUDA_CHECK(cudaMalloc(&d->levels, (size_t)(nl > 0 ? nl : 1) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&d->off, (size_t)cb->c * sizeof(int32_t)));
    CUDA_CHECK(cudaMemcpy(d->bits, cb->bits, (size_t)cb->c, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d->levels, cb->levels, (size_t)nl * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d->off, cb->off, (size_t)cb->c * sizeof(int32_t), cudaMemcpyHostToDevice));
    return 0;
fail:
    return -1;
}

static void cb_free(dev_cb *d) {
    cudaFree(d->bits), cudaFree(d->levels), cudaFree(d->off);
}

extern "C" int kvc_codebook_quantize_cuda(const kvc_codebook *cb, const float *y, int64_t n, int64_t ldy,
                                          uint8_t *codes, kvc_err *err) {
    dev_cb d = {0};
    float *dy = NULL;
    uint8_t *dc = NULL;
    if (n <= 0) return 0;
    if (cb_upload(cb, &d, err)) goto fail;
    CUDA_CHECK(cudaMalloc(&dy, (size_t)((n - 1) * ldy + cb->c) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dc, (size_t)n * cb->row_bytes));
    CUDA_CHECK(cudaMemcpy(dy, y, (size_t)((n - 1) * ldy + cb->c) * sizeof(float), cudaMemcpyHostToDevice));
    cb_quantize_kernel<<<rows_blocks(n), 128>>>(cb->c, d.bits, d.levels, d.off, cb->row_bytes, dy, n, ldy, dc);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(codes, dc, (size_t)n * cb->row_bytes, cudaMemcpyDeviceToHost));
    cb_free(&d), cudaFree(dy), cudaFree(dc);
    return 0;
fail:
    cb_free(&d), cudaFree(dy), cudaFree(dc);
    return -1;
}

extern "C" int kvc_codebook_dequantize_cuda(const kvc_codebook *cb, const uint8_t *codes, int64_t n, float *y,
                                            int64_t ldy, kvc_err *err) {
    dev_cb d = {0};
    float *dy = NULL;
    uint8_t *dc = NULL;
    if (n <= 0) return 0;
    if (cb_upload(cb, &d, err)) goto fail;
    CUDA_CHECK(cudaMalloc(&dy, (size_t)((n - 1) * ldy + cb->c) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dc, (size_t)n * cb->row_bytes));
    CUDA_CHECK(cudaMemcpy(dc, codes, (size_t)n * cb->row_bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dy, y, (size_t)((n - 1) * ldy + cb->c) * sizeof(float), cudaMemcpyHostToDevice));
    cb_dequantize_kernel<<<rows_blocks(n), 128>>>(cb->c, d.bits, d.levels, d.off, cb->row_bytes, dc, n, dy, ldy);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(y, dy, (size_t)((n - 1) * ldy + cb->c) * sizeof(float), cudaMemcpyDeviceToHost));
    cb_free(&d), cudaFree(dy), cudaFree(dc);
    return 0;
fail:
    cb_free(&d), cudaFree(dy), cudaFree(dc);
    return -1;
}
