"""How the gateway shows an error: HTTP status, OpenAI error JSON, gRPC status.

The gateway raises stagekit's errors (`InvalidRequest`, `NotFound`, `CapacityExceeded`,
`StageUnavailable`, `DeadlineExceeded`) and the few refinements only a gateway has, defined
here. `FACES` is the one table from an error class to what the caller sees; a class without
a row takes its nearest base's (a `StagemeshError` with no row of its own is a 500).
`from_rpc_error` reads the same table backwards for a stage's status, the Generation
servicer aborts with a face's gRPC code, and `gateway_error_body` renders OpenAI's JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from stagekit.errors import (
    CapacityExceeded,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    StagemeshError,
    StageUnavailable,
)


class Unauthorized(StagemeshError):
    """The API key is missing or not one this gateway accepts."""


class PayloadTooLarge(InvalidRequest):
    """The request body is above the gateway's ``--max-body-bytes``."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt is above the gateway's ``--max-prompt-tokens``."""


class ModelNotFound(NotFound):
    """The request names a model this gateway does not serve."""


class ReplicaEvicted(StageUnavailable):
    """The gateway itself moved the request off its replica (drained, removed, re-wired or
    stalled): the replica is not to blame, and the request continues elsewhere."""


class Conflict(StagemeshError):
    """The admin request cannot be done in the pool's current state (e.g. a stage that does not
    fit the pipeline, a member of a DP-attention group, an operation already under way)."""


class InternalError(StagemeshError):
    """Something failed that the caller cannot fix: a stage's unexpected status, a broken stream."""


@dataclass(frozen=True, slots=True)
class ErrorFace:
    """What a caller sees of one error class: HTTP status, OpenAI ``type`` and ``code``,
    the gRPC code of the Generation API, and extra HTTP headers."""

    status_code: int
    error_type: str
    code: str | None
    grpc_code: grpc.StatusCode
    headers: Mapping[str, str] = field(default_factory=dict)


_REQUEST = "invalid_request_error"

FACES: dict[type[StagemeshError], ErrorFace] = {
    InvalidRequest: ErrorFace(400, _REQUEST, None, grpc.StatusCode.INVALID_ARGUMENT),
    ContextLengthExceeded: ErrorFace(400, _REQUEST, "context_length_exceeded", grpc.StatusCode.INVALID_ARGUMENT),
    PayloadTooLarge: ErrorFace(413, _REQUEST, "request_too_large", grpc.StatusCode.INVALID_ARGUMENT),
    Unauthorized: ErrorFace(401, _REQUEST, "invalid_api_key", grpc.StatusCode.UNAUTHENTICATED,
                            {"WWW-Authenticate": "Bearer"}),
    NotFound: ErrorFace(404, _REQUEST, "not_found", grpc.StatusCode.NOT_FOUND),
    Conflict: ErrorFace(409, _REQUEST, "conflict", grpc.StatusCode.FAILED_PRECONDITION),
    ModelNotFound: ErrorFace(404, _REQUEST, "model_not_found", grpc.StatusCode.NOT_FOUND),
    CapacityExceeded: ErrorFace(429, "rate_limit_error", "overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED,
                                {"Retry-After": "1"}),
    StageUnavailable: ErrorFace(503, "service_unavailable", "unavailable", grpc.StatusCode.UNAVAILABLE),
    DeadlineExceeded: ErrorFace(504, "timeout_error", "deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED),
    StagemeshError: ErrorFace(500, "server_error", "internal_error", grpc.StatusCode.INTERNAL),
}


def face_of(err: StagemeshError) -> ErrorFace:
    """The row of ``err``'s class, else of its nearest base that has one."""
    return next(FACES[cls] for cls in type(err).__mro__ if cls in FACES)


# A stage's status -> our error, by the same table; anything else is internal.
_FROM_STATUS: dict[grpc.StatusCode, type[StagemeshError]] = {
    FACES[cls].grpc_code: cls
    for cls in (InvalidRequest, NotFound, CapacityExceeded, StageUnavailable, DeadlineExceeded)
}


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError, *, where: str = "") -> StagemeshError:
    """The error for a failed stage call; the stage's own message is kept."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _FROM_STATUS.get(code, InternalError)
    message = details or code.name
    if cls in (StageUnavailable, InternalError) and where:
        message = f"{where}: {code.name}: {message}"
    return cls(message)


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def gateway_error_body(err: StagemeshError) -> dict[str, Any]:
    """OpenAI's error JSON for ``err``: its message and ``param``, its class's type and code."""
    face = face_of(err)
    return error_body(str(err), face.error_type, param=err.param, code=face.code)
