/* reuse.c - fitting cross-layer KV reuse (KV-CAR) on a dataset: streaming least-squares maps
 * from layer l-1 to layer l per KV head and K/V and their validation errors next to plain
 * identity reuse. The plan they fill and its use at inference are codec/reuse_plan.c.
 * Letters: L model layers, Hk KV heads, D head_dim, N rows; row-major throughout. */
#include "kvc/reuse_fit.h"

#include <cblas.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Rows per block the fit centres and multiplies at once (bounds the scratch memory). */
#define FIT_CHUNK 1024

/* ---- one map -------------------------------------------------------------------------- */

struct reuse_fit {
    int d;          /* D */
    int64_t n;      /* rows added */
    double *mx;     /* (D) running mean of src */
    double *my;     /* (D) running mean of dst */
    double *cxx;    /* (D, D) sum (x - mx)(x - mx)^T, upper triangle only */
    double *cxy;    /* (D, D) [j][i] = sum (x_j - mx_j)(y_i - my_i) */
    double *own;    /* scratch of a standalone fit (see fit_scratch_len), else NULL */
};

/* Doubles of scratch one accumulation needs: centred src and dst blocks (FIT_CHUNK, D) and
 * their means (D) each. */
static size_t fit_scratch_len(int d) { return 2 * (size_t)FIT_CHUNK * d + 2 * (size_t)d; }

/* Allocates a zeroed fit; with_scratch gives it its own scratch (standalone use). */
static reuse_fit *fit_alloc(int d, int with_scratch) {
    reuse_fit *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->d = d;
    f->mx = kvc_calloc_array((size_t)d, sizeof(double));
    f->my = kvc_calloc_array((size_t)d, sizeof(double));
    f->cxx = kvc_calloc_array((size_t)d * d, sizeof(double));
    f->cxy = kvc_calloc_array((size_t)d * d, sizeof(double));
    if (with_scratch) f->own = kvc_malloc_array(fit_scratch_len(d), sizeof(double));
    if (!f->mx || !f->my || !f->cxx || !f->cxy || (with_scratch && !f->own)) {
        kvc_reuse_fit_free(f);
        return NULL;
    }
    return f;
}

reuse_fit *kvc_reuse_fit_new(int d, kvc_err *err) {
    if (d < 1) { kvc_fail(err, "reuse fit: dimension %d must be >= 1", d); return NULL; }
    reuse_fit *f = fit_alloc(d, 1);
    if (!f) kvc_fail(err, "reuse fit: out of memory (D=%d)", d);
    return f;
}

void kvc_reuse_fit_free(reuse_fit *f) {
    if (!f) return;
    free(f->mx);
    free(f->my);
    free(f->cxx);
    free(f->cxy);
    free(f->own);
    free(f);
}

int64_t kvc_reuse_fit_rows(const reuse_fit *f) { return f->n; }

/* Adds n row pairs to f using scratch (fit_scratch_len doubles): per block of FIT_CHUNK rows,
 * centre on the block means, add the block's centred products (dsyrk/dgemm) and merge the
 * means with the pairwise update of Chan, Golub and LeVeque. */
