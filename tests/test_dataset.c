/* test_dataset.c - the KV dataset reader (data/dataset.c) on small files written here, by
 * kv_writer and by hand with the HDF5 API: round trips in f16/f32, several files as one,
 * every rejection message, NaN reporting, the chunk-aware batcher and the train/val split. */
#include <criterion/criterion.h>
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvc/dataset.h"

#define F16_REL 4.8828125e-4 /* 2^-11: half-precision rounding, relative */

/* ---- files ---------------------------------------------------------------------------- */

/* A per-test file name under /tmp (tests run in their own processes: pid makes it unique). */
static const char *tmp_path(const char *tag) {
    static char buf[8][256];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 256, "/tmp/kvc_test_dataset_%d_%s.h5", (int)getpid(), tag);
    return p;
}

/* Model shape of the test files: 4 layers, layers 1 and 3 stored, 4 query / 2 KV heads, D 8. */
static kvc_kv_info test_info(const char *dtype) {
    kvc_kv_info in;
    memset(&in, 0, sizeof in);
    snprintf(in.model_name, sizeof in.model_name, "tiny-test");
    snprintf(in.model_fingerprint, sizeof in.model_fingerprint, "0123456789abcdef");
    snprintf(in.corpus_name, sizeof in.corpus_name, "corpus.txt");
    memset(in.corpus_sha256, 'a', 64);
    snprintf(in.dtype, sizeof in.dtype, "%s", dtype);
    in.format_version = KVC_KV_FORMAT_VERSION;
    in.n_layer = 4;
    in.n_head = 4;
    in.n_head_kv = 2;
    in.head_dim = 8;
    in.rope_base = 10000.0f;
    in.ctx = 16;
    in.n_layers_stored = 2;
    in.layers[0] = 1;
    in.layers[1] = 3;
    return in;
}

static int row_elems(const kvc_kv_info *in, int kind) { return (kind == KV_Q ? in->n_head : in->n_head_kv) * in->head_dim; }

/* The value stored at global token t, model layer l, kind, element e of the row. */
static float ref_val(int64_t t, int l, int kind, int e) {
    uint32_t h = (uint32_t)t * 2654435761u ^ (uint32_t)(l * 977 + kind * 131 + e + 1) * 40503u;
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    return ((float)(h & 0xffff) / 65536.0f - 0.5f) * 4.0f + (float)(t % 5);
}

/* What a file of dtype gives back for ref_val: exact in f32, rounded to half in f16. */
static float stored_val(const char *dtype, int64_t t, int l, int kind, int e) {
    float v = ref_val(t, l, kind, e);
    return strcmp(dtype, "f16") == 0 ? kvc_f16_to_f32(kvc_f32_to_f16(v)) : v;
}

/* Writes n tokens (global indices t_base..) with kv_writer, appending 37 at a time so appends
 * and chunks do not line up. Positions restart every ctx tokens from the file's start. */
static void make_file(const char *path, const kvc_kv_info *in, int64_t n, int64_t t_base, int chunk, int gzip) {
    kvc_err err = {{0}};
    kvc_kv_writer *w = kvc_kv_writer_open(path, in, chunk, gzip, &err);
    cr_assert(w, "kvc_kv_writer_open: %s", err.msg);
    const int S = 37, L = in->n_layers_stored;
    float *buf[3][KVC_MAX_LAYERS];
    for (int kind = 0; kind < 3; kind++)
        for (int j = 0; j < L; j++) buf[kind][j] = malloc((size_t)S * row_elems(in, kind) * sizeof(float));
    int32_t ids[37], pos[37];
    for (int64_t t = 0; t < n; t += S) {
        int m = n - t < S ? (int)(n - t) : S;
        for (int r = 0; r < m; r++) {
            ids[r] = (int32_t)((t_base + t + r) % 1000);
            pos[r] = (int32_t)((t + r) % in->ctx);
            for (int kind = 0; kind < 3; kind++)
                for (int j = 0; j < L; j++)
                    for (int e = 0; e < row_elems(in, kind); e++)
                        buf[kind][j][r * row_elems(in, kind) + e] = ref_val(t_base + t + r, in->layers[j], kind, e);
        }
        cr_assert_eq(kvc_kv_writer_append(w, ids, pos, m, (const float *const *)buf[KV_K], (const float *const *)buf[KV_V],
                                      (const float *const *)buf[KV_Q], &err), 0, "append: %s", err.msg);
    }
    cr_assert_eq(kvc_kv_writer_close(w, 1, &err), 0, "close: %s", err.msg);
    for (int kind = 0; kind < 3; kind++)
        for (int j = 0; j < L; j++) free(buf[kind][j]);
}

/* Asserts that no HDF5 file or object is left open (after kvc_dataset_close or a failed open). */
static void assert_no_open_hdf5(void) {
    ssize_t n = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
    cr_assert_eq(n, 0, "%zd HDF5 objects left open", n);
}

/* Opens paths, asserting success. */
static kvc_dataset *open_ok(const char *const *paths, int n) {
    kvc_err err = {{0}};
    kvc_dataset *d = kvc_dataset_open(paths, n, &err);
    cr_assert(d, "kvc_dataset_open: %s", err.msg);
    return d;
}

