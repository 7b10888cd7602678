/* sweep_results.c - the results folder of `kvcodec sweep` (API in kvc/sweep.h): rows
 * appended to results.csv one line per finished point and fsynced, passkey cells beside
 * them in passkey.csv, and results.json rebuilt from both through a temporary file. */
#include "kvc/sweep.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *const KVC_SWEEP_COLUMNS[SWEEP_N_COLS] = {
    "tool", "method", "repr", "keep", "budget", "latent", "protocol", "model", "corpus", "ctx",
    "context_len", "continuation", "samples", "n_scored", "nll", "ppl", "ppl_full", "ppl_rise_pct",
    "kl_mean", "kl_p99", "top1", "kept_frac", "removed_frac", "bytes_per_token", "ratio_vs_f16",
    "passkey_acc", "tokens_per_s", "seconds", "rise_lo", "rise_hi", "kl_lo", "kl_hi"};

static const char *const CELL_COLUMNS[7] = {"key", "length", "depth", "skipped", "trials", "correct", "correct_full"};

/* ========================================================================= rows ==== */

void kvc_sweep_row_set(sweep_row *r, int col, const char *s) {
    free(r->f[col]);
    r->f[col] = strdup(s ? s : "");
}

void kvc_sweep_row_num(sweep_row *r, int col, const char *fmt, double x) {
    char b[64] = "";
    if (isfinite(x)) snprintf(b, sizeof b, fmt, x);
    kvc_sweep_row_set(r, col, b);
}

void kvc_sweep_row_free(sweep_row *r) {
    for (int i = 0; i < SWEEP_N_COLS; i++) free(r->f[i]), r->f[i] = NULL;
}

double kvc_sweep_cell_num(const sweep_row *r, int col) {
    const char *s = r->f[col];
    char *end;
    if (!s || !*s) return NAN;
    double x = strtod(s, &end);
    return *end ? NAN : x;
}

void kvc_sweep_row_key(const sweep_row *r, char *buf, size_t size) {
    snprintf(buf, size, "%s repr=%s keep=%s", r->f[COL_PROTOCOL] ? r->f[COL_PROTOCOL] : "",
             r->f[COL_REPR] ? r->f[COL_REPR] : "", r->f[COL_KEEP] ? r->f[COL_KEEP] : "");
}

void kvc_sweep_table_free(sweep_table *t) {
    for (int i = 0; i < t->n; i++) kvc_sweep_row_free(&t->rows[i]);
    free(t->rows);
    memset(t, 0, sizeof *t);
}

int kvc_sweep_table_add(sweep_table *t, const sweep_row *r) {
    if (t->n == t->cap) {
        int cap = t->cap ? 2 * t->cap : 16;
        sweep_row *p = realloc(t->rows, (size_t)cap * sizeof *p);
        if (!p) return -1;
        t->rows = p, t->cap = cap;
    }
    sweep_row *d = &t->rows[t->n];
    for (int i = 0; i < SWEEP_N_COLS; i++) {
        d->f[i] = strdup(r->f[i] ? r->f[i] : "");
        if (!d->f[i]) {
            kvc_sweep_row_free(d);
            return -1;
        }
    }
    t->n++;
    return 0;
}

/* ==================================================================== CSV text ==== */

/* Appends s to a growing buffer; returns 0 or -1 on out of memory. */
static int buf_put(char **b, size_t *n, size_t *cap, const char *s, size_t len) {
    if (*n + len + 1 > *cap) {
        size_t c = (*cap ? *cap * 2 : 1024) + len;
        char *p = realloc(*b, c);
        if (!p) return -1;
        *b = p, *cap = c;
    }
    memcpy(*b + *n, s, len);
    *n += len;
    (*b)[*n] = '\0';
    return 0;
}

/* Formats n cells as one CSV line with its newline (RFC 4180: a cell holding a comma, a
 * quote or a line break is quoted, quotes doubled). Returns a malloc'd line or NULL. */
static char *csv_line(const char *const *cells, int n) {
    char *b = NULL;
    size_t len = 0, cap = 0;
    int bad = 0;
    for (int i = 0; i < n && !bad; i++) {
        const char *s = cells[i] ? cells[i] : "";
        if (i) bad |= buf_put(&b, &len, &cap, ",", 1);
        if (!s[strcspn(s, ",\"\r\n")]) {
            bad |= buf_put(&b, &len, &cap, s, strlen(s));
            continue;
        }
        bad |= buf_put(&b, &len, &cap, "\"", 1);
        for (const char *p = s; *p && !bad; p++)
            bad |= *p == '"' ? buf_put(&b, &len, &cap, "\"\"", 2) : buf_put(&b, &len, &cap, p, 1);
        bad |= buf_put(&b, &len, &cap, "\"", 1);
    }
    bad |= buf_put(&b, &len, &cap, "\n", 1);
    if (bad) free(b);
    return bad ? NULL : b;
}

