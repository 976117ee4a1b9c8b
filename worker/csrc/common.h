/* Helpers shared by the kernels in worker/csrc (one library, built by worker/native.py). */
#ifndef QLLM_COMMON_H
#define QLLM_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion (NaN stays NaN). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Dot products over head_dim with 8 independent partial sums, so the compiler vectorises the loop. */
static inline float dot_f32(const float *a, const float *b, int d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

static inline float dot_bf16(const float *a, const uint16_t *b, int d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * bf16_to_f32(b[i + j]);
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < d; i++) s += a[i] * bf16_to_f32(b[i]);
    return s;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 load8(const void *w, int is_bf16, int64_t i) {
    if (is_bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)w + i);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float weight_at(const void *w, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

#define BLOCK 8 /* vectors dotted per pass over a weight row (row_dots' n) */

#if defined(__AVX2__) && defined(__FMA__)
/* One weight row against one vector: four accumulators, so the FMA chains overlap. */
static inline float dots1(const void *w, int is_bf16, int64_t base, int d, const float *x, int *done) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, e = a;
    int i = 0;
    for (; i + 32 <= d; i += 32) {
        a = _mm256_fmadd_ps(load8(w, is_bf16, base + i), _mm256_loadu_ps(x + i), a);
        b = _mm256_fmadd_ps(load8(w, is_bf16, base + i + 8), _mm256_loadu_ps(x + i + 8), b);
        c = _mm256_fmadd_ps(load8(w, is_bf16, base + i + 16), _mm256_loadu_ps(x + i + 16), c);
        e = _mm256_fmadd_ps(load8(w, is_bf16, base + i + 24), _mm256_loadu_ps(x + i + 24), e);
    }
    for (; i + 8 <= d; i += 8) a = _mm256_fmadd_ps(load8(w, is_bf16, base + i), _mm256_loadu_ps(x + i), a);
    *done = i;
    return hsum(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, e)));
}

/* One weight row against four vectors: each weight load feeds four FMAs (accumulators in registers). */
static inline void dots4(const void *w, int is_bf16, int64_t base, int d, const float *const *xs, float *res,
                         int *done) {
    const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 wv = load8(w, is_bf16, base + i);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + i), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + i), a1);
        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + i), a2);
        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + i), a3);
    }
    *done = i;
    res[0] = hsum(a0), res[1] = hsum(a1), res[2] = hsum(a2), res[3] = hsum(a3);
}
#endif