/* Opens paths expecting failure; every string in want[] must be in the message. */
static void open_fails(const char *const *paths, int n, const char *const *want, int n_want) {
    kvc_err err = {{0}};
    kvc_dataset *d = kvc_dataset_open(paths, n, &err);
    cr_assert_null(d, "kvc_dataset_open should have failed");
    assert_no_open_hdf5();
    for (int i = 0; i < n_want; i++) cr_assert(strstr(err.msg, want[i]), "message '%s' lacks '%s'", err.msg, want[i]);
}

/* Edits a written file with the HDF5 API: sets an int32 root attribute. */
static void set_attr_i32(const char *path, const char *name, int32_t v) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    cr_assert(f >= 0);
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    cr_assert(a >= 0);
    cr_assert(H5Awrite(a, H5T_NATIVE_INT32, &v) >= 0);
    H5Aclose(a);
    H5Fclose(f);
}

/* Removes an object (dataset or group) from a written file. */
static void delete_link(const char *path, const char *name) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    cr_assert(f >= 0);
    cr_assert(H5Ldelete(f, name, H5P_DEFAULT) >= 0);
    H5Fclose(f);
}

/* IEEE binary16 as the schema defines it; order selects little or big endian. */
static hid_t half_type(H5T_order_t order) {
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    H5Tset_fields(t, 15, 10, 5, 0, 10);
    H5Tset_size(t, 2);
    H5Tset_ebias(t, 15);
    H5Tset_order(t, order);
    return t;
}

/* Overwrites one element (row, e) of dataset name with raw bits: f16 (bits16) or f32 (f). */
static void poke(const char *path, const char *name, int64_t row, int e, int f16, uint16_t bits16, float f) {
    hid_t fid = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT), ds = H5Dopen2(fid, name, H5P_DEFAULT);
    cr_assert(fid >= 0 && ds >= 0);
    hid_t fs = H5Dget_space(ds);
    hsize_t dims[3], one[3] = {1, 1, 1}, n1 = 1;
    H5Sget_simple_extent_dims(fs, dims, NULL);
    hsize_t start[3] = {(hsize_t)row, (hsize_t)e / dims[2], (hsize_t)e % dims[2]};
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, one, NULL);
    hid_t ms = H5Screate_simple(1, &n1, NULL), mt = f16 ? half_type(H5T_ORDER_LE) : H5Tcopy(H5T_NATIVE_FLOAT);
    cr_assert(H5Dwrite(ds, mt, ms, fs, H5P_DEFAULT, f16 ? (const void *)&bits16 : (const void *)&f) >= 0);
    H5Tclose(mt);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(ds);
    H5Fclose(fid);
}

/* ---- a file written by hand from docs/formats.md (no kv_writer) ------------------------- */

static void hattr_str(hid_t loc, const char *name, const char *v) {
    hid_t t = H5Tcopy(H5T_C_S1), sp = H5Screate(H5S_SCALAR);
    H5Tset_size(t, strlen(v));
    hid_t a = H5Acreate2(loc, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, t, v);
    H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(t);
}

static void hattr_num(hid_t loc, const char *name, hid_t ft, hid_t mt, const void *v, hsize_t n) {
    hid_t sp = n ? H5Screate_simple(1, &n, NULL) : H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, ft, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, mt, v);
    H5Aclose(a);
    H5Sclose(sp);
}

