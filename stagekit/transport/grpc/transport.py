"""The gRPC fallback data plane: the upstream stage opens one long-lived client stream
(``Stage.PushFrames``) to its downstream neighbour and writes frames into it; tensors are
serialised as dtype + shape + bytes. Works anywhere gRPC does; costs a copy per hop.

Failure behaviour (as on UCX): when the stream to the next stage fails, or the stream from
upstream ends without the sender closing it, the steps this stage originated (the replica
head's) that still wait for results come back at once as error results, so the engine fails
exactly their requests with the reason; later sends on a failed link raise
StageUnavailable until the stage is re-wired, and so do steps this stage would originate
while the stream from upstream is down (their results could not come back); a lost stream
from upstream is reported on toward the head as a link-lost notice (origin_steps). A sender says
``hello`` when it opens a stream and ``bye`` before it closes one (see grpc/control.py), which
is how a receiver tells a re-wire from a dead neighbour: either way its stream just ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from stagekit.errors import StageUnavailable
from stagekit.rpc import stage_proto
from stagekit.rpc.channels import stage_channel
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.transport.base import Transport
from stagekit.transport.grpc import control
from stagekit.transport.grpc.control import BYE, HELLO
from stagekit.transport.origin_steps import OriginSteps, lost_notice, refusal
from stagekit.types.step import Frame

log = logging.getLogger(__name__)

_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
_CLOSE = object()


class GrpcTransport(Transport):
    """Invariant: ``recv`` yields the frames of the upstream streams in arrival order, plus
    one error result per originated step when a link is lost; control frames never reach it."""

    name = "grpc"

    def __init__(self, creds: MeshCredentials = PLAINTEXT) -> None:
        self.creds = creds   # TLS and token for the stream to the next stage
        self._inbound: asyncio.Queue[Frame] = asyncio.Queue()
        self._origin = OriginSteps()
        self._channel: grpc.aio.Channel | None = None
        self._outbox: asyncio.Queue | None = None
        self._call_task: asyncio.Task | None = None
        self._peer = ""
        self._error: str = ""
        self._streams = control.InboundStreams(self._inbound_lost)
        self.inbound_lost = ""    # why the stream from upstream failed (until an upstream says hello)
        self.ring_broken = ""     # a link-lost notice came back (until this stage is re-wired)

    async def deliver(self, frame: stage_pb2.Frame) -> None:
        """Called by the stage's PushFrames handler for every frame it receives, inside the
        handler's task: that task ending is how this side learns the stream ended."""
        kind = control.control_of(frame)
        stream = asyncio.current_task()
        if kind == HELLO:
            self.inbound_lost = ""
        if kind is not None:
            self._streams.seen(stream, closing=kind == BYE, hello=kind == HELLO)
            return
        self._streams.seen(stream)
        f = stage_proto.frame_from_proto(frame)
        if f.result is not None and f.result.link_lost:
            self.ring_broken = f.result.error
            log.error("link-lost notice from downstream: %s", f.result.error)
            self._fail_origin(f"the ring is broken: {f.result.error}")
        self._origin.received(f)
        await self._inbound.put(f)

    async def connect(self, peer_address: str, peer_transport_address: bytes = b"") -> None:
        await self._close_outbound()
        self._peer, self._error, self.ring_broken = peer_address, "", ""
        self._channel = stage_channel(peer_address, self.creds, _OPTIONS)
        self._outbox = asyncio.Queue()
        self._outbox.put_nowait(control.control_frame(HELLO))
        stub = stage_pb2_grpc.StageStub(self._channel)
        self._call_task = asyncio.create_task(self._pump(stub, self._outbox))

    async def _pump(self, stub: stage_pb2_grpc.StageStub, outbox: asyncio.Queue) -> None:
        closing = False

        async def frames() -> AsyncIterator[stage_pb2.Frame]:
            nonlocal closing
            while (item := await outbox.get()) is not _CLOSE:
                yield item
            closing = True
            yield control.control_frame(BYE)

        try:
            await stub.PushFrames(frames())
        except grpc.aio.AioRpcError as e:
            self._error = f"{e.code().name}: {e.details()}"
        else:
            self._error = "the stage closed the stream"
        if closing:
            return
        log.error("data-plane stream to %s ended: %s", self._peer, self._error)
        self._fail_origin(f"data-plane link to {self._peer} lost: {self._error}")

    async def send(self, frame: Frame) -> None:
        if self._outbox is None or self._call_task is None:
            raise StageUnavailable("data plane is not connected (stage not wired)")
        if (self.inbound_lost or self.ring_broken) and self._origin.originates(frame):
            raise StageUnavailable(refusal(self.inbound_lost, self.ring_broken))
        if self._call_task.done():
            raise StageUnavailable(f"data-plane link to {self._peer} is down ({self._error or 'closed'})")
        self._origin.sent(frame)
        await self._outbox.put(stage_proto.frame_to_proto(frame))

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
        self._streams.close()
        await self._close_outbound()

    def _fail_origin(self, reason: str) -> None:
        for f in self._origin.fail_all(reason):
            self._inbound.put_nowait(f)

    def _inbound_lost(self, reason: str) -> None:
        self.inbound_lost = reason
        log.error("data-plane stream from upstream lost: %s", reason)
        self._fail_origin(f"data-plane link from upstream lost: {reason}")
        self._inbound.put_nowait(OriginSteps.notice(lost_notice(self.local_name, reason)))
