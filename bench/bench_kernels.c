/* bench_kernels.c - times the compressed cache's hot paths (kvc/kernels.h) on the CPU and, when a
 * GPU is present, their CUDA twins on device-resident data, at inference sizes (one KV head:
 * T tokens held, D head_dim, R latent, G query heads). One line per kernel: milliseconds per
 * call for each backend and the CPU/CUDA ratio; CUDA is reported as skipped with the reason
 * where no device can be used. Not a test: nothing is checked here (tests/test_kernels*.c). */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvc/backend.h"
#include "kvc/kernels.h"
#include "kvc/ops.h"
#ifdef KVC_HAVE_CUDA
#include <cuda_runtime.h>

#include "kvc/ops_cuda.h"
#endif

static void usage(void) {
    fprintf(stderr, "usage: bench_kernels [--t 4096] [--d 64] [--r 32] [--g 3] [--chunk 32] [--reps 20] [--threads 2]\n");
}

/* OpenBLAS picks its kernels when it loads: if it fell back to generic ones on a CPU that can
 * do better, restart once with the right core named, as the kvcodec binary does, so the CPU
 * times are the ones users get. */
static void retune_blas(char **argv) {
    const char *core = kvc_ops_blas_better_core();
    if (!core || getenv("OPENBLAS_CORETYPE") || getenv("KVC_BLAS_RETUNED")) return;
    setenv("OPENBLAS_CORETYPE", core, 1);
    setenv("KVC_BLAS_RETUNED", "1", 1);
    execv("/proc/self/exe", argv);
    unsetenv("OPENBLAS_CORETYPE");
}

static uint64_t rs = 42;
/* Uniform in [-1, 1): test data only. */
static float r1(void) {
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(rs >> 40) / 8388608.0f - 1.0f;
}
static float *rnd(size_t n, float scale) {
    float *a = malloc(n * sizeof *a);
    for (size_t i = 0; i < n; i++) a[i] = scale * r1();
    return a;
}

/* Sizes and host data shared by every kernel. */
typedef struct {
    int t, d, r, g, chunk, reps;
    float *k, *v, *z, *wenc, *wdec, *benc, *bdec, *q, *y, *out, *probs, *score, *sc;
    int32_t *kpos, *qpos;
    kvc_rope_table rope;
    int64_t *idx;
} bench;

/* kvc_attend over every row, split over threads the way the caches split it. */
static void attend_rows(bench *b, int n_q, const kvc_attn_kv *kv, float *probs) {
    const int g = b->g, d = b->d;
#pragma omp parallel for collapse(2) schedule(dynamic, 4)
    for (int i = 0; i < n_q; i++)
        for (int h = 0; h < g; h++) {
            float sc[b->t + b->r + 1];
            kvc_attend(b->q + ((size_t)i * g + h) * d, d, b->qpos + i, 1, 1, d, kv, b->out + ((size_t)i * g + h) * d, d,
                       probs ? probs + ((size_t)i * g + h) * b->t : NULL, sc);
        }
}

/* The CPU kernel named `op` on b's data (0..6 as in OPS). */
static void run_cpu(bench *b, int op) {
    const int t = b->t, d = b->d, r = b->r;
    const kvc_attn_kv exact = {.t = t, .k = b->k, .ldk = d, .pos = b->kpos, .v = b->v, .ldv = d};
    const kvc_attn_kv latent = {.t = t, .k = b->k, .ldk = d, .pos = b->kpos, .ne = t, .z = b->z, .r = r, .w = b->wdec,
                                .b = b->bdec};
    switch (op) {
    case 0: kvc_dense_rows(b->v, t, d, b->wenc, b->benc, r, KVC_ACT_NONE, 0, b->z); break;
    case 1: kvc_dense_rows(b->z, t, r, b->wdec, b->bdec, d, KVC_ACT_NONE, 0, b->y); break;
    case 2: kvc_rope_rows(&b->rope, b->k, d, b->kpos, t, b->y, d); break;
    case 3: attend_rows(b, 1, &exact, b->probs); break;
    case 4: attend_rows(b, b->chunk, &exact, NULL); break;
    case 5: attend_rows(b, 1, &latent, b->probs); break;
    case 6: kvc_topk(b->score, t, 4, 10, t / 2, b->idx); break;
    }
}

static const char *const OPS[] = {
    "encode (T,D)->(T,R)", "decode (T,R)->(T,D)", "rope_rows (T,D)", "attend decode Q=1 +weights",
    "attend chunk Q=chunk", "attend latent Q=1 +weights", "topk k=T/2",
};
#define N_OPS 7

