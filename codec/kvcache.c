/* kvcache.c - the compressed KV cache: a representation x a retention policy behind the
 * kvc_cache interface (kvc/kvcache.h). Per (layer, kv head) it holds tokens sorted by their
 * true position: new tokens stay exact (f32) for the step that appended them, so a chunk
 * attends to its own exact K/V (DESIGN.md §5); end_step lets the policy evict down to the
 * budget, then hands the survivors to the representation in blocks. RoPE is applied on read
 * with each token's stored position, so evicted tokens leave gaps and nothing shifts.
 * Letters: L layers, K kv heads, G query heads per kv head, D head_dim, T tokens held by one
 * (layer, kv head), R latent size, B block rows. */
#include "kvc/kvcache.h"
#include "kvc/ops.h"
#include "kvc/kernels.h"
#include "kvc/sidestore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

enum { KK = KV_K, KV = KV_V };

/* Tokens of one (layer, kv head). Tokens [0, n_enc[kind]) of a kind are encoded, the rest
 * (always the newest) are exact rows in raw. */
typedef struct {
    int64_t n, cap;        /* tokens held, allocated */
    int32_t *pos;          /* (cap) true positions, ascending */
    uint8_t *state;        /* (cap, state_bytes) the policy's per-token state */
    int64_t n_enc[2];
    uint8_t *rows[2];      /* (cap, row_bytes) encoded rows */
    uint16_t *blk[2];      /* (cap) block slot of each encoded row, for kinds with block data
                              under an evicting policy; without eviction row i is in slot
                              i / B (slots are taken in order and never freed), so none is kept */
    float *raw[2];         /* (cap, D) exact rows of tokens n_enc .. n-1, oldest first */
    uint8_t *bdata[2];     /* (nbs, block_bytes) block data slots */
    int32_t *bref[2];      /* (nbs) rows still using each slot; 0 = free */
    int64_t nbs[2], live_blocks[2];
    uint64_t version;      /* bumped on every change, for the reuse memo */
    int follower;          /* tokens tied to (layer - 1, head): a kind is predicted from it */
} hstore;

/* Decoded rows (before RoPE) of one (kv head, kind) for the last layer computed, so that a
 * layer reused from the one below does not decode the chain again. */
typedef struct {
    int layer;             /* layer held by rows[cur], or -1 */
    uint64_t version;      /* that layer's store version when it was decoded */
    int cur;
    int64_t cap;
    float *rows[2];        /* (cap, D) each: the current layer's rows, and room for the next */
} memo;

/* Per kv head scratch for attend (each head is worked on by one thread at a time). */
typedef struct {
    int64_t cap;
    float *kr;             /* (cap, D) keys after RoPE */
    const float *vr;       /* (T, D) values (when not read in latent space): the memo's rows */
    float *z;              /* (cap, R) value latents */
    float *tmp, *tmp2;     /* (cap, D) each: decoding a reuse chain */
    int64_t mask_n;        /* tokens the mask covers */
    int64_t zcap;
    uint8_t *mask;         /* (cap) eviction marks; kept for followers of this head */
    float *score;          /* (cap) */
    const uint8_t **bp;    /* (cap) block pointers */
    int64_t pcap;
    float *probs;          /* (n_q, G, cap) softmax weights for policies that want them */
    float *qg;             /* (n_q, G, D) the group's queries */
    int64_t qcap;
    int32_t *pos2;         /* (cap) retrieval: held positions, then the retrieved ones */
    float *rprobs;         /* (G, cap) retrieval: one query's weights over held + retrieved */
} hscratch;

typedef struct {
    kvc_repr *repr;
    kvc_keep *keep;
    int L, K, H, G, D;
    size_t *rb;            /* (L, K, 2) row bytes */
    size_t *bb;            /* (L, K, 2) block bytes */
    unsigned char *reused; /* (L, K, 2) */
    int brows[2];          /* block rows per kind */
    int *latent;           /* (L, K) R when values can be read in latent space, else 0 */
    hstore *hs;            /* (L, K) */
    memo *mm;              /* (K, 2) */
    hscratch *sc;          /* (K) */
    kvc_rope_table rope;   /* RoPE angles by position: the same kernel as the full cache */
    int64_t appended, evicted;
    int64_t ref;           /* < 0: hold every token; else fraction budgets are of ref tokens */
    int64_t budget;        /* resolved budget in tokens (when ref >= 1 and the policy evicts) */
    kvc_side *side;        /* evicted tokens for retrieval (keep option retrieve=R), or NULL */
    char desc[1400];
} kv_impl;

#define IDX3(im, l, h, k) ((((size_t)(l) * (im)->K) + (size_t)(h)) * 2 + (size_t)(k))

/* ------------------------------------------------------------------ storage ------ */

/* Grows a buffer to hold `n` elements of `size` bytes (contents kept). */
static int grow(void **p, size_t n, size_t size) {
    if (n == 0 || size == 0) return 0;
    void *q = realloc(*p, n * size);
    if (!q) return -1;
    *p = q;
    return 0;
}

/* Makes room for `need` tokens in one head store. */
static int hs_reserve(kv_impl *im, hstore *s, int l, int h, int64_t need) {
    if (need <= s->cap) return 0;
    int64_t cap = s->cap ? s->cap : 64;
    while (cap < need) cap *= 2;
    const size_t D = (size_t)im->D, sb = im->keep->state_bytes;
    if (grow((void **)&s->pos, (size_t)cap, sizeof(int32_t)) || (sb && grow((void **)&s->state, (size_t)cap, sb)))
        return -1;
    for (int k = 0; k < 2; k++) {
        size_t rb = im->rb[IDX3(im, l, h, k)];
        if (rb && grow((void **)&s->rows[k], (size_t)cap, rb)) return -1;
        if (im->bb[IDX3(im, l, h, k)] && im->keep->evicts && grow((void **)&s->blk[k], (size_t)cap, sizeof(uint16_t)))
            return -1;
        if (grow((void **)&s->raw[k], (size_t)cap, D * sizeof(float))) return -1;
    }
    s->cap = cap;
    return 0;
}

