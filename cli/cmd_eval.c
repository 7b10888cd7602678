/* cmd_eval.c - `kvcodec eval`: runs the measuring protocols of DESIGN.md §5 (streaming
 * perplexity, context compression, passkey retrieval) on one compressed cache against the
 * full-precision cache, prints one table row per measure and optionally writes JSON. */
#include "cli.h"

#include "kvc/eval.h"
#include "kvc/kvcache.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_LIST 16

enum { M_STREAM = 1, M_CONTEXT = 2, M_PASSKEY = 4 };

/* Parses "stream,context,passkey" into a bit set; returns 0 or -1 (message printed). */
static int parse_measures(const char *s, int *set) {
    *set = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "stream")) *set |= M_STREAM;
        else if (!strcmp(t, "context")) *set |= M_CONTEXT;
        else if (!strcmp(t, "passkey")) *set |= M_PASSKEY;
        else return cli_error("eval", "unknown measure '%s' (choose from stream, context, passkey)", t), -1;
    }
    if (!*set) return cli_error("eval", "--measures is empty"), -1;
    return 0;
}

/* Parses a comma-separated list of numbers into x (at most MAX_LIST); integers when ints.
 * Returns the count, or -1 (message printed) on a bad or out-of-range entry. */
static int parse_list(const char *opt, const char *s, double *x, int ints, double lo, double hi) {
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        double v = strtod(p, &end);
        if (end == p || errno || (*end && *end != ',') || n >= MAX_LIST || v < lo || v > hi ||
            (ints && v != floor(v)))
            return cli_error("eval", "invalid --%s '%s' (comma-separated %s in %g..%g, at most %d)", opt, s,
                             ints ? "integers" : "numbers", lo, hi, MAX_LIST),
                   -1;
        x[n++] = v;
        p = *end ? end + 1 : end;
    }
    if (!n) return cli_error("eval", "--%s is empty", opt), -1;
    return n;
}

/* Prints one table row; quality columns may be NAN (printed as -). */
static void print_row(const char *name, const kvc_quality *q, double tok_s) {
    char c[8][16];
    const double v[8] = {q->ppl, q->ppl_full, q->rise_pct, q->kl_mean, q->kl_p99, q->top1, q->bytes_per_token,
                         q->compression};
    const char *f[8] = {"%.4f", "%.4f", "%+.2f", "%.2e", "%.2e", "%.4f", "%.0f", "%.3f"};
    for (int i = 0; i < 8; i++) {
        if (isfinite(v[i])) snprintf(c[i], sizeof c[i], f[i], v[i]);
        else snprintf(c[i], sizeof c[i], "-");
    }
    printf("%-8s %9s %9s %7s %8s %8s %6s %7s %6s %6.1f %8.1f %8.1f\n", name, c[0], c[1], c[2], c[3], c[4], c[5], c[6],
           c[7], 100 * q->kept_frac, 100 * q->removed_frac, tok_s);
}

/* A number as JSON text ("null" when not finite), in one of 24 rotating static buffers so a
 * single fprintf may hold many. */
static const char *jv(double x) {
    static char buf[24][32];
    static int at;
    char *b = buf[at++ % 24];
    if (isfinite(x)) snprintf(b, 32, "%.9g", x);
    else snprintf(b, 32, "null");
    return b;
}

/* A string as JSON text (quoted, escaped), in one of 8 rotating static buffers (long
 * strings are cut at 1000 bytes). */
static const char *js(const char *s) {
    static char buf[8][2048];
    static int at;
    char *b = buf[at++ % 8];
    size_t w = 0;
    b[w++] = '"';
    for (size_t i = 0; s && s[i] && w < 2000 && i < 1000; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') { b[w++] = '\\'; b[w++] = (char)ch; }
        else if (ch < 0x20) w += (size_t)snprintf(b + w, 8, "\\u%04x", ch);
        else b[w++] = (char)ch;
    }
    b[w++] = '"';
    b[w] = '\0';
    return b;
}

