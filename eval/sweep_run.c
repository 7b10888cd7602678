/* sweep_run.c - running a sweep (`kvcodec sweep`): measures every point of a compression grid
 * (eval/sweep.c) with the protocols of DESIGN.md section 5 into a resumable results folder
 * (config.txt, results.csv fsynced per point, passkey.csv, results.json rebuilt atomically),
 * then prints the table and draws the figures. */
#include "kvc/sweep.h"

#include "kvc/eval.h"
#include "kvc/gguf.h"
#include "kvc/kvcache.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATH_CAP 4200

/* Creates dir and its parents (mode 0755). Returns 0 or -1 with err. */
static int mkdir_p(const char *dir, kvc_err *err) {
    char p[PATH_CAP];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s) continue;
        char c = *s;
        *s = '\0';
        if (mkdir(p, 0755) && errno != EEXIST) return kvc_fail(err, "cannot create '%s': %s", p, strerror(errno));
        *s = c;
        if (!c) break;
    }
    return 0;
}

/* The file name of a path without its folder and, when strip_ext, its last extension. */
static void path_stem(const char *path, int strip_ext, char *out, size_t size) {
    const char *b = strrchr(path, '/');
    if (snprintf(out, size, "%s", b ? b + 1 : path) >= (int)size) out[size - 1] = '\0'; /* a long name is cut */
    char *dot = strip_ext ? strrchr(out, '.') : NULL;
    if (dot && dot != out) *dot = '\0';
}

/* A short lowercase name of the model for folder names: GGUF general.basename and
 * general.size_label ("smollm2-135m"), else the file stem. */
static void model_slug(const kvc_model *m, const char *path, char *out, size_t size) {
    char base[64] = "", sz[32] = "";
    kvc_err e;
    if (!kvc_gguf_get_str(m->gguf, "general.basename", base, sizeof base, &e) && base[0]) {
        if (kvc_gguf_get_str(m->gguf, "general.size_label", sz, sizeof sz, &e)) sz[0] = '\0';
        snprintf(out, size, "%s%s%s", base, sz[0] ? "-" : "", sz);
    } else {
        path_stem(path, 1, out, size);
    }
    for (char *c = out; *c; c++) *c = isalnum((unsigned char)*c) || *c == '.' ? (char)tolower((unsigned char)*c) : '-';
}

/* The protocol part of the default folder name, e.g. "ctx512+64x8_stream512c32". */
static void protocol_tag(const sweep_grid *g, char *out, size_t size) {
    size_t o = 0;
    out[0] = '\0';
    for (int i = 0; i < g->n_protocol && o < size; i++) {
        const char *sep = i ? "_" : "";
        if (g->protocol[i] == SWEEP_CONTEXT)
            o += (size_t)snprintf(out + o, size - o, "%sctx%d+%dx%d", sep, g->context_len, g->continuation, g->samples);
        else if (g->protocol[i] == SWEEP_STREAM)
            o += (size_t)snprintf(out + o, size - o, "%sstream%dc%d", sep, g->ctx, g->chunk);
        else {
            o += (size_t)snprintf(out + o, size - o, "%spk", sep);
            for (int j = 0; j < g->n_pk_len && o < size; j++)
                o += (size_t)snprintf(out + o, size - o, "%s%d", j ? "-" : "", g->pk_len[j]);
            if (o < size) o += (size_t)snprintf(out + o, size - o, "x%d", g->trials);
        }
    }
    if (g->tokens && o < size) snprintf(out + o, size - o, "_tok%lld", g->tokens);
}

/* Writes the canonical grid to path through a temporary file and a rename. 0 or -1 with err. */
static int write_config(const char *path, const sweep_grid *g, kvc_err *err) {
    char tmp[PATH_CAP + 32];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return kvc_fail(err, "cannot write '%s': %s", tmp, strerror(errno));
    kvc_sweep_grid_write(g, f);
    int bad = ferror(f) | (fflush(f) != 0) | (fsync(fileno(f)) != 0);
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path)) {
        unlink(tmp);
        return kvc_fail(err, "cannot write '%s'", path);
    }
    return 0;
}

