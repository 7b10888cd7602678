/* trainer.c - the training loop behind `kvcodec train`: one autoencoder per stored layer and
 * K/V (or per KV head), trained in lockstep on shuffled minibatches streamed from a KV
 * dataset, with warmup+cosine AdamW, validation and early stopping every epoch, a loss-curve
 * CSV, the cross-layer reuse analysis, and a checkpoint after every epoch that --resume
 * continues from. Letters: n tokens in a batch, Hk KV heads, H query heads, D head_dim. */
#include "kvc/trainer.h"

#include "kvc/checkpoint.h"
#include "kvc/dataset.h"
#include "kvc/reuse_fit.h"
#ifdef KVC_HAVE_CUDA
#include "kvc/ae_cuda.h"
#endif

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void kvc_train_opts_defaults(kvc_train_opts *o) {
    memset(o, 0, sizeof *o);
    kvc_ae_config_defaults(&o->ae);
    o->ae.in_dim = 64;
    o->ae.latent = 32;
    o->ae.act = KVC_ACT_LEAKY_RELU;
    o->mse_mix = 0.1f;
    o->epochs = 10;
    o->batch_tokens = 256;
    o->warmup_steps = 100;
    o->patience = 3;
    kvc_ae_adam_defaults(&o->adam);
    o->min_lr = 1e-5f;
    o->seed = 1;
    o->val_frac = 0.1;
    o->device = "cpu";
}

/* Everything one run holds. Models are indexed like kvc_codec networks. */
typedef struct {
    const kvc_train_opts *o;
    kvc_dataset *ds;
    const kvc_kv_info *info;
    kvc_codec *codec;
    ae_model **models;       /* (L, 2, slots); NULL for layers not stored */
    int slots;
    int64_t train_end, val_begin;
    float *gather;           /* (n, D) rows of one head */
    float *w_attn;           /* (D, D) */
    float *a_attn;           /* (M, n*Hk) */
    float *y;                /* reconstruction scratch (n*Hk, D) */
    int64_t scratch_tokens;
    float *rel;              /* (networks) validation relative error of each */
    int nnet;                /* L * 2 * slots */
    FILE *csv;               /* loss curve, or NULL */
    double t0;               /* start of the run (the curve's seconds column) */
#ifdef KVC_HAVE_CUDA
    ae_cuda **gpu;
#endif
} run_state;

#define MAX_ATTN_QUERIES 128

/* Copies head h of x (n, heads, D) into out (n, D). */
static void gather_head(const float *x, int n, int heads, int d, int h, float *out) {
    for (int t = 0; t < n; t++) memcpy(out + (size_t)t * d, x + ((size_t)t * heads + h) * d, (size_t)d * sizeof(float));
}

/* KEY_ATTN weight: W = Q^T Q over the queries that read these keys, scaled to mean
 * eigenvalue 1 (trace D) so mse_mix keeps its meaning whatever the query norms. */
static void key_weight(const float *q, int n, int H, int D, int h0, int h1, float *w) {
    memset(w, 0, (size_t)D * D * sizeof(float));
    for (int t = 0; t < n; t++)
        for (int h = h0; h < h1; h++)
            cblas_ssyr(CblasRowMajor, CblasUpper, D, 1.0f, q + ((size_t)t * H + h) * D, 1, w, D);
    double tr = 0;
    for (int i = 0; i < D; i++) tr += w[i * D + i];
    float s = tr > 0 ? (float)(D / tr) : 1.0f;
    for (int i = 0; i < D; i++)
        for (int j = i; j < D; j++) w[i * D + j] = w[j * D + i] = w[i * D + j] * s;
}

/* VALUE_ATTN weights for rows laid out (n, Hk) (head h_only >= 0: rows (n) of that head):
 * up to MAX_ATTN_QUERIES queries sampled from the batch; each attends (softmax of q.k/sqrt(D),
 * pre-RoPE) over the batch rows of its KV head. Returns M. */
