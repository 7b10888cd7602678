/* cmd_eval.c - `kvcodec eval`: parses flags, loads the model and text, calls kvc_eval_run
 * (eval/eval_run.c: the protocols of DESIGN.md section 5 on one compressed cache against the
 * full-precision cache), prints one table row per measure and optionally writes JSON. */
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


#define M_FACTS 8 /* the several-facts task: shared-prefill runs only */
#define MAX_POINTS 64

/* Parses "stream,context,passkey,facts" into a bit set; returns 0 or -1 (message printed). */
static int parse_measures(const char *s, int *set) {
    *set = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "stream")) *set |= KVC_M_STREAM;
        else if (!strcmp(t, "context")) *set |= KVC_M_CONTEXT;
        else if (!strcmp(t, "passkey")) *set |= KVC_M_PASSKEY;
        else if (!strcmp(t, "facts")) *set |= M_FACTS;
        else return cli_error("eval", "unknown measure '%s' (choose from stream, context, passkey, facts)", t), -1;
    }
    if (!*set) return cli_error("eval", "--measures is empty"), -1;
    return 0;
}

/* Splits a ';'-separated list in place into at most MAX_POINTS items; returns the count, or -1
 * (message printed) on an empty item or too many. */
static int split_points(const char *opt, char *s, char **items) {
    int n = 0;
    for (char *t = s;;) {
        char *semi = strchr(t, ';');
        if (semi) *semi = '\0';
        while (*t == ' ') t++;
        if (!*t || n == MAX_POINTS) return cli_error("eval", "--%s: an empty item, or more than %d", opt, MAX_POINTS), -1;
        items[n++] = t;
        if (!semi) break;
        t = semi + 1;
    }
    return n;
}

/* "12/20" by length of one task's result ("1024: 4/5  2048: 3/5"), measured and full. */
static void print_by_length(const char *name, const kvc_passkey_result *r) {
    printf("  %-8s", name);
    for (int i = 0; r->cells && i < r->n_cells; i++) {
        int first = 1, ok = 0, okf = 0, tr = 0;
        for (int j = 0; j < i; j++) first &= r->cells[j].length != r->cells[i].length;
        if (!first) continue;
        for (int j = i; j < r->n_cells; j++)
            if (r->cells[j].length == r->cells[i].length)
                ok += r->cells[j].correct, okf += r->cells[j].correct_full, tr += r->cells[j].trials;
        printf("  %d: %d/%d [%d]", r->cells[i].length, ok, tr, okf);
    }
    printf("   total %d/%d, full %d/%d\n", r->correct, r->trials, r->correct_full, r->trials);
}

/* `kvcodec eval` with several points (or --prefill shared, or facts): kvc_eval_multi_run. */
/* Splits --repr and --keep into np points (one list may have a single item, used for all);
 * returns np, or -1 (message printed). */
static int points_of(char *repr_s, char *keep_s, const char **rp, const char **kp) {
    char *reprs[MAX_POINTS], *keeps[MAX_POINTS];
    int nr = split_points("repr", repr_s, reprs), nk = nr < 0 ? -1 : split_points("keep", keep_s, keeps);
    if (nr < 0 || nk < 0) return -1;
    if (nr != 1 && nk != 1 && nr != nk)
        return cli_error("eval", "--repr has %d items and --keep %d: give one of them once, or both alike", nr, nk), -1;
    const int np = nr > nk ? nr : nk;
    for (int i = 0; i < np; i++) rp[i] = reprs[nr == 1 ? 0 : i], kp[i] = keeps[nk == 1 ? 0 : i];
    return np;
}

