"""Typed errors the SDK raises, mapped from gRPC status codes by `stagekit.rpc.status.error_for`."""

from __future__ import annotations

import grpc

from stagekit.errors import StagemeshError
from stagekit.rpc.status import error_for


class Unauthenticated(StagemeshError):
    """The API key is missing or not accepted (gRPC UNAUTHENTICATED; HTTP 401)."""


def error_from_rpc(err: grpc.RpcError) -> StagemeshError:
    """The typed error for a failed call: `InvalidRequest`, `NotFound`, `CapacityExceeded`,
    `StageUnavailable`, `DeadlineExceeded`, `Unauthenticated`, else `StagemeshError`.
    The gRPC code stays available as ``.code``."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else "") or code.name
    exc = Unauthenticated(details) if code == grpc.StatusCode.UNAUTHENTICATED else error_for(code, details)
    exc.code = code  # type: ignore[attr-defined]
    return exc