static int value_weights(const float *q, const float *k, int n, int H, int Hk, int D, int h_only, uint64_t *rng,
                         float *a) {
    const int G = H / Hk, rows = h_only >= 0 ? n : n * Hk;
    int M = 0;
    const int total = h_only >= 0 ? n * G : n * H;
    const int want = total < MAX_ATTN_QUERIES ? total : MAX_ATTN_QUERIES;
    for (; M < want; M++) {
        *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
        int pick = (int)((*rng >> 33) % (uint64_t)total);
        int t = h_only >= 0 ? pick / G : pick / H;
        int hq = h_only >= 0 ? h_only * G + pick % G : pick % H;
        int hk = hq / G;
        const float *qv = q + ((size_t)t * H + hq) * D;
        float *row = a + (size_t)M * rows;
        memset(row, 0, (size_t)rows * sizeof(float));
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float *kv = k + ((size_t)j * Hk + hk) * D;
            float s = 0;
            for (int d = 0; d < D; d++) s += qv[d] * kv[d];
            s /= sqrtf((float)D);
            int r = h_only >= 0 ? j : j * Hk + hk;
            row[r] = s;
            mx = s > mx ? s : mx;
        }
        double sum = 0;
        for (int j = 0; j < n; j++) {
            int r = h_only >= 0 ? j : j * Hk + hk;
            row[r] = expf(row[r] - mx);
            sum += row[r];
        }
        for (int j = 0; j < n; j++) row[h_only >= 0 ? j : j * Hk + hk] /= (float)sum;
    }
    return M;
}

static int ensure_scratch(run_state *s, int n, kvc_err *err) {
    if (n <= s->scratch_tokens) return 0;
    const kvc_kv_info *kv = s->info;
    size_t rows = (size_t)n * kv->n_head_kv, D = (size_t)kv->head_dim;
    free(s->gather); free(s->a_attn); free(s->y);
    s->gather = malloc(rows * D * sizeof(float));
    s->a_attn = malloc((size_t)MAX_ATTN_QUERIES * rows * sizeof(float));
    s->y = malloc(rows * D * sizeof(float));
    if (!s->gather || !s->a_attn || !s->y) return kvc_fail(err, "out of memory for a batch of %d tokens", n);
    s->scratch_tokens = n;
    return 0;
}

/* One optimiser step of every model on a batch; returns the mean loss or NaN (err set). */
static double train_batch(run_state *s, const kvc_batch *b, float lr, uint64_t *rng, int64_t step, kvc_err *err) {
    const kvc_kv_info *kv = s->info;
    const int D = kv->head_dim, Hk = kv->n_head_kv, H = kv->n_head, n = b->n;
    if (ensure_scratch(s, n, err)) return NAN;
    double total = 0;
    int count = 0;
    ae_adam adam = s->o->adam;
    adam.lr = lr;
    for (int j = 0; j < kv->n_layers_stored; j++) {
        const int l = kv->layers[j];
        for (int kind = 0; kind < 2; kind++) {
            const float *x = b->x[j * 3 + kind], *q = b->x[j * 3 + KV_Q];
            for (int slot = 0; slot < s->slots; slot++) {
                ae_model *m = s->models[codec_index(s->codec, l, kind, slot)];
                const float *rows = x;
                int nrows = n * Hk;
                if (s->o->per_head) {
                    gather_head(x, n, Hk, D, slot, s->gather);
                    rows = s->gather;
                    nrows = n;
                }
                ae_loss loss = {AE_LOSS_MSE, NULL, NULL, 0, 0};
                if (s->o->loss_attn) {
                    loss.mse_mix = s->o->mse_mix;
                    if (kind == KV_K) {
                        int G = H / Hk;
                        key_weight(q, n, H, D, s->o->per_head ? slot * G : 0, s->o->per_head ? (slot + 1) * G : H,
                                   s->w_attn);
                        loss.kind = AE_LOSS_KEY_ATTN;
                        loss.w = s->w_attn;
                    } else {
                        loss.kind = AE_LOSS_VALUE_ATTN;
                        loss.m = value_weights(q, b->x[j * 3 + KV_K], n, H, Hk, D, s->o->per_head ? slot : -1, rng,
                                               s->a_attn);
                        loss.a = s->a_attn;
                    }
                }
                float lv;
#ifdef KVC_HAVE_CUDA
                if (s->gpu) {
                    ae_cuda *g = s->gpu[codec_index(s->codec, l, kind, slot)];
                    lv = kvc_ae_cuda_forward_backward(g, rows, nrows, &loss, err);
                    if (isfinite(lv) && kvc_ae_cuda_adam_step(g, &adam, err)) return NAN;
                } else
#endif
                {
                    lv = kvc_ae_forward_backward(m, rows, nrows, &loss);
                    if (isfinite(lv)) kvc_ae_adam_step(m, &adam);
                }
                if (!isfinite(lv)) {
                    if (!err->msg[0] || strstr(err->msg, "CUDA") == NULL)
                        kvc_fail(err, "non-finite loss in layer %d %s at step %lld (NaN/Inf in the data, or lr too"
                                 " high)", l, kind == KV_K ? "K" : "V", (long long)step);
                    return NAN;
                }
                total += lv;
                count++;
            }
        }
    }
    return total / count;
}

