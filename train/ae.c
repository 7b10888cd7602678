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
    float *rstd;       /* (hid) 1/sqrt(batch var + eps) of the last training forward */
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
    int cap, cap_nt;             /* rows and threads the workspace holds */
    size_t cap_tmp;              /* floats in tmp */
    int used_nt;                 /* threads the last step ran on */
    float *ws;                   /* workspace block owning the float buffers below */
    double *dws;                 /* workspace block owning the double buffers below */
    float *z, *dz;               /* (cap, R) latent and its gradient */
    float *y;                    /* (cap, D) reconstruction, then dL/dy */
    float *dhid;                 /* (cap, H) gradient through a hidden layer */
    float *tmp;                  /* loss scratch: (N, D) key loss, (threads, M, D) value loss */
    float *gpart;                /* (threads - 1, P) gradient contributions of threads 1.. */
    size_t w2;                   /* 2 max(H, D): doubles in one thread's column partial */
    double *part, *comb;         /* cross-thread column partials and totals (see ws_reserve) */
    double *lossacc;             /* (threads, 2) per-thread loss terms */
};

/* ---- activations ---------------------------------------------------------------------- */

#define CB 16          /* columns per block of the elementwise passes (one cache line) */
#define ROWS_MIN 128   /* fewest batch rows worth a thread of their own in a training step */

/* Forward formulas: kernels' kvc_act_apply (one definition for training, export and the
 * cache; with a constant activation the switch folds away). LEAKY_F and the derivatives read
 * `slope` from the enclosing scope. */
#define RELU_F(a) kvc_act_apply((a), KVC_ACT_RELU, 0.0f)
#define LEAKY_F(a) kvc_act_apply((a), KVC_ACT_LEAKY_RELU, slope)
#define GELU_F(a) kvc_act_apply((a), KVC_ACT_GELU, 0.0f)
#define SILU_F(a) kvc_act_apply((a), KVC_ACT_SILU, 0.0f)
#define NONE_F(a) (a)
/* Derivatives: tanh-form GELU, SiLU; ReLU-type at 0 as PyTorch (0 for relu, slope for
 * leaky_relu). */
static inline float gelu_df(float a) {
    float t = tanhf(KVC_GELU_K * (a + KVC_GELU_C * a * a * a));
    return 0.5f * (1.0f + t) + 0.5f * a * (1.0f - t * t) * KVC_GELU_K * (1.0f + 3.0f * KVC_GELU_C * a * a);
}
static inline float silu_df(float a) {
    float s = 1.0f / (1.0f + expf(-a));
    return s * (1.0f + a * (1.0f - s));
}
#define RELU_DF(a) ((a) > 0 ? 1.0f : 0.0f)
#define LEAKY_DF(a) ((a) > 0 ? 1.0f : slope)
#define NONE_DF(a) ((void)(a), 1.0f)
/* Expands LOOP(F) with F the activation (or, for ACT_DISPATCH_DF, its derivative) so that
 * each loop is compiled for one activation and the switch stays outside it. */
#define ACT_DISPATCH(act, LOOP)                                                                    \
    switch (act) {                                                                                 \
    case KVC_ACT_RELU: LOOP(RELU_F); break;                                                         \
    case KVC_ACT_LEAKY_RELU: LOOP(LEAKY_F); break;                                                  \
    case KVC_ACT_GELU: LOOP(GELU_F); break;                                                         \
    case KVC_ACT_SILU: LOOP(SILU_F); break;                                                         \
    default: LOOP(NONE_F); break;                                                                  \
    }
#define ACT_DISPATCH_DF(act, LOOP)                                                                 \
    switch (act) {                                                                                 \
    case KVC_ACT_RELU: LOOP(RELU_DF); break;                                                        \
    case KVC_ACT_LEAKY_RELU: LOOP(LEAKY_DF); break;                                                 \
    case KVC_ACT_GELU: LOOP(gelu_df); break;                                                        \
    case KVC_ACT_SILU: LOOP(silu_df); break;                                                        \
    default: LOOP(NONE_DF); break;                                                                 \
    }

/* Elementwise forward on a block of w <= CB columns of `rows` rows (row stride ld): the
 * normalised value xh = (h - s) k is stored back into h and u = act(g xh + b). A plain bias
 * is s = -bias, k = g = 1, b = 0 (exact). u may equal h. */
