/* gguf_build.h - writes small GGUF images in memory for the tests (valid ones, and ones
 * the tests then corrupt), so the reader is exercised without any downloaded model. */
#ifndef KVC_TEST_GGUF_BUILD_H
#define KVC_TEST_GGUF_BUILD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint8_t *p;
    size_t n, cap;
} gbuf;

static inline void gb_put(gbuf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static inline void gb_u32(gbuf *b, uint32_t v) { gb_put(b, &v, 4); }
static inline void gb_u64(gbuf *b, uint64_t v) { gb_put(b, &v, 8); }
static inline void gb_f32(gbuf *b, float v) { gb_put(b, &v, 4); }
static inline void gb_str(gbuf *b, const char *s) {
    gb_u64(b, strlen(s));
    gb_put(b, s, strlen(s));
}
static inline void gb_pad(gbuf *b, size_t align) {
    static const uint8_t z[64] = {0};
    while (b->n % align) gb_put(b, z, 1);
}
/* key with a u32 value */
static inline void gb_kv_u32(gbuf *b, const char *k, uint32_t v) { gb_str(b, k); gb_u32(b, 4); gb_u32(b, v); }
static inline void gb_kv_f32(gbuf *b, const char *k, float v) { gb_str(b, k); gb_u32(b, 6); gb_f32(b, v); }
static inline void gb_kv_str(gbuf *b, const char *k, const char *v) { gb_str(b, k); gb_u32(b, 8); gb_str(b, v); }
static inline void gb_header(gbuf *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    gb_u32(b, 0x46554747u);
    gb_u32(b, version);
    gb_u64(b, n_tensors);
    gb_u64(b, n_kv);
}
/* tensor info: name, 2-D shape, type, offset */
static inline void gb_tensor(gbuf *b, const char *name, uint64_t ne0, uint64_t ne1, uint32_t type, uint64_t off) {
    gb_str(b, name);
    gb_u32(b, ne1 > 1 ? 2 : 1);
    gb_u64(b, ne0);
    if (ne1 > 1) gb_u64(b, ne1);
    gb_u32(b, type);
    gb_u64(b, off);
}

#endif