#ifdef KVC_HAVE_CUDA
/* Device copies of b's data; every pointer NULL when an allocation failed. */
typedef struct {
    float *k, *v, *z, *wenc, *wdec, *benc, *bdec, *q, *y, *out, *probs, *score, *cs;
    int32_t *kpos, *qpos;
    int64_t *idx;
} dev_bufs;

/* cudaMalloc + copy of n elements of size sz; NULL on failure. */
static void *to_dev(const void *h, size_t n, size_t sz) {
    void *p = NULL;
    if (cudaMalloc(&p, n * sz) != cudaSuccess) return NULL;
    if (h && cudaMemcpy(p, h, n * sz, cudaMemcpyHostToDevice) != cudaSuccess) { cudaFree(p); return NULL; }
    return p;
}

static int dev_upload(const bench *b, dev_bufs *d) {
    const size_t t = b->t, D = b->d, R = b->r, rows = (size_t)b->chunk * b->g;
    d->k = to_dev(b->k, t * D, 4), d->v = to_dev(b->v, t * D, 4), d->z = to_dev(b->z, t * R, 4);
    d->wenc = to_dev(b->wenc, R * D, 4), d->wdec = to_dev(b->wdec, D * R, 4);
    d->benc = to_dev(b->benc, R, 4), d->bdec = to_dev(b->bdec, D, 4), d->q = to_dev(b->q, rows * D, 4);
    d->y = to_dev(NULL, t * D, 4), d->out = to_dev(NULL, rows * D, 4), d->probs = to_dev(NULL, (size_t)b->g * t, 4);
    d->score = to_dev(b->score, t, 4), d->kpos = to_dev(b->kpos, t, 4), d->qpos = to_dev(b->qpos, b->chunk, 4);
    d->idx = to_dev(NULL, t, 8);
    d->cs = to_dev(b->rope.cs, (size_t)b->rope.n * 2 * D, 4);
    return d->cs && d->k && d->v && d->z && d->wenc && d->wdec && d->benc && d->bdec && d->q && d->y && d->out && d->probs &&
                   d->score && d->kpos && d->qpos && d->idx
               ? 0
               : -1;
}

static void dev_free(dev_bufs *d) {
    void *ps[] = {d->k, d->v, d->z, d->wenc, d->wdec, d->benc, d->bdec, d->q, d->y, d->out, d->probs, d->score,
                  d->kpos, d->qpos, d->idx, d->cs};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) cudaFree(ps[i]);
}

/* The CUDA twin of run_cpu's op on device data; -1 with err on failure. */
static int run_cuda(const bench *b, dev_bufs *dv, int op, kvc_err *err) {
    const int t = b->t, d = b->d, r = b->r, g = b->g;
    switch (op) {
    case 0: return kvc_dense_rows_dev(dv->v, t, d, dv->wenc, dv->benc, r, KVC_ACT_NONE, 0, dv->z, err);
    case 1: return kvc_dense_rows_dev(dv->z, t, r, dv->wdec, dv->bdec, d, KVC_ACT_NONE, 0, dv->y, err);
    case 2: return kvc_rope_rows_dev(dv->cs, dv->k, d, dv->kpos, t, d, dv->y, d, err);
    case 3: return kvc_attend_dev(dv->q, dv->qpos, 1, g, d, dv->k, dv->v, d, NULL, NULL, dv->kpos, t, dv->out, dv->probs, err);
    case 4: return kvc_attend_dev(dv->q, dv->qpos, b->chunk, g, d, dv->k, dv->v, d, NULL, NULL, dv->kpos, t, dv->out, NULL, err);
    case 5:
        return kvc_attend_dev(dv->q, dv->qpos, 1, g, d, dv->k, dv->z, r, dv->wdec, dv->bdec, dv->kpos, t, dv->out,
                              dv->probs, err);
    case 6: return kvc_topk_dev(dv->score, t, 4, 10, t / 2, dv->idx, err) < 0 ? -1 : 0;
    }
    return 0;
}
#endif