static void fit_accumulate(reuse_fit *f, const float *src, int64_t ld_src, const float *dst, int64_t ld_dst,
                           int64_t n, double *scratch) {
    const int d = f->d;
    double *xs = scratch, *ys = xs + (size_t)FIT_CHUNK * d; /* (FIT_CHUNK, D) each */
    double *bx = ys + (size_t)FIT_CHUNK * d, *by = bx + d;  /* (D) block means */
    for (int64_t r0 = 0; r0 < n; r0 += FIT_CHUNK) {
        int nb = (int)(n - r0 < FIT_CHUNK ? n - r0 : FIT_CHUNK);
        for (int k = 0; k < d; k++) bx[k] = by[k] = 0;
        for (int i = 0; i < nb; i++) {
            const float *x = src + (r0 + i) * ld_src, *y = dst + (r0 + i) * ld_dst;
            for (int k = 0; k < d; k++) {
                bx[k] += x[k];
                by[k] += y[k];
            }
        }
        for (int k = 0; k < d; k++) {
            bx[k] /= nb;
            by[k] /= nb;
        }
        for (int i = 0; i < nb; i++) {
            const float *x = src + (r0 + i) * ld_src, *y = dst + (r0 + i) * ld_dst;
            for (int k = 0; k < d; k++) {
                xs[(size_t)i * d + k] = x[k] - bx[k];
                ys[(size_t)i * d + k] = y[k] - by[k];
            }
        }
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, d, nb, 1.0, xs, d, 1.0, f->cxx, d);
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, nb, 1.0, xs, d, ys, d, 1.0, f->cxy, d);
        if (f->n == 0) {
            memcpy(f->mx, bx, (size_t)d * sizeof(double));
            memcpy(f->my, by, (size_t)d * sizeof(double));
        } else {
            double na = (double)f->n, tot = na + nb, c = na * nb / tot;
            for (int k = 0; k < d; k++) { /* block mean minus running mean, kept in bx/by */
                bx[k] -= f->mx[k];
                by[k] -= f->my[k];
            }
            for (int j = 0; j < d; j++) {
                for (int k = j; k < d; k++) f->cxx[(size_t)j * d + k] += c * bx[j] * bx[k];
                for (int i = 0; i < d; i++) f->cxy[(size_t)j * d + i] += c * bx[j] * by[i];
            }
            for (int k = 0; k < d; k++) {
                f->mx[k] += bx[k] * nb / tot;
                f->my[k] += by[k] * nb / tot;
            }
        }
        f->n += nb;
    }
}

void kvc_reuse_fit_add(reuse_fit *f, const float *src, int64_t ld_src, const float *dst, int64_t ld_dst,
                   int64_t n) {
    fit_accumulate(f, src, ld_src, dst, ld_dst, n, f->own);
}

/* In-place Cholesky a = U^T U of the symmetric (D, D) a (upper triangle read, U written
 * there). -1 when a pivot is not clearly positive (relative to the largest diagonal). */
static int cholesky_upper(double *a, int d) {
    double dmax = 0;
    for (int j = 0; j < d; j++) dmax = fmax(dmax, a[(size_t)j * d + j]);
    for (int j = 0; j < d; j++) {
        double s = a[(size_t)j * d + j];
        for (int k = 0; k < j; k++) s -= a[(size_t)k * d + j] * a[(size_t)k * d + j];
        if (!(s > 1e-12 * dmax)) return -1;
        double u = sqrt(s);
        a[(size_t)j * d + j] = u;
        for (int i = j + 1; i < d; i++) {
            double t = a[(size_t)j * d + i];
            for (int k = 0; k < j; k++) t -= a[(size_t)k * d + j] * a[(size_t)k * d + i];
            a[(size_t)j * d + i] = t / u;
        }
    }
    return 0;
}

/* Solves U^T U z = c in place (c: (D)) for the factor U from cholesky_upper. */
static void cholesky_solve(const double *u, int d, double *c) {
    for (int j = 0; j < d; j++) { /* U^T t = c */
        double s = c[j];
        for (int k = 0; k < j; k++) s -= u[(size_t)k * d + j] * c[k];
        c[j] = s / u[(size_t)j * d + j];
    }
    for (int j = d - 1; j >= 0; j--) { /* U z = t */
        double s = c[j];
        for (int k = j + 1; k < d; k++) s -= u[(size_t)j * d + k] * c[k];
        c[j] = s / u[(size_t)j * d + j];
    }
}

