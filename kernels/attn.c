/* attn.c - attention of one KV head over the rows a cache holds: the one compiled function the
 * full cache, the compressed cache (exact and latent values) and the codec library call, so
 * that a compressed cache holding exact rows reproduces the full cache bit for bit by
 * construction (docs/portability.md). kernels/cuda/attn_cuda.cu is its twin.
 * Letters as in kvc/kernels.h. */
#include "kvc/kernels.h"

#include <stdlib.h>
#include <string.h>

/* q . k over d floats in eight partial sums (lane j takes elements j, j+8, ...), combined in
 * a fixed order. The order is written out, so every target computes the same sum: vectorised
 * with 8 lanes, 4 lanes twice, or not at all (floating-point reassociation is never allowed
 * here; an `omp simd reduction` would let each call site pick its own number of lanes). */
float kvc_dot_f32(const float *a, const float *b, int d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int e = 0;
    for (; e + 8 <= d; e += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[e + j] * b[e + j];
    for (int j = 0; e < d; e++, j++) acc[j] += a[e] * b[e];
    float s = acc[0];
    for (int j = 1; j < 8; j++) s += acc[j];
    return s;
}

/* One query row qh (D) at position qpos: softmax weights into sc (T), the weighted values
 * into o (D). zs (R) is scratch for the latent sum. */
static void attend_row(const float *qh, int32_t qpos, int d, float scale, const kvc_attn_kv *kv, float *sc,
                       float *zs, float *o) {
    const int64_t t = kv->t, ne = kv->ne;
    float mx = -INFINITY;
    for (int64_t j = 0; j < t; j++) {
        if (kv->pos[j] > qpos) {
            sc[j] = -INFINITY;
            continue;
        }
        const float s = kvc_dot_f32(qh, kv->k + (size_t)j * kv->ldk, d) * scale;
        sc[j] = s;
        mx = s > mx ? s : mx;
    }
    if (o) memset(o, 0, (size_t)d * sizeof(float));
    if (mx == -INFINITY) { /* nothing visible */
        for (int64_t j = 0; j < t; j++) sc[j] = 0.0f;
        return;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < t; j++) {
        float e = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    const float inv = 1.0f / sum;
    float mass = 0.0f;
    if (ne > 0 && o) memset(zs, 0, (size_t)kv->r * sizeof(float));
    for (int64_t j = 0; j < t; j++) {
        if (sc[j] == 0.0f) continue;
        const float a = sc[j] * inv;
        sc[j] = a;
        if (!o) continue;
        if (j < ne) { /* latent row: weighted latent sum, lifted once below */
            const float *zj = kv->z + (size_t)j * kv->r;
            mass += a;
            for (int c = 0; c < kv->r; c++) zs[c] += a * zj[c];
        } else if (kv->v) {
            const float *vj = kv->v + (size_t)(j - ne) * kv->ldv;
            for (int e = 0; e < d; e++) o[e] += a * vj[e]; /* element-wise: exact at any width */
        }
    }
    if (ne > 0 && o && mass > 0.0f)
        for (int e = 0; e < d; e++) {
            const float *wr = kv->w + (size_t)e * kv->r;
            float acc = 0.0f;
            for (int c = 0; c < kv->r; c++) acc += wr[c] * zs[c];
            o[e] += acc + (kv->b ? kv->b[e] * mass : 0.0f);
        }
}

int kvc_attend(const float *q, int64_t ldq, const int32_t *qpos, int n_q, int g, int d, const kvc_attn_kv *kv,
               float *out, int64_t ldo, float *probs, float *sc) {
    const int64_t t = kv->t;
    const int r = kv->ne > 0 ? kv->r : 0;
    float *own = NULL;
    if (!sc) {
        own = kvc_malloc_array((size_t)(t + r + 1), sizeof(float));
        if (!own) return -1;
        sc = own;
    }
    const float scale = 1.0f / sqrtf((float)d);
    for (int i = 0; i < n_q; i++)
        for (int h = 0; h < g; h++) {
            float *o = out ? out + (size_t)i * ldo + (size_t)h * d : NULL;
            float *row = probs ? probs + ((size_t)i * g + h) * t : sc;
            attend_row(q + (size_t)i * ldq + (size_t)h * d, qpos[i], d, scale, kv, row, sc + t, o);
        }
    free(own);
    return 0;
}
