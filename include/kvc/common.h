/* common.h - the base layer (base/): error reporting, checked allocation, files, UTF-8,
 * half precision, hashing, the seeded random generator and the progress line that every
 * other layer uses. Library code never exits: it fills a kvc_err and returns -1; the CLI
 * prints it. */
#ifndef KVC_COMMON_H
#define KVC_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Which tensor of a layer: keys, values, queries (datasets, codecs and caches share these). */
enum { KV_K = 0, KV_V = 1, KV_Q = 2 };

/* A one-line, human-readable reason for a failure. */
typedef struct {
    char msg[512];
} kvc_err;

/* Formats a message into err (if err is non-NULL) and returns -1, so callers can write
 * `return kvc_fail(err, "bad thing %d", x);`. */
int kvc_fail(kvc_err *err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Seconds since an arbitrary epoch, monotonic. */
double kvc_now(void);

/* Allocation helpers that return NULL on overflow instead of wrapping. */
void *kvc_malloc_array(size_t n, size_t size);
void *kvc_calloc_array(size_t n, size_t size);

/* Reads a whole file into a NUL-terminated buffer; *len receives the byte count. */
int kvc_read_file(const char *path, char **out, size_t *len, kvc_err *err);

/* Returns 1 if buf[0..len) is valid UTF-8 (no overlongs, no surrogates), else 0; on
 * failure *bad_offset receives the offset of the first invalid byte. */
int kvc_utf8_valid(const char *buf, size_t len, size_t *bad_offset);

/* SHA-256 of len bytes as 64 lowercase hex digits plus NUL (base/sha256.c). */
void kvc_sha256_hex(const void *data, size_t len, char out[65]);

/* f16 bits to f32, exact for every input (NaN payloads kept). Inline, because the cache's
 * decode loops call it for every held value at every step: the f16 exponent and mantissa
 * shifted into f32 place and scaled by 2^112 is exact for normal and subnormal values; Inf
 * and NaN get the f32 all-ones exponent. */
static inline float kvc_f16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)(h & 0x7FFFu) << 13, sign = (uint32_t)(h & 0x8000u) << 16;
    float f;
    memcpy(&f, &bits, 4);
    f *= 0x1p112f;
    memcpy(&bits, &f, 4);
    if ((h & 0x7C00u) == 0x7C00u) bits = 0x7F800000u | ((uint32_t)(h & 0x3FFu) << 13);
    bits |= sign;
    memcpy(&f, &bits, 4);
    return f;
}
/* f32 to f16 bits, round to nearest even; overflow to Inf, NaN stays NaN. */
uint16_t kvc_f32_to_f16(float f);
float kvc_bf16_to_f32(uint16_t h);

/* ---- seeded random numbers (base/rng.c): SplitMix64, one generator for every module ---- */
/* The next 64 random bits of the stream *state (advanced). */
uint64_t kvc_rng_next(uint64_t *state);
/* A well-mixed 64-bit value of x alone (one SplitMix64 step from state x): a hash. */
uint64_t kvc_mix64(uint64_t x);
/* Uniform float in [0, 1) with 24 random bits. */
float kvc_rng_unit(uint64_t *state);
/* Uniform integer in [0, n), n > 0, without modulo bias. */
uint64_t kvc_rng_below(uint64_t *state, uint64_t n);

/* ---- progress line on stderr (base/progress.c) ---- */
/* "\rLABEL [#####   ] done/total unit  rate unit/s  ETA mm:ss"; t0 from kvc_now(). */
void kvc_progress_draw(const char *label, double done, double total, const char *unit, double t0);
/* Ends the line. */
void kvc_progress_end(void);

#ifdef __cplusplus
}
#endif
#endif
