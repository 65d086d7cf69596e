/* Causal softmax attention in bfloat16 on AVX512-BF16, every sum in one fixed order per query: a
 * query's output depends only on its own query, keys and values, never on how many keys, queries
 * or pairs share the call. Built and loaded by engine/model/native_attention.py, which takes it
 * over native_attention.c's bfloat16 kernel where the CPU has AVX512-BF16 (its arguments and
 * layouts are that kernel's).
 *
 * Per query, with L = its last key + 1:
 * - scores: keys go 16 at a time. A key's dot product with the query runs in 16 float32 lanes,
 *   lane i adding the products of dimensions 32 j + 2 i and 32 j + 2 i + 1 (vdpbf16ps), j in
 *   increasing order; then its 16 lanes are added in one fixed tree (`lane_sums`), which sums
 *   16 keys' lanes at once without mixing them. A key past the block's last is a zero vector.
 * - softmax: the maximum (exact in any order); exp(score - max) with one polynomial (`exp_le0`);
 *   their total in 16 lanes, key c in lane c % 16, then the lanes in a fixed tree.
 * - output: out[d] = (sum over keys, in key order, of e[c] * v[c][d]) / total, float32 FMAs, one
 *   rounding to bfloat16 at the end.
 * Nothing of that depends on another query or key, so a prefill's query and a decode step's at the
 * same position give the same bits. The dot products read bfloat16 as stored; the probabilities
 * stay float32.
 */
#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "the bfloat16 attention kernel needs AVX512-BF16 and AVX512BW"
#endif

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KEYS 16 /* keys per score block: one float32 lane each */

/* r[i] = the 16 lanes of a[i] added in a fixed tree, for i = 0 .. 15 (lanes l and l + 8, then
 * l and l + 4, l and l + 2, l and l + 1). */
static inline __m512 lane_sums(const __m512 a[KEYS]) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[i], c[i + 2]), _mm512_unpackhi_ps(c[i], c[i + 2]));
    const __m512 e = _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));
    return _mm512_shuffle_f32x4(e, e, 0xD8); /* 128-bit lanes held keys 0-3, 8-11, 4-7, 12-15 */
}

