/* backend.c - which compute backends this build has and whether a GPU can be used now.
 * A binary built with CUDA still starts and runs on the CPU where no driver exists. */
#include "kvc/backend.h"

#include <stdio.h>
#include <string.h>

#ifdef KVC_HAVE_CUDA
int kvc_cuda_device_info(char *desc, size_t cap); /* kernels/cuda/ops_cuda.cu */
#endif

int kvc_backend_cuda_compiled(void) {
#ifdef KVC_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

int kvc_backend_cuda_available(char *desc, size_t cap) {
#ifdef KVC_HAVE_CUDA
    return kvc_cuda_device_info(desc, cap);
#else
    if (desc && cap) snprintf(desc, cap, "this build has no CUDA backend");
    return 0;
#endif
}

/* Compiled for the x86-64 baseline whatever the build's -march, so that it can run (and say
 * what is missing) on a CPU that lacks what the rest of the binary was compiled for. The
 * predefined macros still tell what that was. */
#ifndef KVC_BUILD_ARCH
#define KVC_BUILD_ARCH ""
#endif
#if defined(__x86_64__) && defined(__GNUC__)
/* Appends feat to the list of missing ones when the build assumed it (macro_on) and the CPU
 * lacks it. */
#define NEED(macro_on, feat)                                                                  \
    do {                                                                                      \
        if ((macro_on) && !__builtin_cpu_supports(feat)) {                                    \
            size_t at = strlen(missing);                                                      \
            snprintf(missing + at, sizeof missing - at, "%s%s", at ? " " : "", feat);         \
        }                                                                                     \
    } while (0)
__attribute__((target("arch=x86-64"))) int kvc_cpu_check(char *why, size_t cap) {
    char missing[200] = "";
    __builtin_cpu_init();
#ifdef __SSE4_2__
    NEED(1, "sse4.2");
#endif
#ifdef __POPCNT__
    NEED(1, "popcnt");
#endif
#ifdef __AVX__
    NEED(1, "avx");
#endif
#ifdef __AVX2__
    NEED(1, "avx2");
#endif
#ifdef __FMA__
    NEED(1, "fma");
#endif
#ifdef __F16C__
    NEED(1, "f16c");
#endif
#ifdef __BMI2__
    NEED(1, "bmi2");
#endif
#ifdef __AVX512F__
    NEED(1, "avx512f");
#endif
#ifdef __AVX512BW__
    NEED(1, "avx512bw");
#endif
#ifdef __AVX512VL__
    NEED(1, "avx512vl");
#endif
#ifdef __AVX512DQ__
    NEED(1, "avx512dq");
#endif
#ifdef __AVX512VNNI__
    NEED(1, "avx512vnni");
#endif
#ifdef __AVX512BF16__
    NEED(1, "avx512bf16");
#endif
#ifdef __AVX512FP16__
    NEED(1, "avx512fp16");
#endif
    if (!missing[0]) {
        if (why && cap) why[0] = 0;
        return 0;
    }
    if (why && cap)
        snprintf(why, cap,
                 "this CPU lacks %s, which this build was compiled for (-march=%s): rebuild on this machine, or "
                 "configure with -DKVC_ARCH=none for a baseline x86-64 build",
                 missing, KVC_BUILD_ARCH[0] ? KVC_BUILD_ARCH : "default");
    return -1;
}
#undef NEED
#else
int kvc_cpu_check(char *why, size_t cap) {
    if (why && cap) why[0] = 0;
    return 0;
}
#endif
