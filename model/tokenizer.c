/* tokenizer.c - byte-level BPE tokenizer built from a GGUF file's tokenizer.ggml.* metadata.
 * Reproduces llama.cpp's BPE path token for token: special tokens are split out first, then
 * the pre-tokenizer regexes run (PCRE2), then merge-rank BPE over the GPT-2 byte alphabet. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "kvc/tokenizer.h"

#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

/* Token types as stored in tokenizer.ggml.token_type (llama.cpp's llama_token_type). */
enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER = 4, TOK_UNUSED = 5, TOK_BYTE = 6 };

/* Character classes as llama.cpp's Unicode 15.1 tables have them. PCRE2 10.42 knows only
 * Unicode 14, so the letters and digits added in 15.0/15.1 are listed by hand (harmless with a
 * newer PCRE2); whitespace is llama.cpp's list, which unlike PCRE2's \s leaves out U+180E.
 * Found by probing every code point against llama-cpp-python 0.3.36; the unicode15 case of
 * tests/fixtures/tokenizer_cases.txt pins one character of each range. */
#define U15_LETTERS "\\x{1123F}-\\x{11240}\\x{11F02}\\x{11F04}-\\x{11F10}\\x{11F12}-\\x{11F33}" \
    "\\x{1342F}\\x{13441}-\\x{13446}\\x{1B132}\\x{1B155}\\x{1DF25}-\\x{1DF2A}\\x{1E030}-\\x{1E06D}" \
    "\\x{1E4D0}-\\x{1E4EB}\\x{2B739}\\x{2EBF0}-\\x{2EE5D}\\x{31350}-\\x{323AF}"
#define U15_DIGITS "\\x{11F50}-\\x{11F59}\\x{1D2C0}-\\x{1D2D3}\\x{1E4F0}-\\x{1E4F9}"
#define WS "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}" \
    "\\x{202F}\\x{205F}\\x{3000}"
#define RE_L "[\\p{L}" U15_LETTERS "]"
#define RE_N "[\\p{N}" U15_DIGITS "]"
#define RE_S "[" WS "]"
#define RE_NOT_S "[^" WS "]"
#define RE_OTHER "[^" WS "\\p{L}\\p{N}" U15_LETTERS U15_DIGITS "]"

/* GPT-2 pre-tokenizer:  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * The trailing `|\s+` reproduces llama.cpp, which keeps text no alternative matches (a lone
 * whitespace before a non-space) as a piece of its own. Compiled anchored: each match must
 * start where the previous one ended. Possessive runs change no result (nothing follows them
 * in their alternative) and spare PCRE2 the backtracking. */
static const char RE_GPT2[] = "'s|'t|'re|'ve|'m|'ll|'d| ?" RE_L "++| ?" RE_N "++| ?" RE_OTHER
                              "++|" RE_S "+(?!" RE_NOT_S ")|" RE_S "++";
/* First pass for the "smollm" family: every numeric character becomes a piece alone. */
static const char RE_DIGIT[] = RE_N;

/* tokenizer.ggml.pre values handled, grouped as llama.cpp groups them (llama-vocab.cpp).
 * Only "smollm" is checked against the reference by the test suite. */
static const struct {
    const char *name;
    int split_digits;
} PRE_TYPES[] = {
    {"smollm", 1}, {"starcoder", 1}, {"refact", 1}, {"command-r", 1}, {"codeshell", 1},
    {"exaone", 1}, {"minerva-7b", 1},
    {"gpt-2", 0}, {"phi-2", 0}, {"mpt", 0}, {"olmo", 0}, {"jais", 0},
};

/* One entry of the merge table: the pair (left, right) merges into result with rank. */
typedef struct {
    uint64_t key;          /* (uint64)left << 32 | right */
    int32_t rank;          /* -1: empty slot */
    int32_t result;
} merge_slot;

struct kvc_tokenizer {
    int32_t n_vocab;
    char *text;            /* every token's stored text, NUL-terminated, back to back */
    size_t *text_off;      /* (n_vocab + 1) token i is text[text_off[i] .. text_off[i+1]-1) */
    char *piece;           /* every token's decoded bytes, NUL-terminated, back to back */
    size_t *piece_off;     /* (n_vocab + 1) same layout as text_off */
    uint8_t *type;         /* (n_vocab) TOK_* */
    uint32_t *vocab_slot;  /* (vocab_mask + 1) open-addressing table of id + 1; 0 = empty */
    uint32_t vocab_mask;
    merge_slot *merge;     /* (merge_mask + 1) open-addressing table keyed by token pair */
    uint64_t merge_mask;
    int32_t byte_tok[256]; /* token of each byte's GPT-2 unicode character; -1: none */
    int32_t *special;      /* (n_special) control/user/unknown ids, longest text first */
    int32_t n_special;
    int split_digits;
    pcre2_code *re_word;
    pcre2_code *re_digit;  /* NULL unless split_digits */
    int32_t bos, eos;
    int add_bos;
};

