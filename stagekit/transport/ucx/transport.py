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
requests, with the reason. A lost link from upstream is also reported on toward the head
as a link-lost notice (origin_steps), which the head treats the same way, so a ring of
four or more stages learns of a dead stage that is not the head's neighbour. Frames are
delivered whole or not at all. With the ``cma`` profile a neighbour dying while this
process copies out of its memory makes UCX abort this process instead (see ucx/settings).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets

import torch

from stagekit.errors import StageUnavailable
from stagekit.transport.base import Transport
from stagekit.transport.origin_steps import OriginSteps, lost_notice, refusal
from stagekit.transport.ucx import bulk, wire
from stagekit.transport.ucx.bulk_inbox import BulkHandler, BulkInbox
from stagekit.transport.ucx.inbound import InboundLink, Inbox
from stagekit.transport.ucx.outbound import OutboundLink
from stagekit.transport.ucx.runtime import UcxRuntime
from stagekit.transport.ucx.settings import UcxSettings
from stagekit.types.step import Frame

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
        self._me: wire.PeerAddress | None = None
        self._bulk_handler: BulkHandler | None = None
        self._bulk_inbox: BulkInbox | None = None
        self.inbound_lost = ""    # why the upstream link failed (until an upstream connects again)
        self.ring_broken = ""     # a link-lost notice came back (until this stage is re-wired)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started on first use, inside the loop
        self._start()

    def _start(self) -> UcxRuntime:
        if self._rt is None:
            rt = UcxRuntime.get(self.settings)
            inbox = secrets.randbits(32)
            self._me = wire.PeerAddress(rt.worker_address(), inbox, os.getpid(), wire.this_host())
            self._inbox = Inbox(rt, self.settings, inbox, self._deliver, self._linked, self._inbound_lost)
            self._rt = rt
            if self._bulk_handler is not None:
                self._bulk_inbox = BulkInbox(rt, self.settings, inbox, self._bulk_handler)
            log.info("UCX data plane ready (%s)", self.settings.describe())
        return self._rt

    def serve_bulk(self, handler: BulkHandler) -> None:
        """Accept one-off bulk transfers (header + payload; see ucx/bulk) on this stage's inbox,
        each handed to ``handler``. Call once, before or after the transport started."""
        self._bulk_handler = handler
        if self._rt is not None and self._bulk_inbox is None:
            assert self._me is not None
            self._bulk_inbox = BulkInbox(self._rt, self.settings, self._me.inbox, handler)

    async def send_bulk(self, peer_name: str, peer_transport_address: bytes, header: bytes,
                        parts: list[torch.Tensor]) -> None:
        """Send ``header`` + the payload ``parts`` (contiguous host tensors, sent from their memory)
        to the bulk handler of the stage at ``peer_name`` (its gRPC address), whose data plane
        published ``peer_transport_address``; its errors raised here."""
        rt = self._start()
        try:
            peer = wire.PeerAddress.unpack(peer_transport_address)
        except ValueError as e:
            raise StageUnavailable(f"stage {peer_name}: {e}") from None
        assert self._me is not None
        await bulk.send_bulk(rt, self.settings, self._me, peer_name, peer, header, parts)

    @property
    def description(self) -> str:
        return f"ucx ({self.settings.describe()})"

    def local_address(self) -> bytes:
        rt = self._start()
        assert self._me is not None
        if rt.shm_unsafe and not self._me.shm_unsafe:   # ask same-host senders to come over TCP
            self._me = dataclasses.replace(self._me, shm_unsafe=True)
        return self._me.pack()

    async def connect(self, peer_address: str, peer_transport_address: bytes = b"") -> None:
        rt = self._start()
        self.ring_broken = ""
        if not peer_transport_address:
            raise StageUnavailable(f"stage {peer_address} publishes no UCX address: it runs another data plane")
        try:
            peer = wire.PeerAddress.unpack(peer_transport_address)
        except ValueError as e:
            raise StageUnavailable(f"stage {peer_address}: {e}") from None
        out = self._out
        if out is not None and not out.lost and out.peer_name == peer_address and out.peer == peer:
            return  # re-wired to the same live peer: keep the link (and the frames in flight on it)
        self._close_outbound()
        link = OutboundLink(rt, self.settings, peer_address, peer, self._outbound_lost)
        try:
            await link.open(self._me)
        except BaseException:
            link.close()
            _RETIRED.append(link)
            raise
        self._out = link
        log.info("UCX link %x to %s open (%s)", link.link_id, peer_address,
                 wire.describe_route(peer.host, link.error_handling))

    async def send(self, frame: Frame) -> None:
        out = self._out
        if out is None:
            raise StageUnavailable("data plane is not connected (stage not wired)")
        if (self.inbound_lost or self.ring_broken) and self._origin.originates(frame):
            raise StageUnavailable(refusal(self.inbound_lost, self.ring_broken))
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
        if self._bulk_inbox is not None:
            self._bulk_inbox.close()
            _RETIRED.append(self._bulk_inbox)
            self._bulk_inbox = None
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
        if frame.result is not None and frame.result.link_lost:
            self.ring_broken = frame.result.error
            log.error("link-lost notice from downstream: %s", frame.result.error)
            self._fail_origin(f"the ring is broken: {frame.result.error}")
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
        self._inbound.put_nowait(OriginSteps.notice(lost_notice(self.local_name, reason)))
