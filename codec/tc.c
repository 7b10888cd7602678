/* tc.c - the transform codec at inference (kvc/tc.h): reading a checkpoint (format:
 * docs/formats.md), checking it against the model, and coding or decoding rows of one
 * (layer, kind): prediction from decoded rows, orthonormal transform, per-component scalar
 * codebooks. Writing checkpoints and fitting them is train/tc_fit.c. */
#include "kvc/tc.h"

#include "internal/h5util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TC_MAX_DIM 4096 /* widest group a checkpoint may declare */

static const char *KIND_NAME[2] = {"k", "v"};

/* ---- reading ------------------------------------------------------------------------------ */

void kvc_tc_part_free(kvc_tc_part *p) {
    free(p->pred_w), free(p->pred_b), free(p->basis), free(p->basis_t), free(p->bits), free(p->off);
    free(p->levels), free(p->rd);
    memset(p, 0, sizeof *p);
}

void kvc_tc_free(kvc_tc *tc) {
    if (!tc) return;
    for (int i = 0; tc->parts && i < tc->n_layer * 2 * tc->groups; i++) kvc_tc_part_free(&tc->parts[i]);
    free(tc->parts);
    free(tc);
}

/* Reads a whole uint8 dataset of exactly n values. */
static int read_u8(hid_t g, const char *name, uint8_t *out, hsize_t n) {
    hsize_t dims[2];
    if (kvc_h5_dims(g, name, dims) != 1 || dims[0] != n) return -1;
    hid_t ds = H5Dopen2(g, name, H5P_DEFAULT);
    if (ds < 0) return -1;
    herr_t rc = H5Dread(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
    H5Dclose(ds);
    return rc < 0 ? -1 : 0;
}

/* One part from group path (layer_LL/k/group_G): checks every shape and value it relies on. */
static int read_part(hid_t f, const char *path, kvc_tc_part *p, int dg, const char *file, kvc_err *err) {
    hid_t g = H5Gopen2(f, path, H5P_DEFAULT);
    if (g < 0) return kvc_fail(err, "'%s': missing group %s (truncated checkpoint?)", file, path);
    int rc = -1, inputs = 0, nl = 0;
    p->dim = dg;
    if (kvc_h5_get_i32(g, "inputs", &inputs) || inputs < 0 || inputs > 7) {
        kvc_fail(err, "'%s' %s: bad or missing predictor inputs", file, path);
        goto done;
    }
    p->inputs = inputs;
    p->n_feat = dg * (((inputs & 1) != 0) + ((inputs & 2) != 0) + ((inputs & 4) != 0));
    p->pred_b = malloc((size_t)dg * sizeof(float));
    p->basis = malloc((size_t)dg * dg * sizeof(float));
    p->basis_t = malloc((size_t)dg * dg * sizeof(float));
    p->bits = malloc((size_t)dg);
    p->off = malloc((size_t)dg * sizeof(int32_t));
    if (p->n_feat) p->pred_w = malloc((size_t)dg * p->n_feat * sizeof(float));
    if (!p->pred_b || !p->basis || !p->basis_t || !p->bits || !p->off || (p->n_feat && !p->pred_w)) {
        kvc_fail(err, "out of memory reading '%s'", file);
        goto done;
    }
    if (kvc_h5_read_f32(g, "pred_b", p->pred_b, (hsize_t)dg, 0, err) ||
        kvc_h5_read_f32(g, "basis", p->basis, (hsize_t)dg, (hsize_t)dg, err) ||
        (p->n_feat && kvc_h5_read_f32(g, "pred_w", p->pred_w, (hsize_t)dg, (hsize_t)p->n_feat, err)))
        goto done;
    if (read_u8(g, "bits", p->bits, (hsize_t)dg)) {
        kvc_fail(err, "'%s' %s: bits missing or not %d values", file, path, dg);
        goto done;
    }
    p->kept = 0;
    for (int i = 0; i < dg; i++) {
        if (p->bits[i] > 8) {
            kvc_fail(err, "'%s' %s: component %d has %d bits (0-8 allowed)", file, path, i, p->bits[i]);
            goto done;
        }
        if (p->bits[i] && i != p->kept) {
            kvc_fail(err, "'%s' %s: coded components must come first (component %d)", file, path, i);
            goto done;
        }
        p->kept += p->bits[i] > 0;
        p->off[i] = nl;
        nl += p->bits[i] ? 1 << p->bits[i] : 0;
    }
    p->n_levels = nl;
    p->levels = malloc((size_t)(nl > 0 ? nl : 1) * sizeof(float));
    if (!p->levels) {
        kvc_fail(err, "out of memory reading '%s'", file);
        goto done;
    }
    if (nl && kvc_h5_read_f32(g, "levels", p->levels, (hsize_t)nl, 0, err)) goto done;
    for (int i = 0; i < p->kept; i++)
        for (int j = 0; j < (1 << p->bits[i]); j++) {
            const float a = p->levels[p->off[i] + j];
            if (!isfinite(a) || (j && !(a >= p->levels[p->off[i] + j - 1]))) {
                kvc_fail(err, "'%s' %s: levels of component %d are not finite and ascending", file, path, i);
                goto done;
            }
        }
    for (size_t i = 0; i < (size_t)dg * dg; i++)
        if (!isfinite(p->basis[i])) {
            kvc_fail(err, "'%s' %s: the transform holds a non-finite value", file, path);
            goto done;
        }
    for (int i = 0; i < dg; i++)
        for (int j = 0; j < dg; j++) p->basis_t[(size_t)j * dg + i] = p->basis[(size_t)i * dg + j];
    for (size_t i = 0; i < (size_t)dg * p->n_feat; i++)
        if (!isfinite(p->pred_w[i])) {
            kvc_fail(err, "'%s' %s: the predictor holds a non-finite value", file, path);
            goto done;
        }
    for (int i = 0; i < dg; i++)
        if (!isfinite(p->pred_b[i])) {
            kvc_fail(err, "'%s' %s: the predictor bias holds a non-finite value", file, path);
            goto done;
        }
    p->cb = (kvc_codebook){p->kept, p->bits, p->levels, p->off, kvc_codebook_row_bytes(p->bits, p->kept)};
    double v = NAN;
    p->val_rel_err = kvc_h5_get_f64(g, "val_rel_err", &v) ? NAN : v;
    v = NAN;
    p->kl_sens = kvc_h5_get_f64(g, "kl_sens", &v) ? NAN : v;
    p->code_entropy = kvc_h5_get_f64(g, "code_entropy", &v) ? NAN : v;
    rc = 0;
done:
    H5Gclose(g);
    return rc;
}

kvc_tc *kvc_tc_load(const char *path, kvc_err *err) {
    kvc_h5_quiet();
    if (!path || !*path) {
        kvc_fail(err, "tc: no codec file given");
        return NULL;
    }
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        kvc_fail(err, "cannot open transform codec '%s' (missing, or not HDF5)", path);
        return NULL;
    }
    kvc_tc *tc = calloc(1, sizeof *tc);
    char fmt[64] = "";
    int v = 0, rc = -1;
    if (!tc) {
        kvc_fail(err, "out of memory");
        goto done;
    }
    if (kvc_h5_get_str(f, "format", fmt, sizeof fmt) || strcmp(fmt, KVC_TC_FORMAT)) {
        kvc_fail(err, "'%s' is not a transform codec (format '%s'; train one with kvcodec train --codec transform)",
                 path, fmt);
        goto done;
    }
    if (kvc_h5_get_i32(f, "format_version", &v) || v != KVC_TC_FORMAT_VERSION) {
        kvc_fail(err, "'%s' is transform codec format version %d; this kvcodec reads version %d (retrain it)", path, v,
                 KVC_TC_FORMAT_VERSION);
        goto done;
    }
    double bt = 0;
    if (kvc_h5_get_str(f, "model_name", tc->model_name, sizeof tc->model_name) ||
        kvc_h5_get_str(f, "model_fingerprint", tc->model_fingerprint, sizeof tc->model_fingerprint) ||
        kvc_h5_get_i32(f, "n_layer", &tc->n_layer) || kvc_h5_get_i32(f, "n_head_kv", &tc->n_head_kv) ||
        kvc_h5_get_i32(f, "head_dim", &tc->head_dim) || kvc_h5_get_i32(f, "heads_per_group", &tc->heads_per_group) ||
        kvc_h5_get_i32(f, "sinks", &tc->sinks) || kvc_h5_get_f64(f, "bits_target", &bt) ||
        kvc_h5_get_str(f, "quant", tc->quant, sizeof tc->quant) ||
        kvc_h5_get_str(f, "predict", tc->predict, sizeof tc->predict)) {
        kvc_fail(err, "'%s' lacks required transform codec attributes (corrupt or truncated?)", path);
        goto done;
    }
    tc->bits_target = bt;
    kvc_h5_get_str(f, "weights", tc->weights, sizeof tc->weights);
    if (kvc_h5_get_str(f, "calibrated", tc->calibrated, sizeof tc->calibrated)) snprintf(tc->calibrated, 16, "none");
    kvc_h5_get_str(f, "data", tc->data, sizeof tc->data);
    kvc_h5_get_str(f, "corpus_sha256", tc->corpus_sha256, sizeof tc->corpus_sha256);
    kvc_h5_get_i64(f, "n_train_tokens", &tc->n_train_tokens);
    kvc_h5_get_i64(f, "n_val_tokens", &tc->n_val_tokens);
    kvc_h5_get_f64(f, "train_seconds", &tc->train_seconds);
    if (tc->n_layer < 1 || tc->n_layer > 1024 || tc->n_head_kv < 1 || tc->n_head_kv > 1024 || tc->head_dim < 2 ||
        tc->head_dim > TC_MAX_DIM || tc->heads_per_group < 1 || tc->n_head_kv % tc->heads_per_group ||
        (int64_t)tc->heads_per_group * tc->head_dim > TC_MAX_DIM || tc->sinks < 0 || tc->sinks > 1024) {
        kvc_fail(err, "'%s': implausible shape (layers %d, kv heads %d, head_dim %d, heads per group %d, sinks %d)",
                 path, tc->n_layer, tc->n_head_kv, tc->head_dim, tc->heads_per_group, tc->sinks);
        goto done;
    }
    tc->groups = tc->n_head_kv / tc->heads_per_group;
    const int dg = tc->heads_per_group * tc->head_dim, np = tc->n_layer * 2 * tc->groups;
    if (!(tc->parts = calloc((size_t)np, sizeof *tc->parts))) {
        kvc_fail(err, "out of memory");
        goto done;
    }
    for (int l = 0; l < tc->n_layer; l++)
        for (int k = 0; k < 2; k++)
            for (int g = 0; g < tc->groups; g++) {
                char gp[64];
                snprintf(gp, sizeof gp, "layer_%02d/%s/group_%d", l, KIND_NAME[k], g);
                kvc_tc_part *p = &tc->parts[kvc_tc_index(tc, l, k, g)];
                if (read_part(f, gp, p, dg, path, err)) goto done;
                const int allowed = l == 0 ? (k ? KVC_TC_IN_KCUR : 0)
                                           : (k ? KVC_TC_IN_KCUR | KVC_TC_IN_VPREV : KVC_TC_IN_KPREV);
                if (p->inputs & ~allowed) {
                    kvc_fail(err, "'%s' %s: predictor inputs %d are not available there", path, gp, p->inputs);
                    goto done;
                }
            }
    rc = 0;
done:
    H5Fclose(f);
    if (rc) {
        kvc_tc_free(tc);
        return NULL;
    }
    return tc;
}

