"""This stage's side of a KV transfer, whichever path the bytes take: read blocks out of
the pool, check what a sender announces (layer range, dtype, shape, block range) against
the pool, write received blocks into it.

The announcement is a ``KvBlocksChunk`` without data: the gRPC path sends it as its first
chunk, the UCX path as the header of its one message. Transferred KV is
``[layers, 2, blocks, kv_heads, block_size, head_dim]`` in the pool's dtype on a TP1 stage;
on a stage of t > 1 ranks it is every rank's share, ``[t, layers, 2, blocks, kv_heads per
rank, block_size, head_dim]`` in rank order, read and written by all ranks together on the
stage's compute thread (``TPExecutor.read_kv`` / ``write_kv``). Between stages of the same TP
size rank r's heads go into rank r's pool as they are (split or replicated alike); from a
stage of another TP size the receiver re-splits the heads for its own ranks first
(``stagekit/parallel/kv_heads.py``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stagekit.errors import InvalidRequest
from stagekit.parallel.kv_heads import check_tp, resplit_kv, transfer_shape
from stagekit.rpc import stage_proto
from stagekit.rpc.pb import stage_pb2

if TYPE_CHECKING:
    from services.stage.node import StageNode


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


def tp_of(node: StageNode) -> int:
    return node.layout.tp_size


def check_blocks(node: StageNode, blocks: list[int]) -> None:
    kv = node.runtime.kv_cache
    bad = [b for b in blocks if not 0 <= b < kv.num_blocks]
    if bad:
        raise InvalidRequest(f"block {bad[0]} is outside this stage's pool of {kv.num_blocks}")


def shape_of(node: StageNode, blocks: list[int], tp: int | None = None) -> tuple[int, ...]:
    """The transferred KV's shape as a stage of ``tp`` ranks (default: this one's) holding
    this stage's layers sends it: [layers, 2, n, kv_heads, block_size, head_dim], with a
    leading TP dimension (and the heads per rank) on a stage of several ranks."""
    pool = node.runtime.kv_cache.kv   # [layers, 2, num_blocks, kv_heads per rank, block_size, head_dim]
    return transfer_shape(tp or tp_of(node), node.cfg.num_kv_heads, pool.shape[0], len(blocks), pool.shape[4],
                          pool.shape[5])


def parts(node: StageNode, blocks: list[int], dest_blocks: list[int]) -> list[torch.Tensor]:
    """The KV of ``blocks`` as views of the pool (no copy), in the order of the transferred
    tensor: per layer, K then V, each run of blocks consecutive both here and among
    ``dest_blocks`` (contiguous in both pools, so the receiver can land each part in place).
    TP1 only: a stage of several ranks sends ``read``'s gathered tensor."""
    if tp_of(node) != 1:
        raise ValueError("pool views are rank 0's share only: a TP stage sends read()'s tensor")
    pool = node.runtime.kv_cache.kv   # [layers, 2, num_blocks, kv_heads, block_size, head_dim]
    spans = joint_runs(blocks, dest_blocks)
    return [pool[layer, kv, b:b + n] for layer in range(pool.shape[0]) for kv in range(2) for _, b, _, n in spans]


