/* test_tokenizer.c - the BPE tokenizer against llama.cpp's ids (tests/fixtures/tokenizer_cases.txt,
 * made by tools/make_tokenizer_fixture.py) on the SmolLM2 GGUF, plus model-free checks on a toy
 * vocabulary built in memory: merge order, special tokens, and bad metadata. */
#include <criterion/criterion.h>

#include "fixture.h"
#include "gguf_build.h"
#include "kvc/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIXTURE_NAME "tokenizer_cases.txt"
#define SMOL_VOCAB 49152

/* ---- fixture ------------------------------------------------------------------------- */

/* One reference case: text and the ids llama.cpp gives it. */
typedef struct {
    char name[64];
    int special;           /* parse special tokens */
    int roundtrip;         /* the reference ids decode back to the text */
    char *text;
    size_t len;
    int32_t *ids;
    int64_t n_ids;
} ref_case;

/* Value of one hex digit, or -1. */
static int hex_val(int c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Parses one fixture line (modified in place) into c; returns 0 or -1 if malformed. */
static int case_parse(char *line, ref_case *c) {
    char *field[5];
    for (int i = 0; i < 5; i++) {
        field[i] = line;
        char *tab = strchr(line, i < 4 ? '\t' : '\n');
        if (!tab && i < 4)
            return -1;
        if (tab) {
            *tab = '\0';
            line = tab + 1;
        }
    }
    snprintf(c->name, sizeof c->name, "%s", field[0]);
    c->special = atoi(field[1]);
    c->roundtrip = atoi(field[2]);
    size_t hl = strlen(field[3]);
    if (hl % 2)
        return -1;
    c->len = hl / 2;
    c->text = malloc(c->len + 1);
    c->ids = malloc(strlen(field[4]) / 2 * sizeof *c->ids + sizeof *c->ids);
    if (!c->text || !c->ids)
        return -1;
    for (size_t i = 0; i < c->len; i++) {
        int hi = hex_val(field[3][2 * i]), lo = hex_val(field[3][2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        c->text[i] = (char)(hi * 16 + lo);
    }
    c->text[c->len] = '\0';
    c->n_ids = 0;
    for (char *p = field[4], *end; *p; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p)
            return -1;
        c->ids[c->n_ids++] = (int32_t)v;
        while (*end == ' ')
            end++;
    }
    return 0;
}

/* Loads every case of the fixture ($KVC_FIXTURES or the build's fixture dir); fails the test
 * if the file is missing or malformed. Returns the count. */
static size_t cases_load(ref_case **out) {
    const char *path = fixture_path(FIXTURE_NAME);
    FILE *fp = fopen(path, "r");
    cr_assert_not_null(fp, "cannot open fixture %s (set KVC_FIXTURES)", path);
    ref_case *cases = NULL;
    size_t n = 0, cap = 0, lcap = 0, lineno = 0;
    char *line = NULL;
    while (getline(&line, &lcap, fp) > 0) {
        lineno++;
        if (line[0] == '#' || line[0] == '\n')
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            cases = realloc(cases, cap * sizeof *cases);
            cr_assert_not_null(cases);
        }
        memset(&cases[n], 0, sizeof cases[n]);
        cr_assert_eq(case_parse(line, &cases[n]), 0, "%s:%zu: malformed line", path, lineno);
        n++;
    }
    free(line);
    fclose(fp);
    cr_assert_gt(n, 0, "%s has no cases", path);
    *out = cases;
    return n;
}

/* Frees what cases_load returned. */
static void cases_free(ref_case *cases, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(cases[i].text);
        free(cases[i].ids);
    }
    free(cases);
}

/* ---- the SmolLM2 tokenizer ----------------------------------------------------------- */

static gguf_file *g_file;
static kvc_tokenizer *g_tok;

