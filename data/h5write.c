/* h5write.c - writing HDF5 files: typed attributes, whole f32 datasets, and the
 * fsync-then-rename step that makes every file we write appear atomically (tools layer:
 * capture, training, checkpoints). */
#include "internal/h5util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

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
