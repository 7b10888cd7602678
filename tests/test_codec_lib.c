/* test_codec_lib.c - the codec library for other engines, through include/kvc/codec.h only
 * (no other kvcodec header): opening and checking a checkpoint, byte layout, encode/decode of
 * real K/V (tests/fixtures/codec_kv_l4l5_32tok.f32, made by tools/make_codec_fixture.py)
 * within the codec's error, decoding a head reused from the layer below, LSH-E scores and
 * choices, and bad input. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc/codec.h"

#define CODEC32 KVC_SOURCE_DIR "/checkpoints/smollm2-135m-ae32.h5"
#define FIXTURE KVC_FIXTURE_DIR "/codec_kv_l4l5_32tok.f32"
enum { N = 32, K = 3, D = 64, PER = N * K * D };

static float *load_fixture(void) {
    FILE *f = fopen(FIXTURE, "rb");
    cr_assert_not_null(f, "missing %s (tools/make_codec_fixture.py)", FIXTURE);
    float *x = malloc(sizeof(float) * 4 * PER);
    cr_assert_eq(fread(x, sizeof(float), 4 * PER, f), (size_t)4 * PER);
    fclose(f);
    return x;
}

static double rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) num += (double)(a[i] - b[i]) * (a[i] - b[i]), den += (double)a[i] * a[i];
    return sqrt(num / den);
}

Test(codec_lib, open_info_and_layout) {
    char err[KVCL_ERR_SIZE];
    kvcl_codec *c = kvcl_open(CODEC32, "int8", 1, err);
    cr_assert_not_null(c, "%s", err);
    kvcl_info in;
    kvcl_get_info(c, &in);
    cr_expect_eq(in.n_layer, 30);
    cr_expect_eq(in.n_head_kv, K);
    cr_expect_eq(in.head_dim, D);
    cr_expect_eq(in.latent, 32);
    cr_expect_str_eq(in.model_fingerprint, "55d17dc8d1d9a03e");
    cr_expect_eq(kvcl_check_model(c, "55d17dc8d1d9a03e", 30, K, D, err), 0, "%s", err);
    cr_expect_eq(kvcl_check_model(c, "0000000000000000", 30, K, D, err), -1);
    cr_expect(strstr(err, "fingerprint") != NULL, "%s", err);
    cr_expect_eq(kvcl_check_model(c, NULL, 30, K, 128, err), -1);
    cr_expect(strstr(err, "differs") != NULL, "%s", err);
    /* int8 latent of 32 with one group: 32 codes + f16 scale + f16 minimum */
    cr_expect_eq(kvcl_row_bytes(c, 4, 0, KVCL_KEY), 36u);
    /* layer 5 head 0 keys are predicted from layer 4 (the checkpoint's reuse plan) */
    cr_expect_eq(kvcl_is_reused(c, 5, 0, KVCL_KEY), 1);
    cr_expect_eq(kvcl_row_bytes(c, 5, 0, KVCL_KEY), 0u);
    cr_expect_eq(kvcl_token_bytes(c, 5, KVCL_KEY), 72u);
    cr_expect_eq(kvcl_token_bytes(c, 5, KVCL_VALUE), 108u);
    kvcl_close(c);
    /* reuse off: every head stored */
    c = kvcl_open(CODEC32, "f16", 0, err);
    cr_assert_not_null(c, "%s", err);
    cr_expect_eq(kvcl_is_reused(c, 5, 0, KVCL_KEY), 0);
    cr_expect_eq(kvcl_token_bytes(c, 5, KVCL_KEY), 3u * 64);
    kvcl_close(c);
}

