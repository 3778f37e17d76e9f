"""Sending bytes that are not a protobuf message to a gRPC method (what a fuzzer sends)."""

from __future__ import annotations

import grpc
import pytest

# Not a valid encoding of any message: a field whose length runs past the end, a varint of
# eleven bytes, and a tag of field number 0.
GARBAGE = [b"\x0a\x05ab", b"\x08" + b"\xff" * 10 + b"\x01", b"\x00\x00\x00"]


def raw_call(target: str, method: str, payload: bytes, *, request_streaming: bool = False,
             response_streaming: bool = False) -> grpc.RpcError:
    """Send ``payload`` as the (only) request message, unserialized; the error the server answers."""
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            if request_streaming:
                channel.stream_unary(method, request_serializer=None, response_deserializer=None)(
                    iter([payload]), timeout=10)
            elif response_streaming:
                responses = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(
                    payload, timeout=10)
                list(responses)
            else:
                channel.unary_unary(method, request_serializer=None, response_deserializer=None)(payload, timeout=10)
    return err.value