static void act_fwd_block(float *h, float *u, size_t ld, int rows, int w, const float *s, const float *k,
                          const float *g, const float *b, kvc_act act, float slope) {
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
                          double *s1, double *s2, kvc_act act, float slope) {
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
static void bias_act(float *y, int rows, int cols, const float *bias, kvc_act act, float slope) {
    for (int j0 = 0; j0 < cols; j0 += CB) {
        int w = cols - j0 < CB ? cols - j0 : CB;
        float s[CB], one[CB], zero[CB];
        for (int j = 0; j < w; j++) s[j] = -bias[j0 + j], one[j] = 1.0f, zero[j] = 0.0f;
        act_fwd_block(y + j0, y + j0, (size_t)cols, rows, w, s, one, one, zero, act, slope);
    }
}

/* out[j] = sum over rows of d (rows, cols) column j, accumulated in double. */
static void col_sums(const float *d, int rows, int cols, float *out) {
    for (int j0 = 0; j0 < cols; j0 += CB) {
        int w = cols - j0 < CB ? cols - j0 : CB;
        double acc[CB] = {0};
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < w; j++) acc[j] += d[(size_t)i * cols + j0 + j];
        for (int j = 0; j < w; j++) out[j0 + j] = (float)acc[j];
    }
}

/* ---- construction --------------------------------------------------------------------- */

/* Uniform float in [-bound, bound). */
static float rng_uniform(uint64_t *s, float bound) {
    float u = (float)(kvc_rng_next(s) >> 40) * (1.0f / 16777216.0f);
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

ae_model *kvc_ae_new(const ae_config *c, uint64_t seed, kvc_err *err) {
    if (kvc_ae_config_check(c, err)) return NULL;
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
    m->enc.rstd = kvc_calloc_array(2 * (size_t)H + 1, sizeof(float)); /* owns both (H) vectors */
    if (!m->par || !m->state || !m->enc.rstd) {
        kvc_ae_free(m);
        kvc_fail(err, "out of memory for the autoencoder");
        return NULL;
    }
    m->grad = m->par + m->n_par;
    m->am = m->grad + m->n_par;
    m->av = m->am + m->n_par;
    m->dec.rstd = m->enc.rstd + H;
    m->w2 = 2 * (size_t)(H > D ? H : D);
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

void kvc_ae_free(ae_model *m) {
    if (!m) return;
    free(m->par);
    free(m->state);
    free(m->enc.rstd);
    free(m->ws);
    free(m->dws);
    free(m);
}

const ae_config *kvc_ae_get_config(const ae_model *m) { return &m->cfg; }

/* ---- tensor access -------------------------------------------------------------------- */

int kvc_ae_n_tensors(const ae_model *m) { return m->n_tensors; }

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

ae_tensor kvc_ae_tensor_at(ae_model *m, int i) { return tensor_view(m, i, 0); }
ae_tensor kvc_ae_grad_at(ae_model *m, int i) { return tensor_view(m, i, 1); }
ae_tensor kvc_ae_adam_m_at(ae_model *m, int i) { return tensor_view(m, i, 2); }
ae_tensor kvc_ae_adam_v_at(ae_model *m, int i) { return tensor_view(m, i, 3); }
int64_t kvc_ae_adam_steps(const ae_model *m) { return m->t; }
void kvc_ae_set_adam_steps(ae_model *m, int64_t t) { m->t = t < 0 ? 0 : t; }

/* ---- GEMM wrappers (row-major, Linear weights W (out, in)) ---------------------------- */

/* y (n, out) = x (n, in) W^T. */
static void gemm_fwd(const float *x, int n, int in, const float *w, int out, float *y) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

/* dW (out, in) = dy^T (out, n) x (n, in). */
static void gemm_dw(const float *dy, int n, int out, const float *x, int in, float *dw) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 0.0f, dw, in);
}

/* dx (n, in) = dy (n, out) W (out, in). */
static void gemm_dx(const float *dy, int n, int out, const float *w, int in, float *dx) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in);
}

/* A multi-threaded training step splits the batch rows over OpenMP threads, each calling
 * single-threaded OpenBLAS on its slice: OpenBLAS's own pool would compete with them for the
 * cores, and these GEMMs are too small to split well inside. Returns the OpenBLAS thread count
 * to restore afterwards, or 0 when nothing was changed. */
