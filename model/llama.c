/* llama.c - loads a Llama-architecture GGUF model and runs its forward pass in f32:
 * embeddings, RMSNorm, RoPE (adjacent pairs, as GGUF stores Q/K), grouped-query attention
 * through the KV cache interface, SwiGLU feed-forward and the (tied) output projection.
 * Letters: N batch tokens, V vocab, E embedding, H heads, K kv heads, D head_dim, F ffn. */
#include "kvc/model.h"

#include "kvc/kernels.h"
#include "kvc/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ loading ------ */

/* Looks up a tensor and checks its shape (ne0 = input dim, ne1 = output dim or 1). */
static const gguf_tensor *need_tensor(const gguf_file *f, const char *name, uint64_t ne0, uint64_t ne1,
                                      kvc_err *err) {
    const gguf_tensor *t = kvc_gguf_find_tensor(f, name);
    if (!t) { kvc_fail(err, "model lacks tensor '%s'", name); return NULL; }
    uint64_t got1 = t->n_dims > 1 ? t->ne[1] : 1;
    if (t->ne[0] != ne0 || got1 != ne1 || t->n_dims > 2) {
        kvc_fail(err, "tensor '%s' has shape [%llu, %llu], expected [%llu, %llu]", name,
                 (unsigned long long)t->ne[0], (unsigned long long)got1, (unsigned long long)ne0,
                 (unsigned long long)ne1);
        return NULL;
    }
    if (!kvc_ggml_type_supported(t->type)) {
        kvc_fail(err, "tensor '%s' has type %s, which kvcodec cannot dequantize yet", name, kvc_ggml_type_name(t->type));
        return NULL;
    }
    return t;
}

/* A pending dequantization: tensor t into dst. */
typedef struct {
    const gguf_tensor *t;
    float *dst;
} deq_job;

typedef struct {
    deq_job *jobs;
    int n, cap;
    size_t floats;
} deq_plan;

/* Reserves arena space for tensor t and returns its future offset (in floats). */
static size_t plan_add(deq_plan *p, const gguf_tensor *t) {
    if (p->n == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 64;
        p->jobs = realloc(p->jobs, (size_t)p->cap * sizeof *p->jobs);
    }
    size_t off = p->floats;
    p->jobs[p->n].t = t;
    p->jobs[p->n].dst = (float *)(uintptr_t)off; /* rebased once the arena exists */
    p->n++;
    p->floats += (t->n_elements + 15) / 16 * 16;
    return off;
}

static void matrix_from(kvc_matrix *m, const gguf_tensor *t, size_t arena_off) {
    uint32_t be, bb;
    kvc_ggml_type_block(t->type, &be, &bb);
    m->q = t->data;
    m->type = t->type;
    m->f = (const float *)(uintptr_t)arena_off;
    m->cols = (int64_t)t->ne[0];
    m->rows = (int64_t)(t->n_dims > 1 ? t->ne[1] : 1);
    m->row_bytes = (size_t)(t->ne[0] / be * bb);
}

static void rebase(const float **p, float *arena) { *p = arena + (size_t)(uintptr_t)*p; }

/* 64-bit FNV-1a over all tensor data, in 8-byte words: identifies the exact weights. */
static void fingerprint(const gguf_file *f, char out[17]) {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const uint8_t *p = f->tensors[i].data;
        uint64_t n = f->tensors[i].nbytes, j = 0;
        for (; j + 8 <= n; j += 8) {
            uint64_t w;
            memcpy(&w, p + j, 8);
            h = (h ^ w) * 1099511628211ull;
        }
        for (; j < n; j++) h = (h ^ p[j]) * 1099511628211ull;
    }
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