int kvc_tc_check_model(const kvc_tc *tc, const char *fingerprint, int n_layer, int n_head_kv, int head_dim,
                       kvc_err *err) {
    if (fingerprint && strcmp(fingerprint, tc->model_fingerprint))
        return kvc_fail(err,
                        "this transform codec was trained for model '%s' (fingerprint %s), not this one (%s): train "
                        "a codec on a capture of this model",
                        tc->model_name, tc->model_fingerprint, fingerprint);
    if (n_layer != tc->n_layer || n_head_kv != tc->n_head_kv || head_dim != tc->head_dim)
        return kvc_fail(err, "transform codec shape (layers %d, kv heads %d, head_dim %d) differs from the model's (%d, %d, %d)",
                        tc->n_layer, tc->n_head_kv, tc->head_dim, n_layer, n_head_kv, head_dim);
    return 0;
}

int kvc_tc_row_bytes(const kvc_tc *tc, int layer, int kind) {
    int rb = 0;
    for (int g = 0; g < tc->groups; g++) rb += tc->parts[kvc_tc_index(tc, layer, kind, g)].cb.row_bytes;
    return rb;
}

double kvc_tc_mean_bits(const kvc_tc *tc) {
    double bits = 0, coefs = 0;
    for (int i = 0; i < tc->n_layer * 2 * tc->groups; i++) {
        const kvc_tc_part *p = &tc->parts[i];
        for (int c = 0; c < p->dim; c++) bits += p->bits[c];
        coefs += p->dim;
    }
    return coefs > 0 ? bits / coefs : 0;
}