/* n tokens, big-endian f16, contiguous (unchunked) datasets: HDF5 must convert on read. */
static void make_file_by_hand(const char *path, const kvc_kv_info *in, int64_t n) {
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    cr_assert(f >= 0);
    int32_t i32;
    int64_t i64 = n;
    hattr_str(f, "format", KVC_KV_FORMAT);
    i32 = KVC_KV_FORMAT_VERSION, hattr_num(f, "format_version", H5T_STD_I32LE, H5T_NATIVE_INT32, &i32, 0);
    hattr_str(f, "model_name", in->model_name);
    hattr_str(f, "model_fingerprint", in->model_fingerprint);
    hattr_str(f, "corpus_name", in->corpus_name);
    hattr_str(f, "corpus_sha256", in->corpus_sha256);
    hattr_num(f, "n_tokens", H5T_STD_I64LE, H5T_NATIVE_INT64, &i64, 0);
    hattr_num(f, "n_layer", H5T_STD_I32LE, H5T_NATIVE_INT, &in->n_layer, 0);
    hattr_num(f, "layers", H5T_STD_I32LE, H5T_NATIVE_INT, in->layers, (hsize_t)in->n_layers_stored);
    hattr_num(f, "n_head", H5T_STD_I32LE, H5T_NATIVE_INT, &in->n_head, 0);
    hattr_num(f, "n_head_kv", H5T_STD_I32LE, H5T_NATIVE_INT, &in->n_head_kv, 0);
    hattr_num(f, "head_dim", H5T_STD_I32LE, H5T_NATIVE_INT, &in->head_dim, 0);
    hattr_num(f, "rope_base", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, &in->rope_base, 0);
    hattr_str(f, "rope_pairing", "adjacent");
    hattr_num(f, "ctx", H5T_STD_I32LE, H5T_NATIVE_INT, &in->ctx, 0);
    hattr_str(f, "dtype", "f16");
    hattr_str(f, "created_by", "test_dataset");
    int32_t *iv = malloc((size_t)n * sizeof *iv);
    hsize_t dn = (hsize_t)n;
    hid_t sp1 = H5Screate_simple(1, &dn, NULL);
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t t = 0; t < n; t++) iv[t] = pass ? (int32_t)(t % in->ctx) : (int32_t)(t % 1000);
        hid_t ds = H5Dcreate2(f, pass ? "positions" : "tokens", H5T_STD_I32LE, sp1, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        H5Dwrite(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, iv);
        H5Dclose(ds);
    }
    H5Sclose(sp1);
    free(iv);
    hid_t be = half_type(H5T_ORDER_BE);
    for (int j = 0; j < in->n_layers_stored; j++) {
        char g[32];
        snprintf(g, sizeof g, "layer_%02d", in->layers[j]);
        hid_t grp = H5Gcreate2(f, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        hattr_num(grp, "layer", H5T_STD_I32LE, H5T_NATIVE_INT, &in->layers[j], 0);
        for (int kind = 0; kind < 3; kind++) {
            int re = row_elems(in, kind);
            hsize_t dims[3] = {(hsize_t)n, (hsize_t)re / in->head_dim, (hsize_t)in->head_dim};
            uint16_t *h = malloc((size_t)n * re * sizeof *h);
            for (int64_t t = 0; t < n; t++)
                for (int e = 0; e < re; e++) {
                    uint16_t b = kvc_f32_to_f16(ref_val(t, in->layers[j], kind, e));
                    h[t * re + e] = (uint16_t)(b >> 8 | b << 8); /* big endian in memory too */
                }
            hid_t sp = H5Screate_simple(3, dims, NULL);
            hid_t ds = H5Dcreate2(grp, kind == KV_K ? "k" : kind == KV_V ? "v" : "q", be, sp, H5P_DEFAULT, H5P_DEFAULT,
                                  H5P_DEFAULT);
            cr_assert(H5Dwrite(ds, be, H5S_ALL, H5S_ALL, H5P_DEFAULT, h) >= 0);
            H5Dclose(ds);
            H5Sclose(sp);
            free(h);
        }
        H5Gclose(grp);
    }
    H5Tclose(be);
    H5Fclose(f);
}

/* ---- reads ---------------------------------------------------------------------------- */

/* Reads every stored layer and kind over [t0, t0+n) and compares with stored_val, plus the
 * positions. Tokens below `split` are stored as dtype_a, the rest (a second file, whose
 * positions restart at 0) as dtype_b. */
static void check_reads(kvc_dataset *d, const char *dtype_a, int64_t split, const char *dtype_b, int64_t t0,
                        int64_t n) {
    const kvc_kv_info *in = kvc_dataset_info(d);
    kvc_err err = {{0}};
    for (int j = 0; j < in->n_layers_stored; j++)
        for (int kind = 0; kind < 3; kind++) {
            int re = row_elems(in, kind);
            float *out = malloc((size_t)n * re * sizeof *out);
            cr_assert_eq(kvc_dataset_read(d, j, kind, t0, n, out, &err), 0, "%s", err.msg);
            for (int64_t t = 0; t < n; t++)
                for (int e = 0; e < re; e++) {
                    int64_t g = t0 + t;
                    const char *dt = g >= split ? dtype_b : dtype_a;
                    float want = stored_val(dt, g, in->layers[j], kind, e), ref = ref_val(g, in->layers[j], kind, e);
                    cr_assert_eq(out[t * re + e], want, "layer %d kind %d token %lld e %d: %g != %g", in->layers[j],
                                 kind, (long long)g, e, out[t * re + e], want);
                    cr_assert_leq(fabs(out[t * re + e] - ref), F16_REL * fabs(ref) + 1e-7);
                }
            free(out);
        }
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    cr_assert_eq(kvc_dataset_read_positions(d, t0, n, pos, &err), 0, "%s", err.msg);
    for (int64_t t = 0; t < n; t++) {
        int64_t g = t0 + t, local = g >= split ? g - split : g;
        cr_assert_eq(pos[t], local % in->ctx, "position of token %lld", (long long)g);
    }
    free(pos);
}

