/* ae_cuda.cu - the autoencoder training step of train/ae.c on the GPU: cuBLAS SGEMM (pedantic
 * f32, no TF32) for the Linear layers, plain kernels for bias, BatchNorm1d, activations, the
 * three losses, the gradient norm and AdamW. The CPU trainer is the reference it is tested
 * against (tests/test_ae_cuda.c). Letters as in ae.h: N rows, D input, H hidden, R latent,
 * M queries; P all trainable floats, S all running-stat floats; a stage's Linear maps
 * I (its `in`) to O (its `out`). Row-major throughout. */
#include "kvc/ae_cuda.h"
#include "kvc/ops_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Error checks: CUDA_CHECK, CUBLAS_CHECK, LAUNCH_CHECK (every function declares `err` and a
 * `fail:` label). */
#include "internal/cuda_check.h"
/* A failing helper has already filled err; just leave. */
#define TRY(call)                                                                                  \
    do {                                                                                           \
        if ((call) != 0) goto fail;                                                                \
    } while (0)

#define EW_THREADS 256  /* elementwise kernels */
#define RED_THREADS 256 /* every reduction kernel; block_sum needs a power of two */
#define RED_BLOCKS 256  /* partial sums of a grid-wide reduction */
#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_C 0.044715f

/* Slots of the device accumulator g->acc (double). */
enum { ACC_SSE = 0, ACC_ATTN, ACC_GRAD_SQ, ACC_COUNT };

/* ---- kernels -------------------------------------------------------------------- */

static __device__ __forceinline__ float act_f(float x, int act, float slope) {
    switch (act) {
    case KVC_ACT_RELU: return x > 0.0f ? x : 0.0f * x; /* NaN stays NaN */
    case KVC_ACT_LEAKY_RELU: return x > 0.0f ? x : slope * x;
    case KVC_ACT_GELU: return 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_C * x * x * x)));
    case KVC_ACT_SILU: return x / (1.0f + expf(-x));
    default: return x;
    }
}

/* The gradient d of act(x) taken back through the activation: d act'(x). relu and leaky_relu
 * take the x <= 0 branch at 0, as PyTorch does; relu passes exactly 0 there. */
static __device__ __forceinline__ float act_b(float d, float x, int act, float slope) {
    switch (act) {
    case KVC_ACT_RELU: return x > 0.0f ? d : 0.0f;
    case KVC_ACT_LEAKY_RELU: return d * (x > 0.0f ? 1.0f : slope);
    case KVC_ACT_GELU: {
        float t = tanhf(GELU_K * (x + GELU_C * x * x * x));
        return d * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * x * x));
    }
    case KVC_ACT_SILU: {
        float s = 1.0f / (1.0f + expf(-x));
        return d * (s * (1.0f + x * (1.0f - s)));
    }
    default: return d;
    }
}

/* Sum of v over the block, returned to every thread. red has blockDim.x slots, blockDim.x is
 * a power of two, and every thread of the block must call it (it synchronises). */
static __device__ double block_sum(double v, double *red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }
    double r = red[0];
    __syncthreads(); /* all have read red[0] before anyone reuses red */
    return r;
}

/* y (N, O) += b (O) broadcast over rows; n = N*O. */
static __global__ void bias_add_kernel(float *y, const float *b, int64_t n, int o) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] += b[i % o];
}

/* One block per column j of d (N, O): out[j] = sum_i d[i, j] (the bias gradient). */
static __global__ void __launch_bounds__(RED_THREADS) col_sum_kernel(const float *d, int n, int o, float *out) {
    __shared__ double red[RED_THREADS];
    int j = blockIdx.x;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += d[(int64_t)i * o + j];
    s = block_sum(s, red);
    if (threadIdx.x == 0) out[j] = (float)s;
}

/* out[i] = act(pre[i]) over n elements. */
static __global__ void act_forward_kernel(const float *pre, float *out, int64_t n, int act, float slope) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) out[i] = act_f(pre[i], act, slope);
}

/* d[i] = d[i] act'(pre[i]): the gradient through the activation, in place. */
static __global__ void act_backward_kernel(float *d, const float *pre, int64_t n, int act, float slope) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) d[i] = act_b(d[i], pre[i], act, slope);
}

/* BatchNorm1d training forward, one block per feature j of h (N, C): batch mean and biased
 * variance (two passes, double), xhat = (h - mean) / sqrt(var + eps), y = gamma xhat + beta;
 * keeps mean and 1/sqrt(var + eps) for the backward; running stats move by momentum, the
 * variance unbiased (N / (N - 1)), as PyTorch does. N >= 2. */
static __global__ void __launch_bounds__(RED_THREADS)
    bn_forward_kernel(const float *h, float *xhat, float *y, float *mean, float *invstd, const float *gamma,
                      const float *beta, float *running_mean, float *running_var, int n, int c, float eps,
                      float momentum) {
    __shared__ double red[RED_THREADS];
    int j = blockIdx.x;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += h[(int64_t)i * c + j];
    double mu = block_sum(s, red) / n;
    double q = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double dv = h[(int64_t)i * c + j] - mu;
        q += dv * dv;
    }
    double var = block_sum(q, red) / n;
    float muf = (float)mu, inv = (float)(1.0 / sqrt(var + eps)), gj = gamma[j], bj = beta[j];
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int64_t k = (int64_t)i * c + j;
        float xh = (h[k] - muf) * inv;
        xhat[k] = xh;
        y[k] = gj * xh + bj;
    }
    if (threadIdx.x == 0) {
        mean[j] = muf;
        invstd[j] = inv;
        running_mean[j] = (1.0f - momentum) * running_mean[j] + momentum * muf;
        running_var[j] = (1.0f - momentum) * running_var[j] + momentum * (float)(var * n / (n - 1));
    }
}

