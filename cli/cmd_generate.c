/* cmd_generate.c - `kvcodec generate`: prefill a prompt in one batch, then decode one token
 * at a time through the cache, streaming the text to stdout. */
#include "cli.h"

#include "kvc/kvcache.h"
#include "kvc/sampler.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cmd_generate(int argc, char **argv) {
    const char *model = cli_default_model(), *prompt = NULL, *repr = NULL, *keep = NULL, *device = "cpu";
    int max_tokens = 64, threads = cli_default_threads(), ctx = 0, chat = 0, show_stats = 0;
    int ignore_eos = 0;
    float temp = 0.0f, top_p = 1.0f;
    uint64_t seed = 42;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"prompt", ARG_STR, &prompt, "TEXT", "prompt text", 1},
        {"max-tokens", ARG_INT, &max_tokens, "N", "tokens to generate (default 64)", 0},
        {"temp", ARG_FLOAT, &temp, "T", "sampling temperature; 0 = greedy (default 0)", 0},
        {"top-p", ARG_FLOAT, &top_p, "P", "nucleus sampling mass (default 1)", 0},
        {"seed", ARG_U64, &seed, "N", "random seed for sampling (default 42)", 0},
        {"ctx", ARG_INT, &ctx, "N", "context length (default: the model's training context)", 0},
        {"chat", ARG_FLAG, &chat, NULL, "wrap the prompt in the ChatML template (<|im_start|>user ...)", 0},
        {"ignore-eos", ARG_FLAG, &ignore_eos, NULL, "keep generating past the end-of-sequence token", 0},
        ARG_THREADS(&threads, "all cores"),
        ARG_DEVICE(&device),
        {"stats", ARG_FLAG, &show_stats, NULL, "print prefill/decode speed and KV bytes on stderr", 0},
        {"repr", ARG_STR, &repr, "SPEC", "KV representation, e.g. int8 or ae:FILE,int8 (default: the full f32 cache)", 0},
        {"keep", ARG_STR, &keep, "SPEC", "retention policy, e.g. lsh:budget=0.5 (fractions are of the prompt length)", 0},
        {0},
    };
    int rc = args_parse("generate", "--prompt TEXT [--max-tokens N] [--temp T --top-p P --seed S] [--chat]",
                        "Streams a completion of the prompt (no BOS is added unless the model asks for it).",
                        specs, argc, argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (max_tokens < 0) return cli_error("generate", "--max-tokens must be >= 0"), 2;
    if (threads < 1) threads = 1;
    size_t plen = strlen(prompt), bad;
    if (!kvc_utf8_valid(prompt, plen, &bad)) return cli_error("generate", "prompt is not valid UTF-8 (byte %zu)", bad), 2;
    kvc_model *m = cli_load_model(model, threads);
    if (!m) return 1;
    if (ctx <= 0) ctx = m->hp.n_ctx_train;
    char *text = (char *)prompt;
    if (chat) {
        const char *pre = "<|im_start|>user\n", *post = "<|im_end|>\n<|im_start|>assistant\n";
        text = malloc(strlen(pre) + plen + strlen(post) + 1);
        sprintf(text, "%s%s%s", pre, prompt, post);
    }
    int32_t *ids;
    int64_t n;
    rc = cli_tokenize(m, text, strlen(text), chat, &ids, &n);
    if (chat) free(text);
    if (rc) { kvc_model_free(m); return 1; }
    int add_bos = kvc_tokenizer_add_bos(m->tok) && kvc_tokenizer_bos(m->tok) >= 0;
    if (add_bos) {
        int32_t *nb = malloc((size_t)(n + 1) * sizeof *nb);
        nb[0] = kvc_tokenizer_bos(m->tok);
        memcpy(nb + 1, ids, (size_t)n * sizeof *ids);
        free(ids);
        ids = nb;
        n++;
    }
    if (n == 0) { free(ids); kvc_model_free(m); return cli_error("generate", "the prompt is empty"), 2; }
    if (n >= ctx) {
        free(ids);
        kvc_model_free(m);
        return cli_error("generate", "prompt is %lld tokens, longer than the context of %d tokens", (long long)n, ctx);
    }
    if (n + max_tokens > ctx) {
        fprintf(stderr, "kvcodec generate: note: stopping at the context limit (%d tokens)\n", ctx);
        max_tokens = ctx - (int)n;
    }
    kvc_err err = {{0}};
    kvc_cache_shape shape = kvc_model_cache_shape(m, (int)n + max_tokens);
    kvc_cache *c = repr || keep ? kvc_kvcache_new(&shape, repr, keep, m->fingerprint, &err) : kvc_cache_full_new(&shape, &err);
    const kvc_backend *be = c ? kvc_backend_find(device, &err) : NULL;
    if (c && (!be || kvc_cache_set_budget(c, n, &err))) {
        kvc_cache_free(c);
        c = NULL;
    }
    kvc_cache_set_backend(c, be);
    kvc_run *r = c ? kvc_run_new(m, n < 512 ? (int)n : 512, &err) : NULL;
    float *logits = malloc((size_t)m->hp.n_vocab * sizeof(float));
    int32_t *pos = malloc((size_t)n * sizeof(int32_t));
    kvc_sampler smp = {0};
    if (!c || !r || !logits || !pos || kvc_sampler_init(&smp, m->hp.n_vocab, temp, top_p, seed, &err)) {
        rc = cli_error("generate", "%s", err.msg[0] ? err.msg : "out of memory");
        goto done;
    }
    for (int64_t i = 0; i < n; i++) pos[i] = (int32_t)i;
    fwrite(prompt, 1, plen, stdout);
    fflush(stdout);
    double t0 = kvc_now();
    if (kvc_model_forward(m, r, c, ids, pos, (int)n, logits, 0, &err)) { rc = cli_error("generate", "%s", err.msg); goto done; }
    double t1 = kvc_now();
    int gen = 0;
    const int32_t eos = kvc_tokenizer_eos(m->tok);
    for (; gen < max_tokens; gen++) {
        int32_t tok = kvc_sampler_sample(&smp, logits);
        if (tok == eos && !ignore_eos) break;
        size_t pl;
        const char *piece = kvc_tokenizer_piece(m->tok, tok, &pl);
        fwrite(piece, 1, pl, stdout);
        fflush(stdout);
        if (gen + 1 == max_tokens) { gen++; break; }
        int32_t p = (int32_t)(n + gen);
        if (kvc_model_forward(m, r, c, &tok, &p, 1, logits, 0, &err)) { rc = cli_error("generate", "%s", err.msg); goto done; }
    }
    putchar('\n');
    fflush(stdout);
    double t2 = kvc_now();
    if (show_stats)
        fprintf(stderr, "prompt %lld tokens in %.3f s (%.1f tok/s); generated %d tokens in %.3f s (%.1f tok/s)\n",
                (long long)n, t1 - t0, n / (t1 - t0), gen, t2 - t1, gen > 1 ? (gen - 1) / (t2 - t1) : 0.0);
    if (show_stats)
        fprintf(stderr, "KV cache (%s): %zu bytes for %lld tokens held in layer 0\n", kvc_kvcache_describe(c), kvc_cache_bytes(c),
                (long long)kvc_cache_n_tokens(c, 0));
done:
    kvc_sampler_free(&smp);
    free(pos);
    free(logits);
    kvc_run_free(r);
    kvc_cache_free(c);
    free(ids);
    kvc_model_free(m);
    return rc;
}
