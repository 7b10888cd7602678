/* test_cache.c - the KV cache interface contract (kvc/cache.h) on the full-precision cache:
 * token counts and bytes, causal masking by position, GQA head mapping, RoPE applied to
 * keys with their true (possibly gapped) positions, chunked appends, reset and errors,
 * against a plain double-precision reference written here. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>

#include "kvc/cache.h"

#define ATT_TOL 1e-5

static const kvc_cache_shape SHAPE = {2, 4, 2, 8, 10000.0f, 16}; /* L, H, K, D, base, capacity */

static uint32_t rs = 99;
static float urand(void) {
    rs = rs * 1664525u + 1013904223u;
    return (float)(rs >> 8) / 16777216.0f * 2.0f - 1.0f;
}

/* Reference: out (nq, H, D) of queries (already rotated) over keys k (pre-RoPE) at kpos. */
static void ref_attend(const float *q, const int32_t *qpos, int nq, const float *k, const float *v,
                       const int32_t *kpos, int nk, double *out) {
    const int H = SHAPE.n_head, K = SHAPE.n_head_kv, D = SHAPE.head_dim;
    double *kr = malloc((size_t)nk * K * D * sizeof(double));
    for (int j = 0; j < nk; j++)
        for (int g = 0; g < K; g++)
            for (int i = 0; i < D / 2; i++) {
                double th = kpos[j] * pow(SHAPE.rope_base, -2.0 * i / D);
                const float *x = k + ((size_t)j * K + g) * D + 2 * i;
                kr[((size_t)j * K + g) * D + 2 * i] = x[0] * cos(th) - x[1] * sin(th);
                kr[((size_t)j * K + g) * D + 2 * i + 1] = x[0] * sin(th) + x[1] * cos(th);
            }
    for (int t = 0; t < nq; t++)
        for (int h = 0; h < H; h++) {
            int g = h / (H / K);
            double w[64], mx = -1e300, sum = 0;
            for (int j = 0; j < nk; j++) {
                w[j] = -INFINITY;
                if (kpos[j] > qpos[t]) continue;
                double s = 0;
                for (int d = 0; d < D; d++) s += q[((size_t)t * H + h) * D + d] * kr[((size_t)j * K + g) * D + d];
                w[j] = s / sqrt((double)D);
                mx = fmax(mx, w[j]);
            }
            for (int j = 0; j < nk; j++) sum += w[j] == -INFINITY ? 0 : exp(w[j] - mx);
            for (int d = 0; d < D; d++) {
                double o = 0;
                for (int j = 0; j < nk; j++)
                    if (w[j] != -INFINITY) o += exp(w[j] - mx) / sum * v[((size_t)j * K + g) * D + d];
                out[((size_t)t * H + h) * D + d] = o;
            }
        }
    free(kr);
}

static void fill(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = urand();
}

Test(cache, attends_like_the_reference_with_gapped_positions) {
    kvc_err err = {{0}};
    kvc_cache *c = kvc_cache_full_new(&SHAPE, &err);
    cr_assert_not_null(c, "%s", err.msg);
    enum { N = 6, H = 4, K = 2, D = 8 };
    float k[N * K * D], v[N * K * D], q[2 * H * D], out[2 * H * D];
    int32_t pos[N] = {0, 1, 2, 7, 9, 30}; /* gaps, as eviction leaves them */
    fill(k, sizeof k / 4);
    fill(v, sizeof v / 4);
    fill(q, sizeof q / 4);
    /* two chunks, as prefill then decode would append them */
    cr_assert_eq(kvc_cache_append(c, 1, k, v, pos, 4, &err), 0);
    cr_assert_eq(kvc_cache_append(c, 1, k + 4 * K * D, v + 4 * K * D, pos + 4, 2, &err), 0);
    cr_expect_eq(kvc_cache_n_tokens(c, 1), N);
    cr_expect_eq(kvc_cache_n_tokens(c, 0), 0);
    int32_t qpos[2] = {8, 30}; /* the first query must not see positions 9 and 30 */
    cr_assert_eq(kvc_cache_attend(c, 1, q, qpos, 2, out, &err), 0, "%s", err.msg);
    double ref[2 * H * D];
    ref_attend(q, qpos, 2, k, v, pos, N, ref);
    for (int i = 0; i < 2 * H * D; i++) cr_expect(fabs(out[i] - ref[i]) < ATT_TOL, "out[%d] %f vs %f", i, out[i], ref[i]);
    kvc_cache_free(c);
}

