/* Decode attention over a paged KV cache, for the CPU; the cache in fp32, bf16 or fp16,
 * the queries, the output and all arithmetic in fp32.
 *
 * One query token per sequence. The cache of one layer is [num_blocks, kv_heads,
 * block_size, head_dim]: a block holds each KV head's rows contiguously, so a work item
 * streams whole runs instead of every kv_heads-th row. A sequence's token t lives in block
 * tables[b][t / block_size] at row t % block_size. Work item = (sequence, KV head): the
 * G = q_heads / kv_heads query heads that share a KV head are done together, so each key
 * and value row is read once. Softmax is computed online, one block at a time (running max
 * and sum), so no score buffer longer than a block is needed and the cache is read once.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_BLOCK 256
#define MAX_DIM 1024

static inline float load_f32(const float *p, int i) { return p[i]; }

static inline float load_bf16(const uint16_t *p, int i) {
    uint32_t u = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float load_f16(const _Float16 *p, int i) { return (float)p[i]; }

/* One kernel per cache element type T, reading elements with LOAD: NAME##_item does work
 * item (sequence b, KV head g) and is what a fused layer calls from inside its own OpenMP
 * region; NAME opens the region itself. */
#define PAGED_DECODE(NAME, T, LOAD)                                                                 \
    static void NAME##_item(const float *q, const T *k_cache, const T *v_cache, const int32_t *tables, \
                            const int32_t *lens, int Hq, int Hk, int D, int BS, int max_blocks,     \
                            float scale, float *out, int b, int g) {                                \
        const int G = Hq / Hk;                                                                      \
        {                                                                                           \
            {                                                                                       \
                float m[MAX_GROUP], l[MAX_GROUP], s[MAX_GROUP][MAX_BLOCK], row[MAX_DIM];            \
                float *o = out + ((long)b * Hq + (long)g * G) * D; /* [G, D], accumulated here */   \
                const float *qg = q + ((long)b * Hq + (long)g * G) * D;                             \
                const int L = lens[b];                                                              \
                for (int h = 0; h < G; h++) { m[h] = -INFINITY; l[h] = 0.f; }                       \
                memset(o, 0, sizeof(float) * (size_t)G * D);                                        \
                const int nblocks = (L + BS - 1) / BS;                                              \
                for (int i = 0; i < nblocks; i++) {                                                 \
                    const int n = (i + 1) * BS <= L ? BS : L - i * BS;                              \
                    const long base = (((long)tables[(long)b * max_blocks + i] * Hk + g) * BS) * D; \
                    const T *kb = k_cache + base, *vb = v_cache + base;                             \
                    for (int t = 0; t < n; t++) {                                                   \
                        const T *kt = kb + (long)t * D;                                             \
                        _Pragma("omp simd")                                                         \
                        for (int d = 0; d < D; d++) row[d] = LOAD(kt, d);                           \
                        for (int h = 0; h < G; h++) {                                               \
                            const float *qh = qg + (long)h * D;                                     \
                            float acc = 0.f;                                                        \
                            _Pragma("omp simd reduction(+ : acc)")                                  \
                            for (int d = 0; d < D; d++) acc += qh[d] * row[d];                      \
                            s[h][t] = acc * scale;                                                  \
                        }                                                                           \
                    }                                                                               \
                    for (int h = 0; h < G; h++) {                                                   \
                        float mb = m[h];                                                            \
                        for (int t = 0; t < n; t++) mb = s[h][t] > mb ? s[h][t] : mb;               \
                        const float corr = expf(m[h] - mb);                                         \
                        float *oh = o + (long)h * D;                                                \
                        if (corr != 1.f) {                                                          \
                            l[h] *= corr;                                                           \
                            _Pragma("omp simd")                                                     \
                            for (int d = 0; d < D; d++) oh[d] *= corr;                              \
                        }                                                                           \
                        m[h] = mb;                                                                  \
                        for (int t = 0; t < n; t++) s[h][t] = expf(s[h][t] - mb);                   \
                    }                                                                               \
                    for (int t = 0; t < n; t++) {                                                   \
                        const T *vt = vb + (long)t * D;                                             \
                        _Pragma("omp simd")                                                         \
                        for (int d = 0; d < D; d++) row[d] = LOAD(vt, d);                           \
                        for (int h = 0; h < G; h++) {                                               \
                            const float p = s[h][t];                                                \
                            float *oh = o + (long)h * D;                                            \
                            l[h] += p;                                                              \
                            _Pragma("omp simd")                                                     \
                            for (int d = 0; d < D; d++) oh[d] += p * row[d];                        \
                        }                                                                           \
                    }                                                                               \
                }                                                                                   \
                for (int h = 0; h < G; h++) {                                                       \
                    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;                                \
                    float *oh = o + (long)h * D;                                                    \
                    _Pragma("omp simd")                                                             \
                    for (int d = 0; d < D; d++) oh[d] *= inv;                                       \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    int NAME(const float *q, const T *k_cache, const T *v_cache, const int32_t *tables,             \
             const int32_t *lens, int B, int Hq, int Hk, int D, int BS, int max_blocks, float scale, \
             int num_threads, float *out) {                                                         \
        if (Hq / Hk > MAX_GROUP || BS > MAX_BLOCK || D > MAX_DIM) return -1;                        \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)")      \
        for (int b = 0; b < B; b++)                                                                 \
            for (int g = 0; g < Hk; g++)                                                            \
                NAME##_item(q, k_cache, v_cache, tables, lens, Hq, Hk, D, BS, max_blocks, scale, out, b, g); \
        return 0;                                                                                   \
    }

/* Each returns 0, or -1 when the shapes exceed the kernel's fixed bounds (caller falls back).
 * q: [B, Hq, D] fp32; caches: [NB, Hk, BS, D]; tables: [B, max_blocks]; lens: [B]; out: [B, Hq, D] fp32. */
PAGED_DECODE(paged_decode_f32, float, load_f32)
PAGED_DECODE(paged_decode_bf16, uint16_t, load_bf16)
PAGED_DECODE(paged_decode_f16, _Float16, load_f16)
