/* test_ae_cuda.c - the CUDA autoencoder trainer (train/ae_cuda.cu) against its CPU twin
 * (train/ae.c): per-step losses, gradient norms, first-step gradients and the downloaded state
 * after 20 steps from the same seed and data; the activation and BatchNorm kernels against
 * small C loops. Parity tests run where a GPU is present and say they skipped elsewhere; the
 * error-path tests run on every machine. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/ae.h"
#ifdef KVC_HAVE_CUDA
#include "kvc/ae_cuda.h"
#endif

/* Budgets. cuBLAS and OpenBLAS sum in different orders and the device reduces in double, so
 * step results differ in the last bits of f32; nothing here may drift further.
 * - loss and gradient norm of every step: |gpu - cpu| <= TOL_LOSS |cpu|;
 * - first-step gradients, per element: |gpu - cpu| <= TOL_GRAD_ABS max|cpu| + TOL_GRAD |cpu|
 *   (the absolute part scaled by the tensor: elements near 0 are cancellations);
 * - state after the steps, per tensor: |gpu - cpu|_2 <= TOL_MOVE |cpu - init|_2, i.e. the GPU
 *   moved every tensor as the CPU did to within TOL_MOVE of how far training moved it (Adam
 *   turns a gradient element within rounding of 0 into a full +-lr step of either sign, so an
 *   element-wise bound would be fragile where a norm is not);
 * - in a BatchNorm model the biases of the Linear layers right before a BatchNorm, and the
 *   encoder's output bias (it only feeds the decoder's pre-BatchNorm Linear), have gradients
 *   that are 0 up to rounding (BatchNorm removes a per-feature shift): both sides must give
 *   |g| <= TOL_BN_BIAS |grad|_2, and Adam then moves them (and the running means they enter) by
 *   noise, bounded by NOISE_STEPS lr per step. */
#define TOL_LOSS 1e-4
#define TOL_GRAD 1e-4
#define TOL_GRAD_ABS 1e-5
#define TOL_MOVE 1e-2
#define TOL_BN_BIAS 1e-4
#define NOISE_STEPS 3.0
/* Single kernels against C loops in double: |gpu - ref| <= abs + EPS_F32 |ref|. */
#define EPS_F32 1e-5

#define SQRT_2_OVER_PI 0.79788456080286536

#define STEPS 20
#define ROWS 512 /* rows of the synthetic data set */
#define QUERIES 8

static ae_config make_config(int d, int h, int r, kvc_act act, ae_norm norm) {
    ae_config c;
    kvc_ae_config_defaults(&c);
    c.in_dim = d, c.hidden = h, c.latent = r, c.act = act, c.norm = norm;
    return c;
}

#ifdef KVC_HAVE_CUDA

static uint64_t rng_state;

