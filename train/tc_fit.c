/* tc_fit.c - `kvcodec train --codec transform`: fits a transform codec (kvc/tc.h) on a KV
 * capture, layer by layer in closed loop. For each layer, keys then values, for each group of
 * heads: a ridge predictor from the rows the decoder will already have (keys: the layer
 * below's decoded keys; values: this layer's decoded keys and the layer below's decoded
 * values), the principal axes of the prediction residual, a quantizer per component at every
 * width, and the bits of a budget spent where the (attention-weighted) distortion falls most.
 * The rows it then decodes feed the next layer's fit, exactly as at inference.
 * Letters: N rows, E = K*D a layer's row, Dg a group's width, F predictor features. */
#include "tc_fit.h"

#include "kvc/dataset.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RD_SAMPLES 16384 /* coefficient samples per component for the quantizer fits */
#define CODE_CHUNK 4096  /* rows encoded per call (bounds the scratch) */

/* LAPACK (OpenBLAS ships it). */
void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda, double *w, double *work,
             const int *lwork, int *iwork, const int *liwork, int *info);
void dposv_(const char *uplo, const int *n, const int *nrhs, double *a, const int *lda, double *b, const int *ldb,
            int *info);

void kvc_tc_train_opts_defaults(kvc_tc_train_opts *o) {
    memset(o, 0, sizeof *o);
    o->bits = 2.0;
    o->predict = 1;
    o->sinks = 4;
    o->quant = "lloyd";
    o->weights = "attn";
    o->val_frac = 0.1;
    o->ridge = 1e-3;
    o->max_val_rows = 8192;
}

/* ---- linear algebra on one part ------------------------------------------------------------ */

/* out (A, B) = x^T y / n in double for x (N, A), y (N, B) float rows (sgemm in blocks, each
 * block's float sum added in double). */
static void cross_moment(const float *x, int a, const float *y, int b, int64_t n, double *out) {
    enum { BLK = 2048 };
    float *tmp = malloc((size_t)a * b * sizeof(float));
    memset(out, 0, (size_t)a * b * sizeof(double));
    for (int64_t r0 = 0; r0 < n; r0 += BLK) {
        int m = (int)(n - r0 < BLK ? n - r0 : BLK);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, a, b, m, 1.0f, x + r0 * a, a, y + r0 * b, b, 0.0f, tmp, b);
        for (size_t i = 0; i < (size_t)a * b; i++) out[i] += tmp[i];
    }
    for (size_t i = 0; i < (size_t)a * b; i++) out[i] /= (double)(n > 0 ? n : 1);
    free(tmp);
}

static void column_means(const float *x, int64_t n, int w, double *mu) {
    for (int j = 0; j < w; j++) mu[j] = 0;
    for (int64_t r = 0; r < n; r++)
        for (int j = 0; j < w; j++) mu[j] += x[r * w + j];
    for (int j = 0; j < w; j++) mu[j] /= (double)(n > 0 ? n : 1);
}

/* Ridge predictor x ~ W f + b on n rows: W (Dg, F) and b (Dg). The ridge is relative:
 * ridge * trace(Cff) / F on the centred feature covariance. */
