/* aenet.h - the inference form of the autoencoder codecs (codec layer): the architecture a
 * checkpoint records, and exported networks as plain Linear layers run through the kernels'
 * dense layer. Letters: N rows, D input (head_dim), H hidden, R latent. Row-major. */
#ifndef KVC_AENET_H
#define KVC_AENET_H

#include "kvc/kernels.h" /* kvc_act, kvc_dense_rows */

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { AE_NORM_NONE = 0, AE_NORM_BATCH } ae_norm;

/* Architecture. hidden == 0: encoder Linear(D,R), decoder Linear(R,D) (both linear; act and
 * norm unused). hidden > 0: encoder Linear(D,H) -> [BatchNorm(H)] -> act -> Linear(H,R);
 * decoder Linear(R,H) -> [BatchNorm(H)] -> act -> Linear(H,D) (KV-CAR: norm=batch,
 * act=leaky_relu). */
typedef struct {
    int in_dim;        /* D */
    int hidden;        /* H, or 0 */
    int latent;        /* R, 1 <= R < D */
    kvc_act act;
    ae_norm norm;
    float leaky_slope; /* LeakyReLU negative slope (default 0.01) */
    float bn_eps;      /* default 1e-5 */
    float bn_momentum; /* running-stat update weight, PyTorch convention (default 0.1) */
} ae_config;

/* Fills defaults: leaky_slope 0.01, bn_eps 1e-5, bn_momentum 0.1. */
void kvc_ae_config_defaults(ae_config *c);
/* Checks a config; -1 with err naming the problem (e.g. latent not smaller than in_dim). */
int kvc_ae_config_check(const ae_config *c, kvc_err *err);
const char *kvc_ae_act_name(kvc_act a);
/* Parses "relu", "leaky_relu", "gelu" (tanh form), "silu", "none"; -1 if unknown. */
int kvc_ae_act_parse(const char *s, kvc_act *out);

/* An exported network: Linear layers (BatchNorm folded in by the trainer), each followed by
 * its activation; the encoder and the decoder have up to 2 layers each. */
typedef struct {
    int in, out;
    float *w;  /* (out, in), malloc'd */
    float *b;  /* (out), malloc'd */
    int act;   /* kvc_act applied after this layer */
} ae_dense;
typedef struct {
    int n_enc, n_dec;
    ae_dense enc[2], dec[2];
    float leaky_slope;
} ae_export;
void kvc_ae_export_free(ae_export *e);
/* Runs an exported network (the form inference uses) on x (N, in) into y. */
void kvc_ae_export_run(const ae_dense *layers, int n_layers, float leaky_slope, const float *x, int n, float *y);

#ifdef __cplusplus
}
#endif
#endif
