/* One step of a shared-memory collective: publish this rank's chunk, wait for the peers',
 * and (for all-reduce) sum every rank's chunk in rank order in fp32.
 *
 * The segment layout is stagekit/kernels/shm_collectives.py's (keep them in step):
 * 2 * world control blocks of CTRL_BYTES, ctrl(rank, seq & 1), then from data_offset the data
 * slots, slot(rank, seq & 1) at data_offset + (rank * 2 + (seq & 1)) * slot_bytes. A rank
 * fills its slot and its control fields, then stores seq with release order; a reader
 * loads the peer's seq with acquire order before it reads anything the peer wrote. Two
 * parities suffice: a rank posts step seq + 2 into the same slot only after every peer
 * posted seq + 1, which each peer does only after it finished reading step seq.
 *
 * Waiting: spin (pause) for SPIN_NS, then sched_yield until YIELD_NS, then sleeps that
 * grow to MAX_SLEEP_NS, so an idle rank costs little CPU and ranks oversubscribing the
 * cores give theirs up fast. From the yield phase on, peers' liveness is checked every
 * LIVENESS_NS (a pidfd that polls readable, or kill(pid, 0) == ESRCH) and the deadline
 * is enforced. Return codes: 0, or SHM_TIMEOUT / SHM_DEAD / SHM_MISMATCH with ctx->who set
 * to the peer's rank.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define CTRL_BYTES 256
#define MAX_RANKS 16
#define SHM_TIMEOUT (-1)
#define SHM_DEAD (-2)
#define SHM_MISMATCH (-3)
#define SPIN_NS 20000L
#define YIELD_NS 1000000L
#define MAX_SLEEP_NS 500000L
#define LIVENESS_NS 5000000L

typedef struct {
    _Atomic uint64_t seq; /* the step this block describes; 0 = never posted */
    uint32_t op;          /* which collective, so ranks calling different ones fail loudly */
    uint32_t pad;
    int64_t nbytes;       /* bytes this rank publishes in total (all chunks) */
    int64_t aux;          /* per collective: all-to-all's row size */
    int64_t counts[MAX_RANKS];
} ctrl_t;

_Static_assert(sizeof(ctrl_t) <= CTRL_BYTES, "control block overflows its slot");

/* What a rank knows about its segment and its peers: one pointer instead of a dozen ctypes
 * arguments per call (their conversion costs more than a small collective's copy). */
typedef struct {
    char *base;
    long data_offset, slot_bytes;
    int world, rank;
    double timeout_s;
    int pidfds[MAX_RANKS], pids[MAX_RANKS];
    int who; /* out: the peer a non-zero return code is about */
} shm_ctx_t;

static inline ctrl_t *ctrl_at(const shm_ctx_t *x, int rank, uint64_t seq) {
    return (ctrl_t *)(x->base + ((long)rank * 2 + (long)(seq & 1)) * CTRL_BYTES);
}

static inline char *slot_at(const shm_ctx_t *x, int rank, uint64_t seq) {
    return x->base + x->data_offset + ((long)rank * 2 + (long)(seq & 1)) * x->slot_bytes;
}

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* A peer that has not posted step seq and whose process is gone (one that posted and then
 * exited may have finished cleanly). */
static int dead_peer(const shm_ctx_t *x, uint64_t seq) {
    for (int r = 0; r < x->world; r++) {
        if (r == x->rank || atomic_load_explicit(&ctrl_at(x, r, seq)->seq, memory_order_acquire) >= seq) continue;
        if (x->pidfds[r] >= 0) {
            struct pollfd p = {.fd = x->pidfds[r], .events = POLLIN};
            if (poll(&p, 1, 0) > 0) return r; /* readable: the process has exited */
        } else if (x->pids[r] > 0 && kill(x->pids[r], 0) != 0 && errno == ESRCH) {
            return r;
        }
    }
    return -1;
}

/* Publish step seq: len bytes of src into this rank's slot, then the control fields, then seq. */
int shm_post(shm_ctx_t *x, uint64_t seq, uint32_t op, int64_t nbytes, int64_t aux, const int64_t *counts,
             const void *src, long len) {
    ctrl_t *c = ctrl_at(x, x->rank, seq);
    if (len > 0) memcpy(slot_at(x, x->rank, seq), src, (size_t)len);
    c->op = op;
    c->nbytes = nbytes;
    c->aux = aux;
    for (int r = 0; r < x->world && counts; r++) c->counts[r] = counts[r];
    atomic_store_explicit(&c->seq, seq, memory_order_release);
    return 0;
}

/* Waits until every peer posted step seq; checks they run the same collective (op) on the
 * same number of bytes (when nbytes >= 0). */
