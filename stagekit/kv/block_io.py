"""A stage's KV pool as a transfer between replicas sees it: blocks read out of the pool,
the transferred tensor's shape, views of the pool a sender sends from or a receiver lands
in, and what an announced transfer must look like to fit.

Transferred KV is ``[layers, 2, blocks, kv_heads, block_size, head_dim]`` in the pool's
dtype from a TP1 stage; from a stage of t > 1 ranks it is every rank's share,
``[t, layers, 2, blocks, kv_heads per rank, block_size, head_dim]`` in rank order
(``stagekit/parallel/kv_heads.py``). This module handles one rank's pool; gathering and
scattering the shares of a TP stage is its executor's (``TPExecutor.read_kv`` / ``write_kv``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagekit.errors import InvalidRequest
from stagekit.kv.kv_cache import PagedKVCache
from stagekit.parallel.kv_heads import check_tp, resplit_kv, transfer_shape


@dataclass(frozen=True, slots=True)
class Incoming:
    """A checked announcement: the data will be ``shape`` in ``dtype`` for ``blocks``."""

    blocks: list[int]
    dtype: torch.dtype
    shape: tuple[int, ...]
    src_tp: int   # the sender's TP size: ``shape`` is its layout (kv_heads.transfer_shape)

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def joint_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int, int]]:
    """Runs where ``src`` and ``dst`` both go up by one: (position, first src, first dst, length)."""
    out: list[tuple[int, int, int, int]] = []
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        if out and out[-1][1] + out[-1][3] == s and out[-1][2] + out[-1][3] == d:
            out[-1] = (*out[-1][:3], out[-1][3] + 1)
        else:
            out.append((i, s, d, 1))
    return out


class BlockIO:
    """One rank's pool of a stage holding layers ``[start_layer, end_layer)`` at ``tp_size``.
    Invariant: ``parts`` hands out views of the pool itself (no copy), in the order of the
    transferred tensor (``read``'s layout), so a receiver lands them in one staging tensor."""

    def __init__(self, kv: PagedKVCache, num_kv_heads: int, tp_size: int, start_layer: int, end_layer: int) -> None:
        self.kv, self.num_kv_heads, self.tp_size = kv, num_kv_heads, tp_size
        self.start_layer, self.end_layer = start_layer, end_layer

    def check_blocks(self, blocks: list[int]) -> None:
        """Blocks of a transfer: inside the pool and each named once (so never more than the pool
        holds: a transfer of 100,000 copies of block 0 would read gigabytes)."""
        bad = [b for b in blocks if not 0 <= b < self.kv.num_blocks]
        if bad:
            raise InvalidRequest(f"block {bad[0]} is outside this stage's pool of {self.kv.num_blocks}")
        if len(set(blocks)) != len(blocks):
            raise InvalidRequest(f"a KV transfer names a block more than once ({len(blocks)} blocks, "
                                 f"{len(set(blocks))} distinct)")

    def shape(self, num_blocks: int, tp: int | None = None) -> tuple[int, ...]:
        """The transferred KV's shape as a stage of ``tp`` ranks (default: this one's) holding
        this stage's layers sends ``num_blocks`` blocks."""
        pool = self.kv.kv   # [layers, 2, num_blocks, kv_heads per rank, block_size, head_dim]
        return transfer_shape(tp or self.tp_size, self.num_kv_heads, pool.shape[0], num_blocks, pool.shape[4],
                              pool.shape[5])

    def parts(self, blocks: list[int], dest_blocks: list[int]) -> list[torch.Tensor]:
        """The KV of ``blocks`` as views of the pool, in the order of the transferred tensor:
        per layer, K then V, each run of blocks consecutive both here and among ``dest_blocks``
        (contiguous in both pools, so the receiver can land each part in place). TP1 only: a
        stage of several ranks sends its executor's gathered tensor."""
        if self.tp_size != 1:
            raise ValueError("pool views are rank 0's share only: a TP stage sends its gathered tensor")
        pool = self.kv.kv   # [layers, 2, num_blocks, kv_heads, block_size, head_dim]
        spans = joint_runs(blocks, dest_blocks)
        return [pool[layer, kv, b:b + n] for layer in range(pool.shape[0]) for kv in range(2) for _, b, _, n in spans]

    def accept(self, blocks: list[int], dtype: torch.dtype, shape: tuple[int, ...], src_tp: int,
               start_layer: int, end_layer: int) -> Incoming:
        """An announced transfer, if it fits this pool (layer range, TP size, dtype, shape,
        block range); else InvalidRequest."""
        try:
            check_tp(src_tp, self.num_kv_heads)
        except ValueError as e:
            raise InvalidRequest(f"KV from a stage of TP={src_tp} cannot go into this stage of TP={self.tp_size}: "
                                 f"{e}") from None
        if (start_layer, end_layer) != (self.start_layer, self.end_layer):
            raise InvalidRequest(f"KV of layers {start_layer}:{end_layer} cannot go into a stage holding "
                                 f"layers {self.start_layer}:{self.end_layer}")
        want = self.shape(len(blocks), src_tp)
        if dtype != self.kv.dtype or tuple(shape) != want:
            raise InvalidRequest(f"KV of {dtype} {tuple(shape)} does not fit this stage's pool "
                                 f"({self.kv.dtype}, {want})")
        if any(not 0 <= b < self.kv.num_blocks for b in blocks):
            raise InvalidRequest(f"destination blocks outside this stage's pool of {self.kv.num_blocks}")
        self.check_blocks(blocks)
        return Incoming(blocks, dtype, want, src_tp)

    def read(self, blocks: list[int]) -> torch.Tensor:
        """This rank's KV of ``blocks`` as one contiguous host tensor (a gather of runs)."""
        return self.kv.read_blocks(blocks).cpu()

    def for_this_tp(self, data: torch.Tensor, src_tp: int) -> torch.Tensor:
        """KV a stage of ``src_tp`` ranks sent, in this stage's layout (a copy when the TP
        sizes differ: the heads are re-split)."""
        return resplit_kv(data, src_tp, self.tp_size, self.num_kv_heads)

    def write(self, blocks: list[int], data: torch.Tensor) -> None:
        """Write ``data`` (this rank's layout, ``shape(len(blocks), 1)``) into ``blocks``."""
        self.kv.write_blocks(blocks, data.to(self.kv.device))