Test(cache, single_visible_token_returns_its_value_per_gqa_group) {
    kvc_err err = {{0}};
    kvc_cache *c = kvc_cache_full_new(&SHAPE, &err);
    enum { H = 4, K = 2, D = 8 };
    float k[2 * K * D], v[2 * K * D], q[H * D], out[H * D];
    fill(k, sizeof k / 4);
    fill(q, sizeof q / 4);
    for (int t = 0; t < 2; t++)
        for (int g = 0; g < K; g++)
            for (int d = 0; d < D; d++) v[(t * K + g) * D + d] = (float)(100 * t + 10 * g + d);
    int32_t pos[2] = {3, 4}, qp = 3;
    cr_assert_eq(kvc_cache_append(c, 0, k, v, pos, 2, &err), 0);
    cr_assert_eq(kvc_cache_attend(c, 0, q, &qp, 1, out, &err), 0);
    for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++) /* heads 0,1 read kv head 0; heads 2,3 read kv head 1 */
            cr_expect_float_eq(out[h * D + d], (float)(10 * (h / 2) + d), 1e-6, "head %d dim %d", h, d);
    kvc_cache_free(c);
}

Test(cache, bytes_reset_capacity_and_errors) {
    kvc_err err = {{0}};
    kvc_cache *c = kvc_cache_full_new(&SHAPE, &err);
    enum { K = 2, D = 8 };
    float kv[16 * K * D] = {0};
    int32_t pos[17];
    for (int i = 0; i < 17; i++) pos[i] = i;
    cr_expect_eq(kvc_cache_bytes(c), 0);
    cr_assert_eq(kvc_cache_append(c, 0, kv, kv, pos, 5, &err), 0);
    cr_assert_eq(kvc_cache_append(c, 1, kv, kv, pos, 3, &err), 0);
    cr_expect_eq(kvc_cache_bytes(c), (size_t)8 * (2 * K * D * 4 + 4), "K and V in f32 plus a position per token");
    cr_expect_eq(kvc_cache_append(c, 0, kv, kv, pos, 12, &err), -1, "capacity 16 exceeded");
    cr_expect(strstr(err.msg, "full") != NULL, "%s", err.msg);
    cr_expect_eq(kvc_cache_n_tokens(c, 0), 5, "a failed append changes nothing");
    cr_expect_eq(kvc_cache_append(c, 2, kv, kv, pos, 1, &err), -1);
    cr_expect_eq(kvc_cache_attend(c, -1, kv, pos, 1, kv, &err), -1);
    cr_expect_eq(kvc_cache_n_tokens(c, 5), -1);
    kvc_cache_reset(c);
    cr_expect_eq(kvc_cache_bytes(c), 0);
    cr_expect_eq(kvc_cache_n_tokens(c, 0), 0);
    cr_expect_eq(kvc_cache_end_step(c, &err), 0);
    kvc_cache_free(c);
    kvc_cache_shape bad = SHAPE;
    bad.n_head = 3; /* not a multiple of the kv heads */
    cr_expect_null(kvc_cache_full_new(&bad, &err));
    cr_expect(strstr(err.msg, "invalid shape") != NULL, "%s", err.msg);
}

Test(cache, query_before_every_key_gets_zeros) {
    kvc_err err = {{0}};
    kvc_cache *c = kvc_cache_full_new(&SHAPE, &err);
    float k[2 * 8] = {1}, v[2 * 8] = {1, 2, 3}, q[4 * 8] = {1}, out[4 * 8];
    int32_t p = 5, qp = 2;
    cr_assert_eq(kvc_cache_append(c, 0, k, v, &p, 1, &err), 0);
    cr_assert_eq(kvc_cache_attend(c, 0, q, &qp, 1, out, &err), 0);
    for (int i = 0; i < 32; i++) cr_expect_eq(out[i], 0.0f);
    kvc_cache_free(c);
}
