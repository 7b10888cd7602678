/* ae.c - CPU reference of the head_dim autoencoders (include/kvc/ae.h): PyTorch-equivalent
 * training forward/backward (Linear, BatchNorm1d, activations), the MSE and attention-aware
 * losses, AdamW with clipping, the LR schedule, inference and BatchNorm-folded export.
 * Letters: N batch rows, D input, H hidden, R latent, M queries; P all trainable floats. */
#include "kvc/ae.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AE_MAX_DIM 65536  /* largest D, H or R a config may ask for */
#define AE_MAX_TENSORS 16
#define AE_CHUNK 256      /* rows per block in inference */

/* One entry of the tensor table: where a named tensor lives in the flat buffers. */
typedef struct {
    char name[32];
    size_t off;    /* into par/grad/am/av (trainable) or state (not) */
    int rows, cols;
    int trainable;
    int decay;     /* AdamW weight decay applies (Linear weights) */
} tensor_info;

/* One half (encoder or decoder): Linear(in, hid) -> [BN] -> act -> Linear(hid, out), or a
 * single Linear(in, out) when hid == 0. Offsets index the flat parameter/state buffers. */
typedef struct {
    int in, hid, out;
    size_t w0, b0;     /* w0 (hid, in), b0 (hid); or (out, in), (out) when hid == 0 */
    size_t w1, b1;     /* w1 (out, hid), b1 (out) */
    size_t g, be;      /* BatchNorm gamma, beta (hid) */
    size_t rm, rv;     /* running mean, var (hid), offsets into state */
    float *mean, *rstd; /* (hid) batch mean (without bias) and 1/sqrt(var+eps) of the last forward */
    float *pre;        /* (cap, hid): BN ? xhat : pre-activation, kept for backward */
    float *u;          /* (cap, hid): activation output */
} half_t;

struct ae_model {
    ae_config cfg;
    int n_tensors;
    tensor_info ti[AE_MAX_TENSORS];
    size_t n_par, n_state;
    float *par, *grad, *am, *av; /* (P) parameters, gradients, Adam first/second moments */
    float *state;                /* running statistics */
    int64_t t;                   /* Adam steps taken */
    float gnorm;                 /* global gradient norm of the last backward */
    half_t enc, dec;
    int cap;                     /* rows the workspace holds */
    size_t cap_tmp;              /* floats in tmp */
    float *ws;                   /* workspace block owning the buffers below */
    float *z, *dz;               /* (cap, R) latent and its gradient */
    float *y;                    /* (cap, D) reconstruction, then dL/dy */
    float *dhid;                 /* (cap, H) gradient through a hidden layer */
    float *tmp;                  /* (max(cap, M), D) loss scratch */
};

/* ---- config --------------------------------------------------------------------------- */

static const char *const ACT_NAMES[AE_ACT_COUNT] = {"none", "relu", "leaky_relu", "gelu", "silu"};

void ae_config_defaults(ae_config *c) {
    memset(c, 0, sizeof *c);
    c->leaky_slope = 0.01f;
    c->bn_eps = 1e-5f;
    c->bn_momentum = 0.1f;
}

int ae_config_check(const ae_config *c, kvc_err *err) {
    if (!c) return kvc_fail(err, "autoencoder config is missing");
    if (c->in_dim < 2 || c->in_dim > AE_MAX_DIM)
        return kvc_fail(err, "autoencoder in_dim %d out of range [2, %d]", c->in_dim, AE_MAX_DIM);
    if (c->latent < 1 || c->latent >= c->in_dim)
        return kvc_fail(err, "autoencoder latent %d must be in [1, in_dim) = [1, %d)", c->latent, c->in_dim);
    if (c->hidden < 0 || c->hidden > AE_MAX_DIM)
        return kvc_fail(err, "autoencoder hidden %d out of range [0, %d] (0: linear)", c->hidden, AE_MAX_DIM);
    if ((int)c->act < 0 || c->act >= AE_ACT_COUNT) return kvc_fail(err, "unknown activation %d", (int)c->act);
    if (c->norm != AE_NORM_NONE && c->norm != AE_NORM_BATCH) return kvc_fail(err, "unknown norm %d", (int)c->norm);
    if (!isfinite(c->leaky_slope)) return kvc_fail(err, "leaky_slope must be finite");
    if (!(c->bn_eps > 0) || !isfinite(c->bn_eps)) return kvc_fail(err, "bn_eps %g must be > 0", (double)c->bn_eps);
    if (!(c->bn_momentum >= 0 && c->bn_momentum <= 1))
        return kvc_fail(err, "bn_momentum %g must be in [0, 1]", (double)c->bn_momentum);
    return 0;
}

const char *ae_act_name(ae_act a) { return (int)a >= 0 && a < AE_ACT_COUNT ? ACT_NAMES[a] : "?"; }

int ae_act_parse(const char *s, ae_act *out) {
    for (int i = 0; s && i < AE_ACT_COUNT; i++)
        if (!strcmp(s, ACT_NAMES[i])) { *out = (ae_act)i; return 0; }
    return -1;
}

/* ---- activations ---------------------------------------------------------------------- */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_C 0.044715f
#define CB 16          /* columns per block of the elementwise passes (one cache line) */
#define PAR_MIN 8192   /* elements below which a pass runs on one thread */

