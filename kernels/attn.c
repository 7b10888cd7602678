/* attn.c - attention of one query head over the rows a cache holds: the one compiled function
 * the full cache and the compressed cache both call, so that a compressed cache holding exact
 * rows reproduces the full cache bit for bit by construction (docs/portability.md).
 * Letters: T keys, D head_dim. */
#include "kvc/kernels.h"

#include <math.h>
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

float kvc_attn_row(const float *qh, const float *k, size_t ldk, const float *v, size_t ldv, const int32_t *kpos,
                   int64_t t, int32_t qpos, int d, float scale, float *sc, float *o) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < t; j++) {
        if (kpos[j] > qpos) {
            sc[j] = -INFINITY;
            continue;
        }
        const float s = kvc_dot_f32(qh, k + (size_t)j * ldk, d) * scale;
        sc[j] = s;
        mx = s > mx ? s : mx;
    }
    if (o) memset(o, 0, (size_t)d * sizeof(float));
    if (mx == -INFINITY) {
        for (int64_t j = 0; j < t; j++) sc[j] = 0.0f;
        return 0.0f;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < t; j++) {
        float e = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < t; j++) {
        if (sc[j] == 0.0f) continue;
        const float a = sc[j] * inv;
        sc[j] = a;
        if (!v || !o) continue;
        const float *vj = v + (size_t)j * ldv;
        for (int e = 0; e < d; e++) o[e] += a * vj[e]; /* element-wise: exact at any width */
    }
    return 1.0f;
}
