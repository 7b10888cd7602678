/* dataset.c - the reader half of dataset.h: opens KV capture files (schema: docs/formats.md)
 * as one token-concatenated dataset and reads row ranges as f32 by hyperslab (shuffled
 * minibatches: data/batcher.c).
 * Shapes: N rows (tokens), H heads (n_head_kv for k/v, n_head for q), D head_dim. */
#include "kvc/dataset.h"

#include "internal/h5util.h"
#include "dataset_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SCRATCH_BYTES (4 << 20) /* f16 rows staged per H5Dread before conversion */

static const char *KIND_NAME[3] = {"k", "v", "q"};

/* Closes any HDF5 identifier; negative (never opened) ones are ignored. */
static void h5_close(hid_t id) {
    if (id < 0) return;
    switch (H5Iget_type(id)) {
    case H5I_FILE: H5Fclose(id); break;
    case H5I_GROUP: H5Gclose(id); break;
    case H5I_DATASET: H5Dclose(id); break;
    case H5I_DATASPACE: H5Sclose(id); break;
    case H5I_DATATYPE: H5Tclose(id); break;
    case H5I_GENPROP_LST: H5Pclose(id); break;
    default: break;
    }
}

/* ---- attributes --------------------------------------------------------------------- */

/* Reads integer attribute `name` of loc into *v: present, one number, within [lo, hi].
 * `where` names the file (and group) in messages. */
static int attr_int(hid_t loc, const char *where, const char *name, int64_t lo, int64_t hi, int64_t *v,
                    kvc_err *err) {
    if (H5Aexists(loc, name) <= 0)
        return kvc_fail(err, "%s: missing attribute '%s' (not a complete kvcodec KV capture)", where, name);
    if (kvc_h5_get_i64(loc, name, v)) return kvc_fail(err, "%s: attribute '%s' is not a single number", where, name);
    if (*v < lo || *v > hi)
        return kvc_fail(err, "%s: attribute '%s' = %lld is out of range [%lld, %lld]", where, name, (long long)*v,
                        (long long)lo, (long long)hi);
    return 0;
}

/* Reads string attribute `name` into buf (cap bytes); a longer value is an error when
 * must_fit, else it is cut (names shown to people only). */
static int attr_str(hid_t loc, const char *where, const char *name, char *buf, size_t cap, int must_fit,
                    kvc_err *err) {
    char tmp[1024];
    if (H5Aexists(loc, name) <= 0)
        return kvc_fail(err, "%s: missing attribute '%s' (not a complete kvcodec KV capture)", where, name);
    if (kvc_h5_get_str(loc, name, tmp, sizeof tmp))
        return kvc_fail(err, "%s: attribute '%s' is not a fixed-length string", where, name);
    if (must_fit && strlen(tmp) >= cap)
        return kvc_fail(err, "%s: attribute '%s' is %zu characters long (at most %zu)", where, name, strlen(tmp),
                        cap - 1);
    size_t len = strlen(tmp) < cap ? strlen(tmp) : cap - 1; /* cut to fit */
    memcpy(buf, tmp, len);
    buf[len] = '\0';
    return 0;
}

