/* attn_cuda.cu - CUDA twins of the kernels in kvc/kernels.h: codec layers (shared-memory tiled
 * GEMM plus activation; kernels/dense.c), RoPE from the same table (kernels/rope.c, bit for
 * bit), attention of one KV head split over key ranges with an online softmax merged across
 * splits (flash-decoding style; exact, latent or mixed values; kernels/attn.c), and the
 * eviction top-k by a bitonic sort of (score, index) keys (kernels/topk.c). Letters as in
 * kvc/kernels.h. */
#include "kvc/ops_cuda.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "internal/cuda_check.h"
#include "kvc/kernels.h"

#define DENSE_TILE 16     /* output tile side of the codec-layer GEMM */
#define ATTN_THREADS 128  /* threads of a split-attention block */
#define ATTN_SMEM_MAX (48 * 1024)
#define SORT_CHUNK 2048   /* keys one block sorts in shared memory (1024 threads, one pair each) */

static unsigned blocks_of(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

/* ---- codec layers --------------------------------------------------------------------- */

/* One DENSE_TILE x DENSE_TILE output tile per block: rows on x (any count), outputs on y.
 * W's tile is stored by output row with a pad column so the inner loop has no bank conflicts. */
__global__ void dense_rows_kernel(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act,
                                  float slope, float *y) {
    __shared__ float xs[DENSE_TILE][DENSE_TILE + 1], ws[DENSE_TILE][DENSE_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t row = blockIdx.x * (int64_t)DENSE_TILE + ty;
    const int col = blockIdx.y * DENSE_TILE + tx, wrow = blockIdx.y * DENSE_TILE + ty;
    float acc = 0.0f;
    for (int k0 = 0; k0 < in; k0 += DENSE_TILE) {
        xs[ty][tx] = row < n && k0 + tx < in ? x[row * in + k0 + tx] : 0.0f;
        ws[ty][tx] = wrow < out && k0 + tx < in ? w[(int64_t)wrow * in + k0 + tx] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < DENSE_TILE; kk++) acc += xs[ty][kk] * ws[tx][kk];
        __syncthreads();
    }
    if (row < n && col < out) y[row * out + col] = kvc_act_apply(b ? acc + b[col] : acc, act, slope);
}

extern "C" int kvc_dense_rows_dev(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act,
                              float slope, float *y, kvc_err *err) {
    if (n <= 0) return 0;
    if (blocks_of(out, DENSE_TILE) > 65535) return kvc_fail(err, "dense_rows: %d outputs is too wide", out);
    dim3 grid(blocks_of(n, DENSE_TILE), blocks_of(out, DENSE_TILE)), block(DENSE_TILE, DENSE_TILE);
    dense_rows_kernel<<<grid, block>>>(x, n, in, w, b, out, act, slope, y);
    LAUNCH_CHECK();
    return 0;
fail:
    return -1;
}

extern "C" int kvc_dense_rows_cuda(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act,
                               float slope, float *y, kvc_err *err) {
    float *dx = NULL, *dw = NULL, *db = NULL, *dy = NULL;
    if (n <= 0) return 0;
    CUDA_CHECK(cudaMalloc(&dx, (size_t)n * in * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dw, (size_t)out * in * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dy, (size_t)n * out * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(dx, x, (size_t)n * in * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dw, w, (size_t)out * in * sizeof(float), cudaMemcpyHostToDevice));
    if (b) {
        CUDA_CHECK(cudaMalloc(&db, (size_t)out * sizeof(float)));
        CUDA_CHECK(cudaMemcpy(db, b, (size_t)out * sizeof(float), cudaMemcpyHostToDevice));
    }
    if (kvc_dense_rows_dev(dx, n, in, dw, db, out, act, slope, dy, err)) goto fail;
    CUDA_CHECK(cudaMemcpy(y, dy, (size_t)n * out * sizeof(float), cudaMemcpyDeviceToHost));
    cudaFree(dx); cudaFree(dw); cudaFree(db); cudaFree(dy);
    return 0;
fail:
    cudaFree(dx); cudaFree(dw); cudaFree(db); cudaFree(dy);
    return -1;
}

/* ---- RoPE ----------------------------------------------------------------------------- */

/* One thread per (row, element), from the CPU's table (cs: per position D cosines then D
 * signed sines): y = x cos + x' (+-sin), each product and the sum rounded on its own, which is
 * what kernels/rope.c computes, so the two agree bit for bit. */
__global__ void rope_rows_kernel(const float *cs, const float *x, int64_t ldx, const int32_t *pos, int64_t n, int d,
                                 float *y, int64_t ldy) {
    int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (idx >= n * d) return;
    const int64_t t = idx / d;
    const int j = (int)(idx % d);
    const float *cc = cs + (size_t)pos[t] * 2 * d, *ss = cc + d, *xr = x + t * ldx;
    y[t * ldy + j] = __fadd_rn(__fmul_rn(xr[j], cc[j]), __fmul_rn(xr[j ^ 1], ss[j]));
}

extern "C" int kvc_rope_rows_dev(const float *cs, const float *x, int64_t ldx, const int32_t *pos, int64_t n, int d,
                                 float *y, int64_t ldy, kvc_err *err) {
    if (d < 2 || d % 2) return kvc_fail(err, "rope_rows: head_dim %d must be even", d);
    if (n <= 0) return 0;
    if (y == x) return kvc_fail(err, "rope_rows: the CUDA twin does not rotate in place");
    rope_rows_kernel<<<blocks_of(n * d, 256), 256>>>(cs, x, ldx, pos, n, d, y, ldy);
    LAUNCH_CHECK();
    return 0;
fail:
    return -1;
}

extern "C" int kvc_rope_rows_cuda(const kvc_rope_table *t, const float *x, int64_t ldx, const int32_t *pos, int64_t n,
                                  float *y, int64_t ldy, kvc_err *err) {
    float *dx = NULL, *dy = NULL, *dcs = NULL;
    int32_t *dp = NULL;
    const int d = t->d;
    if (n <= 0) return 0;
    size_t xcount = (size_t)((n - 1) * ldx + d), ycount = (size_t)((n - 1) * ldy + d);
    CUDA_CHECK(cudaMalloc(&dx, xcount * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dy, ycount * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dp, (size_t)n * sizeof(int32_t)));
    CUDA_CHECK(cudaMalloc(&dcs, (size_t)t->n * 2 * d * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(dx, x, xcount * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dy, y, ycount * sizeof(float), cudaMemcpyHostToDevice)); /* keep the gaps between rows */
    CUDA_CHECK(cudaMemcpy(dp, pos, (size_t)n * sizeof(int32_t), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dcs, t->cs, (size_t)t->n * 2 * d * sizeof(float), cudaMemcpyHostToDevice));
    if (kvc_rope_rows_dev(dcs, dx, ldx, dp, n, d, dy, ldy, err)) goto fail;
    CUDA_CHECK(cudaMemcpy(y, dy, ycount * sizeof(float), cudaMemcpyDeviceToHost));
    cudaFree(dx); cudaFree(dy); cudaFree(dp); cudaFree(dcs);
    return 0;
fail:
    cudaFree(dx); cudaFree(dy); cudaFree(dp); cudaFree(dcs);
    return -1;
}

/* ---- attention ------------------------------------------------------------------------ */

/* Block (query j, split s): the G heads of query j over keys [s*len, (s+1)*len), tk keys at a
 * time staged in shared memory (K rows padded to D+1 against bank conflicts). Per head it
 * keeps a running maximum m, denominator l and weighted sum acc (VW) and writes them to
 * part ((Q, S, G, VW+2): m, l, acc). raw (Q, G, T) or NULL receives the scaled scores
 * (-inf where not visible) for the weights pass. */
__global__ void attend_split_kernel(const float *q, const int32_t *qpos, int g, int d, const float *k,
                                    const float *vals, int vw, const int32_t *kpos, int64_t t, int64_t len, int tk,
                                    float *part, float *raw) {
    extern __shared__ float sm[];
    float *qs = sm, *ks = qs + g * d, *vs = ks + tk * (d + 1), *ss = vs + tk * vw, *acc = ss + g * tk;
    float *mm = acc + g * vw, *ll = mm + g, *cc = ll + g;
    const int qi = blockIdx.x, sp = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;
    const int64_t t0 = sp * len, t1 = t0 + len < t ? t0 + len : t;
    const int32_t qp = qpos[qi];
    const float scale = 1.0f / sqrtf((float)d);
    for (int e = tid; e < g * d; e += blockDim.x) qs[e] = q[(int64_t)qi * g * d + e];
    for (int e = tid; e < g * vw; e += blockDim.x) acc[e] = 0.0f;
    for (int e = tid; e < g; e += blockDim.x) mm[e] = -INFINITY, ll[e] = 0.0f;
    __syncthreads();
    for (int64_t b0 = t0; b0 < t1; b0 += tk) {
        const int nb = (int)(t1 - b0 < tk ? t1 - b0 : tk);
        for (int e = tid; e < nb * d; e += blockDim.x) ks[(e / d) * (d + 1) + e % d] = k[b0 * d + e];
        for (int e = tid; e < nb * vw; e += blockDim.x) vs[e] = vals[b0 * vw + e];
        __syncthreads();
        for (int p = tid; p < g * tk; p += blockDim.x) { /* scores, one (head, key) per thread */
            const int gg = p / tk, j = p % tk;
            float s = -INFINITY;
            if (j < nb && kpos[b0 + j] <= qp) {
                float dot = 0.0f;
                for (int e = 0; e < d; e++) dot += qs[gg * d + e] * ks[j * (d + 1) + e];
                s = dot * scale;
            }
            ss[p] = s;
            if (raw && j < nb) raw[((int64_t)qi * g + gg) * t + b0 + j] = s;
        }
        __syncthreads();
        for (int gg = warp; gg < g; gg += nwarps) { /* one warp per head: new max, weights, sum */
            float bm = -INFINITY, ls = 0.0f;
            for (int j = lane; j < nb; j += 32) bm = fmaxf(bm, ss[gg * tk + j]);
            for (int o = 16; o > 0; o >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, o));
            const float mold = mm[gg], mnew = fmaxf(mold, bm);
            for (int j = lane; j < tk; j += 32) {
                float s = ss[gg * tk + j], p = j < nb && s != -INFINITY ? expf(s - mnew) : 0.0f;
                ss[gg * tk + j] = p;
                ls += p;
            }
            for (int o = 16; o > 0; o >>= 1) ls += __shfl_xor_sync(0xffffffffu, ls, o);
            if (lane == 0) {
                float corr = mold == -INFINITY ? 0.0f : expf(mold - mnew); /* mnew finite when mold is */
                cc[gg] = corr;
                ll[gg] = ll[gg] * corr + ls;
                mm[gg] = mnew;
            }
        }
        __syncthreads();
        for (int e = tid; e < g * vw; e += blockDim.x) { /* acc = acc * corr + sum_j p_j v_j */
            const int gg = e / vw, c = e % vw;
            float a = acc[e] * cc[gg];
            for (int j = 0; j < nb; j++) a += ss[gg * tk + j] * vs[j * vw + c];
            acc[e] = a;
        }
        __syncthreads();
    }
    float *out = part + ((int64_t)qi * gridDim.y + sp) * g * (vw + 2);
    for (int e = tid; e < g * (vw + 2); e += blockDim.x) {
        const int gg = e / (vw + 2), c = e % (vw + 2);
        out[e] = c == 0 ? mm[gg] : c == 1 ? ll[gg] : acc[gg * vw + c - 2];
    }
}

/* Block per query row (j, head): merges the S splits' partial softmaxes into the weighted
 * value sum, lifted through W (D, VW) and b when w is non-NULL, into out (D). stats (2) per
 * row receives the global (max, denominator) for the weights pass. */
__global__ void attend_merge_kernel(const float *part, int n_split, int g, int vw, int d, const float *w,
                                    const float *b, float *out, float *stats) {
    extern __shared__ float zs[]; /* (VW) */
    const int64_t row = blockIdx.x, qi = row / g;
    const int gg = (int)(row % g);
    const size_t stride = (size_t)g * (vw + 2);
    const float *p0 = part + (size_t)qi * n_split * stride + (size_t)gg * (vw + 2);
    float m = -INFINITY, l = 0.0f;
    for (int s = 0; s < n_split; s++) m = fmaxf(m, p0[s * stride]);
    if (m != -INFINITY)
        for (int s = 0; s < n_split; s++)
            if (p0[s * stride] != -INFINITY) l += p0[s * stride + 1] * expf(p0[s * stride] - m);
    for (int c = threadIdx.x; c < vw; c += blockDim.x) {
        float a = 0.0f;
        if (l > 0)
            for (int s = 0; s < n_split; s++)
                if (p0[s * stride] != -INFINITY) a += p0[s * stride + 2 + c] * expf(p0[s * stride] - m);
        zs[c] = l > 0 ? a / l : 0.0f;
    }
    __syncthreads();
    float *o = out + row * d;
    if (!w) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = zs[c];
    } else {
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            float a = 0.0f;
            for (int c = 0; c < vw; c++) a += w[(size_t)e * vw + c] * zs[c];
            o[e] = l > 0 ? a + (b ? b[e] : 0.0f) : 0.0f;
        }
    }
    if (threadIdx.x == 0) stats[2 * row] = m, stats[2 * row + 1] = l;
}

