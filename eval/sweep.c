/* sweep.c - the grid of `kvcodec sweep` (API in kvc/sweep.h): keys from a grid file or from
 * flags, the canonical config.txt and its comparison on resume, and the expansion of
 * repr x keep x budget x latent (plus explicit points) into labelled points. */
#include "kvc/sweep.h"
#include "kvc/kvcache.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const PROTO_NAMES[SWEEP_N_PROTO] = {"context", "stream", "passkey"};

const char *kvc_sweep_protocol_name(int p) { return p >= 0 && p < SWEEP_N_PROTO ? PROTO_NAMES[p] : "?"; }

void kvc_sweep_grid_init(sweep_grid *g) {
    static const int lens[2] = {1024, 2048};
    static const double depths[5] = {0, 0.25, 0.5, 0.75, 1};
    memset(g, 0, sizeof *g);
    g->protocol[0] = SWEEP_CONTEXT;
    g->n_protocol = 1;
    g->ctx = 512, g->chunk = 32;
    g->context_len = 512, g->continuation = 64, g->samples = 8;
    memcpy(g->pk_len, lens, sizeof lens);
    g->n_pk_len = 2;
    memcpy(g->pk_depth, depths, sizeof depths);
    g->n_pk_depth = 5;
    g->trials = 3, g->seed = 1;
}

/* Frees the items of one list and empties it. */
static void items_clear(sweep_item **it, int *n) {
    for (int i = 0; i < *n; i++) {
        free((*it)[i].repr);
        free((*it)[i].keep);
    }
    free(*it);
    *it = NULL;
    *n = 0;
}

void kvc_sweep_grid_free(sweep_grid *g) {
    items_clear(&g->repr, &g->n_repr);
    items_clear(&g->keep, &g->n_keep);
    items_clear(&g->point, &g->n_point);
}

/* Copies s without leading and trailing blanks into a malloc'd string (NULL on OOM). */
static char *dup_trim(const char *s, size_t n) {
    while (n && isspace((unsigned char)*s)) s++, n--;
    while (n && isspace((unsigned char)s[n - 1])) n--;
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n), d[n] = '\0';
    return d;
}

/* Appends one item (repr and/or keep of length-bounded text) to a list. -1 with err. */
static int items_add(sweep_item **it, int *n, const char *repr, size_t nr, const char *keep, size_t nk,
                     const char *src, kvc_err *err) {
    sweep_item *p = realloc(*it, (size_t)(*n + 1) * sizeof *p);
    if (!p) return kvc_fail(err, "%s: out of memory", src);
    *it = p;
    sweep_item *x = &p[*n];
    memset(x, 0, sizeof *x);
    x->repr = repr ? dup_trim(repr, nr) : NULL;
    x->keep = keep ? dup_trim(keep, nk) : NULL;
    snprintf(x->src, sizeof x->src, "%s", src);
    if ((repr && !x->repr) || (keep && !x->keep)) return kvc_fail(err, "%s: out of memory", src);
    (*n)++;
    if ((repr && !x->repr[0]) || (keep && !x->keep[0]))
        return kvc_fail(err, "%s: empty spec", src);
    if (repr && keep && (strchr(x->repr, '|') || strchr(x->keep, '|')))
        return kvc_fail(err, "%s: a point is 'REPR | KEEP' with one '|'", src);
    return 0;
}

/* Adds the spec items of value to a list: the whole value (file) or ';'-separated items
 * (flag). Points are "REPR | KEEP". Returns 0 or -1 with err. */