/* Returns 1 if s is exactly n hex digits. */
static int is_hex(const char *s, size_t n) {
    if (strlen(s) != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') || (s[i] >= 'A' && s[i] <= 'F'))) return 0;
    return 1;
}

/* Reads and validates every root attribute of the open file fid into *in. */
static int info_read(hid_t fid, const char *path, kvc_kv_info *in, kvc_err *err) {
    char s[256];
    int64_t v;
    memset(in, 0, sizeof *in);
    if (H5Aexists(fid, "format") <= 0)
        return kvc_fail(err, "%s is not a kvcodec KV dataset (no 'format' attribute)", path);
    if (attr_str(fid, path, "format", s, sizeof s, 0, err)) return -1;
    if (strcmp(s, KVC_KV_FORMAT) != 0)
        return kvc_fail(err, "%s is not a kvcodec KV dataset (format '%s', expected '%s')", path, s, KVC_KV_FORMAT);
    if (attr_int(fid, path, "format_version", INT32_MIN, INT32_MAX, &v, err)) return -1;
    if (v != KVC_KV_FORMAT_VERSION)
        return kvc_fail(err, "%s has KV format version %lld, but this kvcodec reads version %d: recapture it "
                        "with this kvcodec or read it with a matching one", path, (long long)v, KVC_KV_FORMAT_VERSION);
    in->format_version = (int)v;
    if (attr_str(fid, path, "model_name", in->model_name, sizeof in->model_name, 0, err) ||
        attr_str(fid, path, "model_fingerprint", in->model_fingerprint, sizeof in->model_fingerprint, 1, err) ||
        attr_str(fid, path, "corpus_name", in->corpus_name, sizeof in->corpus_name, 0, err) ||
        attr_str(fid, path, "corpus_sha256", in->corpus_sha256, sizeof in->corpus_sha256, 1, err) ||
        attr_str(fid, path, "dtype", in->dtype, sizeof in->dtype, 1, err) ||
        attr_str(fid, path, "rope_pairing", s, sizeof s, 0, err))
        return -1;
    if (!is_hex(in->model_fingerprint, 16))
        return kvc_fail(err, "%s: model_fingerprint '%s' is not 16 hex digits", path, in->model_fingerprint);
    if (strcmp(in->dtype, "f16") != 0 && strcmp(in->dtype, "f32") != 0)
        return kvc_fail(err, "%s: dtype '%s' is not f16 or f32", path, in->dtype);
    if (strcmp(s, "adjacent") != 0)
        return kvc_fail(err, "%s: rope_pairing '%s' is not supported (only 'adjacent')", path, s);
    if (attr_int(fid, path, "n_tokens", 0, INT64_MAX, &in->n_tokens, err)) return -1;
    if (attr_int(fid, path, "n_layer", 1, 1 << 16, &v, err)) return -1;
    in->n_layer = (int)v;
    if (attr_int(fid, path, "n_head", 1, 4096, &v, err)) return -1;
    in->n_head = (int)v;
    if (attr_int(fid, path, "n_head_kv", 1, in->n_head, &v, err)) return -1;
    in->n_head_kv = (int)v;
    if (attr_int(fid, path, "head_dim", 1, 8192, &v, err)) return -1;
    in->head_dim = (int)v;
    if (attr_int(fid, path, "ctx", 1, INT32_MAX, &v, err)) return -1;
    in->ctx = (int)v;
    if (H5Aexists(fid, "rope_base") <= 0 || kvc_h5_get_f32(fid, "rope_base", &in->rope_base) ||
        !(in->rope_base > 0.0f && in->rope_base < 1e30f))
        return kvc_fail(err, "%s: attribute 'rope_base' is missing or not a positive finite number", path);
    if (H5Aexists(fid, "layers") <= 0)
        return kvc_fail(err, "%s: missing attribute 'layers' (not a complete kvcodec KV capture)", path);
    in->n_layers_stored = kvc_h5_get_i32s(fid, "layers", in->layers, KVC_MAX_LAYERS);
    if (in->n_layers_stored < 1)
        return kvc_fail(err, "%s: attribute 'layers' must list 1 to %d layer indices", path, KVC_MAX_LAYERS);
    for (int j = 0; j < in->n_layers_stored; j++)
        if (in->layers[j] < 0 || in->layers[j] >= in->n_layer || (j && in->layers[j] <= in->layers[j - 1]))
            return kvc_fail(err, "%s: 'layers' must be ascending model layers in [0, %d); entry %d is %d", path,
                            in->n_layer, j, in->layers[j]);
    return 0;
}

/* Formats a layer list as "{0,3,5}" into buf. */
static const char *layers_str(const kvc_kv_info *in, char *buf, size_t cap) {
    size_t o = (size_t)snprintf(buf, cap, "{");
    for (int j = 0; j < in->n_layers_stored && o < cap; j++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%d", j ? "," : "", in->layers[j]);
    if (o < cap) snprintf(buf + o, cap - o, "}");
    return buf;
}

/* Checks that file b (path pb) can be concatenated after the dataset described by a (first
 * file pa): same model, heads, head_dim, stored layers and capture window. */
static int info_compare(const kvc_kv_info *a, const char *pa, const kvc_kv_info *b, const char *pb, kvc_err *err) {
    if (strcmp(a->model_fingerprint, b->model_fingerprint) != 0)
        return kvc_fail(err, "%s was captured from model %s, %s from %s: datasets from different models cannot be mixed",
                        pb, b->model_fingerprint, pa, a->model_fingerprint);
    const struct { const char *name; int va, vb; } f[] = {
        {"n_layer", a->n_layer, b->n_layer}, {"n_head", a->n_head, b->n_head},
        {"n_head_kv", a->n_head_kv, b->n_head_kv}, {"head_dim", a->head_dim, b->head_dim},
        {"ctx", a->ctx, b->ctx}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].va != f[i].vb)
            return kvc_fail(err, "%s has %s %d but %s has %d: the files of one dataset must share it", pb, f[i].name,
                            f[i].vb, pa, f[i].va);
    if (a->rope_base != b->rope_base)
        return kvc_fail(err, "%s has rope_base %g but %s has %g: the files of one dataset must share it", pb,
                        (double)b->rope_base, pa, (double)a->rope_base);
    int same = a->n_layers_stored == b->n_layers_stored;
    for (int j = 0; same && j < a->n_layers_stored; j++) same = a->layers[j] == b->layers[j];
    if (!same) {
        char la[200], lb[200];
        return kvc_fail(err, "%s stores layers %s but %s stores %s: capture every file with the same layers", pb,
                        layers_str(b, lb, sizeof lb), pa, layers_str(a, la, sizeof la));
    }
    return 0;
}

/* ---- files -------------------------------------------------------------------------- */

/* Opens dataset `name` and checks it is 1-D (rows) or 3-D (rows, heads, D) as given
 * (heads = 0 for 1-D), of class cls and, for floats, of elem_size bytes. */
static hid_t xset_open(hid_t fid, const char *path, const char *name, int64_t rows, int heads, int dim,
                       H5T_class_t cls, size_t elem_size, kvc_err *err) {
    hid_t ds = H5I_INVALID_HID, sp = H5I_INVALID_HID, t = H5I_INVALID_HID;
    hsize_t dims[3] = {0, 0, 0};
    htri_t ex;
    int rank = heads ? 3 : 1;
    H5_CHECK(ex = H5Lexists(fid, name, H5P_DEFAULT), err, "%s: cannot look up %s", path, name); /* group checked */
    if (!ex) {
        kvc_fail(err, "%s: missing dataset %s (not a complete kvcodec KV capture)", path, name);
        return -1;
    }
    H5_CHECK(ds = H5Dopen2(fid, name, H5P_DEFAULT), err, "%s: cannot open dataset %s", path, name);
    H5_CHECK(sp = H5Dget_space(ds), err, "%s: cannot read the shape of %s", path, name);
    H5_CHECK(t = H5Dget_type(ds), err, "%s: cannot read the type of %s", path, name);
    if (H5Sget_simple_extent_ndims(sp) != rank) {
        kvc_fail(err, "%s: %s has %d dimensions, expected %d", path, name, H5Sget_simple_extent_ndims(sp), rank);
        goto fail;
    }
    H5_CHECK(H5Sget_simple_extent_dims(sp, dims, NULL), err, "%s: cannot read the shape of %s", path, name);
    if ((int64_t)dims[0] != rows || (heads && ((int64_t)dims[1] != heads || (int64_t)dims[2] != dim))) {
        if (heads)
            kvc_fail(err, "%s: %s has shape [%llu, %llu, %llu] but the attributes say [%lld, %d, %d] "
                     "(n_tokens, heads, head_dim)", path, name, (unsigned long long)dims[0],
                     (unsigned long long)dims[1], (unsigned long long)dims[2], (long long)rows, heads, dim);
        else
            kvc_fail(err, "%s: %s has %llu rows but n_tokens is %lld", path, name, (unsigned long long)dims[0],
                     (long long)rows);
        goto fail;
    }
    if (H5Tget_class(t) != cls || (elem_size && H5Tget_size(t) != elem_size)) {
        if (cls == H5T_FLOAT)
            kvc_fail(err, "%s: %s should hold %zu-byte floats (dtype attribute), it holds %s of %zu bytes", path, name,
                     elem_size, H5Tget_class(t) == H5T_FLOAT ? "floats" : "non-floats", H5Tget_size(t));
        else
            kvc_fail(err, "%s: %s should hold integers", path, name);
        goto fail;
    }
    h5_close(t);
    h5_close(sp);
    return ds;
fail:
    h5_close(t);
    h5_close(sp);
    h5_close(ds);
    return -1;
}

/* Releases a file's handles and memory (safe on a partly opened one). */
static void file_close(kv_file *f) {
    for (int i = 0; i < f->n_x; i++) h5_close(f->x[i]);
    free(f->x);
    h5_close(f->pos);
    h5_close(f->half_type);
    h5_close(f->fid);
    free(f->path);
    memset(f, 0, sizeof *f);
    f->fid = f->pos = f->half_type = H5I_INVALID_HID;
}

/* Opens path into f: attributes into *in, then /tokens, /positions and every stored
 * layer's k, v, q, each checked against the attributes. */
static int file_open(kv_file *f, const char *path, kvc_kv_info *in, kvc_err *err) {
    hid_t g = H5I_INVALID_HID, dcpl = H5I_INVALID_HID, tok = H5I_INVALID_HID, t = H5I_INVALID_HID;
    f->fid = f->pos = f->half_type = H5I_INVALID_HID;
    if (!(f->path = strdup(path))) return kvc_fail(err, "out of memory");
    if (access(path, R_OK) != 0) return kvc_fail(err, "cannot open KV dataset %s: %s", path, strerror(errno));
    if (H5Fis_hdf5(path) <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return kvc_fail(err, "%s is not an HDF5 file (a KV dataset from `kvcodec capture` is expected)", path);
    }
    H5_CHECK(f->fid = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT), err, "cannot open %s as HDF5 (damaged file?)", path);
    if (info_read(f->fid, path, in, err)) goto fail;
    size_t es = strcmp(in->dtype, "f16") == 0 ? 2 : 4;
    int n_x = in->n_layers_stored * 3;
    if (!(f->x = malloc((size_t)n_x * sizeof *f->x))) {
        kvc_fail(err, "out of memory");
        goto fail;
    }
    for (int i = 0; i < n_x; i++) f->x[i] = H5I_INVALID_HID;
    f->n_x = n_x;
    if ((tok = xset_open(f->fid, path, "/tokens", in->n_tokens, 0, 0, H5T_INTEGER, 0, err)) < 0) goto fail;
    if ((f->pos = xset_open(f->fid, path, "/positions", in->n_tokens, 0, 0, H5T_INTEGER, 0, err)) < 0) goto fail;
    for (int j = 0; j < in->n_layers_stored; j++) {
        char name[64];
        int64_t lv;
        htri_t ex;
        snprintf(name, sizeof name, "/layer_%02d", in->layers[j]);
        H5_CHECK(ex = H5Lexists(f->fid, name, H5P_DEFAULT), err, "%s: cannot look up %s", path, name);
        if (!ex) {
            kvc_fail(err, "%s: missing group %s although 'layers' lists layer %d", path, name, in->layers[j]);
            goto fail;
        }
        for (int kind = 0; kind < 3; kind++) {
            char dn[80];
            snprintf(dn, sizeof dn, "%s/%s", name, KIND_NAME[kind]);
            int heads = kind == KV_Q ? in->n_head : in->n_head_kv;
            f->x[j * 3 + kind] = xset_open(f->fid, path, dn, in->n_tokens, heads, in->head_dim, H5T_FLOAT, es, err);
            if (f->x[j * 3 + kind] < 0) goto fail;
        }
        char where[600];
        snprintf(where, sizeof where, "%s: %s", path, name);
        H5_CHECK(g = H5Gopen2(f->fid, name, H5P_DEFAULT), err, "%s: cannot open group %s", path, name);
        if (attr_int(g, where, "layer", 0, INT32_MAX, &lv, err)) goto fail;
        if (lv != in->layers[j]) {
            kvc_fail(err, "%s: group %s has attribute layer = %lld", path, name, (long long)lv);
            goto fail;
        }
        h5_close(g);
        g = H5I_INVALID_HID;
    }
    /* chunk rows of the first layer dataset: the unit reads and batcher blocks align to */
    f->chunk = 1;
    if (n_x) {
        hsize_t cd[3];
        H5_CHECK(dcpl = H5Dget_create_plist(f->x[0]), err, "%s: cannot read the storage layout", path);
        if (H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, 3, cd) == 3 && cd[0] > 0) f->chunk = (int64_t)cd[0];
        /* f16 in the standard layout is read raw and converted here: HDF5's own soft
         * conversion to float runs at about 30 MB/s, ~100x slower. Other layouts use it. */
        H5_CHECK(f->half_type = kvc_h5_f16_type(), err, "cannot make the HDF5 half type");
        f->half = 1;
        for (int i = 0; f->half && i < n_x; i++) {
            htri_t eq;
            h5_close(t);
            H5_CHECK(t = H5Dget_type(f->x[i]), err, "%s: cannot read a dataset type", path);
            H5_CHECK(eq = H5Tequal(t, f->half_type), err, "%s: cannot compare dataset types", path);
            f->half = eq > 0;
        }
    }
    f->n = in->n_tokens;
    h5_close(t);
    h5_close(dcpl);
    h5_close(tok);
    return 0;