/* BatchNorm1d backward, one block per feature j, in place on d (N, C) (gradient of y in,
 * gradient of h out): dgamma = sum d xhat, dbeta = sum d,
 * dh = gamma invstd / N (N d - sum d - xhat sum d xhat). Each element is read and written by
 * one thread after both sums are complete. */
static __global__ void __launch_bounds__(RED_THREADS)
    bn_backward_kernel(float *d, const float *xhat, const float *gamma, const float *invstd, float *dgamma,
                       float *dbeta, int n, int c) {
    __shared__ double red[RED_THREADS];
    int j = blockIdx.x;
    double s1 = 0.0, s2 = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int64_t k = (int64_t)i * c + j;
        s1 += d[k];
        s2 += (double)d[k] * xhat[k];
    }
    s1 = block_sum(s1, red);
    s2 = block_sum(s2, red);
    float sd = (float)s1, sdx = (float)s2, scale = gamma[j] * invstd[j] / (float)n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int64_t k = (int64_t)i * c + j;
        d[k] = scale * ((float)n * d[k] - sd - xhat[k] * sdx);
    }
    if (threadIdx.x == 0) {
        dgamma[j] = sdx;
        dbeta[j] = sd;
    }
}

/* e = y - x over n elements. */
static __global__ void sub_kernel(float *e, const float *y, const float *x, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) e[i] = y[i] - x[i];
}

/* out = a x over n elements. */
static __global__ void scale_kernel(float *out, const float *x, float a, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i];
}

/* y += a x over n elements. */
static __global__ void axpy_kernel(float *y, const float *x, float a, int64_t n) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}

/* partial[blockIdx.x] = this block's share of sum a[i] b[i] (grid-stride, double). */
static __global__ void __launch_bounds__(RED_THREADS)
    dot_partial_kernel(const float *a, const float *b, int64_t n, double *partial) {
    __shared__ double red[RED_THREADS];
    double s = 0.0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)a[i] * b[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/* One block: *out = sum of partial[0..n). */
static __global__ void __launch_bounds__(RED_THREADS) sum_partials_kernel(const double *partial, int n, double *out) {
    __shared__ double red[RED_THREADS];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) *out = s;
}

/* AdamW on one tensor of n floats, in the operation order of torch.optim.AdamW (and of
 * kvc_ae_adam_step): the gradient is used times min(1, clip / (norm + 1e-6)), norm =
 * sqrt(*grad_sq) rounded to float (clip 0: off; g itself is left as it is); p *= decay, with
 * decay = 1 - lr wd for Linear weights and 1 otherwise; step = lr / (1 - beta1^t),
 * bc2s = sqrt(1 - beta2^t). */
static __global__ void adamw_kernel(float *p, const float *g, float *m, float *v, int64_t n, const double *grad_sq,
                                    float clip, float decay, float beta1, float beta2, float eps, float step,
                                    float bc2s) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float coef = 1.0f;
    if (clip > 0.0f) {
        double c = (double)clip / ((double)(float)sqrt(*grad_sq) + 1e-6);
        if (c < 1.0) coef = (float)c;
    }
    float gi = g[i] * coef, mi = m[i], vi = v[i], pi = p[i] * decay;
    mi += (1.0f - beta1) * (gi - mi);
    vi = vi * beta2 + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + -step * (mi / (sqrtf(vi) / bc2s + eps));
}

/* ---- the device model ----------------------------------------------------------- */

/* One tensor of kvc_ae_tensor_at, placed in the flat parameter (trainable) or state buffer. */
typedef struct {
    char name[64];
    int rows, cols, trainable;
    int64_t off, n;
    int decay; /* a Linear weight: AdamW weight decay applies */
} slot;

/* Linear(I, O) [-> BatchNorm(O)] [-> act]. Pointers aim into the ae_cuda buffers. */
typedef struct {
    int n_in, n_out;                      /* I, O */
    float *w, *b, *gw, *gb;               /* (O, I), (O); gradients alike */
    int bn;                               /* followed by BatchNorm(O) */
    float *gamma, *beta, *ggamma, *gbeta; /* (O) */
    float *rmean, *rvar;                  /* (O) running stats */
    float *mean, *invstd;                 /* (O) batch statistics of the last forward */
    kvc_act act;                           /* KVC_ACT_NONE: no activation */
    float *lin;                           /* (N, O) Linear output */
    float *xhat;                          /* (N, O) normalised (bn only) */
    float *pre;                           /* (N, O) activation input: BN output, or lin */
    float *out;                           /* (N, O) stage output: act(pre), or pre */
} stage;

struct ae_cuda {
    ae_config cfg;
    cublasHandle_t blas;
    int n_slots;
    slot *slots;             /* (n_slots), in kvc_ae_tensor_at order */
    int64_t n_param, n_state;
    float *p, *grad, *m, *v; /* (P) flat parameters, gradients, Adam moments */
    float *state;            /* (S) BatchNorm running stats */
    float *bn_stats;         /* (4, H) mean and invstd of the two BatchNorms */
    float *w_loss;           /* (D, D) KEY_ATTN weight */
    double *partial;         /* (RED_BLOCKS) */
    double *acc;             /* (ACC_COUNT) */
    int64_t steps;
    int n_stages;
    stage st[4];
    /* batch buffers, one allocation sized for cap_n rows and cap_m queries: */
    float *arena;
    int cap_n, cap_m;
    float *x;       /* (N, D) */
    float *e;       /* (N, D) y - x */
    float *attn;    /* (N, D) e W^T for KEY_ATTN, (M, D) A e for VALUE_ATTN */
    float *a;       /* (M, N) attention weights */
    float *d0, *d1; /* (N, max(D, H, R)) gradient scratch, ping-pong */
};

