/* topk.c - the eviction top-k: which held tokens a retention policy removes. One function
 * for every cache and the codec library (kvc_kvcache_select marks its result);
 * kernels/cuda/attn_cuda.cu holds the twin. */
#include "kvc/kernels.h"

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

int64_t kvc_topk(const float *score, int64_t n, int64_t sinks, int64_t window, int64_t kk, int64_t *idx) {
    int64_t lo = sinks < 0 ? 0 : sinks, hi = n - (window < 0 ? 0 : window), cnt = 0;
    if (kk <= 0 || hi <= lo) return 0;
    /* a heap of the best kk so far, kept in idx itself, with the weakest at the root */
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
