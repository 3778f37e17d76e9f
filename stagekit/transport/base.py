"""The transport interface every data plane implements.

A stage has one inbound side (frames from its upstream neighbour, or for the head, step
results from the last stage) and one outbound link (to its downstream neighbour, or for
the last stage, back to the head). Frames on one link arrive in the order they were sent.
"""

from __future__ import annotations

import abc

from stagekit.engine.step import Frame


class Transport(abc.ABC):
    """Invariant: ``recv`` yields every frame delivered to this stage exactly once, in
    arrival order; ``send`` fails with StageUnavailable when the outbound peer is gone."""

    name: str = "abstract"

    @abc.abstractmethod
    async def connect(self, peer_address: str) -> None:
        """(Re)point the outbound link at ``peer_address`` (a stage's gRPC address)."""

    @abc.abstractmethod
    async def send(self, frame: Frame) -> None:
        """Send one frame on the outbound link."""

    @abc.abstractmethod
    async def recv(self) -> Frame:
        """The next inbound frame (waits until one arrives)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the outbound link and stop accepting frames."""
