/* sweep_plot.c - the figures of `kvcodec sweep` (API in kvc/sweep.h): a gnuplot script is
 * written next to each PNG (so a figure can be restyled and redrawn by hand) and gnuplot is
 * run on it; a missing gnuplot is reported by the caller, the CSV and JSON never depend on it. */
#include "kvc/sweep.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* Runs `gnuplot ARG...` with its output to log (NULL: /dev/null). Returns its exit status,
 * or -1 when it could not be started. */
static int run_gnuplot(const char *const *args, const char *log) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int fd = open(log ? log : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
        execvp("gnuplot", (char *const *)args);
        _exit(127);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

const char *kvc_sweep_gnuplot_terminal(void) {
    static int probed;
    static const char *term;
    if (!probed) {
        const char *a1[] = {"gnuplot", "-e", "set terminal pngcairo", NULL};
        const char *a2[] = {"gnuplot", "-e", "set terminal png", NULL};
        term = run_gnuplot(a1, NULL) == 0 ? "pngcairo" : run_gnuplot(a2, NULL) == 0 ? "png" : NULL;
        probed = 1;
    }
    return term;
}

/* Writes s as a gnuplot single-quoted string (a quote inside is doubled). */
static void gp_str(FILE *f, const char *s) {
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'') fputc('\'', f);
        fputc(*s, f);
    }
    fputc('\'', f);
}

/* Opens gp_path and writes the terminal and output lines. NULL with err. */
static FILE *gp_open(const char *gp_path, const char *png, int w, int h, kvc_err *err) {
    const char *term = kvc_sweep_gnuplot_terminal();
    FILE *f = fopen(gp_path, "w");
    if (!f) return kvc_fail(err, "cannot write '%s': %s", gp_path, strerror(errno)), NULL;
    fprintf(f, "# written by kvcodec sweep; redraw with: gnuplot %s\n", gp_path);
    fprintf(f, "set terminal %s size %d,%d noenhanced%s\nset output ", term ? term : "pngcairo", w, h,
            term && !strcmp(term, "png") ? "" : " font ',10'");
    gp_str(f, png);
    fputc('\n', f);
    return f;
}

/* Closes the script and runs gnuplot on it. Returns 0 or -1 with err. */
static int gp_run(FILE *f, const char *gp_path, const char *png, kvc_err *err) {
    if (fclose(f)) return kvc_fail(err, "cannot write '%s'", gp_path);
    if (!kvc_sweep_gnuplot_terminal()) return kvc_fail(err, "gnuplot with a PNG terminal is not installed");
    char log[4300];
    snprintf(log, sizeof log, "%s.log", gp_path);
    const char *args[] = {"gnuplot", gp_path, NULL};
    int st = run_gnuplot(args, log);
    if (st != 0 || access(png, F_OK) != 0)
        return kvc_fail(err, "gnuplot failed on %s (exit %d; its messages are in %s)", gp_path, st, log);
    unlink(log);
    return 0;
}

/* ======================================================================= pareto ==== */

/* One curve: rows of one method from one source, in budget order. */
typedef struct {
    const sweep_table *t;
    const char *method;
    int peer;
    int *rows, n;
} curve;

/* Budget order: the largest budget first; rows without a budget last. */
static const sweep_table *sort_table;
static int by_budget_desc(const void *a, const void *b) {
    double x = kvc_sweep_cell_num(&sort_table->rows[*(const int *)a], COL_BUDGET);
    double y = kvc_sweep_cell_num(&sort_table->rows[*(const int *)b], COL_BUDGET);
    if (isnan(x) || isnan(y)) return isnan(x) - isnan(y);
    return (x < y) - (x > y);
}

/* Gathers the plottable rows of one table into curves (appended to *cs). */
static int gather(const sweep_table *t, const char *protocol, int peer, curve **cs, int *n, kvc_err *err) {
    for (int i = 0; t && i < t->n; i++) {
        const sweep_row *r = &t->rows[i];
        if (strcmp(r->f[COL_PROTOCOL], protocol) || !isfinite(kvc_sweep_cell_num(r, COL_BPT)) ||
            !(kvc_sweep_cell_num(r, COL_BPT) > 0) || !isfinite(kvc_sweep_cell_num(r, COL_PPL_RISE)))
            continue;
        int c = 0;
        while (c < *n && !((*cs)[c].t == t && !strcmp((*cs)[c].method, r->f[COL_METHOD]))) c++;
        if (c == *n) {
            curve *p = realloc(*cs, (size_t)(*n + 1) * sizeof *p);
            if (!p) return kvc_fail(err, "out of memory");
            *cs = p;
            p[c] = (curve){t, r->f[COL_METHOD], peer, NULL, 0};
            (*n)++;
        }
        int *q = realloc((*cs)[c].rows, (size_t)((*cs)[c].n + 1) * sizeof *q);
        if (!q) return kvc_fail(err, "out of memory");
        (*cs)[c].rows = q;
        q[(*cs)[c].n++] = i;
    }
    return 0;
}

