/* sidestore.c - the side store of evicted tokens that a cache retrieves back per query
 * (kvc/sidestore.h): KIVI-style int4/int8 rows, SimHash index, Hamming top-k with an optional
 * re-rank by the true logit, rows in RAM or in an unlinked spill file.
 * Letters: L layers, K kv heads, G query heads per kv head, D head_dim, M tokens of one head,
 * B index bits. Row layout: key codes, value codes, value scales, value minimums. */
#define _GNU_SOURCE
#include "kvc/sidestore.h"
#include "kvc/kvquant.h"
#include "kvc/lsh.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define VGROUP 32 /* values: channels per quantisation group */

/* The tokens of one (layer, kv head). */
typedef struct {
    int64_t n, cap;
    uint32_t *c32;        /* (cap) codes when B <= 32 */
    uint64_t *c64;        /* (cap) codes when B > 32 */
    int32_t *pos;         /* (cap) */
    uint8_t *rows;        /* (cap, row_bytes) when in RAM */
    int64_t nblk, bcap;
    int64_t *blk_first;   /* (bcap) first token of each key block, ascending */
    uint16_t *blk_scale;  /* (bcap, D) f16 per channel */
    uint16_t *blk_min;    /* (bcap, D) */
    int64_t nrun, rcap;   /* spill: runs of tokens written together */
    int64_t *run_first;   /* (rcap) first token of each run, ascending */
    int64_t *run_off;     /* (rcap) its byte offset in the file */
} side_head;

/* Scratch of one kv head's retrievals (kv heads run in parallel, layers in turn). */
typedef struct {
    int64_t cap;
    float *score;         /* (cap) -distance */
    int64_t *idx;         /* (cap) */
    float *kd, *kr;       /* (C, D) candidate keys before / after RoPE */
    float *logit;         /* (C) */
    int64_t *idx2;        /* (C) */
    int32_t *cpos;        /* (C) */
    uint8_t *row;         /* (row_bytes) one row read from the spill file */
} side_scratch;

struct kvc_side {
    kvc_keep_retrieval o;
    int L, K, G, D;
    size_t kcb, vcb, row_bytes;
    int vg;               /* value groups per row */
    kvc_simhash sh;
    side_head *hs;        /* (L * K) */
    side_scratch *sc;     /* (K) */
    int fd;               /* spill file, or -1 */
    int64_t file_off;     /* bytes written to it */
    int64_t retrieved;
};

/* ------------------------------------------------------------------ creation ------ */

kvc_side *kvc_side_new(int n_layer, int n_kv, int g, int d, const kvc_keep_retrieval *o, kvc_err *err) {
    if (n_layer < 1 || n_kv < 1 || g < 1 || d < VGROUP || d % VGROUP || d > 8 * VGROUP) {
        kvc_fail(err, "side store: head_dim %d must be a multiple of %d up to %d", d, VGROUP, 8 * VGROUP);
        return NULL;
    }
    if (o->r < 1 || o->r > KVC_RETRIEVE_MAX || o->bits < 8 || o->bits > 64 || (o->qbits != 4 && o->qbits != 8) ||
        o->rerank < 1) {
        kvc_fail(err, "side store: retrieve=%d (1..%d), rbits=%d (8..64), rstore=%d (4 or 8), rerank=%d (>= 1)", o->r,
                 KVC_RETRIEVE_MAX, o->bits, o->qbits, o->rerank);
        return NULL;
    }
    kvc_side *s = calloc(1, sizeof *s);
    if (!s) {
        kvc_fail(err, "out of memory");
        return NULL;
    }
    s->o = *o;
    s->L = n_layer, s->K = n_kv, s->G = g, s->D = d;
    s->fd = -1;
    s->kcb = kvc_kvq_code_bytes(o->qbits, d);
    s->vcb = s->kcb;
    s->vg = d / VGROUP;
    s->row_bytes = s->kcb + s->vcb + (size_t)s->vg * 2 * sizeof(uint16_t);
    s->hs = calloc((size_t)n_layer * n_kv, sizeof *s->hs);
    s->sc = calloc((size_t)n_kv, sizeof *s->sc);
    if (!s->hs || !s->sc) {
        kvc_side_free(s);
        kvc_fail(err, "out of memory");
        return NULL;
    }
    if (kvc_simhash_init(&s->sh, d, o->bits, 0x5eed51de, err)) {
        kvc_side_free(s);
        return NULL;
    }
    if (o->spill[0]) {
        char path[300];
        snprintf(path, sizeof path, "%s/kvcodec-side-XXXXXX", o->spill);
        s->fd = mkstemp(path);
        if (s->fd < 0) {
            kvc_fail(err, "side store: cannot create a spill file in '%s': %s", o->spill, strerror(errno));
            kvc_side_free(s);
            return NULL;
        }
        unlink(path); /* nothing outlives the cache, even after a crash */
    }
    return s;
}