/* Turns the raw scores (rows, T) into softmax weights in place with each row's (max, sum). */
__global__ void attend_probs_kernel(float *probs, const float *stats, int64_t rows, int64_t t) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= rows * t) return;
    const float m = stats[2 * (i / t)], l = stats[2 * (i / t) + 1], s = probs[i];
    probs[i] = l > 0 && s != -INFINITY ? expf(s - m) / l : 0.0f;
}

/* Shared floats of a split block for tk keys. */
static size_t attend_smem(int g, int d, int vw, int tk) {
    return sizeof(float) * ((size_t)g * d + (size_t)tk * (d + 1) + (size_t)tk * vw + (size_t)g * tk + (size_t)g * vw +
                            3 * (size_t)g);
}

/* Attention on device pointers, every array contiguous: q (Q, G, D), k (T, D), vals (T, VW)
 * lifted through w (D, VW) and b when w is given; out (Q, G, D), probs (Q, G, T) or NULL. */
extern "C" int kvc_attend_dev(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *vals,
                      int vw, const float *w, const float *b, const int32_t *kpos, int64_t t, float *out, float *probs,
                      kvc_err *err) {
    float *part = NULL, *stats = NULL;
    int tk = 32, dev = 0, sms = 0;
    if (n_q <= 0 || g <= 0) return 0;
    if (t <= 0) { /* nothing held: zero outputs, as the CPU gives */
        CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)n_q * g * d * sizeof(float), 0));
        return 0;
    }
    while (tk > 8 && attend_smem(g, d, vw, tk) > ATTN_SMEM_MAX) tk /= 2;
    if (attend_smem(g, d, vw, tk) > ATTN_SMEM_MAX || (size_t)vw * sizeof(float) > ATTN_SMEM_MAX)
        return kvc_fail(err, "attention: G=%d D=%d width %d needs more shared memory than a block has", g, d, vw);
    {
        /* enough (query, split) blocks to fill the device twice over; splits a whole number of
         * tiles long */
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        int64_t tiles = (t + tk - 1) / tk, want = (2 * (int64_t)sms + n_q - 1) / n_q;
        int64_t n_split = want < 1 ? 1 : want > tiles ? tiles : want;
        int64_t len = (tiles + n_split - 1) / n_split * tk;
        n_split = (t + len - 1) / len;
        const int64_t rows = (int64_t)n_q * g;
        CUDA_CHECK(cudaMallocAsync((void **)&part, (size_t)n_q * n_split * g * (vw + 2) * sizeof(float), 0));
        CUDA_CHECK(cudaMallocAsync((void **)&stats, (size_t)rows * 2 * sizeof(float), 0));
        attend_split_kernel<<<dim3((unsigned)n_q, (unsigned)n_split), ATTN_THREADS, attend_smem(g, d, vw, tk)>>>(
            q, qpos, g, d, k, vals, vw, kpos, t, len, tk, part, probs);
        LAUNCH_CHECK();
        attend_merge_kernel<<<(unsigned)rows, 64, (size_t)vw * sizeof(float)>>>(part, (int)n_split, g, vw, d, w, b,
                                                                                 out, stats);
        LAUNCH_CHECK();
        if (probs) {
            attend_probs_kernel<<<blocks_of(rows * t, 256), 256>>>(probs, stats, rows, t);
            LAUNCH_CHECK();
        }
    }
    CUDA_CHECK(cudaFreeAsync(part, 0));
    CUDA_CHECK(cudaFreeAsync(stats, 0));
    return 0;