/* Standard normal from a splitmix64 stream (Box-Muller), for test data. */
static float randn(void) {
    uint64_t z[2];
    for (int k = 0; k < 2; k++) {
        uint64_t v = (rng_state += 0x9E3779B97F4A7C15ull);
        v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ull;
        v = (v ^ (v >> 27)) * 0x94D049BB133111EBull;
        z[k] = v ^ (v >> 31);
    }
    double u1 = ((z[0] >> 11) + 1.0) / 9007199254740993.0, u2 = (z[1] >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void need_gpu(void) {
    char why[256];
    if (!kvc_ae_cuda_available(why, sizeof why)) cr_skip_test("CUDA parity skipped: %s", why);
}

/* KV-like rows (ROWS, d): rank-12 structure, a few large channels, some noise. */
static float *make_data(int d) {
    enum { RANK = 12 };
    float *u = malloc(sizeof(float) * RANK * d), *x = malloc(sizeof(float) * ROWS * d);
    for (int i = 0; i < RANK * d; i++) u[i] = randn() / sqrtf(RANK);
    for (int i = 0; i < ROWS; i++) {
        float z[RANK];
        for (int k = 0; k < RANK; k++) z[k] = randn();
        for (int j = 0; j < d; j++) {
            float v = 0.1f * randn() + (j % 16 == 3 ? 2.0f : 0.0f);
            for (int k = 0; k < RANK; k++) v += z[k] * u[k * d + j];
            x[(size_t)i * d + j] = v;
        }
    }
    free(u);
    return x;
}

/* KEY_ATTN weight W (d, d) = Q^T Q / |Q| for 32 random queries: symmetric PSD. */
static float *make_key_weight(int d) {
    enum { NQ = 32 };
    float *q = malloc(sizeof(float) * NQ * d), *w = malloc(sizeof(float) * d * d);
    for (int i = 0; i < NQ * d; i++) q[i] = randn();
    for (int a = 0; a < d; a++)
        for (int b = a; b < d; b++) {
            double s = 0;
            for (int k = 0; k < NQ; k++) s += (double)q[k * d + a] * q[k * d + b];
            w[a * d + b] = w[b * d + a] = (float)(s / NQ);
        }
    free(q);
    return w;
}

/* VALUE_ATTN weights A (m, n): each row a softmax of random scores over the n batch rows. */
static void make_attention(float *a, int m, int n) {
    for (int i = 0; i < m; i++) {
        double s = 0;
        for (int j = 0; j < n; j++) s += (a[i * n + j] = expf(2.0f * randn()));
        for (int j = 0; j < n; j++) a[i * n + j] = (float)(a[i * n + j] / s);
    }
}

/* 1 if the named tensor of a model with config c has a gradient that is 0 but for rounding:
 * in a BatchNorm model (enc/dec = Linear, BatchNorm, act, Linear) the biases "<half>.0.bias"
 * before each BatchNorm and the encoder's output bias "enc.3.bias". */
static int is_pre_bn_bias(const ae_config *c, const char *name) {
    return c->hidden > 0 && c->norm == AE_NORM_BATCH && (strstr(name, ".0.bias") || !strcmp(name, "enc.3.bias"));
}

static double max_abs(const float *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

/* |a - b|_2 and |b - c|_2 over n floats. */
static double dist(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(s);
}

/* First-step gradients of the GPU (downloaded into chk) against the CPU model's. */
static void compare_grads(ae_model *cpu, ae_model *chk, const char *what) {
    const ae_config *c = kvc_ae_get_config(cpu);
    double gnorm = kvc_ae_grad_norm(cpu);
    for (int i = 0; i < kvc_ae_n_tensors(cpu); i++) {
        ae_tensor gc = kvc_ae_grad_at(cpu, i), gg = kvc_ae_grad_at(chk, i);
        if (!gc.data) continue;
        size_t n = (size_t)gc.rows * gc.cols;
        if (is_pre_bn_bias(c, gc.name)) {
            cr_assert(max_abs(gc.data, n) <= TOL_BN_BIAS * gnorm && max_abs(gg.data, n) <= TOL_BN_BIAS * gnorm,
                      "%s: %s gradient should vanish (cpu max %g, gpu max %g, |grad| %g)", what, gc.name,
                      max_abs(gc.data, n), max_abs(gg.data, n), gnorm);
            continue;
        }
        double abs_tol = TOL_GRAD_ABS * max_abs(gc.data, n);
        for (size_t k = 0; k < n; k++)
            cr_assert(fabs(gg.data[k] - gc.data[k]) <= abs_tol + TOL_GRAD * fabs(gc.data[k]),
                      "%s: grad %s[%zu]: cuda %.9g cpu %.9g", what, gc.name, k, gg.data[k], gc.data[k]);
    }
}

/* State after the steps: parameters, running stats and Adam moments of the GPU (downloaded
 * into chk) against the CPU model; init holds the CPU tensors before training (P + S floats
 * in tensor order). */
static void compare_state(ae_model *cpu, ae_model *chk, const float *init, float lr, const char *what,
                          double *worst) {
    const ae_config *c = kvc_ae_get_config(cpu);
    double noise = NOISE_STEPS * lr * STEPS;
    size_t at = 0;
    cr_assert_eq(kvc_ae_adam_steps(chk), kvc_ae_adam_steps(cpu), "%s: Adam step count", what);
    for (int i = 0; i < kvc_ae_n_tensors(cpu); i++) {
        ae_tensor tc = kvc_ae_tensor_at(cpu, i), tg = kvc_ae_tensor_at(chk, i);
        size_t n = (size_t)tc.rows * tc.cols;
        const float *t0 = init + at;
        at += n;
        if (is_pre_bn_bias(c, tc.name) || strstr(tc.name, "running_mean")) {
            /* noise-driven: each side within the bound of where it started */
            for (size_t k = 0; k < n; k++)
                cr_assert(fabs(tg.data[k] - t0[k]) <= noise + fabs(tc.data[k] - t0[k]),
                          "%s: %s[%zu] moved %g on the GPU, %g on the CPU", what, tc.name, k, tg.data[k] - t0[k],
                          tc.data[k] - t0[k]);
            continue;
        }
        double moved = dist(tc.data, t0, n), off = dist(tg.data, tc.data, n);
        cr_assert(moved > 0, "%s: %s did not train", what, tc.name);
        cr_assert(off <= TOL_MOVE * moved, "%s: %s differs by %g after moving %g (budget %g)", what, tc.name, off,
                  moved, TOL_MOVE * moved);
        if (off / moved > *worst) *worst = off / moved;
        if (!tc.trainable) continue;
        /* Adam moments: normalised error */
        ae_tensor mc = kvc_ae_adam_m_at(cpu, i), mg = kvc_ae_adam_m_at(chk, i), vc = kvc_ae_adam_v_at(cpu, i),
                  vg = kvc_ae_adam_v_at(chk, i);
        double mn = 0, vn = 0;
        for (size_t k = 0; k < n; k++) mn += (double)mc.data[k] * mc.data[k], vn += (double)vc.data[k] * vc.data[k];
        cr_assert(dist(mg.data, mc.data, n) <= TOL_MOVE * sqrt(mn), "%s: Adam m of %s", what, tc.name);
        cr_assert(dist(vg.data, vc.data, n) <= TOL_MOVE * sqrt(vn), "%s: Adam v of %s", what, tc.name);
    }
}

/* Trains a CPU model and its GPU copy side by side for STEPS steps on the same batches (sizes
 * cycling through batch[0..n_batch), so device buffers grow and are reused) and compares the
 * losses and gradient norms of every step, the first-step gradients and the final state.
 * opt NULL: AdamW defaults with lr 3e-3, and the loss must fall. */
static void parity(const char *what, ae_config cfg, ae_loss_kind kind, float mse_mix, const int *batch,
                   int n_batch, const ae_adam *opt) {
    need_gpu();
    kvc_err err = {{0}};
    const int D = cfg.in_dim;
    rng_state = 42;
    float *x = make_data(D), *w = kind == AE_LOSS_KEY_ATTN ? make_key_weight(D) : NULL;
    float *a = malloc(sizeof(float) * QUERIES * ROWS);
    ae_model *cpu = kvc_ae_new(&cfg, 1234, &err), *chk = kvc_ae_new(&cfg, 99, &err);
    cr_assert(cpu && chk, "%s", err.msg);
    ae_cuda *g = kvc_ae_cuda_new(cpu, &err);
    cr_assert_not_null(g, "%s: kvc_ae_cuda_new: %s", what, err.msg);

    /* the CPU tensors before training, for compare_state */
    size_t total = 0, at = 0;
    for (int i = 0; i < kvc_ae_n_tensors(cpu); i++) total += (size_t)kvc_ae_tensor_at(cpu, i).rows * kvc_ae_tensor_at(cpu, i).cols;
    float *init = malloc(total * sizeof(float));
    for (int i = 0; i < kvc_ae_n_tensors(cpu); i++) {
        ae_tensor t = kvc_ae_tensor_at(cpu, i);
        memcpy(init + at, t.data, sizeof(float) * t.rows * t.cols);
        at += (size_t)t.rows * t.cols;
    }

    ae_adam o;
    kvc_ae_adam_defaults(&o);
    o.lr = 3e-3f;
    if (opt) o = *opt;
    float first = 0, last = 0;
    double worst_loss = 0; /* largest |gpu - cpu| / |cpu| of a step loss, logged */
    for (int s = 0, row = 0; s < STEPS; s++) {
        int n = batch[s % n_batch];
        if (row + n > ROWS) row = 0;
        const float *xb = x + (size_t)row * D;
        row += n;
        if (kind == AE_LOSS_VALUE_ATTN) make_attention(a, QUERIES, n);
        ae_loss L = {kind, w, a, QUERIES, mse_mix};
        float lc = kvc_ae_forward_backward(cpu, xb, n, &L);
        float lg = kvc_ae_cuda_forward_backward(g, xb, n, &L, &err);
        cr_assert(isfinite(lc), "%s: CPU loss at step %d is %g", what, s, lc);
        cr_assert(isfinite(lg), "%s: GPU loss at step %d is %g (%s)", what, s, lg, err.msg);
        cr_assert(fabs(lg - lc) <= TOL_LOSS * fabs(lc), "%s: step %d (batch %d) loss cuda %.9g cpu %.9g", what, s, n,
                  lg, lc);
        if (fabs(lg - lc) / fabs(lc) > worst_loss) worst_loss = fabs(lg - lc) / fabs(lc);
        float gc = kvc_ae_grad_norm(cpu), gg = kvc_ae_cuda_grad_norm(g, &err);
        cr_assert(fabs(gg - gc) <= TOL_LOSS * fabs(gc), "%s: step %d grad norm cuda %.9g cpu %.9g", what, s, gg, gc);
        if (s == 0) {
            cr_assert_eq(kvc_ae_cuda_download(g, chk, &err), 0, "%s", err.msg);
            compare_grads(cpu, chk, what);
            first = lc;
        }
        last = lc;
        kvc_ae_adam_step(cpu, &o);
        cr_assert_eq(kvc_ae_cuda_adam_step(g, &o, &err), 0, "%s", err.msg);
    }
    if (!opt) cr_assert(last < first, "%s: training did not lower the loss (%g -> %g)", what, first, last);
    cr_assert_eq(kvc_ae_cuda_adam_steps(g), STEPS);
    cr_assert_eq(kvc_ae_cuda_download(g, chk, &err), 0, "%s", err.msg);
    double worst_move = 0; /* largest |gpu - cpu| / |cpu - init| of a tensor, logged */
    compare_state(cpu, chk, init, o.lr, what, &worst_move);
    cr_log_info("%s: %d steps, loss %.6g -> %.6g; worst step-loss difference %.2g relative, worst tensor %.2g of "
                "its movement", what, STEPS, first, last, worst_loss, worst_move);

    kvc_ae_cuda_free(g);
    kvc_ae_free(cpu);
    kvc_ae_free(chk);
    free(init);
    free(x);
    free(w);
    free(a);
}

Test(ae_cuda_parity, kvcar_batchnorm_leaky_relu_mse) {
    static const int batch[] = {128, 64, 200, 96}; /* grows, shrinks, grows past the first size */
    parity("kvcar", make_config(64, 32, 16, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH), AE_LOSS_MSE, 0, batch, 4, NULL);
}

Test(ae_cuda_parity, linear_key_attn) {
    static const int batch[] = {128};
    parity("linear_key", make_config(64, 0, 16, KVC_ACT_NONE, AE_NORM_NONE), AE_LOSS_KEY_ATTN, 0.1f, batch, 1, NULL);
}

Test(ae_cuda_parity, gelu_value_attn) {
    static const int batch[] = {96, 128};
    parity("gelu_value", make_config(64, 48, 8, KVC_ACT_GELU, AE_NORM_NONE), AE_LOSS_VALUE_ATTN, 0.05f, batch, 2, NULL);
}

Test(ae_cuda_parity, silu_value_attn) {
    static const int batch[] = {128};
    parity("silu_value", make_config(64, 48, 8, KVC_ACT_SILU, AE_NORM_NONE), AE_LOSS_VALUE_ATTN, 0.05f, batch, 1, NULL);
}

Test(ae_cuda_parity, relu_batchnorm_key_attn) {
    static const int batch[] = {64, 300}; /* 300 rows: more than one BatchNorm block's threads */
    parity("relu_bn_key", make_config(64, 32, 16, KVC_ACT_RELU, AE_NORM_BATCH), AE_LOSS_KEY_ATTN, 0.1f, batch, 2, NULL);
}

Test(ae_cuda_parity, strong_weight_decay_spares_biases_and_batchnorm) {
    /* lr wd = 0.05: decay dominates how far the Linear weights move, and decaying a bias or a
     * BatchNorm parameter by mistake would move it far outside its budget */
    static const int batch[] = {128};
    ae_adam o;
    kvc_ae_adam_defaults(&o);
    o.lr = 1e-2f, o.weight_decay = 5.0f;
    parity("strong_decay", make_config(64, 32, 16, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH), AE_LOSS_MSE, 0, batch, 1, &o);
}

Test(ae_cuda_parity, batchnorm_running_stats_without_updates) {
    /* forward/backward only, no Adam step: the noise-driven biases stay equal on both sides, so
     * the running statistics (several momentum updates over batches of varying size) and the
     * gradients must agree element by element */
    need_gpu();
    static const int batch[] = {128, 64, 300, 2, 16};
    kvc_err err = {{0}};
    ae_config cfg = make_config(64, 32, 16, KVC_ACT_GELU, AE_NORM_BATCH);
    rng_state = 5;
    float *x = make_data(64);
    ae_model *cpu = kvc_ae_new(&cfg, 77, &err), *chk = kvc_ae_new(&cfg, 78, &err);
    cr_assert(cpu && chk, "%s", err.msg);
    ae_cuda *g = kvc_ae_cuda_new(cpu, &err);
    cr_assert_not_null(g, "%s", err.msg);
    ae_loss L = {AE_LOSS_MSE, NULL, NULL, 0, 0};
    for (int s = 0, row = 0; s < 5; row += batch[s], s++) {
        cr_assert(row + batch[s] <= ROWS);
        float lc = kvc_ae_forward_backward(cpu, x + (size_t)row * 64, batch[s], &L);
        float lg = kvc_ae_cuda_forward_backward(g, x + (size_t)row * 64, batch[s], &L, &err);
        cr_assert(fabs(lg - lc) <= TOL_LOSS * fabs(lc), "step %d: loss cuda %.9g cpu %.9g (%s)", s, lg, lc, err.msg);
    }
    cr_assert_eq(kvc_ae_cuda_download(g, chk, &err), 0, "%s", err.msg);
    compare_grads(cpu, chk, "no_updates");
    for (int i = 0; i < kvc_ae_n_tensors(cpu); i++) {
        ae_tensor tc = kvc_ae_tensor_at(cpu, i), tg = kvc_ae_tensor_at(chk, i);
        for (int k = 0; k < tc.rows * tc.cols; k++)
            cr_assert(fabs(tg.data[k] - tc.data[k]) <= 1e-6 + TOL_GRAD * fabs(tc.data[k]), "%s[%d]: cuda %.9g cpu %.9g",
                      tc.name, k, tg.data[k], tc.data[k]);
    }
    cr_assert_eq(kvc_ae_cuda_adam_steps(g), 0);
    kvc_ae_cuda_free(g);
    kvc_ae_free(cpu);
    kvc_ae_free(chk);
    free(x);
}

/* ---- single kernels against C loops ------------------------------------------------- */

static double act_ref(double x, kvc_act act, double slope) {
    switch (act) {
    case KVC_ACT_RELU: return x > 0 ? x : 0;
    case KVC_ACT_LEAKY_RELU: return x > 0 ? x : slope * x;
    case KVC_ACT_GELU: return 0.5 * x * (1 + tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)));
    case KVC_ACT_SILU: return x / (1 + exp(-x));
    default: return x;
    }
}

static double dact_ref(double x, kvc_act act, double slope) {
    switch (act) {
    case KVC_ACT_RELU: return x > 0 ? 1 : 0;
    case KVC_ACT_LEAKY_RELU: return x > 0 ? 1 : slope;
    case KVC_ACT_GELU: {
        double k = SQRT_2_OVER_PI, t = tanh(k * (x + 0.044715 * x * x * x));
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x);
    }
    case KVC_ACT_SILU: {
        double s = 1 / (1 + exp(-x));
        return s * (1 + x * (1 - s));
    }
    default: return 1;
    }
}