static int blas_enter(int nt) {
    int t = nt > 1 ? openblas_get_num_threads() : 1;
    if (t == 1) return 0;
    openblas_set_num_threads(1);
    return t;
}

static void blas_leave(int t) {
    if (t > 0) openblas_set_num_threads(t);
}

/* ---- training forward / backward ------------------------------------------------------ */
/* One OpenMP region per step. Thread t owns batch rows [r0, r1) of every (n, .) buffer and
 * writes its gradient contributions to its own (P) buffer (thread 0: m->grad); they are summed
 * at the end. Cross-row quantities (BatchNorm statistics and their backward sums, the value
 * loss's A e) are reduced through per-thread partials after a barrier; each thread then sums
 * the partials in the same order, so all threads see identical totals. */

typedef struct {
    int t, nt, r0, r1, n;
    float *g;    /* (P) this thread's gradient contributions */
    int red;     /* reductions done so far (selects the partials' double buffer) */
} slice_t;

/* Makes the workspace hold n rows, nt threads and a loss scratch of tmp floats; -1 on no memory. */
static int ws_reserve(ae_model *m, int n, int nt, size_t tmp) {
    size_t D = (size_t)m->cfg.in_dim, H = (size_t)m->cfg.hidden, R = (size_t)m->cfg.latent, w2 = m->w2;
    if (n <= m->cap && nt <= m->cap_nt && tmp <= m->cap_tmp) return 0;
    int cap = n > m->cap ? n : m->cap, cnt = nt > m->cap_nt ? nt : m->cap_nt;
    if (tmp < m->cap_tmp) tmp = m->cap_tmp;
    size_t c = (size_t)cap, floats = (2 * R + D + 5 * H) * c + tmp + (size_t)(cnt - 1) * m->n_par;
    size_t doubles = 3 * (size_t)cnt * w2 + 2 * (size_t)cnt;
    double *dws = kvc_malloc_array(doubles, sizeof(double));
    float *ws = kvc_malloc_array(floats, sizeof(float));
    if (!ws || !dws) {
        free(ws), free(dws);
        return -1;
    }
    free(m->ws), free(m->dws);
    m->ws = ws, m->dws = dws;
    m->cap = cap, m->cap_nt = cnt, m->cap_tmp = tmp;
    float *p = ws;
    m->z = p, p += c * R;
    m->dz = p, p += c * R;
    m->y = p, p += c * D;
    m->dhid = p, p += c * H;
    m->enc.pre = p, p += c * H;
    m->enc.u = p, p += c * H;
    m->dec.pre = p, p += c * H;
    m->dec.u = p, p += c * H;
    m->tmp = p, p += tmp;
    m->gpart = p;
    m->part = dws;                         /* [2][nt][w2] double-buffered partials */
    m->comb = dws + 2 * (size_t)cnt * w2;  /* [nt][w2] each thread's totals */
    m->lossacc = m->comb + (size_t)cnt * w2; /* [nt][2] sse and attention term */
    return 0;
}

/* This thread's slot for its partial of the next reduction (up to 2 max(H, D) doubles).
 * Consecutive reductions alternate between two sets of slots, so a thread that runs ahead
 * cannot overwrite partials another thread is still summing. */
static double *part_slot(ae_model *m, const slice_t *s) {
    return m->part + ((size_t)(s->red & 1) * s->nt + s->t) * m->w2;
}

/* Barrier, then this thread's totals of the w partials written through part_slot. */
static double *part_reduce(ae_model *m, slice_t *s, int w) {
    size_t w2 = m->w2;
    const double *base = m->part + (size_t)(s->red & 1) * s->nt * w2;
    double *tot = m->comb + (size_t)s->t * w2;
    s->red++;
#pragma omp barrier
    for (int j = 0; j < w; j++) tot[j] = 0;
    for (int k = 0; k < s->nt; k++)
        for (int j = 0; j < w; j++) tot[j] += base[(size_t)k * w2 + j];
    return tot;
}

/* Hidden block of a half in training mode on this thread's rows. On entry hf->pre holds
 * x W0^T (no bias); on exit xhat (BN) or the pre-activation, and hf->u the activation. With
 * BN, thread 0 records rstd for the backward and updates the running statistics. */