/* A free block slot of kind k (grown on demand); -1 when out of memory. */
static int32_t block_alloc(kv_impl *im, hstore *s, int l, int h, int k) {
    for (int64_t i = 0; i < s->nbs[k]; i++)
        if (s->bref[k][i] == 0) return (int32_t)i;
    int64_t n = s->nbs[k] ? s->nbs[k] * 2 : 8;
    if (grow((void **)&s->bdata[k], (size_t)n, im->bb[IDX3(im, l, h, k)]) ||
        grow((void **)&s->bref[k], (size_t)n, sizeof(int32_t)))
        return -1;
    for (int64_t i = s->nbs[k]; i < n; i++) s->bref[k][i] = 0;
    int32_t at = (int32_t)s->nbs[k];
    s->nbs[k] = n;
    return at;
}

/* ------------------------------------------------------------------- append ------ */

static int kv_append(kvc_cache *c, int layer, const float *k, const float *v, const int32_t *pos, int n,
                     kvc_err *err) {
    kv_impl *im = c->impl;
    const int K = im->K, D = im->D;
    const size_t sb = im->keep->state_bytes;
    hstore *s0 = &im->hs[(size_t)layer * K];
    if (s0->n > 0 && pos[0] <= s0->pos[s0->n - 1])
        return kvc_fail(err, "compressed cache: position %d appended after position %d (positions must grow)",
                        pos[0], s0->pos[s0->n - 1]);
    for (int t = 0; t < n; t++) {
        if (pos[t] < 0 || (t > 0 && pos[t] <= pos[t - 1]))
            return kvc_fail(err, "compressed cache: positions must be >= 0 and increasing");
        if (s0->n + t >= c->shape.max_tokens)
            return kvc_fail(err, "KV cache full: layer %d holds %lld tokens, capacity %d", layer,
                            (long long)s0->n, c->shape.max_tokens);
    }
    if (kvc_rope_table_reserve(&im->rope, (int64_t)pos[n - 1] + 1)) return kvc_fail(err, "out of memory");
    float *kr = im->keep->ops->on_append ? malloc((size_t)n * D * sizeof(float)) : NULL;
    if (im->keep->ops->on_append && !kr) return kvc_fail(err, "out of memory");
    for (int h = 0; h < K; h++) {
        hstore *s = &s0[h];
        if (hs_reserve(im, s, layer, h, s->n + n)) {
            free(kr);
            return kvc_fail(err, "out of memory growing the KV cache");
        }
        const int64_t first = s->n;
        memcpy(s->pos + first, pos, (size_t)n * sizeof(int32_t));
        if (sb) memset(s->state + (size_t)first * sb, 0, (size_t)n * sb);
        for (int kind = 0; kind < 2; kind++) {
            const float *src = kind == KK ? k : v;
            float *dst = s->raw[kind] + (size_t)(first - s->n_enc[kind]) * D;
            for (int t = 0; t < n; t++)
                memcpy(dst + (size_t)t * D, src + ((size_t)t * K + h) * D, (size_t)D * sizeof(float));
        }
        s->n += n;
        s->version++;
        if (kr) {
            /* the new keys were just stored contiguously as exact rows: rotate from there */
            kvc_rope_rows(&im->rope, s->raw[KK] + (size_t)(first - s->n_enc[KK]) * D, D, pos, n, kr, D);
            kvc_keep_view view = {layer, h, s->n, s->pos, s->state, NULL};
            im->keep->ops->on_append(im->keep, &view, first, kr);
        }
    }
    free(kr);
    if (layer == 0) im->appended += n;
    return 0;
}

/* ------------------------------------------------------------------- decode ------ */

/* Decodes the encoded rows [0, cnt) of one (layer, head, kind) that is stored (not reused)
 * into y (cnt, D). */
static void decode_stored(const kv_impl *im, const hstore *s, int l, int h, int k, int64_t cnt, float *y,
                          const uint8_t **bp) {
    const size_t rb = im->rb[IDX3(im, l, h, k)], bb = im->bb[IDX3(im, l, h, k)];
    if (cnt <= 0) return;
    if (bb)
        for (int64_t i = 0; i < cnt; i++)
            bp[i] = s->bdata[k] + (size_t)(s->blk[k] ? s->blk[k][i] : i / im->brows[k]) * bb;
    im->repr->ops->decode(im->repr, l, h, k, s->rows[k], bb ? bp : NULL, (int)cnt, y);
    (void)rb;
}

/* Rows [0, T) of layer j's store s for kind k into dst, the encoded ones computed from src
 * (the rows of layer j - 1) when j is reused, else decoded; exact rows copied. */
static void layer_rows(kv_impl *im, int j, int h, int k, const float *src, float *dst, hscratch *scr) {
    const hstore *s = &im->hs[(size_t)j * im->K + h];
    const int64_t ne = s->n_enc[k], T = s->n;
    if (!im->reused[IDX3(im, j, h, k)]) decode_stored(im, s, j, h, k, ne, dst, scr->bp);
    else if (ne > 0) im->repr->ops->predict(im->repr, j, h, k, src, (int)ne, dst);
    if (T > ne) memcpy(dst + (size_t)ne * im->D, s->raw[k], (size_t)(T - ne) * im->D * sizeof(float));
}

/* All T rows (before RoPE) of (layer l, head h, kind k) into out (T, D): encoded rows decoded,
 * reused rows predicted up the chain from the nearest stored layer below (or from the memo,
 * when it holds a current layer of that chain), exact rows copied. out must not be one of
 * the memo's rows or scr->tmp/tmp2. */
static void head_rows(kv_impl *im, int l, int h, int k, float *out, hscratch *scr) {
    int r = l;
    while (r > 0 && im->reused[IDX3(im, r, h, k)]) r--;
    const memo *mm = &im->mm[h * 2 + k];
    const float *src = NULL;
    int start = r;
    if (mm->layer >= r && mm->layer < l && mm->version == im->hs[(size_t)mm->layer * im->K + h].version) {
        src = mm->rows[mm->cur];
        start = mm->layer;
    } else {
        float *a = r == l ? out : scr->tmp;
        layer_rows(im, r, h, k, NULL, a, scr);
        src = a;
    }
    for (int j = start + 1; j <= l; j++) {
        float *dst = j == l ? out : (src == scr->tmp ? scr->tmp2 : scr->tmp);
        layer_rows(im, j, h, k, src, dst, scr);
        src = dst;
    }
}