int kvc_reuse_fit_solve(const reuse_fit *f, double ridge, float *w, float *b, kvc_err *err) {
    const int d = f->d;
    if (f->n == 0) return kvc_fail(err, "reuse fit: no training rows were added");
    if (!(ridge >= 0) || !isfinite(ridge)) return kvc_fail(err, "reuse fit: ridge %g must be finite and >= 0", ridge);
    double tr = 0;
    for (int j = 0; j < d; j++) tr += f->cxx[(size_t)j * d + j];
    if (!isfinite(tr)) return kvc_fail(err, "reuse fit: non-finite source covariance (NaN or Inf in the rows?)");
    if (tr <= 0) { /* src never varies: nothing to regress on, predict the mean */
        memset(w, 0, (size_t)d * d * sizeof(float));
        for (int i = 0; i < d; i++) b[i] = (float)f->my[i];
        return 0;
    }
    double *a = kvc_malloc_array((size_t)d * d + d, sizeof(double));
    if (!a) return kvc_fail(err, "reuse fit: out of memory");
    double *col = a + (size_t)d * d; /* (D) */
    memcpy(a, f->cxx, (size_t)d * d * sizeof(double));
    double lambda = ridge * tr / d;
    for (int j = 0; j < d; j++) a[(size_t)j * d + j] += lambda;
    if (cholesky_upper(a, d) != 0) {
        free(a);
        return kvc_fail(err, "reuse fit: source covariance is singular (rows span fewer than %d dimensions); "
                             "use a ridge > 0", d);
    }
    for (int i = 0; i < d; i++) { /* row i of W solves A w_i = Cxy[:, i] */
        for (int j = 0; j < d; j++) col[j] = f->cxy[(size_t)j * d + i];
        cholesky_solve(a, d, col);
        for (int j = 0; j < d; j++) w[(size_t)i * d + j] = (float)col[j];
    }
    for (int i = 0; i < d; i++) { /* with the rounded W, so the map is unbiased on the means */
        double s = f->my[i];
        for (int j = 0; j < d; j++) s -= (double)w[(size_t)i * d + j] * f->mx[j];
        b[i] = (float)s;
    }
    free(a);
    return 0;
}

/* ---- evaluation and apply ----------------------------------------------------------- */

void kvc_reuse_eval_add(reuse_eval *e, int d, const float *src, int64_t ld_src, const float *dst, int64_t ld_dst,
                    int64_t n, const float *w, const float *b) {
    float pred[d > 0 ? d : 1]; /* the prediction of one row */
    for (int64_t r = 0; r < n; r++) {
        const float *x = src + r * ld_src, *y = dst + r * ld_dst;
        double xy = 0, xx = 0, yy = 0, sid = 0, slin = 0;
        for (int k = 0; k < d; k++) {
            double xk = x[k], yk = y[k];
            xy += xk * yk;
            xx += xk * xk;
            yy += yk * yk;
            sid += (yk - xk) * (yk - xk);
        }
        if (w) {
            kvc_reuse_apply(d, w, b, x, d, pred, d, 1);
            for (int i = 0; i < d; i++) {
                double t = (double)y[i] - pred[i];
                slin += t * t;
            }
        }
        double nn = sqrt(xx) * sqrt(yy);
        e->sum_cos += nn > 0 ? xy / nn : (xx == 0 && yy == 0 ? 1.0 : 0.0);
        e->sq_dst += yy;
        e->sq_identity += sid;
        e->sq_linear += slin;
        e->n++;
    }
}

/* num/den as a relative error: 0/0 = 0, x/0 = inf. */
static double rel_err(double num, double den) {
    if (den > 0) return sqrt(num / den);
    return num > 0 ? INFINITY : 0.0;
}

void kvc_reuse_eval_result(const reuse_eval *e, double *cos_identity, double *err_identity, double *err_linear) {
    if (cos_identity) *cos_identity = e->n > 0 ? e->sum_cos / (double)e->n : NAN;
    if (err_identity) *err_identity = rel_err(e->sq_identity, e->sq_dst);
    if (err_linear) *err_linear = rel_err(e->sq_linear, e->sq_dst);
}

/* ---- analysing a dataset ------------------------------------------------------------ */

struct reuse_analysis {
    reuse_plan *p;
    int n_stored;
    int n_pairs;
    int *pair_src, *pair_dst; /* (n_pairs) stored indices j of layer l-1 and l */
    int *pair_layer;          /* (n_pairs) model layer l */
    reuse_fit **fits;         /* (n_pairs, Hk, 2) */
    reuse_eval *evals;        /* (n_pairs, Hk, 2) */
    double *scratch;          /* fit_scratch_len(D) */
    int solved;
};