Test(dataset, roundtrip_f32) {
    kvc_kv_info in = test_info("f32");
    const char *p = tmp_path("f32");
    make_file(p, &in, 100, 0, 16, 0);
    kvc_dataset *d = open_ok(&p, 1);
    const kvc_kv_info *i = kvc_dataset_info(d);
    cr_assert_eq(i->n_tokens, 100);
    cr_assert_str_eq(i->model_fingerprint, "0123456789abcdef");
    cr_assert_str_eq(i->model_name, "tiny-test");
    cr_assert_str_eq(i->dtype, "f32");
    cr_assert_eq(i->n_layers_stored, 2);
    cr_assert_eq(i->layers[0], 1);
    cr_assert_eq(i->layers[1], 3);
    cr_assert_eq(i->n_head, 4);
    cr_assert_eq(i->n_head_kv, 2);
    cr_assert_eq(i->head_dim, 8);
    cr_assert_eq(i->ctx, 16);
    cr_assert_eq(i->rope_base, 10000.0f);
    check_reads(d, "f32", 1 << 30, "f32", 0, 100);
    check_reads(d, "f32", 1 << 30, "f32", 13, 40); /* starts and ends inside chunks */
    check_reads(d, "f32", 1 << 30, "f32", 99, 1);
    kvc_dataset_close(d);
    assert_no_open_hdf5();
    unlink(p);
}

Test(dataset, roundtrip_f16_within_half_rounding) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("f16");
    make_file(p, &in, 150, 0, 32, 0);
    kvc_dataset *d = open_ok(&p, 1);
    cr_assert_str_eq(kvc_dataset_info(d)->dtype, "f16");
    check_reads(d, "f16", 1 << 30, "f16", 0, 150);
    check_reads(d, "f16", 1 << 30, "f16", 31, 66);
    kvc_dataset_close(d);
    unlink(p);
}

Test(dataset, f16_conversion_is_exact_for_every_finite_half) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("allhalves");
    const int N = 65536 / 16; /* layer 1 k rows hold 16 values: every bit pattern once */
    make_file(p, &in, N, 0, 64, 0);
    uint16_t *h = malloc(65536 * sizeof *h);
    for (int i = 0; i < 65536; i++) h[i] = ((i >> 10) & 0x1f) == 0x1f ? (uint16_t)(i & 0x8000) : (uint16_t)i;
    hid_t fid = H5Fopen(p, H5F_ACC_RDWR, H5P_DEFAULT), ds = H5Dopen2(fid, "/layer_01/k", H5P_DEFAULT);
    hid_t mt = half_type(H5T_ORDER_LE);
    cr_assert(H5Dwrite(ds, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, h) >= 0);
    H5Tclose(mt);
    H5Dclose(ds);
    H5Fclose(fid);
    kvc_dataset *d = open_ok(&p, 1);
    float *out = malloc(65536 * sizeof *out);
    kvc_err err = {{0}};
    cr_assert_eq(kvc_dataset_read(d, 0, KV_K, 0, N, out, &err), 0, "%s", err.msg);
    for (int i = 0; i < 65536; i++) {
        float want = kvc_f16_to_f32(h[i]);
        cr_assert(memcmp(&out[i], &want, 4) == 0, "half 0x%04x: %a != %a", h[i], out[i], want);
    }
    kvc_dataset_close(d);
    free(out);
    free(h);
    unlink(p);
}

Test(dataset, f16_reads_longer_than_the_staging_buffer) {
    kvc_kv_info in = test_info("f16");
    in.n_head = 64, in.head_dim = 128, in.n_layers_stored = 1; /* q rows of 16 KiB: 256 rows per 4 MiB */
    const char *p = tmp_path("wide");
    make_file(p, &in, 600, 0, 64, 0);
    kvc_dataset *d = open_ok(&p, 1);
    check_reads(d, "f16", 1 << 30, "f16", 100, 450); /* pieces [100,256) [256,512) [512,550) */
    kvc_dataset_close(d);
    unlink(p);
}

Test(dataset, roundtrip_gzip_chunks) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("gz");
    make_file(p, &in, 120, 0, 24, 4);
    kvc_dataset *d = open_ok(&p, 1);
    check_reads(d, "f16", 1 << 30, "f16", 0, 120);
    check_reads(d, "f16", 1 << 30, "f16", 23, 50);
    kvc_dataset_close(d);
    unlink(p);
}

Test(dataset, reads_a_file_written_by_hand_big_endian_unchunked) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("byhand");
    make_file_by_hand(p, &in, 40);
    kvc_dataset *d = open_ok(&p, 1);
    check_reads(d, "f16", 1 << 30, "f16", 0, 40);
    check_reads(d, "f16", 1 << 30, "f16", 7, 9);
    kvc_dataset_close(d);
    unlink(p);
}

Test(dataset, two_files_read_as_one_across_the_boundary) {
    kvc_kv_info a = test_info("f32"), b = test_info("f16");
    snprintf(b.corpus_name, sizeof b.corpus_name, "other.txt"); /* other corpora are fine */
    const char *p[2] = {tmp_path("a"), tmp_path("b")};
    make_file(p[0], &a, 70, 0, 16, 0);
    make_file(p[1], &b, 45, 70, 16, 0);
    kvc_dataset *d = open_ok(p, 2);
    cr_assert_eq(kvc_dataset_info(d)->n_tokens, 115);
    cr_assert_str_eq(kvc_dataset_info(d)->dtype, "mixed");
    check_reads(d, "f32", 70, "f16", 0, 115);
    check_reads(d, "f32", 70, "f16", 60, 20);
    check_reads(d, "f32", 70, "f16", 70, 1);
    check_reads(d, "f32", 70, "f16", 69, 1);
    kvc_dataset_close(d);
    assert_no_open_hdf5();
    unlink(p[0]);
    unlink(p[1]);
}