size_t kvc_tc_table_bytes(const kvc_tc *tc) {
    size_t b = 0;
    for (int i = 0; i < tc->n_layer * 2 * tc->groups; i++) {
        const kvc_tc_part *p = &tc->parts[i];
        b += (size_t)p->dim * (p->n_feat + 1 + p->dim) * sizeof(float) + (size_t)p->dim +
             (size_t)p->n_levels * sizeof(float);
    }
    return b;
}

/* ---- coding -------------------------------------------------------------------------------- */

size_t kvc_tc_scratch_floats(const kvc_tc *tc, int64_t n) {
    const size_t dg = (size_t)tc->heads_per_group * tc->head_dim;
    return (size_t)n * (7 * dg + dg / 4 + 1) + dg * dg + 16;
}

/* The prediction of part p for group g (columns [g*Dg, (g+1)*Dg) of E-wide rows) into pred
 * (N, Dg); feat (N, F) is scratch. */
static void predict_part(const kvc_tc_part *p, int g, int e, const float *kprev, const float *vprev, const float *kcur,
                         int64_t n, float *feat, float *pred) {
    const int dg = p->dim;
    if (!p->n_feat) {
        for (int64_t r = 0; r < n; r++) memcpy(pred + r * dg, p->pred_b, (size_t)dg * sizeof(float));
        return;
    }
    const float *src[3] = {kprev, kcur, vprev};
    const int bit[3] = {KVC_TC_IN_KPREV, KVC_TC_IN_KCUR, KVC_TC_IN_VPREV};
    int at = 0;
    for (int s = 0; s < 3; s++) {
        if (!(p->inputs & bit[s])) continue;
        for (int64_t r = 0; r < n; r++)
            memcpy(feat + r * p->n_feat + at, src[s] + r * e + (size_t)g * dg, (size_t)dg * sizeof(float));
        at += dg;
    }
    kvc_dense_rows(feat, n, p->n_feat, p->pred_w, p->pred_b, dg, KVC_ACT_NONE, 0.0f, pred);
}