fail:
    if (part) cudaFreeAsync(part, 0);
    if (stats) cudaFreeAsync(stats, 0);
    return -1;
}

/* Host-pointer form of attend_dev: copies in, runs, copies out. */
static int attend_host(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *vals,
                       int vw, const float *w, const float *b, const int32_t *kpos, int64_t t, float *out,
                       float *probs, kvc_err *err) {
    float *dq = NULL, *dk = NULL, *dv = NULL, *dw = NULL, *db = NULL, *dout = NULL, *dprobs = NULL;
    int32_t *dqp = NULL, *dkp = NULL;
    const size_t nq = (size_t)(n_q > 0 ? n_q : 0), nt = (size_t)(t > 0 ? t : 0), rows = nq * (size_t)(g > 0 ? g : 0);
    if (!rows) return 0;
    CUDA_CHECK(cudaMalloc(&dq, rows * d * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dqp, nq * sizeof(int32_t)));
    CUDA_CHECK(cudaMalloc(&dout, rows * d * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(dq, q, rows * d * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dqp, qpos, nq * sizeof(int32_t), cudaMemcpyHostToDevice));
    if (nt) {
        CUDA_CHECK(cudaMalloc(&dk, nt * d * sizeof(float)));
        CUDA_CHECK(cudaMalloc(&dv, nt * vw * sizeof(float)));
        CUDA_CHECK(cudaMalloc(&dkp, nt * sizeof(int32_t)));
        CUDA_CHECK(cudaMemcpy(dk, k, nt * d * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(dv, vals, nt * vw * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(dkp, kpos, nt * sizeof(int32_t), cudaMemcpyHostToDevice));
        if (probs) CUDA_CHECK(cudaMalloc(&dprobs, rows * nt * sizeof(float)));
    }
    if (w) {
        CUDA_CHECK(cudaMalloc(&dw, (size_t)d * vw * sizeof(float)));
        CUDA_CHECK(cudaMemcpy(dw, w, (size_t)d * vw * sizeof(float), cudaMemcpyHostToDevice));
        if (b) {
            CUDA_CHECK(cudaMalloc(&db, (size_t)d * sizeof(float)));
            CUDA_CHECK(cudaMemcpy(db, b, (size_t)d * sizeof(float), cudaMemcpyHostToDevice));
        }
    }
    if (kvc_attend_dev(dq, dqp, n_q, g, d, dk, dv, vw, dw, db, dkp, t, dout, dprobs, err)) goto fail;
    CUDA_CHECK(cudaMemcpy(out, dout, rows * d * sizeof(float), cudaMemcpyDeviceToHost));
    if (dprobs) CUDA_CHECK(cudaMemcpy(probs, dprobs, rows * nt * sizeof(float), cudaMemcpyDeviceToHost));
    cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dw); cudaFree(db); cudaFree(dout); cudaFree(dprobs);
    cudaFree(dqp); cudaFree(dkp);
    return 0;
fail:
    cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dw); cudaFree(db); cudaFree(dout); cudaFree(dprobs);
    cudaFree(dqp); cudaFree(dkp);
    return -1;
}

/* The twin of kvc_attend on host pointers. Values go to the device as one (T, VW) matrix
 * lifted by W' (D, VW): exact rows alone as themselves (VW = D, no lift); latent rows alone as
 * z with the decoder (VW = R); a mix as [z, 0, 1] and [0, v, 0] rows with W' = [W | I | b]
 * (VW = R + D + 1), which is the same sum. */
extern "C" int kvc_attend_cuda(const float *q, int64_t ldq, const int32_t *qpos, int n_q, int g, int d,
                               const kvc_attn_kv *kv, float *out, int64_t ldo, float *probs, kvc_err *err) {
    const int64_t t = kv->t, ne = kv->ne;
    const int r = ne > 0 ? kv->r : 0;
    const int mixed = ne > 0 && ne < t, vw = mixed ? r + d + 1 : ne > 0 ? r : d;
    const size_t rows = (size_t)(n_q > 0 ? n_q : 0) * (size_t)(g > 0 ? g : 0);
    if (!rows) return 0;
    float *qc = (float *)malloc(rows * d * sizeof(float)), *oc = (float *)malloc(rows * d * sizeof(float));
    float *kc = (float *)malloc((size_t)(t > 0 ? t : 1) * d * sizeof(float));
    float *vals = (float *)calloc((size_t)(t > 0 ? t : 1) * vw, sizeof(float));
    float *wl = mixed ? (float *)calloc((size_t)d * vw, sizeof(float)) : NULL;
    int rc = -1;
    if (!qc || !oc || !kc || !vals || (mixed && !wl)) {
        kvc_fail(err, "out of memory staging attention for the device");
        goto done;
    }
    for (int i = 0; i < n_q; i++) memcpy(qc + (size_t)i * g * d, q + (size_t)i * ldq, (size_t)g * d * sizeof(float));
    for (int64_t j = 0; j < t; j++) {
        memcpy(kc + (size_t)j * d, kv->k + (size_t)j * kv->ldk, (size_t)d * sizeof(float));
        float *vr = vals + (size_t)j * vw;
        if (j < ne) {
            memcpy(vr, kv->z + (size_t)j * r, (size_t)r * sizeof(float));
            if (mixed) vr[r + d] = 1.0f;
        } else if (kv->v) {
            memcpy(vr + (mixed ? r : 0), kv->v + (size_t)(j - ne) * kv->ldv, (size_t)d * sizeof(float));
        }
    }
    if (mixed)
        for (int e = 0; e < d; e++) {
            memcpy(wl + (size_t)e * vw, kv->w + (size_t)e * r, (size_t)r * sizeof(float));
            wl[(size_t)e * vw + r + e] = 1.0f;
            wl[(size_t)e * vw + r + d] = kv->b ? kv->b[e] : 0.0f;
        }
    rc = attend_host(qc, qpos, n_q, g, d, kc, vals, vw, mixed ? wl : ne > 0 ? kv->w : NULL,
                     mixed ? NULL : ne > 0 ? kv->b : NULL, kv->pos, t, oc, probs, err);
    if (!rc)
        for (int i = 0; i < n_q; i++) memcpy(out + (size_t)i * ldo, oc + (size_t)i * g * d, (size_t)g * d * sizeof(float));
done:
    free(qc), free(oc), free(kc), free(vals), free(wl);
    return rc;
}

/* ---- eviction top-k ------------------------------------------------------------------- */

/* Keys that sort ascending in eviction order: the high word is the score's order-preserving
 * bit pattern inverted (higher score first; -0 folded onto +0 so they tie as on the CPU), the
 * low word the index (older first). Padding up to a power of two sorts last. */
__global__ void topk_keys_kernel(const float *score, int64_t lo, int64_t m, int64_t p2, uint64_t *keys) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= p2) return;
    if (i >= m) { keys[i] = ~0ull; return; }
    float s = score[lo + i];
    uint32_t u = __float_as_uint(s == 0.0f ? 0.0f : s);
    uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    keys[i] = ((uint64_t)~ord << 32) | (uint32_t)(lo + i);
}

