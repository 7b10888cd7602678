/* h5util.c - typed HDF5 attribute and dataset helpers, the binary16 type, and the
 * fsync-then-rename step that makes every file we write appear atomically. */
#include "h5util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

void kvc_h5_quiet(void) {
    /* HDF5 1.10's exit-time cleanup crashes on a file whose close failed (a full disk); we
     * close every file ourselves, so skip it. Only effective before the library starts. */
    H5dont_atexit();
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

hid_t kvc_h5_f16_type(void) {
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    if (t < 0) return t;
    if (H5Tset_fields(t, 15, 10, 5, 0, 10) < 0 || H5Tset_size(t, 2) < 0 || H5Tset_ebias(t, 15) < 0 ||
        H5Tset_precision(t, 16) < 0) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

/* Writes an attribute of `n` elements (n = 0: scalar) of memory type mt. */
static int attr_write(hid_t loc, const char *name, hid_t ft, hid_t mt, const void *v, int n) {
    hsize_t dims[1] = {(hsize_t)n};
    hid_t sp = n ? H5Screate_simple(1, dims, NULL) : H5Screate(H5S_SCALAR);
    if (sp < 0) return -1;
    if (H5Aexists(loc, name) > 0) H5Adelete(loc, name);
    hid_t a = H5Acreate2(loc, name, ft, sp, H5P_DEFAULT, H5P_DEFAULT);
    int rc = a < 0 ? -1 : (H5Awrite(a, mt, v) < 0 ? -1 : 0);
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    return rc;
}

int kvc_h5_attr_str(hid_t loc, const char *name, const char *val) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, strlen(val) ? strlen(val) : 1);
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    H5Tset_cset(t, H5T_CSET_UTF8);
    int rc = attr_write(loc, name, t, t, strlen(val) ? val : "", 0);
    H5Tclose(t);
    return rc;
}
int kvc_h5_attr_i32(hid_t loc, const char *name, int32_t v) { return attr_write(loc, name, H5T_STD_I32LE, H5T_NATIVE_INT32, &v, 0); }
int kvc_h5_attr_i64(hid_t loc, const char *name, int64_t v) { return attr_write(loc, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, 0); }
int kvc_h5_attr_f32(hid_t loc, const char *name, float v) { return attr_write(loc, name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, &v, 0); }
int kvc_h5_attr_f64(hid_t loc, const char *name, double v) { return attr_write(loc, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v, 0); }
int kvc_h5_attr_i32s(hid_t loc, const char *name, const int32_t *v, int n) {
    return n > 0 ? attr_write(loc, name, H5T_STD_I32LE, H5T_NATIVE_INT32, v, n) : -1;
}
int kvc_h5_attr_f32s(hid_t loc, const char *name, const float *v, int n) {
    return n > 0 ? attr_write(loc, name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, v, n) : -1;
}

/* Opens an attribute if present; returns -1 when missing. */
static hid_t attr_open(hid_t loc, const char *name) {
    if (H5Aexists(loc, name) <= 0) return -1;
    return H5Aopen(loc, name, H5P_DEFAULT);
}

int kvc_h5_get_str(hid_t loc, const char *name, char *buf, size_t cap) {
    hid_t a = attr_open(loc, name);
    if (a < 0) return -1;
    hid_t ft = H5Aget_type(a);
    int rc = -1;
    if (H5Tget_class(ft) == H5T_STRING && !H5Tis_variable_str(ft)) {
        size_t n = H5Tget_size(ft);
        char tmp[4096];
        if (n + 1 < sizeof tmp) {
            hid_t mt = H5Tcopy(H5T_C_S1);
            H5Tset_size(mt, n + 1); /* room for the terminator */
            H5Tset_strpad(mt, H5T_STR_NULLTERM);
            H5Tset_cset(mt, H5Tget_cset(ft));
            if (H5Aread(a, mt, tmp) >= 0) {
                tmp[n] = '\0';
                snprintf(buf, cap, "%s", tmp);
                rc = 0;
            }
            H5Tclose(mt);
        }
    }
    H5Tclose(ft);
    H5Aclose(a);
    return rc;
}

