"""One writer broadcasts byte messages to a few reader processes on its host, in order,
through a shared-memory ring of chunks (stagekit/kernels/shm_ring.c has the protocol).

Made for a stage's TP rank 0 and the workers it spawns: rank 0 creates the segment before
spawning them (``ShmBroadcaster.create``) and passes its name in their arguments; each
worker attaches (``ShmBroadcastReader.attach``) before it says it is ready, and rank 0 then
unlinks the name (``unlink``), so nothing is left in /dev/shm however the processes end from
then on. A rank 0 killed before that leaves the name behind; the next bootstrap on the host
sweeps it (the name starts like the collectives' segments, ``shm_segment.sweep_stale``).

Why a ring and not the pipe: the writer pickles once and writes once for all readers, a
message costs a memcpy and a store instead of a write system call per worker, and a reader
that is polling when it arrives takes it with no system call at all. Why readers poll only
for ``spin_s`` from the start of each wait (not, like vLLM's, for a second after the last
message): under steady load a window counted from the last message never expires and the
workers' cores sit at 100% (vLLM #19036); counted per wait it costs at most ``spin_s`` of CPU
per message, and an idle reader sleeps on a futex. Why the default window is short (100 µs,
not the few ms between decode steps): on a box whose cores are shared, a reader that keeps
polling (or yielding) for milliseconds loses its core to other tasks and takes the message
late, while the scheduler runs a woken sleeper at once (docs/benchmarks.md, "Step hand-off");
a machine with cores to spare can pass a longer ``spin_s``. A message larger than a chunk
spans consecutive chunks (larger than the ring: it streams), so every size goes the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pickle
import secrets

from stagekit.errors import StageUnavailable
from stagekit.kernels import shm_ring
from stagekit.parallel.shm_segment import PREFIX, SHM_DIR, sweep_stale


def _pidfd(pid: int) -> int:
    with contextlib.suppress(OSError, AttributeError):
        return os.pidfd_open(pid)
    return -1


class _Mapped:
    """A mapped ring segment and the ctypes context of this process's end of it."""

    def __init__(self, mapping: mmap.mmap, name: str) -> None:
        self.name, self._mapping = name, mapping
        self._anchor = ctypes.c_char.from_buffer(mapping)  # pins the mapping's address for the C side
        self.ctx = shm_ring.RingCtx()
        self.ctx.base = ctypes.addressof(self._anchor)
        self.ctx.writer_pidfd = -1
        for r in range(shm_ring.MAX_READERS):
            self.ctx.reader_pidfds[r] = -1
        self.ctx_p = ctypes.byref(self.ctx)
        _, self.n_readers, self.n_chunks, self.chunk_bytes = shm_ring.HEADER.unpack_from(mapping, 0)

    def close_mapping(self) -> None:
        for fd in [self.ctx.writer_pidfd, *self.ctx.reader_pidfds]:
            if fd >= 0:
                os.close(fd)
        self.ctx.writer_pidfd = -1
        for r in range(shm_ring.MAX_READERS):
            self.ctx.reader_pidfds[r] = -1
        if self._mapping is not None:
            del self._anchor
            self._mapping.close()
            self._mapping = None