void kvc_side_free(kvc_side *s) {
    if (!s) return;
    for (size_t i = 0; s->hs && i < (size_t)s->L * s->K; i++) {
        side_head *h = &s->hs[i];
        free(h->c32), free(h->c64), free(h->pos), free(h->rows);
        free(h->blk_first), free(h->blk_scale), free(h->blk_min), free(h->run_first), free(h->run_off);
    }
    for (int i = 0; s->sc && i < s->K; i++) {
        side_scratch *c = &s->sc[i];
        free(c->score), free(c->idx), free(c->kd), free(c->kr), free(c->logit), free(c->idx2), free(c->cpos);
        free(c->row);
    }
    if (s->fd >= 0) close(s->fd);
    kvc_simhash_free(&s->sh);
    free(s->hs), free(s->sc);
    free(s);
}

void kvc_side_reset(kvc_side *s) {
    for (size_t i = 0; i < (size_t)s->L * s->K; i++) s->hs[i].n = s->hs[i].nblk = s->hs[i].nrun = 0;
    if (s->fd >= 0 && ftruncate(s->fd, 0) != 0) { /* only space is lost: offsets restart at 0 */
    }
    s->file_off = 0;
    s->retrieved = 0;
}

/* --------------------------------------------------------------------- adding ------ */

/* Makes room for need key blocks in h. */
static int blocks_reserve(const kvc_side *s, side_head *h, int64_t need) {
    if (need <= h->bcap) return 0;
    int64_t c = h->bcap ? h->bcap : 16;
    while (c < need) c *= 2;
    int64_t *f = realloc(h->blk_first, (size_t)c * sizeof *f);
    if (!f) return -1;
    h->blk_first = f;
    uint16_t *a = realloc(h->blk_scale, (size_t)c * s->D * sizeof *a);
    if (!a) return -1;
    h->blk_scale = a;
    uint16_t *b = realloc(h->blk_min, (size_t)c * s->D * sizeof *b);
    if (!b) return -1;
    h->blk_min = b;
    h->bcap = c;
    return 0;
}

/* Makes room for need spill runs in h. */
static int runs_reserve(side_head *h, int64_t need) {
    if (need <= h->rcap) return 0;
    int64_t c = h->rcap ? h->rcap * 2 : 16;
    int64_t *f = realloc(h->run_first, (size_t)c * sizeof *f);
    if (!f) return -1;
    h->run_first = f;
    int64_t *o = realloc(h->run_off, (size_t)c * sizeof *o);
    if (!o) return -1;
    h->run_off = o;
    h->rcap = c;
    return 0;
}

/* Makes room for need tokens in h (every per-token array). */
static int head_reserve(const kvc_side *s, side_head *h, int64_t need) {
    if (need <= h->cap) return 0;
    int64_t c = h->cap ? h->cap : 64;
    while (c < need) c *= 2;
    void *a = s->o.bits <= 32 ? realloc(h->c32, (size_t)c * sizeof *h->c32) : realloc(h->c64, (size_t)c * sizeof *h->c64);
    if (!a) return -1;
    if (s->o.bits <= 32) h->c32 = a;
    else h->c64 = a;
    int32_t *p = realloc(h->pos, (size_t)c * sizeof *p);
    if (!p) return -1;
    h->pos = p;
    if (s->fd < 0) {
        uint8_t *r = realloc(h->rows, (size_t)c * s->row_bytes);
        if (!r) return -1;
        h->rows = r;
    }
    h->cap = c;
    return 0;
}

