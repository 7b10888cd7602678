/* tc_quant.c - the transform codec's scalar quantizers and bit allocation: Lloyd-Max (or a
 * clipped uniform grid) fitted per component on sorted calibration coefficients for every
 * width 0-8, and the rate-distortion allocation that spends a bit budget where the weighted
 * distortion falls most (greedy on marginal gains, which is optimal for convex curves). */
#include "tc_fit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LLOYD_ITERS 40

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

void tc_sorted_init(tc_sorted *s, float *v, int64_t m) {
    qsort(v, (size_t)m, sizeof(float), cmp_float);
    s->v = v;
    s->m = m;
    s->p1 = malloc((size_t)(m + 1) * sizeof(double));
    s->p2 = malloc((size_t)(m + 1) * sizeof(double));
    if (!s->p1 || !s->p2) return;
    s->p1[0] = s->p2[0] = 0;
    for (int64_t i = 0; i < m; i++) {
        s->p1[i + 1] = s->p1[i] + v[i];
        s->p2[i + 1] = s->p2[i] + (double)v[i] * v[i];
    }
}

void tc_sorted_free(tc_sorted *s) {
    free(s->p1), free(s->p2);
    s->p1 = s->p2 = NULL;
}

/* Index of the first sorted value above t (values equal to t stay below, as the quantizer's
 * midpoint rounds down). */
static int64_t upper_bound(const float *v, int64_t m, float t) {
    int64_t lo = 0, hi = m;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (v[mid] > t) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* Mean squared error of quantizing the sorted values to levels c (L, ascending) by nearest
 * level with midpoints rounding down, from the prefix sums. */
static double levels_mse(const tc_sorted *s, const float *c, int L) {
    double d = 0;
    int64_t b0 = 0;
    for (int k = 0; k < L; k++) {
        int64_t b1 = k + 1 < L ? upper_bound(s->v, s->m, 0.5f * (c[k] + c[k + 1])) : s->m;
        if (b1 < b0) b1 = b0;
        const double n = (double)(b1 - b0), s1 = s->p1[b1] - s->p1[b0], s2 = s->p2[b1] - s->p2[b0];
        d += s2 - 2.0 * c[k] * s1 + n * (double)c[k] * c[k];
        b0 = b1;
    }
    return s->m > 0 ? d / (double)s->m : 0;
}

/* Lloyd-Max: levels at equal-mass quantiles, then alternate nearest-level cells and their
 * centroids until the levels stop moving. */
static void lloyd(const tc_sorted *s, int L, float *c) {
    const int64_t m = s->m;
    for (int k = 0; k < L; k++) c[k] = s->v[(int64_t)((2.0 * k + 1) * (double)m / (2.0 * L))];
    const double scale = m > 0 ? fabs(s->v[m - 1] - s->v[0]) + 1e-30 : 1;
    for (int it = 0; it < LLOYD_ITERS; it++) {
        double moved = 0;
        int64_t b0 = 0;
        for (int k = 0; k < L; k++) {
            int64_t b1 = k + 1 < L ? upper_bound(s->v, m, 0.5f * (c[k] + c[k + 1])) : m;
            if (b1 < b0) b1 = b0;
            if (b1 > b0) {
                float nc = (float)((s->p1[b1] - s->p1[b0]) / (double)(b1 - b0));
                moved = fmax(moved, fabs(nc - c[k]));
                c[k] = nc;
            }
            b0 = b1;
        }
        /* centroids of adjacent cells keep their order; equal levels are allowed */
        for (int k = 1; k < L; k++)
            if (c[k] < c[k - 1]) c[k] = c[k - 1];
        if (moved < 1e-7 * scale) break;
    }
}

/* Uniform levels on [mu - a sigma, mu + a sigma], a from a small grid, the one with the least
 * error kept. */
static void uniform(const tc_sorted *s, int L, float *c) {
    const double mean = s->m ? s->p1[s->m] / (double)s->m : 0;
    const double var = s->m ? fmax(s->p2[s->m] / (double)s->m - mean * mean, 0) : 0, sd = sqrt(var) + 1e-30;
    double best = INFINITY;
    float tmp[256];
    for (double a = 1.0; a <= 6.0; a += 0.25) {
        const double lo = mean - a * sd, step = 2 * a * sd / L;
        for (int k = 0; k < L; k++) tmp[k] = (float)(lo + (k + 0.5) * step);
        double d = levels_mse(s, tmp, L);
        if (d < best) {
            best = d;
            memcpy(c, tmp, (size_t)L * sizeof(float));
        }
    }
}

/* Entropy in bits of the nearest-level codes of the sorted values (cells as levels_mse). */
static double levels_entropy(const tc_sorted *s, const float *c, int L) {
    double h = 0;
    int64_t b0 = 0;
    for (int k = 0; k < L && s->m > 0; k++) {
        int64_t b1 = k + 1 < L ? upper_bound(s->v, s->m, 0.5f * (c[k] + c[k + 1])) : s->m;
        if (b1 < b0) b1 = b0;
        const double p = (double)(b1 - b0) / (double)s->m;
        if (p > 0) h -= p * log2(p);
        b0 = b1;
    }
    return h;
}

void tc_fit_widths(const tc_sorted *s, int lloyd_max, tc_widths *w) {
    /* 0 bits: decoded as 0 */
    w->mse[0] = s->m ? s->p2[s->m] / (double)s->m : 0;
    w->ent[0] = 0;
    int at = 0;
    for (int b = 1; b <= 8; b++) {
        const int L = 1 << b;
        w->off[b] = at;
        if (lloyd_max) lloyd(s, L, w->levels + at);
        else uniform(s, L, w->levels + at);
        w->mse[b] = levels_mse(s, w->levels + at, L);
        w->ent[b] = levels_entropy(s, w->levels + at, L);
        /* a wider codebook never does worse than a narrower one would (guards greedy order) */
        if (w->mse[b] > w->mse[b - 1]) w->mse[b] = w->mse[b - 1];
        at += L;
    }
}

void tc_allocate(const tc_widths *w, const double *weight, int dim, int64_t budget, uint8_t *bits, double *trace) {
    memset(bits, 0, (size_t)dim);
    double d = 0;
    for (int i = 0; i < dim; i++) d += weight[i] * w[i].mse[0];
    if (trace) trace[0] = d;
    for (int64_t spent = 0; spent < budget; spent++) {
        int best = -1;
        double gain = 0;
        for (int i = 0; i < dim; i++) {
            if (bits[i] >= 8) continue;
            double g = weight[i] * (w[i].mse[bits[i]] - w[i].mse[bits[i] + 1]);
            if (best < 0 || g > gain) best = i, gain = g;
        }
        if (best < 0) {
            if (trace)
                for (int64_t r = spent + 1; r <= budget; r++) trace[r] = d;
            break;
        }
        bits[best]++;
        d -= gain;
        if (trace) trace[spent + 1] = d;
    }
}
