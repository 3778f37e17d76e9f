"""Collectives for the ranks of one group on one host, through one shared-memory segment.

Every step of every collective takes the group's next sequence number, and each rank has
two slots (and control blocks), used by alternate steps (stagekit/kernels/shm_collectives.py):
a rank overwrites the slot of step ``s`` only in step ``s + 2``, which it can reach only after
every peer posted ``s + 1``, that is after every peer finished reading step ``s``. Different
collectives share the one sequence, so an all-gather can never read an all-reduce's
half-written slot, and a rank calling a different collective (or size) than its peers gets
an error instead of wrong data. Messages larger than a slot go in slot-sized steps.

All-reduce sums in a fixed order, ``((x_0 + x_1) + x_2) + ...`` in fp32, rounded once to the
dtype, so every rank gets identical bytes, the native kernel and the torch fallback alike.
Against gloo: at 2 ranks the bytes equal gloo's for fp32, bf16 and fp16 (one addition, which
commutes); at 3 and 4 ranks gloo's ring adds each chunk in a different order (and bf16/fp16
in their own precision), so results differ from gloo's by rounding (for fp32 a few ulp of
the operands' magnitude) while they equal the fixed-order fp32 sum exactly.

Waiting spins briefly, then yields, then sleeps, until ``timeout_s`` (then
``StageUnavailable("collective timed out ...")``); a peer whose process has exited raises at
once, naming its rank. After an error the communicator refuses further collectives.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

from stagekit.errors import StageUnavailable
from stagekit.kernels import shm_collectives as steps_mod
from stagekit.kernels.shm_collectives import DEAD, MISMATCH, OK, TIMEOUT, ShmSteps
from stagekit.parallel.shm_segment import Exchange, open_pidfds, open_segment

ALL_REDUCE, ALL_GATHER, ALL_TO_ALL, BROADCAST = 1, 2, 3, 4
_OP_NAMES = {ALL_REDUCE: "all_reduce", ALL_GATHER: "all_gather", ALL_TO_ALL: "all_to_all", BROADCAST: "broadcast"}
REDUCE_DTYPES = tuple(steps_mod.DTYPE_CODES)


class ShmCommunicator:
    """The collectives of one rank of a group whose ranks share a host.

    Invariant: every rank of the group calls the same collectives, on tensors of the same
    shape and dtype (all_to_all: the same row shape), in the same order; the segment is
    mapped by all ranks and its name is already unlinked.
    """

    def __init__(self, mapping: mmap.mmap, name: str, steps: ShmSteps, pids: list[int], pidfds: list[int],
                 timeout_s: float) -> None:
        self.name, self.pids, self.timeout_s = name, pids, timeout_s
        self.rank, self.world_size = steps.rank, steps.world
        self._mapping, self._steps, self._pidfds = mapping, steps, pidfds
        self._seq = 0
        self._failed: str | None = None

    @classmethod
    def create(cls, exchange: Exchange, rank: int, world_size: int, group_ranks: list[int] | None = None,
               timeout_s: float = 120.0, slot_bytes: int = 1 << 20, use_native: bool = True) -> ShmCommunicator:
        """Join the group's segment: a collective call of all its ranks (``exchange``: see shm_segment)."""
        if not 1 <= world_size <= steps_mod.MAX_RANKS:
            raise ValueError(f"shared-memory collectives take 1..{steps_mod.MAX_RANKS} ranks, not {world_size}")
        slot_bytes = -(-slot_bytes // 4096) * 4096  # page-aligned slots: aligned for every dtype
        group_ranks = list(range(world_size)) if group_ranks is None else list(group_ranks)
        mapping, name, pids = open_segment(exchange, rank, world_size, group_ranks,
                                           steps_mod.segment_bytes(world_size, slot_bytes))
        buf = torch.frombuffer(mapping, dtype=torch.uint8)
        pidfds = open_pidfds(pids, rank)
        steps = ShmSteps(buf, world_size, rank, slot_bytes, pids, pidfds, timeout_s, use_native=use_native)
        return cls(mapping, name, steps, pids, pidfds, timeout_s)

    @property
    def native(self) -> bool:
        return self._steps.native

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (fp32, bf16 or fp16) over the group in place, in rank order in fp32; returns x."""
        if x.dtype not in steps_mod.DTYPE_CODES:
            raise ValueError(f"shared-memory all_reduce sums {REDUCE_DTYPES}, not {x.dtype}")
        work = x if x.is_contiguous() else x.contiguous()
        step = self._steps.slot_bytes // x.element_size()
        if work.numel() <= step:  # one step: the common, latency-bound case, without slicing
            seq = self._next_seq()
            self._check(*self._steps.all_reduce(seq, ALL_REDUCE, work), ALL_REDUCE, seq)
        else:
            flat = work.view(-1)
            for lo in range(0, flat.numel(), step):
                seq = self._next_seq()
                self._check(*self._steps.all_reduce(seq, ALL_REDUCE, flat[lo:lo + step]), ALL_REDUCE, seq)
        if work is not x:
            x.copy_(work)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in rank order."""
        data = _bytes_of(x)
        total = data.numel()
        out = torch.empty((self.world_size, total), dtype=torch.uint8)
        for lo in range(0, max(total, 1), self._steps.slot_bytes):
            hi = min(total, lo + self._steps.slot_bytes)
            seq = self._next_seq()
            self._check(*self._steps.all_gather(seq, ALL_GATHER, total, data[lo:hi], out[:, lo:hi]), ALL_GATHER, seq)
        parts = out.view(x.dtype).view(self.world_size, *x.shape)
        if x.dim() == 0:
            return parts
        dim %= x.dim()
        if dim == 0:
            return parts.view(self.world_size * x.shape[0], *x.shape[1:])
        # [W, ..., d, ...] -> [..., W, d, ...] -> [..., W * d, ...]: one copy
        moved = parts.movedim(0, dim)
        return moved.reshape(*x.shape[:dim], self.world_size * x.shape[dim], *x.shape[dim + 1:])

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy group rank ``src``'s ``x`` into every rank's ``x`` (same shape and dtype); returns x."""
        work = x if x.is_contiguous() else x.contiguous()
        data = _bytes_of(work)
        total = data.numel()
        for lo in range(0, max(total, 1), self._steps.slot_bytes):
            seq = self._next_seq()
            part = data[lo:lo + self._steps.slot_bytes]
            self._check(*self._steps.broadcast(seq, BROADCAST, total, src, part), BROADCAST, seq)
        if work is not x:
            x.copy_(work)
        return x

    def all_to_all(self, x: torch.Tensor, send_counts: list[int] | torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Send ``send_counts[r]`` rows of ``x`` (rows grouped by destination, in rank order) to
        each rank r; returns the rows every rank sent here, in source-rank order, and their counts."""
        counts = [int(c) for c in (send_counts.tolist() if isinstance(send_counts, torch.Tensor) else send_counts)]
        if len(counts) != self.world_size or sum(counts) != x.shape[0] or min(counts) < 0:
            raise ValueError(f"send_counts {counts} must give {self.world_size} counts summing to {x.shape[0]} rows")
        data = _bytes_of(x)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        slot = self._steps.slot_bytes
        first = self._exchange_step(ALL_TO_ALL, -1, data[:slot], aux=row_bytes, counts=counts)
        matrix, row_sizes = self._steps.posted_counts(first)  # matrix: [source][destination]
        if any(size != row_bytes for size in row_sizes):
            raise ValueError("all_to_all: ranks sent rows of different sizes")
        recv_counts = [row[self.rank] for row in matrix]
        starts = [sum(row[:self.rank]) * row_bytes for row in matrix]  # where my rows begin in each source
        out = torch.empty(sum(recv_counts) * row_bytes, dtype=torch.uint8)
        out_at = [sum(recv_counts[:s]) * row_bytes for s in range(self.world_size)]
        rounds = max(1, max(-(-sum(row) * row_bytes // slot) for row in matrix))
        for k in range(rounds):
            seq = self._exchange_step(ALL_TO_ALL, -1, data[k * slot:(k + 1) * slot]) if k else first
            window = self._steps.slots(seq)
            for s in range(self.world_size):  # my part of source s's bytes, within this step's window
                lo = max(starts[s], k * slot)
                hi = min(starts[s] + recv_counts[s] * row_bytes, (k + 1) * slot)
                if hi > lo:
                    at = out_at[s] + lo - starts[s]
                    out[at:at + hi - lo].copy_(window[s, lo - k * slot:hi - k * slot])
        return out.view(x.dtype).view(-1, *x.shape[1:]), recv_counts

    def close(self) -> None:
        """Release the mapping and the peers' pidfds (the segment's name is long gone)."""
        for fd in self._pidfds:
            if fd >= 0:
                os.close(fd)
        self._pidfds = []
        self._steps = None  # drops the tensor views of the mapping before it is closed
        self._failed = self._failed or "the communicator is closed"
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:  # a caller still holds a view: the mapping goes with the process
                pass
            self._mapping = None

    def _next_seq(self) -> int:
        if self._failed:
            raise StageUnavailable(f"shared-memory collectives unusable: {self._failed}")
        self._seq += 1
        return self._seq

    def _exchange_step(self, op: int, total: int, data: torch.Tensor | None, aux: int = 0,
                       counts: list[int] | None = None) -> int:
        seq = self._next_seq()
        self._steps.post(seq, op, total, data if data is not None and data.numel() else None, aux, counts)
        self._check(*self._steps.wait(seq, op, total), op, seq)
        return seq

    def _check(self, rc: int, who: int, op: int, seq: int) -> None:
        if rc == OK:
            return
        name = _OP_NAMES[op]
        if rc == TIMEOUT:
            self._failed = (f"collective timed out after {self.timeout_s:g} s: rank {who} of the shared-memory group "
                            f"never reached {name} (step {seq})")
        elif rc == DEAD:
            self._failed = f"rank {who} (pid {self.pids[who]}) of the shared-memory group died during {name}"
        elif rc == MISMATCH:
            self._failed = f"rank {who} of the shared-memory group called another collective or size than {name}"
            raise RuntimeError(self._failed)
        else:
            self._failed = f"{name}: unexpected wait status {rc}"
        raise StageUnavailable(self._failed)


def _bytes_of(x: torch.Tensor) -> torch.Tensor:
    """x's elements as a flat contiguous uint8 tensor (a view when x is contiguous)."""
    x = x.contiguous()
    return x.view(-1).view(torch.uint8) if x.numel() else torch.empty(0, dtype=torch.uint8)
