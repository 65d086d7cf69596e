/* out[M, N] = x[M, K] @ W[N, K]^T (+ bias) for float32 x and a 4-bit group-wise W in the stored
 * layout of engine/runtime/compression.py, without a dequantised copy of W. Built and loaded by
 * engine/model/int4_float32.py.
 *
 * W: codes [N, K / G, G / 2] bytes (byte j of a group holds code j in its low nibble and code
 * j + G / 2 in its high one), minimum and step fp16 [N, K / G]; a weight is code * step + minimum,
 * a float32 multiply then a float32 add (built with -ffp-contract=off: no FMA there), exactly as
 * compression.dequantize computes it in float32.
 *
 * Work goes in panels of COLS output features. A panel's weights are dequantised BLOCK_K inputs at
 * a time into a small buffer (COLS x BLOCK_K floats, in L1) and every row of the call runs over
 * them: each weight is unpacked once per call, whatever the number of rows.
 *
 * Numbers: output (r, n) is LANES partial sums, lane l summing x[r, k] * w[n, k] over k = l mod LANES
 * in increasing k with one FMA each, then the lanes added in a fixed tree, then the bias. Nothing
 * of that depends on M, on the row's place in the call, on its neighbours or on the thread that
 * runs it: a row's bits are the same in every call (tests/engine/test_int4_float32.py).
 */
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the 4-bit float32 kernel needs AVX2, FMA and F16C"
#endif

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 8
#define COLS 4     /* output features per panel */
#define ROWS 3     /* rows per micro-kernel pass: 12 accumulators, 3 row vectors, 1 weight vector */
#define BLOCK_K 512

/* Weights n0 .. n0 + COLS - 1, inputs k0 .. k0 + kb - 1, into panel[c * kb + k] (kb and k0 whole groups). */
static void dequantise_panel(const uint8_t *codes, const uint16_t *minimum, const uint16_t *step, int64_t K,
                             int64_t G, int64_t n0, int64_t k0, int64_t kb, float *panel) {
    const int64_t groups = K / G, half = G / 2;
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    for (int c = 0; c < COLS; c++) {
        for (int64_t g = k0 / G; g < (k0 + kb) / G; g++) {
            const int64_t at = (n0 + c) * groups + g;
            const __m256 s = _mm256_set1_ps(_cvtsh_ss(step[at]));
            const __m256 m = _mm256_set1_ps(_cvtsh_ss(minimum[at]));
            const uint8_t *bytes = codes + at * half;
            float *into = panel + c * kb + (g * G - k0);
            for (int64_t j = 0; j < half; j += LANES) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + j)));
                const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(b, nibble));
                const __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                _mm256_storeu_ps(into + j, _mm256_add_ps(_mm256_mul_ps(low, s), m));
                _mm256_storeu_ps(into + half + j, _mm256_add_ps(_mm256_mul_ps(high, s), m));
            }
        }
    }
}

/* R (<= ROWS) rows of x from k0 over the panel's kb inputs, accumulating into acc[r][c][LANES]. */
static inline __attribute__((always_inline)) void rows_over_panel(int R, const float *x, int64_t K, int64_t k0,
                                                                  int64_t kb, const float *panel, float *acc,
                                                                  int first) {
    __m256 sum[ROWS][COLS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < COLS; c++)
            sum[r][c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + (r * COLS + c) * LANES);
    for (int64_t k = 0; k < kb; k += LANES) {
        __m256 row[ROWS];
        for (int r = 0; r < R; r++) row[r] = _mm256_loadu_ps(x + r * K + k0 + k);
        for (int c = 0; c < COLS; c++) {
            const __m256 w = _mm256_loadu_ps(panel + c * kb + k);
            for (int r = 0; r < R; r++) sum[r][c] = _mm256_fmadd_ps(row[r], w, sum[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < COLS; c++) _mm256_storeu_ps(acc + (r * COLS + c) * LANES, sum[r][c]);
}

static inline float lanes_added(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* Returns 1 when a thread could not allocate its scratch (its panels were then not computed). */
int int4_linear_f32(const float *x, const uint8_t *codes, const uint16_t *minimum, const uint16_t *step,
                    const float *bias, float *out, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    int failed = 0;
    const int64_t block = BLOCK_K / G * G;
#pragma omp parallel num_threads(threads)
    {
        float *panel = aligned_alloc(64, sizeof(float) * COLS * (size_t)block);
        float *acc = aligned_alloc(64, sizeof(float) * COLS * LANES * (size_t)M);
        const int ready = panel && acc;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += COLS) {
            if (!ready) continue;
            for (int64_t k0 = 0; k0 < K; k0 += block) {
                const int64_t kb = K - k0 < block ? K - k0 : block;
                dequantise_panel(codes, minimum, step, K, G, n0, k0, kb, panel);
                int64_t r = 0;
                for (; r + ROWS <= M; r += ROWS)
                    rows_over_panel(ROWS, x + r * K, K, k0, kb, panel, acc + r * COLS * LANES, k0 == 0);
                if (M - r == 2) rows_over_panel(2, x + r * K, K, k0, kb, panel, acc + r * COLS * LANES, k0 == 0);
                if (M - r == 1) rows_over_panel(1, x + r * K, K, k0, kb, panel, acc + r * COLS * LANES, k0 == 0);
            }
            for (int64_t r = 0; r < M; r++)
                for (int c = 0; c < COLS; c++) {
                    const float total = lanes_added(acc + (r * COLS + c) * LANES);
                    out[r * N + n0 + c] = bias ? total + bias[n0 + c] : total;
                }
        }
        free(panel);
        free(acc);
    }
    return failed;
}

/* The float32 [N, K] matrix W, row-major, from its stored codes (what compression.dequantize gives). */
void int4_dequantise_f32(const uint8_t *codes, const uint16_t *minimum, const uint16_t *step, float *out,
                         int64_t N, int64_t K, int64_t G, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += COLS) dequantise_panel(codes, minimum, step, K, G, n0, 0, K, out + n0 * K);
}
