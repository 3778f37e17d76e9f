"""SDK pieces that need no server: request building, the retry policy, error mapping."""

from __future__ import annotations

import time

import grpc
import pytest

from stagekit.client import GenerationRequest, RetryPolicy, Unauthenticated, error_from_rpc
from stagekit.client.generation_proto import request_to_proto
from stagekit.errors import CapacityExceeded, DeadlineExceeded, InvalidRequest, StagemeshError


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def test_request_building() -> None:
    text = request_to_proto(GenerationRequest.build("Hi", max_tokens=4, temperature=0, stop="x", logprobs=0))
    assert text.WhichOneof("prompt") == "text" and text.text == "Hi"
    assert text.params.max_tokens == 4 and text.params.HasField("temperature") and text.params.temperature == 0
    assert list(text.params.stop) == ["x"] and text.params.HasField("logprobs")
    assert not text.params.HasField("top_p") and not text.params.HasField("seed")
    ids = request_to_proto(GenerationRequest.build([1, 2, 3], n=2))
    assert list(ids.token_ids.ids) == [1, 2, 3] and ids.params.n == 2
    chat = request_to_proto(GenerationRequest.build(messages=[{"role": "user", "content": "hi"}]))
    assert [(m.role, m.content) for m in chat.chat.messages] == [("user", "hi")]
    with pytest.raises(InvalidRequest):
        GenerationRequest.build()
    with pytest.raises(InvalidRequest):
        GenerationRequest.build("x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(InvalidRequest):
        GenerationRequest.build(messages=[{"content": "no role"}])


def test_retry_policy() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=0.5)
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    assert 0 <= (policy.delay(unavailable, 0, None) or 0) <= 0.1
    assert policy.delay(unavailable, 2, None) is None  # attempts used up
    assert policy.delay(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT), 0, None) is None
    assert policy.delay(unavailable, 0, time.monotonic() + 0.0001) in (None, pytest.approx(0, abs=1e-4))
    full = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, trailing=(("retry-after", "1"),))
    assert policy.delay(full, 0, None) == 0.5  # the server's hint, capped by max_backoff_s
    assert policy.delay(full, 0, time.monotonic() + 0.2) is None  # the hint would outlive the deadline


def test_error_mapping() -> None:
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
        grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExceeded,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    }
    for code, cls in cases.items():
        err = error_from_rpc(FakeRpcError(code, "why"))
        assert type(err) is cls and str(err) == "why" and err.code == code  # type: ignore[attr-defined]
    other = error_from_rpc(FakeRpcError(grpc.StatusCode.DATA_LOSS, "lost"))
    assert type(other) is StagemeshError and "DATA_LOSS" in str(other)
