"""The shared-memory ring broadcaster between real processes: every reader gets every message
whole and in order (random sizes, empty ones, ones spanning chunks and larger than the whole
ring); a slow reader makes the writer wait instead of losing a chunk; readers raise EOFError
soon after the writer is SIGKILLed; nothing is left in /dev/shm; an idle reader sleeps.
Small rings (4 chunks of 4 KiB) so that every path runs with small messages."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest

from stagekit.errors import StageUnavailable
from stagekit.kernels import cpu_build, shm_ring
from stagekit.parallel.shm_broadcaster import ShmBroadcaster, ShmBroadcastReader
from stagekit.parallel.shm_segment import SHM_DIR

pytestmark = pytest.mark.skipif(not shm_ring.native_available(), reason="no C compiler for the ring")
CHUNKS, CHUNK = 4, 4096
CTX = mp.get_context("spawn")


def _payload(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def _sizes(n: int) -> list[int]:
    rnd = random.Random(5)
    edge = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, CHUNKS * CHUNK + 7, 10 * CHUNK]
    return edge + [rnd.choice([0, rnd.randrange(64), rnd.randrange(3 * CHUNK), rnd.randrange(12 * CHUNK)])
                   for _ in range(n - len(edge))]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _reader(name: str, r: int, writer_pid: int, out: mp.Queue, delay_s: float = 0.0) -> None:
    ring = ShmBroadcastReader.attach(name, r, writer_pid)
    out.put(("ready", r))
    time.sleep(delay_s)
    digests = []
    try:
        while (msg := ring.recv_bytes()) != b"stop":
            digests.append(hashlib.sha256(msg).hexdigest())
    except EOFError:
        out.put(("eof", r))
        return
    out.put(("done", r, digests))


def _start_readers(ring: ShmBroadcaster, n: int, writer_pid: int, out: mp.Queue,
                   delays: list[float] | None = None) -> list:
    procs = [CTX.Process(target=_reader, args=(ring.name, r, writer_pid, out, (delays or [0.0] * n)[r]), daemon=True)
             for r in range(n)]
    for p in procs:
        p.start()
    ring.watch([p.pid for p in procs])
    assert sorted(out.get(timeout=60)[1] for _ in procs) == list(range(n))
    ring.unlink()
    assert not (SHM_DIR / ring.name).exists()
    return procs


def test_every_reader_gets_every_message_in_order() -> None:
    ring = ShmBroadcaster.create(3, n_chunks=CHUNKS, chunk_bytes=CHUNK, timeout_s=60)
    out = CTX.Queue()
    procs = _start_readers(ring, 3, os.getpid(), out)
    try:
        sizes = _sizes(400)
        sent = []
        for i, size in enumerate(sizes):
            data = _payload(i, size)
            ring.send_bytes([data, bytearray(data), memoryview(data), memoryview(bytearray(data))][i % 4])
            sent.append(hashlib.sha256(data).hexdigest())
        ring.send_bytes(b"stop")
        for _ in procs:
            kind, r, got = out.get(timeout=60)
            assert kind == "done" and got == sent, f"reader {r}"
    finally:
        ring.close()
        for p in procs:
            p.join(timeout=10)
            p.kill()


def test_a_slow_reader_makes_the_writer_wait() -> None:
    ring = ShmBroadcaster.create(2, n_chunks=CHUNKS, chunk_bytes=CHUNK, timeout_s=60)
    out = CTX.Queue()
    procs = _start_readers(ring, 2, os.getpid(), out, delays=[0.0, 1.5])
    try:
        start = time.monotonic()
        for i in range(CHUNKS):  # the ring holds these without any reader
            ring.send_bytes(_payload(i, CHUNK))
        assert time.monotonic() - start < 0.5
        for i in range(CHUNKS, 3 * CHUNKS):  # these wait for the slow reader to free a chunk
            ring.send_bytes(_payload(i, CHUNK))
        assert time.monotonic() - start > 1.0
        ring.send_bytes(b"stop")
        want = [hashlib.sha256(_payload(i, CHUNK)).hexdigest() for i in range(3 * CHUNKS)]
        assert [out.get(timeout=60)[2] for _ in procs] == [want, want]
    finally:
        ring.close()
        for p in procs:
            p.join(timeout=10)
            p.kill()


def test_a_full_ring_fails_fast_when_a_reader_is_gone() -> None:
    ring = ShmBroadcaster.create(1, n_chunks=CHUNKS, chunk_bytes=CHUNK, timeout_s=60)
    out = CTX.Queue()
    (proc,) = _start_readers(ring, 1, os.getpid(), out, delays=[60.0])
    try:
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(StageUnavailable, match="has exited"):
            for i in range(2 * CHUNKS):
                ring.send_bytes(_payload(i, 10))
        assert time.monotonic() - start < 5
    finally:
        ring.close()
        proc.join(timeout=10)


def _writer(out: mp.Queue, n_readers: int) -> None:
    """A writer whose readers are its own children, as a stage's TP workers are rank 0's."""
    ring = ShmBroadcaster.create(n_readers, n_chunks=CHUNKS, chunk_bytes=CHUNK)
    inbox = CTX.Queue()
    procs = _start_readers(ring, n_readers, os.getpid(), inbox)
    ring.send_bytes(b"hello")
    out.put((ring.name, [p.pid for p in procs]))
    time.sleep(300)


def test_readers_see_eof_when_the_writer_is_killed() -> None:
    out = CTX.Queue()
    writer = CTX.Process(target=_writer, args=(out, 2))
    writer.start()
    name, pids = out.get(timeout=120)
    try:
        assert not (SHM_DIR / name).exists()
        time.sleep(0.3)  # the readers are past their spin, asleep on the futex
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=10)
        deadline = time.monotonic() + 3.0  # liveness is checked every 100 ms
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
        assert not any(name in p.name for p in SHM_DIR.iterdir())
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_an_idle_reader_sleeps() -> None:
    ring = ShmBroadcaster.create(2, n_chunks=CHUNKS, chunk_bytes=CHUNK)
    out = CTX.Queue()
    procs = _start_readers(ring, 2, os.getpid(), out)
    try:
        ring.send_bytes(b"one")
        time.sleep(0.2)
        before = [_cpu_s(p.pid) for p in procs]
        time.sleep(3.0)
        used = [(_cpu_s(p.pid) - b) / 3.0 for p, b in zip(procs, before, strict=True)]
        assert max(used) < 0.05, f"idle readers used {used} of a core"
        ring.send_bytes(b"stop")  # and they still answer after sleeping
        assert all(out.get(timeout=10)[0] == "done" for _ in procs)
    finally:
        ring.close()
        for p in procs:
            p.join(timeout=10)
            p.kill()


def test_no_native_library_means_no_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEMESH_NATIVE_KERNELS", "0")
    cpu_build.load.cache_clear()
    try:
        assert ShmBroadcaster.create(1) is None
    finally:
        monkeypatch.undo()
        cpu_build.load.cache_clear()