int kvc_side_add(kvc_side *s, int layer, int head, const float *k, const float *krot, const float *v,
                 const int32_t *pos, int n, kvc_err *err) {
    if (n <= 0) return 0;
    side_head *h = &s->hs[(size_t)layer * s->K + head];
    const int D = s->D, qb = s->o.qbits;
    const int64_t nblk = (n + KVC_SIDE_BLOCK - 1) / KVC_SIDE_BLOCK;
    if (head_reserve(s, h, h->n + n) || blocks_reserve(s, h, h->nblk + nblk) || (s->fd >= 0 && runs_reserve(h, h->nrun + 1)))
        return kvc_fail(err, "out of memory in the side store");
    uint8_t *rows = s->fd < 0 ? h->rows + (size_t)h->n * s->row_bytes : malloc((size_t)n * s->row_bytes);
    uint8_t *kc = malloc((size_t)KVC_SIDE_BLOCK * s->kcb);
    uint64_t *codes = malloc((size_t)n * sizeof *codes);
    if (!rows || !kc || !codes) {
        if (s->fd >= 0) free(rows);
        free(kc), free(codes);
        return kvc_fail(err, "out of memory in the side store");
    }
    /* keys: per channel over blocks of up to 32 of these tokens */
    for (int b0 = 0; b0 < n; b0 += KVC_SIDE_BLOCK) {
        const int bn = n - b0 < KVC_SIDE_BLOCK ? n - b0 : KVC_SIDE_BLOCK;
        const int64_t bi = h->nblk++;
        h->blk_first[bi] = h->n + b0;
        kvc_kvq_quant_channels_cpu(k + (size_t)b0 * D, bn, D, qb, kc, h->blk_scale + (size_t)bi * D,
                                   h->blk_min + (size_t)bi * D);
        for (int i = 0; i < bn; i++) memcpy(rows + (size_t)(b0 + i) * s->row_bytes, kc + (size_t)i * s->kcb, s->kcb);
    }
    /* values: per token, one row at a time into its place in the row */
    for (int i = 0; i < n; i++) {
        uint8_t *r = rows + (size_t)i * s->row_bytes;
        uint16_t sc[8], mn[8]; /* vg <= 8: D <= 256 */
        kvc_kvq_quant_tokens_cpu(v + (size_t)i * D, 1, D, VGROUP, qb, r + s->kcb, sc, mn);
        memcpy(r + s->kcb + s->vcb, sc, (size_t)s->vg * sizeof(uint16_t));
        memcpy(r + s->kcb + s->vcb + (size_t)s->vg * sizeof(uint16_t), mn, (size_t)s->vg * sizeof(uint16_t));
    }
    kvc_simhash_codes_cpu(&s->sh, krot, D, n, codes);
    for (int i = 0; i < n; i++) {
        if (s->o.bits <= 32) h->c32[h->n + i] = (uint32_t)codes[i];
        else h->c64[h->n + i] = codes[i];
        h->pos[h->n + i] = pos[i];
    }
    int rc = 0;
    if (s->fd >= 0) {
        const size_t len = (size_t)n * s->row_bytes;
        size_t done = 0;
        while (done < len) {
            ssize_t w = pwrite(s->fd, rows + done, len - done, (off_t)(s->file_off + (int64_t)done));
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                rc = kvc_fail(err, "side store: cannot write its spill file in '%s': %s", s->o.spill,
                              w < 0 ? strerror(errno) : "no space written");
                break;
            }
            done += (size_t)w;
        }
        if (!rc) {
            h->run_first[h->nrun] = h->n;
            h->run_off[h->nrun++] = s->file_off;
            s->file_off += (int64_t)len;
        }
        free(rows);
    }
    free(kc), free(codes);
    if (rc) { /* the tokens were not stored: forget their blocks too */
        h->nblk -= nblk;
        return -1;
    }
    h->n += n;
    return 0;
}

int64_t kvc_side_count(const kvc_side *s, int layer, int head) { return s->hs[(size_t)layer * s->K + head].n; }

