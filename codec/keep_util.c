/* keep_util.c - query-position runs, a ring of recent queries, and score pooling, shared by
 * the retention policies (codec/keep_util.h). */
#include "keep_util.h"

#include <stdlib.h>
#include <string.h>

int kvc_qruns_add(kvc_qruns *r, const int32_t *qpos, int n_q) {
    for (int i = 0; i < n_q; i++) {
        const int32_t p = qpos[i];
        int seen = 0;
        for (int j = r->n - 1; j >= 0 && !seen; j--) seen = p >= r->lo[j] && p <= r->hi[j];
        if (seen) continue; /* a query position counts once */
        if (r->n > 0 && p == r->hi[r->n - 1] + 1) {
            r->hi[r->n - 1] = p;
            continue;
        }
        if (r->n == r->cap) {
            int cap = r->cap ? r->cap * 2 : 4;
            int32_t *lo = realloc(r->lo, (size_t)cap * sizeof *lo);
            if (!lo) return -1;
            r->lo = lo;
            int32_t *hi = realloc(r->hi, (size_t)cap * sizeof *hi);
            if (!hi) return -1;
            r->hi = hi;
            r->cap = cap;
        }
        r->lo[r->n] = r->hi[r->n] = p;
        r->n++;
    }
    return 0;
}

int64_t kvc_qruns_count(const kvc_qruns *r, int32_t p) {
    int64_t c = 0;
    for (int i = 0; i < r->n; i++) {
        const int32_t lo = r->lo[i] > p ? r->lo[i] : p;
        if (r->hi[i] >= lo) c += (int64_t)r->hi[i] - lo + 1;
    }
    return c;
}

void kvc_qruns_free(kvc_qruns *r) {
    free(r->lo), free(r->hi);
    memset(r, 0, sizeof *r);
}

int kvc_ring_init(kvc_ring *r, int cap, int width) {
    memset(r, 0, sizeof *r);
    r->x = malloc((size_t)cap * width * sizeof *r->x);
    r->pos = malloc((size_t)cap * sizeof *r->pos);
    if (!r->x || !r->pos) {
        kvc_ring_free(r);
        return -1;
    }
    r->cap = cap, r->width = width;
    return 0;
}

void kvc_ring_free(kvc_ring *r) {
    free(r->x), free(r->pos);
    memset(r, 0, sizeof *r);
}

void kvc_ring_push(kvc_ring *r, const float *x, int32_t pos) {
    int slot;
    if (r->n < r->cap) slot = (r->head + r->n++) % r->cap;
    else slot = r->head, r->head = (r->head + 1) % r->cap;
    memcpy(r->x + (size_t)slot * r->width, x, (size_t)r->width * sizeof *r->x);
    r->pos[slot] = pos;
}

const float *kvc_ring_at(const kvc_ring *r, int i, int32_t *pos) {
    const int slot = (r->head + i) % r->cap;
    if (pos) *pos = r->pos[slot];
    return r->x + (size_t)slot * r->width;
}

void kvc_pool_scores(float *x, int64_t n, int k, int use_max, float *tmp) {
    if (k <= 1 || n <= 0) return;
    const int64_t h = k / 2;
    for (int64_t i = 0; i < n; i++) {
        const int64_t a = i - h < 0 ? 0 : i - h, b = i + h >= n ? n - 1 : i + h;
        float m = x[a], s = 0.0f;
        for (int64_t j = a; j <= b; j++) {
            m = x[j] > m ? x[j] : m;
            s += x[j];
        }
        tmp[i] = use_max ? m : s / (float)k;
    }
    memcpy(x, tmp, (size_t)n * sizeof *x);
}
