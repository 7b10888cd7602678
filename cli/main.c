/* main.c - the kvcodec command: dispatches to subcommands that follow the data flow
 * (inspect, tokenize, ppl, generate, bench; capture/train/eval/sweep come with later work). */
#include "cli.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} command;

static const command COMMANDS[] = {
    {"inspect", cmd_inspect, "print what a GGUF file holds (metadata and tensor table)"},
    {"tokenize", cmd_tokenize, "print the token ids (and pieces) of a text"},
    {"ppl", cmd_ppl, "perplexity of a model on a text file"},
    {"generate", cmd_generate, "stream a completion of a prompt"},
    {"bench", cmd_bench, "prefill and decode speed (tokens/s)"},
};

static void usage(FILE *to) {
    fprintf(to, "usage: kvcodec COMMAND [options]   (kvcodec COMMAND --help for details)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        fprintf(to, "  %-10s %s\n", COMMANDS[i].name, COMMANDS[i].help);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kvcodec 0.1.0\n");
        return 0;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        if (!strcmp(argv[1], COMMANDS[i].name)) return COMMANDS[i].run(argc - 2, argv + 2);
    fprintf(stderr, "kvcodec: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