static int add_specs(sweep_item **it, int *n, const char *value, int flag, int is_point, int is_keep,
                     const char *src, kvc_err *err) {
    if (flag) items_clear(it, n);
    const char *p = value;
    int k = 0;
    for (;;) {
        const char *end = flag ? strchr(p, ';') : NULL;
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char where[96];
        if (flag) snprintf(where, sizeof where, "%s item %d", src, ++k);
        else snprintf(where, sizeof where, "%s", src);
        if (is_point) {
            const char *bar = memchr(p, '|', len);
            if (!bar) return kvc_fail(err, "%s: a point is 'REPR | KEEP', got '%.*s'", where, (int)len, p);
            if (items_add(it, n, p, (size_t)(bar - p), bar + 1, len - (size_t)(bar - p) - 1, where, err)) return -1;
        } else if (items_add(it, n, is_keep ? NULL : p, len, is_keep ? p : NULL, len, where, err)) {
            return -1;
        }
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

/* Parses blank/comma/semicolon-separated numbers into x (at most SWEEP_MAX_LIST) within
 * [lo, hi] (integers when ints; lo_open: lo itself excluded). Returns the count or -1. */
static int parse_numbers(const char *s, double *x, int ints, double lo, int lo_open, double hi, const char *key,
                         const char *src, kvc_err *err) {
    int n = 0;
    const char *p = s;
    for (;;) {
        while (*p && (isspace((unsigned char)*p) || *p == ',' || *p == ';')) p++;
        if (!*p) break;
        char *end;
        errno = 0;
        double v = strtod(p, &end);
        if (end == p || errno || (*end && !isspace((unsigned char)*end) && *end != ',' && *end != ';'))
            return kvc_fail(err, "%s: %s: '%s' is not a list of numbers", src, key, s);
        if (!(v >= lo) || v > hi || (lo_open && v == lo) || (ints && v != floor(v)))
            return kvc_fail(err, "%s: %s: %g is out of range (%s %s%g..%g)", src, key, v, ints ? "integers" : "numbers",
                            lo_open ? ">" : "", lo, hi);
        if (n >= SWEEP_MAX_LIST) return kvc_fail(err, "%s: %s: more than %d values", src, key, SWEEP_MAX_LIST);
        x[n++] = v;
        p = end;
    }
    if (!n) return kvc_fail(err, "%s: %s needs at least one value", src, key);
    return n;
}

/* Parses one integer setting in [lo, hi]. Returns 0 or -1 with err. */
static int parse_int(const char *s, long long lo, long long hi, long long *out, const char *key, const char *src,
                     kvc_err *err) {
    double v;
    if (parse_numbers(s, &v, 1, (double)lo, 0, (double)hi, key, src, err) != 1)
        return err->msg[0] ? -1 : kvc_fail(err, "%s: %s takes one value", src, key);
    *out = (long long)v;
    return 0;
}

/* Copies a one-word value of at most size - 1 characters. Returns 0 or -1 with err. */
static int set_word(char *dst, size_t size, const char *value, const char *key, const char *src, kvc_err *err) {
    size_t n = strlen(value);
    if (!n || n >= size) return kvc_fail(err, "%s: %s needs a value of at most %zu characters", src, key, size - 1);
    memcpy(dst, value, n + 1);
    return 0;
}

int kvc_sweep_grid_set(sweep_grid *g, const char *key_in, const char *value_in, int flag, const char *src,
                   kvc_err *err) {
    char key[64];
    snprintf(key, sizeof key, "%s", key_in);
    for (char *c = key; *c; c++)
        if (*c == '-') *c = '_';
    char *value = dup_trim(value_in, strlen(value_in));
    if (!value) return kvc_fail(err, "%s: out of memory", src);
    double x[SWEEP_MAX_LIST];
    long long v = 0;
    int n = 0, rc = 0;
    err->msg[0] = '\0';
    if (!strcmp(key, "repr")) {
        rc = add_specs(&g->repr, &g->n_repr, value, flag, 0, 0, src, err);
    } else if (!strcmp(key, "keep")) {
        rc = add_specs(&g->keep, &g->n_keep, value, flag, 0, 1, src, err);
    } else if (!strcmp(key, "point") || !strcmp(key, "points")) {
        rc = add_specs(&g->point, &g->n_point, value, flag, 1, 0, src, err);
    } else if (!strcmp(key, "budget") || !strcmp(key, "budgets")) {
        if ((n = parse_numbers(value, x, 0, 0, 1, 1, "budget", src, err)) < 0) rc = -1;
        else memcpy(g->budget, x, sizeof(double) * (size_t)(g->n_budget = n));
    } else if (!strcmp(key, "latent") || !strcmp(key, "latents")) {
        if ((n = parse_numbers(value, x, 1, 1, 0, 65536, "latent", src, err)) < 0) rc = -1;
        else for (int i = 0; i < (g->n_latent = n); i++) g->latent[i] = (int)x[i];
    } else if (!strcmp(key, "protocol") || !strcmp(key, "protocols")) {
        int seen = 0;
        g->n_protocol = 0;
        char buf[256];
        snprintf(buf, sizeof buf, "%s", value);
        for (char *save = NULL, *t = strtok_r(buf, " \t,;", &save); t && !rc; t = strtok_r(NULL, " \t,;", &save)) {
            int p = -1;
            for (int i = 0; i < SWEEP_N_PROTO; i++)
                if (!strcmp(t, PROTO_NAMES[i])) p = i;
            if (p < 0) rc = kvc_fail(err, "%s: unknown protocol '%s' (choose from context, stream, passkey)", src, t);
            else if (!(seen & (1 << p))) seen |= 1 << p, g->protocol[g->n_protocol++] = p;
        }
        if (!rc && !g->n_protocol) rc = kvc_fail(err, "%s: protocol needs at least one of context, stream, passkey", src);
    } else if (!strcmp(key, "model")) {
        rc = set_word(g->model, sizeof g->model, value, key, src, err);
    } else if (!strcmp(key, "text") || !strcmp(key, "corpus")) {
        rc = set_word(g->text, sizeof g->text, value, key, src, err);
    } else if (!strcmp(key, "fingerprint")) {
        rc = set_word(g->fingerprint, sizeof g->fingerprint, value, key, src, err);
    } else if (!strcmp(key, "corpus_sha256")) {
        rc = set_word(g->corpus_sha256, sizeof g->corpus_sha256, value, key, src, err);
    } else if (!strcmp(key, "tokens")) {
        if (!(rc = parse_int(value, 0, 1LL << 40, &v, key, src, err))) g->tokens = v;
    } else if (!strcmp(key, "ctx")) {
        if (!(rc = parse_int(value, 2, 1 << 20, &v, key, src, err))) g->ctx = (int)v;
    } else if (!strcmp(key, "chunk")) {
        if (!(rc = parse_int(value, 1, 1 << 20, &v, key, src, err))) g->chunk = (int)v;
    } else if (!strcmp(key, "context_len")) {
        if (!(rc = parse_int(value, 1, 1 << 20, &v, key, src, err))) g->context_len = (int)v;
    } else if (!strcmp(key, "continuation")) {
        if (!(rc = parse_int(value, 2, 1 << 20, &v, key, src, err))) g->continuation = (int)v;
    } else if (!strcmp(key, "samples")) {
        if (!(rc = parse_int(value, 1, 1 << 20, &v, key, src, err))) g->samples = (int)v;
    } else if (!strcmp(key, "trials")) {
        if (!(rc = parse_int(value, 1, 1 << 20, &v, key, src, err))) g->trials = (int)v;
    } else if (!strcmp(key, "seed")) {
        char *end;
        errno = 0;
        unsigned long long s = strtoull(value, &end, 10);
        if (!*value || *end || errno || value[0] == '-') rc = kvc_fail(err, "%s: seed: '%s' is not an unsigned integer", src, value);
        else g->seed = s;
    } else if (!strcmp(key, "passkey_lengths") || !strcmp(key, "passkey_length")) {
        if ((n = parse_numbers(value, x, 1, 16, 0, 1 << 20, "passkey_lengths", src, err)) < 0) rc = -1;
        else for (int i = 0; i < (g->n_pk_len = n); i++) g->pk_len[i] = (int)x[i];
    } else if (!strcmp(key, "passkey_depths") || !strcmp(key, "passkey_depth")) {
        if ((n = parse_numbers(value, x, 0, 0, 0, 1, "passkey_depths", src, err)) < 0) rc = -1;
        else memcpy(g->pk_depth, x, sizeof(double) * (size_t)(g->n_pk_depth = n));
    } else {
        rc = kvc_fail(err, "%s: unknown key '%s' (known: repr keep point budget latent protocol model text "
                           "fingerprint corpus_sha256 tokens ctx chunk context_len continuation samples "
                           "passkey_lengths passkey_depths trials seed)", src, key_in);
    }
    free(value);
    return rc;
}

int kvc_sweep_grid_load(sweep_grid *g, const char *path, kvc_err *err) {
    char *buf = NULL;
    size_t len = 0;
    if (kvc_read_file(path, &buf, &len, err)) return -1;
    int rc = 0, lineno = 0;
    for (char *line = buf; line && !rc; lineno++) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = '\0';
        /* a comment starts with '#' at the start of the line or after a blank */
        for (char *h = line; *h; h++)
            if (*h == '#' && (h == line || isspace((unsigned char)h[-1]))) {
                *h = '\0';
                break;
            }
        char *p = line;
        while (isspace((unsigned char)*p)) p++;
        if (*p) {
            char *k = p;
            while (*p && !isspace((unsigned char)*p)) p++;
            char key[64], src[96];
            snprintf(key, sizeof key, "%.*s", (int)(p - k), k);
            snprintf(src, sizeof src, "%s:%d", path, lineno + 1);
            if (!*p) rc = kvc_fail(err, "%s: key '%s' has no value", src, key);
            else rc = kvc_sweep_grid_set(g, key, p, 0, src, err);
        }
        line = nl ? nl + 1 : NULL;
    }
    free(buf);
    return rc;
}

/* Prints "key v1 v2 ..." for a list of numbers. */
static void write_list(FILE *f, const char *key, const double *x, const int *xi, int n) {
    fprintf(f, "%s", key);
    for (int i = 0; i < n; i++) {
        if (x) fprintf(f, " %.17g", x[i]);
        else fprintf(f, " %d", xi[i]);
    }
    fprintf(f, "\n");
}

void kvc_sweep_grid_write(const sweep_grid *g, FILE *f) {
    fprintf(f, "# kvcodec sweep grid (canonical form; usable as --grid FILE)\n");
    if (g->model[0]) fprintf(f, "model %s\n", g->model);
    if (g->fingerprint[0]) fprintf(f, "fingerprint %s\n", g->fingerprint);
    if (g->text[0]) fprintf(f, "text %s\n", g->text);
    if (g->corpus_sha256[0]) fprintf(f, "corpus_sha256 %s\n", g->corpus_sha256);
    fprintf(f, "tokens %lld\nprotocol", g->tokens);
    for (int i = 0; i < g->n_protocol; i++) fprintf(f, " %s", PROTO_NAMES[g->protocol[i]]);
    fprintf(f, "\nctx %d\nchunk %d\ncontext_len %d\ncontinuation %d\nsamples %d\n", g->ctx, g->chunk, g->context_len,
            g->continuation, g->samples);
    write_list(f, "passkey_lengths", NULL, g->pk_len, g->n_pk_len);
    write_list(f, "passkey_depths", g->pk_depth, NULL, g->n_pk_depth);
    fprintf(f, "trials %d\nseed %llu\n", g->trials, g->seed);
    if (g->n_budget) write_list(f, "budget", g->budget, NULL, g->n_budget);
    if (g->n_latent) write_list(f, "latent", NULL, g->latent, g->n_latent);
    for (int i = 0; i < g->n_repr; i++) fprintf(f, "repr %s\n", g->repr[i].repr);
    for (int i = 0; i < g->n_keep; i++) fprintf(f, "keep %s\n", g->keep[i].keep);
    for (int i = 0; i < g->n_point; i++) fprintf(f, "point %s | %s\n", g->point[i].repr, g->point[i].keep);
}

int kvc_sweep_grid_compare(const sweep_grid *a, const sweep_grid *b, kvc_err *err) {
    if (strcmp(a->fingerprint, b->fingerprint))
        return kvc_fail(err, "model fingerprint %s there, %s here", a->fingerprint, b->fingerprint), 1;
    if (strcmp(a->corpus_sha256, b->corpus_sha256))
        return kvc_fail(err, "corpus sha256 %.12s... there, %.12s... here", a->corpus_sha256, b->corpus_sha256), 1;
    const struct { const char *name; long long x, y; } ints[] = {
        {"tokens", a->tokens, b->tokens}, {"ctx", a->ctx, b->ctx}, {"chunk", a->chunk, b->chunk},
        {"context_len", a->context_len, b->context_len}, {"continuation", a->continuation, b->continuation},
        {"samples", a->samples, b->samples}, {"trials", a->trials, b->trials},
        {"seed", (long long)a->seed, (long long)b->seed}, {"passkey lengths", a->n_pk_len, b->n_pk_len},
        {"passkey depths", a->n_pk_depth, b->n_pk_depth},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (ints[i].x != ints[i].y) return kvc_fail(err, "%s %lld there, %lld here", ints[i].name, ints[i].x, ints[i].y), 1;
    for (int i = 0; i < a->n_pk_len; i++)
        if (a->pk_len[i] != b->pk_len[i]) return kvc_fail(err, "passkey length %d there, %d here", a->pk_len[i], b->pk_len[i]), 1;
    for (int i = 0; i < a->n_pk_depth; i++)
        if (a->pk_depth[i] != b->pk_depth[i])
            return kvc_fail(err, "passkey depth %g there, %g here", a->pk_depth[i], b->pk_depth[i]), 1;
    return 0;
}

/* ==================================================================== expansion ==== */

/* Copies the name part of a spec ("lsh" of "lsh:bits=16"). */
static void spec_name(const char *spec, char *nm, size_t size) {
    size_t n = strcspn(spec, ":");
    snprintf(nm, size, "%.*s", (int)(n < size ? n : size - 1), spec);
}

/* The latent size named in an autoencoder file ("...ae32.h5" -> 32), or 0. */
static int latent_from_file(const char *spec) {
    const char *p = strchr(spec, ':'), *slash;
    if (!p) return 0;
    p++;
    if ((slash = strrchr(p, '/'))) p = slash + 1;
    for (const char *q = strstr(p, "ae"); q; q = strstr(q + 1, "ae"))
        if (isdigit((unsigned char)q[2])) return atoi(q + 2);
    return 0;
}

/* Short label of a representation: its name; for autoencoders "aeR[-quant][-reuse]". */
static void repr_label(const char *spec, int latent, char *out, size_t size) {
    char nm[32];
    spec_name(spec, nm, sizeof nm);
    if (!strcmp(nm, "tc") && strchr(spec, ':')) { /* the file stem (tc- before it unless it starts so), plus any options */
        const char *path = strchr(spec, ':') + 1, *end = path + strcspn(path, ",");
        const char *base = path;
        for (const char *q = path; q < end; q++)
            if (*q == '/') base = q + 1;
        size_t n = (size_t)(end - base);
        if (n > 3 && !strncmp(end - 3, ".h5", 3)) n -= 3;
        snprintf(out, size, "%s%.*s%s%s", strncmp(base, "tc", 2) ? "tc-" : "", (int)n, base, *end ? "," : "",
                 *end ? end + 1 : "");
        return;
    }
    if (strcmp(nm, "ae")) {
        snprintf(out, size, "%s", nm);
        return;
    }
    const char *quant = "", *reuse = "";
    const char *opts = strchr(spec, ':');
    const char *c = opts ? strchr(opts, ',') : NULL;
    while (c) {
        const char *o = c + 1, *e = strchr(o, ',');
        size_t n = e ? (size_t)(e - o) : strlen(o);
        if ((n == 3 && !strncmp(o, "f16", 3)) || (n == 4 && (!strncmp(o, "int8", 4) || !strncmp(o, "int4", 4))))
            quant = n == 3 ? "-f16" : !strncmp(o, "int8", 4) ? "-int8" : "-int4";
        if (n == 8 && !strncmp(o, "reuse=on", 8)) reuse = "-reuse";
        c = e;
    }
    if (latent > 0) snprintf(out, size, "ae%d%s%s", latent, quant, reuse);
    else snprintf(out, size, "ae%s%s", quant, reuse);
}

/* Replaces every "{R}" of src by R into dst. -1 when it does not fit. */
static int subst_latent(const char *src, int R, char *dst, size_t size) {
    size_t o = 0;
    for (const char *p = src; *p;) {
        if (!strncmp(p, "{R}", 3)) {
            int n = snprintf(dst + o, size - o, "%d", R);
            if (n < 0 || (size_t)n >= size - o) return -1;
            o += (size_t)n, p += 3;
        } else {
            if (o + 1 >= size) return -1;
            dst[o++] = *p++;
        }
    }
    dst[o] = '\0';
    return 0;
}

/* Growing array of points with duplicate removal. */
typedef struct {
    sweep_point *p;
    int n, cap;
} point_list;

/* Adds one point unless the same (repr, keep) is there already. -1 with err on OOM. */
static int points_push(point_list *l, const sweep_point *pt, kvc_err *err) {
    for (int i = 0; i < l->n; i++)
        if (!strcmp(l->p[i].repr, pt->repr) && !strcmp(l->p[i].keep, pt->keep)) return 0;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 32;
        sweep_point *q = realloc(l->p, (size_t)cap * sizeof *q);
        if (!q) return kvc_fail(err, "out of memory");
        l->p = q, l->cap = cap;
    }
    l->p[l->n++] = *pt;
    return 0;
}

/* Expands one (repr, keep) pair over budgets (when keep evicts and names no budget); repr
 * has its {R} substituted already (latent: the value, or 0). keep_in_grid: budget= is
 * refused. Returns 0 or -1 with err. */
static int expand_pair(const sweep_grid *g, const char *repr, int latent, const char *keep, const char *rsrc,
                       const char *ksrc, int keep_in_grid, point_list *out, kvc_err *err) {
    char rname[32], kname[32];
    spec_name(repr, rname, sizeof rname);
    spec_name(keep, kname, sizeof kname);
    /* "tc" (a transform codec) is a cache of its own rather than a plug-in of the registry */
    if (!kvc_repr_find(rname) && strcmp(rname, "tc"))
        return kvc_fail(err, "%s: unknown representation '%s' in '%s'", rsrc, rname, repr);
    if (!kvc_keep_find(kname)) return kvc_fail(err, "%s: unknown retention policy '%s' in '%s'", ksrc, kname, keep);
    const char *kopts = strchr(keep, ':');
    const int has_budget = kopts && (strstr(kopts, ":budget=") || strstr(kopts, ",budget="));
    const int evicts = strcmp(kname, "full") != 0;
    if (has_budget && keep_in_grid)
        return kvc_fail(err, "%s: '%s': keep specs take no budget= (list fractions on a budget line)", ksrc, keep);
    if (evicts && !has_budget && !g->n_budget)
        return kvc_fail(err, "%s: policy '%s' evicts but no budgets are given (budget 0.5 0.25 ...)", ksrc, kname);
    const int n_bud = evicts && !has_budget ? g->n_budget : 1;
    for (int bi = 0; bi < n_bud; bi++) {
        sweep_point pt;
        memset(&pt, 0, sizeof pt);
        snprintf(pt.src, sizeof pt.src, "%s", rsrc);
        if (strlen(repr) >= sizeof pt.repr) return kvc_fail(err, "%s: repr spec too long", rsrc);
        strcpy(pt.repr, repr);
        pt.latent = latent > 0 ? latent : (!strcmp(rname, "ae") ? latent_from_file(repr) : 0);
        if (strlen(keep) >= sizeof pt.keep_base) return kvc_fail(err, "%s: keep spec too long", ksrc);
        strcpy(pt.keep_base, keep);
        if (evicts && !has_budget) {
            const double b = g->budget[bi];
            char bs[32];
            if (b == 1) snprintf(bs, sizeof bs, "1.0"); /* "1" would mean one token */
            else snprintf(bs, sizeof bs, "%.10g", b);
            int n = snprintf(pt.keep, sizeof pt.keep, "%s%sbudget=%s", keep, kopts ? "," : ":", bs);
            if (n < 0 || (size_t)n >= sizeof pt.keep) return kvc_fail(err, "%s: keep spec too long", ksrc);
            pt.budget = b;
        } else {
            strcpy(pt.keep, keep);
            pt.budget = 1;
            if (has_budget) { /* an explicit point: the budget column shows what it asked for */
                char *kb = strstr(pt.keep_base, "budget=");
                const char *bv = kb + 7;
                pt.budget = strtod(bv, NULL);
                if (bv[strcspn(bv, ",%")] == '%') pt.budget /= 100;
                /* keep_base without the budget option, for the label */
                char *e = kb + strcspn(kb, ",");
                memmove(kb, *e ? e + 1 : e, strlen(*e ? e + 1 : e) + 1);
                size_t n = strlen(pt.keep_base);
                if (n && (pt.keep_base[n - 1] == ',' || pt.keep_base[n - 1] == ':')) pt.keep_base[n - 1] = '\0';
            }
        }
        char rl[64];
        repr_label(pt.repr, pt.latent, rl, sizeof rl);
        snprintf(pt.method, sizeof pt.method, "%s+%s", rl, kname);
        if (points_push(out, &pt, err)) return -1;
    }
    return 0;
}

/* Expands a repr over the latents when it holds {R} (else once), each against keeps (n_keep
 * specs, the grid's or one point's). Returns 0 or -1 with err. */
static int expand_repr(const sweep_grid *g, const char *repr, const char *rsrc, const sweep_item *keeps, int n_keep,
                       int keep_in_grid, point_list *out, kvc_err *err) {
    const int has_r = strstr(repr, "{R}") != NULL;
    if (has_r && !g->n_latent)
        return kvc_fail(err, "%s: '%s' holds {R} but no latent sizes are given (latent 16 32)", rsrc, repr);
    for (int li = 0; li < (has_r ? g->n_latent : 1); li++) {
        char r[512];
        if (has_r ? subst_latent(repr, g->latent[li], r, sizeof r) : snprintf(r, sizeof r, "%s", repr) >= (int)sizeof r)
            return kvc_fail(err, "%s: repr spec too long", rsrc);
        for (int k = 0; k < n_keep; k++)
            if (expand_pair(g, r, has_r ? g->latent[li] : 0, keeps[k].keep, rsrc, keep_in_grid ? keeps[k].src : rsrc,
                            keep_in_grid, out, err))
                return -1;
    }
    return 0;
}

int kvc_sweep_expand(const sweep_grid *g, sweep_point **pts, int *n_pts, kvc_err *err) {
    point_list l = {0};
    *pts = NULL;
    *n_pts = 0;
    if (g->n_repr && !g->n_keep) return kvc_fail(err, "repr specs are given but no keep specs (keep full)");
    if (g->n_keep && !g->n_repr) return kvc_fail(err, "keep specs are given but no repr specs (repr f16)");
    for (int r = 0; r < g->n_repr; r++)
        if (expand_repr(g, g->repr[r].repr, g->repr[r].src, g->keep, g->n_keep, 1, &l, err)) goto fail;
    for (int i = 0; i < g->n_point; i++)
        if (expand_repr(g, g->point[i].repr, g->point[i].src, &g->point[i], 1, 0, &l, err)) goto fail;
    if (!l.n) {
        kvc_fail(err, "the grid has no points (give repr and keep lists, or point lines)");
        goto fail;
    }
    /* a label shared by different configurations would merge their curves: spell those out */
    char *clash = calloc((size_t)l.n, 1);
    if (!clash) {
        kvc_fail(err, "out of memory");
        goto fail;
    }
    for (int i = 0; i < l.n; i++)
        for (int j = 0; j < l.n && !clash[i]; j++)
            clash[i] = !strcmp(l.p[i].method, l.p[j].method) &&
                       (strcmp(l.p[i].repr, l.p[j].repr) || strcmp(l.p[i].keep_base, l.p[j].keep_base));
    for (int i = 0; i < l.n; i++)
        if (clash[i]) snprintf(l.p[i].method, sizeof l.p[i].method, "%.79s+%.79s", l.p[i].repr, l.p[i].keep_base);
    free(clash);
    *pts = l.p;
    *n_pts = l.n;
    return 0;
fail:
    free(l.p);
    return -1;
}
