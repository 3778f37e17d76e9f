/* Small-batch GEMM on panel-packed weights, for the CPU: y[M,N] = x[M,K] @ W^T (+ bias).
 *
 * W [N,K] is packed once into 16-row panels P[ceil(N/16)][K][16] (rows past N are zero),
 * stored as fp32, fp16 or bf16; x, y, the bias and all arithmetic are fp32. One k-step of a
 * panel is one contiguous 16-wide row, so the microkernel loads 2 ymm of weights per panel,
 * broadcasts x[t][k] per token and does 2*R*T FMAs into R panels x T tokens of accumulators,
 * with no horizontal sums. Each output is one FMA chain over k = 0..K-1 in order whatever the
 * tile, the token count or the thread split, so a row's result does not depend on the other
 * rows of the batch and 1 and 2 threads give bitwise-equal results (threads split panels,
 * never K). Padded panel rows are computed but never stored.
 *
 * panel_gemm_part computes one thread's share and is what a fused layer calls from inside its
 * own OpenMP region; panel_gemm opens the region itself. Both set FTZ/DAZ for their duration
 * (MXCSR is per thread) and restore the caller's mode.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(PANEL_NO_SIMD)
#define PANEL_SIMD 1
#include <immintrin.h>
#else
#define PANEL_SIMD 0
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

#define MAX_T 6 /* tokens per tile */

#if PANEL_SIMD
static inline __attribute__((always_inline)) void load16_f32(const void *p, long i, __m256 *lo, __m256 *hi) {
    const float *w = (const float *)p + i;
    *lo = _mm256_loadu_ps(w);
    *hi = _mm256_loadu_ps(w + 8);
}

static inline __attribute__((always_inline)) void load16_f16(const void *p, long i, __m256 *lo, __m256 *hi) {
    const uint16_t *w = (const uint16_t *)p + i;
    *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
    *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 8)));
}

static inline __attribute__((always_inline)) void load16_bf16(const void *p, long i, __m256 *lo, __m256 *hi) {
    const uint16_t *w = (const uint16_t *)p + i;
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
    *hi = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + 8))), 16));
}