fail:
    h5_close(t);
    h5_close(dcpl);
    h5_close(tok);
    h5_close(g);
    return -1;
}

kvc_dataset *kvc_dataset_open(const char *const *paths, int n_paths, kvc_err *err) {
    if (!paths || n_paths <= 0) {
        kvc_fail(err, "no KV dataset files given");
        return NULL;
    }
    kvc_h5_quiet();
    kvc_dataset *d = calloc(1, sizeof *d);
    if (!d || !(d->f = calloc((size_t)n_paths, sizeof *d->f))) {
        free(d);
        kvc_fail(err, "out of memory");
        return NULL;
    }
    int mixed = 0;
    int64_t total = 0, max_chunk = 1;
    for (int i = 0; i < n_paths; i++) {
        kvc_kv_info in;
        d->n_files = i + 1;
        if (file_open(&d->f[i], paths[i], &in, err)) goto fail;
        if (i == 0) d->info = in;
        else if (info_compare(&d->info, paths[0], &in, paths[i], err)) goto fail;
        mixed |= strcmp(in.dtype, d->info.dtype) != 0;
        d->f[i].t0 = total;
        total += in.n_tokens;
        if (d->f[i].chunk > max_chunk) max_chunk = d->f[i].chunk;
    }
    d->info.n_tokens = total;
    if (mixed) snprintf(d->info.dtype, sizeof d->info.dtype, "mixed");
    /* staging for f16 reads: whole chunks, about SCRATCH_BYTES */
    int64_t row_bytes = (int64_t)d->info.n_head * d->info.head_dim * 2;
    d->scratch_rows = SCRATCH_BYTES / row_bytes;
    if (d->scratch_rows < max_chunk) d->scratch_rows = max_chunk;
    if (!(d->scratch = kvc_malloc_array((size_t)d->scratch_rows, (size_t)row_bytes))) {
        kvc_fail(err, "out of memory for the read buffer");
        goto fail;
    }
    return d;
fail:
    kvc_dataset_close(d);
    return NULL;
}

