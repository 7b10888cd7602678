/* test_train.c - the training loop end to end on small synthetic KV datasets written with
 * kv_writer: a low-rank signal is learnt, an interrupted run resumed from its checkpoint ends
 * where an uninterrupted one does, the checkpoint round-trips, and bad input (latent too
 * large, unwritable folder, a full disk during export, another model's data) fails cleanly. */
#include <math.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "fixture.h"
#include "kvc/checkpoint.h"
#include "kvc/dataset.h"
#include "kvc/trainer.h"

#define RESUME_TOL 1e-6   /* resumed vs uninterrupted weights (same arithmetic, same order) */
#define LOWRANK_GOAL 0.08 /* validation relative error on exactly rank-4 data with latent 6 */

enum { L = 3, HK = 2, HQ = 4, D = 16, N = 1536, CTX = 128 };

/* Writes a synthetic dataset: every K/V row is a fixed rank-4 mix of 4 random factors
 * (plus tiny noise), so a latent of 4+ can reconstruct it. */
static void write_synthetic(const char *path, const char *fingerprint, uint32_t seed) {
    kvc_kv_info info = {0};
    snprintf(info.model_name, sizeof info.model_name, "synthetic");
    snprintf(info.model_fingerprint, sizeof info.model_fingerprint, "%s", fingerprint);
    snprintf(info.corpus_name, sizeof info.corpus_name, "synthetic");
    snprintf(info.dtype, sizeof info.dtype, "f32");
    info.n_layer = L; info.n_head = HQ; info.n_head_kv = HK; info.head_dim = D; info.rope_base = 10000; info.ctx = CTX;
    info.n_layers_stored = L;
    for (int l = 0; l < L; l++) info.layers[l] = l;
    kvc_err err = {{0}};
    kvc_kv_writer *w = kvc_kv_writer_open(path, &info, 64, 0, &err);
    cr_assert_not_null(w, "%s", err.msg);
    uint32_t s = seed;
#define RND() ((s = s * 1664525u + 1013904223u), ((float)(s >> 8) / 16777216.0f * 2.0f - 1.0f))
    static float mix[L][2][4][D];
    for (int l = 0; l < L; l++) for (int k = 0; k < 2; k++) for (int r = 0; r < 4; r++) for (int d = 0; d < D; d++) mix[l][k][r][d] = RND();
    static float kb[L][CTX * HK * D], vb[L][CTX * HK * D], qb[L][CTX * HQ * D];
    int32_t ids[CTX], pos[CTX];
    for (int t0 = 0; t0 < N; t0 += CTX) {
        for (int t = 0; t < CTX; t++) { ids[t] = t0 + t; pos[t] = t; }
        for (int l = 0; l < L; l++) {
            for (int row = 0; row < CTX * HK; row++) {
                float f[2][4];
                for (int k = 0; k < 2; k++) for (int r = 0; r < 4; r++) f[k][r] = RND() * 2;
                for (int d = 0; d < D; d++) {
                    float a = 0, b = 0;
                    for (int r = 0; r < 4; r++) { a += f[0][r] * mix[l][0][r][d]; b += f[1][r] * mix[l][1][r][d]; }
                    kb[l][row * D + d] = a + 1e-3f * RND();
                    vb[l][row * D + d] = b + 1e-3f * RND();
                }
            }
            for (int i = 0; i < CTX * HQ * D; i++) qb[l][i] = RND();
        }
        const float *kp[L], *vp[L], *qp[L];
        for (int l = 0; l < L; l++) { kp[l] = kb[l]; vp[l] = vb[l]; qp[l] = qb[l]; }
        cr_assert_eq(kvc_kv_writer_append(w, ids, pos, CTX, kp, vp, qp, &err), 0, "%s", err.msg);
    }
    cr_assert_eq(kvc_kv_writer_close(w, 1, &err), 0, "%s", err.msg);
#undef RND
}

static kvc_train_opts base_opts(const char **data, const char *out) {
    kvc_train_opts o;
    kvc_train_opts_defaults(&o);
    o.data = data;
    o.n_data = 1;
    o.out = out;
    o.ae.latent = 6;
    o.epochs = 6;
    o.batch_tokens = 64;
    o.warmup_steps = 10;
    o.adam.lr = 1e-2f;
    o.patience = 100;
    o.quiet = 1;
    return o;
}

