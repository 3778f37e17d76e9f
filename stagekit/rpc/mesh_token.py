"""The mesh token: stages started with one answer Stage API calls only when the caller sends it
(`MeshTokenGuard`), and the mesh's own clients send it on every call (`token_interceptors`).
It keeps a stranger on the network from wiring or driving a stage; health checks and server
reflection stay open, since they reveal nothing and launchers probe them."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from stagekit.rpc.mesh_credentials import MESH_TOKEN_KEY


class MeshTokenGuard(grpc.aio.ServerInterceptor):
    """Invariant: a call to a method of ``service`` reaches its handler only with the token in
    its metadata; any other is ended UNAUTHENTICATED before its handler runs."""

    def __init__(self, token: str, service: str) -> None:
        self._token = token.encode()
        self._prefix = f"/{service}/"

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        sent = dict(details.invocation_metadata or ()).get(MESH_TOKEN_KEY)
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._token):
            return handler
        return _refusal(handler, details.method, "no mesh token" if sent is None else "a wrong mesh token")


def _refusal(handler: grpc.RpcMethodHandler, method: str, why: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that refuses the call (a coroutine serves every kind)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{method}: {why}; this stage requires the mesh token (--mesh-token-file)")

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(MESH_TOKEN_KEY, token)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Callable, details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(_with_token(details, self.token), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Callable, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(_with_token(details, self.token), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_stream_unary(self, continuation: Callable, details: grpc.aio.ClientCallDetails,
                                     requests: Any) -> Any:
        return await continuation(_with_token(details, self.token), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_stream_stream(self, continuation: Callable, details: grpc.aio.ClientCallDetails,
                                      requests: Any) -> Any:
        return await continuation(_with_token(details, self.token), requests)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding the token to every call (grpc.aio files an interceptor under
    one kind of call only, hence one per kind)."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
