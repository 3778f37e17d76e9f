/* A ring of chunks in shared memory: one writer broadcasts messages to n readers, in order.
 *
 * Layout (stagekit/kernels/shm_ring.py mirrors the first 32 bytes): a header line (magic,
 * n_readers, n_chunks, chunk_bytes), a line with the futex word `wake` and the `sleepers`
 * count, one line per reader holding `done` (the last chunk it finished), one line per chunk
 * (seq, len, total), then from a page boundary the chunks' payloads. Chunk sequence numbers
 * start at 1; chunk s lives in slot (s - 1) % n_chunks. A message of `total` bytes takes
 * max(1, ceil(total / chunk_bytes)) consecutive chunks, each carrying `total`.
 *
 * Ordering: the writer fills chunk s only once every reader's `done` >= s - n_chunks (it
 * waits, never skips a slot: vLLM bug #5801), writes payload and len/total, then stores seq.
 * A reader loads seq == s before it reads the payload and stores `done` = s after, so the
 * writer's next use of the slot happens after the reader's copy. No per-chunk reader flags
 * to reset: each reader's single counter says how far it got.
 *
 * Waking: a reader polls (pause, no sched_yield) for spin_ns from the start of its wait,
 * then announces itself in `sleepers`, re-checks and sleeps on FUTEX_WAIT(`wake`) (shared, not
 * private: the mapping is MAP_SHARED across processes) for sleep_ms at a time, checking
 * between sleeps that the writer still lives. The writer bumps `wake` after each chunk and
 * calls FUTEX_WAKE only when `sleepers` > 0, so a busy ring costs no syscall. The store of seq,
 * the bump and the load of `sleepers` (writer) and the increment of `sleepers`, the load of
 * `wake` and the re-check of seq (reader) are seq_cst, so either the reader sees the chunk or
 * the writer sees the sleeper, and a bump between the reader's load of `wake` and its
 * FUTEX_WAIT makes the wait return at once. A writer facing a full ring polls (it happens
 * only when a reader is stuck or dead), checking the readers' liveness and a deadline.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h> /* sched_yield: the writer's wait */
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define LINE 64
#define MAX_READERS 16
#define RING_MAGIC 0x676e6972626d7473ULL /* "stmbring" */
#define RING_TIMEOUT (-1)
#define RING_DEAD (-2)
#define RING_INTR (-4)
#define WRITER_SPIN_NS 50000L
#define WRITER_YIELD_NS 1000000L
#define WRITER_MAX_SLEEP_NS 1000000L
#define LIVENESS_NS 5000000L

typedef struct {
    uint64_t magic;
    int64_t n_readers, n_chunks, chunk_bytes;
    char pad0[LINE - 32];
    _Atomic uint32_t wake;     /* futex word: bumped after every published chunk */
    _Atomic uint32_t sleepers; /* readers in, or about to enter, FUTEX_WAIT */
    char pad1[LINE - 8];
    struct {
        _Atomic uint64_t done; /* the last chunk this reader finished (0: none) */
        char pad[LINE - 8];
    } reader[MAX_READERS];
} ring_hdr_t;

typedef struct {
    _Atomic uint64_t seq; /* which chunk the slot holds, stored last (0: never written) */
    int64_t len;          /* payload bytes in this chunk */
    int64_t total;        /* the whole message's bytes */
    char pad[LINE - 24];
} chunk_hdr_t;

/* What one process knows about the ring: one pointer per call instead of many ctypes arguments. */
typedef struct {
    char *base;
    int reader; /* this process's reader index; -1 for the writer */
    int writer_pid, writer_pidfd, parent_is_writer;
    int reader_pids[MAX_READERS], reader_pidfds[MAX_READERS];
    uint64_t next;    /* the next chunk to write or read */
    long spin_ns;     /* reader: how long a wait polls before it sleeps */
    long sleep_ms;    /* reader: one futex sleep, between liveness checks */
    double timeout_s; /* writer: how long it waits for a reader to free a slot */
    int who;          /* out: the reader a RING_DEAD / RING_TIMEOUT is about */
} ring_ctx_t;

static inline ring_hdr_t *hdr(const ring_ctx_t *x) { return (ring_hdr_t *)x->base; }

static inline long data_offset(long n_chunks) {
    long head = (long)sizeof(ring_hdr_t) + n_chunks * (long)sizeof(chunk_hdr_t);
    return (head + 4095) / 4096 * 4096;
}

static inline chunk_hdr_t *chunk_at(const ring_ctx_t *x, uint64_t s) {
    return (chunk_hdr_t *)(x->base + sizeof(ring_hdr_t)) + (long)((s - 1) % (uint64_t)hdr(x)->n_chunks);
}

static inline char *payload_at(const ring_ctx_t *x, uint64_t s) {
    const ring_hdr_t *h = hdr(x);
    return x->base + data_offset(h->n_chunks) + (long)((s - 1) % (uint64_t)h->n_chunks) * h->chunk_bytes;
}

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static int exited(int pidfd, int pid) {
    if (pidfd >= 0) {
        struct pollfd p = {.fd = pidfd, .events = POLLIN};
        return poll(&p, 1, 0) > 0; /* readable once the process exited, zombie or not */
    }
    return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
}

long ring_segment_bytes(long n_chunks, long chunk_bytes) { return data_offset(n_chunks) + n_chunks * chunk_bytes; }

