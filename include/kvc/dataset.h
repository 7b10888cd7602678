/* dataset.h - KV datasets captured to HDF5 (schema: docs/formats.md): the writer used by
 * `kvcodec capture`, and the reader used by training (several files as one dataset, token
 * ranges for train/validation, chunk-aware shuffled minibatches streamed from disk). */
#ifndef KVC_DATASET_H
#define KVC_DATASET_H

#include "kvc/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_KV_FORMAT "kvcodec-kv"
#define KVC_KV_FORMAT_VERSION 1
#define KVC_MAX_LAYERS 256

/* What a KV dataset describes (root attributes of the file). */
typedef struct {
    char model_name[128];
    char model_fingerprint[17];
    char corpus_name[256];
    char corpus_sha256[65];
    char dtype[8];             /* "f16" or "f32" as stored; reads always give f32 */
    int format_version;
    int n_layer;               /* layers of the model */
    int n_head, n_head_kv, head_dim;
    float rope_base;
    int ctx;                   /* capture window length (positions restart every ctx tokens) */
    int n_layers_stored;
    int layers[KVC_MAX_LAYERS];/* model layer index of each stored layer group, ascending */
    int64_t n_tokens;
} kvc_kv_info;

/* ---- writer ------------------------------------------------------------------------ */

typedef struct kvc_kv_writer kvc_kv_writer;

/* Creates path.tmp with the root attributes of info (n_tokens is maintained by the writer),
 * extendible datasets of `chunk_tokens` rows per chunk, gzip level `gzip` (0 = none; with
 * shuffle). The file appears under its final name only at kvc_kv_writer_close(ok=1). */
kvc_kv_writer *kvc_kv_writer_open(const char *path, const kvc_kv_info *info, int chunk_tokens, int gzip,
                              kvc_err *err);
/* Appends n tokens: ids (n), positions (n), and for stored layer j (index into info.layers)
 * k[j], v[j] (n, n_head_kv, D) and q[j] (n, n_head, D), pre-RoPE, f32 (converted to the file's
 * dtype). Rejects NaN/Inf naming the layer and row. */
int kvc_kv_writer_append(kvc_kv_writer *w, const int32_t *ids, const int32_t *pos, int n,
                     const float *const *k, const float *const *v, const float *const *q, kvc_err *err);
/* ok=1: flush, write n_tokens, fsync, rename into place; ok=0: discard the temporary file. */
int kvc_kv_writer_close(kvc_kv_writer *w, int ok, kvc_err *err);

/* ---- reader ------------------------------------------------------------------------ */

typedef struct kvc_dataset kvc_dataset;

/* Opens one or more KV files as one dataset, tokens concatenated in the order given. All
 * must share format version, model fingerprint, head counts, head_dim and stored layers;
 * otherwise NULL with err naming the file and the mismatch. */
kvc_dataset *kvc_dataset_open(const char *const *paths, int n_paths, kvc_err *err);
void kvc_dataset_close(kvc_dataset *d);
const kvc_kv_info *kvc_dataset_info(const kvc_dataset *d); /* n_tokens: the total; dtype "mixed"
                                                          when the files differ in it */

/* KV_K, KV_V, KV_Q: see kvc/common.h */

/* Reads tokens [t0, t0+n) of stored layer j (index into info.layers), kind KV_K/KV_V/KV_Q,
 * into out (n, heads, D) f32. Fails on out-of-range requests and on non-finite values
 * (naming the file, layer and row). */
int kvc_dataset_read(kvc_dataset *d, int j, int kind, int64_t t0, int64_t n, float *out, kvc_err *err);
int kvc_dataset_read_positions(kvc_dataset *d, int64_t t0, int64_t n, int32_t *out, kvc_err *err);

/* A stream of shuffled minibatches over tokens [begin, end). Chunk-aware shuffling: each
 * epoch visits the range's blocks of `block_tokens` consecutive tokens in a random order,
 * loads `buffer_blocks` of them at a time (for the requested layers and kinds only), shuffles
 * the tokens inside that buffer and hands them out `batch_tokens` at a time; memory stays
 * bounded by the buffer whatever the file size. shuffle=0 keeps file order (validation). */
typedef struct {
    int64_t begin, end;
    int batch_tokens;
    int block_tokens;   /* default: the file chunk size */
    int buffer_blocks;  /* default 16 */
    uint64_t seed;
    int shuffle;
    const unsigned char *want; /* want[j*3 + kind] != 0: load stored layer j, kind; NULL: all */
} kvc_batch_opts;

typedef struct {
    int n;              /* tokens in this batch (the last one of an epoch may be short) */
    const int64_t *token; /* (n) global token index of each row */
    const int32_t *pos;   /* (n) positions */
    /* x[j*3 + kind]: (n, heads, D) rows for stored layer j and kind, NULL when not wanted */
    const float *const *x;
} kvc_batch;

typedef struct kvc_batcher kvc_batcher;
kvc_batcher *kvc_batcher_new(kvc_dataset *d, const kvc_batch_opts *o, kvc_err *err);
/* Next batch of the current epoch: 1 and *b filled, 0 at the end of the epoch (the next call
 * starts a new epoch with a new order), -1 with err on a read error. */
int kvc_batcher_next(kvc_batcher *bt, kvc_batch *b, kvc_err *err);
/* Epochs completed so far (0 during the first; it advances when kvc_batcher_next returns 0). */
int64_t kvc_batcher_epoch(const kvc_batcher *bt);
/* Bytes the batcher allocated (buffer, batch arrays, block tables), all at kvc_batcher_new: the
 * bound on its memory whatever the file size. The dataset's own read staging (about 4 MiB)
 * is not included. */
size_t kvc_batcher_memory_bytes(const kvc_batcher *bt);
void kvc_batcher_free(kvc_batcher *bt);

/* Train/validation split by token ranges: the last val_frac of the tokens (rounded to whole
 * capture windows of info.ctx) are validation. Windows restart at each file, so the cut lies
 * on a window start or a file end; a val_frac > 0 gets at least one window and a val_frac < 1
 * leaves training at least one. *train_end == *val_begin. */
void kvc_dataset_split(const kvc_dataset *d, double val_frac, int64_t *train_end, int64_t *val_begin);

/* ---- capture (data/capture.c) ------------------------------------------------------- */

/* Parses "all" or a list like "0,3,10-12" into ascending unique layers of a model with
 * n_layer layers; returns the count, or -1 on a bad list or a layer out of range. */
int kvc_parse_layers(const char *s, int n_layer, int *out);

typedef struct {
    const char *out;            /* KV dataset to write (atomically: nothing on failure) */
    const char *dtype;          /* "f16" or "f32" */
    const char *layers;         /* "all" or a list for kvc_parse_layers */
    const char *corpus_name;    /* recorded in the file */
    const char *corpus_sha256;  /* recorded in the file (64 hex digits or "") */
    int ctx;                    /* window length; each window starts from an empty cache */
    int chunk;                  /* HDF5 chunk length in tokens */
    int gzip;                   /* 0-9 */
    int progress;               /* progress line on stderr */
} kvc_capture_opts;

typedef struct {
    int64_t n_tokens;
    int n_layers;
    double seconds;
} kvc_capture_result;

/* Runs m over ids[0, n_tokens) in windows of o->ctx tokens and writes every chosen layer's
 * pre-RoPE K, V and Q to o->out. 0, or -1 with err (nothing left at o->out). */
int kvc_capture(const kvc_model *m, const int32_t *ids, int64_t n_tokens, const kvc_capture_opts *o,
                kvc_capture_result *res, kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