/* Validation: relative error of every model over [val_begin, N) into rel (per network) and
 * the overall K, V and all errors. */
static int validate(run_state *s, float *rel, double *err_k, double *err_v, double *err_all, kvc_err *err) {
    const kvc_kv_info *kv = s->info;
    const int D = kv->head_dim, Hk = kv->n_head_kv, nnet = kv->n_layer * 2 * s->slots;
    double *se = calloc((size_t)nnet, sizeof(double)), *sx = calloc((size_t)nnet, sizeof(double));
    unsigned char want[KVC_MAX_LAYERS * 3] = {0};
    for (int j = 0; j < kv->n_layers_stored; j++) want[j * 3 + KV_K] = want[j * 3 + KV_V] = 1;
    kvc_batch_opts bo = {s->val_begin, kv->n_tokens, s->o->batch_tokens, 0, 0, s->o->seed, 0, want};
    kvc_batcher *bt = se && sx ? kvc_batcher_new(s->ds, &bo, err) : NULL;
    if (!bt) { free(se); free(sx); return -1; }
    kvc_batch b;
    int rc;
    while ((rc = kvc_batcher_next(bt, &b, err)) == 1) {
        if (ensure_scratch(s, b.n, err)) { rc = -1; break; }
        for (int j = 0; j < kv->n_layers_stored; j++)
            for (int kind = 0; kind < 2; kind++)
                for (int slot = 0; slot < s->slots; slot++) {
                    int idx = codec_index(s->codec, kv->layers[j], kind, slot);
                    const float *rows = b.x[j * 3 + kind];
                    int nrows = b.n * Hk;
                    if (s->o->per_head) {
                        gather_head(rows, b.n, Hk, D, slot, s->gather);
                        rows = s->gather;
                        nrows = b.n;
                    }
                    float *z = s->a_attn; /* large enough for (nrows, R) */
                    kvc_ae_encode(s->models[idx], rows, nrows, z);
                    kvc_ae_decode(s->models[idx], z, nrows, s->y);
                    for (size_t i = 0; i < (size_t)nrows * D; i++) {
                        double e = (double)s->y[i] - rows[i];
                        se[idx] += e * e;
                        sx[idx] += (double)rows[i] * rows[i];
                    }
                }
    }
    kvc_batcher_free(bt);
    double tk[2] = {0, 0}, txk[2] = {0, 0};
    for (int i = 0; i < nnet; i++) {
        rel[i] = sx[i] > 0 ? (float)sqrt(se[i] / sx[i]) : 0.0f;
        int kind = (i / s->slots) % 2;
        tk[kind] += se[i];
        txk[kind] += sx[i];
    }
    *err_k = txk[0] > 0 ? sqrt(tk[0] / txk[0]) : 0;
    *err_v = txk[1] > 0 ? sqrt(tk[1] / txk[1]) : 0;
    *err_all = txk[0] + txk[1] > 0 ? sqrt((tk[0] + tk[1]) / (txk[0] + txk[1])) : 0;
    free(se);
    free(sx);
    return rc < 0 ? -1 : 0;
}

