/* batcher.c - chunk-aware shuffled minibatches of a KV dataset through a buffer of bounded
 * size: blocks of whole HDF5 chunks are read in a shuffled order, then their rows handed out
 * shuffled, so every row is seen once per epoch and reads stay sequential within chunks.
 * Shapes: N rows (tokens), H heads, D head_dim. */
#include "dataset_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_BLOCK 1024 /* block_tokens for files stored without chunking */
#define DEFAULT_BUFFER_BLOCKS 16

struct kvc_batcher {
    kvc_dataset *d;
    kvc_batch_opts o;      /* defaults filled in */
    int n_x;               /* n_layers_stored * 3 */
    unsigned char *want;   /* (n_x) */
    int64_t *rowe;         /* (n_x) floats per row */
    int64_t n_blocks;
    int64_t *blk;          /* (n_blocks) first global row of each block */
    int32_t *blk_n;        /* (n_blocks) rows of each block */
    int64_t *order;        /* (n_blocks) this epoch's block order */
    int64_t next;          /* next entry of order to load */
    int64_t *group;        /* (buffer_blocks) blocks being loaded, sorted by row */
    int64_t epoch;
    uint64_t rng;
    int64_t cap;           /* buffer rows */
    int64_t n_buf, cursor; /* rows loaded, rows handed out */
    int64_t *buf_tok;      /* (cap) */
    int32_t *buf_pos;      /* (cap) */
    float **buf_x;         /* [n_x] (cap, H, D) or NULL */
    int32_t *perm;         /* (cap) order in which buffer rows are handed out */
    int64_t *b_tok;        /* (batch) */
    int32_t *b_pos;        /* (batch) */
    float **b_x;           /* [n_x] (batch, H, D) or NULL */
    size_t bytes;          /* everything above */
};

/* Allocates n elements of size sz and counts them into bt->bytes; NULL on overflow/OOM. */
static void *bt_alloc(kvc_batcher *bt, int64_t n, size_t sz) {
    if (n < 1) n = 1;
    void *p = kvc_malloc_array((size_t)n, sz);
    if (p) bt->bytes += (size_t)n * sz;
    return p;
}

/* Starts epoch e: reseeds from (seed, e), draws the block order, empties the buffer. */
static void batcher_begin_epoch(kvc_batcher *bt, int64_t e) {
    bt->epoch = e;
    bt->rng = bt->o.seed ^ 0x6A09E667F3BCC909ull;
    bt->rng = kvc_rng_next(&bt->rng) + (uint64_t)e * 0xD1B54A32D192ED03ull;
    for (int64_t i = 0; i < bt->n_blocks; i++) bt->order[i] = i;
    if (bt->o.shuffle)
        for (int64_t i = bt->n_blocks - 1; i > 0; i--) {
            int64_t k = (int64_t)kvc_rng_below(&bt->rng, (uint64_t)i + 1), t = bt->order[i];
            bt->order[i] = bt->order[k];
            bt->order[k] = t;
        }
    bt->next = bt->n_buf = bt->cursor = 0;
}

/* qsort comparator for block indices (ascending = ascending rows). */
static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Loads the next buffer_blocks blocks of the epoch's order into the buffer (in file order,
 * merging adjacent blocks into single reads) and draws the order rows leave in. */
static int batcher_fill(kvc_batcher *bt, kvc_err *err) {
    int64_t g = bt->n_blocks - bt->next;
    if (g > bt->o.buffer_blocks) g = bt->o.buffer_blocks;
    memcpy(bt->group, bt->order + bt->next, (size_t)g * sizeof *bt->group);
    qsort(bt->group, (size_t)g, sizeof *bt->group, cmp_i64);
    bt->next += g;
    int64_t row = 0;
    for (int64_t i = 0; i < g;) {
        int64_t s = bt->blk[bt->group[i]], len = 0;
        do len += bt->blk_n[bt->group[i++]];
        while (i < g && bt->blk[bt->group[i]] == s + len);
        for (int x = 0; x < bt->n_x; x++)
            if (bt->want[x] && kvc_dataset_read(bt->d, x / 3, x % 3, s, len, bt->buf_x[x] + row * bt->rowe[x], err))
                return -1;
        if (kvc_dataset_read_positions(bt->d, s, len, bt->buf_pos + row, err)) return -1;
        for (int64_t r = 0; r < len; r++) bt->buf_tok[row + r] = s + r;
        row += len;
    }
    bt->n_buf = row;
    bt->cursor = 0;
    for (int64_t i = 0; i < row; i++) bt->perm[i] = (int32_t)i;
    if (bt->o.shuffle)
        for (int64_t i = row - 1; i > 0; i--) {
            int64_t k = (int64_t)kvc_rng_below(&bt->rng, (uint64_t)i + 1);
            int32_t t = bt->perm[i];
            bt->perm[i] = bt->perm[k];
            bt->perm[k] = t;
        }
    return 0;
}