static void hidden_fwd_train(ae_model *m, half_t *hf, slice_t *s) {
    const ae_config *c = &m->cfg;
    int H = hf->hid, bn = c->norm == AE_NORM_BATCH, rows = s->r1 - s->r0, n = s->n;
    const float *p = m->par;
    float *pre = hf->pre + (size_t)s->r0 * H, *u = hf->u + (size_t)s->r0 * H;
    const double *tot = NULL;
    if (bn) { /* column sums and sums of squares of x W0^T over the whole batch */
        double *part = part_slot(m, s);
        for (int j = 0; j < 2 * H; j++) part[j] = 0;
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < H; j++) {
                float h = pre[(size_t)i * H + j];
                part[j] += h, part[H + j] += (double)h * h;
            }
        tot = part_reduce(m, s, 2 * H);
    }
    float mom = c->bn_momentum;
    for (int j0 = 0; j0 < H; j0 += CB) {
        int w = H - j0 < CB ? H - j0 : CB;
        float sh[CB], k[CB], g[CB], b[CB];
        for (int j = 0; j < w; j++) {
            if (!bn) {
                sh[j] = -p[hf->b0 + j0 + j], k[j] = g[j] = 1.0f, b[j] = 0.0f;
                continue;
            }
            double mean = tot[j0 + j] / n, var = tot[H + j0 + j] / n - mean * mean;
            if (var < 0) var = 0;
            sh[j] = (float)mean;
            k[j] = (float)(1.0 / sqrt(var + c->bn_eps));
            g[j] = p[hf->g + j0 + j];
            b[j] = p[hf->be + j0 + j];
            if (s->t == 0) {
                /* The bias only shifts the mean: it enters the running mean but cancels from
                 * the normalised output. */
                float *rm = m->state + hf->rm + j0 + j, *rv = m->state + hf->rv + j0 + j;
                hf->rstd[j0 + j] = k[j];
                *rm = (1 - mom) * *rm + mom * (float)(mean + p[hf->b0 + j0 + j]);
                *rv = (1 - mom) * *rv + mom * (float)(var * n / (n - 1));
            }
        }
        act_fwd_block(pre + j0, u + j0, (size_t)H, rows, w, sh, k, g, b, c->act, c->leaky_slope);
    }
}

/* Backward through the hidden block on this thread's rows: d holds dL/du on entry and
 * dL/d(x W0^T + b0) on exit. Writes this thread's share of the gradients of b0 and of the
 * BatchNorm gamma and beta. With BN the b0 gradient is exactly 0 (the batch mean removes any
 * column shift); it is written as 0, not as rounding noise that Adam's normalisation would
 * turn into full-size random steps. */
static void hidden_bwd(ae_model *m, half_t *hf, float *d, slice_t *s) {
    const ae_config *c = &m->cfg;
    int H = hf->hid, bn = c->norm == AE_NORM_BATCH, rows = s->r1 - s->r0, n = s->n;
    const float *p = m->par, *xh = hf->pre + (size_t)s->r0 * H;
    d += (size_t)s->r0 * H;
    double *part = part_slot(m, s);
    for (int j = 0; j < 2 * H; j++) part[j] = 0;
    for (int j0 = 0; j0 < H; j0 += CB) {
        int w = H - j0 < CB ? H - j0 : CB;
        float g[CB], b[CB];
        for (int j = 0; j < w; j++) g[j] = bn ? p[hf->g + j0 + j] : 1.0f, b[j] = bn ? p[hf->be + j0 + j] : 0.0f;
        act_bwd_block(d + j0, xh + j0, (size_t)H, rows, w, g, b, part + j0, part + H + j0, c->act, c->leaky_slope);
    }
    if (!bn) {
        for (int j = 0; j < H; j++) s->g[hf->b0 + j] = (float)part[j];
        return;
    }
    for (int j = 0; j < H; j++) {
        s->g[hf->be + j] = (float)part[j];
        s->g[hf->g + j] = (float)part[H + j];
        s->g[hf->b0 + j] = 0.0f;
    }
    const double *tot = part_reduce(m, s, 2 * H);
    /* dh = g rstd (d - mean(d) - xhat mean(d xhat)) = a d - k1 - k2 xhat */
    for (int j0 = 0; j0 < H; j0 += CB) {
        int w = H - j0 < CB ? H - j0 : CB;
        float a[CB], k1[CB], k2[CB];
        for (int j = 0; j < w; j++) {
            a[j] = p[hf->g + j0 + j] * hf->rstd[j0 + j];
            k1[j] = a[j] * (float)(tot[j0 + j] / n);
            k2[j] = a[j] * (float)(tot[H + j0 + j] / n);
        }
        for (int i = 0; i < rows; i++) {
            float *di = d + (size_t)i * H + j0;
            const float *xi = xh + (size_t)i * H + j0;
            for (int j = 0; j < w; j++) di[j] = a[j] * di[j] - k1[j] - k2[j] * xi[j];
        }
    }
}

