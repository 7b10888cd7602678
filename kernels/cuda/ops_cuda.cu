/* ops_cuda.cu - CUDA kernels twinned with kernels/ops_cpu.c and kernels/quant.c (RMSNorm,
 * RoPE, SwiGLU, Q4_1/Q8_0 dequantization) and a cuBLAS GEMM. Host-pointer entry points
 * serve the parity tests; every launch is checked. */
#include "kvc/ops_cuda.h"
#include "kvc/quant.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

/* Error checks: CUDA_CHECK, CUBLAS_CHECK, LAUNCH_CHECK (every function declares `err` and a
 * `fail:` label). */
#include "internal/cuda_check.h"

extern "C" int kvc_cuda_device_info(char *desc, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        if (desc && cap) snprintf(desc, cap, "no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 0;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
        if (desc && cap) snprintf(desc, cap, "CUDA device 0 cannot be queried");
        return 0;
    }
    if (desc && cap) snprintf(desc, cap, "%s (sm_%d%d, %.0f GiB)", p.name, p.major, p.minor, p.totalGlobalMem / 1073741824.0);
    return 1;
}

/* ---- kernels -------------------------------------------------------------------- */

/* One block per row; shared-memory reduction of the sum of squares. */
__global__ void rmsnorm_kernel(float *out, const float *x, const float *g, int64_t e, float eps) {
    extern __shared__ float red[];
    const float *xr = x + blockIdx.x * e;
    float *o = out + blockIdx.x * e;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < e; i += blockDim.x) s += xr[i] * xr[i];
    red[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }
    float scale = rsqrtf(red[0] / (float)e + eps);
    for (int64_t i = threadIdx.x; i < e; i += blockDim.x) o[i] = xr[i] * scale * g[i];
}

__global__ void swiglu_kernel(float *a, const float *b, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) a[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

/* One thread per element; blocks of 32 elements as in kernels/quant.c. */
__global__ void dequant_q4_1_kernel(const uint8_t *src, float *dst, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint8_t *b = src + (i / 32) * 20;
    int j = (int)(i % 32);
    float d = __half2float(*(const __half *)b), m = __half2float(*(const __half *)(b + 2));
    int q = j < 16 ? (b[4 + j] & 0xF) : (b[4 + j - 16] >> 4);
    dst[i] = q * d + m;
}

__global__ void dequant_q8_0_kernel(const uint8_t *src, float *dst, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint8_t *b = src + (i / 32) * 34;
    dst[i] = (float)((const int8_t *)(b + 2))[i % 32] * __half2float(*(const __half *)b);
}

/* ---- host entry points -------------------------------------------------------------- */

static unsigned blocks_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

extern "C" int kvc_rmsnorm_cuda(float *out, const float *x, const float *g, int64_t n, int64_t e, float eps, kvc_err *err) {
    float *dx = NULL, *dg = NULL, *dout = NULL;
    size_t bytes = (size_t)(n * e) * sizeof(float);
    CUDA_CHECK(cudaMalloc(&dx, bytes));
    CUDA_CHECK(cudaMalloc(&dout, bytes));
    CUDA_CHECK(cudaMalloc(&dg, (size_t)e * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(dx, x, bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dg, g, (size_t)e * sizeof(float), cudaMemcpyHostToDevice));
    rmsnorm_kernel<<<(unsigned)n, 256, 256 * sizeof(float)>>>(dout, dx, dg, e, eps);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(out, dout, bytes, cudaMemcpyDeviceToHost));
    cudaFree(dx); cudaFree(dg); cudaFree(dout);
    return 0;
fail:
    cudaFree(dx); cudaFree(dg); cudaFree(dout);
    return -1;
}


extern "C" int kvc_swiglu_cuda(float *a, const float *b, int64_t n, kvc_err *err) {
    float *da = NULL, *db = NULL;
    size_t bytes = (size_t)n * sizeof(float);
    CUDA_CHECK(cudaMalloc(&da, bytes));
    CUDA_CHECK(cudaMalloc(&db, bytes));
    CUDA_CHECK(cudaMemcpy(da, a, bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(db, b, bytes, cudaMemcpyHostToDevice));
    swiglu_kernel<<<blocks_for(n, 256), 256>>>(da, db, n);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(a, da, bytes, cudaMemcpyDeviceToHost));
    cudaFree(da); cudaFree(db);
    return 0;
fail:
    cudaFree(da); cudaFree(db);
    return -1;
}

extern "C" int kvc_dequantize_cuda(uint32_t type, const void *src, float *dst, int64_t n, kvc_err *err) {
    uint8_t *ds = NULL;
    float *dd = NULL;
    if ((type != GGML_T_Q4_1 && type != GGML_T_Q8_0) || n % 32) return kvc_fail(err, "kvc_dequantize_cuda: unsupported type or size");
    size_t in_bytes = (size_t)(n / 32) * (type == GGML_T_Q4_1 ? 20 : 34);
    CUDA_CHECK(cudaMalloc(&ds, in_bytes));
    CUDA_CHECK(cudaMalloc(&dd, (size_t)n * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(ds, src, in_bytes, cudaMemcpyHostToDevice));
    if (type == GGML_T_Q4_1) dequant_q4_1_kernel<<<blocks_for(n, 256), 256>>>(ds, dd, n);
    else dequant_q8_0_kernel<<<blocks_for(n, 256), 256>>>(ds, dd, n);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(dst, dd, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost));
    cudaFree(ds); cudaFree(dd);
    return 0;
fail:
    cudaFree(ds); cudaFree(dd);
    return -1;
}

extern "C" int kvc_matmul_cuda(float *y, const float *x, const float *w, int64_t n, int64_t o, int64_t i, kvc_err *err) {
    float *dx = NULL, *dw = NULL, *dy = NULL;
    cublasHandle_t h = NULL;
    const float one = 1.0f, zero = 0.0f;
    CUDA_CHECK(cudaMalloc(&dx, (size_t)(n * i) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dw, (size_t)(o * i) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dy, (size_t)(n * o) * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(dx, x, (size_t)(n * i) * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dw, w, (size_t)(o * i) * sizeof(float), cudaMemcpyHostToDevice));
    CUBLAS_CHECK(cublasCreate(&h));
    /* Keep full f32 (no TF32) so results compare with the CPU reference. */
    CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_PEDANTIC_MATH));
    /* Row-major Y(n,o) = X(n,i) W(o,i)^T is column-major Y^T(o,n) = W^T... i.e. op(W)=T on W(i,o) col-major. */
    CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)o, (int)n, (int)i, &one, dw, (int)i, dx, (int)i, &zero,
                             dy, (int)o));
    CUDA_CHECK(cudaMemcpy(y, dy, (size_t)(n * o) * sizeof(float), cudaMemcpyDeviceToHost));
    cublasDestroy(h);
    cudaFree(dx); cudaFree(dw); cudaFree(dy);
    return 0;
fail:
    if (h) cublasDestroy(h);
    cudaFree(dx); cudaFree(dw); cudaFree(dy);
    return -1;
}