static int read_hparams(const gguf_file *f, kvc_hparams *hp, kvc_err *err) {
    if (kvc_gguf_get_str(f, "general.architecture", hp->arch, sizeof hp->arch, err)) return -1;
    if (strcmp(hp->arch, "llama") != 0)
        return kvc_fail(err, "unsupported architecture '%s' (kvcodec runs Llama-architecture models)", hp->arch);
    if (kvc_gguf_get_str(f, "general.name", hp->name, sizeof hp->name, NULL)) snprintf(hp->name, sizeof hp->name, "?");
    uint32_t u;
#define GET_U(key, field) \
    do { if (kvc_gguf_get_u32(f, key, &u, err)) return -1; hp->field = (int)u; } while (0)
    GET_U("llama.block_count", n_layer);
    GET_U("llama.embedding_length", n_embd);
    GET_U("llama.attention.head_count", n_head);
    GET_U("llama.feed_forward_length", n_ff);
    GET_U("llama.context_length", n_ctx_train);
#undef GET_U
    hp->n_head_kv = hp->n_head;
    if (kvc_gguf_get_u32(f, "llama.attention.head_count_kv", &u, NULL) == 0) hp->n_head_kv = (int)u;
    hp->rope_base = 10000.0f;
    kvc_gguf_get_f32(f, "llama.rope.freq_base", &hp->rope_base, NULL);
    if (kvc_gguf_get_f32(f, "llama.attention.layer_norm_rms_epsilon", &hp->rms_eps, err)) return -1;
    if (hp->n_layer < 1 || hp->n_layer > 1024 || hp->n_embd < 1 || hp->n_head < 1 || hp->n_head_kv < 1 ||
        hp->n_embd % hp->n_head || hp->n_head % hp->n_head_kv || hp->n_ff < 1)
        return kvc_fail(err, "inconsistent model dimensions (layers %d, embd %d, heads %d/%d, ffn %d)", hp->n_layer,
                        hp->n_embd, hp->n_head, hp->n_head_kv, hp->n_ff);
    hp->head_dim = hp->n_embd / hp->n_head;
    if (kvc_gguf_get_u32(f, "llama.rope.dimension_count", &u, NULL) == 0 && (int)u != hp->head_dim)
        return kvc_fail(err, "partial RoPE (%u of %d dims) is not supported", u, hp->head_dim);
    if (hp->head_dim % 2) return kvc_fail(err, "odd head_dim %d is not supported", hp->head_dim);
    char st[32];
    if (kvc_gguf_get_str(f, "llama.rope.scaling.type", st, sizeof st, NULL) == 0 && strcmp(st, "none") != 0)
        return kvc_fail(err, "RoPE scaling '%s' is not supported yet", st);
    return 0;
}

kvc_model *kvc_model_load(const char *path, kvc_err *err) {
    kvc_model *m = calloc(1, sizeof *m);
    if (!m) { kvc_fail(err, "out of memory"); return NULL; }
    deq_plan plan = {0};
    char name[96];
    m->gguf = kvc_gguf_open(path, err);
    if (!m->gguf) goto fail;
    const gguf_file *f = m->gguf;
    kvc_hparams *hp = &m->hp;
    if (read_hparams(f, hp, err)) goto fail;
    const int E = hp->n_embd, HD = hp->n_head * hp->head_dim, KD = hp->n_head_kv * hp->head_dim, F = hp->n_ff;

    const gguf_tensor *te = kvc_gguf_find_tensor(f, "token_embd.weight");
    if (!te || te->n_dims != 2 || te->ne[0] != (uint64_t)E) {
        kvc_fail(err, "model lacks a token_embd.weight of width %d", E);
        goto fail;
    }
    hp->n_vocab = (int)te->ne[1];
    if (!(te = need_tensor(f, "token_embd.weight", E, hp->n_vocab, err))) goto fail;
    matrix_from(&m->tok_embd, te, plan_add(&plan, te));
    const gguf_tensor *t = need_tensor(f, "output_norm.weight", E, 1, err);
    if (!t || t->type != GGML_T_F32) { if (t) kvc_fail(err, "output_norm.weight must be F32"); goto fail; }
    m->out_norm = t->data;
    if (kvc_gguf_find_tensor(f, "output.weight")) {
        if (!(t = need_tensor(f, "output.weight", E, hp->n_vocab, err))) goto fail;
        matrix_from(&m->output, t, plan_add(&plan, t));
    } else {
        m->output = m->tok_embd; /* tied embeddings */
    }
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) { kvc_fail(err, "out of memory"); goto fail; }
    for (int l = 0; l < hp->n_layer; l++) {
        kvc_layer *L = &m->layers[l];
#define NORM(field, nm)                                                                          \
    do {                                                                                       \
        snprintf(name, sizeof name, "blk.%d." nm ".weight", l);                                \
        if (!(t = need_tensor(f, name, E, 1, err))) goto fail;                                 \
        if (t->type != GGML_T_F32) { kvc_fail(err, "%s must be F32", name); goto fail; }       \
        L->field = t->data;                                                                     \
    } while (0)
#define MAT(field, nm, in, out)                                                                \
    do {                                                                                       \
        snprintf(name, sizeof name, "blk.%d." nm ".weight", l);                                \
        if (!(t = need_tensor(f, name, in, out, err))) goto fail;                              \
        matrix_from(&L->field, t, plan_add(&plan, t));                                         \
    } while (0)
        NORM(attn_norm, "attn_norm");
        NORM(ffn_norm, "ffn_norm");
        MAT(wq, "attn_q", E, HD);
        MAT(wk, "attn_k", E, KD);
        MAT(wv, "attn_v", E, KD);
        MAT(wo, "attn_output", HD, E);
        MAT(w_gate, "ffn_gate", E, F);
        MAT(w_up, "ffn_up", E, F);
        MAT(w_down, "ffn_down", F, E);
#undef NORM
#undef MAT
    }
    m->arena = kvc_malloc_array(plan.floats, sizeof(float));
    if (!m->arena) { kvc_fail(err, "out of memory for %zu MB of f32 weights", plan.floats * 4 >> 20); goto fail; }
    m->arena_floats = plan.floats;
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : bad)
    for (int j = 0; j < plan.n; j++) {
        float *dst = m->arena + (size_t)(uintptr_t)plan.jobs[j].dst;
        bad |= kvc_dequantize_row(plan.jobs[j].t->type, plan.jobs[j].t->data, dst, (int64_t)plan.jobs[j].t->n_elements);
    }
    if (bad) { kvc_fail(err, "dequantization failed"); goto fail; }
    rebase(&m->tok_embd.f, m->arena);
    if (m->output.q == m->tok_embd.q) m->output = m->tok_embd;
    else rebase(&m->output.f, m->arena);
    for (int l = 0; l < hp->n_layer; l++) {
        kvc_layer *L = &m->layers[l];
        kvc_matrix *ms[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) rebase(&ms[i]->f, m->arena);
    }
    free(plan.jobs);
    plan.jobs = NULL;
    m->tok = kvc_tokenizer_open(f, err);
    if (!m->tok) goto fail;
    if (kvc_tokenizer_vocab_size(m->tok) != hp->n_vocab) {
        kvc_fail(err, "tokenizer has %d tokens but the embedding has %d rows", kvc_tokenizer_vocab_size(m->tok),
                 hp->n_vocab);
        goto fail;
    }
    fingerprint(f, m->fingerprint);
    return m;
