/* CPU training kernels for channels_last (NHWC) float32 tensors; built and loaded by utils/accel/native.py.
 *
 * Why they exist (benchmarks/train_profile.py, docs/PERFORMANCE.md "Training"): in a MobileNetV3 training step
 * on an AVX2 CPU, oneDNN computes a depthwise conv's weight gradient with its generic grouped-conv
 * kernel, 4-5x the time of the forward conv at 5x5, and BatchNorm + activation are five separate passes over
 * each (large, expanded) activation forward and eight backward. These kernels do the weight gradient
 * directly and BatchNorm + activation in two passes each way.
 *
 * Layout: an NHWC tensor is an (M, C) row-major matrix, M = N*H*W. Threads split rows (or batch
 * images) and keep per-thread partial sums in the caller's `scratch`, reduced here in double.
 * Activation codes: 0 identity, 1 ReLU, 2 hard-swish (PyTorch's formulas and subgradients).
 *
 * These functions trust their arguments (sizes, strides, pointers): they are called only through the
 * mobileyolo:: ops (utils/accel/op_impls.py), which check every tensor first, including a channel cap
 * (checks.MAX_CHANNELS) that keeps the per-channel arrays below on the stack small.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static inline float act_fwd(float z, int act) {
    switch (act) {
    case 1: return z > 0.0f ? z : 0.0f;
    case 2: { float t = z + 3.0f; t = t < 0.0f ? 0.0f : (t > 6.0f ? 6.0f : t); return z * t / 6.0f; }
    default: return z;
    }
}

static inline float act_grad(float z, int act) {  /* d act / d z */
    switch (act) {
    case 1: return z > 0.0f ? 1.0f : 0.0f;
    case 2: return z < -3.0f ? 0.0f : (z <= 3.0f ? z / 3.0f + 0.5f : 1.0f);
    default: return 1.0f;
    }
}

#define BLOCK 64  /* rows per float partial sum */

static void sum_threads(const double* scratch, int nt, long len, double* out) {
    for (long c = 0; c < len; c++) out[c] = 0.0;
    for (int t = 0; t < nt; t++)
        for (long c = 0; c < len; c++) out[c] += scratch[t * len + c];
}

#define ROWS_OF_THREAD(M)                                          \
    int t = omp_get_thread_num(), nth = omp_get_num_threads();    \
    long m0 = (long)t * (M) / nth, m1 = (long)(t + 1) * (M) / nth;
#define INLINE static inline __attribute__((always_inline))
/* Call WORKER(..., act) with a constant act, so that each activation gets its own vectorized copy. */
#define BY_ACT(act, WORKER, ...)                                   \
    switch (act) {                                                 \
    case 1: WORKER(__VA_ARGS__, 1); break;                         \
    case 2: WORKER(__VA_ARGS__, 2); break;                         \
    default: WORKER(__VA_ARGS__, 0);                               \
    }

/* Per-channel sum and sum of squares of rows [m0, m1): float over blocks of rows, added up in double. */
INLINE void stats_rows(const float* restrict x, long m0, long m1, long C, double* restrict s,
                       double* restrict ss) {
    float fs[C], fss[C];
    for (long mb = m0; mb < m1; mb += BLOCK) {
        long me = mb + BLOCK < m1 ? mb + BLOCK : m1;
        for (long c = 0; c < C; c++) fs[c] = fss[c] = 0.0f;
        for (long m = mb; m < me; m++) {
            const float* restrict xr = x + m * C;
            for (long c = 0; c < C; c++) { fs[c] += xr[c]; fss[c] += xr[c] * xr[c]; }
        }
        for (long c = 0; c < C; c++) { s[c] += fs[c]; ss[c] += fss[c]; }
    }
}

INLINE void normalize_rows(const float* restrict x, float* restrict y, long m0, long m1, long C,
                           const float* restrict scale, const float* restrict shift, const int act) {
    for (long m = m0; m < m1; m++) {
        const float* restrict xr = x + m * C;
        float* restrict yr = y + m * C;
        for (long c = 0; c < C; c++) yr[c] = act_fwd(xr[c] * scale[c] + shift[c], act);
    }
}

/* Backward pass 1: sums over rows of gz = gy * act'(z) and of gz * (x - mean). */
INLINE void grad_sums_rows(const float* restrict x, const float* restrict gy, long m0, long m1, long C,
                           const float* restrict scale, const float* restrict shift,
                           const float* restrict mean, double* restrict sg, double* restrict sgx,
                           const int act) {
    float fg[C], fgx[C];
    for (long mb = m0; mb < m1; mb += BLOCK) {
        long me = mb + BLOCK < m1 ? mb + BLOCK : m1;
        for (long c = 0; c < C; c++) fg[c] = fgx[c] = 0.0f;
        for (long m = mb; m < me; m++) {
            const float* restrict xr = x + m * C;
            const float* restrict gr = gy + m * C;
            for (long c = 0; c < C; c++) {
                float gz = gr[c] * act_grad(xr[c] * scale[c] + shift[c], act);
                fg[c] += gz;
                fgx[c] += gz * (xr[c] - mean[c]);
            }
        }
        for (long c = 0; c < C; c++) { sg[c] += fg[c]; sgx[c] += fgx[c]; }
    }
}

