/* cmd_inspect.c - `kvcodec inspect FILE`: a GGUF's metadata and tensor table, or an HDF5
 * file's attributes and datasets;
 * `kvcodec tokenize`: prints a text's token ids. */
#include "cli.h"

#include "kvc/gguf.h"
#include "kvc/quant.h"
#include "kvc/tc.h"

#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints a string with control characters escaped, at most max bytes. */
static void print_escaped(gguf_str s, size_t max) {
    size_t n = s.len < max ? s.len : max;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        if (c == '\n') fputs("\\n", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c < 0x20 || c == 0x7F) printf("\\x%02x", c);
        else putchar(c);
    }
    if (n < s.len) printf("... (%llu bytes)", (unsigned long long)s.len);
}

/* Prints element i of a numeric array or a scalar value stored at p. */
static void print_number(gguf_vtype t, const uint8_t *p) {
    gguf_kv tmp = {.type = t};
    switch (t) {
    case GGUF_VT_FLOAT32: { float v; memcpy(&v, p, 4); printf("%g", v); return; }
    case GGUF_VT_FLOAT64: { double v; memcpy(&v, p, 8); printf("%g", v); return; }
    case GGUF_VT_BOOL: printf("%s", p[0] ? "true" : "false"); return;
    case GGUF_VT_UINT8: printf("%u", p[0]); return;
    case GGUF_VT_INT8: printf("%d", (int8_t)p[0]); return;
    case GGUF_VT_UINT16: { uint16_t v; memcpy(&v, p, 2); printf("%u", v); return; }
    case GGUF_VT_INT16: { int16_t v; memcpy(&v, p, 2); printf("%d", v); return; }
    case GGUF_VT_UINT32: { uint32_t v; memcpy(&v, p, 4); printf("%u", v); return; }
    case GGUF_VT_INT32: { int32_t v; memcpy(&v, p, 4); printf("%d", v); return; }
    case GGUF_VT_UINT64: { uint64_t v; memcpy(&v, p, 8); printf("%llu", (unsigned long long)v); return; }
    case GGUF_VT_INT64: { int64_t v; memcpy(&v, p, 8); printf("%lld", (long long)v); return; }
    default: (void)tmp; printf("?"); return;
    }
}

static size_t scalar_size(gguf_vtype t) {
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16: case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_FLOAT32: return 4;
    default: return 8;
    }
}

static int inspect_gguf(const char *path, int all) {
    kvc_err err = {{0}};
    gguf_file *f = kvc_gguf_open(path, &err);
    if (!f) return cli_error("inspect", "%s", err.msg);
    printf("file: %s\nformat: GGUF v%u, %llu metadata keys, %llu tensors, alignment %llu, data at offset %llu\n\n",
           path, f->version, (unsigned long long)f->n_kv, (unsigned long long)f->n_tensors,
           (unsigned long long)f->alignment, (unsigned long long)f->data_offset);
    printf("metadata:\n");
    const size_t shown = all ? SIZE_MAX : 8;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const gguf_kv *kv = &f->kv[i];
        printf("  %-44.*s ", (int)kv->key.len, kv->key.ptr);
        if (kv->type == GGUF_VT_STRING) {
            printf("str  \"");
            print_escaped(kv->strs[0], all ? SIZE_MAX : 120);
            printf("\"\n");
        } else if (kv->type == GGUF_VT_ARRAY) {
            printf("arr[%s; %llu] [", kvc_gguf_vtype_name(kv->arr_type), (unsigned long long)kv->n);
            size_t n = kv->n < shown ? (size_t)kv->n : shown;
            for (size_t j = 0; j < n; j++) {
                if (j) printf(", ");
                if (kv->arr_type == GGUF_VT_STRING) {
                    putchar('"');
                    print_escaped(kv->strs[j], 40);
                    putchar('"');
                } else if (kv->arr_type == GGUF_VT_ARRAY) printf("[...]");
                else print_number(kv->arr_type, kv->data + j * scalar_size(kv->arr_type));
            }
            printf("%s]\n", n < kv->n ? ", ..." : "");
        } else {
            printf("%-4s ", kvc_gguf_vtype_name(kv->type));
            print_number(kv->type, kv->data);
            putchar('\n');
        }
    }
    printf("\ntensors:\n  %-32s %-6s %-24s %12s %12s\n", "name", "type", "shape (ne0, ne1, ...)", "bytes", "offset");
    uint64_t total = 0;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        char shape[64];
        int o = snprintf(shape, sizeof shape, "[");
        for (uint32_t d = 0; d < t->n_dims; d++)
            o += snprintf(shape + o, sizeof shape - (size_t)o, "%s%llu", d ? ", " : "", (unsigned long long)t->ne[d]);
        snprintf(shape + o, sizeof shape - (size_t)o, "]");
        printf("  %-32.*s %-6s %-24s %12llu %12llu\n", (int)t->name.len, t->name.ptr, kvc_ggml_type_name(t->type), shape,
               (unsigned long long)t->nbytes, (unsigned long long)t->offset);
        total += t->n_elements;
    }
    printf("\n%llu parameters, %.1f MiB of tensor data\n", (unsigned long long)total,
           (double)(f->size - f->data_offset) / (1 << 20));
    kvc_gguf_close(f);
    return 0;
}

