/* test_gguf.c - the GGUF reader on valid files with every metadata type and on malformed
 * ones (every truncation, bad magic/version/types/offsets/alignment, duplicates, absurd
 * counts, random corruption): each must give an error, never a crash. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <unistd.h>

#include "gguf_build.h"
#include "kvc/gguf.h"
#include "kvc/quant.h"

/* Offsets of interesting fields in the image make_valid builds (filled as it writes). */
static size_t OFF_VERSION = 4, OFF_NKV = 16, OFF_FIRST_TYPE, OFF_ARR_TYPE, OFF_T0_TYPE, OFF_T1_OFFSET, OFF_T0_NDIMS;

/* A GGUF with one key of every scalar type, string and numeric arrays, a nested array,
 * and two tensors (F32 [4] and Q8_0 [32, 2]). alignment 0 = default (32). */
static gbuf make_valid(uint32_t alignment) {
    gbuf b = {0};
    int n_kv = 17 + (alignment ? 1 : 0);
    gb_header(&b, 3, 2, (uint64_t)n_kv);
    gb_str(&b, "t.u8"); OFF_FIRST_TYPE = b.n; gb_u32(&b, 0); gb_put(&b, "\xff", 1);
    gb_str(&b, "t.i8"); gb_u32(&b, 1); gb_put(&b, "\xfe", 1);
    gb_str(&b, "t.u16"); gb_u32(&b, 2); { uint16_t v = 65535; gb_put(&b, &v, 2); }
    gb_str(&b, "t.i16"); gb_u32(&b, 3); { int16_t v = -300; gb_put(&b, &v, 2); }
    gb_kv_u32(&b, "t.u32", 4000000000u);
    gb_str(&b, "t.i32"); gb_u32(&b, 5); { int32_t v = -7; gb_put(&b, &v, 4); }
    gb_kv_f32(&b, "t.f32", 1.5f);
    gb_str(&b, "t.bool"); gb_u32(&b, 7); gb_put(&b, "\x01", 1);
    gb_kv_str(&b, "t.str", "héllo");
    gb_str(&b, "t.u64"); gb_u32(&b, 10); gb_u64(&b, 1ull << 40);
    gb_str(&b, "t.i64"); gb_u32(&b, 11); { int64_t v = -(1ll << 40); gb_put(&b, &v, 8); }
    gb_str(&b, "t.f64"); gb_u32(&b, 12); { double v = 2.25; gb_put(&b, &v, 8); }
    gb_str(&b, "t.arr_u32"); gb_u32(&b, 9); OFF_ARR_TYPE = b.n; gb_u32(&b, 4); gb_u64(&b, 3);
    gb_u32(&b, 10); gb_u32(&b, 20); gb_u32(&b, 30);
    gb_str(&b, "t.arr_str"); gb_u32(&b, 9); gb_u32(&b, 8); gb_u64(&b, 2); gb_str(&b, "a"); gb_str(&b, "bc");
    gb_str(&b, "t.arr_nested"); gb_u32(&b, 9); gb_u32(&b, 9); gb_u64(&b, 2);
    gb_u32(&b, 0); gb_u64(&b, 2); gb_put(&b, "\x01\x02", 2);
    gb_u32(&b, 8); gb_u64(&b, 1); gb_str(&b, "x");
    gb_str(&b, "t.arr_empty"); gb_u32(&b, 9); gb_u32(&b, 6); gb_u64(&b, 0);
    gb_kv_str(&b, "general.architecture", "test");
    if (alignment) gb_kv_u32(&b, "general.alignment", alignment);
    uint32_t al = alignment ? alignment : 32;
    gb_str(&b, "w.f32"); OFF_T0_NDIMS = b.n; gb_u32(&b, 1); gb_u64(&b, 4); OFF_T0_TYPE = b.n; gb_u32(&b, GGML_T_F32); gb_u64(&b, 0);
    gb_str(&b, "w.q8"); gb_u32(&b, 2); gb_u64(&b, 32); gb_u64(&b, 2); gb_u32(&b, GGML_T_Q8_0);
    OFF_T1_OFFSET = b.n; gb_u64(&b, al);
    gb_pad(&b, al);
    float f[4] = {1, -2, 3.5f, 0};
    gb_put(&b, f, sizeof f);
    gb_pad(&b, al);
    for (int blk = 0; blk < 2; blk++) {
        uint16_t d = kvc_f32_to_f16(0.5f);
        gb_put(&b, &d, 2);
        for (int j = 0; j < 32; j++) { int8_t q = (int8_t)(j - 16 + blk); gb_put(&b, &q, 1); }
    }
    return b;
}

static gguf_file *open_buf(gbuf *b, kvc_err *err) { return kvc_gguf_open_buffer(b->p, b->n, err); }

