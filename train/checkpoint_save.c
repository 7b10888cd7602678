/* checkpoint_save.c - writes codec checkpoints (kvc/checkpoint.h, docs/formats.md) and reads
 * back the raw trainer state for --resume: exported autoencoders per layer and K/V, validation
 * errors, the reuse plan, and the trainer's tensors and Adam moments; written to PATH.tmp,
 * fsynced and renamed into place. */
#include "kvc/trainer.h"

#include "internal/h5util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static hid_t group_create(hid_t loc, const char *path) {
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t g = H5Gcreate2(loc, path, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Pclose(lcpl);
    return g;
}

/* Writes the dense layers of one half ("enc" or "dec") of an exported network. */
static int write_dense(hid_t g, const char *half, const ae_dense *L, int n) {
    char nm[64];
    if (kvc_h5_attr_i32(g, half[0] == 'e' ? "n_enc" : "n_dec", n) < 0) return -1;
    for (int i = 0; i < n; i++) {
        snprintf(nm, sizeof nm, "%s_%d_weight", half, i);
        if (kvc_h5_write_f32(g, nm, L[i].w, (hsize_t)L[i].out, (hsize_t)L[i].in) < 0) return -1;
        snprintf(nm, sizeof nm, "%s_%d_bias", half, i);
        if (kvc_h5_write_f32(g, nm, L[i].b, (hsize_t)L[i].out, 0) < 0) return -1;
        snprintf(nm, sizeof nm, "%s_%d_act", half, i);
        if (kvc_h5_attr_str(g, nm, kvc_ae_act_name((kvc_act)L[i].act)) < 0) return -1;
    }
    return 0;
}

static int write_meta(hid_t f, const kvc_codec_meta *m) {
    int bad = 0;
    bad |= kvc_h5_attr_str(f, "format", KVC_CODEC_FORMAT);
    bad |= kvc_h5_attr_i32(f, "format_version", KVC_CODEC_FORMAT_VERSION);
    bad |= kvc_h5_attr_str(f, "model_name", m->model_name);
    bad |= kvc_h5_attr_str(f, "model_fingerprint", m->model_fingerprint);
    bad |= kvc_h5_attr_i32(f, "n_layer", m->n_layer);
    bad |= kvc_h5_attr_i32(f, "n_head_kv", m->n_head_kv);
    bad |= kvc_h5_attr_i32(f, "head_dim", m->head_dim);
    bad |= kvc_h5_attr_i32(f, "latent", m->ae.latent);
    bad |= kvc_h5_attr_i32(f, "hidden", m->ae.hidden);
    bad |= kvc_h5_attr_str(f, "activation", kvc_ae_act_name(m->ae.act));
    bad |= kvc_h5_attr_str(f, "norm", m->ae.norm == AE_NORM_BATCH ? "batch" : "none");
    bad |= kvc_h5_attr_f32(f, "leaky_slope", m->ae.leaky_slope);
    bad |= kvc_h5_attr_f32(f, "bn_eps", m->ae.bn_eps);
    bad |= kvc_h5_attr_f32(f, "bn_momentum", m->ae.bn_momentum);
    bad |= kvc_h5_attr_str(f, "share", m->per_head ? "head" : "layer");
    bad |= kvc_h5_attr_str(f, "loss", m->loss);
    bad |= kvc_h5_attr_f32(f, "mse_mix", m->mse_mix);
    bad |= kvc_h5_attr_str(f, "latent_quant", m->latent_quant[0] ? m->latent_quant : "none");
    bad |= kvc_h5_attr_str(f, "train_data", m->data);
    bad |= kvc_h5_attr_str(f, "corpus_sha256", m->corpus_sha256);
    bad |= kvc_h5_attr_i64(f, "n_train_tokens", m->n_train_tokens);
    bad |= kvc_h5_attr_i64(f, "n_val_tokens", m->n_val_tokens);
    bad |= kvc_h5_attr_i32(f, "epochs", m->epochs);
    bad |= kvc_h5_attr_i32(f, "epochs_run", m->epochs_run);
    bad |= kvc_h5_attr_i32(f, "best_epoch", m->best_epoch);
    bad |= kvc_h5_attr_f64(f, "best_val_rel_err", m->best_val);
    bad |= kvc_h5_attr_i64(f, "seed", (int64_t)m->seed);
    bad |= kvc_h5_attr_i32(f, "batch_tokens", m->batch_tokens);
    bad |= kvc_h5_attr_f32(f, "lr", m->lr);
    bad |= kvc_h5_attr_f32(f, "weight_decay", m->weight_decay);
    bad |= kvc_h5_attr_f32(f, "clip", m->clip);
    bad |= kvc_h5_attr_str(f, "device", m->device);
    bad |= kvc_h5_attr_f64(f, "train_seconds", m->train_seconds);
    bad |= kvc_h5_attr_str(f, "created_by", "kvcodec 0.1.0");
    return bad ? -1 : 0;
}

