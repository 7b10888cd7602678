/* test_ae.c - the autoencoder trainer (train/ae.c): gradients against central differences for
 * every layer type and loss, BatchNorm folding, AdamW, clipping and the schedule, config
 * checks, determinism, and 20-step training trajectories against PyTorch (tools/ae_reference.py). */
#include <criterion/criterion.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fixture.h"
#include "kvc/ae.h"

/* Finite-difference gradient check: steps, and per-tensor budget
 * |g - g_fd|_2 <= GRAD_RTOL |g_fd|_2 + GRAD_ATOL (g_fd from float losses differenced in double).
 * The error of g_fd is mostly the float rounding of the loss over the step, so the step is as
 * large as the curvature allows; ReLU-type kinks need a smaller one (a step must not cross one). */
#define GRAD_STEP 3e-3
#define GRAD_STEP_KINK 1e-3
#define GRAD_RTOL 1e-2
#define GRAD_ATOL 1e-4
/* Exported (BatchNorm-folded) network vs inference mode: |a - b| <= EXPORT_ATOL + EXPORT_RTOL |b|. */
#define EXPORT_RTOL 1e-5
#define EXPORT_ATOL 1e-6
/* PyTorch trajectories: per-step loss and gradient norm, final parameter norms, running stats
 * and eval error, relative (plus TRAJ_ATOL for values near 0). */
#define TRAJ_RTOL 1e-4
#define TRAJ_ATOL 1e-6
/* A step on 4 threads against 1 thread (summation order differs), relative. */
#define THREADS_RTOL 1e-5
/* AdamW against the update worked out in double. */
#define ADAM_RTOL 1e-5

/* ---- helpers -------------------------------------------------------------------------- */

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

/* A malloc'd (n) array of normals times scale plus offset. */
static float *rand_array(size_t n, float scale, float offset) {
    float *a = malloc(n * sizeof *a);
    for (size_t i = 0; i < n; i++) a[i] = scale * randn() + offset;
    return a;
}

static ae_config make_config(int d, int h, int r, kvc_act act, ae_norm norm) {
    ae_config c;
    kvc_ae_config_defaults(&c);
    c.in_dim = d, c.hidden = h, c.latent = r, c.act = act, c.norm = norm;
    return c;
}

static ae_model *make_model(const ae_config *c, uint64_t seed) {
    kvc_err err = {{0}};
    ae_model *m = kvc_ae_new(c, seed, &err);
    cr_assert(m, "kvc_ae_new: %s", err.msg);
    return m;
}

/* Index of the tensor called name, asserting that it exists. */
static int tensor_index(ae_model *m, const char *name) {
    for (int i = 0; i < kvc_ae_n_tensors(m); i++)
        if (!strcmp(kvc_ae_tensor_at(m, i).name, name)) return i;
    cr_assert_fail("no tensor %s", name);
    return -1;
}

static size_t tensor_size(ae_tensor t) { return (size_t)t.rows * (size_t)t.cols; }

/* Checks every trainable tensor's gradient against central differences of the loss. */
static void grad_check(const ae_config *c, const ae_loss *L, const float *x, int n, uint64_t seed) {
    ae_model *m = make_model(c, seed);
    /* BatchNorm gamma/beta away from (1, 0) so their gradients are generic. */
    for (int i = 0; i < kvc_ae_n_tensors(m); i++) {
        ae_tensor t = kvc_ae_tensor_at(m, i);
        if (t.trainable && t.cols == 1 && strstr(t.name, ".1.weight"))
            for (int k = 0; k < t.rows; k++) t.data[k] = 1.0f + 0.3f * randn();
        if (t.trainable && t.cols == 1 && strstr(t.name, ".1.bias") && c->norm == AE_NORM_BATCH)
            for (int k = 0; k < t.rows; k++) t.data[k] = 0.3f * randn();
    }
    float l0 = kvc_ae_forward_backward(m, x, n, L);
    cr_assert(isfinite(l0) && l0 > 0, "loss %g", l0);
    int nt = kvc_ae_n_tensors(m);
    float *grads[32];
    for (int i = 0; i < nt; i++) {
        ae_tensor g = kvc_ae_grad_at(m, i);
        grads[i] = NULL;
        if (!g.data) continue;
        grads[i] = malloc(tensor_size(g) * sizeof(float));
        memcpy(grads[i], g.data, tensor_size(g) * sizeof(float));
    }
    double worst = 0, h = c->hidden && (c->act == KVC_ACT_RELU || c->act == KVC_ACT_LEAKY_RELU) ? GRAD_STEP_KINK : GRAD_STEP;
    for (int i = 0; i < nt; i++) {
        ae_tensor t = kvc_ae_tensor_at(m, i);
        if (!t.trainable) continue;
        double e2 = 0, r2 = 0;
        for (size_t k = 0; k < tensor_size(t); k++) {
            float keep = t.data[k];
            t.data[k] = keep + (float)h;
            double lp = kvc_ae_forward_backward(m, x, n, L);
            t.data[k] = keep - (float)h;
            double lm = kvc_ae_forward_backward(m, x, n, L);
            t.data[k] = keep;
            double fd = (lp - lm) / ((double)(keep + (float)h) - (double)(keep - (float)h)), d = grads[i][k] - fd;
            e2 += d * d;
            r2 += fd * fd;
        }
        double err = sqrt(e2), ref = sqrt(r2);
        cr_expect(err <= GRAD_RTOL * ref + GRAD_ATOL, "%s: |g - fd| = %.3g, |fd| = %.3g", t.name, err, ref);
        if (err / (ref + GRAD_ATOL / GRAD_RTOL) > worst) worst = err / (ref + GRAD_ATOL / GRAD_RTOL);
        free(grads[i]);
    }
    fprintf(stderr, "grad check %s/%s hidden %d norm %d loss %d: worst |g - fd| / (|fd| + %.0e) = %.2e\n",
            kvc_ae_act_name(c->act), c->hidden ? "mlp" : "linear", c->hidden, (int)c->norm, (int)L->kind,
            GRAD_ATOL / GRAD_RTOL, worst);
    kvc_ae_free(m);
}