/* Opens the real model's tokenizer, or skips the test when the model is not there. */
static void smol_open(void) {
    REQUIRE_MODEL(path);
    kvc_err err = {{0}};
    g_file = kvc_gguf_open(path, &err);
    cr_assert_not_null(g_file, "kvc_gguf_open(%s): %s", path, err.msg);
    g_tok = kvc_tokenizer_open(g_file, &err);
    cr_assert_not_null(g_tok, "kvc_tokenizer_open: %s", err.msg);
}

/* Frees what smol_open made. */
static void smol_close(void) {
    kvc_tokenizer_free(g_tok);
    kvc_gguf_close(g_file);
    g_tok = NULL;
    g_file = NULL;
}

/* Encodes with exactly-sized output; fails the test on error. *n receives the count. */
static int32_t *encode_all(const char *text, size_t len, int special, int64_t *n) {
    kvc_err err = {{0}};
    int64_t need = kvc_tokenizer_encode(g_tok, text, len, special, NULL, 0, &err);
    cr_assert_geq(need, 0, "kvc_tokenizer_encode: %s", err.msg);
    int32_t *ids = malloc((size_t)(need ? need : 1) * sizeof *ids);
    cr_assert_not_null(ids);
    int64_t got = kvc_tokenizer_encode(g_tok, text, len, special, ids, need, &err);
    cr_assert_eq(got, need, "second encode gave %lld tokens, first %lld", (long long)got,
                 (long long)need);
    *n = need;
    return ids;
}

/* Asserts that encoding c gives exactly the reference ids, naming the first difference. */
static void expect_reference(const ref_case *c) {
    int64_t n;
    int32_t *ids = encode_all(c->text, c->len, c->special, &n);
    int64_t i = 0;
    while (i < n && i < c->n_ids && ids[i] == c->ids[i])
        i++;
    cr_expect(i == n && n == c->n_ids,
              "case %s: %lld tokens vs reference %lld; first difference at token %lld "
              "(got %d, reference %d)", c->name, (long long)n, (long long)c->n_ids, (long long)i,
              i < n ? ids[i] : -1, i < c->n_ids ? c->ids[i] : -1);
    free(ids);
}

TestSuite(tokenizer, .init = smol_open, .fini = smol_close);

Test(tokenizer, hard_cases_match_reference) {
    ref_case *cases;
    size_t n = cases_load(&cases), checked = 0;
    for (size_t i = 0; i < n; i++) {
        if (strncmp(cases[i].name, "corpus-", 7) == 0)
            continue;
        expect_reference(&cases[i]);
        checked++;
    }
    cr_assert_geq(checked, 30, "only %zu hard cases in the fixture", checked);
    cases_free(cases, n);
}

Test(tokenizer, corpus_slice_matches_reference) {
    ref_case *cases;
    size_t n = cases_load(&cases), found = 0;
    for (size_t i = 0; i < n; i++) {
        if (strncmp(cases[i].name, "corpus-", 7) != 0)
            continue;
        cr_assert_geq(cases[i].len, 5000, "corpus slice has only %zu bytes", cases[i].len);
        cr_assert_gt(cases[i].n_ids, 1000);
        expect_reference(&cases[i]);
        found++;
    }
    cr_assert_eq(found, 1, "fixture should hold one corpus-N case");
    cases_free(cases, n);
}

Test(tokenizer, decode_inverts_encode_on_fixture) {
    ref_case *cases;
    size_t n = cases_load(&cases);
    for (size_t i = 0; i < n; i++) {
        int64_t k;
        int32_t *ids = encode_all(cases[i].text, cases[i].len, cases[i].special, &k);
        size_t dl;
        char *d = kvc_tokenizer_decode(g_tok, ids, k, &dl);
        cr_assert_not_null(d, "case %s: decode failed", cases[i].name);
        int same = dl == cases[i].len && memcmp(d, cases[i].text, dl) == 0;
        /* R=0 marks text with bytes the vocabulary cannot express: they are dropped */
        cr_expect_eq(same, cases[i].roundtrip, "case %s: decode(encode(x)) %s x", cases[i].name,
                     same ? "==" : "!=");
        free(d);
        free(ids);
    }
    cases_free(cases, n);
}