/* GELU (tanh form, as nn.GELU(approximate='tanh')) and its derivative. */
static inline float gelu_f(float a) { return 0.5f * a * (1.0f + tanhf(GELU_K * (a + GELU_C * a * a * a))); }
static inline float gelu_df(float a) {
    float t = tanhf(GELU_K * (a + GELU_C * a * a * a));
    return 0.5f * (1.0f + t) + 0.5f * a * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * a * a);
}
/* SiLU a sigmoid(a) and its derivative. */
static inline float silu_f(float a) { return a / (1.0f + expf(-a)); }
static inline float silu_df(float a) {
    float s = 1.0f / (1.0f + expf(-a));
    return s * (1.0f + a * (1.0f - s));
}
/* ReLU-type activations propagate NaN; their derivatives at 0 follow PyTorch (0 for relu,
 * slope for leaky_relu). LEAKY_* read `slope` from the enclosing scope. */
#define RELU_F(a) ((a) > 0 ? (a) : 0.0f * (a))
#define RELU_DF(a) ((a) > 0 ? 1.0f : 0.0f)
#define LEAKY_F(a) ((a) > 0 ? (a) : slope * (a))
#define LEAKY_DF(a) ((a) > 0 ? 1.0f : slope)
#define NONE_F(a) (a)
#define NONE_DF(a) ((void)(a), 1.0f)
/* Expands LOOP(F) with F the activation (or, for ACT_DISPATCH_DF, its derivative) so that
 * each loop is compiled for one activation and the switch stays outside it. */
#define ACT_DISPATCH(act, LOOP)                                                                    \
    switch (act) {                                                                                 \
    case AE_ACT_RELU: LOOP(RELU_F); break;                                                         \
    case AE_ACT_LEAKY_RELU: LOOP(LEAKY_F); break;                                                  \
    case AE_ACT_GELU: LOOP(gelu_f); break;                                                         \
    case AE_ACT_SILU: LOOP(silu_f); break;                                                         \
    default: LOOP(NONE_F); break;                                                                  \
    }
#define ACT_DISPATCH_DF(act, LOOP)                                                                 \
    switch (act) {                                                                                 \
    case AE_ACT_RELU: LOOP(RELU_DF); break;                                                        \
    case AE_ACT_LEAKY_RELU: LOOP(LEAKY_DF); break;                                                 \
    case AE_ACT_GELU: LOOP(gelu_df); break;                                                        \
    case AE_ACT_SILU: LOOP(silu_df); break;                                                        \
    default: LOOP(NONE_DF); break;                                                                 \
    }

/* Elementwise forward on a block of w <= CB columns of `rows` rows (row stride ld): the
 * normalised value xh = (h - s) k is stored back into h and u = act(g xh + b). A plain bias
 * is s = -bias, k = g = 1, b = 0 (exact). u may equal h. */
static void act_fwd_block(float *h, float *u, size_t ld, int rows, int w, const float *s, const float *k,
                          const float *g, const float *b, ae_act act, float slope) {
#define FWD(F)                                                                                     \
    for (int i = 0; i < rows; i++) {                                                               \
        float *hi = h + (size_t)i * ld, *ui = u + (size_t)i * ld;                                  \
        for (int j = 0; j < w; j++) {                                                              \
            float xh = (hi[j] - s[j]) * k[j], a = g[j] * xh + b[j];                                \
            hi[j] = xh;                                                                            \
            ui[j] = F(a);                                                                          \
        }                                                                                          \
    }
    ACT_DISPATCH(act, FWD)
#undef FWD
}

/* Elementwise backward on a block of w <= CB columns: d *= act'(g xh + b), and adds the
 * column sums of the new d and of d xh to s1 and s2. */
static void act_bwd_block(float *d, const float *xh, size_t ld, int rows, int w, const float *g, const float *b,
                          double *s1, double *s2, ae_act act, float slope) {
#define BWD(DF)                                                                                    \
    for (int i = 0; i < rows; i++) {                                                               \
        float *di = d + (size_t)i * ld;                                                            \
        const float *xi = xh + (size_t)i * ld;                                                     \
        for (int j = 0; j < w; j++) {                                                              \
            float a = g[j] * xi[j] + b[j], dj = di[j] * DF(a);                                     \
            di[j] = dj;                                                                            \
            s1[j] += dj;                                                                           \
            s2[j] += (double)dj * xi[j];                                                           \
        }                                                                                          \
    }
    ACT_DISPATCH_DF(act, BWD)
#undef BWD
}

/* y (rows, cols) = act(y + bias) in place, column block by column block. */
static void bias_act(float *y, int rows, int cols, const float *bias, ae_act act, float slope) {
#pragma omp parallel for schedule(static) if ((size_t)rows * cols >= PAR_MIN)
    for (int j0 = 0; j0 < cols; j0 += CB) {
        int w = cols - j0 < CB ? cols - j0 : CB;
        float s[CB], one[CB], zero[CB];
        for (int j = 0; j < w; j++) s[j] = -bias[j0 + j], one[j] = 1.0f, zero[j] = 0.0f;
        act_fwd_block(y + j0, y + j0, (size_t)cols, rows, w, s, one, one, zero, act, slope);
    }
}

/* out[j] = sum over rows of d (rows, cols) column j, accumulated in double. */
static void col_sums(const float *d, int rows, int cols, float *out) {
#pragma omp parallel for schedule(static) if ((size_t)rows * cols >= PAR_MIN)
    for (int j0 = 0; j0 < cols; j0 += CB) {
        int w = cols - j0 < CB ? cols - j0 : CB;
        double acc[CB] = {0};
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < w; j++) acc[j] += d[(size_t)i * cols + j0 + j];
        for (int j = 0; j < w; j++) out[j0 + j] = (float)acc[j];
    }
}

