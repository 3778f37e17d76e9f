"""KV transfer between replicas (the seam of prefill/decode disaggregation): stages holding
the same layers, at the same TP size or another (the receiver re-splits the KV heads).

The exporting head finds the cached blocks of a token prefix (they are named by the
prefix cache once computed) and pins them; the importing head reserves blocks for the
hashes it lacks; every exporting stage then sends its layers' KV of those blocks to the
same-position importing stage, which writes them into the reserved blocks; finally the
importing head names them. A later request on the importing replica whose prompt starts
with those tokens takes the blocks as a prefix-cache hit and prefills only the rest.
Blocks move outside of steps: the source blocks are pinned and the destination blocks
are reserved, so no step reads or writes them meanwhile.

Data path, per stage: one UCX bulk transfer straight from the pool's memory when both
stages run the UCX data plane (kv_push_ucx), else a gRPC client stream of chunks
(kv_push_grpc).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from services.stage import kv_blocks, kv_push_grpc
from stagekit.engine.prefix_cache import block_hashes
from stagekit.errors import InvalidRequest, NotFound, StageUnavailable
from stagekit.rpc.pb import stage_pb2

if TYPE_CHECKING:
    from services.stage.node import StageNode
    from stagekit.transport.ucx.transport import UcxTransport

log = logging.getLogger(__name__)


async def export_kv(node: StageNode, token_ids: list[int], destination: list[str]) -> stage_pb2.ExportKvResponse:
    engine = node.engine
    if engine is None:
        raise InvalidRequest("ExportKv goes to the replica head (the stage holding layer 0)")
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
        reply = await node.channels.call(destination[0], "ReserveKvBlocks", stage_pb2.ReserveKvBlocksRequest(
            hashes=hashes[:len(blocks)], block_size=bm.block_size))
        src = blocks[reply.num_present:]
        sent, paths = 0, set()
        try:
            if src:
                sends = [send_blocks(node, src, destination[0], list(reply.blocks))]
                sends += [node.channels.call(addr, "SendKvBlocks", stage_pb2.SendKvBlocksRequest(
                    blocks=src, destination=dest, destination_blocks=list(reply.blocks)))
                    for addr, dest in zip(pipeline[1:], destination[1:], strict=True)]
                results = await asyncio.gather(*sends)
                sent = results[0][0] + sum(r.bytes_sent for r in results[1:])
                paths = {results[0][1], *(r.transport for r in results[1:])}
        except BaseException:
            await _abandon(node, destination[0], reply.import_id)
            raise
        await node.channels.call(destination[0], "CommitKvBlocks", stage_pb2.CommitKvBlocksRequest(
            import_id=reply.import_id, ok=True))
    finally:
        bm.release(blocks)
    transport = ",".join(sorted(paths))
    log.info("exported the KV of %d tokens to %s: %d of %d blocks sent (%.1f MB over %s) in %.3f s",
             len(blocks) * bm.block_size, destination[0], len(src), len(blocks), sent / 1e6,
             transport or "-", time.perf_counter() - started)
    return stage_pb2.ExportKvResponse(num_tokens=len(blocks) * bm.block_size, num_blocks_sent=len(src),
                                      bytes_sent=sent, transport=transport)


async def _abandon(node: StageNode, head: str, import_id: str) -> None:
    try:
        await node.channels.call(head, "CommitKvBlocks",
                                 stage_pb2.CommitKvBlocksRequest(import_id=import_id, ok=False), 10)
    except Exception as e:  # the reservation expires on its own
        log.warning("could not release KV import %s on %s: %s", import_id, head, e)


async def send_blocks(node: StageNode, blocks: list[int], destination: str,
                      dest_blocks: list[int]) -> tuple[int, str]:
    """Push this stage's KV of ``blocks`` into ``dest_blocks`` of the stage at ``destination``:
    over UCX when both stages run the UCX data plane, else over gRPC. Returns the bytes sent
    and the path taken ("ucx" / "grpc")."""
    if len(blocks) != len(dest_blocks):
        raise InvalidRequest(f"{len(blocks)} blocks to send into {len(dest_blocks)} destination blocks")
    started = time.perf_counter()
    kv_blocks.check_blocks(node, blocks)
    try:
        sent, path = await _push_to(node, blocks, destination, dest_blocks)
    except Exception as e:
        log.warning("sending %d KV blocks to %s failed: %s", len(blocks), destination, e)
        raise
    took = time.perf_counter() - started
    log.info("sent %d KV blocks (%.1f MB) to %s over %s in %.3f s (%.2f GB/s)", len(blocks), sent / 1e6,
             destination, path, took, sent / took / 1e9)
    return sent, path


async def _push_to(node: StageNode, blocks: list[int], destination: str,
                   dest_blocks: list[int]) -> tuple[int, str]:
    """Push on the path the destination's data plane allows; a remembered plane that fails is
    asked for again once (the stage may have been replaced since), else its error stands."""
    plane = node.kv_destinations.get(destination)
    if plane is not None:
        try:
            return await _push(node, blocks, destination, plane, dest_blocks)
        except StageUnavailable as e:
            node.kv_destinations.pop(destination, None)
            try:
                plane = await _plane_of(node, destination)
            except StageUnavailable:
                raise e from None
    else:
        plane = await _plane_of(node, destination)
    try:
        return await _push(node, blocks, destination, plane, dest_blocks)
    except StageUnavailable:
        node.kv_destinations.pop(destination, None)
        raise


async def _plane_of(node: StageNode, destination: str) -> tuple[str, bytes]:
    """The destination's data plane and its published address (remembered per destination)."""
    info = await node.channels.call(destination, "GetInfo", stage_pb2.GetInfoRequest(), timeout=10)
    node.kv_destinations[destination] = plane = (info.transport, info.transport_address)
    return plane


async def _push(node: StageNode, blocks: list[int], destination: str, plane: tuple[str, bytes],
                dest_blocks: list[int]) -> tuple[int, str]:
    ucx = _ucx_transport(node)
    if ucx is not None and plane[0] == "ucx" and plane[1]:
        from services.stage import kv_push_ucx

        return await kv_push_ucx.push(ucx, node, blocks, destination, plane[1], dest_blocks), "ucx"
    return await kv_push_grpc.push(node, blocks, destination, dest_blocks), "grpc"


def _ucx_transport(node: StageNode) -> UcxTransport | None:
    """This stage's transport if it is the UCX data plane (imported only then: it needs numpy)."""
    if node.transport.name != "ucx":
        return None
    from stagekit.transport.ucx.transport import UcxTransport

    return node.transport if isinstance(node.transport, UcxTransport) else None
