/* gguf.c - a validating, read-only GGUF (v2/v3) reader over a memory mapping.
 * Every count, length and offset is checked against the bytes that remain, so a
 * truncated or corrupt file yields an error message instead of a crash. */
#include "kvc/gguf.h"

#include "kvc/quant.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* A cursor over the mapped bytes. */
typedef struct {
    const uint8_t *p;
    size_t size, pos;
    kvc_err *err;
} rd;

#define MAX_DIMS 4
#define MAX_ARRAY_DEPTH 8

static int rd_need(rd *r, uint64_t n, const char *what) {
    if (n > r->size - r->pos)
        return kvc_fail(r->err, "GGUF truncated: %s needs %llu bytes at offset %zu, only %zu remain",
                        what, (unsigned long long)n, r->pos, r->size - r->pos);
    return 0;
}

static int rd_u32(rd *r, uint32_t *v, const char *what) {
    if (rd_need(r, 4, what)) return -1;
    memcpy(v, r->p + r->pos, 4);
    r->pos += 4;
    return 0;
}

static int rd_u64(rd *r, uint64_t *v, const char *what) {
    if (rd_need(r, 8, what)) return -1;
    memcpy(v, r->p + r->pos, 8);
    r->pos += 8;
    return 0;
}

static int rd_str(rd *r, gguf_str *s, const char *what) {
    uint64_t len;
    if (rd_u64(r, &len, what)) return -1;
    if (rd_need(r, len, what)) return -1;
    s->len = len;
    s->ptr = (const char *)r->p + r->pos;
    r->pos += len;
    return 0;
}

/* Size in bytes of a fixed-size scalar type; 0 for string/array/unknown. */
static size_t vt_size(uint32_t t) {
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16: case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_FLOAT32: return 4;
    case GGUF_VT_UINT64: case GGUF_VT_INT64: case GGUF_VT_FLOAT64: return 8;
    default: return 0;
    }
}

const char *kvc_gguf_vtype_name(gguf_vtype t) {
    static const char *names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                                  "str", "arr", "u64", "i64", "f64"};
    return (unsigned)t < GGUF_VT_COUNT ? names[t] : "?";
}

/* Decodes a fixed-size scalar at p into the kv's num union. */
static void decode_num(gguf_kv *kv, const uint8_t *p) {
    switch (kv->type) {
    case GGUF_VT_UINT8: kv->num.u = p[0]; break;
    case GGUF_VT_BOOL: kv->num.u = p[0] != 0; break;
    case GGUF_VT_INT8: kv->num.i = (int8_t)p[0]; break;
    case GGUF_VT_UINT16: { uint16_t v; memcpy(&v, p, 2); kv->num.u = v; break; }
    case GGUF_VT_INT16: { int16_t v; memcpy(&v, p, 2); kv->num.i = v; break; }
    case GGUF_VT_UINT32: { uint32_t v; memcpy(&v, p, 4); kv->num.u = v; break; }
    case GGUF_VT_INT32: { int32_t v; memcpy(&v, p, 4); kv->num.i = v; break; }
    case GGUF_VT_FLOAT32: { float v; memcpy(&v, p, 4); kv->num.f = v; break; }
    case GGUF_VT_UINT64: { uint64_t v; memcpy(&v, p, 8); kv->num.u = v; break; }
    case GGUF_VT_INT64: { int64_t v; memcpy(&v, p, 8); kv->num.i = v; break; }
    case GGUF_VT_FLOAT64: { double v; memcpy(&v, p, 8); kv->num.f = v; break; }
    default: break;
    }
}

/* Validates and skips one array body (element type and count already read). */
static int skip_array(rd *r, uint32_t et, uint64_t n, int depth) {
    if (depth > MAX_ARRAY_DEPTH) return kvc_fail(r->err, "GGUF array nesting deeper than %d", MAX_ARRAY_DEPTH);
    if (et >= GGUF_VT_COUNT) return kvc_fail(r->err, "GGUF array of unknown value type %u", et);
    size_t es = vt_size(et);
    if (es) {
        if (n > (r->size - r->pos) / es)
            return kvc_fail(r->err, "GGUF truncated: array of %llu x %zu-byte values at offset %zu",
                            (unsigned long long)n, es, r->pos);
        r->pos += n * es;
        return 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        if (et == GGUF_VT_STRING) {
            gguf_str s;
            if (rd_str(r, &s, "array string")) return -1;
        } else { /* nested array */
            uint32_t et2;
            uint64_t n2;
            if (rd_u32(r, &et2, "nested array type") || rd_u64(r, &n2, "nested array count")) return -1;
            if (skip_array(r, et2, n2, depth + 1)) return -1;
        }
    }
    return 0;
}