static int fit_predictor(const float *x, const float *f, int64_t n, int dg, int nf, double ridge, float *w, float *b,
                         kvc_err *err) {
    double *mf = malloc((size_t)nf * sizeof(double)), *mx = malloc((size_t)dg * sizeof(double));
    float *fc = malloc((size_t)n * nf * sizeof(float)), *xc = malloc((size_t)n * dg * sizeof(float));
    double *cff = malloc((size_t)nf * nf * sizeof(double)), *cfx = malloc((size_t)nf * dg * sizeof(double));
    double *bt = malloc((size_t)nf * dg * sizeof(double));
    int rc = -1;
    if (!mf || !mx || !fc || !xc || !cff || !cfx || !bt) {
        kvc_fail(err, "out of memory fitting a predictor");
        goto done;
    }
    column_means(f, n, nf, mf);
    column_means(x, n, dg, mx);
    for (int64_t r = 0; r < n; r++) {
        for (int j = 0; j < nf; j++) fc[r * nf + j] = (float)(f[r * nf + j] - mf[j]);
        for (int j = 0; j < dg; j++) xc[r * dg + j] = (float)(x[r * dg + j] - mx[j]);
    }
    cross_moment(fc, nf, fc, nf, n, cff);
    cross_moment(fc, nf, xc, dg, n, cfx);
    double tr = 0;
    for (int i = 0; i < nf; i++) tr += cff[(size_t)i * nf + i];
    const double lam = ridge * tr / nf + 1e-12;
    for (int i = 0; i < nf; i++) cff[(size_t)i * nf + i] += lam;
    /* column-major right-hand sides: column j = Cfx[:, j]; the solution's memory is then W
     * row-major (Dg, F) */
    for (int j = 0; j < dg; j++)
        for (int i = 0; i < nf; i++) bt[(size_t)j * nf + i] = cfx[(size_t)i * dg + j];
    int info = 0, nn = nf, nr = dg;
    dposv_("U", &nn, &nr, cff, &nn, bt, &nn, &info);
    if (info) {
        kvc_fail(err, "predictor fit: the feature covariance is singular (LAPACK dposv info %d)", info);
        goto done;
    }
    for (int j = 0; j < dg; j++) {
        double acc = mx[j];
        for (int i = 0; i < nf; i++) {
            w[(size_t)j * nf + i] = (float)bt[(size_t)j * nf + i];
            acc -= bt[(size_t)j * nf + i] * mf[i];
        }
        b[j] = (float)acc;
    }
    rc = 0;
done:
    free(mf), free(mx), free(fc), free(xc), free(cff), free(cfx), free(bt);
    return rc;
}

/* Principal axes of r (N, Dg): basis rows are the eigenvectors of r^T r / n, by decreasing
 * eigenvalue (written to var). */
static int fit_basis(const float *r, int64_t n, int dg, float *basis, double *var, kvc_err *err) {
    double *c = malloc((size_t)dg * dg * sizeof(double)), *ev = malloc((size_t)dg * sizeof(double));
    int lwork = 1 + 6 * dg + 2 * dg * dg, liwork = 3 + 5 * dg, info = 0, nn = dg, rc = -1;
    double *work = malloc((size_t)lwork * sizeof(double));
    int *iwork = malloc((size_t)liwork * sizeof(int));
    if (!c || !ev || !work || !iwork) {
        kvc_fail(err, "out of memory in the eigen-decomposition");
        goto done;
    }
    cross_moment(r, dg, r, dg, n, c);
    dsyevd_("V", "U", &nn, c, &nn, ev, work, &lwork, iwork, &liwork, &info);
    if (info) {
        kvc_fail(err, "eigen-decomposition failed (LAPACK dsyevd info %d)", info);
        goto done;
    }
    for (int i = 0; i < dg; i++) { /* column-major eigenvectors, ascending eigenvalues */
        const double *u = c + (size_t)(dg - 1 - i) * dg;
        var[i] = ev[dg - 1 - i];
        for (int j = 0; j < dg; j++) basis[(size_t)i * dg + j] = (float)u[j];
    }
    rc = 0;
done:
    free(c), free(ev), free(work), free(iwork);
    return rc;
}

/* ---- one part -------------------------------------------------------------------------------- */

/* Fits part p (group width dg) on rows x (N, Dg) with features f (N, F) or NULL, spending
 * budget bits per token where wmat-weighted distortion falls most (wmat (Dg, Dg) or NULL for
 * plain squared error). trace (8 Dg + 1) or NULL receives the weighted distortion per token
 * after each bit of a greedy allocation up to 8 bits everywhere (the part's rate-distortion
 * curve, for calibration). */
