/* checkpoint.c - reads codec checkpoints (kvc/checkpoint.h, docs/formats.md): exported
 * autoencoders per layer and K/V, validation errors and the reuse plan, checked against the
 * model they are used with. Writing them (and the trainer state) is train/checkpoint_save.c. */
#include "kvc/checkpoint.h"

#include "internal/h5util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *KIND_NAME[2] = {"k", "v"};

kvc_codec *kvc_codec_new(const kvc_codec_meta *meta, kvc_err *err) {
    kvc_codec *c = calloc(1, sizeof *c);
    if (!c) { kvc_fail(err, "out of memory"); return NULL; }
    c->meta = *meta;
    c->slots = meta->per_head ? meta->n_head_kv : 1;
    size_t n = (size_t)meta->n_layer * 2 * (size_t)c->slots;
    c->ae = calloc(n, sizeof *c->ae);
    c->rel_err = calloc(n, sizeof *c->rel_err);
    c->trained = calloc((size_t)meta->n_layer, 1);
    if (!c->ae || !c->rel_err || !c->trained) { kvc_codec_free(c); kvc_fail(err, "out of memory"); return NULL; }
    return c;
}

void kvc_codec_free(kvc_codec *c) {
    if (!c) return;
    if (c->ae)
        for (int i = 0; i < c->meta.n_layer * 2 * c->slots; i++) kvc_ae_export_free(&c->ae[i]);
    free(c->ae);
    free(c->rel_err);
    free(c->trained);
    kvc_reuse_plan_free(c->reuse);
    free(c);
}

/* Group path of one network: layer_LL/k/slot_S. */
void kvc_codec_net_path(char *buf, size_t cap, int layer, int kind, int slot) {
    snprintf(buf, cap, "layer_%02d/%s/slot_%d", layer, KIND_NAME[kind], slot);
}

static int read_meta(hid_t f, kvc_codec_meta *m, const char *path, kvc_err *err) {
    char fmt[32] = "", s[64];
    int32_t v = 0;
    if (kvc_h5_get_str(f, "format", fmt, sizeof fmt) || strcmp(fmt, KVC_CODEC_FORMAT))
        return kvc_fail(err, "'%s' is not a kvcodec codec checkpoint (format '%s')", path, fmt);
    if (kvc_h5_get_i32(f, "format_version", &v) || v != KVC_CODEC_FORMAT_VERSION)
        return kvc_fail(err, "'%s' is codec format version %d; this kvcodec reads version %d (retrain or convert it)",
                        path, v, KVC_CODEC_FORMAT_VERSION);
    int bad = 0;
    bad |= kvc_h5_get_str(f, "model_name", m->model_name, sizeof m->model_name);
    bad |= kvc_h5_get_str(f, "model_fingerprint", m->model_fingerprint, sizeof m->model_fingerprint);
    bad |= kvc_h5_get_i32(f, "n_layer", &m->n_layer) | kvc_h5_get_i32(f, "n_head_kv", &m->n_head_kv);
    bad |= kvc_h5_get_i32(f, "head_dim", &m->head_dim) | kvc_h5_get_i32(f, "latent", &m->ae.latent);
    bad |= kvc_h5_get_i32(f, "hidden", &m->ae.hidden);
    bad |= kvc_h5_get_str(f, "activation", s, sizeof s);
    if (!bad && kvc_ae_act_parse(s, &m->ae.act)) bad = 1;
    bad |= kvc_h5_get_str(f, "norm", s, sizeof s);
    if (!bad && strcmp(s, "batch") && strcmp(s, "none"))
        return kvc_fail(err, "'%s': unknown norm '%s' (this kvcodec reads none or batch)", path, s);
    m->ae.norm = !strcmp(s, "batch") ? AE_NORM_BATCH : AE_NORM_NONE;
    bad |= kvc_h5_get_f32(f, "leaky_slope", &m->ae.leaky_slope) | kvc_h5_get_f32(f, "bn_eps", &m->ae.bn_eps);
    bad |= kvc_h5_get_f32(f, "bn_momentum", &m->ae.bn_momentum);
    bad |= kvc_h5_get_str(f, "share", s, sizeof s);
    m->per_head = !strcmp(s, "head");
    m->ae.in_dim = m->head_dim;
    bad |= kvc_h5_get_str(f, "loss", m->loss, sizeof m->loss);
    if (bad) return kvc_fail(err, "'%s' lacks required codec attributes (corrupt or truncated?)", path);
    kvc_h5_get_f32(f, "mse_mix", &m->mse_mix);
    kvc_h5_get_str(f, "latent_quant", m->latent_quant, sizeof m->latent_quant);
    kvc_h5_get_str(f, "train_data", m->data, sizeof m->data);
    kvc_h5_get_str(f, "corpus_sha256", m->corpus_sha256, sizeof m->corpus_sha256);
    kvc_h5_get_i64(f, "n_train_tokens", &m->n_train_tokens);
    kvc_h5_get_i64(f, "n_val_tokens", &m->n_val_tokens);
    kvc_h5_get_i32(f, "epochs", &m->epochs);
    kvc_h5_get_i32(f, "epochs_run", &m->epochs_run);
    kvc_h5_get_i32(f, "best_epoch", &m->best_epoch);
    kvc_h5_get_f64(f, "best_val_rel_err", &m->best_val);
    int64_t seed = 0;
    kvc_h5_get_i64(f, "seed", &seed);
    m->seed = (uint64_t)seed;
    kvc_h5_get_i32(f, "batch_tokens", &m->batch_tokens);
    kvc_h5_get_f32(f, "lr", &m->lr);
    kvc_h5_get_f32(f, "weight_decay", &m->weight_decay);
    kvc_h5_get_f32(f, "clip", &m->clip);
    kvc_h5_get_str(f, "device", m->device, sizeof m->device);
    kvc_h5_get_f64(f, "train_seconds", &m->train_seconds);
    if (m->n_layer < 1 || m->n_layer > 1024 || m->n_head_kv < 1 || m->head_dim < 2 || m->ae.latent < 1 ||
        m->ae.latent >= m->head_dim || m->ae.hidden < 0)
        return kvc_fail(err, "'%s' has inconsistent codec dimensions", path);
    return 0;
}