/* Parses one key/value record into kv. */
static int parse_kv(rd *r, gguf_kv *kv) {
    uint32_t t;
    if (rd_str(r, &kv->key, "metadata key")) return -1;
    if (rd_u32(r, &t, "metadata value type")) return -1;
    if (t >= GGUF_VT_COUNT)
        return kvc_fail(r->err, "GGUF key '%.*s' has unknown value type %u", (int)kv->key.len, kv->key.ptr, t);
    kv->type = (gguf_vtype)t;
    kv->n = 1;
    if (t == GGUF_VT_STRING) {
        gguf_str *s = malloc(sizeof *s);
        if (!s) return kvc_fail(r->err, "out of memory");
        kv->strs = s;
        kv->data = r->p + r->pos;
        return rd_str(r, s, "string value");
    }
    if (t == GGUF_VT_ARRAY) {
        uint32_t et;
        uint64_t n;
        if (rd_u32(r, &et, "array type") || rd_u64(r, &n, "array count")) return -1;
        if (et >= GGUF_VT_COUNT)
            return kvc_fail(r->err, "GGUF key '%.*s': array of unknown value type %u", (int)kv->key.len, kv->key.ptr, et);
        kv->arr_type = (gguf_vtype)et;
        kv->n = n;
        kv->data = r->p + r->pos;
        if (et == GGUF_VT_STRING) {
            /* each string needs at least 8 bytes: bound n before allocating */
            if (n > (r->size - r->pos) / 8)
                return kvc_fail(r->err, "GGUF truncated: key '%.*s' claims %llu strings", (int)kv->key.len,
                                kv->key.ptr, (unsigned long long)n);
            gguf_str *s = kvc_malloc_array(n, sizeof *s);
            if (!s) return kvc_fail(r->err, "out of memory");
            kv->strs = s;
            for (uint64_t i = 0; i < n; i++)
                if (rd_str(r, &s[i], "array string")) return -1;
            return 0;
        }
        return skip_array(r, et, n, 1);
    }
    size_t es = vt_size(t);
    if (rd_need(r, es, "scalar value")) return -1;
    kv->data = r->p + r->pos;
    decode_num(kv, kv->data);
    r->pos += es;
    return 0;
}

/* Parses one tensor-info record (offsets are checked later, once data_offset is known). */
static int parse_tensor(rd *r, gguf_tensor *t) {
    if (rd_str(r, &t->name, "tensor name")) return -1;
    if (rd_u32(r, &t->n_dims, "tensor n_dims")) return -1;
    if (t->n_dims == 0 || t->n_dims > MAX_DIMS)
        return kvc_fail(r->err, "tensor '%.*s' has %u dimensions (1..%d allowed)", (int)t->name.len, t->name.ptr,
                        t->n_dims, MAX_DIMS);
    uint64_t ne = 1;
    for (uint32_t d = 0; d < MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (rd_u64(r, &t->ne[d], "tensor dimension")) return -1;
        if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) || ne > (UINT64_MAX >> 1) / t->ne[d])
            return kvc_fail(r->err, "tensor '%.*s' has an invalid dimension %llu", (int)t->name.len, t->name.ptr,
                            (unsigned long long)t->ne[d]);
        ne *= t->ne[d];
    }
    t->n_elements = ne;
    if (rd_u32(r, &t->type, "tensor type") || rd_u64(r, &t->offset, "tensor offset")) return -1;
    uint32_t be, bb;
    if (kvc_ggml_type_block(t->type, &be, &bb))
        return kvc_fail(r->err, "tensor '%.*s' has unknown type %u", (int)t->name.len, t->name.ptr, t->type);
    if (t->ne[0] % be)
        return kvc_fail(r->err, "tensor '%.*s': row length %llu is not a multiple of the %s block size %u",
                        (int)t->name.len, t->name.ptr, (unsigned long long)t->ne[0], kvc_ggml_type_name(t->type), be);
    t->nbytes = ne / be * bb;
    return 0;
}

static int str_eq2(gguf_str a, gguf_str b) { return a.len == b.len && memcmp(a.ptr, b.ptr, a.len) == 0; }

int kvc_gguf_str_eq(gguf_str a, const char *s) {
    size_t n = strlen(s);
    return a.len == n && memcmp(a.ptr, s, n) == 0;
}