/* xg (N, Dg) = pred + basis^T y for the kept components y (N, kept). */
static void reconstruct(const kvc_tc_part *p, const float *y, const float *pred, int64_t n, float *dec_w, float *xg) {
    const int dg = p->dim, kept = p->kept;
    if (!kept) {
        memcpy(xg, pred, (size_t)n * dg * sizeof(float));
        return;
    }
    for (int j = 0; j < dg; j++) memcpy(dec_w + (size_t)j * kept, p->basis_t + (size_t)j * dg, (size_t)kept * sizeof(float));
    kvc_dense_rows(y, n, kept, dec_w, NULL, dg, KVC_ACT_NONE, 0.0f, xg);
    for (size_t i = 0; i < (size_t)n * dg; i++) xg[i] += pred[i];
}

void kvc_tc_encode(const kvc_tc *tc, int layer, int kind, const float *x, const float *kprev, const float *vprev,
                   const float *kcur, int64_t n, uint8_t *codes, float *xhat, float *scratch) {
    const int dg = tc->heads_per_group * tc->head_dim, e = tc->n_head_kv * tc->head_dim;
    const int rb_all = kvc_tc_row_bytes(tc, layer, kind);
    float *feat = scratch, *pred = feat + (size_t)n * 2 * dg, *res = pred + (size_t)n * dg, *y = res + (size_t)n * dg;
    float *yq = y + (size_t)n * dg, *xg = yq + (size_t)n * dg, *dec_w = xg + (size_t)n * dg;
    uint8_t *cg = (uint8_t *)(dec_w + (size_t)dg * dg);
    int at = 0;
    for (int g = 0; g < tc->groups; g++) {
        const kvc_tc_part *p = &tc->parts[kvc_tc_index(tc, layer, kind, g)];
        predict_part(p, g, e, kprev, vprev, kcur, n, feat, pred);
        for (int64_t r = 0; r < n; r++)
            for (int j = 0; j < dg; j++) res[r * dg + j] = x[r * e + (size_t)g * dg + j] - pred[r * dg + j];
        if (p->kept) {
            kvc_dense_rows(res, n, dg, p->basis, NULL, p->kept, KVC_ACT_NONE, 0.0f, y); /* (N, kept) */
            kvc_codebook_quantize(&p->cb, y, n, p->kept, cg);
            kvc_codebook_dequantize(&p->cb, cg, n, yq, p->kept);
            for (int64_t r = 0; r < n; r++)
                memcpy(codes + r * rb_all + at, cg + r * p->cb.row_bytes, (size_t)p->cb.row_bytes);
        }
        reconstruct(p, yq, pred, n, dec_w, xg);
        for (int64_t r = 0; r < n; r++) memcpy(xhat + r * e + (size_t)g * dg, xg + r * dg, (size_t)dg * sizeof(float));
        at += p->cb.row_bytes;
    }
}