/* res[j] = w[row, :] . xs[j][:] for j < n (n <= BLOCK): the weight row comes from memory once for all n. */
static inline void row_dots(const void *w, int is_bf16, int64_t row, int d, const float *const *xs, int n,
                            float *res) {
    const int64_t base = row * d;
    for (int j = 0; j < n;) {
        int done = 0, m = 1;
#if defined(__AVX2__) && defined(__FMA__)
        if (n - j >= 4) {
            dots4(w, is_bf16, base, d, xs + j, res + j, &done);
            m = 4;
        } else {
            res[j] = dots1(w, is_bf16, base, d, xs[j], &done);
        }
#else
        res[j] = 0.0f;
#endif
        for (int k = j; k < j + m; k++)
            for (int i = done; i < d; i++) res[k] += weight_at(w, is_bf16, base + i) * xs[k][i];
        j += m;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* [a.sum, b.sum, c.sum, d.sum] */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#endif

/* The widest vectors the compiler targets, one name for each operation the kernels use: VEC_W floats in
 * 512-bit registers where it targets AVX-512, 256-bit ones with AVX2 (no VEC_W otherwise). */
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define VEC_W 16
typedef __m512 vec;

static inline __m512 load16(const void *w, int is_bf16, int64_t i) {
    if (is_bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)w + i);
}

/* the two 256-bit halves added */
static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

#define vec_zero() _mm512_setzero_ps()
#define vec_set1(x) _mm512_set1_ps(x)
#define vec_loadu(p) _mm512_loadu_ps(p)
#define vec_storeu(p, v) _mm512_storeu_ps(p, v)
#define vec_load_w(w, is_bf16, i) load16(w, is_bf16, i) /* float32 or bfloat16 weights, KV */
#define vec_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vec_add(a, b) _mm512_add_ps(a, b)
#define vec_sub(a, b) _mm512_sub_ps(a, b)
#define vec_mul(a, b) _mm512_mul_ps(a, b)
#define vec_div(a, b) _mm512_div_ps(a, b)
#define vec_min(a, b) _mm512_min_ps(a, b)
#define vec_max(a, b) _mm512_max_ps(a, b)
#define vec_round(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vec_pow2(y, k) _mm512_scalef_ps(y, k) /* y * 2^k */
#define vec_sum4(a, b, c, d) hsum4(fold512(a), fold512(b), fold512(c), fold512(d)) /* [a.sum, ..., d.sum] */
#elif defined(__AVX2__) && defined(__FMA__)
#define VEC_W 8
typedef __m256 vec;
#define vec_zero() _mm256_setzero_ps()
#define vec_set1(x) _mm256_set1_ps(x)
#define vec_loadu(p) _mm256_loadu_ps(p)
#define vec_storeu(p, v) _mm256_storeu_ps(p, v)
#define vec_load_w(w, is_bf16, i) load8(w, is_bf16, i)
#define vec_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vec_add(a, b) _mm256_add_ps(a, b)
#define vec_sub(a, b) _mm256_sub_ps(a, b)
#define vec_mul(a, b) _mm256_mul_ps(a, b)
#define vec_div(a, b) _mm256_div_ps(a, b)
#define vec_min(a, b) _mm256_min_ps(a, b)
#define vec_max(a, b) _mm256_max_ps(a, b)
#define vec_round(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* y * 2^k for integral k in [-127, 128] (exp's clamp keeps it there; 128 makes inf, the limit exp takes): k
 * into the exponent's bits */
#define vec_pow2(y, k)                                                                                           \
    _mm256_mul_ps(y, _mm256_castsi256_ps(                                                                       \
                         _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23)))
#define vec_sum4(a, b, c, d) hsum4(a, b, c, d)
#endif

#define TILE_ROWS 4 /* weight rows per register tile */
#ifdef VEC_W
/* vectors per register tile: TILE_ROWS * TILE_VECS accumulators + the vectors + a weight, within the 32 zmm
 * (31) or the 16 ymm (15-16). In 512-bit registers twice the vectors: at a prefill's few dozen rows per expert
 * the tile is bound by FMA throughput, not by memory. */
#define TILE_VECS (VEC_W == 16 ? 6 : 3)

/* out[j * ld + q] = w[row0 + q, :] . xs[j][:] for q < TILE_ROWS, j < m (m <= TILE_VECS, a constant after
 * inlining): every weight load feeds m FMAs and every vector load TILE_ROWS, all sums in registers. The next
 * tile's weight rows are prefetched meanwhile: at a few token rows the tile is bound by memory latency. */
static inline __attribute__((always_inline)) void tile_dots(const void *w, int is_bf16, int64_t row0, int d,
                                                            const float *const *xs, int m, float *out,
                                                            int64_t ld) {
    vec acc[TILE_VECS][TILE_ROWS];
    for (int j = 0; j < m; j++)
        for (int q = 0; q < TILE_ROWS; q++) acc[j][q] = vec_zero();
    const int64_t base = row0 * d;
    int i = 0;
    const int elem = is_bf16 ? 2 : 4;
    /* the next tile's rows; past the last tile this names memory after the weight, which a prefetch never reads */
    const char *next = (const char *)w + (base + (int64_t)TILE_ROWS * d) * elem;
    for (; i + VEC_W <= d; i += VEC_W) {
        vec xv[TILE_VECS];
        for (int q = 0; q < TILE_ROWS; q++) _mm_prefetch(next + ((int64_t)q * d + i) * elem, _MM_HINT_T0);
        for (int j = 0; j < m; j++) xv[j] = vec_loadu(xs[j] + i);
        for (int q = 0; q < TILE_ROWS; q++) {
            const vec wv = vec_load_w(w, is_bf16, base + (int64_t)q * d + i);
            for (int j = 0; j < m; j++) acc[j][q] = vec_fma(wv, xv[j], acc[j][q]);
        }
    }
    for (int j = 0; j < m; j++) {
        float s[4];
        _mm_storeu_ps(s, vec_sum4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]));
        for (int q = 0; q < TILE_ROWS; q++) {
            for (int k = i; k < d; k++) s[q] += weight_at(w, is_bf16, base + (int64_t)q * d + k) * xs[j][k];
            out[(int64_t)j * ld + q] = s[q];
        }
    }
}

