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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from services.stage import kv_push_grpc
from services.stage.kv_blocks import KvBlocks
from services.stage.kv_holds import KvHolds
from services.stage.stage_channels import StageChannels
from stagekit.engine.engine import Engine
from stagekit.errors import DeadlineExceeded, InvalidRequest, NotFound, StageUnavailable
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.pb import stage_pb2
from stagekit.transport.base import Transport

if TYPE_CHECKING:
    from stagekit.transport.ucx.transport import UcxTransport

log = logging.getLogger(__name__)


class KvPort:
    """A stage's end of KV transfers: export (the head), send its own layers' blocks, land
    blocks pushed to it (over gRPC here, over UCX through the transport's bulk handler).
    Invariant: blocks are read only while an export pins them and written only while an
    import reserves them (the heads' engines hold both), never by a step meanwhile."""

    def __init__(self, blocks: KvBlocks, transport: Transport, engine: Engine | None,
                 creds: MeshCredentials = PLAINTEXT) -> None:
        self.blocks, self.transport, self.engine = blocks, transport, engine
        self.channels = StageChannels(creds)   # to other stages, for the transfers' control calls
        self.holds = KvHolds(engine) if engine is not None else None   # prompt blocks awaiting their hand-off
        # destinations: gRPC address -> (data plane, published address), asked once
        self._planes: dict[str, tuple[str, bytes]] = {}
        self._ucx = _ucx_transport(transport)
        if self._ucx is not None:   # KV blocks pushed by other replicas' stages over UCX
            from services.stage import kv_push_ucx

            self._ucx.serve_bulk(kv_push_ucx.handler(blocks))

    async def close(self) -> None:
        await self.channels.close()

    def _head(self) -> Engine:
        if self.engine is None:
            io = self.blocks.io
            raise InvalidRequest(f"this stage holds layers {io.start_layer}:{io.end_layer}; KV transfers are "
                                 "started and reserved on the replica head (the stage holding layer 0)")
        return self.engine

    async def export(self, token_ids: list[int], destination: list[str], pipeline: list[str],
                     hold_id: str = "", lease_s: float = 0.0) -> stage_pb2.ExportKvResponse:
        """Send the KV of the cached full blocks of ``token_ids`` from this replica (its stages
        ``pipeline``) to the replica whose stages are ``destination``, position by position.
        With ``lease_s``, the whole export ends within it (DEADLINE_EXCEEDED past it, everything
        released) and the destination's reservation expires after it; the hold ``hold_id`` (a
        prefill/decode hand-off's prompt blocks) is released when the export ends, however."""
        self._head()
        try:
            if lease_s <= 0:
                return await self._export(token_ids, destination, pipeline, 0.0)
            try:
                async with asyncio.timeout(lease_s):
                    return await self._export(token_ids, destination, pipeline, lease_s)
            except TimeoutError:
                raise DeadlineExceeded(f"KV export to {destination[0] if destination else '?'} did not finish "
                                       f"within its lease of {lease_s:g}s") from None
        finally:
            if hold_id and self.holds is not None:
                self.holds.release(hold_id)

    async def _export(self, token_ids: list[int], destination: list[str], pipeline: list[str],
                      lease_s: float) -> stage_pb2.ExportKvResponse:
        engine = self._head()
        pipeline = pipeline or [""]  # a one-stage replica needs no wiring
        if len(destination) != len(pipeline):
            raise InvalidRequest(f"the destination has {len(destination)} stage(s), this replica {len(pipeline)}: "
                                 "KV moves between stages holding the same layers")
        block_size = engine.kv_block_size
        started = time.perf_counter()
        hashes, blocks = engine.pin_cached_prefix(token_ids)   # not reclaimed while they are read
        try:
            if not blocks:
                raise NotFound(f"no cached KV for the first {block_size} of these {len(token_ids)} tokens on "
                               "this replica: run them as a prompt first")
            reply = await self.channels.call(destination[0], "ReserveKvBlocks", stage_pb2.ReserveKvBlocksRequest(
                hashes=hashes[:len(blocks)], block_size=block_size, lease_ms=int(lease_s * 1000)))
            src = blocks[reply.num_present:]
            sent, paths = 0, set()
            try:
                if src:
                    sends = [self.send_blocks(src, destination[0], list(reply.blocks), reply.land_by_unix_ms)]
                    sends += [self.channels.call(addr, "SendKvBlocks", stage_pb2.SendKvBlocksRequest(
                        blocks=src, destination=dest, destination_blocks=list(reply.blocks),
                        land_by_unix_ms=reply.land_by_unix_ms))
                        for addr, dest in zip(pipeline[1:], destination[1:], strict=True)]
                    results = await asyncio.gather(*sends)
                    sent = results[0][0] + sum(r.bytes_sent for r in results[1:])
                    paths = {results[0][1], *(r.transport for r in results[1:])}
            except BaseException:
                await self._abandon(destination[0], reply.import_id)
                raise
            await self.channels.call(destination[0], "CommitKvBlocks", stage_pb2.CommitKvBlocksRequest(
                import_id=reply.import_id, ok=True))
        finally:
            engine.unpin(blocks)
        transport = ",".join(sorted(paths))
        log.info("exported the KV of %d tokens to %s: %d of %d blocks sent (%.1f MB over %s) in %.3f s",
                 len(blocks) * block_size, destination[0], len(src), len(blocks), sent / 1e6,
                 transport or "-", time.perf_counter() - started)
        return stage_pb2.ExportKvResponse(num_tokens=len(blocks) * block_size, num_blocks_sent=len(src),
                                          bytes_sent=sent, transport=transport)

    async def _abandon(self, head: str, import_id: str) -> None:
        try:
            await self.channels.call(head, "CommitKvBlocks",
                                     stage_pb2.CommitKvBlocksRequest(import_id=import_id, ok=False), 10)
        except Exception as e:  # the reservation expires on its own
            log.warning("could not release KV import %s on %s: %s", import_id, head, e)

    def reserve(self, hashes: list[int], block_size: int, lease_ms: int = 0) -> stage_pb2.ReserveKvBlocksResponse:
        """Blocks for an import into this replica (its head), beyond those cached already; the
        reservation lapses after ``lease_ms`` (0: the default) unless committed."""
        ttl_s = lease_ms / 1000 if lease_ms > 0 else None
        import_id, present, blocks, land_by = self._head().reserve_kv_import(hashes, block_size, ttl_s)
        return stage_pb2.ReserveKvBlocksResponse(import_id=import_id, num_present=present, blocks=blocks,
                                                 land_by_unix_ms=int(land_by * 1000))

    def commit(self, import_id: str, ok: bool) -> None:
        self._head().commit_kv_import(import_id, ok)

    async def receive(self, chunks: AsyncIterator[stage_pb2.KvBlocksChunk]) -> int:
        """Land blocks pushed over gRPC into this stage's pool; returns the bytes received."""
        return await kv_push_grpc.receive(self.blocks, chunks)

    async def send_blocks(self, blocks: list[int], destination: str, dest_blocks: list[int],
                          land_by_ms: int = 0) -> tuple[int, str]:
        """Push this stage's KV of ``blocks`` into ``dest_blocks`` of the stage at ``destination``:
        over UCX when both stages run the UCX data plane, else over gRPC; the receiver writes
        them only before ``land_by_ms`` (Unix ms; 0: no bound). Returns the bytes sent and the
        path taken ("ucx" / "grpc")."""
        if len(blocks) != len(dest_blocks):
            raise InvalidRequest(f"{len(blocks)} blocks to send into {len(dest_blocks)} destination blocks")
        started = time.perf_counter()
        self.blocks.io.check_blocks(blocks)
        if len(set(dest_blocks)) != len(dest_blocks):
            raise InvalidRequest("a KV transfer names a destination block more than once")
        try:
            sent, path = await self._push_to(blocks, destination, dest_blocks, land_by_ms)
        except Exception as e:
            log.warning("sending %d KV blocks to %s failed: %s", len(blocks), destination, e)
            raise
        took = time.perf_counter() - started
        log.info("sent %d KV blocks (%.1f MB) to %s over %s in %.3f s (%.2f GB/s)", len(blocks), sent / 1e6,
                 destination, path, took, sent / took / 1e9)
        return sent, path

    async def _push_to(self, blocks: list[int], destination: str, dest_blocks: list[int],
                       land_by_ms: int) -> tuple[int, str]:
        """Push on the path the destination's data plane allows; a remembered plane that fails is
        asked for again once (the stage may have been replaced since), else its error stands."""
        plane = self._planes.get(destination)
        if plane is not None:
            try:
                return await self._push(blocks, destination, plane, dest_blocks, land_by_ms)
            except StageUnavailable as e:
                self._planes.pop(destination, None)
                try:
                    plane = await self._plane_of(destination)
                except StageUnavailable:
                    raise e from None
        else:
            plane = await self._plane_of(destination)
        try:
            return await self._push(blocks, destination, plane, dest_blocks, land_by_ms)
        except StageUnavailable:
            self._planes.pop(destination, None)
            raise

    async def _plane_of(self, destination: str) -> tuple[str, bytes]:
        """The destination's data plane and its published address (remembered per destination)."""
        info = await self.channels.call(destination, "GetInfo", stage_pb2.GetInfoRequest(), timeout=10)
        self._planes[destination] = plane = (info.transport, info.transport_address)
        return plane

    async def _push(self, blocks: list[int], destination: str, plane: tuple[str, bytes],
                    dest_blocks: list[int], land_by_ms: int) -> tuple[int, str]:
        if self._ucx is not None and plane[0] == "ucx" and plane[1]:
            from services.stage import kv_push_ucx

            return await kv_push_ucx.push(self._ucx, self.blocks, blocks, destination, plane[1], dest_blocks,
                                          land_by_ms), "ucx"
        return await kv_push_grpc.push(self.blocks, self.channels, blocks, destination, dest_blocks,
                                       land_by_ms), "grpc"


def _ucx_transport(transport: Transport) -> UcxTransport | None:
    """``transport`` if it is the UCX data plane (imported only then: it needs numpy)."""
    if transport.name != "ucx":
        return None
    from stagekit.transport.ucx.transport import UcxTransport

    return transport if isinstance(transport, UcxTransport) else None
