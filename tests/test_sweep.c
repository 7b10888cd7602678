/* test_sweep.c - `kvcodec sweep`: grid files and flags expand into the expected points ({R}
 * per latent, budgets per evicting policy, explicit points, unique labels); bad lines fail
 * naming the line; results.csv and results.json agree cell for cell; a sweep killed after
 * its first point resumes without redoing it; a folder with another config is refused. */
#include <criterion/criterion.h>
#include <sys/types.h>
#include <signal.h>
#include <time.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvc/sweep.h"

/* ============================================================== small helpers ==== */

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "cannot write %s", path);
    fputs(text, f);
    fclose(f);
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    size_t got = fread(b, 1, (size_t)n, f);
    b[got] = '\0';
    fclose(f);
    return b;
}

/* Loads grid text (written to a temporary file) and expands it. Returns 0 or -1 (err). */
static int load_expand(const char *text, sweep_grid *g, sweep_point **pts, int *n, kvc_err *err, char *path) {
    snprintf(path, 64, "/tmp/kvc_sweep_grid.%d", (int)getpid());
    write_text(path, text);
    kvc_sweep_grid_init(g);
    int rc = kvc_sweep_grid_load(g, path, err);
    if (!rc) rc = kvc_sweep_expand(g, pts, n, err);
    unlink(path);
    return rc;
}

/* Index of the point with this repr and keep, or -1. */
static int find_point(const sweep_point *p, int n, const char *repr, const char *keep) {
    for (int i = 0; i < n; i++)
        if (!strcmp(p[i].repr, repr) && !strcmp(p[i].keep, keep)) return i;
    return -1;
}

/* =================================================================== grid ==== */