Test(ae_cuda_kernels, activations_and_derivatives) {
    need_gpu();
    enum { N = 1000 };
    static float x[N], dy[N], y[N], dx[N];
    kvc_err err = {{0}};
    rng_state = 7;
    for (int i = 0; i < N; i++) x[i] = 3.0f * randn(), dy[i] = randn();
    x[0] = 0.0f, x[1] = -0.0f, x[2] = 12.0f, x[3] = -12.0f, x[4] = 1e-4f;
    for (int a = 0; a < KVC_ACT_COUNT; a++) {
        cr_assert_eq(kvc_ae_cuda_test_act((kvc_act)a, 0.01f, x, dy, N, y, dx, &err), 0, "%s", err.msg);
        for (int i = 0; i < N; i++) {
            double ry = act_ref(x[i], (kvc_act)a, 0.01), rdx = dy[i] * dact_ref(x[i], (kvc_act)a, 0.01);
            cr_assert(fabs(y[i] - ry) <= 1e-6 + EPS_F32 * fabs(ry), "%s(%g): cuda %.9g ref %.9g",
                      kvc_ae_act_name((kvc_act)a), x[i], y[i], ry);
            cr_assert(fabs(dx[i] - rdx) <= 1e-6 + EPS_F32 * fabs(rdx), "%s'(%g): cuda %.9g ref %.9g",
                      kvc_ae_act_name((kvc_act)a), x[i], dx[i], rdx);
        }
    }
}