class ShmBroadcaster(_Mapped):
    """The writer's end. Invariant: messages reach every reader whole and in the order sent;
    a chunk is overwritten only after every reader finished it (``send_bytes`` waits, up to
    ``timeout_s``, and fails at once if a watched reader has exited)."""

    @classmethod
    def create(cls, n_readers: int, n_chunks: int = 8, chunk_bytes: int = 1 << 20,
               timeout_s: float = 120.0) -> ShmBroadcaster | None:
        """A new ring for ``n_readers``; None where the native library is unavailable."""
        so = shm_ring.lib()
        if so is None:
            return None
        if not 1 <= n_readers <= shm_ring.MAX_READERS:
            raise ValueError(f"a shared-memory ring takes 1..{shm_ring.MAX_READERS} readers, not {n_readers}")
        sweep_stale()
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}-bcast"
        nbytes = so.ring_segment_bytes(n_chunks, chunk_bytes)
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            (SHM_DIR / name).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        so.ring_init(ctypes.addressof(ctypes.c_char.from_buffer(mapping)), n_readers, n_chunks, chunk_bytes)
        self = cls(mapping, name)
        self._lib, self._linked = so, True
        self.ctx.reader, self.ctx.next, self.ctx.timeout_s = -1, 1, timeout_s
        return self

    def watch(self, reader_pids: list[int]) -> None:
        """The readers' processes, in reader order: a full ring whose reader has exited fails at once."""
        for r, pid in enumerate(reader_pids):
            self.ctx.reader_pids[r], self.ctx.reader_pidfds[r] = pid, _pidfd(pid)

    def unlink(self) -> None:
        """Remove the name (every reader has attached, or none will): the mappings stay valid."""
        if self._linked:
            (SHM_DIR / self.name).unlink(missing_ok=True)
            self._linked = False

    def send_bytes(self, data: bytes | bytearray | memoryview, timeout_s: float | None = None) -> None:
        """Broadcast ``data`` (bytes-like, e.g. ``ForkingPickler.dumps``' memoryview); raises
        StageUnavailable if a reader has exited or stays behind."""
        if timeout_s is not None:
            self.ctx.timeout_s = timeout_s
        if isinstance(data, bytes):
            src, n = data, len(data)
        else:  # ctypes takes a pointer into a writable buffer, else a copy
            view = memoryview(data).cast("B")
            n = len(view)
            src = bytes(view) if view.readonly else (ctypes.c_char * n).from_buffer(view)
        rc = self._lib.ring_write(self.ctx_p, src, n)
        if rc == shm_ring.DEAD:
            raise StageUnavailable(f"broadcast reader {self.ctx.who} (pid {self.ctx.reader_pids[self.ctx.who]}) "
                                   "has exited")
        if rc == shm_ring.TIMEOUT:
            raise StageUnavailable(f"broadcast reader {self.ctx.who} has not read for {self.ctx.timeout_s:.0f} s")

    def close(self) -> None:
        self.unlink()
        self.close_mapping()


class ShmBroadcastReader(_Mapped):
    """A reader's end. Invariant: ``recv`` returns the writer's messages in order, each once,
    and raises EOFError (as a closed pipe does) once the writer's process has exited."""

    @classmethod
    def attach(cls, name: str, reader: int, writer_pid: int, spin_s: float = 1e-4,
               sleep_s: float = 0.1) -> ShmBroadcastReader:
        """Map the ring ``name`` as reader ``reader``: poll for ``spin_s`` from the start of each
        wait, then sleep on a futex ``sleep_s`` at a time, checking the writer between sleeps."""
        so = shm_ring.lib()
        if so is None:
            raise RuntimeError("the shared-memory ring's native library is unavailable in this process")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self = cls(mapping, name)
        magic = shm_ring.HEADER.unpack_from(mapping, 0)[0]
        if magic != shm_ring.MAGIC or not 0 <= reader < self.n_readers:
            self.close()
            raise ValueError(f"{name} is not a ring with a reader {reader}")
        self._lib = so
        ctx = self.ctx
        ctx.reader, ctx.next, ctx.spin_ns, ctx.sleep_ms = reader, 1, int(spin_s * 1e9), max(1, int(sleep_s * 1e3))
        ctx.writer_pid, ctx.writer_pidfd, ctx.parent_is_writer = writer_pid, _pidfd(writer_pid), \
            os.getppid() == writer_pid
        self._buf = (ctypes.c_char * max(4096, self.chunk_bytes))()
        return self

    def _read(self) -> memoryview:
        """The next message, as a view of this reader's buffer (valid until the next read)."""
        while True:
            n = self._lib.ring_read(self.ctx_p, self._buf, len(self._buf))
            if n == shm_ring.DEAD:
                raise EOFError(f"the broadcast's writer (pid {self.ctx.writer_pid}) has exited")
            if n == shm_ring.INTR:
                continue  # back in Python for a moment, so signal handlers run
            if n > len(self._buf):
                self._buf = (ctypes.c_char * n)()
                continue
            return memoryview(self._buf).cast("B")[:n]

    def recv_bytes(self) -> bytes:
        return bytes(self._read())

    def recv(self) -> object:
        """The next message unpickled (what ``Connection.recv`` does with a pipe's)."""
        return pickle.loads(self._read())

    def close(self) -> None:
        self.close_mapping()