Test(sweep, grid_file_expands_the_cross_product_latents_and_points) {
    const char *text = "# a test grid\n"
                       "repr f16\n"
                       "repr ae:checkpoints/smollm2-135m-ae{R}.h5,int8\n"
                       "keep full\n"
                       "keep lsh:bits=16   # SimHash eviction\n"
                       "keep h2o\n"
                       "budget 0.5 0.25 0.125\n"
                       "latent 16 32\n"
                       "point int8 | lsh:bits=16,budget=0.1\n"
                       "point int4 | streaming\n"
                       "point f16 | h2o:budget=0.5\n" /* already in the cross product: dropped */
                       "protocol context stream\n"
                       "context_len 64\n";
    sweep_grid g;
    sweep_point *p = NULL;
    int n = 0;
    kvc_err err = {{0}};
    char path[64];
    cr_assert_eq(load_expand(text, &g, &p, &n, &err, path), 0, "%s", err.msg);
    /* 3 reprs (f16, ae16, ae32) x (full once + lsh x 3 + h2o x 3) + 1 + 3 streaming budgets */
    cr_assert_eq(n, 3 * 7 + 1 + 3, "points: %d", n);
    cr_expect_eq(g.n_protocol, 2);
    cr_expect_eq(g.protocol[0], SWEEP_CONTEXT);
    cr_expect_eq(g.protocol[1], SWEEP_STREAM);
    cr_expect_eq(g.context_len, 64);
    cr_expect_eq(g.continuation, 64, "defaults stay");
    cr_expect_str_eq(p[0].repr, "f16");
    cr_expect_str_eq(p[0].keep, "full");
    cr_expect_str_eq(p[0].method, "f16+full");
    cr_expect_float_eq(p[0].budget, 1.0, 1e-12);
    int i = find_point(p, n, "ae:checkpoints/smollm2-135m-ae16.h5,int8", "lsh:bits=16,budget=0.25");
    cr_assert_geq(i, 0, "{R} = 16 with lsh at 0.25 missing");
    cr_expect_eq(p[i].latent, 16);
    cr_expect_str_eq(p[i].method, "ae16-int8+lsh");
    cr_expect_str_eq(p[i].keep_base, "lsh:bits=16");
    cr_expect_float_eq(p[i].budget, 0.25, 1e-12);
    i = find_point(p, n, "ae:checkpoints/smollm2-135m-ae32.h5,int8", "h2o:budget=0.125");
    cr_assert_geq(i, 0);
    cr_expect_str_eq(p[i].method, "ae32-int8+h2o");
    cr_expect_geq(find_point(p, n, "ae:checkpoints/smollm2-135m-ae32.h5,int8", "full"), 0);
    /* no {R} is left anywhere, and ae16 points come before ae32 points */
    for (int k = 0; k < n; k++) cr_expect_null(strstr(p[k].repr, "{R}"), "%s", p[k].repr);
    cr_expect_lt(find_point(p, n, "ae:checkpoints/smollm2-135m-ae16.h5,int8", "h2o:budget=0.125"),
                 find_point(p, n, "ae:checkpoints/smollm2-135m-ae32.h5,int8", "full"));
    /* explicit points: a given budget is kept as is, a missing one expands */
    i = find_point(p, n, "int8", "lsh:bits=16,budget=0.1");
    cr_assert_geq(i, 0);
    cr_expect_float_eq(p[i].budget, 0.1, 1e-12);
    cr_expect_str_eq(p[i].keep_base, "lsh:bits=16");
    cr_expect_str_eq(p[i].method, "int8+lsh");
    cr_expect_not_null(strstr(p[i].src, ":9"), "point from line 9: %s", p[i].src);
    cr_expect_geq(find_point(p, n, "int4", "streaming:budget=0.125"), 0);
    free(p);
    /* flags replace lists: ';' between specs, commas inside them survive */
    cr_assert_eq(kvc_sweep_grid_set(&g, "repr", "int8:group=32;f16", 1, "--repr", &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_sweep_grid_set(&g, "keep", "full;lsh:bits=8,probe=query", 1, "--keep", &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_sweep_grid_set(&g, "budgets", "0.5,0.25", 1, "--budgets", &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_sweep_grid_set(&g, "points", "", 1, "--points", &err), -1, "an empty point list item is an error");
    g.n_point = 0;
    cr_assert_eq(kvc_sweep_expand(&g, &p, &n, &err), 0, "%s", err.msg);
    cr_expect_eq(n, 2 * (1 + 2), "points: %d", n);
    cr_expect_geq(find_point(p, n, "int8:group=32", "lsh:bits=8,probe=query,budget=0.25"), 0);
    free(p);
    kvc_sweep_grid_free(&g);
}

Test(sweep, same_label_for_different_configs_is_spelled_out) {
    const char *text = "repr f16\nkeep lsh:bits=8\nkeep lsh:bits=16\nkeep h2o\nbudget 0.5\n";
    sweep_grid g;
    sweep_point *p = NULL;
    int n = 0;
    kvc_err err = {{0}};
    char path[64];
    cr_assert_eq(load_expand(text, &g, &p, &n, &err, path), 0, "%s", err.msg);
    cr_assert_eq(n, 3);
    cr_expect_str_eq(p[0].method, "f16+lsh:bits=8");
    cr_expect_str_eq(p[1].method, "f16+lsh:bits=16");
    cr_expect_str_eq(p[2].method, "f16+h2o", "an unambiguous label stays short");
    free(p);
    kvc_sweep_grid_free(&g);
}

Test(sweep, bad_grid_lines_fail_naming_the_line) {
    const struct {
        const char *text, *needle;
    } cases[] = {
        {"repr f16\nbogus 1\n", ":2: unknown key 'bogus'"},
        {"repr f16\nkeep h2o:budget=0.5\nbudget 0.5\n", "take no budget="},
        {"repr ae:x{R}.h5\nkeep full\n", "no latent sizes"},
        {"budget 0.5 1.5\n", ":1: budget: 1.5 is out of range"},
        {"budget 0\n", "out of range"},
        {"repr f16\nkeep nosuch\n", ":2: unknown retention policy 'nosuch'"},
        {"repr f17\nkeep full\n", ":1: unknown representation 'f17'"},
        {"repr f16\nkeep h2o\n", "no budgets"},
        {"point f16 streaming\n", ":1: a point is 'REPR | KEEP'"},
        {"protocol context ctx\n", "unknown protocol 'ctx'"},
        {"context_len abc\n", "not a list of numbers"},
        {"samples 0\n", "out of range"},
        {"repr f16\n", "no keep specs"},
        {"# nothing\n", "no points"},
        {"latent\n", "has no value"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        sweep_grid g;
        sweep_point *p = NULL;
        int n = 0;
        kvc_err err = {{0}};
        char path[64];
        cr_expect_eq(load_expand(cases[c].text, &g, &p, &n, &err, path), -1, "case %zu accepted: %s", c, cases[c].text);
        cr_expect_not_null(strstr(err.msg, cases[c].needle), "case %zu: '%s' lacks '%s'", c, err.msg, cases[c].needle);
        free(p);
        kvc_sweep_grid_free(&g);
    }
}

Test(sweep, canonical_config_reloads_equal_and_differences_are_named) {
    sweep_grid a, b;
    kvc_sweep_grid_init(&a);
    kvc_err err = {{0}};
    cr_assert_eq(kvc_sweep_grid_set(&a, "repr", "f16;ae:c{R}.h5,int8", 1, "--repr", &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_sweep_grid_set(&a, "passkey_depths", "0 0.3 1", 0, "x:1", &err), 0, "%s", err.msg);
    snprintf(a.fingerprint, sizeof a.fingerprint, "0123456789abcdef");
    char path[64];
    snprintf(path, sizeof path, "/tmp/kvc_sweep_cfg.%d", (int)getpid());
    FILE *f = fopen(path, "w");
    kvc_sweep_grid_write(&a, f);
    fclose(f);
    kvc_sweep_grid_init(&b);
    cr_assert_eq(kvc_sweep_grid_load(&b, path, &err), 0, "%s", err.msg);
    cr_expect_eq(kvc_sweep_grid_compare(&b, &a, &err), 0, "%s", err.msg);
    cr_expect_eq(b.n_repr, 2);
    cr_expect_str_eq(b.repr[1].repr, "ae:c{R}.h5,int8");
    cr_expect_float_eq(b.pk_depth[1], 0.3, 0, "depths written exactly");
    b.continuation = 16;
    cr_expect_eq(kvc_sweep_grid_compare(&b, &a, &err), 1);
    cr_expect_str_eq(err.msg, "continuation 16 there, 64 here", "%s", err.msg);
    unlink(path);
    kvc_sweep_grid_free(&a);
    kvc_sweep_grid_free(&b);
}

/* ========================================================= a tiny JSON reader ==== */

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype;
typedef struct jval {
    jtype t;
    double num;
    char *str;          /* J_STR */
    struct jval *items; /* J_ARR, J_OBJ (values) */
    char **keys;        /* J_OBJ */
    int n;
} jval;

static const char *jp;

static void jskip(void) {
    while (isspace((unsigned char)*jp)) jp++;
}

/* Parses one JSON value at jp (strict enough for these files). Returns 0 or -1. */
static int jparse(jval *v) {
    memset(v, 0, sizeof *v);
    jskip();
    if (*jp == '"') {
        size_t cap = 64, n = 0;
        v->t = J_STR;
        v->str = malloc(cap);
        for (jp++; *jp != '"'; jp++) {
            if (!*jp) return -1;
            char c = *jp;
            if (c == '\\') {
                jp++;
                c = *jp == 'n' ? '\n' : *jp == 't' ? '\t' : *jp;
                if (*jp == 'u') return -1; /* not produced for these texts */
            }
            if (n + 2 > cap) v->str = realloc(v->str, cap *= 2);
            v->str[n++] = c;
        }
        jp++;
        v->str[n] = '\0';
        return 0;
    }
    if (*jp == '[' || *jp == '{') {
        const int obj = *jp == '{';
        v->t = obj ? J_OBJ : J_ARR;
        jp++;
        jskip();
        if (*jp == (obj ? '}' : ']')) return jp++, 0;
        for (;;) {
            v->items = realloc(v->items, (size_t)(v->n + 1) * sizeof *v->items);
            if (obj) {
                jval k;
                v->keys = realloc(v->keys, (size_t)(v->n + 1) * sizeof *v->keys);
                if (jparse(&k) || k.t != J_STR) return -1;
                v->keys[v->n] = k.str;
                jskip();
                if (*jp++ != ':') return -1;
            }
            if (jparse(&v->items[v->n])) return -1;
            v->n++;
            jskip();
            if (*jp == ',') {
                jp++;
                continue;
            }
            if (*jp++ != (obj ? '}' : ']')) return -1;
            return 0;
        }
    }
    if (!strncmp(jp, "null", 4)) return jp += 4, v->t = J_NULL, 0;
    if (!strncmp(jp, "true", 4)) return jp += 4, v->t = J_BOOL, v->num = 1, 0;
    if (!strncmp(jp, "false", 5)) return jp += 5, v->t = J_BOOL, 0;
    char *end;
    v->num = strtod(jp, &end);
    if (end == jp) return -1;
    v->t = J_NUM;
    jp = end;
    return 0;
}

static void jfree(jval *v) {
    for (int i = 0; i < v->n; i++) {
        jfree(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->str);
}

static const jval *jget(const jval *o, const char *key) {
    for (int i = 0; o->t == J_OBJ && i < o->n; i++)
        if (!strcmp(o->keys[i], key)) return &o->items[i];
    return NULL;
}

/* Checks that results.json (path) holds exactly the rows of results.csv, cell for cell:
 * empty <-> null, numbers equal as parsed, text equal. Returns the rows compared. */
static int expect_json_matches_csv(const char *csv, const char *json) {
    sweep_table t;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_sweep_csv_read(csv, &t, &err), 0, "%s", err.msg);
    char *text = slurp(json);
    cr_assert_not_null(text, "%s missing", json);
    jval root;
    jp = text;
    cr_assert_eq(jparse(&root), 0, "%s does not parse near '%.40s'", json, jp);
    jskip();
    cr_expect_eq(*jp, '\0', "trailing text in %s", json);
    const jval *rows = jget(&root, "rows");
    cr_assert(rows && rows->t == J_ARR);
    cr_assert_eq(rows->n, t.n, "json %d rows, csv %d", rows->n, t.n);
    for (int i = 0; i < t.n; i++) {
        const jval *o = &rows->items[i];
        for (int c = 0; c < SWEEP_N_COLS; c++) {
            const char *cell = t.rows[i].f[c];
            const jval *v = jget(o, KVC_SWEEP_COLUMNS[c]);
            cr_assert_not_null(v, "row %d lacks %s", i, KVC_SWEEP_COLUMNS[c]);
            if (!*cell) cr_expect_eq(v->t, J_NULL, "row %d %s: empty cell, json type %d", i, KVC_SWEEP_COLUMNS[c], v->t);
            else if (v->t == J_NUM) cr_expect_eq(v->num, strtod(cell, NULL), "row %d %s: %s vs %.17g", i, KVC_SWEEP_COLUMNS[c], cell, v->num);
            else if (v->t == J_STR) cr_expect_str_eq(v->str, cell, "row %d %s", i, KVC_SWEEP_COLUMNS[c]);
            else cr_expect_fail("row %d %s: unexpected json type %d", i, KVC_SWEEP_COLUMNS[c], v->t);
        }
    }
    int n = t.n;
    jfree(&root);
    free(text);
    kvc_sweep_table_free(&t);
    return n;
}

/* ============================================================ CSV and JSON ==== */

Test(sweep, csv_and_json_agree_and_a_cut_line_is_dropped) {
    char dir[64], csv[96], json[96], cells_p[96];
    snprintf(dir, sizeof dir, "/tmp/kvc_sweep_io.%d", (int)getpid());
    mkdir(dir, 0755);
    snprintf(csv, sizeof csv, "%s/results.csv", dir);
    snprintf(json, sizeof json, "%s/results.json", dir);
    snprintf(cells_p, sizeof cells_p, "%s/passkey.csv", dir);
    unlink(csv), unlink(json), unlink(cells_p);
    kvc_err err = {{0}};
    for (int i = 0; i < 3; i++) {
        sweep_row r = {{0}};
        for (int c = 0; c < SWEEP_N_COLS; c++) kvc_sweep_row_set(&r, c, "");
        kvc_sweep_row_set(&r, COL_TOOL, "kvcodec");
        kvc_sweep_row_set(&r, COL_METHOD, i == 2 ? "odd \"quoted\", method" : "int8+lsh");
        kvc_sweep_row_set(&r, COL_REPR, "ae:c.h5,int8,group=32");
        kvc_sweep_row_set(&r, COL_KEEP, "lsh:budget=0.25,bits=16");
        kvc_sweep_row_set(&r, COL_PROTOCOL, i == 1 ? "passkey" : "context");
        kvc_sweep_row_num(&r, COL_BUDGET, "%.6g", 0.25);
        kvc_sweep_row_num(&r, COL_NLL, "%.6g", 3.14159265 * (i + 1));
        kvc_sweep_row_num(&r, COL_KL_MEAN, "%.6g", 1.5e-7);
        kvc_sweep_row_num(&r, COL_PPL, "%.6g", NAN); /* empty */
        kvc_sweep_row_num(&r, COL_PASSKEY_ACC, "%.6g", i == 1 ? 2.0 / 3 : NAN);
        cr_assert_eq(kvc_sweep_csv_append(csv, &r, &err), 0, "%s", err.msg);
        if (i == 1) {
            sweep_cell c[2] = {{"", 128, 0.5, 0, 3, 2, 3}, {"", 256, 1, 1, 0, 0, 0}};
            kvc_sweep_row_key(&r, c[0].key, sizeof c[0].key);
            kvc_sweep_row_key(&r, c[1].key, sizeof c[1].key);
            cr_assert_eq(kvc_sweep_cells_append(cells_p, c, 2, &err), 0, "%s", err.msg);
        }
        kvc_sweep_row_free(&r);
    }
    /* a write cut short by a kill: no newline at the end */
    FILE *f = fopen(csv, "a");
    fputs("kvcodec,cut,\"ae:c.h5", f);
    fclose(f);
    sweep_table t;
    cr_assert_eq(kvc_sweep_csv_read(csv, &t, &err), 0, "%s", err.msg);
    cr_expect_eq(t.n, 3, "the cut line is ignored");
    cr_expect_str_eq(t.rows[2].f[COL_METHOD], "odd \"quoted\", method");
    cr_expect_str_eq(t.rows[0].f[COL_REPR], "ae:c.h5,int8,group=32");
    cr_expect_str_eq(t.rows[0].f[COL_PPL], "");
    char key[1100];
    kvc_sweep_row_key(&t.rows[1], key, sizeof key);
    cr_expect_str_eq(key, "passkey repr=ae:c.h5,int8,group=32 keep=lsh:budget=0.25,bits=16");
    sweep_cell *cells = NULL;
    int nc = 0;
    cr_assert_eq(kvc_sweep_cells_read(cells_p, &cells, &nc, &err), 0, "%s", err.msg);
    cr_assert_eq(nc, 2);
    cr_expect_eq(cells[0].correct, 2);
    cr_expect_eq(cells[1].skipped, 1);
    cr_assert_eq(kvc_sweep_json_write(json, &t, cells, nc, NULL, &err), 0, "%s", err.msg);
    cr_expect_eq(expect_json_matches_csv(csv, json), 3);
    /* the passkey row carries its cells */
    char *text = slurp(json);
    jval root;
    jp = text;
    cr_assert_eq(jparse(&root), 0);
    const jval *pc = jget(&jget(&root, "rows")->items[1], "passkey_cells");
    cr_assert(pc && pc->t == J_ARR && pc->n == 2, "passkey_cells missing");
    cr_expect_eq(jget(&pc->items[0], "length")->num, 128);
    cr_expect_eq(jget(&pc->items[0], "correct")->num, 2);
    cr_expect_null(jget(&jget(&root, "rows")->items[0], "passkey_cells"), "context rows carry no cells");
    jfree(&root);
    free(text);
    /* appending after the cut line first removes it */
    sweep_row r = {{0}};
    for (int c = 0; c < SWEEP_N_COLS; c++) kvc_sweep_row_set(&r, c, c == COL_PROTOCOL ? "stream" : "x");
    cr_assert_eq(kvc_sweep_csv_append(csv, &r, &err), 0, "%s", err.msg);
    kvc_sweep_row_free(&r);
    kvc_sweep_table_free(&t);
    cr_assert_eq(kvc_sweep_csv_read(csv, &t, &err), 0, "%s", err.msg);
    cr_expect_eq(t.n, 4);
    cr_expect_str_eq(t.rows[3].f[COL_PROTOCOL], "stream");
    kvc_sweep_table_free(&t);
    free(cells);
    /* a CSV with other columns is refused */
    write_text(csv, "a,b,c\n1,2,3\n");
    cr_expect_eq(kvc_sweep_csv_read(csv, &t, &err), -1);
    cr_expect_not_null(strstr(err.msg, "not a kvcodec sweep file"), "%s", err.msg);
    unlink(csv), unlink(json), unlink(cells_p);
    rmdir(dir);
}

/* A results.csv of an older kvcodec (the 28 columns before the intervals) still reads, its
 * interval cells empty; rows are never appended under it. */
Test(sweep, older_results_read_but_are_not_appended_to) {
    char path[64];
    snprintf(path, sizeof path, "/tmp/kvc_sweep_v1.%d.csv", (int)getpid());
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    for (int c = 0; c < SWEEP_N_COLS_V1; c++) fprintf(f, "%s%s", c ? "," : "", KVC_SWEEP_COLUMNS[c]);
    fprintf(f, "\n");
    for (int c = 0; c < SWEEP_N_COLS_V1; c++) fprintf(f, "%s%s", c ? "," : "", c == COL_PROTOCOL ? "context" : "1");
    fprintf(f, "\n");
    fclose(f);
    sweep_table t;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_sweep_csv_read(path, &t, &err), 0, "%s", err.msg);
    cr_assert_eq(t.n, 1);
    cr_expect_str_eq(t.rows[0].f[COL_SECONDS], "1");
    cr_expect_str_eq(t.rows[0].f[COL_RISE_LO], "");
    cr_expect_str_eq(t.rows[0].f[COL_KL_HI], "");
    cr_expect_eq(kvc_sweep_csv_append(path, &t.rows[0], &err), -1);
    cr_expect_not_null(strstr(err.msg, "other columns"), "%s", err.msg);
    kvc_sweep_table_free(&t);
    unlink(path);
}

/* ================================================================ the binary ==== */

typedef struct {
    int status; /* exit code, or 128 + signal */
    char *out, *err;
} run_result;

/* Runs `kvcodec sweep ARGS` from the source folder with env prepended; captures output. */
static run_result run_sweep(const char *env, const char *args) {
    char cmd[4096], o[64], e[64];
    snprintf(o, sizeof o, "/tmp/kvc_sweep_out.%d", (int)getpid());
    snprintf(e, sizeof e, "/tmp/kvc_sweep_err.%d", (int)getpid());
    snprintf(cmd, sizeof cmd, "cd '%s' && %s OMP_WAIT_POLICY=PASSIVE '%s' sweep %s >%s 2>%s", KVC_SOURCE_DIR, env,
             KVC_BINARY, args, o, e);
    int st = system(cmd);
    run_result r = {WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), slurp(o), slurp(e)};
    unlink(o), unlink(e);
    return r;
}

static void result_free(run_result *r) {
    free(r->out);
    free(r->err);
}

/* The data lines of a CSV (header excluded). */
static int csv_lines(const char *text) {
    int n = 0;
    for (const char *p = text; p && *p; p++) n += *p == '\n';
    return n - 1;
}

/* Starts `kvcodec sweep ARGS` and sends it SIGKILL as soon as csv holds one data row;
 * returns the data rows the file holds after the kill. */
static int kill_sweep_after_first_row(const char *args, const char *csv) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd '%s' && exec env OMP_WAIT_POLICY=PASSIVE '%s' sweep %s >/dev/null 2>&1",
             KVC_SOURCE_DIR, KVC_BINARY, args);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int rows = 0, st = 0;
    for (int i = 0; i < 60000 && rows < 1; i++) { /* up to 10 minutes */
        char *t = slurp(csv);
        rows = t ? csv_lines(t) : 0;
        free(t);
        if (rows < 1) {
            if (waitpid(pid, &st, WNOHANG) == pid) cr_assert_fail("the sweep ended (status %d) before any row", st);
            nanosleep(&(struct timespec){0, 10000000L}, NULL);
        }
    }
    kill(pid, SIGKILL);
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "the sweep finished before the kill landed");
    char *t = slurp(csv);
    rows = t ? csv_lines(t) : 0;
    free(t);
    return rows;
}

