/* Gated MoE experts for a few tokens (decode steps): every (token, expert) pair of a step in one call.
 *
 * The CPU small-batch path of worker/moe.py. With a handful of rows a step's experts are memory-bound
 * matrix-vector products, and the framework's grouped matmul pays a sort, a histogram and two GEMM calls per
 * expert per layer. Here each hit expert's weights are streamed once, every row that chose it is dotted
 * against each weight row while that row is in cache, and the weighted result is added to the row's output.
 *
 * x [tokens, hidden] float32; ids [tokens, top_k] int64 (ids outside 0..experts-1 are skipped);
 * weights [tokens, top_k] float32; gate_up [experts, 2 * inter, hidden] (gate rows then up rows, as
 * transformers' concatenated layout) and down [experts, hidden, inter], float32 or bfloat16 (is_bf16);
 * out [tokens, hidden] float32, overwritten. Activation: SiLU(gate) * up.
 */
#include "common.h"

/* Returns 0, or -1 when scratch memory could not be had. */
int qllm_moe_experts(const float *x, const int64_t *ids, const float *weights, const void *gate_up,
                     const void *down, int is_bf16, float *out, int tokens, int top_k, int hidden, int inter,
                     int experts, int num_threads) {
    const int pairs = tokens * top_k;
    int *rows = malloc(sizeof(int) * (size_t)(pairs > 0 ? pairs : 1));        /* pair index per slot */
    float *act = malloc(sizeof(float) * (size_t)(pairs > 0 ? pairs : 1) * (size_t)(2 * inter)); /* per slot */
    if (rows == NULL || act == NULL) {
        free(rows);
        free(act);
        return -1;
    }
    memset(out, 0, sizeof(float) * (size_t)tokens * (size_t)hidden);
    const int width = 2 * inter;
    for (int e = 0; e < experts; e++) {
        int n = 0;
        for (int p = 0; p < pairs; p++)
            if (ids[p] == e) rows[n++] = p;
        if (n == 0) continue;
        /* gate and up rows: each weight row read once per BLOCK of the rows that chose this expert */
        const int64_t base_gu = (int64_t)e * width;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
        for (int r = 0; r < width; r++) {
            for (int j0 = 0; j0 < n; j0 += BLOCK) {
                const int m = n - j0 < BLOCK ? n - j0 : BLOCK;
                const float *xs[BLOCK];
                float res[BLOCK];
                for (int j = 0; j < m; j++) xs[j] = x + (int64_t)(rows[j0 + j] / top_k) * hidden;
                row_dots(gate_up, is_bf16, base_gu + r, hidden, xs, m, res);
                for (int j = 0; j < m; j++) act[(int64_t)(j0 + j) * width + r] = res[j];
            }
        }
        for (int j = 0; j < n; j++) {
            float *a = act + (int64_t)j * width;
            for (int i = 0; i < inter; i++) {
                const float g = a[i];
                a[i] = g / (1.0f + expf(-g)) * a[inter + i];
            }
        }
        const int64_t base_d = (int64_t)e * hidden;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
        for (int h = 0; h < hidden; h++) {
            for (int j0 = 0; j0 < n; j0 += BLOCK) {
                const int m = n - j0 < BLOCK ? n - j0 : BLOCK;
                const float *xs[BLOCK];
                float res[BLOCK];
                for (int j = 0; j < m; j++) xs[j] = act + (int64_t)(j0 + j) * width;
                row_dots(down, is_bf16, base_d + h, inter, xs, m, res);
                for (int j = 0; j < m; j++) {
                    const int p = rows[j0 + j];
                    out[(int64_t)(p / top_k) * hidden + h] += weights[p] * res[j];
                }
            }
        }
    }
    free(rows);
    free(act);
    return 0;
}