/* Grad check of one architecture with the MSE loss on an 8-row batch. */
static void grad_check_mse(int hidden, kvc_act act, ae_norm norm) {
    rng_state = 11 + (uint64_t)act;
    ae_config c = make_config(8, hidden, 3, act, norm);
    float *x = rand_array(8 * 8, 1.0f, 0.2f);
    ae_loss L = {.kind = AE_LOSS_MSE};
    grad_check(&c, &L, x, 8, 5);
    free(x);
}

/* ---- gradients ------------------------------------------------------------------------ */

Test(ae_grad, linear_mse) { grad_check_mse(0, KVC_ACT_NONE, AE_NORM_NONE); }
Test(ae_grad, hidden_none) { grad_check_mse(6, KVC_ACT_NONE, AE_NORM_NONE); }
Test(ae_grad, hidden_relu) { grad_check_mse(6, KVC_ACT_RELU, AE_NORM_NONE); }
Test(ae_grad, hidden_leaky_relu) { grad_check_mse(6, KVC_ACT_LEAKY_RELU, AE_NORM_NONE); }
Test(ae_grad, hidden_gelu) { grad_check_mse(6, KVC_ACT_GELU, AE_NORM_NONE); }
Test(ae_grad, hidden_silu) { grad_check_mse(6, KVC_ACT_SILU, AE_NORM_NONE); }
Test(ae_grad, batchnorm_leaky_relu) { grad_check_mse(6, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH); }
Test(ae_grad, batchnorm_gelu) { grad_check_mse(6, KVC_ACT_GELU, AE_NORM_BATCH); }

Test(ae_grad, batchnorm_cancels_linear_bias) {
    /* BatchNorm removes any per-column shift, so the bias before it and the latent bias (a
     * shift of the decoder's BatchNorm input) have zero gradient: written as exact zeros, not
     * rounding noise that Adam would amplify (the finite-difference checks see ~0 too). */
    rng_state = 3;
    ae_config c = make_config(8, 6, 3, KVC_ACT_SILU, AE_NORM_BATCH);
    ae_model *m = make_model(&c, 9);
    float *x = rand_array(16 * 8, 1.0f, 0.5f);
    ae_loss L = {.kind = AE_LOSS_MSE};
    kvc_ae_forward_backward(m, x, 16, &L);
    const char *zero[] = {"enc.0.bias", "enc.3.bias", "dec.0.bias"};
    for (int k = 0; k < 3; k++) {
        ae_tensor g = kvc_ae_grad_at(m, tensor_index(m, zero[k]));
        for (size_t i = 0; i < tensor_size(g); i++) cr_expect_eq(g.data[i], 0.0f, "%s[%zu] = %g", zero[k], i, g.data[i]);
    }
    ae_tensor g = kvc_ae_grad_at(m, tensor_index(m, "dec.3.bias"));
    double s = 0;
    for (size_t i = 0; i < tensor_size(g); i++) s += fabs(g.data[i]);
    cr_expect(s > 1e-3, "the output bias does get a gradient (%g)", s);
    free(x);
    kvc_ae_free(m);
}

Test(ae_grad, key_attn_loss) {
    rng_state = 21;
    int d = 8, n = 8, nq = 5;
    float *q = rand_array((size_t)nq * d, 1.0f, 0.0f), *x = rand_array((size_t)n * d, 1.0f, 0.0f);
    float w[64];
    for (int i = 0; i < d; i++) /* W = Q^T Q / nq: symmetric PSD, rank 5 < D */
        for (int j = 0; j < d; j++) {
            double s = 0;
            for (int k = 0; k < nq; k++) s += (double)q[k * d + i] * q[k * d + j];
            w[i * d + j] = (float)(s / nq);
        }
    ae_loss L = {.kind = AE_LOSS_KEY_ATTN, .w = w, .mse_mix = 0.1f};
    ae_config lin = make_config(d, 0, 3, KVC_ACT_NONE, AE_NORM_NONE);
    grad_check(&lin, &L, x, n, 1);
    ae_config mlp = make_config(d, 6, 3, KVC_ACT_GELU, AE_NORM_BATCH);
    grad_check(&mlp, &L, x, n, 2);
    free(q);
    free(x);
}