static unsigned blocks_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

/* Row-major C (m, n) = alpha op(A) op(B) + beta C, op(A) (m, k), op(B) (k, n); lda, ldb, ldc
 * are the row lengths as stored. cuBLAS is column-major, where a row-major matrix reads as its
 * transpose, so this computes C^T = op(B)^T op(A)^T with the operands swapped. */
static cublasStatus_t gemm_rm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c,
                              int ldc) {
    return cublasSgemm(h, tb, ta, n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc);
}

/* *out = sum a[i] b[i] over n floats, on the device (two kernels, deterministic). */
static int reduce_dot(ae_cuda *g, const float *a, const float *b, int64_t n, double *out, kvc_err *err) {
    unsigned blocks = blocks_for(n, RED_THREADS);
    if (blocks > RED_BLOCKS) blocks = RED_BLOCKS;
    if (blocks == 0) blocks = 1;
    dot_partial_kernel<<<blocks, RED_THREADS>>>(a, b, n, g->partial);
    LAUNCH_CHECK();
    sum_partials_kernel<<<1, RED_THREADS>>>(g->partial, (int)blocks, out);
    LAUNCH_CHECK();
    return 0;
fail:
    return -1;
}

static int64_t round_up(int64_t n) { return (n + 63) / 64 * 64; } /* 256-byte alignment of arena parts */

/* Lays the batch buffers out for n rows and m queries from base (NULL: only counts); returns
 * the floats needed. */
static int64_t arena_layout(ae_cuda *g, float *base, int n, int m) {
    const int D = g->cfg.in_dim, wide = D > g->cfg.hidden ? D : g->cfg.hidden;
    int64_t at = 0;
#define TAKE(ptr, count)                                                                           \
    do {                                                                                           \
        if (base) (ptr) = base + at;                                                               \
        at += round_up((int64_t)(count));                                                          \
    } while (0)
    TAKE(g->x, (int64_t)n * D);
    TAKE(g->e, (int64_t)n * D);
    TAKE(g->attn, (int64_t)(n > m ? n : m) * D);
    TAKE(g->a, (int64_t)m * n);
    TAKE(g->d0, (int64_t)n * wide);
    TAKE(g->d1, (int64_t)n * wide);
    for (int k = 0; k < g->n_stages; k++) {
        stage *s = &g->st[k];
        int64_t no = (int64_t)n * s->n_out;
        TAKE(s->lin, no);
        if (s->bn) {
            TAKE(s->xhat, no);
            TAKE(s->pre, no);
        } else if (base) {
            s->pre = s->lin;
        }
        if (s->act != KVC_ACT_NONE) TAKE(s->out, no);
        else if (base) s->out = s->pre;
    }
#undef TAKE
    return at;
}

/* Makes the batch buffers hold n rows and m queries, growing (never shrinking) them. */
static int ensure_batch(ae_cuda *g, int n, int m, kvc_err *err) {
    int cap_n = n > g->cap_n ? n : g->cap_n, cap_m = m > g->cap_m ? m : g->cap_m;
    int64_t floats;
    if (g->arena && cap_n == g->cap_n && cap_m == g->cap_m) return 0;
    floats = arena_layout(g, NULL, cap_n, cap_m);
    CUDA_CHECK(cudaFree(g->arena));
    g->arena = NULL;
    g->cap_n = g->cap_m = 0;
    CUDA_CHECK(cudaMalloc(&g->arena, (size_t)floats * sizeof(float)));
    arena_layout(g, g->arena, cap_n, cap_m);
    g->cap_n = cap_n;
    g->cap_m = cap_m;
    return 0;
fail:
    return -1;
}

/* ---- mapping kvc_ae_tensor_at names onto stages ------------------------------------- */

/* "enc.<i>.<field>" / "dec.<i>.<field>": half 0/1, index, field 0 weight, 1 bias,
 * 2 running_mean, 3 running_var; -1 if the name has another form. */
static int parse_name(const char *name, int *half, int *idx, int *field) {
    static const char *fields[4] = {"weight", "bias", "running_mean", "running_var"};
    char *end;
    if (strncmp(name, "enc.", 4) == 0) *half = 0;
    else if (strncmp(name, "dec.", 4) == 0) *half = 1;
    else return -1;
    long v = strtol(name + 4, &end, 10);
    if (end == name + 4 || *end != '.' || v < 0 || v > 1000) return -1;
    *idx = (int)v;
    for (int f = 0; f < 4; f++)
        if (strcmp(end + 1, fields[f]) == 0) {
            *field = f;
            return 0;
        }
    return -1;
}

/* Checks the names and shapes in g->slots against the config, gives each tensor its offset
 * in the flat parameter (trainable) or state buffer (counting P and S), and, when place is 1
 * (the buffers exist), points the stages at their tensors. In each half the BatchNorm is the
 * index with running stats; the Linear layers are the other indices, in ascending order, and
 * the BatchNorm sits between them. */