/* ---- byte <-> unicode alphabet ------------------------------------------------------- */

/* Fills GPT-2's bytes_to_unicode table: printable bytes map to themselves, the other 68
 * to U+0100.. in byte order, so every byte becomes one visible character. */
static void byte_map_build(uint32_t b2u[256]) {
    uint32_t n = 0;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        b2u[b] = keep ? (uint32_t)b : 256 + n++;
    }
}

/* Decodes one UTF-8 sequence at s (n bytes left); returns its length (1 for a bad byte)
 * and the code point in *cp (0xFFFFFFFF for a bad byte). */
static size_t utf8_get(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t c = s[0];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || len > n) {
        *cp = 0xFFFFFFFFu;
        return 1;
    }
    uint32_t v = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *cp = 0xFFFFFFFFu;
            return 1;
        }
        v = (v << 6) | (s[i] & 0x3Fu);
    }
    *cp = v;
    return len;
}

/* ---- hash tables --------------------------------------------------------------------- */

/* FNV-1a over n bytes. */
static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Length of token id's stored text. */
static size_t tok_text_len(const kvc_tokenizer *t, int32_t id) {
    return t->text_off[id + 1] - t->text_off[id] - 1;
}

/* Token id whose stored text is exactly s[0..n), or -1. */
static int32_t vocab_find(const kvc_tokenizer *t, const char *s, size_t n) {
    for (uint64_t i = hash_bytes(s, n) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        uint32_t v = t->vocab_slot[i];
        if (v == 0)
            return -1;
        int32_t id = (int32_t)(v - 1);
        if (tok_text_len(t, id) == n && memcmp(t->text + t->text_off[id], s, n) == 0)
            return id;
    }
}

/* Inserts id; a later token with the same text replaces the earlier one, as in llama.cpp. */
static void vocab_insert(kvc_tokenizer *t, int32_t id) {
    const char *s = t->text + t->text_off[id];
    size_t n = tok_text_len(t, id);
    for (uint64_t i = hash_bytes(s, n) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        uint32_t v = t->vocab_slot[i];
        if (v == 0 || (tok_text_len(t, (int32_t)(v - 1)) == n &&
                       memcmp(t->text + t->text_off[v - 1], s, n) == 0)) {
            t->vocab_slot[i] = (uint32_t)id + 1;
            return;
        }
    }
}

/* The merge slot for (left, right): the matching one, or the empty one that ends its probe. */
static merge_slot *merge_slot_of(const kvc_tokenizer *t, int32_t left, int32_t right) {
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint64_t i = kvc_mix64(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        merge_slot *m = &t->merge[i];
        if (m->rank < 0 || m->key == key)
            return m;
    }
}

/* ---- loading ------------------------------------------------------------------------- */

/* Finds an array key of the given element type; NULL with err if absent or mistyped. */
static const gguf_kv *kv_array(const gguf_file *f, const char *key, gguf_vtype at, kvc_err *err) {
    const gguf_kv *kv = kvc_gguf_find_kv(f, key);
    if (!kv) {
        kvc_fail(err, "GGUF has no %s: not a model with a tokenizer", key);
        return NULL;
    }
    if (kv->type != GGUF_VT_ARRAY || kv->arr_type != at || (at == GGUF_VT_STRING && !kv->strs)) {
        kvc_fail(err, "%s: expected an array of %s", key, kvc_gguf_vtype_name(at));
        return NULL;
    }
    return kv;
}

/* Reads an optional token-id key into *out (-1 when absent); -1 with err if out of range. */
static int special_id(const gguf_file *f, const char *key, int32_t n_vocab, int32_t *out,
                      kvc_err *err) {
    uint32_t v;
    *out = -1;
    if (!kvc_gguf_find_kv(f, key))
        return 0;
    if (kvc_gguf_get_u32(f, key, &v, err) != 0)
        return -1;
    if (v >= (uint32_t)n_vocab)
        return kvc_fail(err, "%s = %u is outside the vocabulary (%d tokens)", key, v, n_vocab);
    *out = (int32_t)v;
    return 0;
}