/* Writes one measure's figures as a JSON object member. */
static void json_quality(FILE *f, const char *name, const kvc_quality *q, int last) {
    fprintf(f,
            "  \"%s\": {\"tokens\": %lld, \"scored\": %lld, \"units\": %d, \"nll\": %s, \"nll_full\": %s, "
            "\"ppl\": %s, \"ppl_full\": %s, \"rise_pct\": %s, \"kl_mean\": %s, \"kl_p99\": %s, \"top1\": %s, "
            "\"bytes_per_token\": %s, \"f16_bytes_per_token\": %s, \"compression_vs_f16\": %s, \"kept_frac\": %s, "
            "\"removed_frac\": %s, \"kept_frac_scored\": %s, \"seconds\": %.3f, \"seconds_cache\": %.3f, "
            "\"tokens_per_s\": %.2f}%s\n",
            name, (long long)q->n_tokens, (long long)q->n_scored, q->n_units, jv(q->nll), jv(q->nll_full), jv(q->ppl),
            jv(q->ppl_full), jv(q->rise_pct), jv(q->kl_mean), jv(q->kl_p99), jv(q->top1), jv(q->bytes_per_token),
            jv(q->f16_bytes_per_token), jv(q->compression), jv(q->kept_frac), jv(q->removed_frac),
            jv(q->kept_scored), q->seconds, q->seconds_cache,
            q->seconds_cache > 0 ? q->n_tokens / q->seconds_cache : 0.0, last ? "" : ",");
}

/* Everything the command measured, for the JSON file. */
typedef struct {
    const char *model, *fingerprint, *text, *repr, *keep, *cache;
    int ctx, chunk, context_len, continuation, threads, set;
    int64_t tokens;
    kvc_quality stream, context;
    kvc_passkey_result pk;
} eval_report;

/* Writes the report to path through a temporary file and a rename, so a reader never sees a
 * half-written file. Returns 0 or -1 (message printed). */
static int write_json(const char *path, const eval_report *r) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return cli_error("eval", "cannot write '%s': %s", tmp, strerror(errno)), -1;
    fprintf(f,
            "{\n  \"model\": %s, \"fingerprint\": %s, \"text\": %s, \"tokens\": %lld,\n"
            "  \"cache\": %s, \"repr\": %s, \"keep\": %s, \"threads\": %d,\n"
            "  \"ctx\": %d, \"chunk\": %d, \"context_len\": %d, \"continuation\": %d,\n",
            js(r->model), js(r->fingerprint), js(r->text), (long long)r->tokens, js(r->cache), js(r->repr), js(r->keep),
            r->threads, r->ctx,
            r->chunk, r->context_len, r->continuation);
    if (r->set & M_STREAM) json_quality(f, "stream", &r->stream, 0);
    if (r->set & M_CONTEXT) json_quality(f, "context", &r->context, 0);
    if (r->set & M_PASSKEY) {
        const kvc_passkey_result *p = &r->pk;
        fprintf(f,
                "  \"passkey\": {\"trials\": %d, \"correct\": %d, \"correct_full\": %d, \"bytes_per_token\": %s, "
                "\"compression_vs_f16\": %s, \"kept_frac\": %s, \"removed_frac\": %s, \"seconds\": %.3f, "
                "\"tokens_per_s\": %.2f, \"cells\": [",
                p->trials, p->correct, p->correct_full, jv(p->bytes_per_token), jv(p->compression),
                jv(p->kept_frac), jv(p->removed_frac), p->seconds,
                p->seconds_cache > 0 ? p->n_tokens / p->seconds_cache : 0.0);
        for (int i = 0; i < p->n_cells; i++)
            fprintf(f, "%s\n    {\"length\": %d, \"depth\": %g, \"skipped\": %s, \"trials\": %d, \"correct\": %d, "
                       "\"correct_full\": %d, \"last_answer\": %s}",
                    i ? "," : "", p->cells[i].length, p->cells[i].depth, p->cells[i].skipped ? "true" : "false",
                    p->cells[i].trials, p->cells[i].correct, p->cells[i].correct_full, js(p->cells[i].last_answer));
        fprintf(f, "]},\n");
    }
    fprintf(f, "  \"protocol\": \"DESIGN.md section 5; KL(P_full || P_cache) in nats; compression = f16 bytes / bytes\"\n}\n");
    int bad = ferror(f);
    bad |= fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return cli_error("eval", "cannot write '%s': %s", path, strerror(e)), -1;
    }
    return 0;
}

