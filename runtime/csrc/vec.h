/* Eight-float vectors for the kernels, as GCC/Clang vector extensions rather than intrinsics:
 * they lower to AVX2 (or AVX-512 halves, SSE or NEON pairs) as -march=native allows. The one
 * intrinsic, under __AVX2__, is where GCC's lowering fails (int8_to_float8). */
#ifndef RUNTIME_VEC_H
#define RUNTIME_VEC_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v8 load8(const float *p)
{
    v8 v;
    memcpy(&v, p, sizeof v); /* unaligned: rows of activations need not be aligned */
    return v;
}

static inline __attribute__((always_inline)) void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* Eight int8 as floats. GCC lowers the vector-extension form of this to scalar shifts, so
 * AVX2 gets its one-instruction sign extension; elsewhere the loop is left to the compiler. */
static inline __attribute__((always_inline)) v8 int8_to_float8(const int8_t *p)
{
#if defined(__AVX2__)
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    v8 out;
    for (int i = 0; i < 8; i++) out[i] = (float)p[i];
    return out;
#endif
}

static inline __attribute__((always_inline)) v8 splat8(float s) { return (v8){s, s, s, s, s, s, s, s}; }

/* e^x for x <= 0 (softmax's x - max), eight at a time: Cephes' expf polynomial, within 3e-7
 * relative (5 ulp) of e^x at every float in [-87, 0]. Below -87 it gives e^-87 ~ 1.6e-38, not
 * a subnormal or 0: a weight that small never moves a float sum. Scalar expf (libm's is not
 * vectorised without -ffast-math, which this build must not use) took 35-45% of decode
 * attention. */
static inline __attribute__((always_inline)) v8 exp8_nonpositive(v8 x)
{
    const v8 lo = splat8(-87.0f);
    const v8i below = x < lo;
    x = (v8)(((v8i)x & ~below) | ((v8i)lo & below));
    /* x = n ln2 + r, |r| <= ln2 / 2. n = round(x log2 e), by truncating x log2 e - 1/2 toward
     * zero (x <= 0), as a conversion: the build's -fassociative-math would fold the usual
     * add-and-subtract-2^23 rounding trick away. */
    const v8i n_int = __builtin_convertvector(x * splat8(1.44269504088896341f) - 0.5f, v8i);
    const v8 n = __builtin_convertvector(n_int, v8);
    const v8 r = x - n * splat8(0.693359375f) - n * splat8(-2.12194440e-4f);
    v8 p = splat8(1.9875691500e-4f);
    p = p * r + splat8(1.3981999507e-3f);
    p = p * r + splat8(8.3334519073e-3f);
    p = p * r + splat8(4.1665795894e-2f);
    p = p * r + splat8(1.6666665459e-1f);
    p = p * r + splat8(5.0000001201e-1f);
    p = p * (r * r) + r + splat8(1.0f);
    const v8i two_n = (n_int + 127) << 23; /* 2^n's bits, n >= -126 */
    return p * (v8)two_n;
}

#endif