void kvc_tc_decode(const kvc_tc *tc, int layer, int kind, const uint8_t *codes, const float *kprev,
                   const float *vprev, const float *kcur, int64_t n, float *xhat, float *scratch) {
    const int dg = tc->heads_per_group * tc->head_dim, e = tc->n_head_kv * tc->head_dim;
    const int rb_all = kvc_tc_row_bytes(tc, layer, kind);
    float *feat = scratch, *pred = feat + (size_t)n * 2 * dg, *yq = pred + (size_t)n * dg, *xg = yq + (size_t)n * dg;
    float *dec_w = xg + (size_t)n * dg;
    uint8_t *cg = (uint8_t *)(dec_w + (size_t)dg * dg);
    int at = 0;
    for (int g = 0; g < tc->groups; g++) {
        const kvc_tc_part *p = &tc->parts[kvc_tc_index(tc, layer, kind, g)];
        predict_part(p, g, e, kprev, vprev, kcur, n, feat, pred);
        if (p->kept) {
            for (int64_t r = 0; r < n; r++)
                memcpy(cg + r * p->cb.row_bytes, codes + r * rb_all + at, (size_t)p->cb.row_bytes);
            kvc_codebook_dequantize(&p->cb, cg, n, yq, p->kept);
        }
        reconstruct(p, yq, pred, n, dec_w, xg);
        for (int64_t r = 0; r < n; r++) memcpy(xhat + r * e + (size_t)g * dg, xg + r * dg, (size_t)dg * sizeof(float));
        at += p->cb.row_bytes;
    }
}