kvc_batcher *kvc_batcher_new(kvc_dataset *d, const kvc_batch_opts *o, kvc_err *err) {
    const kvc_kv_info *in = &d->info;
    kvc_batch_opts op = *o;
    if (op.block_tokens == 0) op.block_tokens = d->f[0].chunk > 1 ? (int)d->f[0].chunk : DEFAULT_BLOCK;
    if (op.buffer_blocks == 0) op.buffer_blocks = DEFAULT_BUFFER_BLOCKS;
    if (op.begin < 0 || op.end > in->n_tokens || op.begin > op.end) { /* empty is fine: no batches */
        kvc_fail(err, "batcher range [%lld, %lld) is not within the dataset's %lld tokens", (long long)op.begin,
                 (long long)op.end, (long long)in->n_tokens);
        return NULL;
    }
    if (op.batch_tokens <= 0 || op.block_tokens < 0 || op.buffer_blocks < 0) {
        kvc_fail(err, "batcher: batch_tokens must be positive, block_tokens and buffer_blocks non-negative "
                 "(got %d, %d, %d)", op.batch_tokens, op.block_tokens, op.buffer_blocks);
        return NULL;
    }
    kvc_batcher *bt = calloc(1, sizeof *bt);
    if (!bt) {
        kvc_fail(err, "out of memory");
        return NULL;
    }
    bt->d = d;
    bt->o = op;
    bt->o.want = NULL;
    bt->n_x = in->n_layers_stored * 3;
    /* blocks on each file's own grid, so they align with its chunks and never span two files */
    int64_t B = op.block_tokens;
    for (int pass = 0; pass < 2; pass++) {
        int64_t nb = 0;
        for (int i = 0; i < d->n_files; i++) {
            const kv_file *f = &d->f[i];
            int64_t lo = op.begin > f->t0 ? op.begin : f->t0, hi = op.end < f->t0 + f->n ? op.end : f->t0 + f->n;
            for (int64_t s = lo, e; s < hi; s = e, nb++) {
                e = f->t0 + ((s - f->t0) / B + 1) * B;
                if (e > hi) e = hi;
                if (pass) {
                    bt->blk[nb] = s;
                    bt->blk_n[nb] = (int32_t)(e - s);
                }
            }
        }
        if (pass == 0) {
            bt->n_blocks = nb;
            bt->blk = bt_alloc(bt, nb, sizeof *bt->blk);
            bt->blk_n = bt_alloc(bt, nb, sizeof *bt->blk_n);
            bt->order = bt_alloc(bt, nb, sizeof *bt->order);
            if (!bt->blk || !bt->blk_n || !bt->order) goto oom;
        }
    }
    bt->cap = B * op.buffer_blocks;
    if (bt->cap > op.end - op.begin) bt->cap = op.end - op.begin;
    if (bt->cap > INT32_MAX) {
        kvc_fail(err, "batcher buffer of %lld rows is too large", (long long)bt->cap);
        goto fail;
    }
    int64_t nbt = op.batch_tokens;
    bt->want = bt_alloc(bt, bt->n_x, 1);
    bt->rowe = bt_alloc(bt, bt->n_x, sizeof *bt->rowe);
    bt->buf_x = calloc((size_t)bt->n_x + 1, sizeof *bt->buf_x);
    bt->b_x = calloc((size_t)bt->n_x + 1, sizeof *bt->b_x);
    bt->group = bt_alloc(bt, op.buffer_blocks, sizeof *bt->group);
    bt->buf_tok = bt_alloc(bt, bt->cap, sizeof *bt->buf_tok);
    bt->buf_pos = bt_alloc(bt, bt->cap, sizeof *bt->buf_pos);
    bt->perm = bt_alloc(bt, bt->cap, sizeof *bt->perm);
    bt->b_tok = bt_alloc(bt, nbt, sizeof *bt->b_tok);
    bt->b_pos = bt_alloc(bt, nbt, sizeof *bt->b_pos);
    if (!bt->want || !bt->rowe || !bt->buf_x || !bt->b_x || !bt->group || !bt->buf_tok || !bt->buf_pos || !bt->perm ||
        !bt->b_tok || !bt->b_pos)
        goto oom;
    bt->bytes += 2 * ((size_t)bt->n_x + 1) * sizeof *bt->buf_x;
    for (int x = 0; x < bt->n_x; x++) {
        bt->want[x] = o->want ? o->want[x] != 0 : 1;
        bt->rowe[x] = (int64_t)(x % 3 == KV_Q ? in->n_head : in->n_head_kv) * in->head_dim;
        if (!bt->want[x]) continue;
        bt->buf_x[x] = bt_alloc(bt, bt->cap * bt->rowe[x], sizeof(float));
        bt->b_x[x] = bt_alloc(bt, nbt * bt->rowe[x], sizeof(float));
        if (!bt->buf_x[x] || !bt->b_x[x]) goto oom;
    }
    batcher_begin_epoch(bt, 0);
    return bt;
oom:
    kvc_fail(err, "out of memory for the batch buffer (%lld rows of %d blocks x %d tokens per layer and kind)",
             (long long)bt->cap, op.buffer_blocks, op.block_tokens);
fail:
    kvc_batcher_free(bt);
    return NULL;
}

