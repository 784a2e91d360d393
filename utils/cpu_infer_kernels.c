/* CPU inference kernels for batch-1 detection (utils/native_infer.py calls them through ctypes).
 *
 * At batch 1 a MobileNetV3 detector's depthwise convs and squeeze-excite blocks carry little
 * arithmetic, and PyTorch's per-call cost dominates them: oneDNN's depthwise conv took ~100 us on a
 * [1, 128, 10, 10] map (115 k multiply-adds), and squeeze-excite is six ATen ops. These kernels do
 * the same work in one call each.
 *
 * All tensors are float32, NHWC (channels_last), contiguous. Activation codes: 0 identity, 1 ReLU,
 * 2 h-swish (x * relu6(x + 3) / 6). OpenMP threads are PyTorch's (utils/native.py).
 */
#include <stddef.h>

/* GCC/clang vector extensions: 8 floats in one register (AVX2 here; pairs of NEON registers or scalar
 * code elsewhere). Plain C arrays as accumulators are not kept in registers across the tap loops. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads and stores */
typedef int v8i __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { return *(const v8u *)p; }
static inline void st(float *p, v8 v) { *(v8u *)p = v; }
/* max(v, 0) and min(v, hi) by bit masks: GCC's C front end has no vector ?: */
static inline v8 v8_relu(v8 v) { const v8 zero = {0}; return (v8)((v8i)v & (v > zero)); }
static inline v8 v8_min(v8 v, v8 hi) { v8i m = v > hi; return (v8)(((v8i)v & ~m) | ((v8i)hi & m)); }

static inline v8 v8_act(v8 v, int act) {
    const v8 zero = {0};
    if (act == 1) return v8_relu(v);
    if (act == 2) return v * v8_min(v8_relu(v + 3.f), zero + 6.f) * (1.f / 6.f);
    return v;
}

static inline float f_act(float v, int act) {
    if (act == 1) return v > 0.f ? v : 0.f;
    if (act == 2) {
        float t = v + 3.f;
        t = t < 0.f ? 0.f : (t > 6.f ? 6.f : t);
        return v * t * (1.f / 6.f);
    }
    return v;
}

/* ---- depthwise conv -------------------------------------------------------------------------------
 * Output pixels are computed PX at a time along a row, for 8 * NV channels: each weight vector is loaded
 * once per PX pixels, and with K and S known at compile time the unrolled loops reuse the input vectors
 * that neighbouring pixels share. xo: input pixel (first valid row, first tap column) of the first
 * output pixel, at channel c; w: weights of the first valid kernel row; nkh: valid kernel rows. */
#define PX 4
#define DW_RUN(K, S, NV)                                                                               \
    static void dw_run_##K##_##S##_##NV(const float *xo, const float *w, const float *b, float *yo,   \
                                        long C, long W, int nkh, int act) {                            \
        v8 acc[PX][NV];                                                                                \
        for (int p = 0; p < PX; p++)                                                                   \
            for (int j = 0; j < NV; j++) acc[p][j] = ld(b + 8 * j);                                    \
        for (int kh = 0; kh < nkh; kh++) {                                                             \
            const float *xr = xo + (long)kh * W * C, *wr = w + (long)kh * K * C;                       \
            for (int kw = 0; kw < K; kw++)                                                             \
                for (int j = 0; j < NV; j++) {                                                         \
                    v8 wv = ld(wr + (long)kw * C + 8 * j);                                             \
                    for (int p = 0; p < PX; p++) acc[p][j] += ld(xr + (long)(S * p + kw) * C + 8 * j) * wv; \
                }                                                                                      \
        }                                                                                              \
        for (int p = 0; p < PX; p++)                                                                   \
            for (int j = 0; j < NV; j++) st(yo + (long)p * C + 8 * j, v8_act(acc[p][j], act));        \
    }
DW_RUN(3, 1, 2)
DW_RUN(3, 1, 1)
DW_RUN(3, 2, 2)
DW_RUN(3, 2, 1)
DW_RUN(5, 1, 2)
DW_RUN(5, 1, 1)
DW_RUN(5, 2, 2)
DW_RUN(5, 2, 1)

typedef void (*dw_run_fn)(const float *, const float *, const float *, float *, long, long, int, int);

static dw_run_fn pick_run(int k, int s, int nv) {
    if (k == 3 && s == 1) return nv == 2 ? dw_run_3_1_2 : dw_run_3_1_1;
    if (k == 3 && s == 2) return nv == 2 ? dw_run_3_2_2 : dw_run_3_2_1;
    if (k == 5 && s == 1) return nv == 2 ? dw_run_5_1_2 : dw_run_5_1_1;
    if (k == 5 && s == 2) return nv == 2 ? dw_run_5_2_2 : dw_run_5_2_1;
    return NULL;
}

/* One output pixel, all channels, any k and s: the padded borders and kernels without a DW_RUN.
 * xo/w as for DW_RUN but also offset to the first valid column; nkw valid kernel columns. */
static void dw_pixel(const float *xo, const float *w, const float *b, float *yo, long C, long W, int k,
                     int nkh, int nkw, int act) {
    long c = 0;
    for (; c + 8 <= C; c += 8) {
        v8 acc = ld(b + c);
        for (int kh = 0; kh < nkh; kh++)
            for (int kw = 0; kw < nkw; kw++)
                acc += ld(xo + ((long)kh * W + kw) * C + c) * ld(w + (long)(kh * k + kw) * C + c);
        st(yo + c, v8_act(acc, act));
    }
    for (; c < C; c++) {
        float acc = b[c];
        for (int kh = 0; kh < nkh; kh++)
            for (int kw = 0; kw < nkw; kw++) acc += xo[((long)kh * W + kw) * C + c] * w[(long)(kh * k + kw) * C + c];
        yo[c] = f_act(acc, act);
    }
}