Test(sweep, killed_sweep_resumes_without_redoing_finished_points, .timeout = 300) {
    if (access(KVC_MODEL_PATH, R_OK) != 0) cr_skip("model %s not present (run scripts/setup.sh)", KVC_MODEL_PATH);
    char dir[64], csv[96], args[1024];
    snprintf(dir, sizeof dir, "/tmp/kvc_sweep_run.%d", (int)getpid());
    snprintf(csv, sizeof csv, "%s/results.csv", dir);
    const char *grid = "--repr 'f16;int8' --keep 'full;h2o' --budgets 0.5 --points 'int8 | streaming:budget=0.5' "
                       "--context-len 32 --continuation 8 --samples 1 --threads 2";
    snprintf(args, sizeof args, "%s --out %s", grid, dir);
    char rm[128];
    snprintf(rm, sizeof rm, "rm -rf %s", dir);
    cr_assert_eq(system(rm), 0);

    /* a point that does not build stops everything before any work, naming the point */
    char bad[1200];
    snprintf(bad, sizeof bad, "%s --points 'int8:bogus=1 | full'", args);
    run_result r = run_sweep("", bad);
    cr_expect_eq(r.status, 1, "status %d: %s", r.status, r.err);
    cr_expect_not_null(strstr(r.err, "int8:bogus=1"), "%s", r.err);
    cr_expect_neq(access(dir, F_OK), 0, "nothing may be written before the grid is valid");
    result_free(&r);

    /* a real kill -9 as soon as the first point's row is in results.csv (fsynced row by row);
     * a point or two more may finish before the signal lands */
    int done_before = kill_sweep_after_first_row(args, csv);
    cr_assert(done_before >= 1 && done_before < 5, "%d finished points when the kill landed", done_before);
    char *first = slurp(csv);
    cr_assert_not_null(first, "no results.csv after the first point");
    cr_assert_eq(csv_lines(first), done_before, "%s", first);

    r = run_sweep("", args);
    cr_assert_eq(r.status, 0, "status %d: %s", r.status, r.err);
    char want[64];
    snprintf(want, sizeof want, "skipping %d finished point%s already in", done_before, done_before == 1 ? "" : "s");
    cr_expect_not_null(strstr(r.out, want), "%s", r.out);
    /* 2 reprs x (full + h2o at 0.5) + the explicit point = 5, done_before done */
    snprintf(want, sizeof want, "[%d/%d]", 5 - done_before, 5 - done_before);
    cr_expect_not_null(strstr(r.out, want), "%d points left to run: %s", 5 - done_before, r.out);
    result_free(&r);
    char *all = slurp(csv);
    cr_assert_not_null(all);
    cr_expect_eq(strncmp(all, first, strlen(first)), 0, "the finished points' rows must be unchanged");
    cr_expect_eq(csv_lines(all), 5, "every point once:\n%s", all);

    sweep_table t;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_sweep_csv_read(csv, &t, &err), 0, "%s", err.msg);
    for (int i = 0; i < t.n; i++) {
        char ki[1100], kj[1100];
        kvc_sweep_row_key(&t.rows[i], ki, sizeof ki);
        for (int j = i + 1; j < t.n; j++) {
            kvc_sweep_row_key(&t.rows[j], kj, sizeof kj);
            cr_expect_str_neq(ki, kj, "row %d and %d are the same point", i, j);
        }
        cr_expect_str_eq(t.rows[i].f[COL_TOOL], "kvcodec");
        cr_expect_str_eq(t.rows[i].f[COL_CONTEXT_LEN], "32");
        cr_expect_str_eq(t.rows[i].f[COL_N_SCORED], "7", "M - 1 = 7 predictions per sample");
        const double bpt = kvc_sweep_cell_num(&t.rows[i], COL_BPT), ratio = kvc_sweep_cell_num(&t.rows[i], COL_RATIO);
        cr_expect_float_eq(bpt * ratio, 2.0 * 30 * 3 * 64 * 2, 0.5, "ratio = f16 bytes / bytes (%g x %g)", bpt, ratio);
    }
    cr_expect_str_eq(t.rows[0].f[COL_METHOD], "f16+full");
    cr_expect_str_eq(t.rows[0].f[COL_BPT], "23040", "an f16 full cache: 2 * L * K * D * 2 bytes");
    cr_expect_eq(t.n, 5);
    cr_expect_str_eq(t.rows[4].f[COL_METHOD], "int8+streaming");
    kvc_sweep_table_free(&t);
    char json[96];
    snprintf(json, sizeof json, "%s/results.json", dir);
    cr_expect_eq(expect_json_matches_csv(csv, json), 5);

    /* rerun: nothing left */
    r = run_sweep("", args);
    cr_expect_eq(r.status, 0);
    cr_expect_not_null(strstr(r.out, "skipping 5 finished points"), "%s", r.out);
    result_free(&r);
    /* another protocol setting in the same folder: refused, nothing changed */
    snprintf(bad, sizeof bad, "%s --continuation 16", args);
    r = run_sweep("", bad);
    cr_expect_eq(r.status, 1);
    cr_expect_not_null(strstr(r.err, "different config (continuation 8 there, 16 here)"), "%s", r.err);
    cr_expect_not_null(strstr(r.err, "--force"), "%s", r.err);
    result_free(&r);
    char *after = slurp(csv);
    cr_expect_str_eq(after, all, "a refused run must not touch results.csv");
    free(after);
    free(first);
    free(all);
    cr_assert_eq(system(rm), 0);
}