int kvc_batcher_next(kvc_batcher *bt, kvc_batch *b, kvc_err *err) {
    int64_t n = 0, want = bt->o.batch_tokens;
    while (n < want) {
        if (bt->cursor == bt->n_buf) {
            if (bt->next == bt->n_blocks) break;
            if (batcher_fill(bt, err)) {
                bt->n_buf = bt->cursor = 0;
                return -1;
            }
        }
        int64_t take = bt->n_buf - bt->cursor < want - n ? bt->n_buf - bt->cursor : want - n;
        const int32_t *p = bt->perm + bt->cursor;
        for (int64_t r = 0; r < take; r++) {
            bt->b_tok[n + r] = bt->buf_tok[p[r]];
            bt->b_pos[n + r] = bt->buf_pos[p[r]];
        }
        for (int x = 0; x < bt->n_x; x++) {
            if (!bt->want[x]) continue;
            size_t rb = (size_t)bt->rowe[x] * sizeof(float);
            float *dst = bt->b_x[x] + n * bt->rowe[x];
            if (!bt->o.shuffle) memcpy(dst, bt->buf_x[x] + bt->cursor * bt->rowe[x], (size_t)take * rb);
            else
                for (int64_t r = 0; r < take; r++) memcpy(dst + r * bt->rowe[x], bt->buf_x[x] + p[r] * bt->rowe[x], rb);
        }
        bt->cursor += take;
        n += take;
    }
    if (n == 0) { /* the epoch is over: the next call starts the next one */
        batcher_begin_epoch(bt, bt->epoch + 1);
        return 0;
    }
    b->n = (int)n;
    b->token = bt->b_tok;
    b->pos = bt->b_pos;
    b->x = (const float *const *)bt->b_x;
    return 1;
}

int64_t kvc_batcher_epoch(const kvc_batcher *bt) { return bt->epoch; }

size_t kvc_batcher_memory_bytes(const kvc_batcher *bt) { return bt->bytes; }

void kvc_batcher_free(kvc_batcher *bt) {
    if (!bt) return;
    for (int x = 0; bt->buf_x && x < bt->n_x; x++) free(bt->buf_x[x]);
    for (int x = 0; bt->b_x && x < bt->n_x; x++) free(bt->b_x[x]);
    free(bt->buf_x);
    free(bt->b_x);
    free(bt->want);
    free(bt->rowe);
    free(bt->blk);
    free(bt->blk_n);
    free(bt->order);
    free(bt->group);
    free(bt->buf_tok);
    free(bt->buf_pos);
    free(bt->perm);
    free(bt->b_tok);
    free(bt->b_pos);
    free(bt);
}
