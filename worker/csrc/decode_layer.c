/* A decoder layer's two stages for a decode step of a few rows, each in one call (float32 or bfloat16).
 *
 * The CPU path of worker/native_stages.py. A decode step of a small MoE model is a few hundred tiny framework
 * ops per layer (norms, projections, rotary, cache writes, routing), and on a CPU each costs more to dispatch
 * than its arithmetic. These compute the same math as the transformers modules they replace, in the same
 * order per element (sums may round differently), and stop exactly at the layer's two stage boundaries, so a
 * step can still be parked between any two stages.
 *
 * One dtype per call (is_bf16): the residual stream, every weight, norm weight and bias, and the KV pools are
 * all float32 or all bfloat16. Arithmetic is float32 either way; in bfloat16 the stream and the pools are
 * rounded (to nearest even) where they are stored, so intermediates keep more precision than the modules'
 * per-op rounding. cos and sin are float32.
 *
 * qllm_attention_stage: hidden += scale * o_proj(attention(rope(qk_norm(qkv(rms_norm(hidden)))))), with this
 *   step's keys and values written to the pools at their slots first. Rows are decode rows: row t attends its
 *   own context (block_tables[t], kv_lens[t]); rotary in the rotate-half form over the whole head (cos, sin
 *   [rows, head_dim]); q_norm / k_norm (per head, Qwen3) and biases may be NULL.
 * qllm_moe_stage: hidden += scale * experts(rms_norm(hidden)) with softmax top-k routing (renormalised when
 *   norm_topk), as Qwen3-MoE and Mixtral route.
 */
#include "common.h"

static inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

/* In bfloat16 the output is rounded as the module's is (x normalised, rounded, times the weight, rounded), so the
 * projections and the router read what they read there. */
static void rms_norm(const float *x, const void *w, int is_bf16, float eps, int d, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    if (is_bf16)
        for (int i = 0; i < d; i++) out[i] = round_bf16(weight_at(w, 1, i) * round_bf16(x[i] * inv));
    else
        for (int i = 0; i < d; i++) out[i] = weight_at(w, 0, i) * (x[i] * inv);
}

/* out[t * ld_out + r] = w[r, :] . x[t * ld_x :] (+ bias[r]) for r < out_dim, t < rows: weights read once. */
static void project(const void *w, const void *bias, int is_bf16, int in_dim, int out_dim, const float *x, int ld_x,
                    int rows, float *out, int ld_out, int num_threads) {
    const float *xs[rows > 0 ? rows : 1]; /* a decode step's rows: a few hundred at most */
    for (int t = 0; t < rows; t++) xs[t] = x + (int64_t)t * ld_x;
    matmul_rows(w, is_bf16, out_dim, in_dim, xs, rows, out, ld_out, num_threads);
    if (bias)
        for (int t = 0; t < rows; t++)
            for (int r = 0; r < out_dim; r++) out[(int64_t)t * ld_out + r] += weight_at(bias, is_bf16, r);
}

/* n values of a float32 or bfloat16 array as float32: the array itself when it is float32, else `copy` filled. */
static const float *as_f32(const void *src, int is_bf16, int64_t n, float *copy) {
    if (!is_bf16) return (const float *)src;
    for (int64_t i = 0; i < n; i++) copy[i] = bf16_to_f32(((const uint16_t *)src)[i]);
    return copy;
}

/* dst[at + i] = src[i] for i < n, rounded when dst is bfloat16. */
static void store(void *dst, int is_bf16, int64_t at, const float *src, int64_t n) {
    if (is_bf16)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[at + i] = f32_to_bf16(src[i]);
    else
        memcpy((float *)dst + at, src, sizeof(float) * (size_t)n);
}

/* hidden = h + scale * delta over n values, where h is hidden read as float32 (the residual add, in place). */
static void add_residual(void *hidden, int is_bf16, const float *h, const float *delta, float scale, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float sum = h[i] + (scale == 1.0f ? delta[i] : delta[i] * scale);
        if (is_bf16)
            ((uint16_t *)hidden)[i] = f32_to_bf16(sum);
        else
            ((float *)hidden)[i] = sum;
    }
}