/* Appends the UTF-8 encoding of cp to buf. */
static size_t utf8_put(uint32_t cp, char *buf) {
    if (cp < 0x80) {
        buf[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        buf[0] = (char)(0xC0 | (cp >> 6));
        buf[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        buf[0] = (char)(0xE0 | (cp >> 12));
        buf[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    buf[0] = (char)(0xF0 | (cp >> 18));
    buf[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    buf[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    buf[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

Test(tokenizer, decode_inverts_encode_on_every_code_point) {
    /* SmolLM2 has no token for U+0004, U+0006, U+0013, U+0014, U+0016, U+001D or for the
     * lead bytes 0xF1/0xF2 (U+40000..U+BFFFF, all unassigned); every other scalar value
     * must survive, whatever the pre-tokenizer makes of it. */
    static const uint32_t no_token[] = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D};
    size_t cap = 4 * 0x110000, len = 0;
    char *text = malloc(cap);
    cr_assert_not_null(text);
    for (uint32_t cp = 1; cp < 0x110000; cp++) {
        int skip = (cp >= 0xD800 && cp < 0xE000) || (cp >= 0x40000 && cp < 0xC0000);
        for (size_t i = 0; i < sizeof no_token / sizeof no_token[0]; i++)
            skip |= cp == no_token[i];
        if (!skip)
            len += utf8_put(cp, text + len);
    }
    int64_t n;
    int32_t *ids = encode_all(text, len, 0, &n);
    size_t dl;
    char *d = kvc_tokenizer_decode(g_tok, ids, n, &dl);
    cr_assert_not_null(d);
    size_t i = 0;
    while (i < len && i < dl && d[i] == text[i])
        i++;
    cr_assert(i == len && dl == len, "decoded %zu bytes of %zu; first difference at byte %zu", dl,
              len, i);
    free(d);
    free(ids);
    free(text);
}

Test(tokenizer, pieces) {
    /* expected values from llama_token_to_piece(special=true) in llama-cpp-python 0.3.36 */
    static const struct {
        int32_t id;
        const char *piece;
    } want[] = {
        {0, "<|endoftext|>"}, {1, "<|im_start|>"}, {2, "<|im_end|>"}, {17, "!"}, {23, "'"},
        {81, "a"}, {198, "\n"}, {216, " "}, {905, " world"}, {1792, " x"}, {19556, "Hello"},
        {28909, "================================================================"},
        {40686, "                                                                "},
        {49151, "ectable"},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        size_t len = 12345;
        const char *p = kvc_tokenizer_piece(g_tok, want[i].id, &len);
        cr_assert_not_null(p, "piece %d", want[i].id);
        cr_expect_eq(len, strlen(want[i].piece), "piece %d: length %zu", want[i].id, len);
        cr_expect_str_eq(p, want[i].piece, "piece %d", want[i].id);
    }
}

Test(tokenizer, out_of_range_ids) {
    size_t len = 99;
    cr_expect_null(kvc_tokenizer_piece(g_tok, -1, &len));
    cr_expect_eq(len, 0);
    cr_expect_null(kvc_tokenizer_piece(g_tok, SMOL_VOCAB, &len));
    cr_expect_null(kvc_tokenizer_piece(g_tok, INT32_MAX, NULL));
    cr_expect_not_null(kvc_tokenizer_piece(g_tok, SMOL_VOCAB - 1, NULL));

    const int32_t bad_hi[] = {81, SMOL_VOCAB}, bad_lo[] = {-5, 81};
    cr_expect_null(kvc_tokenizer_decode(g_tok, bad_hi, 2, &len));
    cr_expect_null(kvc_tokenizer_decode(g_tok, bad_lo, 2, &len));
    char *d = kvc_tokenizer_decode(g_tok, bad_hi, 0, &len);
    cr_assert_not_null(d);
    cr_expect_eq(len, 0);
    cr_expect_str_eq(d, "");
    free(d);
}

Test(tokenizer, small_cap_returns_needed_count) {
    const char *text = "Hello world! The quick brown fox jumps over the lazy dog.";
    const int32_t want[] = {19556, 905, 17, 378, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30};
    const int64_t n_want = sizeof want / sizeof want[0];
    kvc_err err = {{0}};
    int32_t out[16];
    for (int i = 0; i < 16; i++)
        out[i] = -7;
    cr_assert_eq(kvc_tokenizer_encode(g_tok, text, strlen(text), 0, NULL, 0, &err), n_want, "%s",
                 err.msg);
    cr_assert_eq(kvc_tokenizer_encode(g_tok, text, strlen(text), 0, out, 3, &err), n_want);
    cr_assert_arr_eq(out, want, 3 * sizeof *out);
    for (int i = 3; i < 16; i++)
        cr_assert_eq(out[i], -7, "wrote past cap at %d", i);
    cr_assert_eq(kvc_tokenizer_encode(g_tok, text, strlen(text), 0, out, 16, &err), n_want);
    cr_assert_arr_eq(out, want, sizeof want);
    cr_assert_eq(kvc_tokenizer_encode(g_tok, "", 0, 0, out, 16, &err), 0);
}

Test(tokenizer, metadata) {
    cr_expect_eq(kvc_tokenizer_vocab_size(g_tok), SMOL_VOCAB);
    cr_expect_eq(kvc_tokenizer_bos(g_tok), 1);
    cr_expect_eq(kvc_tokenizer_eos(g_tok), 2);
    cr_expect_eq(kvc_tokenizer_add_bos(g_tok), 0);
    cr_expect_eq(kvc_tokenizer_lookup(g_tok, "<|im_start|>"), 1);
    cr_expect_eq(kvc_tokenizer_lookup(g_tok, "\xc4\xa0world"), 905); /* "Ġworld" */
    cr_expect_eq(kvc_tokenizer_lookup(g_tok, " world"), -1);         /* texts are byte-mapped */
    cr_expect_eq(kvc_tokenizer_lookup(g_tok, "no-such-token-here"), -1);
}

Test(tokenizer, invalid_utf8_is_an_error) {
    kvc_err err = {{0}};
    int32_t out[8];
    cr_expect_eq(kvc_tokenizer_encode(g_tok, "ab\xff" "cd", 5, 0, out, 8, &err), -1);
    cr_expect(strstr(err.msg, "UTF-8") && strstr(err.msg, "offset 2"), "message: %s", err.msg);
    cr_expect_eq(kvc_tokenizer_encode(g_tok, "\xc0\xaf", 2, 0, out, 8, &err), -1); /* overlong */
    cr_expect_eq(kvc_tokenizer_encode(g_tok, "\xed\xa0\x80", 3, 0, out, 8, &err), -1); /* surrogate */
}

/* ---- a toy vocabulary in an in-memory GGUF (no model needed) ------------------------- */

/* Appends a key with an array of n strings / int32 values (gguf_build.h has the scalars). */
static void kv_strs(gbuf *b, const char *k, const char *const *v, size_t n) {
    gb_str(b, k);
    gb_u32(b, GGUF_VT_ARRAY);
    gb_u32(b, GGUF_VT_STRING);
    gb_u64(b, n);
    for (size_t i = 0; i < n; i++)
        gb_str(b, v[i]);
}
static void kv_i32s(gbuf *b, const char *k, const int32_t *v, size_t n) {
    gb_str(b, k);
    gb_u32(b, GGUF_VT_ARRAY);
    gb_u32(b, GGUF_VT_INT32);
    gb_u64(b, n);
    gb_put(b, v, 4 * n);
}

/* Toy token ids: 0..255 are the bytes (GPT-2 mapped, in byte order), then these. */
enum { T_AB = 256, T_BC, T_ABC, T_AA, T_SP_A, T_12, T_CTL, T_CTL_LONG, T_USER, N_TOY };
static char g_byte_text[256][3];

/* Writes a toy BPE tokenizer; `merges` and `model` may be overridden to make it bad. */
static void toy_build(gbuf *b, const char *model, const char *const *merges, size_t n_merges) {
    static const char *const good_merges[] = {"a b", "b c", "ab c", "a a", "\xc4\xa0 a", "1 2"};
    const char *tokens[N_TOY];
    int32_t types[N_TOY];
    int n = 0;
    for (int c = 0; c < 256; c++) { /* GPT-2 bytes_to_unicode, as the tokenizer rebuilds it */
        int keep = (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || c >= 174;
        uint32_t cp = keep ? (uint32_t)c : 256 + (uint32_t)n++;
        g_byte_text[c][utf8_put(cp, g_byte_text[c])] = '\0';
        tokens[c] = g_byte_text[c];
        types[c] = 1;
    }
    const char *extra[] = {"ab", "bc", "abc", "aa", "\xc4\xa0" "a", "12", "<s>", "<s>>", "<u>"};
    for (int i = T_AB; i < N_TOY; i++) {
        tokens[i] = extra[i - T_AB];
        types[i] = i == T_USER ? 4 : i >= T_CTL ? 3 : 1; /* 4: user-defined, 3: control */
    }
    if (!merges) {
        merges = good_merges;
        n_merges = sizeof good_merges / sizeof good_merges[0];
    }
    memset(b, 0, sizeof *b);
    gb_header(b, 3, 0, 7);
    gb_kv_str(b, "general.architecture", "llama");
    gb_kv_str(b, "tokenizer.ggml.model", model);
    gb_kv_str(b, "tokenizer.ggml.pre", "smollm");
    kv_strs(b, "tokenizer.ggml.tokens", tokens, N_TOY);
    kv_i32s(b, "tokenizer.ggml.token_type", types, N_TOY);
    kv_strs(b, "tokenizer.ggml.merges", merges, n_merges);
    gb_kv_u32(b, "tokenizer.ggml.bos_token_id", T_CTL);
}

/* Opens a tokenizer over image b; returns NULL with err filled on failure. */
static kvc_tokenizer *toy_open(gbuf *b, gguf_file **f, kvc_err *err) {
    *f = kvc_gguf_open_buffer(b->p, b->n, err);
    cr_assert_not_null(*f, "kvc_gguf_open_buffer: %s", err->msg);
    return kvc_tokenizer_open(*f, err);
}

/* Asserts that text encodes to exactly want[0..n). */
static void toy_expect(const kvc_tokenizer *t, const char *text, int special, const int32_t *want,
                       int64_t n) {
    kvc_err err = {{0}};
    int32_t out[32];
    int64_t got = kvc_tokenizer_encode(t, text, strlen(text), special, out, 32, &err);
    cr_assert_eq(got, n, "\"%s\" (special %d): %lld tokens, want %lld %s", text, special,
                 (long long)got, (long long)n, err.msg);
    for (int64_t i = 0; i < n; i++)
        cr_expect_eq(out[i], want[i], "\"%s\" token %lld: %d, want %d", text, (long long)i, out[i],
                     want[i]);
    size_t dl;
    char *d = kvc_tokenizer_decode(t, out, got, &dl);
    cr_assert_not_null(d);
    cr_expect_str_eq(d, text, "decode of \"%s\"", text);
    free(d);
}

Test(tokenizer_toy, merges_apply_by_rank_then_leftmost) {
    gbuf b;
    gguf_file *f;
    kvc_err err = {{0}};
    toy_build(&b, "gpt2", NULL, 0);
    kvc_tokenizer *t = toy_open(&b, &f, &err);
    cr_assert_not_null(t, "%s", err.msg);
    cr_expect_eq(kvc_tokenizer_vocab_size(t), N_TOY);
    cr_expect_eq(kvc_tokenizer_bos(t), T_CTL);
    cr_expect_eq(kvc_tokenizer_eos(t), -1);

    toy_expect(t, "abc", 0, (int32_t[]){T_ABC}, 1);          /* a+b (rank 0), then ab+c */
    toy_expect(t, "bcab", 0, (int32_t[]){T_BC, T_AB}, 2);    /* a+b first, then b+c */
    toy_expect(t, "aaa", 0, (int32_t[]){T_AA, 'a'}, 2);      /* equal ranks: leftmost wins */
    toy_expect(t, "a a", 0, (int32_t[]){'a', T_SP_A}, 2);    /* " a" is one pre-token */
    toy_expect(t, "12", 0, (int32_t[]){'1', '2'}, 2);        /* digits split before BPE */
    toy_expect(t, "", 0, NULL, 0);
    kvc_tokenizer_free(t);
    kvc_gguf_close(f);
    free(b.p);
}

Test(tokenizer_toy, special_token_splitting) {
    gbuf b;
    gguf_file *f;
    kvc_err err = {{0}};
    toy_build(&b, "gpt2", NULL, 0);
    kvc_tokenizer *t = toy_open(&b, &f, &err);
    cr_assert_not_null(t, "%s", err.msg);
    /* the longest special token is tried first, so "<s>>" wins over "<s>" */
    toy_expect(t, "x<s>>y", 1, (int32_t[]){'x', T_CTL_LONG, 'y'}, 3);
    toy_expect(t, "<s><s>", 1, (int32_t[]){T_CTL, T_CTL}, 2);
    toy_expect(t, "x<s>>y", 0, (int32_t[]){'x', '<', 's', '>', '>', 'y'}, 6);
    /* user-defined tokens are split out even without parse_special, as llama.cpp does */
    toy_expect(t, "a<u>b", 0, (int32_t[]){'a', T_USER, 'b'}, 3);
    toy_expect(t, "a<u>b", 1, (int32_t[]){'a', T_USER, 'b'}, 3);
    size_t len;
    cr_expect_str_eq(kvc_tokenizer_piece(t, T_CTL_LONG, &len), "<s>>");
    cr_expect_str_eq(kvc_tokenizer_piece(t, ' ', &len), " "); /* stored as "\xc4\xa0" */
    cr_expect_str_eq(kvc_tokenizer_piece(t, T_SP_A, &len), " a");
    kvc_tokenizer_free(t);
    kvc_gguf_close(f);
    free(b.p);
}

Test(tokenizer_toy, gguf_without_tokenizer_is_an_error) {
    gbuf b;
    gguf_file *f;
    kvc_err err = {{0}};
    memset(&b, 0, sizeof b);
    gb_header(&b, 3, 0, 2);
    gb_kv_str(&b, "general.architecture", "llama");
    gb_kv_u32(&b, "llama.context_length", 2048);
    cr_expect_null(toy_open(&b, &f, &err));
    cr_expect(strstr(err.msg, "tokenizer.ggml.model") != NULL, "message: %s", err.msg);
    kvc_gguf_close(f);
    free(b.p);
}

Test(tokenizer_toy, unsupported_or_inconsistent_metadata_is_an_error) {
    gbuf b;
    gguf_file *f;
    kvc_err err = {{0}};
    toy_build(&b, "llama", NULL, 0); /* SentencePiece: not handled */
    cr_expect_null(toy_open(&b, &f, &err));
    cr_expect(strstr(err.msg, "\"llama\"") != NULL, "message: %s", err.msg);
    kvc_gguf_close(f);
    free(b.p);

    static const char *const bad[] = {"a b", "x q"}; /* "xq" is not a token */
    toy_build(&b, "gpt2", bad, 2);
    cr_expect_null(toy_open(&b, &f, &err));
    cr_expect(strstr(err.msg, "merges[1]") != NULL, "message: %s", err.msg);
    kvc_gguf_close(f);
    free(b.p);
}
