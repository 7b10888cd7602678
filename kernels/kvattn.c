/* kvattn.c - CPU reference of the compressed cache's hot paths (kvc/kvattn.h): codec layers on
 * many rows, RoPE at gapped positions, attention of one KV head over exact or latent values,
 * and the eviction top-k. Letters as in kvattn.h. */
#include "kvc/kvattn.h"

#include <cblas.h>
#include <math.h>

#define DENSE_CHUNK 256 /* rows per GEMM, as kvc_ae_export_run blocks them */
#define ATTN_BLOCK 64   /* keys per block of the online softmax (float partial sums) */

/* ---- codec layers --------------------------------------------------------------------- */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_C 0.044715f

/* act(a) with the formulas of train/ae.c, so exported codecs give the same numbers. */
static inline float act_apply(float a, int act, float slope) {
    switch (act) {
    case AE_ACT_RELU: return a > 0 ? a : 0.0f * a; /* 0 * a keeps NaN */
    case AE_ACT_LEAKY_RELU: return a > 0 ? a : slope * a;
    case AE_ACT_GELU: return 0.5f * a * (1.0f + tanhf(GELU_K * (a + GELU_C * a * a * a)));
    case AE_ACT_SILU: return a / (1.0f + expf(-a));
    default: return a;
    }
}

void kvc_dense_rows_cpu(const float *x, int64_t n, int in, const float *w, const float *b, int out, int act, float slope,
                    float *y) {
    for (int64_t i0 = 0; i0 < n; i0 += DENSE_CHUNK) {
        int nb = (int)(n - i0 < DENSE_CHUNK ? n - i0 : DENSE_CHUNK);
        float *yb = y + i0 * out;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, out, in, 1.0f, x + i0 * in, in, w, in, 0.0f, yb,
                    out);
        for (int i = 0; i < nb; i++)
            for (int j = 0; j < out; j++) {
                float *v = yb + (size_t)i * out + j;
                *v = act_apply(b ? *v + b[j] : *v, act, slope);
            }
    }
}

/* ---- attention ------------------------------------------------------------------------ */

/* q . k over d floats in eight interleaved partial sums, which the compiler keeps in one
 * vector register (a strictly sequential sum cannot be vectorised without -ffast-math). */
