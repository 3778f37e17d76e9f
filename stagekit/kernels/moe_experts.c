/* A MoE layer's routed experts in one native call, for the CPU.
 *
 * The caller routes the T tokens of x (k choices each, or any list of (row, expert) pairs),
 * sorts the N pairs by local expert once (`order`: a stable sort, so within an expert the pairs
 * keep their order; `bounds[e]..bounds[e+1]` the sorted positions of local expert e; pairs of
 * experts held elsewhere sort after bounds[E] and are never computed) and passes every local
 * expert's panels (panel_gemm.c's layout): w13 of [2I, H] (gate rows then up rows) and w2 of
 * [H, I]. One OpenMP region then runs, with a barrier between phases:
 *   1. gather: xs[p] = x[order[p] / rpt] for the R = bounds[E] computed pairs (pos[i], the
 *      sorted position of pair i or -1 for a pair held elsewhere, is filled before the region)
 *   2. gu = xs @ w13^T per expert, every expert's panels split over all threads (experts write
 *      disjoint rows of gu, so one expert needs no barrier before the next)
 *   3. act = silu(gate) * up
 *   4. ys = act @ w2^T per expert, split the same way
 *   5. out[t] = sum over j = 0..k-1 of weight[t*k+j] * ys[pos[t*k+j]] (zero for a pair held
 *      elsewhere), added in j order: the products and the order of ExpertWeights' Python path
 *      (a weighted row, then sum_choices), so only SiLU's rounding differs from it. -std=c11
 *      keeps the compiler from contracting the multiply-add into an FMA.
 * Every value is computed by one thread in a fixed order, so results are bitwise equal for any
 * thread count. Activations and arithmetic are fp32; the panels are fp32, fp16 or bf16. Scratch
 * belongs to the caller: nothing is allocated here.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "panel_gemm.c"

extern int omp_get_thread_num(void), omp_get_num_threads(void);

typedef struct {
    int T, H, I, E;            /* rows of x, hidden, local intermediate, local experts */
    int wdt;                   /* the panels' dtype (panel_gemm.c's DT_*) */
    int N, rpt, k;             /* pairs; pair i's token is i / rpt; out row t adds pairs t*k .. t*k+k-1 */
    const float *x;            /* [T, H] */
    const int64_t *order;      /* [N]: pair indices sorted by local expert */
    const int64_t *bounds;     /* [E + 1] */
    const void *const *w13;    /* [E] panels of [2I, H] */
    const void *const *w2;     /* [E] panels of [H, I] */
    const float *weights;      /* [N] routing weight per pair, or NULL (unweighted) */
    float *xs, *gu, *act, *ys; /* scratch: [R, H] [R, 2I] [R, I] [R, H] */
    int64_t *pos;              /* scratch: [N] */
    float *out;                /* [N / k, H] */
} me_args;

static void expert_phase(const me_args *A, int ith, int nth) {
    const int H = A->H, I = A->I;
    const int64_t *b = A->bounds;
    for (int e = 0; e < A->E; e++) {
        const int n = (int)(b[e + 1] - b[e]);
        if (n > 0)
            panel_gemm_part(A->xs + b[e] * H, H, A->w13[e], A->wdt, NULL, A->gu + b[e] * 2 * I, 2L * I, n, 2 * I,
                            H, ith, nth);
    }
#pragma omp barrier
    const long R = (long)b[A->E], cells = R * I, c0 = cells * ith / nth, c1 = cells * (ith + 1) / nth;
    for (long c = c0; c < c1; c++) {
        const long r = c / I, j = c % I;
        const float g = A->gu[r * 2 * I + j], u = A->gu[r * 2 * I + I + j];
        A->act[c] = g / (1.0f + expf(-g)) * u;
    }
#pragma omp barrier
    for (int e = 0; e < A->E; e++) {
        const int n = (int)(b[e + 1] - b[e]);
        if (n > 0)
            panel_gemm_part(A->act + b[e] * I, I, A->w2[e], A->wdt, NULL, A->ys + b[e] * H, H, n, H, I, ith, nth);
    }
}

static void combine(const me_args *A, int t0, int t1) {
    const int H = A->H, k = A->k;
    for (int t = t0; t < t1; t++) {
        float *o = A->out + (long)t * H;
        for (int j = 0; j < k; j++) {
            const long i = (long)t * k + j, p = A->pos[i];
            const float w = A->weights ? A->weights[i] : 1.0f;
            const float *y = p >= 0 ? A->ys + p * H : NULL;
            for (int h = 0; h < H; h++) {
                /* a pair held elsewhere adds an exact zero, as the Python path's zero row does */
                const float v = y ? (A->weights ? w * y[h] : y[h]) : 0.0f;
                o[h] = j == 0 ? v : o[h] + v;
            }
        }
    }
}

/* Checks the routing the caller passed (a bad index would read or write out of bounds) and,
 * with `order` a permutation, fills pos. */
static int valid(const me_args *A) {
    if (A->T < 0 || A->H <= 0 || A->I <= 0 || A->E < 0 || A->wdt < DT_F32 || A->wdt > DT_BF16 || A->N < 0 ||
        A->rpt <= 0 || A->k <= 0 || A->N % A->k || A->bounds[0] != 0)
        return 0;
    for (int e = 0; e < A->E; e++)
        if (A->bounds[e + 1] < A->bounds[e]) return 0;
    if (A->bounds[A->E] > A->N) return 0;
    for (int i = 0; i < A->N; i++) A->pos[i] = -2;
    for (int p = 0; p < A->N; p++) {
        const int64_t i = A->order[p];
        if (i < 0 || i >= A->N || i / A->rpt >= A->T || A->pos[i] != -2) return 0;
        A->pos[i] = p < A->bounds[A->E] ? p : -1;
    }
    return 1;
}

/* Returns 0, or -1 for arguments it does not take (the caller keeps its other path). */
int moe_experts(const me_args *A, int num_threads) {
    if (!valid(A)) return -1;
    const long R = (long)A->bounds[A->E];
    int nth = num_threads < 1 ? 1 : num_threads;
    /* as in panel_gemm: waking a team costs more than a few microseconds of work saves */
    if (R * 3L * A->I * A->H < SMALL_WORK) nth = 1;
#pragma omp parallel num_threads(nth)
    {
        const int ith = omp_get_thread_num(), n = omp_get_num_threads();
        const unsigned int old = enter_ftz();
        for (long p = R * ith / n; p < R * (ith + 1) / n; p++)
            memcpy(A->xs + p * A->H, A->x + (A->order[p] / A->rpt) * A->H, sizeof(float) * (size_t)A->H);
#pragma omp barrier
        expert_phase(A, ith, n);
#pragma omp barrier
        const int rows = A->N / A->k;
        combine(A, (int)((long)rows * ith / n), (int)((long)rows * (ith + 1) / n));
        leave_ftz(old);
    }
    return 0;
}