void kvc_dataset_close(kvc_dataset *d) {
    if (!d) return;
    for (int i = 0; i < d->n_files; i++) file_close(&d->f[i]);
    free(d->f);
    free(d->scratch);
    free(d);
}

const kvc_kv_info *kvc_dataset_info(const kvc_dataset *d) { return &d->info; }

/* ---- reads -------------------------------------------------------------------------- */

/* f16 bits to f32, exact. Subnormal halves are converted as integers times 2^-24 (no f32
 * denormals, so flush-to-zero modes cannot bite); selects are masks so the loop vectorises. */
static void half_to_float(const uint16_t *restrict h, float *restrict out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t x = h[i], em = x & 0x7fffu, sub;
        float f = (float)(int32_t)em * 0x1p-24f;
        memcpy(&sub, &f, 4);
        uint32_t m_sub = 0u - (uint32_t)(em < 0x400u), m_inf = 0u - (uint32_t)(em >= 0x7c00u);
        uint32_t bits = (((em << 13) + 0x38000000u) & ~m_sub) | (sub & m_sub);
        bits = (bits & ~m_inf) | ((0x7f800000u | ((em & 0x3ffu) << 13)) & m_inf);
        bits |= (x & 0x8000u) << 16;
        memcpy(&out[i], &bits, 4);
    }
}