/* Replaces the codec's exported networks with the current models (the new best). */
static int export_all(run_state *s, const float *rel, kvc_err *err) {
    const kvc_kv_info *kv = s->info;
    for (int j = 0; j < kv->n_layers_stored; j++) {
        int l = kv->layers[j];
        for (int kind = 0; kind < 2; kind++)
            for (int slot = 0; slot < s->slots; slot++) {
                int idx = codec_index(s->codec, l, kind, slot);
                kvc_ae_export_free(&s->codec->ae[idx]);
                if (kvc_ae_export_folded(s->models[idx], &s->codec->ae[idx], err)) return -1;
                s->codec->rel_err[idx] = rel[idx];
            }
        s->codec->trained[l] = 1;
    }
    return 0;
}

/* The reuse analysis over the train (fit) and validation (measure) ranges. */
static int analyse_reuse(run_state *s, kvc_err *err) {
    const kvc_kv_info *kv = s->info;
    reuse_option opt;
    if (kvc_reuse_option_parse(s->o->reuse, &opt, err)) return -1;
    reuse_plan *p = kvc_reuse_plan_new(kv->n_layer, kv->n_head_kv, kv->head_dim, err);
    reuse_analysis *a = p ? kvc_reuse_analysis_new(p, kv->layers, kv->n_layers_stored, err) : NULL;
    if (!a) { kvc_reuse_plan_free(p); return -1; }
    unsigned char want[KVC_MAX_LAYERS * 3];
    kvc_reuse_analysis_want(a, want);
    int rc = 0;
    for (int phase = 0; phase < 2 && rc == 0; phase++) {
        kvc_batch_opts bo = {phase ? s->val_begin : 0, phase ? kv->n_tokens : s->train_end, 1024, 0, 0, s->o->seed, 0, want};
        kvc_batcher *bt = kvc_batcher_new(s->ds, &bo, err);
        if (!bt) { rc = -1; break; }
        kvc_batch b;
        int r;
        while ((r = kvc_batcher_next(bt, &b, err)) == 1)
            if ((phase ? kvc_reuse_analysis_add_val(a, b.x, b.n, err) : kvc_reuse_analysis_add_train(a, b.x, b.n, err))) { r = -1; break; }
        kvc_batcher_free(bt);
        if (r < 0) rc = -1;
        else if (phase == 0) rc = kvc_reuse_analysis_solve(a, REUSE_RIDGE_DEFAULT, err);
    }
    if (!rc) rc = kvc_reuse_analysis_finish(a, err);
    if (!rc) rc = kvc_reuse_plan_choose(p, &opt, err);
    kvc_reuse_analysis_free(a);
    if (rc) { kvc_reuse_plan_free(p); return -1; }
    kvc_reuse_plan_free(s->codec->reuse);
    s->codec->reuse = p;
    return 0;
}

/* Checks that a checkpoint we are asked to resume matches this run's data and options. */
static int check_resume(const kvc_codec *c, const run_state *s, kvc_err *err) {
    const kvc_codec_meta *m = &c->meta;
    const ae_config *a = &s->o->ae;
    if (strcmp(m->model_fingerprint, s->info->model_fingerprint))
        return kvc_fail(err, "cannot resume: '%s' was trained on data from model %s, this data is from %s", s->o->out,
                        m->model_fingerprint, s->info->model_fingerprint);
    if (m->ae.latent != a->latent || m->ae.hidden != a->hidden || m->ae.act != a->act || m->ae.norm != a->norm ||
        m->per_head != s->o->per_head || strcmp(m->loss, s->o->loss_attn ? "attn" : "mse"))
        return kvc_fail(err, "cannot resume: '%s' has another configuration (latent %d, hidden %d, %s, %s); use the"
                        " same options or a new --out", s->o->out, m->ae.latent, m->ae.hidden, kvc_ae_act_name(m->ae.act),
                        m->loss);
    return 0;
}

static void print_table(const run_state *s) {
    const kvc_kv_info *kv = s->info;
    printf("validation relative error ||x - x_hat|| / ||x|| per layer (latent %d of %d):\n", s->o->ae.latent, kv->head_dim);
    printf("  layer  %8s  %8s\n", "K", "V");
    for (int j = 0; j < kv->n_layers_stored; j++) {
        int l = kv->layers[j];
        double e[2] = {0, 0};
        for (int kind = 0; kind < 2; kind++) {
            for (int slot = 0; slot < s->slots; slot++) e[kind] += s->codec->rel_err[codec_index(s->codec, l, kind, slot)];
            e[kind] /= s->slots;
        }
        printf("  %5d  %8.4f  %8.4f\n", l, e[0], e[1]);
    }
}