/* Rebuilds results.json from results.csv and passkey.csv. Returns 0 or -1 with err. */
static int rebuild_json(const char *dir, kvc_err *err) {
    char csv[PATH_CAP + 32], cells_p[PATH_CAP + 32], json[PATH_CAP + 32], cfg[PATH_CAP + 32];
    snprintf(csv, sizeof csv, "%s/results.csv", dir);
    snprintf(cells_p, sizeof cells_p, "%s/passkey.csv", dir);
    snprintf(json, sizeof json, "%s/results.json", dir);
    snprintf(cfg, sizeof cfg, "%s/config.txt", dir);
    sweep_table t;
    sweep_cell *cells = NULL;
    int nc = 0;
    int rc = kvc_sweep_csv_read(csv, &t, err);
    if (!rc && !(rc = kvc_sweep_cells_read(cells_p, &cells, &nc, err))) rc = kvc_sweep_json_write(json, &t, cells, nc, cfg, err);
    kvc_sweep_table_free(&t);
    free(cells);
    return rc;
}

/* What one point needs at run time. */
typedef struct {
    sweep_point pt;
    char desc[1500];     /* kvc_kvcache_describe: "repr=... keep=..." */
} planned;

#define SWEEP_MAX_PK_CELLS 4096

/* Settings shared by every measurement of one run. */
typedef struct {
    const kvc_model *m;
    const int32_t *ids;
    int64_t n;
    kvc_cache_shape shape;
    kvc_cache *ref;
    kvc_ref_store *store[SWEEP_N_PROTO]; /* the reference's logits, recorded by the first point */
    int *pk_full;        /* (cells) the full cache's passkey successes per cell, from the first
                            passkey point of this run (the prompts are the same for every point) */
    int *pk_n;           /* cells in pk_full; 0 until the first passkey point ran */
    const sweep_grid *g;
    const char *model_file, *corpus_file;
    const kvc_backend *backend;
} runner;

/* Fills the columns every row shares. */
static void row_common(sweep_row *r, const runner *R, const planned *p, int proto) {
    const char *k = strstr(p->desc, " keep=");
    char repr[600];
    snprintf(repr, sizeof repr, "%.*s", k ? (int)(k - p->desc - 5) : 0, p->desc + 5);
    kvc_sweep_row_set(r, COL_TOOL, "kvcodec");
    kvc_sweep_row_set(r, COL_METHOD, p->pt.method);
    kvc_sweep_row_set(r, COL_REPR, repr);
    kvc_sweep_row_set(r, COL_KEEP, k ? k + 6 : "");
    kvc_sweep_row_num(r, COL_BUDGET, "%.6g", p->pt.budget);
    kvc_sweep_row_num(r, COL_LATENT, "%.0f", p->pt.latent > 0 ? p->pt.latent : NAN);
    kvc_sweep_row_set(r, COL_PROTOCOL, kvc_sweep_protocol_name(proto));
    kvc_sweep_row_set(r, COL_MODEL, R->model_file);
    kvc_sweep_row_set(r, COL_CORPUS, proto == SWEEP_PASSKEY ? "" : R->corpus_file);
    for (int c = COL_CTX; c < SWEEP_N_COLS; c++)
        if (!r->f[c]) kvc_sweep_row_set(r, c, "");
}

/* Fills the quality and memory columns from a context or stream measurement. */
static void row_quality(sweep_row *r, const kvc_quality *q) {
    kvc_sweep_row_num(r, COL_SAMPLES, "%.0f", q->n_units);
    kvc_sweep_row_num(r, COL_N_SCORED, "%.0f", (double)q->n_scored);
    kvc_sweep_row_num(r, COL_NLL, "%.6g", q->nll);
    kvc_sweep_row_num(r, COL_PPL, "%.6g", q->ppl);
    kvc_sweep_row_num(r, COL_PPL_FULL, "%.6g", q->ppl_full);
    kvc_sweep_row_num(r, COL_PPL_RISE, "%.6g", q->rise_pct);
    kvc_sweep_row_num(r, COL_KL_MEAN, "%.6g", q->kl_mean);
    kvc_sweep_row_num(r, COL_KL_P99, "%.6g", q->kl_p99);
    kvc_sweep_row_num(r, COL_TOP1, "%.6g", q->top1);
    kvc_sweep_row_num(r, COL_KEPT, "%.6g", q->kept_frac);
    kvc_sweep_row_num(r, COL_REMOVED, "%.6g", q->removed_frac);
    kvc_sweep_row_num(r, COL_BPT, "%.6g", q->bytes_per_token);
    kvc_sweep_row_num(r, COL_RATIO, "%.6g", q->compression);
    kvc_sweep_row_num(r, COL_TOK_S, "%.6g", q->seconds_cache > 0 ? q->n_tokens / q->seconds_cache : NAN);
    kvc_sweep_row_num(r, COL_SECONDS, "%.3f", q->seconds);
    kvc_sweep_row_num(r, COL_RISE_LO, "%.6g", q->rise_lo);
    kvc_sweep_row_num(r, COL_RISE_HI, "%.6g", q->rise_hi);
    kvc_sweep_row_num(r, COL_KL_LO, "%.6g", q->kl_lo);
    kvc_sweep_row_num(r, COL_KL_HI, "%.6g", q->kl_hi);
}

