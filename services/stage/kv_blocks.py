"""This stage's side of a KV transfer, whichever path the bytes take: read blocks out of
the pool, check what a sender announces (layer range, dtype, shape, block range) against
the pool, write received blocks into it.

The announcement is a ``KvBlocksChunk`` without data: the gRPC path sends it as its first
chunk, the UCX path as the header of its one message. Transferred KV is
``[layers, 2, blocks, kv_heads, block_size, head_dim]`` in the pool's dtype.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stagekit.errors import InvalidRequest
from stagekit.rpc import codec
from stagekit.rpc.pb import stage_pb2

if TYPE_CHECKING:
    from services.stage.node import StageNode


@dataclass(frozen=True, slots=True)
class Incoming:
    """A checked announcement: the data will be ``shape`` in ``dtype`` for ``blocks``."""

    blocks: list[int]
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def check_tp1(node: StageNode) -> None:
    if node.layout.tp_size != 1:
        raise InvalidRequest(f"KV transfer needs TP=1 stages; this stage runs TP={node.layout.tp_size}")


def check_blocks(node: StageNode, blocks: list[int]) -> None:
    kv = node.runtime.kv_cache
    bad = [b for b in blocks if not 0 <= b < kv.num_blocks]
    if bad:
        raise InvalidRequest(f"block {bad[0]} is outside this stage's pool of {kv.num_blocks}")


def shape_of(node: StageNode, blocks: list[int]) -> tuple[int, ...]:
    """The transferred KV's shape: [layers, 2, n, kv_heads, block_size, head_dim]."""
    pool = node.runtime.kv_cache.kv
    return (*pool.shape[:2], len(blocks), *pool.shape[3:])


def parts(node: StageNode, blocks: list[int], dest_blocks: list[int]) -> list[torch.Tensor]:
    """The KV of ``blocks`` as views of the pool (no copy), in the order of the transferred
    tensor: per layer, K then V, each run of blocks consecutive both here and among
    ``dest_blocks`` (contiguous in both pools, so the receiver can land each part in place)."""
    pool = node.runtime.kv_cache.kv   # [layers, 2, num_blocks, kv_heads, block_size, head_dim]
    spans = joint_runs(blocks, dest_blocks)
    return [pool[layer, kv, b:b + n] for layer in range(pool.shape[0]) for kv in range(2) for _, b, _, n in spans]


def landing(node: StageNode, blocks: list[int], part_bytes: tuple[int, ...]) -> list[torch.Tensor] | None:
    """Where each announced part lands in this stage's pool, as views of it, when the parts
    are what ``parts`` sends for ``blocks`` here: per layer, K then V, the same runs of
    blocks, each run consecutive among ``blocks``. None when they are not (or the pool is
    on a GPU): the caller then receives into a staging tensor and writes it."""
    pool = node.runtime.kv_cache.kv   # [layers, 2, num_blocks, kv_heads, block_size, head_dim]
    groups = pool.shape[0] * 2
    per_block = pool[0, 0, 0].numel() * pool.element_size()
    if pool.is_cuda or not part_bytes or len(part_bytes) % groups:
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
    """The KV of ``blocks`` as one contiguous host tensor (a gather: the blocks of one layer
    are strided through the pool)."""
    pool = node.runtime.kv_cache.kv   # [layers, 2, num_blocks, kv_heads, block_size, head_dim]
    out = torch.empty(shape_of(node, blocks), dtype=pool.dtype)
    for i, b, n in runs(blocks):   # strided copies of block runs: several times faster than index_select here
        out[:, :, i:i + n].copy_(pool[:, :, b:b + n])
    return out  # [layers, 2, n, kv_heads, block_size, head_dim]


def runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """``blocks`` as runs of consecutive ids: (position in ``blocks``, first block, length)."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if out and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((i, b, 1))
    return out


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
                                   tp_size=lay.tp_size, dtype=codec.dtype_to_proto(kv.dtype),
                                   shape=list(shape_of(node, dest_blocks)))


def check(node: StageNode, head: stage_pb2.KvBlocksChunk) -> Incoming:
    """What the sender announced, if it fits this stage's pool; else InvalidRequest."""
    check_tp1(node)
    kv, lay = node.runtime.kv_cache, node.layout
    if (head.start_layer, head.end_layer) != (lay.start_layer, lay.end_layer):
        raise InvalidRequest(f"KV of layers {head.start_layer}:{head.end_layer} cannot go into a stage holding "
                             f"layers {lay.start_layer}:{lay.end_layer}")
    dtype = codec.dtype_from_proto(head.dtype)
    blocks = list(head.blocks)
    want = (kv.num_layers, 2, len(blocks), kv.num_kv_heads, kv.block_size, kv.head_dim)
    if dtype != kv.dtype or tuple(head.shape) != want:
        raise InvalidRequest(f"KV of {dtype} {tuple(head.shape)} does not fit this stage's pool "
                             f"({kv.dtype}, blocks of {want[:2] + want[3:]})")
    if any(not 0 <= b < kv.num_blocks for b in blocks):
        raise InvalidRequest(f"destination blocks outside this stage's pool of {kv.num_blocks}")
    return Incoming(blocks, dtype, want)


async def write(node: StageNode, blocks: list[int], data: torch.Tensor) -> None:
    """Write ``data`` ([layers, 2, n, kv_heads, block_size, head_dim]) into ``blocks`` of the pool."""
    kv = node.runtime.kv_cache

    def run() -> None:
        for i, b, n in runs(blocks):   # index_put on dim 2 was 3-10x slower than these strided copies
            kv.kv[:, :, b:b + n].copy_(data[:, :, i:i + n])

    await asyncio.to_thread(run)
