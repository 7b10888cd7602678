/* test_cli.c - the kvcodec binary end to end: help and usage errors, and bad input (missing
 * model, corrupt or truncated GGUF, unsupported architecture, non-UTF-8 text, a prompt
 * longer than the context) each giving a one-line error and a non-zero exit, never a crash. */
#include <sys/wait.h>

#include "fixture.h"
#include "gguf_build.h"

typedef struct {
    int status;   /* exit code, or 128 + signal */
    char out[65536];
    char err[4096];
} run_result;

static void slurp(const char *path, char *buf, size_t cap) {
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(buf, 1, cap - 1, f) : 0;
    buf[n] = '\0';
    if (f) fclose(f);
}

/* Runs `kvcodec ARGS` through the shell with stdout and stderr captured. */
static run_result run(const char *args) {
    run_result r;
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' %s >/tmp/kvc_cli_out.%d 2>/tmp/kvc_cli_err.%d", KVC_SOURCE_DIR,
             KVC_BINARY, args, getpid(), getpid());
    int st = system(cmd);
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    char p[64];
    snprintf(p, sizeof p, "/tmp/kvc_cli_out.%d", getpid());
    slurp(p, r.out, sizeof r.out);
    unlink(p);
    snprintf(p, sizeof p, "/tmp/kvc_cli_err.%d", getpid());
    slurp(p, r.err, sizeof r.err);
    unlink(p);
    return r;
}

/* Expects failure with status 1 or 2, no crash, and `needle` in one line of stderr. */
static void expect_error(const char *args, const char *needle) {
    run_result r = run(args);
    cr_expect(r.status == 1 || r.status == 2, "kvcodec %s: exit status %d (stderr: %s)", args, r.status, r.err);
    cr_expect(strstr(r.err, needle) != NULL, "kvcodec %s: stderr lacks '%s': %s", args, needle, r.err);
    cr_expect(strncmp(r.err, "kvcodec", 7) == 0, "error should start with 'kvcodec': %s", r.err);
}

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

Test(cli, help_and_usage_errors) {
    const char *cmds[] = {"inspect", "tokenize", "ppl", "generate", "bench", "capture", "train"};
    for (size_t i = 0; i < 7; i++) {
        char a[64];
        snprintf(a, sizeof a, "%s --help", cmds[i]);
        run_result r = run(a);
        cr_expect_eq(r.status, 0, "%s --help exit %d", cmds[i], r.status);
        cr_expect(strstr(r.out, "usage: kvcodec") != NULL, "%s --help: %s", cmds[i], r.out);
    }
    run_result r = run("--help");
    cr_expect_eq(r.status, 0);
    cr_expect(strstr(r.out, "generate") != NULL);
    expect_error("frobnicate", "unknown command");
    expect_error("ppl --bogus 1", "unknown option '--bogus'");
    expect_error("ppl --ctx", "needs a value");
    expect_error("ppl --ctx abc", "invalid value");
    expect_error("generate", "missing --prompt");
    expect_error("train --data x.h5 --out c.h5", "missing --latent");
    expect_error("train --data x.h5 --out c.h5 --latent 8 --act swish", "unknown --act 'swish'");
    expect_error("train --data x.h5 --out c.h5 --latent 8 --share token", "--share must be layer or head");
    expect_error("train --data /nonexistent/kv.h5 --out /tmp/c.h5 --latent 8", "/nonexistent/kv.h5");
    expect_error("train --data x.h5 --out c.h5 --latent 8 --reuse heads=-1", "heads");
    expect_error("capture --tokens 10", "missing --out");
}

Test(cli, missing_model) {
    expect_error("ppl --model /nonexistent/m.gguf --text data/corpora/eval-debian-handbook.txt", "cannot open model");
    expect_error("generate --model /nonexistent/m.gguf --prompt hi", "cannot open model");
    expect_error("inspect /nonexistent/m.gguf", "cannot open model");
}

/* A tiny but valid GGUF whose architecture is not llama. */
static gbuf tiny_gguf(const char *arch) {
    gbuf b = {0};
    gb_header(&b, 3, 1, 1);
    gb_kv_str(&b, "general.architecture", arch);
    gb_tensor(&b, "w", 32, 1, 0, 0);
    gb_pad(&b, 32);
    float z[32] = {0};
    gb_put(&b, z, sizeof z);
    return b;
}

