"""The UCX data path of a KV transfer, taken when both stages run the UCX data plane: one
bulk transfer (stagekit.transport.ucx.bulk) from the sending stage's worker to the
receiving stage's, outside the step links. The header is the announcement (a serialised
``KvBlocksChunk`` without data); the payload is sent straight from the pool's memory, one
part per layer, K/V and run of consecutive blocks (the blocks are pinned: no step writes
them meanwhile), or as one gathered tensor (a TP stage: every rank's share).

The receiver lands the bytes in a staging tensor, never straight in its pool, and writes
that into the reserved blocks (on every rank) only before the reservation's land-by time.
UCX cannot take back a receive it has matched (ucp_request_cancel only withdraws unmatched
ones), so the bytes of a sender that stalls mid-part and resumes later still land where
the receive pointed: in the abandoned staging tensor, not in blocks that, by then, serve
another request. The receiver checks the announcement before it accepts the data, and its
errors come back to the sender as the same typed errors."""

from __future__ import annotations

import torch

from services.stage.kv_blocks import KvBlocks, check_land_by
from stagekit.errors import InvalidRequest
from stagekit.rpc.pb import stage_pb2
from stagekit.transport.ucx.bulk import MAX_PARTS
from stagekit.transport.ucx.bulk_inbox import BulkHandler, Receive
from stagekit.transport.ucx.transport import UcxTransport


async def push(transport: UcxTransport, kv: KvBlocks, blocks: list[int], destination: str,
               destination_address: bytes, dest_blocks: list[int], land_by_ms: int = 0) -> int:
    """Send this stage's KV of ``blocks`` into ``dest_blocks`` of the stage at ``destination``,
    whose UCX data plane published ``destination_address``, to be written there before
    ``land_by_ms`` (Unix ms; 0: no bound); returns the bytes sent."""
    header = kv.announce(dest_blocks, land_by_ms).SerializeToString()
    parts = [] if kv.gathers else kv.io.parts(blocks, dest_blocks)
    if kv.gathers or len(parts) > MAX_PARTS:  # one gathered host tensor instead (every TP rank's share)
        parts = [await kv.read_async(blocks)]
    await transport.send_bulk(destination, destination_address, header, parts)
    return sum(t.numel() * t.element_size() for t in parts)


def handler(kv: KvBlocks) -> BulkHandler:
    """The bulk handler of a stage: receives KV blocks pushed over UCX into its pool."""

    async def receive_blocks(header: bytes, part_bytes: tuple[int, ...], receive: Receive) -> None:
        head = stage_pb2.KvBlocksChunk()
        try:
            head.ParseFromString(header)
        except Exception:
            raise InvalidRequest("a KV push over UCX with an unreadable header") from None
        incoming = kv.check(head)
        land_by = head.land_by_unix_ms
        check_land_by(land_by)
        data = torch.empty(incoming.shape, dtype=incoming.dtype)   # the sender's layout (BlockIO.shape)
        await receive([data], land_by / 1000 if land_by else None)
        await kv.write(incoming.blocks, data, incoming.src_tp, land_by)

    return receive_blocks
