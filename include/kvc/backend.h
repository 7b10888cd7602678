/* backend.h - compute backends: the CPU reference always, CUDA when built with nvcc. */
#ifndef KVC_BACKEND_H
#define KVC_BACKEND_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if this build includes the CUDA backend. */
int kvc_backend_cuda_compiled(void);
/* 1 if a CUDA device can be used now; desc receives its name or why not. */
int kvc_backend_cuda_available(char *desc, size_t cap);
/* 0 if this CPU has every instruction-set extension the build was compiled for; else -1 and
 * why names every one missing and what to do. Safe to call on any x86-64 CPU. The CLI refuses
 * to start on -1 unless KVC_CPU_CHECK=warn. */
int kvc_cpu_check(char *why, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
