/* main.c - the kvcodec command: dispatches to subcommands that follow the data flow
 * (inspect, tokenize, ppl, generate, bench; capture/train/eval/sweep come with later work). */
#include "cli.h"

#include "kvc/backend.h"
#include "kvc/ops.h"

#include <hdf5.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} command;

static const command COMMANDS[] = {
    {"inspect", cmd_inspect, "print what a GGUF file holds (metadata and tensor table)"},
    {"tokenize", cmd_tokenize, "print the token ids (and pieces) of a text"},
    {"capture", cmd_capture, "write a model's pre-RoPE K, V and Q over a text to an HDF5 dataset"},
    {"train", cmd_train, "train K/V autoencoders and reuse maps on a KV dataset into a codec checkpoint"},
    {"ppl", cmd_ppl, "perplexity of a model on a text file"},
    {"eval", cmd_eval, "quality and memory of a compressed KV cache against the full cache"},
    {"sweep", cmd_sweep, "measure a grid of compressed caches into a resumable results folder with plots"},
    {"generate", cmd_generate, "stream a completion of a prompt"},
    {"bench", cmd_bench, "prefill and decode speed (tokens/s)"},
};

static void usage(FILE *to) {
    fprintf(to, "usage: kvcodec COMMAND [options]   (kvcodec COMMAND --help for details)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        fprintf(to, "  %-10s %s\n", COMMANDS[i].name, COMMANDS[i].help);
}

/* OpenBLAS reads OPENBLAS_CORETYPE only when it loads, before main. If it fell back to its
 * generic kernels on a CPU that can do better, restart once with the right core named.
 * A user's own OPENBLAS_CORETYPE is always respected. */
static void retune_blas(char **argv) {
    const char *core = kvc_ops_blas_better_core();
    if (!core || getenv("OPENBLAS_CORETYPE") || getenv("KVC_BLAS_RETUNED")) return;
    setenv("OPENBLAS_CORETYPE", core, 1);
    setenv("KVC_BLAS_RETUNED", "1", 1);
    execv("/proc/self/exe", argv); /* returns only on failure: carry on as we are */
    unsetenv("OPENBLAS_CORETYPE");
}

int main(int argc, char **argv) {
    char why[256];
    if (kvc_cpu_check(why, sizeof why)) { /* before anything compiled for the build's -march runs */
        const char *chk = getenv("KVC_CPU_CHECK");
        fprintf(stderr, "kvcodec: %s%s\n", chk && !strcmp(chk, "warn") ? "warning: " : "", why);
        if (!chk || strcmp(chk, "warn")) return 1; /* KVC_CPU_CHECK=warn: go on at the user's risk */
    }
    retune_blas(argv);
    /* before any HDF5 use: no exit-time cleanup (HDF5 1.10 crashes in it after a failed
     * close on a full disk; every file is closed explicitly), no stack dumps on errors */
    H5dont_atexit();
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kvcodec 0.1.0 (C built for -march=%s)\n", KVC_BUILD_ARCH[0] ? KVC_BUILD_ARCH : "default");
        return 0;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        if (!strcmp(argv[1], COMMANDS[i].name)) return COMMANDS[i].run(argc - 2, argv + 2);
    fprintf(stderr, "kvcodec: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