static char *tmpname(const char *stem) {
    static char buf[4][128];
    static int k;
    char *b = buf[k++ % 4];
    snprintf(b, 128, "/tmp/kvc_%s.%d.h5", stem, getpid());
    return b;
}

Test(train, learns_a_low_rank_signal_and_checkpoint_round_trips, .timeout = 120) {
    const char *data = tmpname("syn"), *out = tmpname("codec");
    write_synthetic(data, "00000000deadbeef", 7);
    kvc_train_opts o = base_opts(&data, out);
    o.reuse = "heads=2";
    kvc_err err = {{0}};
    cr_assert_eq(kvc_train_codec(&o, &err), 0, "%s", err.msg);
    kvc_codec *c = kvc_codec_load(out, &err);
    cr_assert_not_null(c, "%s", err.msg);
    cr_expect_str_eq(c->meta.model_fingerprint, "00000000deadbeef");
    cr_expect_eq(c->meta.ae.latent, 6);
    cr_expect_eq(c->meta.epochs_run, 6);
    cr_expect(c->meta.best_val < LOWRANK_GOAL, "best validation error %g", c->meta.best_val);
    for (int l = 0; l < L; l++) {
        cr_expect(c->trained[l]);
        for (int kind = 0; kind < 2; kind++) {
            int i = codec_index(c, l, kind, 0);
            cr_expect(c->rel_err[i] < LOWRANK_GOAL, "layer %d kind %d: %g", l, kind, c->rel_err[i]);
            cr_expect_eq(c->ae[i].enc[c->ae[i].n_enc - 1].out, 6);
        }
    }
    cr_assert_not_null(c->reuse);
    int n_an = 0, n_id = 0, n_lin = 0;
    kvc_reuse_plan_count(c->reuse, &n_an, &n_id, &n_lin);
    cr_expect_eq(n_an, (L - 1) * HK * 2);
    cr_expect_eq(n_id + n_lin, 2);
    cr_expect_eq(kvc_codec_check_model(c, "00000000deadbeef", L, HK, D, &err), 0);
    cr_expect_eq(kvc_codec_check_model(c, "1111111111111111", L, HK, D, &err), -1);
    cr_expect(strstr(err.msg, "trained for model") != NULL, "%s", err.msg);
    cr_expect_eq(kvc_codec_check_model(c, "00000000deadbeef", L, HK, 32, &err), -1);
    kvc_codec_free(c);
    unlink(data);
    unlink(out);
}

/* Weights of the exported networks, flattened, for comparison. */
static double max_diff(const kvc_codec *a, const kvc_codec *b) {
    double mx = 0;
    for (int i = 0; i < L * 2; i++)
        for (int h = 0; h < 2; h++) {
            const ae_dense *x = h ? a->ae[i].dec : a->ae[i].enc, *y = h ? b->ae[i].dec : b->ae[i].enc;
            int n = h ? a->ae[i].n_dec : a->ae[i].n_enc;
            for (int k = 0; k < n; k++)
                for (int j = 0; j < x[k].in * x[k].out; j++) mx = fmax(mx, fabs(x[k].w[j] - y[k].w[j]));
        }
    return mx;
}

Test(train, resume_after_interruption_ends_where_an_uninterrupted_run_ends, .timeout = 180) {
    const char *data = tmpname("syn2"), *a = tmpname("full"), *b = tmpname("resumed");
    write_synthetic(data, "00000000deadbeef", 11);
    kvc_err err = {{0}};
    kvc_train_opts o = base_opts(&data, a);
    o.ae.hidden = 8;
    o.ae.norm = AE_NORM_BATCH; /* KV-CAR form: BN running stats and Adam moments must resume too */
    o.epochs = 4;
    cr_assert_eq(kvc_train_codec(&o, &err), 0, "%s", err.msg);
    o.out = b;
    o.stop_after_epoch = 2;
    cr_assert_eq(kvc_train_codec(&o, &err), 1, "%s", err.msg);
    kvc_codec *mid = kvc_codec_load(b, &err);
    cr_assert_not_null(mid, "%s", err.msg);
    cr_expect_eq(mid->meta.epochs_run, 2);
    kvc_codec_free(mid);
    o.stop_after_epoch = 0;
    o.resume = 1;
    cr_assert_eq(kvc_train_codec(&o, &err), 0, "%s", err.msg);
    kvc_codec *ca = kvc_codec_load(a, &err), *cb = kvc_codec_load(b, &err);
    cr_assert(ca && cb, "%s", err.msg);
    cr_expect_eq(cb->meta.epochs_run, 4);
    double d = max_diff(ca, cb);
    cr_expect(d <= RESUME_TOL, "resumed weights differ by %g", d);
    cr_expect(fabs(ca->meta.best_val - cb->meta.best_val) <= 1e-9 + 1e-6 * ca->meta.best_val, "%g vs %g",
              ca->meta.best_val, cb->meta.best_val);
    kvc_codec_free(ca);
    kvc_codec_free(cb);
    unlink(data); unlink(a); unlink(b);
}

