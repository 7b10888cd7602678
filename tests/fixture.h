/* fixture.h - helpers the tests share: locating fixtures and the model, reading the
 * line-oriented fixture files written by tools/ (lines "key n v1 v2 ..."; '#' = comment). */
#ifndef KVC_TEST_FIXTURE_H
#define KVC_TEST_FIXTURE_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvc/common.h"

/* Path of a fixture file in a static buffer. */
static inline const char *fixture_path(const char *name) {
    static char buf[1024];
    const char *dir = getenv("KVC_FIXTURES");
    snprintf(buf, sizeof buf, "%s/%s", dir && *dir ? dir : KVC_FIXTURE_DIR, name);
    return buf;
}

/* The real model's path, or skips the calling test with a message when it is absent. */
#define REQUIRE_MODEL(path_var)                                                                     \
    const char *path_var = getenv("KVC_MODEL") && *getenv("KVC_MODEL") ? getenv("KVC_MODEL")        \
                                                                       : KVC_MODEL_PATH;            \
    if (access(path_var, R_OK) != 0) cr_skip_test("model not found at %s; run scripts/setup.sh", path_var)

/* Reads a whole fixture file (asserts on failure). */
static inline char *fixture_read(const char *name) {
    char *buf;
    size_t len;
    kvc_err err = {{0}};
    cr_assert_eq(kvc_read_file(fixture_path(name), &buf, &len, &err), 0, "%s", err.msg);
    return buf;
}

/* Parses "key N v0 ... vN-1" starting at line `line` into a malloc'd int array. */
static inline int32_t *parse_ids(const char *line, const char *key, int *n) {
    size_t kl = strlen(key);
    cr_assert(strncmp(line, key, kl) == 0 && line[kl] == ' ', "expected '%s' line", key);
    char *end;
    long cnt = strtol(line + kl, &end, 10);
    int32_t *ids = malloc((size_t)(cnt > 0 ? cnt : 1) * sizeof *ids);
    for (long i = 0; i < cnt; i++) ids[i] = (int32_t)strtol(end, &end, 10);
    *n = (int)cnt;
    return ids;
}

/* Returns the start of the next line after p whose text begins with key (or NULL). */
static inline const char *find_line(const char *p, const char *key) {
    size_t kl = strlen(key);
    while (p && *p) {
        if (strncmp(p, key, kl) == 0) return p;
        p = strchr(p, '\n');
        if (p) p++;
    }
    return NULL;
}

#endif
