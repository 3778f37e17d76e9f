"""KV transfer between replicas (the seam of prefill/decode disaggregation), TP1 stages.

The exporting head finds the cached blocks of a token prefix (they are named by the
prefix cache once computed) and pins them; the importing head reserves blocks for the
hashes it lacks; every exporting stage then sends its layers' KV of those blocks to the
same-position importing stage, which writes them into the reserved blocks; finally the
importing head names them. A later request on the importing replica whose prompt starts
with those tokens takes the blocks as a prefix-cache hit and prefills only the rest.
Blocks move outside of steps: the source blocks are pinned and the destination blocks
are reserved, so no step reads or writes them meanwhile.

Data path: a client stream of chunks (1 MiB; STAGEMESH_KV_CHUNK_BYTES) on the receiving
stage's gRPC port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import torch

from stagekit.engine.prefix_cache import block_hashes
from stagekit.errors import InvalidRequest, NotFound, StageUnavailable
from stagekit.rpc import codec
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.rpc.status import error_for

if TYPE_CHECKING:
    from services.stage.node import StageNode

log = logging.getLogger(__name__)



def _chunk_bytes() -> int:
    return max(4096, int(os.environ.get("STAGEMESH_KV_CHUNK_BYTES", 1 << 20)))


def _check_tp1(node: StageNode) -> None:
    if node.layout.tp_size != 1:
        raise InvalidRequest(f"KV transfer needs TP=1 stages; this stage runs TP={node.layout.tp_size}")


async def _call(address: str, method: str, request: object, timeout: float = 120.0) -> object:
    """A unary Stage call to another stage; its failure as our typed error."""
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            return await getattr(stage_pb2_grpc.StageStub(ch), method)(request, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise error_for(e.code(), f"stage {address}: {e.details()}") from None


async def export_kv(node: StageNode, token_ids: list[int], destination: list[str]) -> stage_pb2.ExportKvResponse:
    engine = node.engine
    if engine is None:
        raise InvalidRequest("ExportKv goes to the replica head (the stage holding layer 0)")
    _check_tp1(node)
    pipeline = node.pipeline or [""]  # a one-stage replica needs no wiring
    if len(destination) != len(pipeline):
        raise InvalidRequest(f"the destination has {len(destination)} stage(s), this replica {len(pipeline)}: "
                             "KV moves between stages holding the same layers")
    bm = engine.scheduler.blocks
    hashes = block_hashes(list(token_ids), bm.block_size)
    blocks = bm.match(hashes)
    if not blocks:
        raise NotFound(f"no cached KV for the first {bm.block_size} of these {len(token_ids)} tokens on this "
                       "replica: run them as a prompt first")
    started = time.perf_counter()
    bm.take(blocks)  # pinned: not reclaimed while they are read
    try:
        reply = await _call(destination[0], "ReserveKvBlocks", stage_pb2.ReserveKvBlocksRequest(
            hashes=hashes[:len(blocks)], block_size=bm.block_size))
        src = blocks[reply.num_present:]
        sent = 0
        try:
            if src:
                sends = [send_blocks(node, src, destination[0], list(reply.blocks))]
                sends += [_call(addr, "SendKvBlocks", stage_pb2.SendKvBlocksRequest(
                    blocks=src, destination=dest, destination_blocks=list(reply.blocks)))
                    for addr, dest in zip(pipeline[1:], destination[1:], strict=True)]
                results = await asyncio.gather(*sends)
                sent = results[0] + sum(r.bytes_sent for r in results[1:])
        except BaseException:
            await _abandon(destination[0], reply.import_id)
            raise
        await _call(destination[0], "CommitKvBlocks", stage_pb2.CommitKvBlocksRequest(
            import_id=reply.import_id, ok=True))
    finally:
        bm.release(blocks)
    log.info("exported the KV of %d tokens to %s: %d of %d blocks sent (%.1f MB) in %.3f s",
             len(blocks) * bm.block_size, destination[0], len(src), len(blocks), sent / 1e6,
             time.perf_counter() - started)
    return stage_pb2.ExportKvResponse(num_tokens=len(blocks) * bm.block_size, num_blocks_sent=len(src),
                                      bytes_sent=sent)


async def _abandon(head: str, import_id: str) -> None:
    try:
        await _call(head, "CommitKvBlocks", stage_pb2.CommitKvBlocksRequest(import_id=import_id, ok=False), 10)
    except Exception as e:  # the reservation expires on its own
        log.warning("could not release KV import %s on %s: %s", import_id, head, e)


def _read(node: StageNode, blocks: list[int]) -> torch.Tensor:
    kv = node.runtime.kv_cache
    return kv.kv[:, :, torch.tensor(blocks, dtype=torch.int64, device=kv.device)].cpu().contiguous()


async def send_blocks(node: StageNode, blocks: list[int], destination: str, dest_blocks: list[int]) -> int:
    """Push this stage's KV of ``blocks`` into ``dest_blocks`` of the stage at ``destination``."""
    _check_tp1(node)
    kv = node.runtime.kv_cache
    if len(blocks) != len(dest_blocks):
        raise InvalidRequest(f"{len(blocks)} blocks to send into {len(dest_blocks)} destination blocks")
    bad = [b for b in blocks if not 0 <= b < kv.num_blocks]
    if bad:
        raise InvalidRequest(f"block {bad[0]} is outside this stage's pool of {kv.num_blocks}")
    data = await asyncio.to_thread(_read, node, blocks)  # [layers, 2, n, kv_heads, block_size, head_dim]
    raw = (data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy().view("uint8").reshape(-1)
    lay = node.layout

    async def chunks() -> AsyncIterator[stage_pb2.KvBlocksChunk]:
        yield stage_pb2.KvBlocksChunk(blocks=dest_blocks, start_layer=lay.start_layer, end_layer=lay.end_layer,
                                      tp_size=lay.tp_size, dtype=codec.dtype_to_proto(data.dtype),
                                      shape=list(data.shape))
        step = _chunk_bytes()
        for i in range(0, raw.size, step):
            yield stage_pb2.KvBlocksChunk(data=raw[i:i + step].tobytes())

    try:
        async with grpc.aio.insecure_channel(destination) as ch:
            reply = await stage_pb2_grpc.StageStub(ch).PushKvBlocks(chunks(), timeout=300)
    except grpc.aio.AioRpcError as e:
        raise error_for(e.code(), f"stage {destination}: {e.details()}") from None
    if reply.bytes_received != raw.size:
        raise StageUnavailable(f"stage {destination} received {reply.bytes_received} of {raw.size} bytes")
    return int(raw.size)


async def receive_blocks(node: StageNode, chunks: AsyncIterator[stage_pb2.KvBlocksChunk]) -> int:
    """Write pushed blocks into this stage's pool; returns the bytes received."""
    _check_tp1(node)
    kv, lay = node.runtime.kv_cache, node.layout
    it = chunks.__aiter__()
    try:
        head = await it.__anext__()
    except StopAsyncIteration:
        raise InvalidRequest("an empty KV push") from None
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
    buf = torch.empty(int(torch.Size(want).numel()) * dtype.itemsize, dtype=torch.uint8)
    got = 0
    async for c in it:
        n = len(c.data)
        if got + n > buf.numel():
            raise InvalidRequest(f"more KV data than the {buf.numel()} bytes announced")
        buf[got:got + n] = torch.frombuffer(bytearray(c.data), dtype=torch.uint8)
        got += n
    if got != buf.numel():
        raise InvalidRequest(f"KV push ended after {got} of {buf.numel()} bytes")
    data = buf.view(dtype).view(want)

    def write() -> None:
        kv.kv[:, :, torch.tensor(blocks, dtype=torch.int64, device=kv.device)] = data.to(kv.device)

    await asyncio.to_thread(write)
    return got
