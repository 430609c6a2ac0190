/* The CPU linear layers' matmul, out = x @ W.T, for float32 weights (runtime/layers/linear.py:
 * PanelWeight) and int8 ones (runtime/quantization.py: Int8Weight on the CPU).
 *
 * W [n, k] is packed once, at load, into panels of PANEL output columns: [n / PANEL][k][PANEL]
 * (the last panel zero-padded), so one panel is a contiguous stream of k rows of 16 weights.
 * Each (6-row block of x, panel) pair keeps its 6 x 16 outputs in 12 vector registers for the
 * whole k loop, the classic register-blocked GEMM micro-kernel: per k, two vector loads of W,
 * six broadcasts of x, twelve FMAs. The panel (k * 64 bytes) stays in L1/L2 while every row
 * block of a 48-row chunk passes over it, so W is read from memory once per chunk.
 *
 * Why not MKL, which torch calls: at decode's few rows MKL's sgemm repacks W on every call,
 * which costs what the multiply itself should; packed once here, 4 rows cost 3-6x less and 32
 * rows 1.7-2x less, and the large-row prefill case is no slower (benchmarks/cpu_matmul.py).
 *
 * Every output row is the same sequence of FMAs over k whatever the other rows are, so a
 * row's result does not depend on the batch around it.
 *
 * Work is split over OpenMP threads by panel (libgomp is torch's own: the process has one
 * runtime).
 */
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define PANEL 16
#define ROWS 6   /* rows of x per register block: 12 accumulators + 2 W + 1 broadcast <= 16 */
#define CHUNK 48 /* rows of x per pass over the panels: a chunk of x stays in L2 */

/* One k row of a panel as two 8-float vectors: float32 panels as they are, int8 ones
 * converted (the scale is applied once, to the sums). */
static inline __attribute__((always_inline)) void panel_row(const int INT8, const void *panel,
                                                            int64_t i, v8 *w0, v8 *w1)
{
    if (INT8) {
        const int8_t *row = (const int8_t *)panel + i * PANEL;
        *w0 = int8_to_float8(row);
        *w1 = int8_to_float8(row + 8);
    } else {
        const float *row = (const float *)panel + i * PANEL;
        *w0 = load8(row);
        *w1 = load8(row + 8);
    }
}

/* R (a constant once inlined) rows of x against one panel; cols <= PANEL are kept. scale:
 * NULL, or the panel's PANEL per-column scales (int8). */
static inline __attribute__((always_inline)) void block(
    const int R, const int INT8, const float *restrict x, int64_t x_stride, int64_t k,
    const void *restrict panel, const float *restrict scale, float *restrict out,
    int64_t out_stride, int64_t cols)
{
    v8 acc[ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (v8){0};
    for (int64_t i = 0; i < k; i++) {
        v8 w0, w1;
        panel_row(INT8, panel, i, &w0, &w1);
        for (int r = 0; r < R; r++) {
            const v8 b = splat8(x[r * x_stride + i]);
            acc[r][0] += b * w0;
            acc[r][1] += b * w1;
        }
    }
    if (scale != NULL) {
        const v8 s0 = load8(scale), s1 = load8(scale + 8);
        for (int r = 0; r < R; r++) {
            acc[r][0] *= s0;
            acc[r][1] *= s1;
        }
    }
    for (int r = 0; r < R; r++) {
        float *o = out + r * out_stride;
        if (cols == PANEL) {
            store8(o, acc[r][0]);
            store8(o + 8, acc[r][1]);
        } else { /* the last panel of an n that is not a multiple of PANEL */
            float tmp[PANEL];
            store8(tmp, acc[r][0]);
            store8(tmp + 8, acc[r][1]);
            memcpy(o, tmp, sizeof(float) * (size_t)cols);
        }
    }
}

/* out [m][n] (contiguous) = x [m][k] (rows x_stride apart) @ W.T, W given as its panels. */
static inline __attribute__((always_inline)) void gemm(
    const int INT8, const float *restrict x, int64_t m, int64_t k, int64_t x_stride,
    const void *restrict panels, const float *restrict scales, int64_t n, float *restrict out,
    int num_threads)
{
    const int64_t num_panels = (n + PANEL - 1) / PANEL;
    const size_t panel_bytes = (size_t)(k * PANEL) * (INT8 ? sizeof(int8_t) : sizeof(float));
    for (int64_t start = 0; start < m; start += CHUNK) {
        const int64_t end = start + CHUNK < m ? start + CHUNK : m;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t p = 0; p < num_panels; p++) {
            const void *panel = (const char *)panels + (size_t)p * panel_bytes;
            const float *scale = scales == NULL ? NULL : scales + p * PANEL;
            const int64_t cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
            for (int64_t i = start; i < end; i += ROWS) {
                const float *xi = x + i * x_stride;
                float *o = out + i * n + p * PANEL;
#define BLOCK(R) block(R, INT8, xi, x_stride, k, panel, scale, o, n, cols)
                switch (end - i < ROWS ? end - i : ROWS) {
                case 6: BLOCK(6); break;
                case 5: BLOCK(5); break;
                case 4: BLOCK(4); break;
                case 3: BLOCK(3); break;
                case 2: BLOCK(2); break;
                default: BLOCK(1); break;
                }
#undef BLOCK
            }
        }
    }
}

void panel_gemm_f32(const float *restrict x, int64_t m, int64_t k, int64_t x_stride,
                    const float *restrict panels, int64_t n, float *restrict out, int num_threads)
{
    gemm(0, x, m, k, x_stride, panels, NULL, n, out, num_threads);
}

/* int8 panels [n / PANEL][k][PANEL] and one float scale per output column (padded to whole
 * panels): out = (x @ Q.T) * scale, Q converted to float as it is read, a quarter of the
 * float32 panels' bytes. */
void panel_gemm_i8(const float *restrict x, int64_t m, int64_t k, int64_t x_stride,
                   const int8_t *restrict panels, const float *restrict scales, int64_t n,
                   float *restrict out, int num_threads)
{
    gemm(1, x, m, k, x_stride, panels, scales, n, out, num_threads);
}
