"""The gRPC fallback data plane: the upstream stage opens one long-lived client stream
(``Stage.PushFrames``) to its downstream neighbour and writes frames into it; tensors are
serialised as dtype + shape + bytes. Works anywhere gRPC does; costs a copy per hop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from stagekit.engine.step import Frame
from stagekit.errors import StageUnavailable
from stagekit.rpc import codec
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.transport.base import Transport

log = logging.getLogger(__name__)

_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
_CLOSE = object()


class GrpcTransport(Transport):
    name = "grpc"

    def __init__(self) -> None:
        self._inbound: asyncio.Queue[Frame] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._outbox: asyncio.Queue | None = None
        self._call_task: asyncio.Task | None = None
        self._peer = ""
        self._error: str = ""

    async def deliver(self, frame: stage_pb2.Frame) -> None:
        """Called by the stage's PushFrames handler for every frame it receives."""
        await self._inbound.put(codec.frame_from_proto(frame))

    async def connect(self, peer_address: str, peer_transport_address: bytes = b"") -> None:
        await self._close_outbound()
        self._peer, self._error = peer_address, ""
        self._channel = grpc.aio.insecure_channel(peer_address, options=_OPTIONS)
        self._outbox = asyncio.Queue()
        stub = stage_pb2_grpc.StageStub(self._channel)
        self._call_task = asyncio.create_task(self._pump(stub, self._outbox))

    async def _pump(self, stub: stage_pb2_grpc.StageStub, outbox: asyncio.Queue) -> None:
        async def frames() -> AsyncIterator[stage_pb2.Frame]:
            while (item := await outbox.get()) is not _CLOSE:
                yield item

        try:
            await stub.PushFrames(frames())
        except grpc.aio.AioRpcError as e:
            self._error = f"{e.code().name}: {e.details()}"
            log.warning("data-plane stream to %s ended: %s", self._peer, self._error)

    async def send(self, frame: Frame) -> None:
        if self._outbox is None or self._call_task is None:
            raise StageUnavailable("data plane is not connected (stage not wired)")
        if self._call_task.done():
            raise StageUnavailable(f"data-plane link to {self._peer} is down ({self._error or 'closed'})")
        await self._outbox.put(codec.frame_to_proto(frame))

    async def recv(self) -> Frame:
        return await self._inbound.get()

    async def _close_outbound(self) -> None:
        if self._outbox is not None:
            await self._outbox.put(_CLOSE)
        if self._call_task is not None:
            try:
                await asyncio.wait_for(self._call_task, timeout=2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._call_task.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._outbox = self._call_task = None

    async def close(self) -> None:
        await self._close_outbound()
