/* h5util.h - HDF5 helpers shared by the KV dataset and codec checkpoint code (private to
 * kvcodec): typed attributes, the IEEE half type, and one error-check macro that names the
 * failing call. Readers are in base/h5read.c (core), writers in data/h5write.c (tools). */
#ifndef KVC_H5UTIL_H
#define KVC_H5UTIL_H

#include <hdf5.h>

#include "kvc/common.h"

/* On a negative HDF5 status: fill err with the message (and the statement) and goto fail. */
#define H5_CHECK(stmt, err, ...)                                                                  \
    do {                                                                                         \
        if ((stmt) < 0) {                                                                        \
            kvc_fail(err, __VA_ARGS__);                                                          \
            goto fail;                                                                           \
        }                                                                                        \
    } while (0)

/* Silences HDF5's own stack printing (we report one line ourselves) and turns off its
 * exit-time cleanup (see h5util.c). Call before any other HDF5 function. */
void kvc_h5_quiet(void);
/* A new IEEE binary16 little-endian float type (close with H5Tclose). */
hid_t kvc_h5_f16_type(void);

int kvc_h5_attr_str(hid_t loc, const char *name, const char *val);
int kvc_h5_attr_i32(hid_t loc, const char *name, int32_t v);
int kvc_h5_attr_i64(hid_t loc, const char *name, int64_t v);
int kvc_h5_attr_f32(hid_t loc, const char *name, float v);
int kvc_h5_attr_f64(hid_t loc, const char *name, double v);
int kvc_h5_attr_i32s(hid_t loc, const char *name, const int32_t *v, int n);
int kvc_h5_attr_f32s(hid_t loc, const char *name, const float *v, int n);

/* Readers return 0, or -1 when the attribute is missing or of another kind. */
int kvc_h5_get_str(hid_t loc, const char *name, char *buf, size_t cap);
int kvc_h5_get_i32(hid_t loc, const char *name, int32_t *v);
int kvc_h5_get_i64(hid_t loc, const char *name, int64_t *v);
int kvc_h5_get_f32(hid_t loc, const char *name, float *v);
int kvc_h5_get_f64(hid_t loc, const char *name, double *v);
/* Reads up to cap ints; returns the count, or -1. */
int kvc_h5_get_i32s(hid_t loc, const char *name, int32_t *v, int cap);
int kvc_h5_get_f32s(hid_t loc, const char *name, float *v, int cap);

/* Rank of dataset `name` with its first (up to 2) dims in dims; -1 if missing or unreadable. */
int kvc_h5_dims(hid_t loc, const char *name, hsize_t dims[2]);
/* Writes a whole f32 dataset of rank 1 or 2 (cols 0 = rank 1). */
int kvc_h5_write_f32(hid_t loc, const char *name, const float *data, hsize_t rows, hsize_t cols);
/* Reads a whole f32 dataset whose shape must be exactly rows x cols (cols 0 = rank 1). */
int kvc_h5_read_f32(hid_t loc, const char *name, float *data, hsize_t rows, hsize_t cols, kvc_err *err);

/* fsyncs a closed file by path and renames tmp over final; -1 with err on failure. */
int kvc_h5_commit_file(const char *tmp, const char *final, kvc_err *err);

#endif