/* Prints the passkey grid: one line per length, correct/trials per depth (full in brackets). */
static void print_passkey(const kvc_passkey_result *p, int n_depths) {
    printf("\npasskey accuracy (cache [full]) by length and depth:\n%-8s", "length");
    for (int j = 0; j < n_depths && j < p->n_cells; j++) printf("  depth %-8g", p->cells[j].depth);
    printf("\n");
    for (int i = 0; i < p->n_cells; i += n_depths) {
        printf("%-8d", p->cells[i].length);
        for (int j = 0; j < n_depths; j++) {
            const kvc_passkey_cell *c = &p->cells[i + j];
            if (c->skipped) printf("  %-14s", "skipped");
            else printf("  %2d/%-2d [%2d/%-2d] ", c->correct, c->trials, c->correct_full, c->trials);
        }
        printf("\n");
    }
    if (p->trials)
        printf("passkey total: %d/%d (%.1f%%), full cache %d/%d (%.1f%%)\n", p->correct, p->trials,
               100.0 * p->correct / p->trials, p->correct_full, p->trials, 100.0 * p->correct_full / p->trials);
}

/* After the options, --help lists every representation and policy a spec may name. */
static void eval_help_extra(void) {
    printf("\n");
    kvc_kvcache_list(stdout);
}

