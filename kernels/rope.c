/* rope.c - RoPE on adjacent pairs (the GGUF layout), the one implementation every cache, the
 * runtime's queries and the codec library call, so that two paths that rotate the same row
 * get the same bits on every x86-64 target (docs/portability.md says why that needs care).
 * Letters: N rows, D head_dim (even), P positions covered by a table. */
#include "kvc/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Angles as the runtime has always computed them: pos * base^(-2i/D) in float. */
static void fill_rows(kvc_rope_table *t, int64_t from, int64_t to) {
    const int d = t->d, half = d / 2;
    float inv[half > 0 ? half : 1];
    for (int i = 0; i < half; i++) inv[i] = powf(t->base, -2.0f * (float)i / (float)d);
    for (int64_t p = from; p < to; p++) {
        float *cc = t->cs + (size_t)p * 2 * d, *ss = cc + d;
        for (int i = 0; i < half; i++) {
            float th = (float)p * inv[i];
            float c = cosf(th), s = sinf(th);
            cc[2 * i] = c, cc[2 * i + 1] = c;
            ss[2 * i] = -s, ss[2 * i + 1] = s;
        }
    }
}

int kvc_rope_table_init(kvc_rope_table *t, int d, float base) {
    memset(t, 0, sizeof *t);
    if (d < 2 || d % 2 || !(base > 0.0f) || !isfinite(base)) return -1;
    t->d = d;
    t->base = base;
    return 0;
}

int kvc_rope_table_reserve(kvc_rope_table *t, int64_t n_pos) {
    if (n_pos <= t->n) return 0;
    int64_t cap = t->n ? t->n : 1024;
    while (cap < n_pos) cap *= 2;
    float *p = realloc(t->cs, (size_t)cap * 2 * (size_t)t->d * sizeof(float));
    if (!p) return -1;
    t->cs = p;
    fill_rows(t, t->n, cap);
    t->n = cap;
    return 0;
}

void kvc_rope_table_free(kvc_rope_table *t) {
    free(t->cs);
    memset(t, 0, sizeof *t);
}

/* Each output is x[j]*cos + x[j^1]*(-+sin): two products and one ADDITION in every lane, with
 * the sign carried by the table. Written as a*c - b*s (a subtraction in one lane and an
 * addition in the other), gcc 12's vectoriser fuses the pair into vfmaddsub even under
 * -ffp-contract=off, only in the vectorised part of the loop and only on some targets, which
 * is what made two RoPE loops disagree in the last bit. With additions only, no target can
 * fuse (contraction is off), so every vector width gives the unfused, textbook result. */
void kvc_rope_rows(const kvc_rope_table *t, const float *x, int64_t ldx, const int32_t *pos, int64_t n, float *y,
                   int64_t ldy) {
    const int d = t->d;
    for (int64_t r = 0; r < n; r++) {
        const float *cc = t->cs + (size_t)pos[r] * 2 * d, *ss = cc + d;
        const float *xr = x + r * ldx;
        float *yr = y + r * ldy;
        float tmp[d]; /* y may alias x: read the row whole first */
        memcpy(tmp, xr, (size_t)d * sizeof(float));
        for (int j = 0; j < d; j += 2) {
            yr[j] = tmp[j] * cc[j] + tmp[j + 1] * ss[j];
            yr[j + 1] = tmp[j + 1] * cc[j + 1] + tmp[j] * ss[j + 1];
        }
    }
}

void kvc_rope_heads(const kvc_rope_table *t, float *x, const int32_t *pos, int64_t n, int h) {
    const int64_t ld = (int64_t)h * t->d;
    for (int hh = 0; hh < h; hh++) kvc_rope_rows(t, x + (size_t)hh * t->d, ld, pos, n, x + (size_t)hh * t->d, ld);
}

int kvc_rope_apply(float *x, const int32_t *pos, int64_t n, int h, int d, float base) {
    kvc_rope_table t;
    if (kvc_rope_table_init(&t, d, base)) return -1;
    int32_t pmax = 0;
    for (int64_t i = 0; i < n; i++) {
        if (pos[i] < 0) return -1;
        pmax = pos[i] > pmax ? pos[i] : pmax;
    }
    if (kvc_rope_table_reserve(&t, (int64_t)pmax + 1)) return -1;
    kvc_rope_heads(&t, x, pos, n, h);
    kvc_rope_table_free(&t);
    return 0;
}