fail:
    free(plan.jobs);
    kvc_model_free(m);
    return NULL;
}

void kvc_model_free(kvc_model *m) {
    if (!m) return;
    kvc_tokenizer_free(m->tok);
    free(m->layers);
    free(m->arena);
    kvc_gguf_close(m->gguf);
    free(m);
}

kvc_cache_shape kvc_model_cache_shape(const kvc_model *m, int max_tokens) {
    kvc_cache_shape s = {m->hp.n_layer, m->hp.n_head, m->hp.n_head_kv, m->hp.head_dim, m->hp.rope_base, max_tokens};
    return s;
}

/* ------------------------------------------------------------------ scratch ------ */

struct kvc_run {
    int max_batch;
    float *x;    /* (N, E) residual stream */
    float *xb;   /* (N, E) normed input / branch output */
    float *q;    /* (N, H*D) */
    float *k;    /* (N, K*D) */
    float *v;    /* (N, K*D) */
    float *att;  /* (N, H*D) */
    float *hb;   /* (N, F) */
    float *hb2;  /* (N, F) */
    kvc_tap_fn tap;
    void *tap_ctx;
    kvc_rope_table rope; /* the queries' rotation, the same function the caches use for keys */
};

void kvc_run_set_tap(kvc_run *r, kvc_tap_fn fn, void *ctx) {
    r->tap = fn;
    r->tap_ctx = ctx;
}

kvc_run *kvc_run_new(const kvc_model *m, int max_batch, kvc_err *err) {
    const kvc_hparams *hp = &m->hp;
    if (max_batch < 1) max_batch = 1;
    kvc_run *r = calloc(1, sizeof *r);
    if (!r) { kvc_fail(err, "out of memory"); return NULL; }
    size_t N = (size_t)max_batch, HD = (size_t)hp->n_head * hp->head_dim, KD = (size_t)hp->n_head_kv * hp->head_dim;
    r->max_batch = max_batch;
    if (kvc_rope_table_init(&r->rope, hp->head_dim, hp->rope_base)) {
        free(r);
        kvc_fail(err, "RoPE: head_dim %d or base %g unusable", hp->head_dim, hp->rope_base);
        return NULL;
    }
    r->x = kvc_malloc_array(N * hp->n_embd, sizeof(float));
    r->xb = kvc_malloc_array(N * hp->n_embd, sizeof(float));
    r->q = kvc_malloc_array(N * HD, sizeof(float));
    r->k = kvc_malloc_array(N * KD, sizeof(float));
    r->v = kvc_malloc_array(N * KD, sizeof(float));
    r->att = kvc_malloc_array(N * HD, sizeof(float));
    r->hb = kvc_malloc_array(N * hp->n_ff, sizeof(float));
    r->hb2 = kvc_malloc_array(N * hp->n_ff, sizeof(float));
    if (!r->x || !r->xb || !r->q || !r->k || !r->v || !r->att || !r->hb || !r->hb2) {
        kvc_run_free(r);
        kvc_fail(err, "out of memory for a batch of %d tokens", max_batch);
        return NULL;
    }
    return r;
}