static int map_tensors(ae_cuda *g, int place, kvc_err *err) {
    const ae_config *c = &g->cfg;
    const int per_half = c->hidden > 0 ? 2 : 1, has_bn = c->hidden > 0 && c->norm == AE_NORM_BATCH;
    /* per half: input width, hidden width, output width */
    const int dims[2][3] = {{c->in_dim, c->hidden, c->latent}, {c->latent, c->hidden, c->in_dim}};
    int lin_idx[2][3], n_lin[2] = {0, 0}, bn_idx[2] = {-1, -1};
    int seen[4][2][4]; /* [stage][0 BatchNorm, 1 Linear][field] */
    memset(seen, 0, sizeof seen);
    g->n_param = g->n_state = 0;
    /* pass 1: the BatchNorm index of each half (the one with running stats) */
    for (int i = 0; i < g->n_slots; i++) {
        int half, idx, field;
        if (parse_name(g->slots[i].name, &half, &idx, &field))
            return kvc_fail(err, "ae_cuda: unexpected tensor name '%s'", g->slots[i].name);
        if (field < 2) continue;
        if (bn_idx[half] >= 0 && bn_idx[half] != idx)
            return kvc_fail(err, "ae_cuda: two BatchNorms in one half ('%s')", g->slots[i].name);
        bn_idx[half] = idx;
    }
    /* pass 2: the Linear indices, ascending */
    for (int i = 0; i < g->n_slots; i++) {
        int half, idx, field, known = 0;
        parse_name(g->slots[i].name, &half, &idx, &field);
        if (idx == bn_idx[half]) continue;
        for (int k = 0; k < n_lin[half]; k++) known |= lin_idx[half][k] == idx;
        if (known) continue;
        if (n_lin[half] == per_half)
            return kvc_fail(err, "ae_cuda: more layers than the config has (at '%s')", g->slots[i].name);
        lin_idx[half][n_lin[half]++] = idx;
    }
    for (int h = 0; h < 2; h++) {
        if (n_lin[h] == 2 && lin_idx[h][0] > lin_idx[h][1]) {
            int t = lin_idx[h][0];
            lin_idx[h][0] = lin_idx[h][1];
            lin_idx[h][1] = t;
        }
        if (n_lin[h] != per_half || (bn_idx[h] >= 0) != has_bn ||
            (has_bn && !(lin_idx[h][0] < bn_idx[h] && bn_idx[h] < lin_idx[h][1])))
            return kvc_fail(err, "ae_cuda: the model's %s layers do not match its config (%d Linear, BatchNorm %s)",
                            h ? "decoder" : "encoder", n_lin[h], bn_idx[h] >= 0 ? "present" : "absent");
    }
    /* pass 3: shapes, offsets, stage pointers */
    for (int i = 0; i < g->n_slots; i++) {
        slot *sl = &g->slots[i];
        int half, idx, field, layer = -1, rows, cols, k;
        parse_name(sl->name, &half, &idx, &field);
        for (int j = 0; j < per_half; j++)
            if (lin_idx[half][j] == idx) layer = j;
        k = half * per_half + (layer >= 0 ? layer : 0); /* the stage; a BatchNorm follows the first Linear */
        stage *s = &g->st[k];
        if (layer >= 0) { /* Linear(in, out): weight (out, in), bias (out) */
            if (field >= 2) return kvc_fail(err, "ae_cuda: running stats on a Linear layer ('%s')", sl->name);
            s->n_in = layer == 0 ? dims[half][0] : dims[half][1];
            s->n_out = per_half == 1 || layer == 1 ? dims[half][2] : dims[half][1];
            rows = s->n_out;
            cols = field == 0 ? s->n_in : 1;
        } else { /* BatchNorm(H): weight (gamma), bias (beta), running_mean, running_var */
            rows = c->hidden;
            cols = 1;
        }
        if (sl->rows != rows || sl->cols != cols)
            return kvc_fail(err, "ae_cuda: tensor '%s' is (%d, %d), expected (%d, %d)", sl->name, sl->rows, sl->cols,
                            rows, cols);
        if (!sl->trainable != (field >= 2))
            return kvc_fail(err, "ae_cuda: tensor '%s' has an unexpected trainable flag", sl->name);
        if (seen[k][layer >= 0][field]++) return kvc_fail(err, "ae_cuda: tensor '%s' appears twice", sl->name);
        sl->n = (int64_t)rows * cols;
        sl->decay = layer >= 0 && field == 0;
        int64_t *count = sl->trainable ? &g->n_param : &g->n_state;
        sl->off = *count;
        *count += sl->n;
        if (!place) continue;
        if (layer >= 0 && field == 0) { s->w = g->p + sl->off; s->gw = g->grad + sl->off; }
        else if (layer >= 0) { s->b = g->p + sl->off; s->gb = g->grad + sl->off; }
        else if (field == 0) { s->gamma = g->p + sl->off; s->ggamma = g->grad + sl->off; }
        else if (field == 1) { s->beta = g->p + sl->off; s->gbeta = g->grad + sl->off; }
        else if (field == 2) s->rmean = g->state + sl->off;
        else s->rvar = g->state + sl->off;
    }
    /* every stage got its Linear, and its BatchNorm when it has one */
    for (int k = 0; k < g->n_stages; k++) {
        for (int f = 0; f < 2; f++)
            if (!seen[k][1][f]) return kvc_fail(err, "ae_cuda: layer %d lacks its Linear %s", k, f ? "bias" : "weight");
        for (int f = 0; f < 4; f++)
            if (g->st[k].bn && !seen[k][0][f]) return kvc_fail(err, "ae_cuda: layer %d lacks a BatchNorm tensor", k);
    }
    return 0;
}

/* ---- public API ----------------------------------------------------------------- */

extern "C" int kvc_ae_cuda_available(char *why, size_t cap) { return kvc_cuda_device_info(why, cap); }