/* R panels starting at panel p0 x T tokens starting at row t0, full K. */
#define TILE(NAME, LOAD, R, T)                                                                                  \
    static void NAME(const float *x, long ldx, const void *w, const float *bias, float *y, long ldy, int N,    \
                     int K, int p0, int t0) {                                                                   \
        __m256 acc[R][T][2];                                                                                    \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                     \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps(); \
        const float *xt = x + (long)t0 * ldx;                                                                   \
        for (int k = 0; k < K; k++) {                                                                           \
            __m256 xb[T];                                                                                       \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) xb[t] = _mm256_broadcast_ss(xt + t * ldx + k);  \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                               \
                __m256 lo, hi;                                                                                  \
                LOAD(w, ((long)(p0 + r) * K + k) * 16, &lo, &hi);                                               \
                _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                           \
                    acc[r][t][0] = _mm256_fmadd_ps(lo, xb[t], acc[r][t][0]);                                    \
                    acc[r][t][1] = _mm256_fmadd_ps(hi, xb[t], acc[r][t][1]);                                    \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                   \
            const int n0 = (p0 + r) * 16;                                                                       \
            __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();                                          \
            float tmp[16];                                                                                      \
            const int full = n0 + 16 <= N;                                                                      \
            if (bias && full) {                                                                                 \
                b0 = _mm256_loadu_ps(bias + n0);                                                                \
                b1 = _mm256_loadu_ps(bias + n0 + 8);                                                            \
            }                                                                                                   \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                               \
                float *yt = y + (long)(t0 + t) * ldy + n0;                                                      \
                if (full) {                                                                                     \
                    _mm256_storeu_ps(yt, _mm256_add_ps(acc[r][t][0], b0));                                      \
                    _mm256_storeu_ps(yt + 8, _mm256_add_ps(acc[r][t][1], b1));                                  \
                } else { /* the last, padded panel: store only the real rows */                                 \
                    _mm256_storeu_ps(tmp, acc[r][t][0]);                                                        \
                    _mm256_storeu_ps(tmp + 8, acc[r][t][1]);                                                    \
                    for (int j = 0; n0 + j < N; j++) yt[j] = bias ? tmp[j] + bias[n0 + j] : tmp[j];             \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

#define TILES(SUF, LOAD)                                                                                     \
    TILE(tile6x1_##SUF, LOAD, 6, 1)                                                                          \
    TILE(tile3x2_##SUF, LOAD, 3, 2)                                                                          \
    TILE(tile1x1_##SUF, LOAD, 1, 1)                                                                          \
    TILE(tile1x2_##SUF, LOAD, 1, 2)                                                                          \
    TILE(tile1x3_##SUF, LOAD, 1, 3)                                                                          \
    TILE(tile1x4_##SUF, LOAD, 1, 4)                                                                          \
    TILE(tile1x5_##SUF, LOAD, 1, 5)                                                                          \
    TILE(tile1x6_##SUF, LOAD, 1, 6)                                                                          \
    /* panels [pa, pb) x tokens [t0, t0+T) */                                                                \
    static void tiles_##SUF(const float *x, long ldx, const void *w, const float *bias, float *y, long ldy, \
                            int N, int K, int pa, int pb, int t0, int T) {                                   \
        int p = pa;                                                                                          \
        if (T == 1)                                                                                          \
            for (; p + 6 <= pb; p += 6) tile6x1_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0);                 \
        if (T == 2)                                                                                          \
            for (; p + 3 <= pb; p += 3) tile3x2_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0);                 \
        for (; p < pb; p++) {                                                                                \
            switch (T) {                                                                                     \
            case 1: tile1x1_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0); break;                              \
            case 2: tile1x2_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0); break;                              \
            case 3: tile1x3_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0); break;                              \
            case 4: tile1x4_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0); break;                              \
            case 5: tile1x5_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0); break;                              \
            default: tile1x6_##SUF(x, ldx, w, bias, y, ldy, N, K, p, t0); break;                             \
            }                                                                                                \
        }                                                                                                    \
    }

TILES(f32, load16_f32)
TILES(f16, load16_f16)
TILES(bf16, load16_bf16)

static unsigned int enter_ftz(void) {
    unsigned int old = _mm_getcsr();
    _mm_setcsr(old | 0x8040); /* FTZ | DAZ */
    return old;
}

static void leave_ftz(unsigned int old) { _mm_setcsr(old); }

#else /* portable scalar version: same panel layout, same per-output k order */

static inline float wload(const void *w, int dt, long i) {
    if (dt == DT_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (dt == DT_BF16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static void tiles_scalar(const float *x, long ldx, const void *w, int dt, const float *bias, float *y, long ldy,
                         int N, int K, int pa, int pb, int t0, int T) {
    for (int p = pa; p < pb; p++) {
        for (int t = t0; t < t0 + T; t++) {
            float acc[16] = {0};
            for (int k = 0; k < K; k++) {
                const float xv = x[(long)t * ldx + k];
                for (int j = 0; j < 16; j++) acc[j] = __builtin_fmaf(wload(w, dt, ((long)p * K + k) * 16 + j), xv, acc[j]);
            }
            for (int j = 0; j < 16 && p * 16 + j < N; j++) y[(long)t * ldy + p * 16 + j] = bias ? acc[j] + bias[p * 16 + j] : acc[j];
        }
    }
}

static unsigned int enter_ftz(void) { return 0; }
static void leave_ftz(unsigned int old) { (void)old; }
#endif

static void run_group(const float *x, long ldx, const void *w, int dt, const float *bias, float *y, long ldy, int N,
                      int K, int pa, int pb, int t0, int T) {
#if PANEL_SIMD
    if (dt == DT_F32) tiles_f32(x, ldx, w, bias, y, ldy, N, K, pa, pb, t0, T);
    else if (dt == DT_F16) tiles_f16(x, ldx, w, bias, y, ldy, N, K, pa, pb, t0, T);
    else tiles_bf16(x, ldx, w, bias, y, ldy, N, K, pa, pb, t0, T);
#else
    tiles_scalar(x, ldx, w, dt, bias, y, ldy, N, K, pa, pb, t0, T);
#endif
}

/* Token groups: M <= 6 is one group; more are split into ceil(M/6) groups of near-equal size,
 * and every group runs over one panel before the next panel is read, so a panel (K * 64 bytes
 * in fp32) is streamed from memory once and re-read from L2 by the other groups. */
static void run_range(const float *x, long ldx, const void *w, int dt, const float *bias, float *y, long ldy, int M,
                      int N, int K, int pa, int pb) {
    const int groups = (M + MAX_T - 1) / MAX_T;
    if (groups == 1) {
        run_group(x, ldx, w, dt, bias, y, ldy, N, K, pa, pb, 0, M);
        return;
    }
    for (int p = pa; p < pb; p++) {
        int t0 = 0;
        for (int g = 0; g < groups; g++) {
            const int T = (M - t0 + (groups - g) - 1) / (groups - g);
            run_group(x, ldx, w, dt, bias, y, ldy, N, K, p, p + 1, t0, T);
            t0 += T;
        }
    }
}

/* Tokens in blocks of MAX_M_BLOCK: a block's rows of x (48 x K fp32, 144 KiB at K = 768) stay
 * in L2 while every panel of the thread's range passes over them once. */
#define MAX_M_BLOCK 48

static void run_blocks(const float *x, long ldx, const void *w, int dt, const float *bias, float *y, long ldy, int M,
                       int N, int K, int pa, int pb) {
    for (int m0 = 0; m0 < M; m0 += MAX_M_BLOCK) {
        const int mb = M - m0 < MAX_M_BLOCK ? M - m0 : MAX_M_BLOCK;
        run_range(x + (long)m0 * ldx, ldx, w, dt, bias, y + (long)m0 * ldy, ldy, mb, N, K, pa, pb);
    }
}

/* The share of thread ith of nth: panels [P*ith/nth, P*(ith+1)/nth), all tokens. Callable from
 * inside an OpenMP region (each thread passes its own ith); no allocation, no synchronisation.
 * x: [M, ldx] fp32 rows; w: the packed panels of dtype dt (0 fp32, 1 fp16, 2 bf16); bias: [N] or
 * NULL; y: [M, ldy] fp32. */
void panel_gemm_part(const float *x, long ldx, const void *w, int dt, const float *bias, float *y, long ldy, int M,
                     int N, int K, int ith, int nth) {
    const int P = (N + 15) / 16;
    const int pa = (int)((long)P * ith / nth), pb = (int)((long)P * (ith + 1) / nth);
    if (pa >= pb || M <= 0) return;
    const unsigned int old = enter_ftz();
    run_blocks(x, ldx, w, dt, bias, y, ldy, M, N, K, pa, pb);
    leave_ftz(old);
}

#define SMALL_WORK (1L << 17) /* multiply-adds */

/* The whole product on num_threads threads of the OpenMP runtime (torch's). Returns 0, or -1
 * for a dtype or shape it does not take. */
int panel_gemm(const float *x, long ldx, const void *w, int dt, const float *bias, float *y, long ldy, int M, int N,
               int K, int num_threads) {
    if (dt < DT_F32 || dt > DT_BF16 || M < 0 || N <= 0 || K <= 0 || ldx < K || ldy < N) return -1;
    const int P = (N + 15) / 16;
    int nth = num_threads < 1 ? 1 : num_threads;
    if (nth > P) nth = P;
    /* waking a team costs more than it saves on a few microseconds of work (the split never
     * changes a result, so this is free to choose) */
    if ((long)M * P * 16 * K < SMALL_WORK) nth = 1;
    if (nth == 1) {
        panel_gemm_part(x, ldx, w, dt, bias, y, ldy, M, N, K, 0, 1);
        return 0;
    }
#pragma omp parallel num_threads(nth)
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void), omp_get_num_threads(void);
        panel_gemm_part(x, ldx, w, dt, bias, y, ldy, M, N, K, omp_get_thread_num(), omp_get_num_threads());
#else
        panel_gemm_part(x, ldx, w, dt, bias, y, ldy, M, N, K, 0, 1);
#endif
    }
    return 0;
}