/* ---- HDF5 files (KV datasets, codec checkpoints) ------------------------------------ */

/* Prints one attribute's value: strings, and numeric scalars or arrays (first 16 values). */
static herr_t print_attr(hid_t loc, const char *name, const H5A_info_t *ai, void *indent) {
    (void)ai;
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    if (a < 0) return 0;
    hid_t t = H5Aget_type(a), sp = H5Aget_space(a);
    hssize_t n = H5Sget_simple_extent_npoints(sp);
    printf("%s  @%-22s ", (const char *)indent, name);
    H5T_class_t cls = H5Tget_class(t);
    if (cls == H5T_STRING && !H5Tis_variable_str(t)) {
        size_t sz = H5Tget_size(t);
        char *buf = calloc(1, sz + 1);
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, sz + 1); /* room for the terminator */
        H5Tset_strpad(mt, H5T_STR_NULLTERM);
        H5Tset_cset(mt, H5Tget_cset(t));
        if (buf && H5Aread(a, mt, buf) >= 0) printf("\"%s\"", buf);
        H5Tclose(mt);
        free(buf);
    } else if ((cls == H5T_INTEGER || cls == H5T_FLOAT) && n > 0) {
        double *v = malloc((size_t)n * sizeof *v);
        if (v && H5Aread(a, H5T_NATIVE_DOUBLE, v) >= 0) {
            if (n > 1) putchar('[');
            for (hssize_t i = 0; i < n && i < 16; i++) printf(i ? ", %.8g" : "%.8g", v[i]);
            if (n > 16) printf(", ... (%lld values)", (long long)n);
            if (n > 1) putchar(']');
        }
        free(v);
    } else printf("(%s)", cls == H5T_STRING ? "variable-length string" : "other type");
    putchar('\n');
    H5Sclose(sp);
    H5Tclose(t);
    H5Aclose(a);
    return 0;
}

