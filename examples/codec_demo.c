/* codec_demo.c - how an engine with its own inference loop uses a kvcodec codec through
 * include/kvc/codec.h alone: open the checkpoint, check it against the engine's model,
 * encode a block of two consecutive layers' keys and values, decode them (a reused head from
 * the layer below), and pick tokens to evict with LSH-E codes.
 *
 *   codec_demo CODEC.h5 KV.f32 [LAYER]
 *
 * KV.f32 holds raw f32 [layer K, layer V, layer+1 K, layer+1 V], each (n, kv heads, head_dim)
 * (tools/make_codec_fixture.py writes one for layers 4 and 5). */
#include "kvc/codec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ||a - b|| / ||a|| over n floats. */
static double rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) num += (double)(a[i] - b[i]) * (a[i] - b[i]), den += (double)a[i] * a[i];
    return den > 0 ? sqrt(num / den) : 0.0;
}

int main(int argc, char **argv) {
    if (argc < 3 || !strcmp(argv[1], "--help")) {
        fprintf(stderr, "usage: codec_demo CODEC.h5 KV.f32 [LAYER]\n");
        return argc < 3 ? 2 : 0;
    }
    const int layer = argc > 3 ? atoi(argv[3]) : 4;
    char err[KVCL_ERR_SIZE];
    kvcl_codec *c = kvcl_open(argv[1], "int8", 1, err);
    if (!c) { fprintf(stderr, "codec_demo: %s\n", err); return 1; }
    kvcl_info in;
    kvcl_get_info(c, &in);
    const int K = in.n_head_kv, D = in.head_dim;
    printf("codec for %s (fingerprint %s): %d layers, %d kv heads, head_dim %d, latent %d stored as %s\n",
           in.model_name, in.model_fingerprint, in.n_layer, K, D, in.latent, in.storage);
    /* an engine checks the codec against the model it runs */
    if (kvcl_check_model(c, NULL, in.n_layer, K, D, err)) { fprintf(stderr, "codec_demo: %s\n", err); return 1; }
    if (layer < 0 || layer + 1 >= in.n_layer) { fprintf(stderr, "codec_demo: layer %d out of range\n", layer); return 1; }

    FILE *f = fopen(argv[2], "rb");
    if (!f) { fprintf(stderr, "codec_demo: cannot open %s\n", argv[2]); return 1; }
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    const size_t per = (size_t)K * D, n = (size_t)bytes / (4 * 4 * per);
    if (n < 1 || (size_t)bytes != n * 4 * 4 * per) { fprintf(stderr, "codec_demo: %s is not 4 blocks of (n, %d, %d) f32\n", argv[2], K, D); return 1; }
    float *kv = malloc((size_t)bytes), *dec = malloc((size_t)bytes);
    if (!kv || !dec || fread(kv, 1, (size_t)bytes, f) != (size_t)bytes) { fprintf(stderr, "codec_demo: read failed\n"); return 1; }
    fclose(f);

    /* encode and decode both layers; layer + 1 may reuse heads of layer, decoded first */
    for (int j = 0; j < 2; j++) {
        for (int kind = 0; kind < 2; kind++) {
            const float *x = kv + (size_t)(2 * j + kind) * n * per;
            float *y = dec + (size_t)(2 * j + kind) * n * per;
            size_t tb = kvcl_token_bytes(c, layer + j, kind);
            uint8_t *codes = malloc(tb * n + 1);
            const float *below = j ? dec + (size_t)kind * n * per : NULL;
            if (kvcl_encode(c, layer + j, kind, x, (int)n, codes, err) ||
                kvcl_decode(c, layer + j, kind, codes, (int)n, below, y, err)) {
                fprintf(stderr, "codec_demo: %s\n", err);
                return 1;
            }
            int reused = 0;
            for (int h = 0; h < K; h++) reused += kvcl_is_reused(c, layer + j, h, kind);
            printf("layer %2d %s: %4zu bytes/token (f16: %d), %d head(s) from the layer below, relative error %.4f\n",
                   layer + j, kind ? "V" : "K", tb, K * D * 2, reused, rel_err(x, y, n * per));
            free(codes);
        }
    }

    /* LSH-E: hash head 0's keys of layer + 1, probe with the newest key, keep half */
    kvcl_lsh *h = kvcl_lsh_new(D, 16, 1, err);
    if (!h) { fprintf(stderr, "codec_demo: %s\n", err); return 1; }
    uint64_t *codes = malloc(n * sizeof *codes);
    float *score = malloc(n * sizeof *score);
    uint8_t *evict = malloc(n);
    kvcl_lsh_hash(h, kv + 2 * n * per, (int64_t)per, (int64_t)n, codes);
    kvcl_lsh_score(codes, (int64_t)n, codes[n - 1], score);
    int64_t m = kvcl_select(score, (int64_t)n, (int64_t)n / 2, 4, 4, evict);
    printf("LSH-E (16 bits, sinks 4, window 4): evict %lld of %zu tokens:", (long long)m, n);
    for (size_t i = 0; i < n; i++)
        if (evict[i]) printf(" %zu", i);
    printf("\n");
    kvcl_lsh_free(h);
    kvcl_close(c);
    free(kv), free(dec), free(codes), free(score), free(evict);
    return 0;
}
