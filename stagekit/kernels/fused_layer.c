/* One decode step of a dense Llama-family decoder layer in one native call, for the CPU.
 *
 * Every sequence of the batch has one new token (B rows). With the residual stream carried
 * beside the hidden states (as stagekit's layers do), the layer is
 *   residual' = hidden + residual; x = RMSNorm1(residual')              (residual NULL: residual' = hidden)
 *   q,k,v = x @ Wqkv^T + b; RoPE(q, k) at each row's position; k, v -> the paged cache
 *   a = paged decode attention(q); o = a @ Wo^T + bo                    (the attention half)
 *   residual'' = o + residual'; x = RMSNorm2(residual'')
 *   out = (silu(x @ Wgate^T) * (x @ Wup^T)) @ Wdown^T                   (the MLP half)
 * and returns (out, residual''): the next layer (or the final norm) adds out to residual''.
 * The halves can run separately (phases 1 and 2) so that a tensor-parallel caller all-reduces
 * o and out between calls; phases 3 runs both.
 *
 * All phases run in one OpenMP parallel region on the runtime torch loaded (its thread count),
 * with a barrier between them: the matmuls split weight panels over threads (panel_gemm_part),
 * row-wise work splits rows or heads, attention takes (sequence, KV head) items dynamically
 * (paged_decode.c's item). Every value is computed by one thread in a fixed order, so results
 * are bitwise equal for any thread count. Each thread sets FTZ/DAZ for the call (MXCSR is per
 * thread). Weights, cos/sin caches and scratch buffers belong to the caller: nothing is
 * allocated here. Activations, the cache and all arithmetic are fp32; weights are panels in
 * fp32, fp16 or bf16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "paged_decode.c"
#include "panel_gemm.c"

extern int omp_get_thread_num(void), omp_get_num_threads(void);

typedef struct {
    int H, Hq, Hk, D, I;       /* hidden, local query heads, local KV heads, head dim, local intermediate */
    int wdt;                   /* the panels' dtype (panel_gemm.c's DT_*) */
    int max_pos;               /* rows of cos/sin */
    float eps, scale;
    const float *norm1, *norm2;/* [H] */
    const void *qkv_w;         /* panels of [(Hq + 2 Hk) D, H] */
    const float *qkv_b;        /* [(Hq + 2 Hk) D] or NULL */
    const void *o_w;           /* panels of [H, Hq D] */
    const float *o_b;          /* [H] or NULL (a TP caller adds it after the all-reduce) */
    const void *gu_w;          /* panels of [2 I, H]: gate rows then up rows */
    const void *down_w;        /* panels of [H, I] */
    const float *cos, *sin;    /* [max_pos, D], RotaryEmbedding's caches */
} fl_layer;

typedef struct {
    int B, BS, max_blocks;
    const int64_t *positions, *wblocks, *wrows; /* [B]: each row's position, KV block and row in it */
    const int32_t *tables, *lens;               /* [B, max_blocks], [B] (lens include the new token) */
    float *xn, *qkv, *q, *attn, *o, *gu, *act;  /* scratch: [B,H] [B,Nqkv] [B,HqD] [B,HqD] [B,H] [B,2I] [B,I] */
} fl_step;

/* rows [r0, r1): res_out = hidden (+ residual); xn = RMSNorm(res_out) * w. */
static void add_norm(const float *hidden, const float *residual, const float *w, float eps, int H, int r0, int r1,
                     float *res_out, float *xn) {
    for (int b = r0; b < r1; b++) {
        const float *h = hidden + (long)b * H;
        float *r = res_out + (long)b * H, *x = xn + (long)b * H;
        double ss = 0.0;
        for (int i = 0; i < H; i++) {
            const float v = residual ? h[i] + residual[(long)b * H + i] : h[i];
            r[i] = v;
            ss += (double)v * v;
        }
        const float inv = 1.0f / sqrtf((float)(ss / H) + eps);
        for (int i = 0; i < H; i++) x[i] = w[i] * (r[i] * inv);
    }
}

/* RoPE like transformers: x*cos + rotate_half(x)*sin, two products and a sum (no FMA: -std=c11). */
static void rope(const float *src, float *dst, const float *c, const float *s, int D) {
    const int half = D / 2;
    float tmp[MAX_DIM];
    for (int d = 0; d < half; d++) {
        const float a = src[d] * c[d], b = -src[d + half] * s[d];
        tmp[d] = a + b;
    }
    for (int d = half; d < D; d++) {
        const float a = src[d] * c[d], b = src[d - half] * s[d];
        tmp[d] = a + b;
    }
    memcpy(dst, tmp, sizeof(float) * (size_t)D);
}