Test(ae_grad, value_attn_loss) {
    rng_state = 31;
    int d = 8, n = 8, mq = 3;
    float *x = rand_array((size_t)n * d, 1.0f, 0.3f), a[24];
    for (int i = 0; i < mq; i++) { /* softmax rows */
        double s = 0;
        for (int j = 0; j < n; j++) s += a[i * n + j] = expf(randn());
        for (int j = 0; j < n; j++) a[i * n + j] /= (float)s;
    }
    ae_loss L = {.kind = AE_LOSS_VALUE_ATTN, .a = a, .m = mq, .mse_mix = 0.25f};
    ae_config lin = make_config(d, 0, 3, KVC_ACT_NONE, AE_NORM_NONE);
    grad_check(&lin, &L, x, n, 3);
    ae_config mlp = make_config(d, 6, 3, KVC_ACT_SILU, AE_NORM_BATCH);
    grad_check(&mlp, &L, x, n, 4);
    L.mse_mix = 0;
    grad_check(&mlp, &L, x, n, 4);
    free(x);
}

/* Loss, gradients and running statistics of one training step on 1 and on 4 threads (the
 * multi-threaded step splits the rows and reduces BatchNorm statistics and the value loss
 * across threads). */
static void threads_check(int hidden, kvc_act act, ae_norm norm, const ae_loss *L, const float *x, int n) {
    ae_config c = make_config(16, hidden, 4, act, norm);
    ae_model *m[2];
    float loss[2];
    for (int k = 0; k < 2; k++) {
        m[k] = make_model(&c, 5);
        omp_set_num_threads(k ? 4 : 1);
        loss[k] = kvc_ae_forward_backward(m[k], x, n, L);
        loss[k] = kvc_ae_forward_backward(m[k], x, n, L); /* twice: running stats move twice */
    }
    omp_set_num_threads(omp_get_num_procs());
    cr_expect(fabsf(loss[1] - loss[0]) <= THREADS_RTOL * fabsf(loss[0]), "loss %.9g vs %.9g", loss[1], loss[0]);
    double worst = fabs(loss[1] - loss[0]) / fabs(loss[0]);
    for (int i = 0; i < kvc_ae_n_tensors(m[0]); i++) {
        ae_tensor a = kvc_ae_grad_at(m[0], i), b = kvc_ae_grad_at(m[1], i);
        if (!a.data) a = kvc_ae_tensor_at(m[0], i), b = kvc_ae_tensor_at(m[1], i);
        double e2 = 0, r2 = 0;
        for (size_t k = 0; k < tensor_size(a); k++) e2 += pow(b.data[k] - a.data[k], 2), r2 += pow(a.data[k], 2);
        cr_expect(sqrt(e2) <= THREADS_RTOL * sqrt(r2) + 1e-9, "%s: |4 threads - 1 thread| %.3g of %.3g", a.name,
                  sqrt(e2), sqrt(r2));
        if (r2 > 0) worst = fmax(worst, sqrt(e2 / r2));
    }
    fprintf(stderr, "threads %s hidden %d norm %d loss %d: worst rel diff 4 vs 1 threads %.2e\n", kvc_ae_act_name(act),
            hidden, (int)norm, (int)L->kind, worst);
    kvc_ae_free(m[0]), kvc_ae_free(m[1]);
}

Test(ae, threads_agree) {
    rng_state = 81;
    int n = 1000, mq = 7; /* rows not a multiple of the thread count */
    float *x = rand_array((size_t)n * 16, 1.0f, 0.5f), *a = rand_array((size_t)mq * n, 0.1f, 0.2f);
    float *q = rand_array(16 * 16, 0.3f, 0.0f), w[256];
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) w[i * 16 + j] = q[i * 16 + j] + q[j * 16 + i];
    ae_loss mse = {.kind = AE_LOSS_MSE}, key = {.kind = AE_LOSS_KEY_ATTN, .w = w, .mse_mix = 0.1f},
            val = {.kind = AE_LOSS_VALUE_ATTN, .a = a, .m = mq, .mse_mix = 0.1f};
    threads_check(12, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH, &mse, x, n);
    threads_check(12, KVC_ACT_GELU, AE_NORM_BATCH, &val, x, n);
    threads_check(0, KVC_ACT_NONE, AE_NORM_NONE, &key, x, n);
    threads_check(12, KVC_ACT_SILU, AE_NORM_NONE, &val, x, n);
    free(x), free(a), free(q);
}

/* ---- inference and export ------------------------------------------------------------- */

/* Trains a model a few steps (so running statistics move), exports it and checks that the
 * folded network reproduces kvc_ae_encode/kvc_ae_decode. */