/* Index of the first f16 Inf/NaN in h[0..n), or -1. */
static int64_t half_first_bad(const uint16_t *h, size_t n) {
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (h[i] & 0x7c00u) == 0x7c00u;
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++)
        if ((h[i] & 0x7c00u) == 0x7c00u) return (int64_t)i;
    return -1;
}

/* Index of the first f32 Inf/NaN in x[0..n), or -1. */
static int64_t float_first_bad(const float *x, size_t n) {
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &x[i], 4);
        bad |= (b & 0x7f800000u) == 0x7f800000u;
    }
    if (!bad) return -1;
    for (size_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &x[i], 4);
        if ((b & 0x7f800000u) == 0x7f800000u) return (int64_t)i;
    }
    return -1;
}

/* Reads rows [a, a+n) of dataset ds of file f with memory type mt into buf by one hyperslab.
 * The memory space has the selection's own shape: with a flat one HDF5 falls back to
 * element-wise copying, about 100x slower. */
static int slab_read(const kv_file *f, hid_t ds, const char *what, hid_t mt, int64_t a, int64_t n, void *buf,
                     kvc_err *err) {
    hid_t fs = H5I_INVALID_HID, ms = H5I_INVALID_HID;
    hsize_t start[3] = {(hsize_t)a, 0, 0}, count[3];
    int rc = -1, rank;
    H5_CHECK(fs = H5Dget_space(ds), err, "%s: cannot read the shape of %s", f->path, what);
    H5_CHECK(rank = H5Sget_simple_extent_dims(fs, count, NULL), err, "%s: cannot read the shape of %s", f->path, what);
    count[0] = (hsize_t)n;
    H5_CHECK(H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL), err, "%s: cannot select rows", f->path);
    H5_CHECK(ms = H5Screate_simple(rank, count, NULL), err, "out of memory");
    H5_CHECK(H5Dread(ds, mt, ms, fs, H5P_DEFAULT, buf), err, "%s: cannot read rows [%lld, %lld) of %s (damaged file?)",
             f->path, (long long)a, (long long)(a + n), what);
    rc = 0;