Test(gguf, parses_every_metadata_type) {
    gbuf b = make_valid(0);
    kvc_err err = {{0}};
    gguf_file *f = open_buf(&b, &err);
    cr_assert_not_null(f, "%s", err.msg);
    cr_expect_eq(f->version, 3);
    cr_expect_eq(f->n_kv, 17);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.u8")->num.u, 255);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.i8")->num.i, -2);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.u16")->num.u, 65535);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.i16")->num.i, -300);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.i32")->num.i, -7);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.u64")->num.u, 1ull << 40);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.i64")->num.i, -(1ll << 40));
    cr_expect_float_eq(kvc_gguf_find_kv(f, "t.f64")->num.f, 2.25, 1e-12);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.bool")->num.u, 1);
    uint32_t u;
    float x;
    int bl;
    char s[16];
    cr_expect_eq(kvc_gguf_get_u32(f, "t.u32", &u, &err), 0);
    cr_expect_eq(u, 4000000000u);
    cr_expect_eq(kvc_gguf_get_f32(f, "t.f32", &x, &err), 0);
    cr_expect_float_eq(x, 1.5f, 0);
    cr_expect_eq(kvc_gguf_get_bool(f, "t.bool", &bl, &err), 0);
    cr_expect_eq(bl, 1);
    cr_expect_eq(kvc_gguf_get_str(f, "t.str", s, sizeof s, &err), 0);
    cr_expect_str_eq(s, "héllo");
    cr_expect_eq(kvc_gguf_get_u32(f, "t.i64", &u, &err), -1, "negative value must not fit a u32");
    cr_expect_eq(kvc_gguf_get_u32(f, "t.str", &u, &err), -1);
    cr_expect_eq(kvc_gguf_get_u32(f, "missing", &u, &err), -1);
    cr_expect(strstr(err.msg, "missing") != NULL);
    const gguf_kv *a = kvc_gguf_find_kv(f, "t.arr_u32");
    cr_assert_eq(a->type, GGUF_VT_ARRAY);
    cr_expect_eq(a->arr_type, GGUF_VT_UINT32);
    cr_expect_eq(a->n, 3);
    uint32_t third;
    memcpy(&third, a->data + 8, 4);
    cr_expect_eq(third, 30);
    const gguf_kv *as = kvc_gguf_find_kv(f, "t.arr_str");
    cr_assert_not_null(as->strs);
    cr_expect(kvc_gguf_str_eq(as->strs[1], "bc"));
    cr_expect_eq(kvc_gguf_find_kv(f, "t.arr_nested")->n, 2);
    cr_expect_eq(kvc_gguf_find_kv(f, "t.arr_empty")->n, 0);
    const gguf_tensor *t0 = kvc_gguf_find_tensor(f, "w.f32"), *t1 = kvc_gguf_find_tensor(f, "w.q8");
    cr_assert(t0 && t1);
    cr_expect_eq(((const float *)t0->data)[2], 3.5f);
    cr_expect_eq(t1->nbytes, 68);
    cr_expect_eq(t1->ne[1], 2);
    float deq[64];
    cr_assert_eq(kvc_dequantize_row(t1->type, t1->data, deq, 64), 0);
    cr_expect_float_eq(deq[0], -8.0f, 0);   /* (0 - 16) * 0.5 */
    cr_expect_float_eq(deq[63], 8.0f, 0);   /* (31 - 16 + 1) * 0.5 */
    cr_expect_null(kvc_gguf_find_tensor(f, "nope"));
    kvc_gguf_close(f);
    free(b.p);
}

Test(gguf, honours_custom_alignment) {
    gbuf b = make_valid(64);
    kvc_err err = {{0}};
    gguf_file *f = open_buf(&b, &err);
    cr_assert_not_null(f, "%s", err.msg);
    cr_expect_eq(f->alignment, 64);
    cr_expect_eq(f->data_offset % 64, 0);
    cr_expect_eq(((const float *)kvc_gguf_find_tensor(f, "w.f32")->data)[1], -2.0f);
    kvc_gguf_close(f);
    free(b.p);
}

Test(gguf, every_truncation_is_an_error) {
    gbuf b = make_valid(0);
    for (size_t n = 0; n < b.n; n++) {
        kvc_err err = {{0}};
        uint8_t *copy = malloc(n ? n : 1); /* exact-size copy so ASan sees any overread */
        memcpy(copy, b.p, n);
        gguf_file *f = kvc_gguf_open_buffer(copy, n, &err);
        cr_expect_null(f, "a file truncated to %zu of %zu bytes was accepted", n, b.n);
        cr_expect(err.msg[0] != '\0', "no message for truncation at %zu", n);
        kvc_gguf_close(f);
        free(copy);
    }
    free(b.p);
}

