/* common.h - error reporting and small helpers shared by every kvcodec module.
 * Library code never exits: it fills a kvc_err and returns -1; the CLI prints it. */
#ifndef KVC_COMMON_H
#define KVC_COMMON_H

#include <stddef.h>
#include <stdint.h>

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

/* SHA-256 of len bytes as 64 lowercase hex digits plus NUL (data/sha256.c). */
void kvc_sha256_hex(const void *data, size_t len, char out[65]);

/* f16 / bf16 <-> f32 conversions (round-to-nearest-even on the way down). */
float kvc_f16_to_f32(uint16_t h);
uint16_t kvc_f32_to_f16(float f);
float kvc_bf16_to_f32(uint16_t h);

#ifdef __cplusplus
}
#endif
#endif
