/* model.h - a Llama-architecture model loaded from GGUF and its forward pass (f32 compute).
 * Dimension letters: V vocab, E embedding, H query heads, K kv heads, D head_dim, F ffn. */
#ifndef KVC_MODEL_H
#define KVC_MODEL_H

#include "kvc/cache.h"
#include "kvc/gguf.h"
#include "kvc/ops.h"
#include "kvc/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char arch[32];
    char name[128];
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train;
    float rope_base, rms_eps;
} kvc_hparams;

typedef struct {
    const float *attn_norm; /* (E) */
    kvc_matrix wq;          /* (H*D, E) */
    kvc_matrix wk;          /* (K*D, E) */
    kvc_matrix wv;          /* (K*D, E) */
    kvc_matrix wo;          /* (E, H*D) */
    const float *ffn_norm;  /* (E) */
    kvc_matrix w_gate;      /* (F, E) */
    kvc_matrix w_up;        /* (F, E) */
    kvc_matrix w_down;      /* (E, F) */
} kvc_layer;

typedef struct {
    kvc_hparams hp;
    gguf_file *gguf;
    kvc_tokenizer *tok;
    kvc_matrix tok_embd;    /* (V, E) */
    const float *out_norm;  /* (E) */
    kvc_matrix output;      /* (V, E); the embedding matrix when tied */
    kvc_layer *layers;      /* (n_layer) */
    float *arena;           /* owns every dequantized f32 weight */
    size_t arena_floats;
    char fingerprint[17];   /* 64-bit FNV-1a of the tensor data, hex */
} kvc_model;

/* Loads a GGUF model: checks the architecture and shapes, dequantizes weights to f32 and
 * builds the tokenizer. NULL with err (naming the problem) on failure. */
kvc_model *kvc_model_load(const char *path, kvc_err *err);
void kvc_model_free(kvc_model *m);

/* Scratch memory for forward passes of up to max_batch tokens at a time. */
typedef struct kvc_run kvc_run;
kvc_run *kvc_run_new(const kvc_model *m, int max_batch, kvc_err *err);
void kvc_run_free(kvc_run *r);

/* An observer of every layer's projections during a forward pass (used by capture):
 * q (N, H*D) and k, v (N, K*D), all before RoPE, for the n tokens at pos. Returns 0 to go
 * on, or -1 (with err filled) to abort the forward pass. */
typedef int (*kvc_tap_fn)(void *ctx, int layer, const float *q, const float *k, const float *v,
                          const int32_t *pos, int n, kvc_err *err);
void kvc_run_set_tap(kvc_run *r, kvc_tap_fn fn, void *ctx);

/* Runs n tokens (any n >= 1; split internally into batches) at positions pos through the
 * model, appending their K/V to the cache. Logits: if logits_all, out receives (n, V);
 * otherwise (V) for the last token only; out may be NULL. Returns 0 or -1 with err. */
int kvc_model_forward(const kvc_model *m, kvc_run *r, kvc_cache *c, const int32_t *tokens,
                  const int32_t *pos, int n, float *logits, int logits_all, kvc_err *err);

/* Builds the cache shape this model needs for up to max_tokens tokens. */
kvc_cache_shape kvc_model_cache_shape(const kvc_model *m, int max_tokens);

#ifdef __cplusplus
}
#endif
#endif