/* ------------------------------------------------------------------ retrieval ------ */

/* The last index i in a[0..n) with a[i] <= x (a ascending, a[0] <= x). */
static int64_t last_le(const int64_t *a, int64_t n, int64_t x) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (a[mid] <= x) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Row i of h: in RAM, or read into buf from the spill file. NULL with err on a read error. */
static const uint8_t *row_of(const kvc_side *s, const side_head *h, int64_t i, uint8_t *buf, kvc_err *err) {
    if (s->fd < 0) return h->rows + (size_t)i * s->row_bytes;
    const int64_t r = last_le(h->run_first, h->nrun, i);
    const off_t off = (off_t)(h->run_off[r] + (i - h->run_first[r]) * (int64_t)s->row_bytes);
    size_t done = 0;
    while (done < s->row_bytes) {
        ssize_t got = pread(s->fd, buf + done, s->row_bytes - done, off + (off_t)done);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            kvc_fail(err, "side store: cannot read its spill file: %s", got < 0 ? strerror(errno) : "short file");
            return NULL;
        }
        done += (size_t)got;
    }
    return buf;
}

/* Decodes token i's key (before RoPE) into k (D) and, when v is not NULL, its value. */
static void decode_row(const kvc_side *s, const side_head *h, int64_t i, const uint8_t *row, float *k, float *v) {
    const int D = s->D;
    const int64_t b = last_le(h->blk_first, h->nblk, i);
    kvc_kvq_dequant_channels_cpu(row, h->blk_scale + (size_t)b * D, h->blk_min + (size_t)b * D, 1, D, s->o.qbits, k);
    if (!v) return;
    uint16_t sc[8], mn[8]; /* copied out: a spilled row's bytes need not be aligned */
    memcpy(sc, row + s->kcb + s->vcb, (size_t)s->vg * sizeof(uint16_t));
    memcpy(mn, row + s->kcb + s->vcb + (size_t)s->vg * sizeof(uint16_t), (size_t)s->vg * sizeof(uint16_t));
    kvc_kvq_dequant_tokens_cpu(row + s->kcb, sc, mn, 1, D, VGROUP, s->o.qbits, v);
}

/* Sizes one head's scratch for m stored tokens and c candidates. */
static int scratch_fit(const kvc_side *s, side_scratch *c, int64_t m, int64_t cand) {
    const int64_t need = m > cand ? m : cand;
    if (need > c->cap) {
        int64_t cap = c->cap ? c->cap : 256;
        while (cap < need) cap *= 2;
        float *a = realloc(c->score, (size_t)cap * sizeof *a);
        if (!a) return -1;
        c->score = a;
        int64_t *b = realloc(c->idx, (size_t)cap * sizeof *b);
        if (!b) return -1;
        c->idx = b;
        c->cap = cap;
    }
    if (!c->kd) { /* candidate buffers: at most rerank * r */
        const size_t cmax = (size_t)s->o.r * s->o.rerank;
        c->kd = malloc(cmax * s->D * sizeof(float));
        c->kr = malloc(cmax * s->D * sizeof(float));
        c->logit = malloc(cmax * sizeof(float));
        c->idx2 = malloc(cmax * sizeof(int64_t));
        c->cpos = malloc(cmax * sizeof(int32_t));
        c->row = malloc(s->row_bytes);
        if (!c->kd || !c->kr || !c->logit || !c->idx2 || !c->cpos || !c->row) return -1;
    }
    return 0;
}