/* Measures one point with one protocol into row r (and passkey cells into *cells, *n_cells
 * malloc'd). Returns 0 or -1 with err. */
static int measure(const runner *R, const planned *p, int proto, sweep_row *r, sweep_cell **cells, int *n_cells,
                   kvc_err *err) {
    const sweep_grid *g = R->g;
    kvc_cache *c = kvc_kvcache_new(&R->shape, p->pt.repr, p->pt.keep, R->m->fingerprint, err);
    if (!c) return -1;
    kvc_cache_set_backend(c, R->backend);
    kvc_measure_opts mo = {g->ctx, g->chunk, g->context_len, g->continuation, g->samples, 0, R->store[proto]};
    kvc_quality q;
    int rc = 0;
    memset(r, 0, sizeof *r);
    *cells = NULL, *n_cells = 0;
    if (proto == SWEEP_CONTEXT && !(rc = kvc_eval_context(R->m, c, R->ref, R->ids, R->n, &mo, &q, err))) {
        kvc_sweep_row_num(r, COL_CONTEXT_LEN, "%.0f", g->context_len);
        kvc_sweep_row_num(r, COL_CONTINUATION, "%.0f", g->continuation);
        row_quality(r, &q);
    } else if (proto == SWEEP_STREAM && !(rc = kvc_eval_stream(R->m, c, R->ref, R->ids, R->n, &mo, &q, err))) {
        kvc_sweep_row_num(r, COL_CTX, "%.0f", g->ctx);
        row_quality(r, &q);
    } else if (proto == SWEEP_PASSKEY) {
        kvc_passkey_opts po = {g->pk_len, g->n_pk_len, g->pk_depth, g->n_pk_depth, g->trials, g->seed, g->chunk, 8, 0};
        kvc_passkey_result pk;
        memset(&pk, 0, sizeof pk);
        /* the reference answers the same prompts at every point: run it once */
        const int have_full = *R->pk_n > 0;
        if (!(rc = kvc_eval_passkey(R->m, c, have_full ? NULL : R->ref, &po, &pk, err))) {
            if (!have_full && pk.n_cells <= SWEEP_MAX_PK_CELLS) {
                for (int i = 0; i < pk.n_cells; i++) R->pk_full[i] = pk.cells[i].correct_full;
                *R->pk_n = pk.n_cells;
            } else if (have_full && *R->pk_n == pk.n_cells) {
                pk.correct_full = 0;
                for (int i = 0; i < pk.n_cells; i++) pk.correct_full += pk.cells[i].correct_full = R->pk_full[i];
            }
            kvc_sweep_row_num(r, COL_SAMPLES, "%.0f", pk.trials);
            kvc_sweep_row_num(r, COL_KEPT, "%.6g", pk.kept_frac);
            kvc_sweep_row_num(r, COL_REMOVED, "%.6g", pk.removed_frac);
            kvc_sweep_row_num(r, COL_BPT, "%.6g", pk.bytes_per_token);
            kvc_sweep_row_num(r, COL_RATIO, "%.6g", pk.compression);
            kvc_sweep_row_num(r, COL_PASSKEY_ACC, "%.6g", pk.trials ? (double)pk.correct / pk.trials : NAN);
            kvc_sweep_row_num(r, COL_TOK_S, "%.6g", pk.seconds_cache > 0 ? pk.n_tokens / pk.seconds_cache : NAN);
            kvc_sweep_row_num(r, COL_SECONDS, "%.3f", pk.seconds);
            *cells = calloc((size_t)(pk.n_cells ? pk.n_cells : 1), sizeof **cells);
            if (!*cells) rc = kvc_fail(err, "out of memory");
            for (int i = 0; !rc && i < pk.n_cells; i++) {
                const kvc_passkey_cell *s = &pk.cells[i];
                (*cells)[i] = (sweep_cell){"", s->length, s->depth, s->skipped, s->trials, s->correct, s->correct_full};
            }
            if (!rc) *n_cells = pk.n_cells;
        }
        kvc_passkey_result_free(&pk);
    }
    kvc_cache_free(c);
    if (!rc) {
        row_common(r, R, p, proto);
        char key[1100];
        kvc_sweep_row_key(r, key, sizeof key);
        for (int i = 0; i < *n_cells; i++) snprintf((*cells)[i].key, sizeof (*cells)[i].key, "%s", key);
    } else {
        kvc_sweep_row_free(r);
        free(*cells);
        *cells = NULL;
    }
    return rc;
}