static int fit_part(kvc_tc_part *p, const float *x, const float *f, int64_t n, int dg, int inputs, int nf,
                    const kvc_tc_train_opts *o, const double *wmat, int64_t budget, double *trace, kvc_err *err) {
    int rc = -1;
    float *pred = malloc((size_t)n * dg * sizeof(float)), *res = malloc((size_t)n * dg * sizeof(float));
    float *y = malloc((size_t)n * dg * sizeof(float));
    double *var = malloc((size_t)dg * sizeof(double)), *weight = malloc((size_t)dg * sizeof(double));
    tc_widths *wd = calloc((size_t)dg, sizeof *wd);
    uint8_t *bits = malloc((size_t)dg);
    int *perm = malloc((size_t)dg * sizeof(int));
    memset(p, 0, sizeof *p);
    p->dim = dg;
    p->inputs = inputs;
    p->n_feat = nf;
    p->pred_b = malloc((size_t)dg * sizeof(float));
    p->basis = malloc((size_t)dg * dg * sizeof(float));
    p->basis_t = malloc((size_t)dg * dg * sizeof(float));
    p->bits = malloc((size_t)dg);
    p->off = malloc((size_t)dg * sizeof(int32_t));
    if (nf) p->pred_w = malloc((size_t)dg * nf * sizeof(float));
    float *basis_raw = malloc((size_t)dg * dg * sizeof(float));
    if (!pred || !res || !y || !var || !weight || !wd || !bits || !perm || !p->pred_b || !p->basis || !p->basis_t ||
        !p->bits || !p->off || (nf && !p->pred_w) || !basis_raw) {
        kvc_fail(err, "out of memory fitting a transform");
        goto done;
    }
    /* 1. prediction and residual */
    if (nf) {
        if (fit_predictor(x, f, n, dg, nf, o->ridge, p->pred_w, p->pred_b, err)) goto done;
        kvc_dense_rows(f, n, nf, p->pred_w, p->pred_b, dg, KVC_ACT_NONE, 0.0f, pred);
    } else {
        double mu[dg];
        column_means(x, n, dg, mu);
        for (int j = 0; j < dg; j++) p->pred_b[j] = (float)mu[j];
        for (int64_t r = 0; r < n; r++) memcpy(pred + r * dg, p->pred_b, (size_t)dg * sizeof(float));
    }
    for (size_t i = 0; i < (size_t)n * dg; i++) res[i] = x[i] - pred[i];
    /* 2. transform and coefficients */
    if (fit_basis(res, n, dg, basis_raw, var, err)) goto done;
    kvc_dense_rows(res, n, dg, basis_raw, NULL, dg, KVC_ACT_NONE, 0.0f, y);
    /* 3. distortion weight of each component: u^T W u (1 for plain squared error) */
    for (int i = 0; i < dg; i++) {
        double s = 1.0;
        if (wmat) {
            s = 0;
            const float *u = basis_raw + (size_t)i * dg;
            for (int a = 0; a < dg; a++) {
                double t = 0;
                for (int b = 0; b < dg; b++) t += wmat[(size_t)a * dg + b] * u[b];
                s += u[a] * t;
            }
        }
        weight[i] = s;
    }
    /* 4. a quantizer per component at every width, on (a stride sample of) its coefficients */
    const int64_t m = n < RD_SAMPLES ? n : RD_SAMPLES;
    int oom = 0;
#pragma omp parallel for schedule(dynamic, 4) reduction(| : oom)
    for (int i = 0; i < dg; i++) {
        float *v = malloc((size_t)m * sizeof(float));
        if (!v) {
            oom = 1;
            continue;
        }
        for (int64_t k = 0; k < m; k++) v[k] = y[(k * n / m) * dg + i];
        tc_sorted s;
        tc_sorted_init(&s, v, m);
        if (!s.p1 || !s.p2) oom = 1;
        else tc_fit_widths(&s, strcmp(o->quant, "uniform") != 0, &wd[i]);
        tc_sorted_free(&s);
        free(v);
    }
    if (oom) {
        kvc_fail(err, "out of memory fitting quantizers");
        goto done;
    }
    /* 5. bits where the weighted distortion falls most (the whole curve first, when asked) */
    if (trace) tc_allocate(wd, weight, dg, 8 * (int64_t)dg, bits, trace);
    tc_allocate(wd, weight, dg, budget, bits, NULL);
    /* 6. kept components first (more bits first; ties keep the variance order) */
    int at = 0;
    for (int b = 8; b >= 0; b--)
        for (int i = 0; i < dg; i++)
            if (bits[i] == b) perm[at++] = i;
    int nl = 0;
    for (int k = 0; k < dg; k++) nl += bits[perm[k]] ? 1 << bits[perm[k]] : 0;
    p->levels = malloc((size_t)(nl > 0 ? nl : 1) * sizeof(float));
    if (!p->levels) {
        kvc_fail(err, "out of memory");
        goto done;
    }
    nl = 0;
    p->kept = 0;
    for (int k = 0; k < dg; k++) {
        const int i = perm[k], b = bits[i];
        memcpy(p->basis + (size_t)k * dg, basis_raw + (size_t)i * dg, (size_t)dg * sizeof(float));
        p->bits[k] = (uint8_t)b;
        p->off[k] = nl;
        if (b) memcpy(p->levels + nl, wd[i].levels + wd[i].off[b], (size_t)(1 << b) * sizeof(float));
        nl += b ? 1 << b : 0;
        p->kept += b > 0;
    }
    p->n_levels = nl;
    p->code_entropy = 0;
    for (int i = 0; i < dg; i++) p->code_entropy += wd[i].ent[bits[i]];
    for (int i = 0; i < dg; i++)
        for (int j = 0; j < dg; j++) p->basis_t[(size_t)j * dg + i] = p->basis[(size_t)i * dg + j];
    p->cb = (kvc_codebook){p->kept, p->bits, p->levels, p->off, kvc_codebook_row_bytes(p->bits, p->kept)};
    p->kl_sens = NAN;
    rc = 0;
done:
    free(pred), free(res), free(y), free(var), free(weight), free(wd), free(bits), free(perm), free(basis_raw);
    return rc;
}

