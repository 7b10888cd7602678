/* h5read.c - reading HDF5 files we wrote (codec checkpoints in the core, KV datasets in
 * the tools): typed attributes, dataset shapes and whole f32 datasets, the IEEE binary16
 * type, and silencing HDF5's own error printing. Writing lives in data/h5write.c, outside
 * the core library. */
#include "internal/h5util.h"

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
