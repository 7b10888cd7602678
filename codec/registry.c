/* registry.c - the one table of representations and retention policies (kvc/kvcache.h), and
 * the spec parser that turns "name:opt,key=val" into a built plug-in. A new method is one
 * file plus one line here. */
#include "kvc/kvcache.h"
#include "kvc/kernels.h"
#include "kvc/sidestore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const kvc_repr_ops KVC_REPR_F32, KVC_REPR_F16, KVC_REPR_INT8, KVC_REPR_INT4, KVC_REPR_INT2, KVC_REPR_AE;
extern const kvc_keep_ops KVC_KEEP_FULL, KVC_KEEP_STREAMING, KVC_KEEP_H2O, KVC_KEEP_L2, KVC_KEEP_RANDOM, KVC_KEEP_LSH,
    KVC_KEEP_OBSERVED, KVC_KEEP_SNAPKV, KVC_KEEP_TOVA;

const kvc_repr_ops *const KVC_REPRS[] = {&KVC_REPR_F32,  &KVC_REPR_F16,  &KVC_REPR_INT8,
                                         &KVC_REPR_INT4, &KVC_REPR_INT2, &KVC_REPR_AE, NULL};
const kvc_keep_ops *const KVC_KEEPS[] = {&KVC_KEEP_FULL,     &KVC_KEEP_STREAMING, &KVC_KEEP_H2O,
                                         &KVC_KEEP_L2,       &KVC_KEEP_RANDOM,    &KVC_KEEP_LSH,
                                         &KVC_KEEP_OBSERVED, &KVC_KEEP_SNAPKV,    &KVC_KEEP_TOVA,
                                         NULL};

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
                "  window=W (default 10), share=head|layer|global (one budget per head, per layer or\n"
                "  for the whole cache, spread by score; default head), floor=F (share: least fraction of\n"
                "  the per-head budget a head keeps, default 0), and retrieval of evicted tokens:\n"
                "  retrieve=R (1..%d nearest evicted tokens per query and kv head; default 0 = off),\n"
                "  rbits=B (index bits 8..64, 32), rstore=int4|int8 (int4), rerank=C (re-rank C*R\n"
                "  candidates by their true logit, 1), rprobe=mean|each (mean), spill=DIR (rows on disk):\n",
                KVC_RETRIEVE_MAX);
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

/* share=head|layer|global. */
static int parse_share(const char *val, int *share, kvc_err *err) {
    static const char *const NAMES[3] = {"head", "layer", "global"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(val, NAMES[i])) {
            *share = i;
            return 0;
        }
    return kvc_fail(err, "option share=%s: expected head, layer or global", val);
}

/* A fraction in [lo, hi] for option key; -1 with err otherwise. */
static int parse_frac(const char *key, const char *val, double lo, double hi, double *out, kvc_err *err) {
    char *end;
    double x = strtod(val, &end);
    if (end == val || *end || !isfinite(x) || x < lo || x > hi)
        return kvc_fail(err, "option %s=%s: expected a number in [%g, %g]", key, val, lo, hi);
    *out = x;
    return 0;
}

/* The retrieval options (kvc_keep_retrieval); 1 when key is not one of them. */
static int retrieval_option(kvc_keep_retrieval *r, const char *key, const char *val, kvc_err *err) {
    long x = 0;
    if (!strcmp(key, "retrieve")) {
        if (parse_int(key, val, 0, KVC_RETRIEVE_MAX, &x, err)) return -1;
        r->r = (int)x;
    } else if (!strcmp(key, "rbits")) {
        if (parse_int(key, val, 8, 64, &x, err)) return -1;
        r->bits = (int)x;
    } else if (!strcmp(key, "rstore")) {
        if (strcmp(val, "4") && strcmp(val, "8") && strcmp(val, "int4") && strcmp(val, "int8"))
            return kvc_fail(err, "option rstore=%s: expected int4 or int8", val);
        r->qbits = strchr(val, '8') ? 8 : 4;
    } else if (!strcmp(key, "rerank")) {
        if (parse_int(key, val, 1, 64, &x, err)) return -1;
        r->rerank = (int)x;
    } else if (!strcmp(key, "rprobe")) {
        if (!strcmp(val, "mean")) r->probe_each = 0;
        else if (!strcmp(val, "each")) r->probe_each = 1;
        else return kvc_fail(err, "option rprobe=%s: expected mean or each", val);
    } else if (!strcmp(key, "spill")) {
        if (!*val || strlen(val) >= sizeof r->spill) return kvc_fail(err, "option spill=%s: expected a directory (under 256 bytes)", val);
        snprintf(r->spill, sizeof r->spill, "%s", val);
    } else {
        return 1;
    }
    return 0;
}