int main(int argc, char **argv) {
    retune_blas(argv);
    bench b = {.t = 4096, .d = 64, .r = 32, .g = 3, .chunk = 32, .reps = 20};
    int threads = 2;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { usage(); return 2; }
        if (!strcmp(a, "--t")) b.t = atoi(v);
        else if (!strcmp(a, "--d")) b.d = atoi(v);
        else if (!strcmp(a, "--r")) b.r = atoi(v);
        else if (!strcmp(a, "--g")) b.g = atoi(v);
        else if (!strcmp(a, "--chunk")) b.chunk = atoi(v);
        else if (!strcmp(a, "--reps")) b.reps = atoi(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else { usage(); return 2; }
        i++;
    }
    if (b.t < 16 || b.d < 2 || b.d % 2 || b.r < 1 || b.g < 1 || b.chunk < 1 || b.reps < 1 || threads < 1) {
        usage();
        return 2;
    }
    omp_set_num_threads(threads);
    const size_t t = b.t, D = b.d, R = b.r, rows = (size_t)b.chunk * b.g;
    b.k = rnd(t * D, 2), b.v = rnd(t * D, 1), b.z = rnd(t * R, 1), b.wenc = rnd(R * D, 0.2f), b.wdec = rnd(D * R, 0.2f);
    b.benc = rnd(R, 0.1f), b.bdec = rnd(D, 0.1f), b.q = rnd(rows * D, 1), b.y = rnd(t * D, 0), b.out = rnd(rows * D, 0);
    b.probs = rnd((size_t)b.g * t, 0), b.score = rnd(t, 1);
    b.kpos = malloc(t * sizeof *b.kpos), b.qpos = malloc((size_t)b.chunk * sizeof *b.qpos);
    b.idx = malloc(t * sizeof *b.idx);
    for (size_t i = 0; i < t; i++) b.kpos[i] = (int32_t)(i + i / 3); /* gaps, as after eviction */
    if (kvc_rope_table_init(&b.rope, b.d, 100000.0f) || kvc_rope_table_reserve(&b.rope, (int64_t)b.kpos[t - 1] + 1)) {
        fprintf(stderr, "bench_kernels: out of memory\n");
        return 1;
    }
    for (int j = 0; j < b.chunk; j++) b.qpos[j] = b.kpos[t - 1] + 1 + j;

    char why[256] = "";
    int gpu = kvc_backend_cuda_available(why, sizeof why);
    printf("bench_kernels: one KV head, T=%d D=%d R=%d G=%d chunk=%d, %d reps, CPU %d threads; CUDA: %s%s\n", b.t, b.d,
           b.r, b.g, b.chunk, b.reps, threads, gpu ? "" : "skipped, ", why);
    printf("%-30s %12s %12s %9s\n", "kernel", "cpu ms", "cuda ms", "cpu/cuda");
#ifdef KVC_HAVE_CUDA
    dev_bufs dv = {0};
    cudaEvent_t e0 = NULL, e1 = NULL;
    kvc_err err = {{0}};
    if (gpu && (dev_upload(&b, &dv) || cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess)) {
        fprintf(stderr, "bench_kernels: device buffers could not be set up; CUDA skipped\n");
        gpu = 0;
    }
#endif
    for (int op = 0; op < N_OPS; op++) {
        run_cpu(&b, op); /* warm caches and thread pools */
        double t0 = kvc_now();
        for (int i = 0; i < b.reps; i++) run_cpu(&b, op);
        double cpu_ms = (kvc_now() - t0) * 1e3 / b.reps, cuda_ms = -1;
#ifdef KVC_HAVE_CUDA
        if (gpu) {
            float ms = 0;
            int rc = run_cuda(&b, &dv, op, &err) || cudaDeviceSynchronize() != cudaSuccess;
            cudaEventRecord(e0, 0);
            for (int i = 0; i < b.reps && !rc; i++) rc = run_cuda(&b, &dv, op, &err);
            cudaEventRecord(e1, 0);
            if (!rc && cudaEventSynchronize(e1) == cudaSuccess && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess)
                cuda_ms = ms / b.reps;
            else
                fprintf(stderr, "bench_kernels: %s failed on CUDA: %s\n", OPS[op], err.msg[0] ? err.msg : "CUDA error");
        }
#endif
        if (cuda_ms > 0)
            printf("%-30s %12.4f %12.4f %9.1f\n", OPS[op], cpu_ms, cuda_ms, cpu_ms / cuda_ms);
        else
            printf("%-30s %12.4f %12s %9s\n", OPS[op], cpu_ms, "-", "-");
    }
#ifdef KVC_HAVE_CUDA
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    dev_free(&dv);
#endif
    free(b.k), free(b.v), free(b.z), free(b.wenc), free(b.wdec), free(b.benc), free(b.bdec), free(b.q), free(b.y);
    free(b.out), free(b.probs), free(b.score), free(b.kpos), free(b.qpos), free(b.idx);
    return 0;
}
