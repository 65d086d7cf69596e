/* out[M, N] = x[M, K] @ W[N, K]^T (+ bias) for bfloat16 x and a 4-bit group-wise W in the stored
 * layout of engine/runtime/compression.py, without a dequantised copy of W, on AMX tiles where the
 * CPU has them and on AVX512-BF16 dot products elsewhere. Built and loaded by
 * engine/model/int4_bfloat16.py.
 *
 * W: codes [N, K / G, G / 2] bytes (byte j of a group holds code j in its low nibble and code
 * j + G / 2 in its high one), minimum and step fp16 [N, K / G]. A weight is code * step + minimum in
 * float32 (a multiply then an add: built with -ffp-contract=off), rounded once to bfloat16. Per
 * (feature, group) the 16 possible weights are made once into a table, and the codes pick from it
 * with a permute: no arithmetic per weight. Both paths multiply the same weights.
 *
 * AMX (int4_linear_bf16): the weights are the A operand: a tile is 16 output features x 32 inputs,
 * which is the stored row-major order, so a panel of FEATURES features is dequantised BLOCK_K inputs
 * at a time straight into tile rows (in L1). The activations are the B operand, rearranged once per
 * call into pairs of inputs per token (AMX's layout for B). A tile product adds 32 inputs' products
 * into a 16 x 16 float32 tile (features x tokens). Output (r, n) is the float32 tile element of
 * feature n and token r, accumulated over the inputs 32 at a time in increasing order.
 *
 * AVX512-BF16 (int4_linear_bf16_dot): a panel of DOT_FEATURES features is dequantised DOT_BLOCK_K
 * inputs at a time into plain rows (in L1), and each (token, feature) has its own 16-lane float32
 * accumulator: lane i adds the products of inputs 32 j + 2 i and 32 j + 2 i + 1 (vdpbf16ps), j in
 * increasing order; at the end the 16 lanes are summed in a fixed tree.
 *
 * On both paths the bias is then added in float32 and the sum rounded once to bfloat16 (to nearest,
 * ties to even). Nothing of that depends on M, on the row's place in the call, on its neighbours or
 * on the thread that runs it: a row's bits are the same in every call
 * (tests/engine/test_int4_bfloat16.py).
 */
#if !defined(__AVX512BF16__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "the 4-bit bfloat16 kernel needs AVX512-BF16, AVX512BW and AVX512VL"
#endif

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define STEP 32          /* inputs per tile row, per vdpbf16ps */
#define DOT_FEATURES 4   /* output features per panel of the dot-product path */
#define DOT_TOKENS 4     /* tokens per weight load: 16 zmm accumulators (4 x 4 ran fastest of 8 x 2, 8 x 3, 16 x 1 on Zen4) */
#define DOT_BLOCK_K 2048 /* inputs dequantised at a time: a panel of 4 x 2048 bfloat16 is 16 KiB */

static inline uint16_t bf16_rounded(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* a quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The group `at`'s G weights into dst: weight k of the group (k = 0 .. G - 1) goes to
 * dst[(k / 32) * run_stride + k % 32] (run_stride 32: a plain row; otherwise tile rows). */
static inline void dequantise_group(const uint8_t *codes, const uint16_t *minimum, const uint16_t *step, int64_t at,
                                    int64_t G, uint16_t *dst, int64_t run_stride) {
    static const float iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const __m512 s = _mm512_set1_ps(_cvtsh_ss(step[at])), m = _mm512_set1_ps(_cvtsh_ss(minimum[at]));
    const __m256i table = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(iota), s), m));
    const int64_t half = G / 2;
    const uint8_t *bytes = codes + at * half;
    if (half % 32 == 0) { /* 32 codes per permute: a whole tile row at a time */
        const __m512i wide = _mm512_broadcast_i64x4(table), nibble = _mm512_set1_epi16(0x0F);
        for (int64_t j = 0; j < half; j += 32) {
            const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(bytes + j)));
            const int64_t low = j, high = half + j;
            _mm512_storeu_si512(dst + low / STEP * run_stride, _mm512_permutexvar_epi16(_mm512_and_si512(b, nibble), wide));
            _mm512_storeu_si512(dst + high / STEP * run_stride, _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), wide));
        }
        return;
    }
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    for (int64_t j = 0; j < half; j += 16) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(bytes + j)));
        const int64_t low = j, high = half + j;
        _mm256_storeu_si256((__m256i *)(dst + low / STEP * run_stride + low % STEP),
                            _mm256_permutexvar_epi16(_mm256_and_si256(b, nibble), table));
        _mm256_storeu_si256((__m256i *)(dst + high / STEP * run_stride + high % STEP),
                            _mm256_permutexvar_epi16(_mm256_srli_epi16(b, 4), table));
    }
}


