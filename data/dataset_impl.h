/* dataset_impl.h - the reader's view of an open KV dataset, shared by data/dataset.c (files
 * and reads) and data/batcher.c (shuffled minibatches); private to data/. */
#ifndef KVC_DATASET_IMPL_H
#define KVC_DATASET_IMPL_H

#include "kvc/dataset.h"

#include <hdf5.h>

/* One file of the dataset. */
typedef struct {
    char *path;
    hid_t fid;
    hid_t pos;           /* /positions (N) */
    hid_t *x;            /* x[j*3 + kind]: /layer_LL/{k,v,q} (N, H, D) */
    int n_x;             /* entries of x: this file's stored layers x 3 */
    int half;            /* the layer datasets are the standard f16 type: read raw, convert here */
    hid_t half_type;     /* that type, as the memory type of raw reads */
    int64_t t0, n;       /* global index of row 0, rows */
    int64_t chunk;       /* rows per chunk of the layer datasets (1 when not chunked) */
} kv_file;

struct kvc_dataset {
    kvc_kv_info info;
    int n_files;
    kv_file *f;
    uint16_t *scratch;   /* (scratch_rows, n_head, D) raw f16 staging */
    int64_t scratch_rows;
};

#endif