Test(cli, corrupt_truncated_and_foreign_models) {
    const char *p = "/tmp/kvc_cli_model.gguf";
    gbuf b = tiny_gguf("gpt2");
    write_file(p, b.p, b.n);
    expect_error("generate --model /tmp/kvc_cli_model.gguf --prompt hi", "unsupported architecture 'gpt2'");
    run_result r = run("inspect /tmp/kvc_cli_model.gguf");
    cr_expect_eq(r.status, 0, "%s", r.err);
    cr_expect(strstr(r.out, "general.architecture") != NULL);
    write_file(p, b.p, b.n - 7); /* truncated tensor data */
    expect_error("generate --model /tmp/kvc_cli_model.gguf --prompt hi", "beyond the end");
    expect_error("inspect /tmp/kvc_cli_model.gguf", "beyond the end");
    write_file(p, "GGUF\x03\x00\x00\x00\xff", 9); /* header cut short */
    expect_error("generate --model /tmp/kvc_cli_model.gguf --prompt hi", "truncated");
    write_file(p, "PK\x03\x04 this is a zip", 19);
    expect_error("ppl --model /tmp/kvc_cli_model.gguf", "bad magic");
    gbuf l = tiny_gguf("llama"); /* right architecture, missing hyper-parameters */
    write_file(p, l.p, l.n);
    expect_error("generate --model /tmp/kvc_cli_model.gguf --prompt hi", "lacks 'llama.block_count'");
    unlink(p);
    free(b.p);
    free(l.p);
}

Test(cli, inspect_the_default_codec) {
    run_result r = run("inspect checkpoints/smollm2-135m-ae32.h5");
    cr_expect_eq(r.status, 0, "%s", r.err);
    cr_expect(strstr(r.out, "\"kvcodec-codec\"") != NULL, "%s", r.out);
    cr_expect(strstr(r.out, "layer_29/v/slot_0/dec_0_weight") != NULL);
    cr_expect(strstr(r.out, "reuse/maps") != NULL);
    write_file("/tmp/kvc_cli_bad.h5", "\x89HDF\r\n\x1a\n garbage", 17);
    expect_error("inspect /tmp/kvc_cli_bad.h5", "corrupt or truncated");
    unlink("/tmp/kvc_cli_bad.h5");
}

Test(cli, text_not_utf8) {
    write_file("/tmp/kvc_cli_text.txt", "caf\xe9 latin-1\n", 13);
    expect_error("ppl --text /tmp/kvc_cli_text.txt", "not valid UTF-8 (first bad byte at offset 3)");
    expect_error("ppl --text /nonexistent/t.txt", "cannot open");
    expect_error("generate --prompt \"$(printf 'a\\377b')\"", "not valid UTF-8");
    unlink("/tmp/kvc_cli_text.txt");
}

Test(cli, prompt_longer_than_context, .timeout = 120) {
    REQUIRE_MODEL(model);
    char a[1024];
    snprintf(a, sizeof a, "generate --model '%s' --ctx 8 --prompt 'one two three four five six seven eight nine ten'", model);
    expect_error(a, "longer than the context of 8 tokens");
}

Test(cli, real_model_inspect_ppl_generate, .timeout = 300) {
    REQUIRE_MODEL(model);
    char a[1024];
    snprintf(a, sizeof a, "inspect '%s'", model);
    run_result r = run(a);
    cr_expect_eq(r.status, 0, "%s", r.err);
    cr_expect(strstr(r.out, "blk.29.ffn_down.weight") != NULL);
    cr_expect(strstr(r.out, "llama.attention.head_count_kv") != NULL);
    snprintf(a, sizeof a, "ppl --model '%s' --tokens 100 --ctx 50 --threads 2 --json", model);
    r = run(a);
    cr_expect_eq(r.status, 0, "%s", r.err);
    cr_expect(strstr(r.out, "\"scored\": 98") != NULL, "%s", r.out);
    snprintf(a, sizeof a, "generate --model '%s' --threads 2 --max-tokens 16 --prompt "
                          "'The history of the Debian project began in 1993, when Ian Murdock'", model);
    r = run(a);
    cr_expect_eq(r.status, 0, "%s", r.err);
    /* greedy continuation from tests/fixtures/greedy_ref.txt (transformers) */
    cr_expect(strstr(r.out, "Ian Murdock, a software engineer at the University of California, Berkeley") != NULL,
              "%s", r.out);
}
