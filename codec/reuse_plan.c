/* reuse_plan.c - the inference half of cross-layer KV reuse (KV-CAR): a model's reuse plan
 * (which layer's K/V of which head is predicted from the layer below, identity or a linear
 * map), applying a map, the choice of what to reuse from measured errors, and the layer x
 * head report. Fitting the maps on a dataset is train/reuse.c.
 * Letters: L model layers, Hk KV heads, D head_dim, N rows; row-major throughout. */
#include "kvc/reuse.h"
#include "kvc/kernels.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- apply ------------------------------------------------------------------------------ */

/* y (D) = W x + b for one row x (D): each output a kvc_dot_f32 (fixed summation order). */
static inline void predict_row(int d, const float *w, const float *b, const float *x, float *y) {
    for (int i = 0; i < d; i++) y[i] = kvc_dot_f32(w + (size_t)i * d, x, d) + b[i];
}

void kvc_reuse_apply(int d, const float *w, const float *b, const float *src, int64_t ld_src, float *dst,
                     int64_t ld_dst, int64_t n) {
    for (int64_t r = 0; r < n; r++) predict_row(d, w, b, src + r * ld_src, dst + r * ld_dst);
}

/* ---- choices and options ------------------------------------------------------------ */

static const char *const CHOICE_NAMES[] = {"none", "identity", "linear"};

const char *kvc_reuse_choice_name(reuse_choice c) {
    return (unsigned)c < sizeof CHOICE_NAMES / sizeof *CHOICE_NAMES ? CHOICE_NAMES[c] : "?";
}

int kvc_reuse_choice_parse(const char *s, reuse_choice *out) {
    for (int c = 0; c < (int)(sizeof CHOICE_NAMES / sizeof *CHOICE_NAMES); c++)
        if (strcmp(s, CHOICE_NAMES[c]) == 0) {
            *out = (reuse_choice)c;
            return 0;
        }
    return -1;
}

int kvc_reuse_option_parse(const char *s, reuse_option *o, kvc_err *err) {
    static const char usage[] = "expected threshold=X (relative error, X > 0) or heads=N (N >= 0 items to reuse)";
    if (!s) return kvc_fail(err, "reuse option missing: %s", usage);
    const char *v;
    char *end;
    if (strncmp(s, "threshold=", 10) == 0) {
        v = s + 10;
        if (*v == '\0' || isspace((unsigned char)*v)) return kvc_fail(err, "reuse option '%s': %s", s, usage);
        errno = 0;
        double t = strtod(v, &end);
        if (*end != '\0' || errno == ERANGE) return kvc_fail(err, "reuse option '%s': '%s' is not a number", s, v);
        if (!isfinite(t) || t <= 0)
            return kvc_fail(err, "reuse option '%s': the threshold must be a finite number > 0", s);
        *o = (reuse_option){.mode = REUSE_BY_THRESHOLD, .threshold = t, .heads = 0};
        return 0;
    }
    if (strncmp(s, "heads=", 6) == 0) {
        v = s + 6;
        if (*v == '\0' || isspace((unsigned char)*v)) return kvc_fail(err, "reuse option '%s': %s", s, usage);
        errno = 0;
        long h = strtol(v, &end, 10);
        if (*end != '\0') return kvc_fail(err, "reuse option '%s': '%s' is not a whole number", s, v);
        if (h < 0) return kvc_fail(err, "reuse option '%s': heads must be >= 0", s);
        if (errno == ERANGE || h > INT_MAX) return kvc_fail(err, "reuse option '%s': heads is too large", s);
        *o = (reuse_option){.mode = REUSE_BY_HEADS, .threshold = 0, .heads = (int)h};
        return 0;
    }
    return kvc_fail(err, "reuse option '%s': %s", s, usage);
}

void kvc_reuse_option_format(const reuse_option *o, char *buf, size_t size) {
    if (o->mode == REUSE_BY_HEADS) {
        snprintf(buf, size, "heads=%d", o->heads);
        return;
    }
    for (int prec = 6; prec <= 17; prec++) { /* shortest text that parses back to the same value */
        snprintf(buf, size, "threshold=%.*g", prec, o->threshold);
        if (strtod(buf + 10, NULL) == o->threshold) return;
    }
}

/* ---- plan --------------------------------------------------------------------------- */

