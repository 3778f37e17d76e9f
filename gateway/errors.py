"""Gateway errors and their two faces: the gRPC status a stage sent, the OpenAI error JSON we send.

Every failure a handler can report is a `GatewayError`. Each class names its HTTP status and
its gRPC code once: `from_rpc_error` maps a stage's status to a gateway error with that table,
the Generation servicer maps a gateway error back to a status, and `error_body` renders one
as OpenAI's JSON.
"""

from __future__ import annotations

from typing import Any

import grpc


class GatewayError(Exception):
    """An error with an HTTP status and OpenAI's ``type`` / ``code`` / ``param`` fields."""

    status_code = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        """Extra HTTP headers of the error response."""
        return {}


class InvalidRequest(GatewayError):
    status_code = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class Unauthorized(GatewayError):
    status_code = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(GatewayError):
    status_code = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status_code = 413
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(GatewayError):
    """The replica (or every replica) refused the request for lack of capacity."""

    status_code = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    code = "overloaded"
    retry_after_s = 1

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unavailable(GatewayError):
    """No replica could serve the request (stage down, none healthy)."""

    status_code = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable"
    code = "unavailable"


class DeadlineExceeded(GatewayError):
    status_code = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "timeout_error"
    code = "deadline_exceeded"


class InternalError(GatewayError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"


# A stage's status -> our error, by the classes' own codes; anything else is internal.
_FROM_STATUS: dict[grpc.StatusCode, type[GatewayError]] = {
    cls.grpc_code: cls for cls in (InvalidRequest, NotFound, Overloaded, Unavailable, DeadlineExceeded)
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
