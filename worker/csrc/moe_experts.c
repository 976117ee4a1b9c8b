/* Gated MoE experts for a few tokens (decode steps): every (token, expert) pair of a step in one call.
 *
 * The CPU small-batch path of worker/moe.py. With a handful of rows a step's experts are memory-bound
 * matrix-vector products, and the framework's grouped matmul pays a sort, a histogram and two GEMM calls per
 * expert per layer. Here each hit expert's weights are streamed once (matmul_rows: register tiles of weight
 * rows by rows that chose the expert), and the weighted result is added to the row's output.
 *
 * x [tokens, hidden] float32; ids [tokens, top_k] int64 (ids outside 0..experts-1 are skipped);
 * weights [tokens, top_k] float32; gate_up [experts, 2 * inter, hidden] (gate rows then up rows, as
 * transformers' concatenated layout) and down [experts, hidden, inter], float32 or bfloat16 (is_bf16);
 * out [tokens, hidden] float32, overwritten. Activation: SiLU(gate) * up.
 */
#include "common.h"

/* Adds experts [first, end)'s weighted outputs to out, expert after expert: calls over consecutive ranges sum
 * exactly what one call over all experts does (the engine parks a step between them). Returns 0, or -1 when
 * scratch memory could not be had. */
int qllm_moe_experts_range(const float *x, const int64_t *ids, const float *weights, const void *gate_up,
                           const void *down, int is_bf16, float *out, int tokens, int top_k, int hidden, int inter,
                           int first, int end, int num_threads) {
    const int pairs = tokens * top_k, slots = pairs > 0 ? pairs : 1, width = 2 * inter;
    int *rows = malloc(sizeof(int) * (size_t)slots);                             /* pair index per slot */
    const float **xs = malloc(sizeof(float *) * (size_t)slots);                  /* input vector per slot */
    /* [gate | up] of every slot, then the unweighted down projection of every slot */
    float *act = malloc(sizeof(float) * (size_t)slots * (size_t)(width + hidden));
    if (rows == NULL || xs == NULL || act == NULL) {
        free(rows), free(xs), free(act);
        return -1;
    }
    float *down_out = act + (size_t)slots * (size_t)width;
    const size_t gu_expert = (size_t)width * (size_t)hidden, d_expert = (size_t)hidden * (size_t)inter;
    const size_t elem = is_bf16 ? 2 : 4;
    for (int e = first; e < end; e++) {
        int n = 0;
        for (int p = 0; p < pairs; p++)
            if (ids[p] == e) rows[n++] = p;
        if (n == 0) continue;
        /* gate and up: each weight row comes from memory once for all n rows that chose this expert */
        for (int j = 0; j < n; j++) xs[j] = x + (int64_t)(rows[j] / top_k) * hidden;
        matmul_rows((const char *)gate_up + (size_t)e * gu_expert * elem, is_bf16, width, hidden, xs, n, act,
                    width, num_threads);
        for (int j = 0; j < n; j++) {
            float *a = act + (int64_t)j * width;
            for (int i = 0; i < inter; i++) {
                const float g = a[i];
                a[i] = g / (1.0f + expf(-g)) * a[inter + i];
            }
            xs[j] = a;
        }
        matmul_rows((const char *)down + (size_t)e * d_expert * elem, is_bf16, hidden, inter, xs, n, down_out,
                    hidden, num_threads);
        for (int j = 0; j < n; j++) {
            const int p = rows[j];
            const float wt = weights[p], *d = down_out + (int64_t)j * hidden;
            float *o = out + (int64_t)(p / top_k) * hidden;
            for (int h = 0; h < hidden; h++) o[h] += wt * d[h];
        }
    }
    free(rows), free(xs), free(act);
    return 0;
}

/* out = the weighted sum of every expert's output for each token's top_k picks. */
int qllm_moe_experts(const float *x, const int64_t *ids, const float *weights, const void *gate_up,
                     const void *down, int is_bf16, float *out, int tokens, int top_k, int hidden, int inter,
                     int experts, int num_threads) {
    memset(out, 0, sizeof(float) * (size_t)tokens * (size_t)hidden);
    return qllm_moe_experts_range(x, ids, weights, gate_up, down, is_bf16, out, tokens, top_k, hidden, inter, 0,
                                  experts, num_threads);
}