static void export_check(int hidden, kvc_act act, ae_norm norm) {
    rng_state = 41;
    int d = 16, r = 4, n = 300; /* more rows than one inference block */
    ae_config c = make_config(d, hidden, r, act, norm);
    c.bn_eps = 1e-2f; /* large enough that a fold forgetting eps shows */
    c.bn_momentum = 0.3f;
    ae_model *m = make_model(&c, 7);
    float *x = rand_array((size_t)n * d, 1.5f, 0.7f);
    ae_loss L = {.kind = AE_LOSS_MSE};
    ae_adam o;
    kvc_ae_adam_defaults(&o);
    o.lr = 1e-2f;
    for (int s = 0; s < 5; s++) {
        kvc_ae_forward_backward(m, x, 64, &L);
        kvc_ae_adam_step(m, &o);
    }
    ae_export e;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_ae_export_folded(m, &e, &err), 0, "%s", err.msg);
    cr_assert_eq(e.n_enc, hidden ? 2 : 1);
    cr_assert_eq(e.n_dec, hidden ? 2 : 1);
    cr_expect_eq(e.enc[0].in, d);
    cr_expect_eq(e.enc[e.n_enc - 1].out, r);
    cr_expect_eq(e.dec[e.n_dec - 1].out, d);
    float *z = malloc((size_t)n * r * sizeof(float)), *z2 = malloc((size_t)n * r * sizeof(float));
    float *y = malloc((size_t)n * d * sizeof(float)), *y2 = malloc((size_t)n * d * sizeof(float));
    kvc_ae_encode(m, x, n, z);
    kvc_ae_decode(m, z, n, y);
    kvc_ae_export_run(e.enc, e.n_enc, e.leaky_slope, x, n, z2);
    kvc_ae_export_run(e.dec, e.n_dec, e.leaky_slope, z, n, y2);
    double worst = 0;
    for (size_t k = 0; k < (size_t)n * r; k++) {
        cr_assert(fabsf(z2[k] - z[k]) <= EXPORT_ATOL + EXPORT_RTOL * fabsf(z[k]), "z[%zu] %g vs %g", k, z2[k], z[k]);
        worst = fmax(worst, fabsf(z2[k] - z[k]) / (fabsf(z[k]) + EXPORT_ATOL / EXPORT_RTOL));
    }
    for (size_t k = 0; k < (size_t)n * d; k++) {
        cr_assert(fabsf(y2[k] - y[k]) <= EXPORT_ATOL + EXPORT_RTOL * fabsf(y[k]), "y[%zu] %g vs %g", k, y2[k], y[k]);
        worst = fmax(worst, fabsf(y2[k] - y[k]) / (fabsf(y[k]) + EXPORT_ATOL / EXPORT_RTOL));
    }
    fprintf(stderr, "export %s hidden %d norm %d: worst rel diff %.2e\n", kvc_ae_act_name(act), hidden, (int)norm, worst);
    /* kvc_ae_rel_error is the relative error of encode+decode. */
    double num = 0, den = 0;
    for (size_t k = 0; k < (size_t)n * d; k++) num += (double)(y[k] - x[k]) * (y[k] - x[k]), den += (double)x[k] * x[k];
    cr_expect(fabs(kvc_ae_rel_error(m, x, n) - sqrt(num / den)) < 1e-6, "rel error %g vs %g", kvc_ae_rel_error(m, x, n),
              sqrt(num / den));
    kvc_ae_export_free(&e);
    free(z), free(z2), free(y), free(y2), free(x);
    kvc_ae_free(m);
}

Test(ae_export, batchnorm_folded_equals_inference) { export_check(12, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH); }
Test(ae_export, mlp_gelu_equals_inference) { export_check(12, KVC_ACT_GELU, AE_NORM_NONE); }
Test(ae_export, linear_equals_inference) { export_check(0, KVC_ACT_NONE, AE_NORM_NONE); }

Test(ae_export, inference_uses_running_stats) {
    /* Before any training step the running stats are (0, 1): inference is then
     * gamma * h / sqrt(1 + eps) + beta, not the batch-normalised value. */
    rng_state = 43;
    ae_config c = make_config(6, 4, 2, KVC_ACT_NONE, AE_NORM_BATCH);
    ae_model *m = make_model(&c, 1);
    float *x = rand_array(5 * 6, 1.0f, 3.0f), z[10], ref[10];
    ae_tensor w0 = kvc_ae_tensor_at(m, 0), b0 = kvc_ae_tensor_at(m, 1), w3 = kvc_ae_tensor_at(m, 4), b3 = kvc_ae_tensor_at(m, 5);
    cr_assert_str_eq(w3.name, "enc.3.weight");
    for (int i = 0; i < 5; i++)
        for (int o = 0; o < 2; o++) {
            double s = b3.data[o];
            for (int j = 0; j < 4; j++) {
                double h = b0.data[j];
                for (int k = 0; k < 6; k++) h += (double)w0.data[j * 6 + k] * x[i * 6 + k];
                s += w3.data[o * 4 + j] * h / sqrt(1.0 + 1e-5);
            }
            ref[i * 2 + o] = (float)s;
        }
    kvc_ae_encode(m, x, 5, z);
    for (int k = 0; k < 10; k++) cr_expect_float_eq(z[k], ref[k], 1e-4, "z[%d] %g vs %g", k, z[k], ref[k]);
    free(x);
    kvc_ae_free(m);
}

/* ---- optimiser and schedule ----------------------------------------------------------- */

