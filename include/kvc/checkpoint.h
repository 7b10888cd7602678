/* checkpoint.h - the codec checkpoint (HDF5, docs/formats.md) as inference reads it (codec
 * layer): per layer, K and V, the exported autoencoders with BatchNorm folded, their
 * validation errors, the cross-layer reuse plan, and the model it was trained for. Writing it
 * and the raw trainer state for resuming are in kvc/trainer.h (train layer). */
#ifndef KVC_CHECKPOINT_H
#define KVC_CHECKPOINT_H

#include "kvc/aenet.h"
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

static inline int codec_index(const kvc_codec *c, int layer, int kind, int slot) {
    return (layer * 2 + kind) * c->slots + slot;
}

/* Allocates an empty codec for meta (no networks yet). */
kvc_codec *kvc_codec_new(const kvc_codec_meta *meta, kvc_err *err);
void kvc_codec_free(kvc_codec *c);

/* Group path of one network inside a checkpoint: "layer_LL/k/slot_S" (kind 0 k, 1 v). */
void kvc_codec_net_path(char *buf, size_t cap, int layer, int kind, int slot);
/* Reads a checkpoint; NULL with err on a missing/corrupt file or a format/version mismatch. */
kvc_codec *kvc_codec_load(const char *path, kvc_err *err);
/* Checks that the codec was made for this model: fingerprint and shapes. -1 with err that says
 * which codec and which model differ, and what to do. */
int kvc_codec_check_model(const kvc_codec *c, const char *fingerprint, int n_layer, int n_head_kv, int head_dim,
                      kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