/* BatchNorm1d training forward/backward on (n, c) against the textbook formulas in double. */
static void batchnorm_case(int n, int c) {
    kvc_err err = {{0}};
    const float eps = 1e-5f, mom = 0.1f;
    float *h = malloc(sizeof(float) * n * c), *dy = malloc(sizeof(float) * n * c), *y = malloc(sizeof(float) * n * c),
          *dh = malloc(sizeof(float) * n * c);
    float *gam = malloc(sizeof(float) * c), *bet = malloc(sizeof(float) * c), *rm = malloc(sizeof(float) * c),
          *rv = malloc(sizeof(float) * c), *dg = malloc(sizeof(float) * c), *db = malloc(sizeof(float) * c);
    float *rm0 = malloc(sizeof(float) * c), *rv0 = malloc(sizeof(float) * c);
    for (int i = 0; i < n * c; i++) h[i] = 2.0f * randn() + 0.5f * (i % c), dy[i] = randn();
    for (int j = 0; j < c; j++) gam[j] = 1 + 0.3f * randn(), bet[j] = randn(), rm0[j] = rm[j] = randn(),
                                rv0[j] = rv[j] = 1 + 0.1f * j;
    cr_assert_eq(kvc_ae_cuda_test_batchnorm(h, gam, bet, rm, rv, n, c, eps, mom, dy, y, dh, dg, db, &err), 0, "%s",
                 err.msg);
    for (int j = 0; j < c; j++) {
        double mu = 0, var = 0, sd = 0, sdx = 0, dy_max = 0;
        for (int i = 0; i < n; i++) mu += h[i * c + j];
        mu /= n;
        for (int i = 0; i < n; i++) var += (h[i * c + j] - mu) * (h[i * c + j] - mu);
        var /= n;
        double inv = 1 / sqrt(var + eps);
        for (int i = 0; i < n; i++) sd += dy[i * c + j], sdx += dy[i * c + j] * (h[i * c + j] - mu) * inv;
        for (int i = 0; i < n; i++) {
            double xh = (h[i * c + j] - mu) * inv, ry = gam[j] * xh + bet[j];
            dy_max = fabs(dy[i * c + j]) > dy_max ? fabs(dy[i * c + j]) : dy_max;
            cr_assert(fabs(y[i * c + j] - ry) <= 1e-6 + EPS_F32 * fabs(ry), "bn y[%d,%d]: cuda %.9g ref %.9g", i, j,
                      y[i * c + j], ry);
        }
        for (int i = 0; i < n; i++) {
            double xh = (h[i * c + j] - mu) * inv, rdh = gam[j] * inv / n * (n * dy[i * c + j] - sd - xh * sdx);
            /* dh is a difference of terms of size |gamma inv dy| (for n = 2 it is 0 but for eps): its
             * error scales with those terms, not with dh */
            cr_assert(fabs(dh[i * c + j] - rdh) <= 1e-5 * fabs(gam[j] * inv) * dy_max + EPS_F32 * fabs(rdh),
                      "bn dh[%d,%d]: cuda %.9g ref %.9g", i, j, dh[i * c + j], rdh);
        }
        double rrm = (1 - mom) * rm0[j] + mom * mu, rrv = (1 - mom) * rv0[j] + mom * var * n / (n - 1);
        cr_assert(fabs(rm[j] - rrm) <= 1e-6 + EPS_F32 * fabs(rrm), "bn running_mean[%d]: %.9g vs %.9g", j, rm[j], rrm);
        cr_assert(fabs(rv[j] - rrv) <= 1e-6 + EPS_F32 * fabs(rrv), "bn running_var[%d]: %.9g vs %.9g", j, rv[j], rrv);
        cr_assert(fabs(db[j] - sd) <= 1e-5 + EPS_F32 * fabs(sd), "bn dbeta[%d]: %.9g vs %.9g", j, db[j], sd);
        cr_assert(fabs(dg[j] - sdx) <= 1e-5 + EPS_F32 * fabs(sdx), "bn dgamma[%d]: %.9g vs %.9g", j, dg[j], sdx);
    }
    free(h), free(dy), free(y), free(dh), free(gam), free(bet), free(rm), free(rv), free(dg), free(db);
    free(rm0), free(rv0);
}

