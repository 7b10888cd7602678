/* ops_cpu.c - CPU primitives of the forward pass: GEMM through OpenBLAS, fused
 * dequantize-and-dot matrix-vector products for decode, RMSNorm, RoPE, SwiGLU, softmax. */
#include "kvc/ops.h"

#include "kvc/quant.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>
#include <strings.h>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define KVC_AVX2 1
#endif

static int g_threads = 1;

void ops_set_threads(int n) {
    if (n < 1) n = 1;
    g_threads = n;
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

int ops_get_threads(void) { return g_threads; }

const char *ops_blas_core(void) { return openblas_get_corename(); }

const char *ops_blas_better_core(void) {
    const char *core = openblas_get_corename();
    if (!core || strcasecmp(core, "Prescott") != 0) return NULL;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
    return NULL;
}

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    return kvc_f16_to_f32(h);
#endif
}

#if defined(KVC_AVX2) && !defined(__AVX512F__)
static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Dot of one Q4_1 row (nb blocks) with x; xsum[b] = sum of x over block b.
 * sum_j (q_j d + m) x_j = d sum_j q_j x_j + m xsum. */
static float dot_q4_1(const uint8_t *b, const float *x, const float *xsum, int64_t nb) {
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float accm = 0.0f;
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t i = 0; i < nb; i++, b += 20, x += 32) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(b + 4));
        __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        __m512 d = _mm512_set1_ps(f16_at(b));
        __m512 p0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_loadu_ps(x));
        __m512 p1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), _mm512_loadu_ps(x + 16));
        acc0 = _mm512_fmadd_ps(d, p0, acc0);
        acc1 = _mm512_fmadd_ps(d, p1, acc1);
        accm += f16_at(b + 2) * xsum[i];
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + accm;
#elif defined(KVC_AVX2)
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
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), p, acc);
        accm += f16_at(b + 2) * xsum[i];
    }
    return hsum256(acc) + accm;
#else
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++, b += 20, x += 32) {
        float d = f16_at(b), m = f16_at(b + 2), s = 0.0f;
        for (int j = 0; j < 16; j++) s += (b[4 + j] & 0xF) * x[j] + (b[4 + j] >> 4) * x[j + 16];
        acc += d * s + m * xsum[i];
    }
    return acc;
#endif
}

/* Dot of one Q8_0 row (nb blocks) with x. */
static float dot_q8_0(const uint8_t *b, const float *x, int64_t nb) {
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++, b += 34, x += 32) {
        const __m128i *q = (const __m128i *)(b + 2);
        __m512 d = _mm512_set1_ps(f16_at(b));
        __m512 p0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), _mm512_loadu_ps(x));
        __m512 p1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), _mm512_loadu_ps(x + 16));
        acc0 = _mm512_fmadd_ps(d, p0, acc0);
        acc1 = _mm512_fmadd_ps(d, p1, acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(KVC_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, b += 34, x += 32) {
        const __m128i *q = (const __m128i *)(b + 2);
        __m128i q0 = _mm_loadu_si128(q), q1 = _mm_loadu_si128(q + 1);
        __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), _mm256_loadu_ps(x));
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), _mm256_loadu_ps(x + 8), p);
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), _mm256_loadu_ps(x + 16), p);
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), _mm256_loadu_ps(x + 24), p);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), p, acc);
    }
    return hsum256(acc);
#else
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++, b += 34, x += 32) {
        const int8_t *q = (const int8_t *)(b + 2);
        float s = 0.0f;
        for (int j = 0; j < 32; j++) s += q[j] * x[j];
        acc += f16_at(b) * s;
    }
    return acc;
#endif
}

int matvec_quant_cpu(float *y, const float *x, const kvc_matrix *w) {
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

void matmul_cpu(float *y, const float *x, const kvc_matrix *w, int64_t n) {
    if (n == 1 && matvec_quant_cpu(y, x, w) == 0) return;
    if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)w->rows, (int)w->cols, 1.0f, w->f, (int)w->cols, x, 1, 0.0f, y, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)w->rows, (int)w->cols, 1.0f, x, (int)w->cols,
                w->f, (int)w->cols, 0.0f, y, (int)w->rows);
}

void rmsnorm_cpu(float *out, const float *x, const float *g, int64_t n, int64_t e, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xr = x + t * e;
        float *o = out + t * e;
        double ss = 0.0;
        for (int64_t i = 0; i < e; i++) ss += (double)xr[i] * xr[i];
        float s = 1.0f / sqrtf((float)(ss / (double)e) + eps);
        for (int64_t i = 0; i < e; i++) o[i] = xr[i] * s * g[i];
    }
}

void rope_cpu(float *x, const int32_t *pos, int64_t n, int h, int d, float base) {
    float inv[d / 2 > 0 ? d / 2 : 1];
    for (int i = 0; i < d / 2; i++) inv[i] = powf(base, -2.0f * (float)i / (float)d);
    for (int64_t t = 0; t < n; t++) {
        for (int i = 0; i < d / 2; i++) {
            float th = (float)pos[t] * inv[i];
            float c = cosf(th), s = sinf(th);
            for (int hh = 0; hh < h; hh++) {
                float *v = x + (t * h + hh) * d + 2 * i;
                float a = v[0], b = v[1];
                v[0] = a * c - b * s;
                v[1] = a * s + b * c;
            }
        }
    }
}

void swiglu_cpu(float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = a[i];
        a[i] = v / (1.0f + expf(-v)) * b[i];
    }
}

double softmax_cpu(float *x, int64_t n) {
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