/* Applies a 32-bit patch at off and expects an error mentioning `needle`. */
static void expect_patch_error(size_t off, uint32_t v, const char *needle) {
    gbuf b = make_valid(0);
    memcpy(b.p + off, &v, 4);
    kvc_err err = {{0}};
    gguf_file *f = open_buf(&b, &err);
    cr_expect_null(f, "patch at %zu accepted", off);
    cr_expect(strstr(err.msg, needle) != NULL, "message '%s' lacks '%s'", err.msg, needle);
    kvc_gguf_close(f);
    free(b.p);
}

Test(gguf, rejects_bad_magic) { expect_patch_error(0, 0x46554746u, "magic"); }
Test(gguf, rejects_version_1_and_4) {
    expect_patch_error(OFF_VERSION, 1, "version");
    expect_patch_error(OFF_VERSION, 4, "version");
}
Test(gguf, rejects_unknown_value_type) { free(make_valid(0).p); expect_patch_error(OFF_FIRST_TYPE, 13, "unknown value type"); }
Test(gguf, rejects_unknown_array_type) { free(make_valid(0).p); expect_patch_error(OFF_ARR_TYPE, 99, "unknown value type"); }
Test(gguf, rejects_unknown_tensor_type) { free(make_valid(0).p); expect_patch_error(OFF_T0_TYPE, 77, "unknown type"); }
Test(gguf, rejects_tensor_data_out_of_range) { free(make_valid(0).p); expect_patch_error(OFF_T1_OFFSET, 4096, "beyond the end"); }
Test(gguf, rejects_misaligned_tensor) { free(make_valid(0).p); expect_patch_error(OFF_T1_OFFSET, 40, "aligned"); }
Test(gguf, rejects_bad_dimension_count) {
    free(make_valid(0).p);
    expect_patch_error(OFF_T0_NDIMS, 0, "dimensions");
    expect_patch_error(OFF_T0_NDIMS, 5, "dimensions");
}
Test(gguf, rejects_absurd_counts) {
    gbuf b = make_valid(0);
    uint64_t huge = 1ull << 60;
    memcpy(b.p + OFF_NKV, &huge, 8);
    kvc_err err = {{0}};
    cr_expect_null(open_buf(&b, &err));
    cr_expect(strstr(err.msg, "corrupt") || strstr(err.msg, "truncated"), "%s", err.msg);
    free(b.p);
}

Test(gguf, rejects_huge_string_length) {
    gbuf b = {0};
    gb_header(&b, 3, 0, 1);
    gb_u64(&b, UINT64_MAX - 3); /* key length */
    gb_put(&b, "abcdefgh", 8);
    gb_u32(&b, 4);
    gb_u32(&b, 1);
    kvc_err err = {{0}};
    cr_expect_null(open_buf(&b, &err));
    cr_expect(strstr(err.msg, "truncated") != NULL, "%s", err.msg);
    free(b.p);
}

Test(gguf, rejects_duplicates_and_bad_alignment) {
    gbuf b = {0};
    gb_header(&b, 3, 0, 2);
    gb_kv_u32(&b, "k", 1);
    gb_kv_u32(&b, "k", 2);
    kvc_err err = {{0}};
    cr_expect_null(open_buf(&b, &err));
    cr_expect(strstr(err.msg, "duplicate") != NULL, "%s", err.msg);
    free(b.p);

    gbuf c = {0};
    gb_header(&c, 3, 0, 1);
    gb_kv_u32(&c, "general.alignment", 3);
    cr_expect_null(open_buf(&c, &err));
    cr_expect(strstr(err.msg, "alignment") != NULL, "%s", err.msg);
    free(c.p);

    gbuf d = {0};
    gb_header(&d, 3, 2, 0);
    gb_tensor(&d, "a", 4, 1, GGML_T_F32, 0);
    gb_tensor(&d, "a", 4, 1, GGML_T_F32, 32);
    gb_pad(&d, 32);
    float z[16] = {0};
    gb_put(&d, z, sizeof z);
    cr_expect_null(open_buf(&d, &err));
    cr_expect(strstr(err.msg, "duplicate tensor") != NULL, "%s", err.msg);
    free(d.p);
}

Test(gguf, rejects_row_not_multiple_of_block) {
    gbuf b = {0};
    gb_header(&b, 3, 1, 0);
    gb_tensor(&b, "q", 33, 1, GGML_T_Q4_1, 0);
    gb_pad(&b, 32);
    uint8_t z[64] = {0};
    gb_put(&b, z, sizeof z);
    kvc_err err = {{0}};
    cr_expect_null(open_buf(&b, &err));
    cr_expect(strstr(err.msg, "block size") != NULL, "%s", err.msg);
    free(b.p);
}

