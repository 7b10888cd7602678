/* tc_fit.h - the transform codec trainer's private pieces (train/tc_*.c): sorted calibration
 * coefficients with prefix sums, per-component quantizers for every width, the bit
 * allocation, and the part fitting the closed-loop trainer runs layer by layer. */
#ifndef KVC_TC_FIT_H
#define KVC_TC_FIT_H

#include "kvc/tc.h"
#include "kvc/trainer.h"

/* Coefficient samples of one component, sorted, with prefix sums of values and squares. */
typedef struct {
    float *v;       /* (m) sorted; owned by the caller */
    int64_t m;
    double *p1, *p2; /* (m + 1) */
} tc_sorted;

void tc_sorted_init(tc_sorted *s, float *v, int64_t m);
void tc_sorted_free(tc_sorted *s);

/* One component's quantizer at every width: mse[b] on the samples (b = 0: decoded as 0), the
 * levels of width b at levels + off[b]. */
typedef struct {
    double mse[9];
    double ent[9];     /* entropy of the codes at width b, bits (what an ideal entropy coder needs) */
    int off[9];
    float levels[510]; /* 2 + 4 + ... + 256 */
} tc_widths;

/* Fits widths 1-8 on s: Lloyd-Max (lloyd_max = 1) or a clipped uniform grid. */
void tc_fit_widths(const tc_sorted *s, int lloyd_max, tc_widths *w);
/* Spends budget bits over dim components (0-8 each) where weight[i] * mse falls most;
 * trace (budget + 1) or NULL receives the weighted distortion after each bit. */
void tc_allocate(const tc_widths *w, const double *weight, int dim, int64_t budget, uint8_t *bits, double *trace);

#endif