/* Lay out a zero-filled segment (a fresh ftruncate'd file). */
int ring_init(char *base, long n_readers, long n_chunks, long chunk_bytes) {
    if (n_readers < 1 || n_readers > MAX_READERS || n_chunks < 1 || chunk_bytes < 1) return -1;
    ring_hdr_t *h = (ring_hdr_t *)base;
    h->n_readers = n_readers;
    h->n_chunks = n_chunks;
    h->chunk_bytes = chunk_bytes;
    atomic_store(&h->wake, 0);
    atomic_store(&h->sleepers, 0);
    for (int r = 0; r < MAX_READERS; r++) atomic_store(&h->reader[r].done, 0);
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = RING_MAGIC;
    return 0;
}

/* Reader: wait until chunk s is published. `interruptible`: a signal returns RING_INTR (so
 * Python runs its handlers); only between messages, never in the middle of one. */
static int wait_chunk(ring_ctx_t *x, chunk_hdr_t *c, uint64_t s, int interruptible) {
    ring_hdr_t *h = hdr(x);
    const long start = now_ns();
    for (unsigned spins = 0;; spins++) {
        if (atomic_load_explicit(&c->seq, memory_order_acquire) == s) return 0;
        if ((spins & 63) || now_ns() - start < x->spin_ns) {
            CPU_RELAX();
            continue;
        }
        int intr = 0;
        atomic_fetch_add(&h->sleepers, 1);
        uint32_t w = atomic_load(&h->wake);
        if (atomic_load(&c->seq) != s) {
            struct timespec ts = {x->sleep_ms / 1000, (x->sleep_ms % 1000) * 1000000L};
            if (syscall(SYS_futex, &h->wake, FUTEX_WAIT, w, &ts, NULL, 0) != 0 && errno == EINTR) intr = 1;
        }
        atomic_fetch_sub(&h->sleepers, 1);
        if (atomic_load_explicit(&c->seq, memory_order_acquire) == s) return 0;
        if (exited(x->writer_pidfd, x->writer_pid) || (x->parent_is_writer && getppid() != x->writer_pid))
            return RING_DEAD;
        if (intr && interruptible) return RING_INTR;
    }
}

/* Reader: the next message. Returns its size; if that exceeds cap nothing is consumed (call
 * again with a buffer that large), else it is copied to dst. Or RING_DEAD / RING_INTR. */
int64_t ring_read(ring_ctx_t *x, char *dst, int64_t cap) {
    ring_hdr_t *h = hdr(x);
    uint64_t s = x->next;
    chunk_hdr_t *c = chunk_at(x, s);
    int rc = wait_chunk(x, c, s, 1);
    if (rc != 0) return rc;
    const int64_t total = c->total;
    if (total > cap) return total;
    for (int64_t off = 0;;) {
        memcpy(dst + off, payload_at(x, s), (size_t)c->len);
        off += c->len;
        atomic_store_explicit(&h->reader[x->reader].done, s, memory_order_release);
        x->next = ++s;
        if (off >= total) return total;
        c = chunk_at(x, s);
        if ((rc = wait_chunk(x, c, s, 0)) != 0) return rc;
    }
}

/* Writer: wait until every reader finished the chunk that slot s last held. */
static int wait_slot(ring_ctx_t *x, uint64_t s) {
    ring_hdr_t *h = hdr(x);
    if (s <= (uint64_t)h->n_chunks) return 0;
    const uint64_t need = s - (uint64_t)h->n_chunks;
    const long start = now_ns(), deadline = start + (long)(x->timeout_s * 1e9);
    long next_liveness = start + WRITER_YIELD_NS, sleep_ns = 20000L;
    for (int r = 0; r < h->n_readers; r++) {
        for (unsigned spins = 0;; spins++) {
            if (atomic_load_explicit(&h->reader[r].done, memory_order_acquire) >= need) break;
            if (spins < 128) {
                CPU_RELAX();
                continue;
            }
            long t = now_ns();
            if (t - start < WRITER_SPIN_NS) continue;
            if (t >= next_liveness) {
                if (exited(x->reader_pidfds[r], x->reader_pids[r])) { x->who = r; return RING_DEAD; }
                next_liveness = t + LIVENESS_NS;
            }
            if (t >= deadline) { x->who = r; return RING_TIMEOUT; }
            if (t - start < WRITER_YIELD_NS) {
                sched_yield();
            } else {
                struct timespec ts = {0, sleep_ns};
                nanosleep(&ts, NULL);
                if (sleep_ns < WRITER_MAX_SLEEP_NS) sleep_ns *= 2;
            }
        }
    }
    return 0;
}

/* Writer: publish total bytes of src as the next message; 0, or RING_DEAD / RING_TIMEOUT. */
int ring_write(ring_ctx_t *x, const char *src, int64_t total) {
    ring_hdr_t *h = hdr(x);
    int64_t off = 0;
    do {
        const uint64_t s = x->next;
        int rc = wait_slot(x, s);
        if (rc != 0) return rc;
        chunk_hdr_t *c = chunk_at(x, s);
        const int64_t len = total - off < h->chunk_bytes ? total - off : h->chunk_bytes;
        if (len > 0) memcpy(payload_at(x, s), src + off, (size_t)len);
        c->len = len;
        c->total = total;
        atomic_store(&c->seq, s);
        x->next = s + 1;
        off += len;
        atomic_fetch_add(&h->wake, 1);
        if (atomic_load(&h->sleepers) > 0) syscall(SYS_futex, &h->wake, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    } while (off < total);
    return 0;
}
