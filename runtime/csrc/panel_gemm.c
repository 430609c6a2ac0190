/* The CPU float32 linear layers' matmul (runtime/layers/linear.py: PanelWeight): out = x @ W.T.
 *
 * W [n, k] is packed once, at load, into panels of PANEL output columns: [n / PANEL][k][PANEL]
 * (the last panel zero-padded), so one panel is a contiguous stream of k rows of 16 floats.
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

/* R (a constant once inlined) rows of x against one panel; cols <= PANEL are kept. */
static inline __attribute__((always_inline)) void block(
    const int R, const float *restrict x, int64_t x_stride, int64_t k,
    const float *restrict panel, float *restrict out, int64_t out_stride, int64_t cols)
{
    v8 acc[ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (v8){0};
    for (int64_t i = 0; i < k; i++) {
        const v8 w0 = load8(panel + i * PANEL), w1 = load8(panel + i * PANEL + 8);
        for (int r = 0; r < R; r++) {
            const v8 b = splat8(x[r * x_stride + i]);
            acc[r][0] += b * w0;
            acc[r][1] += b * w1;
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
void panel_gemm_f32(const float *restrict x, int64_t m, int64_t k, int64_t x_stride,
                    const float *restrict panels, int64_t n, float *restrict out, int num_threads)
{
    const int64_t num_panels = (n + PANEL - 1) / PANEL;
    for (int64_t start = 0; start < m; start += CHUNK) {
        const int64_t end = start + CHUNK < m ? start + CHUNK : m;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t p = 0; p < num_panels; p++) {
            const float *panel = panels + p * k * PANEL;
            const int64_t cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
            for (int64_t i = start; i < end; i += ROWS) {
                const float *xi = x + i * x_stride;
                float *o = out + i * n + p * PANEL;
                switch (end - i < ROWS ? end - i : ROWS) {
                case 6: block(6, xi, x_stride, k, panel, o, n, cols); break;
                case 5: block(5, xi, x_stride, k, panel, o, n, cols); break;
                case 4: block(4, xi, x_stride, k, panel, o, n, cols); break;
                case 3: block(3, xi, x_stride, k, panel, o, n, cols); break;
                case 2: block(2, xi, x_stride, k, panel, o, n, cols); break;
                default: block(1, xi, x_stride, k, panel, o, n, cols); break;
                }
            }
        }
    }
}