/* ---- the closed-loop trainer ------------------------------------------------------------------ */

/* Does part p's predictor pay on held-back rows? Compares the (weighted) energy of x - (W f + b)
 * with that of x - mean, where mean is the training rows' (xt, nt rows) and f the group's
 * features built from the decoded rows below (as the part's inputs ask). 1: keep it; -1 with
 * err when out of memory. */
static int predictor_pays(const kvc_tc_part *p, const float *xt, int64_t nt, const float *xv, const float *src[3],
                          int64_t nv, int e, int g, int dg, const double *wmat, kvc_err *err) {
    const int nf = p->n_feat;
    double mu[dg];
    column_means(xt, nt, dg, mu);
    float *f = malloc((size_t)nv * nf * sizeof(float)), *r = malloc((size_t)nv * dg * sizeof(float));
    float *rm = malloc((size_t)nv * dg * sizeof(float));
    double *c = malloc((size_t)dg * dg * sizeof(double));
    if (!f || !r || !rm || !c) {
        free(f), free(r), free(rm), free(c);
        return kvc_fail(err, "out of memory");
    }
    for (int64_t row = 0; row < nv; row++) {
        int at = 0;
        for (int s = 0; s < 3; s++)
            if (p->inputs & (1 << s)) {
                memcpy(f + row * nf + at, src[s] + row * e + (size_t)g * dg, (size_t)dg * sizeof(float));
                at += dg;
            }
    }
    kvc_dense_rows(f, nv, nf, p->pred_w, p->pred_b, dg, KVC_ACT_NONE, 0.0f, r);
    for (int64_t row = 0; row < nv; row++)
        for (int j = 0; j < dg; j++) {
            const float x = xv[row * e + (size_t)g * dg + j];
            r[row * dg + j] = x - r[row * dg + j];
            rm[row * dg + j] = (float)(x - mu[j]);
        }
    /* energy = sum over rows of r^T W r = <W, R^T R> (W = I for plain squared error) */
    double ep = 0, em = 0;
    for (int pass = 0; pass < 2; pass++) {
        cross_moment(pass ? rm : r, dg, pass ? rm : r, dg, nv, c);
        double s = 0;
        for (int a = 0; a < dg; a++)
            for (int b = 0; b < dg; b++)
                if (wmat) s += wmat[(size_t)a * dg + b] * c[(size_t)a * dg + b];
                else if (a == b) s += c[(size_t)a * dg + b];
        if (pass) em = s;
        else ep = s;
    }
    free(f), free(r), free(rm), free(c);
    return ep < em;
}