int cmd_eval(int argc, char **argv) {
    const char *model = cli_default_model(), *text = "data/corpora/eval-debian-handbook.txt";
    const char *repr = "f16", *keep = "full", *measures = "stream,context", *json = NULL;
    const char *pk_len_s = "1024,2048", *pk_depth_s = "0,0.25,0.5,0.75,1";
    int ctx = 512, chunk = 32, clen = 512, cont = 64, samples = 8, trials = 3, threads = cli_default_threads();
    uint64_t max_tokens = 0, seed = 1;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"text", ARG_STR, &text, "FILE", "UTF-8 text (default: data/corpora/eval-debian-handbook.txt)", 0},
        {"tokens", ARG_U64, &max_tokens, "N", "use only the first N tokens of the text (default: all)", 0},
        {"repr", ARG_STR, &repr, "SPEC", "K/V representation (default f16; see the list below)", 0},
        {"keep", ARG_STR, &keep, "SPEC", "retention policy (default full; see the list below)", 0},
        {"measures", ARG_STR, &measures, "LIST", "stream,context,passkey (default stream,context)", 0},
        {"ctx", ARG_INT, &ctx, "N", "stream: window length in tokens (default 512)", 0},
        {"chunk", ARG_INT, &chunk, "N", "tokens per forward call (default 32; 1 = exact decoding)", 0},
        {"context-len", ARG_INT, &clen, "N", "context: tokens prefilled, then compressed (default 512)", 0},
        {"continuation", ARG_INT, &cont, "M", "context: tokens scored after the compression (default 64)", 0},
        {"samples", ARG_INT, &samples, "S", "context: samples of N + M tokens (default 8)", 0},
        {"passkey-lengths", ARG_STR, &pk_len_s, "LIST", "passkey prompt lengths in tokens (default 1024,2048)", 0},
        {"passkey-depths", ARG_STR, &pk_depth_s, "LIST", "passkey needle depths 0..1 (default 0,0.25,0.5,0.75,1)", 0},
        {"trials", ARG_INT, &trials, "N", "passkey prompts per length and depth (default 3)", 0},
        {"seed", ARG_U64, &seed, "N", "seed of the passkey keys (default 1)", 0},
        ARG_THREADS(&threads, "all cores"),
        {"json", ARG_STR, &json, "FILE", "also write the results as JSON to FILE (atomically)", 0},
        {0},
    };
    int rc = args_parse("eval", "[--repr SPEC] [--keep SPEC] [--measures LIST] [options]",
                        "Quality and memory of a compressed KV cache against the full-precision cache on the\n"
                        "same chunks (DESIGN.md section 5): streaming perplexity in windows of --ctx tokens fed\n"
                        "--chunk at a time; context compression (prefill N, compress once, score M); passkey\n"
                        "retrieval. KL is KL(P_full || P_cache) in nats; compression = f16 bytes / cache bytes;\n"
                        "tok/s counts the compressed cache's forward passes alone.",
                        specs, argc, argv, NULL, 0, NULL);
    if (rc == 1) eval_help_extra();
    if (rc) return rc == 1 ? 0 : 2;
    int set;
    double lens_d[MAX_LIST], depths[MAX_LIST];
    if (parse_measures(measures, &set)) return 2;
    const int n_len = parse_list("passkey-lengths", pk_len_s, lens_d, 1, 16, 1 << 20);
    const int n_dep = n_len < 0 ? -1 : parse_list("passkey-depths", pk_depth_s, depths, 0, 0, 1);
    if (n_len < 0 || n_dep < 0) return 2;
    if (ctx < 2) return cli_error("eval", "--ctx must be at least 2"), 2;
    if (chunk < 1) return cli_error("eval", "--chunk must be at least 1"), 2;
    if (clen < 1 || cont < 2) return cli_error("eval", "--context-len must be >= 1 and --continuation >= 2"), 2;
    if (samples < 1 || trials < 1) return cli_error("eval", "--samples and --trials must be at least 1"), 2;
    if (threads < 1) return cli_error("eval", "--threads must be at least 1"), 2;
    int lens[MAX_LIST];
    for (int i = 0; i < n_len; i++) lens[i] = (int)lens_d[i];

    kvc_model *m = NULL;
    int32_t *ids = NULL;
    int64_t n = 0;
    if (set & (M_STREAM | M_CONTEXT)) {
        if (cli_text_and_model(text, model, threads, NULL, &m, &ids, &n)) return 1;
        if (max_tokens && (int64_t)max_tokens < n) n = (int64_t)max_tokens;
    } else if (!(m = cli_load_model(model, threads))) return 1;
    kvc_cache *c = NULL, *ref = NULL;
    kvc_err err = {{0}};
    eval_report rep = {.model = m->hp.name, .fingerprint = m->fingerprint, .text = text, .repr = repr, .keep = keep,
                       .ctx = ctx, .chunk = chunk, .context_len = clen, .continuation = cont, .threads = threads,
                       .set = set, .tokens = n};
    const int ctx_train = m->hp.n_ctx_train, explicit_len = strcmp(pk_len_s, "1024,2048") != 0;
    int need = 0, status = 1;
    /* ---- checks before anything runs ---- */
    if ((set & M_STREAM) && ctx > ctx_train) {
        cli_error("eval", "--ctx %d exceeds the model's context of %d tokens", ctx, ctx_train);
        goto done;
    }
    if ((set & M_CONTEXT) && clen + cont > ctx_train) {
        cli_error("eval", "--context-len %d + --continuation %d exceed the model's context of %d tokens", clen, cont,
                  ctx_train);
        goto done;
    }
    if (set & M_STREAM) need = ctx;
    if ((set & M_CONTEXT) && clen + cont > need) need = clen + cont;
    if (set & M_PASSKEY)
        for (int i = 0; i < n_len; i++) {
            if (lens[i] > ctx_train && explicit_len) {
                cli_error("eval", "--passkey-lengths %d exceeds the model's context of %d tokens", lens[i], ctx_train);
                goto done;
            }
            if (lens[i] > ctx_train)
                fprintf(stderr, "kvcodec eval: note: passkey length %d skipped (model context %d)\n", lens[i], ctx_train);
            else if (lens[i] + 8 > need) need = lens[i] + 8;
        }
    kvc_cache_shape shape = kvc_model_cache_shape(m, need);
    if (!(c = kvc_kvcache_new(&shape, repr, keep, m->fingerprint, &err)) || !(ref = kvc_cache_full_new(&shape, &err))) {
        cli_error("eval", "%s", err.msg);
        goto done;
    }
    rep.cache = kvc_kvcache_describe(c);
    /* a budget that cannot fit fails here, not after minutes of work */
    if ((set & M_STREAM) && kvc_cache_set_budget(c, ctx, &err)) {
        cli_error("eval", "stream window %d: %s", ctx, err.msg);
        goto done;
    }
    if ((set & M_CONTEXT) && kvc_cache_set_budget(c, clen, &err)) {
        cli_error("eval", "context of %d tokens: %s", clen, err.msg);
        goto done;
    }
    for (int i = 0; (set & M_PASSKEY) && i < n_len; i++) {
        kvc_passkey_prompt p;
        if (lens[i] > ctx_train) continue;
        int bad = kvc_passkey_build(m->tok, lens[i], 0.0, "12345", &p, &err);
        if (!bad) {
            bad = kvc_cache_set_budget(c, p.n_context, &err);
            kvc_passkey_prompt_free(&p);
        }
        if (bad) {
            cli_error("eval", "passkey length %d: %s", lens[i], err.msg);
            goto done;
        }
    }
    if (kvc_cache_set_budget(c, -1, &err)) {
        cli_error("eval", "%s", err.msg);
        goto done;
    }
    const int progress = isatty(2);
    kvc_measure_opts mo = {ctx, chunk, clen, cont, samples, progress, NULL};
    if ((set & M_STREAM) && kvc_eval_stream(m, c, ref, ids, n, &mo, &rep.stream, &err)) {
        cli_error("eval", "stream: %s", err.msg);
        goto done;
    }
    if ((set & M_CONTEXT) && kvc_eval_context(m, c, ref, ids, n, &mo, &rep.context, &err)) {
        cli_error("eval", "%s", err.msg);
        goto done;
    }
    kvc_passkey_opts po = {lens, n_len, depths, n_dep, trials, seed, chunk, 8, progress};
    if ((set & M_PASSKEY) && kvc_eval_passkey(m, c, ref, &po, &rep.pk, &err)) {
        cli_error("eval", "passkey: %s", err.msg);
        goto done;
    }
    /* ---- report ---- */
    printf("model %s  cache %s  threads %d\n", m->hp.name, rep.cache, threads);
    if (set & (M_STREAM | M_CONTEXT))
        printf("text %s (%lld tokens)  stream: ctx %d chunk %d  context: N %d M %d samples %d\n", text, (long long)n,
               ctx, chunk, clen, cont, rep.context.n_units ? rep.context.n_units : samples);
    printf("%-8s %9s %9s %7s %8s %8s %6s %7s %6s %6s %8s %8s\n", "measure", "ppl", "ppl_full", "rise%", "KL_mean",
           "KL_p99", "top1", "B/tok", "x_f16", "kept%", "removed%", "tok/s");
    if (set & M_STREAM)
        print_row("stream", &rep.stream, rep.stream.n_tokens / rep.stream.seconds_cache);
    if (set & M_CONTEXT)
        print_row("context", &rep.context, rep.context.n_tokens / rep.context.seconds_cache);
    if (set & M_PASSKEY) {
        kvc_quality q = {.ppl = NAN, .ppl_full = NAN, .rise_pct = NAN, .kl_mean = NAN, .kl_p99 = NAN, .top1 = NAN,
                         .bytes_per_token = rep.pk.bytes_per_token, .compression = rep.pk.compression,
                         .kept_frac = rep.pk.kept_frac, .removed_frac = rep.pk.removed_frac};
        print_row("passkey", &q, rep.pk.seconds_cache > 0 ? rep.pk.n_tokens / rep.pk.seconds_cache : 0.0);
    }
    if (set & M_STREAM)
        printf("stream: %lld scored in %d windows; mean kept over scored positions %.1f%%; %.1f s in all\n",
               (long long)rep.stream.n_scored, rep.stream.n_units, 100 * rep.stream.kept_scored, rep.stream.seconds);
    if (set & M_CONTEXT)
        printf("context: %lld scored in %d samples; NLL %.4f (full %.4f); %.1f s in all\n",
               (long long)rep.context.n_scored, rep.context.n_units, rep.context.nll, rep.context.nll_full,
               rep.context.seconds);
    if (set & M_PASSKEY) print_passkey(&rep.pk, n_dep);
    status = json && write_json(json, &rep) ? 1 : 0;
done:
    kvc_passkey_result_free(&rep.pk);
    kvc_cache_free(c);
    kvc_cache_free(ref);
    free(ids);
    kvc_model_free(m);
    return status;
}
