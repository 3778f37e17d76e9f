"""`MalformedRequestGuard`: undecodable request bytes are the caller's fault (INVALID_ARGUMENT).

grpc's Python server decodes each request message with the method's deserializer before (or,
for client streams, while) the handler runs; when the bytes are not a valid message, protobuf
raises ``DecodeError`` and the server answers UNKNOWN ("Unexpected <class 'DecodeError'>") and
logs a traceback, as if the server had failed. This interceptor wraps every method's
deserializer so that bad bytes become a marker instead of an exception, and every handler so
that a marker ends the call with INVALID_ARGUMENT before the handler sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc


class _Undecodable:
    """What a wrapped deserializer returns for bytes it cannot decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # DecodeError, or whatever else bad bytes make a parser raise
            return _Undecodable(str(e) or type(e).__name__)

    return decode


async def _refuse(context: grpc.aio.ServicerContext, method: str, bad: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: malformed request message ({bad.reason})")


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        yield request


def _guarded(behavior: Callable, method: str, request_streaming: bool) -> Callable:
    """``behavior`` (an async handler) behind the check; its kind (coroutine or async
    generator function) is kept, since the server tells handlers apart by it."""

    async def prepared(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request_streaming:
            return _checked(request, context, method)
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        return request

    if inspect.iscoroutinefunction(behavior):  # a unary response, or streaming with context.write
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await prepared(request, context), context)

        return call

    async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with aclosing(behavior(await prepared(request, context), context)) as responses:
            # closing this generator (the client left) closes the handler's at once
            async for response in responses:
                yield response

    return generate


_KINDS = {(False, False): "unary_unary", (False, True): "unary_stream",
          (True, False): "stream_unary", (True, True): "stream_stream"}


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Invariant: no handler of the server it is installed on receives an undecodable request
    message; the caller gets INVALID_ARGUMENT naming the method. Wrapped handlers are built once
    per method (servers hand out the same handler object for every call)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: Any, method: str) -> grpc.RpcMethodHandler:
        kind = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler runs on the server's thread pool; left as it is
        return handler._replace(**{
            "request_deserializer": _safe(handler.request_deserializer),
            kind: _guarded(behavior, method, handler.request_streaming),
        })