/* Parses one CSV record starting at *p (text ends at end), storing up to max malloc'd cells.
 * Advances *p past the record's newline. Returns the cell count, or -1 when the record has
 * no terminating newline (a cut-off write) or on out of memory. */
static int csv_record(const char **p, const char *end, char **cells, int max) {
    const char *s = *p;
    int n = 0;
    for (;;) {
        char *v = NULL;
        size_t len = 0, cap = 0;
        int bad = buf_put(&v, &len, &cap, "", 0);
        if (!bad && s < end && *s == '"') {
            for (s++; !bad; s++) {
                if (s >= end) {
                    bad = 1; /* an open quote at the end: cut off */
                    break;
                }
                if (*s == '"') {
                    if (s + 1 < end && s[1] == '"') s++;
                    else {
                        s++;
                        break;
                    }
                }
                bad = buf_put(&v, &len, &cap, s, 1);
            }
        } else if (!bad) {
            const char *e = s;
            while (e < end && *e != ',' && *e != '\n' && *e != '\r') e++;
            bad = buf_put(&v, &len, &cap, s, (size_t)(e - s));
            s = e;
        }
        if (bad) {
            free(v);
            break;
        }
        if (n < max) cells[n] = v;
        else free(v);
        n++;
        if (s < end && *s == ',') {
            s++;
            continue;
        }
        if (s < end && *s == '\r') s++;
        if (s < end && *s == '\n') {
            *p = s + 1;
            return n;
        }
        break; /* no newline: the record was cut off */
    }
    for (int i = 0; i < n && i < max; i++) free(cells[i]);
    return -1;
}

/* Reads a CSV file whose header must be cols (ncol names), or its first nmin names (an older
 * file: the missing cells come back empty); calls row(ctx, cells) for each complete record
 * (cells are freed after the call). Missing file: 0, nothing read. */
static int csv_each(const char *path, const char *const *cols, int ncol, int nmin,
                    int (*row)(void *ctx, char **cells, kvc_err *err), void *ctx, kvc_err *err) {
    if (access(path, F_OK) != 0) return 0;
    char *buf = NULL;
    size_t len = 0;
    if (kvc_read_file(path, &buf, &len, err)) return -1;
    const char *p = buf, *end = buf + len;
    int rc = 0, line = 1;
    char *cells[SWEEP_N_COLS + 1];
    int have = ncol;
    if (len) {
        int n = csv_record(&p, end, cells, ncol + 1);
        int ok = n == ncol || (n == nmin && nmin > 0);
        for (int i = 0; i < n && i <= ncol; i++) {
            if (i < ncol && ok) ok = !strcmp(cells[i], cols[i]);
            free(cells[i]);
        }
        have = n;
        if (!ok) rc = kvc_fail(err, "%s: not a kvcodec sweep file (its header is not %s,%s,...)", path, cols[0], cols[1]);
    }
    while (!rc && p < end) {
        line++;
        int n = csv_record(&p, end, cells, ncol + 1);
        if (n < 0) break; /* a last line cut short by a kill: that point is simply redone */
        if (n != have) rc = kvc_fail(err, "%s:%d: %d cells, expected %d", path, line, n, have);
        else {
            for (int i = n; i < ncol; i++) cells[i] = strdup("");
            rc = row(ctx, cells, err);
            n = ncol;
        }
        for (int i = 0; i < n && i <= ncol; i++) free(cells[i]);
    }
    free(buf);
    return rc;
}

/* csv_each callback: adds the cells as a row of the table in ctx. */
static int add_row_cb(void *ctx, char **cells, kvc_err *err) {
    sweep_row r;
    memcpy(r.f, cells, sizeof r.f);
    return kvc_sweep_table_add(ctx, &r) ? kvc_fail(err, "out of memory") : 0;
}

int kvc_sweep_csv_read(const char *path, sweep_table *t, kvc_err *err) {
    memset(t, 0, sizeof *t);
    int rc = csv_each(path, KVC_SWEEP_COLUMNS, SWEEP_N_COLS, SWEEP_N_COLS_V1, add_row_cb, t, err);
    if (rc) kvc_sweep_table_free(t);
    return rc;
}

/* Appends one line to a CSV file: opens or creates it, cuts a partial last line, writes the
 * header when the file is empty, then the line, and fsyncs. Returns 0 or -1 with err. */