/* Applies one option text "key=val,key=val" (a preset's defaults or the user's) to k. */
static int apply_options(kvc_keep *k, const char *nm, const char *opts, int *have_budget, kvc_err *err) {
    char buf[512];
    int rc = 0;
    if (strlen(opts) >= sizeof buf) return kvc_fail(err, "option text too long");
    strcpy(buf, opts);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok && !rc; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq) return kvc_fail(err, "%s: option '%s' is not key=value", nm, tok);
        *eq = '\0';
        const char *key = tok, *val = eq + 1;
        long x = 0;
        int common = !strcmp(key, "budget") || !strcmp(key, "sinks") || !strcmp(key, "window") ||
                     !strcmp(key, "share") || !strcmp(key, "floor") || !strcmp(key, "retrieve") ||
                     !strcmp(key, "rbits") || !strcmp(key, "rstore") || !strcmp(key, "rerank") ||
                     !strcmp(key, "rprobe") || !strcmp(key, "spill");
        if (common && !k->evicts) {
            rc = kvc_fail(err, "policy 'full' keeps every token: it takes no %s", key);
        } else if (!strcmp(key, "budget")) {
            rc = parse_budget(val, &k->budget, err);
            *have_budget = 1;
        } else if (!strcmp(key, "sinks")) {
            if (!(rc = parse_int(key, val, 0, 1000000, &x, err))) k->budget.sinks = (int)x;
        } else if (!strcmp(key, "window")) {
            if (!(rc = parse_int(key, val, 0, 1000000, &x, err))) k->budget.window = (int)x;
        } else if (!strcmp(key, "share")) {
            rc = parse_share(val, &k->budget.share, err);
        } else if (!strcmp(key, "floor")) {
            rc = parse_frac(key, val, 0.0, 1.0, &k->budget.floor, err);
        } else if (common) {
            rc = retrieval_option(&k->retrieval, key, val, err);
        } else if (!strcmp(key, "seed")) {
            char *end;
            unsigned long long s = strtoull(val, &end, 10);
            if (!*val || *end) rc = kvc_fail(err, "option seed=%s: expected an unsigned integer", val);
            else k->seed = s;
        } else if (k->ops->option) {
            rc = k->ops->option(k, key, val, err);
        } else {
            rc = kvc_fail(err, "policy '%s' has no option '%s'", nm, key);
        }
    }
    return rc;
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
    k->retrieval = (kvc_keep_retrieval){.r = 0, .bits = 32, .qbits = 4, .rerank = 1};
    int have_budget = 0, rc = 0;
    /* the policy's defaults may differ (streaming keeps no separate window): init sees what
     * was given through k->budget, and option() may adjust its own; a preset's defaults come
     * first, so the user's options override them */
    if (ops->defaults) rc = apply_options(k, nm, ops->defaults, &have_budget, err);
    if (!rc && opts) rc = apply_options(k, nm, opts, &have_budget, err);
    if (!rc && k->evicts && !have_budget)
        rc = kvc_fail(err, "policy '%s' needs a budget (budget=N tokens or budget=F fraction)", nm);
    if (!rc && k->budget.budget_tokens > 0 && k->budget.budget_tokens < (int64_t)k->budget.sinks + k->budget.window)
        rc = kvc_fail(err, "%s: budget %lld is smaller than sinks %d + window %d", nm,
                      (long long)k->budget.budget_tokens, k->budget.sinks, k->budget.window);
    if (!rc && k->retrieval.r == 0 &&
        (k->retrieval.bits != 32 || k->retrieval.qbits != 4 || k->retrieval.rerank != 1 || k->retrieval.probe_each ||
         k->retrieval.spill[0]))
        rc = kvc_fail(err, "%s: rbits, rstore, rerank, rprobe and spill need retrieve=R (R >= 1)", nm);
    if (!rc && k->budget.floor > 0 && k->budget.share == KVC_SHARE_HEAD)
        rc = kvc_fail(err, "%s: floor= needs share=layer or share=global", nm);
    if (!rc && ops->init) rc = ops->init(k, err);
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

/* One candidate of a shared budget: its score, position in its head, head and index. */
typedef struct {
    float score;
    int32_t head;
    int64_t idx;
} shared_cand;

/* qsort order: the first to evict first (higher score; ties the lower index, then head). */
static int cand_cmp(const void *pa, const void *pb) {
    const shared_cand *a = pa, *b = pb;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    if (a->idx != b->idx) return a->idx < b->idx ? -1 : 1;
    return (a->head > b->head) - (a->head < b->head);
}

int64_t kvc_kvcache_select_shared(const float *const *score, const int64_t *n, int n_heads, int64_t keep, int sinks,
                                  int window, int64_t min_keep, uint8_t *const *evict) {
    int64_t total = 0, pool = 0;
    for (int h = 0; h < n_heads; h++) {
        memset(evict[h], 0, (size_t)(n[h] > 0 ? n[h] : 0));
        total += n[h];
    }
    if (keep >= total) return 0;
    /* per head: its candidates in eviction order; the last `floor` of them are kept */
    int64_t *cap_idx = NULL, biggest = 0;
    for (int h = 0; h < n_heads; h++) biggest = n[h] > biggest ? n[h] : biggest;
    cap_idx = malloc((size_t)(biggest > 0 ? biggest : 1) * sizeof *cap_idx);
    shared_cand *c = malloc((size_t)(total > 0 ? total : 1) * sizeof *c);
    if (!cap_idx || !c) {
        free(cap_idx), free(c);
        return -1;
    }
    for (int h = 0; h < n_heads; h++) {
        const int64_t lo = sinks < n[h] ? sinks : n[h], hi = n[h] - window > lo ? n[h] - window : lo;
        const int64_t prot = n[h] - (hi - lo);
        const int64_t floor_left = min_keep > prot ? (min_keep < n[h] ? min_keep : n[h]) - prot : 0;
        const int64_t may = (hi - lo) - floor_left; /* candidates this head may give up */
        if (may <= 0) continue;
        /* its `may` first in eviction order: the top-k of the head's own ranking */
        int64_t got = kvc_topk(score[h], n[h], lo, n[h] - hi, may, cap_idx);
        for (int64_t i = 0; i < got; i++) c[pool++] = (shared_cand){score[h][cap_idx[i]], h, cap_idx[i]};
    }
    qsort(c, (size_t)pool, sizeof *c, cand_cmp);
    const int64_t want = total - keep < pool ? total - keep : pool;
    for (int64_t i = 0; i < want; i++) evict[c[i].head][c[i].idx] = 1;
    free(cap_idx), free(c);
    return want;
}
