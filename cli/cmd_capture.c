/* cmd_capture.c - `kvcodec capture`: parses flags, loads the model and text, and calls
 * kvc_capture (data/capture.c), which streams pre-RoPE K, V and Q to an HDF5 KV dataset. */
#include "cli.h"

#include "kvc/dataset.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

int cmd_capture(int argc, char **argv) {
    const char *model = cli_default_model(), *text = "data/corpora/train-python-docs.txt", *out = NULL;
    const char *dtype = "f16", *layers_s = "all";
    int ctx = 512, threads = cli_default_threads(), chunk = 256, gzip = 0;
    uint64_t n_tokens = 65536;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"text", ARG_STR, &text, "FILE", "UTF-8 text to run (default: data/corpora/train-python-docs.txt)", 0},
        {"tokens", ARG_U64, &n_tokens, "N", "tokens to capture from the start of the text (default 65536)", 0},
        {"out", ARG_STR, &out, "FILE.h5", "KV dataset to write", 1},
        {"dtype", ARG_STR, &dtype, "f16|f32", "storage precision (default f16)", 0},
        {"layers", ARG_STR, &layers_s, "LIST", "layers to store: all, or e.g. 0,5,10-12 (default all)", 0},
        {"ctx", ARG_INT, &ctx, "N", "window length; each window starts from an empty cache (default 512)", 0},
        {"chunk", ARG_INT, &chunk, "N", "HDF5 chunk length in tokens (default 256)", 0},
        {"gzip", ARG_INT, &gzip, "0-9", "gzip level with byte shuffle; 0 = none (default 0)", 0},
        ARG_THREADS(&threads, "all cores"),
        {0},
    };
    int rc = args_parse("capture", "--out kv.h5 [--text T] [--tokens N] [--dtype f16|f32] [--layers LIST]",
                        "Runs the model over the text and writes every chosen layer's pre-RoPE K, V and Q\n"
                        "to an HDF5 KV dataset (schema: docs/formats.md).",
                        specs, argc, argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (strcmp(dtype, "f16") && strcmp(dtype, "f32")) return cli_error("capture", "--dtype must be f16 or f32"), 2;
    if (ctx < 2 || chunk < 1 || gzip < 0 || gzip > 9 || threads < 1 || n_tokens < 1)
        return cli_error("capture", "need --ctx >= 2, --chunk >= 1, --gzip 0..9, --threads >= 1, --tokens >= 1"), 2;
    char sha[65] = "";
    kvc_model *m;
    int32_t *ids;
    int64_t n;
    if (cli_text_and_model(text, model, threads, sha, &m, &ids, &n)) return 1;
    if ((int64_t)n_tokens > n) {
        fprintf(stderr, "kvcodec capture: note: the text has only %lld tokens; capturing all of them\n", (long long)n);
        n_tokens = (uint64_t)n;
    }
    kvc_capture_opts o = {out, dtype, layers_s, base_name(text), sha, ctx, chunk, gzip, isatty(2)};
    kvc_capture_result res = {0};
    kvc_err err = {{0}};
    rc = kvc_capture(m, ids, (int64_t)n_tokens, &o, &res, &err);
    free(ids);
    kvc_model_free(m);
    if (rc) return cli_error("capture", "%s", err.msg), strncmp(err.msg, "bad --layers", 12) ? 1 : 2;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("captured %llu tokens x %d layers (K, V, Q; %s) from %s into %s in %.1f s (%.0f tok/s); peak RSS %.0f MiB\n",
           (unsigned long long)res.n_tokens, res.n_layers, dtype, base_name(text), out, res.seconds,
           (double)res.n_tokens / res.seconds, ru.ru_maxrss / 1024.0);
    return 0;
}