/* Forward of one half on this thread's rows from x (n, in) into out (n, out), without the
 * output bias (the caller adds it in its next pass over out). */
static void half_fwd_train(ae_model *m, half_t *hf, const float *x, slice_t *s, float *out) {
    const float *p = m->par;
    int rows = s->r1 - s->r0;
    x += (size_t)s->r0 * hf->in;
    out += (size_t)s->r0 * hf->out;
    if (!hf->hid) {
        gemm_fwd(x, rows, hf->in, p + hf->w0, hf->out, out);
        return;
    }
    gemm_fwd(x, rows, hf->in, p + hf->w0, hf->hid, hf->pre + (size_t)s->r0 * hf->hid);
    hidden_fwd_train(m, hf, s);
    gemm_fwd(hf->u + (size_t)s->r0 * hf->hid, rows, hf->hid, p + hf->w1, hf->out, out);
}

/* Backward of one half on this thread's rows: dout (n, out) is dL/d(output) (its bias
 * gradient already written); adds the weight gradients to the thread's buffer and, if dx is
 * non-NULL, writes dL/dx (n, in). */
static void half_bwd(ae_model *m, half_t *hf, const float *x, const float *dout, slice_t *s, float *dx) {
    const float *p = m->par;
    int rows = s->r1 - s->r0, H = hf->hid;
    x += (size_t)s->r0 * hf->in;
    dout += (size_t)s->r0 * hf->out;
    if (dx) dx += (size_t)s->r0 * hf->in;
    if (!H) {
        gemm_dw(dout, rows, hf->out, x, hf->in, s->g + hf->w0);
        if (dx) gemm_dx(dout, rows, hf->out, p + hf->w0, hf->in, dx);
        return;
    }
    float *dh = m->dhid + (size_t)s->r0 * H;
    gemm_dw(dout, rows, hf->out, hf->u + (size_t)s->r0 * H, H, s->g + hf->w1);
    gemm_dx(dout, rows, hf->out, p + hf->w1, H, dh);
    hidden_bwd(m, hf, m->dhid, s);
    gemm_dw(dh, rows, H, x, hf->in, s->g + hf->w0);
    if (dx) gemm_dx(dh, rows, H, p + hf->w0, hf->in, dx);
}

/* Output bias of a half (b1, or b0 without hidden layer). */
static size_t half_out_bias(const half_t *hf) { return hf->hid ? hf->b1 : hf->b0; }

/* Adds the decoder's output bias to this thread's rows of y, evaluates their share of the
 * loss (into m->lossacc) and overwrites them with dL/dy; writes the output bias gradient. */
static void loss_fwd_bwd(ae_model *m, const float *x, const ae_loss *L, slice_t *s) {
    int D = m->cfg.in_dim, kind = L->kind, rows = s->r1 - s->r0, n = s->n;
    const float *bo = m->par + half_out_bias(&m->dec);
    float *y = m->y + (size_t)s->r0 * D, *gbo = s->g + half_out_bias(&m->dec);
    double sse = 0, q = 0, nd = (double)n * D;
    float mix = kind == AE_LOSS_MSE ? 1.0f : L->mse_mix, cm = (float)(2.0 * mix / nd), ck = (float)(2.0 / nd);
    x += (size_t)s->r0 * D;
    for (int i = 0; i < rows; i++) { /* y <- e = y + b - x, or dy = cm e for MSE */
        float *yi = y + (size_t)i * D, acc = 0;
        const float *xi = x + (size_t)i * D;
        for (int j = 0; j < D; j++) {
            float e = yi[j] + bo[j] - xi[j];
            acc += e * e;
            yi[j] = kind == AE_LOSS_MSE ? cm * e : e;
        }
        sse += acc;
    }
    if (kind == AE_LOSS_KEY_ATTN) { /* t = e W; L += sum e.t / (N D); dy = cm e + 2 t / (N D) */
        float *t = m->tmp + (size_t)s->r0 * D;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, D, 1.0f, y, D, L->w, D, 0.0f, t, D);
        for (int i = 0; i < rows; i++) {
            float *yi = y + (size_t)i * D, acc = 0;
            const float *ti = t + (size_t)i * D;
            for (int j = 0; j < D; j++) acc += yi[j] * ti[j], yi[j] = cm * yi[j] + ck * ti[j];
            q += acc;
        }
        q /= nd;
    } else if (kind == AE_LOSS_VALUE_ATTN) { /* S = A e (M, D) = sum of per-thread parts; dy = cm e + 2 A^T S / (M D) */
        int M = L->m;
        float *S = m->tmp, *St = S + (size_t)s->t * M * D;
        const float *At = L->a + s->r0;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, D, rows, 1.0f, At, n, y, D, 0.0f, St, D);
