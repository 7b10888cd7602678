/* sweep.h - compression grids for `kvcodec sweep`: a grid (representations x retention
 * policies x budgets x latent sizes, plus explicit points) read from a config file or flags
 * and expanded into points; the results folder that makes a sweep resumable (results.csv
 * appended and fsynced per point, results.json rewritten atomically from it); gnuplot plots. */
#ifndef KVC_SWEEP_H
#define KVC_SWEEP_H

#include "kvc/model.h"

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ========================================================================= grid ==== */

enum { SWEEP_CONTEXT = 0, SWEEP_STREAM = 1, SWEEP_PASSKEY = 2, SWEEP_N_PROTO = 3 };
#define SWEEP_MAX_LIST 32

/* One spec as the user wrote it, with where it came from for messages. */
typedef struct {
    char *repr;   /* repr spec (for `repr` items and points) or NULL */
    char *keep;   /* keep spec (for `keep` items and points) or NULL */
    char src[96]; /* "configs/x.grid:7" or "--repr item 2" */
} sweep_item;

/* Everything a sweep is: what to measure (the lists) and how (the protocol settings). */
typedef struct {
    sweep_item *repr, *keep, *point; /* (n_repr), (n_keep), (n_point) */
    int n_repr, n_keep, n_point;
    double budget[SWEEP_MAX_LIST];   /* (n_budget) kept fractions in (0, 1] */
    int n_budget;
    int latent[SWEEP_MAX_LIST];      /* (n_latent) values substituted for {R} */
    int n_latent;
    int protocol[SWEEP_N_PROTO];     /* (n_protocol) SWEEP_* in the order given */
    int n_protocol;
    char model[1024], text[1024];    /* "" = the defaults */
    char fingerprint[17];            /* model fingerprint; "" = not checked */
    char corpus_sha256[65];          /* sha256 of the text; "" = not checked */
    long long tokens;                /* use only the first N tokens of the text; 0 = all */
    int ctx, chunk;                  /* stream window; tokens per forward call */
    int context_len, continuation, samples; /* context protocol N, M, S */
    int pk_len[SWEEP_MAX_LIST], n_pk_len;   /* passkey prompt lengths */
    double pk_depth[SWEEP_MAX_LIST];        /* (n_pk_depth) needle depths in [0, 1] */
    int n_pk_depth;
    int trials;                      /* passkey prompts per (length, depth) */
    unsigned long long seed;         /* passkey keys */
} sweep_grid;

/* Fills g with the defaults: protocol context, N 512 M 64 S 8, ctx 512, chunk 32, passkey
 * lengths 1024 2048, depths 0 0.25 0.5 0.75 1, 3 trials, seed 1; empty lists. */
void kvc_sweep_grid_init(sweep_grid *g);
void kvc_sweep_grid_free(sweep_grid *g);

/* Sets one key. File lines (flag = 0): `repr`, `keep` and `point` append one item (the
 * rest of the line; a point is "REPR | KEEP"), number lists take blank- or comma-separated
 * values and replace the list. Flags (flag = 1): `repr`, `keep`, `point` take ';'-separated
 * items and replace the list. src names the line or flag for messages. Returns 0, or -1
 * with err ("SRC: ...") on an unknown key or a bad value. */
int kvc_sweep_grid_set(sweep_grid *g, const char *key, const char *value, int flag, const char *src, kvc_err *err);
/* Reads a grid file: one `key value...` per line, `#` starts a comment. -1 with err naming
 * the file and line. */
int kvc_sweep_grid_load(sweep_grid *g, const char *path, kvc_err *err);
/* Writes g as a canonical grid file (identity settings first, then the lists). */
void kvc_sweep_grid_write(const sweep_grid *g, FILE *f);
/* Compares the settings that change measured numbers (fingerprint, corpus, tokens, protocol
 * settings) of a saved grid with g. Returns 0 when equal, else 1 with a message in err
 * naming the first difference. */