Test(ae_adam, matches_hand_computed_update) {
    rng_state = 51;
    ae_config c = make_config(3, 0, 1, KVC_ACT_NONE, AE_NORM_NONE);
    ae_model *m = make_model(&c, 2);
    float *x = rand_array(4 * 3, 1.0f, 0.0f);
    ae_loss L = {.kind = AE_LOSS_MSE};
    ae_adam o = {.lr = 0.05f, .beta1 = 0.8f, .beta2 = 0.9f, .eps = 1e-3f, .weight_decay = 0.5f, .clip = 0};
    int nt = kvc_ae_n_tensors(m);
    cr_assert_eq(nt, 4);
    double p[4][3], mm[4][3] = {{0}}, vv[4][3] = {{0}};
    for (int i = 0; i < nt; i++)
        for (size_t k = 0; k < tensor_size(kvc_ae_tensor_at(m, i)); k++) p[i][k] = kvc_ae_tensor_at(m, i).data[k];
    for (int t = 1; t <= 2; t++) {
        kvc_ae_forward_backward(m, x, 4, &L);
        for (int i = 0; i < nt; i++) {
            ae_tensor g = kvc_ae_grad_at(m, i);
            int decay = strstr(g.name, "weight") != NULL;
            for (size_t k = 0; k < tensor_size(g); k++) {
                mm[i][k] = 0.8 * mm[i][k] + 0.2 * g.data[k];
                vv[i][k] = 0.9 * vv[i][k] + 0.1 * (double)g.data[k] * g.data[k];
                double mh = mm[i][k] / (1 - pow(0.8, t)), vh = vv[i][k] / (1 - pow(0.9, t));
                if (decay) p[i][k] *= 1 - 0.05 * 0.5;
                p[i][k] -= 0.05 * mh / (sqrt(vh) + 1e-3);
            }
        }
        kvc_ae_adam_step(m, &o);
        cr_expect_eq(kvc_ae_adam_steps(m), t);
    }
    for (int i = 0; i < nt; i++) {
        ae_tensor t = kvc_ae_tensor_at(m, i), am = kvc_ae_adam_m_at(m, i), av = kvc_ae_adam_v_at(m, i);
        for (size_t k = 0; k < tensor_size(t); k++) {
            cr_expect(fabs(t.data[k] - p[i][k]) <= ADAM_RTOL * (fabs(p[i][k]) + 1e-3), "%s[%zu] %g vs %g", t.name, k,
                      t.data[k], p[i][k]);
            cr_expect(fabs(am.data[k] - mm[i][k]) <= ADAM_RTOL * fabs(mm[i][k]) + 1e-9, "m %s[%zu]", t.name, k);
            cr_expect(fabs(av.data[k] - vv[i][k]) <= ADAM_RTOL * fabs(vv[i][k]) + 1e-12, "v %s[%zu]", t.name, k);
        }
    }
    free(x);
    kvc_ae_free(m);
}

/* L2 norm of all first Adam moments. */
static double adam_m_norm(ae_model *m) {
    double s = 0;
    for (int i = 0; i < kvc_ae_n_tensors(m); i++) {
        ae_tensor t = kvc_ae_adam_m_at(m, i);
        for (size_t k = 0; t.data && k < tensor_size(t); k++) s += (double)t.data[k] * t.data[k];
    }
    return sqrt(s);
}

Test(ae_adam, clipping_caps_global_norm) {
    rng_state = 61;
    ae_config c = make_config(16, 8, 4, KVC_ACT_RELU, AE_NORM_BATCH);
    float *x = rand_array(32 * 16, 2.0f, 1.0f);
    ae_loss L = {.kind = AE_LOSS_MSE};
    ae_adam o;
    kvc_ae_adam_defaults(&o);
    for (int pass = 0; pass < 2; pass++) {
        ae_model *m = make_model(&c, 3);
        kvc_ae_forward_backward(m, x, 32, &L);
        double g = kvc_ae_grad_norm(m), s = 0;
        for (int i = 0; i < kvc_ae_n_tensors(m); i++) {
            ae_tensor t = kvc_ae_grad_at(m, i);
            for (size_t k = 0; t.data && k < tensor_size(t); k++) s += (double)t.data[k] * t.data[k];
        }
        cr_expect(fabs(g - sqrt(s)) < 1e-5 * g, "grad norm %g vs %g", g, sqrt(s));
        o.clip = pass == 0 ? (float)(g / 4) : (float)(g * 4);
        kvc_ae_adam_step(m, &o);
        /* after one step m = (1 - beta1) * clipped g */
        double expect = pass == 0 ? o.clip * g / (g + 1e-6) : g;
        cr_expect(fabs(adam_m_norm(m) / (1 - o.beta1) - expect) < 1e-5 * expect, "pass %d: |g_clipped| %g, want %g",
                  pass, adam_m_norm(m) / (1 - o.beta1), expect);
        kvc_ae_free(m);
    }
    free(x);
}