/* Backward pass 2: gx = w * invstd * (gz - mean(gz) - xhat * mean(gz * xhat)). */
INLINE void grad_input_rows(const float* restrict x, const float* restrict gy, float* restrict gx, long m0,
                            long m1, long C, const float* restrict scale, const float* restrict shift,
                            const float* restrict mean, const float* restrict invstd,
                            const float* restrict k1, const float* restrict k2, const int act) {
    for (long m = m0; m < m1; m++) {
        const float* restrict xr = x + m * C;
        const float* restrict gr = gy + m * C;
        float* restrict o = gx + m * C;
        for (long c = 0; c < C; c++) {
            float gz = gr[c] * act_grad(xr[c] * scale[c] + shift[c], act);
            float xhat = (xr[c] - mean[c]) * invstd[c];
            o[c] = scale[c] * (gz - k1[c] - xhat * k2[c]);  /* scale = w * invstd */
        }
    }
}

/* Batch statistics, then y = act(x * scale + shift). Writes stats = [mean, biased var, invstd] (3 x C) and,
 * when run_mean is not NULL, updates run_mean / run_var (unbiased var) by `momentum` as BatchNorm2d does.
 * Returns 0, or -1 when the scratch could not be allocated (nothing written then). */
int bn_act_forward(const float* x, float* y, long M, long C, const float* w, const float* b, float eps, int act,
                   float* stats, float* run_mean, float* run_var, float momentum, int nt) {
    double* scratch = malloc(sizeof(double) * 2 * C * nt);
    if (!scratch) return -1;
    memset(scratch, 0, sizeof(double) * 2 * C * nt);
    #pragma omp parallel num_threads(nt)
    {
        ROWS_OF_THREAD(M)
        double* s = scratch + (long)t * 2 * C;
        stats_rows(x, m0, m1, C, s, s + C);
    }
    double tot[2 * C];
    sum_threads(scratch, nt, 2 * C, tot);
    free(scratch);
    float scale[C], shift[C];
    float *mean_out = stats, *var_out = stats + C, *inv_out = stats + 2 * C;
    for (long c = 0; c < C; c++) {
        double mean = tot[c] / M, var = tot[C + c] / M - mean * mean;
        var = var > 0.0 ? var : 0.0;
        mean_out[c] = (float)mean;
        var_out[c] = (float)var;
        float inv = (float)(1.0 / sqrt(var + eps));
        inv_out[c] = inv;
        scale[c] = w[c] * inv;
        shift[c] = b[c] - (float)mean * scale[c];
    }
    if (run_mean && run_var && M > 1) {
        float unbias = (float)((double)M / (double)(M - 1));
        for (long c = 0; c < C; c++) {  /* torch.lerp's formula for weights below 0.5 */
            run_mean[c] = run_mean[c] + momentum * (mean_out[c] - run_mean[c]);
            run_var[c] = run_var[c] + momentum * (var_out[c] * unbias - run_var[c]);
        }
    }
    #pragma omp parallel num_threads(nt)
    {
        ROWS_OF_THREAD(M)
        BY_ACT(act, normalize_rows, x, y, m0, m1, C, scale, shift)
    }
    return 0;
}

/* Gradients of y = act(BN(x)) given gy: gw, gb (C each) and, when gx is not NULL, gx (M x C).
 * mean / invstd are the forward's batch statistics. Returns 0, or -1 when out of memory. */
