/* cmd_train.c - `kvcodec train`: parses the options of a codec training run (architecture,
 * loss, optimiser, schedule, device, reuse) and hands them to kvc_train_codec (train/trainer.c). */
#include "cli.h"

#include "kvc/ops.h"
#include "kvc/reuse.h"
#include "kvc/trainer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* `kvcodec train --codec transform ...`: a transform codec (train/tc_fit.c). */
static int train_transform(int argc, char **argv) {
    kvc_tc_train_opts o;
    kvc_tc_train_opts_defaults(&o);
    const char *data = NULL, *codec = "transform", *cal = "none";
    float bits = 2.0f, val_frac = 0.1f, ridge = 1e-3f;
    int threads = cli_default_threads(), per_head = 0, no_predict = 0, quiet = 0;
    uint64_t max_rows = 0;
    o.model = cli_default_model();
    o.cal_text = "data/corpora/train-python-docs.txt";
    o.cal_samples = 4;
    o.cal_len = 256;
    const arg_spec specs[] = {
        {"codec", ARG_STR, &codec, "ae|transform", "transform: a transform codec (this page); ae: autoencoders", 0},
        {"data", ARG_STR, &data, "FILE[,FILE...]", "KV capture(s) holding every layer, read as one", 1},
        {"out", ARG_STR, &o.out, "FILE.h5", "transform codec checkpoint to write (atomically)", 1},
        {"bits", ARG_FLOAT, &bits, "B", "mean bits per coefficient, 0.25-8 (default 2: about 8x smaller than f16)", 0},
        {"per-head", ARG_FLAG, &per_head, NULL, "code each KV head alone (default: a layer's heads jointly)", 0},
        {"no-predict", ARG_FLAG, &no_predict, NULL, "no cross-layer prediction (default: closed-loop prediction)", 0},
        {"sinks", ARG_INT, &o.sinks, "S", "first tokens kept exact in f16 at inference (default 4)", 0},
        {"quant", ARG_STR, &o.quant, "lloyd|uniform", "per-component levels: Lloyd-Max or a clipped grid (default lloyd)", 0},
        {"weights", ARG_STR, &o.weights, "attn|mse", "allocation weights: keys by their queries' second moment, or plain "
                                                    "squared error (default attn)", 0},
        {"val-frac", ARG_FLOAT, &val_frac, "F", "held-back tail of the capture for validation (default 0.1)", 0},
        {"max-rows", ARG_U64, &max_rows, "N", "use at most N training rows (default: all)", 0},
        {"ridge", ARG_FLOAT, &ridge, "R", "relative ridge of the predictors (default 1e-3)", 0},
        {"calibrate", ARG_STR, &cal, "none|kl", "kl: move bits between layers and K/V by their measured KL (needs --model)", 0},
        {"model", ARG_STR, &o.model, "FILE", "GGUF model of the capture, for --calibrate kl", 0},
        {"cal-text", ARG_STR, &o.cal_text, "FILE", "probe text for --calibrate kl (default: the train corpus)", 0},
        {"cal-samples", ARG_INT, &o.cal_samples, "N", "probe sequences for --calibrate kl (default 4)", 0},
        {"cal-len", ARG_INT, &o.cal_len, "T", "tokens per probe sequence (default 256)", 0},
        {"quiet", ARG_FLAG, &quiet, NULL, "no per-layer lines", 0},
        ARG_THREADS(&threads, "all cores"),
        {0},
    };
    int rc = args_parse("train", "--codec transform --data kv.h5 --bits B --out tc.h5 [--calibrate kl]",
                        "Fits a transform codec on a KV capture (every layer): per layer, keys then values, a\n"
                        "closed-loop predictor from the rows already decoded, the principal axes of its residual,\n"
                        "and a scalar codebook per component on 0-8 bits allocated where the attention-weighted\n"
                        "distortion falls most (docs/transform.md).",
                        specs, argc, argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (strcmp(codec, "transform")) return cli_error("train", "--codec %s: ae or transform", codec), 2;
    if (threads < 1) return cli_error("train", "--threads must be >= 1"), 2;
    if (o.cal_samples < 1 || o.cal_len < 16) return cli_error("train", "--cal-samples >= 1 and --cal-len >= 16"), 2;
    if (!(ridge >= 0) || !isfinite(ridge)) return cli_error("train", "--ridge must be finite and >= 0"), 2;
    o.bits = bits, o.val_frac = val_frac, o.ridge = ridge, o.max_rows = (int64_t)max_rows;
    o.per_head = per_head, o.predict = !no_predict, o.calibrate = cal;
    o.report = quiet ? NULL : stdout;
    o.progress = isatty(2) && quiet;
    char *list = strdup(data);
    const char *paths[64];
    int np = 0;
    for (char *tok = strtok(list, ","); tok && np < 64; tok = strtok(NULL, ",")) paths[np++] = tok;
    o.data = paths, o.n_data = np;
    kvc_ops_set_threads(threads);
    kvc_err err = {{0}};
    double t0 = kvc_now();
    rc = kvc_train_tc(&o, &err);
    free(list);
    if (rc) return cli_error("train", "%s", err.msg);
    fprintf(stderr, "wrote %s in %.1f s\n", o.out, kvc_now() - t0);
    return 0;
}

int cmd_train(int argc, char **argv) {
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--codec") && strcmp(argv[i + 1], "ae")) return train_transform(argc, argv);
    kvc_train_opts o;
    kvc_train_opts_defaults(&o);
    const char *data = NULL, *act = "leaky_relu", *norm = "none", *share = "layer", *loss = "mse", *curve = NULL;
    int latent = 0, threads = cli_default_threads(), quiet = 0;
    const char *codec = "ae";
    const arg_spec specs[] = {
        {"codec", ARG_STR, &codec, "ae|transform", "ae: autoencoders (this page); transform: see --codec transform --help", 0},
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
