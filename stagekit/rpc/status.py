"""One mapping between our errors and gRPC status codes, used by every servicer (server
side) and every client (to raise the same typed errors again).

`ConfigError` (a process started with settings that cannot work) maps to FAILED_PRECONDITION:
it is raised at start-up and should never reach a servicer, but if one does, the honest
answer is "this server is not set up to do that", not the caller's INVALID_ARGUMENT."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from stagekit.errors import (
    CapacityExceeded,
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    StagemeshError,
    StageUnavailable,
)

log = logging.getLogger(__name__)

_CODES: list[tuple[type[StagemeshError], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, message: str) -> StagemeshError:
    """The typed error a client raises for a status it received."""
    for cls, c in _CODES:
        if c == code:
            return cls(message)
    return StagemeshError(f"{code.name}: {message}")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, name: str) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", name, exc_info=exc)
    await context.abort(code, str(exc) or type(exc).__name__)


def unary_errors(fn: Callable) -> Callable:
    """Turn our exceptions raised by a unary handler into gRPC status codes."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except (StagemeshError, Exception) as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e, fn.__name__)

    return wrapper


def stream_errors(fn: Callable) -> Callable:
    """The same for server-streaming handlers (async generators)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except (StagemeshError, Exception) as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e, fn.__name__)

    return wrapper