/* exp(x) for x <= 0 (Cephes' expf polynomial; below -87 it is ~1e-38, never a denormal). */
static inline __m512 exp_le0(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 bf16x16_to_f32(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

static inline uint16_t bf16_rounded(float f) { /* to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* scores[c] for keys c0 .. c0 + count - 1 (count <= KEYS) of one query q (D / 32 vectors). */
static inline void score_block(const __m512bh *q, const uint16_t *keys, const uint16_t *values, int64_t key_stride,
                               int64_t c0, int64_t count, int64_t D, float *scores) {
    __m512 acc[KEYS];
    for (int k = 0; k < KEYS; k++) {
        acc[k] = _mm512_setzero_ps();
        if (k >= count) continue;
        const uint16_t *row = keys + (c0 + k) * key_stride;
        const char *value = (const char *)(values + (c0 + k) * key_stride);
        for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(value + b, _MM_HINT_T1);
        for (int64_t j = 0; j < D / 32; j++)
            acc[k] = _mm512_dpbf16_ps(acc[k], q[j], (__m512bh)_mm512_loadu_si512(row + 32 * j));
    }
    _mm512_storeu_ps(scores + c0, lane_sums(acc));
}

/* Softmax numerators in place over scores[0 .. L - 1] (the row has room for a multiple of KEYS);
 * returns their total. */
static inline float exponentials(float *scores, int64_t L) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < L; c += KEYS) {
        const __mmask16 live = L - c >= KEYS ? 0xFFFF : (__mmask16)((1u << (L - c)) - 1);
        top = _mm512_mask_max_ps(top, live, top, _mm512_loadu_ps(scores + c));
    }
    const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t c = 0; c < L; c += KEYS) {
        const __mmask16 live = L - c >= KEYS ? 0xFFFF : (__mmask16)((1u << (L - c)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(live, exp_le0(_mm512_sub_ps(_mm512_loadu_ps(scores + c), most)));
        _mm512_storeu_ps(scores + c, e);
        total = _mm512_add_ps(total, e);
    }
    __m512 one[KEYS];
    one[0] = total;
    for (int k = 1; k < KEYS; k++) one[k] = _mm512_setzero_ps();
    float sums[KEYS];
    _mm512_storeu_ps(sums, lane_sums(one));
    return sums[0];
}

/* sums[i][d] = sum over keys c < length[i], in key order, of weights[i * room + c] * values[c][d], for
 * the Q queries of one pass (D = 16 * V): each value row is converted to float32 once for all of
 * them, and a query's sum skips the keys past its own (a masked FMA leaves it as it was). */
#define WEIGHTED_VALUES(NAME, Q, V)                                                                              \
    static void NAME(const float *weights, int64_t room, const int64_t *length, int64_t most,                   \
                     const uint16_t *values, int64_t key_stride, float *sums) {                                  \
        __m512 acc[Q][V];                                                                                        \
        for (int i = 0; i < Q; i++)                                                                              \
            for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_ps();                                         \
        for (int64_t c = 0; c < most; c++) {                                                                     \
            const uint16_t *row = values + c * key_stride;                                                       \
            __m512 w[Q];                                                                                         \
            __mmask16 live[Q];                                                                                   \
            for (int i = 0; i < Q; i++) {                                                                        \
                live[i] = c < length[i] ? 0xFFFF : 0;                                                            \
                w[i] = _mm512_set1_ps(c < length[i] ? weights[i * room + c] : 0.0f);                             \
            }                                                                                                    \
            for (int j = 0; j < V; j++) {                                                                        \
                const __m512 v = bf16x16_to_f32(row + 16 * j);                                                   \
                for (int i = 0; i < Q; i++) acc[i][j] = _mm512_mask3_fmadd_ps(w[i], v, acc[i][j], live[i]);      \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < Q; i++)                                                                              \
            for (int j = 0; j < V; j++) _mm512_storeu_ps(sums + (i * V + j) * 16, acc[i][j]);                   \
    }

WEIGHTED_VALUES(weighted_values_4x2, 4, 2)
WEIGHTED_VALUES(weighted_values_4x4, 4, 4)
WEIGHTED_VALUES(weighted_values_2x8, 2, 8)
WEIGHTED_VALUES(weighted_values_1x2, 1, 2)
WEIGHTED_VALUES(weighted_values_1x4, 1, 4)
WEIGHTED_VALUES(weighted_values_1x8, 1, 8)
WEIGHTED_VALUES(weighted_values_1x16, 1, 16)

typedef void (*weighted_values_fn)(const float *, int64_t, const int64_t *, int64_t, const uint16_t *, int64_t, float *);

/* The instance for D / 16 vectors per row, several queries per pass or one (a decode step's). */
static weighted_values_fn weighted_values(int64_t vectors, int several) {
    switch (vectors) {
    case 2: return several ? weighted_values_4x2 : weighted_values_1x2;
    case 4: return several ? weighted_values_4x4 : weighted_values_1x4;
    case 8: return several ? weighted_values_2x8 : weighted_values_1x8;
    default: return weighted_values_1x16;
    }
}

/* See native_attention.c's attend_bf16 for the arguments; D is 32, 64, 128 or 256. */
int attend_bf16_avx512(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *offset,
                       int64_t key_stride, const int64_t *pos, uint16_t *out, int64_t n, int64_t S, int64_t D,
                       int64_t max_keys, int threads) {
    if (D != 32 && D != 64 && D != 128 && D != 256) return 2;
    int failed = 0;
    /* Queries per pass: as many as keep their sums in 16 registers (at most 4). */
    const int64_t vectors = D / 16, most_together = vectors <= 4 ? 4 : 16 / vectors;
    const int64_t together = S > 1 ? most_together : 1;
    const weighted_values_fn weigh = weighted_values(vectors, together > 1);
    const int64_t room = (max_keys + KEYS - 1) / KEYS * KEYS;
#pragma omp parallel num_threads(threads)
    {
        float *scores = aligned_alloc(64, sizeof(float) * (size_t)(room * together));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < n; p++) {
            if (!scores) continue;
            const uint16_t *pair_keys = keys + offset[p], *pair_values = values + offset[p];
            for (int64_t s0 = 0; s0 < S; s0 += together) {
                int64_t length[4] = {0, 0, 0, 0}, most = 0;
                float total[4], sums[256];
                for (int64_t i = 0; i < together && s0 + i < S; i++) {
                    const int64_t at = p * S + s0 + i, L = pos[at] + 1;
                    __m512bh query[8];
                    for (int64_t j = 0; j < D / 32; j++) query[j] = (__m512bh)_mm512_loadu_si512(q + at * D + 32 * j);
                    for (int64_t c0 = 0; c0 < L; c0 += KEYS)
                        score_block(query, pair_keys, pair_values, key_stride, c0, L - c0 < KEYS ? L - c0 : KEYS, D,
                                    scores + i * room);
                    total[i] = exponentials(scores + i * room, L);
                    length[i] = L;
                    most = L > most ? L : most;
                }
                weigh(scores, room, length, most, pair_values, key_stride, sums);
                for (int64_t i = 0; i < together && s0 + i < S; i++)
                    for (int64_t d = 0; d < D; d++)
                        out[(p * S + s0 + i) * D + d] = bf16_rounded(sums[i * vectors * 16 + d] / total[i]);
            }
        }
        free(scores);
    }
    return failed;
}
