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


def parts(node: StageNode, blocks: list[int]) -> list[torch.Tensor]:
    """The KV of ``blocks`` as views of the pool (no copy), in the order of the transferred
    tensor: per layer, K then V, each run of consecutive blocks (contiguous in the pool)."""
    pool = node.runtime.kv_cache.kv   # [layers, 2, num_blocks, kv_heads, block_size, head_dim]
    spans = runs(blocks)
    return [pool[layer, kv, b:b + n] for layer in range(pool.shape[0]) for kv in range(2) for _, b, n in spans]


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
