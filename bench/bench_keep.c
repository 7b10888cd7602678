/* bench_keep.c - what a retention policy costs per decoded token: the time its hooks take for
 * one query step (on_attend) and for one eviction choice (score), per held token, for one
 * (layer, kv head) holding T tokens, G = 3 query heads, D = 64 (SmolLM2-135M's layout).
 * Attention-weight policies (H2O, ObservedAttention) also need the softmax weights written
 * out, which a fused attention kernel never materialises (our CPU kernel writes them anyway,
 * so there it costs nothing extra); LSH-E needs only the query. For scale, one query's
 * attention over the T tokens (G heads, kvc_attend) is timed too. Each figure is the
 * fastest of 9 batches of reps calls (the least disturbed by other work on a shared machine).
 * Not a test.
 *   ./build/bench_keep [--t 512,2048,8192] [--reps 50] */
#include "kvc/kernels.h"
#include "kvc/kvcache.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define G 3
#define D 64
#define BATCHES 9

static uint64_t rs = 7;
static float gauss(void) {
    double u1 = (kvc_rng_next(&rs) >> 11) / 9007199254740992.0 + 1e-300, u2 = (kvc_rng_next(&rs) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Seconds per call of the policy's on_attend (one query) and score on T tokens. */
static void time_policy(const char *spec, int64_t T, int reps, const float *keys, const float *q, const float *probs,
                        double *t_attend, double *t_score) {
    kvc_cache_shape shape = {1, G, 1, D, 10000.0f, (int)T + 1};
    kvc_err err = {{0}};
    kvc_keep *k = kvc_keep_new(spec, &shape, &err);
    if (!k) {
        fprintf(stderr, "bench_keep: %s: %s\n", spec, err.msg);
        exit(1);
    }
    int32_t *pos = malloc((size_t)T * sizeof *pos);
    uint8_t *st = calloc((size_t)T, k->state_bytes ? k->state_bytes : 1);
    float *sc = malloc((size_t)T * sizeof *sc);
    for (int64_t i = 0; i < T; i++) pos[i] = (int32_t)i;
    kvc_keep_view v = {0, 0, T, pos, st, NULL};
    if (k->ops->on_append) k->ops->on_append(k, &v, 0, keys);
    int32_t qp = (int32_t)T;
    *t_attend = *t_score = INFINITY;
    for (int b = 0; b < BATCHES; b++) {
        double t0 = kvc_now();
        for (int r = 0; r < reps; r++)
            if (k->ops->on_attend) k->ops->on_attend(k, &v, q, &qp, 1, k->needs_probs ? probs : NULL);
        *t_attend = fmin(*t_attend, (kvc_now() - t0) / reps);
    }
    v.krot = k->needs_keys ? keys : NULL;
    for (int b = 0; b < BATCHES; b++) {
        double t0 = kvc_now();
        for (int r = 0; r < reps; r++) k->ops->score(k, &v, sc);
        *t_score = fmin(*t_score, (kvc_now() - t0) / reps);
    }
    free(pos), free(st), free(sc);
    kvc_keep_free(k);
}

int main(int argc, char **argv) {
    int64_t lens[8] = {512, 2048, 8192};
    int nl = 3, reps = 50;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--t") && i + 1 < argc) {
            nl = 0;
            for (char *p = argv[++i]; *p && nl < 8;) {
                lens[nl++] = strtoll(p, &p, 10);
                if (*p == ',') p++;
            }
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench_keep [--t 512,2048,8192] [--reps 50]\n");
            return 2;
        }
    }
    static const char *const SPECS[] = {"h2o:budget=0.25",
                                        "h2o:budget=0.25,norm=mean",
                                        "lsh:budget=0.25",
                                        "lsh:budget=0.25,norm=mean",
                                        "lsh:budget=0.25,bits=32,norm=mean",
                                        "lsh:budget=0.25,bits=32,norm=mean,est=hits",
                                        "lsh:budget=0.25,norm=mean,est=softmax",
                                        "lsh:budget=0.25,bits=32,norm=mean,est=softmax,gqa=min",
                                        NULL};
    printf("policy hooks per held token, one (layer, kv head), G=%d D=%d, 1 query per step, fastest of %d x %d calls, "
           "1 thread\n", G, D, BATCHES, reps);
    printf("%-56s %7s %14s %14s\n", "policy", "T", "on_attend ns", "score ns");
    for (int li = 0; li < nl; li++) {
        const int64_t T = lens[li];
        float *keys = malloc((size_t)T * D * sizeof *keys), *q = malloc(G * D * sizeof *q);
        float *probs = malloc((size_t)G * T * sizeof *probs), *out = malloc(G * D * sizeof *out);
        float *vals = malloc((size_t)T * D * sizeof *vals), *scr = malloc((size_t)(T + 1) * sizeof *scr);
        int32_t *pos = malloc((size_t)T * sizeof *pos);
        if (!keys || !q || !probs || !out || !vals || !scr || !pos) {
            fprintf(stderr, "bench_keep: out of memory\n");
            return 1;
        }
        for (int64_t i = 0; i < T * D; i++) keys[i] = gauss(), vals[i] = gauss();
        for (int i = 0; i < G * D; i++) q[i] = gauss();
        for (int64_t i = 0; i < T; i++) pos[i] = (int32_t)i;
        /* the weights an attention-weight policy needs: attention with and without writing them */
        kvc_attn_kv kv = {.t = T, .k = keys, .ldk = D, .pos = pos, .v = vals, .ldv = D};
        int32_t qp = (int32_t)T;
        double plain = INFINITY;
        for (int b = 0; b < BATCHES; b++) {
            double t0 = kvc_now();
            for (int r = 0; r < reps; r++) kvc_attend(q, G * D, &qp, 1, G, D, &kv, out, G * D, NULL, scr);
            plain = fmin(plain, (kvc_now() - t0) / reps);
        }
        printf("%-56s %7lld %14.2f %14s\n", "(attention itself, G heads, for scale)", (long long)T, 1e9 * plain / T, "-");
        for (int s = 0; SPECS[s]; s++) {
            double ta, ts;
            time_policy(SPECS[s], T, reps, keys, q, probs, &ta, &ts);
            printf("%-56s %7lld %14.2f %14.2f\n", SPECS[s], (long long)T, 1e9 * ta / T, 1e9 * ts / T);
        }
        free(keys), free(q), free(probs), free(out), free(vals), free(scr), free(pos);
    }
    return 0;
}