Test(ae_adam, lr_schedule_values) {
    cr_expect_float_eq(kvc_ae_lr_schedule(0, 100, 10, 1e-3f, 1e-5f), 0.0f, 1e-12);
    cr_expect_float_eq(kvc_ae_lr_schedule(5, 100, 10, 1e-3f, 1e-5f), 5e-4f, 1e-9);
    cr_expect_float_eq(kvc_ae_lr_schedule(10, 100, 10, 1e-3f, 1e-5f), 1e-3f, 1e-9);
    cr_expect_float_eq(kvc_ae_lr_schedule(55, 100, 10, 1e-3f, 1e-5f), 0.5f * (1e-3f + 1e-5f), 1e-9);
    cr_expect_float_eq(kvc_ae_lr_schedule(25, 100, 10, 1e-3f, 0.0f), 1e-3f * 0.5f * (1 + cosf(3.14159265f / 6)), 1e-9);
    cr_expect_float_eq(kvc_ae_lr_schedule(100, 100, 10, 1e-3f, 1e-5f), 1e-5f, 1e-12);
    cr_expect_float_eq(kvc_ae_lr_schedule(500, 100, 10, 1e-3f, 1e-5f), 1e-5f, 1e-12);
    cr_expect_float_eq(kvc_ae_lr_schedule(0, 100, 0, 1e-3f, 1e-5f), 1e-3f, 1e-9);
}

/* ---- config, determinism, errors ------------------------------------------------------ */

/* Expects kvc_ae_config_check (and kvc_ae_new) to reject c with a message containing word. */
static void expect_rejected(ae_config c, const char *word) {
    kvc_err err = {{0}};
    cr_expect_eq(kvc_ae_config_check(&c, &err), -1, "config accepted (want '%s' error)", word);
    cr_expect(strstr(err.msg, word) != NULL, "message '%s' lacks '%s'", err.msg, word);
    memset(&err, 0, sizeof err);
    cr_expect_null(kvc_ae_new(&c, 1, &err));
    cr_expect(strstr(err.msg, word) != NULL, "kvc_ae_new message '%s'", err.msg);
}

Test(ae_config, rejects_bad_configs) {
    ae_config ok = make_config(64, 32, 16, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH), c;
    kvc_err err = {{0}};
    cr_expect_eq(kvc_ae_config_check(&ok, &err), 0, "%s", err.msg);
    c = ok, c.latent = 64;
    expect_rejected(c, "latent");
    c = ok, c.latent = 65;
    expect_rejected(c, "latent");
    c = ok, c.latent = 0;
    expect_rejected(c, "latent");
    c = ok, c.hidden = -1;
    expect_rejected(c, "hidden");
    c = ok, c.in_dim = 1, c.latent = 1;
    expect_rejected(c, "in_dim");
    c = ok, c.act = KVC_ACT_COUNT;
    expect_rejected(c, "activation");
    c = ok, c.norm = (ae_norm)7;
    expect_rejected(c, "norm");
    c = ok, c.bn_eps = 0;
    expect_rejected(c, "bn_eps");
    c = ok, c.bn_momentum = 1.5f;
    expect_rejected(c, "bn_momentum");
    c = ok, c.leaky_slope = NAN;
    expect_rejected(c, "leaky_slope");
}

Test(ae_config, defaults_and_activation_names) {
    ae_config c;
    kvc_ae_config_defaults(&c);
    cr_expect_float_eq(c.leaky_slope, 0.01f, 1e-9);
    cr_expect_float_eq(c.bn_eps, 1e-5f, 1e-12);
    cr_expect_float_eq(c.bn_momentum, 0.1f, 1e-9);
    const char *names[] = {"none", "relu", "leaky_relu", "gelu", "silu"};
    for (int i = 0; i < KVC_ACT_COUNT; i++) {
        kvc_act a;
        cr_expect_eq(kvc_ae_act_parse(names[i], &a), 0);
        cr_expect_eq((int)a, i);
        cr_expect_str_eq(kvc_ae_act_name(a), names[i]);
    }
    kvc_act a;
    cr_expect_eq(kvc_ae_act_parse("tanh", &a), -1);
}

Test(ae, tensor_table_names_and_shapes) {
    ae_config c = make_config(64, 32, 16, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH);
    ae_model *m = make_model(&c, 1);
    const struct { const char *name; int rows, cols, trainable; } want[] = {
        {"enc.0.weight", 32, 64, 1}, {"enc.0.bias", 32, 1, 1}, {"enc.1.weight", 32, 1, 1}, {"enc.1.bias", 32, 1, 1},
        {"enc.3.weight", 16, 32, 1}, {"enc.3.bias", 16, 1, 1}, {"dec.0.weight", 32, 16, 1}, {"dec.0.bias", 32, 1, 1},
        {"dec.1.weight", 32, 1, 1}, {"dec.1.bias", 32, 1, 1}, {"dec.3.weight", 64, 32, 1}, {"dec.3.bias", 64, 1, 1},
        {"enc.1.running_mean", 32, 1, 0}, {"enc.1.running_var", 32, 1, 0}, {"dec.1.running_mean", 32, 1, 0},
        {"dec.1.running_var", 32, 1, 0}};
    cr_assert_eq(kvc_ae_n_tensors(m), 16);
    for (int i = 0; i < 16; i++) {
        ae_tensor t = kvc_ae_tensor_at(m, i);
        cr_expect_str_eq(t.name, want[i].name);
        cr_expect(t.rows == want[i].rows && t.cols == want[i].cols && t.trainable == want[i].trainable, "%s", t.name);
        cr_expect_eq(kvc_ae_grad_at(m, i).data == NULL, !want[i].trainable, "%s grad", t.name);
    }
    cr_expect_null(kvc_ae_tensor_at(m, 16).data);
    kvc_ae_free(m);
}