/* Reads one half of an exported network with shape checks. */
static int read_dense(hid_t g, const char *half, ae_dense *L, int *n_out, int D, int R, kvc_err *err) {
    char nm[64], act[32];
    int32_t n = 0;
    if (kvc_h5_get_i32(g, half[0] == 'e' ? "n_enc" : "n_dec", &n) || n < 1 || n > 2)
        return kvc_fail(err, "network lacks a valid layer count");
    int in = half[0] == 'e' ? D : R;
    for (int i = 0; i < n; i++) {
        snprintf(nm, sizeof nm, "%s_%d_weight", half, i);
        hsize_t dims[2] = {0, 0};
        int rank = kvc_h5_dims(g, nm, dims);
        if (rank < 0) return kvc_fail(err, "dataset %s is missing", nm);
        if (rank != 2 || dims[1] != (hsize_t)in || dims[0] < 1 || dims[0] > 65536)
            return kvc_fail(err, "%s has shape [%llu, %llu], expected [*, %d]", nm, (unsigned long long)dims[0],
                            (unsigned long long)dims[1], in);
        L[i].in = in;
        L[i].out = (int)dims[0];
        L[i].w = malloc((size_t)L[i].in * L[i].out * sizeof(float));
        L[i].b = malloc((size_t)L[i].out * sizeof(float));
        if (!L[i].w || !L[i].b) return kvc_fail(err, "out of memory");
        if (kvc_h5_read_f32(g, nm, L[i].w, dims[0], dims[1], err)) return -1;
        snprintf(nm, sizeof nm, "%s_%d_bias", half, i);
        if (kvc_h5_read_f32(g, nm, L[i].b, dims[0], 0, err)) return -1;
        snprintf(nm, sizeof nm, "%s_%d_act", half, i);
        kvc_act a;
        if (kvc_h5_get_str(g, nm, act, sizeof act) || kvc_ae_act_parse(act, &a)) return kvc_fail(err, "%s is missing or unknown", nm);
        L[i].act = a;
        in = L[i].out;
    }
    int want_out = half[0] == 'e' ? R : D;
    if (in != want_out) return kvc_fail(err, "%s network ends with width %d, expected %d", half, in, want_out);
    *n_out = n;
    return 0;
}