/* ---- construction --------------------------------------------------------------------- */

/* splitmix64: the seeded generator behind the initial weights. */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform float in [-bound, bound). */
static float rng_uniform(uint64_t *s, float bound) {
    float u = (float)(rng_next(s) >> 40) * (1.0f / 16777216.0f);
    return (2.0f * u - 1.0f) * bound;
}

/* Appends a tensor to the table and returns its offset in its buffer. */
static size_t add_tensor(ae_model *m, const char *half, int idx, const char *what, int rows, int cols,
                         int trainable, int decay) {
    tensor_info *t = &m->ti[m->n_tensors++];
    snprintf(t->name, sizeof t->name, "%s.%d.%s", half, idx, what);
    t->rows = rows;
    t->cols = cols;
    t->trainable = trainable;
    t->decay = decay;
    size_t *n = trainable ? &m->n_par : &m->n_state;
    t->off = *n;
    *n += (size_t)rows * (size_t)cols;
    return t->off;
}

/* Lays out the trainable tensors of one half (PyTorch nn.Sequential indices). */
static void layout_params(ae_model *m, half_t *hf, const char *name) {
    const ae_config *c = &m->cfg;
    if (!hf->hid) {
        hf->w0 = add_tensor(m, name, 0, "weight", hf->out, hf->in, 1, 1);
        hf->b0 = add_tensor(m, name, 0, "bias", hf->out, 1, 1, 0);
        return;
    }
    hf->w0 = add_tensor(m, name, 0, "weight", hf->hid, hf->in, 1, 1);
    hf->b0 = add_tensor(m, name, 0, "bias", hf->hid, 1, 1, 0);
    if (c->norm == AE_NORM_BATCH) {
        hf->g = add_tensor(m, name, 1, "weight", hf->hid, 1, 1, 0);
        hf->be = add_tensor(m, name, 1, "bias", hf->hid, 1, 1, 0);
    }
    int last = c->norm == AE_NORM_BATCH ? 3 : 2;
    hf->w1 = add_tensor(m, name, last, "weight", hf->out, hf->hid, 1, 1);
    hf->b1 = add_tensor(m, name, last, "bias", hf->out, 1, 1, 0);
}

/* Lays out the running statistics of one half. */
static void layout_state(ae_model *m, half_t *hf, const char *name) {
    if (!hf->hid || m->cfg.norm != AE_NORM_BATCH) return;
    hf->rm = add_tensor(m, name, 1, "running_mean", hf->hid, 1, 0, 0);
    hf->rv = add_tensor(m, name, 1, "running_var", hf->hid, 1, 0, 0);
}

/* Fills a Linear layer (out, in) and its bias with U(-1/sqrt(in), 1/sqrt(in)). */
static void init_linear(float *w, float *b, int out, int in, uint64_t *s) {
    float bound = 1.0f / sqrtf((float)in);
    for (size_t i = 0; i < (size_t)out * (size_t)in; i++) w[i] = rng_uniform(s, bound);
    for (int i = 0; i < out; i++) b[i] = rng_uniform(s, bound);
}

ae_model *ae_new(const ae_config *c, uint64_t seed, kvc_err *err) {
    if (ae_config_check(c, err)) return NULL;
    ae_model *m = calloc(1, sizeof *m);
    if (!m) { kvc_fail(err, "out of memory for the autoencoder"); return NULL; }
    m->cfg = *c;
    int D = c->in_dim, H = c->hidden, R = c->latent;
    m->enc = (half_t){.in = D, .hid = H, .out = R};
    m->dec = (half_t){.in = R, .hid = H, .out = D};
    layout_params(m, &m->enc, "enc");
    layout_params(m, &m->dec, "dec");
    layout_state(m, &m->enc, "enc");
    layout_state(m, &m->dec, "dec");
    m->par = kvc_calloc_array(4 * m->n_par, sizeof(float));
    m->state = kvc_calloc_array(m->n_state, sizeof(float));
    m->enc.mean = kvc_calloc_array(4 * (size_t)H + 1, sizeof(float)); /* owns all four (H) vectors */
    if (!m->par || !m->state || !m->enc.mean) {
        ae_free(m);
        kvc_fail(err, "out of memory for the autoencoder");
        return NULL;
    }
    m->grad = m->par + m->n_par;
    m->am = m->grad + m->n_par;
    m->av = m->am + m->n_par;
    m->enc.rstd = m->enc.mean + H;
    m->dec.mean = m->enc.mean + 2 * (size_t)H;
    m->dec.rstd = m->enc.mean + 3 * (size_t)H;
    uint64_t s = seed;
    half_t *halves[2] = {&m->enc, &m->dec};
    for (int k = 0; k < 2; k++) {
        half_t *hf = halves[k];
        if (!hf->hid) { init_linear(m->par + hf->w0, m->par + hf->b0, hf->out, hf->in, &s); continue; }
        init_linear(m->par + hf->w0, m->par + hf->b0, hf->hid, hf->in, &s);
        if (c->norm == AE_NORM_BATCH)
            for (int j = 0; j < H; j++) m->par[hf->g + j] = 1.0f, m->state[hf->rv + j] = 1.0f;
        init_linear(m->par + hf->w1, m->par + hf->b1, hf->out, hf->hid, &s);
    }
    return m;
}

void ae_free(ae_model *m) {
    if (!m) return;
    free(m->par);
    free(m->state);
    free(m->enc.mean);
    free(m->ws);
    free(m);
}