reuse_plan *kvc_reuse_plan_new(int n_layer, int n_head_kv, int head_dim, kvc_err *err) {
    if (n_layer < 2 || n_head_kv < 1 || head_dim < 1) {
        kvc_fail(err, "reuse plan: needs >= 2 layers, >= 1 KV head and head_dim >= 1 (got %d, %d, %d)", n_layer,
                 n_head_kv, head_dim);
        return NULL;
    }
    reuse_plan *p = calloc(1, sizeof *p);
    if (!p) goto oom;
    p->n_layer = n_layer;
    p->n_head_kv = n_head_kv;
    p->head_dim = head_dim;
    p->n_items = (n_layer - 1) * n_head_kv * 2;
    p->ridge = NAN;
    size_t per = (size_t)head_dim * head_dim + head_dim;
    p->items = kvc_calloc_array((size_t)p->n_items, sizeof *p->items);
    p->maps = kvc_calloc_array((size_t)p->n_items, per * sizeof(float));
    p->stored = malloc((size_t)n_layer);
    if (!p->items || !p->maps || !p->stored) goto oom;
    memset(p->stored, -1, (size_t)n_layer);
    for (int i = 0; i < p->n_items; i++) {
        reuse_item *it = &p->items[i];
        it->layer = 1 + i / (2 * n_head_kv);
        it->head = (i / 2) % n_head_kv;
        it->kind = i % 2 ? KV_V : KV_K;
        it->cos_identity = it->err_identity = it->err_linear = NAN;
        it->chosen = REUSE_NONE;
        it->w = p->maps + (size_t)i * per;
        it->b = it->w + (size_t)head_dim * head_dim;
    }
    return p;
oom:
    kvc_reuse_plan_free(p);
    kvc_fail(err, "reuse plan: out of memory (%d layers, %d KV heads, head_dim %d)", n_layer, n_head_kv, head_dim);
    return NULL;
}

void kvc_reuse_plan_free(reuse_plan *p) {
    if (!p) return;
    free(p->items);
    free(p->maps);
    free(p->stored);
    free(p);
}

reuse_item *kvc_reuse_plan_item(reuse_plan *p, int layer, int head, int kind) {
    if (layer < 1 || layer >= p->n_layer || head < 0 || head >= p->n_head_kv || (kind != KV_K && kind != KV_V))
        return NULL;
    return &p->items[((size_t)(layer - 1) * p->n_head_kv + head) * 2 + (kind == KV_V)];
}

int kvc_reuse_plan_count(const reuse_plan *p, int *n_analysed, int *n_identity, int *n_linear) {
    int a = 0, id = 0, lin = 0;
    for (int i = 0; i < p->n_items; i++) {
        a += p->items[i].analysed != 0;
        id += p->items[i].chosen == REUSE_IDENTITY;
        lin += p->items[i].chosen == REUSE_LINEAR;
    }
    if (n_identity) *n_identity = id;
    if (n_linear) *n_linear = lin;
    if (n_analysed) *n_analysed = a;
    return a;
}

/* The smaller of an item's two validation errors (NaN counts as +inf). */
static double item_best(const reuse_item *it) {
    double l = isnan(it->err_linear) ? INFINITY : it->err_linear;
    double i = isnan(it->err_identity) ? INFINITY : it->err_identity;
    return i <= l ? i : l;
}

/* Identity when it is as good as the map (it needs no map), else linear. */
static reuse_choice item_kind(const reuse_item *it) {
    return !isnan(it->err_identity) && !(it->err_identity > it->err_linear) ? REUSE_IDENTITY : REUSE_LINEAR;
}

/* A candidate for heads=N: its best error and item index. */
typedef struct {
    double best;
    int idx;
} ranked;

/* qsort order for heads=N: best error ascending, then item index (layer, head, K before V). */
static int cmp_ranked(const void *pa, const void *pb) {
    const ranked *a = pa, *b = pb;
    if (a->best != b->best) return a->best < b->best ? -1 : 1;
    return (a->idx > b->idx) - (a->idx < b->idx);
}

int kvc_reuse_plan_choose(reuse_plan *p, const reuse_option *o, kvc_err *err) {
    int n_an = kvc_reuse_plan_count(p, NULL, NULL, NULL);
    if (o->mode == REUSE_BY_HEADS && o->heads > n_an)
        return kvc_fail(err, "reuse option heads=%d: only %d items (layer, KV head, K|V) were analysed", o->heads,
                        n_an);
    if (o->mode == REUSE_BY_THRESHOLD && !(o->threshold > 0 && isfinite(o->threshold)))
        return kvc_fail(err, "reuse option threshold=%g: the threshold must be a finite number > 0", o->threshold);
    for (int i = 0; i < p->n_items; i++) p->items[i].chosen = REUSE_NONE;
    if (o->mode == REUSE_BY_THRESHOLD) {
        for (int i = 0; i < p->n_items; i++) {
            reuse_item *it = &p->items[i];
            if (it->analysed && item_best(it) <= o->threshold) it->chosen = item_kind(it);
        }
    } else if (o->heads > 0) {
        ranked *r = kvc_malloc_array((size_t)n_an, sizeof *r);
        int m = 0;
        if (!r) return kvc_fail(err, "reuse plan: out of memory");
        for (int i = 0; i < p->n_items; i++)
            if (p->items[i].analysed) r[m++] = (ranked){item_best(&p->items[i]), i};
        qsort(r, (size_t)m, sizeof *r, cmp_ranked);
        for (int k = 0; k < o->heads; k++) p->items[r[k].idx].chosen = item_kind(&p->items[r[k].idx]);
        free(r);
    }
    p->option = *o;
    p->chosen_set = 1;
    return 0;
}