static int read_reuse(hid_t f, kvc_codec *c, kvc_err *err) {
    if (H5Lexists(f, "reuse", H5P_DEFAULT) <= 0) return 0;
    hid_t g = H5Gopen2(f, "reuse", H5P_DEFAULT);
    const int D = c->meta.head_dim;
    reuse_plan *p = kvc_reuse_plan_new(c->meta.n_layer, c->meta.n_head_kv, D, err);
    if (!p || c->meta.n_layer < 2) { H5Gclose(g); return p ? 0 : -1; }
    float *cols = malloc((size_t)p->n_items * 7 * sizeof(float)), *cosv = malloc((size_t)p->n_items * sizeof(float));
    int rc = !cols || !cosv ? kvc_fail(err, "out of memory") : 0;
    if (!rc) rc = kvc_h5_read_f32(g, "items", cols, (hsize_t)p->n_items, 7, err);
    if (!rc) rc = kvc_h5_read_f32(g, "cos_identity", cosv, (hsize_t)p->n_items, 0, err);
    if (!rc) rc = kvc_h5_read_f32(g, "maps", p->maps, (hsize_t)p->n_items, (hsize_t)(D * D + D), err);
    for (int i = 0; !rc && i < p->n_items; i++) {
        const float *r = cols + (size_t)i * 7;
        reuse_item *it = kvc_reuse_plan_item(p, (int)r[0], (int)r[1], (int)r[2]);
        if (!it || r[4] < 0 || r[4] > 2) { rc = kvc_fail(err, "reuse item %d is out of range", i); break; }
        it->analysed = (int)r[3];
        it->chosen = (reuse_choice)(int)r[4];
        it->err_identity = r[5];
        it->err_linear = r[6];
        it->cos_identity = cosv[i];
    }
    char opt[64] = "";
    kvc_h5_get_str(g, "option", opt, sizeof opt);
    if (!rc && opt[0] && kvc_reuse_option_parse(opt, &p->option, NULL) == 0) p->chosen_set = 1;
    kvc_h5_get_f64(g, "ridge", &p->ridge);
    free(cols);
    free(cosv);
    H5Gclose(g);
    if (rc) { kvc_reuse_plan_free(p); return -1; }
    c->reuse = p;
    return 0;
}

kvc_codec *kvc_codec_load(const char *path, kvc_err *err) {
    kvc_h5_quiet();
    if (access(path, R_OK) != 0) { kvc_fail(err, "cannot open codec '%s'", path); return NULL; }
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) { kvc_fail(err, "'%s' is not a readable HDF5 file (corrupt or truncated?)", path); return NULL; }
    kvc_codec_meta meta = {0};
    kvc_codec *c = NULL;
    if (read_meta(f, &meta, path, err) || !(c = kvc_codec_new(&meta, err))) goto fail;
    char gp[96];
    for (int l = 0; l < meta.n_layer; l++) {
        kvc_codec_net_path(gp, sizeof gp, l, 0, 0);
        if (H5Lexists(f, gp, H5P_DEFAULT) <= 0) {
            char lg[24];
            snprintf(lg, sizeof lg, "layer_%02d", l);
            if (H5Lexists(f, lg, H5P_DEFAULT) > 0) {
                kvc_fail(err, "'%s': layer %d is incomplete", path, l);
                goto fail;
            }
            continue;
        }
        for (int kind = 0; kind < 2; kind++)
            for (int s = 0; s < c->slots; s++) {
                int i = codec_index(c, l, kind, s);
                kvc_codec_net_path(gp, sizeof gp, l, kind, s);
                hid_t g = H5Lexists(f, gp, H5P_DEFAULT) > 0 ? H5Gopen2(f, gp, H5P_DEFAULT) : -1;
                if (g < 0) { kvc_fail(err, "'%s' lacks %s", path, gp); goto fail; }
                kvc_err e2 = {{0}};
                int bad = read_dense(g, "enc", c->ae[i].enc, &c->ae[i].n_enc, meta.head_dim, meta.ae.latent, &e2) ||
                          read_dense(g, "dec", c->ae[i].dec, &c->ae[i].n_dec, meta.head_dim, meta.ae.latent, &e2);
                c->ae[i].leaky_slope = meta.ae.leaky_slope;
                kvc_h5_get_f32(g, "val_rel_err", &c->rel_err[i]);
                H5Gclose(g);
                if (bad) { kvc_fail(err, "'%s' %s: %s", path, gp, e2.msg); goto fail; }
            }
        c->trained[l] = 1;
    }
    if (read_reuse(f, c, err)) goto fail;
    H5Fclose(f);
    return c;
fail:
    kvc_codec_free(c);
    H5Fclose(f);
    return NULL;
}

int kvc_codec_check_model(const kvc_codec *c, const char *fingerprint, int n_layer, int n_head_kv, int head_dim,
                      kvc_err *err) {
    const kvc_codec_meta *m = &c->meta;
    if (strcmp(m->model_fingerprint, fingerprint) != 0)
        return kvc_fail(err, "the codec was trained for model '%s' (fingerprint %s) but this model's fingerprint is %s;"
                        " train a codec for this model", m->model_name, m->model_fingerprint, fingerprint);
    if (m->n_layer != n_layer || m->n_head_kv != n_head_kv || m->head_dim != head_dim)
        return kvc_fail(err, "codec shapes (%d layers, %d KV heads, head_dim %d) disagree with the model (%d, %d, %d)",
                        m->n_layer, m->n_head_kv, m->head_dim, n_layer, n_head_kv, head_dim);
    return 0;
}
