"""Generated bad messages for the gateway's gRPC Generation API: `GenerationRequest`s with odd
values in every field (tests/fuzz/proto_strategies.py) and random bytes, to Generate, Complete and
ListModels. Every answer is OK or a refusal with a message, never UNKNOWN/INTERNAL or a hang, and
the gateway serves a good request afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagekit.rpc.pb import generation_pb2
from tests.fuzz.calls import show, status_of
from tests.fuzz.conftest import API_KEY, EXAMPLES, REFUSALS, assert_gateway_serves
from tests.fuzz.proto_strategies import messages
from tests.gateway.harness import GatewayThread

SERVICE = "/stagemesh.v1.Generation/"
METHODS = {"Generate": True, "Complete": False, "ListModels": False}  # name: streams its answer
HINTS = {"model": ["demo", "", "other"], "text": ["Hello", "\ud7ff", "a" * 100_000], "role": ["user", "system",
         "assistant", "tool", "", "USER"], "content": ["hi", ""], "ids": [0, 1, 2, 3, 500, 511, 512, 100_000]}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def channel(gateway: GatewayThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_target) as ch:
        yield ch
    assert_gateway_serves(gateway)


def _check(code: grpc.StatusCode, details: str, what: object) -> None:
    assert code == grpc.StatusCode.OK or code in REFUSALS, f"{code.name} {details!r} for {show(what)}"
    assert code == grpc.StatusCode.OK or details.strip(), f"{code.name} without a message for {show(what)}"


@pytest.mark.parametrize("method", list(METHODS))
@FUZZ
@given(request=messages(generation_pb2.GenerationRequest.DESCRIPTOR, HINTS))
def test_odd_generation_requests_are_answered_or_refused(channel: grpc.Channel, method: str, request) -> None:
    code, details = status_of(channel, SERVICE + method, request, response_streaming=METHODS[method],
                              metadata=[("authorization", f"Bearer {API_KEY}")])
    _check(code, details, request)


@pytest.mark.parametrize("method", list(METHODS))
@FUZZ
@given(payload=st.binary(max_size=200))
def test_random_bytes_are_answered_or_refused(channel: grpc.Channel, method: str, payload: bytes) -> None:
    code, details = status_of(channel, SERVICE + method, payload, response_streaming=METHODS[method],
                              metadata=[("authorization", f"Bearer {API_KEY}")])
    _check(code, details, payload)
