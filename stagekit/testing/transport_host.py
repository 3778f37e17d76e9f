"""A data-plane transport hosted the way a stage hosts it, without a model: a gRPC server
with the two Stage RPCs the data plane needs (GetInfo publishes the transport address,
PushFrames feeds the gRPC fallback), and wiring to a peer exactly as ``StageNode.wire``
does it (GetInfo, then ``connect``). Used by the transport benchmark and tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from stagekit.errors import StageUnavailable
from stagekit.rpc.channels import stage_channel
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.transport.base import Transport

_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


class _DataPlaneServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def GetInfo(self, request: stage_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> stage_pb2.StageInfo:
        return stage_pb2.StageInfo(transport=self.transport.name, transport_address=self.transport.local_address())

    async def PushFrames(self, request_iterator: AsyncIterator[stage_pb2.Frame],
                         context: grpc.aio.ServicerContext) -> stage_pb2.PushFramesResponse:
        async for frame in request_iterator:
            await self.transport.deliver(frame)
        return stage_pb2.PushFramesResponse()


class TransportHost:
    """Invariant: while started, ``address`` answers GetInfo and PushFrames for ``transport``."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.address = ""
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> str:
        self._server = grpc.aio.server(options=_OPTIONS)
        stage_pb2_grpc.add_StageServicer_to_server(_DataPlaneServicer(self.transport), self._server)
        port = self._server.add_insecure_port(f"{host}:0")
        await self._server.start()
        self.address = f"{host}:{port}"
        return self.address

    async def link(self, peer: str, timeout_s: float = 20.0) -> None:
        """Point the outbound link at the transport hosted at ``peer``."""
        try:
            async with stage_channel(peer) as ch:
                info = await stage_pb2_grpc.StageStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise StageUnavailable(f"{peer} did not answer: {e.code().name}") from None
        await self.transport.connect(peer, info.transport_address)

    async def stop(self) -> None:
        await self.transport.close()
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