/* Bitonic stages k in [k_from, k_to] for every distance j below the chunk, on one chunk per
 * block held in shared memory; direction comes from the global index, as in the global steps. */
__global__ void bitonic_block_kernel(uint64_t *keys, int chunk, int64_t k_from, int64_t k_to) {
    extern __shared__ uint64_t sk[];
    const int64_t base = blockIdx.x * (int64_t)chunk;
    for (int e = threadIdx.x; e < chunk; e += blockDim.x) sk[e] = keys[base + e];
    __syncthreads();
    for (int64_t k = k_from; k <= k_to; k <<= 1) {
        for (int64_t j = (k >> 1) < (chunk >> 1) ? (k >> 1) : (chunk >> 1); j > 0; j >>= 1) {
            const int p = threadIdx.x, i = (int)(2 * j * (p / j) + p % j), l = i + (int)j;
            const bool up = ((base + i) & k) == 0;
            uint64_t a = sk[i], c = sk[l];
            if ((a > c) == up) sk[i] = c, sk[l] = a;
            __syncthreads();
        }
    }
    for (int e = threadIdx.x; e < chunk; e += blockDim.x) keys[base + e] = sk[e];
}

/* One bitonic compare-exchange step (stage k, distance j >= the chunk) over all p2 keys. */
__global__ void bitonic_global_kernel(uint64_t *keys, int64_t p2, int64_t k, int64_t j) {
    int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (p >= p2 / 2) return;
    int64_t i = 2 * j * (p / j) + p % j, l = i + j;
    const bool up = (i & k) == 0;
    uint64_t a = keys[i], c = keys[l];
    if ((a > c) == up) keys[i] = c, keys[l] = a;
}