extern "C" void kvc_ae_cuda_free(ae_cuda *g) {
    if (!g) return;
    if (g->blas) cublasDestroy(g->blas);
    cudaFree(g->p); cudaFree(g->grad); cudaFree(g->m); cudaFree(g->v);
    cudaFree(g->state); cudaFree(g->bn_stats); cudaFree(g->w_loss);
    cudaFree(g->partial); cudaFree(g->acc); cudaFree(g->arena);
    free(g->slots);
    free(g);
}

/* Copies n floats from host src (zeros if src is NULL) to device dst. */
static int upload(float *dst, const float *src, int64_t n, kvc_err *err) {
    if (src) CUDA_CHECK(cudaMemcpy(dst, src, (size_t)n * sizeof(float), cudaMemcpyHostToDevice));
    else CUDA_CHECK(cudaMemset(dst, 0, (size_t)n * sizeof(float)));
    return 0;
fail:
    return -1;
}

extern "C" ae_cuda *kvc_ae_cuda_new(ae_model *init, kvc_err *err) {
    char why[256];
    ae_cuda *g = NULL;
    const ae_config *c;
    if (!init) {
        kvc_fail(err, "kvc_ae_cuda_new: no model given");
        return NULL;
    }
    if (!kvc_cuda_device_info(why, sizeof why)) {
        kvc_fail(err, "CUDA trainer unavailable: %s", why);
        return NULL;
    }
    c = kvc_ae_get_config(init);
    if (kvc_ae_config_check(c, err)) return NULL;
    g = (ae_cuda *)calloc(1, sizeof *g);
    if (!g) {
        kvc_fail(err, "kvc_ae_cuda_new: out of memory");
        return NULL;
    }
    g->cfg = *c;
    g->n_stages = c->hidden > 0 ? 4 : 2;
    for (int k = 0; k < g->n_stages; k++) {
        /* stages 0 and 2 are each half's first Linear of a hidden-layer model */
        int first = c->hidden > 0 && k % 2 == 0;
        g->st[k].bn = first && c->norm == AE_NORM_BATCH;
        g->st[k].act = first ? c->act : KVC_ACT_NONE;
    }
    g->n_slots = kvc_ae_n_tensors(init);
    g->slots = (slot *)calloc(g->n_slots > 0 ? (size_t)g->n_slots : 1, sizeof(slot));
    if (!g->slots) {
        kvc_fail(err, "kvc_ae_cuda_new: out of memory");
        goto fail;
    }
    for (int i = 0; i < g->n_slots; i++) {
        ae_tensor t = kvc_ae_tensor_at(init, i);
        if (!t.name || !t.data || strlen(t.name) >= sizeof g->slots[i].name) {
            kvc_fail(err, "kvc_ae_cuda_new: tensor %d has no usable name or data", i);
            goto fail;
        }
        strcpy(g->slots[i].name, t.name);
        g->slots[i].rows = t.rows;
        g->slots[i].cols = t.cols;
        g->slots[i].trainable = t.trainable;
    }
    TRY(map_tensors(g, 0, err));
    CUDA_CHECK(cudaMalloc(&g->p, (size_t)g->n_param * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&g->grad, (size_t)g->n_param * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&g->m, (size_t)g->n_param * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&g->v, (size_t)g->n_param * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&g->state, (size_t)(g->n_state > 0 ? g->n_state : 1) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&g->bn_stats, (size_t)(4 * (c->hidden > 0 ? c->hidden : 1)) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&g->w_loss, (size_t)c->in_dim * c->in_dim * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&g->partial, RED_BLOCKS * sizeof(double)));
    CUDA_CHECK(cudaMalloc(&g->acc, ACC_COUNT * sizeof(double)));
    CUDA_CHECK(cudaMemset(g->acc, 0, ACC_COUNT * sizeof(double)));
    TRY(map_tensors(g, 1, err));
    if (c->hidden > 0) {
        g->st[0].mean = g->bn_stats;
        g->st[0].invstd = g->bn_stats + c->hidden;
        g->st[2].mean = g->bn_stats + 2 * c->hidden;
        g->st[2].invstd = g->bn_stats + 3 * c->hidden;
    }
    for (int i = 0; i < g->n_slots; i++) {
        slot *sl = &g->slots[i];
        ae_tensor t = kvc_ae_tensor_at(init, i);
        if (!sl->trainable) {
            TRY(upload(g->state + sl->off, t.data, sl->n, err));
            continue;
        }
        TRY(upload(g->p + sl->off, t.data, sl->n, err));
        TRY(upload(g->grad + sl->off, kvc_ae_grad_at(init, i).data, sl->n, err));
        TRY(upload(g->m + sl->off, kvc_ae_adam_m_at(init, i).data, sl->n, err));
        TRY(upload(g->v + sl->off, kvc_ae_adam_v_at(init, i).data, sl->n, err));
    }
    g->steps = kvc_ae_adam_steps(init);
    CUBLAS_CHECK(cublasCreate(&g->blas));
    /* full f32 (no TF32, no reduced-precision reductions) so steps compare with the CPU */
    CUBLAS_CHECK(cublasSetMathMode(g->blas, CUBLAS_PEDANTIC_MATH));
    return g;
fail:
    kvc_ae_cuda_free(g);
    return NULL;
}

