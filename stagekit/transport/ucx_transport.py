"""The UCX data plane (UCXX tag send/receive). Worker addresses travel over the gRPC
wiring (StageInfo.transport_address); a frame is an envelope (step metadata, dtypes,
shapes, small tensors inline) plus one message per larger tensor, sent from the tensor's
own memory (host or CUDA) and received straight into tensors allocated for it.

Failure behaviour: when a link to a neighbour is lost (its process exited, its endpoint
failed, or a started frame stalled past the part timeout), pending sends on it raise
StageUnavailable, and so does every later send on it until the stage is re-wired; while
the link from upstream is down, so does every step this stage would originate (its
results could not come back). Steps this stage originated (the replica head's) that are
still waiting come back at once as error results, so the engine fails exactly their
requests, with the reason. Frames are delivered whole or not at all. With the ``cma``
profile a neighbour dying while this process copies out of its memory makes UCX abort
this process instead (see ucx_settings).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets

from stagekit.engine.step import Frame
from stagekit.errors import StageUnavailable
from stagekit.transport import ucx_wire
from stagekit.transport.base import Transport
from stagekit.transport.origin_steps import OriginSteps
from stagekit.transport.ucx_inbound import InboundLink, Inbox
from stagekit.transport.ucx_outbound import OutboundLink
from stagekit.transport.ucx_runtime import UcxRuntime
from stagekit.transport.ucx_settings import UcxSettings

log = logging.getLogger(__name__)

# Closed links and inboxes may own buffers that UCX requests still point at; keep them.
_RETIRED: list[object] = []


class UcxTransport(Transport):
    """Invariant: ``recv`` yields the current upstream link's frames in send order, plus one
    error result per originated step when a link is lost; ``send`` never returns before
    its frame's buffers are free for reuse."""

    name = "ucx"

    def __init__(self, settings: UcxSettings | None = None) -> None:
        self.settings = (settings or UcxSettings.from_env()).validated()
        self._inbound: asyncio.Queue[Frame] = asyncio.Queue()
        self._origin = OriginSteps()
        self._rt: UcxRuntime | None = None
        self._inbox: Inbox | None = None
        self._out: OutboundLink | None = None
        self._me: ucx_wire.PeerAddress | None = None
        self.inbound_lost = ""    # why the upstream link failed (until an upstream connects again)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started on first use, inside the loop
        self._start()

    def _start(self) -> UcxRuntime:
        if self._rt is None:
            rt = UcxRuntime.get(self.settings)
            inbox = secrets.randbits(32)
            self._me = ucx_wire.PeerAddress(rt.worker_address(), inbox, os.getpid(), ucx_wire.this_host())
            self._inbox = Inbox(rt, inbox, self._deliver, self._linked, self._inbound_lost)
            self._rt = rt
            log.info("UCX data plane ready (%s)", self.settings.describe())
        return self._rt

    @property
    def description(self) -> str:
        return f"ucx ({self.settings.describe()})"

    def local_address(self) -> bytes:
        self._start()
        assert self._me is not None
        return self._me.pack()

    async def connect(self, peer_address: str, peer_transport_address: bytes = b"") -> None:
        rt = self._start()
        if not peer_transport_address:
            raise StageUnavailable(f"stage {peer_address} publishes no UCX address: it runs another data plane")
        try:
            peer = ucx_wire.PeerAddress.unpack(peer_transport_address)
        except ValueError as e:
            raise StageUnavailable(f"stage {peer_address}: {e}") from None
        out = self._out
        if out is not None and not out.lost and out.peer_name == peer_address and out.peer == peer:
            return  # re-wired to the same live peer: keep the link (and the frames in flight on it)
        self._close_outbound()
        link = OutboundLink(rt, peer_address, peer, self._outbound_lost)
        try:
            await link.open(self._me)
        except BaseException:
            link.close()
            _RETIRED.append(link)
            raise
        self._out = link
        log.info("UCX link %x to %s open", link.link_id, peer_address)

    async def send(self, frame: Frame) -> None:
        out = self._out
        if out is None:
            raise StageUnavailable("data plane is not connected (stage not wired)")
        if self.inbound_lost and self._origin.originates(frame):
            raise StageUnavailable(f"results cannot come back: the link from upstream is down ({self.inbound_lost})")
        self._origin.sent(frame)   # before the await: a loss during the send must fail this step too
        try:
            await out.send(frame)
        except StageUnavailable:
            if frame.step is not None:
                self._origin.open.pop(frame.step.step_id, None)  # the caller fails it from the raise
            raise

    async def recv(self) -> Frame:
        return await self._inbound.get()

    async def close(self) -> None:
        self._close_outbound()
        if self._inbox is not None:
            self._inbox.close()
            _RETIRED.append(self._inbox)
            self._inbox = None

    def _close_outbound(self) -> None:
        if self._out is not None:
            self._out.close()
            _RETIRED.append(self._out)
            self._out = None

    def _deliver(self, frame: Frame) -> None:
        self._origin.received(frame)
        self._inbound.put_nowait(frame)

    def _linked(self, link: InboundLink) -> None:
        self.inbound_lost = ""

    def _fail_origin(self, reason: str) -> None:
        for f in self._origin.fail_all(reason):
            self._inbound.put_nowait(f)

    def _outbound_lost(self, reason: str) -> None:
        self._fail_origin(f"data-plane link to {self._out.peer_name if self._out else 'downstream'} lost: {reason}")

    def _inbound_lost(self, reason: str) -> None:
        self.inbound_lost = reason
        self._fail_origin(f"data-plane link from upstream lost: {reason}")