/* Reads a scalar or 1-element numeric attribute converted to memory type mt. */
static int get_scalar(hid_t loc, const char *name, hid_t mt, void *v) {
    hid_t a = attr_open(loc, name);
    if (a < 0) return -1;
    hid_t sp = H5Aget_space(a), ft = H5Aget_type(a);
    int ok = H5Sget_simple_extent_npoints(sp) == 1 &&
             (H5Tget_class(ft) == H5T_INTEGER || H5Tget_class(ft) == H5T_FLOAT);
    int rc = ok && H5Aread(a, mt, v) >= 0 ? 0 : -1;
    H5Tclose(ft);
    H5Sclose(sp);
    H5Aclose(a);
    return rc;
}
int kvc_h5_get_i32(hid_t loc, const char *name, int32_t *v) { return get_scalar(loc, name, H5T_NATIVE_INT32, v); }
int kvc_h5_get_i64(hid_t loc, const char *name, int64_t *v) { return get_scalar(loc, name, H5T_NATIVE_INT64, v); }
int kvc_h5_get_f32(hid_t loc, const char *name, float *v) { return get_scalar(loc, name, H5T_NATIVE_FLOAT, v); }
int kvc_h5_get_f64(hid_t loc, const char *name, double *v) { return get_scalar(loc, name, H5T_NATIVE_DOUBLE, v); }

static int get_array(hid_t loc, const char *name, hid_t mt, void *v, int cap) {
    hid_t a = attr_open(loc, name);
    if (a < 0) return -1;
    hid_t sp = H5Aget_space(a);
    hssize_t n = H5Sget_simple_extent_npoints(sp);
    int rc = -1;
    if (n >= 0 && n <= cap && H5Aread(a, mt, v) >= 0) rc = (int)n;
    H5Sclose(sp);
    H5Aclose(a);
    return rc;
}
int kvc_h5_get_i32s(hid_t loc, const char *name, int32_t *v, int cap) { return get_array(loc, name, H5T_NATIVE_INT32, v, cap); }
int kvc_h5_get_f32s(hid_t loc, const char *name, float *v, int cap) { return get_array(loc, name, H5T_NATIVE_FLOAT, v, cap); }

int kvc_h5_write_f32(hid_t loc, const char *name, const float *data, hsize_t rows, hsize_t cols) {
    hsize_t dims[2] = {rows, cols};
    hid_t sp = H5Screate_simple(cols ? 2 : 1, dims, NULL);
    if (sp < 0) return -1;
    hid_t d = H5Dcreate2(loc, name, H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    int rc = d < 0 ? -1 : (H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0 ? -1 : 0);
    if (d >= 0) H5Dclose(d);
    H5Sclose(sp);
    return rc;
}

int kvc_h5_dims(hid_t loc, const char *name, hsize_t dims[2]) {
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) return -1;
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0) return -1;
    hid_t sp = H5Dget_space(d);
    hsize_t all[8] = {0};
    int rank = H5Sget_simple_extent_ndims(sp);
    if (rank >= 0 && rank <= 8) H5Sget_simple_extent_dims(sp, all, NULL);
    dims[0] = all[0];
    dims[1] = all[1];
    H5Sclose(sp);
    H5Dclose(d);
    return rank;
}

int kvc_h5_read_f32(hid_t loc, const char *name, float *data, hsize_t rows, hsize_t cols, kvc_err *err) {
    hsize_t dims[2] = {0, 0};
    int rank = kvc_h5_dims(loc, name, dims);
    if (rank < 0) return kvc_fail(err, "dataset '%s' is missing or unreadable", name);
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0) return kvc_fail(err, "cannot open dataset '%s'", name);
    int rc = 0;
    if (rank != (cols ? 2 : 1) || dims[0] != rows || (cols && dims[1] != cols))
        rc = kvc_fail(err, "dataset '%s' has shape [%llu, %llu], expected [%llu, %llu]", name,
                      (unsigned long long)dims[0], (unsigned long long)(rank > 1 ? dims[1] : 0),
                      (unsigned long long)rows, (unsigned long long)cols);
    else if (H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
        rc = kvc_fail(err, "cannot read dataset '%s'", name);
    H5Dclose(d);
    return rc;
}

int kvc_h5_commit_file(const char *tmp, const char *final, kvc_err *err) {
    int fd = open(tmp, O_RDONLY);
    if (fd < 0) return kvc_fail(err, "cannot reopen '%s': %s", tmp, strerror(errno));
    if (fsync(fd) != 0) {
        int e = errno;
        close(fd);
        return kvc_fail(err, "cannot sync '%s': %s", tmp, strerror(e));
    }
    close(fd);
    if (rename(tmp, final) != 0) return kvc_fail(err, "cannot rename '%s' to '%s': %s", tmp, final, strerror(errno));
    return 0;
}
