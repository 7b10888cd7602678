/* aenet.c - the inference form of the autoencoder codecs: their architecture description
 * (checked when a checkpoint is read), activation names, and running exported dense layers
 * (BatchNorm folded in) over rows through the kernels' dense layer. Training is train/ae.c. */
#include "kvc/aenet.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define AE_MAX_DIM 65536 /* largest D, H or R a config may ask for */
#define AE_CHUNK 256     /* rows per block in inference */

static const char *const ACT_NAMES[KVC_ACT_COUNT] = {"none", "relu", "leaky_relu", "gelu", "silu"};

void kvc_ae_config_defaults(ae_config *c) {
    memset(c, 0, sizeof *c);
    c->leaky_slope = 0.01f;
    c->bn_eps = 1e-5f;
    c->bn_momentum = 0.1f;
}

int kvc_ae_config_check(const ae_config *c, kvc_err *err) {
    if (!c) return kvc_fail(err, "autoencoder config is missing");
    if (c->in_dim < 2 || c->in_dim > AE_MAX_DIM)
        return kvc_fail(err, "autoencoder in_dim %d out of range [2, %d]", c->in_dim, AE_MAX_DIM);
    if (c->latent < 1 || c->latent >= c->in_dim)
        return kvc_fail(err, "autoencoder latent %d must be in [1, in_dim) = [1, %d)", c->latent, c->in_dim);
    if (c->hidden < 0 || c->hidden > AE_MAX_DIM)
        return kvc_fail(err, "autoencoder hidden %d out of range [0, %d] (0: linear)", c->hidden, AE_MAX_DIM);
    if ((int)c->act < 0 || c->act >= KVC_ACT_COUNT) return kvc_fail(err, "unknown activation %d", (int)c->act);
    if (c->norm != AE_NORM_NONE && c->norm != AE_NORM_BATCH) return kvc_fail(err, "unknown norm %d", (int)c->norm);
    if (!isfinite(c->leaky_slope)) return kvc_fail(err, "leaky_slope must be finite");
    if (!(c->bn_eps > 0) || !isfinite(c->bn_eps)) return kvc_fail(err, "bn_eps %g must be > 0", (double)c->bn_eps);
    if (!(c->bn_momentum >= 0 && c->bn_momentum <= 1))
        return kvc_fail(err, "bn_momentum %g must be in [0, 1]", (double)c->bn_momentum);
    return 0;
}

const char *kvc_ae_act_name(kvc_act a) { return (int)a >= 0 && a < KVC_ACT_COUNT ? ACT_NAMES[a] : "?"; }

int kvc_ae_act_parse(const char *s, kvc_act *out) {
    for (int i = 0; s && i < KVC_ACT_COUNT; i++)
        if (!strcmp(s, ACT_NAMES[i])) { *out = (kvc_act)i; return 0; }
    return -1;
}

void kvc_ae_export_free(ae_export *e) {
    if (!e) return;
    for (int i = 0; i < 2; i++) {
        free(e->enc[i].w), free(e->enc[i].b), free(e->dec[i].w), free(e->dec[i].b);
    }
    memset(e, 0, sizeof *e);
}

void kvc_ae_export_run(const ae_dense *layers, int n_layers, float leaky_slope, const float *x, int n, float *y) {
    if (n_layers < 1 || n < 1) return;
    int width = 0;
    for (int l = 0; l < n_layers; l++) width = layers[l].out > width ? layers[l].out : width;
    const ae_dense *last = &layers[n_layers - 1];
    float *buf = n_layers > 1 ? kvc_malloc_array(2 * (size_t)AE_CHUNK * width, sizeof(float)) : NULL;
    if (n_layers > 1 && !buf) {
        for (size_t k = 0; k < (size_t)n * last->out; k++) y[k] = NAN;
        return;
    }
    for (int i0 = 0; i0 < n; i0 += AE_CHUNK) {
        int nb = n - i0 < AE_CHUNK ? n - i0 : AE_CHUNK;
        const float *in = x + (size_t)i0 * layers[0].in;
        for (int l = 0; l < n_layers; l++) {
            const ae_dense *d = &layers[l];
            float *o = l == n_layers - 1 ? y + (size_t)i0 * last->out : buf + (size_t)(l & 1) * AE_CHUNK * width;
            kvc_dense_rows(in, nb, d->in, d->w, d->b, d->out, d->act, leaky_slope, o);
            in = o;
        }
    }
    free(buf);
}