/* Decodes (layer, head, kind) into the memo's free buffer and makes it the memo's current
 * layer; returns the rows, or NULL when out of memory. */
static const float *memo_rows(kv_impl *im, int l, int h, int k, hscratch *scr) {
    memo *mm = &im->mm[h * 2 + k];
    if (mm->cap < scr->cap) {
        for (int i = 0; i < 2; i++) {
            float *p = realloc(mm->rows[i], (size_t)scr->cap * im->D * sizeof(float));
            if (!p) return NULL;
            mm->rows[i] = p;
        }
        mm->cap = scr->cap;
    }
    float *out = mm->rows[1 - mm->cur];
    head_rows(im, l, h, k, out, scr);
    mm->cur = 1 - mm->cur;
    mm->layer = l;
    mm->version = im->hs[(size_t)l * im->K + h].version;
    return out;
}

/* Sizes one head's attend scratch for T tokens, n_q queries. */
static int scratch_reserve(kv_impl *im, hscratch *scr, int64_t T, int n_q, int R) {
    const size_t D = (size_t)im->D;
    if (T > scr->cap || !scr->kr) {
        int64_t cap = T > 64 ? T : 64;
        if (grow((void **)&scr->kr, (size_t)cap, D * sizeof(float)) ||
            grow((void **)&scr->tmp, (size_t)cap, D * sizeof(float)) || grow((void **)&scr->tmp2, (size_t)cap, D * sizeof(float)) ||
            grow((void **)&scr->mask, (size_t)cap, 1) ||
            grow((void **)&scr->score, (size_t)cap, sizeof(float)) || grow((void **)&scr->bp, (size_t)cap, sizeof(void *)))
            return -1;
        if (im->side && (grow((void **)&scr->pos2, (size_t)cap, sizeof(int32_t)) ||
                         grow((void **)&scr->rprobs, (size_t)cap * im->G, sizeof(float))))
            return -1;
        scr->cap = cap;
    }
    if (R > 0 && scr->zcap < scr->cap * R) {
        if (grow((void **)&scr->z, (size_t)scr->cap, (size_t)R * sizeof(float))) return -1;
        scr->zcap = scr->cap * R;
    }
    size_t pn = (size_t)n_q * im->G * (size_t)scr->cap;
    if (im->keep->needs_probs && (int64_t)pn > scr->pcap) {
        if (grow((void **)&scr->probs, pn, sizeof(float))) return -1;
        scr->pcap = (int64_t)pn;
    }
    if ((int64_t)n_q * im->G * im->D > scr->qcap) {
        if (grow((void **)&scr->qg, (size_t)n_q * im->G * D, sizeof(float))) return -1;
        scr->qcap = (int64_t)n_q * im->G * im->D;
    }
    return 0;
}

/* ------------------------------------------------------------------- attend ------ */

/* Hands one layer's queries (and the weights in each head's scr->probs, when the policy asks)
 * to the policy, head by head. */
static void policy_sees(kv_impl *im, int layer, const float *q, const int32_t *qpos, int n_q) {
    const int K = im->K, G = im->G, D = im->D, H = im->H;
    if (!im->keep->ops->on_attend) return;
    for (int h = 0; h < K; h++) {
        hstore *s = &im->hs[(size_t)layer * K + h];
        hscratch *scr = &im->sc[h];
        for (int t = 0; t < n_q; t++)
            memcpy(scr->qg + (size_t)t * G * D, q + ((size_t)t * H + (size_t)h * G) * D, (size_t)G * D * sizeof(float));
        kvc_keep_view view = {layer, h, s->n, s->pos, s->state, NULL};
        im->keep->ops->on_attend(im->keep, &view, scr->qg, qpos, n_q, im->keep->needs_probs ? scr->probs : NULL);
    }
}

static const kvc_cache_ops KV_OPS;

/* kvc_kvcache_observe after the keys are read (phase 1 of kv_attend): attention runs only when
 * the policy needs its weights, into scratch that is thrown away. */
static int observe_only(kv_impl *im, int layer, const float *q, const int32_t *qpos, int n_q, kvc_err *err) {
    const int K = im->K, D = im->D, H = im->H;
    if (im->keep->needs_probs) {
        float *tmp = kvc_malloc_array((size_t)n_q * H * D, sizeof(float));
        if (!tmp) return kvc_fail(err, "out of memory observing queries");
        kvc_attn_kv kv[K];
        float *probs[K];
        for (int h = 0; h < K; h++) {
            const hstore *s = &im->hs[(size_t)layer * K + h];
            const hscratch *scr = &im->sc[h];
            const int R = im->latent[(size_t)layer * K + h];
            const int64_t ne = R ? s->n_enc[KV] : 0;
            kv[h] = (kvc_attn_kv){.t = s->n, .k = scr->kr, .ldk = D, .pos = s->pos, .ne = ne, .z = scr->z, .r = R,
                                  .v = R ? s->raw[KV] : scr->vr, .ldv = D};
            if (ne > 0) im->repr->ops->linear_decoder(im->repr, layer, h, &kv[h].w, &kv[h].b);
            probs[h] = scr->probs;
        }
        int rc = kvc_backend_cpu()->attend_layer(q, qpos, n_q, H, K, D, kv, tmp, probs, err);
        free(tmp);
        if (rc) return -1;
    }
    policy_sees(im, layer, q, qpos, n_q);
    return 0;
}

/* Attention with retrieval: query by query, each kv head's held rows plus the tokens the
 * side store returns for that query (written after the held rows: keys in scr->kr, values in
 * the memo's buffer, which both have room for rmax more rows). The policy's weights (when it
 * asks) cover the held tokens only. Values are read decoded (no latent path with retrieval). */
