/* tc_save.c - writes a transform codec checkpoint (format: docs/formats.md, read by
 * codec/tc.c): root attributes naming the model and the training, then per layer, kind and
 * group the predictor, the transform, the bits and the levels; to PATH.tmp, fsynced and
 * renamed into place, so a reader never sees half a file. Also `kvc_train_tc`, the whole
 * `kvcodec train --codec transform`. */
#include "kvc/trainer.h"

#include "internal/h5util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *KIND_NAME[2] = {"k", "v"};

static hid_t group_create(hid_t loc, const char *path) {
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t g = H5Gcreate2(loc, path, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Pclose(lcpl);
    return g;
}

static int write_u8(hid_t g, const char *name, const uint8_t *v, hsize_t n) {
    hid_t sp = H5Screate_simple(1, &n, NULL);
    if (sp < 0) return -1;
    hid_t ds = H5Dcreate2(g, name, H5T_STD_U8LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    int rc = ds < 0 || H5Dwrite(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, v) < 0 ? -1 : 0;
    if (ds >= 0) H5Dclose(ds);
    H5Sclose(sp);
    return rc;
}

static int write_part(hid_t f, const char *path, const kvc_tc_part *p) {
    hid_t g = group_create(f, path);
    if (g < 0) return -1;
    int bad = kvc_h5_attr_i32(g, "inputs", p->inputs) < 0;
    bad |= kvc_h5_attr_f64(g, "val_rel_err", p->val_rel_err) < 0;
    if (!isnan(p->kl_sens)) bad |= kvc_h5_attr_f64(g, "kl_sens", p->kl_sens) < 0;
    if (!isnan(p->code_entropy)) bad |= kvc_h5_attr_f64(g, "code_entropy", p->code_entropy) < 0;
    bad |= kvc_h5_write_f32(g, "pred_b", p->pred_b, (hsize_t)p->dim, 0) < 0;
    if (p->n_feat) bad |= kvc_h5_write_f32(g, "pred_w", p->pred_w, (hsize_t)p->dim, (hsize_t)p->n_feat) < 0;
    bad |= kvc_h5_write_f32(g, "basis", p->basis, (hsize_t)p->dim, (hsize_t)p->dim) < 0;
    bad |= write_u8(g, "bits", p->bits, (hsize_t)p->dim) < 0;
    if (p->n_levels) bad |= kvc_h5_write_f32(g, "levels", p->levels, (hsize_t)p->n_levels, 0) < 0;
    H5Gclose(g);
    return bad ? -1 : 0;
}

int kvc_tc_save(const char *path, const kvc_tc *tc, kvc_err *err) {
    kvc_h5_quiet();
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp)
        return kvc_fail(err, "output path too long: %s", path);
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) return kvc_fail(err, "cannot create '%s' (directory missing or not writable?)", tmp);
    int bad = kvc_h5_attr_str(f, "format", KVC_TC_FORMAT) < 0;
    bad |= kvc_h5_attr_i32(f, "format_version", KVC_TC_FORMAT_VERSION) < 0;
    bad |= kvc_h5_attr_str(f, "model_name", tc->model_name) < 0;
    bad |= kvc_h5_attr_str(f, "model_fingerprint", tc->model_fingerprint) < 0;
    bad |= kvc_h5_attr_i32(f, "n_layer", tc->n_layer) < 0 || kvc_h5_attr_i32(f, "n_head_kv", tc->n_head_kv) < 0;
    bad |= kvc_h5_attr_i32(f, "head_dim", tc->head_dim) < 0;
    bad |= kvc_h5_attr_i32(f, "heads_per_group", tc->heads_per_group) < 0;
    bad |= kvc_h5_attr_i32(f, "sinks", tc->sinks) < 0;
    bad |= kvc_h5_attr_f64(f, "bits_target", tc->bits_target) < 0;
    bad |= kvc_h5_attr_f64(f, "mean_bits", kvc_tc_mean_bits(tc)) < 0;
    bad |= kvc_h5_attr_str(f, "quant", tc->quant) < 0 || kvc_h5_attr_str(f, "predict", tc->predict) < 0;
    bad |= kvc_h5_attr_str(f, "weights", tc->weights) < 0 || kvc_h5_attr_str(f, "calibrated", tc->calibrated) < 0;
    bad |= kvc_h5_attr_str(f, "data", tc->data) < 0 || kvc_h5_attr_str(f, "corpus_sha256", tc->corpus_sha256) < 0;
    bad |= kvc_h5_attr_i64(f, "n_train_tokens", tc->n_train_tokens) < 0;
    bad |= kvc_h5_attr_i64(f, "n_val_tokens", tc->n_val_tokens) < 0;
    bad |= kvc_h5_attr_f64(f, "train_seconds", tc->train_seconds) < 0;
    for (int l = 0; !bad && l < tc->n_layer; l++)
        for (int k = 0; !bad && k < 2; k++)
            for (int g = 0; !bad && g < tc->groups; g++) {
                char gp[64];
                snprintf(gp, sizeof gp, "layer_%02d/%s/group_%d", l, KIND_NAME[k], g);
                bad = write_part(f, gp, &tc->parts[kvc_tc_index(tc, l, k, g)]);
            }
    if (H5Fclose(f) < 0) bad = 1;
    if (bad) {
        unlink(tmp);
        return kvc_fail(err, "cannot write '%s' (disk full?)", tmp);
    }
    return kvc_h5_commit_file(tmp, path, err);
}

int kvc_train_tc(const kvc_tc_train_opts *o, kvc_err *err) {
    if (!(o->bits >= 0.25 && o->bits <= 8))
        return kvc_fail(err, "--bits %g out of range: a mean of 0.25 to 8 bits per coefficient", o->bits);
    if (o->sinks < 0 || o->sinks > 1024) return kvc_fail(err, "--sinks %d out of range [0, 1024]", o->sinks);
    if (strcmp(o->quant, "lloyd") && strcmp(o->quant, "uniform"))
        return kvc_fail(err, "--quant '%s': lloyd or uniform", o->quant);
    if (strcmp(o->weights, "attn") && strcmp(o->weights, "mse"))
        return kvc_fail(err, "--weights '%s': attn or mse", o->weights);
    if (o->calibrate && strcmp(o->calibrate, "none") && strcmp(o->calibrate, "kl"))
        return kvc_fail(err, "--calibrate '%s': none or kl", o->calibrate);
    if (!(o->val_frac > 0 && o->val_frac < 0.5)) return kvc_fail(err, "--val-frac %g out of range (0, 0.5)", o->val_frac);
    if (o->out && o->n_data > 0)
        for (int i = 0; i < o->n_data; i++)
            if (!strcmp(o->out, o->data[i])) return kvc_fail(err, "--out would overwrite the capture '%s'", o->out);
    const double t0 = kvc_now();
    kvc_tc_train_opts o1 = *o;
    o1.keep_rd = o->calibrate && !strcmp(o->calibrate, "kl"); /* the calibration weighs these curves */
    kvc_tc *tc = kvc_tc_fit(&o1, err);
    if (!tc) return -1;
    int rc = 0;
    if (o->calibrate && !strcmp(o->calibrate, "kl")) {
        kvc_tc *cal = kvc_tc_calibrate(o, tc, err);
        kvc_tc_free(tc);
        if (!(tc = cal)) return -1;
        tc->train_seconds = kvc_now() - t0; /* the first fit, the probes and the refit */
    }
    rc = kvc_tc_save(o->out, tc, err);
    kvc_tc_free(tc);
    return rc;
}
