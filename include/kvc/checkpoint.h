/* checkpoint.h - the codec checkpoint (HDF5, docs/formats.md): what a trained codec holds
 * for inference (per layer, K and V, the exported autoencoders with BatchNorm folded, their
 * validation errors, the cross-layer reuse plan) and, for resuming training, the raw
 * trainer state. Written atomically (temporary file, fsync, rename). */
#ifndef KVC_CHECKPOINT_H
#define KVC_CHECKPOINT_H

#include "kvc/ae.h"
#include "kvc/reuse.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_CODEC_FORMAT "kvcodec-codec"
#define KVC_CODEC_FORMAT_VERSION 1

typedef struct {
    char model_name[128];
    char model_fingerprint[17];
    int n_layer, n_head_kv, head_dim;
    ae_config ae;
    int per_head;            /* 0: one autoencoder per (layer, K|V) shared by its KV heads; 1: one per head */
    char loss[16];           /* "mse" or "attn" */
    float mse_mix;
    char latent_quant[8];    /* "none" (quantisation is chosen at inference) */
    char data[512];          /* dataset file names, comma-separated */
    char corpus_sha256[65];
    int64_t n_train_tokens, n_val_tokens;
    int epochs, epochs_run, best_epoch;
    double best_val;         /* validation relative error (all K and V) of the exported weights */
    uint64_t seed;
    int batch_tokens;
    float lr, weight_decay, clip;
    char device[8];
    double train_seconds;
} kvc_codec_meta;

/* Slots: per_head ? n_head_kv : 1. Arrays indexed ((layer * 2 + kind) * slots + slot). */
typedef struct {
    kvc_codec_meta meta;
    int slots;
    ae_export *ae;           /* exported networks (zeroed where a layer has no codec) */
    unsigned char *trained;  /* (L) 1 when layer has K and V codecs */
    float *rel_err;          /* validation relative error of each network */
    reuse_plan *reuse;       /* NULL when no reuse analysis was stored */
} kvc_codec;

/* The resumable state of a training run. */
typedef struct {
    int epoch;               /* epochs completed */
    int64_t step;            /* optimiser steps taken */
    int bad_epochs;          /* epochs since the best validation (early stopping) */
    double best_val;
    int best_epoch;
} kvc_train_state;

static inline int codec_index(const kvc_codec *c, int layer, int kind, int slot) {
    return (layer * 2 + kind) * c->slots + slot;
}

/* Allocates an empty codec for meta (no networks yet). */
kvc_codec *kvc_codec_new(const kvc_codec_meta *meta, kvc_err *err);
void kvc_codec_free(kvc_codec *c);

/* Writes path atomically. models (same indexing as ae, NULL entries allowed) and st are the
 * raw trainer state for --resume; pass NULL for both to write an inference-only file. */
int kvc_codec_save(const char *path, const kvc_codec *c, ae_model *const *models, const kvc_train_state *st,
               kvc_err *err);
/* Reads a checkpoint; NULL with err on a missing/corrupt file or a format/version mismatch. */
kvc_codec *kvc_codec_load(const char *path, kvc_err *err);
/* Loads the raw trainer state into models (created by the caller with the checkpoint's
 * config) and st; -1 with err when the file holds no trainer state or shapes differ. */
int kvc_codec_load_train_state(const char *path, const kvc_codec *c, ae_model **models, kvc_train_state *st,
                           kvc_err *err);
/* Checks that the codec was made for this model: fingerprint and shapes. -1 with err that says
 * which codec and which model differ, and what to do. */
int kvc_codec_check_model(const kvc_codec *c, const char *fingerprint, int n_layer, int n_head_kv, int head_dim,
                      kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