const ae_config *ae_get_config(const ae_model *m) { return &m->cfg; }

/* ---- tensor access -------------------------------------------------------------------- */

int ae_n_tensors(const ae_model *m) { return m->n_tensors; }

/* The view of tensor i in buffer `buf` (NULL data for out-of-range i or non-trainable
 * tensors when which != 0). which: 0 values, 1 grad, 2 Adam m, 3 Adam v. */
static ae_tensor tensor_view(ae_model *m, int i, int which) {
    ae_tensor t = {0};
    if (i < 0 || i >= m->n_tensors) return t;
    const tensor_info *ti = &m->ti[i];
    t.name = ti->name;
    t.rows = ti->rows;
    t.cols = ti->cols;
    t.trainable = ti->trainable;
    float *bufs[4] = {m->par, m->grad, m->am, m->av};
    if (!ti->trainable) t.data = which == 0 ? m->state + ti->off : NULL;
    else t.data = bufs[which] + ti->off;
    return t;
}

ae_tensor ae_tensor_at(ae_model *m, int i) { return tensor_view(m, i, 0); }
ae_tensor ae_grad_at(ae_model *m, int i) { return tensor_view(m, i, 1); }
ae_tensor ae_adam_m_at(ae_model *m, int i) { return tensor_view(m, i, 2); }
ae_tensor ae_adam_v_at(ae_model *m, int i) { return tensor_view(m, i, 3); }
int64_t ae_adam_steps(const ae_model *m) { return m->t; }
void ae_set_adam_steps(ae_model *m, int64_t t) { m->t = t < 0 ? 0 : t; }

/* ---- GEMM wrappers (row-major, Linear weights W (out, in)) ---------------------------- */

/* C (M, N) = alpha op(A) op(B) + beta C with the M rows of C split over the OpenMP threads,
 * each calling sgemm on its slice (single-threaded inside a training step, see blas_enter).
 * Results may differ in the last bits with the thread count (OpenBLAS picks kernels by size). */
static void gemm_rows(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc) {
#pragma omp parallel if ((size_t)M * N * K >= 64 * (size_t)PAR_MIN && M >= 16)
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int per = ((M + nt - 1) / nt + 7) & ~7, r0 = t * per, r1 = r0 + per < M ? r0 + per : M;
        if (r0 < r1)
            cblas_sgemm(CblasRowMajor, ta, tb, r1 - r0, N, K, alpha, ta == CblasNoTrans ? A + (size_t)r0 * lda : A + r0,
                        lda, B, ldb, beta, C + (size_t)r0 * ldc, ldc);
    }
}

