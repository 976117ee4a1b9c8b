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

void qllm_attend_row(const float *q, const void *k_pool, const void *v_pool, int is_bf16,
                     const int64_t *blocks, int64_t kv_len, float *out, int heads, int kv_heads, int head_dim,
                     int v_head_dim, int block_size, float scale, int64_t window, const float *sinks, float *scores) {
    /* Tokens outermost, so each token's keys (then values) of all heads are read once, in memory order;
     * scores[head * n + t]. */
    const int group = heads / kv_heads;
    const int64_t first = (window > 0 && kv_len > window) ? kv_len - window : 0;
    const int64_t n = kv_len - first;
    const int64_t token_stride = (int64_t)kv_heads * head_dim;
    const int64_t v_token_stride = (int64_t)kv_heads * v_head_dim;
    for (int64_t t = 0; t < n; t++) {
        const int64_t pos = first + t;
        const int64_t base = (blocks[pos / block_size] * block_size + pos % block_size) * token_stride;
        for (int head = 0; head < heads; head++) {
            const int64_t off = base + (int64_t)(head / group) * head_dim;
            const float *qh = q + (int64_t)head * head_dim;
            scores[head * n + t] = scale * (is_bf16 ? dot_bf16(qh, (const uint16_t *)k_pool + off, head_dim)
                                                    : dot_f32(qh, (const float *)k_pool + off, head_dim));
        }
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
    for (int64_t t = 0; t < n; t++) {
        const int64_t pos = first + t;
        const int64_t base = (blocks[pos / block_size] * block_size + pos % block_size) * v_token_stride;
        for (int head = 0; head < heads; head++) {
            const int64_t off = base + (int64_t)(head / group) * v_head_dim;
            const float p = scores[head * n + t];
            float *o = out + (int64_t)head * v_head_dim;
            if (is_bf16) {
                const uint16_t *v = (const uint16_t *)v_pool + off;
                for (int i = 0; i < v_head_dim; i++) o[i] += p * bf16_to_f32(v[i]);
            } else {
                const float *v = (const float *)v_pool + off;
                for (int i = 0; i < v_head_dim; i++) o[i] += p * v[i];
            }
        }
    }
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
