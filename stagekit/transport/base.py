"""The transport interface every data plane implements.

A stage has one inbound side (frames from its upstream neighbour, or for the head, step
results from the last stage) and one outbound link (to its downstream neighbour, or for
the last stage, back to the head). Frames on one link arrive in the order they were sent.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from stagekit.errors import InvalidRequest
from stagekit.types.step import Frame

if TYPE_CHECKING:
    from stagekit.rpc.pb import stage_pb2


class Transport(abc.ABC):
    """Invariant: ``recv`` yields every frame delivered to this stage exactly once, in
    arrival order (plus error results for steps this stage originated, and a link-lost
    notice, when a link is lost: see origin_steps); ``send`` fails with StageUnavailable
    when the outbound peer is gone."""

    name: str = "abstract"
    local_name: str = ""   # this stage's gRPC address once wired (names it in link-lost notices)

    def local_address(self) -> bytes:
        """What a peer needs to reach this stage's inbound side on this data plane,
        published in StageInfo.transport_address (empty: the gRPC address suffices)."""
        return b""

    @abc.abstractmethod
    async def connect(self, peer_address: str, peer_transport_address: bytes = b"") -> None:
        """(Re)point the outbound link at the stage at ``peer_address`` (its gRPC address),
        whose data plane published ``peer_transport_address``."""

    @abc.abstractmethod
    async def send(self, frame: Frame) -> None:
        """Send one frame on the outbound link."""

    @abc.abstractmethod
    async def recv(self) -> Frame:
        """The next inbound frame (waits until one arrives)."""

    async def deliver(self, frame: stage_pb2.Frame) -> None:
        """A frame the upstream stage pushed over gRPC (``Stage.PushFrames``). Only the gRPC
        data plane has that inbound path; any other refuses it (a stage on another plane sent
        it: the replica mixes planes, which wiring refuses)."""
        raise InvalidRequest(f"this stage runs the {self.name!r} data plane, which takes no frames over gRPC "
                             "(PushFrames): start every stage of a replica with the same --transport")

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the outbound link and stop accepting frames."""
