/* gguf.h - read-only, validated access to GGUF model files (memory-mapped).
 * Every count, length and offset is checked against the bytes remaining; a malformed
 * file gives an error message, never a crash. Pointers returned aim into the mapping. */
#ifndef KVC_GGUF_H
#define KVC_GGUF_H

#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define GGUF_DEFAULT_ALIGNMENT 32

typedef enum {
    GGUF_VT_UINT8 = 0, GGUF_VT_INT8 = 1, GGUF_VT_UINT16 = 2, GGUF_VT_INT16 = 3,
    GGUF_VT_UINT32 = 4, GGUF_VT_INT32 = 5, GGUF_VT_FLOAT32 = 6, GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8, GGUF_VT_ARRAY = 9, GGUF_VT_UINT64 = 10, GGUF_VT_INT64 = 11,
    GGUF_VT_FLOAT64 = 12, GGUF_VT_COUNT
} gguf_vtype;

/* A length-delimited string inside the mapping (not NUL-terminated). */
typedef struct {
    uint64_t len;
    const char *ptr;
} gguf_str;

/* One metadata key/value pair. For scalars `n` is 1; for arrays it is the element count
 * and `arr_type` the element type. Numeric scalars are also decoded into `num`. */
typedef struct {
    gguf_str key;
    gguf_vtype type;
    gguf_vtype arr_type;   /* valid when type == GGUF_VT_ARRAY */
    uint64_t n;
    const uint8_t *data;   /* raw value bytes (array: first element) */
    const gguf_str *strs;  /* string value (n=1) or string array elements (n); else NULL */
    union {
        uint64_t u;
        int64_t i;
        double f;
    } num;
} gguf_kv;

/* One tensor-info record. ne[0] is the fastest-varying (row length) dimension. */
typedef struct {
    gguf_str name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;         /* ggml type id, see kvc/quant.h */
    uint64_t offset;       /* relative to the data section */
    uint64_t n_elements;
    uint64_t nbytes;
    const void *data;      /* into the mapping */
} gguf_tensor;

typedef struct {
    const uint8_t *map;
    size_t size;
    int fd;
    int owns_map;          /* 1: munmap on close; 0: caller-owned buffer */
    uint32_t version;
    uint64_t n_kv;
    uint64_t n_tensors;
    gguf_kv *kv;
    gguf_tensor *tensors;
    uint64_t alignment;
    uint64_t data_offset;
} gguf_file;

/* Opens and validates a GGUF file; returns NULL with err filled on any problem. */
gguf_file *kvc_gguf_open(const char *path, kvc_err *err);
/* Parses a GGUF image already in memory (not copied; must outlive the result). */
gguf_file *kvc_gguf_open_buffer(const void *buf, size_t size, kvc_err *err);
void kvc_gguf_close(gguf_file *f);

/* Metadata lookup; NULL when absent. */
const gguf_kv *kvc_gguf_find_kv(const gguf_file *f, const char *key);
/* Typed getters: return 0 on success, -1 (with err) if absent or of an incompatible type.
 * Integer getters accept any integer type whose value fits. */
int kvc_gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, kvc_err *err);
int kvc_gguf_get_f32(const gguf_file *f, const char *key, float *out, kvc_err *err);
int kvc_gguf_get_bool(const gguf_file *f, const char *key, int *out, kvc_err *err);
/* Copies a string value into buf (NUL-terminated, truncated to cap). */
int kvc_gguf_get_str(const gguf_file *f, const char *key, char *buf, size_t cap, kvc_err *err);
/* Returns 1 if the string equals the NUL-terminated s. */
int kvc_gguf_str_eq(gguf_str a, const char *s);

const gguf_tensor *kvc_gguf_find_tensor(const gguf_file *f, const char *name);

const char *kvc_gguf_vtype_name(gguf_vtype t);

#ifdef __cplusplus
}
#endif
#endif