/* tile_dots with m (1..TILE_VECS) a constant in each branch, so its accumulators stay in registers */
#if TILE_VECS > 3
#define TILE_DOTS_WIDE(is_bf16)                                                                                  \
    case 6: tile_dots(w, is_bf16, row0, d, xs, 6, out, ld); break;                                               \
    case 5: tile_dots(w, is_bf16, row0, d, xs, 5, out, ld); break;                                               \
    case 4: tile_dots(w, is_bf16, row0, d, xs, 4, out, ld); break;
#else
#define TILE_DOTS_WIDE(is_bf16)
#endif
#define TILE_DOTS_DISPATCH(name, is_bf16)                                                                        \
    static void name(const void *w, int64_t row0, int d, const float *const *xs, int m, float *out, int64_t ld) { \
        switch (m) {                                                                                             \
            TILE_DOTS_WIDE(is_bf16)                                                                              \
        case 3: tile_dots(w, is_bf16, row0, d, xs, 3, out, ld); break;                                           \
        case 2: tile_dots(w, is_bf16, row0, d, xs, 2, out, ld); break;                                           \
        default: tile_dots(w, is_bf16, row0, d, xs, 1, out, ld);                                                 \
        }                                                                                                        \
    }
TILE_DOTS_DISPATCH(tile_dots_f32, 0)
TILE_DOTS_DISPATCH(tile_dots_bf16, 1)
#undef TILE_DOTS_DISPATCH
#undef TILE_DOTS_WIDE
#endif

/* out[j * ld + r] = w[r, :] . xs[j][:d] for r < rows, j < n: a small-batch matmul against a weight stored as
 * [rows, d] (as torch's Linear and the experts keep it), so nothing is re-packed. Weight rows are taken
 * TILE_ROWS at a time, read from memory once and then from cache against the vectors TILE_VECS at a time. */
static inline void matmul_rows(const void *w, int is_bf16, int rows, int d, const float *const *xs, int n,
                               float *out, int64_t ld, int num_threads) {
    int first = 0; /* weight rows from here on take row_dots */
#ifdef VEC_W
    /* one vector too: a tile's rows share its loads and their sums are reduced together */
    const int tiles = rows / TILE_ROWS;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int t = 0; t < tiles; t++) {
        const int64_t r0 = (int64_t)t * TILE_ROWS;
        for (int j0 = 0; j0 < n; j0 += TILE_VECS) {
            const int m = n - j0 < TILE_VECS ? n - j0 : TILE_VECS;
            if (is_bf16) tile_dots_bf16(w, r0, d, xs + j0, m, out + (int64_t)j0 * ld + r0, ld);
            else tile_dots_f32(w, r0, d, xs + j0, m, out + (int64_t)j0 * ld + r0, ld);
        }
    }
    first = tiles * TILE_ROWS;
#endif
    for (int r = first; r < rows; r++)
        for (int j0 = 0; j0 < n; j0 += BLOCK) {
            const int m = n - j0 < BLOCK ? n - j0 : BLOCK;
            float res[BLOCK];
            row_dots(w, is_bf16, r, d, xs + j0, m, res);
            for (int j = 0; j < m; j++) out[(int64_t)(j0 + j) * ld + r] = res[j];
        }
}

/* Defined in paged_decode.c / moe_experts.c; decode_layer.c calls them. */
void qllm_attend_row(const float *q, const void *k_pool, const void *v_pool, int is_bf16, const int64_t *blocks,
                     int64_t kv_len, float *out, int heads, int kv_heads, int head_dim, int v_head_dim,
                     int block_size, float scale, int64_t window, const float *sinks, float *scores);
int qllm_moe_experts(const float *x, const int64_t *ids, const float *weights, const void *gate_up,
                     const void *down, int is_bf16, float *out, int tokens, int top_k, int hidden, int inter,
                     int experts, int num_threads);
#endif