/* Writes the reuse plan's items and maps under /reuse. */
static int write_reuse(hid_t f, const reuse_plan *p) {
    hid_t g = H5Gcreate2(f, "reuse", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) return -1;
    const int n = p->n_items, D = p->head_dim;
    float *cols = malloc((size_t)n * 7 * sizeof(float));
    int rc = cols ? 0 : -1;
    char opt[64];
    kvc_reuse_option_format(&p->option, opt, sizeof opt);
    rc |= kvc_h5_attr_str(g, "option", p->chosen_set ? opt : "");
    rc |= kvc_h5_attr_f64(g, "ridge", p->ridge);
    /* one row per item: layer, head, kind (0 k, 1 v), analysed, chosen, cos, err_identity, err_linear */
    for (int i = 0; cols && i < n; i++) {
        const reuse_item *it = &p->items[i];
        float *r = cols + (size_t)i * 7;
        r[0] = (float)it->layer; r[1] = (float)it->head; r[2] = (float)it->kind; r[3] = (float)it->analysed;
        r[4] = (float)it->chosen; r[5] = (float)it->err_identity; r[6] = (float)it->err_linear;
    }
    if (cols) {
        rc |= kvc_h5_write_f32(g, "items", cols, (hsize_t)n, 7);
        for (int i = 0; i < n; i++) cols[i] = (float)p->items[i].cos_identity;
        rc |= kvc_h5_write_f32(g, "cos_identity", cols, (hsize_t)n, 0);
        rc |= kvc_h5_attr_str(g, "items_columns", "layer,head,kind(0=k;1=v),analysed,chosen(0=none;1=identity;2=linear),err_identity,err_linear");
    }
    rc |= kvc_h5_write_f32(g, "maps", p->maps, (hsize_t)n, (hsize_t)(D * D + D));
    free(cols);
    H5Gclose(g);
    return rc ? -1 : 0;
}

/* Raw trainer state: every tensor of every model plus Adam moments, under /train_state. */
static int write_state(hid_t f, const kvc_codec *c, ae_model *const *models, const kvc_train_state *st) {
    hid_t g = H5Gcreate2(f, "train_state", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) return -1;
    int rc = 0;
    rc |= kvc_h5_attr_i32(g, "epoch", st->epoch);
    rc |= kvc_h5_attr_i64(g, "step", st->step);
    rc |= kvc_h5_attr_i32(g, "bad_epochs", st->bad_epochs);
    rc |= kvc_h5_attr_f64(g, "best_val", st->best_val);
    rc |= kvc_h5_attr_i32(g, "best_epoch", st->best_epoch);
    char path[96], nm[128];
    for (int l = 0; l < c->meta.n_layer && !rc; l++)
        for (int kind = 0; kind < 2; kind++)
            for (int s = 0; s < c->slots; s++) {
                ae_model *m = models[codec_index(c, l, kind, s)];
                if (!m) continue;
                kvc_codec_net_path(path, sizeof path, l, kind, s);
                hid_t ng = group_create(g, path);
                if (ng < 0) { rc = -1; break; }
                rc |= kvc_h5_attr_i64(ng, "adam_steps", kvc_ae_adam_steps(m));
                for (int i = 0; i < kvc_ae_n_tensors(m); i++) {
                    ae_tensor t = kvc_ae_tensor_at(m, i);
                    rc |= kvc_h5_write_f32(ng, t.name, t.data, (hsize_t)t.rows, (hsize_t)t.cols);
                    if (!t.trainable) continue;
                    ae_tensor am = kvc_ae_adam_m_at(m, i), av = kvc_ae_adam_v_at(m, i);
                    snprintf(nm, sizeof nm, "%s.adam_m", t.name);
                    rc |= kvc_h5_write_f32(ng, nm, am.data, (hsize_t)t.rows, (hsize_t)t.cols);
                    snprintf(nm, sizeof nm, "%s.adam_v", t.name);
                    rc |= kvc_h5_write_f32(ng, nm, av.data, (hsize_t)t.rows, (hsize_t)t.cols);
                }
                H5Gclose(ng);
            }
    H5Gclose(g);
    return rc ? -1 : 0;
}

