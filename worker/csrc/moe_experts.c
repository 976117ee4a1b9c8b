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
 *
 * An expert that a vector's width of rows or more chose (a prefill chunk's) takes the products the other way
 * round: its rows are gathered transposed, [hidden, rows], so a register holds one feature of a vector's width
 * of rows, and each weight element is broadcast against it (the outer-product form of a GEMM, as BLAS kernels
 * run). Nothing is then summed across a register, and the weights stay in the layout torch keeps them.
 */
#include "common.h"

#ifdef VEC_W
/* weight rows per tile of the transposed path: ROWS_T_MR x 2 accumulators, two row vectors and a broadcast =
 * 27 zmm, or 15 ymm */
#define ROWS_T_MR (VEC_W == 16 ? 12 : 6)
#endif

/* g[i] = SiLU(g[i]) * u[i]. exp as Cephes' expf (a degree-5 polynomial on the reduced argument, within 2 ulp),
 * a vector at a time: one libm call per element cost as much as the products at a prefill's rows per expert. */
static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
#ifdef VEC_W
    const vec one = vec_set1(1.0f), lo = vec_set1(-88.3762626647949f), hi = vec_set1(88.3762626647949f);
    for (; i + VEC_W <= n; i += VEC_W) {
        const vec gv = vec_loadu(g + i);
        vec x = vec_min(vec_max(vec_sub(vec_zero(), gv), lo), hi); /* exp(-g) */
        const vec k = vec_round(vec_mul(x, vec_set1(1.44269504088896341f)));
        x = vec_fma(k, vec_set1(-0.693359375f), x);
        x = vec_fma(k, vec_set1(2.12194440e-4f), x);
        vec y = vec_set1(1.9875691500e-4f);
        y = vec_fma(y, x, vec_set1(1.3981999507e-3f));
        y = vec_fma(y, x, vec_set1(8.3334519073e-3f));
        y = vec_fma(y, x, vec_set1(4.1665795894e-2f));
        y = vec_fma(y, x, vec_set1(1.6666665459e-1f));
        y = vec_fma(y, x, vec_set1(5.0000001201e-1f));
        y = vec_fma(y, vec_mul(x, x), vec_add(x, one));
        const vec e = vec_pow2(y, k);
        vec_storeu(g + i, vec_mul(vec_div(gv, vec_add(one, e)), vec_loadu(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}


#ifdef VEC_W
/* outT[(r0 + q) * ldo + j0 + :nv * W] = w[r0 + q, :d] . xT[:d, j0 + :nv * W] for q < mr (both constants after
 * inlining). */
static inline __attribute__((always_inline)) void tile_t(const void *w, int is_bf16, int64_t r0, int d,
                                                         const float *xT, int64_t ldx, int j0, int nv, int mr,
                                                         float *outT, int64_t ldo) {
    vec acc[ROWS_T_MR][2];
    for (int q = 0; q < mr; q++) acc[q][0] = acc[q][1] = vec_zero();
    for (int k = 0; k < d; k++) {
        const float *xk = xT + (int64_t)k * ldx + j0;
        const vec x0 = vec_loadu(xk), x1 = nv > 1 ? vec_loadu(xk + VEC_W) : x0;
        for (int q = 0; q < mr; q++) {
            const vec b = vec_set1(weight_at(w, is_bf16, (r0 + q) * d + k));
            acc[q][0] = vec_fma(b, x0, acc[q][0]);
            if (nv > 1) acc[q][1] = vec_fma(b, x1, acc[q][1]);
        }
    }
    for (int q = 0; q < mr; q++) {
        float *o = outT + (r0 + q) * ldo + j0;
        vec_storeu(o, acc[q][0]);
        if (nv > 1) vec_storeu(o + VEC_W, acc[q][1]);
    }
}

static void tile_t_rows(const void *w, int is_bf16, int64_t r0, int d, const float *xT, int64_t ldx, int j0,
                        int nv, float *outT, int64_t ldo) {
#define TILE_T(bf, v) tile_t(w, bf, r0, d, xT, ldx, j0, v, ROWS_T_MR, outT, ldo)
    if (is_bf16) { if (nv > 1) TILE_T(1, 2); else TILE_T(1, 1); }
    else { if (nv > 1) TILE_T(0, 2); else TILE_T(0, 1); }
#undef TILE_T
}

static void tile_t_row(const void *w, int is_bf16, int64_t r, int d, const float *xT, int64_t ldx, int j0,
                       int nv, float *outT, int64_t ldo) {
#define TILE_T(bf, v) tile_t(w, bf, r, d, xT, ldx, j0, v, 1, outT, ldo)
    if (is_bf16) { if (nv > 1) TILE_T(1, 2); else TILE_T(1, 1); }
    else { if (nv > 1) TILE_T(0, 2); else TILE_T(0, 1); }
#undef TILE_T
}

/* outT[r * ldo + j] = w[r, :d] . xT[:d, j] for r < rows, j < n (n a multiple of VEC_W, ldx and ldo >= n):
 * the weight's rows ROWS_T_MR at a time, each tile's rows kept in cache while every row vector passes. */
static void matmul_rows_t(const void *w, int is_bf16, int rows, int d, const float *xT, int64_t ldx, int n,
                          float *outT, int64_t ldo, int num_threads) {
    const int tiles = (rows + ROWS_T_MR - 1) / ROWS_T_MR;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int t = 0; t < tiles; t++) {
        const int64_t r0 = (int64_t)t * ROWS_T_MR;
        for (int j0 = 0; j0 < n; j0 += 2 * VEC_W) {
            const int nv = n - j0 >= 2 * VEC_W ? 2 : 1;
            if (r0 + ROWS_T_MR <= rows) tile_t_rows(w, is_bf16, r0, d, xT, ldx, j0, nv, outT, ldo);
            else
                for (int64_t r = r0; r < rows; r++) tile_t_row(w, is_bf16, r, d, xT, ldx, j0, nv, outT, ldo);
        }
    }
}

/* One expert's n rows (slots rows[0..n)) the transposed way; scratch holds (hidden + 2 * inter + hidden) * npad
 * floats. */
static void expert_rows_t(const float *x, const int *rows, int n, const float *weights, const void *gate_up,
                          const void *down, int is_bf16, float *out, int top_k, int hidden, int inter, float *scratch,
                          int num_threads) {
    const int npad = (n + VEC_W - 1) / VEC_W * VEC_W, width = 2 * inter;
    float *xT = scratch, *actT = xT + (int64_t)hidden * npad, *downT = actT + (int64_t)width * npad;
    for (int k = 0; k < hidden; k++) {
        float *xk = xT + (int64_t)k * npad;
        for (int j = 0; j < n; j++) xk[j] = x[(int64_t)(rows[j] / top_k) * hidden + k];
        for (int j = n; j < npad; j++) xk[j] = 0.0f;
    }
    matmul_rows_t(gate_up, is_bf16, width, hidden, xT, npad, npad, actT, npad, num_threads);
    silu_mul(actT, actT + (int64_t)inter * npad, (int64_t)inter * npad); /* the gate rows, in place */
    matmul_rows_t(down, is_bf16, hidden, inter, actT, npad, npad, downT, npad, num_threads);
    for (int j = 0; j < n; j++) {
        const int p = rows[j];
        const float wt = weights[p];
        float *o = out + (int64_t)(p / top_k) * hidden;
        for (int h = 0; h < hidden; h++) o[h] += wt * downT[(int64_t)h * npad + j];
    }
}
#endif

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
#ifdef VEC_W
    float *scratch = NULL; /* the transposed path's, taken at its first expert (a decode step has none) */
#endif
    const size_t gu_expert = (size_t)width * (size_t)hidden, d_expert = (size_t)hidden * (size_t)inter;
    const size_t elem = is_bf16 ? 2 : 4;
    for (int e = first; e < end; e++) {
        int n = 0;
        for (int p = 0; p < pairs; p++)
            if (ids[p] == e) rows[n++] = p;
        if (n == 0) continue;
#ifdef VEC_W
        if (n >= VEC_W) {
            if (scratch == NULL) { /* for as many rows as any expert can have */
                const size_t padded = (size_t)(slots + VEC_W - 1) / VEC_W * VEC_W;
                scratch = malloc(sizeof(float) * padded * (size_t)(2 * hidden + width));
                if (scratch == NULL) {
                    free(rows), free(xs), free(act);
                    return -1;
                }
            }
            expert_rows_t(x, rows, n, weights, (const char *)gate_up + (size_t)e * gu_expert * elem,
                          (const char *)down + (size_t)e * d_expert * elem, is_bf16, out, top_k, hidden, inter,
                          scratch, num_threads);
            continue;
        }
#endif
        /* gate and up: each weight row comes from memory once for all n rows that chose this expert */
        for (int j = 0; j < n; j++) xs[j] = x + (int64_t)(rows[j] / top_k) * hidden;
        matmul_rows((const char *)gate_up + (size_t)e * gu_expert * elem, is_bf16, width, hidden, xs, n, act,
                    width, num_threads);
        for (int j = 0; j < n; j++) {
            float *a = act + (int64_t)j * width;
            silu_mul(a, a + inter, inter);
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
#ifdef VEC_W
    free(scratch);
#endif
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