Test(gguf, random_corruption_never_crashes) {
    gbuf b = make_valid(0);
    uint64_t s = 12345;
    int accepted = 0, rejected = 0;
    for (int it = 0; it < 4000; it++) {
        uint8_t *copy = malloc(b.n);
        memcpy(copy, b.p, b.n);
        for (int k = 0; k < 3; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            size_t at = (size_t)(s >> 33) % b.n;
            copy[at] ^= (uint8_t)(1u << ((s >> 20) & 7));
        }
        kvc_err err = {{0}};
        gguf_file *f = kvc_gguf_open_buffer(copy, b.n, &err);
        if (f) accepted++;
        else {
            rejected++;
            cr_expect(err.msg[0] != '\0');
        }
        kvc_gguf_close(f);
        free(copy);
    }
    cr_expect(rejected > 100, "only %d corruptions rejected", rejected);
    cr_expect(accepted > 100, "only %d corruptions of tensor data accepted", accepted);
    free(b.p);
}

Test(gguf, files_missing_empty_and_not_gguf) {
    kvc_err err = {{0}};
    cr_expect_null(kvc_gguf_open("/nonexistent/model.gguf", &err));
    cr_expect(strstr(err.msg, "cannot open") != NULL, "%s", err.msg);
    char path[] = "/tmp/kvc_test_XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    cr_expect_null(kvc_gguf_open(path, &err));
    cr_expect(strstr(err.msg, "empty") != NULL, "%s", err.msg);
    cr_assert_eq(write(fd, "hello world, not a model", 24), 24);
    close(fd);
    cr_expect_null(kvc_gguf_open(path, &err));
    cr_expect(strstr(err.msg, "magic") != NULL, "%s", err.msg);
    unlink(path);
}

/* A GGUF holding one 256-element tensor of every type kvcodec dequantizes: the reader
 * must size and place each correctly and dequantization through it must equal
 * dequantization of the original bytes. */
Test(gguf, tensors_of_every_supported_quant_type) {
    const uint32_t types[] = {GGML_T_F32, GGML_T_F16, GGML_T_BF16, GGML_T_Q8_0,
                              GGML_T_Q4_0, GGML_T_Q4_1, GGML_T_Q4_K, GGML_T_Q6_K};
    enum { NT = 8, NE = 256 };
    uint8_t *blobs[NT];
    size_t sizes[NT], offs[NT], off = 0;
    uint32_t s = 77;
    for (int i = 0; i < NT; i++) {
        uint32_t be, bb;
        cr_assert_eq(kvc_ggml_type_block(types[i], &be, &bb), 0);
        sizes[i] = NE / be * bb;
        blobs[i] = malloc(sizes[i]);
        for (size_t j = 0; j < sizes[i]; j++) { s = s * 1103515245u + 12345u; blobs[i][j] = (uint8_t)(s >> 16); }
        if (types[i] == GGML_T_F32) for (int j = 0; j < NE; j++) ((float *)blobs[i])[j] = (float)j - 100.0f;
        if (types[i] == GGML_T_F16 || types[i] == GGML_T_BF16)
            for (int j = 0; j < NE; j++) ((uint16_t *)blobs[i])[j] &= 0x3FFF; /* finite values */
        offs[i] = off;
        off += (sizes[i] + 31) / 32 * 32;
    }
    gbuf b = {0};
    gb_header(&b, 3, NT, 0);
    char name[16];
    for (int i = 0; i < NT; i++) {
        snprintf(name, sizeof name, "t%d", i);
        gb_tensor(&b, name, NE, 1, types[i], offs[i]);
    }
    gb_pad(&b, 32);
    for (int i = 0; i < NT; i++) {
        gb_put(&b, blobs[i], sizes[i]);
        gb_pad(&b, 32);
    }
    kvc_err err = {{0}};
    gguf_file *f = open_buf(&b, &err);
    cr_assert_not_null(f, "%s", err.msg);
    float got[NE], want[NE];
    for (int i = 0; i < NT; i++) {
        snprintf(name, sizeof name, "t%d", i);
        const gguf_tensor *t = kvc_gguf_find_tensor(f, name);
        cr_assert_not_null(t);
        cr_expect_eq(t->nbytes, sizes[i], "%s size", kvc_ggml_type_name(types[i]));
        cr_expect_eq(memcmp(t->data, blobs[i], sizes[i]), 0, "%s data misplaced", kvc_ggml_type_name(types[i]));
        cr_assert_eq(kvc_dequantize_row(t->type, t->data, got, NE), 0, "%s", kvc_ggml_type_name(types[i]));
        cr_assert_eq(kvc_dequantize_row(types[i], blobs[i], want, NE), 0);
        cr_expect_eq(memcmp(got, want, sizeof got), 0);
        free(blobs[i]);
    }
    kvc_gguf_close(f);
    free(b.p);
}
