/* repr_quant.h - helpers shared by the representation plug-ins (codec/repr_*.c, not a public
 * header): one row of C floats quantised per token in groups, packed into bytes as
 * [codes | f16 scales (C/g) | f16 minimums (C/g)], and small option parsing. */
#ifndef KVC_REPR_QUANT_H
#define KVC_REPR_QUANT_H

#include <string.h>

#include "kvc/common.h"

/* Widest row (head_dim or latent) the plug-ins handle; their per-row scratch lives on the
 * stack and is sized by it. */
#define REPR_MAX_DIM 1024

/* n f16 values stored bytewise (possibly unaligned) at src to floats. */
static inline void repr_f16_row(const uint8_t *src, size_t n, float *y) {
    for (size_t j = 0; j < n; j++) {
        uint16_t h;
        memcpy(&h, src + 2 * j, 2);
        y[j] = kvc_f16_to_f32(h);
    }
}

/* Bytes of one packed row: codes for c values at `bits` plus 4 bytes (scale and minimum) per
 * group of g channels. */
size_t kvc_repr_qrow_bytes(int bits, int c, int g);
/* Quantises x (c) into a packed row (kvc_repr_qrow_bytes bytes). c <= REPR_MAX_DIM, g divides c. */
void kvc_repr_qrow_encode(const float *x, int c, int g, int bits, uint8_t *row);
/* Dequantises a packed row into y (c). */
void kvc_repr_qrow_decode(const uint8_t *row, int c, int g, int bits, float *y);
/* Parses a decimal integer in [lo, hi] for option key into *out; -1 with err naming the
 * representation, the option and the range otherwise. */
int kvc_repr_parse_int(const char *repr, const char *key, const char *val, long lo, long hi, long *out, kvc_err *err);

/* Largest common divisor (defaults that must divide a row length). */
int kvc_repr_gcd(int a, int b);

#endif