static void attention_half(const fl_layer *L, const fl_step *S, float *kc, float *vc, const float *hidden,
                           const float *residual, float *out, float *res_out, int ith, int nth) {
    const int B = S->B, H = L->H, Hq = L->Hq, Hk = L->Hk, D = L->D, Nqkv = (Hq + 2 * Hk) * D;
    add_norm(hidden, residual, L->norm1, L->eps, H, B * ith / nth, B * (ith + 1) / nth, res_out, S->xn);
#pragma omp barrier
    panel_gemm_part(S->xn, H, L->qkv_w, L->wdt, L->qkv_b, S->qkv, Nqkv, B, Nqkv, H, ith, nth);
#pragma omp barrier
    /* items: (row, head) over Hq query heads then Hk KV heads; a KV item also writes v */
    for (int it = ith; it < B * (Hq + Hk); it += nth) {
        const int b = it / (Hq + Hk), h = it % (Hq + Hk);
        const int64_t pos = S->positions[b];
        const float *c = L->cos + pos * D, *s = L->sin + pos * D, *row = S->qkv + (long)b * Nqkv;
        if (h < Hq) {
            rope(row + (long)h * D, S->q + ((long)b * Hq + h) * D, c, s, D);
        } else {
            const int j = h - Hq;
            const long slot = ((S->wblocks[b] * Hk + j) * S->BS + S->wrows[b]) * D;
            rope(row + (long)(Hq + j) * D, kc + slot, c, s, D);
            memcpy(vc + slot, row + (long)(Hq + Hk + j) * D, sizeof(float) * (size_t)D);
        }
    }
#pragma omp barrier
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hk; g++)
            paged_decode_f32_item(S->q, kc, vc, S->tables, S->lens, Hq, Hk, D, S->BS, S->max_blocks, L->scale,
                                  S->attn, b, g);
    /* (the omp for ends with a barrier) */
    panel_gemm_part(S->attn, (long)Hq * D, L->o_w, L->wdt, L->o_b, out, H, B, H, Hq * D, ith, nth);
}

static void mlp_half(const fl_layer *L, const fl_step *S, const float *hidden, const float *residual, float *out,
                     float *res_out, int ith, int nth) {
    const int B = S->B, H = L->H, I = L->I;
    add_norm(hidden, residual, L->norm2, L->eps, H, B * ith / nth, B * (ith + 1) / nth, res_out, S->xn);
#pragma omp barrier
    panel_gemm_part(S->xn, H, L->gu_w, L->wdt, NULL, S->gu, 2 * I, B, 2 * I, H, ith, nth);
#pragma omp barrier
    const long n = (long)B * I, a = n * ith / nth, e = n * (ith + 1) / nth;
    for (long i = a; i < e; i++) {
        const long b = i / I, j = i % I;
        const float g = S->gu[b * 2 * I + j], u = S->gu[b * 2 * I + I + j];
        S->act[i] = g / (1.0f + expf(-g)) * u;
    }
#pragma omp barrier
    panel_gemm_part(S->act, I, L->down_w, L->wdt, NULL, out, H, B, H, I, ith, nth);
}

/* phases: 1 the attention half (out = o, res_out = residual'), 2 the MLP half (hidden = o,
 * residual = residual'), 3 both. kc, vc: this layer's [num_blocks, Hk, BS, D] fp32 caches.
 * hidden, residual (or NULL), out, res_out: [B, H] fp32; out and res_out must not alias the
 * inputs' other rows (res_out may be residual itself). Returns 0, or -1 for shapes it does not
 * take (the caller keeps its other path). */
int fused_layer(const fl_layer *L, const fl_step *S, float *kc, float *vc, const float *hidden, const float *residual,
                float *out, float *res_out, int phases, int num_threads) {
    if (L->Hk <= 0 || L->Hq % L->Hk || L->Hq / L->Hk > MAX_GROUP || S->BS > MAX_BLOCK || L->D > MAX_DIM ||
        L->D % 2 || L->wdt < DT_F32 || L->wdt > DT_BF16 || phases < 1 || phases > 3 || S->B <= 0)
        return -1;
    const int nth = num_threads < 1 ? 1 : num_threads;
#pragma omp parallel num_threads(nth)
    {
        const int ith = omp_get_thread_num(), n = omp_get_num_threads();
        const unsigned int old = enter_ftz();
        if (phases == 1) {
            attention_half(L, S, kc, vc, hidden, residual, out, res_out, ith, n);
        } else if (phases == 2) {
            mlp_half(L, S, hidden, residual, out, res_out, ith, n);
        } else {
            attention_half(L, S, kc, vc, hidden, residual, S->o, res_out, ith, n);
#pragma omp barrier
            mlp_half(L, S, S->o, res_out, out, res_out, ith, n);
        }
        leave_ftz(old);
    }
    return 0;
}