/* Copies the token texts and types, and builds the text -> id table. */
static int load_vocab(kvc_tokenizer *t, const gguf_file *f, kvc_err *err) {
    const gguf_kv *tk = kv_array(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, err);
    if (!tk)
        return -1;
    if (tk->n == 0 || tk->n > (1u << 24))
        return kvc_fail(err, "tokenizer.ggml.tokens: %llu tokens is not a plausible vocabulary",
                        (unsigned long long)tk->n);
    t->n_vocab = (int32_t)tk->n;

    size_t total = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        total += tk->strs[i].len + 1;
    t->text = malloc(total);
    t->text_off = kvc_malloc_array((size_t)t->n_vocab + 1, sizeof *t->text_off);
    t->type = malloc((size_t)t->n_vocab);
    if (!t->text || !t->text_off || !t->type)
        return kvc_fail(err, "out of memory loading %d tokens", t->n_vocab);
    size_t off = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        t->text_off[i] = off;
        memcpy(t->text + off, tk->strs[i].ptr, tk->strs[i].len);
        off += tk->strs[i].len;
        t->text[off++] = '\0';
        t->type[i] = TOK_NORMAL;
    }
    t->text_off[t->n_vocab] = off;

    const gguf_kv *ty = kvc_gguf_find_kv(f, "tokenizer.ggml.token_type");
    if (ty) {
        if (ty->type != GGUF_VT_ARRAY || ty->arr_type != GGUF_VT_INT32 || ty->n != tk->n)
            return kvc_fail(err, "tokenizer.ggml.token_type: expected %d int32 values",
                            t->n_vocab);
        for (int32_t i = 0; i < t->n_vocab; i++) {
            int32_t v;
            memcpy(&v, ty->data + 4 * (size_t)i, 4);
            t->type[i] = (v >= 0 && v <= TOK_BYTE) ? (uint8_t)v : 0;
        }
    }

    uint32_t cap = 1;
    while (cap < 2u * (uint32_t)t->n_vocab)
        cap <<= 1;
    t->vocab_slot = calloc(cap, sizeof *t->vocab_slot);
    if (!t->vocab_slot)
        return kvc_fail(err, "out of memory building the vocabulary table");
    t->vocab_mask = cap - 1;
    for (int32_t i = 0; i < t->n_vocab; i++)
        vocab_insert(t, i);
    return 0;
}

/* Builds the merge table from tokenizer.ggml.merges ("left right" per line, rank = index).
 * Every piece of a merge must be a token (Hugging Face enforces this for BPE vocabularies). */
static int load_merges(kvc_tokenizer *t, const gguf_file *f, kvc_err *err) {
    const gguf_kv *mk = kv_array(f, "tokenizer.ggml.merges", GGUF_VT_STRING, err);
    if (!mk)
        return -1;
    if (mk->n > (uint64_t)INT32_MAX)
        return kvc_fail(err, "tokenizer.ggml.merges: too many merges");
    uint64_t cap = 1;
    while (cap < 2 * mk->n + 2)
        cap <<= 1;
    t->merge = kvc_malloc_array(cap, sizeof *t->merge);
    if (!t->merge)
        return kvc_fail(err, "out of memory building the merge table");
    t->merge_mask = cap - 1;
    for (uint64_t i = 0; i < cap; i++)
        t->merge[i].rank = -1;

    char *buf = NULL;
    size_t buf_cap = 0;
    int rc = 0;
    for (uint64_t r = 0; r < mk->n; r++) {
        gguf_str s = mk->strs[r];
        /* llama.cpp splits at the first space after the first byte; lines without one are
         * ignored there too. */
        const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
        if (!sp)
            continue;
        size_t nl = (size_t)(sp - s.ptr), nr = s.len - nl - 1;
        int32_t left = vocab_find(t, s.ptr, nl), right = vocab_find(t, sp + 1, nr);
        if (nl + nr > buf_cap) {
            free(buf);
            buf_cap = 2 * (nl + nr);
            buf = malloc(buf_cap);
            if (!buf) {
                rc = kvc_fail(err, "out of memory reading merges");
                break;
            }
        }
        memcpy(buf, s.ptr, nl);
        memcpy(buf + nl, sp + 1, nr);
        int32_t result = vocab_find(t, buf, nl + nr);
        if (left < 0 || right < 0 || result < 0) {
            rc = kvc_fail(err, "tokenizer.ggml.merges[%llu] \"%.*s\" names a piece that is not "
                          "in the vocabulary", (unsigned long long)r, (int)(s.len > 80 ? 80 : s.len),
                          s.ptr);
            break;
        }
        merge_slot *m = merge_slot_of(t, left, right);
        if (m->rank < 0) { /* a repeated pair keeps its first (lowest) rank */
            m->key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
            m->rank = (int32_t)r;
            m->result = result;
        }
    }
    free(buf);
    return rc;
}