Test(ae_cuda_kernels, batchnorm_forward_backward) {
    need_gpu();
    rng_state = 11;
    batchnorm_case(2, 3);     /* the smallest batch BatchNorm accepts */
    batchnorm_case(37, 5);    /* fewer rows than threads */
    batchnorm_case(1000, 32); /* several rows per thread */
}

/* ---- argument and device errors (every machine) --------------------------------------- */

Test(ae_cuda, bad_arguments_fail_with_a_message) {
    need_gpu();
    kvc_err err = {{0}};
    ae_config c = make_config(16, 8, 4, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH);
    ae_config c2 = make_config(16, 0, 4, KVC_ACT_NONE, AE_NORM_NONE);
    ae_model *m = kvc_ae_new(&c, 1, &err), *other = kvc_ae_new(&c2, 1, &err);
    cr_assert(m && other, "%s", err.msg);
    ae_cuda *g = kvc_ae_cuda_new(m, &err);
    cr_assert_not_null(g, "%s", err.msg);
    float x[4 * 16] = {0};
    ae_loss mse = {AE_LOSS_MSE, NULL, NULL, 0, 0}, key = {AE_LOSS_KEY_ATTN, NULL, NULL, 0, 0};
    err.msg[0] = 0;
    cr_assert(isnan(kvc_ae_cuda_forward_backward(g, x, 1, &mse, &err)) && strstr(err.msg, "BatchNorm"),
              "one row with BatchNorm: '%s'", err.msg);
    err.msg[0] = 0;
    cr_assert(isnan(kvc_ae_cuda_forward_backward(g, x, 4, &key, &err)) && err.msg[0], "KEY_ATTN without W");
    err.msg[0] = 0;
    cr_assert_eq(kvc_ae_cuda_download(g, other, &err), -1);
    cr_assert(err.msg[0], "download into another architecture must say why");
    /* a valid step still works after the rejected ones */
    for (int i = 0; i < 4 * 16; i++) x[i] = (float)(i % 7) - 3;
    cr_assert(isfinite(kvc_ae_cuda_forward_backward(g, x, 4, &mse, &err)), "%s", err.msg);
    kvc_ae_cuda_free(g);
    kvc_ae_free(m);
    kvc_ae_free(other);
}