/* Checks every point before any work: builds its cache on the model's shape, sets each
 * protocol's budget, and records its canonical description. Duplicates (the same
 * description) are dropped. Returns 0 or -1 with err naming the point. */
static int validate(const runner *R, const sweep_point *pts, int n, planned **out, int *n_out, kvc_err *err) {
    const sweep_grid *g = R->g;
    int refs[SWEEP_N_PROTO + SWEEP_MAX_LIST], n_refs = 0;
    kvc_err e1 = {{0}};
    for (int i = 0; i < g->n_protocol; i++) {
        if (g->protocol[i] == SWEEP_CONTEXT) refs[n_refs++] = g->context_len;
        if (g->protocol[i] == SWEEP_STREAM) refs[n_refs++] = g->ctx;
        for (int j = 0; g->protocol[i] == SWEEP_PASSKEY && j < g->n_pk_len; j++) {
            kvc_passkey_prompt pp;
            if (kvc_passkey_build(R->m->tok, g->pk_len[j], 0.0, "12345", &pp, &e1))
                return kvc_fail(err, "passkey length %d: %s", g->pk_len[j], e1.msg);
            refs[n_refs++] = pp.n_context;
            kvc_passkey_prompt_free(&pp);
        }
    }
    planned *pl = calloc((size_t)n, sizeof *pl);
    if (!pl) return kvc_fail(err, "out of memory");
    int k = 0;
    for (int i = 0; i < n; i++) {
        kvc_cache *c = kvc_kvcache_new(&R->shape, pts[i].repr, pts[i].keep, R->m->fingerprint, &e1);
        int bad = !c;
        for (int j = 0; !bad && j < n_refs; j++) bad = kvc_cache_set_budget(c, refs[j], &e1) != 0;
        if (bad) {
            kvc_fail(err, "point %s | %s (%s): %s", pts[i].repr, pts[i].keep, pts[i].src, e1.msg);
            kvc_cache_free(c);
            free(pl);
            return -1;
        }
        int dup = 0;
        for (int j = 0; j < k && !dup; j++) dup = !strcmp(pl[j].desc, kvc_kvcache_describe(c));
        if (!dup) {
            pl[k].pt = pts[i];
            snprintf(pl[k].desc, sizeof pl[k].desc, "%s", kvc_kvcache_describe(c));
            k++;
        }
        kvc_cache_free(c);
    }
    *out = pl;
    *n_out = k;
    return 0;
}

