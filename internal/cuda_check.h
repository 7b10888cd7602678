/* cuda_check.h - the one error-check macro family of kvcodec's CUDA code: each reports the
 * failing statement, file and line into `err` and jumps to the caller's `fail:` label; check
 * after every kernel launch with LAUNCH_CHECK(). */
#ifndef KVC_CUDA_CHECK_H
#define KVC_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kvc/common.h"

#define CHECK_GENERIC(ok, what, stmt)                                                               \
    do {                                                                                           \
        if (!(ok)) {                                                                               \
            kvc_fail(err, "%s failed (%s) at %s:%d: %s", what, #stmt, __FILE__, __LINE__, msg);     \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)
#define CUDA_CHECK(stmt)                                                                           \
    do {                                                                                           \
        cudaError_t e_ = (stmt);                                                                   \
        const char *msg = cudaGetErrorString(e_);                                                  \
        CHECK_GENERIC(e_ == cudaSuccess, "CUDA", stmt);                                            \
    } while (0)
#define CUBLAS_CHECK(stmt)                                                                         \
    do {                                                                                           \
        cublasStatus_t s_ = (stmt);                                                                \
        const char *msg = cublasGetStatusString(s_);                                               \
        CHECK_GENERIC(s_ == CUBLAS_STATUS_SUCCESS, "cuBLAS", stmt);                                \
    } while (0)
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

#endif