/* qsort order of token indices, ascending. */
static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int kvc_side_retrieve(kvc_side *s, int layer, int head, const float *qg, int32_t qpos, const kvc_rope_table *rope,
                      float *krot, float *v, int32_t *pos, kvc_err *err) {
    const side_head *h = &s->hs[(size_t)layer * s->K + head];
    side_scratch *c = &s->sc[head];
    const int D = s->D, G = s->G, r = s->o.r;
    const int64_t m = h->n;
    if (m == 0) return 0;
    if (scratch_fit(s, c, m, (int64_t)r * s->o.rerank)) return kvc_fail(err, "out of memory in retrieval");
    /* the probes: the code of the heads' mean query, or each head's own */
    uint64_t probe[64];
    const int np = s->o.probe_each && G <= 64 ? G : 1;
    if (np == 1) {
        float mean[D];
        for (int d = 0; d < D; d++) {
            float a = 0.0f;
            for (int g = 0; g < G; g++) a += qg[(size_t)g * D + d];
            mean[d] = a / (float)G;
        }
        kvc_simhash_codes_cpu(&s->sh, mean, D, 1, probe);
    } else {
        kvc_simhash_codes_cpu(&s->sh, qg, D, G, probe);
    }
    int64_t visible = 0;
    for (int64_t i = 0; i < m; i++) {
        if (h->pos[i] > qpos) {
            c->score[i] = -INFINITY;
            continue;
        }
        const uint64_t code = s->o.bits <= 32 ? h->c32[i] : h->c64[i];
        int best = 65;
        for (int p = 0; p < np; p++) {
            int dd = __builtin_popcountll(code ^ probe[p]);
            best = dd < best ? dd : best;
        }
        c->score[i] = -(float)best;
        visible++;
    }
    int64_t want = (int64_t)r * s->o.rerank;
    if (want > visible) want = visible;
    int64_t got = kvc_topk(c->score, m, 0, 0, want, c->idx);
    if (got > r) { /* re-rank the candidates by their true logit, the best over the G heads */
        for (int64_t j = 0; j < got; j++) {
            const uint8_t *row = row_of(s, h, c->idx[j], c->row, err);
            if (!row) return -1;
            decode_row(s, h, c->idx[j], row, c->kd + (size_t)j * D, NULL);
            c->cpos[j] = h->pos[c->idx[j]];
        }
        kvc_rope_rows(rope, c->kd, D, c->cpos, got, c->kr, D);
        for (int64_t j = 0; j < got; j++) {
            float best = -INFINITY;
            for (int g = 0; g < G; g++) {
                float l = kvc_dot_f32(qg + (size_t)g * D, c->kr + (size_t)j * D, D);
                best = l > best ? l : best;
            }
            c->logit[j] = best;
        }
        int64_t kept = kvc_topk(c->logit, got, 0, 0, r, c->idx2);
        for (int64_t j = 0; j < kept; j++) c->idx2[j] = c->idx[c->idx2[j]];
        memcpy(c->idx, c->idx2, (size_t)kept * sizeof *c->idx);
        got = kept;
    }
    qsort(c->idx, (size_t)got, sizeof *c->idx, cmp_i64);
    for (int64_t j = 0; j < got; j++) {
        const uint8_t *row = row_of(s, h, c->idx[j], c->row, err);
        if (!row) return -1;
        decode_row(s, h, c->idx[j], row, c->kd + (size_t)j * D, v + (size_t)j * D);
        pos[j] = h->pos[c->idx[j]];
    }
    kvc_rope_rows(rope, c->kd, D, pos, got, krot, D);
#pragma omp atomic
    s->retrieved += got;
    return (int)got;
}

/* ------------------------------------------------------------------ accounting ------ */

size_t kvc_side_ram_bytes(const kvc_side *s) {
    const size_t cb = s->o.bits <= 32 ? sizeof(uint32_t) : sizeof(uint64_t);
    size_t total = 0;
    for (size_t i = 0; i < (size_t)s->L * s->K; i++) {
        const side_head *h = &s->hs[i];
        total += (size_t)h->n * (cb + sizeof(int32_t));
        total += (size_t)h->nblk * (sizeof(int64_t) + (size_t)s->D * 2 * sizeof(uint16_t));
        if (s->fd < 0) total += (size_t)h->n * s->row_bytes;
        else total += (size_t)h->nrun * 2 * sizeof(int64_t);
    }
    return total;
}

size_t kvc_side_disk_bytes(const kvc_side *s) { return s->fd >= 0 ? (size_t)s->file_off : 0; }

int64_t kvc_side_tokens(const kvc_side *s) {
    int64_t t = 0;
    for (size_t i = 0; i < (size_t)s->L * s->K; i++) t += s->hs[i].n;
    return t;
}

int64_t kvc_side_retrieved(const kvc_side *s) { return s->retrieved; }
