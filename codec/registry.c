/* registry.c - the one table of representations and retention policies (kvc/kvcache.h), and
 * the spec parser that turns "name:opt,key=val" into a built plug-in. A new method is one
 * file plus one line here. */
#include "kvc/kvcache.h"
#include "kvc/kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const kvc_repr_ops KVC_REPR_F32, KVC_REPR_F16, KVC_REPR_INT8, KVC_REPR_INT4, KVC_REPR_INT2, KVC_REPR_AE;
extern const kvc_keep_ops KVC_KEEP_FULL, KVC_KEEP_STREAMING, KVC_KEEP_H2O, KVC_KEEP_L2, KVC_KEEP_RANDOM, KVC_KEEP_LSH;

const kvc_repr_ops *const KVC_REPRS[] = {&KVC_REPR_F32, &KVC_REPR_F16, &KVC_REPR_INT8, &KVC_REPR_INT4, &KVC_REPR_INT2, &KVC_REPR_AE, NULL};
const kvc_keep_ops *const KVC_KEEPS[] = {&KVC_KEEP_FULL, &KVC_KEEP_STREAMING, &KVC_KEEP_H2O, &KVC_KEEP_L2, &KVC_KEEP_RANDOM, &KVC_KEEP_LSH, NULL};

const kvc_repr_ops *kvc_repr_find(const char *name) {
    for (int i = 0; KVC_REPRS[i]; i++)
        if (!strcmp(KVC_REPRS[i]->name, name)) return KVC_REPRS[i];
    return NULL;
}

const kvc_keep_ops *kvc_keep_find(const char *name) {
    for (int i = 0; KVC_KEEPS[i]; i++)
        if (!strcmp(KVC_KEEPS[i]->name, name)) return KVC_KEEPS[i];
    return NULL;
}

static void list_names(char *buf, size_t size, int repr) {
    buf[0] = '\0';
    for (int i = 0; repr ? KVC_REPRS[i] != NULL : KVC_KEEPS[i] != NULL; i++) {
        const char *nm = repr ? KVC_REPRS[i]->name : KVC_KEEPS[i]->name;
        size_t at = strlen(buf);
        snprintf(buf + at, size - at, "%s%s", i ? ", " : "", nm);
    }
}

void kvc_kvcache_list(void *fp_) {
    FILE *fp = fp_;
    fprintf(fp, "representations (--repr NAME[:OPTIONS]):\n");
    for (int i = 0; KVC_REPRS[i]; i++) fprintf(fp, "  %-10s %s\n", KVC_REPRS[i]->name, KVC_REPRS[i]->usage);
    fprintf(fp, "  %-10s %s\n", "tc", "a transform codec (kvcodec train --codec transform): tc:FILE[,sinks=S] "
                                     "(default: the codec's sinks, kept exact in f16); every layer holds the same "
                                     "tokens, so an evicting policy decides once for the model (scores summed)");
    fprintf(fp, "retention policies (--keep NAME[:OPTIONS]); every evicting policy takes\n"
                "  budget=N (tokens) or budget=F (fraction 0<F<=1, or P%%), sinks=S (default 4),\n"
                "  window=W (default 10):\n");
    for (int i = 0; KVC_KEEPS[i]; i++) fprintf(fp, "  %-10s %s\n", KVC_KEEPS[i]->name, KVC_KEEPS[i]->usage);
}

/* Splits "name:rest" into name (copied into nm) and the option text (NULL when absent). */
static int split_spec(const char *spec, char *nm, size_t cap, const char **opts, kvc_err *err) {
    if (!spec || !*spec) return kvc_fail(err, "empty method spec");
    const char *colon = strchr(spec, ':');
    size_t len = colon ? (size_t)(colon - spec) : strlen(spec);
    if (len == 0 || len >= cap) return kvc_fail(err, "bad method spec '%s'", spec);
    memcpy(nm, spec, len);
    nm[len] = '\0';
    *opts = colon && colon[1] ? colon + 1 : NULL;
    return 0;
}

/* Splits spec into nm (cap bytes) and *opts and finds the plug-in in the representation
 * table (repr = 1) or the policy table (0); NULL with err naming the known ones otherwise. */
static const void *lookup(const char *spec, int repr, char *nm, size_t cap, const char **opts, kvc_err *err) {
    char names[256];
    if (split_spec(spec, nm, cap, opts, err)) return NULL;
    const void *ops = repr ? (const void *)kvc_repr_find(nm) : (const void *)kvc_keep_find(nm);
    if (!ops) {
        list_names(names, sizeof names, repr);
        kvc_fail(err, "unknown %s '%s' (known: %s)", repr ? "representation" : "retention policy", nm, names);
    }
    return ops;
}

kvc_repr *kvc_repr_new(const char *spec, const kvc_repr_env *env, kvc_err *err) {
    char nm[32];
    const char *opts = NULL;
    const kvc_repr_ops *ops = lookup(spec, 1, nm, sizeof nm, &opts, err);
    if (!ops) return NULL;
    kvc_repr *r = calloc(1, sizeof *r);
    if (!r) { kvc_fail(err, "out of memory"); return NULL; }
    r->ops = ops;
    r->shape = env->shape;
    snprintf(r->spec, sizeof r->spec, "%s", spec);
    if (ops->init(r, opts, env, err)) {
        free(r);
        return NULL;
    }
    return r;
}

void kvc_repr_free(kvc_repr *r) {
    if (!r) return;
    if (r->ops->free) r->ops->free(r);
    free(r);
}

/* Parses an integer in [lo, hi] for option key; -1 with err otherwise. */
static int parse_int(const char *key, const char *val, long lo, long hi, long *out, kvc_err *err) {
    char *end;
    long x = strtol(val, &end, 10);
    if (!*val || *end || x < lo || x > hi)
        return kvc_fail(err, "option %s=%s: expected an integer in [%ld, %ld]", key, val, lo, hi);
    *out = x;
    return 0;
}