Test(dataset, rejects_files_from_another_model) {
    kvc_kv_info a = test_info("f16"), b = test_info("f16");
    snprintf(b.model_fingerprint, sizeof b.model_fingerprint, "89abcdef01234567");
    const char *p[2] = {tmp_path("m1"), tmp_path("m2")};
    make_file(p[0], &a, 20, 0, 8, 0);
    make_file(p[1], &b, 20, 0, 8, 0);
    const char *want[] = {p[0], p[1], "0123456789abcdef", "89abcdef01234567", "different models"};
    open_fails(p, 2, want, 5);
    unlink(p[0]);
    unlink(p[1]);
}

Test(dataset, rejects_other_head_dim_and_other_layers) {
    kvc_kv_info a = test_info("f16"), b = test_info("f16"), c = test_info("f32"), e = test_info("f16");
    b.head_dim = 16;
    c.layers[1] = 2;
    e.n_layers_stored = 3; /* {0,1,3} */
    e.layers[0] = 0, e.layers[1] = 1, e.layers[2] = 3;
    const char *p[4] = {tmp_path("h1"), tmp_path("h2"), tmp_path("h3"), tmp_path("h4")};
    make_file(p[0], &a, 20, 0, 8, 0);
    make_file(p[1], &b, 20, 0, 8, 0);
    make_file(p[2], &c, 20, 0, 8, 0);
    make_file(p[3], &e, 20, 0, 8, 0);
    const char *want_hd[] = {p[1], "head_dim 16", p[0], "has 8"};
    open_fails(p, 2, want_hd, 4);
    const char *pc[2] = {p[0], p[2]};
    const char *want_l[] = {p[2], "{1,2}", p[0], "{1,3}", "layers"};
    open_fails(pc, 2, want_l, 5);
    const char *pe[2] = {p[3], p[0]}, *pf[2] = {p[0], p[3]}; /* more layers first, and fewer first */
    const char *want_e[] = {"{0,1,3}", "{1,3}"};
    open_fails(pe, 2, want_e, 2);
    open_fails(pf, 2, want_e, 2);
    for (int i = 0; i < 4; i++) unlink(p[i]);
}

Test(dataset, rejects_missing_datasets_and_groups) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("miss");
    make_file(p, &in, 20, 0, 8, 0);
    delete_link(p, "/layer_03/q");
    const char *want[] = {p, "missing dataset /layer_03/q"};
    open_fails(&p, 1, want, 2);
    make_file(p, &in, 20, 0, 8, 0);
    delete_link(p, "/layer_01");
    const char *want_g[] = {p, "missing group /layer_01", "layer 1"};
    open_fails(&p, 1, want_g, 3);
    make_file(p, &in, 20, 0, 8, 0);
    delete_link(p, "/positions");
    const char *want_p[] = {p, "missing dataset /positions"};
    open_fails(&p, 1, want_p, 2);
    unlink(p);
}

Test(dataset, rejects_shapes_that_disagree_with_the_attributes) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("shape");
    make_file(p, &in, 20, 0, 8, 0);
    set_attr_i32(p, "head_dim", 4);
    const char *want[] = {p, "/layer_01/k has shape [20, 2, 8]", "[20, 2, 4]"};
    open_fails(&p, 1, want, 3);
    unlink(p);
}

Test(dataset, rejects_wrong_format_version_and_name_and_non_hdf5) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("ver");
    make_file(p, &in, 20, 0, 8, 0);
    set_attr_i32(p, "format_version", 2);
    const char *want[] = {p, "version 2", "reads version 1"};
    open_fails(&p, 1, want, 3);

    hid_t f = H5Fcreate(p, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hattr_str(f, "format", "something-else");
    H5Fclose(f);
    const char *want_fmt[] = {p, "not a kvcodec KV dataset", "something-else"};
    open_fails(&p, 1, want_fmt, 3);

    FILE *fp = fopen(p, "w");
    fputs("just text\n", fp);
    fclose(fp);
    const char *want_h5[] = {p, "not an HDF5 file"};
    open_fails(&p, 1, want_h5, 2);
    unlink(p);
    const char *want_none[] = {p, "No such file"};
    open_fails(&p, 1, want_none, 2);
}

