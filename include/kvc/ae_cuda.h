/* ae_cuda.h - the CUDA twin of the autoencoder training step in kvc/ae.h: a device copy of an
 * ae_model (parameters, gradients, BatchNorm running stats, Adam moments and step count) that
 * runs kvc_ae_forward_backward / kvc_ae_adam_step on the GPU and copies everything back for the CPU
 * side to checkpoint or export. Present only when KVC_HAVE_CUDA. Letters as in ae.h. */
#ifndef KVC_AE_CUDA_H
#define KVC_AE_CUDA_H

#include "kvc/ae.h"
#include "kvc/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ae_cuda ae_cuda;

/* 1 if a CUDA device can run the trainer; why receives its name or the reason it cannot. */
int kvc_ae_cuda_available(char *why, size_t cap);

/* A device copy of init: every tensor of kvc_ae_tensor_at (parameters and running stats), the Adam
 * moments and the Adam step count. init is only read. NULL with err when there is no device,
 * the config is invalid or an allocation fails. */
ae_cuda *kvc_ae_cuda_new(ae_model *init, kvc_err *err);
void kvc_ae_cuda_free(ae_cuda *g);

/* kvc_ae_forward_backward on the device: training-mode forward of x (n, D) (host memory, copied),
 * loss, backward into the device gradients, BatchNorm running-stat update. loss->w (D, D) and
 * loss->a (M, n) are host pointers, copied. Returns the loss (NaN if x holds a NaN), or NaN
 * with err on a bad argument (as kvc_ae_forward_backward rejects) or a device failure. Device
 * buffers grow to the largest batch seen and are kept. */
float kvc_ae_cuda_forward_backward(ae_cuda *g, const float *x, int n, const ae_loss *loss, kvc_err *err);
/* Global gradient norm of the last backward (before clipping), like kvc_ae_grad_norm; NaN with err
 * on a device failure. */
float kvc_ae_cuda_grad_norm(ae_cuda *g, kvc_err *err);
/* kvc_ae_adam_step on the device, in its operation order: gradients used times
 * min(1, clip / (norm + 1e-6)) (PyTorch clip_grad_norm_; the stored gradients are left
 * unscaled, as on the CPU), AdamW with bias correction, decoupled decay on Linear weights
 * only. 0, or -1 with err. */
int kvc_ae_cuda_adam_step(ae_cuda *g, const ae_adam *o, kvc_err *err);
/* Copies parameters, gradients, running stats, Adam moments and step count into dst, which
 * must have the same config (e.g. the model given to kvc_ae_cuda_new). 0, or -1 with err. */
int kvc_ae_cuda_download(ae_cuda *g, ae_model *dst, kvc_err *err);
/* Adam steps taken so far (the count copied from init plus kvc_ae_cuda_adam_step calls). */
int64_t kvc_ae_cuda_adam_steps(const ae_cuda *g);

/* Single-kernel entry points for the parity tests (host pointers in and out):
 * activation forward y = act(x) and backward dx = dy * act'(x) over n elements; */
int kvc_ae_cuda_test_act(kvc_act act, float leaky_slope, const float *x, const float *dy, int64_t n, float *y, float *dx,
                     kvc_err *err);
/* BatchNorm1d over h (n, c) in training mode: y (n, c), running_mean/var (c) updated in place;
 * then backward of dy (n, c) into dh (n, c), dgamma (c), dbeta (c). */
int kvc_ae_cuda_test_batchnorm(const float *h, const float *gamma, const float *beta, float *running_mean,
                           float *running_var, int n, int c, float eps, float momentum, const float *dy, float *y,
                           float *dh, float *dgamma, float *dbeta, kvc_err *err);

#ifdef __cplusplus
}
#endif
#endif