/* budget=N (tokens >= 1), budget=F (0 < F <= 1) or budget=P% (0 < P <= 100). */
static int parse_budget(const char *val, kvc_keep_budget *b, kvc_err *err) {
    char *end;
    double x = strtod(val, &end);
    if (end == val || !isfinite(x)) return kvc_fail(err, "option budget=%s: expected tokens, a fraction or a percentage", val);
    if (*end == '%' && end[1] == '\0') {
        if (!(x > 0 && x <= 100)) return kvc_fail(err, "option budget=%s: a percentage must be in (0, 100]", val);
        b->budget_frac = x / 100.0, b->budget_tokens = 0;
        return 0;
    }
    if (*end) return kvc_fail(err, "option budget=%s: expected tokens, a fraction or a percentage", val);
    if (x > 0 && x < 1) {
        b->budget_frac = x, b->budget_tokens = 0;
    } else if (x >= 1 && x == floor(x) && x <= 1e9) {
        b->budget_tokens = (int64_t)x, b->budget_frac = 0;
        if (x == 1 && strchr(val, '.')) b->budget_frac = 1.0, b->budget_tokens = 0; /* "1.0": everything */
    } else {
        return kvc_fail(err, "option budget=%s: expected a token count >= 1 or a fraction in (0, 1]", val);
    }
    return 0;
}

kvc_keep *kvc_keep_new(const char *spec, const kvc_cache_shape *shape, kvc_err *err) {
    char nm[32];
    const char *opts = NULL;
    const kvc_keep_ops *ops = lookup(spec, 0, nm, sizeof nm, &opts, err);
    if (!ops) return NULL;
    kvc_keep *k = calloc(1, sizeof *k);
    if (!k) { kvc_fail(err, "out of memory"); return NULL; }
    k->ops = ops;
    k->shape = *shape;
    k->evicts = strcmp(nm, "full") != 0;
    k->budget.sinks = 4;
    k->budget.window = 10;
    k->seed = 1;
    int have_budget = 0, rc = 0;
    /* the policy's defaults may differ (streaming keeps no separate window): init sees what
     * was given through k->budget, and option() may adjust its own */
    char buf[512];
    if (opts) {
        if (strlen(opts) >= sizeof buf) { rc = kvc_fail(err, "option text too long"); goto done; }
        strcpy(buf, opts);
        for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok && !rc; tok = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(tok, '=');
            if (!eq) { rc = kvc_fail(err, "%s: option '%s' is not key=value", nm, tok); break; }
            *eq = '\0';
            const char *key = tok, *val = eq + 1;
            long x = 0;
            int common = !strcmp(key, "budget") || !strcmp(key, "sinks") || !strcmp(key, "window");
            if (common && !k->evicts) {
                rc = kvc_fail(err, "policy 'full' keeps every token: it takes no %s", key);
            } else if (!strcmp(key, "budget")) {
                rc = parse_budget(val, &k->budget, err);
                have_budget = 1;
            } else if (!strcmp(key, "sinks")) {
                if (!(rc = parse_int(key, val, 0, 1000000, &x, err))) k->budget.sinks = (int)x;
            } else if (!strcmp(key, "window")) {
                if (!(rc = parse_int(key, val, 0, 1000000, &x, err))) k->budget.window = (int)x;
            } else if (!strcmp(key, "seed")) {
                char *end;
                unsigned long long s = strtoull(val, &end, 10);
                if (!*val || *end) rc = kvc_fail(err, "option seed=%s: expected an unsigned integer", val);
                else k->seed = s;
            } else if (ops->option) {
                rc = ops->option(k, key, val, err);
            } else {
                rc = kvc_fail(err, "policy '%s' has no option '%s'", nm, key);
            }
        }
    }
    if (!rc && k->evicts && !have_budget)
        rc = kvc_fail(err, "policy '%s' needs a budget (budget=N tokens or budget=F fraction)", nm);
    if (!rc && k->budget.budget_tokens > 0 && k->budget.budget_tokens < (int64_t)k->budget.sinks + k->budget.window)
        rc = kvc_fail(err, "%s: budget %lld is smaller than sinks %d + window %d", nm,
                      (long long)k->budget.budget_tokens, k->budget.sinks, k->budget.window);
    if (!rc && ops->init) rc = ops->init(k, err);
done:
    if (rc) {
        if (k->ops->free) k->ops->free(k); /* policies free half-built state */
        free(k);
        return NULL;
    }
    return k;
}

void kvc_keep_free(kvc_keep *k) {
    if (!k) return;
    if (k->ops->free) k->ops->free(k);
    free(k);
}

int64_t kvc_kvcache_select(const float *score, int64_t n, int64_t keep, int sinks, int window, uint8_t *evict) {
    memset(evict, 0, (size_t)(n > 0 ? n : 0));
    if (keep >= n) return 0;
    int64_t want = n - keep;
    int64_t *idx = malloc((size_t)want * sizeof *idx);
    if (!idx) { /* out of memory: one token at a time, the same order, no allocation */
        int64_t got = 0;
        for (; got < want; got++) {
            int64_t best = -1;
            for (int64_t i = sinks; i < n - window; i++)
                if (!evict[i] && (best < 0 || score[i] > score[best])) best = i;
            if (best < 0) break;
            evict[best] = 1;
        }
        return got;
    }
    int64_t got = kvc_topk(score, n, sinks, window, want, idx);
    for (int64_t i = 0; i < got; i++) evict[idx[i]] = 1;
    free(idx);
    return got;
}