Test(dataset, reports_nan_and_inf_with_file_layer_and_row) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("nan");
    make_file(p, &in, 50, 0, 16, 0);
    poke(p, "/layer_03/v", 21, 13, 1, 0x7e00, 0);
    kvc_dataset *d = open_ok(&p, 1);
    float out[50 * 32];
    kvc_err err = {{0}};
    cr_assert_eq(kvc_dataset_read(d, 0, KV_V, 0, 50, out, &err), 0, "layer 1 is clean: %s", err.msg);
    cr_assert_eq(kvc_dataset_read(d, 1, KV_V, 0, 21, out, &err), 0, "rows before the NaN are clean: %s", err.msg);
    cr_assert_eq(kvc_dataset_read(d, 1, KV_V, 10, 20, out, &err), -1);
    cr_assert(strstr(err.msg, p) && strstr(err.msg, "NaN") && strstr(err.msg, "layer 3 v") && strstr(err.msg, "row 21"),
              "%s", err.msg);
    cr_assert(strstr(err.msg, "head 1, element 5"), "%s", err.msg);
    kvc_dataset_close(d);

    in = test_info("f32");
    const char *p2[2] = {tmp_path("clean"), tmp_path("inf")};
    make_file(p2[0], &in, 30, 0, 16, 0);
    make_file(p2[1], &in, 30, 30, 16, 0);
    poke(p2[1], "/layer_01/q", 7, 0, 0, 0, INFINITY);
    d = open_ok(p2, 2);
    cr_assert_eq(kvc_dataset_read(d, 0, KV_Q, 20, 20, out, &err), -1);
    cr_assert(strstr(err.msg, p2[1]) && strstr(err.msg, "Inf") && strstr(err.msg, "layer 1 q") &&
              strstr(err.msg, "row 7") && strstr(err.msg, "token 37"), "%s", err.msg);
    kvc_dataset_close(d);
    unlink(p);
    unlink(p2[0]);
    unlink(p2[1]);
}

Test(dataset, rejects_out_of_range_reads) {
    kvc_kv_info in = test_info("f32");
    const char *p = tmp_path("range");
    make_file(p, &in, 20, 0, 8, 0);
    kvc_dataset *d = open_ok(&p, 1);
    float out[64 * 32];
    int32_t pos[64];
    kvc_err err = {{0}};
    cr_assert_eq(kvc_dataset_read(d, 0, KV_K, 15, 6, out, &err), -1);
    cr_assert(strstr(err.msg, "[15, 21)") && strstr(err.msg, "has 20"), "%s", err.msg);
    cr_assert_eq(kvc_dataset_read(d, 0, KV_K, -1, 2, out, &err), -1);
    cr_assert_eq(kvc_dataset_read(d, 2, KV_K, 0, 2, out, &err), -1);
    cr_assert(strstr(err.msg, "stores 2 layers"), "%s", err.msg);
    cr_assert_eq(kvc_dataset_read(d, 0, 3, 0, 2, out, &err), -1);
    cr_assert_eq(kvc_dataset_read_positions(d, 10, 11, pos, &err), -1);
    cr_assert_eq(kvc_dataset_read(d, 0, KV_K, 20, 0, out, &err), 0, "an empty read at the end is fine");
    kvc_dataset_close(d);
    unlink(p);
}

/* ---- batcher -------------------------------------------------------------------------- */

/* Runs one epoch, checking every row against ref values; counts visits per token into seen
 * (indexed from o->begin) and returns the batch count. order (optional) records the tokens. */
static int run_epoch(kvc_batcher *bt, kvc_dataset *d, const kvc_batch_opts *o, const char *dtype, int *seen,
                     int64_t *order) {
    const kvc_kv_info *in = kvc_dataset_info(d);
    kvc_batch b;
    kvc_err err = {{0}};
    int rc, nb = 0;
    int64_t k = 0, total = o->end - o->begin;
    while ((rc = kvc_batcher_next(bt, &b, &err)) == 1) {
        nb++;
        cr_assert(b.n > 0 && b.n <= o->batch_tokens);
        if (b.n < o->batch_tokens) cr_assert_eq(k + b.n, total, "only the last batch may be short");
        for (int r = 0; r < b.n; r++) {
            int64_t t = b.token[r];
            cr_assert(t >= o->begin && t < o->end, "token %lld outside the range", (long long)t);
            seen[t - o->begin]++;
            if (order) order[k + r] = t;
            cr_assert_eq(b.pos[r], t % in->ctx);
            for (int j = 0; j < in->n_layers_stored; j++)
                for (int kind = 0; kind < 3; kind++) {
                    int x = j * 3 + kind, re = row_elems(in, kind);
                    if (o->want && !o->want[x]) {
                        cr_assert_null(b.x[x]);
                        continue;
                    }
                    for (int e = 0; e < re; e += 3)
                        cr_assert_eq(b.x[x][r * re + e], stored_val(dtype, t, in->layers[j], kind, e),
                                     "row of token %lld layer %d kind %d", (long long)t, in->layers[j], kind);
                }
        }
        k += b.n;
    }
    cr_assert_eq(rc, 0, "kvc_batcher_next: %s", err.msg);
    cr_assert_eq(k, total);
    return nb;
}