/* Training-mode forward of g->x (n, D) through every stage; y is the last stage's out. */
static int forward(ae_cuda *g, int n, kvc_err *err) {
    const float *in = g->x;
    for (int k = 0; k < g->n_stages; k++) {
        stage *s = &g->st[k];
        const int I = s->n_in, O = s->n_out;
        int64_t no = (int64_t)n * O;
        /* lin (N, O) = in (N, I) . W^T + b */
        CUBLAS_CHECK(gemm_rm(g->blas, CUBLAS_OP_N, CUBLAS_OP_T, n, O, I, 1.0f, in, I, s->w, I, 0.0f, s->lin, O));
        bias_add_kernel<<<blocks_for(no, EW_THREADS), EW_THREADS>>>(s->lin, s->b, no, O);
        LAUNCH_CHECK();
        if (s->bn) {
            bn_forward_kernel<<<s->n_out, RED_THREADS>>>(s->lin, s->xhat, s->pre, s->mean, s->invstd, s->gamma, s->beta,
                                                       s->rmean, s->rvar, n, s->n_out, g->cfg.bn_eps,
                                                       g->cfg.bn_momentum);
            LAUNCH_CHECK();
        }
        if (s->act != KVC_ACT_NONE) {
            act_forward_kernel<<<blocks_for(no, EW_THREADS), EW_THREADS>>>(s->pre, s->out, no, s->act,
                                                                           g->cfg.leaky_slope);
            LAUNCH_CHECK();
        }
        in = s->out;
    }
    return 0;
fail:
    return -1;
}

/* Loss terms into g->acc and dL/dy (N, D) into g->d0; see ae_loss in ae.h. mse_w weighs the
 * plain squared error (1 for MSE, mse_mix otherwise). */
static int loss_grad(ae_cuda *g, int n, const ae_loss *loss, float mse_w, kvc_err *err) {
    const int D = g->cfg.in_dim, M = loss->m;
    const int64_t nd = (int64_t)n * D;
    const float *y = g->st[g->n_stages - 1].out;
    sub_kernel<<<blocks_for(nd, EW_THREADS), EW_THREADS>>>(g->e, y, g->x, nd);
    LAUNCH_CHECK();
    TRY(reduce_dot(g, g->e, g->e, nd, g->acc + ACC_SSE, err));
    /* d0 = mse_w * 2 e / (N D) */
    scale_kernel<<<blocks_for(nd, EW_THREADS), EW_THREADS>>>(g->d0, g->e, 2.0f * mse_w / (float)nd, nd);
    LAUNCH_CHECK();
    if (loss->kind == AE_LOSS_KEY_ATTN) {
        /* attn (N, D) = e W, row i = W^T e_i; loss term sum e_i.W^T e_i = sum e_i^T W e_i;
         * gradient 2 W e_i (W symmetric, as ae.h requires) */
        CUBLAS_CHECK(
            gemm_rm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, D, D, 1.0f, g->e, D, g->w_loss, D, 0.0f, g->attn, D));
        TRY(reduce_dot(g, g->e, g->attn, nd, g->acc + ACC_ATTN, err));
        axpy_kernel<<<blocks_for(nd, EW_THREADS), EW_THREADS>>>(g->d0, g->attn, 2.0f / (float)nd, nd);
        LAUNCH_CHECK();
    } else if (loss->kind == AE_LOSS_VALUE_ATTN) {
        /* attn (M, D) = A (M, N) e (N, D); loss term |attn|^2; gradient 2 A^T attn / (M D) */
        const int64_t md = (int64_t)M * D;
        CUBLAS_CHECK(gemm_rm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, M, D, n, 1.0f, g->a, n, g->e, D, 0.0f, g->attn, D));
        TRY(reduce_dot(g, g->attn, g->attn, md, g->acc + ACC_ATTN, err));
        CUBLAS_CHECK(gemm_rm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, D, M, 2.0f / (float)md, g->a, n, g->attn, D, 1.0f,
                             g->d0, D));
    }
    return 0;
fail:
    return -1;
}

/* Backward from dL/dy in g->d0 through every stage into the parameter gradients. */
static int backward(ae_cuda *g, int n, kvc_err *err) {
    float *d = g->d0, *dn = g->d1; /* d: gradient of the current stage's out, (N, O) */
    for (int k = g->n_stages - 1; k >= 0; k--) {
        stage *s = &g->st[k];
        const float *in = k > 0 ? g->st[k - 1].out : g->x; /* (N, I) */
        const int I = s->n_in, O = s->n_out;
        int64_t no = (int64_t)n * O;
        if (s->act != KVC_ACT_NONE) {
            act_backward_kernel<<<blocks_for(no, EW_THREADS), EW_THREADS>>>(d, s->pre, no, s->act,
                                                                            g->cfg.leaky_slope);
            LAUNCH_CHECK();
        }
        if (s->bn) {
            bn_backward_kernel<<<O, RED_THREADS>>>(d, s->xhat, s->gamma, s->invstd, s->ggamma, s->gbeta, n, O);
            LAUNCH_CHECK();
        }
        /* gW (O, I) = d^T (O, N) . in (N, I); gb (O) = column sums of d. A bias that feeds a
         * BatchNorm (this stage's own, or the latent bias before the decoder's) shifts a whole
         * column the batch mean removes: its gradient is exactly 0, and is written as 0 as the
         * CPU reference does, not as rounding noise Adam would turn into full-size steps. */
        CUBLAS_CHECK(gemm_rm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, O, I, n, 1.0f, d, O, in, I, 0.0f, s->gw, I));
        if (s->bn || (k + 1 < g->n_stages && g->st[k + 1].bn)) {
            CUDA_CHECK(cudaMemset(s->gb, 0, (size_t)O * sizeof(float)));
        } else {
            col_sum_kernel<<<O, RED_THREADS>>>(d, n, O, s->gb);
            LAUNCH_CHECK();
        }
        if (k > 0) {
            /* gradient of in (N, I) = d (N, O) . W (O, I) */
            CUBLAS_CHECK(gemm_rm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, I, O, 1.0f, d, O, s->w, I, 0.0f, dn, I));
            float *t = d;
            d = dn;
            dn = t;
        }
    }
    return 0;