/* Prints each object below the root: datasets with shape, type, chunking and compression. */
static herr_t print_object(hid_t root, const char *name, const H5O_info_t *oi, void *unused) {
    (void)unused;
    if (!strcmp(name, ".")) return 0;
    if (oi->type == H5O_TYPE_GROUP) {
        printf("  %s/\n", name);
        hid_t g = H5Gopen2(root, name, H5P_DEFAULT);
        if (g >= 0) {
            H5Aiterate2(g, H5_INDEX_NAME, H5_ITER_INC, NULL, print_attr, "  ");
            H5Gclose(g);
        }
        return 0;
    }
    if (oi->type != H5O_TYPE_DATASET) return 0;
    hid_t d = H5Dopen2(root, name, H5P_DEFAULT);
    if (d < 0) return 0;
    hid_t sp = H5Dget_space(d), t = H5Dget_type(d), pl = H5Dget_create_plist(d);
    hsize_t dims[8] = {0}, cd[8] = {0};
    int rank = H5Sget_simple_extent_ndims(sp);
    H5Sget_simple_extent_dims(sp, dims, NULL);
    char shape[128] = "[", tname[16];
    for (int i = 0; i < rank && i < 8; i++)
        snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%llu", i ? ", " : "", (unsigned long long)dims[i]);
    strcat(shape, "]");
    H5T_class_t cls = H5Tget_class(t);
    snprintf(tname, sizeof tname, "%s%zu", cls == H5T_FLOAT ? "f" : cls == H5T_INTEGER ? "i" : "?", H5Tget_size(t) * 8);
    printf("  %-28s %-6s %-18s", name, tname, shape);
    if (H5Pget_layout(pl) == H5D_CHUNKED) {
        int cr = H5Pget_chunk(pl, 8, cd);
        printf(" chunk [");
        for (int i = 0; i < cr; i++) printf(i ? ", %llu" : "%llu", (unsigned long long)cd[i]);
        printf("]");
    }
    for (int i = 0; i < H5Pget_nfilters(pl); i++) {
        unsigned flags;
        size_t nel = 0;
        char fname[32];
        H5Z_filter_t f = H5Pget_filter2(pl, (unsigned)i, &flags, &nel, NULL, sizeof fname, fname, NULL);
        printf(" %s", f == H5Z_FILTER_DEFLATE ? "gzip" : f == H5Z_FILTER_SHUFFLE ? "shuffle" : fname);
    }
    printf("  %.1f MiB on disk\n", (double)H5Dget_storage_size(d) / (1 << 20));
    H5Aiterate2(d, H5_INDEX_NAME, H5_ITER_INC, NULL, print_attr, "  ");
    H5Pclose(pl);
    H5Tclose(t);
    H5Sclose(sp);
    H5Dclose(d);
    return 0;
}

/* Names a predictor's inputs ("-" for none). */
static const char *tc_inputs_name(int in) {
    static char buf[32];
    buf[0] = 0;
    if (in & KVC_TC_IN_KPREV) strcat(buf, "k-1");
    if (in & KVC_TC_IN_KCUR) strcat(buf, buf[0] ? "+k" : "k");
    if (in & KVC_TC_IN_VPREV) strcat(buf, buf[0] ? "+v-1" : "v-1");
    return buf[0] ? buf : "-";
}

/* A transform codec's summary: rate, size, and per layer and kind the bits, kept components,
 * predictor inputs and held-back error (groups summed or averaged). 0, or 1 when it does not
 * load (the caller then reports the error). */
