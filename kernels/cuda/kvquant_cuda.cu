/* kvquant_cuda.cu - CUDA twins of kernels/kvquant.c (KIVI-style K/V quantisation): the same
 * f16 rounding of each group's minimum (down) and scale (up) and the same round-to-nearest
 * codes, so results match the CPU reference bit for bit. Host-pointer entry points serve the
 * parity tests. */
#include "kvc/ops_cuda.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "internal/cuda_check.h"

/* f32 -> f16 bits, round to nearest even: the same integer algorithm as model/common.c. */
__device__ static uint16_t f32_to_f16_dev(float f) {
    uint32_t x = __float_as_uint(f);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000u ? 0x200 : 0));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);
    if (ax < 0x38800000u) {
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFF) | 0x800000, shift = 126 - e;
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (ax - 0x38000000u) >> 13, rem = ax & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

__device__ static float f16_to_f32_dev(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    return __uint_as_float(bits);
}

/* Group parameters exactly as group_params() in kernels/kvquant.c. */
__device__ static void group_params_dev(float lo, float hi, int bits, uint16_t *scale, uint16_t *minv, float *s, float *m) {
    const float levels = (float)((1 << bits) - 1);
    uint16_t mh = f32_to_f16_dev(lo);
    if (f16_to_f32_dev(mh) > lo) mh = (mh & 0x8000) ? (uint16_t)(mh + 1) : (mh == 0 ? 0x8001 : (uint16_t)(mh - 1));
    *minv = mh;
    *m = f16_to_f32_dev(mh);
    float span = __fsub_rn(hi, *m);
    float sc = span > 0 ? __fdiv_rn(span, levels) : 0.0f;
    uint16_t h = f32_to_f16_dev(sc);
    if (__fmul_rn(f16_to_f32_dev(h), levels) < span && h < 0x7BFF) h++;
    *scale = h;
    *s = f16_to_f32_dev(h);
}

__device__ static unsigned code_of_dev(float v, float s, float m, int bits) {
    if (!(s > 0)) return 0;
    float q = rintf(__fdiv_rn(__fsub_rn(v, m), s));
    float top = (float)((1 << bits) - 1);
    q = q < 0 ? 0 : q > top ? top : q;
    return (unsigned)q;
}

/* One thread per token: every group of the row (no two threads share a code byte). */
__global__ void kvq_tokens_kernel(const float *x, int64_t n, int c, int g, int bits, uint8_t *codes, uint16_t *scale,
                                  uint16_t *minv) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int ng = c / g;
    const size_t rb = (size_t)((c * bits + 7) / 8);
    const float *xr = x + t * c;
    uint8_t *cr = codes + t * rb;
    for (size_t i = 0; i < rb; i++) cr[i] = 0;
    for (int j = 0; j < ng; j++) {
        float lo = xr[j * g], hi = lo;
        for (int i = 1; i < g; i++) { float v = xr[j * g + i]; lo = fminf(lo, v); hi = fmaxf(hi, v); }
        float s, m;
        group_params_dev(lo, hi, bits, &scale[t * ng + j], &minv[t * ng + j], &s, &m);
        for (int i = 0; i < g; i++) {
            int k = j * g + i;
            unsigned q = code_of_dev(xr[k], s, m, bits);
            if (bits == 8) cr[k] = (uint8_t)q;
            else cr[k / (8 / bits)] |= (uint8_t)(q << ((k % (8 / bits)) * bits));
        }
    }
}

/* One thread per code byte: the 8 / bits channels it holds (one for 8 bits), so no two
 * threads write the same byte. */
__global__ void kvq_channels_kernel(const float *x, int gt, int c, int bits, uint8_t *codes, uint16_t *scale,
                                    uint16_t *minv) {
    const int per = bits == 8 ? 1 : 8 / bits;
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p * per >= c) return;
    const size_t rb = (size_t)((c * bits + 7) / 8);
    float s[4], m[4];
    for (int k = 0; k < per && p * per + k < c; k++) {
        int ch = p * per + k;
        float lo = x[ch], hi = lo;
        for (int t = 1; t < gt; t++) { float v = x[(size_t)t * c + ch]; lo = fminf(lo, v); hi = fmaxf(hi, v); }
        group_params_dev(lo, hi, bits, &scale[ch], &minv[ch], &s[k], &m[k]);
    }
    for (int t = 0; t < gt; t++) {
        unsigned byte = 0;
        for (int k = 0; k < per && p * per + k < c; k++)
            byte |= code_of_dev(x[(size_t)t * c + p * per + k], s[k], m[k], bits) << (k * bits);
        codes[(size_t)t * rb + p] = (uint8_t)byte;
    }
}

extern "C" int kvc_kvq_quant_tokens_cuda(const float *x, int64_t n, int c, int g, int bits, uint8_t *codes,
                                     uint16_t *scale, uint16_t *minv, kvc_err *err) {
    float *dx = NULL;
    uint8_t *dc = NULL;
    uint16_t *ds = NULL, *dm = NULL;
    const size_t rb = (size_t)((c * bits + 7) / 8), ng = (size_t)(c / g);
    CUDA_CHECK(cudaMalloc(&dx, (size_t)n * c * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dc, (size_t)n * rb));
    CUDA_CHECK(cudaMalloc(&ds, (size_t)n * ng * 2));
    CUDA_CHECK(cudaMalloc(&dm, (size_t)n * ng * 2));
    CUDA_CHECK(cudaMemcpy(dx, x, (size_t)n * c * sizeof(float), cudaMemcpyHostToDevice));
    kvq_tokens_kernel<<<(unsigned)((n + 127) / 128), 128>>>(dx, n, c, g, bits, dc, ds, dm);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(codes, dc, (size_t)n * rb, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(scale, ds, (size_t)n * ng * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(minv, dm, (size_t)n * ng * 2, cudaMemcpyDeviceToHost));
    cudaFree(dx); cudaFree(dc); cudaFree(ds); cudaFree(dm);
    return 0;
fail:
    cudaFree(dx); cudaFree(dc); cudaFree(ds); cudaFree(dm);
    return -1;
}

extern "C" int kvc_kvq_quant_channels_cuda(const float *x, int gt, int c, int bits, uint8_t *codes, uint16_t *scale,
                                       uint16_t *minv, kvc_err *err) {
    float *dx = NULL;
    uint8_t *dc = NULL;
    uint16_t *ds = NULL, *dm = NULL;
    const size_t rb = (size_t)((c * bits + 7) / 8);
    CUDA_CHECK(cudaMalloc(&dx, (size_t)gt * c * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dc, (size_t)gt * rb));
    CUDA_CHECK(cudaMalloc(&ds, (size_t)c * 2));
    CUDA_CHECK(cudaMalloc(&dm, (size_t)c * 2));
    CUDA_CHECK(cudaMemcpy(dx, x, (size_t)gt * c * sizeof(float), cudaMemcpyHostToDevice));
    kvq_channels_kernel<<<(unsigned)(((int64_t)rb + 127) / 128), 128>>>(dx, gt, c, bits, dc, ds, dm);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(codes, dc, (size_t)gt * rb, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(scale, ds, (size_t)c * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(minv, dm, (size_t)c * 2, cudaMemcpyDeviceToHost));
    cudaFree(dx); cudaFree(dc); cudaFree(ds); cudaFree(dm);
    return 0;
fail:
    cudaFree(dx); cudaFree(dc); cudaFree(ds); cudaFree(dm);
    return -1;
}