static int csv_append_line(const char *path, const char *const *cols, int ncol, const char *line, kvc_err *err) {
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) return kvc_fail(err, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st)) rc = kvc_fail(err, "cannot stat '%s': %s", path, strerror(errno));
    off_t size = st.st_size;
    if (!rc && size > 0) { /* a kill mid-write leaves a line without its newline: drop it */
        char *all = malloc((size_t)size);
        if (!all) rc = kvc_fail(err, "out of memory");
        else if (pread(fd, all, (size_t)size, 0) != (ssize_t)size) rc = kvc_fail(err, "cannot read '%s'", path);
        else if (all[size - 1] != '\n') {
            off_t keep = size - 1;
            while (keep > 0 && all[keep - 1] != '\n') keep--;
            if (ftruncate(fd, keep)) rc = kvc_fail(err, "cannot truncate '%s': %s", path, strerror(errno));
            size = keep;
        }
        free(all);
    }
    char *header = NULL;
    if (!rc && !(header = csv_line(cols, ncol))) rc = kvc_fail(err, "out of memory");
    if (!rc && size > 0) { /* only ever append rows under this kvcodec's own header */
        const size_t hl = strlen(header);
        char *first = malloc(hl + 1);
        if (!first) rc = kvc_fail(err, "out of memory");
        else if (pread(fd, first, hl, 0) != (ssize_t)hl || memcmp(first, header, hl))
            rc = kvc_fail(err, "%s was written with other columns (an older kvcodec?): start the folder over with "
                               "--force, or pick another --out", path);
        free(first);
        free(header);
        header = NULL;
    }
    for (int part = 0; part < 2 && !rc; part++) {
        const char *s = part ? line : header;
        size_t n = s ? strlen(s) : 0, off = 0;
        while (off < n) {
            ssize_t w = pwrite(fd, s + off, n - off, size);
            if (w <= 0) {
                rc = kvc_fail(err, "cannot write '%s': %s", path, strerror(errno));
                break;
            }
            off += (size_t)w, size += w;
        }
    }
    free(header);
    if (!rc && fsync(fd)) rc = kvc_fail(err, "cannot sync '%s': %s", path, strerror(errno));
    if (close(fd) && !rc) rc = kvc_fail(err, "cannot close '%s': %s", path, strerror(errno));
    return rc;
}

int kvc_sweep_csv_append(const char *path, const sweep_row *r, kvc_err *err) {
    char *line = csv_line((const char *const *)r->f, SWEEP_N_COLS);
    if (!line) return kvc_fail(err, "out of memory");
    int rc = csv_append_line(path, KVC_SWEEP_COLUMNS, SWEEP_N_COLS, line, err);
    free(line);
    return rc;
}

/* ================================================================ passkey cells ==== */

int kvc_sweep_cells_append(const char *path, const sweep_cell *c, int n, kvc_err *err) {
    char *all = NULL;
    size_t len = 0, cap = 0;
    for (int i = 0; i < n; i++) {
        char v[6][32];
        snprintf(v[0], 32, "%d", c[i].length);
        snprintf(v[1], 32, "%.17g", c[i].depth);
        snprintf(v[2], 32, "%d", c[i].skipped);
        snprintf(v[3], 32, "%d", c[i].trials);
        snprintf(v[4], 32, "%d", c[i].correct);
        snprintf(v[5], 32, "%d", c[i].correct_full);
        const char *cells[7] = {c[i].key, v[0], v[1], v[2], v[3], v[4], v[5]};
        char *line = csv_line(cells, 7);
        if (!line || buf_put(&all, &len, &cap, line, strlen(line))) {
            free(line);
            free(all);
            return kvc_fail(err, "out of memory");
        }
        free(line);
    }
    int rc = n ? csv_append_line(path, CELL_COLUMNS, 7, all, err) : 0;
    free(all);
    return rc;
}

typedef struct {
    sweep_cell *c;
    int n, cap;
} cell_list;

/* csv_each callback: adds one cell; a (key, length, depth) seen before starts the key's set
 * over (the earlier set belonged to a point that was killed before its row was written). */