__global__ void topk_gather_kernel(const uint64_t *keys, int64_t cnt, int64_t *idx) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < cnt) idx[i] = (int64_t)(uint32_t)keys[i];
}

extern "C" int64_t kvc_topk_dev(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk,
                                        int64_t *idx, kvc_err *err) {
    uint64_t *keys = NULL;
    const int64_t lo = sinks < 0 ? 0 : sinks, hi = n - (window < 0 ? 0 : window), m = hi - lo;
    if (kk <= 0 || m <= 0) return 0;
    if (n > (int64_t)UINT32_MAX) return kvc_fail(err, "top-k: %lld scores is more than 2^32", (long long)n);
    const int64_t cnt = kk < m ? kk : m;
    int64_t p2 = 1;
    while (p2 < m) p2 <<= 1;
    const int chunk = (int)(p2 < SORT_CHUNK ? p2 : SORT_CHUNK);
    CUDA_CHECK(cudaMallocAsync((void **)&keys, (size_t)p2 * sizeof(uint64_t), 0));
    topk_keys_kernel<<<blocks_of(p2, 256), 256>>>(score, lo, m, p2, keys);
    LAUNCH_CHECK();
    if (p2 > 1) {
        const unsigned nb = (unsigned)(p2 / chunk), nt = (unsigned)(chunk / 2);
        const size_t sh = (size_t)chunk * sizeof(uint64_t);
        bitonic_block_kernel<<<nb, nt, sh>>>(keys, chunk, 2, chunk);
        LAUNCH_CHECK();
        for (int64_t k = 2 * (int64_t)chunk; k <= p2; k <<= 1) {
            for (int64_t j = k >> 1; j >= chunk; j >>= 1) {
                bitonic_global_kernel<<<blocks_of(p2 / 2, 256), 256>>>(keys, p2, k, j);
                LAUNCH_CHECK();
            }
            bitonic_block_kernel<<<nb, nt, sh>>>(keys, chunk, k, k);
            LAUNCH_CHECK();
        }
    }
    topk_gather_kernel<<<blocks_of(cnt, 256), 256>>>(keys, cnt, idx);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaFreeAsync(keys, 0));
    return cnt;
fail:
    if (keys) cudaFreeAsync(keys, 0);
    return -1;
}

extern "C" int64_t kvc_topk_cuda(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk,
                                         int64_t *idx, kvc_err *err) {
    float *ds = NULL;
    int64_t *di = NULL, cnt = 0;
    if (n <= 0 || kk <= 0) return 0;
    CUDA_CHECK(cudaMalloc(&ds, (size_t)n * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&di, (size_t)(kk < n ? kk : n) * sizeof(int64_t)));
    CUDA_CHECK(cudaMemcpy(ds, score, (size_t)n * sizeof(float), cudaMemcpyHostToDevice));
    cnt = kvc_topk_dev(ds, n, sinks, window, kk, di, err);
    if (cnt < 0) goto fail;
    if (cnt) CUDA_CHECK(cudaMemcpy(idx, di, (size_t)cnt * sizeof(int64_t), cudaMemcpyDeviceToHost));
    cudaFree(ds); cudaFree(di);
    return cnt;
fail:
    cudaFree(ds); cudaFree(di);
    return -1;
}