Test(ae_cuda, without_a_device_fails_cleanly) {
    char why[256] = "";
    kvc_err err = {{0}};
    int avail = kvc_ae_cuda_available(why, sizeof why);
    cr_assert(avail == 0 || avail == 1);
    cr_assert(why[0] != '\0', "kvc_ae_cuda_available must say what it found");
    cr_log_info("CUDA trainer available: %d (%s)", avail, why);
    ae_config c = make_config(64, 32, 16, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH);
    ae_model *m = kvc_ae_new(&c, 1, &err);
    cr_assert_not_null(m, "%s", err.msg);
    /* NULL handles and arguments: an error, never a crash */
    float x[2 * 64] = {0};
    ae_loss mse = {AE_LOSS_MSE, NULL, NULL, 0, 0};
    ae_adam o;
    kvc_ae_adam_defaults(&o);
    err.msg[0] = 0;
    cr_assert_null(kvc_ae_cuda_new(NULL, &err));
    cr_assert(err.msg[0]);
    err.msg[0] = 0;
    cr_assert(isnan(kvc_ae_cuda_forward_backward(NULL, x, 2, &mse, &err)) && err.msg[0]);
    err.msg[0] = 0;
    cr_assert(isnan(kvc_ae_cuda_grad_norm(NULL, &err)) && err.msg[0]);
    err.msg[0] = 0;
    cr_assert(kvc_ae_cuda_adam_step(NULL, &o, &err) == -1 && err.msg[0]);
    err.msg[0] = 0;
    cr_assert(kvc_ae_cuda_download(NULL, m, &err) == -1 && err.msg[0]);
    cr_assert_eq(kvc_ae_cuda_adam_steps(NULL), 0);
    kvc_ae_cuda_free(NULL);
    if (!avail) {
        /* no device: the trainer and the kernel entry points refuse with the reason */
        err.msg[0] = 0;
        cr_assert_null(kvc_ae_cuda_new(m, &err), "kvc_ae_cuda_new must fail without a device");
        cr_assert(strstr(err.msg, why) != NULL, "the error should carry the reason '%s', got '%s'", why, err.msg);
        float y[4], dx[4], in[4] = {-1, 0, 1, 2};
        err.msg[0] = 0;
        cr_assert_eq(kvc_ae_cuda_test_act(KVC_ACT_GELU, 0.01f, in, in, 4, y, dx, &err), -1);
        cr_assert(strstr(err.msg, "CUDA") != NULL, "kernel entry point without a device: '%s'", err.msg);
    } else {
        ae_cuda *g = kvc_ae_cuda_new(m, &err);
        cr_assert_not_null(g, "a device is present but kvc_ae_cuda_new failed: %s", err.msg);
        cr_assert_eq(kvc_ae_cuda_adam_steps(g), kvc_ae_adam_steps(m));
        kvc_ae_cuda_free(g);
    }
    kvc_ae_free(m);
}

#else
Test(ae_cuda, not_built) { cr_skip_test("CUDA parity skipped: this build has no CUDA backend (nvcc not found)"); }

Test(ae_cuda, cpu_config_still_checks) {
    /* the CPU side of the twin pair stands on its own in a CPU-only build */
    kvc_err err = {{0}};
    ae_config c = make_config(64, 32, 16, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH);
    cr_assert_eq(kvc_ae_config_check(&c, &err), 0, "%s", err.msg);
}
#endif
