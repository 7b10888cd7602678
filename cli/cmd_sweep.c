/* cmd_sweep.c - `kvcodec sweep`: parses the grid file and flags, loads the model and text, and
 * calls kvc_sweep_run (eval/sweep_run.c), which measures the grid into a resumable results
 * folder and draws the figures. */
#include "cli.h"

#include "kvc/kvcache.h"
#include "kvc/sweep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void sweep_help_extra(void) {
    printf("\ngrid file: one `key value...` per line, # comments; repr, keep and point lines may repeat\n"
           "(see docs/sweep.md and configs/sweep-default.grid). Flags replace the file's lists.\n\n");
    kvc_kvcache_list(stdout);
}

int cmd_sweep(int argc, char **argv) {
    const char *grid_path = NULL, *out_dir = NULL, *peers_s = NULL, *device = "cpu";
    const char *fv[19] = {0}; /* flag values, in the order of FLAG_KEYS */
    static const char *const FLAG_KEYS[19] = {"model", "text", "tokens", "repr", "keep", "budgets", "latents",
                                              "points", "protocols", "ctx", "chunk", "context-len", "continuation",
                                              "samples", "passkey-lengths", "passkey-depths", "trials", "seed", NULL};
    int threads = cli_default_threads(), force = 0, dry = 0;
    const arg_spec specs[] = {
        {"grid", ARG_STR, &grid_path, "FILE", "grid file (flags below replace its keys)", 0},
        {"model", ARG_STR, &fv[0], "FILE", "GGUF model (default: $KVC_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf)", 0},
        {"text", ARG_STR, &fv[1], "FILE", "UTF-8 text (default: data/corpora/eval-debian-handbook.txt)", 0},
        {"tokens", ARG_STR, &fv[2], "N", "use only the first N tokens of the text (default: all)", 0},
        {"repr", ARG_STR, &fv[3], "'S1;S2'", "representation specs; {R} is replaced by each latent", 0},
        {"keep", ARG_STR, &fv[4], "'S1;S2'", "retention specs without budget= (full is measured once)", 0},
        {"budgets", ARG_STR, &fv[5], "LIST", "kept fractions for evicting policies, e.g. 0.5,0.25,0.125", 0},
        {"latents", ARG_STR, &fv[6], "LIST", "latent sizes substituted for {R}, e.g. 16,32", 0},
        {"points", ARG_STR, &fv[7], "'R|K;..'", "extra points 'REPR | KEEP' outside the cross product", 0},
        {"protocols", ARG_STR, &fv[8], "LIST", "context,stream,passkey (default context)", 0},
        {"ctx", ARG_STR, &fv[9], "N", "stream: window length (default 512)", 0},
        {"chunk", ARG_STR, &fv[10], "N", "tokens per forward call (default 32)", 0},
        {"context-len", ARG_STR, &fv[11], "N", "context: tokens prefilled, then compressed (default 512)", 0},
        {"continuation", ARG_STR, &fv[12], "M", "context: tokens scored after the compression (default 64)", 0},
        {"samples", ARG_STR, &fv[13], "S", "context: samples of N + M tokens (default 8)", 0},
        {"passkey-lengths", ARG_STR, &fv[14], "LIST", "passkey prompt lengths (default 1024,2048)", 0},
        {"passkey-depths", ARG_STR, &fv[15], "LIST", "passkey needle depths (default 0,0.25,0.5,0.75,1)", 0},
        {"trials", ARG_STR, &fv[16], "N", "passkey prompts per length and depth (default 3)", 0},
        {"seed", ARG_STR, &fv[17], "N", "seed of the passkey keys (default 1)", 0},
        {"out", ARG_STR, &out_dir, "DIR", "results folder (default out/sweeps/<model>_<corpus>_<protocols>)", 0},
        {"force", ARG_FLAG, &force, NULL, "start the folder over when its config differs", 0},
        {"peers", ARG_STR, &peers_s, "'A.csv;B'", "peer results (same columns) drawn dashed on pareto.png", 0},
        {"dry-run", ARG_FLAG, &dry, NULL, "validate and list the points, measure nothing", 0},
        ARG_THREADS(&threads, "all cores"),
        ARG_DEVICE(&device),
        {0},
    };
    int rc = args_parse("sweep", "[--grid FILE] [--repr 'S;S'] [--keep 'S;S'] [--budgets LIST] [options]",
                        "Measures every point of a compression grid (DESIGN.md section 5 protocols) into a results\n"
                        "folder: results.csv (one row per point and protocol, fsynced as each finishes),\n"
                        "results.json, config.txt, pareto.png and passkey_<method>.png. Rerunning the same command\n"
                        "skips the points already in results.csv.",
                        specs, argc, argv, NULL, 0, NULL);
    if (rc == 1) sweep_help_extra();
    if (rc) return rc == 1 ? 0 : 2;
    if (threads < 1) return cli_error("sweep", "--threads must be at least 1"), 2;
    if (out_dir && strlen(out_dir) >= 4000) return cli_error("sweep", "--out path too long"), 2;

    /* ---- the grid: file, then flags; every point checked before any work ---- */
    sweep_grid g;
    kvc_sweep_grid_init(&g);
    kvc_err err = {{0}};
    int status = 1;
    kvc_model *m = NULL;
    int32_t *ids = NULL;
    int64_t n_ids = 0;
    if (grid_path && kvc_sweep_grid_load(&g, grid_path, &err)) goto fail_msg;
    for (int i = 0; FLAG_KEYS[i]; i++) {
        char src[64];
        snprintf(src, sizeof src, "--%s", FLAG_KEYS[i]);
        if (fv[i] && kvc_sweep_grid_set(&g, FLAG_KEYS[i], fv[i], 1, src, &err)) goto fail_msg;
    }
    if (!g.model[0]) snprintf(g.model, sizeof g.model, "%s", cli_default_model());
    if (!g.text[0]) snprintf(g.text, sizeof g.text, "data/corpora/eval-debian-handbook.txt");
    char sha[65] = "";
    if (kvc_sweep_uses_text(&g)) {
        if (cli_text_and_model(g.text, g.model, threads, sha, &m, &ids, &n_ids)) goto done;
    } else if (!(m = cli_load_model(g.model, threads))) {
        goto done;
    }
    const kvc_backend *be = kvc_backend_find(device, &err);
    if (!be) goto fail_msg;
    kvc_sweep_run_opts o = {out_dir, peers_s, force, dry, threads, isatty(2), stdout, 0, be};
    int run = kvc_sweep_run(&g, m, ids, n_ids, sha, &o, &err);
    if (run < 0) goto fail_msg;
    if (run == 1) cli_error("sweep", "%s", err.msg);
    status = run;
    goto done;
fail_msg:
    cli_error("sweep", "%s", err.msg);
done:
    free(ids);
    kvc_model_free(m);
    kvc_sweep_grid_free(&g);
    return status;
}