Test(batcher, visits_every_token_once_per_epoch_with_a_bounded_buffer) {
    kvc_kv_info in = test_info("f16");
    const char *p = tmp_path("bt");
    make_file(p, &in, 1000, 0, 32, 0); /* 32 chunks */
    kvc_dataset *d = open_ok(&p, 1);
    unsigned char want[6] = {1, 0, 1, 0, 1, 0}; /* layer 1 k and q, layer 3 v */
    kvc_batch_opts o = {.begin = 90, .end = 1000, .batch_tokens = 50, .block_tokens = 0, .buffer_blocks = 3,
                        .seed = 7, .shuffle = 1, .want = want};
    kvc_err err = {{0}};
    kvc_batcher *bt = kvc_batcher_new(d, &o, &err);
    cr_assert(bt, "%s", err.msg);
    /* buffer 3 blocks x 32 tokens of (16 + 32 + 16) floats, batch 50 rows likewise, plus indices */
    size_t rows_bytes = (size_t)(3 * 32 + 50) * (16 + 32 + 16) * 4;
    cr_assert_geq(kvc_batcher_memory_bytes(bt), rows_bytes);
    cr_assert_leq(kvc_batcher_memory_bytes(bt), rows_bytes + 4096, "%zu bytes", kvc_batcher_memory_bytes(bt));
    int seen[910];
    for (int epoch = 0; epoch < 3; epoch++) {
        cr_assert_eq(kvc_batcher_epoch(bt), epoch);
        memset(seen, 0, sizeof seen);
        int nb = run_epoch(bt, d, &o, "f16", seen, NULL);
        cr_assert_eq(nb, 19); /* 910 = 18 x 50 + 10 */
        for (int t = 0; t < 910; t++) cr_assert_eq(seen[t], 1, "token %d seen %d times in epoch %d", 90 + t, seen[t], epoch);
    }
    kvc_batcher_free(bt);
    kvc_dataset_close(d);
    unlink(p);
}

Test(batcher, seed_fixes_the_order_and_epochs_differ) {
    kvc_kv_info in = test_info("f32");
    const char *p = tmp_path("seed");
    make_file(p, &in, 400, 0, 16, 0);
    kvc_dataset *d = open_ok(&p, 1);
    int64_t ord[4][400];
    int seen[400];
    uint64_t seeds[3] = {1, 1, 2};
    kvc_err err = {{0}};
    for (int s = 0; s < 3; s++) {
        kvc_batch_opts o = {0, 400, 64, 16, 4, seeds[s], 1, NULL};
        kvc_batcher *bt = kvc_batcher_new(d, &o, &err);
        cr_assert(bt, "%s", err.msg);
        memset(seen, 0, sizeof seen);
        run_epoch(bt, d, &o, "f32", seen, ord[s]);
        if (s == 0) {
            memset(seen, 0, sizeof seen);
            run_epoch(bt, d, &o, "f32", seen, ord[3]); /* second epoch of seed 1 */
        }
        kvc_batcher_free(bt);
    }
    cr_assert(memcmp(ord[0], ord[1], sizeof ord[0]) == 0, "same seed, same order");
    cr_assert(memcmp(ord[0], ord[2], sizeof ord[0]) != 0, "another seed, another order");
    cr_assert(memcmp(ord[0], ord[3], sizeof ord[0]) != 0, "another epoch, another order");
    int in_order = 0;
    for (int t = 1; t < 400; t++) in_order += ord[0][t] == ord[0][t - 1] + 1;
    cr_assert_lt(in_order, 40, "rows are shuffled, not handed out in file order (%d)", in_order);
    kvc_dataset_close(d);
    unlink(p);
}

Test(batcher, no_shuffle_keeps_file_order_across_files) {
    kvc_kv_info in = test_info("f16");
    const char *p[2] = {tmp_path("o1"), tmp_path("o2")};
    make_file(p[0], &in, 75, 0, 16, 0);
    make_file(p[1], &in, 60, 75, 16, 0);
    kvc_dataset *d = open_ok(p, 2);
    kvc_batch_opts o = {10, 130, 32, 8, 2, 99, 0, NULL};
    kvc_err err = {{0}};
    kvc_batcher *bt = kvc_batcher_new(d, &o, &err);
    cr_assert(bt, "%s", err.msg);
    kvc_batch b;
    int64_t next = 10;
    int nb = 0;
    while (kvc_batcher_next(bt, &b, &err) == 1) {
        cr_assert_eq(b.n, nb < 3 ? 32 : 24);
        for (int r = 0; r < b.n; r++, next++) {
            cr_assert_eq(b.token[r], next);
            cr_assert_eq(b.pos[r], (next < 75 ? next : next - 75) % 16, "positions restart in the second file");
            cr_assert_eq(b.x[KV_K][r * 16 + 3], stored_val("f16", next, 1, KV_K, 3));
        }
        nb++;
    }
    cr_assert_eq(next, 130);
    cr_assert_eq(nb, 4);
    cr_assert_eq(kvc_batcher_epoch(bt), 1);
    cr_assert_eq(kvc_batcher_next(bt, &b, &err), 1, "a new epoch starts");
    cr_assert_eq(b.token[0], 10);
    kvc_batcher_free(bt);
    kvc_dataset_close(d);
    unlink(p[0]);
    unlink(p[1]);
}