int kvc_sweep_grid_compare(const sweep_grid *saved, const sweep_grid *g, kvc_err *err);
/* "context" / "stream" / "passkey". */
const char *kvc_sweep_protocol_name(int p);

/* One measured configuration. */
typedef struct {
    char repr[512];      /* repr spec, {R} substituted */
    char keep[512];      /* keep spec handed to kvc_kvcache_new (budget included) */
    char keep_base[512]; /* keep spec without the budget */
    double budget;       /* kept fraction; 1 for a policy that never evicts */
    int latent;          /* R substituted or read from an "aeNN" file name; 0 = none */
    char method[160];    /* family label for plots: "int8+lsh", "ae32-int8+full" */
    char src[96];        /* where it came from */
} sweep_point;

/* Expands the grid: repr x keep x (budgets for evicting policies; `full` once at budget 1),
 * each {R} repr once per latent, then the explicit points (a point's keep without budget=
 * is expanded over the budgets too). Duplicates are dropped. Method labels that would join
 * different configurations are made unique by spelling the specs out. *pts is malloc'd.
 * Returns 0, or -1 with err naming the item (unknown policy, budget= in a `keep` line,
 * {R} without latents, evicting policy without budgets, nothing to measure). */
int kvc_sweep_expand(const sweep_grid *g, sweep_point **pts, int *n_pts, kvc_err *err);

/* ====================================================================== results ==== */

#define SWEEP_N_COLS 32
#define SWEEP_N_COLS_V1 28 /* files of kvcodec before the interval columns: read, never appended to */
/* The CSV columns, in order (bench/peers/peer_common.py writes the same ones). */
extern const char *const KVC_SWEEP_COLUMNS[SWEEP_N_COLS];
enum {
    COL_TOOL, COL_METHOD, COL_REPR, COL_KEEP, COL_BUDGET, COL_LATENT, COL_PROTOCOL, COL_MODEL, COL_CORPUS, COL_CTX,
    COL_CONTEXT_LEN, COL_CONTINUATION, COL_SAMPLES, COL_N_SCORED, COL_NLL, COL_PPL, COL_PPL_FULL, COL_PPL_RISE,
    COL_KL_MEAN, COL_KL_P99, COL_TOP1, COL_KEPT, COL_REMOVED, COL_BPT, COL_RATIO, COL_PASSKEY_ACC, COL_TOK_S,
    COL_SECONDS, COL_RISE_LO, COL_RISE_HI, COL_KL_LO, COL_KL_HI
};

/* One CSV row: every cell a malloc'd string, "" when empty. */
typedef struct {
    char *f[SWEEP_N_COLS];
} sweep_row;

typedef struct {
    sweep_row *rows; /* (n) */
    int n, cap;
} sweep_table;

/* Sets cell col of r to a copy of s (NULL: empty), or to a number with fmt (NAN: empty). */
void kvc_sweep_row_set(sweep_row *r, int col, const char *s);
void kvc_sweep_row_num(sweep_row *r, int col, const char *fmt, double x);
void kvc_sweep_row_free(sweep_row *r);
/* A cell as a number (NAN when empty or not a number). */
double kvc_sweep_cell_num(const sweep_row *r, int col);
/* The resume key of a row: "PROTOCOL repr=REPR keep=KEEP", i.e. the protocol and the
 * cache's canonical description (kvc_kvcache_describe). Writes into buf (size bytes). */
void kvc_sweep_row_key(const sweep_row *r, char *buf, size_t size);

void kvc_sweep_table_free(sweep_table *t);
/* Adds a deep copy of r. Returns 0 or -1 on out of memory. */
int kvc_sweep_table_add(sweep_table *t, const sweep_row *r);
/* Reads a results CSV (RFC 4180 quoting) into t. A missing file gives an empty table; a
 * last line without its newline (a write cut short by a kill) is ignored. -1 with err when
 * the header is not KVC_SWEEP_COLUMNS or a row has the wrong number of cells. */
int kvc_sweep_csv_read(const char *path, sweep_table *t, kvc_err *err);
/* Appends r as one line (header first when the file is new or empty), cutting off a partial
 * last line left by a kill, then flushes and fsyncs. Returns 0 or -1 with err. */
