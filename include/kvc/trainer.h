/* trainer.h - `kvcodec train`: fits every stored layer's K and V autoencoders on a KV
 * dataset (minibatches streamed from HDF5), validates every epoch, stops early, analyses
 * cross-layer reuse, and writes a codec checkpoint that can resume an interrupted run. */
#ifndef KVC_TRAINER_H
#define KVC_TRAINER_H

#include "kvc/ae.h"
#include "kvc/checkpoint.h"
#include "kvc/tc.h"

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *const *data;  /* KV dataset files, read as one */
    int n_data;
    const char *out;          /* codec checkpoint to write */
    ae_config ae;
    int per_head;             /* 0: one model per (layer, K|V) shared by the KV heads */
    int loss_attn;            /* 0: MSE; 1: attention-aware (keys: q.k error; values: attention-weighted sum) */
    float mse_mix;            /* weight of plain MSE added to the attention-aware loss */
    int epochs;
    int batch_tokens;
    int warmup_steps;
    int patience;             /* early stopping: epochs without a better validation error */
    ae_adam adam;
    float min_lr;
    uint64_t seed;
    double val_frac;
    const char *device;       /* "cpu" or "cuda" */
    const char *reuse;        /* "threshold=X" / "heads=N", or NULL for no reuse analysis */
    const char *curve_csv;    /* loss curve, or NULL */
    int resume;               /* continue from the trainer state in `out` */
    int progress;             /* progress bar on stderr */
    int stop_after_epoch;     /* testing: behave as if interrupted after this epoch (0: off) */
    int quiet;                /* no per-layer table on stdout */
    int no_state;             /* leave the trainer state out of the final checkpoint (smaller; no resume) */
} kvc_train_opts;

void kvc_train_opts_defaults(kvc_train_opts *o);

/* The resumable state of a training run. */
typedef struct {
    int epoch;               /* epochs completed */
    int64_t step;            /* optimiser steps taken */
    int bad_epochs;          /* epochs since the best validation (early stopping) */
    double best_val;
    int best_epoch;
} kvc_train_state;

/* Writes path atomically. models (same indexing as ae, NULL entries allowed) and st are the
 * raw trainer state for --resume; pass NULL for both to write an inference-only file. */
int kvc_codec_save(const char *path, const kvc_codec *c, ae_model *const *models, const kvc_train_state *st,
               kvc_err *err);
/* Loads the raw trainer state into models (created by the caller with the checkpoint's
 * config) and st; -1 with err when the file holds no trainer state or shapes differ. */
int kvc_codec_load_train_state(const char *path, const kvc_codec *c, ae_model **models, kvc_train_state *st,
                           kvc_err *err);

/* Runs training; 0 on success, 1 when stopped by stop_after_epoch (checkpoint written),
 * -1 with err on failure (the previous checkpoint at `out`, if any, is left intact). */
int kvc_train_codec(const kvc_train_opts *o, kvc_err *err);

/* ---- the transform codec (train/tc_fit.c, train/tc_save.c, train/tc_calib.c) ---------- */

typedef struct {
    const char *const *data;  /* KV captures, read as one (every layer stored) */
    int n_data;
    const char *out;          /* checkpoint to write */
    double bits;              /* mean bits per coefficient, 0.25 .. 8 (default 2) */
    int per_head;             /* 1: each KV head coded alone; 0 (default): a layer's heads jointly */
    int predict;              /* 1 (default): closed-loop prediction from decoded rows; 0: none */
    int sinks;                /* first tokens kept exact at inference, left out of the fit (4) */
    const char *quant;        /* "lloyd" (default) or "uniform" */
    const char *weights;      /* "attn" (default: keys by their queries' second moment) or "mse" */
    double val_frac;          /* held-back tail of the capture (0.1) */
    int64_t max_rows;         /* cap on training rows (0: all) */
    int64_t max_val_rows;     /* cap on held-back rows (8192) */
    double ridge;             /* relative ridge of the predictors (1e-3) */
    const double *layer_bits; /* (L, 2) bits per coefficient of each layer and kind, or NULL: bits */
    int keep_rd;              /* keep each part's rate-distortion curve in kvc_tc_part.rd */
    FILE *report;             /* a line per layer and kind, or NULL */
    int progress;
    /* KL calibration (train/tc_calib.c): moves bits between layers and K/V by their measured
     * effect on the next-token distribution */
    const char *calibrate;    /* NULL/"none" or "kl" */
    const char *model;        /* GGUF of the model the capture came from */
    const char *cal_text;     /* text of the probe sequences (the training corpus) */
    int cal_samples, cal_len; /* probe sequences and their length (4 x 256) */
} kvc_tc_train_opts;

void kvc_tc_train_opts_defaults(kvc_tc_train_opts *o);
/* Fits a transform codec on o->data (every layer in closed loop); NULL with err. */
kvc_tc *kvc_tc_fit(const kvc_tc_train_opts *o, kvc_err *err);
/* Writes tc to path atomically (temporary file, fsync, rename). */
int kvc_tc_save(const char *path, const kvc_tc *tc, kvc_err *err);
/* Measures how much each layer and kind moves the next-token distribution per unit of
 * distortion (its cache alone coded, on probe sequences), moves bits where they lower KL most
 * at the same total, and refits: a new codec, or NULL with err. */
kvc_tc *kvc_tc_calibrate(const kvc_tc_train_opts *o, const kvc_tc *tc, kvc_err *err);
/* Fit, calibrate when asked, save: `kvcodec train --codec transform`. 0 or -1 with err. */
int kvc_train_tc(const kvc_tc_train_opts *o, kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
