/* attn_core.h - the one attention inner loop every CPU cache uses (full and compressed), so
 * that a compressed cache holding exact rows reproduces the full cache bit for bit.
 * Letters: T tokens, D head_dim. */
#ifndef KVC_ATTN_CORE_H
#define KVC_ATTN_CORE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* One query head over T tokens: keys k (T rows, ldk floats apart, after RoPE), values v
 * (T rows, ldv apart, or NULL to compute weights only), token positions kpos; token j is
 * visible when kpos[j] <= qpos. On return sc (T) holds the softmax weights (0 where not
 * visible) and o (D) the weighted value sum (zeros when nothing is visible). Returns the
 * sum of the weights (1, or 0 when nothing was visible). */
static inline float attn_core_one(const float *qh, const float *k, size_t ldk, const float *v, size_t ldv,
                                  const int32_t *kpos, int64_t T, int32_t qpos, int D, float scale, float *sc,
                                  float *o) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < T; j++) {
        if (kpos[j] > qpos) { sc[j] = -INFINITY; continue; }
        const float *kj = k + (size_t)j * ldk;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; d++) s += qh[d] * kj[d];
        s *= scale;
        sc[j] = s;
        mx = s > mx ? s : mx;
    }
    if (o) memset(o, 0, (size_t)D * sizeof(float));
    if (mx == -INFINITY) {
        for (int64_t j = 0; j < T; j++) sc[j] = 0.0f;
        return 0.0f;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < T; j++) {
        float e = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < T; j++) {
        if (sc[j] == 0.0f) continue;
        const float a = sc[j] * inv;
        sc[j] = a;
        if (!v || !o) continue;
        const float *vj = v + (size_t)j * ldv;
#pragma omp simd
        for (int d = 0; d < D; d++) o[d] += a * vj[d];
    }
    return 1.0f;
}

#endif
