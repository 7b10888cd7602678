/* kv_writer.c - writes a KV dataset (docs/formats.md): per stored layer the pre-RoPE K, V
 * and Q as extendible, chunked datasets [tokens, heads, head_dim] in f16 or f32, plus token
 * ids and positions. Appends stream to disk (memory stays flat); the file is written as
 * PATH.tmp and renamed into place only when complete. */
#include "kvc/dataset.h"

#include "internal/h5util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct kvc_kv_writer {
    kvc_kv_info info;
    hid_t file;
    hid_t f16;           /* binary16 type, or -1 for f32 files */
    hid_t ds_tokens, ds_pos;
    hid_t *ds;           /* (n_layers_stored * 3) datasets: k, v, q per stored layer */
    int64_t n;           /* tokens written */
    uint16_t *half;      /* conversion buffer */
    size_t half_cap;
    char path[1024], tmp[1040];
};

/* Creates an extendible dataset [0, heads, D] (heads = 0: rank 1) chunked by chunk tokens. */
static hid_t make_ds(hid_t loc, const char *name, hid_t type, int heads, int d, int chunk, int gzip) {
    int rank = heads ? 3 : 1;
    hsize_t dims[3] = {0, (hsize_t)heads, (hsize_t)d}, maxd[3] = {H5S_UNLIMITED, (hsize_t)heads, (hsize_t)d};
    hsize_t cd[3] = {(hsize_t)chunk, (hsize_t)heads, (hsize_t)d};
    hid_t sp = H5Screate_simple(rank, dims, maxd), pl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(pl, rank, cd);
    if (gzip > 0) {
        H5Pset_shuffle(pl);
        H5Pset_deflate(pl, (unsigned)gzip);
    }
    /* appends write whole windows of chunks, so no chunk cache is needed: memory stays flat */
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
    H5Pset_chunk_cache(dapl, 0, 0, 1.0);
    hid_t ds = H5Dcreate2(loc, name, type, sp, H5P_DEFAULT, pl, dapl);
    H5Pclose(dapl);
    H5Pclose(pl);
    H5Sclose(sp);
    return ds;
}

/* Appends n rows of `row` elements (memory type mt) to an extendible dataset. */
static int append_rows(hid_t ds, int64_t at, int n, int rank, hsize_t heads, hsize_t d, hid_t mt, const void *data) {
    hsize_t size[3] = {(hsize_t)(at + n), heads, d}, start[3] = {(hsize_t)at, 0, 0}, cnt[3] = {(hsize_t)n, heads, d};
    if (H5Dset_extent(ds, size) < 0) return -1;
    hid_t fs = H5Dget_space(ds), ms = H5Screate_simple(rank, cnt, NULL);
    int rc = -1;
    if (H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, cnt, NULL) >= 0 &&
        H5Dwrite(ds, mt, ms, fs, H5P_DEFAULT, data) >= 0)
        rc = 0;
    H5Sclose(ms);
    H5Sclose(fs);
    return rc;
}

/* Closes everything; returns -1 if closing the file failed (its last writes did not land). */
static int writer_release(kvc_kv_writer *w) {
    if (w->ds)
        for (int i = 0; i < 3 * w->info.n_layers_stored; i++)
            if (w->ds[i] > 0) H5Dclose(w->ds[i]);
    if (w->ds_tokens > 0) H5Dclose(w->ds_tokens);
    if (w->ds_pos > 0) H5Dclose(w->ds_pos);
    if (w->f16 > 0) H5Tclose(w->f16);
    int rc = w->file > 0 && H5Fclose(w->file) < 0 ? -1 : 0;
    free(w->ds);
    free(w->half);
    free(w);
    return rc;
}

