"""Regression from the first fuzzing pass: bytes that are not a protobuf message, sent to the
gateway's gRPC Generation API, are INVALID_ARGUMENT (grpc answered UNKNOWN "Unexpected
DecodeError"), and the gateway serves on."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError

from stagekit.client import GenerationClient
from stagekit.rpc.pb import generation_pb2
from tests.gateway.harness import GatewayThread
from tests.helpers.raw_grpc import GARBAGE, raw_call

SERVICE = "/stagemesh.v1.Generation/"


@pytest.fixture(scope="module")
def gw(replica: list[str]) -> Iterator[GatewayThread]:
    with GatewayThread([replica], grpc_port=0) as gateway:
        yield gateway


@pytest.mark.parametrize("payload", GARBAGE)
def test_malformed_bytes_on_the_generation_api_are_invalid_argument(gw: GatewayThread, payload: bytes) -> None:
    for message in (generation_pb2.GenerationRequest, generation_pb2.ListModelsRequest):
        with pytest.raises(DecodeError):
            message.FromString(payload)
    for method, streaming in (("Generate", True), ("Complete", False), ("ListModels", False)):
        err = raw_call(gw.grpc_target, SERVICE + method, payload, response_streaming=streaming)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.code(), err.details())
        assert f"{SERVICE}{method}: malformed request message" in err.details()
    with GenerationClient(gw.grpc_target, timeout_s=10) as client:  # still serving
        assert client.complete("Hello", max_tokens=2, temperature=0).usage.completion_tokens == 2
