/* ops_cpu.c - CPU primitives of the forward pass: GEMM through OpenBLAS, fused
 * dequantize-and-dot matrix-vector products for decode, RMSNorm, RoPE, SwiGLU, softmax. */
#include "kvc/ops.h"

#include "kvc/quant.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KVC_X86 1
#endif
static int g_threads = 1;

void kvc_ops_set_threads(int n) {
    if (n < 1) n = 1;
    g_threads = n;
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

int kvc_ops_get_threads(void) { return g_threads; }

const char *kvc_ops_blas_core(void) { return openblas_get_corename(); }

const char *kvc_ops_blas_better_core(void) {
    const char *core = openblas_get_corename();
    if (!core || strcasecmp(core, "Prescott") != 0) return NULL;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
    return NULL;
}

/* ---- fused dequantize-and-dot for decode ----------------------------------------------
 * Each block format has a plain C version and, on x86-64, AVX2 and AVX-512 versions compiled
 * for those extensions whatever the build's -march; the best one this CPU runs is chosen once
 * (dot_pick), so a portable build still decodes at full speed. The versions sum in different
 * orders: decode logits agree across CPUs to float rounding, not bit for bit. */

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return kvc_f16_to_f32(h);
}

/* Dot of one Q4_1 row (nb blocks) with x; xsum[b] = sum of x over block b.
 * sum_j (q_j d + m) x_j = d sum_j q_j x_j + m xsum. */
static float dot_q4_1_c(const uint8_t *b, const float *x, const float *xsum, int64_t nb) {
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++, b += 20, x += 32) {
        float d = f16_at(b), m = f16_at(b + 2), s = 0.0f;
        for (int j = 0; j < 16; j++) s += (b[4 + j] & 0xF) * x[j] + (b[4 + j] >> 4) * x[j + 16];
        acc += d * s + m * xsum[i];
    }
    return acc;
}

/* Dot of one Q8_0 row (nb blocks) with x. */
static float dot_q8_0_c(const uint8_t *b, const float *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++, b += 34, x += 32) {
        const int8_t *q = (const int8_t *)(b + 2);
        float s = 0.0f;
        for (int j = 0; j < 32; j++) s += q[j] * x[j];
        acc += f16_at(b) * s;
    }
    return acc;
}

#ifdef KVC_X86
#define AVX2_FNS __attribute__((target("avx2,fma,f16c")))
#define AVX512_FNS __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

AVX2_FNS static inline float f16_at_avx2(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

AVX2_FNS static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_FNS static float dot_q4_1_avx2(const uint8_t *b, const float *x, const float *xsum, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    float accm = 0.0f;
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t i = 0; i < nb; i++, b += 20, x += 32) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(b + 4));
        __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x));
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), p);
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16), p);
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), p);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at_avx2(b)), p, acc);
        accm += f16_at_avx2(b + 2) * xsum[i];
    }
    return hsum256(acc) + accm;
}

AVX2_FNS static float dot_q8_0_avx2(const uint8_t *b, const float *x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, b += 34, x += 32) {
        const __m128i *q = (const __m128i *)(b + 2);
        __m128i q0 = _mm_loadu_si128(q), q1 = _mm_loadu_si128(q + 1);
        __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), _mm256_loadu_ps(x));
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), _mm256_loadu_ps(x + 8), p);
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), _mm256_loadu_ps(x + 16), p);
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), _mm256_loadu_ps(x + 24), p);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at_avx2(b)), p, acc);
    }
    return hsum256(acc);
}

AVX512_FNS static float dot_q4_1_avx512(const uint8_t *b, const float *x, const float *xsum, int64_t nb) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float accm = 0.0f;
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t i = 0; i < nb; i++, b += 20, x += 32) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(b + 4));
        __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        __m512 d = _mm512_set1_ps(f16_at_avx2(b));
        __m512 p0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_loadu_ps(x));
        __m512 p1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), _mm512_loadu_ps(x + 16));
        acc0 = _mm512_fmadd_ps(d, p0, acc0);
        acc1 = _mm512_fmadd_ps(d, p1, acc1);
        accm += f16_at_avx2(b + 2) * xsum[i];
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + accm;
}

