"""The error hierarchy. Each maps to one gRPC status code (stagekit.rpc.status) and,
at the gateway, to one HTTP status and OpenAI error type (gateway.errors)."""

from __future__ import annotations


class StagemeshError(Exception):
    """Base of every error we raise on purpose; the message is shown to the caller. ``param``,
    when set, names the request field at fault (OpenAI's ``param``: ``"max_tokens"``,
    ``"model"``); it does not travel over gRPC."""

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(StagemeshError):
    """The caller asked for something malformed or impossible (HTTP 400)."""


class NotFound(StagemeshError):
    """An unknown model, request or resource (HTTP 404)."""


class CapacityExceeded(StagemeshError):
    """Too much load right now; retry later (HTTP 429)."""


class StageUnavailable(StagemeshError):
    """A stage of the pipeline is down or unreachable (HTTP 503)."""


class DeadlineExceeded(StagemeshError):
    """An operation ran out of time (HTTP 504)."""


class ConfigError(StagemeshError):
    """A setting a process was started with cannot work: a layer range outside the model, a
    TP size that does not divide its heads, a missing model directory or tensor, an unknown
    dtype or data plane, a bad STAGEMESH_UCX_* value, a bad size on the command line. The
    process refuses to start and its CLI prints the message (exit code 2). Not a request's
    fault, so never InvalidRequest; should one cross gRPC it is FAILED_PRECONDITION."""