/* The checkpoint's description of this run. */
static void build_meta(const run_state *s, const ae_config *cfg, kvc_codec_meta *meta) {
    const kvc_train_opts *o = s->o;
    const kvc_kv_info *kv = s->info;
    memset(meta, 0, sizeof *meta);
    snprintf(meta->model_name, sizeof meta->model_name, "%s", kv->model_name);
    snprintf(meta->model_fingerprint, sizeof meta->model_fingerprint, "%s", kv->model_fingerprint);
    meta->n_layer = kv->n_layer;
    meta->n_head_kv = kv->n_head_kv;
    meta->head_dim = kv->head_dim;
    meta->ae = *cfg;
    meta->per_head = o->per_head;
    snprintf(meta->loss, sizeof meta->loss, "%s", o->loss_attn ? "attn" : "mse");
    meta->mse_mix = o->mse_mix;
    snprintf(meta->latent_quant, sizeof meta->latent_quant, "none");
    for (int i = 0; i < o->n_data; i++) {
        const char *bn = strrchr(o->data[i], '/');
        size_t used = strlen(meta->data);
        snprintf(meta->data + used, sizeof meta->data - used, "%s%s", i ? "," : "", bn ? bn + 1 : o->data[i]);
    }
    snprintf(meta->corpus_sha256, sizeof meta->corpus_sha256, "%s", kv->corpus_sha256);
    meta->n_train_tokens = s->train_end;
    meta->n_val_tokens = kv->n_tokens - s->val_begin;
    meta->epochs = o->epochs;
    meta->seed = o->seed;
    meta->batch_tokens = o->batch_tokens;
    meta->lr = o->adam.lr;
    meta->weight_decay = o->adam.weight_decay;
    meta->clip = o->adam.clip;
    snprintf(meta->device, sizeof meta->device, "%s", o->device);
}

/* Opens the data, checks the sizes, and builds the empty codec, one model per stored
 * (layer, kind, slot), and the scratch of the run. */
static int setup_run(run_state *s, kvc_err *err) {
    const kvc_train_opts *o = s->o;
    if (strcmp(o->device, "cpu") && strcmp(o->device, "cuda")) return kvc_fail(err, "--device must be cpu or cuda");
    if (!(s->ds = kvc_dataset_open(o->data, o->n_data, err))) return -1;
    s->info = kvc_dataset_info(s->ds);
    const kvc_kv_info *kv = s->info;
    ae_config cfg = o->ae;
    cfg.in_dim = kv->head_dim;
    if (kvc_ae_config_check(&cfg, err)) return -1;
    if (o->epochs < 1 || o->batch_tokens < 2) return kvc_fail(err, "need --epochs >= 1 and --batch >= 2");
    kvc_dataset_split(s->ds, o->val_frac, &s->train_end, &s->val_begin);
    if (s->train_end < o->batch_tokens || kv->n_tokens - s->val_begin < 1)
        return kvc_fail(err, "the dataset has %lld tokens: too few for a batch of %d and a validation split",
                        (long long)kv->n_tokens, o->batch_tokens);
    kvc_codec_meta meta;
    build_meta(s, &cfg, &meta);
    if (!(s->codec = kvc_codec_new(&meta, err))) return -1;
    s->slots = s->codec->slots;
    s->nnet = kv->n_layer * 2 * s->slots;
    s->models = calloc((size_t)s->nnet, sizeof *s->models);
    s->w_attn = malloc((size_t)kv->head_dim * kv->head_dim * sizeof(float));
    s->rel = calloc((size_t)s->nnet, sizeof(float));
    if (!s->models || !s->w_attn || !s->rel) return kvc_fail(err, "out of memory");
    for (int j = 0; j < kv->n_layers_stored; j++)
        for (int kind = 0; kind < 2; kind++)
            for (int slot = 0; slot < s->slots; slot++) {
                int idx = codec_index(s->codec, kv->layers[j], kind, slot);
                s->models[idx] = kvc_ae_new(&cfg, o->seed * 1000003u + (uint64_t)idx, err);
                if (!s->models[idx]) return -1;
            }
    return 0;
}

