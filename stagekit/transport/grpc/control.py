"""Control messages of the gRPC data plane, and the watch over the streams from upstream.

A gRPC stream ends the same way for the receiver whether its sender closed it (re-wired
elsewhere) or died: the handler's request iterator just stops. So a sender says ``hello``
as the first message of a stream and ``bye`` as the last one before a close it means; a
stream from upstream that ends without ``bye``, while it is the current one, is a lost link.

A control message is a frame with neither a step nor a result and one tensor of
unspecified dtype whose bytes name the message: no real frame looks like that (a tensor
always has a dtype), so control and data cannot be confused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from stagekit.errors import InvalidRequest
from stagekit.rpc.pb import common_pb2, stage_pb2

HELLO, BYE = "hello", "bye"
_PREFIX = b"stagemesh:"


def control_frame(kind: str) -> stage_pb2.Frame:
    return stage_pb2.Frame(tensors=[common_pb2.Tensor(data=_PREFIX + kind.encode())])


def control_of(frame: stage_pb2.Frame) -> str | None:
    """The control message ``frame`` carries, or None for a data frame."""
    if frame.WhichOneof("kind") is not None or len(frame.tensors) != 1:
        return None
    t = frame.tensors[0]
    if t.dtype != common_pb2.DTYPE_UNSPECIFIED or not t.data.startswith(_PREFIX):
        return None
    return t.data[len(_PREFIX):].decode()


class InboundStreams:
    """Watches the tasks serving PushFrames streams (one per stream). Invariant: ``on_lost``
    is called once per stream that ended without ``bye`` while it was the newest stream,
    and never after ``close``."""

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        self._on_lost = on_lost
        self._current: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self._known: set[asyncio.Task] = set()
        self._closed = False

    def seen(self, stream: asyncio.Task | None, closing: bool = False, hello: bool = False) -> None:
        """A message arrived on ``stream`` (the handler task that received it). A stream starts with
        the upstream stage's ``hello`` (its first frame, `connect`): another first frame is refused,
        so that a stray PushFrames call can neither become the newest stream nor, by ending, mark the
        real upstream's link lost."""
        if stream is None:
            return
        if stream not in self._known and not hello:
            raise InvalidRequest("a data-plane stream (PushFrames) must start with the upstream stage's hello")
        if stream not in self._known:
            self._known.add(stream)
            self._current = stream
            stream.add_done_callback(self._ended)
        if closing:
            self._closing.add(stream)

    def _ended(self, stream: asyncio.Task) -> None:
        self._known.discard(stream)
        graceful = stream in self._closing
        self._closing.discard(stream)
        if stream is not self._current:
            return  # superseded by a newer stream: its end says nothing about the link
        self._current = None
        if not graceful and not self._closed:
            self._on_lost("the stream from upstream ended without a goodbye (upstream stage gone)")

    def close(self) -> None:
        self._closed = True