static int inspect_tc(const char *path) {
    kvc_err err = {0};
    kvc_tc *tc = kvc_tc_load(path, &err);
    if (!tc) return cli_error("inspect", "%s", err.msg);
    int L = tc->n_layer, G = tc->groups, Dg = tc->heads_per_group * tc->head_dim;
    int64_t code = 0;
    for (int l = 0; l < L; l++) code += kvc_tc_row_bytes(tc, l, 0) + kvc_tc_row_bytes(tc, l, 1);
    double f16 = 2.0 * 2 * L * tc->n_head_kv * tc->head_dim;
    printf("\ntransform codec: %d layers x %d KV heads x %d, %s groups (%d wide), %d sinks in f16\n", L,
           tc->n_head_kv, tc->head_dim, G == 1 ? "joint" : "per-head", Dg, tc->sinks);
    printf("  %s codebooks, %s prediction, %s allocation weights, calibrated: %s\n", tc->quant, tc->predict,
           tc->weights, tc->calibrated);
    printf("  %.3f bits per coefficient (target %g): %lld code bytes per token vs %.0f in f16 = %.2fx"
           " (before sinks and the step's raw rows)\n",
           kvc_tc_mean_bits(tc), tc->bits_target, (long long)code, f16, code ? f16 / code : 0.0);
    double ent = 0;
    for (int i = 0; i < L * 2 * G; i++) ent += tc->parts[i].code_entropy;
    if (isfinite(ent) && code > 0)
        printf("  entropy of the codes %.3f bits per coefficient: an ideal entropy coder would save %.1f%% of the"
               " code bytes\n", ent / (2.0 * L * tc->n_head_kv * tc->head_dim), 100.0 * (1.0 - ent / (8.0 * code)));
    printf("  tables %.2f MiB per model; trained on %lld tokens (+%lld held back) in %.0f s\n",
           kvc_tc_table_bytes(tc) / 1048576.0, (long long)tc->n_train_tokens, (long long)tc->n_val_tokens,
           tc->train_seconds);
    printf("\n  layer | K bits  kept  pred      err   | V bits  kept  pred        err\n");
    for (int l = 0; l < L; l++) {
        printf("  %5d", l);
        for (int kind = 0; kind < 2; kind++) {
            int kept = 0, bits = 0;
            double e = 0;
            for (int g = 0; g < G; g++) {
                const kvc_tc_part *p = &tc->parts[kvc_tc_index(tc, l, kind, g)];
                kept += p->kept;
                for (int i = 0; i < p->dim; i++) bits += p->bits[i];
                e += p->val_rel_err / G;
            }
            const kvc_tc_part *p0 = &tc->parts[kvc_tc_index(tc, l, kind, 0)];
            printf(" | %6.2f %5d  %-8s %6.3f", (double)bits / (G * Dg), kept, tc_inputs_name(p0->inputs), e);
        }
        putchar('\n');
    }
    printf("  (bits: mean per coefficient; kept: components with bits > 0, all groups; pred: predictor\n"
           "   inputs, k-1/v-1 = the layer below's decoded keys/values, k = this layer's; err: relative\n"
           "   error on held-back rows. --all lists every table.)\n");
    kvc_tc_free(tc);
    return 0;
}

/* 1 if the file's root attribute "format" is s. */
static int h5_format_is(hid_t f, const char *s) {
    if (H5Aexists(f, "format") <= 0) return 0;
    hid_t a = H5Aopen(f, "format", H5P_DEFAULT), t = H5Aget_type(a);
    char buf[64] = {0};
    int ok = 0;
    if (H5Tget_class(t) == H5T_STRING && !H5Tis_variable_str(t) && H5Tget_size(t) < sizeof buf) {
        hid_t mt = H5Tcopy(t);
        ok = H5Aread(a, mt, buf) >= 0;
        H5Tclose(mt);
    } else if (H5Tget_class(t) == H5T_STRING && H5Tis_variable_str(t)) {
        char *v = NULL;
        hid_t mt = H5Tcopy(t);
        if (H5Aread(a, mt, &v) >= 0 && v) { snprintf(buf, sizeof buf, "%s", v); ok = 1; H5free_memory(v); }
        H5Tclose(mt);
    }
    H5Tclose(t);
    H5Aclose(a);
    return ok && !strcmp(buf, s);
}

static int inspect_h5(const char *path, int all) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return cli_error("inspect", "cannot open '%s' as HDF5 (corrupt or truncated?)", path);
    printf("file: %s (HDF5)\n\nattributes:\n", path);
    H5Aiterate2(f, H5_INDEX_NAME, H5_ITER_INC, NULL, print_attr, "");
    if (h5_format_is(f, KVC_TC_FORMAT)) {
        int rc = inspect_tc(path);
        if (rc || !all) { H5Fclose(f); return rc; }
    }
    printf("\nobjects:\n");