/* Rows of one split, sinks left out (they stay exact at inference): the dataset rows it
 * reads, in order. */
typedef struct {
    int64_t *row; /* (n) dataset row indices */
    int64_t n;
} split_rows;

/* Picks the rows of [t0, t1) whose position is >= sinks, at most cap of them (evenly spaced). */
static int pick_rows(kvc_dataset *d, int64_t t0, int64_t t1, int sinks, int64_t cap, split_rows *s, kvc_err *err) {
    const int64_t span = t1 - t0;
    int32_t *pos = malloc((size_t)(span > 0 ? span : 1) * sizeof(int32_t));
    int64_t *all = malloc((size_t)(span > 0 ? span : 1) * sizeof(int64_t)), n = 0;
    if (!pos || !all) {
        free(pos), free(all);
        return kvc_fail(err, "out of memory");
    }
    if (span > 0 && kvc_dataset_read_positions(d, t0, span, pos, err)) {
        free(pos), free(all);
        return -1;
    }
    for (int64_t i = 0; i < span; i++)
        if (pos[i] >= sinks) all[n++] = t0 + i;
    free(pos);
    if (cap > 0 && n > cap) {
        for (int64_t i = 0; i < cap; i++) all[i] = all[i * n / cap];
        n = cap;
    }
    s->row = all;
    s->n = n;
    return 0;
}

/* rows (N, E) of stored layer j, kind: the split's rows read in runs of consecutive indices. */
static int read_rows(kvc_dataset *d, int j, int kind, const split_rows *s, int e, float *out, kvc_err *err) {
    for (int64_t i = 0; i < s->n;) {
        int64_t k = i + 1;
        while (k < s->n && s->row[k] == s->row[k - 1] + 1) k++;
        if (kvc_dataset_read(d, j, kind, s->row[i], k - i, out + (size_t)i * e, err)) return -1;
        i = k;
    }
    return 0;
}

/* The key weight of each group: block-diagonal over its heads of the second moment of the
 * queries that read each head (pre-RoPE), sum over the group's query heads, per row. */
static int key_weights(kvc_dataset *d, int j, const split_rows *s, const kvc_kv_info *kv, int hpg, double *wm,
                       kvc_err *err) {
    const int H = kv->n_head, K = kv->n_head_kv, D = kv->head_dim, G = H / K, dg = hpg * D;
    const int64_t take = s->n < 8192 ? s->n : 8192;
    split_rows sub = {s->row, take};
    float *q = malloc((size_t)take * H * D * sizeof(float)), *qh = malloc((size_t)take * D * sizeof(float));
    double *m = malloc((size_t)D * D * sizeof(double));
    if (!q || !qh || !m) {
        free(q), free(qh), free(m);
        return kvc_fail(err, "out of memory");
    }
    if (read_rows(d, j, KV_Q, &sub, H * D, q, err)) {
        free(q), free(qh), free(m);
        return -1;
    }
    memset(wm, 0, (size_t)K / hpg * dg * dg * sizeof(double));
    for (int h = 0; h < K; h++) {
        double *blk = wm + (size_t)(h / hpg) * dg * dg;
        const int at = (h % hpg) * D;
        for (int gq = 0; gq < G; gq++) {
            const int hq = h * G + gq;
            for (int64_t r = 0; r < take; r++) memcpy(qh + r * D, q + (r * H + hq) * D, (size_t)D * sizeof(float));
            cross_moment(qh, D, qh, D, take, m);
            for (int a = 0; a < D; a++)
                for (int b = 0; b < D; b++) blk[(size_t)(at + a) * dg + at + b] += m[(size_t)a * D + b];
        }
    }
    free(q), free(qh), free(m);
    return 0;
}