static int attend_retrieving(kvc_cache *c, int layer, const float *q, const int32_t *qpos, int n_q, float *out,
                             kvc_err *err) {
    kv_impl *im = c->impl;
    const int K = im->K, G = im->G, D = im->D, H = im->H;
    int got[K];
    float *vw[K];
    kvc_attn_kv kv[K];
    float *probs[K];
    for (int h = 0; h < K; h++) {
        const hstore *s = &im->hs[(size_t)layer * K + h];
        hscratch *scr = &im->sc[h];
        memcpy(scr->pos2, s->pos, (size_t)s->n * sizeof(int32_t));
        vw[h] = im->mm[h * 2 + KV].rows[im->mm[h * 2 + KV].cur]; /* == scr->vr, writable past row n */
        probs[h] = im->keep->needs_probs ? scr->rprobs : NULL;
    }
    kvc_err e1 = {{0}};
    for (int t = 0; t < n_q; t++) {
        int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : bad) if (K > 1)
        for (int h = 0; h < K; h++) {
            const hstore *s = &im->hs[(size_t)layer * K + h];
            hscratch *scr = &im->sc[h];
            got[h] = kvc_side_retrieve(im->side, layer, h, q + ((size_t)t * H + (size_t)h * G) * D, qpos[t], &im->rope,
                                       scr->kr + (size_t)s->n * D, vw[h] + (size_t)s->n * D, scr->pos2 + s->n, &e1);
            bad |= got[h] < 0;
        }
        if (bad) return kvc_fail(err, "%s", e1.msg);
        for (int h = 0; h < K; h++) {
            const hstore *s = &im->hs[(size_t)layer * K + h];
            const hscratch *scr = &im->sc[h];
            kv[h] = (kvc_attn_kv){.t = s->n + got[h], .k = scr->kr, .ldk = D, .pos = scr->pos2, .v = vw[h], .ldv = D};
        }
        if (kvc_cache_backend(c)->attend_layer(q + (size_t)t * H * D, qpos + t, 1, H, K, D, kv, out + (size_t)t * H * D,
                                               probs, err))
            return -1;
        for (int h = 0; probs[0] && h < K; h++) {
            const hstore *s = &im->hs[(size_t)layer * K + h];
            hscratch *scr = &im->sc[h];
            for (int g = 0; g < G; g++)
                memcpy(scr->probs + ((size_t)t * G + g) * s->n, scr->rprobs + (size_t)g * kv[h].t,
                       (size_t)s->n * sizeof(float));
        }
    }
    return 0;
}

static int kv_attend(kvc_cache *c, int layer, const float *q, const int32_t *qpos, int n_q, float *out,
                     kvc_err *err) {
    kv_impl *im = c->impl;
    const int K = im->K, D = im->D, H = im->H;
    int fail = 0;
    /* 1. per kv head: keys (decoded, rotated) and values (decoded, or latents) */
    const int rmax = im->side ? im->keep->retrieval.r : 0;
    for (int h = 0; h < K; h++) {
        hstore *s = &im->hs[(size_t)layer * K + h];
        int R = im->latent[(size_t)layer * K + h];
        if (scratch_reserve(im, &im->sc[h], s->n + rmax, n_q, R)) return kvc_fail(err, "out of memory in attention");
    }
#pragma omp parallel for schedule(dynamic, 1) reduction(| : fail) if (K > 1)
    for (int h = 0; h < K; h++) {
        hstore *s = &im->hs[(size_t)layer * K + h];
        hscratch *scr = &im->sc[h];
        const int64_t T = s->n;
        /* the memo keeps this layer's rows (before RoPE) for a layer above that reuses them */
        const float *kp = memo_rows(im, layer, h, KK, scr);
        if (!kp) { fail |= 1; continue; }
        if (kvc_cache_backend(c)->rope_rows(&im->rope, kp, D, s->pos, T, scr->kr, D, NULL)) {
            fail |= 1;
            continue;
        }
        if (!im->latent[(size_t)layer * K + h]) {
            const float *vp = memo_rows(im, layer, h, KV, scr);
            if (!vp) { fail |= 1; continue; }
            scr->vr = vp; /* read in place: the memo is not touched again before phase 2 */
        } else if (s->n_enc[KV] > 0) {
            im->repr->ops->decode_latent(im->repr, layer, h, s->rows[KV], (int)s->n_enc[KV], scr->z);
        }
    }
    if (fail) return kvc_fail(err, "attention: out of memory, or the backend failed rotating keys");
    if (!out) return observe_only(im, layer, q, qpos, n_q, err);
    int retrieving = 0;
    for (int h = 0; rmax && h < K; h++) retrieving |= kvc_side_count(im->side, layer, h) > 0;
    if (retrieving) {
        if (attend_retrieving(c, layer, q, qpos, n_q, out, err)) return -1;
        policy_sees(im, layer, q, qpos, n_q);
        return 0;
    }
    /* 2. every (query, query head): the backend's attention, exact rows and latents alike */
    kvc_attn_kv kv[K];
    float *probs[K];
    const kvc_repr_ops *ro = im->repr->ops;
    for (int h = 0; h < K; h++) {
        const hstore *s = &im->hs[(size_t)layer * K + h];
        const hscratch *scr = &im->sc[h];
        const int R = im->latent[(size_t)layer * K + h];
        const int64_t ne = R ? s->n_enc[KV] : 0;
        kv[h] = (kvc_attn_kv){.t = s->n, .k = scr->kr, .ldk = D, .pos = s->pos, .ne = ne, .z = scr->z, .r = R,
                              .v = R ? s->raw[KV] : scr->vr, .ldv = D};
        if (ne > 0) ro->linear_decoder(im->repr, layer, h, &kv[h].w, &kv[h].b);
        probs[h] = im->keep->needs_probs ? scr->probs : NULL;
    }
    if (kvc_cache_backend(c)->attend_layer(q, qpos, n_q, H, K, D, kv, out, probs, err)) return -1;
    /* 3. the policy sees the step's queries (and weights) */
    policy_sees(im, layer, q, qpos, n_q);
    return 0;
}

int kvc_kvcache_observe(kvc_cache *c, int layer, const float *q, const int32_t *pos, int n_q, kvc_err *err) {
    if (c->ops != &KV_OPS || n_q <= 0) return 0;
    if (layer < 0 || layer >= c->shape.n_layer || !q || !pos) return kvc_fail(err, "kvc_kvcache_observe: bad arguments");
    kv_impl *im = c->impl;
    if (!im->keep->ops->on_attend) return 0; /* nothing to see: no keys decoded either */
    if (im->keep->needs_probs) return kv_attend(c, layer, q, pos, n_q, NULL, err);
    for (int h = 0; h < im->K; h++) /* queries alone: no keys to read */
        if (scratch_reserve(im, &im->sc[h], im->hs[(size_t)layer * im->K + h].n, n_q, 0))
            return kvc_fail(err, "out of memory observing queries");
    policy_sees(im, layer, q, pos, n_q);
    return 0;
}