int bn_act_backward(const float* x, const float* gy, float* gx, long M, long C, const float* w,
                    const float* b, const float* mean, const float* invstd, int act, float* gw,
                    float* gb, int nt) {
    float scale[C], shift[C];
    for (long c = 0; c < C; c++) { scale[c] = w[c] * invstd[c]; shift[c] = b[c] - mean[c] * scale[c]; }
    double* scratch = malloc(sizeof(double) * 2 * C * nt);
    if (!scratch) return -1;
    memset(scratch, 0, sizeof(double) * 2 * C * nt);
    #pragma omp parallel num_threads(nt)
    {
        ROWS_OF_THREAD(M)
        double* sg = scratch + (long)t * 2 * C;
        BY_ACT(act, grad_sums_rows, x, gy, m0, m1, C, scale, shift, mean, sg, sg + C)
    }
    double tot[2 * C];
    sum_threads(scratch, nt, 2 * C, tot);
    free(scratch);
    float k1[C], k2[C];
    for (long c = 0; c < C; c++) {
        double sgx = tot[C + c] * invstd[c];  /* sum of gz * xhat */
        gb[c] = (float)tot[c];
        gw[c] = (float)sgx;
        k1[c] = (float)(tot[c] / M);
        k2[c] = (float)(sgx / M);
    }
    if (!gx) return 0;
    #pragma omp parallel num_threads(nt)
    {
        ROWS_OF_THREAD(M)
        BY_ACT(act, grad_input_rows, x, gy, gx, m0, m1, C, scale, shift, mean, invstd, k1, k2)
    }
    return 0;
}

/* Weight gradient of a depthwise conv (groups = C, one filter per channel, square k, stride s,
 * zero padding p, dilation 1): gw[c][i][j] = sum over n, ho, wo of x[n, ho*s+i-p, wo*s+j-p, c] *
 * g[n, ho, wo, c]. x: N,H,W,C; g: N,Ho,Wo,C; gw: C*k*k. scratch: nt * k*k * C floats. */
void dw_weight_grad(const float* x, const float* g, float* gw, long N, long C, long H, long W,
                    long Ho, long Wo, long k, long s, long p, float* scratch, int nt) {
    const long CB = 64;  /* channel block: the k*k accumulator rows of a block stay in L1 */
    memset(scratch, 0, sizeof(float) * k * k * C * nt);
    #pragma omp parallel num_threads(nt)
    {
        ROWS_OF_THREAD(N)
        float* acc = scratch + (long)t * k * k * C;
        for (long c0 = 0; c0 < C; c0 += CB) {
            long cn = C - c0 < CB ? C - c0 : CB;
            for (long n = m0; n < m1; n++)
            for (long ho = 0; ho < Ho; ho++)
            for (long wo = 0; wo < Wo; wo++) {
                const float* gp = g + ((n * Ho + ho) * Wo + wo) * C + c0;
                for (long i = 0; i < k; i++) {
                    long h = ho * s + i - p;
                    if (h < 0 || h >= H) continue;
                    for (long j = 0; j < k; j++) {
                        long w = wo * s + j - p;
                        if (w < 0 || w >= W) continue;
                        const float* xp = x + ((n * H + h) * W + w) * C + c0;
                        float* a = acc + (i * k + j) * C + c0;
                        for (long c = 0; c < cn; c++) a[c] += xp[c] * gp[c];
                    }
                }
            }
        }
    }
    for (long c = 0; c < C; c++)
        for (long q = 0; q < k * k; q++) {
            double v = 0.0;
            for (int t = 0; t < nt; t++) v += scratch[((long)t * k * k + q) * C + c];
            gw[c * k * k + q] = (float)v;
        }
}

/* Squeeze-excite backward, pass 1: gs[n][c] = sum over the HW positions of image n of gy * x.
 * x, gy: N, HW, C. gs: N*C. Threads split images. */
void se_gate_grad(const float* x, const float* gy, float* gs, long N, long HW, long C, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long n = 0; n < N; n++) {
        double acc[C];
        float f[C];
        for (long c = 0; c < C; c++) acc[c] = 0.0;
        for (long mb = 0; mb < HW; mb += BLOCK) {
            long me = mb + BLOCK < HW ? mb + BLOCK : HW;
            for (long c = 0; c < C; c++) f[c] = 0.0f;
            for (long m = mb; m < me; m++) {
                const float* restrict xr = x + (n * HW + m) * C;
                const float* restrict gr = gy + (n * HW + m) * C;
                for (long c = 0; c < C; c++) f[c] += gr[c] * xr[c];
            }
            for (long c = 0; c < C; c++) acc[c] += f[c];
        }
        for (long c = 0; c < C; c++) gs[n * C + c] = (float)acc[c];
    }
}

/* Squeeze-excite backward, pass 2: gx = gy * gate[n][c] + gpool[n][c] (the pooled input's gradient,
 * already divided by HW). gy, gx: N, HW, C; gate, gpool: N*C. */
void se_input_grad(const float* gy, const float* gate, const float* gpool, float* gx, long N, long HW, long C,
                   int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
    for (long n = 0; n < N; n++)
        for (long m = 0; m < HW; m++) {
            const float* restrict gr = gy + (n * HW + m) * C;
            const float* restrict a = gate + n * C;
            const float* restrict b = gpool + n * C;
            float* restrict o = gx + (n * HW + m) * C;
            for (long c = 0; c < C; c++) o[c] = gr[c] * a[c] + b[c];
        }
}
