/* codec.h - kvcodec's KV codecs for engines that run their own inference loop: open a codec
 * checkpoint, encode and decode blocks of one layer's keys/values, and hash and score tokens
 * for LSH-driven eviction (LSH-E), without kvcodec's model runtime or cache. This header
 * needs only the C standard library; link with the kvc library (libkvc.a and its
 * dependencies: HDF5, OpenBLAS, OpenMP, libm).
 * Layout: a block is n tokens of one layer, (n, K, D) floats for K kv heads of head_dim D,
 * keys before RoPE. Encoded rows are (n, K, row_bytes) with head h's row at h * row_bytes.
 * Heads the checkpoint reuses from the layer below store nothing (row_bytes 0) and are
 * decoded from that layer's decoded rows. Every function that can fail returns 0 or -1 and
 * writes a one-line reason into err (may be NULL) of KVCL_ERR_SIZE bytes. */
#ifndef KVC_CODEC_H
#define KVC_CODEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVCL_ERR_SIZE 512
enum { KVCL_KEY = 0, KVCL_VALUE = 1 };

typedef struct kvcl_codec kvcl_codec;

typedef struct {
    int n_layer, n_head_kv, head_dim; /* L, K, D the codec was trained for */
    int latent;                       /* R (autoencoders; 0 for a transform codec) */
    char model_name[128];
    char model_fingerprint[17];       /* what kvcodec inspect prints for the model */
    char storage[16];                 /* how latents are stored: f32, f16, int8, int4; "coded" for a
                                         transform codec */
    char kind[16];                    /* "autoencoder" or "transform" */
    int sinks;                        /* transform codecs: the first tokens of a sequence the
                                         engine should keep exact (the codec was fitted without
                                         them); 0 for autoencoders */
    double mean_bits;                 /* transform codecs: mean bits per coefficient */
} kvcl_info;

/* Opens a codec checkpoint (made by `kvcodec train`, autoencoder or --codec transform; the
 * kind is read from the file). storage: "f32", "f16", "int8" or "int4" (NULL: "f16") for an
 * autoencoder's latents, ignored for a transform codec; reuse: 1 to follow an autoencoder's
 * cross-layer reuse plan. NULL with err on a missing or corrupt file or a bad option. */
kvcl_codec *kvcl_open(const char *path, const char *storage, int reuse, char *err);
void kvcl_close(kvcl_codec *c);
void kvcl_get_info(const kvcl_codec *c, kvcl_info *info);
/* Checks the codec was made for a model of this shape (and fingerprint, unless NULL); -1
 * with err saying what differs. */
int kvcl_check_model(const kvcl_codec *c, const char *fingerprint, int n_layer, int n_head_kv, int head_dim,
                     char *err);

/* Bytes one token's row of (layer, head, kind) takes encoded; 0 when the head is reused. */
size_t kvcl_row_bytes(const kvcl_codec *c, int layer, int head, int kind);
/* 1 when (layer, head, kind) is predicted from layer - 1 (stores nothing). */
int kvcl_is_reused(const kvcl_codec *c, int layer, int head, int kind);
/* Bytes of one token of (layer, kind) over all heads: sum of kvcl_row_bytes. */
size_t kvcl_token_bytes(const kvcl_codec *c, int layer, int kind);

/* Encodes n tokens x (n, K, D) of (layer, kind) into out (n, token_bytes): per token the
 * heads' rows back to back, reused heads taking no room. */
int kvcl_encode(const kvcl_codec *c, int layer, int kind, const float *x, int n, uint8_t *out, char *err);
/* Decodes n tokens from in (as kvcl_encode wrote them) into y (n, K, D). below (n, K, D)
 * holds the same tokens' decoded rows of layer - 1 and is needed only when the layer has
 * reused heads (else may be NULL). */
int kvcl_decode(const kvcl_codec *c, int layer, int kind, const uint8_t *in, int n, const float *below, float *y,
                char *err);

/* ---- every codec, with the rows it may predict from -------------------------------------
 * A transform codec codes a token's rows of all heads of a layer together (kvcl_token_bytes;
 * kvcl_row_bytes is per head for autoencoders only) and predicts them from rows the decoder
 * already has: the same tokens' decoded keys and values of layer - 1, and for values this
 * layer's decoded keys. Encode in layer order, keys before values, passing what kvcl_needs
 * asks for; the encoder returns what the decoder will rebuild (closed loop). */

enum { KVCL_NEED_BELOW_K = 1, KVCL_NEED_THIS_K = 2, KVCL_NEED_BELOW_V = 4 };

/* Rows (n, K, D) of the same n tokens, decoded, NULL where not needed. */
typedef struct {
    const float *below_k, *below_v; /* layer - 1 */
    const float *this_k;            /* this layer's keys (for values) */
} kvcl_context;

/* The KVCL_NEED_* rows encode/decode of (layer, kind) read (an autoencoder with reused heads
 * needs the layer below's rows of the same kind). */
int kvcl_needs(const kvcl_codec *c, int layer, int kind);
/* Encodes n tokens x (n, K, D) into out (n, kvcl_token_bytes); decoded (n, K, D) or NULL
 * receives what kvcl_decode_ctx will rebuild. -1 with err when a needed row is missing. */
int kvcl_encode_ctx(const kvcl_codec *c, int layer, int kind, const float *x, int n, const kvcl_context *ctx,
                    uint8_t *out, float *decoded, char *err);
/* Decodes n tokens from in into y (n, K, D). */
int kvcl_decode_ctx(const kvcl_codec *c, int layer, int kind, const uint8_t *in, int n, const kvcl_context *ctx,
                    float *y, char *err);

/* ---- LSH-E: SimHash codes and eviction choices ---------------------------------- */

typedef struct kvcl_lsh kvcl_lsh;
/* bits in [4, 64] sign bits of fixed Gaussian projections of dim-dimensional vectors. */
kvcl_lsh *kvcl_lsh_new(int dim, int bits, uint64_t seed, char *err);
void kvcl_lsh_free(kvcl_lsh *h);
/* codes[i] for n vectors x (rows ld floats apart): keys after RoPE, or a probe query. */
void kvcl_lsh_hash(const kvcl_lsh *h, const float *x, int64_t ld, int64_t n, uint64_t *codes);
/* score[i] = Hamming distance of codes[i] to probe: larger = less attended = evict first. */
void kvcl_lsh_score(const uint64_t *codes, int64_t n, uint64_t probe, float *score);
/* Marks in evict (n) the n - keep tokens with the highest scores, never the first `sinks`
 * nor the last `window` (ties: the oldest first); returns how many were marked. */
int64_t kvcl_select(const float *score, int64_t n, int64_t keep, int sinks, int window, uint8_t *evict);

#ifdef __cplusplus
}
#endif
#endif
