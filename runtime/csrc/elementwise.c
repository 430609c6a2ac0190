/* The small per-token operations of a float32 CPU forward, each one pass over its rows:
 * RMSNorm (with the residual add fused in, as vLLM's fused_add_rms_norm), SiLU-and-multiply
 * and rotary embedding (runtime/layers/norm.py, activation.py, rotary.py).
 *
 * In torch each is several operators (RMSNorm on the CPU is a composite of five), and at
 * decode's few rows each operator costs its dispatch, not its arithmetic: 40-110 us a norm
 * against a few us here. Rows are split over OpenMP threads only when there are enough of
 * them (prefill) to pay for waking the threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define PARALLEL_MIN 65536 /* elements below which one thread does the whole call */

/* out[r] = h[r] / rms(h[r]) * weight, h[r] = x[r], or with residual: residual[r] += x[r] and
 * h[r] = the sum (left in residual, as the next layer's residual). In Llama's order: the
 * variance in float32, then h * rsqrt(variance + eps), then * weight. */
void rms_norm_f32(const float *restrict x, int64_t rows, int64_t width, int64_t x_stride,
                  float *restrict residual, /* NULL, or [rows][width] */
                  const float *restrict weight, float eps, float *restrict out, int num_threads)
{
#pragma omp parallel for if (rows * width >= PARALLEL_MIN) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *h = x + r * x_stride;
        if (residual != NULL) {
            float *sum = residual + r * width;
            for (int64_t i = 0; i < width; i++) sum[i] += h[i];
            h = sum;
        }
        float squares = 0.f;
        for (int64_t i = 0; i < width; i++) squares += h[i] * h[i];
        const float inv = 1.f / sqrtf(squares / (float)width + eps);
        float *o = out + r * width;
        for (int64_t i = 0; i < width; i++) o[i] = h[i] * inv * weight[i];
    }
}

/* silu(g) * u over eight lanes: g * sigmoid(g), sigmoid from e^-|g| so the exponent never
 * overflows (g >= 0: 1 / (1 + e^-g); g < 0: e^g / (1 + e^g)). */
static inline __attribute__((always_inline)) v8 silu_mul8(v8 g, v8 u)
{
    const v8i sign = (v8i)splat8(-0.f);
    const v8 e = exp8_nonpositive((v8)((v8i)g | sign)); /* -|g| */
    const v8i negative = g < splat8(0.f);
    const v8 top = (v8)(((v8i)splat8(1.f) & ~negative) | ((v8i)e & negative));
    return g * (top / (splat8(1.f) + e)) * u;
}

/* x [rows][2 * d] (gate columns, then up: the fused gate_up projection's output) -> out
 * [rows][d]. */
void silu_and_mul_f32(const float *restrict x, int64_t rows, int64_t d,
                      float *restrict out, int num_threads)
{
#pragma omp parallel for if (rows * d >= PARALLEL_MIN) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = x + r * 2 * d, *up = gate + d;
        float *o = out + r * d;
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) store8(o + i, silu_mul8(load8(gate + i), load8(up + i)));
        if (i < d) { /* the last d % 8, through zero-padded copies */
            float g[8] = {0}, u[8] = {0}, y[8];
            memcpy(g, gate + i, sizeof(float) * (size_t)(d - i));
            memcpy(u, up + i, sizeof(float) * (size_t)(d - i));
            store8(y, silu_mul8(load8(g), load8(u)));
            memcpy(o + i, y, sizeof(float) * (size_t)(d - i));
        }
    }
}

/* Rotates x [tokens][heads][head_dim] (tokens token_stride apart, heads dense) in place, in
 * Llama's rotate-half form: with half = head_dim / 2 and a = x[i], b = x[i + half],
 * x[i] = a cos[i] - b sin, x[i + half] = b cos[i + half] + a sin. The tables are the rows of
 * the tokens' positions, sin with its first half negated (rotary.py), so both halves are
 * x * cos + partner * sin. */
void rope_f32(float *restrict x, int64_t tokens, int64_t heads, int64_t token_stride,
              int64_t head_dim, const float *restrict cos, const float *restrict sin,
              int num_threads)
{
    const int64_t half = head_dim / 2;
#pragma omp parallel for if (tokens * heads * head_dim >= PARALLEL_MIN) num_threads(num_threads)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * token_stride + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}