/* Prints the final table of every row in the folder (all runs), protocol by protocol. */
static void print_table(FILE *out, const sweep_table *t) {
    fprintf(out, "\n%-8s %-28s %7s %9s %9s %7s %9s %7s %8s\n", "protocol", "method", "budget", "rise%", "KL", "top1", "B/tok",
           "x_f16", "passkey");
    for (int p = 0; p < SWEEP_N_PROTO; p++)
        for (int i = 0; i < t->n; i++) {
            const sweep_row *r = &t->rows[i];
            if (strcmp(r->f[COL_PROTOCOL], kvc_sweep_protocol_name(p))) continue;
            char c[6][24];
            const double v[6] = {kvc_sweep_cell_num(r, COL_PPL_RISE), kvc_sweep_cell_num(r, COL_KL_MEAN),
                                 kvc_sweep_cell_num(r, COL_TOP1), kvc_sweep_cell_num(r, COL_BPT), kvc_sweep_cell_num(r, COL_RATIO),
                                 kvc_sweep_cell_num(r, COL_PASSKEY_ACC)};
            const char *f[6] = {"%+.2f", "%.5f", "%.4f", "%.0f", "%.2f", "%.3f"};
            for (int j = 0; j < 6; j++) {
                if (isfinite(v[j])) snprintf(c[j], sizeof c[j], f[j], v[j]);
                else snprintf(c[j], sizeof c[j], "-");
            }
            fprintf(out, "%-8s %-28s %7s %9s %9s %7s %9s %7s %8s\n", r->f[COL_PROTOCOL], r->f[COL_METHOD], r->f[COL_BUDGET],
                   c[0], c[1], c[2], c[3], c[4], c[5]);
        }
}

/* Prints the table, draws pareto.png (and pareto_stream.png when both protocols ran) and the
 * passkey heatmaps; prints the paths, or one line when gnuplot is missing. Problems drawing
 * are reported on stderr (the results are complete without plots). */
static void draw_plots(FILE *out, const char *dir, const sweep_table *peers) {
    char csv[PATH_CAP + 32], cells_p[PATH_CAP + 32];
    snprintf(csv, sizeof csv, "%s/results.csv", dir);
    snprintf(cells_p, sizeof cells_p, "%s/passkey.csv", dir);
    sweep_table t;
    sweep_cell *cells = NULL;
    int nc = 0;
    kvc_err err = {{0}};
    if (kvc_sweep_csv_read(csv, &t, &err) || kvc_sweep_cells_read(cells_p, &cells, &nc, &err)) {
        fprintf(stderr, "kvcodec sweep: %s\n", err.msg);
        return;
    }
    print_table(out, &t);
    if (!kvc_sweep_gnuplot_terminal()) {
        fprintf(out, "\nno plots: gnuplot with a png terminal was not found (install gnuplot-nox; "
               "scripts/setup.sh does); %s and results.json are complete\n", csv);
    } else {
        const char *protos[2] = {"context", "stream"};
        int first = 1;
        for (int i = 0; i < 2; i++) {
            char gp[PATH_CAP + 32], png[PATH_CAP + 32];
            snprintf(gp, sizeof gp, "%s/%s.gp", dir, first ? "pareto" : "pareto_stream");
            snprintf(png, sizeof png, "%s/%s.png", dir, first ? "pareto" : "pareto_stream");
            int rc = kvc_sweep_plot_pareto(&t, peers, protos[i], gp, png, &err);
            if (rc < 0) fprintf(stderr, "kvcodec sweep: %s\n", err.msg);
            else if (rc == 0) fprintf(out, "%s %s (%s protocol)\n", first ? "\nplots:" : "      ", png, protos[i]), first = 0;
        }
        char *paths[64];
        int n = kvc_sweep_plot_passkey(&t, cells, nc, dir, paths, 64, &err);
        if (n < 0) fprintf(stderr, "kvcodec sweep: %s\n", err.msg);
        for (int i = 0; i < n; i++) fprintf(out, "%s %s\n", first ? "\nplots:" : "      ", paths[i]), first = 0, free(paths[i]);
    }
    kvc_sweep_table_free(&t);
    free(cells);
}

/* Reads the --peers files (';'-separated) into one table. Returns 0 or -1 with err. */
static int read_peers(const char *list, sweep_table *peers, kvc_err *err) {
    memset(peers, 0, sizeof *peers);
    char buf[PATH_CAP];
    snprintf(buf, sizeof buf, "%s", list ? list : "");
    kvc_err e1 = {{0}};
    for (char *save = NULL, *p = strtok_r(buf, ";", &save); p; p = strtok_r(NULL, ";", &save)) {
        sweep_table t;
        if (access(p, R_OK)) return kvc_fail(err, "--peers: cannot read '%s': %s", p, strerror(errno));
        if (kvc_sweep_csv_read(p, &t, &e1)) return kvc_fail(err, "--peers: %s", e1.msg);
        for (int i = 0; i < t.n; i++)
            if (kvc_sweep_table_add(peers, &t.rows[i])) return kvc_fail(err, "out of memory");
        kvc_sweep_table_free(&t);
    }
    return 0;
}