#if H5_VERSION_GE(1, 12, 0)
    H5Ovisit3(f, H5_INDEX_NAME, H5_ITER_INC, print_object, NULL, H5O_INFO_BASIC);
#else
    H5Ovisit2(f, H5_INDEX_NAME, H5_ITER_INC, print_object, NULL, H5O_INFO_BASIC);
#endif
    H5Fclose(f);
    return 0;
}

/* 1 if the file starts with the HDF5 signature. */
static int is_hdf5(const char *path) {
    FILE *fp = fopen(path, "rb");
    unsigned char sig[8] = {0};
    size_t n = fp ? fread(sig, 1, 8, fp) : 0;
    if (fp) fclose(fp);
    return n == 8 && !memcmp(sig, "\x89HDF\r\n\x1a\n", 8);
}

int cmd_inspect(int argc, char **argv) {
    int all = 0;
    const arg_spec specs[] = {
        {"all", ARG_FLAG, &all, NULL, "print every array element and whole strings; a transform codec's every table", 0},
        {0},
    };
    const char *pos[1];
    int np = 0;
    int rc = args_parse("inspect", "[--all] FILE.gguf|FILE.h5",
                        "Prints the metadata and the tensor table of a GGUF model, or the attributes and\n"
                        "datasets of a kvcodec HDF5 file (KV dataset or codec checkpoint).",
                        specs, argc, argv, pos, 1, &np);
    if (rc) return rc == 1 ? 0 : 2;
    if (np != 1) return cli_error("inspect", "expected one file (see kvcodec inspect --help)"), 2;
    return is_hdf5(pos[0]) ? inspect_h5(pos[0], all) : inspect_gguf(pos[0], all);
}

int cmd_tokenize(int argc, char **argv) {
    const char *model = cli_default_model(), *text = NULL, *file = NULL;
    int special = 0, pieces = 0;
    const arg_spec specs[] = {
        ARG_MODEL(&model),
        {"prompt", ARG_STR, &text, "TEXT", "text to tokenize", 0},
        {"text", ARG_STR, &file, "FILE", "UTF-8 file to tokenize", 0},
        {"special", ARG_FLAG, &special, NULL, "parse control tokens such as <|im_start|>", 0},
        {"pieces", ARG_FLAG, &pieces, NULL, "print each token's text beside its id", 0},
        {0},
    };
    int rc = args_parse("tokenize", "[--model M] (--prompt TEXT | --text FILE)", "Prints the token ids of a text, one"
                        " line, space-separated.", specs, argc, argv, NULL, 0, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (!text == !file) return cli_error("tokenize", "give exactly one of --prompt or --text"), 2;
    kvc_model *m = cli_load_model(model, 1);
    if (!m) return 1;
    char *buf = NULL;
    size_t len;
    if (file) {
        if (cli_read_text(file, &buf, &len)) { kvc_model_free(m); return 1; }
    } else {
        len = strlen(text);
        size_t bad;
        if (!kvc_utf8_valid(text, len, &bad)) { kvc_model_free(m); return cli_error("tokenize", "prompt is not valid UTF-8"); }
    }
    int32_t *ids;
    int64_t n;
    if (cli_tokenize(m, file ? buf : text, len, special, &ids, &n)) { free(buf); kvc_model_free(m); return 1; }
    for (int64_t i = 0; i < n; i++) {
        if (pieces) {
            size_t pl;
            const char *p = kvc_tokenizer_piece(m->tok, ids[i], &pl);
            printf("%d\t", ids[i]);
            print_escaped((gguf_str){pl, p}, 64);
            putchar('\n');
        } else printf(i ? " %d" : "%d", ids[i]);
    }
    if (!pieces) putchar('\n');
    fprintf(stderr, "%lld tokens\n", (long long)n);
    free(ids);
    free(buf);
    kvc_model_free(m);
    return 0;
}