AVX512_FNS static float dot_q8_0_avx512(const uint8_t *b, const float *x, int64_t nb) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++, b += 34, x += 32) {
        const __m128i *q = (const __m128i *)(b + 2);
        __m512 d = _mm512_set1_ps(f16_at_avx2(b));
        __m512 p0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), _mm512_loadu_ps(x));
        __m512 p1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), _mm512_loadu_ps(x + 16));
        acc0 = _mm512_fmadd_ps(d, p0, acc0);
        acc1 = _mm512_fmadd_ps(d, p1, acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

typedef float (*dot_q4_1_fn)(const uint8_t *, const float *, const float *, int64_t);
typedef float (*dot_q8_0_fn)(const uint8_t *, const float *, int64_t);
static dot_q4_1_fn dot_q4_1 = NULL;
static dot_q8_0_fn dot_q8_0 = NULL;
static const char *dot_isa = "c";

/* Chooses the widest kernel this CPU runs; KVC_CPU_KERNELS=c|avx2|avx512 caps it (for
 * tests and benchmarks). Idempotent, so racing first calls agree. */
static void dot_pick(void) {
    dot_q4_1_fn f4 = dot_q4_1_c;
    dot_q8_0_fn f8 = dot_q8_0_c;
    const char *isa = "c";
#ifdef KVC_X86
    const char *cap = getenv("KVC_CPU_KERNELS");
    int allow512 = !cap || !strcmp(cap, "avx512"), allow2 = allow512 || (cap && !strcmp(cap, "avx2"));
    __builtin_cpu_init();
    if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        f4 = dot_q4_1_avx2, f8 = dot_q8_0_avx2, isa = "avx2";
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && !strcmp(isa, "avx2"))
        f4 = dot_q4_1_avx512, f8 = dot_q8_0_avx512, isa = "avx512";
#endif
    dot_isa = isa;
    dot_q8_0 = f8;
    dot_q4_1 = f4;
}

const char *kvc_ops_cpu_kernels(void) {
    if (!dot_q4_1) dot_pick();
    return dot_isa;
}

int kvc_matvec_quant_cpu(float *y, const float *x, const kvc_matrix *w) {
    if (!dot_q4_1) dot_pick();
    const int64_t rows = w->rows, nb = w->cols / 32;
    if (w->type == GGML_T_Q4_1) {
        float xsum[nb > 0 ? nb : 1];
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += x[b * 32 + j];
            xsum[b] = s;
        }
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            y[r] = dot_q4_1((const uint8_t *)w->q + r * w->row_bytes, x, xsum, nb);
        return 0;
    }
    if (w->type == GGML_T_Q8_0) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++) y[r] = dot_q8_0((const uint8_t *)w->q + r * w->row_bytes, x, nb);
        return 0;
    }
    return -1;
}

void kvc_matmul_cpu(float *y, const float *x, const kvc_matrix *w, int64_t n) {
    if (n == 1 && kvc_matvec_quant_cpu(y, x, w) == 0) return;
    if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)w->rows, (int)w->cols, 1.0f, w->f, (int)w->cols, x, 1, 0.0f, y, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)w->rows, (int)w->cols, 1.0f, x, (int)w->cols,
                w->f, (int)w->cols, 0.0f, y, (int)w->rows);
}

void kvc_rmsnorm_cpu(float *out, const float *x, const float *g, int64_t n, int64_t e, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xr = x + t * e;
        float *o = out + t * e;
        double ss = 0.0;
        for (int64_t i = 0; i < e; i++) ss += (double)xr[i] * xr[i];
        float s = 1.0f / sqrtf((float)(ss / (double)e) + eps);
        for (int64_t i = 0; i < e; i++) o[i] = xr[i] * s * g[i];
    }
}

void kvc_swiglu_cpu(float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = a[i];
        a[i] = v / (1.0f + expf(-v)) * b[i];
    }
}

double kvc_softmax_cpu(float *x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
    return (double)mx + log(sum);
}