static inline float dot_lanes(const float *a, const float *b, int d) {
    float acc[8] = {0}, tail = 0.0f;
    int e = 0;
    for (; e + 8 <= d; e += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[e + j] * b[e + j];
    for (; e < d; e++) tail += a[e] * b[e];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

/* One query row qr (D) at position qp over the keys: acc (vw) = sum_i a_i vals_i, the
 * softmax-weighted sum of value rows (vw wide, exact values or latents). Online softmax over
 * blocks of ATTN_BLOCK keys: each block's weighted sum is formed in float and added to a
 * double accumulator, so rounding does not grow with T. pr (T) or NULL receives the weights.
 * Returns the softmax denominator (0 when no key is visible; acc is then zero). */
static double attend_row(const float *qr, int32_t qp, int d, const float *k, const float *vals, int vw,
                         const int32_t *kpos, int64_t t, float *acc, float *pr) {
    const float scale = 1.0f / sqrtf((float)d);
    double sum[vw], l = 0.0;
    float part[vw], s[ATTN_BLOCK], m = -INFINITY;
    for (int c = 0; c < vw; c++) sum[c] = 0.0;
    for (int64_t b0 = 0; b0 < t; b0 += ATTN_BLOCK) {
        int nb = (int)(t - b0 < ATTN_BLOCK ? t - b0 : ATTN_BLOCK);
        float bm = -INFINITY;
        for (int j = 0; j < nb; j++) {
            s[j] = kpos[b0 + j] <= qp ? dot_lanes(qr, k + (b0 + j) * d, d) * scale : -INFINITY;
            bm = s[j] > bm ? s[j] : bm;
            if (pr) pr[b0 + j] = s[j];
        }
        if (bm == -INFINITY) continue; /* nothing visible in this block */
        if (bm > m) { /* a new maximum: rescale what was summed against the old one */
            double corr = m == -INFINITY ? 0.0 : exp((double)m - (double)bm);
            l *= corr;
            for (int c = 0; c < vw; c++) sum[c] *= corr;
            m = bm;
        }
        float ls = 0.0f;
        for (int c = 0; c < vw; c++) part[c] = 0.0f;
        for (int j = 0; j < nb; j++) {
            if (s[j] == -INFINITY) continue;
            float p = expf(s[j] - m);
            const float *vr = vals + (b0 + j) * vw;
            ls += p;
            for (int c = 0; c < vw; c++) part[c] += p * vr[c];
        }
        l += ls;
        for (int c = 0; c < vw; c++) sum[c] += part[c];
    }
    for (int c = 0; c < vw; c++) acc[c] = l > 0 ? (float)(sum[c] / l) : 0.0f;
    if (pr)
        for (int64_t i = 0; i < t; i++) pr[i] = l > 0 && pr[i] != -INFINITY ? (float)(exp((double)pr[i] - m) / l) : 0.0f;
    return l;
}

void kvc_attend_head_cpu(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *v,
                     const int32_t *kpos, int64_t t, float *out, float *probs) {
    int rows = n_q * g;
    /* rows are independent; threads only pay off when there is real work per row */
#pragma omp parallel for schedule(static) if (rows > 1 && t * d >= 16384)
    for (int r = 0; r < rows; r++)
        attend_row(q + (size_t)r * d, qpos[r / g], d, k, v, d, kpos, t, out + (size_t)r * d,
                   probs ? probs + (size_t)r * t : NULL);
}

void kvc_attend_latent_cpu(const float *q, const int32_t *qpos, int n_q, int g, int d, const float *k, const float *z,
                       int r, const float *w, const float *b, const int32_t *kpos, int64_t t, float *out,
                       float *probs) {
    int rows = n_q * g;
#pragma omp parallel for schedule(static) if (rows > 1 && t * d >= 16384)
    for (int row = 0; row < rows; row++) {
        float zs[r];
        float *o = out + (size_t)row * d;
        double l = attend_row(q + (size_t)row * d, qpos[row / g], d, k, z, r, kpos, t, zs,
                              probs ? probs + (size_t)row * t : NULL);
        for (int e = 0; e < d; e++) { /* lift: W zs + b, the decoder applied once per query */
            const float *wr = w + (size_t)e * r;
            float acc = 0.0f;
            for (int c = 0; c < r; c++) acc += wr[c] * zs[c];
            o[e] = l > 0 ? acc + (b ? b[e] : 0.0f) : 0.0f;
        }
    }
}

/* ---- eviction top-k ------------------------------------------------------------------- */

/* 1 when token a should be evicted before token b: higher score, ties the older. */
static inline int ranks_before(const float *score, int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
}

/* Restores the heap below slot i of h (cnt entries), whose root is the entry ranked last. */
static void sift_down(const float *score, int64_t *h, int64_t cnt, int64_t i) {
    for (;;) {
        int64_t c = 2 * i + 1, worst = i;
        if (c < cnt && ranks_before(score, h[worst], h[c])) worst = c;
        if (c + 1 < cnt && ranks_before(score, h[worst], h[c + 1])) worst = c + 1;
        if (worst == i) return;
        int64_t tmp = h[i];
        h[i] = h[worst], h[worst] = tmp;
        i = worst;
    }
}

int64_t kvc_topk_unprotected_cpu(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx) {
    int64_t lo = sinks < 0 ? 0 : sinks, hi = n - (window < 0 ? 0 : window), cnt = 0;
    if (kk <= 0 || hi <= lo) return 0;
    /* a heap of the best kk so far, kept in idx itself, with the weakest at the root:
     * O(n log kk) and no allocation */
    for (int64_t i = lo; i < hi; i++) {
        if (cnt < kk) {
            int64_t c = cnt++;
            idx[c] = i;
            while (c > 0 && ranks_before(score, idx[(c - 1) / 2], idx[c])) {
                int64_t p = (c - 1) / 2, tmp = idx[p];
                idx[p] = idx[c], idx[c] = tmp;
                c = p;
            }
        } else if (ranks_before(score, i, idx[0])) {
            idx[0] = i;
            sift_down(score, idx, cnt, 0);
        }
    }
    /* heap sort: the weakest goes to the back each time, leaving the best first */
    for (int64_t e = cnt - 1; e > 0; e--) {
        int64_t tmp = idx[0];
        idx[0] = idx[e], idx[e] = tmp;
        sift_down(score, idx, e, 0);
    }
    return cnt;
}