Test(codec_lib, real_kv_round_trip_and_reused_head) {
    char err[KVCL_ERR_SIZE];
    float *x = load_fixture(), *y = malloc(sizeof(float) * 4 * PER), *yf = malloc(sizeof(float) * 4 * PER);
    const char *storage[] = {"f32", "int8"};
    for (int s = 0; s < 2; s++) {
        kvcl_codec *c = kvcl_open(CODEC32, storage[s], 1, err);
        cr_assert_not_null(c, "%s", err);
        uint8_t *codes = malloc(4096 * N);
        for (int j = 0; j < 2; j++)
            for (int kind = 0; kind < 2; kind++) {
                const float *in = x + (size_t)(2 * j + kind) * PER;
                float *out = (s ? y : yf) + (size_t)(2 * j + kind) * PER;
                cr_assert_eq(kvcl_encode(c, 4 + j, kind, in, N, codes, err), 0, "%s", err);
                const float *below = j ? (s ? y : yf) + (size_t)kind * PER : NULL;
                cr_assert_eq(kvcl_decode(c, 4 + j, kind, codes, N, below, out, err), 0, "%s", err);
                double e = rel_err(in, out, PER);
                /* the codec's validation errors are 0.185 (K) and 0.551 (V) over all layers and
                 * train-corpus tokens; these 32 eval tokens measured K 0.270 (layer 4) and
                 * 0.308 (layer 5, one head from layer 4), V 0.606 and 0.605 */
                cr_expect(e < (kind ? 0.65 : 0.35), "%s layer %d %s: relative error %.4f", storage[s], 4 + j,
                          kind ? "V" : "K", e);
            }
        /* decoding the reused head needs the layer below */
        cr_expect_eq(kvcl_decode(c, 5, KVCL_KEY, codes, N, NULL, y, err), -1);
        cr_expect(strstr(err, "reused from layer 4") != NULL, "%s", err);
        free(codes);
        kvcl_close(c);
    }
    /* int8 latents stay close to f32 latents */
    for (int b = 0; b < 4; b++) {
        double e = rel_err(yf + (size_t)b * PER, y + (size_t)b * PER, PER);
        cr_expect(e < 0.02, "block %d: int8 latents differ from f32 latents by %.4f", b, e);
    }
    free(x), free(y), free(yf);
}

Test(codec_lib, lsh_scores_and_choices) {
    char err[KVCL_ERR_SIZE];
    cr_expect_null(kvcl_lsh_new(D, 3, 1, err));
    cr_expect(strstr(err, "bits") != NULL, "%s", err);
    kvcl_lsh *h = kvcl_lsh_new(D, 16, 7, err);
    cr_assert_not_null(h, "%s", err);
    float *x = load_fixture();
    uint64_t codes[N];
    kvcl_lsh_hash(h, x, K * D, N, codes); /* layer 4 keys of head 0 */
    for (int i = 0; i < N; i++) cr_expect_eq(codes[i] >> 16, 0u, "only 16 bits set");
    float score[N];
    kvcl_lsh_score(codes, N, codes[N - 1], score);
    cr_expect_eq(score[N - 1], 0.0f);
    for (int i = 0; i < N; i++) cr_expect_eq(score[i], (float)__builtin_popcountll(codes[i] ^ codes[N - 1]));
    uint8_t evict[N];
    int64_t m = kvcl_select(score, N, 12, 4, 4, evict);
    cr_expect_eq(m, 20);
    for (int i = 0; i < 4; i++) {
        cr_expect_eq(evict[i], 0);
        cr_expect_eq(evict[N - 1 - i], 0);
    }
    /* every evicted token scores at least as high as every kept candidate */
    float lo = 1e9f, hi = -1e9f;
    for (int i = 4; i < N - 4; i++) {
        if (evict[i]) lo = score[i] < lo ? score[i] : lo;
        else hi = score[i] > hi ? score[i] : hi;
    }
    cr_expect(lo >= hi, "evicted min %g < kept max %g", lo, hi);
    kvcl_lsh_free(h);
    free(x);
}

Test(codec_lib, bad_input) {
    char err[KVCL_ERR_SIZE];
    cr_expect_null(kvcl_open(KVC_FIXTURE_DIR "/no-such-codec.h5", "f16", 1, err));
    cr_expect(err[0] != '\0');
    cr_expect_null(kvcl_open(FIXTURE, "f16", 1, err)); /* not an HDF5 codec */
    cr_expect(err[0] != '\0');
    cr_expect_null(kvcl_open(CODEC32, "int3", 1, err));
    cr_expect(strstr(err, "int3") != NULL, "%s", err);
    kvcl_codec *c = kvcl_open(CODEC32, NULL, 1, err);
    cr_assert_not_null(c, "%s", err);
    float x[K * D] = {0};
    uint8_t out[1024];
    cr_expect_eq(kvcl_encode(c, 30, KVCL_KEY, x, 1, out, err), -1);
    cr_expect(strstr(err, "layer 30") != NULL, "%s", err);
    cr_expect_eq(kvcl_encode(c, 0, 2, x, 1, out, err), -1);
    kvcl_close(c);
}