/* Codes rows x (N, E) of (layer, kind) in chunks, writing the decoder's rows into xhat. */
static int code_rows(const kvc_tc *tc, int l, int kind, const float *x, const float *kp, const float *vp,
                     const float *kc, int64_t n, float *xhat, kvc_err *err) {
    const int e = tc->n_head_kv * tc->head_dim, rb = kvc_tc_row_bytes(tc, l, kind);
    float *scr = malloc(kvc_tc_scratch_floats(tc, CODE_CHUNK) * sizeof(float));
    uint8_t *codes = malloc((size_t)CODE_CHUNK * (rb > 0 ? rb : 1));
    if (!scr || !codes) {
        free(scr), free(codes);
        return kvc_fail(err, "out of memory");
    }
    for (int64_t r = 0; r < n; r += CODE_CHUNK) {
        const int64_t m = n - r < CODE_CHUNK ? n - r : CODE_CHUNK;
        const size_t o = (size_t)r * e;
        kvc_tc_encode(tc, l, kind, x + o, kp ? kp + o : NULL, vp ? vp + o : NULL, kc ? kc + o : NULL, m, codes,
                      xhat + o, scr);
    }
    free(scr), free(codes);
    return 0;
}

/* ||x - xhat|| / ||x|| over n rows of E, group g's columns only when g >= 0. */
static double rel_err(const float *x, const float *xh, int64_t n, int e, int g, int dg) {
    double num = 0, den = 0;
    for (int64_t r = 0; r < n; r++)
        for (int j = g < 0 ? 0 : g * dg; j < (g < 0 ? e : (g + 1) * dg); j++) {
            double a = x[r * e + j], b = a - xh[r * e + j];
            num += b * b, den += a * a;
        }
    return den > 0 ? sqrt(num / den) : 0;
}