/* Formats an error into a 6-character cell. */
static void format_err(double e, char *buf, size_t size) {
    if (isnan(e)) snprintf(buf, size, "%6s", "nan");
    else if (e < 9.9995) snprintf(buf, size, "%6.3f", e);
    else if (e < 999.95) snprintf(buf, size, "%6.1f", e);
    else snprintf(buf, size, "%6s", ">999");
}

/* Writes line without its trailing spaces, then a newline. */
static void put_trimmed(FILE *fp, char *line) {
    size_t n = strlen(line);
    while (n > 0 && line[n - 1] == ' ') line[--n] = '\0';
    fprintf(fp, "%s\n", line);
}

void kvc_reuse_plan_print(const reuse_plan *p, FILE *fp) {
    const int hk = p->n_head_kv;
    size_t cap = 16 + (size_t)hk * 40;
    char *line = malloc(cap);
    if (!line) {
        fprintf(fp, "reuse table: out of memory\n");
        return;
    }
    fprintf(fp, "cross-layer reuse: x_l from x_{l-1} (same KV head), relative error on\n"
                "validation rows ||x_l - x_l_hat||_F / ||x_l||_F, best of linear map and identity\n");
    size_t at = (size_t)snprintf(line, cap, "layer");
    for (int h = 0; h < hk; h++) { /* columns line up with the cells below */
        char k[16], v[16];
        snprintf(k, sizeof k, "h%d.K", h);
        snprintf(v, sizeof v, "h%d.V", h);
        at += (size_t)snprintf(line + at, cap - at, "  %6s  %6s ", k, v);
    }
    put_trimmed(fp, line);
    for (int l = 1; l < p->n_layer; l++) {
        const reuse_item *row = &p->items[(size_t)(l - 1) * hk * 2];
        int any = 0;
        for (int i = 0; i < hk * 2; i++) any |= row[i].analysed;
        if (!any) {
            if (p->stored[l - 1] == 0) fprintf(fp, "%5d  not analysed: layer %d not stored\n", l, l - 1);
            else if (p->stored[l] == 0) fprintf(fp, "%5d  not analysed: layer %d not stored\n", l, l);
            else fprintf(fp, "%5d  not analysed\n", l);
            continue;
        }
        at = (size_t)snprintf(line, cap, "%5d", l);
        for (int i = 0; i < hk * 2; i++) {
            char cell[16] = "     -";
            if (row[i].analysed) format_err(item_best(&row[i]), cell, sizeof cell);
            char mark = row[i].chosen == REUSE_LINEAR ? 'L' : row[i].chosen == REUSE_IDENTITY ? 'I' : ' ';
            at += (size_t)snprintf(line + at, cap - at, "%s%s%c", i % 2 ? " " : "  ", cell, mark);
        }
        put_trimmed(fp, line);
    }
    free(line);
    int n_an, n_id, n_lin;
    kvc_reuse_plan_count(p, &n_an, &n_id, &n_lin);
    fprintf(fp, "L: reuse via W x_{l-1} + b; I: reuse layer l-1 as is; no mark: not reused\n");
    if (p->chosen_set) {
        char opt[64];
        kvc_reuse_option_format(&p->option, opt, sizeof opt);
        fprintf(fp, "%s: %d linear + %d identity reused, of %d analysed (%d items in all)\n", opt, n_lin, n_id,
                n_an, p->n_items);
    } else {
        fprintf(fp, "nothing chosen yet: %d of %d items analysed\n", n_an, p->n_items);
    }
}

int kvc_reuse_item_predict(const reuse_plan *p, const reuse_item *it, const float *src, int64_t ld_src, float *dst,
                       int64_t ld_dst, int64_t n) {
    const int d = p->head_dim;
    if (it->chosen == REUSE_LINEAR) {
        kvc_reuse_apply(d, it->w, it->b, src, ld_src, dst, ld_dst, n);
        return 0;
    }
    if (it->chosen == REUSE_IDENTITY) {
        for (int64_t r = 0; r < n; r++) memcpy(dst + r * ld_dst, src + r * ld_src, (size_t)d * sizeof(float));
        return 0;
    }
    return -1;
}