static inline float bf16_float(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The 16 lanes' sum in a fixed tree: halves added pairwise, 16 -> 8 -> 4 -> 2 -> 1. */
static inline float lane_sum(__m512 v) {
    const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

/* The dot-product path (see the top of the file); returns 1 when scratch memory could not be
 * allocated (then nothing was computed). */
int int4_linear_bf16_dot(const uint16_t *x, const uint8_t *codes, const uint16_t *minimum, const uint16_t *step,
                         const uint16_t *bias, uint16_t *out, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G, block = DOT_BLOCK_K / G * G;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *panel = aligned_alloc(64, sizeof(uint16_t) * DOT_FEATURES * (size_t)block);
        __m512 *sums = aligned_alloc(64, sizeof(__m512) * DOT_FEATURES * (size_t)M); /* [M][DOT_FEATURES] lanes */
        const int ready = panel && sums;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += DOT_FEATURES) {
            if (!ready) continue;
            for (int64_t k0 = 0; k0 < K; k0 += block) {
                const int64_t kb = K - k0 < block ? K - k0 : block;
                const int last = k0 + kb == K;
                for (int c = 0; c < DOT_FEATURES; c++)
                    for (int64_t g = k0 / G; g < (k0 + kb) / G; g++)
                        dequantise_group(codes, minimum, step, (n0 + c) * groups + g, G, panel + c * block + g * G - k0, STEP);
                for (int64_t r0 = 0; r0 < M; r0 += DOT_TOKENS) {
                    int64_t row[DOT_TOKENS]; /* past M: the last row again, computed and written twice */
                    __m512 sum[DOT_TOKENS][DOT_FEATURES];
                    for (int t = 0; t < DOT_TOKENS; t++) {
                        row[t] = r0 + t < M ? r0 + t : M - 1;
                        for (int c = 0; c < DOT_FEATURES; c++)
                            sum[t][c] = k0 ? sums[row[t] * DOT_FEATURES + c] : _mm512_setzero_ps();
                    }
                    for (int64_t k = 0; k < kb; k += STEP) {
                        __m512bh v[DOT_TOKENS];
                        for (int t = 0; t < DOT_TOKENS; t++) v[t] = (__m512bh)_mm512_loadu_si512(x + row[t] * K + k0 + k);
                        for (int c = 0; c < DOT_FEATURES; c++) {
                            const __m512bh w = (__m512bh)_mm512_load_si512(panel + c * block + k);
                            for (int t = 0; t < DOT_TOKENS; t++) sum[t][c] = _mm512_dpbf16_ps(sum[t][c], w, v[t]);
                        }
                    }
                    for (int t = 0; t < DOT_TOKENS; t++)
                        for (int c = 0; c < DOT_FEATURES; c++) {
                            if (last)
                                out[row[t] * N + n0 + c] = bf16_rounded(lane_sum(sum[t][c]) + (bias ? bf16_float(bias[n0 + c]) : 0.0f));
                            else
                                sums[row[t] * DOT_FEATURES + c] = sum[t][c];
                        }
                }
            }
        }
        free(panel);
        free(sums);
    }
    return failed;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FEATURES 32   /* output features per panel: two 16-row A tiles */
#define TILE 16       /* rows of a tile; tokens per B tile */
#define BLOCK_K 256   /* inputs dequantised at a time: a panel of 32 x 256 bfloat16 is 16 KiB */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int int4_bf16_has_amx(void) { return 1; }

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* Asks Linux for the AMX tile state for this process; 0 when granted. */
int int4_bf16_enable(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* tiles 0-3: float32 sums (2 feature tiles x 2 token tiles), 4-5: weights, 6-7: activations; all 16 x 64 bytes */
static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = TILE;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* Features n0 .. n0 + 31, inputs k0 .. k0 + kb - 1, as tiles: the tile of step t and feature half a
 * at panel + (t * 2 + a) * 512, row f its feature a * 16 + f's 32 inputs. */
static void dequantise_panel(const uint8_t *codes, const uint16_t *minimum, const uint16_t *step, int64_t K,
                             int64_t G, int64_t n0, int64_t k0, int64_t kb, uint16_t *panel) {
    const int64_t groups = K / G;
    for (int c = 0; c < FEATURES; c++) {
        uint16_t *row = panel + (c / TILE) * TILE * STEP + (c % TILE) * STEP;
        for (int64_t g = k0 / G; g < (k0 + kb) / G; g++)
            dequantise_group(codes, minimum, step, (n0 + c) * groups + g, G, row + (g * G - k0) / STEP * 2 * TILE * STEP,
                             2 * TILE * STEP);
    }
}

/* x [M, K] -> pairs [K / 2, Mp] of 32-bit (x[r, 2p], x[r, 2p + 1]), tokens past M zero. */
static void activation_pairs(const uint16_t *x, int64_t M, int64_t Mp, int64_t K, uint32_t *pairs, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < K / 2; p++) {
        uint32_t *into = pairs + p * Mp;
        for (int64_t r = 0; r < M; r++) into[r] = (uint32_t)x[r * K + 2 * p] | ((uint32_t)x[r * K + 2 * p + 1] << 16);
        for (int64_t r = M; r < Mp; r++) into[r] = 0;
    }
}

/* Returns 1 when scratch memory could not be allocated (then nothing was computed). */
int int4_linear_bf16(const uint16_t *x, const uint8_t *codes, const uint16_t *minimum, const uint16_t *step,
                     const uint16_t *bias, uint16_t *out, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t Mp = (M + TILE - 1) / TILE * TILE, block = BLOCK_K / G * G;
    uint32_t *pairs = aligned_alloc(64, sizeof(uint32_t) * (size_t)(K / 2 * Mp));
    if (!pairs) return 1;
    activation_pairs(x, M, Mp, K, pairs, threads);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *panel = aligned_alloc(64, sizeof(uint16_t) * FEATURES * (size_t)block);
        float *sums = aligned_alloc(64, sizeof(float) * FEATURES * (size_t)Mp); /* tiles [Mp / 16][2] of 16 x 16 */
        const int ready = panel && sums;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        if (ready) configure_tiles();
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += FEATURES) {
            if (!ready) continue;
            for (int64_t k0 = 0; k0 < K; k0 += block) {
                const int64_t kb = K - k0 < block ? K - k0 : block;
                dequantise_panel(codes, minimum, step, K, G, n0, k0, kb, panel);
                for (int64_t r0 = 0; r0 < Mp; r0 += 2 * TILE) {
                    const int both = Mp - r0 > TILE;
                    float *sum = sums + r0 * FEATURES;  /* tile (token tile r0/16, feature half a) at sum + a * 256 (+ 512) */
                    if (k0 == 0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else {
                        _tile_loadd(0, sum, 64); _tile_loadd(1, sum + 256, 64);
                        if (both) { _tile_loadd(2, sum + 512, 64); _tile_loadd(3, sum + 768, 64); }
                    }
                    for (int64_t t = 0; t < kb / STEP; t++) {
                        const uint32_t *b = pairs + (k0 + t * STEP) / 2 * Mp + r0;
                        _tile_loadd(4, panel + t * 2 * TILE * STEP, 64);
                        _tile_loadd(5, panel + t * 2 * TILE * STEP + TILE * STEP, 64);
                        _tile_loadd(6, b, Mp * 4);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 5, 6);
                        if (both) {
                            _tile_loadd(7, b + TILE, Mp * 4);
                            _tile_dpbf16ps(2, 4, 7);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, sum, 64); _tile_stored(1, sum + 256, 64);
                    if (both) { _tile_stored(2, sum + 512, 64); _tile_stored(3, sum + 768, 64); }
                }
            }
            for (int64_t r = 0; r < M; r++) {
                const float *tile = sums + (r / TILE) * TILE * FEATURES;
                for (int c = 0; c < FEATURES; c++) {
                    float total = tile[(c / TILE) * 256 + (c % TILE) * TILE + r % TILE];
                    if (bias) total += bf16_float(bias[n0 + c]);
                    out[r * N + n0 + c] = bf16_rounded(total);
                }
            }
        }
        if (ready) _tile_release();
        free(panel);
        free(sums);
    }
    free(pairs);
    return failed;
}

#else
int int4_bf16_has_amx(void) { return 0; }
#endif

/* The bfloat16 [N, K] matrix W, row-major, with the kernel's weights. */
void int4_dequantise_bf16(const uint8_t *codes, const uint16_t *minimum, const uint16_t *step, uint16_t *out,
                          int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < groups; g++) dequantise_group(codes, minimum, step, n * groups + g, G, out + n * K + g * G, STEP);
}
