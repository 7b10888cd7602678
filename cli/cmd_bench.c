/* cmd_bench.c - `kvcodec bench`: prefill and decode throughput of the runtime on a prompt
 * taken from a text file; medians over repetitions. bench/ compares it with peers. */
#include "cli.h"

#include "kvc/sampler.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int cmd_bench(int argc, char **argv) {
    const char *model = cli_default_model(), *text = "data/corpora/eval-debian-handbook.txt";
    int prompt_tokens = 128, gen_tokens = 64, threads = 2, reps = 3, json = 0;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"text", ARG_STR, &text, "FILE", "where the prompt comes from (its first tokens)", 0},
        {"prompt-tokens", ARG_INT, &prompt_tokens, "N", "prompt length for prefill (default 128)", 0},
        {"gen-tokens", ARG_INT, &gen_tokens, "N", "tokens decoded one at a time (default 64)", 0},
        ARG_THREADS(&threads, "2"),
        {"reps", ARG_INT, &reps, "N", "repetitions; the median is reported (default 3)", 0},
        ARG_JSON(&json),
        {0},
    };
    int rc = args_parse("bench", "[--prompt-tokens N] [--gen-tokens N] [--threads N] [--reps N] [--json]",
                        "Times a batched prefill of the prompt, then greedy single-token decoding.", specs, argc,
                        argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (prompt_tokens < 1 || gen_tokens < 2 || reps < 1 || threads < 1)
        return cli_error("bench", "need --prompt-tokens >= 1, --gen-tokens >= 2, --reps >= 1, --threads >= 1"), 2;
    kvc_model *m;
    int32_t *ids;
    int64_t n;
    if (cli_text_and_model(text, model, threads, NULL, &m, &ids, &n)) return 1;
    if (n < prompt_tokens) { free(ids); kvc_model_free(m); return cli_error("bench", "text has only %lld tokens", (long long)n); }
    kvc_err err = {{0}};
    kvc_cache_shape shape = kvc_model_cache_shape(m, prompt_tokens + gen_tokens);
    kvc_cache *c = kvc_cache_full_new(&shape, &err);
    kvc_run *r = kvc_run_new(m, prompt_tokens, &err);
    float *logits = malloc((size_t)m->hp.n_vocab * sizeof(float));
    int32_t *pos = malloc((size_t)prompt_tokens * sizeof(int32_t));
    double *pre = calloc((size_t)reps, sizeof(double)), *dec = calloc((size_t)reps, sizeof(double));
    if (!c || !r || !logits || !pos || !pre || !dec) { rc = cli_error("bench", "%s", err.msg[0] ? err.msg : "out of memory"); goto done; }
    for (int i = 0; i < prompt_tokens; i++) pos[i] = i;
    for (int rep = 0; rep < reps; rep++) {
        kvc_cache_reset(c);
        double t0 = kvc_now();
        if (kvc_model_forward(m, r, c, ids, pos, prompt_tokens, logits, 0, &err)) { rc = cli_error("bench", "%s", err.msg); goto done; }
        double t1 = kvc_now();
        for (int g = 0; g < gen_tokens; g++) {
            int32_t tok = kvc_argmax_f32(logits, m->hp.n_vocab), p = prompt_tokens + g;
            if (kvc_model_forward(m, r, c, &tok, &p, 1, logits, 0, &err)) { rc = cli_error("bench", "%s", err.msg); goto done; }
        }
        double t2 = kvc_now();
        pre[rep] = prompt_tokens / (t1 - t0);
        dec[rep] = gen_tokens / (t2 - t1);
        fprintf(stderr, "rep %d: prefill %.1f tok/s, decode %.1f tok/s\n", rep + 1, pre[rep], dec[rep]);
    }
    qsort(pre, (size_t)reps, sizeof *pre, cmp_dbl);
    qsort(dec, (size_t)reps, sizeof *dec, cmp_dbl);
    double mp = pre[reps / 2], md = dec[reps / 2];
    if (json)
        printf("{\"engine\": \"kvcodec\", \"model\": \"%s\", \"threads\": %d, \"prompt_tokens\": %d, \"gen_tokens\": %d,"
               " \"reps\": %d, \"prefill_tok_s\": %.2f, \"decode_tok_s\": %.2f}\n",
               m->hp.name, threads, prompt_tokens, gen_tokens, reps, mp, md);
    else
        printf("prefill %.1f tok/s (%d tokens), decode %.1f tok/s (%d tokens), %d threads, median of %d\n", mp,
               prompt_tokens, md, gen_tokens, threads, reps);
done:
    free(pre);
    free(dec);
    free(pos);
    free(logits);
    kvc_run_free(r);
    kvc_cache_free(c);
    free(ids);
    kvc_model_free(m);
    return rc;
}
