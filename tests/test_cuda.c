/* test_cuda.c - every CUDA kernel against its CPU twin (tolerance abs + eps*|ref|). Runs
 * where a GPU is present; elsewhere each test says it skipped and why. */
#include <criterion/criterion.h>
#include "kvc/kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/backend.h"
#include "kvc/ops.h"
#include "kvc/quant.h"
#ifdef KVC_HAVE_CUDA
#include "kvc/ops_cuda.h"
#endif

#define EPS_F32 1e-5 /* relative budget for f32 kernels (transcendentals differ in the last bits) */

#ifdef KVC_HAVE_CUDA
static uint32_t s = 7;
static float r1(void) { s = s * 1664525u + 1013904223u; return (float)(s >> 8) / 16777216.0f * 2 - 1; }

static void need_gpu(void) {
    char why[256];
    if (!kvc_backend_cuda_available(why, sizeof why)) cr_skip_test("CUDA parity skipped: %s", why);
}

static void expect_close(const float *got, const float *ref, size_t n, double abs_tol, const char *what) {
    for (size_t i = 0; i < n; i++)
        cr_assert(fabs(got[i] - ref[i]) <= abs_tol + EPS_F32 * fabs(ref[i]), "%s[%zu]: cuda %g cpu %g", what, i,
                  got[i], ref[i]);
}

Test(cuda, rmsnorm_swiglu) {
    need_gpu();
    enum { N = 7, E = 576, H = 9, D = 64 };
    float *x = malloc(N * E * 4), *g = malloc(E * 4), *a = malloc(N * E * 4), *b = malloc(N * E * 4);
    kvc_err err = {{0}};
    for (int i = 0; i < N * E; i++) x[i] = r1() * 3;
    for (int i = 0; i < E; i++) g[i] = r1();
    kvc_rmsnorm_cpu(a, x, g, N, E, 1e-5f);
    cr_assert_eq(kvc_rmsnorm_cuda(b, x, g, N, E, 1e-5f, &err), 0, "%s", err.msg);
    expect_close(b, a, N * E, 1e-6, "rmsnorm");
    (void)H, (void)D; /* RoPE's twin is tested in test_kernels_cuda.c */
    memcpy(a, x, N * E * 4);
    memcpy(b, x, N * E * 4);
    kvc_swiglu_cpu(a, g, E);
    cr_assert_eq(kvc_swiglu_cuda(b, g, E, &err), 0, "%s", err.msg);
    expect_close(b, a, E, 1e-6, "swiglu");
    free(x); free(g); free(a); free(b);
}

Test(cuda, dequantize_and_matmul) {
    need_gpu();
    enum { NB = 64, O = 48, I = 96, N = 5 };
    uint8_t q[NB * 34];
    kvc_err err = {{0}};
    for (int i = 0; i < NB * 34; i++) q[i] = (uint8_t)(r1() * 127);
    for (int b = 0; b < NB; b++) { uint16_t h = kvc_f32_to_f16(0.01f * (b + 1)); memcpy(q + b * 34, &h, 2); }
    /* the same bytes read as 64 Q8_0 blocks and as 108 Q4_1 blocks */
    static float a[108 * 32], c[108 * 32];
    const uint32_t types[2] = {GGML_T_Q8_0, GGML_T_Q4_1};
    const int n_elems[2] = {NB * 32, (NB * 34 / 20) * 32};
    for (int t = 0; t < 2; t++) {
        cr_assert_eq(kvc_dequantize_row(types[t], q, a, n_elems[t]), 0);
        cr_assert_eq(kvc_dequantize_cuda(types[t], q, c, n_elems[t], &err), 0, "%s", err.msg);
        expect_close(c, a, (size_t)n_elems[t], 0, kvc_ggml_type_name(types[t]));
    }
    float *w = malloc(O * I * 4), *x = malloc(N * I * 4), *y1 = malloc(N * O * 4), *y2 = malloc(N * O * 4);
    for (int i = 0; i < O * I; i++) w[i] = r1();
    for (int i = 0; i < N * I; i++) x[i] = r1();
    kvc_matrix m = {NULL, GGML_T_F32, w, O, I, I * 4};
    kvc_matmul_cpu(y1, x, &m, N);
    cr_assert_eq(kvc_matmul_cuda(y2, x, w, N, O, I, &err), 0, "%s", err.msg);
    expect_close(y2, y1, N * O, 1e-4, "matmul");
    free(w); free(x); free(y1); free(y2);
}
#else
Test(cuda, not_built) { cr_skip_test("CUDA parity skipped: this build has no CUDA backend (nvcc not found)"); }
#endif

Test(cuda, cpu_build_runs_without_a_driver) {
    char why[256] = "";
    int avail = kvc_backend_cuda_available(why, sizeof why);
    cr_expect(avail == 0 || avail == 1);
    cr_expect(why[0] != '\0', "backend must say what it found");
    cr_log_info("CUDA compiled: %d, available: %d (%s)", kvc_backend_cuda_compiled(), avail, why);
}