#pragma omp barrier
        if (s->t == 0)
            for (size_t k = 0; k < (size_t)M * D; k++) {
                float v = 0;
                for (int u = 0; u < s->nt; u++) v += S[(size_t)u * M * D + k];
                q += (double)v * v;
            }
        q /= (double)M * D;
        for (size_t k = 0; k < (size_t)rows * D; k++) y[k] *= cm;
        for (int u = 0; u < s->nt; u++)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, D, M, (float)(2.0 / ((double)M * D)), At, n,
                        S + (size_t)u * M * D, D, 1.0f, y, D);
    }
    col_sums(y, rows, D, gbo);
    m->lossacc[2 * s->t] = sse;
    m->lossacc[2 * s->t + 1] = q;
}

/* One thread's part of a training step (forward, loss, backward) on its rows. */
static void step_slice(ae_model *m, const float *x, const ae_loss *L, slice_t *s) {
    int R = m->cfg.latent, rows = s->r1 - s->r0, bn = m->cfg.hidden && m->cfg.norm == AE_NORM_BATCH;
    half_fwd_train(m, &m->enc, x, s, m->z);
    bias_act(m->z + (size_t)s->r0 * R, rows, R, m->par + half_out_bias(&m->enc), KVC_ACT_NONE, 0);
    half_fwd_train(m, &m->dec, m->z, s, m->y);
    loss_fwd_bwd(m, x, L, s);

    half_bwd(m, &m->dec, m->z, m->y, s, m->dz);
    /* The latent bias shifts every column of the decoder's BatchNorm input alike, so with
     * BatchNorm its gradient is exactly 0 (see hidden_bwd). */
    float *gb = s->g + half_out_bias(&m->enc);
    if (bn) memset(gb, 0, (size_t)R * sizeof *gb);
    else col_sums(m->dz + (size_t)s->r0 * R, rows, R, gb);
    half_bwd(m, &m->enc, x, m->dz, s, NULL);
}

float kvc_ae_forward_backward(ae_model *m, const float *x, int n, const ae_loss *L) {
    const ae_config *c = &m->cfg;
    int D = c->in_dim, bn = c->hidden && c->norm == AE_NORM_BATCH;
    if (!x || !L || n < (bn ? 2 : 1)) return NAN;
    if (L->kind == AE_LOSS_KEY_ATTN && !L->w) return NAN;
    if (L->kind == AE_LOSS_VALUE_ATTN && (!L->a || L->m < 1)) return NAN;
    int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (nt > n / ROWS_MIN) nt = n / ROWS_MIN > 1 ? n / ROWS_MIN : 1;
    size_t tmp = L->kind == AE_LOSS_MSE ? 0 : L->kind == AE_LOSS_KEY_ATTN ? (size_t)n * D : (size_t)nt * L->m * D;
    if (ws_reserve(m, n, nt, tmp)) return NAN;
    int blas = blas_enter(nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), k = omp_get_num_threads();
        slice_t s = {.t = t, .nt = k, .n = n, .r0 = (int)((int64_t)n * t / k), .r1 = (int)((int64_t)n * (t + 1) / k),
                     .g = t ? m->gpart + (size_t)(t - 1) * m->n_par : m->grad};
        step_slice(m, x, L, &s);
        if (k > 1) { /* sum the threads' gradients, each thread a slice of P */
#pragma omp barrier
            size_t p0 = m->n_par * t / k, p1 = m->n_par * (t + 1) / k;
            for (int u = 1; u < k; u++) {
                const float *gu = m->gpart + (size_t)(u - 1) * m->n_par;
                for (size_t i = p0; i < p1; i++) m->grad[i] += gu[i];
            }
        }
        if (t == 0) m->used_nt = k;
    }
    blas_leave(blas);

    double sse = 0, q = 0, nd = (double)n * D, mix = L->kind == AE_LOSS_MSE ? 1.0 : L->mse_mix;
    for (int t = 0; t < m->used_nt; t++) sse += m->lossacc[2 * t], q += m->lossacc[2 * t + 1];
    double g2 = 0;
    for (size_t k = 0; k < m->n_par; k++) g2 += (double)m->grad[k] * m->grad[k];
    m->gnorm = (float)sqrt(g2);
    return isnan(sse) ? NAN : (float)(mix * sse / nd + q);
}