def landing(node: StageNode, blocks: list[int], part_bytes: tuple[int, ...],
            src_tp: int = 1) -> list[torch.Tensor] | None:
    """Where each announced part lands in this stage's pool, as views of it, when the parts
    are what ``parts`` sends for ``blocks`` here: a TP1 sender (``src_tp``) to this TP1
    stage, per layer, K then V, the same runs of blocks, each run consecutive among
    ``blocks``. None when they are not (or the pool is on a GPU): the caller then receives
    into a staging tensor and writes it."""
    pool = node.runtime.kv_cache.kv   # [layers, 2, num_blocks, kv_heads, block_size, head_dim]
    groups = pool.shape[0] * 2
    per_block = pool[0, 0, 0].numel() * pool.element_size()
    if pool.is_cuda or tp_of(node) != 1 or src_tp != 1 or not part_bytes or len(part_bytes) % groups:
        return None
    seg_bytes = part_bytes[:len(part_bytes) // groups]
    if part_bytes != seg_bytes * groups or any(n <= 0 or n % per_block for n in seg_bytes):
        return None
    segs, at = [], 0
    for n in (x // per_block for x in seg_bytes):
        run = blocks[at:at + n]
        if len(run) != n or run != list(range(run[0], run[0] + n)):
            return None
        segs.append((run[0], n))
        at += n
    if at != len(blocks):
        return None
    return [pool[layer, kv, b:b + n] for layer in range(pool.shape[0]) for kv in range(2) for b, n in segs]


def read(node: StageNode, blocks: list[int]) -> torch.Tensor:
    """The KV of ``blocks`` as one contiguous host tensor (``shape_of``): a gather of runs of
    blocks, on every rank of a TP stage (there: call on the compute thread, see ``read_async``)."""
    if tp_of(node) != 1:
        return node.runtime.executor.read_kv(blocks)
    return node.runtime.kv_cache.read_blocks(blocks).cpu()


async def read_async(node: StageNode, blocks: list[int]) -> torch.Tensor:
    """``read`` off the event loop: on the compute thread for a TP stage (its ranks' collectives
    take turns with the steps'), else on any thread (the blocks are pinned)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(node.pool if tp_of(node) != 1 else None, read, node, blocks)


def joint_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int, int]]:
    """Runs where ``src`` and ``dst`` both go up by one: (position, first src, first dst, length)."""
    out: list[tuple[int, int, int, int]] = []
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        if out and out[-1][1] + out[-1][3] == s and out[-1][2] + out[-1][3] == d:
            out[-1] = (*out[-1][:3], out[-1][3] + 1)
        else:
            out.append((i, s, d, 1))
    return out


def announce(node: StageNode, dest_blocks: list[int]) -> stage_pb2.KvBlocksChunk:
    """What a sender says before the data: where it goes and what it is."""
    lay, kv = node.layout, node.runtime.kv_cache
    return stage_pb2.KvBlocksChunk(blocks=dest_blocks, start_layer=lay.start_layer, end_layer=lay.end_layer,
                                   tp_size=lay.tp_size, dtype=stage_proto.dtype_to_proto(kv.dtype),
                                   shape=list(shape_of(node, dest_blocks)))


def check(node: StageNode, head: stage_pb2.KvBlocksChunk) -> Incoming:
    """What the sender announced, if it fits this stage's pool; else InvalidRequest."""
    kv, lay = node.runtime.kv_cache, node.layout
    src_tp = head.tp_size or 1
    try:
        check_tp(src_tp, node.cfg.num_kv_heads)
    except ValueError as e:
        raise InvalidRequest(f"KV from a stage of TP={src_tp} cannot go into this stage of TP={lay.tp_size}: "
                             f"{e}") from None
    if (head.start_layer, head.end_layer) != (lay.start_layer, lay.end_layer):
        raise InvalidRequest(f"KV of layers {head.start_layer}:{head.end_layer} cannot go into a stage holding "
                             f"layers {lay.start_layer}:{lay.end_layer}")
    dtype = stage_proto.dtype_from_proto(head.dtype)
    blocks = list(head.blocks)
    want = shape_of(node, blocks, src_tp)
    if dtype != kv.dtype or tuple(head.shape) != want:
        raise InvalidRequest(f"KV of {dtype} {tuple(head.shape)} does not fit this stage's pool "
                             f"({kv.dtype}, {want})")
    if any(not 0 <= b < kv.num_blocks for b in blocks):
        raise InvalidRequest(f"destination blocks outside this stage's pool of {kv.num_blocks}")
    return Incoming(blocks, dtype, want, src_tp)


async def write(node: StageNode, blocks: list[int], data: torch.Tensor, src_tp: int | None = None) -> None:
    """Write ``data`` (``shape_of`` for ``src_tp`` ranks, by default this stage's) into
    ``blocks`` of the pool, on every rank of a TP stage; KV from a stage of another TP size
    is re-split for this one's ranks first (a copy, off the event loop)."""
    loop = asyncio.get_running_loop()
    if src_tp is not None and src_tp != tp_of(node):
        data = await loop.run_in_executor(None, resplit_kv, data, src_tp, tp_of(node), node.cfg.num_kv_heads)
    if tp_of(node) != 1:
        await loop.run_in_executor(node.pool, node.runtime.executor.write_kv, blocks, data)
        return
    kv = node.runtime.kv_cache
    await loop.run_in_executor(None, kv.write_blocks, blocks, data.to(kv.device))
