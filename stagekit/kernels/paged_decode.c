/* Decode attention over a paged KV cache, fp32, for the CPU.
 *
 * One query token per sequence. The cache of one layer is [num_blocks, kv_heads,
 * block_size, head_dim]: a block holds each KV head's rows contiguously, so a work item
 * streams whole 4 KiB runs instead of every kv_heads-th row. A sequence's token t lives
 * in block tables[b][t / block_size] at row t % block_size. Work item = (sequence, KV head): the G = q_heads / kv_heads query
 * heads that share a KV head are done together, so each key and value row is read once.
 * Softmax is computed online, one block at a time (running max and sum), so no score
 * buffer longer than a block is needed and the cache is read exactly once.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_BLOCK 256

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Returns 0, or -1 when the shapes exceed the kernel's fixed bounds (caller falls back). */
int paged_decode_f32(const float *q,        /* [B, Hq, D] */
                     const float *k_cache,  /* [NB, Hk, BS, D] */
                     const float *v_cache,  /* [NB, Hk, BS, D] */
                     const int32_t *tables, /* [B, max_blocks] */
                     const int32_t *lens,   /* [B] */
                     int B, int Hq, int Hk, int D, int BS, int max_blocks, float scale,
                     int num_threads, float *out /* [B, Hq, D] */) {
    const int G = Hq / Hk;
    if (G > MAX_GROUP || BS > MAX_BLOCK || D > 1024) return -1;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int b = 0; b < B; b++) {
        for (int g = 0; g < Hk; g++) {
            float m[MAX_GROUP], l[MAX_GROUP], s[MAX_GROUP][MAX_BLOCK];
            float *o = out + ((long)b * Hq + (long)g * G) * D;   /* [G, D], accumulated in place */
            const float *qg = q + ((long)b * Hq + (long)g * G) * D;
            const int L = lens[b];
            for (int h = 0; h < G; h++) { m[h] = -INFINITY; l[h] = 0.f; }
            memset(o, 0, sizeof(float) * (size_t)G * D);
            const int nblocks = (L + BS - 1) / BS;
            for (int i = 0; i < nblocks; i++) {
                const int n = (i + 1) * BS <= L ? BS : L - i * BS;
                const long base = (((long)tables[(long)b * max_blocks + i] * Hk + g) * BS) * D;
                const float *kb = k_cache + base, *vb = v_cache + base;
                for (int t = 0; t < n; t++)
                    for (int h = 0; h < G; h++) s[h][t] = dot(qg + (long)h * D, kb + (long)t * D, D) * scale;
                for (int h = 0; h < G; h++) {
                    float mb = m[h];
                    for (int t = 0; t < n; t++) mb = s[h][t] > mb ? s[h][t] : mb;
                    const float corr = expf(m[h] - mb);
                    float *oh = o + (long)h * D;
                    if (corr != 1.f) {
                        l[h] *= corr;
#pragma omp simd
                        for (int d = 0; d < D; d++) oh[d] *= corr;
                    }
                    m[h] = mb;
                    for (int t = 0; t < n; t++) {
                        const float p = expf(s[h][t] - mb);
                        const float *vt = vb + (long)t * D;
                        l[h] += p;
#pragma omp simd
                        for (int d = 0; d < D; d++) oh[d] += p * vt[d];
                    }
                }
            }
            for (int h = 0; h < G; h++) {
                const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
                float *oh = o + (long)h * D;
#pragma omp simd
                for (int d = 0; d < D; d++) oh[d] *= inv;
            }
        }
    }
    return 0;
}
