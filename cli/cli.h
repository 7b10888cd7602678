/* cli.h - shared pieces of the kvcodec command-line tool: a small declarative option
 * parser (so every subcommand gets the same --help and errors) and the subcommands. */
#ifndef KVC_CLI_H
#define KVC_CLI_H

#include "kvc/common.h"
#include "kvc/model.h"

typedef enum { ARG_STR, ARG_INT, ARG_FLOAT, ARG_FLAG, ARG_U64 } arg_type;

typedef struct {
    const char *name;    /* long option without dashes, e.g. "model" */
    arg_type type;
    void *dest;          /* const char **, int *, float *, int * (flag), uint64_t * */
    const char *metavar; /* shown in --help, e.g. "FILE" */
    const char *help;
    int required;
} arg_spec;

/* Parses argv (after the subcommand name). Positional arguments go to *pos (up to max_pos).
 * Returns 0 to run, 1 if --help was printed (exit 0), 2 on a usage error (printed). */
int args_parse(const char *cmd, const char *usage, const char *summary, const arg_spec *specs, int argc,
               char **argv, const char **pos, int max_pos, int *n_pos);

/* Options several subcommands share, spelled once. */
#define ARG_MODEL(dest) \
    {"model", ARG_STR, dest, "FILE", "GGUF model (default: $KVC_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf)", 0}
#define ARG_THREADS(dest, dflt_text) {"threads", ARG_INT, dest, "N", "CPU threads (default: " dflt_text ")", 0}
#define ARG_DEVICE(dest) \
    {"device", ARG_STR, dest, "cpu|cuda", "where the cache's attention and RoPE run (default cpu)", 0}
#define ARG_JSON(dest) {"json", ARG_FLAG, dest, NULL, "print the result as JSON", 0}

/* The cores this process may use (at least 1). */
int cli_default_threads(void);
/* The default model path: $KVC_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf. */
const char *cli_default_model(void);
/* Loads a model, printing "kvcodec: <reason>" on failure (returns NULL). */
kvc_model *cli_load_model(const char *path, int threads);
/* Reads a UTF-8 text file; prints the reason and returns -1 on failure. */
int cli_read_text(const char *path, char **buf, size_t *len);
/* Tokenizes text, printing the reason and returning -1 on failure. *ids is malloc'd. */
int cli_tokenize(const kvc_model *m, const char *text, size_t len, int parse_special, int32_t **ids, int64_t *n);
/* Reads a UTF-8 text file, loads the model and tokenizes the text (no control tokens);
 * sha256 (65 bytes, may be NULL) receives the hash of the text. Prints the reason and
 * returns -1 on failure, freeing everything. *ids is malloc'd. */
int cli_text_and_model(const char *text, const char *model, int threads, char *sha256, kvc_model **m,
                       int32_t **ids, int64_t *n);
/* Prints "kvcodec CMD: MSG" on stderr and returns 1 (the exit status for failures). */
int cli_error(const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

int cmd_inspect(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_ppl(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_sweep(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_capture(int argc, char **argv);
int cmd_train(int argc, char **argv);

#endif
