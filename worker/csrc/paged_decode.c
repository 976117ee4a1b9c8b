/* Decode attention over the paged KV pools: every decode row of a step, all heads, in one call.
 *
 * The CPU path of worker/paged_decode.py (as vLLM's and SGLang's CPU backends, a small native kernel rather
 * than one framework call per row). Reads each row's keys and values in place through its block table, once,
 * with no gathered copy. Pools are keys [num_blocks, block_size, kv_heads, head_dim] and values
 * [num_blocks, block_size, kv_heads, v_head_dim] (float32 or bfloat16; v_head_dim may differ from head_dim);
 * q is [rows, heads, head_dim] and out [rows, heads, v_head_dim], float32. A head group (heads / kv_heads
 * query heads) shares its KV reads.
 * window > 0 keeps only the last `window` positions (sliding-window layers); sinks (one logit per head, or
 * NULL) join the softmax's denominator only (gpt-oss's attention sinks).
 */
#include "common.h"

/* A run (a block's tokens) is read once from memory; every head of the run's group then takes it from cache,
 * four keys per reduction and the values' sums in registers (vectors as common.h's vec_*). */

/* s[t] = scale * q . k_t for the `count` keys at pool elements base, base + stride, ... */
static inline __attribute__((always_inline)) void key_dots(const float *q, const void *pool, int is_bf16,
                                                           int64_t base, int64_t stride, int count, int d,
                                                           float scale, float *s) {
    int t = 0;
#ifdef VEC_W
    if (d % VEC_W == 0)
        for (; t + 4 <= count; t += 4) {
            vec a0 = vec_zero(), a1 = a0, a2 = a0, a3 = a0;
            const int64_t b = base + (int64_t)t * stride;
            for (int i = 0; i < d; i += VEC_W) {
                const vec qv = vec_loadu(q + i);
                a0 = vec_fma(vec_load_w(pool, is_bf16, b + i), qv, a0);
                a1 = vec_fma(vec_load_w(pool, is_bf16, b + stride + i), qv, a1);
                a2 = vec_fma(vec_load_w(pool, is_bf16, b + 2 * stride + i), qv, a2);
                a3 = vec_fma(vec_load_w(pool, is_bf16, b + 3 * stride + i), qv, a3);
            }
            _mm_storeu_ps(s + t, _mm_mul_ps(vec_sum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
        }
#endif
    for (; t < count; t++) {
        const int64_t off = base + (int64_t)t * stride;
        s[t] = scale * (is_bf16 ? dot_bf16(q, (const uint16_t *)pool + off, d)
                                : dot_f32(q, (const float *)pool + off, d));
    }
}

/* o[:vd] += sum_t p[t] * v_t for the `count` values at pool elements base, base + stride, ... */
static inline __attribute__((always_inline)) void value_sums(const float *p, const void *pool, int is_bf16,
                                                             int64_t base, int64_t stride, int count, int vd,
                                                             float *o) {
    int i = 0;
#ifdef VEC_W
    for (; i + 4 * VEC_W <= vd; i += 4 * VEC_W) {
        vec a0 = vec_loadu(o + i), a1 = vec_loadu(o + i + VEC_W), a2 = vec_loadu(o + i + 2 * VEC_W),
                a3 = vec_loadu(o + i + 3 * VEC_W);
        for (int t = 0; t < count; t++) {
            const vec pv = vec_set1(p[t]);
            const int64_t b = base + (int64_t)t * stride + i;
            a0 = vec_fma(pv, vec_load_w(pool, is_bf16, b), a0);
            a1 = vec_fma(pv, vec_load_w(pool, is_bf16, b + VEC_W), a1);
            a2 = vec_fma(pv, vec_load_w(pool, is_bf16, b + 2 * VEC_W), a2);
            a3 = vec_fma(pv, vec_load_w(pool, is_bf16, b + 3 * VEC_W), a3);
        }
        vec_storeu(o + i, a0), vec_storeu(o + i + VEC_W, a1), vec_storeu(o + i + 2 * VEC_W, a2);
        vec_storeu(o + i + 3 * VEC_W, a3);
    }
    for (; i + VEC_W <= vd; i += VEC_W) {
        vec a = vec_loadu(o + i);
        for (int t = 0; t < count; t++)
            a = vec_fma(vec_set1(p[t]), vec_load_w(pool, is_bf16, base + (int64_t)t * stride + i), a);
        vec_storeu(o + i, a);
    }
#endif
    for (; i < vd; i++) {
        float a = o[i];
        for (int t = 0; t < count; t++) a += p[t] * weight_at(pool, is_bf16, base + (int64_t)t * stride + i);
        o[i] = a;
    }
}

/* Prefetches a run's `count` tokens of `bytes` each from `at`: the next block is elsewhere in the pool, past
 * where the hardware's stream prefetcher looks. */
static inline void prefetch_run(const char *at, int count, int64_t bytes) {
    for (int64_t b = 0; b < (int64_t)count * bytes; b += 64) __builtin_prefetch(at + b, 0, 3);
}

/* The run that starts at position pos: the positions left in its block, up to kv_len (*count), and the pool
 * element of its first token (tokens `stride` elements apart); the next run's block is prefetched. */
static inline __attribute__((always_inline)) int64_t run_at(const void *pool, int elem, const int64_t *blocks,
                                                            int64_t pos, int64_t kv_len, int block_size,
                                                            int64_t stride, int *count) {
    const int64_t in_block = pos % block_size;
    *count = (int)((kv_len - pos < block_size - in_block) ? kv_len - pos : block_size - in_block);
    if (pos + *count < kv_len)
        prefetch_run((const char *)pool + blocks[(pos + *count) / block_size] * block_size * stride * elem,
                     block_size, stride * elem);
    return (blocks[pos / block_size] * block_size + in_block) * stride;
}

static inline __attribute__((always_inline)) void attend(const float *q, const void *k_pool, const void *v_pool,
                                                         int is_bf16, const int64_t *blocks, int64_t kv_len,
                                                         float *out, int heads, int kv_heads, int head_dim,
                                                         int v_head_dim, int block_size, float scale,
                                                         int64_t window, const float *sinks, float *scores) {
    const int group = heads / kv_heads;
    const int64_t first = (window > 0 && kv_len > window) ? kv_len - window : 0;
    const int64_t n = kv_len - first;
    const int64_t token_stride = (int64_t)kv_heads * head_dim;
    const int64_t v_token_stride = (int64_t)kv_heads * v_head_dim;
    const int elem = is_bf16 ? 2 : 4;
    /* Runs: the positions of one block, so a run's keys (values) are token_stride apart. scores[head * n + t]. */
    for (int64_t pos = first; pos < kv_len;) {
        int count;
        const int64_t base = run_at(k_pool, elem, blocks, pos, kv_len, block_size, token_stride, &count);
        for (int head = 0; head < heads; head++)
            key_dots(q + (int64_t)head * head_dim, k_pool, is_bf16, base + (int64_t)(head / group) * head_dim,
                     token_stride, count, head_dim, scale, scores + head * n + (pos - first));
        pos += count;
    }
    for (int head = 0; head < heads; head++) {
        float *s = scores + head * n;
        float m = -INFINITY;
        for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
        if (sinks != NULL && sinks[head] > m) m = sinks[head];
        float sum = sinks != NULL ? expf(sinks[head] - m) : 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < n; t++) s[t] *= inv;
    }
    for (int i = 0; i < heads * v_head_dim; i++) out[i] = 0.0f;
    for (int64_t pos = first; pos < kv_len;) {
        int count;
        const int64_t base = run_at(v_pool, elem, blocks, pos, kv_len, block_size, v_token_stride, &count);
        for (int head = 0; head < heads; head++)
            value_sums(scores + head * n + (pos - first), v_pool, is_bf16, base + (int64_t)(head / group) * v_head_dim,
                       v_token_stride, count, v_head_dim, out + (int64_t)head * v_head_dim);
        pos += count;
    }
}

void qllm_attend_row(const float *q, const void *k_pool, const void *v_pool, int is_bf16,
                     const int64_t *blocks, int64_t kv_len, float *out, int heads, int kv_heads, int head_dim,
                     int v_head_dim, int block_size, float scale, int64_t window, const float *sinks, float *scores) {
    if (is_bf16)
        attend(q, k_pool, v_pool, 1, blocks, kv_len, out, heads, kv_heads, head_dim, v_head_dim, block_size, scale,
               window, sinks, scores);
    else
        attend(q, k_pool, v_pool, 0, blocks, kv_len, out, heads, kv_heads, head_dim, v_head_dim, block_size, scale,
               window, sinks, scores);
}
/* Returns 0, or -1 when scratch memory could not be had. */
int qllm_paged_decode(const float *q, const void *k_pool, const void *v_pool, int is_bf16,
                      const int64_t *block_tables, const int64_t *kv_lens, float *out, int rows, int heads,
                      int kv_heads, int head_dim, int v_head_dim, int block_size, int max_blocks, float scale,
                      int64_t window, const float *sinks, int num_threads) {
    int64_t longest = 1;
    for (int r = 0; r < rows; r++) longest = kv_lens[r] > longest ? kv_lens[r] : longest;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)heads * (size_t)longest);
#pragma omp for schedule(dynamic, 1)
        for (int r = 0; r < rows; r++) {
            if (scores == NULL) {  /* every thread still takes part in the loop, as OpenMP requires */
                failed = 1;
                continue;
            }
            qllm_attend_row(q + (int64_t)r * heads * head_dim, k_pool, v_pool, is_bf16,
                            block_tables + (int64_t)r * max_blocks, kv_lens[r], out + (int64_t)r * heads * v_head_dim,
                            heads, kv_heads, head_dim, v_head_dim, block_size, scale, window, sinks, scores);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
