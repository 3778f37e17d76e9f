"""`GenerationClient`: the blocking SDK for the gateway's ``stagemesh.v1.Generation`` API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from stagekit.client import generation_proto
from stagekit.client.channel import DEFAULT_TIMEOUT, ChannelConfig, deadline_for, remaining
from stagekit.client.errors import error_from_rpc
from stagekit.client.retry import RetryPolicy
from stagekit.client.types import Chunk, Completion, GenerationRequest, Model, Usage
from stagekit.errors import DeadlineExceeded
from stagekit.rpc.pb import generation_pb2_grpc


class GenerationStream:
    """The chunks of one Generate call, as they arrive.

    Iterate it (or use it as a context manager, which cancels the call on exit). ``usage`` is
    set once the stream ended. A call that fails before its first chunk is retried under the
    client's `RetryPolicy`; a failure after that raises, since the output was already seen.
    """

    def __init__(self, start: Callable[[float | None], Any], retry: RetryPolicy, deadline: float | None) -> None:
        self._start = start
        self._retry = retry
        self._deadline = deadline
        self._call: Any = None
        self._attempt = 0
        self._received = False
        self.usage: Usage | None = None
        self.request_id: str | None = None

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        while True:
            if self._call is None:
                self._call = self._start(remaining(self._deadline))
            try:
                msg = next(self._call)
            except StopIteration:
                raise
            except grpc.RpcError as err:
                wait = None if self._received else self._retry.delay(err, self._attempt, self._deadline)
                if wait is None:
                    raise error_from_rpc(err) from None
                self._attempt += 1
                self._call = None
                time.sleep(wait)
                continue
            self.request_id = msg.request_id or self.request_id
            if generation_proto.is_usage(msg):
                self.usage = generation_proto.usage_from_proto(msg.usage)
                continue
            self._received = True
            return generation_proto.chunk_from_proto(msg)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class GenerationClient:
    """Blocking client: ``generate`` streams chunks, ``complete`` returns a `Completion`,
    ``list_models`` the served models.

    Errors are `stagekit.errors` types (`InvalidRequest`, `NotFound`, `CapacityExceeded`,
    `StageUnavailable`, `DeadlineExceeded`) or `Unauthenticated`. Every call has a deadline
    (``timeout`` seconds, default the client's ``timeout_s``), retries included.
    Generation keyword arguments: ``model, max_tokens, temperature, top_p, top_k, seed,
    min_tokens, stop, stop_token_ids, ignore_eos, logprobs, n`` (see `GenerationRequest`).
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
        self._channel = self.config.sync_channel()
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._metadata = self.config.metadata()

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        timeout: float | None | object = DEFAULT_TIMEOUT,
        **params: Any,
    ) -> GenerationStream:
        """Stream the output of a text/token-id prompt or of chat ``messages``."""
        msg = generation_proto.request_to_proto(GenerationRequest.build(prompt, messages=messages, **params))
        deadline = deadline_for(timeout, self.config.timeout_s)

        def start(left: float | None) -> Any:
            return self._stub.Generate(msg, timeout=left, metadata=self._metadata)

        return GenerationStream(start, self.retry, deadline)

    def complete(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        timeout: float | None | object = DEFAULT_TIMEOUT,
        **params: Any,
    ) -> Completion:
        """The whole output at once."""
        msg = generation_proto.request_to_proto(GenerationRequest.build(prompt, messages=messages, **params))
        reply = self._unary(self._stub.Complete, msg, timeout)
        return generation_proto.completion_from_proto(reply)

    def list_models(self, *, timeout: float | None | object = DEFAULT_TIMEOUT) -> list[Model]:
        msg = self._unary(self._stub.ListModels, generation_proto.list_models_request(), timeout)
        return generation_proto.models_from_proto(msg)

    def _unary(self, method: Callable[..., Any], msg: Any, timeout: float | None | object) -> Any:
        deadline = deadline_for(timeout, self.config.timeout_s)
        attempt = 0
        while True:
            try:
                return method(msg, timeout=remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as err:
                wait = self.retry.delay(err, attempt, deadline)
                if wait is None:
                    raise error_from_rpc(err) from None
            attempt += 1
            time.sleep(wait)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the call's deadline passed while retrying")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