float kvc_ae_grad_norm(const ae_model *m) { return m->gnorm; }

/* ---- optimiser ------------------------------------------------------------------------ */

void kvc_ae_adam_defaults(ae_adam *o) {
    *o = (ae_adam){.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 1e-4f, .clip = 1.0f};
}

void kvc_ae_adam_step(ae_model *m, const ae_adam *o) {
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

float kvc_ae_lr_schedule(int64_t t, int64_t total, int64_t warmup, float base, float min_lr) {
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
    kvc_dense_rows(x, n, in, w, b, out, act, slope, y);
}

/* Inference through one half on a block of n <= AE_CHUNK rows; hbuf holds (n, hid). */
static void half_infer(const ae_model *m, const half_t *hf, const float *x, int n, float *hbuf, float *out) {
    const ae_config *c = &m->cfg;
    const float *p = m->par;
    if (!hf->hid) {
        dense_run(x, n, hf->in, p + hf->w0, p + hf->b0, hf->out, KVC_ACT_NONE, 0, out);
        return;
    }
    int H = hf->hid;
    if (c->norm != AE_NORM_BATCH) {
        dense_run(x, n, hf->in, p + hf->w0, p + hf->b0, H, c->act, c->leaky_slope, hbuf);
    } else {
        dense_run(x, n, hf->in, p + hf->w0, p + hf->b0, H, KVC_ACT_NONE, 0, hbuf);
        for (int j0 = 0; j0 < H; j0 += CB) {
            int w = H - j0 < CB ? H - j0 : CB;
            float k[CB];
            for (int j = 0; j < w; j++) k[j] = 1.0f / sqrtf(m->state[hf->rv + j0 + j] + c->bn_eps);
            act_fwd_block(hbuf + j0, hbuf + j0, (size_t)H, n, w, m->state + hf->rm + j0, k, p + hf->g + j0,
                          p + hf->be + j0, c->act, c->leaky_slope);
        }
    }
    dense_run(hbuf, n, H, p + hf->w1, p + hf->b1, hf->out, KVC_ACT_NONE, 0, out);
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

void kvc_ae_encode(const ae_model *m, const float *x, int n, float *z) {
    if (n > 0 && z) ae_infer(m, x, n, 1, 0, z, NULL);
}

void kvc_ae_decode(const ae_model *m, const float *z, int n, float *y) {
    if (n > 0 && y) ae_infer(m, z, n, 0, 1, NULL, y);
}

double kvc_ae_rel_error(const ae_model *m, const float *x, int n) {
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

int kvc_ae_export_folded(const ae_model *m, ae_export *out, kvc_err *err) {
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
            bad = dense_from(&d[0], p + hf->w0, p + hf->b0, hf->out, hf->in, KVC_ACT_NONE, NULL, NULL, NULL, NULL, 0);
        } else {
            int bn = c->norm == AE_NORM_BATCH;
            *nl = 2;
            bad = dense_from(&d[0], p + hf->w0, p + hf->b0, hf->hid, hf->in, c->act, bn ? m->state + hf->rm : NULL,
                             bn ? m->state + hf->rv : NULL, bn ? p + hf->g : NULL, bn ? p + hf->be : NULL, c->bn_eps);
            bad = bad || dense_from(&d[1], p + hf->w1, p + hf->b1, hf->out, hf->hid, KVC_ACT_NONE, NULL, NULL, NULL,
                                    NULL, 0);
        }
        if (bad) {
            kvc_ae_export_free(out);
            return kvc_fail(err, "out of memory exporting the autoencoder");
        }
    }
    return 0;
}
