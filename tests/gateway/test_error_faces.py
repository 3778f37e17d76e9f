"""The gateway speaks stagekit's error classes and stagekit's SamplingParams: its error table
agrees with the stages' gRPC mapping, and whatever sampling it accepts a stage accepts too."""

from __future__ import annotations

import itertools

import grpc
import pytest

from gateway.errors import (
    FACES,
    ContextLengthExceeded,
    InternalError,
    ModelNotFound,
    PayloadTooLarge,
    Unauthorized,
    face_of,
    from_rpc_error,
    gateway_error_body,
)
from gateway.sampling import build_sampling, check_sampling_fields, request_seed
from gateway.schemas import CompletionRequest
from stagekit.errors import (
    CapacityExceeded,
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    StagemeshError,
    StageUnavailable,
)
from stagekit.rpc.status import error_for, status_for

VOCAB, MAX_LEN = 100, 64


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("cls", [InvalidRequest, NotFound, CapacityExceeded, StageUnavailable, DeadlineExceeded])
def test_faces_agree_with_the_stage_grpc_mapping(cls: type[StagemeshError]) -> None:
    assert FACES[cls].grpc_code == status_for(cls("x"))
    assert type(from_rpc_error(FakeRpcError(FACES[cls].grpc_code, "why"))) is cls


@pytest.mark.parametrize("err, status, body, grpc_code", [
    (InvalidRequest("bad n", param="n"), 400,
     {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": None}, "INVALID_ARGUMENT"),
    (ContextLengthExceeded("long", param="prompt"), 400,
     {"message": "long", "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"},
     "INVALID_ARGUMENT"),
    (PayloadTooLarge("big"), 413,
     {"message": "big", "type": "invalid_request_error", "param": None, "code": "request_too_large"},
     "INVALID_ARGUMENT"),
    (Unauthorized("key"), 401,
     {"message": "key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}, "UNAUTHENTICATED"),
    (ModelNotFound("m", param="model"), 404,
     {"message": "m", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}, "NOT_FOUND"),
    (CapacityExceeded("full"), 429,
     {"message": "full", "type": "rate_limit_error", "param": None, "code": "overloaded"}, "RESOURCE_EXHAUSTED"),
    (StageUnavailable("down"), 503,
     {"message": "down", "type": "service_unavailable", "param": None, "code": "unavailable"}, "UNAVAILABLE"),
    (InternalError("oops"), 500,
     {"message": "oops", "type": "server_error", "param": None, "code": "internal_error"}, "INTERNAL"),
    # a start-up error never answers a request; if one did, it is the server's fault
    (ConfigError("no model"), 500,
     {"message": "no model", "type": "server_error", "param": None, "code": "internal_error"}, "INTERNAL"),
])
def test_face_of_each_error(err: StagemeshError, status: int, body: dict, grpc_code: str) -> None:
    face = face_of(err)
    assert (face.status_code, face.grpc_code.name) == (status, grpc_code)
    assert gateway_error_body(err) == {"error": body}


def test_unknown_stage_status_is_internal_and_says_where() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "not the head"), where="replica 0 stage 1")
    assert type(err) is InternalError and str(err) == "replica 0 stage 1: FAILED_PRECONDITION: not the head"


def test_config_error_crosses_grpc_as_failed_precondition() -> None:
    assert status_for(ConfigError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert type(error_for(grpc.StatusCode.FAILED_PRECONDITION, "x")) is ConfigError


def _accepted(**fields: object) -> bool:
    req = CompletionRequest(prompt=[1, 2, 3], **fields)
    try:
        check_sampling_fields(req, VOCAB)
        params = build_sampling(req, seed=request_seed(req), max_tokens=req.max_tokens, prompt_len=3,
                                max_model_len=MAX_LEN, vocab_size=VOCAB, top_logprobs=0)
    except InvalidRequest as err:
        assert err.param is not None  # the gateway names the field in its own words
        return False
    params.validate(VOCAB)  # the stage would take it
    return True


def test_what_the_gateway_accepts_the_stage_accepts() -> None:
    grid = {
        "temperature": [None, -0.5, 0.0, 1e-45, 0.005, 0.01, 0.7, 2.0, 100.0, 101.0, 3.5e38, float("inf"),
                        float("nan")],
        "top_p": [None, -1.0, 0.0, 0.5, 1.0, 1.5],
        "top_k": [None, -2, -1, 0, 5, 1000],
        "max_tokens": [None, -1, 0, 1, 61, 62],
        "min_tokens": [-1, 0, 1, 61],
    }
    accepted = 0
    for values in itertools.product(*grid.values()):
        accepted += _accepted(**dict(zip(grid, values, strict=True)))
    assert 0 < accepted < len(list(itertools.product(*grid.values())))
