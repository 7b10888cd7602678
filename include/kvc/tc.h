/* tc.h - the transform codec (codec layer): per layer, for keys (before RoPE) and values, the
 * rows of a group of KV heads (all of a layer's heads jointly, or one head) are predicted from
 * already decoded rows (keys from the layer below's keys, values from this layer's keys and
 * the layer below's values: closed-loop, so reuse never costs more than coding alone), the
 * residual turned by a learned orthonormal transform (PCA), and every component quantized by
 * its own scalar codebook on 0-8 bits chosen by rate-distortion allocation. Trained by
 * train/tc_fit.c; the cache that holds such rows is codec/tc_cache.c (`--repr tc:FILE`).
 * Letters: L layers, K KV heads, D head_dim, E = K*D a layer's row, Dg a group's width,
 * F predictor features, N rows. Row-major throughout. */
#ifndef KVC_TC_H
#define KVC_TC_H

#include "kvc/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_TC_FORMAT "kvcodec-transform"
#define KVC_TC_FORMAT_VERSION 1

/* Predictor inputs of a part, as a bit mask; features are concatenated in this order. */
enum { KVC_TC_IN_KPREV = 1, KVC_TC_IN_KCUR = 2, KVC_TC_IN_VPREV = 4 };

/* How one (layer, kind, group) is coded. Components are ordered by bits, widest first, so the
 * kept ones (bits > 0) are a prefix of length kept. */
typedef struct {
    int dim;          /* Dg */
    int inputs;       /* KVC_TC_IN_* mask (0: no predictor; pred_b is then the mean) */
    int n_feat;       /* F = Dg x the number of inputs */
    float *pred_w;    /* (Dg, F): prediction p = W f + b */
    float *pred_b;    /* (Dg) */
    float *basis;     /* (Dg, Dg): row i is component i; coefficients y = basis (x - p) */
    float *basis_t;   /* (Dg, Dg): its transpose, for decoding x = p + basis^T y */
    uint8_t *bits;    /* (Dg) */
    int32_t *off;     /* (Dg) */
    float *levels;    /* (n_levels) */
    int n_levels;
    int kept;         /* components with bits > 0 */
    kvc_codebook cb;
    double val_rel_err;   /* ||x - x^|| / ||x|| on the held-back rows (training report) */
    double code_entropy;  /* entropy of the codes, bits per token summed over components, on the
                             trainer's coefficient samples: what an ideal entropy coder would
                             need instead of sum(bits) (NaN when not recorded) */
    double kl_sens;       /* KL of this part coded alone on the probe text, when calibrated (else NaN) */
    double *rd;           /* (8 Dg + 1) weighted distortion per token after each bit of the fit's
                             greedy allocation, kept when the trainer asks (never saved) */
} kvc_tc_part;

typedef struct {
    char model_name[128];
    char model_fingerprint[17];
    int n_layer, n_head_kv, head_dim;
    int heads_per_group;   /* K: all heads of a layer coded jointly; 1: per head */
    int groups;            /* K / heads_per_group */
    int sinks;             /* the first tokens of a sequence, kept exact in f16 */
    double bits_target;    /* mean bits per coefficient the trainer aimed at */
    char quant[16];        /* "lloyd" or "uniform" */
    char predict[16];      /* "closed" or "none" */
    char weights[16];      /* distortion weights of the allocation: "attn" or "mse" */
    char calibrated[16];   /* "kl" or "none" */
    char data[512];
    char corpus_sha256[65];
    int64_t n_train_tokens, n_val_tokens;
    double train_seconds;
    kvc_tc_part *parts;    /* (L, 2, groups), index kvc_tc_index */
} kvc_tc;

static inline int kvc_tc_index(const kvc_tc *tc, int layer, int kind, int group) {
    return (layer * 2 + kind) * tc->groups + group;
}

/* Reads a checkpoint; NULL with err on a missing/corrupt file, another format or version, or
 * tables whose shapes do not agree. */
kvc_tc *kvc_tc_load(const char *path, kvc_err *err);
void kvc_tc_free(kvc_tc *tc);
/* Frees one part's tables and zeroes it (the trainer refits a part this way). */
void kvc_tc_part_free(kvc_tc_part *p);
/* -1 with err (naming both) when tc was trained for another model or shape. */
int kvc_tc_check_model(const kvc_tc *tc, const char *fingerprint, int n_layer, int n_head_kv, int head_dim,
                       kvc_err *err);
/* Bytes of one token's codes for (layer, kind), all groups. */
int kvc_tc_row_bytes(const kvc_tc *tc, int layer, int kind);
/* Mean bits per coefficient over the whole model (codes only). */
double kvc_tc_mean_bits(const kvc_tc *tc);
/* Bytes of the codec's own tables (transforms, predictors, levels): a fixed cost per model. */
size_t kvc_tc_table_bytes(const kvc_tc *tc);

/* Codes n rows x (N, E) of (layer, kind) into codes (N, kvc_tc_row_bytes) and writes what the
 * decoder will rebuild into xhat (N, E) (closed loop: the next layer predicts from it). The
 * predictor reads kprev, vprev (N, E) = the decoded rows of layer - 1 and kcur (N, E) = the
 * decoded keys of this layer, as the part's inputs ask (NULL where not needed). scratch: at
 * least kvc_tc_scratch_floats(tc, n) floats. */
void kvc_tc_encode(const kvc_tc *tc, int layer, int kind, const float *x, const float *kprev, const float *vprev,
                   const float *kcur, int64_t n, uint8_t *codes, float *xhat, float *scratch);
/* xhat (N, E) from codes, with the same predictor inputs. */
void kvc_tc_decode(const kvc_tc *tc, int layer, int kind, const uint8_t *codes, const float *kprev,
                   const float *vprev, const float *kcur, int64_t n, float *xhat, float *scratch);
/* Scratch floats encode/decode need for n rows. */
size_t kvc_tc_scratch_floats(const kvc_tc *tc, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