void kvc_run_free(kvc_run *r) {
    if (!r) return;
    free(r->x); free(r->xb); free(r->q); free(r->k); free(r->v); free(r->att); free(r->hb); free(r->hb2);
    kvc_rope_table_free(&r->rope);
    free(r);
}

/* ------------------------------------------------------------------ forward ------ */

/* One batch of n <= max_batch tokens. logits: (n, V) rows when logits_all, else (V). */
static int forward_batch(const kvc_model *m, kvc_run *r, kvc_cache *c, const int32_t *tokens, const int32_t *pos,
                         int n, float *logits, int logits_all, kvc_err *err) {
    const kvc_hparams *hp = &m->hp;
    const int E = hp->n_embd, V = hp->n_vocab;

    /* embeddings: dequantize the rows of the tokens we need */
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= V) return kvc_fail(err, "token id %d out of range [0, %d)", tokens[t], V);
        memcpy(r->x + (size_t)t * E, m->tok_embd.f + (size_t)tokens[t] * E, (size_t)E * sizeof(float));
    }

    for (int l = 0; l < hp->n_layer; l++) {
        const kvc_layer *L = &m->layers[l];
        /* attention block */
        kvc_rmsnorm_cpu(r->xb, r->x, L->attn_norm, n, E, hp->rms_eps);
        kvc_matmul_cpu(r->q, r->xb, &L->wq, n);
        kvc_matmul_cpu(r->k, r->xb, &L->wk, n);
        kvc_matmul_cpu(r->v, r->xb, &L->wv, n);
        if (r->tap && r->tap(r->tap_ctx, l, r->q, r->k, r->v, pos, n, err)) return -1;
        if (l == 0) {
            int32_t pmax = 0;
            for (int t = 0; t < n; t++) {
                if (pos[t] < 0) return kvc_fail(err, "negative position %d", pos[t]);
                pmax = pos[t] > pmax ? pos[t] : pmax;
            }
            if (kvc_rope_table_reserve(&r->rope, (int64_t)pmax + 1))
                return kvc_fail(err, "out of memory for RoPE angles up to position %d", pmax);
        }
        kvc_rope_heads(&r->rope, r->q, pos, n, hp->n_head);
        if (kvc_cache_append(c, l, r->k, r->v, pos, n, err)) return -1; /* keys before RoPE */
        if (kvc_cache_attend(c, l, r->q, pos, n, r->att, err)) return -1;
        kvc_matmul_cpu(r->xb, r->att, &L->wo, n);
        for (size_t i = 0; i < (size_t)n * E; i++) r->x[i] += r->xb[i];
        /* feed-forward block */
        kvc_rmsnorm_cpu(r->xb, r->x, L->ffn_norm, n, E, hp->rms_eps);
        kvc_matmul_cpu(r->hb, r->xb, &L->w_gate, n);
        kvc_matmul_cpu(r->hb2, r->xb, &L->w_up, n);
        kvc_swiglu_cpu(r->hb, r->hb2, (int64_t)n * hp->n_ff);
        kvc_matmul_cpu(r->xb, r->hb, &L->w_down, n);
        for (size_t i = 0; i < (size_t)n * E; i++) r->x[i] += r->xb[i];
    }
    if (kvc_cache_end_step(c, err)) return -1;

    /* final norm and output projection */
    if (!logits) return 0;
    if (logits_all) {
        kvc_rmsnorm_cpu(r->xb, r->x, m->out_norm, n, E, hp->rms_eps);
        kvc_matmul_cpu(logits, r->xb, &m->output, n);
    } else {
        kvc_rmsnorm_cpu(r->xb, r->x + (size_t)(n - 1) * E, m->out_norm, 1, E, hp->rms_eps);
        kvc_matmul_cpu(logits, r->xb, &m->output, 1);
    }
    return 0;
}

int kvc_model_forward(const kvc_model *m, kvc_run *r, kvc_cache *c, const int32_t *tokens, const int32_t *pos, int n,
                  float *logits, int logits_all, kvc_err *err) {
    if (n < 1) return kvc_fail(err, "kvc_model_forward: no tokens");
    const size_t V = (size_t)m->hp.n_vocab;
    for (int done = 0; done < n;) {
        int nb = n - done < r->max_batch ? n - done : r->max_batch;
        int last = done + nb == n;
        float *out = NULL;
        if (logits && logits_all) out = logits + (size_t)done * V;
        else if (logits && last) out = logits;
        if (forward_batch(m, r, c, tokens + done, pos + done, nb, out, logits_all, err)) return -1;
        done += nb;
    }
    return 0;
}