/* y (n, out) = x (n, in) W^T. */
static void gemm_fwd(const float *x, int n, int in, const float *w, int out, float *y) {
    gemm_rows(CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

/* dW (out, in) = dy^T (out, n) x (n, in). */
static void gemm_dw(const float *dy, int n, int out, const float *x, int in, float *dw) {
    gemm_rows(CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 0.0f, dw, in);
}

/* dx (n, in) = dy (n, out) W (out, in). */
static void gemm_dx(const float *dy, int n, int out, const float *w, int in, float *dx) {
    gemm_rows(CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in);
}

/* A training step threads over OpenMP and runs OpenBLAS single-threaded inside: OpenBLAS's
 * own pool would compete with the OpenMP threads for the same cores, and its GEMMs are too
 * small here to split well. Returns the OpenBLAS thread count to restore, or 0 for none to
 * restore (one OpenMP thread, or already inside a parallel region: then nothing changes). */
static int blas_enter(void) {
    if (omp_in_parallel() || omp_get_max_threads() < 2) return 0;
    int t = openblas_get_num_threads();
    if (t == 1) return 0;
    openblas_set_num_threads(1);
    return t;
}

static void blas_leave(int t) {
    if (t > 0) openblas_set_num_threads(t);
}

/* ---- training forward / backward ------------------------------------------------------ */

/* Makes the workspace hold n rows and a loss scratch of `tmp` floats; -1 on no memory. */
static int ws_reserve(ae_model *m, int n, size_t tmp) {
    if (n <= m->cap && tmp <= m->cap_tmp) return 0;
    int cap = n > m->cap ? n : m->cap;
    if (tmp < m->cap_tmp) tmp = m->cap_tmp;
    size_t D = (size_t)m->cfg.in_dim, H = (size_t)m->cfg.hidden, R = (size_t)m->cfg.latent;
    size_t per_row = 2 * R + D + 5 * H, total = per_row * (size_t)cap + tmp;
    float *ws = kvc_malloc_array(total, sizeof(float));
    if (!ws) return -1;
    free(m->ws);
    m->ws = ws;
    m->cap = cap;
    m->cap_tmp = tmp;
    size_t c = (size_t)cap;
    float *p = ws;
    m->z = p, p += c * R;
    m->dz = p, p += c * R;
    m->y = p, p += c * D;
    m->dhid = p, p += c * H;
    m->enc.pre = p, p += c * H;
    m->enc.u = p, p += c * H;
    m->dec.pre = p, p += c * H;
    m->dec.u = p, p += c * H;
    m->tmp = p;
    return 0;
}

/* Hidden block of a half in training mode. On entry hf->pre (n, hid) holds x W0^T (no bias);
 * on exit it holds xhat (BN) or the pre-activation, and hf->u the activation. With BN the
 * batch statistics go to hf->mean/rstd and the running statistics are updated. */
static void hidden_fwd_train(ae_model *m, half_t *hf, int n) {
    const ae_config *c = &m->cfg;
    int H = hf->hid, bn = c->norm == AE_NORM_BATCH;
    const float *p = m->par;
    float mom = c->bn_momentum;
#pragma omp parallel for schedule(static) if ((size_t)n * H >= PAR_MIN)
    for (int j0 = 0; j0 < H; j0 += CB) {
        int w = H - j0 < CB ? H - j0 : CB;
        float s[CB], k[CB], g[CB], b[CB];
        if (!bn) {
            for (int j = 0; j < w; j++) s[j] = -p[hf->b0 + j0 + j], k[j] = g[j] = 1.0f, b[j] = 0.0f;
        } else {
            /* Batch statistics of x W0^T. The bias only shifts the mean, so it enters the
             * running mean but cancels from the normalised output. */
            double s1[CB] = {0}, s2[CB] = {0};
            for (int i = 0; i < n; i++) {
                const float *h = hf->pre + (size_t)i * H + j0;
                for (int j = 0; j < w; j++) s1[j] += h[j], s2[j] += (double)h[j] * h[j];
            }
            float *rm = m->state + hf->rm + j0, *rv = m->state + hf->rv + j0;
            for (int j = 0; j < w; j++) {
                double mean = s1[j] / n, var = s2[j] / n - mean * mean;
                if (var < 0) var = 0;
                s[j] = hf->mean[j0 + j] = (float)mean;
                k[j] = hf->rstd[j0 + j] = (float)(1.0 / sqrt(var + c->bn_eps));
                g[j] = p[hf->g + j0 + j];
                b[j] = p[hf->be + j0 + j];
                rm[j] = (1 - mom) * rm[j] + mom * (float)(mean + p[hf->b0 + j0 + j]);
                rv[j] = (1 - mom) * rv[j] + mom * (float)(var * n / (n - 1));
            }
        }
        act_fwd_block(hf->pre + j0, hf->u + j0, (size_t)H, n, w, s, k, g, b, c->act, c->leaky_slope);
    }
}

/* Backward through the hidden block: d (n, hid) holds dL/du on entry and dL/d(x W0^T + b0)
 * on exit. Writes the gradients of b0 and of the BatchNorm gamma and beta. With BN the b0
 * gradient is exactly 0 (the batch mean removes any column shift); it is written as 0, not
 * as rounding noise that Adam's normalisation would turn into full-size random steps. */
static void hidden_bwd(ae_model *m, half_t *hf, float *d, int n) {
    const ae_config *c = &m->cfg;
    int H = hf->hid, bn = c->norm == AE_NORM_BATCH;
    const float *p = m->par;
    float *gr = m->grad;
#pragma omp parallel for schedule(static) if ((size_t)n * H >= PAR_MIN)
    for (int j0 = 0; j0 < H; j0 += CB) {
        int w = H - j0 < CB ? H - j0 : CB;
        float g[CB], b[CB];
        double s1[CB] = {0}, s2[CB] = {0};
        for (int j = 0; j < w; j++) g[j] = bn ? p[hf->g + j0 + j] : 1.0f, b[j] = bn ? p[hf->be + j0 + j] : 0.0f;
        act_bwd_block(d + j0, hf->pre + j0, (size_t)H, n, w, g, b, s1, s2, c->act, c->leaky_slope);
        if (!bn) {
            for (int j = 0; j < w; j++) gr[hf->b0 + j0 + j] = (float)s1[j];
            continue;
        }
        /* dh = g rstd (d - mean(d) - xhat mean(d xhat)) = a d - k1 - k2 xhat */
        float a[CB], k1[CB], k2[CB];
        for (int j = 0; j < w; j++) {
            gr[hf->be + j0 + j] = (float)s1[j];
            gr[hf->g + j0 + j] = (float)s2[j];
            gr[hf->b0 + j0 + j] = 0.0f;
            a[j] = g[j] * hf->rstd[j0 + j];
            k1[j] = a[j] * (float)(s1[j] / n);
            k2[j] = a[j] * (float)(s2[j] / n);
        }
        for (int i = 0; i < n; i++) {
            float *di = d + (size_t)i * H + j0;
            const float *xh = hf->pre + (size_t)i * H + j0;
            for (int j = 0; j < w; j++) di[j] = a[j] * di[j] - k1[j] - k2[j] * xh[j];
        }
    }
}

/* Forward of one half in training mode from x (n, in) into out (n, out), without the output
 * bias (the caller adds it in its next pass over out). */
static void half_fwd_train(ae_model *m, half_t *hf, const float *x, int n, float *out) {
    const float *p = m->par;
    if (!hf->hid) {
        gemm_fwd(x, n, hf->in, p + hf->w0, hf->out, out);
        return;
    }
    gemm_fwd(x, n, hf->in, p + hf->w0, hf->hid, hf->pre);
    hidden_fwd_train(m, hf, n);
    gemm_fwd(hf->u, n, hf->hid, p + hf->w1, hf->out, out);
}

/* Backward of one half: dout (n, out) is dL/d(output) (its bias gradient already written);
 * fills the weight gradients and, if dx is non-NULL, dL/dx (n, in). */
static void half_bwd(ae_model *m, half_t *hf, const float *x, const float *dout, int n, float *dx) {
    float *gr = m->grad;
    const float *p = m->par;
    if (!hf->hid) {
        gemm_dw(dout, n, hf->out, x, hf->in, gr + hf->w0);
        if (dx) gemm_dx(dout, n, hf->out, p + hf->w0, hf->in, dx);
        return;
    }
    gemm_dw(dout, n, hf->out, hf->u, hf->hid, gr + hf->w1);
    gemm_dx(dout, n, hf->out, p + hf->w1, hf->hid, m->dhid);
    hidden_bwd(m, hf, m->dhid, n);
    gemm_dw(m->dhid, n, hf->hid, x, hf->in, gr + hf->w0);
    if (dx) gemm_dx(m->dhid, n, hf->hid, p + hf->w0, hf->in, dx);
}

/* Output bias of a half (b1, or b0 without hidden layer). */
static size_t half_out_bias(const half_t *hf) { return hf->hid ? hf->b1 : hf->b0; }

/* Adds the decoder's output bias to y and evaluates the loss; overwrites y (n, D) with
 * dL/dy and writes the output bias gradient. Returns the loss (NaN for NaN data). */
static double loss_fwd_bwd(ae_model *m, const float *x, int n, const ae_loss *L) {
    int D = m->cfg.in_dim, kind = L->kind;
    const float *bo = m->par + half_out_bias(&m->dec);
    float *y = m->y, *gbo = m->grad + half_out_bias(&m->dec);
    double sse = 0, q = 0, nd = (double)n * D;
    float mix = kind == AE_LOSS_MSE ? 1.0f : L->mse_mix, cm = (float)(2.0 * mix / nd), ck = (float)(2.0 / nd);
    /* y <- e = y + b - x; for MSE directly dy = cm e and its column sums */
#pragma omp parallel for schedule(static) reduction(+ : sse) if (nd >= PAR_MIN)
    for (int j0 = 0; j0 < D; j0 += CB) {
        int w = D - j0 < CB ? D - j0 : CB;
        double acc[CB] = {0};
        for (int i = 0; i < n; i++) {
            float *yi = y + (size_t)i * D + j0;
            const float *xi = x + (size_t)i * D + j0;
            for (int j = 0; j < w; j++) {
                float e = yi[j] + bo[j0 + j] - xi[j];
                sse += e * e;
                yi[j] = kind == AE_LOSS_MSE ? cm * e : e;
                acc[j] += yi[j];
            }
        }
        for (int j = 0; j < w; j++) gbo[j0 + j] = (float)acc[j];
    }
    if (kind == AE_LOSS_KEY_ATTN) { /* t = e W; L += sum e.t / (N D); dy = cm e + 2 t / (N D) */
        float *t = m->tmp;
        gemm_rows(CblasNoTrans, CblasNoTrans, n, D, D, 1.0f, y, D, L->w, D, 0.0f, t, D);
#pragma omp parallel for schedule(static) reduction(+ : q) if (nd >= PAR_MIN)
        for (int i = 0; i < n; i++) {
            float *yi = y + (size_t)i * D;
            const float *ti = t + (size_t)i * D;
            for (int j = 0; j < D; j++) q += yi[j] * ti[j], yi[j] = cm * yi[j] + ck * ti[j];
        }
        q /= nd;
        col_sums(y, n, D, gbo);
    } else if (kind == AE_LOSS_VALUE_ATTN) { /* S = A e (M, D); dy = cm e + 2 A^T S / (M D) */
        int M = L->m;
        float *S = m->tmp;
        gemm_rows(CblasNoTrans, CblasNoTrans, M, D, n, 1.0f, L->a, n, y, D, 0.0f, S, D);
        for (size_t k = 0; k < (size_t)M * D; k++) q += (double)S[k] * S[k];
        q /= (double)M * D;
        for (size_t k = 0; k < (size_t)n * D; k++) y[k] *= cm;
        gemm_rows(CblasTrans, CblasNoTrans, n, D, M, (float)(2.0 / ((double)M * D)), L->a, n, S, D, 1.0f, y, D);
        col_sums(y, n, D, gbo);
    }
    return isnan(sse) ? NAN : mix * sse / nd + q;
}

float ae_forward_backward(ae_model *m, const float *x, int n, const ae_loss *L) {
    const ae_config *c = &m->cfg;
    int D = c->in_dim, R = c->latent, bn = c->hidden && c->norm == AE_NORM_BATCH;
    if (!x || !L || n < (bn ? 2 : 1)) return NAN;
    if (L->kind == AE_LOSS_KEY_ATTN && !L->w) return NAN;
    if (L->kind == AE_LOSS_VALUE_ATTN && (!L->a || L->m < 1)) return NAN;
    size_t tmp = L->kind == AE_LOSS_MSE ? 0 : (size_t)(L->kind == AE_LOSS_VALUE_ATTN ? L->m : n) * D;
    if (ws_reserve(m, n, tmp)) return NAN;
    int blas = blas_enter();

    half_fwd_train(m, &m->enc, x, n, m->z);
    bias_act(m->z, n, R, m->par + half_out_bias(&m->enc), AE_ACT_NONE, 0);
    half_fwd_train(m, &m->dec, m->z, n, m->y);
    double loss = loss_fwd_bwd(m, x, n, L);

    half_bwd(m, &m->dec, m->z, m->y, n, m->dz);
    /* The latent bias shifts every column of the decoder's BatchNorm input alike, so with
     * BatchNorm its gradient is exactly 0 (see hidden_bwd). */
    float *gb = m->grad + half_out_bias(&m->enc);
    if (bn) memset(gb, 0, (size_t)R * sizeof *gb);
    else col_sums(m->dz, n, R, gb);
    half_bwd(m, &m->enc, x, m->dz, n, NULL);
    blas_leave(blas);

    double g2 = 0;
    for (size_t k = 0; k < m->n_par; k++) g2 += (double)m->grad[k] * m->grad[k];
    m->gnorm = (float)sqrt(g2);
    return (float)loss;
}

float ae_grad_norm(const ae_model *m) { return m->gnorm; }

/* ---- optimiser ------------------------------------------------------------------------ */

void ae_adam_defaults(ae_adam *o) {
    *o = (ae_adam){.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 1e-4f, .clip = 1.0f};
}

void ae_adam_step(ae_model *m, const ae_adam *o) {
    m->t++;
    /* Same operation order as torch.optim.AdamW (single-tensor path) after
     * clip_grad_norm_: g *= min(1, clip / (norm + 1e-6)). */
    float coef = 1.0f;
    if (o->clip > 0) {
        double cc = (double)o->clip / ((double)m->gnorm + 1e-6);
        if (cc < 1) coef = (float)cc;
    }
    double bc1 = 1.0 - pow(o->beta1, (double)m->t), bc2 = 1.0 - pow(o->beta2, (double)m->t);
    float step = (float)(o->lr / bc1), bc2s = (float)sqrt(bc2), w1 = 1.0f - o->beta1, b2 = o->beta2;
    float w2 = 1.0f - o->beta2, eps = o->eps;
    for (int i = 0; i < m->n_tensors; i++) {
        const tensor_info *ti = &m->ti[i];
        if (!ti->trainable) continue;
        size_t n = (size_t)ti->rows * ti->cols;
        float *p = m->par + ti->off, *g = m->grad + ti->off, *mm = m->am + ti->off, *vv = m->av + ti->off;
        float decay = ti->decay ? 1.0f - o->lr * o->weight_decay : 1.0f;
        for (size_t k = 0; k < n; k++) {
            float gk = g[k] * coef;
            p[k] *= decay;
            mm[k] += w1 * (gk - mm[k]);
            vv[k] = vv[k] * b2 + w2 * gk * gk;
            p[k] += -step * (mm[k] / (sqrtf(vv[k]) / bc2s + eps));
        }
    }
}

float ae_lr_schedule(int64_t t, int64_t total, int64_t warmup, float base, float min_lr) {
    if (t < 0) t = 0;
    if (warmup > 0 && t < warmup) return base * (float)((double)t / (double)warmup);
    if (t >= total) return min_lr;
    double p = (double)(t - warmup) / (double)(total - warmup);
    return (float)(min_lr + (base - min_lr) * 0.5 * (1.0 + cos(3.14159265358979323846 * p)));
}

/* ---- inference ------------------------------------------------------------------------ */

/* One Linear layer plus act on a block: y (n, out) = act(x W^T + b). */
static void dense_run(const float *x, int n, int in, const float *w, const float *b, int out, int act,
                      float slope, float *y) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
    bias_act(y, n, out, b, (ae_act)act, slope);
}

/* Inference through one half on a block of n <= AE_CHUNK rows; hbuf holds (n, hid). */
static void half_infer(const ae_model *m, const half_t *hf, const float *x, int n, float *hbuf, float *out) {
    const ae_config *c = &m->cfg;
    const float *p = m->par;
    if (!hf->hid) {
        dense_run(x, n, hf->in, p + hf->w0, p + hf->b0, hf->out, AE_ACT_NONE, 0, out);
        return;
    }
    int H = hf->hid;
    if (c->norm != AE_NORM_BATCH) {
        dense_run(x, n, hf->in, p + hf->w0, p + hf->b0, H, c->act, c->leaky_slope, hbuf);
    } else {
        dense_run(x, n, hf->in, p + hf->w0, p + hf->b0, H, AE_ACT_NONE, 0, hbuf);
        for (int j0 = 0; j0 < H; j0 += CB) {
            int w = H - j0 < CB ? H - j0 : CB;
            float k[CB];
            for (int j = 0; j < w; j++) k[j] = 1.0f / sqrtf(m->state[hf->rv + j0 + j] + c->bn_eps);
            act_fwd_block(hbuf + j0, hbuf + j0, (size_t)H, n, w, m->state + hf->rm + j0, k, p + hf->g + j0,
                          p + hf->be + j0, c->act, c->leaky_slope);
        }
    }
    dense_run(hbuf, n, H, p + hf->w1, p + hf->b1, hf->out, AE_ACT_NONE, 0, out);
}

/* Runs the encoder and/or decoder over n rows block by block. x is (n, D) when enc, else
 * (n, R); z (n, R) and y (n, D) may be NULL. Outputs become NaN if scratch cannot be had. */
static void ae_infer(const ae_model *m, const float *x, int n, int enc, int dec, float *z, float *y) {
    int D = m->cfg.in_dim, R = m->cfg.latent, H = m->cfg.hidden;
    float *buf = kvc_malloc_array((size_t)AE_CHUNK * (size_t)(H + R), sizeof(float));
    if (!buf) {
        for (size_t k = 0; z && k < (size_t)n * R; k++) z[k] = NAN;
        for (size_t k = 0; y && k < (size_t)n * D; k++) y[k] = NAN;
        return;
    }
    float *hbuf = buf, *zb = buf + (size_t)AE_CHUNK * H;
    for (int i0 = 0; i0 < n; i0 += AE_CHUNK) {
        int nb = n - i0 < AE_CHUNK ? n - i0 : AE_CHUNK;
        const float *zin;
        if (enc) {
            float *zo = z ? z + (size_t)i0 * R : zb;
            half_infer(m, &m->enc, x + (size_t)i0 * D, nb, hbuf, zo);
            zin = zo;
        } else {
            zin = x + (size_t)i0 * R;
        }
        if (dec && y) half_infer(m, &m->dec, zin, nb, hbuf, y + (size_t)i0 * D);
    }
    free(buf);
}

void ae_encode(const ae_model *m, const float *x, int n, float *z) {
    if (n > 0 && z) ae_infer(m, x, n, 1, 0, z, NULL);
}

void ae_decode(const ae_model *m, const float *z, int n, float *y) {
    if (n > 0 && y) ae_infer(m, z, n, 0, 1, NULL, y);
}

double ae_rel_error(const ae_model *m, const float *x, int n) {
    int D = m->cfg.in_dim;
    float *y = kvc_malloc_array((size_t)AE_CHUNK * D, sizeof(float));
    if (!y) return NAN;
    double num = 0, den = 0;
    for (int i0 = 0; i0 < n; i0 += AE_CHUNK) {
        int nb = n - i0 < AE_CHUNK ? n - i0 : AE_CHUNK;
        const float *xb = x + (size_t)i0 * D;
        ae_infer(m, xb, nb, 1, 1, NULL, y);
        for (size_t k = 0; k < (size_t)nb * D; k++) {
            double e = (double)y[k] - xb[k];
            num += e * e;
            den += (double)xb[k] * xb[k];
        }
    }
    free(y);
    return den > 0 ? sqrt(num / den) : (num > 0 ? INFINITY : 0.0);
}

/* ---- export --------------------------------------------------------------------------- */

/* Copies a Linear layer into d, folding a BatchNorm after it when rm is non-NULL. */
static int dense_from(ae_dense *d, const float *w, const float *b, int out, int in, int act, const float *rm,
                      const float *rv, const float *g, const float *be, float eps) {
    d->in = in;
    d->out = out;
    d->act = act;
    d->w = kvc_malloc_array((size_t)out * in, sizeof(float));
    d->b = kvc_malloc_array((size_t)out, sizeof(float));
    if (!d->w || !d->b) return -1;
    for (int o = 0; o < out; o++) {
        double s = rm ? (double)g[o] / sqrt((double)rv[o] + eps) : 1.0;
        for (int k = 0; k < in; k++) d->w[(size_t)o * in + k] = (float)(s * w[(size_t)o * in + k]);
        d->b[o] = rm ? (float)(((double)b[o] - rm[o]) * s + be[o]) : b[o];
    }
    return 0;
}

int ae_export_folded(const ae_model *m, ae_export *out, kvc_err *err) {
    memset(out, 0, sizeof *out);
    const ae_config *c = &m->cfg;
    const float *p = m->par;
    out->leaky_slope = c->leaky_slope;
    const half_t *halves[2] = {&m->enc, &m->dec};
    for (int k = 0; k < 2; k++) {
        const half_t *hf = halves[k];
        ae_dense *d = k ? out->dec : out->enc;
        int *nl = k ? &out->n_dec : &out->n_enc, bad;
        if (!hf->hid) {
            *nl = 1;
            bad = dense_from(&d[0], p + hf->w0, p + hf->b0, hf->out, hf->in, AE_ACT_NONE, NULL, NULL, NULL, NULL, 0);
        } else {
            int bn = c->norm == AE_NORM_BATCH;
            *nl = 2;
            bad = dense_from(&d[0], p + hf->w0, p + hf->b0, hf->hid, hf->in, c->act, bn ? m->state + hf->rm : NULL,
                             bn ? m->state + hf->rv : NULL, bn ? p + hf->g : NULL, bn ? p + hf->be : NULL, c->bn_eps);
            bad = bad || dense_from(&d[1], p + hf->w1, p + hf->b1, hf->out, hf->hid, AE_ACT_NONE, NULL, NULL, NULL,
                                    NULL, 0);
        }
        if (bad) {
            ae_export_free(out);
            return kvc_fail(err, "out of memory exporting the autoencoder");
        }
    }
    return 0;
}

void ae_export_free(ae_export *e) {
    if (!e) return;
    for (int i = 0; i < 2; i++) {
        free(e->enc[i].w), free(e->enc[i].b), free(e->dec[i].w), free(e->dec[i].b);
    }
    memset(e, 0, sizeof *e);
}

void ae_export_run(const ae_dense *layers, int n_layers, float leaky_slope, const float *x, int n, float *y) {
    if (n_layers < 1 || n < 1) return;
    int width = 0;
    for (int l = 0; l < n_layers; l++) width = layers[l].out > width ? layers[l].out : width;
    const ae_dense *last = &layers[n_layers - 1];
    float *buf = n_layers > 1 ? kvc_malloc_array(2 * (size_t)AE_CHUNK * width, sizeof(float)) : NULL;
    if (n_layers > 1 && !buf) {
        for (size_t k = 0; k < (size_t)n * last->out; k++) y[k] = NAN;
        return;
    }
    for (int i0 = 0; i0 < n; i0 += AE_CHUNK) {
        int nb = n - i0 < AE_CHUNK ? n - i0 : AE_CHUNK;
        const float *in = x + (size_t)i0 * layers[0].in;
        for (int l = 0; l < n_layers; l++) {
            const ae_dense *d = &layers[l];
            float *o = l == n_layers - 1 ? y + (size_t)i0 * last->out : buf + (size_t)(l & 1) * AE_CHUNK * width;
            dense_run(in, nb, d->in, d->w, d->b, d->out, d->act, leaky_slope, o);
            in = o;
        }
    }
    free(buf);
}