/* Decodes every token's text to the bytes it stands for, once, so piece/decode are lookups. */
static int build_pieces(kvc_tokenizer *t, kvc_err *err) {
    int16_t u2b[512];
    uint32_t b2u[256];
    byte_map_build(b2u);
    for (int i = 0; i < 512; i++)
        u2b[i] = -1;
    for (int b = 0; b < 256; b++)
        u2b[b2u[b]] = (int16_t)b;

    /* A decoded piece is never longer than its text. */
    t->piece = malloc(t->text_off[t->n_vocab]);
    t->piece_off = kvc_malloc_array((size_t)t->n_vocab + 1, sizeof *t->piece_off);
    if (!t->piece || !t->piece_off)
        return kvc_fail(err, "out of memory decoding token texts");
    size_t o = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const uint8_t *s = (const uint8_t *)t->text + t->text_off[id];
        size_t n = tok_text_len(t, id);
        int ty = t->type[id];
        t->piece_off[id] = o;
        if (ty == TOK_CONTROL || ty == TOK_USER || ty == TOK_UNKNOWN) {
            memcpy(t->piece + o, s, n);
            o += n;
        } else if (ty == TOK_BYTE && n == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>') {
            char hex[3] = {(char)s[3], (char)s[4], 0};
            t->piece[o++] = (char)strtol(hex, NULL, 16);
        } else {
            for (size_t i = 0; i < n;) {
                uint32_t cp;
                size_t len = utf8_get(s + i, n - i, &cp);
                if (cp < 512 && u2b[cp] >= 0)
                    t->piece[o++] = (char)u2b[cp];
                else { /* not from the byte alphabet: keep it as written */
                    memcpy(t->piece + o, s + i, len);
                    o += len;
                }
                i += len;
            }
        }
        t->piece[o++] = '\0';
    }
    t->piece_off[t->n_vocab] = o;

    /* Some vocabularies lack a few bytes (SmolLM2: six control characters and the lead bytes
     * 0xF1, 0xF2, 0xF5-0xFF). Such bytes cannot be encoded; like llama.cpp we drop them. */
    for (int b = 0; b < 256; b++) {
        uint32_t cp = b2u[b]; /* < 0x200: one or two UTF-8 bytes */
        char c[2] = {(char)(cp < 0x80 ? cp : 0xC0 | cp >> 6), (char)(0x80 | (cp & 0x3F))};
        int len = cp < 0x80 ? 1 : 2;
        t->byte_tok[b] = vocab_find(t, c, (size_t)len);
        if (t->byte_tok[b] < 0 && b >= 0x21 && b <= 0x7E)
            return kvc_fail(err, "byte '%c' has no token: not a byte-level BPE vocabulary", b);
    }
    return 0;
}

/* A special token and its text length, for sorting. */
typedef struct {
    size_t len;
    int32_t id;
} special_key;

/* Orders special tokens longest text first (ties by id), the order llama.cpp tries them in. */
static int special_cmp(const void *a, const void *b) {
    const special_key *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Lists the tokens matched literally in the text: control, user-defined and unknown. */
static int load_specials(kvc_tokenizer *t, kvc_err *err) {
    special_key *keys = kvc_malloc_array((size_t)t->n_vocab, sizeof *keys);
    t->special = kvc_malloc_array((size_t)t->n_vocab, sizeof *t->special);
    if (!keys || !t->special) {
        free(keys);
        return kvc_fail(err, "out of memory");
    }
    size_t n = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        int ty = t->type[i];
        if ((ty == TOK_CONTROL || ty == TOK_USER || ty == TOK_UNKNOWN) && tok_text_len(t, i) > 0)
            keys[n++] = (special_key){tok_text_len(t, i), i};
    }
    qsort(keys, n, sizeof *keys, special_cmp);
    for (size_t i = 0; i < n; i++)
        t->special[i] = keys[i].id;
    t->n_special = (int32_t)n;
    free(keys);
    return 0;
}