int kvc_sweep_plot_pareto(const sweep_table *own, const sweep_table *peers, const char *protocol, const char *gp_path,
                      const char *png, kvc_err *err) {
    curve *cs = NULL;
    int nc = 0, rc = 0;
    if (gather(own, protocol, 0, &cs, &nc, err) || gather(peers, protocol, 1, &cs, &nc, err)) {
        rc = -1;
        goto done;
    }
    if (!nc) {
        rc = 1;
        goto done;
    }
    FILE *f = gp_open(gp_path, png, 1200, 760, err);
    if (!f) {
        rc = -1;
        goto done;
    }
    fprintf(f, "set title 'Perplexity rise vs KV memory (%s protocol; peers dashed)'\n", protocol);
    fprintf(f, "set xlabel 'KV bytes per token (log scale; kvc_cache_bytes / tokens appended)'\n"
               "set ylabel 'perplexity rise vs the full cache (%%)'\nset logscale x 2\nset grid xtics ytics\n"
               "set key outside right top\nset xzeroaxis lt -1\n");
    for (int c = 0; c < nc; c++) {
        sort_table = cs[c].t;
        qsort(cs[c].rows, (size_t)cs[c].n, sizeof(int), by_budget_desc);
        fprintf(f, "$d%d << EOD\n", c);
        for (int i = 0; i < cs[c].n; i++) {
            const sweep_row *r = &cs[c].t->rows[cs[c].rows[i]];
            fprintf(f, "%.9g %.9g\n", kvc_sweep_cell_num(r, COL_BPT), kvc_sweep_cell_num(r, COL_PPL_RISE));
        }
        fprintf(f, "EOD\n");
    }
    /* 16 distinguishable colours, so that curves beyond gnuplot's 8 defaults do not repeat */
    static const char *const COLORS[16] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
                                           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#000000", "#393b79",
                                           "#637939", "#8c6d31", "#843c39", "#7b4173"};
    fprintf(f, "plot ");
    for (int c = 0; c < nc; c++) {
        fprintf(f, "%s$d%d using 1:2 with linespoints lw 2 lc rgb '%s' pt %d ps 1.2%s title ", c ? ", \\\n     " : "",
                c, COLORS[c % 16], cs[c].peer ? 6 : 7, cs[c].peer ? " dashtype 2" : "");
        gp_str(f, cs[c].method);
    }
    fprintf(f, "\n");
    rc = gp_run(f, gp_path, png, err);
done:
    for (int c = 0; c < nc; c++) free(cs[c].rows);
    free(cs);
    return rc;
}

/* ====================================================================== passkey ==== */

/* Ascending comparisons for qsort. */
static int cmp_int(const void *a, const void *b) { return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b); }
static int cmp_dbl(const void *a, const void *b) {
    return (*(const double *)a > *(const double *)b) - (*(const double *)a < *(const double *)b);
}

/* A method label made safe for a file name: [A-Za-z0-9._+-] kept, anything else '_'. */
static void file_safe(const char *s, char *out, size_t size) {
    size_t o = 0;
    for (; *s && o + 1 < size; s++) {
        char c = *s;
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
                 c == '+';
        out[o++] = ok ? c : '_';
    }
    out[o] = '\0';
}

