"""The gRPC data path of a KV transfer (the fallback when either stage is not on the UCX
data plane): a client stream on the receiving stage's gRPC port, the announcement first,
then the bytes in chunks (1 MiB; STAGEMESH_KV_CHUNK_BYTES). Each chunk is a copy on either
side (serialisation), which the UCX path avoids."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import torch

from services.stage.kv_blocks import KvBlocks, check_land_by
from services.stage.stage_channels import StageChannels
from stagekit.errors import InvalidRequest, StageUnavailable
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.rpc.status import error_for

PUSH_TIMEOUT_S = 300.0


def _chunk_bytes() -> int:
    return max(4096, int(os.environ.get("STAGEMESH_KV_CHUNK_BYTES", 1 << 20)))


async def push(kv: KvBlocks, channels: StageChannels, blocks: list[int], destination: str,
               dest_blocks: list[int], land_by_ms: int = 0) -> int:
    """Stream this stage's KV of ``blocks`` into ``dest_blocks`` of the stage at
    ``destination`` (on a channel of ``channels``), to be written there before ``land_by_ms``
    (Unix ms; 0: no bound); returns the bytes sent."""
    data = await kv.read_async(blocks)  # BlockIO.shape
    raw = (data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy().view("uint8").reshape(-1)

    async def chunks() -> AsyncIterator[stage_pb2.KvBlocksChunk]:
        yield kv.announce(dest_blocks, land_by_ms)
        step = _chunk_bytes()
        for i in range(0, raw.size, step):
            yield stage_pb2.KvBlocksChunk(data=raw[i:i + step].tobytes())

    try:
        stub = stage_pb2_grpc.StageStub(channels.channel(destination))
        reply = await stub.PushKvBlocks(chunks(), timeout=PUSH_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        raise error_for(e.code(), f"stage {destination}: {e.details()}") from None
    if reply.bytes_received != raw.size:
        raise StageUnavailable(f"stage {destination} received {reply.bytes_received} of {raw.size} bytes")
    return int(raw.size)


async def receive(kv: KvBlocks, chunks: AsyncIterator[stage_pb2.KvBlocksChunk]) -> int:
    """Write pushed blocks into this stage's pool (only before the announced land-by time);
    returns the bytes received."""
    it = chunks.__aiter__()
    try:
        head = await it.__anext__()
    except StopAsyncIteration:
        raise InvalidRequest("an empty KV push") from None
    incoming = kv.check(head)
    check_land_by(head.land_by_unix_ms)
    buf = torch.empty(incoming.nbytes, dtype=torch.uint8)
    got = 0
    async for c in it:
        n = len(c.data)
        if got + n > buf.numel():
            raise InvalidRequest(f"more KV data than the {buf.numel()} bytes announced")
        buf[got:got + n] = torch.frombuffer(bytearray(c.data), dtype=torch.uint8)
        got += n
    if got != buf.numel():
        raise InvalidRequest(f"KV push ended after {got} of {buf.numel()} bytes")
    await kv.write(incoming.blocks, buf.view(incoming.dtype).view(incoming.shape), incoming.src_tp,
                   head.land_by_unix_ms)
    return got
