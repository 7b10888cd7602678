/* tokenizer.h - byte-level BPE tokenizer built from GGUF metadata (tokenizer.ggml.*).
 * Pre-tokenization follows the reference for the model's `tokenizer.ggml.pre`
 * (for SmolLM2: every digit alone, then the GPT-2 regex), run with PCRE2. */
#ifndef KVC_TOKENIZER_H
#define KVC_TOKENIZER_H

#include "kvc/common.h"
#include "kvc/gguf.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_tokenizer kvc_tokenizer;

/* Builds the tokenizer from a GGUF file's metadata; NULL with err on failure
 * (missing or inconsistent tokenizer.ggml.* keys, unsupported model type). */
kvc_tokenizer *kvc_tokenizer_open(const gguf_file *f, kvc_err *err);
void kvc_tokenizer_free(kvc_tokenizer *t);

/* Encodes len bytes of UTF-8 text. If parse_special is non-zero, occurrences of control
 * tokens' text (e.g. "<|im_start|>") become those tokens. Does not add BOS.
 * Writes up to cap ids into out; returns the total number of tokens the text needs
 * (may exceed cap: call again with a larger buffer), or -1 with err. */
int64_t kvc_tokenizer_encode(const kvc_tokenizer *t, const char *text, size_t len,
                         int parse_special, int32_t *out, int64_t cap, kvc_err *err);

/* The bytes one token stands for (byte-level mapping undone). *len receives the length.
 * Control tokens give their text. Returns NULL for an out-of-range id. */
const char *kvc_tokenizer_piece(const kvc_tokenizer *t, int32_t id, size_t *len);

/* Decodes n ids into a newly allocated NUL-terminated buffer (*len bytes). */
char *kvc_tokenizer_decode(const kvc_tokenizer *t, const int32_t *ids, int64_t n, size_t *len);

int32_t kvc_tokenizer_vocab_size(const kvc_tokenizer *t);
int32_t kvc_tokenizer_bos(const kvc_tokenizer *t); /* -1 when none */
int32_t kvc_tokenizer_eos(const kvc_tokenizer *t); /* -1 when none */
int kvc_tokenizer_add_bos(const kvc_tokenizer *t); /* tokenizer.ggml.add_bos_token */
/* Token id for an exact token text, or -1. */
int32_t kvc_tokenizer_lookup(const kvc_tokenizer *t, const char *text);

#ifdef __cplusplus
}
#endif
#endif