/* ----------------------------------------------------------------- end_step ------ */

/* Removes the tokens marked in mask from one head store. */
static void hs_compact(kv_impl *im, hstore *s, const uint8_t *mask) {
    const int D = im->D;
    const size_t sb = im->keep->state_bytes;
    const int l = (int)((s - im->hs) / im->K), h = (int)((s - im->hs) % im->K);
    int64_t w = 0, we[2] = {0, 0}, wr[2] = {0, 0};
    for (int64_t i = 0; i < s->n; i++) {
        for (int k = 0; k < 2; k++) {
            const size_t rb = im->rb[IDX3(im, l, h, k)];
            const int enc = i < s->n_enc[k];
            if (mask[i]) {
                if (enc && s->blk[k] && --s->bref[k][s->blk[k][i]] == 0) s->live_blocks[k]--;
                continue;
            }
            if (enc) {
                if (we[k] != i) {
                    if (rb) memmove(s->rows[k] + (size_t)we[k] * rb, s->rows[k] + (size_t)i * rb, rb);
                    if (s->blk[k]) s->blk[k][we[k]] = s->blk[k][i];
                }
                we[k]++;
            } else {
                const int64_t ri = i - s->n_enc[k];
                if (wr[k] != ri) memmove(s->raw[k] + (size_t)wr[k] * D, s->raw[k] + (size_t)ri * D, (size_t)D * sizeof(float));
                wr[k]++;
            }
        }
        if (mask[i]) continue;
        if (w != i) {
            s->pos[w] = s->pos[i];
            if (sb) memmove(s->state + (size_t)w * sb, s->state + (size_t)i * sb, sb);
        }
        w++;
    }
    im->evicted += s->n - w;
    s->n = w;
    s->n_enc[0] = we[0], s->n_enc[1] = we[1];
    s->version++;
}

/* Encodes the exact rows of one head store in whole blocks. */
static int hs_flush(kv_impl *im, hstore *s, int l, int h) {
    const int D = im->D;
    for (int k = 0; k < 2; k++) {
        const int B = im->brows[k];
        const size_t rb = im->rb[IDX3(im, l, h, k)], bb = im->bb[IDX3(im, l, h, k)];
        int64_t nraw = s->n - s->n_enc[k], done = 0;
        while (nraw - done >= B) {
            uint8_t *blk = NULL;
            if (bb) {
                int32_t slot = block_alloc(im, s, l, h, k);
                if (slot < 0) return -1;
                blk = s->bdata[k] + (size_t)slot * bb;
                s->bref[k][slot] = B;
                s->live_blocks[k]++;
                if (slot > UINT16_MAX) return -1;
                if (s->blk[k])
                    for (int i = 0; i < B; i++) s->blk[k][s->n_enc[k] + i] = (uint16_t)slot;
            }
            if (!im->reused[IDX3(im, l, h, k)] && (rb || bb))
                im->repr->ops->encode(im->repr, l, h, k, s->raw[k] + (size_t)done * D, D, B,
                                      rb ? s->rows[k] + (size_t)s->n_enc[k] * rb : NULL, blk);
            s->n_enc[k] += B;
            done += B;
        }
        if (done > 0 && nraw > done)
            memmove(s->raw[k], s->raw[k] + (size_t)done * D, (size_t)(nraw - done) * D * sizeof(float));
    }
    s->version++;
    return 0;
}

/* Scores the tokens of (l, h) into score; the view carries the keys after RoPE when the policy
 * asks for them (decoded and rotated as attention reads them). 0 or -1 with err. */
static int score_head(kvc_cache *c, int l, int h, float *score, kvc_err *err) {
    kv_impl *im = c->impl;
    hstore *s = &im->hs[(size_t)l * im->K + h];
    hscratch *scr = &im->sc[h];
    kvc_keep_view view = {l, h, s->n, s->pos, s->state, NULL};
    if (im->keep->needs_keys) {
        const float *kp = memo_rows(im, l, h, KK, scr);
        if (!kp) return kvc_fail(err, "out of memory reading keys for the policy");
        if (kvc_cache_backend(c)->rope_rows(&im->rope, kp, im->D, s->pos, s->n, scr->kr, im->D, err)) return -1;
        view.krot = scr->kr;
    }
    im->keep->ops->score(im->keep, &view, score);
    return 0;
}

/* Hands the tokens marked in mask of (l, h) to the side store: their rows decoded (before
 * RoPE) and their keys rotated for the index. 0 or -1 with err. */
static int side_capture(kv_impl *im, int l, int h, const uint8_t *mask, kvc_err *err) {
    hstore *s = &im->hs[(size_t)l * im->K + h];
    const int D = im->D;
    int64_t m = 0;
    for (int64_t i = 0; i < s->n; i++) m += mask[i];
    if (m == 0) return 0;
    float *kall = kvc_malloc_array((size_t)s->n * D, sizeof(float)), *vall = kvc_malloc_array((size_t)s->n * D, sizeof(float));
    float *kr = kvc_malloc_array((size_t)m * D, sizeof(float));
    int32_t *pos = kvc_malloc_array((size_t)m, sizeof(int32_t));
    int rc = 0;
    if (!kall || !vall || !kr || !pos) {
        rc = kvc_fail(err, "out of memory moving evicted tokens to the side store");
    } else {
        head_rows(im, l, h, KK, kall, &im->sc[h]);
        head_rows(im, l, h, KV, vall, &im->sc[h]);
        int64_t w = 0;
        for (int64_t i = 0; i < s->n; i++) {
            if (!mask[i]) continue;
            if (w != i) {
                memcpy(kall + (size_t)w * D, kall + (size_t)i * D, (size_t)D * sizeof(float));
                memcpy(vall + (size_t)w * D, vall + (size_t)i * D, (size_t)D * sizeof(float));
            }
            pos[w++] = s->pos[i];
        }
        kvc_rope_rows(&im->rope, kall, D, pos, m, kr, D);
        rc = kvc_side_add(im->side, l, h, kall, kr, vall, pos, (int)m, err);
    }
    free(kall), free(vall), free(kr), free(pos);
    return rc;
}

