/* cmd_ppl.c - `kvcodec ppl`: perplexity of a model on a UTF-8 text file with the
 * fixed-window protocol of kvc/eval.h, as a line of text or JSON. */
#include "cli.h"

#include "kvc/eval.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int cmd_ppl(int argc, char **argv) {
    const char *model = cli_default_model(), *text = "data/corpora/eval-debian-handbook.txt";
    int ctx = 512, threads = cli_default_threads(), batch = 512, json = 0;
    uint64_t max_tokens = 0;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"text", ARG_STR, &text, "FILE", "UTF-8 text (default: data/corpora/eval-debian-handbook.txt)", 0},
        {"ctx", ARG_INT, &ctx, "N", "window length in tokens (default 512)", 0},
        {"tokens", ARG_U64, &max_tokens, "N", "use only the first N tokens of the text (default: all)", 0},
        ARG_THREADS(&threads, "all cores"),
        {"batch", ARG_INT, &batch, "N", "tokens per forward call (default 512)", 0},
        ARG_JSON(&json),
        {0},
    };
    int rc = args_parse("ppl", "[--model M] [--text T] [--ctx N] [--tokens N] [--threads N] [--json]",
                        "Perplexity in consecutive windows of --ctx tokens, each from an empty cache, no BOS;\n"
                        "every token but a window's first is scored.",
                        specs, argc, argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (ctx < 2) return cli_error("ppl", "--ctx must be at least 2"), 2;
    if (threads < 1) return cli_error("ppl", "--threads must be at least 1"), 2;
    if (batch < 1) return cli_error("ppl", "--batch must be at least 1"), 2;
    kvc_model *m;
    int32_t *ids;
    int64_t n;
    if (cli_text_and_model(text, model, threads, NULL, &m, &ids, &n)) return 1;
    if (ctx > m->hp.n_ctx_train)
        fprintf(stderr, "kvcodec ppl: warning: --ctx %d exceeds the model's training context %d\n", ctx, m->hp.n_ctx_train);
    if (max_tokens && (int64_t)max_tokens < n) n = (int64_t)max_tokens;
    if (n < 2) { free(ids); kvc_model_free(m); return cli_error("ppl", "text has %lld tokens; need at least 2", (long long)n); }
    kvc_err err = {{0}};
    kvc_cache_shape shape = kvc_model_cache_shape(m, ctx);
    kvc_cache *c = kvc_cache_full_new(&shape, &err);
    kvc_ppl_opts opts = {ctx, batch, isatty(2)};
    kvc_ppl_result res;
    if (!c || kvc_eval_perplexity(m, c, ids, n, &opts, &res, &err)) {
        kvc_cache_free(c);
        free(ids);
        kvc_model_free(m);
        return cli_error("ppl", "%s", err.msg);
    }
    if (json)
        printf("{\"model\": \"%s\", \"fingerprint\": \"%s\", \"text\": \"%s\", \"ctx\": %d, \"tokens\": %lld, "
               "\"scored\": %lld, \"windows\": %d, \"nll\": %.6f, \"ppl\": %.6f, \"seconds\": %.3f, "
               "\"tokens_per_s\": %.1f, \"threads\": %d, \"cache\": \"%s\"}\n",
               m->hp.name, m->fingerprint, text, ctx, (long long)res.n_tokens, (long long)res.n_scored,
               res.n_windows, res.nll, res.ppl, res.seconds, res.n_tokens / res.seconds, threads, c->ops->name);
    else
        printf("tokens %lld  scored %lld  windows %d  ctx %d  nll %.4f  mean-nll %.6f  ppl %.4f  (%.1f s, %.0f tok/s,"
               " %d threads)\n",
               (long long)res.n_tokens, (long long)res.n_scored, res.n_windows, ctx, res.nll,
               res.nll / (double)res.n_scored, res.ppl, res.seconds, res.n_tokens / res.seconds, threads);
    kvc_cache_free(c);
    free(ids);
    kvc_model_free(m);
    return 0;
}