Test(ae, same_seed_same_weights) {
    ae_config c = make_config(64, 32, 16, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH);
    ae_model *a = make_model(&c, 42), *b = make_model(&c, 42), *o = make_model(&c, 43);
    int differ = 0;
    for (int i = 0; i < kvc_ae_n_tensors(a); i++) {
        ae_tensor ta = kvc_ae_tensor_at(a, i), tb = kvc_ae_tensor_at(b, i), to = kvc_ae_tensor_at(o, i);
        cr_expect(!memcmp(ta.data, tb.data, tensor_size(ta) * sizeof(float)), "%s differs", ta.name);
        differ |= memcmp(ta.data, to.data, tensor_size(ta) * sizeof(float)) != 0;
        int fan_in = strstr(ta.name, "enc.0") ? 64 : strstr(ta.name, "enc.3") ? 32 : strstr(ta.name, "dec.0") ? 16 : 32;
        float bound = 1.0f / sqrtf((float)fan_in), lo = 0, hi = 0;
        for (size_t k = 0; k < tensor_size(ta); k++) lo = fminf(lo, ta.data[k]), hi = fmaxf(hi, ta.data[k]);
        if (strstr(ta.name, ".1.weight") || strstr(ta.name, "running_var")) cr_expect(lo == 0 && hi == 1, "%s", ta.name);
        else if (strstr(ta.name, ".1.")) cr_expect(lo == 0 && hi == 0, "%s", ta.name);
        else cr_expect(lo >= -bound && hi <= bound && hi - lo > bound, "%s in [%g, %g]", ta.name, lo, hi);
    }
    cr_expect(differ, "another seed gives other weights");
    kvc_ae_free(a), kvc_ae_free(b), kvc_ae_free(o);
}

Test(ae, nan_input_gives_nan_loss) {
    rng_state = 71;
    float *x = rand_array(16 * 8, 1.0f, 0.0f), a[2 * 16] = {0};
    x[5 * 8 + 3] = NAN;
    for (int j = 0; j < 16; j++) a[j] = a[16 + j] = j == 5 ? 0.0f : 1.0f / 15; /* no weight on the NaN row */
    ae_loss mse = {.kind = AE_LOSS_MSE}, val = {.kind = AE_LOSS_VALUE_ATTN, .a = a, .m = 2};
    ae_config cs[] = {make_config(8, 0, 3, KVC_ACT_NONE, AE_NORM_NONE), make_config(8, 6, 3, KVC_ACT_RELU, AE_NORM_NONE),
                      make_config(8, 6, 3, KVC_ACT_LEAKY_RELU, AE_NORM_BATCH)};
    for (int i = 0; i < 3; i++) {
        ae_model *m = make_model(&cs[i], 1);
        cr_expect(isnan(kvc_ae_forward_backward(m, x, 16, &mse)), "config %d, mse", i);
        cr_expect(isnan(kvc_ae_forward_backward(m, x, 16, &val)), "config %d, value_attn", i);
        kvc_ae_free(m);
    }
    ae_model *m = make_model(&cs[2], 1);
    cr_expect(isnan(kvc_ae_forward_backward(m, x, 1, &mse)), "BatchNorm needs 2 rows");
    kvc_ae_free(m);
    free(x);
}

/* ---- PyTorch trajectories ------------------------------------------------------------- */

/* The line "<cs>.<key>" (key may hold a tensor name) after which the values start. */
static const char *fx_line(const char *fx, const char *cs, const char *key) {
    char k[160];
    snprintf(k, sizeof k, "\n%s.%s ", cs, key);
    const char *p = strstr(fx, k);
    cr_assert(p, "fixture lacks '%s.%s'", cs, key);
    return p + strlen(k);
}

/* Parses "<cs>.<key> rows cols v..." into a malloc'd array. */
static float *fx_array(const char *fx, const char *cs, const char *key, int *rows, int *cols) {
    char *end;
    const char *p = fx_line(fx, cs, key);
    *rows = (int)strtol(p, &end, 10);
    *cols = (int)strtol(end, &end, 10);
    size_t n = (size_t)*rows * (size_t)*cols;
    float *a = malloc((n ? n : 1) * sizeof *a);
    for (size_t i = 0; i < n; i++) {
        const char *s = end;
        a[i] = strtof(s, &end);
        cr_assert(end != s, "%s.%s: short at %zu", cs, key, i);
    }
    return a;
}

/* |got - want| <= TRAJ_ATOL + TRAJ_RTOL |want|; tracks the worst relative error. */
static void traj_expect(double got, double want, double *worst, const char *what, int step) {
    double rel = fabs(got - want) / (fabs(want) + TRAJ_ATOL / TRAJ_RTOL);
    if (rel > *worst) *worst = rel;
    cr_expect(rel <= TRAJ_RTOL, "%s (step %d): %.9g vs torch %.9g", what, step, got, want);
}