/* end_step with one budget shared by the kv heads of a layer (share=layer) or by every head
 * (share=global): all heads of a group are scored, kvc_kvcache_select_shared picks what goes,
 * then every head compacts and encodes. (No reuse chains: refused at creation.) */
static int end_step_shared(kvc_cache *c, kvc_err *err) {
    kv_impl *im = c->impl;
    const kvc_keep_budget *b = &im->keep->budget;
    const int nh = im->L * im->K, per = b->share == KVC_SHARE_LAYER ? im->K : nh;
    int64_t total = 0;
    for (int i = 0; i < nh; i++) total += im->hs[i].n;
    float *sc = kvc_malloc_array((size_t)(total > 0 ? total : 1), sizeof(float));
    uint8_t *mk = kvc_calloc_array((size_t)(total > 0 ? total : 1), 1);
    const float **sp = kvc_malloc_array((size_t)nh, sizeof *sp);
    uint8_t **mp = kvc_malloc_array((size_t)nh, sizeof *mp);
    int64_t *nn = kvc_malloc_array((size_t)nh, sizeof *nn);
    int rc = 0;
    if (!sc || !mk || !sp || !mp || !nn) rc = kvc_fail(err, "out of memory choosing tokens to evict");
    const int64_t floor_keep = (int64_t)ceil(b->floor * (double)im->budget);
    for (int64_t i = 0, off = 0; !rc && i < nh; i++) {
        sp[i] = sc + off, mp[i] = mk + off, nn[i] = im->hs[i].n;
        off += im->hs[i].n;
    }
    for (int g0 = 0; !rc && g0 < nh; g0 += per) {
        int64_t held = 0;
        for (int i = g0; i < g0 + per; i++) held += nn[i];
        if (held <= im->budget * per) continue;
        for (int i = g0; !rc && i < g0 + per; i++)
            if (scratch_reserve(im, &im->sc[i % im->K], nn[i], 1, 0)) rc = kvc_fail(err, "out of memory");
            else rc = score_head(c, i / im->K, i % im->K, (float *)sp[i], err);
        if (!rc && kvc_kvcache_select_shared(sp + g0, nn + g0, per, im->budget * per, b->sinks, b->window, floor_keep,
                                             mp + g0) < 0)
            rc = kvc_fail(err, "out of memory choosing tokens to evict");
    }
    for (int i = 0; !rc && i < nh; i++) {
        hstore *s = &im->hs[i];
        const int l = i / im->K, h = i % im->K;
        if (scratch_reserve(im, &im->sc[h], s->n, 1, 0)) rc = kvc_fail(err, "out of memory");
        if (!rc && im->side) rc = side_capture(im, l, h, mp[i], err);
        if (rc) break;
        hs_compact(im, s, mp[i]);
        if (hs_flush(im, s, l, h)) rc = kvc_fail(err, "out of memory encoding the KV cache");
    }
    free(sc), free(mk), free(sp), free(mp), free(nn);
    return rc;
}

static int kv_end_step(kvc_cache *c, kvc_err *err) {
    kv_impl *im = c->impl;
    const int K = im->K;
    const kvc_keep_budget *b = &im->keep->budget;
    const int evict = im->keep->evicts && im->ref >= 1;
    if (evict && b->share != KVC_SHARE_HEAD) return end_step_shared(c, err);
    for (int l = 0; l < im->L; l++) {
        for (int h = 0; h < K; h++) {
            hstore *s = &im->hs[(size_t)l * K + h];
            hscratch *scr = &im->sc[h];
            if (evict) {
                if (scratch_reserve(im, scr, s->n, 1, 0)) return kvc_fail(err, "out of memory");
                if (s->follower) {
                    /* scr->mask still holds the decision made for (l - 1, h), same tokens */
                    if (scr->mask_n != s->n) return kvc_fail(err, "internal: reuse chain out of step");
                } else {
                    memset(scr->mask, 0, (size_t)s->n);
                    if (s->n > im->budget) {
                        if (score_head(c, l, h, scr->score, err)) return -1;
                        kvc_kvcache_select(scr->score, s->n, im->budget, b->sinks, b->window, scr->mask);
                    }
                    scr->mask_n = s->n;
                }
                if (im->side && side_capture(im, l, h, scr->mask, err)) return -1;
                hs_compact(im, s, scr->mask);
            }
            if (hs_flush(im, s, l, h)) return kvc_fail(err, "out of memory encoding the KV cache");
        }
    }
    return 0;
}

/* ------------------------------------------------------------ bookkeeping ------ */

static size_t kv_bytes(const kvc_cache *c) {
    const kv_impl *im = c->impl;
    const size_t sb = im->keep->state_bytes, D = (size_t)im->D;
    size_t total = im->keep->ops->extra_bytes ? im->keep->ops->extra_bytes(im->keep) : 0;
    /* heads holding different numbers of tokens: each head's count is data */
    if (im->keep->evicts && im->keep->budget.share != KVC_SHARE_HEAD) total += (size_t)im->L * im->K * sizeof(int32_t);
    for (int l = 0; l < im->L; l++)
        for (int h = 0; h < im->K; h++) {
            const hstore *s = &im->hs[(size_t)l * im->K + h];
            total += (size_t)s->n * sb;
            if (im->keep->evicts) total += (size_t)s->n * sizeof(int32_t); /* gaps: positions are data */
            for (int k = 0; k < 2; k++) {
                total += (size_t)s->n_enc[k] * im->rb[IDX3(im, l, h, k)];
                total += (size_t)(s->n - s->n_enc[k]) * D * sizeof(float);
                if (im->bb[IDX3(im, l, h, k)])
                    total += (size_t)s->live_blocks[k] * im->bb[IDX3(im, l, h, k)] +
                             (s->blk[k] ? (size_t)s->n_enc[k] * sizeof(uint16_t) : 0);
            }
        }
    return total;
}

static int64_t kv_n_tokens(const kvc_cache *c, int layer) {
    const kv_impl *im = c->impl;
    int64_t mx = 0;
    for (int h = 0; h < im->K; h++) mx = im->hs[(size_t)layer * im->K + h].n > mx ? im->hs[(size_t)layer * im->K + h].n : mx;
    return mx;
}

