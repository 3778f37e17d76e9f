"""`AsyncGenerationClient`: the asyncio SDK for the gateway's ``stagemesh.v1.Generation`` API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc

from stagekit.client import generation_proto
from stagekit.client.channel import DEFAULT_TIMEOUT, ChannelConfig, deadline_for, remaining
from stagekit.client.errors import error_from_rpc
from stagekit.client.retry import RetryPolicy
from stagekit.client.types import Chunk, Completion, GenerationRequest, Model, Usage
from stagekit.errors import DeadlineExceeded
from stagekit.rpc.pb import generation_pb2_grpc


class AsyncGenerationStream:
    """The chunks of one Generate call (``async for``); the same retry rules as the sync stream."""

    def __init__(self, start: Callable[[float | None], Any], retry: RetryPolicy, deadline: float | None) -> None:
        self._start = start
        self._retry = retry
        self._deadline = deadline
        self._call: Any = None
        self._attempt = 0
        self._received = False
        self.usage: Usage | None = None
        self.request_id: str | None = None

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        while True:
            if self._call is None:
                self._call = self._start(remaining(self._deadline))
            try:
                msg = await self._call.read()
            except grpc.RpcError as err:
                wait = None if self._received else self._retry.delay(err, self._attempt, self._deadline)
                if wait is None:
                    raise error_from_rpc(err) from None
                self._attempt += 1
                self._call = None
                await asyncio.sleep(wait)
                continue
            if msg is grpc.aio.EOF:
                raise StopAsyncIteration
            self.request_id = msg.request_id or self.request_id
            if generation_proto.is_usage(msg):
                self.usage = generation_proto.usage_from_proto(msg.usage)
                continue
            self._received = True
            return generation_proto.chunk_from_proto(msg)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncGenerationClient:
    """The asyncio twin of `GenerationClient` (same arguments, errors, deadlines and retries).

    Create it inside the event loop that uses it; ``await client.close()`` or ``async with``.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:8001",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float | None = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.config = ChannelConfig(target, api_key, tls, root_certificates, credentials, timeout_s)
        self.retry = retry or RetryPolicy()
        self._channel = self.config.aio_channel()
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._metadata = self.config.metadata()

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        timeout: float | None | object = DEFAULT_TIMEOUT,
        **params: Any,
    ) -> AsyncGenerationStream:
        """Stream the output (``async for chunk in client.generate(...)``)."""
        msg = generation_proto.request_to_proto(GenerationRequest.build(prompt, messages=messages, **params))
        deadline = deadline_for(timeout, self.config.timeout_s)

        def start(left: float | None) -> Any:
            return self._stub.Generate(msg, timeout=left, metadata=self._metadata)

        return AsyncGenerationStream(start, self.retry, deadline)

    async def complete(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        timeout: float | None | object = DEFAULT_TIMEOUT,
        **params: Any,
    ) -> Completion:
        msg = generation_proto.request_to_proto(GenerationRequest.build(prompt, messages=messages, **params))
        return generation_proto.completion_from_proto(await self._unary(self._stub.Complete, msg, timeout))

    async def list_models(self, *, timeout: float | None | object = DEFAULT_TIMEOUT) -> list[Model]:
        reply = await self._unary(self._stub.ListModels, generation_proto.list_models_request(), timeout)
        return generation_proto.models_from_proto(reply)

    async def _unary(self, method: Callable[..., Any], msg: Any, timeout: float | None | object) -> Any:
        deadline = deadline_for(timeout, self.config.timeout_s)
        attempt = 0
        while True:
            try:
                return await method(msg, timeout=remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as err:
                wait = self.retry.delay(err, attempt, deadline)
                if wait is None:
                    raise error_from_rpc(err) from None
            attempt += 1
            await asyncio.sleep(wait)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the call's deadline passed while retrying")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGenerationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
