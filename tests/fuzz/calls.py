"""One fuzzed call over a raw gRPC channel: the status it ended with, whatever the method's shape.
A streamed answer is read for a couple of messages and then cancelled (the fuzzer asks whether a
request is refused or taken, not for all of its tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

READ = 2  # streamed messages read before cancelling a call that was taken


def status_of(channel: grpc.Channel, method: str, request: Any, *, request_streaming: bool = False,
              response_streaming: bool = False, metadata: Sequence[tuple[str, str]] = (),
              timeout_s: float = 30.0) -> tuple[grpc.StatusCode, str]:
    """Send ``request`` (a message, bytes, or for a client stream a list of them) to ``method``."""
    encode: Callable[[Any], bytes] = lambda m: m if isinstance(m, bytes) else m.SerializeToString()  # noqa: E731
    kwargs = {"request_serializer": encode, "response_deserializer": None}
    try:
        if request_streaming:
            channel.stream_unary(method, **kwargs)(iter(request), timeout=timeout_s, metadata=metadata)
        elif response_streaming:
            call = channel.unary_stream(method, **kwargs)(request, timeout=timeout_s, metadata=metadata)
            for i, _ in enumerate(call):
                if i + 1 >= READ:
                    call.cancel()
                    return grpc.StatusCode.OK, ""
        else:
            channel.unary_unary(method, **kwargs)(request, timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and "Locally cancelled" in (err.details() or ""):
            return grpc.StatusCode.OK, ""
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def show(request: Any) -> str:
    """A fuzzed request in one line, huge repeated fields abbreviated (for a failure message)."""
    if isinstance(request, bytes):
        return repr(request)
    if isinstance(request, list):
        return "[" + ", ".join(show(r) for r in request) + "]"
    from google.protobuf import text_format

    text = text_format.MessageToString(request, as_one_line=True)
    return text if len(text) < 600 else f"{text[:300]} ... ({len(text)} characters) ... {text[-200:]}"