void kvc_reuse_analysis_free(reuse_analysis *a) {
    if (!a) return;
    if (a->fits)
        for (int i = 0; i < a->n_pairs * a->p->n_head_kv * 2; i++) kvc_reuse_fit_free(a->fits[i]);
    free(a->fits);
    free(a->evals);
    free(a->pair_src);
    free(a->pair_dst);
    free(a->pair_layer);
    free(a->scratch);
    free(a);
}

reuse_analysis *kvc_reuse_analysis_new(reuse_plan *p, const int *layers, int n_stored, kvc_err *err) {
    if (n_stored < 1) { kvc_fail(err, "reuse analysis: no stored layers"); return NULL; }
    for (int j = 0; j < n_stored; j++) {
        if (layers[j] < 0 || layers[j] >= p->n_layer) {
            kvc_fail(err, "reuse analysis: stored layer %d is outside the model's %d layers", layers[j], p->n_layer);
            return NULL;
        }
        if (j > 0 && layers[j] <= layers[j - 1]) {
            kvc_fail(err, "reuse analysis: stored layers are not ascending (%d after %d)", layers[j], layers[j - 1]);
            return NULL;
        }
    }
    reuse_analysis *a = calloc(1, sizeof *a);
    if (!a) goto oom;
    a->p = p;
    a->n_stored = n_stored;
    a->pair_src = kvc_malloc_array((size_t)n_stored, sizeof(int));
    a->pair_dst = kvc_malloc_array((size_t)n_stored, sizeof(int));
    a->pair_layer = kvc_malloc_array((size_t)n_stored, sizeof(int));
    if (!a->pair_src || !a->pair_dst || !a->pair_layer) goto oom;
    for (int j = 1; j < n_stored; j++)
        if (layers[j] - 1 == layers[j - 1]) {
            a->pair_src[a->n_pairs] = j - 1;
            a->pair_layer[a->n_pairs] = layers[j];
            a->pair_dst[a->n_pairs++] = j;
        }
    if (a->n_pairs == 0) {
        kvc_reuse_analysis_free(a);
        kvc_fail(err, "reuse analysis: no two consecutive model layers are stored (%d stored layers); "
                      "capture layers l-1 and l to measure reuse of layer l", n_stored);
        return NULL;
    }
    int n_fit = a->n_pairs * p->n_head_kv * 2;
    a->fits = kvc_calloc_array((size_t)n_fit, sizeof *a->fits);
    a->evals = kvc_calloc_array((size_t)n_fit, sizeof *a->evals);
    a->scratch = kvc_malloc_array(fit_scratch_len(p->head_dim), sizeof(double));
    if (!a->fits || !a->evals || !a->scratch) goto oom;
    for (int i = 0; i < n_fit; i++)
        if (!(a->fits[i] = fit_alloc(p->head_dim, 0))) goto oom;
    memset(p->stored, 0, (size_t)p->n_layer);
    for (int j = 0; j < n_stored; j++) p->stored[layers[j]] = 1;
    for (int i = 0; i < p->n_items; i++) {
        reuse_item *it = &p->items[i];
        it->analysed = 0;
        it->n_train = it->n_val = 0;
        it->cos_identity = it->err_identity = it->err_linear = NAN;
        it->chosen = REUSE_NONE;
    }
    p->chosen_set = 0;
    return a;
oom:
    kvc_reuse_analysis_free(a);
    kvc_fail(err, "reuse analysis: out of memory");
    return NULL;
}

int kvc_reuse_analysis_pairs(const reuse_analysis *a) { return a->n_pairs; }

void kvc_reuse_analysis_want(const reuse_analysis *a, unsigned char *want) {
    memset(want, 0, (size_t)a->n_stored * 3);
    for (int q = 0; q < a->n_pairs; q++)
        for (int kind = KV_K; kind <= KV_V; kind++) {
            want[a->pair_src[q] * 3 + kind] = 1;
            want[a->pair_dst[q] * 3 + kind] = 1;
        }
}