fail:
    return -1;
}

extern "C" float kvc_ae_cuda_forward_backward(ae_cuda *g, const float *x, int n, const ae_loss *loss, kvc_err *err) {
    double acc[ACC_COUNT], total;
    float mse_w;
    int m = 0, D;
    if (!g || !x || !loss) {
        kvc_fail(err, "kvc_ae_cuda_forward_backward: no %s", !g ? "trainer" : !x ? "input" : "loss");
        return NAN;
    }
    D = g->cfg.in_dim;
    if (n < 1 || (g->st[0].bn && n < 2)) {
        kvc_fail(err, "kvc_ae_cuda_forward_backward: batch of %d rows (BatchNorm needs at least 2)", n);
        return NAN;
    }
    if (loss->kind == AE_LOSS_KEY_ATTN && !loss->w) {
        kvc_fail(err, "kvc_ae_cuda_forward_backward: KEY_ATTN loss without its weight matrix");
        return NAN;
    }
    if (loss->kind == AE_LOSS_VALUE_ATTN) {
        if (!loss->a || loss->m < 1) {
            kvc_fail(err, "kvc_ae_cuda_forward_backward: VALUE_ATTN loss without attention weights");
            return NAN;
        }
        m = loss->m;
    } else if (loss->kind != AE_LOSS_MSE && loss->kind != AE_LOSS_KEY_ATTN) {
        kvc_fail(err, "kvc_ae_cuda_forward_backward: unknown loss kind %d", (int)loss->kind);
        return NAN;
    }
    mse_w = loss->kind == AE_LOSS_MSE ? 1.0f : loss->mse_mix;
    TRY(ensure_batch(g, n, m, err));
    CUDA_CHECK(cudaMemcpy(g->x, x, (size_t)n * D * sizeof(float), cudaMemcpyHostToDevice));
    if (loss->kind == AE_LOSS_KEY_ATTN)
        CUDA_CHECK(cudaMemcpy(g->w_loss, loss->w, (size_t)D * D * sizeof(float), cudaMemcpyHostToDevice));
    if (loss->kind == AE_LOSS_VALUE_ATTN)
        CUDA_CHECK(cudaMemcpy(g->a, loss->a, (size_t)m * n * sizeof(float), cudaMemcpyHostToDevice));
    TRY(forward(g, n, err));
    TRY(loss_grad(g, n, loss, mse_w, err));
    TRY(backward(g, n, err));
    TRY(reduce_dot(g, g->grad, g->grad, g->n_param, g->acc + ACC_GRAD_SQ, err));
    CUDA_CHECK(cudaMemcpy(acc, g->acc, sizeof acc, cudaMemcpyDeviceToHost));
    total = mse_w * acc[ACC_SSE] / ((double)n * D);
    if (loss->kind == AE_LOSS_KEY_ATTN) total += acc[ACC_ATTN] / ((double)n * D);
    if (loss->kind == AE_LOSS_VALUE_ATTN) total += acc[ACC_ATTN] / ((double)m * D);
    return (float)total;
fail:
    return NAN;
}

extern "C" float kvc_ae_cuda_grad_norm(ae_cuda *g, kvc_err *err) {
    double sq = 0.0;
    if (!g) {
        kvc_fail(err, "kvc_ae_cuda_grad_norm: no trainer");
        return NAN;
    }
    CUDA_CHECK(cudaMemcpy(&sq, g->acc + ACC_GRAD_SQ, sizeof sq, cudaMemcpyDeviceToHost));
    return (float)sqrt(sq);
fail:
    return NAN;
}

extern "C" int kvc_ae_cuda_adam_step(ae_cuda *g, const ae_adam *o, kvc_err *err) {
    double bc1, bc2;
    float step, bc2s, decay;
    if (!g || !o) return kvc_fail(err, "kvc_ae_cuda_adam_step: %s", g ? "no optimizer settings" : "no trainer");
    g->steps++;
    bc1 = 1.0 - pow((double)o->beta1, (double)g->steps);
    bc2 = 1.0 - pow((double)o->beta2, (double)g->steps);
    step = (float)(o->lr / bc1);
    bc2s = (float)sqrt(bc2);
    decay = 1.0f - o->lr * o->weight_decay;
    for (int i = 0; i < g->n_slots; i++) {
        const slot *sl = &g->slots[i];
        if (!sl->trainable) continue;
        adamw_kernel<<<blocks_for(sl->n, EW_THREADS), EW_THREADS>>>(
            g->p + sl->off, g->grad + sl->off, g->m + sl->off, g->v + sl->off, sl->n, g->acc + ACC_GRAD_SQ, o->clip,
            sl->decay ? decay : 1.0f, o->beta1, o->beta2, o->eps, step, bc2s);
        LAUNCH_CHECK();
    }
    return 0;
fail:
    return -1;
}

extern "C" int64_t kvc_ae_cuda_adam_steps(const ae_cuda *g) { return g ? g->steps : 0; }

/* Copies n floats from device src to host dst when dst is non-NULL. */
static int download(float *dst, const float *src, int64_t n, kvc_err *err) {
    if (dst) CUDA_CHECK(cudaMemcpy(dst, src, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost));
    return 0;
fail:
    return -1;
}

