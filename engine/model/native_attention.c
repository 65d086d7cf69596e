/* Causal softmax attention over the aligned cache layout, one (pair, query) at a time, with every
 * sum in one fixed order: a query's output depends only on its own query, keys and values, never
 * on how many keys or queries share the call. Built and loaded by engine/model/native_attention.py.
 *
 * q [n, S, D] and out [n, S, D] contiguous. Pair p's keys start at keys + offset[p] (its first
 * real position) and follow each other `key_stride` elements apart, each a contiguous row of D;
 * its values are at the same offsets from `values`. So the kernel reads the pair-major aligned
 * layout of a cache in memory (offset p * capacity * D, stride D) and the position-major layout
 * of one read from disk (offset first[p] * n * D + p * D, stride n * D) alike, in place.
 * last [n, S]: the last key each query attends, counted from the pair's first. D is a multiple of
 * LANES.
 *
 * Per query: scores q.k over D in LANES partial sums added in a fixed tree, softmax with expf and a sequential sum over
 * keys, then out = sum over keys of p * v in key order, each of the D outputs its own sequential
 * sum (vectorised across D, which reorders nothing).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8

#define TREE(acc) (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])))

static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

static inline float bf16_load(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t bf16_store(float f) {  /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Softmax of scores[0..last] in place: scores become probabilities. */
static inline void softmax_in_place(float *scores, int64_t last) {
    float top = scores[0];
    for (int64_t c = 1; c <= last; c++) top = scores[c] > top ? scores[c] : top;
    float total = 0.0f;
    for (int64_t c = 0; c <= last; c++) {
        scores[c] = expf(scores[c] - top);
        total += scores[c];
    }
    for (int64_t c = 0; c <= last; c++) scores[c] = scores[c] / total;
}

/* Pairs per tile: one where each pair's keys are contiguous (the aligned layout: one stream per
 * pair is faster there) or a pair has many queries (a prefill: its keys stay in L1 for all of them);
 * else up to 8, fewer where that would leave a thread without pairs. */
static inline int64_t tile_pairs(int64_t n, int64_t S, int64_t key_stride, int64_t D, int threads) {
    if (S > 8 || key_stride == D) return 1;
    int64_t per_thread = (n + threads - 1) / (threads > 0 ? threads : 1);
    return per_thread < 8 ? (per_thread > 0 ? per_thread : 1) : 8;
}

/* One kernel per element type T: loads widen to float, every sum runs in float, stores round back.
 * Pairs go in tiles of `tile`: for each query index s, the tile's scores and then its weighted values
 * run key by key across the tile's pairs, so a position-major cache (a read from disk, the pairs of a
 * position side by side) is read in long runs rather than one 2*D-byte row per pair and key (a
 * decode step reads each key once, straight from memory). Each pair's sums keep their own order
 * (key by key; a dot product in its fixed tree), so the tile changes no bit.
 * Returns 1 when a thread could not allocate its scratch (its pairs were then not computed). */
#define ATTEND(NAME, T, LOAD, STORE)                                                                  \
    static inline float NAME##_dot(const float *a, const T *b, int64_t D) {                          \
        float acc[LANES] = {0};                                                                      \
        for (int64_t i = 0; i < D; i += LANES)                                                       \
            for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * LOAD(b[i + j]);                     \
        return TREE(acc);                                                                            \
    }                                                                                                \
    int NAME(const T *q, const T *keys, const T *values, const int64_t *offset, int64_t key_stride,  \
             const int64_t *pos, T *out, int64_t n, int64_t S, int64_t D, int64_t max_keys,           \
             int threads) {                                                                          \
        int failed = 0;                                                                              \
        const int64_t tile = tile_pairs(n, S, key_stride, D, threads);                              \
        _Pragma("omp parallel num_threads(threads)") {                                               \
            float *scores = malloc(sizeof(float) * (size_t)(max_keys * tile));                       \
            float *acc = malloc(sizeof(float) * (size_t)(D * tile));                                 \
            float *qs = malloc(sizeof(float) * (size_t)(D * tile));                                  \
            int ready = scores && acc && qs;                                                         \
            if (!ready) {                                                                            \
                _Pragma("omp atomic write") failed = 1;                                              \
            }                                                                                        \
            _Pragma("omp for schedule(static)") for (int64_t p0 = 0; p0 < n; p0 += tile) {           \
                if (!ready) continue;                                                                \
                const int64_t m = n - p0 < tile ? n - p0 : tile;                                     \
                for (int64_t s = 0; s < S; s++) {                                                    \
                    int64_t most = 0;                                                                \
                    for (int64_t t = 0; t < m; t++) {                                                \
                        const int64_t p = p0 + t;                                                    \
                        for (int64_t d = 0; d < D; d++) qs[t * D + d] = LOAD(q[(p * S + s) * D + d]); \
                        for (int64_t d = 0; d < D; d++) acc[t * D + d] = 0.0f;                       \
                        most = pos[p * S + s] > most ? pos[p * S + s] : most;                        \
                    }                                                                                \
                    for (int64_t c = 0; c <= most; c++)                                              \
                        for (int64_t t = 0; t < m; t++) {                                            \
                            const int64_t p = p0 + t;                                                \
                            if (c <= pos[p * S + s])                                                 \
                                scores[t * max_keys + c] =                                           \
                                    NAME##_dot(qs + t * D, keys + offset[p] + c * key_stride, D);    \
                        }                                                                            \
                    for (int64_t t = 0; t < m; t++) softmax_in_place(scores + t * max_keys, pos[(p0 + t) * S + s]); \
                    for (int64_t c = 0; c <= most; c++)                                              \
                        for (int64_t t = 0; t < m; t++) {                                            \
                            const int64_t p = p0 + t;                                                \
                            if (c > pos[p * S + s]) continue;                                        \
                            const float w = scores[t * max_keys + c];                                \
                            const T *row = values + offset[p] + c * key_stride;                      \
                            float *a = acc + t * D;                                                  \
                            for (int64_t d = 0; d < D; d++) a[d] += w * LOAD(row[d]);                \
                        }                                                                            \
                    for (int64_t t = 0; t < m; t++)                                                  \
                        for (int64_t d = 0; d < D; d++)                                              \
                            out[((p0 + t) * S + s) * D + d] = STORE(acc[t * D + d]);                 \
                }                                                                                    \
            }                                                                                        \
            free(scores);                                                                            \
            free(acc);                                                                               \
            free(qs);                                                                                \
        }                                                                                            \
        return failed;                                                                               \
    }

ATTEND(attend_f32, float, f32_load, f32_store)
ATTEND(attend_bf16, uint16_t, bf16_load, bf16_store)

/* A decode step's new position of every pair into the aligned layout, keys and values at once:
 * row p of new_keys and new_values (row_bytes each, contiguous) goes to keys + p * pair_bytes +
 * at[p] * row_bytes (and the same in values). One pass over the pairs in parallel: the rows lie a
 * pair's whole capacity apart, each on its own page, so torch's scatter (index_put) paid a TLB
 * miss per pair in a single thread. */
void write_positions(const char *new_keys, const char *new_values, char *keys, char *values, const int64_t *at,
                     int64_t n, int64_t pair_bytes, int64_t row_bytes, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < n; p++) {
        const int64_t to = p * pair_bytes + at[p] * row_bytes;
        memcpy(keys + to, new_keys + p * row_bytes, (size_t)row_bytes);
        memcpy(values + to, new_values + p * row_bytes, (size_t)row_bytes);
    }
}