static void kv_reset(kvc_cache *c) {
    kv_impl *im = c->impl;
    for (size_t i = 0; i < (size_t)im->L * im->K; i++) {
        hstore *s = &im->hs[i];
        s->n = 0;
        for (int k = 0; k < 2; k++) {
            s->n_enc[k] = 0;
            s->live_blocks[k] = 0;
            for (int64_t j = 0; j < s->nbs[k]; j++) s->bref[k][j] = 0;
        }
        s->version++;
    }
    for (int i = 0; i < im->K * 2; i++) im->mm[i].layer = -1;
    im->appended = im->evicted = 0;
    if (im->side) kvc_side_reset(im->side);
    if (im->keep->ops->reset) im->keep->ops->reset(im->keep);
}

static void kv_free(kvc_cache *c) {
    if (!c) return;
    kv_impl *im = c->impl;
    if (im) {
        for (size_t i = 0; im->hs && i < (size_t)im->L * im->K; i++) {
            hstore *s = &im->hs[i];
            free(s->pos);
            free(s->state);
            for (int k = 0; k < 2; k++) {
                free(s->rows[k]);
                free(s->blk[k]);
                free(s->raw[k]);
                free(s->bdata[k]);
                free(s->bref[k]);
            }
        }
        for (int h = 0; im->sc && h < im->K; h++) {
            hscratch *scr = &im->sc[h];
            free(scr->kr), free(scr->z), free(scr->tmp), free(scr->tmp2), free(scr->mask), free(scr->score);
            free(scr->bp), free(scr->probs), free(scr->qg), free(scr->pos2), free(scr->rprobs);
        }
        for (int i = 0; im->mm && i < im->K * 2; i++) free(im->mm[i].rows[0]), free(im->mm[i].rows[1]);
        free(im->hs), free(im->sc), free(im->mm), free(im->rb), free(im->bb), free(im->reused), free(im->latent);
        kvc_rope_table_free(&im->rope);
        kvc_side_free(im->side);
        kvc_repr_free(im->repr);
        kvc_keep_free(im->keep);
        free(im);
    }
    free(c);
}

static int kv_set_budget(kvc_cache *c, int64_t ref, kvc_err *err) {
    kv_impl *im = c->impl;
    if (!im->keep->evicts) return 0;
    if (ref < 0) {
        im->ref = -1;
        return 0;
    }
    const kvc_keep_budget *b = &im->keep->budget;
    int64_t budget = b->budget_tokens > 0 ? b->budget_tokens : (int64_t)llround(b->budget_frac * (double)ref);
    if (budget < (int64_t)b->sinks + b->window || budget < 1) {
        char what[96];
        if (b->budget_tokens > 0) snprintf(what, sizeof what, "%lld tokens", (long long)budget);
        else snprintf(what, sizeof what, "%g of %lld tokens = %lld", b->budget_frac, (long long)ref, (long long)budget);
        return kvc_fail(err, "budget %s is smaller than sinks %d + window %d: raise the budget or lower sinks/window",
                        what, b->sinks, b->window);
    }
    im->ref = ref;
    im->budget = budget;
    return 0;
}

static const kvc_cache_ops KV_OPS = {
    .name = "compressed",
    .append = kv_append,
    .attend = kv_attend,
    .end_step = kv_end_step,
    .bytes = kv_bytes,
    .n_tokens = kv_n_tokens,
    .reset = kv_reset,
    .free = kv_free,
    .set_budget = kv_set_budget,
};

/* ----------------------------------------------------------------- creation ------ */

/* Checks and builds what shared budgets and retrieval need: neither works with heads whose
 * tokens follow the layer below (a reuse plan), and retrieval makes its side store. */
static int new_extensions(kv_impl *im, const kvc_cache_shape *shape, kvc_err *err) {
    const kvc_keep *k = im->keep;
    int followers = 0;
    for (int i = 0; i < im->L * im->K; i++) followers |= im->hs[i].follower;
    if (k->evicts && k->budget.share != KVC_SHARE_HEAD && followers)
        return kvc_fail(err, "share=layer|global needs a representation without cross-layer reuse (%s): use reuse=off",
                        im->repr->spec);
    if (k->retrieval.r < 1) return 0;
    if (followers)
        return kvc_fail(err, "retrieve= needs a representation without cross-layer reuse (%s): use reuse=off", im->repr->spec);
    im->side = kvc_side_new(shape->n_layer, shape->n_head_kv, im->G, shape->head_dim, &k->retrieval, err);
    return im->side ? 0 : -1;
}