static int eval_multi(const kvc_model *m, const int32_t *ids, int64_t n, const char **rp, const char **kp, int np,
                      int set, kvc_multi_opts *o, const kvc_backend *be, const char *csv, const char *samples,
                      const char *text, int threads) {
    const int what = (set & KVC_M_CONTEXT ? KVC_MULTI_CONTEXT : 0) | (set & KVC_M_PASSKEY ? KVC_MULTI_PASSKEY : 0) |
                     (set & M_FACTS ? KVC_MULTI_FACTS : 0);
    enum { DS = 1500 };
    kvc_multi_point *pts = calloc((size_t)np, sizeof *pts);
    char *desc = calloc((size_t)np, DS);
    kvc_err err = {{0}};
    int status = 1;
    if (!pts || !desc) {
        cli_error("eval", "out of memory");
        goto done;
    }
    if (kvc_eval_multi_run(m, ids, n, rp, kp, np, what, o, be, pts, desc, DS, &err)) {
        cli_error("eval", "%s", err.msg);
        goto done;
    }
    printf("model %s  shared exact prefill (chunk %d)  threads %d  device %s\n", m->hp.name, o->chunk, threads, be->name);
    if (what & KVC_MULTI_CONTEXT)
        printf("context: N %d M %d samples %d (%lld scored); rise and KL with 95%% bootstrap intervals over samples\n",
               o->context_len, o->continuation, pts[0].context.n_units, (long long)pts[0].context.n_scored);
    for (int i = 0; i < np; i++) {
        const kvc_multi_point *p = &pts[i];
        const kvc_quality *q = &p->context;
        printf("[%d] %s\n", i + 1, desc + (size_t)i * DS);
        if (what & KVC_MULTI_CONTEXT)
            printf("  context  ppl %.4f (full %.4f)  rise %+.2f%% [%+.2f, %+.2f]  KL %.4f [%.4f, %.4f]  p99 %.3f  top1 %.3f\n"
                   "           %.0f B/tok (%.2fx smaller than f16), kept %.1f%%, side store %.0f B/tok RAM + %.0f disk, "
                   "%.2f retrieved per query and head\n",
                   q->ppl, q->ppl_full, q->rise_pct, p->rise_ci[0], p->rise_ci[1], q->kl_mean, p->kl_ci[0], p->kl_ci[1],
                   q->kl_p99, q->top1, q->bytes_per_token, q->compression, 100 * q->kept_frac, p->side_ram_bpt,
                   p->side_disk_bpt, p->retrieved_per_query);
        if (what & KVC_MULTI_PASSKEY) print_by_length("passkey", &p->passkey);
        if (what & KVC_MULTI_FACTS) print_by_length("facts", &p->facts);
        if ((what & (KVC_MULTI_PASSKEY | KVC_MULTI_FACTS)) && !(what & KVC_MULTI_CONTEXT))
            printf("  prompts  %.0f B/tok, kept %.1f%%, side store %.0f B/tok RAM + %.0f disk\n",
                   p->passkey.trials ? p->passkey.bytes_per_token : p->facts.bytes_per_token,
                   100 * (p->passkey.trials ? p->passkey.kept_frac : p->facts.kept_frac), p->side_ram_bpt_pk,
                   p->side_disk_bpt_pk);
    }
    status = 0;
    if (csv && kvc_multi_write_csv(csv, samples, m->hp.name, text, o, what, rp, kp, desc, DS, pts, np, &err))
        status = cli_error("eval", "%s", err.msg);
done:
    for (int i = 0; pts && i < np; i++) kvc_multi_point_free(&pts[i]);
    free(pts), free(desc);
    return status;
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
    const char *pk_len_s = "1024,2048", *pk_depth_s = "0,0.25,0.5,0.75,1", *device = "cpu";
    const char *prefill = "cache", *csv = NULL, *per_sample = NULL;
    int ctx = 512, chunk = 32, clen = 512, cont = 64, samples = 8, trials = 3, threads = cli_default_threads();
    int n_facts = 4;
    uint64_t max_tokens = 0, seed = 1;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"text", ARG_STR, &text, "FILE", "UTF-8 text (default: data/corpora/eval-debian-handbook.txt)", 0},
        {"tokens", ARG_U64, &max_tokens, "N", "use only the first N tokens of the text (default: all)", 0},
        {"repr", ARG_STR, &repr, "SPEC", "K/V representation (default f16; see the list below)", 0},
        {"keep", ARG_STR, &keep, "SPEC", "retention policy (default full; see the list below)", 0},
        {"measures", ARG_STR, &measures, "LIST", "stream,context,passkey,facts (default stream,context)", 0},
        {"prefill", ARG_STR, &prefill, "cache|shared",
         "cache: each cache prefills through itself (default); shared: one exact prefill heard by every cache "
         "(the default with several points or facts)", 0},
        {"facts", ARG_INT, &n_facts, "N", "facts: doors with codes per prompt, 1..8 (default 4)", 0},
        {"csv", ARG_STR, &csv, "FILE", "shared prefill: one CSV row per point (atomically)", 0},
        {"per-sample", ARG_STR, &per_sample, "FILE", "shared prefill: per-sample context sums as CSV (with --csv)", 0},
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
        ARG_DEVICE(&device),
        {"json", ARG_STR, &json, "FILE", "also write the results as JSON to FILE (atomically)", 0},
        {0},
    };
    int rc = args_parse("eval", "[--repr SPEC] [--keep SPEC[;SPEC...]] [--measures LIST] [options]",
                        "Quality and memory of a compressed KV cache against the full-precision cache on the\n"
                        "same chunks (DESIGN.md section 5): streaming perplexity in windows of --ctx tokens fed\n"
                        "--chunk at a time; context compression (prefill N, compress once, score M); passkey\n"
                        "retrieval; several facts (doors with codes, one asked). KL is KL(P_full || P_cache) in\n"
                        "nats; compression = f16 bytes / cache bytes; tok/s counts the compressed cache's forward\n"
                        "passes alone. Several points (';'-separated --keep and/or --repr) share one exact prefill:\n"
                        "every cache hears the reference's keys, values and queries, then is compressed once and\n"
                        "answers on its own (kvpress's protocol; intervals are 95% bootstrap over samples).",
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
    if (strcmp(prefill, "cache") && strcmp(prefill, "shared"))
        return cli_error("eval", "--prefill must be cache or shared, got '%s'", prefill), 2;
    const int multi = strchr(repr, ';') || strchr(keep, ';') || !strcmp(prefill, "shared") || (set & M_FACTS);
    if (multi && (set & KVC_M_STREAM))
        return cli_error("eval", "the stream measure runs one cache through its own prefill: drop it from --measures "
                                 "with several points, facts or --prefill shared"), 2;
    if ((csv || per_sample) && !multi) return cli_error("eval", "--csv and --per-sample need a shared prefill"), 2;
    if (per_sample && !csv) return cli_error("eval", "--per-sample needs --csv"), 2;
    for (int i = 0; i < 2; i++) { /* an output that cannot be written fails now, not after the run */
        const char *path = i ? per_sample : csv;
        if (!path) continue;
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        if (access(slash ? (dir[0] ? dir : "/") : ".", W_OK) != 0)
            return cli_error("eval", "cannot write '%s': %s", path, strerror(errno)), 1;
    }
    if (n_facts < 1 || n_facts > KVC_FACTS_MAX) return cli_error("eval", "--facts must be in 1..%d", KVC_FACTS_MAX), 2;
    int lens[MAX_LIST];
    for (int i = 0; i < n_len; i++) lens[i] = (int)lens_d[i];
    static char rbuf[8192], kbuf[8192];
    const char *rp[MAX_POINTS], *kp[MAX_POINTS];
    int np = 0;
    if (multi) {
        snprintf(rbuf, sizeof rbuf, "%s", repr), snprintf(kbuf, sizeof kbuf, "%s", keep);
        if ((np = points_of(rbuf, kbuf, rp, kp)) < 0) return 2;
    }

    kvc_model *m = NULL;
    int32_t *ids = NULL;
    int64_t n = 0;
    if (set & (KVC_M_STREAM | KVC_M_CONTEXT)) {
        if (cli_text_and_model(text, model, threads, NULL, &m, &ids, &n)) return 1;
        if (max_tokens && (int64_t)max_tokens < n) n = (int64_t)max_tokens;
    } else if (!(m = cli_load_model(model, threads))) return 1;
    kvc_err err = {{0}};
    kvc_eval_report rep;
    memset(&rep, 0, sizeof rep);
    int status = 1;
    const kvc_backend *be = kvc_backend_find(device, &err);
    if (!be) {
        cli_error("eval", "%s", err.msg);
        goto done;
    }
    if (multi) {
        kvc_multi_opts mo = {chunk, clen, cont, samples, lens, n_len, depths, n_dep, trials, seed, n_facts, 8, isatty(2)};
        status = eval_multi(m, ids, n, rp, kp, np, set, &mo, be, csv, per_sample, text, threads);
        goto done;
    }
    kvc_eval_run_opts o = {text, repr, keep, set, ctx, chunk, clen, cont, samples, lens, n_len, depths, n_dep, trials,
                           seed, strcmp(pk_len_s, "1024,2048") != 0, threads, isatty(2), be};
    if (kvc_eval_run(m, ids, n, &o, &rep, &err)) {
        cli_error("eval", "%s", err.msg);
        goto done;
    }
    /* ---- report ---- */
    printf("model %s  cache %s  threads %d  device %s\n", m->hp.name, rep.cache, threads, be->name);
    if (set & (KVC_M_STREAM | KVC_M_CONTEXT))
        printf("text %s (%lld tokens)  stream: ctx %d chunk %d  context: N %d M %d samples %d\n", text, (long long)n,
               ctx, chunk, clen, cont, rep.context.n_units ? rep.context.n_units : samples);
    printf("%-8s %9s %9s %7s %8s %8s %6s %7s %6s %6s %8s %8s\n", "measure", "ppl", "ppl_full", "rise%", "KL_mean",
           "KL_p99", "top1", "B/tok", "x_f16", "kept%", "removed%", "tok/s");
    if (set & KVC_M_STREAM)
        print_row("stream", &rep.stream, rep.stream.n_tokens / rep.stream.seconds_cache);
    if (set & KVC_M_CONTEXT)
        print_row("context", &rep.context, rep.context.n_tokens / rep.context.seconds_cache);
    if (set & KVC_M_PASSKEY) {
        kvc_quality q = {.ppl = NAN, .ppl_full = NAN, .rise_pct = NAN, .kl_mean = NAN, .kl_p99 = NAN, .top1 = NAN,
                         .bytes_per_token = rep.pk.bytes_per_token, .compression = rep.pk.compression,
                         .kept_frac = rep.pk.kept_frac, .removed_frac = rep.pk.removed_frac};
        print_row("passkey", &q, rep.pk.seconds_cache > 0 ? rep.pk.n_tokens / rep.pk.seconds_cache : 0.0);
    }
    if (set & KVC_M_STREAM)
        printf("stream: %lld scored in %d windows; mean kept over scored positions %.1f%%; %.1f s in all\n",
               (long long)rep.stream.n_scored, rep.stream.n_units, 100 * rep.stream.kept_scored, rep.stream.seconds);
    const kvc_quality *qs[2] = {set & KVC_M_STREAM ? &rep.stream : NULL, set & KVC_M_CONTEXT ? &rep.context : NULL};
    for (int i = 0; i < 2; i++)
        if (qs[i] && isfinite(qs[i]->rise_lo))
            printf("%s: 95%% bootstrap intervals over the %s: rise [%+.2f%%, %+.2f%%], KL [%.2e, %.2e]\n",
                   i ? "context" : "stream", i ? "samples" : "windows", qs[i]->rise_lo, qs[i]->rise_hi, qs[i]->kl_lo,
                   qs[i]->kl_hi);
    if (set & KVC_M_CONTEXT)
        printf("context: %lld scored in %d samples; NLL %.4f (full %.4f); %.1f s in all\n",
               (long long)rep.context.n_scored, rep.context.n_units, rep.context.nll, rep.context.nll_full,
               rep.context.seconds);
    if (set & KVC_M_PASSKEY) print_passkey(&rep.pk, n_dep);
    status = 0;
    if (json && kvc_eval_report_json(json, &rep, &err)) status = (cli_error("eval", "%s", err.msg), 1);
done:
    kvc_eval_report_free(&rep);
    free(ids);
    kvc_model_free(m);
    return status;
}