kvc_tc *kvc_tc_fit(const kvc_tc_train_opts *o, kvc_err *err) {
    const double t_start = kvc_now();
    int rc = -1;
    kvc_dataset *d = kvc_dataset_open(o->data, o->n_data, err);
    if (!d) return NULL;
    kvc_tc *tc = calloc(1, sizeof *tc);
    float *vdk = NULL, *vdv = NULL, *vpk = NULL, *vpv = NULL, *vx = NULL;
    const kvc_kv_info *kv = kvc_dataset_info(d);
    const int L = kv->n_layer, K = kv->n_head_kv, D = kv->head_dim, E = K * D;
    split_rows tr = {0}, va = {0};
    float *buf[8] = {0};
    double *wm = NULL;
    if (!tc) {
        kvc_fail(err, "out of memory");
        goto done;
    }
    if (kv->n_layers_stored != L) {
        kvc_fail(err, "the transform codec predicts each layer from the one below: the capture must hold every layer "
                      "(it has %d of %d; capture with --layers all)", kv->n_layers_stored, L);
        goto done;
    }
    const int hpg = o->per_head ? 1 : K, groups = K / hpg, dg = hpg * D;
    int64_t train_end, val_begin;
    kvc_dataset_split(d, o->val_frac, &train_end, &val_begin);
    if (pick_rows(d, 0, train_end, o->sinks, o->max_rows, &tr, err) ||
        pick_rows(d, val_begin, kv->n_tokens, o->sinks, o->max_val_rows, &va, err))
        goto done;
    if (tr.n < 4 * (int64_t)dg || va.n < 1) {
        kvc_fail(err, "the capture has %lld training rows beyond the sinks (and %lld held back): too few to fit a "
                      "%d-wide transform; capture at least %d tokens",
                 (long long)tr.n, (long long)va.n, dg, 8 * dg);
        goto done;
    }
    /* every table is owned by tc from here on */
    snprintf(tc->model_name, sizeof tc->model_name, "%s", kv->model_name);
    snprintf(tc->model_fingerprint, sizeof tc->model_fingerprint, "%s", kv->model_fingerprint);
    tc->n_layer = L, tc->n_head_kv = K, tc->head_dim = D, tc->heads_per_group = hpg, tc->groups = groups;
    tc->sinks = o->sinks;
    tc->bits_target = o->bits;
    snprintf(tc->quant, sizeof tc->quant, "%s", o->quant);
    snprintf(tc->predict, sizeof tc->predict, "%s", o->predict ? "closed" : "none");
    snprintf(tc->weights, sizeof tc->weights, "%s", o->weights);
    snprintf(tc->calibrated, sizeof tc->calibrated, "none");
    for (int i = 0; i < o->n_data; i++) {
        const char *bn = strrchr(o->data[i], '/');
        size_t used = strlen(tc->data);
        snprintf(tc->data + used, sizeof tc->data - used, "%s%s", i ? "," : "", bn ? bn + 1 : o->data[i]);
    }
    snprintf(tc->corpus_sha256, sizeof tc->corpus_sha256, "%s", kv->corpus_sha256);
    tc->n_train_tokens = tr.n, tc->n_val_tokens = va.n;
    if (!(tc->parts = calloc((size_t)L * 2 * groups, sizeof *tc->parts))) {
        kvc_fail(err, "out of memory");
        goto done;
    }
    /* train and held-back rows: this layer's K and V, the decoder's rows of this layer and of
     * the one below */
    enum { XK, XV, DK, DV, PK, PV, FEAT, XG };
    const int64_t nmax = tr.n > va.n ? tr.n : va.n;
    for (int i = 0; i < FEAT; i++) buf[i] = malloc((size_t)nmax * E * sizeof(float));
    buf[FEAT] = malloc((size_t)nmax * 2 * dg * sizeof(float));
    buf[XG] = malloc((size_t)nmax * dg * sizeof(float));
    vdk = malloc((size_t)va.n * E * sizeof(float)), vdv = malloc((size_t)va.n * E * sizeof(float));
    vpk = malloc((size_t)va.n * E * sizeof(float)), vpv = malloc((size_t)va.n * E * sizeof(float));
    vx = malloc((size_t)va.n * E * sizeof(float));
    wm = malloc((size_t)groups * dg * dg * sizeof(double));
    int oom = !vdk || !vdv || !vpk || !vpv || !vx || !wm;
    for (int i = 0; i < 8; i++) oom |= !buf[i];
    if (oom) {
        kvc_fail(err, "out of memory for %lld rows of %d values", (long long)nmax, E);
        goto done;
    }
    const int64_t budget = (int64_t)llround(o->bits * dg);
    for (int l = 0; l < L; l++) {
        for (int kind = 0; kind < 2; kind++) {
            const int inputs = !o->predict ? 0
                               : kind == KV_K ? (l ? KVC_TC_IN_KPREV : 0)
                                              : KVC_TC_IN_KCUR | (l ? KVC_TC_IN_VPREV : 0);
            const int n_in = ((inputs & 1) != 0) + ((inputs & 2) != 0) + ((inputs & 4) != 0), nf = n_in * dg;
            float *x = buf[kind == KV_K ? XK : XV];
            if (read_rows(d, l, kind, &tr, E, x, err)) goto done;
            const int weighted = kind == KV_K && !strcmp(o->weights, "attn");
            if (weighted && key_weights(d, l, &tr, kv, hpg, wm, err)) goto done;
            if (nf && read_rows(d, l, kind, &va, E, vx, err)) goto done;
            const int64_t lb = o->layer_bits ? (int64_t)llround(o->layer_bits[l * 2 + kind] * dg) : budget;
            for (int g = 0; g < groups; g++) {
                for (int64_t r = 0; r < tr.n; r++) {
                    memcpy(buf[XG] + r * dg, x + r * E + (size_t)g * dg, (size_t)dg * sizeof(float));
                    int at = 0;
                    const float *src[3] = {buf[PK], buf[DK], buf[PV]};
                    for (int s = 0; s < 3; s++)
                        if (inputs & (1 << s)) {
                            memcpy(buf[FEAT] + r * nf + at, src[s] + r * E + (size_t)g * dg, (size_t)dg * sizeof(float));
                            at += dg;
                        }
                }
                kvc_tc_part *p = &tc->parts[kvc_tc_index(tc, l, kind, g)];
                double *trace = o->keep_rd ? malloc((size_t)(8 * dg + 1) * sizeof(double)) : NULL;
                if (o->keep_rd && !trace) {
                    kvc_fail(err, "out of memory");
                    goto done;
                }
                const double *wg = weighted ? wm + (size_t)g * dg * dg : NULL;
                if (fit_part(p, buf[XG], nf ? buf[FEAT] : NULL, tr.n, dg, inputs, nf, o, wg, lb, trace, err)) {
                    free(trace);
                    goto done;
                }
                /* a predictor that does not lower the held-back error is dropped: the part is
                 * then coded alone, so prediction never costs more than no prediction */
                const float *vsrc[3] = {vpk, vdk, vpv};
                const int pays = nf ? predictor_pays(p, buf[XG], tr.n, vx, vsrc, va.n, E, g, dg, wg, err) : 1;
                if (pays < 0) {
                    free(trace);
                    goto done;
                }
                if (!pays) {
                    kvc_tc_part_free(p);
                    if (fit_part(p, buf[XG], NULL, tr.n, dg, 0, 0, o, wg, lb, trace, err)) {
                        free(trace);
                        goto done;
                    }
                    if (o->report) fprintf(o->report, "layer %2d %s group %d: prediction does not pay on held-back rows; coded alone\n",
                                           l, kind ? "V" : "K", g);
                }
                p->rd = trace;
            }
            /* the decoder's rows, train and held back: the next fits predict from them */
            float *dec = buf[kind == KV_K ? DK : DV];
            if (code_rows(tc, l, kind, x, buf[PK], buf[PV], buf[DK], tr.n, dec, err)) goto done;
            if ((!nf && read_rows(d, l, kind, &va, E, vx, err)) ||
                code_rows(tc, l, kind, vx, vpk, vpv, vdk, va.n, kind == KV_K ? vdk : vdv, err))
                goto done;
            for (int g = 0; g < groups; g++)
                tc->parts[kvc_tc_index(tc, l, kind, g)].val_rel_err = rel_err(vx, kind == KV_K ? vdk : vdv, va.n, E, g, dg);
            if (o->report) {
                int bits = 0;
                for (int g = 0; g < groups; g++)
                    for (int c = 0; c < dg; c++) bits += tc->parts[kvc_tc_index(tc, l, kind, g)].bits[c];
                fprintf(o->report, "layer %2d %s: %5.2f bits/coef, %3d of %d kept, val rel err %.4f (train %.4f)\n", l,
                        kind ? "V" : "K", (double)bits / (groups * dg),
                        tc->parts[kvc_tc_index(tc, l, kind, 0)].kept, dg, rel_err(vx, kind == KV_K ? vdk : vdv, va.n, E, -1, dg),
                        rel_err(x, dec, tr.n, E, -1, dg));
            }
        }
        /* the layer just coded is the one below the next */
        float *t;
        t = buf[PK], buf[PK] = buf[DK], buf[DK] = t;
        t = buf[PV], buf[PV] = buf[DV], buf[DV] = t;
        t = vpk, vpk = vdk, vdk = t;
        t = vpv, vpv = vdv, vdv = t;
        if (o->progress) kvc_progress_draw("tc fit", l + 1, L, "layer", t_start);
    }
    if (o->progress) kvc_progress_end();
    tc->train_seconds = kvc_now() - t_start;
    rc = 0;
done:
    free(vdk), free(vdv), free(vpk), free(vpv), free(vx);
    for (int i = 0; i < 8; i++) free(buf[i]);
    free(wm), free(tr.row), free(va.row);
    kvc_dataset_close(d);
    if (rc) {
        kvc_tc_free(tc);
        return NULL;
    }
    return tc;
}