/* Parses the whole header over buf; fills f. */
static int parse_all(gguf_file *f, kvc_err *err) {
    rd r = {f->map, f->size, 0, err};
    uint32_t magic;
    if (f->size < 4) return kvc_fail(err, "not a GGUF file: only %zu bytes", f->size);
    rd_u32(&r, &magic, "magic");
    if (magic != GGUF_MAGIC) return kvc_fail(err, "not a GGUF file: bad magic 0x%08x (expected 'GGUF')", magic);
    if (rd_u32(&r, &f->version, "version")) return -1;
    if (f->version < 2 || f->version > 3)
        return kvc_fail(err, "unsupported GGUF version %u (kvcodec reads versions 2 and 3)", f->version);
    if (rd_u64(&r, &f->n_tensors, "tensor count") || rd_u64(&r, &f->n_kv, "metadata count")) return -1;
    /* every kv needs >= 12 bytes and every tensor info >= 24: reject absurd counts early */
    if (f->n_kv > (f->size - r.pos) / 12 || f->n_tensors > (f->size - r.pos) / 24)
        return kvc_fail(err, "GGUF truncated or corrupt: header claims %llu keys and %llu tensors in %zu bytes",
                        (unsigned long long)f->n_kv, (unsigned long long)f->n_tensors, f->size);
    f->kv = kvc_calloc_array(f->n_kv, sizeof *f->kv);
    f->tensors = kvc_calloc_array(f->n_tensors, sizeof *f->tensors);
    if (!f->kv || !f->tensors) return kvc_fail(err, "out of memory");
    for (uint64_t i = 0; i < f->n_kv; i++) {
        if (parse_kv(&r, &f->kv[i])) return -1;
        for (uint64_t j = 0; j < i; j++)
            if (str_eq2(f->kv[j].key, f->kv[i].key))
                return kvc_fail(err, "GGUF has duplicate metadata key '%.*s'", (int)f->kv[i].key.len, f->kv[i].key.ptr);
    }
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    const gguf_kv *al = kvc_gguf_find_kv(f, "general.alignment");
    if (al) {
        if (al->type != GGUF_VT_UINT32 || al->num.u == 0 || (al->num.u & (al->num.u - 1)))
            return kvc_fail(err, "GGUF general.alignment must be a non-zero power of two u32");
        f->alignment = al->num.u;
    }
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (parse_tensor(&r, &f->tensors[i])) return -1;
    uint64_t data = (r.pos + f->alignment - 1) / f->alignment * f->alignment;
    if (data > f->size && f->n_tensors) return kvc_fail(err, "GGUF truncated: no room for the tensor data section");
    f->data_offset = data;
    uint64_t avail = f->size > data ? f->size - data : 0;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        if (t->offset % f->alignment)
            return kvc_fail(err, "tensor '%.*s' offset %llu is not aligned to %llu", (int)t->name.len, t->name.ptr,
                            (unsigned long long)t->offset, (unsigned long long)f->alignment);
        if (t->offset > avail || t->nbytes > avail - t->offset)
            return kvc_fail(err, "tensor '%.*s' data (offset %llu, %llu bytes) lies beyond the end of the file"
                            " (file truncated?)", (int)t->name.len, t->name.ptr,
                            (unsigned long long)t->offset, (unsigned long long)t->nbytes);
        t->data = f->map + data + t->offset;
        for (uint64_t j = 0; j < i; j++)
            if (str_eq2(f->tensors[j].name, t->name))
                return kvc_fail(err, "GGUF has duplicate tensor '%.*s'", (int)t->name.len, t->name.ptr);
    }
    return 0;
}

gguf_file *kvc_gguf_open_buffer(const void *buf, size_t size, kvc_err *err) {
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) { kvc_fail(err, "out of memory"); return NULL; }
    f->map = buf;
    f->size = size;
    f->fd = -1;
    if (parse_all(f, err)) { kvc_gguf_close(f); return NULL; }
    return f;
}

gguf_file *kvc_gguf_open(const char *path, kvc_err *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) { kvc_fail(err, "cannot open model '%s': %s", path, strerror(errno)); return NULL; }
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        close(fd);
        kvc_fail(err, "'%s' is not a regular file", path);
        return NULL;
    }
    if (st.st_size == 0) { close(fd); kvc_fail(err, "'%s' is empty, not a GGUF file", path); return NULL; }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) { close(fd); kvc_fail(err, "cannot map '%s': %s", path, strerror(errno)); return NULL; }
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) { munmap(map, (size_t)st.st_size); close(fd); kvc_fail(err, "out of memory"); return NULL; }
    f->map = map;
    f->size = (size_t)st.st_size;
    f->fd = fd;
    f->owns_map = 1;
    if (parse_all(f, err)) {
        if (err) {
            char tmp[sizeof err->msg];
            memcpy(tmp, err->msg, sizeof tmp);
            int n = snprintf(err->msg, sizeof err->msg, "%.200s: ", path);
            if (n > 0 && (size_t)n < sizeof err->msg) snprintf(err->msg + n, sizeof err->msg - (size_t)n, "%s", tmp);
        }
        kvc_gguf_close(f);
        return NULL;
    }
    return f;
}

