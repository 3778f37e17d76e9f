"""The steps of a shared-memory collective on one mapped segment: post, wait, all-reduce.

Layout of a segment for ``world`` ranks (shm_collectives.c mirrors it): ``2 * world``
control blocks of ``CTRL_BYTES`` (``ctrl(rank, seq & 1)``: seq, op, nbytes, aux, counts),
then, from ``data_offset(world)``, ``2 * world`` data slots of ``slot_bytes``
(``slot(rank, seq & 1)``). Every step of every collective has the group's next sequence
number; a rank writes only its own blocks and publishes a step by storing its seq last.

The native kernel (C11 acquire/release atomics, ctypes releases the GIL while it waits) is
used where it builds; the torch fallback does the same steps with plain loads and stores,
which publish in order only under x86's total store order, so ``ShmSteps`` refuses the
fallback on other CPUs.
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import time

import torch

from stagekit.kernels import cpu_build

CTRL_BYTES = 256
MAX_RANKS = 16
OK, TIMEOUT, DEAD, MISMATCH = 0, -1, -2, -3
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CTRL_WORDS = CTRL_BYTES // 8  # int64 words per control block: seq, op, nbytes, aux, counts...
_SEQ, _OP, _NBYTES, _AUX, _COUNTS = 0, 1, 2, 3, 4
_SPIN_S, _YIELD_S, _MAX_SLEEP_S, _LIVENESS_S = 20e-6, 1e-3, 5e-4, 5e-3  # as in shm_collectives.c


def data_offset(world: int) -> int:
    return -(-2 * world * CTRL_BYTES // 4096) * 4096


def segment_bytes(world: int, slot_bytes: int) -> int:
    return data_offset(world) + 2 * world * slot_bytes


class _Ctx(ctypes.Structure):
    """shm_ctx_t of shm_collectives.c."""

    _fields_ = [("base", ctypes.c_void_p), ("data_offset", ctypes.c_long), ("slot_bytes", ctypes.c_long),
                ("world", ctypes.c_int), ("rank", ctypes.c_int), ("timeout_s", ctypes.c_double),
                ("pidfds", ctypes.c_int * MAX_RANKS), ("pids", ctypes.c_int * MAX_RANKS), ("who", ctypes.c_int)]


def _lib() -> ctypes.CDLL | None:
    lib = cpu_build.load("shm_collectives")
    if lib is not None and not getattr(lib, "_stagemesh_typed", False):
        ctx, u32, u64, i64, p, long = (ctypes.POINTER(_Ctx), ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_long)
        lib.shm_post.argtypes = [ctx, u64, u32, i64, i64, p, p, long]
        lib.shm_wait.argtypes = [ctx, u64, u32, i64]
        lib.shm_all_reduce.argtypes = [ctx, u64, u32, ctypes.c_int, p, long]
        lib.shm_all_gather.argtypes = [ctx, u64, u32, i64, p, long, p, long]
        lib.shm_broadcast.argtypes = [ctx, u64, u32, i64, ctypes.c_int, p, long]
        for f in (lib.shm_post, lib.shm_wait, lib.shm_all_reduce, lib.shm_all_gather, lib.shm_broadcast):
            f.restype = ctypes.c_int
        lib._stagemesh_typed = True
    return lib


def native_available() -> bool:
    return _lib() is not None


class ShmSteps:
    """The steps of one rank on one mapped segment; each returns (OK | TIMEOUT | DEAD | MISMATCH, peer).

    Invariant: every rank of the segment calls the same steps with the same seq in the same
    order; a rank's step seq reads peers' blocks only after they published seq, and writes
    its own parity ``seq & 1`` only after every peer published seq - 1.
    """

    def __init__(self, buf: torch.Tensor, world: int, rank: int, slot_bytes: int, pids: list[int],
                 pidfds: list[int], timeout_s: float, use_native: bool = True) -> None:
        self.buf, self.world, self.rank, self.slot_bytes = buf, world, rank, slot_bytes  # buf: uint8 [segment]
        self.data_offset, self.timeout_s = data_offset(world), timeout_s
        self.ctrl = buf[: 2 * world * CTRL_BYTES].view(torch.int64).view(2 * world, _CTRL_WORDS)
        self.pids, self.pidfds = list(pids), list(pidfds)
        self.lib = _lib() if use_native else None
        if self.lib is None and platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
            raise RuntimeError("shared-memory collectives without the native kernel need x86's store ordering")
        pad = [-1] * (MAX_RANKS - world)
        self.ctx = _Ctx(buf.data_ptr(), self.data_offset, slot_bytes, world, rank, timeout_s,
                        (ctypes.c_int * MAX_RANKS)(*pidfds, *pad), (ctypes.c_int * MAX_RANKS)(*pids, *pad), -1)
        self._ctx_p = ctypes.byref(self.ctx)

    @property
    def native(self) -> bool:
        return self.lib is not None

    def slots(self, seq: int) -> torch.Tensor:
        """uint8 [world, slot_bytes]: every rank's slot of step seq's parity (a view, no copy)."""
        return self.buf.as_strided((self.world, self.slot_bytes), (2 * self.slot_bytes, 1),
                                   self.data_offset + (seq & 1) * self.slot_bytes)

    def peer_ctrl(self, rank: int, seq: int) -> torch.Tensor:
        return self.ctrl[rank * 2 + (seq & 1)]

    def posted_counts(self, seq: int) -> tuple[list[list[int]], list[int]]:
        """What every rank posted with step seq: its counts and its aux (read in one go)."""
        rows = self.ctrl[(seq & 1)::2, _AUX:_COUNTS + self.world].tolist()  # [rank][aux, counts...]
        return [row[1:] for row in rows], [row[0] for row in rows]

    def post(self, seq: int, op: int, nbytes: int, data: torch.Tensor | None, aux: int = 0,
             counts: list[int] | None = None) -> None:
        """Publish step seq: ``data`` (uint8, contiguous, at most a slot) and the control fields."""
        n = 0 if data is None else data.numel()
        assert n <= self.slot_bytes
        if self.lib is not None:
            c = (ctypes.c_int64 * self.world)(*counts) if counts else None
            self.lib.shm_post(self._ctx_p, seq, op, nbytes, aux, c, data.data_ptr() if n else None, n)
            return
        if n:
            self.slots(seq)[self.rank, :n].copy_(data)
        block = self.peer_ctrl(self.rank, seq)
        block[_OP], block[_NBYTES], block[_AUX] = op, nbytes, aux
        if counts:
            block[_COUNTS:_COUNTS + self.world] = torch.tensor(counts, dtype=torch.int64)
        block[_SEQ] = seq  # last: x86 makes the stores above visible first

    def wait(self, seq: int, op: int, nbytes: int) -> tuple[int, int]:
        """Wait until every peer posted step seq (with the same op, and nbytes unless it is -1)."""
        if self.lib is not None:
            return self.lib.shm_wait(self._ctx_p, seq, op, nbytes), self.ctx.who
        return self._wait_torch(seq, op, nbytes)

    def all_reduce(self, seq: int, op: int, x: torch.Tensor) -> tuple[int, int]:
        """Sum the contiguous ``x`` (fp32/bf16/fp16, at most a slot) over the ranks, in place."""
        if self.lib is not None:
            return self.lib.shm_all_reduce(self._ctx_p, seq, op, DTYPE_CODES[x.dtype], x.data_ptr(),
                                           x.numel()), self.ctx.who
        x = x.view(-1)
        nbytes = x.numel() * x.element_size()
        self.post(seq, op, nbytes, x.view(torch.uint8))
        rc, who = self._wait_torch(seq, op, nbytes)
        if rc == OK:
            parts = self.slots(seq)[:, :nbytes].view(x.dtype)  # [world, n]
            acc = parts[0].to(torch.float32, copy=True)  # never accumulate into a slot peers read
            for r in range(1, self.world):  # rank order, fp32: the native kernel's bytes exactly
                acc += parts[r]
            x.copy_(acc)
        return rc, who

    def all_gather(self, seq: int, op: int, nbytes: int, data: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        """Publish ``data`` (uint8, part of an nbytes message) and copy every rank's part into the
        rows of ``out`` (uint8 [world, data.numel()], rows may be strided)."""
        n = data.numel()
        if self.lib is not None:
            return self.lib.shm_all_gather(self._ctx_p, seq, op, nbytes, data.data_ptr() if n else None, n,
                                           out.data_ptr(), out.stride(0)), self.ctx.who
        self.post(seq, op, nbytes, data)
        rc, who = self._wait_torch(seq, op, nbytes)
        if rc == OK:
            out.copy_(self.slots(seq)[:, :n])
        return rc, who

    def broadcast(self, seq: int, op: int, nbytes: int, root: int, data: torch.Tensor) -> tuple[int, int]:
        """Root publishes ``data`` (uint8 contiguous, part of an nbytes message); the others copy it in."""
        n = data.numel()
        if self.lib is not None:
            return self.lib.shm_broadcast(self._ctx_p, seq, op, nbytes, root, data.data_ptr() if n else None,
                                          n), self.ctx.who
        self.post(seq, op, nbytes, data if self.rank == root else None)
        rc, who = self._wait_torch(seq, op, nbytes)
        if rc == OK and self.rank != root:
            data.copy_(self.slots(seq)[root, :n])
        return rc, who

    def _wait_torch(self, seq: int, op: int, nbytes: int) -> tuple[int, int]:
        start = time.monotonic()
        next_liveness, sleep_s = start + _YIELD_S, 20e-6
        for r in range(self.world):
            if r == self.rank:
                continue
            block = self.peer_ctrl(r, seq)
            while int(block[_SEQ]) < seq:
                t = time.monotonic()
                if t - start < _SPIN_S:
                    continue
                if t >= next_liveness:
                    dead = self._dead_peer(seq)
                    if dead >= 0:
                        return DEAD, dead
                    next_liveness = t + _LIVENESS_S
                if t - start >= self.timeout_s:
                    return TIMEOUT, r
                if t - start < _YIELD_S:
                    os.sched_yield()
                else:
                    time.sleep(sleep_s)
                    sleep_s = min(2 * sleep_s, _MAX_SLEEP_S)
            if int(block[_OP]) != op or (nbytes >= 0 and int(block[_NBYTES]) != nbytes):
                return MISMATCH, r
        return OK, -1

    def _dead_peer(self, seq: int) -> int:
        for r in range(self.world):
            if r == self.rank or int(self.peer_ctrl(r, seq)[_SEQ]) >= seq:
                continue
            if self.pidfds[r] >= 0:
                p = select.poll()
                p.register(self.pidfds[r], select.POLLIN)
                if p.poll(0):
                    return r
            elif self.pids[r] > 0:
                try:
                    os.kill(self.pids[r], 0)
                except ProcessLookupError:
                    return r
                except PermissionError:
                    pass
        return -1