int shm_wait(shm_ctx_t *x, uint64_t seq, uint32_t op, int64_t nbytes) {
    const long start = now_ns();
    const long deadline = start + (long)(x->timeout_s * 1e9);
    long next_liveness = start + YIELD_NS, sleep_ns = 20000L;
    for (int r = 0; r < x->world; r++) {
        if (r == x->rank) continue;
        ctrl_t *c = ctrl_at(x, r, seq);
        for (unsigned spins = 0;; spins++) {
            if (atomic_load_explicit(&c->seq, memory_order_acquire) >= seq) break;
            if (spins < 64 || (spins & 63)) {
                CPU_RELAX();
                continue;
            }
            long t = now_ns();
            if (t - start < SPIN_NS) continue;
            if (t >= next_liveness) {
                int d = dead_peer(x, seq);
                if (d >= 0) { x->who = d; return SHM_DEAD; }
                next_liveness = t + LIVENESS_NS;
            }
            if (t >= deadline) { x->who = r; return SHM_TIMEOUT; }
            if (t - start < YIELD_NS) {
                sched_yield();
            } else {
                struct timespec ts = {0, sleep_ns};
                nanosleep(&ts, NULL);
                if (sleep_ns < MAX_SLEEP_NS) sleep_ns *= 2;
            }
        }
        if (c->op != op || (nbytes >= 0 && c->nbytes != nbytes)) { x->who = r; return SHM_MISMATCH; }
    }
    return 0;
}

/* One all-gather step: publish len bytes, then copy every rank's len bytes to dst + r * dst_stride. */
int shm_all_gather(shm_ctx_t *x, uint64_t seq, uint32_t op, int64_t nbytes, const void *src, long len, char *dst,
                   long dst_stride) {
    shm_post(x, seq, op, nbytes, 0, NULL, src, len);
    int rc = shm_wait(x, seq, op, nbytes);
    if (rc != 0) return rc;
    for (int r = 0; r < x->world && len > 0; r++) memcpy(dst + r * dst_stride, slot_at(x, r, seq), (size_t)len);
    return 0;
}

/* One broadcast step: root publishes len bytes of buf, every other rank copies them into buf. */
int shm_broadcast(shm_ctx_t *x, uint64_t seq, uint32_t op, int64_t nbytes, int root, char *buf, long len) {
    shm_post(x, seq, op, nbytes, 0, NULL, buf, x->rank == root ? len : 0);
    int rc = shm_wait(x, seq, op, nbytes);
    if (rc == 0 && x->rank != root && len > 0) memcpy(buf, slot_at(x, root, seq), (size_t)len);
    return rc;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define BLOCK 1024

/* dst[i] = ((slot_0[i] + slot_1[i]) + slot_2[i]) + ... in fp32, rounded once to the dtype. */
#define REDUCE(NAME, T, LOAD, STORE)                                                              \
    static void NAME(const shm_ctx_t *x, uint64_t seq, T *dst, long n) {                          \
        float acc[BLOCK];                                                                         \
        for (long i0 = 0; i0 < n; i0 += BLOCK) {                                                  \
            const long m = n - i0 < BLOCK ? n - i0 : BLOCK;                                       \
            const T *s = (const T *)slot_at(x, 0, seq) + i0;                                        \
            for (long i = 0; i < m; i++) acc[i] = LOAD(s[i]);                                     \
            for (int r = 1; r < x->world; r++) {                                                  \
                s = (const T *)slot_at(x, r, seq) + i0;                                            \
                for (long i = 0; i < m; i++) acc[i] += LOAD(s[i]);                                \
            }                                                                                     \
            for (long i = 0; i < m; i++) dst[i0 + i] = STORE(acc[i]);                             \
        }                                                                                         \
    }

#define ID(x) (x)
#define TO_F32(x) ((float)(x))
#define TO_F16(x) ((_Float16)(x))
REDUCE(reduce_f32, float, ID, ID)
REDUCE(reduce_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
REDUCE(reduce_f16, _Float16, TO_F32, TO_F16)

/* One all-reduce step over n elements of buf (n * itemsize <= slot_bytes), summed in place.
 * dtype: 0 fp32, 1 bf16, 2 fp16. */
int shm_all_reduce(shm_ctx_t *x, uint64_t seq, uint32_t op, int dtype, void *buf, long n) {
    const long nbytes = n * (dtype == 0 ? 4 : 2);
    shm_post(x, seq, op, nbytes, 0, NULL, buf, nbytes);
    int rc = shm_wait(x, seq, op, nbytes);
    if (rc != 0) return rc;
    if (dtype == 0) reduce_f32(x, seq, (float *)buf, n);
    else if (dtype == 1) reduce_bf16(x, seq, (uint16_t *)buf, n);
    else reduce_f16(x, seq, (_Float16 *)buf, n);
    return 0;
}