/* --resume: the trainer state and the best networks so far from the checkpoint at o->out. */
static int resume_run(run_state *s, kvc_train_state *st, kvc_err *err) {
    const kvc_train_opts *o = s->o;
    if (access(o->out, R_OK) != 0) return kvc_fail(err, "--resume: no checkpoint at '%s' to resume from", o->out);
    kvc_codec *prev = kvc_codec_load(o->out, err);
    if (!prev || check_resume(prev, s, err) || kvc_codec_load_train_state(o->out, prev, s->models, st, err)) {
        kvc_codec_free(prev);
        return -1;
    }
    kvc_codec *fresh = s->codec; /* keep the best networks found so far */
    prev->meta = fresh->meta;
    s->codec = prev;
    kvc_codec_free(fresh);
    fprintf(stderr, "kvcodec train: resuming after epoch %d (step %lld, best validation %.4f at epoch %d)\n",
            st->epoch, (long long)st->step, st->best_val, st->best_epoch);
    return 0;
}

/* The models' device twins for --device cuda. */
static int setup_device(run_state *s, kvc_err *err) {
    if (strcmp(s->o->device, "cuda")) return 0;
#ifdef KVC_HAVE_CUDA
    char why[256];
    if (!kvc_ae_cuda_available(why, sizeof why)) return kvc_fail(err, "--device cuda: %s", why);
    if (!(s->gpu = calloc((size_t)s->nnet, sizeof *s->gpu))) return kvc_fail(err, "out of memory");
    for (int i = 0; i < s->nnet; i++)
        if (s->models[i] && !(s->gpu[i] = kvc_ae_cuda_new(s->models[i], err))) return -1;
    return 0;
#else
    return kvc_fail(err, "--device cuda: this build has no CUDA backend");
#endif
}

/* One epoch: the shuffled training batches, then validation; returns the mean training loss
 * in *loss. */
static int run_epoch(run_state *s, int epoch, kvc_train_state *st, int64_t steps_per_epoch, int64_t total_steps,
                     const unsigned char *want, double *loss, kvc_err *err) {
    const kvc_train_opts *o = s->o;
    /* each epoch's order depends only on (seed, epoch): a resumed run replays it */
    kvc_batch_opts bo = {0, s->train_end, o->batch_tokens, 0, 0, o->seed * 7919u + (uint64_t)epoch, 1, want};
    kvc_batcher *bt = kvc_batcher_new(s->ds, &bo, err);
    if (!bt) return -1;
    uint64_t rng = o->seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(epoch + 1));
    double sum_loss = 0;
    int64_t n_steps = 0, rows = 0;
    double te = kvc_now();
    kvc_batch b;
    int r;
    while ((r = kvc_batcher_next(bt, &b, err)) == 1) {
        float lr = kvc_ae_lr_schedule(st->step, total_steps, o->warmup_steps, o->adam.lr, o->min_lr);
        double lv = train_batch(s, &b, lr, &rng, st->step, err);
        if (!isfinite(lv)) { r = -1; break; }
        sum_loss += lv;
        n_steps++;
        st->step++;
        rows += (int64_t)b.n * s->info->n_head_kv;
        if (o->progress) {
            char label[96];
            snprintf(label, sizeof label, "epoch %d/%d loss %.4g lr %.2e", epoch + 1, o->epochs, sum_loss / n_steps, lr);
            kvc_progress_draw(label, (double)(st->step - (int64_t)epoch * steps_per_epoch), (double)steps_per_epoch,
                              "step", te);
        }
    }
    kvc_batcher_free(bt);
    if (o->progress) kvc_progress_end();
    if (r < 0) return -1;
#ifdef KVC_HAVE_CUDA
    for (int i = 0; s->gpu && i < s->nnet; i++)
        if (s->gpu[i] && kvc_ae_cuda_download(s->gpu[i], s->models[i], err)) return -1;
