/* backend.c - the backend tables (kvc/backend.h): the CPU reference over the kernels of
 * kvc/kernels.h and, when built with CUDA, the same entries over their twins; which backends
 * this build has and whether a GPU can be used now; and the start-up check that the CPU runs
 * what the build was compiled for. A binary built with CUDA still starts and runs on the CPU
 * where no driver exists. */
#include "kvc/backend.h"
#include "kvc/ops_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>


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

/* ---- the CPU table ------------------------------------------------------------------------ */

static int cpu_rope_rows(const kvc_rope_table *t, const float *x, int64_t ldx, const int32_t *pos, int64_t n, float *y,
                         int64_t ldy, kvc_err *err) {
    (void)err;
    kvc_rope_rows(t, x, ldx, pos, n, y, ldy);
    return 0;
}

/* One row per (token, query head), split over the OpenMP threads: H rows per token keep two
 * threads busy even at decode, where a KV head has only G. */
static int cpu_attend_layer(const float *q, const int32_t *qpos, int n_q, int h, int k, int d, const kvc_attn_kv *kv,
                            float *out, float *const *probs, kvc_err *err) {
    const int g = h / k;
    int64_t tmax = 1;
    int rmax = 0;
    for (int j = 0; j < k; j++) {
        tmax = kv[j].t > tmax ? kv[j].t : tmax;
        rmax = kv[j].ne > 0 && kv[j].r > rmax ? kv[j].r : rmax;
    }
    int oom = 0;
#pragma omp parallel reduction(| : oom) if (n_q * h > 1)
    {
        float *sc = kvc_malloc_array((size_t)(tmax + rmax + 1), sizeof(float));
        if (!sc) oom = 1;
#pragma omp for collapse(2) schedule(dynamic, 4)
        for (int t = 0; t < n_q; t++)
            for (int hq = 0; hq < h; hq++) {
                if (!sc) continue;
                const int j = hq / g;
                float *pr = probs && probs[j] ? probs[j] + ((size_t)t * g + hq % g) * kv[j].t : NULL;
                kvc_attend(q + ((size_t)t * h + hq) * d, d, qpos + t, 1, 1, d, &kv[j], out + ((size_t)t * h + hq) * d, d,
                           pr, sc);
            }
        free(sc);
    }
    return oom ? kvc_fail(err, "out of memory in attention") : 0;
}

static int cpu_dense_rows(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act,
                          float slope, float *y, kvc_err *err) {
    (void)err;
    kvc_dense_rows(x, n, in, w, b, out, act, slope, y);
    return 0;
}

static int64_t cpu_topk(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx,
                        kvc_err *err) {
    (void)err;
    return kvc_topk(score, n, sinks, window, kk, idx);
}

static const kvc_backend CPU = {"cpu", cpu_rope_rows, cpu_attend_layer, cpu_dense_rows, cpu_topk};

const kvc_backend *kvc_backend_cpu(void) { return &CPU; }

/* ---- the CUDA table: the twins, staged through host memory per call ------------------------ */

#ifdef KVC_HAVE_CUDA
static int cuda_attend_layer(const float *q, const int32_t *qpos, int n_q, int h, int k, int d, const kvc_attn_kv *kv,
                             float *out, float *const *probs, kvc_err *err) {
    const int g = h / k;
    for (int j = 0; j < k; j++)
        if (kvc_attend_cuda(q + (size_t)j * g * d, (int64_t)h * d, qpos, n_q, g, d, &kv[j], out + (size_t)j * g * d,
                            (int64_t)h * d, probs ? probs[j] : NULL, err))
            return -1;
    return 0;
}

static const kvc_backend CUDA = {"cuda", kvc_rope_rows_cuda, cuda_attend_layer, kvc_dense_rows_cuda, kvc_topk_cuda};
#endif

const kvc_backend *kvc_backend_find(const char *name, kvc_err *err) {
    if (!name || !strcmp(name, "cpu")) return &CPU;
    if (strcmp(name, "cuda")) {
        kvc_fail(err, "unknown device '%s' (cpu or cuda)", name);
        return NULL;
    }
#ifdef KVC_HAVE_CUDA
    char why[200];
    if (!kvc_cuda_device_info(why, sizeof why)) {
        kvc_fail(err, "--device cuda: no usable CUDA device (%s)", why);
        return NULL;
    }
    return &CUDA;
#else
    kvc_fail(err, "--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
    return NULL;
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
