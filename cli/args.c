/* args.c - declarative long-option parsing and the helpers every subcommand shares
 * (loading a model, reading UTF-8 text, tokenizing) with uniform one-line errors. */
#include "cli.h"

#include "kvc/ops.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cli_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "kvcodec %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return 1;
}

static void print_help(const char *cmd, const char *usage, const char *summary, const arg_spec *specs) {
    printf("usage: kvcodec %s %s\n\n%s\n\noptions:\n", cmd, usage, summary);
    for (const arg_spec *s = specs; s->name; s++) {
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", s->name, s->type == ARG_FLAG ? "" : " ",
                 s->type == ARG_FLAG ? "" : (s->metavar ? s->metavar : "X"));
        printf("  %-26s %s%s\n", left, s->help, s->required ? " (required)" : "");
    }
    printf("  %-26s %s\n", "--help", "show this help");
}

/* Converts text to the option's type; returns 0 or -1. */
static int set_value(const arg_spec *s, const char *v) {
    char *end;
    errno = 0;
    switch (s->type) {
    case ARG_STR: *(const char **)s->dest = v; return 0;
    case ARG_INT: {
        long x = strtol(v, &end, 10);
        if (errno || *end || end == v || x < -2147483647L || x > 2147483647L) return -1;
        *(int *)s->dest = (int)x;
        return 0;
    }
    case ARG_U64: {
        unsigned long long x = strtoull(v, &end, 10);
        if (errno || *end || end == v || v[0] == '-') return -1;
        *(uint64_t *)s->dest = x;
        return 0;
    }
    case ARG_FLOAT: {
        float x = strtof(v, &end);
        if (errno || *end || end == v) return -1;
        *(float *)s->dest = x;
        return 0;
    }
    case ARG_FLAG: *(int *)s->dest = 1; return 0;
    }
    return -1;
}

int args_parse(const char *cmd, const char *usage, const char *summary, const arg_spec *specs, int argc,
               char **argv, const char **pos, int max_pos, int *n_pos) {
    int np = 0;
    unsigned char seen[64] = {0};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            print_help(cmd, usage, summary, specs);
            return 1;
        }
        if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
            if (np >= max_pos) {
                cli_error(cmd, "unexpected argument '%s' (see kvcodec %s --help)", a, cmd);
                return 2;
            }
            pos[np++] = a;
            continue;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nl = eq ? (size_t)(eq - name) : strlen(name);
        const arg_spec *s = specs;
        int idx = 0;
        for (; s->name; s++, idx++)
            if (strlen(s->name) == nl && !strncmp(s->name, name, nl)) break;
        if (!s->name) {
            cli_error(cmd, "unknown option '--%.*s' (see kvcodec %s --help)", (int)nl, name, cmd);
            return 2;
        }
        const char *val = NULL;
        if (s->type != ARG_FLAG) {
            if (eq) val = eq + 1;
            else if (i + 1 < argc) val = argv[++i];
            else {
                cli_error(cmd, "option --%s needs a value", s->name);
                return 2;
            }
        } else if (eq) {
            cli_error(cmd, "option --%s takes no value", s->name);
            return 2;
        }
        if (set_value(s, val) != 0) {
            cli_error(cmd, "invalid value '%s' for --%s", val, s->name);
            return 2;
        }
        if (idx < 64) seen[idx] = 1;
    }
    int idx = 0;
    for (const arg_spec *s = specs; s->name; s++, idx++)
        if (s->required && !seen[idx]) {
            cli_error(cmd, "missing --%s (see kvcodec %s --help)", s->name, cmd);
            return 2;
        }
    if (n_pos) *n_pos = np;
    return 0;
}

int cli_default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

const char *cli_default_model(void) {
    const char *e = getenv("KVC_MODEL");
    return e && *e ? e : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

kvc_model *cli_load_model(const char *path, int threads) {
    kvc_ops_set_threads(threads);
    kvc_err err = {{0}};
    kvc_model *m = kvc_model_load(path, &err);
    if (!m) {
        fprintf(stderr, "kvcodec: %s\n", err.msg);
        if (strstr(err.msg, "cannot open model"))
            fprintf(stderr, "kvcodec: (run scripts/setup.sh to fetch the default model)\n");
    }
    return m;
}

int cli_read_text(const char *path, char **buf, size_t *len) {
    kvc_err err = {{0}};
    if (kvc_read_file(path, buf, len, &err)) {
        fprintf(stderr, "kvcodec: %s\n", err.msg);
        return -1;
    }
    size_t bad;
    if (!kvc_utf8_valid(*buf, *len, &bad)) {
        fprintf(stderr, "kvcodec: text file '%s' is not valid UTF-8 (first bad byte at offset %zu)\n", path, bad);
        free(*buf);
        return -1;
    }
    return 0;
}

int cli_tokenize(const kvc_model *m, const char *text, size_t len, int parse_special, int32_t **ids, int64_t *n) {
    kvc_err err = {{0}};
    int64_t cap = (int64_t)len + 16;
    int32_t *buf = kvc_malloc_array((size_t)cap, sizeof *buf);
    if (!buf) { fprintf(stderr, "kvcodec: out of memory\n"); return -1; }
    int64_t got = kvc_tokenizer_encode(m->tok, text, len, parse_special, buf, cap, &err);
    if (got > cap) { /* cannot happen for byte-level BPE, but honour the contract */
        free(buf);
        cap = got;
        buf = kvc_malloc_array((size_t)cap, sizeof *buf);
        if (!buf) { fprintf(stderr, "kvcodec: out of memory\n"); return -1; }
        got = kvc_tokenizer_encode(m->tok, text, len, parse_special, buf, cap, &err);
    }
    if (got < 0) {
        fprintf(stderr, "kvcodec: tokenizer: %s\n", err.msg);
        free(buf);
        return -1;
    }
    *ids = buf;
    *n = got;
    return 0;
}

int cli_text_and_model(const char *text, const char *model, int threads, char *sha256, kvc_model **m,
                       int32_t **ids, int64_t *n) {
    char *buf;
    size_t len;
    if (cli_read_text(text, &buf, &len)) return -1;
    if (sha256) kvc_sha256_hex(buf, len, sha256);
    *m = cli_load_model(model, threads);
    int rc = *m ? cli_tokenize(*m, buf, len, 0, ids, n) : -1;
    free(buf);
    if (rc && *m) {
        kvc_model_free(*m);
        *m = NULL;
    }
    return rc;
}