fail:
    h5_close(ms);
    h5_close(fs);
    return rc;
}

/* Reports a non-finite value at element i of a read of rows starting at file row a. */
static int bad_value(const kvc_dataset *d, const kv_file *f, int j, int kind, int64_t a, int64_t i, int64_t rowe,
                     int nan, kvc_err *err) {
    int64_t row = a + i / rowe;
    return kvc_fail(err, "%s: non-finite value (%s) in layer %d %s at row %lld (head %lld, element %lld; token %lld "
                    "of the dataset): the capture is corrupt", f->path, nan ? "NaN" : "Inf", d->info.layers[j],
                    KIND_NAME[kind], (long long)row, (long long)((i % rowe) / d->info.head_dim),
                    (long long)(i % d->info.head_dim), (long long)(f->t0 + row));
}

/* Reads rows [a, a+n) of file f's layer j, kind into out (n, H, D) f32, rejecting non-finite
 * values. f16 goes through the scratch buffer in chunk-aligned pieces. */
static int file_read(kvc_dataset *d, const kv_file *f, int j, int kind, int64_t a, int64_t n, float *out,
                     kvc_err *err) {
    hid_t ds = f->x[j * 3 + kind];
    char what[32];
    snprintf(what, sizeof what, "/layer_%02d/%s", d->info.layers[j], KIND_NAME[kind]);
    int64_t rowe = (int64_t)(kind == KV_Q ? d->info.n_head : d->info.n_head_kv) * d->info.head_dim;
    if (!f->half) {
        if (slab_read(f, ds, what, H5T_NATIVE_FLOAT, a, n, out, err)) return -1;
        int64_t bad = float_first_bad(out, (size_t)(n * rowe));
        if (bad >= 0) return bad_value(d, f, j, kind, a, bad, rowe, out[bad] != out[bad], err);
        return 0;
    }
    int64_t piece = d->scratch_rows / f->chunk * f->chunk; /* whole chunks */
    for (int64_t lo = a, hi; lo < a + n; lo = hi) {
        hi = (lo / piece + 1) * piece;
        if (hi > a + n) hi = a + n;
        size_t cnt = (size_t)((hi - lo) * rowe);
        if (slab_read(f, ds, what, f->half_type, lo, hi - lo, d->scratch, err)) return -1;
        int64_t bad = half_first_bad(d->scratch, cnt);
        if (bad >= 0) return bad_value(d, f, j, kind, lo, bad, rowe, (d->scratch[bad] & 0x3ffu) != 0, err);
        half_to_float(d->scratch, out + (lo - a) * rowe, cnt);
    }
    return 0;
}