/* Draws one method's passkey rows (rows, n, budget order) as panels of one figure. */
static int plot_method(const sweep_table *t, const int *rows, int n, const sweep_cell *cells, int n_cells,
                       const char *gp_path, const char *png, kvc_err *err) {
    int lens[SWEEP_MAX_LIST * 4], nl = 0;
    double deps[SWEEP_MAX_LIST * 4];
    int nd = 0;
    char key[1100];
    for (int i = 0; i < n; i++) {
        kvc_sweep_row_key(&t->rows[rows[i]], key, sizeof key);
        for (int j = 0; j < n_cells; j++) {
            if (strcmp(cells[j].key, key)) continue;
            int have = 0;
            for (int a = 0; a < nl; a++) have |= lens[a] == cells[j].length;
            if (!have && nl < SWEEP_MAX_LIST * 4) lens[nl++] = cells[j].length;
            have = 0;
            for (int a = 0; a < nd; a++) have |= deps[a] == cells[j].depth;
            if (!have && nd < SWEEP_MAX_LIST * 4) deps[nd++] = cells[j].depth;
        }
    }
    if (!nl || !nd) return 1;
    qsort(lens, (size_t)nl, sizeof(int), cmp_int);
    qsort(deps, (size_t)nd, sizeof(double), cmp_dbl);
    FILE *f = gp_open(gp_path, png, 360 * (n < 4 ? n : 4) + 120, 300 * ((n + 3) / 4) + 60, err);
    if (!f) return -1;
    fprintf(f, "set multiplot layout %d,%d title ", (n + 3) / 4, n < 4 ? n : 4);
    gp_str(f, t->rows[rows[0]].f[COL_METHOD]);
    fprintf(f, "\nset xlabel 'needle depth'\nset ylabel 'prompt length (tokens)'\nset cbrange [0:1]\n"
               "set palette defined (0 '#b2182b', 0.5 '#f7f7f7', 1 '#2166ac')\nset xrange [-0.5:%g]\n"
               "set yrange [-0.5:%g]\nset xtics (",
            nd - 0.5, nl - 0.5);
    for (int d = 0; d < nd; d++) fprintf(f, "%s'%g' %d", d ? ", " : "", deps[d], d);
    fprintf(f, ")\nset ytics (");
    for (int l = 0; l < nl; l++) fprintf(f, "%s'%d' %d", l ? ", " : "", lens[l], l);
    fprintf(f, ")\n");
    for (int i = 0; i < n; i++) {
        const sweep_row *r = &t->rows[rows[i]];
        kvc_sweep_row_key(r, key, sizeof key);
        fprintf(f, "$p%d << EOD\n", i);
        for (int l = 0; l < nl; l++)
            for (int d = 0; d < nd; d++) {
                double acc = NAN;
                for (int j = 0; j < n_cells; j++)
                    if (!strcmp(cells[j].key, key) && cells[j].length == lens[l] && cells[j].depth == deps[d] &&
                        !cells[j].skipped && cells[j].trials > 0)
                        acc = (double)cells[j].correct / cells[j].trials;
                if (isfinite(acc)) fprintf(f, "%d %d %.3f\n", d, l, acc);
                else fprintf(f, "%d %d NaN\n", d, l); /* skipped: left blank */
            }
        fprintf(f, "EOD\nset title 'budget %s  (accuracy %.3f)'\n", r->f[COL_BUDGET], kvc_sweep_cell_num(r, COL_PASSKEY_ACC));
        fprintf(f, "plot $p%d using 1:2:3 with image notitle, $p%d using 1:2:(sprintf('%%.2f', $3)) with labels "
                   "notitle\n", i, i);
    }
    fprintf(f, "unset multiplot\n");
    return gp_run(f, gp_path, png, err);
}

int kvc_sweep_plot_passkey(const sweep_table *t, const sweep_cell *cells, int n_cells, const char *dir, char **paths,
                       int max, kvc_err *err) {
    int *rows = malloc((size_t)(t->n ? t->n : 1) * sizeof *rows), written = 0;
    char *done = calloc((size_t)(t->n ? t->n : 1), 1);
    if (!rows || !done) {
        free(rows), free(done);
        return kvc_fail(err, "out of memory");
    }
    for (int i = 0; i < t->n && written >= 0; i++) {
        if (done[i] || strcmp(t->rows[i].f[COL_PROTOCOL], "passkey")) continue;
        int n = 0;
        for (int j = i; j < t->n; j++)
            if (!done[j] && !strcmp(t->rows[j].f[COL_PROTOCOL], "passkey") &&
                !strcmp(t->rows[j].f[COL_METHOD], t->rows[i].f[COL_METHOD]))
                rows[n++] = j, done[j] = 1;
        sort_table = t;
        qsort(rows, (size_t)n, sizeof(int), by_budget_desc);
        char safe[200], gp[4200], png[4200];
        file_safe(t->rows[i].f[COL_METHOD], safe, sizeof safe);
        snprintf(gp, sizeof gp, "%s/passkey_%s.gp", dir, safe);
        snprintf(png, sizeof png, "%s/passkey_%s.png", dir, safe);
        int rc = plot_method(t, rows, n, cells, n_cells, gp, png, err);
        if (rc < 0) written = -1;
        else if (rc == 0 && written < max) paths[written++] = strdup(png);
    }
    free(rows);
    free(done);
    return written;
}