/* Checks that a batch holds every K and V the pairs need. */
static int check_batch(const reuse_analysis *a, const float *const *x, kvc_err *err) {
    for (int q = 0; q < a->n_pairs; q++)
        for (int kind = KV_K; kind <= KV_V; kind++) {
            int js = a->pair_src[q], jd = a->pair_dst[q];
            if (!x[js * 3 + kind] || !x[jd * 3 + kind])
                return kvc_fail(err, "reuse analysis: the batch lacks %s of stored layer %d (request it with "
                                     "kvc_reuse_analysis_want)", kind == KV_K ? "K" : "V",
                                !x[js * 3 + kind] ? js : jd);
        }
    return 0;
}

int kvc_reuse_analysis_add_train(reuse_analysis *a, const float *const *x, int n, kvc_err *err) {
    if (a->solved) return kvc_fail(err, "reuse analysis: training rows added after the maps were solved");
    if (check_batch(a, x, err)) return -1;
    const int hk = a->p->n_head_kv, d = a->p->head_dim;
    for (int q = 0; q < a->n_pairs; q++)
        for (int h = 0; h < hk; h++)
            for (int kind = KV_K; kind <= KV_V; kind++) {
                const float *src = x[a->pair_src[q] * 3 + kind] + (size_t)h * d;
                const float *dst = x[a->pair_dst[q] * 3 + kind] + (size_t)h * d;
                fit_accumulate(a->fits[(q * hk + h) * 2 + (kind == KV_V)], src, (int64_t)hk * d, dst,
                               (int64_t)hk * d, n, a->scratch);
            }
    return 0;
}

/* The plan item of fit/eval slot i = (q*Hk + h)*2 + kind. */
static reuse_item *slot_item(const reuse_analysis *a, int i) {
    int hk = a->p->n_head_kv, q = i / (hk * 2);
    return kvc_reuse_plan_item(a->p, a->pair_layer[q], (i / 2) % hk, i % 2 ? KV_V : KV_K);
}

int kvc_reuse_analysis_solve(reuse_analysis *a, double ridge, kvc_err *err) {
    const int n_fit = a->n_pairs * a->p->n_head_kv * 2;
    for (int i = 0; i < n_fit; i++) {
        reuse_item *it = slot_item(a, i);
        if (kvc_reuse_fit_solve(a->fits[i], ridge, it->w, it->b, err) != 0) {
            char why[sizeof err->msg];
            snprintf(why, sizeof why, "%s", err ? err->msg : "");
            return kvc_fail(err, "layer %d head %d %s: %s", it->layer, it->head, it->kind == KV_K ? "K" : "V", why);
        }
        it->n_train = kvc_reuse_fit_rows(a->fits[i]);
    }
    a->p->ridge = ridge;
    a->solved = 1;
    return 0;
}

int kvc_reuse_analysis_add_val(reuse_analysis *a, const float *const *x, int n, kvc_err *err) {
    if (!a->solved) return kvc_fail(err, "reuse analysis: validation rows added before the maps were solved");
    if (check_batch(a, x, err)) return -1;
    const int hk = a->p->n_head_kv, d = a->p->head_dim, n_fit = a->n_pairs * hk * 2;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n_fit; i++) {
        int q = i / (hk * 2), h = (i / 2) % hk, kind = i % 2 ? KV_V : KV_K;
        const reuse_item *it = slot_item(a, i);
        const float *src = x[a->pair_src[q] * 3 + kind] + (size_t)h * d;
        const float *dst = x[a->pair_dst[q] * 3 + kind] + (size_t)h * d;
        kvc_reuse_eval_add(&a->evals[i], d, src, (int64_t)hk * d, dst, (int64_t)hk * d, n, it->w, it->b);
    }
    return 0;
}

int kvc_reuse_analysis_finish(reuse_analysis *a, kvc_err *err) {
    if (!a->solved) return kvc_fail(err, "reuse analysis: finish called before the maps were solved");
    const int n_fit = a->n_pairs * a->p->n_head_kv * 2;
    if (n_fit > 0 && a->evals[0].n == 0) return kvc_fail(err, "reuse analysis: no validation rows were added");
    for (int i = 0; i < n_fit; i++) {
        reuse_item *it = slot_item(a, i);
        kvc_reuse_eval_result(&a->evals[i], &it->cos_identity, &it->err_identity, &it->err_linear);
        it->n_val = a->evals[i].n;
        it->analysed = 1;
    }
    return 0;
}