/* Compiles one pre-tokenizer pattern in UTF/UCP mode and JIT-compiles it where supported. */
static pcre2_code *regex_compile(const char *pat, uint32_t extra, kvc_err *err) {
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | extra, &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        kvc_fail(err, "PCRE2 cannot compile the pre-tokenizer regex at %zu: %s", (size_t)eo,
                 (const char *)msg);
        return NULL;
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter */
    return re;
}

/* Reads tokenizer.ggml.* from f (nothing is kept pointing into f) and compiles the regexes. */
kvc_tokenizer *kvc_tokenizer_open(const gguf_file *f, kvc_err *err) {
    char model[64], pre[64];
    if (!kvc_gguf_find_kv(f, "tokenizer.ggml.model")) {
        kvc_fail(err, "GGUF has no tokenizer.ggml.model: not a model with a tokenizer");
        return NULL;
    }
    if (kvc_gguf_get_str(f, "tokenizer.ggml.model", model, sizeof model, err) != 0)
        return NULL;
    if (strcmp(model, "gpt2") != 0) {
        kvc_fail(err, "tokenizer model \"%s\" is not supported (only byte-level BPE, \"gpt2\")",
                 model);
        return NULL;
    }
    if (!kvc_gguf_find_kv(f, "tokenizer.ggml.pre")) {
        kvc_fail(err, "GGUF has no tokenizer.ggml.pre: cannot tell which pre-tokenizer to use");
        return NULL;
    }
    if (kvc_gguf_get_str(f, "tokenizer.ggml.pre", pre, sizeof pre, err) != 0)
        return NULL;
    int split = -1;
    for (size_t i = 0; i < sizeof PRE_TYPES / sizeof PRE_TYPES[0]; i++)
        if (strcmp(pre, PRE_TYPES[i].name) == 0)
            split = PRE_TYPES[i].split_digits;
    if (split < 0) {
        kvc_fail(err, "pre-tokenizer \"%s\" is not supported (try a smollm or gpt-2 family model)",
                 pre);
        return NULL;
    }

    kvc_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        kvc_fail(err, "out of memory");
        return NULL;
    }
    t->split_digits = split;
    if (load_vocab(t, f, err) != 0 || load_merges(t, f, err) != 0 || build_pieces(t, err) != 0 ||
        load_specials(t, err) != 0 ||
        special_id(f, "tokenizer.ggml.bos_token_id", t->n_vocab, &t->bos, err) != 0 ||
        special_id(f, "tokenizer.ggml.eos_token_id", t->n_vocab, &t->eos, err) != 0)
        goto fail;
    t->add_bos = 0;
    if (kvc_gguf_find_kv(f, "tokenizer.ggml.add_bos_token") &&
        kvc_gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &t->add_bos, err) != 0)
        goto fail;
    t->re_word = regex_compile(RE_GPT2, PCRE2_ANCHORED, err);
    if (!t->re_word)
        goto fail;
    if (split) {
        t->re_digit = regex_compile(RE_DIGIT, 0, err);
        if (!t->re_digit)
            goto fail;
    }
    return t;
fail:
    kvc_tokenizer_free(t);
    return NULL;
}

/* Frees t and everything it owns; NULL is fine. */
void kvc_tokenizer_free(kvc_tokenizer *t) {
    if (!t)
        return;
    pcre2_code_free(t->re_word);
    pcre2_code_free(t->re_digit);
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->type);
    free(t->vocab_slot);
    free(t->merge);
    free(t->special);
    free(t);
}

/* ---- encoding ------------------------------------------------------------------------ */

/* One symbol of the word being merged; symbols form a linked list. */
typedef struct {
    int32_t tok;           /* -1: merged away, or a byte with no token */
    int32_t prev, next;
} symbol;

/* A pending merge of the symbols at left and right (adjacent when pushed). */
typedef struct {
    int32_t rank;
    int32_t left, right;
    int32_t ltok, rtok;    /* the symbols' tokens when pushed: a changed symbol voids it */
    int32_t result;        /* token of the merged pair */
} bigram;

/* Scratch state for one kvc_tokenizer_encode call. */
typedef struct {
    const kvc_tokenizer *t;
    int32_t *out;
    int64_t cap, count;
    pcre2_match_data *md_word, *md_digit;
    symbol *sym;           /* (sym_cap) */
    size_t sym_cap;
    bigram *heap;          /* (heap_cap) min-heap by (rank, left) */
    size_t heap_len, heap_cap;
    kvc_err *err;
} enc_state;

