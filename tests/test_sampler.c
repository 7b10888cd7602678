/* test_sampler.c - greedy picks the argmax; temperature/top-p sampling is reproducible from a
 * seed, never leaves the nucleus, and follows the softmax probabilities. */
#include <criterion/criterion.h>
#include <math.h>

#include "kvc/sampler.h"

Test(sampler, greedy_is_argmax) {
    kvc_sampler s;
    kvc_err err = {{0}};
    float lg[5] = {0.1f, 2.0f, -1.0f, 2.0f, 1.9f};
    cr_assert_eq(kvc_sampler_init(&s, 5, 0.0f, 1.0f, 1, &err), 0);
    cr_expect_eq(kvc_sampler_sample(&s, lg), 1, "first of equal maxima");
    kvc_sampler_free(&s);
}

Test(sampler, seeded_runs_repeat_and_seeds_differ) {
    float lg[64];
    for (int i = 0; i < 64; i++) lg[i] = sinf((float)i);
    int32_t a[200], b[200], c[200];
    kvc_sampler s;
    kvc_err err = {{0}};
    for (int run = 0; run < 3; run++) {
        cr_assert_eq(kvc_sampler_init(&s, 64, 1.0f, 1.0f, run == 2 ? 8 : 7, &err), 0);
        int32_t *out = run == 0 ? a : run == 1 ? b : c;
        for (int i = 0; i < 200; i++) out[i] = kvc_sampler_sample(&s, lg);
        kvc_sampler_free(&s);
    }
    cr_expect_arr_eq(a, b, sizeof a, "same seed, same tokens");
    cr_expect_neq(memcmp(a, c, sizeof a), 0, "another seed, other tokens");
}

Test(sampler, top_p_keeps_the_nucleus_and_matches_frequencies) {
    /* probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps the first two, renormalised to 5/8, 3/8 */
    float lg[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    kvc_sampler s;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_sampler_init(&s, 4, 1.0f, 0.7f, 123, &err), 0);
    int count[4] = {0};
    const int N = 20000;
    for (int i = 0; i < N; i++) count[kvc_sampler_sample(&s, lg)]++;
    cr_expect_eq(count[2] + count[3], 0, "tokens outside the nucleus were drawn");
    cr_expect(fabs(count[0] / (double)N - 0.625) < 0.02, "p(0) = %f", count[0] / (double)N);
    kvc_sampler_free(&s);
    cr_assert_eq(kvc_sampler_init(&s, 4, 1.0f, 1.0f, 9, &err), 0);
    int c2[4] = {0};
    for (int i = 0; i < N; i++) c2[kvc_sampler_sample(&s, lg)]++;
    cr_expect(fabs(c2[3] / (double)N - 0.05) < 0.01, "p(3) = %f", c2[3] / (double)N);
    kvc_sampler_free(&s);
}

Test(sampler, rejects_bad_parameters) {
    kvc_sampler s;
    kvc_err err = {{0}};
    cr_expect_eq(kvc_sampler_init(&s, 4, 1.0f, 0.0f, 1, &err), -1);
    cr_expect_eq(kvc_sampler_init(&s, 4, 1.0f, 1.5f, 1, &err), -1);
    cr_expect_eq(kvc_sampler_init(&s, 4, -1.0f, 1.0f, 1, &err), -1);
    cr_expect(strstr(err.msg, "temperature") != NULL, "%s", err.msg);
}
