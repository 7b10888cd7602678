/* ae.h - autoencoders along head_dim for one (layer, K|V[, head]) and their training step:
 * forward, loss, backward, AdamW with clipping, a warmup+cosine schedule, inference and
 * export with BatchNorm folded into the weights. The CPU code (train/ae.c) is the reference;
 * train/ae_cuda.cu is its twin. Letters: N rows in a batch, D input (head_dim), H hidden,
 * R latent, M queries for the attention-aware value loss. Row-major throughout. */
#ifndef KVC_AE_H
#define KVC_AE_H

#include "kvc/aenet.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ae_model ae_model;

/* A model with weights initialised from seed (Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
 * weights and biases, as PyTorch does; BatchNorm gamma 1, beta 0, running mean 0, var 1). */
ae_model *kvc_ae_new(const ae_config *c, uint64_t seed, kvc_err *err);
void kvc_ae_free(ae_model *m);
const ae_config *kvc_ae_get_config(const ae_model *m);

/* Every tensor of a model, in a fixed order, with a stable name: parameters
 * ("enc.0.weight" (out, in), "enc.0.bias", "enc.1.weight" (BatchNorm gamma), "enc.1.bias",
 * "dec.*" likewise, indexed as in the PyTorch nn.Sequential of tools/ae_reference.py),
 * then non-trainable state ("*.running_mean", "*.running_var"). */
typedef struct {
    const char *name;
    float *data;
    int rows, cols;    /* cols == 1 for vectors */
    int trainable;
} ae_tensor;
int kvc_ae_n_tensors(const ae_model *m);
ae_tensor kvc_ae_tensor_at(ae_model *m, int i);
/* Gradient of trainable tensor i (same shape), valid after kvc_ae_forward_backward; and the two
 * Adam moments (for checkpoints that resume). NULL data for non-trainable tensors. */
ae_tensor kvc_ae_grad_at(ae_model *m, int i);
ae_tensor kvc_ae_adam_m_at(ae_model *m, int i);
ae_tensor kvc_ae_adam_v_at(ae_model *m, int i);
int64_t kvc_ae_adam_steps(const ae_model *m);
void kvc_ae_set_adam_steps(ae_model *m, int64_t t);

typedef enum { AE_LOSS_MSE = 0, AE_LOSS_KEY_ATTN, AE_LOSS_VALUE_ATTN } ae_loss_kind;

/* Loss of a batch x (N, D) with reconstruction y and error e = y - x:
 *   MSE:        sum_i |e_i|^2 / (N D)
 *   KEY_ATTN:   sum_i e_i^T W e_i / (N D), W (D, D) symmetric PSD, e.g. Q^T Q / |Q| from the
 *               captured queries, so it is the mean squared error of q.k-hat against q.k;
 *   VALUE_ATTN: sum_m |sum_i A[m,i] e_i|^2 / (M D), A (M, N) attention weights of M queries
 *               over the batch rows: the error of the attention-weighted value sum;
 * plus mse_mix * MSE for the attention-aware kinds (keeps directions no query sees). */
typedef struct {
    ae_loss_kind kind;
    const float *w;    /* KEY_ATTN: (D, D) */
    const float *a;    /* VALUE_ATTN: (M, N) */
    int m;             /* M */
    float mse_mix;
} ae_loss;

/* Training-mode forward (BatchNorm uses batch statistics and updates running stats), loss
 * and backward; gradients are overwritten, not accumulated. Returns the loss (NaN if the
 * input holds a NaN). n >= 2 when the model has BatchNorm. With BatchNorm, the biases whose
 * effect it cancels (the Linear before each BatchNorm, and the encoder's last Linear) get an
 * exact 0 gradient rather than rounding noise. Threads: the rows are split over
 * omp_get_max_threads() OpenMP threads (at least 128 rows each), with OpenBLAS set to one
 * thread for the call; called inside a parallel region it runs on the calling thread only. */
float kvc_ae_forward_backward(ae_model *m, const float *x, int n, const ae_loss *loss);
/* Global gradient norm of the last backward. */
float kvc_ae_grad_norm(const ae_model *m);

typedef struct {
    float lr, beta1, beta2, eps, weight_decay; /* AdamW: decoupled decay lr*wd*param */
    float clip;                                /* clip gradients to this global norm; 0: off */
} ae_adam;
void kvc_ae_adam_defaults(ae_adam *o); /* lr 1e-3, 0.9, 0.999, 1e-8, wd 1e-4, clip 1.0 */
/* One AdamW step with bias correction, on the gradients of the last backward. Weight decay
 * applies to Linear weights only (not biases, not BatchNorm). */
void kvc_ae_adam_step(ae_model *m, const ae_adam *o);

/* Learning rate at step t of total: linear warmup from 0 over `warmup` steps, then cosine
 * from base down to min_lr at `total`. */
float kvc_ae_lr_schedule(int64_t t, int64_t total, int64_t warmup, float base, float min_lr);

/* Inference (BatchNorm with running statistics): latent z (N, R) and reconstruction y (N, D);
 * either output may be NULL. */
void kvc_ae_encode(const ae_model *m, const float *x, int n, float *z);
void kvc_ae_decode(const ae_model *m, const float *z, int n, float *y);
/* Relative reconstruction error sqrt(sum |y - x|^2 / sum |x|^2) over x (N, D) in inference mode. */
double kvc_ae_rel_error(const ae_model *m, const float *x, int n);

/* Export: the inference network (kvc/aenet.h) with BatchNorm folded into the Linear before it
 * (W' = diag(g/sqrt(var+eps)) W, b' = (b - mean) g/sqrt(var+eps) + beta), each followed by the
 * activation except the last of each half. */
int kvc_ae_export_folded(const ae_model *m, ae_export *out, kvc_err *err);
#ifdef __cplusplus
}
#endif
#endif