/* Replays one case of ae_trajectory.txt and compares every step with PyTorch. */
static void trajectory(const char *cs) {
    char *fx = fixture_read("ae_trajectory.txt");
    ae_config c;
    kvc_ae_config_defaults(&c);
    char act[32], norm[32], kind[32];
    cr_assert_eq(sscanf(fx_line(fx, cs, "config"), "%d %d %d %31s %31s %f %f %f", &c.in_dim, &c.hidden, &c.latent,
                        act, norm, &c.leaky_slope, &c.bn_eps, &c.bn_momentum), 8);
    cr_assert_eq(kvc_ae_act_parse(act, &c.act), 0, "activation %s", act);
    c.norm = !strcmp(norm, "batch") ? AE_NORM_BATCH : AE_NORM_NONE;
    ae_loss L = {0};
    cr_assert_eq(sscanf(fx_line(fx, cs, "loss"), "%31s %f", kind, &L.mse_mix), 2);
    L.kind = !strcmp(kind, "mse") ? AE_LOSS_MSE : !strcmp(kind, "key_attn") ? AE_LOSS_KEY_ATTN : AE_LOSS_VALUE_ATTN;
    ae_adam o;
    float min_lr;
    long long warmup;
    int steps, rows, cols, n;
    cr_assert_eq(sscanf(fx_line(fx, cs, "adam"), "%f %f %lld %d %f %f %f %f %f", &o.lr, &min_lr, &warmup, &steps,
                        &o.beta1, &o.beta2, &o.eps, &o.weight_decay, &o.clip), 9);
    float base_lr = o.lr, *x = fx_array(fx, cs, "x", &n, &cols), *w = NULL, *a = NULL;
    cr_assert_eq(cols, c.in_dim);
    if (L.kind == AE_LOSS_KEY_ATTN) L.w = w = fx_array(fx, cs, "w", &rows, &cols);
    if (L.kind == AE_LOSS_VALUE_ATTN) L.a = a = fx_array(fx, cs, "a", &L.m, &cols);

    ae_model *m = make_model(&c, 0);
    for (int i = 0; i < kvc_ae_n_tensors(m); i++) {
        ae_tensor t = kvc_ae_tensor_at(m, i);
        char key[96];
        snprintf(key, sizeof key, "init %s", t.name);
        float *v = fx_array(fx, cs, key, &rows, &cols);
        cr_assert(rows == t.rows && cols == t.cols, "%s: torch (%d, %d), ours (%d, %d)", t.name, rows, cols, t.rows, t.cols);
        memcpy(t.data, v, tensor_size(t) * sizeof(float));
        free(v);
    }
    float *lrs = fx_array(fx, cs, "lr", &rows, &cols), *losses = fx_array(fx, cs, "losses", &rows, &cols);
    float *norms = fx_array(fx, cs, "grad_norms", &rows, &cols);
    cr_assert_eq(rows, steps);
    double worst_loss = 0, worst_norm = 0, worst_final = 0, worst_lr = 0;
    for (int t = 0; t < steps; t++) {
        o.lr = kvc_ae_lr_schedule(t, steps, warmup, base_lr, min_lr);
        traj_expect(o.lr, lrs[t], &worst_lr, "lr", t);
        float loss = kvc_ae_forward_backward(m, x, n, &L);
        traj_expect(loss, losses[t], &worst_loss, "loss", t);
        traj_expect(kvc_ae_grad_norm(m), norms[t], &worst_norm, "grad norm", t);
        kvc_ae_adam_step(m, &o);
    }
    for (int i = 0; i < kvc_ae_n_tensors(m); i++) {
        ae_tensor t = kvc_ae_tensor_at(m, i);
        char key[96];
        if (t.trainable) {
            snprintf(key, sizeof key, "final_norm %s", t.name);
            double s = 0, want = strtod(fx_line(fx, cs, key), NULL);
            for (size_t k = 0; k < tensor_size(t); k++) s += (double)t.data[k] * t.data[k];
            traj_expect(sqrt(s), want, &worst_final, t.name, steps);
        } else {
            snprintf(key, sizeof key, "final %s", t.name);
            float *v = fx_array(fx, cs, key, &rows, &cols);
            for (size_t k = 0; k < tensor_size(t); k++) traj_expect(t.data[k], v[k], &worst_final, t.name, steps);
            free(v);
        }
    }
    traj_expect(kvc_ae_rel_error(m, x, n), strtod(fx_line(fx, cs, "rel_error"), NULL), &worst_final, "eval rel error", steps);
    fprintf(stderr, "trajectory %s (%d steps): worst rel err vs torch: loss %.2e, grad norm %.2e, final %.2e, lr %.2e\n",
            cs, steps, worst_loss, worst_norm, worst_final, worst_lr);
    free(lrs), free(losses), free(norms), free(x), free(w), free(a), free(fx);
    kvc_ae_free(m);
}

Test(ae_torch, trajectory_kvcar_batchnorm_mse) { trajectory("kvcar"); }
Test(ae_torch, trajectory_linear_key_attn) { trajectory("linear_key"); }
Test(ae_torch, trajectory_gelu_value_attn) { trajectory("gelu_value"); }