int kvc_sweep_csv_append(const char *path, const sweep_row *r, kvc_err *err);

/* One passkey cell of one measured cache, kept in passkey.csv next to results.csv. */
typedef struct {
    char key[1100];   /* kvc_sweep_row_key of the passkey row it belongs to */
    int length;
    double depth;
    int skipped, trials, correct, correct_full;
} sweep_cell;

/* Appends n cells (same key) to path and fsyncs. Returns 0 or -1 with err. */
int kvc_sweep_cells_append(const char *path, const sweep_cell *c, int n, kvc_err *err);
/* Reads every cell of path (missing file: none). When a key's cells were written twice (a
 * kill between the cells and their row), only the last set is kept. *cells is malloc'd. */
int kvc_sweep_cells_read(const char *path, sweep_cell **cells, int *n, kvc_err *err);

/* Writes results.json through a temporary file and a rename: {"config": {...}, "rows":
 * [...]} with one object per CSV row (numbers as numbers, empty cells as null) and, for
 * passkey rows, their cells. config_path (may be NULL) is the grid written to config.txt.
 * Returns 0 or -1 with err. */
int kvc_sweep_json_write(const char *path, const sweep_table *t, const sweep_cell *cells, int n_cells,
                     const char *config_path, kvc_err *err);

/* ======================================================================== plots ==== */

/* The gnuplot PNG terminal available ("pngcairo" or "png"), or NULL when gnuplot is missing
 * or has neither. Probed once. */
const char *kvc_sweep_gnuplot_terminal(void);
/* Writes DIR/pareto.gp and runs gnuplot into png: perplexity rise (%) against KV bytes per
 * token (log x), one curve per method in budget order, from rows of `protocol` in own and
 * peers (peers may be NULL; drawn dashed). Returns 0, 1 when there was nothing to plot, or
 * -1 with err. */
int kvc_sweep_plot_pareto(const sweep_table *own, const sweep_table *peers, const char *protocol, const char *gp_path,
                      const char *png, kvc_err *err);
/* Writes one heatmap figure per method with passkey rows (one panel per budget: accuracy by
 * length and depth) as DIR/passkey_<method>.png. The PNG paths (malloc'd, caller frees) go
 * into paths (up to max). Returns how many were written, or -1 with err. */
int kvc_sweep_plot_passkey(const sweep_table *t, const sweep_cell *cells, int n_cells, const char *dir, char **paths,
                       int max, kvc_err *err);

/* ---- running a sweep (eval/sweep_run.c) ---------------------------------------------- */

typedef struct {
    const char *out_dir;   /* results folder; NULL: out/sweeps/<model>_<corpus>_<protocols> */
    const char *peers;     /* ';'-separated peer CSVs drawn on pareto.png, or NULL */
    int force;             /* start a folder with a different config over */
    int dry_run;           /* validate and list the points, measure nothing */
    int threads;           /* printed */
    int progress;          /* progress line on stderr */
    FILE *out;             /* the per-point lines and the table (NULL: stdout) */
    int stop_after;        /* tests: return 3 after this many new points, leaving the folder as a
                              kill would (results.json not rebuilt); 0: off */
    const kvc_backend *backend; /* where every cache runs its hot paths; NULL: the CPU */
} kvc_sweep_run_opts;

/* 1 when the grid has a protocol that reads the text (context, stream). */
int kvc_sweep_uses_text(const sweep_grid *g);
/* Measures every point of g (its model and text already loaded: m, ids[0, n_ids) with the
 * text's sha256, or n_ids 0 for passkey-only grids) into the results folder, skipping points
 * already there; records the fingerprint and sha in g. Returns 0, 1 when a point failed (err
 * says which; the finished rows stay), 3 when stopped by stop_after, or -1 with err. */
int kvc_sweep_run(sweep_grid *g, const kvc_model *m, const int32_t *ids, int64_t n_ids, const char *sha,
                  const kvc_sweep_run_opts *o, kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