/* Checks a global row range; 0 or -1 with err. */
static int range_check(const kvc_dataset *d, int64_t t0, int64_t n, kvc_err *err) {
    if (t0 < 0 || n < 0 || t0 > d->info.n_tokens || n > d->info.n_tokens - t0)
        return kvc_fail(err, "tokens [%lld, %lld) are out of range: the dataset has %lld", (long long)t0,
                        (long long)(t0 + n), (long long)d->info.n_tokens);
    return 0;
}

int kvc_dataset_read(kvc_dataset *d, int j, int kind, int64_t t0, int64_t n, float *out, kvc_err *err) {
    if (j < 0 || j >= d->info.n_layers_stored || kind < KV_K || kind > KV_Q)
        return kvc_fail(err, "no stored layer %d kind %d (the dataset stores %d layers; kinds are 0..2)", j, kind,
                        d->info.n_layers_stored);
    if (range_check(d, t0, n, err)) return -1;
    int64_t rowe = (int64_t)(kind == KV_Q ? d->info.n_head : d->info.n_head_kv) * d->info.head_dim;
    int rc = 0;
    for (int i = 0; i < d->n_files && rc == 0; i++) {
        const kv_file *f = &d->f[i];
        int64_t lo = t0 > f->t0 ? t0 : f->t0, hi = t0 + n < f->t0 + f->n ? t0 + n : f->t0 + f->n;
        if (lo < hi) rc = file_read(d, f, j, kind, lo - f->t0, hi - lo, out + (lo - t0) * rowe, err);
    }
    return rc;
}

int kvc_dataset_read_positions(kvc_dataset *d, int64_t t0, int64_t n, int32_t *out, kvc_err *err) {
    if (range_check(d, t0, n, err)) return -1;
    int rc = 0;
    for (int i = 0; i < d->n_files && rc == 0; i++) {
        const kv_file *f = &d->f[i];
        int64_t lo = t0 > f->t0 ? t0 : f->t0, hi = t0 + n < f->t0 + f->n ? t0 + n : f->t0 + f->n;
        if (lo >= hi) continue;
        int32_t *o = out + (lo - t0);
        rc = slab_read(f, f->pos, "/positions", H5T_NATIVE_INT32, lo - f->t0, hi - lo, o, err);
        for (int64_t r = 0; rc == 0 && r < hi - lo; r++)
            if (o[r] < 0 || o[r] >= d->info.ctx)
                rc = kvc_fail(err, "%s: /positions row %lld is %d, outside the capture window [0, %d)", f->path,
                              (long long)(lo - f->t0 + r), o[r], d->info.ctx);
    }
    return rc;
}

/* ---- split -------------------------------------------------------------------------- */

/* Moves *best to cut if cut is nearer the target; tracks the last cut below n and the first above 0. */
static void split_consider(int64_t cut, double target, int64_t n, int64_t *best, int64_t *below, int64_t *above) {
    double dc = (double)cut - target, db = (double)*best - target;
    if ((dc < 0 ? -dc : dc) < (db < 0 ? -db : db)) *best = cut;
    if (cut < n && cut > *below) *below = cut;
    if (cut > 0 && (*above < 0 || cut < *above)) *above = cut;
}

void kvc_dataset_split(const kvc_dataset *d, double val_frac, int64_t *train_end, int64_t *val_begin) {
    /* candidate cuts: every capture window start of every file (windows restart per file), and the end */
    int64_t n = d->info.n_tokens, best = n, below = -1, above = -1;
    double target = (double)n * (1.0 - (val_frac < 0 ? 0 : val_frac > 1 ? 1 : val_frac));
    for (int i = 0; i < d->n_files; i++) {
        const kv_file *f = &d->f[i];
        for (int64_t c = f->t0; c < f->t0 + f->n; c += d->info.ctx) split_consider(c, target, n, &best, &below, &above);
        split_consider(f->t0 + f->n, target, n, &best, &below, &above);
    }
    /* a non-zero fraction gets at least one window, and training keeps at least one */
    if (val_frac > 0 && best == n && below >= 0) best = below;
    if (val_frac < 1 && best == 0 && above >= 0) best = above;
    *train_end = best;
    *val_begin = best;
}
