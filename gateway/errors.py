"""Gateway errors and their two faces: the gRPC status a stage sent, the OpenAI error JSON we send.

Every failure a handler can report is a `GatewayError`; `from_rpc_error` is the single place
that maps a stage's gRPC status to one, and `error_body` the single place that renders one.
"""

from __future__ import annotations

from typing import Any

import grpc


class GatewayError(Exception):
    """An error with an HTTP status and OpenAI's ``type`` / ``code`` / ``param`` fields."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Overloaded(GatewayError):
    """The replica (or every replica) refused the request for lack of capacity."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class Unavailable(GatewayError):
    """No replica could serve the request (stage down, none healthy)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "unavailable"


class DeadlineExceeded(GatewayError):
    status_code = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"


class InternalError(GatewayError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"


_FROM_STATUS: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError, *, where: str = "") -> GatewayError:
    """The gateway error for a failed stage call; the stage's own message is kept."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _FROM_STATUS.get(code, InternalError)
    message = details or code.name
    if cls in (Unavailable, InternalError) and where:
        message = f"{where}: {code.name}: {message}"
    return cls(message)


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def gateway_error_body(err: GatewayError) -> dict[str, Any]:
    return error_body(err.message, err.error_type, param=err.param, code=err.code)
