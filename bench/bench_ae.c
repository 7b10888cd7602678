/* bench_ae.c - training throughput of the CPU autoencoder trainer (train/ae.c): AdamW steps
 * over consecutive batches of a raw float32 file, reported as rows (samples) per second in
 * one line of JSON. bench/bench_ae_train.py runs it against the same PyTorch model. */
#include "kvc/ae.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static void usage(void) {
    fprintf(stderr,
            "usage: bench_ae --data FILE.f32 [--dim 64] [--hidden 64] [--latent 32] [--act leaky_relu]\n"
            "                [--norm batch|none] [--batch 1024] [--steps 200] [--warmup 20] [--threads 2]\n"
            "                [--seed 1] [--omp N] [--blas N]   (--omp/--blas: OpenMP and OpenBLAS threads,\n"
            "                                                   both --threads unless given)\n");
}

/* OpenBLAS reads OPENBLAS_CORETYPE only when it loads: if it fell back to its generic
 * "Prescott" kernels on an AVX2+FMA CPU, restart once with Haswell named (as cli/main.c does). */
static void retune_blas(char **argv) {
    const char *core = openblas_get_corename();
    if (!core || strcasecmp(core, "Prescott") != 0 || getenv("OPENBLAS_CORETYPE")) return;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return;
    setenv("OPENBLAS_CORETYPE", "Haswell", 1);
    execv("/proc/self/exe", argv);
    unsetenv("OPENBLAS_CORETYPE");
}

int main(int argc, char **argv) {
    retune_blas(argv);
    const char *data = NULL, *act = "leaky_relu", *norm = "batch";
    int batch = 1024, steps = 200, warm = 20, threads = 2, omp = 0, blas = 0;
    uint64_t seed = 1;
    ae_config c;
    kvc_ae_config_defaults(&c);
    c.in_dim = 64, c.hidden = 64, c.latent = 32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { usage(); return 2; }
        if (!strcmp(a, "--data")) data = v;
        else if (!strcmp(a, "--dim")) c.in_dim = atoi(v);
        else if (!strcmp(a, "--hidden")) c.hidden = atoi(v);
        else if (!strcmp(a, "--latent")) c.latent = atoi(v);
        else if (!strcmp(a, "--act")) act = v;
        else if (!strcmp(a, "--norm")) norm = v;
        else if (!strcmp(a, "--batch")) batch = atoi(v);
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--warmup")) warm = atoi(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--omp")) omp = atoi(v);
        else if (!strcmp(a, "--blas")) blas = atoi(v);
        else { usage(); return 2; }
        i++;
    }
    if (!data || batch < 2 || steps < 1 || threads < 1) { usage(); return 2; }
    if (kvc_ae_act_parse(act, &c.act)) { fprintf(stderr, "bench_ae: unknown activation '%s'\n", act); return 2; }
    c.norm = !strcmp(norm, "batch") ? AE_NORM_BATCH : AE_NORM_NONE;
    omp_set_num_threads(omp > 0 ? omp : threads);
    openblas_set_num_threads(blas > 0 ? blas : threads);

    char *buf;
    size_t len;
    kvc_err err = {{0}};
    if (kvc_read_file(data, &buf, &len, &err)) { fprintf(stderr, "bench_ae: %s\n", err.msg); return 1; }
    size_t row_bytes = (size_t)c.in_dim * sizeof(float);
    int rows = (int)(len / row_bytes);
    if (rows < batch) { fprintf(stderr, "bench_ae: %s holds %d rows, fewer than a batch\n", data, rows); return 1; }
    const float *x = (const float *)(void *)buf; /* kvc_read_file's buffer is malloc-aligned */
    ae_model *m = kvc_ae_new(&c, seed, &err);
    if (!m) { fprintf(stderr, "bench_ae: %s\n", err.msg); return 1; }
    ae_adam o;
    kvc_ae_adam_defaults(&o);
    ae_loss L = {.kind = AE_LOSS_MSE};
    int n_batches = rows / batch, b = 0;
    float first = 0, last = 0;
    double t0 = 0;
    for (int s = 0; s < warm + steps; s++) {
        if (s == warm) t0 = kvc_now();
        last = kvc_ae_forward_backward(m, x + (size_t)b * batch * c.in_dim, batch, &L);
        if (s == 0) first = last;
        kvc_ae_adam_step(m, &o);
        b = (b + 1) % n_batches;
    }
    double dt = kvc_now() - t0;
    printf("{\"samples_per_s\": %.1f, \"steps\": %d, \"batch\": %d, \"seconds\": %.4f, \"loss_first\": %.6f, "
           "\"loss_last\": %.6f, \"threads\": %d, \"blas_core\": \"%s\"}\n",
           (double)steps * batch / dt, steps, batch, dt, first, last, threads, openblas_get_corename());
    kvc_ae_free(m);
    free(buf);
    return 0;
}