/* transformers' apply_rotary_pos_emb on one head: x * cos + rotate_half(x) * sin. */
static void rope(float *x, const float *cos, const float *sin, int d) {
    const int half = d / 2;
    for (int i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + (-b) * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

int qllm_attention_stage(void *hidden, int rows, int hidden_size, int is_bf16, const void *norm_w, float eps,
                         const void *q_w, const void *k_w, const void *v_w, const void *q_b, const void *k_b,
                         const void *v_b, const void *q_norm_w, const void *k_norm_w, float qk_eps,
                         const float *cos, const float *sin, void *k_pool, void *v_pool, const int64_t *slots,
                         const int64_t *block_tables, const int64_t *kv_lens, int max_blocks, int block_size,
                         int heads, int kv_heads, int head_dim, float scale, int64_t window, const void *o_w,
                         const void *o_b, float residual_scale, int num_threads) {
    const int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    const int64_t n = (int64_t)rows * hidden_size;
    int64_t longest = 1;
    for (int t = 0; t < rows; t++) longest = kv_lens[t] > longest ? kv_lens[t] : longest;
    float *x = malloc(sizeof(float) * (size_t)n * (is_bf16 ? 2 : 1)); /* then, in bfloat16, hidden as float32 */
    float *q = malloc(sizeof(float) * (size_t)rows * (size_t)(q_dim + 2 * kv_dim));
    float *attn = malloc(sizeof(float) * (size_t)rows * (size_t)q_dim);
    float *scores = malloc(sizeof(float) * (size_t)heads * (size_t)longest);
    if (x == NULL || q == NULL || attn == NULL || scores == NULL) {
        free(x), free(q), free(attn), free(scores);
        return -1;
    }
    const float *h = as_f32(hidden, is_bf16, n, x + n);
    float *k = q + (int64_t)rows * q_dim, *v = k + (int64_t)rows * kv_dim;
    for (int t = 0; t < rows; t++)
        rms_norm(h + (int64_t)t * hidden_size, norm_w, is_bf16, eps, hidden_size, x + (int64_t)t * hidden_size);
    project(q_w, q_b, is_bf16, hidden_size, q_dim, x, hidden_size, rows, q, q_dim, num_threads);
    project(k_w, k_b, is_bf16, hidden_size, kv_dim, x, hidden_size, rows, k, kv_dim, num_threads);
    project(v_w, v_b, is_bf16, hidden_size, kv_dim, x, hidden_size, rows, v, kv_dim, num_threads);
    for (int t = 0; t < rows; t++) {
        const float *c = cos + (int64_t)t * head_dim, *s = sin + (int64_t)t * head_dim;
        for (int h = 0; h < heads; h++) {
            float *qh = q + (int64_t)t * q_dim + (int64_t)h * head_dim;
            if (q_norm_w) rms_norm(qh, q_norm_w, is_bf16, qk_eps, head_dim, qh);
            rope(qh, c, s, head_dim);
        }
        for (int h = 0; h < kv_heads; h++) {
            float *kh = k + (int64_t)t * kv_dim + (int64_t)h * head_dim;
            if (k_norm_w) rms_norm(kh, k_norm_w, is_bf16, qk_eps, head_dim, kh);
            rope(kh, c, s, head_dim);
        }
        store(k_pool, is_bf16, slots[t] * kv_dim, k + (int64_t)t * kv_dim, kv_dim);
        store(v_pool, is_bf16, slots[t] * kv_dim, v + (int64_t)t * kv_dim, kv_dim);
    }
    for (int t = 0; t < rows; t++)
        qllm_attend_row(q + (int64_t)t * q_dim, k_pool, v_pool, is_bf16, block_tables + (int64_t)t * max_blocks,
                        kv_lens[t], attn + (int64_t)t * q_dim, heads, kv_heads, head_dim, head_dim, block_size,
                        scale, window, NULL, scores);
    /* o_proj into x (free now), then the residual add */
    project(o_w, o_b, is_bf16, q_dim, hidden_size, attn, q_dim, rows, x, hidden_size, num_threads);
    add_residual(hidden, is_bf16, h, x, residual_scale, n);
    free(x), free(q), free(attn), free(scores);
    return 0;
}

int qllm_moe_stage(void *hidden, int rows, int hidden_size, int is_bf16, const void *norm_w, float eps,
                   const void *router_w, int experts, int top_k, int norm_topk, const void *gate_up, const void *down,
                   int inter, float residual_scale, int num_threads) {
    const int64_t n = (int64_t)rows * hidden_size;
    float *x = malloc(sizeof(float) * (size_t)n * (is_bf16 ? 3 : 2)); /* x, out, then in bfloat16 hidden */
    float *probs = malloc(sizeof(float) * (size_t)rows * (size_t)experts);
    float *weights = malloc(sizeof(float) * (size_t)rows * (size_t)top_k);
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)rows * (size_t)top_k);
    if (x == NULL || probs == NULL || weights == NULL || ids == NULL) {
        free(x), free(probs), free(weights), free(ids);
        return -1;
    }
    float *out = x + n;
    const float *h = as_f32(hidden, is_bf16, n, out + n);
    for (int t = 0; t < rows; t++)
        rms_norm(h + (int64_t)t * hidden_size, norm_w, is_bf16, eps, hidden_size, x + (int64_t)t * hidden_size);
    project(router_w, NULL, is_bf16, hidden_size, experts, x, hidden_size, rows, probs, experts, 1);
    for (int t = 0; t < rows; t++) {
        float *p = probs + (int64_t)t * experts;
        float m = -INFINITY, sum = 0.0f;
        for (int e = 0; e < experts; e++) m = p[e] > m ? p[e] : m;
        for (int e = 0; e < experts; e++) sum += (p[e] = expf(p[e] - m));
        for (int e = 0; e < experts; e++) p[e] /= sum;
        /* top-k, largest first; among equal probabilities the lower expert id first */
        float chosen_sum = 0.0f;
        for (int j = 0; j < top_k; j++) {
            int best = -1;
            for (int e = 0; e < experts; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= ids[(int64_t)t * top_k + i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ids[(int64_t)t * top_k + j] = best;
            weights[(int64_t)t * top_k + j] = p[best];
            chosen_sum += p[best];
        }
        if (norm_topk)
            for (int j = 0; j < top_k; j++) weights[(int64_t)t * top_k + j] /= chosen_sum;
    }
    int status = qllm_moe_experts(x, ids, weights, gate_up, down, is_bf16, out, rows, top_k, hidden_size, inter,
                                  experts, num_threads);
    if (status == 0) add_residual(hidden, is_bf16, h, out, residual_scale, n);
    free(x), free(probs), free(weights), free(ids);
    return status;
}

/* out [rows, out_dim] = x [rows, in_dim] @ w [out_dim, in_dim]^T, x and out float32, w float32 or bfloat16: the
 * LM head of a decode step, whose weight a BLAS call for a few rows re-packs every step. */
void qllm_linear(const float *x, const void *w, int is_bf16, int rows, int in_dim, int out_dim, float *out,
                 int num_threads) {
    project(w, NULL, is_bf16, in_dim, out_dim, x, in_dim, rows, out, out_dim, num_threads);
}