Test(train, bad_input_fails_cleanly, .timeout = 120) {
    const char *data = tmpname("syn3"), *other = tmpname("other"), *out = tmpname("bad");
    write_synthetic(data, "00000000deadbeef", 3);
    write_synthetic(other, "ffffffff00000000", 3);
    kvc_err err = {{0}};
    kvc_train_opts o = base_opts(&data, out);
    o.ae.latent = D;
    cr_expect_eq(kvc_train_codec(&o, &err), -1);
    cr_expect(strstr(err.msg, "latent") != NULL, "%s", err.msg);
    o = base_opts(&data, "/nonexistent/dir/codec.h5");
    o.epochs = 1;
    cr_expect_eq(kvc_train_codec(&o, &err), -1);
    cr_expect(strstr(err.msg, "cannot create") != NULL, "%s", err.msg);
    /* two files from different models cannot be one dataset */
    const char *both[2] = {data, other};
    o = base_opts(both, out);
    o.n_data = 2;
    cr_expect_eq(kvc_train_codec(&o, &err), -1);
    cr_expect(strstr(err.msg, "model") != NULL, "%s", err.msg);
    /* resuming a checkpoint with data from another model */
    o = base_opts(&data, out);
    o.epochs = 1;
    cr_assert_eq(kvc_train_codec(&o, &err), 0, "%s", err.msg);
    const char *od[1] = {other};
    o = base_opts(od, out);
    o.resume = 1;
    cr_expect_eq(kvc_train_codec(&o, &err), -1);
    cr_expect(strstr(err.msg, "cannot resume") != NULL, "%s", err.msg);
    /* missing file */
    const char *missing[1] = {"/nonexistent/kv.h5"};
    o = base_opts(missing, out);
    cr_expect_eq(kvc_train_codec(&o, &err), -1);
    cr_expect(err.msg[0] != '\0');
    unlink(data); unlink(other); unlink(out);
}

Test(train, full_disk_during_export_keeps_the_previous_checkpoint, .timeout = 120) {
    const char *data = tmpname("syn4"), *out = tmpname("keep");
    write_synthetic(data, "00000000deadbeef", 5);
    kvc_err err = {{0}};
    kvc_train_opts o = base_opts(&data, out);
    o.epochs = 1;
    cr_assert_eq(kvc_train_codec(&o, &err), 0, "%s", err.msg);
    struct stat st0;
    cr_assert_eq(stat(out, &st0), 0);
    char *before;
    size_t nb;
    cr_assert_eq(kvc_read_file(out, &before, &nb, &err), 0);
    /* a file-size limit makes every write past 16 KiB fail, as a full disk does */
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit old, rl = {16384, 16384};
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
    o.epochs = 2;
    o.seed = 99;
    int rc = kvc_train_codec(&o, &err);
    setrlimit(RLIMIT_FSIZE, &old); /* Criterion writes its report after the test */
    cr_expect_eq(rc, -1, "export should fail on a full disk");
    cr_expect(strstr(err.msg, "disk full") != NULL || strstr(err.msg, "failed") != NULL, "%s", err.msg);
    char *after;
    size_t na;
    cr_assert_eq(kvc_read_file(out, &after, &na, &err), 0);
    cr_expect(na == nb && memcmp(before, after, nb) == 0, "the previous checkpoint changed");
    char tmp[200];
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    cr_expect_neq(access(tmp, F_OK), 0, "temporary file left behind");
    free(before);
    free(after);
    unlink(data);
    unlink(out);
}