/* Grows *p (elements of es bytes, capacity *cap) to hold need; -1 on allocation failure. */
static int grow(void **p, size_t *cap, size_t need, size_t es) {
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 16;
    while (nc < need)
        nc *= 2;
    void *np = nc <= SIZE_MAX / es ? realloc(*p, nc * es) : NULL;
    if (!np)
        return -1;
    *p = np;
    *cap = nc;
    return 0;
}

/* Appends one token to the output (counted even when it does not fit). */
static void enc_emit(enc_state *s, int32_t id) {
    if (s->count < s->cap)
        s->out[s->count] = id;
    s->count++;
}

/* Orders bigrams as llama.cpp's queue does: lowest rank first, then leftmost. */
static int bigram_less(const bigram *a, const bigram *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

/* Pushes a merge candidate for symbols (left, right) if the pair has a merge rule. */
static int heap_push(enc_state *s, int32_t left, int32_t right) {
    if (left < 0 || right < 0 || s->sym[left].tok < 0 || s->sym[right].tok < 0)
        return 0;
    const merge_slot *m = merge_slot_of(s->t, s->sym[left].tok, s->sym[right].tok);
    if (m->rank < 0)
        return 0;
    if (grow((void **)&s->heap, &s->heap_cap, s->heap_len + 1, sizeof *s->heap) != 0)
        return kvc_fail(s->err, "out of memory in BPE");
    bigram b = {m->rank, left, right, s->sym[left].tok, s->sym[right].tok, m->result};
    size_t i = s->heap_len++;
    for (; i > 0 && bigram_less(&b, &s->heap[(i - 1) / 2]); i = (i - 1) / 2)
        s->heap[i] = s->heap[(i - 1) / 2];
    s->heap[i] = b;
    return 0;
}

/* Removes the smallest bigram into *out. */
static void heap_pop(enc_state *s, bigram *out) {
    *out = s->heap[0];
    bigram last = s->heap[--s->heap_len];
    size_t i = 0, n = s->heap_len, c;
    while ((c = 2 * i + 1) < n) {
        if (c + 1 < n && bigram_less(&s->heap[c + 1], &s->heap[c]))
            c++;
        if (!bigram_less(&s->heap[c], &last))
            break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n)
        s->heap[i] = last;
}

/* Runs BPE on one pre-token (n > 0 bytes) and emits its tokens. Merges apply lowest rank
 * first, leftmost among equals, until no adjacent pair has a rule. A byte with no token
 * (tok -1) never merges and is dropped, as llama.cpp drops it. */
static int bpe_word(enc_state *s, const char *w, size_t n) {
    const kvc_tokenizer *t = s->t;
    if (n == 1) {
        if (t->byte_tok[(uint8_t)w[0]] >= 0)
            enc_emit(s, t->byte_tok[(uint8_t)w[0]]);
        return 0;
    }
    if (n > (size_t)INT32_MAX)
        return kvc_fail(s->err, "pre-token of %zu bytes is too long", n);
    if (grow((void **)&s->sym, &s->sym_cap, n, sizeof *s->sym) != 0)
        return kvc_fail(s->err, "out of memory in BPE (word of %zu bytes)", n);
    symbol *sym = s->sym;
    for (size_t i = 0; i < n; i++)
        sym[i] = (symbol){t->byte_tok[(uint8_t)w[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
    s->heap_len = 0;
    for (size_t i = 1; i < n; i++)
        if (heap_push(s, (int32_t)i - 1, (int32_t)i) != 0)
            return -1;
    while (s->heap_len > 0) {
        bigram b;
        heap_pop(s, &b);
        symbol *l = &sym[b.left], *r = &sym[b.right];
        /* stale: a side was merged away (tok -1) or grew since the pair was queued */
        if (l->next != b.right || l->tok != b.ltok || r->tok != b.rtok)
            continue;
        l->tok = b.result;
        r->tok = -1;
        l->next = r->next;
        if (r->next >= 0)
            sym[r->next].prev = b.left;
        if (heap_push(s, l->prev, b.left) != 0 || heap_push(s, b.left, l->next) != 0)
            return -1;
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        if (sym[i].tok >= 0)
            enc_emit(s, sym[i].tok);
    return 0;
}

/* Reports a PCRE2 matching failure other than "no match". */
static int regex_fail(enc_state *s, int rc) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    return kvc_fail(s->err, "pre-tokenizer regex failed: %s", (const char *)msg);
}

/* Splits text with no digits left in it (the second pre-tokenizer pass) and encodes each piece. */
static int enc_words(enc_state *s, const char *p, size_t n) {
    size_t q = 0;
    while (q < n) {
        int rc = pcre2_match(s->t->re_word, (PCRE2_SPTR)p, n, q, PCRE2_NO_UTF_CHECK, s->md_word,
                             NULL);
        if (rc < 0 && rc != PCRE2_ERROR_NOMATCH)
            return regex_fail(s, rc);
        size_t end = rc >= 0 ? pcre2_get_ovector_pointer(s->md_word)[1] : q;
        if (end <= q) { /* nothing matched here: one character on its own */
            uint32_t cp;
            end = q + utf8_get((const uint8_t *)p + q, n - q, &cp);
        }
        if (bpe_word(s, p + q, end - q) != 0)
            return -1;
        q = end;
    }
    return 0;
}

/* Encodes one stretch of plain text (no special tokens): first pass splits off each numeric
 * character (for split_digits), the second runs the GPT-2 regex on what lies between. */
static int enc_text(enc_state *s, const char *p, size_t n) {
    if (!s->t->split_digits)
        return enc_words(s, p, n);
    size_t pos = 0;
    while (pos < n) {
        int rc = pcre2_match(s->t->re_digit, (PCRE2_SPTR)p, n, pos, PCRE2_NO_UTF_CHECK,
                             s->md_digit, NULL);
        size_t a = n, b = n;
        if (rc >= 0) {
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(s->md_digit);
            a = ov[0];
            b = ov[1];
        } else if (rc != PCRE2_ERROR_NOMATCH) {
            return regex_fail(s, rc);
        }
        /* the words regex sees only [pos, a): its lookahead stops at the digit, as in llama.cpp */
        if (enc_words(s, p + pos, a - pos) != 0)
            return -1;
        if (b > a && bpe_word(s, p + a, b - a) != 0)
            return -1;
        pos = b > pos ? b : n;
    }
    return 0;
}

/* Finds the first occurrence of needle (nn > 0 bytes) in hay[0..nh), or NULL. */
static const char *find_bytes(const char *hay, size_t nh, const char *needle, size_t nn) {
    while (nh >= nn) {
        const char *c = memchr(hay, needle[0], nh - nn + 1);
        if (!c)
            return NULL;
        if (memcmp(c, needle, nn) == 0)
            return c;
        nh -= (size_t)(c - hay) + 1;
        hay = c + 1;
    }
    return NULL;
}

/* A piece of the input after special-token splitting: raw text or one token. */
typedef struct {
    size_t off, len;
    int32_t id;            /* -1: raw text text[off, off+len) */
} fragment;

/* Appends f to the growable array *a; -1 on allocation failure. */
static int frag_push(fragment **a, size_t *n, size_t *cap, fragment f) {
    if (grow((void **)a, cap, *n + 1, sizeof **a) != 0)
        return -1;
    (*a)[(*n)++] = f;
    return 0;
}

/* Splits the raw fragments of *frags around every occurrence of special token id, keeping
 * order (llama.cpp's tokenizer_st_partition for one token). Returns 0, or -1 with err. */
static int split_special(const kvc_tokenizer *t, const char *text, int32_t id, fragment **frags,
                         size_t *n_frags, kvc_err *err) {
    const char *tt = t->text + t->text_off[id];
    size_t tn = tok_text_len(t, id);
    fragment *dst = NULL;
    size_t n_dst = 0, cap = 0;
    for (size_t i = 0; i < *n_frags; i++) {
        fragment fr = (*frags)[i];
        for (;;) {
            const char *m = fr.id < 0 ? find_bytes(text + fr.off, fr.len, tt, tn) : NULL;
            if (!m) {
                if ((fr.id >= 0 || fr.len > 0) && frag_push(&dst, &n_dst, &cap, fr) != 0)
                    goto oom;
                break;
            }
            size_t at = (size_t)(m - text), end = at + tn;
            if (at > fr.off && frag_push(&dst, &n_dst, &cap, (fragment){fr.off, at - fr.off, -1}) != 0)
                goto oom;
            if (frag_push(&dst, &n_dst, &cap, (fragment){at, tn, id}) != 0)
                goto oom;
            fr = (fragment){end, fr.off + fr.len - end, -1};
        }
    }
    free(*frags);
    *frags = dst;
    *n_frags = n_dst;
    return 0;
oom:
    free(dst);
    return kvc_fail(err, "out of memory splitting special tokens");
}

/* Validates the UTF-8, splits out special tokens, then pre-tokenizes and runs BPE on the rest. */
int64_t kvc_tokenizer_encode(const kvc_tokenizer *t, const char *text, size_t len,
                         int parse_special, int32_t *out, int64_t cap, kvc_err *err) {
    size_t bad;
    if (len > 0 && !text)
        return kvc_fail(err, "kvc_tokenizer_encode: NULL text");
    if (cap > 0 && !out)
        return kvc_fail(err, "kvc_tokenizer_encode: NULL output with cap %lld", (long long)cap);
    if (!kvc_utf8_valid(text, len, &bad))
        return kvc_fail(err, "text is not valid UTF-8 (first bad byte at offset %zu)", bad);

    size_t n_frags = 1;
    fragment *frags = malloc(sizeof *frags);
    if (!frags)
        return kvc_fail(err, "out of memory");
    frags[0] = (fragment){0, len, -1};
    for (int32_t i = 0; i < t->n_special; i++) {
        int32_t id = t->special[i];
        /* user-defined tokens split the text even without parse_special, as in llama.cpp */
        if (!parse_special && t->type[id] != TOK_USER)
            continue;
        if (split_special(t, text, id, &frags, &n_frags, err) != 0) {
            free(frags);
            return -1;
        }
    }

    enc_state s = {.t = t, .out = out, .cap = cap < 0 ? 0 : cap, .err = err};
    int rc = 0;
    s.md_word = pcre2_match_data_create_from_pattern(t->re_word, NULL);
    s.md_digit = t->re_digit ? pcre2_match_data_create_from_pattern(t->re_digit, NULL) : NULL;
    if (!s.md_word || (t->re_digit && !s.md_digit))
        rc = kvc_fail(err, "out of memory");
    for (size_t i = 0; rc == 0 && i < n_frags; i++) {
        if (frags[i].id >= 0)
            enc_emit(&s, frags[i].id);
        else
            rc = enc_text(&s, text + frags[i].off, frags[i].len);
    }
    pcre2_match_data_free(s.md_word);
    pcre2_match_data_free(s.md_digit);
    free(s.sym);
    free(s.heap);
    free(frags);
    return rc == 0 ? s.count : -1;
}

/* ---- decoding and queries ------------------------------------------------------------ */

/* Returns the precomputed decoded bytes of id (NUL-terminated), or NULL out of range. */
const char *kvc_tokenizer_piece(const kvc_tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        if (len)
            *len = 0;
        return NULL;
    }
    if (len)
        *len = t->piece_off[id + 1] - t->piece_off[id] - 1;
    return t->piece + t->piece_off[id];
}

/* Concatenates the pieces of ids[0..n); NULL (and *len = 0) if any id is out of range or
 * memory runs out. */
char *kvc_tokenizer_decode(const kvc_tokenizer *t, const int32_t *ids, int64_t n, size_t *len) {
    size_t total = 0;
    if (len)
        *len = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return NULL;
        total += t->piece_off[ids[i] + 1] - t->piece_off[ids[i]] - 1;
    }
    char *buf = malloc(total + 1);
    if (!buf)
        return NULL;
    size_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        size_t pl;
        const char *p = kvc_tokenizer_piece(t, ids[i], &pl);
        memcpy(buf + o, p, pl);
        o += pl;
    }
    buf[o] = '\0';
    if (len)
        *len = o;
    return buf;
}

/* Trivial accessors: vocabulary size, BOS/EOS ids (-1 when none), add_bos_token (0 if absent). */
int32_t kvc_tokenizer_vocab_size(const kvc_tokenizer *t) { return t->n_vocab; }
int32_t kvc_tokenizer_bos(const kvc_tokenizer *t) { return t->bos; }
int32_t kvc_tokenizer_eos(const kvc_tokenizer *t) { return t->eos; }
int kvc_tokenizer_add_bos(const kvc_tokenizer *t) { return t->add_bos; }

/* Looks up the stored (byte-mapped) text, e.g. "<|im_start|>" or "\xc4\xa0the" for " the". */
int32_t kvc_tokenizer_lookup(const kvc_tokenizer *t, const char *text) {
    return text ? vocab_find(t, text, strlen(text)) : -1;
}