/* y = act(depthwise_conv(x, w) + b): x [N, H, W, C], w [k * k, C] (tap-major), b [C],
 * y [N, Ho, Wo, C]; square kernel k, stride s, zero padding pad on every side. */
void dw_conv_act(const float *x, const float *w, const float *b, float *y, long N, long H, long W, long C,
                 long Ho, long Wo, int k, int s, int pad, int act, int nt) {
    dw_run_fn run16 = pick_run(k, s, 2), run8 = pick_run(k, s, 1);
    long rows = N * Ho;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < rows; r++) {
        long n = r / Ho, oh = r % Ho, ih0 = oh * s - pad;
        int kh0 = ih0 < 0 ? (int)-ih0 : 0, kh1 = ih0 + k > H ? (int)(H - ih0) : k;
        const float *xrow = x + (n * H + ih0 + kh0) * W * C; /* first valid input row */
        const float *wrow = w + (long)kh0 * k * C;
        float *yr = y + r * Wo * C;
        for (long ow = 0; ow < Wo;) {
            long iw0 = ow * s - pad;
            if (run8 && iw0 >= 0 && ow + PX <= Wo && iw0 + (long)s * (PX - 1) + k <= W) {
                long c = 0;
                for (; c + 16 <= C; c += 16) run16(xrow + iw0 * C + c, wrow + c, b + c, yr + ow * C + c, C, W, kh1 - kh0, act);
                for (; c + 8 <= C; c += 8) run8(xrow + iw0 * C + c, wrow + c, b + c, yr + ow * C + c, C, W, kh1 - kh0, act);
                if (c < C) /* channels past the last multiple of 8: per pixel */
                    for (int p = 0; p < PX; p++)
                        for (long cc = c; cc < C; cc++) {
                            float acc = b[cc];
                            const float *xo = xrow + (iw0 + (long)s * p) * C;
                            for (int kh = 0; kh < kh1 - kh0; kh++)
                                for (int kw = 0; kw < k; kw++)
                                    acc += xo[((long)kh * W + kw) * C + cc] * wrow[(long)(kh * k + kw) * C + cc];
                            yr[(ow + p) * C + cc] = f_act(acc, act);
                        }
                ow += PX;
            } else {
                int kw0 = iw0 < 0 ? (int)-iw0 : 0, kw1 = iw0 + k > W ? (int)(W - iw0) : k;
                dw_pixel(xrow + (iw0 + kw0) * C, wrow + (long)kw0 * C, b, yr + ow * C, C, W, k, kh1 - kh0,
                         kw1 - kw0, act);
                ow++;
            }
        }
    }
}

/* ---- squeeze-excite --------------------------------------------------------------------------------
 * y = x * hardsigmoid(w2 @ relu(w1 @ mean_hw(x) + b1) + b2), per image. x, y [N, HW, C] (y must not
 * alias x); w1t [C, S] and w2t [S, C] are the two 1x1 convs' weights transposed, so that both matrix
 * products are rows added into a vector (vectorized without reassociating sums); b1 [S], b2 [C]. */
#define SE_CB 64 /* channels per pooling task */
void se_forward(const float *x, float *y, long N, long HW, long C, long S, const float *w1t, const float *b1,
                const float *w2t, const float *b2, int nt) {
    float scratch[2 * C + S]; /* pooled, hidden, gate: shared by the threads */
    float *pooled = scratch, *hidden = scratch + C, *gate = scratch + C + S;
#pragma omp parallel num_threads(nt)
    for (long n = 0; n < N; n++) {
        const float *xn = x + n * HW * C;
        float *yn = y + n * HW * C;
        /* mean over HW, channel blocks spread over threads; float sums per 64 pixels, then double */
#pragma omp for schedule(static)
        for (long cb = 0; cb < C; cb += SE_CB) {
            long nc = C - cb < SE_CB ? C - cb : SE_CB;
            double tot[SE_CB] = {0};
            for (long p0 = 0; p0 < HW; p0 += 64) {
                float part[SE_CB] = {0};
                long p1 = p0 + 64 < HW ? p0 + 64 : HW;
                for (long p = p0; p < p1; p++)
                    for (long c = 0; c < nc; c++) part[c] += xn[p * C + cb + c];
                for (long c = 0; c < nc; c++) tot[c] += part[c];
            }
            for (long c = 0; c < nc; c++) pooled[cb + c] = (float)(tot[c] / (double)HW);
        }
#pragma omp single
        {
            for (long s = 0; s < S; s++) hidden[s] = b1[s];
            for (long c = 0; c < C; c++)
                for (long s = 0; s < S; s++) hidden[s] += pooled[c] * w1t[c * S + s];
            for (long s = 0; s < S; s++) hidden[s] = hidden[s] > 0.f ? hidden[s] : 0.f;
            for (long c = 0; c < C; c++) gate[c] = b2[c];
            for (long s = 0; s < S; s++)
                for (long c = 0; c < C; c++) gate[c] += hidden[s] * w2t[s * C + c];
            for (long c = 0; c < C; c++) {
                float v = gate[c] + 3.f;
                gate[c] = (v < 0.f ? 0.f : (v > 6.f ? 6.f : v)) * (1.f / 6.f);
            }
        } /* implicit barrier: every thread sees the gate */
#pragma omp for schedule(static)
        for (long p = 0; p < HW; p++)
            for (long c = 0; c < C; c++) yn[p * C + c] = xn[p * C + c] * gate[c];
    }
}
