/* cmd_train.c - `kvcodec train`: parses the options of a codec training run (architecture,
 * loss, optimiser, schedule, device, reuse) and hands them to kvc_train_codec (train/trainer.c). */
#include "cli.h"

#include "kvc/ops.h"
#include "kvc/reuse.h"
#include "kvc/trainer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cmd_train(int argc, char **argv) {
    kvc_train_opts o;
    kvc_train_opts_defaults(&o);
    const char *data = NULL, *act = "leaky_relu", *norm = "none", *share = "layer", *loss = "mse", *curve = NULL;
    int latent = 0, threads = cli_default_threads(), quiet = 0;
    const arg_spec specs[] = {
        {"data", ARG_STR, &data, "FILE[,FILE...]", "KV dataset(s) from kvcodec capture, read as one", 1},
        {"out", ARG_STR, &o.out, "FILE.h5", "codec checkpoint to write (after every epoch, atomically)", 1},
        {"latent", ARG_INT, &latent, "R", "latent size per head vector, smaller than head_dim", 1},
        {"hidden", ARG_INT, &o.ae.hidden, "H", "hidden layer width; 0 = linear encoder/decoder (default 0)", 0},
        {"act", ARG_STR, &act, "NAME", "relu|leaky_relu|gelu|silu|none after hidden layers (default leaky_relu)", 0},
        {"norm", ARG_STR, &norm, "none|batch", "BatchNorm after hidden layers, folded at export (default none)", 0},
        {"share", ARG_STR, &share, "layer|head", "one model per layer shared by its KV heads, or one per head (default layer)", 0},
        {"loss", ARG_STR, &loss, "mse|attn", "reconstruction MSE, or attention-aware (q.k error for keys, attention-weighted"
                                            " sum for values; uses the captured queries) (default mse)", 0},
        {"mse-mix", ARG_FLOAT, &o.mse_mix, "W", "weight of MSE added to the attention-aware loss (default 0.1)", 0},
        {"epochs", ARG_INT, &o.epochs, "E", "epochs (default 10)", 0},
        {"batch", ARG_INT, &o.batch_tokens, "N", "tokens per minibatch (rows = tokens x KV heads) (default 256)", 0},
        {"lr", ARG_FLOAT, &o.adam.lr, "LR", "peak learning rate (default 1e-3)", 0},
        {"min-lr", ARG_FLOAT, &o.min_lr, "LR", "learning rate at the end of the cosine (default 1e-5)", 0},
        {"warmup", ARG_INT, &o.warmup_steps, "N", "linear warmup steps (default 100)", 0},
        {"wd", ARG_FLOAT, &o.adam.weight_decay, "W", "AdamW weight decay (default 1e-4)", 0},
        {"clip", ARG_FLOAT, &o.adam.clip, "C", "clip gradients to this global norm; 0 = off (default 1)", 0},
        {"patience", ARG_INT, &o.patience, "N", "stop after N epochs without a better validation error (default 3)", 0},
        {"val-frac", ARG_FLOAT, NULL, "F", "", 0}, /* placeholder replaced below */
        {"seed", ARG_U64, &o.seed, "N", "seed for initialisation and shuffling (default 1)", 0},
        {"device", ARG_STR, &o.device, "cpu|cuda", "training backend (default cpu)", 0},
        {"reuse", ARG_STR, &o.reuse, "threshold=X|heads=N", "analyse cross-layer reuse and choose items to reuse", 0},
        {"curve", ARG_STR, &curve, "FILE.csv", "loss curve (default: OUT with .csv)", 0},
        {"resume", ARG_FLAG, &o.resume, NULL, "continue an interrupted run from the trainer state in --out", 0},
        {"stop-after-epoch", ARG_INT, &o.stop_after_epoch, "N", "stop as if interrupted after epoch N (testing resume)", 0},
        {"quiet", ARG_FLAG, &quiet, NULL, "do not print the per-layer tables", 0},
        {"no-state", ARG_FLAG, &o.no_state, NULL, "leave the trainer state out of the final checkpoint (smaller; cannot resume)", 0},
        ARG_THREADS(&threads, "all cores"),
        {0},
    };
    float val_frac = (float)o.val_frac;
    arg_spec sp[sizeof specs / sizeof specs[0]];
    memcpy(sp, specs, sizeof specs);
    for (arg_spec *a = sp; a->name; a++)
        if (!strcmp(a->name, "val-frac")) {
            a->type = ARG_FLOAT;
            a->dest = &val_frac;
            a->help = "fraction of tokens (the last, whole capture windows) held out for validation (default 0.1)";
        }
    int rc = args_parse("train", "--data kv.h5 --latent R --out codec.h5 [--hidden H --act A --norm batch] [--epochs E]",
                        "Trains per-layer autoencoders for K and V along head_dim (and, with --reuse, cross-layer\n"
                        "reuse maps) on a captured KV dataset, and writes a codec checkpoint.\n"
                        "KV-CAR's form: --hidden 32 --norm batch --act leaky_relu.",
                        sp, argc, argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    o.val_frac = val_frac;
    o.ae.latent = latent;
    if (kvc_ae_act_parse(act, &o.ae.act)) return cli_error("train", "unknown --act '%s' (relu, leaky_relu, gelu, silu, none)", act), 2;
    if (strcmp(norm, "none") && strcmp(norm, "batch")) return cli_error("train", "--norm must be none or batch"), 2;
    o.ae.norm = !strcmp(norm, "batch") ? AE_NORM_BATCH : AE_NORM_NONE;
    if (o.ae.hidden == 0) { /* a linear encoder/decoder has no activation or norm to record */
        if (o.ae.norm == AE_NORM_BATCH) return cli_error("train", "--norm batch needs a hidden layer (--hidden H)"), 2;
        o.ae.act = KVC_ACT_NONE;
    }
    if (strcmp(share, "layer") && strcmp(share, "head")) return cli_error("train", "--share must be layer or head"), 2;
    o.per_head = !strcmp(share, "head");
    if (strcmp(loss, "mse") && strcmp(loss, "attn")) return cli_error("train", "--loss must be mse or attn"), 2;
    o.loss_attn = !strcmp(loss, "attn");
    if (!(val_frac > 0 && val_frac < 1)) return cli_error("train", "--val-frac must be in (0, 1)"), 2;
    if (o.patience < 1 || threads < 1) return cli_error("train", "--patience and --threads must be >= 1"), 2;
    kvc_err perr = {{0}};
    reuse_option ro;
    if (o.reuse && kvc_reuse_option_parse(o.reuse, &ro, &perr)) return cli_error("train", "--reuse: %s", perr.msg), 2;
    /* the data list */
    char *list = strdup(data);
    const char *paths[64];
    int np = 0;
    for (char *tok = strtok(list, ","); tok && np < 64; tok = strtok(NULL, ",")) paths[np++] = tok;
    o.data = paths;
    o.n_data = np;
    char curve_buf[1100];
    if (!curve) {
        snprintf(curve_buf, sizeof curve_buf, "%s", o.out);
        char *dot = strrchr(curve_buf, '.');
        if (dot && !strchr(dot, '/')) *dot = '\0';
        strncat(curve_buf, ".csv", sizeof curve_buf - strlen(curve_buf) - 1);
        curve = curve_buf;
    }
    o.curve_csv = curve;
    o.progress = isatty(2);
    o.quiet = quiet;
    kvc_ops_set_threads(threads);
    kvc_err err = {{0}};
    double t0 = kvc_now();
    rc = kvc_train_codec(&o, &err);
    free(list);
    if (rc < 0) return cli_error("train", "%s", err.msg);
    if (rc == 1) return 0;
    fprintf(stderr, "wrote %s and %s in %.1f s\n", o.out, curve, kvc_now() - t0);
    return 0;
}
