/* test_capture.c - `kvcodec capture` on the real model: the file's attributes, positions and
 * layout, and the captured pre-RoPE K, V, Q of layer 0 against the projections computed here
 * from the model's weights; f16 against f32; flat memory; bad options; SHA-256 vectors. */
#include <math.h>
#include <sys/wait.h>

#include "fixture.h"
#include "kvc/dataset.h"
#include "kvc/model.h"

#define F32_TOL 1e-4  /* captured layer-0 projections vs recomputed (relative to row norm) */
#define F16_TOL 2e-3  /* f16 file vs f32 file, relative to the row's max magnitude */

Test(capture, sha256_vectors) {
    char h[65];
    kvc_sha256_hex("", 0, h);
    cr_expect_str_eq(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    kvc_sha256_hex("abc", 3, h);
    cr_expect_str_eq(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *s = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"; /* 56 bytes: two-block padding */
    kvc_sha256_hex(s, strlen(s), h);
    cr_expect_str_eq(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

/* Runs a shell command in the source dir; returns its exit status and captures stdout. */
static int sh(const char *cmd, char *out, size_t cap) {
    char full[4096];
    snprintf(full, sizeof full, "cd '%s' && %s", KVC_SOURCE_DIR, cmd);
    FILE *p = popen(full, "r");
    size_t n = p ? fread(out, 1, cap - 1, p) : 0;
    out[n] = '\0';
    int st = p ? pclose(p) : -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

Test(capture, layer0_projections_positions_and_attributes, .timeout = 300) {
    REQUIRE_MODEL(model);
    char cmd[2048], out[4096];
    snprintf(cmd, sizeof cmd, "'%s' capture --model '%s' --tokens 600 --ctx 256 --layers 0,1,29 --dtype f32 --threads 2"
             " --out /tmp/kvc_cap32.%d.h5 2>&1", KVC_BINARY, model, getpid());
    cr_assert_eq(sh(cmd, out, sizeof out), 0, "%s", out);
    snprintf(cmd, sizeof cmd, "'%s' capture --model '%s' --tokens 600 --ctx 256 --layers 0,1,29 --dtype f16 --gzip 4"
             " --threads 2 --out /tmp/kvc_cap16.%d.h5 2>&1", KVC_BINARY, model, getpid());
    cr_assert_eq(sh(cmd, out, sizeof out), 0, "%s", out);
    char p32[64], p16[64];
    snprintf(p32, sizeof p32, "/tmp/kvc_cap32.%d.h5", getpid());
    snprintf(p16, sizeof p16, "/tmp/kvc_cap16.%d.h5", getpid());
    kvc_err err = {{0}};
    const char *paths[1] = {p32};
    kvc_dataset *d = kvc_dataset_open(paths, 1, &err);
    cr_assert_not_null(d, "%s", err.msg);
    const kvc_kv_info *I = kvc_dataset_info(d);
    kvc_model *m = kvc_model_load(model, &err);
    cr_assert_not_null(m, "%s", err.msg);
    cr_expect_eq(I->n_tokens, 600);
    cr_expect_eq(I->n_layers_stored, 3);
    cr_expect(I->layers[0] == 0 && I->layers[1] == 1 && I->layers[2] == 29);
    cr_expect_str_eq(I->model_fingerprint, m->fingerprint);
    cr_expect_eq(I->ctx, 256);
    cr_expect_eq(I->head_dim, 64);
    cr_expect_eq(I->n_head_kv, 3);
    char *txt;
    size_t len;
    cr_assert_eq(kvc_read_file(KVC_SOURCE_DIR "/data/corpora/train-python-docs.txt", &txt, &len, &err), 0);
    char sha[65];
    kvc_sha256_hex(txt, len, sha);
    cr_expect_str_eq(I->corpus_sha256, sha);
    free(txt);
    int32_t pos[600];
    cr_assert_eq(kvc_dataset_read_positions(d, 0, 600, pos, &err), 0, "%s", err.msg);
    cr_expect(pos[0] == 0 && pos[255] == 255 && pos[256] == 0 && pos[599] == 599 - 512);
    /* layer 0 depends on the token alone: k = Wk rmsnorm(embed(token)) before RoPE */
    enum { D = 64, T = 5 };
    const int E = m->hp.n_embd;
    const int tok_at[T] = {0, 1, 255, 256, 599};
    float *k = malloc(600 * 3 * D * 4), *v = malloc(600 * 3 * D * 4), *q = malloc(600 * 9 * D * 4);
    cr_assert_eq(kvc_dataset_read(d, 0, KV_K, 0, 600, k, &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_dataset_read(d, 0, KV_V, 0, 600, v, &err), 0);
    cr_assert_eq(kvc_dataset_read(d, 0, KV_Q, 0, 600, q, &err), 0);
    /* token ids: re-tokenize the corpus head the way capture does */
    cr_assert_eq(kvc_read_file(KVC_SOURCE_DIR "/data/corpora/train-python-docs.txt", &txt, &len, &err), 0);
    int32_t *ids = malloc(4096 * sizeof *ids);
    int64_t nt = kvc_tokenizer_encode(m->tok, txt, 20000, 0, ids, 4096, &err);
    cr_assert(nt >= 600);
    free(txt);
    float *x = malloc(E * 4), *xn = malloc(E * 4), *rk = malloc(3 * D * 4), *rv = malloc(3 * D * 4), *rq = malloc(9 * D * 4);
    for (int i = 0; i < T; i++) {
        int t = tok_at[i];
        memcpy(x, m->tok_embd.f + (size_t)ids[t] * E, E * 4);
        kvc_rmsnorm_cpu(xn, x, m->layers[0].attn_norm, 1, E, m->hp.rms_eps);
        kvc_matmul_cpu(rk, xn, &m->layers[0].wk, 1);
        kvc_matmul_cpu(rv, xn, &m->layers[0].wv, 1);
        kvc_matmul_cpu(rq, xn, &m->layers[0].wq, 1);
        double ek = 0, nk = 0, ev = 0, nv = 0, eq = 0, nq = 0;
        for (int j = 0; j < 3 * D; j++) {
            ek += pow(k[t * 3 * D + j] - rk[j], 2); nk += rk[j] * rk[j];
            ev += pow(v[t * 3 * D + j] - rv[j], 2); nv += rv[j] * rv[j];
        }
        for (int j = 0; j < 9 * D; j++) { eq += pow(q[t * 9 * D + j] - rq[j], 2); nq += rq[j] * rq[j]; }
        cr_expect(sqrt(ek / nk) < F32_TOL, "token %d: K rel err %g", t, sqrt(ek / nk));
        cr_expect(sqrt(ev / nv) < F32_TOL, "token %d: V rel err %g", t, sqrt(ev / nv));
        cr_expect(sqrt(eq / nq) < F32_TOL, "token %d: Q rel err %g (must be before RoPE)", t, sqrt(eq / nq));
    }
    /* the f16 file holds the same values to half precision */
    const char *p2[1] = {p16};
    kvc_dataset *d16 = kvc_dataset_open(p2, 1, &err);
    cr_assert_not_null(d16, "%s", err.msg);
    cr_expect_str_eq(kvc_dataset_info(d16)->dtype, "f16");
    float *k16 = malloc(600 * 3 * D * 4);
    cr_assert_eq(kvc_dataset_read(d16, 2, KV_K, 0, 600, k16, &err), 0, "%s", err.msg);
    cr_assert_eq(kvc_dataset_read(d, 2, KV_K, 0, 600, k, &err), 0);
    double worst = 0;
    for (int i = 0; i < 600 * 3 * D; i++) worst = fmax(worst, fabs(k16[i] - k[i]) / fmax(fabs(k[i]), 1.0));
    cr_expect(worst < F16_TOL, "f16 vs f32 worst relative difference %g", worst);
    kvc_dataset_close(d16);
    kvc_dataset_close(d);
    kvc_model_free(m);
    free(k); free(v); free(q); free(k16); free(ids); free(x); free(xn); free(rk); free(rv); free(rq);
    unlink(p32);
    unlink(p16);
}

Test(capture, memory_stays_flat, .timeout = 300) {
    REQUIRE_MODEL(model);
    char cmd[2048], out1[4096], out2[4096];
    snprintf(cmd, sizeof cmd, "'%s' capture --model '%s' --tokens 512 --ctx 256 --threads 2 --out /tmp/kvc_rss.%d.h5", KVC_BINARY, model, getpid());
    cr_assert_eq(sh(cmd, out1, sizeof out1), 0);
    snprintf(cmd, sizeof cmd, "'%s' capture --model '%s' --tokens 4096 --ctx 256 --threads 2 --out /tmp/kvc_rss.%d.h5", KVC_BINARY, model, getpid());
    cr_assert_eq(sh(cmd, out2, sizeof out2), 0);
    const char *a = strstr(out1, "peak RSS "), *b = strstr(out2, "peak RSS ");
    cr_assert(a && b, "%s / %s", out1, out2);
    double r1 = atof(a + 9), r2 = atof(b + 9);
    cr_log_info("peak RSS: %.0f MiB for 512 tokens, %.0f MiB for 4096 tokens", r1, r2);
    cr_expect(r2 - r1 < 16, "8x the tokens grew peak RSS from %.0f to %.0f MiB", r1, r2);
    char p[64];
    snprintf(p, sizeof p, "/tmp/kvc_rss.%d.h5", getpid());
    unlink(p);
}

Test(capture, bad_options_leave_no_file, .timeout = 120) {
    REQUIRE_MODEL(model);
    char cmd[2048], out[4096];
    snprintf(cmd, sizeof cmd, "'%s' capture --model '%s' --tokens 64 --layers 30 --out /tmp/kvc_bad.h5 2>&1", KVC_BINARY, model);
    cr_expect_neq(sh(cmd, out, sizeof out), 0);
    cr_expect(strstr(out, "bad --layers '30'") != NULL, "%s", out);
    snprintf(cmd, sizeof cmd, "'%s' capture --model '%s' --tokens 64 --out /nonexistent/dir/kv.h5 2>&1", KVC_BINARY, model);
    cr_expect_neq(sh(cmd, out, sizeof out), 0);
    cr_expect(strstr(out, "cannot create '/nonexistent/dir/kv.h5.tmp'") != NULL, "%s", out);
    snprintf(cmd, sizeof cmd, "'%s' capture --model '%s' --dtype bf16 --out /tmp/kvc_bad.h5 2>&1", KVC_BINARY, model);
    cr_expect_eq(sh(cmd, out, sizeof out), 2);
    cr_expect(access("/tmp/kvc_bad.h5", F_OK) != 0 && access("/tmp/kvc_bad.h5.tmp", F_OK) != 0);
    /* a full disk mid-capture (a 2 MiB file-size limit): one-line error, exit 1, no file */
    snprintf(cmd, sizeof cmd, "trap '' XFSZ; ulimit -f 2048; '%s' capture --model '%s' --tokens 2048 --layers 0 --threads 2"
             " --out /tmp/kvc_full.%d.h5 2>&1", KVC_BINARY, model, getpid());
    cr_expect_eq(sh(cmd, out, sizeof out), 1, "%s", out);
    cr_expect(strstr(out, "disk full") != NULL, "%s", out);
    char p[64];
    snprintf(p, sizeof p, "/tmp/kvc_full.%d.h5", getpid());
    cr_expect(access(p, F_OK) != 0);
}