extern "C" int kvc_ae_cuda_download(ae_cuda *g, ae_model *dst, kvc_err *err) {
    if (!g || !dst) return kvc_fail(err, "kvc_ae_cuda_download: %s", g ? "no destination model" : "no trainer");
    if (kvc_ae_n_tensors(dst) != g->n_slots)
        return kvc_fail(err, "kvc_ae_cuda_download: destination has %d tensors, the trainer %d", kvc_ae_n_tensors(dst),
                        g->n_slots);
    for (int i = 0; i < g->n_slots; i++) {
        const slot *sl = &g->slots[i];
        ae_tensor t = kvc_ae_tensor_at(dst, i);
        if (!t.name || strcmp(t.name, sl->name) || t.rows != sl->rows || t.cols != sl->cols || !t.data)
            return kvc_fail(err, "kvc_ae_cuda_download: destination tensor %d ('%s') does not match '%s' (%d, %d)", i,
                            t.name ? t.name : "?", sl->name, sl->rows, sl->cols);
    }
    for (int i = 0; i < g->n_slots; i++) {
        const slot *sl = &g->slots[i];
        if (!sl->trainable) {
            TRY(download(kvc_ae_tensor_at(dst, i).data, g->state + sl->off, sl->n, err));
            continue;
        }
        TRY(download(kvc_ae_tensor_at(dst, i).data, g->p + sl->off, sl->n, err));
        TRY(download(kvc_ae_grad_at(dst, i).data, g->grad + sl->off, sl->n, err));
        TRY(download(kvc_ae_adam_m_at(dst, i).data, g->m + sl->off, sl->n, err));
        TRY(download(kvc_ae_adam_v_at(dst, i).data, g->v + sl->off, sl->n, err));
    }
    kvc_ae_set_adam_steps(dst, g->steps);
    return 0;
fail:
    return -1;
}

/* ---- single-kernel entry points for the tests ----------------------------------- */

extern "C" int kvc_ae_cuda_test_act(kvc_act act, float leaky_slope, const float *x, const float *dy, int64_t n, float *y,
                                float *dx, kvc_err *err) {
    float *dp = NULL, *dout = NULL, *dd = NULL;
    size_t bytes = (size_t)n * sizeof(float);
    if (n < 1 || (int)act < 0 || act >= KVC_ACT_COUNT) return kvc_fail(err, "kvc_ae_cuda_test_act: bad arguments");
    CUDA_CHECK(cudaMalloc(&dp, bytes));
    CUDA_CHECK(cudaMalloc(&dout, bytes));
    CUDA_CHECK(cudaMalloc(&dd, bytes));
    CUDA_CHECK(cudaMemcpy(dp, x, bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dd, dy, bytes, cudaMemcpyHostToDevice));
    act_forward_kernel<<<blocks_for(n, EW_THREADS), EW_THREADS>>>(dp, dout, n, act, leaky_slope);
    LAUNCH_CHECK();
    act_backward_kernel<<<blocks_for(n, EW_THREADS), EW_THREADS>>>(dd, dp, n, act, leaky_slope);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(y, dout, bytes, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(dx, dd, bytes, cudaMemcpyDeviceToHost));
    cudaFree(dp); cudaFree(dout); cudaFree(dd);
    return 0;
fail:
    cudaFree(dp); cudaFree(dout); cudaFree(dd);
    return -1;
}

extern "C" int kvc_ae_cuda_test_batchnorm(const float *h, const float *gamma, const float *beta, float *running_mean,
                                      float *running_var, int n, int c, float eps, float momentum, const float *dy,
                                      float *y, float *dh, float *dgamma, float *dbeta, kvc_err *err) {
    /* one allocation: h, xhat, y, d (n, c) then gamma, beta, rmean, rvar, mean, invstd, dgamma, dbeta (c) */
    float *buf = NULL;
    size_t nc = (size_t)n * c;
    if (n < 2 || c < 1) return kvc_fail(err, "kvc_ae_cuda_test_batchnorm: needs n >= 2 rows and c >= 1 features");
    CUDA_CHECK(cudaMalloc(&buf, (4 * nc + 8 * (size_t)c) * sizeof(float)));
    {
        float *dh_ = buf, *dxhat = buf + nc, *dy_ = buf + 2 * nc, *dd = buf + 3 * nc, *pc = buf + 4 * nc;
        float *dgam = pc, *dbet = pc + c, *drm = pc + 2 * c, *drv = pc + 3 * c, *dmean = pc + 4 * c,
              *dinv = pc + 5 * c, *dgg = pc + 6 * c, *dgb = pc + 7 * c;
        CUDA_CHECK(cudaMemcpy(dh_, h, nc * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(dd, dy, nc * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(dgam, gamma, c * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(dbet, beta, c * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(drm, running_mean, c * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(drv, running_var, c * sizeof(float), cudaMemcpyHostToDevice));
        bn_forward_kernel<<<c, RED_THREADS>>>(dh_, dxhat, dy_, dmean, dinv, dgam, dbet, drm, drv, n, c, eps, momentum);
        LAUNCH_CHECK();
        bn_backward_kernel<<<c, RED_THREADS>>>(dd, dxhat, dgam, dinv, dgg, dgb, n, c);
        LAUNCH_CHECK();
        CUDA_CHECK(cudaMemcpy(y, dy_, nc * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(dh, dd, nc * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(running_mean, drm, c * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(running_var, drv, c * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(dgamma, dgg, c * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(dbeta, dgb, c * sizeof(float), cudaMemcpyDeviceToHost));
    }
    cudaFree(buf);
    return 0;
fail:
    cudaFree(buf);
    return -1;
}