int kvc_codec_save(const char *path, const kvc_codec *c, ae_model *const *models, const kvc_train_state *st,
               kvc_err *err) {
    kvc_h5_quiet();
    char tmp[1100];
    if (strlen(path) > 1000) return kvc_fail(err, "checkpoint path too long");
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) return kvc_fail(err, "cannot create '%s' (is the folder there and writable?)", tmp);
    char gp[96];
    H5_CHECK(write_meta(f, &c->meta), err, "writing '%s' failed (disk full?)", tmp);
    for (int l = 0; l < c->meta.n_layer; l++) {
        if (!c->trained[l]) continue;
        for (int kind = 0; kind < 2; kind++)
            for (int s = 0; s < c->slots; s++) {
                int i = codec_index(c, l, kind, s);
                kvc_codec_net_path(gp, sizeof gp, l, kind, s);
                hid_t g = group_create(f, gp);
                H5_CHECK(g, err, "writing '%s' failed (disk full?)", tmp);
                int bad = write_dense(g, "enc", c->ae[i].enc, c->ae[i].n_enc) ||
                          write_dense(g, "dec", c->ae[i].dec, c->ae[i].n_dec) ||
                          kvc_h5_attr_f32(g, "val_rel_err", c->rel_err[i]) < 0;
                H5Gclose(g);
                H5_CHECK(bad ? -1 : 0, err, "writing '%s' failed (disk full?)", tmp);
            }
    }
    if (c->reuse) H5_CHECK(write_reuse(f, c->reuse), err, "writing the reuse plan to '%s' failed (disk full?)", tmp);
    if (models && st) H5_CHECK(write_state(f, c, models, st), err, "writing trainer state to '%s' failed (disk full?)", tmp);
    herr_t closed = H5Fclose(f);
    f = -1; /* a failed close has still released the handle: never close it twice */
    H5_CHECK(closed, err, "closing '%s' failed (disk full?)", tmp);
    if (kvc_h5_commit_file(tmp, path, err)) { unlink(tmp); return -1; }
    return 0;
fail:
    if (f >= 0) H5Fclose(f);
    unlink(tmp); /* the previous checkpoint at `path`, if any, stays intact */
    return -1;
}

/* ---- reading ----------------------------------------------------------------------- */

int kvc_codec_load_train_state(const char *path, const kvc_codec *c, ae_model **models, kvc_train_state *st,
                           kvc_err *err) {
    kvc_h5_quiet();
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return kvc_fail(err, "cannot open '%s' to resume", path);
    int rc = 0;
    if (H5Lexists(f, "train_state", H5P_DEFAULT) <= 0) {
        H5Fclose(f);
        return kvc_fail(err, "'%s' holds no trainer state (written without --resume support?)", path);
    }
    hid_t g = H5Gopen2(f, "train_state", H5P_DEFAULT);
    int64_t step = 0;
    if (kvc_h5_get_i32(g, "epoch", &st->epoch) || kvc_h5_get_i64(g, "step", &step) || kvc_h5_get_i32(g, "bad_epochs", &st->bad_epochs) ||
        kvc_h5_get_f64(g, "best_val", &st->best_val) || kvc_h5_get_i32(g, "best_epoch", &st->best_epoch))
        rc = kvc_fail(err, "'%s': trainer state is incomplete", path);
    st->step = step;
    char gp[96], nm[128];
    for (int l = 0; !rc && l < c->meta.n_layer; l++)
        for (int kind = 0; !rc && kind < 2; kind++)
            for (int s = 0; !rc && s < c->slots; s++) {
                ae_model *m = models[codec_index(c, l, kind, s)];
                if (!m) continue;
                kvc_codec_net_path(gp, sizeof gp, l, kind, s);
                hid_t ng = H5Gopen2(g, gp, H5P_DEFAULT);
                if (ng < 0) { rc = kvc_fail(err, "'%s': no trainer state for %s", path, gp); break; }
                int64_t t = 0;
                kvc_h5_get_i64(ng, "adam_steps", &t);
                kvc_ae_set_adam_steps(m, t);
                for (int i = 0; !rc && i < kvc_ae_n_tensors(m); i++) {
                    ae_tensor tt = kvc_ae_tensor_at(m, i);
                    rc = kvc_h5_read_f32(ng, tt.name, tt.data, (hsize_t)tt.rows, (hsize_t)tt.cols, err);
                    if (rc || !tt.trainable) continue;
                    ae_tensor am = kvc_ae_adam_m_at(m, i), av = kvc_ae_adam_v_at(m, i);
                    snprintf(nm, sizeof nm, "%s.adam_m", tt.name);
                    rc = kvc_h5_read_f32(ng, nm, am.data, (hsize_t)tt.rows, (hsize_t)tt.cols, err);
                    snprintf(nm, sizeof nm, "%s.adam_v", tt.name);
                    if (!rc) rc = kvc_h5_read_f32(ng, nm, av.data, (hsize_t)tt.rows, (hsize_t)tt.cols, err);
                }
                H5Gclose(ng);
            }
    H5Gclose(g);
    H5Fclose(f);
    return rc;
}