#endif
    double ek, ev, ea;
    if (validate(s, s->rel, &ek, &ev, &ea, err)) return -1;
    double el = kvc_now() - te;
    *loss = sum_loss / (n_steps ? n_steps : 1);
    fprintf(stderr, "epoch %d/%d: train loss %.5f, validation rel. error K %.4f V %.4f (%.1f s, %.0f rows/s per model)\n",
            epoch + 1, o->epochs, *loss, ek, ev, el, rows / el);
    if (s->csv) {
        fprintf(s->csv, "%d,%lld,%.6g,%.6g,%.6g,%.6g,%.6g,%.2f\n", epoch + 1, (long long)st->step,
                kvc_ae_lr_schedule(st->step, total_steps, o->warmup_steps, o->adam.lr, o->min_lr), *loss, ea, ek, ev,
                kvc_now() - s->t0);
        fflush(s->csv);
    }
    st->epoch = epoch + 1;
    if (ea < st->best_val) {
        st->best_val = ea;
        st->best_epoch = epoch + 1;
        st->bad_epochs = 0;
        if (export_all(s, s->rel, err)) return -1;
    } else {
        st->bad_epochs++;
    }
    s->codec->meta.epochs_run = st->epoch;
    s->codec->meta.best_epoch = st->best_epoch;
    s->codec->meta.best_val = st->best_val;
    s->codec->meta.train_seconds += el;
    return kvc_codec_save(o->out, s->codec, s->models, st, err);
}

int kvc_train_codec(const kvc_train_opts *o, kvc_err *err) {
    run_state S = {0}, *s = &S;
    s->o = o;
    int rc = -1;
    kvc_train_state st = {0, 0, 0, INFINITY, 0};
    if (setup_run(s, err) || (o->resume && resume_run(s, &st, err)) || setup_device(s, err)) goto done;
    const kvc_kv_info *kv = s->info;
    if (o->curve_csv) {
        s->csv = fopen(o->curve_csv, o->resume ? "a" : "w");
        if (!s->csv) { kvc_fail(err, "cannot write the loss curve to '%s'", o->curve_csv); goto done; }
        if (!o->resume) fprintf(s->csv, "epoch,step,lr,train_loss,val_rel_err,val_rel_err_k,val_rel_err_v,seconds\n");
    }
    const int64_t steps_per_epoch = (s->train_end + o->batch_tokens - 1) / o->batch_tokens;
    const int64_t total_steps = steps_per_epoch * o->epochs;
    unsigned char want[KVC_MAX_LAYERS * 3] = {0};
    for (int j = 0; j < kv->n_layers_stored; j++) {
        want[j * 3 + KV_K] = want[j * 3 + KV_V] = 1;
        want[j * 3 + KV_Q] = (unsigned char)o->loss_attn;
    }
    s->t0 = kvc_now();
    for (int epoch = st.epoch; epoch < o->epochs; epoch++) {
        double loss;
        if (run_epoch(s, epoch, &st, steps_per_epoch, total_steps, want, &loss, err)) goto done;
        if (o->stop_after_epoch && st.epoch == o->stop_after_epoch && st.epoch < o->epochs) {
            fprintf(stderr, "kvcodec train: stopping after epoch %d as asked; continue with --resume\n", st.epoch);
            rc = 1;
            goto done;
        }
        if (st.bad_epochs >= o->patience) {
            fprintf(stderr, "kvcodec train: early stop after epoch %d (no improvement for %d epochs; best epoch %d)\n",
                    st.epoch, o->patience, st.best_epoch);
            break;
        }
    }
    if (o->reuse) {
        if (analyse_reuse(s, err)) goto done;
        if (!o->quiet) kvc_reuse_plan_print(s->codec->reuse, stdout);
    }
    if (kvc_codec_save(o->out, s->codec, o->no_state ? NULL : s->models, o->no_state ? NULL : &st, err)) goto done;
    if (!o->quiet) print_table(s);
    rc = 0;
done:
    if (s->csv) fclose(s->csv);
#ifdef KVC_HAVE_CUDA
    if (s->gpu) {
        for (int i = 0; i < s->nnet; i++) kvc_ae_cuda_free(s->gpu[i]);
        free(s->gpu);
    }
#endif
    if (s->models)
        for (int i = 0; i < s->nnet; i++) kvc_ae_free(s->models[i]);
    free(s->models);
    kvc_codec_free(s->codec);
    free(s->gather), free(s->a_attn), free(s->y), free(s->w_attn), free(s->rel);
    kvc_dataset_close(s->ds);
    return rc;
}
