"""The error hierarchy. Each maps to one gRPC status code (stagekit.rpc.status) and,
at the gateway, to one HTTP status."""

from __future__ import annotations


class StagemeshError(Exception):
    """Base of every error we raise on purpose; the message is shown to the caller."""


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