int kvc_sweep_run(sweep_grid *g, const kvc_model *m, const int32_t *ids, int64_t n_ids, const char *sha,
                  const kvc_sweep_run_opts *o, kvc_err *err) {
    FILE *out = o->out ? o->out : stdout;
    sweep_point *pts = NULL;
    planned *pl = NULL;
    int n_pts = 0, n_pl = 0, status = -1;
    kvc_cache *ref = NULL;
    kvc_ref_store *stores[SWEEP_N_PROTO] = {0};
    sweep_table peers = {0}, done_t = {0};
    if (!sha) sha = "";
    if (kvc_sweep_expand(g, &pts, &n_pts, err)) goto done;
    if (read_peers(o->peers, &peers, err)) goto done;
    int uses_text = kvc_sweep_uses_text(g), need = 0;
    if (uses_text && g->tokens && g->tokens < n_ids) n_ids = g->tokens;
    if (g->fingerprint[0] && strcmp(g->fingerprint, m->fingerprint)) {
        kvc_fail(err, "the grid asks for model fingerprint %s, %s has %s", g->fingerprint, g->model, m->fingerprint);
        goto done;
    }
    if (g->corpus_sha256[0] && uses_text && strcmp(g->corpus_sha256, sha)) {
        kvc_fail(err, "the grid asks for corpus sha256 %.12s..., %s has %.12s...", g->corpus_sha256, g->text, sha);
        goto done;
    }
    snprintf(g->fingerprint, sizeof g->fingerprint, "%s", m->fingerprint);
    snprintf(g->corpus_sha256, sizeof g->corpus_sha256, "%s", sha);
    const int ctx_train = m->hp.n_ctx_train;
    for (int i = 0; i < g->n_protocol; i++) {
        int p = g->protocol[i], len = p == SWEEP_CONTEXT ? g->context_len + g->continuation : p == SWEEP_STREAM ? g->ctx : 0;
        for (int j = 0; p == SWEEP_PASSKEY && j < g->n_pk_len; j++)
            if (g->pk_len[j] + 8 > len) len = g->pk_len[j] + 8;
        if (len > ctx_train) {
            kvc_fail(err, "%s protocol needs %d tokens, more than the model's context of %d", kvc_sweep_protocol_name(p),
                     len, ctx_train);
            goto done;
        }
        if (p == SWEEP_CONTEXT && n_ids < g->context_len + g->continuation) {
            kvc_fail(err, "%s has %lld tokens: too few for one context sample of %d + %d", g->text,
                     (long long)n_ids, g->context_len, g->continuation);
            goto done;
        }
        if (len > need) need = len;
    }
    char model_file[256], corpus_file[256], slug[128], stem[128], tag[256];
    path_stem(g->model, 0, model_file, sizeof model_file);
    path_stem(g->text, 0, corpus_file, sizeof corpus_file);
    static int pk_full[SWEEP_MAX_PK_CELLS];
    int pk_n = 0;
    runner R = {.m = m, .ids = ids, .n = n_ids, .shape = kvc_model_cache_shape(m, need), .ref = NULL, .g = g,
                .model_file = model_file, .corpus_file = corpus_file, .pk_full = pk_full, .pk_n = &pk_n, .backend = o->backend};
    if (validate(&R, pts, n_pts, &pl, &n_pl, err)) goto done;

    /* ---- the results folder ---- */
    char dir[PATH_CAP], cfg[PATH_CAP + 16], csv[PATH_CAP + 16], cells_p[PATH_CAP + 16];
    model_slug(m, g->model, slug, sizeof slug);
    path_stem(g->text, 1, stem, sizeof stem);
    protocol_tag(g, tag, sizeof tag);
    if (o->out_dir) snprintf(dir, sizeof dir, "%s", o->out_dir);
    else snprintf(dir, sizeof dir, "out/sweeps/%s_%s_%s", slug, uses_text ? stem : "passkey", tag);
    snprintf(cfg, sizeof cfg, "%s/config.txt", dir);
    snprintf(csv, sizeof csv, "%s/results.csv", dir);
    snprintf(cells_p, sizeof cells_p, "%s/passkey.csv", dir);
    const int had_cfg = access(cfg, F_OK) == 0, had_csv = access(csv, F_OK) == 0;
    if (had_cfg || had_csv) {
        sweep_grid saved;
        kvc_sweep_grid_init(&saved);
        int differs = !had_cfg;
        kvc_err why = {{0}};
        if (!had_cfg) snprintf(why.msg, sizeof why.msg, "it has results.csv but no config.txt");
        else if (kvc_sweep_grid_load(&saved, cfg, &why)) differs = 1;
        else differs = kvc_sweep_grid_compare(&saved, g, &why) != 0;
        kvc_sweep_grid_free(&saved);
        if (differs && !o->force) {
            kvc_fail(err, "%s holds a sweep with a different config (%s): pick another --out, or pass --force "
                     "to start it over", dir, why.msg);
            goto done;
        }
        if (differs && !o->dry_run) {
            fprintf(out, "--force: starting %s over (%s)\n", dir, why.msg);
            const char *old[3] = {"results.csv", "passkey.csv", "results.json"};
            for (int i = 0; i < 3; i++) {
                char p[PATH_CAP + 16];
                snprintf(p, sizeof p, "%s/%s", dir, old[i]);
                if (unlink(p) && errno != ENOENT) {
                    kvc_fail(err, "cannot remove '%s': %s", p, strerror(errno));
                    goto done;
                }
            }
        }
    }
    if (kvc_sweep_csv_read(csv, &done_t, err)) goto done;
    /* which (point, protocol) pairs are already in the CSV */
    const int total = n_pl * g->n_protocol;
    char *is_done = calloc((size_t)(total > 0 ? total : 1), 1);
    if (!is_done) {
        kvc_fail(err, "out of memory");
        goto done;
    }
    int n_done = 0;
    for (int i = 0; i < n_pl; i++)
        for (int j = 0; j < g->n_protocol; j++) {
            char want[1200], key[1100];
            snprintf(want, sizeof want, "%s %s", kvc_sweep_protocol_name(g->protocol[j]), pl[i].desc);
            for (int r = 0; r < done_t.n && !is_done[i * g->n_protocol + j]; r++) {
                kvc_sweep_row_key(&done_t.rows[r], key, sizeof key);
                is_done[i * g->n_protocol + j] = !strcmp(key, want);
            }
            n_done += is_done[i * g->n_protocol + j];
        }
    if (o->dry_run) {
        fprintf(out, "%d points x %d protocols = %d measurements (%d already in %s)\n", n_pl, g->n_protocol, total, n_done, csv);
        for (int i = 0; i < n_pl; i++)
            fprintf(out, "%-24s budget %-7g %s  [%s]\n", pl[i].pt.method, pl[i].pt.budget, pl[i].desc, pl[i].pt.src);
        fprintf(out, "folder: %s\n", dir);
        status = 0;
        free(is_done);
        goto done;
    }
    if (mkdir_p(dir, err) || write_config(cfg, g, err)) {
        free(is_done);
        goto done;
    }
    fprintf(out, "sweep: %d points x %d protocols = %d measurements into %s (model %s, %d threads)\n", n_pl,
            g->n_protocol, total, dir, m->hp.name, o->threads);
    if (n_done) fprintf(out, "skipping %d finished point%s already in %s\n", n_done, n_done == 1 ? "" : "s", csv);
    fflush(out);

    /* ---- measure ---- */
    if (!(R.ref = ref = kvc_cache_full_new(&R.shape, err))) {
        free(is_done);
        goto done;
    }
    kvc_cache_set_backend(ref, o->backend);
    /* the full-cache reference is the same for every point: run it once per protocol and
     * replay its logits (up to 2 GiB each; more runs it in lockstep as before) */
    for (int j = 0; j < SWEEP_N_PROTO; j++)
        R.store[j] = stores[j] = j == SWEEP_PASSKEY ? NULL : kvc_ref_store_new((size_t)2 << 30);
    const int tty = o->progress;
    double t0 = kvc_now(), spent[SWEEP_N_PROTO] = {0};
    int ran[SWEEP_N_PROTO] = {0}, k = 0, todo = total - n_done, failed = 0;
    for (int i = 0; i < n_pl && !failed; i++)
        for (int j = 0; j < g->n_protocol && !failed; j++) {
            if (is_done[i * g->n_protocol + j]) continue;
            const int proto = g->protocol[j];
            if (tty) kvc_progress_draw("sweep", k, todo, "pt", t0);
            sweep_row row;
            sweep_cell *cells = NULL;
            int n_cells = 0;
            double ts = kvc_now();
            kvc_err e1 = {{0}};
            if (measure(&R, &pl[i], proto, &row, &cells, &n_cells, &e1)) {
                if (tty) kvc_progress_end();
                kvc_fail(err, "%s %s: %s", kvc_sweep_protocol_name(proto), pl[i].desc, e1.msg);
                failed = 1;
                break;
            }
            /* the cells first: a kill between the two leaves cells without a row, which are
             * replaced when the point is redone; a row never lacks its cells */
            if (kvc_sweep_cells_append(cells_p, cells, n_cells, err) || kvc_sweep_csv_append(csv, &row, err)) failed = 1;
            free(cells);
            if (failed) {
                kvc_sweep_row_free(&row);
                break;
            }
            spent[proto] += kvc_now() - ts, ran[proto]++, k++;
            if (o->stop_after > 0 && k >= o->stop_after) { /* tests: stop as if killed here */
                kvc_sweep_row_free(&row);
                free(is_done);
                status = 3;
                goto done;
            }
            if (rebuild_json(dir, &e1)) fprintf(stderr, "kvcodec sweep: %s\n", e1.msg);
            /* ETA: the mean time of each protocol so far times what is left of it */
            double eta = 0, mean_all = (kvc_now() - t0) / k;
            for (int a = i; a < n_pl; a++)
                for (int b = 0; b < g->n_protocol; b++) {
                    int p = g->protocol[b];
                    if ((a == i && b <= j) || is_done[a * g->n_protocol + b]) continue;
                    eta += ran[p] ? spent[p] / ran[p] : mean_all;
                }
            if (tty) fputc('\r', stderr), fprintf(stderr, "%-100s\r", ""), fflush(stderr);
            fprintf(out, "[%d/%d] %-7s %-24s budget %-6s ", k, todo, kvc_sweep_protocol_name(proto), pl[i].pt.method,
                   row.f[COL_BUDGET]);
            if (proto == SWEEP_PASSKEY) fprintf(out, "passkey acc %.3f", kvc_sweep_cell_num(&row, COL_PASSKEY_ACC));
            else fprintf(out, "rise %+8.2f%%  KL %.4f  top1 %.3f", kvc_sweep_cell_num(&row, COL_PPL_RISE),
                        kvc_sweep_cell_num(&row, COL_KL_MEAN), kvc_sweep_cell_num(&row, COL_TOP1));
            fprintf(out, "  %7.0f B/tok  x%.2f  %6.1f s  ETA %02d:%02d\n", kvc_sweep_cell_num(&row, COL_BPT),
                   kvc_sweep_cell_num(&row, COL_RATIO), kvc_now() - ts, (int)eta / 60, (int)eta % 60);
            fflush(out);
            kvc_sweep_row_free(&row);
        }
    if (tty && k) kvc_progress_draw("sweep", k, todo, "pt", t0), kvc_progress_end();
    free(is_done);
    if (failed) { /* err says which point; the finished rows still get their JSON and plots */
        kvc_err e2 = {{0}};
        if (rebuild_json(dir, &e2)) fprintf(stderr, "kvcodec sweep: %s\n", e2.msg);
        else draw_plots(out, dir, &peers);
        status = 1;
        goto done;
    }
    if (rebuild_json(dir, err)) goto done;
    draw_plots(out, dir, &peers);
    fprintf(out, "results: %s/results.csv, %s/results.json\n", dir, dir);
    status = 0;
done:
    kvc_cache_free(ref);
    for (int j = 0; j < SWEEP_N_PROTO; j++) kvc_ref_store_free(stores[j]);
    kvc_sweep_table_free(&done_t);
    kvc_sweep_table_free(&peers);
    free(pl);
    free(pts);
    return status;
}

int kvc_sweep_uses_text(const sweep_grid *g) {
    int uses = 0;
    for (int i = 0; i < g->n_protocol; i++) uses |= g->protocol[i] != SWEEP_PASSKEY;
    return uses;
}