kvc_cache *kvc_kvcache_new(const kvc_cache_shape *shape, const char *repr, const char *keep, const char *fingerprint,
                       kvc_err *err) {
    const kvc_cache_shape *s = shape;
    if (repr && !strncmp(repr, "tc:", 3)) { /* a transform codec has its own cache: codec/tc_cache.c */
        if (s->n_layer < 1 || s->n_head < 1 || s->n_head_kv < 1 || s->head_dim < 2 || s->head_dim % 2 ||
            s->n_head % s->n_head_kv || s->max_tokens < 1) {
            kvc_fail(err, "cache: invalid shape (layers %d, heads %d/%d, head_dim %d, capacity %d)", s->n_layer,
                     s->n_head, s->n_head_kv, s->head_dim, s->max_tokens);
            return NULL;
        }
        return kvc_tccache_new(s, repr + 3, keep, fingerprint, err);
    }
    if (s->n_layer < 1 || s->n_head < 1 || s->n_head_kv < 1 || s->head_dim < 2 || s->head_dim % 2 ||
        s->n_head % s->n_head_kv || s->max_tokens < 1) {
        kvc_fail(err, "cache: invalid shape (layers %d, heads %d/%d, head_dim %d, capacity %d)", s->n_layer, s->n_head,
                 s->n_head_kv, s->head_dim, s->max_tokens);
        return NULL;
    }
    kvc_cache *c = calloc(1, sizeof *c);
    kv_impl *im = calloc(1, sizeof *im);
    if (!c || !im) {
        free(c), free(im);
        kvc_fail(err, "out of memory");
        return NULL;
    }
    c->ops = &KV_OPS;
    c->shape = *s;
    c->impl = im;
    im->L = s->n_layer, im->K = s->n_head_kv, im->H = s->n_head, im->G = s->n_head / s->n_head_kv, im->D = s->head_dim;
    im->ref = -1;
    kvc_repr_env env = {*s, fingerprint};
    im->repr = kvc_repr_new(repr && *repr ? repr : "f16", &env, err);
    if (!im->repr) goto fail;
    im->keep = kvc_keep_new(keep && *keep ? keep : "full", s, err);
    if (!im->keep) goto fail;
    const size_t n3 = (size_t)im->L * im->K * 2;
    im->rb = calloc(n3, sizeof *im->rb);
    im->bb = calloc(n3, sizeof *im->bb);
    im->reused = calloc(n3, 1);
    im->latent = calloc((size_t)im->L * im->K, sizeof *im->latent);
    im->hs = calloc((size_t)im->L * im->K, sizeof *im->hs);
    im->mm = calloc((size_t)im->K * 2, sizeof *im->mm);
    im->sc = calloc((size_t)im->K, sizeof *im->sc);
    if (!im->rb || !im->bb || !im->reused || !im->latent || !im->hs || !im->mm || !im->sc) {
        kvc_fail(err, "out of memory");
        goto fail;
    }
    const kvc_repr_ops *ro = im->repr->ops;
    for (int k = 0; k < 2; k++) {
        im->brows[k] = ro->block_rows ? ro->block_rows(im->repr, k) : 1;
        if (im->brows[k] < 1) {
            kvc_fail(err, "representation %s: block of %d rows", im->repr->spec, im->brows[k]);
            goto fail;
        }
    }
    for (int l = 0; l < im->L; l++)
        for (int h = 0; h < im->K; h++) {
            for (int k = 0; k < 2; k++) {
                size_t i = IDX3(im, l, h, k);
                im->reused[i] = ro->reused && ro->reused(im->repr, l, h, k);
                if (im->reused[i] && (l == 0 || !ro->predict)) {
                    kvc_fail(err, "representation %s: layer %d head %d reused without a layer below", im->repr->spec, l, h);
                    goto fail;
                }
                im->rb[i] = im->reused[i] ? 0 : ro->row_bytes(im->repr, l, h, k);
                im->bb[i] = im->reused[i] || !ro->block_bytes ? 0 : ro->block_bytes(im->repr, l, h, k);
                if (im->reused[i]) im->hs[(size_t)l * im->K + h].follower = 1;
            }
        }
    if (new_extensions(im, s, err)) goto fail;
    /* values in latent space when the decoder is linear and no layer above needs them decoded
     * (and no retrieval adds decoded rows after them) */
    for (int l = 0; l < im->L; l++)
        for (int h = 0; h < im->K; h++) {
            int R = ro->latent_dim && ro->decode_latent && ro->linear_decoder ? ro->latent_dim(im->repr, l, h) : 0;
            if (im->reused[IDX3(im, l, h, KV)] || (l + 1 < im->L && im->reused[IDX3(im, l + 1, h, KV)]) ||
                im->brows[KV] != 1 || im->side)
                R = 0;
            im->latent[(size_t)l * im->K + h] = R > 0 ? R : 0;
        }
    for (int i = 0; i < im->K * 2; i++) im->mm[i].layer = -1;
    if (kvc_rope_table_init(&im->rope, im->D, s->rope_base) || kvc_rope_table_reserve(&im->rope, s->max_tokens)) {
        kvc_fail(err, "out of memory");
        goto fail;
    }
    char kd[256] = "";
    if (im->keep->ops->describe) im->keep->ops->describe(im->keep, kd, sizeof kd);
    const kvc_keep_budget *b = &im->keep->budget;
    if (im->keep->evicts) {
        char bud[48];
        if (b->budget_tokens > 0) snprintf(bud, sizeof bud, "%lld", (long long)b->budget_tokens);
        else snprintf(bud, sizeof bud, "%g", b->budget_frac);
        char ext[400] = "";
        const kvc_keep_retrieval *rt = &im->keep->retrieval;
        int at = 0;
        if (b->share != KVC_SHARE_HEAD)
            at += snprintf(ext + at, sizeof ext - at, ",share=%s,floor=%g", b->share == KVC_SHARE_LAYER ? "layer" : "global",
                           b->floor);
        if (rt->r > 0 && at >= 0 && (size_t)at < sizeof ext)
            snprintf(ext + at, sizeof ext - at, ",retrieve=%d,rbits=%d,rstore=int%d,rerank=%d,rprobe=%s%s%s", rt->r, rt->bits,
                     rt->qbits, rt->rerank, rt->probe_each ? "each" : "mean", rt->spill[0] ? ",spill=" : "", rt->spill);
        snprintf(im->desc, sizeof im->desc, "repr=%s keep=%s:budget=%s,sinks=%d,window=%d%s%s%s", im->repr->spec,
                 im->keep->ops->name, bud, b->sinks, b->window, kd[0] ? "," : "", kd, ext);
    } else {
        snprintf(im->desc, sizeof im->desc, "repr=%s keep=%s", im->repr->spec, im->keep->ops->name);
    }
    return c;
fail:
    kv_free(c);
    return NULL;
}

const char *kvc_kvcache_describe(const kvc_cache *c) {
    if (c->ops != &KV_OPS) return c->ops->describe ? c->ops->describe(c) : c->ops->name;
    return ((const kv_impl *)c->impl)->desc;
}

void kvc_kvcache_get_stats(const kvc_cache *c, kvcache_stats *st) {
    memset(st, 0, sizeof *st);
    st->bytes = kvc_cache_bytes(c);
    if (c->ops != &KV_OPS && c->ops->stats) {
        c->ops->stats(c, &st->appended, &st->held, &st->evicted);
        return;
    }
    if (c->ops != &KV_OPS) {
        st->appended = kvc_cache_n_tokens(c, 0);
        st->held = st->appended * c->shape.n_layer * c->shape.n_head_kv;
        return;
    }
    const kv_impl *im = c->impl;
    st->appended = im->appended;
    st->evicted = im->evicted;
    for (size_t i = 0; i < (size_t)im->L * im->K; i++) st->held += im->hs[i].n;
    if (im->side) {
        st->side_tokens = kvc_side_tokens(im->side);
        st->side_ram_bytes = kvc_side_ram_bytes(im->side);
        st->side_disk_bytes = kvc_side_disk_bytes(im->side);
        st->retrieved = kvc_side_retrieved(im->side);
    }
}