void kvc_gguf_close(gguf_file *f) {
    if (!f) return;
    if (f->kv)
        for (uint64_t i = 0; i < f->n_kv; i++) free((void *)f->kv[i].strs);
    free(f->kv);
    free(f->tensors);
    if (f->owns_map) munmap((void *)f->map, f->size);
    if (f->fd >= 0) close(f->fd);
    free(f);
}

const gguf_kv *kvc_gguf_find_kv(const gguf_file *f, const char *key) {
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (f->kv[i].key.ptr && kvc_gguf_str_eq(f->kv[i].key, key)) return &f->kv[i];
    return NULL;
}

const gguf_tensor *kvc_gguf_find_tensor(const gguf_file *f, const char *name) {
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (kvc_gguf_str_eq(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

static int is_int_type(gguf_vtype t) {
    return t == GGUF_VT_UINT8 || t == GGUF_VT_INT8 || t == GGUF_VT_UINT16 || t == GGUF_VT_INT16 ||
           t == GGUF_VT_UINT32 || t == GGUF_VT_INT32 || t == GGUF_VT_UINT64 || t == GGUF_VT_INT64;
}
static int is_signed(gguf_vtype t) {
    return t == GGUF_VT_INT8 || t == GGUF_VT_INT16 || t == GGUF_VT_INT32 || t == GGUF_VT_INT64;
}

int kvc_gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, kvc_err *err) {
    const gguf_kv *kv = kvc_gguf_find_kv(f, key);
    if (!kv) return kvc_fail(err, "GGUF metadata lacks '%s'", key);
    if (!is_int_type(kv->type)) return kvc_fail(err, "GGUF '%s' is %s, expected an integer", key, kvc_gguf_vtype_name(kv->type));
    if (is_signed(kv->type) ? (kv->num.i < 0 || kv->num.i > (int64_t)UINT32_MAX) : kv->num.u > UINT32_MAX)
        return kvc_fail(err, "GGUF '%s' is out of range", key);
    *out = (uint32_t)(is_signed(kv->type) ? (uint64_t)kv->num.i : kv->num.u);
    return 0;
}

int kvc_gguf_get_f32(const gguf_file *f, const char *key, float *out, kvc_err *err) {
    const gguf_kv *kv = kvc_gguf_find_kv(f, key);
    if (!kv) return kvc_fail(err, "GGUF metadata lacks '%s'", key);
    if (kv->type == GGUF_VT_FLOAT32 || kv->type == GGUF_VT_FLOAT64) *out = (float)kv->num.f;
    else if (is_int_type(kv->type)) *out = is_signed(kv->type) ? (float)kv->num.i : (float)kv->num.u;
    else return kvc_fail(err, "GGUF '%s' is %s, expected a number", key, kvc_gguf_vtype_name(kv->type));
    return 0;
}

int kvc_gguf_get_bool(const gguf_file *f, const char *key, int *out, kvc_err *err) {
    const gguf_kv *kv = kvc_gguf_find_kv(f, key);
    if (!kv) return kvc_fail(err, "GGUF metadata lacks '%s'", key);
    if (kv->type != GGUF_VT_BOOL) return kvc_fail(err, "GGUF '%s' is %s, expected bool", key, kvc_gguf_vtype_name(kv->type));
    *out = (int)kv->num.u;
    return 0;
}

int kvc_gguf_get_str(const gguf_file *f, const char *key, char *buf, size_t cap, kvc_err *err) {
    const gguf_kv *kv = kvc_gguf_find_kv(f, key);
    if (!kv) return kvc_fail(err, "GGUF metadata lacks '%s'", key);
    if (kv->type != GGUF_VT_STRING) return kvc_fail(err, "GGUF '%s' is %s, expected a string", key, kvc_gguf_vtype_name(kv->type));
    if (cap == 0) return 0;
    size_t n = kv->strs[0].len < cap - 1 ? kv->strs[0].len : cap - 1;
    memcpy(buf, kv->strs[0].ptr, n);
    buf[n] = '\0';
    return 0;
}