Test(batcher, streams_a_file_many_times_its_buffer) {
    kvc_kv_info in = test_info("f16");
    in.n_layers_stored = 1;
    const char *p = tmp_path("big");
    const int N = 19968, CH = 64; /* 312 whole blocks: every buffer load is 128 rows */
    make_file(p, &in, N, 0, CH, 0);
    kvc_dataset *d = open_ok(&p, 1);
    kvc_batch_opts o = {0, N, 100, 0, 2, 3, 1, NULL}; /* blocks = chunks of 64; buffer 128 rows */
    kvc_err err = {{0}};
    kvc_batcher *bt = kvc_batcher_new(d, &o, &err);
    cr_assert(bt, "%s", err.msg);
    size_t file_f32 = (size_t)N * (16 + 16 + 32) * 4;
    cr_assert_lt(kvc_batcher_memory_bytes(bt) * 20, file_f32, "batcher holds %zu bytes for a %zu-byte dataset",
                 kvc_batcher_memory_bytes(bt), file_f32);
    int *seen = calloc(N, sizeof *seen);
    kvc_batch b;
    int rc;
    while ((rc = kvc_batcher_next(bt, &b, &err)) == 1) {
        /* chunk-aware: one batch draws from at most two buffer loads, i.e. 4 blocks */
        int64_t blocks[8];
        int nbk = 0;
        for (int r = 0; r < b.n; r++) {
            int64_t blk = b.token[r] / CH, k = 0;
            while (k < nbk && blocks[k] != blk) k++;
            if (k == nbk) {
                cr_assert_lt(nbk, 4, "batch draws from more than 4 blocks");
                blocks[nbk++] = blk;
            }
            seen[b.token[r]]++;
            cr_assert_eq(b.x[KV_V][r * 16 + 5], stored_val("f16", b.token[r], 1, KV_V, 5));
        }
    }
    cr_assert_eq(rc, 0, "%s", err.msg);
    for (int t = 0; t < N; t++) cr_assert_eq(seen[t], 1, "token %d seen %d times", t, seen[t]);
    free(seen);
    kvc_batcher_free(bt);
    kvc_dataset_close(d);
    unlink(p);
}

Test(batcher, empty_range_gives_no_batches_and_bad_options_fail) {
    kvc_kv_info in = test_info("f32");
    const char *p = tmp_path("empty");
    make_file(p, &in, 20, 0, 8, 0);
    kvc_dataset *d = open_ok(&p, 1);
    kvc_err err = {{0}};
    kvc_batch b;
    kvc_batch_opts o = {20, 20, 4, 0, 0, 1, 1, NULL};
    kvc_batcher *bt = kvc_batcher_new(d, &o, &err);
    cr_assert(bt, "%s", err.msg);
    cr_assert_eq(kvc_batcher_next(bt, &b, &err), 0);
    kvc_batcher_free(bt);
    kvc_batch_opts bad = {0, 21, 4, 0, 0, 1, 1, NULL};
    cr_assert_null(kvc_batcher_new(d, &bad, &err));
    cr_assert(strstr(err.msg, "[0, 21)"), "%s", err.msg);
    kvc_batch_opts bad2 = {0, 20, 0, 0, 0, 1, 1, NULL};
    cr_assert_null(kvc_batcher_new(d, &bad2, &err));
    kvc_dataset_close(d);
    unlink(p);
}

/* ---- split ---------------------------------------------------------------------------- */

Test(split, rounds_to_whole_capture_windows) {
    kvc_kv_info in = test_info("f32");
    const char *p = tmp_path("split");
    make_file(p, &in, 100, 0, 16, 0); /* windows of 16: cuts 0, 16, ..., 96, 100 */
    kvc_dataset *d = open_ok(&p, 1);
    int64_t te, vb;
    kvc_dataset_split(d, 0.2, &te, &vb);
    cr_assert(te == 80 && vb == 80, "%lld %lld", (long long)te, (long long)vb);
    kvc_dataset_split(d, 0.1, &te, &vb); /* target 90: 96 is nearer than 80 */
    cr_assert_eq(vb, 96);
    kvc_dataset_split(d, 0.01, &te, &vb); /* rounds to nothing, but a non-zero fraction keeps one window */
    cr_assert_eq(vb, 96);
    kvc_dataset_split(d, 0.0, &te, &vb);
    cr_assert(te == 100 && vb == 100);
    kvc_dataset_split(d, 0.95, &te, &vb); /* training keeps one window */
    cr_assert_eq(vb, 16);
    kvc_dataset_split(d, 1.0, &te, &vb);
    cr_assert_eq(vb, 0);
    kvc_dataset_close(d);

    /* two files of 50 and 40: windows restart at 50, so cuts are 0 16 32 48 50 66 82 90 */
    const char *p2[2] = {p, tmp_path("split2")};
    make_file(p2[1], &in, 40, 50, 16, 0);
    make_file(p, &in, 50, 0, 16, 0);
    d = open_ok(p2, 2);
    kvc_dataset_split(d, 0.3, &te, &vb); /* target 63 */
    cr_assert_eq(vb, 66);
    kvc_dataset_split(d, 0.42, &te, &vb); /* target 52.2 */
    cr_assert_eq(vb, 50);
    kvc_dataset_close(d);
    unlink(p);
    unlink(p2[1]);
}
