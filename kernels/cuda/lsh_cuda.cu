/* lsh_cuda.cu - CUDA twins of kernels/lsh.c: SimHash codes (one thread per vector, the same
 * sequential, non-fused sum as the CPU so signs agree bit for bit) and Hamming distances. */
#include "kvc/ops_cuda.h"

#include <cuda_runtime.h>
#include <stdint.h>

#include "internal/cuda_check.h"

__global__ void simhash_kernel(const float *proj, int dim, int bits, const float *x, int64_t ld, int64_t n,
                               uint64_t *codes) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float *xi = x + i * ld;
    uint64_t c = 0;
    for (int j = 0; j < bits; j++) {
        const float *p = proj + (size_t)j * dim;
        float d = 0.0f;
        for (int k = 0; k < dim; k++) d = __fadd_rn(d, __fmul_rn(p[k], xi[k])); /* no FMA contraction */
        if (d >= 0.0f) c |= 1ull << j;
    }
    codes[i] = c;
}

__global__ void hamming_kernel(const uint64_t *codes, int64_t n, uint64_t probe, uint8_t *dist) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) dist[i] = (uint8_t)__popcll(codes[i] ^ probe);
}

extern "C" int kvc_simhash_codes_cuda(const float *proj, int dim, int bits, const float *x, int64_t ld, int64_t n,
                                  uint64_t *codes, kvc_err *err) {
    float *dp = NULL, *dx = NULL;
    uint64_t *dc = NULL;
    size_t xbytes = (size_t)((n - 1) * ld + dim) * sizeof(float);
    CUDA_CHECK(cudaMalloc(&dp, (size_t)dim * bits * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dx, xbytes));
    CUDA_CHECK(cudaMalloc(&dc, (size_t)n * sizeof(uint64_t)));
    CUDA_CHECK(cudaMemcpy(dp, proj, (size_t)dim * bits * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dx, x, xbytes, cudaMemcpyHostToDevice));
    simhash_kernel<<<(unsigned)((n + 127) / 128), 128>>>(dp, dim, bits, dx, ld, n, dc);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(codes, dc, (size_t)n * sizeof(uint64_t), cudaMemcpyDeviceToHost));
    cudaFree(dp); cudaFree(dx); cudaFree(dc);
    return 0;
fail:
    cudaFree(dp); cudaFree(dx); cudaFree(dc);
    return -1;
}

extern "C" int kvc_hamming_cuda(const uint64_t *codes, int64_t n, uint64_t probe, uint8_t *dist, kvc_err *err) {
    uint64_t *dc = NULL;
    uint8_t *dd = NULL;
    CUDA_CHECK(cudaMalloc(&dc, (size_t)n * sizeof(uint64_t)));
    CUDA_CHECK(cudaMalloc(&dd, (size_t)n));
    CUDA_CHECK(cudaMemcpy(dc, codes, (size_t)n * sizeof(uint64_t), cudaMemcpyHostToDevice));
    hamming_kernel<<<(unsigned)((n + 255) / 256), 256>>>(dc, n, probe, dd);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(dist, dd, (size_t)n, cudaMemcpyDeviceToHost));
    cudaFree(dc); cudaFree(dd);
    return 0;
fail:
    cudaFree(dc); cudaFree(dd);
    return -1;
}