kvc_kv_writer *kvc_kv_writer_open(const char *path, const kvc_kv_info *info, int chunk_tokens, int gzip, kvc_err *err) {
    kvc_h5_quiet();
    int f16 = strcmp(info->dtype, "f16") == 0;
    if (!f16 && strcmp(info->dtype, "f32") != 0) { kvc_fail(err, "dtype must be f16 or f32, not '%s'", info->dtype); return NULL; }
    if (info->n_layers_stored < 1 || info->n_layers_stored > KVC_MAX_LAYERS) { kvc_fail(err, "no layers to store"); return NULL; }
    if (chunk_tokens < 1 || gzip < 0 || gzip > 9) { kvc_fail(err, "chunk size must be >= 1 and gzip level 0..9"); return NULL; }
    if (strlen(path) >= 1000) { kvc_fail(err, "output path too long"); return NULL; }
    kvc_kv_writer *w = calloc(1, sizeof *w);
    if (!w) { kvc_fail(err, "out of memory"); return NULL; }
    w->info = *info;
    w->info.n_tokens = 0;
    w->info.format_version = KVC_KV_FORMAT_VERSION;
    w->f16 = -1;
    snprintf(w->path, sizeof w->path, "%s", path);
    snprintf(w->tmp, sizeof w->tmp, "%s.tmp", path);
    w->ds = calloc((size_t)info->n_layers_stored * 3, sizeof *w->ds);
    w->file = H5Fcreate(w->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (!w->ds || w->file < 0) {
        kvc_fail(err, "cannot create '%s' (is the folder there and writable?)", w->tmp);
        writer_release(w);
        return NULL;
    }
    if (f16) w->f16 = kvc_h5_f16_type();
    hid_t ft = f16 ? w->f16 : H5T_IEEE_F32LE;
    const kvc_kv_info *I = &w->info;
    char cb[64];
    snprintf(cb, sizeof cb, "kvcodec %s", "0.1.0");
    H5_CHECK(kvc_h5_attr_str(w->file, "format", KVC_KV_FORMAT), err, "cannot write attributes of '%s'", w->tmp);
    H5_CHECK(kvc_h5_attr_i32(w->file, "format_version", KVC_KV_FORMAT_VERSION), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_str(w->file, "model_name", I->model_name), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_str(w->file, "model_fingerprint", I->model_fingerprint), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_str(w->file, "corpus_name", I->corpus_name), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_str(w->file, "corpus_sha256", I->corpus_sha256), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_i64(w->file, "n_tokens", 0), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_i32(w->file, "n_layer", I->n_layer), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_i32s(w->file, "layers", I->layers, I->n_layers_stored), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_i32(w->file, "n_head", I->n_head), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_i32(w->file, "n_head_kv", I->n_head_kv), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_i32(w->file, "head_dim", I->head_dim), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_f32(w->file, "rope_base", I->rope_base), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_str(w->file, "rope_pairing", "adjacent"), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_i32(w->file, "ctx", I->ctx), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_str(w->file, "dtype", I->dtype), err, "cannot write attributes");
    H5_CHECK(kvc_h5_attr_str(w->file, "created_by", cb), err, "cannot write attributes");
    w->ds_tokens = make_ds(w->file, "tokens", H5T_STD_I32LE, 0, 0, chunk_tokens, 0);
    w->ds_pos = make_ds(w->file, "positions", H5T_STD_I32LE, 0, 0, chunk_tokens, 0);
    H5_CHECK(w->ds_tokens < 0 || w->ds_pos < 0 ? -1 : 0, err, "cannot create datasets in '%s'", w->tmp);
    for (int j = 0; j < I->n_layers_stored; j++) {
        char g[32];
        snprintf(g, sizeof g, "layer_%02d", I->layers[j]);
        hid_t grp = H5Gcreate2(w->file, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        H5_CHECK(grp, err, "cannot create group %s", g);
        kvc_h5_attr_i32(grp, "layer", I->layers[j]);
        w->ds[3 * j + KV_K] = make_ds(grp, "k", ft, I->n_head_kv, I->head_dim, chunk_tokens, gzip);
        w->ds[3 * j + KV_V] = make_ds(grp, "v", ft, I->n_head_kv, I->head_dim, chunk_tokens, gzip);
        w->ds[3 * j + KV_Q] = make_ds(grp, "q", ft, I->n_head, I->head_dim, chunk_tokens, gzip);
        H5Gclose(grp);
        for (int k = 0; k < 3; k++) H5_CHECK(w->ds[3 * j + k], err, "cannot create datasets of %s", g);
    }
    return w;
fail: {
        char tmp[sizeof w->tmp];
        memcpy(tmp, w->tmp, sizeof tmp);
        writer_release(w);
        unlink(tmp);
    }
    return NULL;
}

/* Returns the first non-finite index in x[0..n) or -1. */
static int64_t first_bad(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return (int64_t)i;
    return -1;
}

int kvc_kv_writer_append(kvc_kv_writer *w, const int32_t *ids, const int32_t *pos, int n, const float *const *k,
                     const float *const *v, const float *const *q, kvc_err *err) {
    const kvc_kv_info *I = &w->info;
    if (n <= 0) return 0;
    const size_t D = (size_t)I->head_dim, rk = (size_t)I->n_head_kv * D, rq = (size_t)I->n_head * D;
    static const char *kind_name[3] = {"keys", "values", "queries"};
    for (int j = 0; j < I->n_layers_stored; j++) {
        const float *src[3] = {k[j], v[j], q[j]};
        for (int kind = 0; kind < 3; kind++) {
            size_t row = kind == KV_Q ? rq : rk;
            int64_t b = first_bad(src[kind], (size_t)n * row);
            if (b >= 0)
                return kvc_fail(err, "non-finite %s in layer %d at token %lld", kind_name[kind], I->layers[j],
                                (long long)(w->n + b / (int64_t)row));
        }
    }
    if (append_rows(w->ds_tokens, w->n, n, 1, 0, 0, H5T_NATIVE_INT32, ids) < 0 ||
        append_rows(w->ds_pos, w->n, n, 1, 0, 0, H5T_NATIVE_INT32, pos) < 0)
        goto werr;
    for (int j = 0; j < I->n_layers_stored; j++) {
        const float *src[3] = {k[j], v[j], q[j]};
        for (int kind = 0; kind < 3; kind++) {
            hsize_t heads = (hsize_t)(kind == KV_Q ? I->n_head : I->n_head_kv);
            size_t cnt = (size_t)n * heads * D;
            const void *data = src[kind];
            hid_t mt = H5T_NATIVE_FLOAT;
            if (w->f16 > 0) {
                if (cnt > w->half_cap) {
                    uint16_t *nb = realloc(w->half, cnt * sizeof *nb);
                    if (!nb) return kvc_fail(err, "out of memory");
                    w->half = nb;
                    w->half_cap = cnt;
                }
                for (size_t i = 0; i < cnt; i++) w->half[i] = kvc_f32_to_f16(src[kind][i]);
                data = w->half;
                mt = w->f16;
            }
            if (append_rows(w->ds[3 * j + kind], w->n, n, 3, heads, D, mt, data) < 0) goto werr;
        }
    }
    w->n += n;
    return 0;
werr:
    return kvc_fail(err, "writing '%s' failed at token %lld (disk full or file not writable?)", w->tmp, (long long)w->n);
}

int kvc_kv_writer_close(kvc_kv_writer *w, int ok, kvc_err *err) {
    if (!w) return 0;
    int rc = 0;
    if (ok) {
        if (kvc_h5_attr_i64(w->file, "n_tokens", w->n) < 0 || H5Fflush(w->file, H5F_SCOPE_GLOBAL) < 0)
            rc = kvc_fail(err, "cannot finish '%s' (disk full?)", w->tmp);
    }
    char tmp[sizeof w->tmp], path[sizeof w->path];
    memcpy(tmp, w->tmp, sizeof tmp);
    memcpy(path, w->path, sizeof path);
    if (writer_release(w) && ok && rc == 0) /* closing writes HDF5's last metadata */
        rc = kvc_fail(err, "cannot finish '%s' (disk full?)", tmp);
    if (ok && rc == 0) rc = kvc_h5_commit_file(tmp, path, err);
    if (!ok || rc) unlink(tmp);
    return rc;
}