static int add_cell_cb(void *ctx, char **cells, kvc_err *err) {
    cell_list *l = ctx;
    sweep_cell x;
    memset(&x, 0, sizeof x);
    snprintf(x.key, sizeof x.key, "%s", cells[0]);
    x.length = atoi(cells[1]);
    x.depth = strtod(cells[2], NULL);
    x.skipped = atoi(cells[3]), x.trials = atoi(cells[4]), x.correct = atoi(cells[5]), x.correct_full = atoi(cells[6]);
    int dup = 0;
    for (int i = 0; i < l->n && !dup; i++)
        dup = !strcmp(l->c[i].key, x.key) && l->c[i].length == x.length && l->c[i].depth == x.depth;
    if (dup) { /* drop the key's earlier cells */
        int o = 0;
        for (int i = 0; i < l->n; i++)
            if (strcmp(l->c[i].key, x.key)) l->c[o++] = l->c[i];
        l->n = o;
    }
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 32;
        sweep_cell *p = realloc(l->c, (size_t)cap * sizeof *p);
        if (!p) return kvc_fail(err, "out of memory");
        l->c = p, l->cap = cap;
    }
    l->c[l->n++] = x;
    return 0;
}

int kvc_sweep_cells_read(const char *path, sweep_cell **cells, int *n, kvc_err *err) {
    cell_list l = {0};
    int rc = csv_each(path, CELL_COLUMNS, 7, 0, add_cell_cb, &l, err);
    if (rc) {
        free(l.c);
        l.c = NULL, l.n = 0;
    }
    *cells = l.c;
    *n = l.n;
    return rc;
}

/* ========================================================================= JSON ==== */

/* Writes s as a JSON string. */
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p == '\n') fputs("\\n", f);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
}

/* 1 when s is a number in JSON's grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static int json_number_text(const char *s) {
    const char *p = s;
    if (*p == '-') p++;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (*p >= '0' && *p <= '9') p++;
    else return 0;
    if (*p == '.') {
        if (!(*++p >= '0' && *p <= '9')) return 0;
        while (*p >= '0' && *p <= '9') p++;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-') p++;
        if (!(*p >= '0' && *p <= '9')) return 0;
        while (*p >= '0' && *p <= '9') p++;
    }
    return *p == '\0';
}

/* Text columns stay strings even when they look like numbers. */
static int text_column(int c) {
    return c == COL_TOOL || c == COL_METHOD || c == COL_REPR || c == COL_KEEP || c == COL_PROTOCOL ||
           c == COL_MODEL || c == COL_CORPUS;
}

/* Writes the lines of the config file (comments and blanks left out) as a JSON array. */
static void json_config(FILE *f, const char *path) {
    char *buf = NULL;
    size_t len = 0;
    kvc_err e;
    fputs("[", f);
    if (path && !kvc_read_file(path, &buf, &len, &e)) {
        int first = 1;
        for (char *save = NULL, *l = strtok_r(buf, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
            if (l[0] == '#' || !l[0]) continue;
            fputs(first ? "\n    " : ",\n    ", f);
            json_str(f, l);
            first = 0;
        }
    }
    free(buf);
    fputs("]", f);
}

int kvc_sweep_json_write(const char *path, const sweep_table *t, const sweep_cell *cells, int n_cells,
                     const char *config_path, kvc_err *err) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return kvc_fail(err, "cannot write '%s': %s", tmp, strerror(errno));
    fputs("{\n  \"config\": ", f);
    json_config(f, config_path);
    fputs(",\n  \"rows\": [", f);
    for (int i = 0; i < t->n; i++) {
        const sweep_row *r = &t->rows[i];
        fputs(i ? ",\n    {" : "\n    {", f);
        for (int c = 0; c < SWEEP_N_COLS; c++) {
            const char *v = r->f[c] ? r->f[c] : "";
            fprintf(f, "%s\"%s\": ", c ? ", " : "", KVC_SWEEP_COLUMNS[c]);
            if (!*v) fputs("null", f);
            else if (!text_column(c) && json_number_text(v)) fputs(v, f);
            else json_str(f, v);
        }
        if (!strcmp(r->f[COL_PROTOCOL], "passkey")) {
            char key[1100];
            kvc_sweep_row_key(r, key, sizeof key);
            fputs(", \"passkey_cells\": [", f);
            int k = 0;
            for (int j = 0; j < n_cells; j++)
                if (!strcmp(cells[j].key, key))
                    fprintf(f, "%s{\"length\": %d, \"depth\": %.17g, \"skipped\": %s, \"trials\": %d, \"correct\": %d, "
                               "\"correct_full\": %d}",
                            k++ ? ", " : "", cells[j].length, cells[j].depth, cells[j].skipped ? "true" : "false",
                            cells[j].trials, cells[j].correct, cells[j].correct_full);
            fputs("]", f);
        }
        fputs("}", f);
    }
    fputs("\n  ]\n}\n", f);
    int bad = ferror(f);
    bad |= fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return kvc_fail(err, "cannot write '%s': %s", path, strerror(e));
    }
    return 0;
}
