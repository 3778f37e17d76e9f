"""`GenerationServicer`: the gRPC Generation API over the same request path as the REST API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from gateway.auth import ApiKeys
from gateway.chat import prepare_chat
from gateway.completions import prepare_completion
from gateway.errors import Unauthorized, face_of
from gateway.request_run import RequestRun
from gateway.rpc import generation_proto
from gateway.schemas import ChatCompletionRequest
from gateway.state import GatewayState
from stagekit.errors import StagemeshError
from stagekit.rpc.pb import generation_pb2, generation_pb2_grpc

logger = logging.getLogger("stagemesh.gateway")

_SERVICE = "/stagemesh.v1.Generation/"


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Decode -> the REST API's prepare step -> run -> encode. A `StagemeshError` becomes its
    face's gRPC code (with ``retry-after`` metadata on RESOURCE_EXHAUSTED); a key is required in the
    ``authorization: Bearer KEY`` metadata when the gateway has keys."""

    def __init__(self, state: GatewayState, keys: ApiKeys) -> None:
        self.state = state
        self.keys = keys

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        if not self.keys.allows(metadata.get("authorization")):
            raise Unauthorized("Incorrect API key provided.")

    async def _prepare(self, request: generation_pb2.GenerationRequest, method: str) -> tuple[RequestRun, bool]:
        req, with_logprobs = generation_proto.request_from_proto(request)
        endpoint = _SERVICE + method
        if isinstance(req, ChatCompletionRequest):
            run, _ = await prepare_chat(req, self.state, endpoint)
        else:
            run = await prepare_completion(req, self.state, endpoint)
        return run, with_logprobs

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.state.metrics.requests.labels(endpoint=_SERVICE + method, status=code.name).inc()

    async def _abort(self, context: grpc.aio.ServicerContext, err: StagemeshError) -> None:
        face = face_of(err)
        retry_after = face.headers.get("Retry-After")
        trailing = (("retry-after", retry_after),) if retry_after is not None else ()
        await context.abort(face.grpc_code, str(err), trailing_metadata=trailing)

    async def Generate(
        self, request: generation_pb2.GenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        code = grpc.StatusCode.OK
        try:
            self._authorize(context)
            run, with_logprobs = await self._prepare(request, "Generate")
            try:
                async with aclosing(run.deltas()) as deltas:
                    async for d in deltas:
                        if d.text or d.tokens or d.finish_reason is not None:
                            yield generation_proto.chunk_to_proto(
                                run.request_id, run.seed, d.index, d.text, d.tokens, d.finish_reason, with_logprobs
                            )
                yield generation_proto.usage_chunk(run.request_id, run.seed, run.usage())
            except BaseException as err:
                run.finish(err)
                raise
            run.finish("ok")
        except StagemeshError as err:
            code = face_of(err).grpc_code
            await self._abort(context, err)
        except asyncio.CancelledError:  # the client left or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("Generate failed")
            await context.abort(code, "The gateway hit an internal error.")
        finally:
            self._count("Generate", code)

    async def Complete(
        self, request: generation_pb2.GenerationRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.CompleteResponse:
        code = grpc.StatusCode.OK
        try:
            self._authorize(context)
            run, with_logprobs = await self._prepare(request, "Complete")
            try:
                results = await run.collect()
            except BaseException as err:
                run.finish(err)
                raise
            run.finish("ok")
            return generation_proto.complete_response(run.request_id, run.seed, self.state.model_name, results,
                                                      run.usage(), with_logprobs)
        except StagemeshError as err:
            code = face_of(err).grpc_code
            await self._abort(context, err)
            raise AssertionError("unreachable: abort raises") from err
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = grpc.StatusCode.INTERNAL
            logger.exception("Complete failed")
            await context.abort(code, "The gateway hit an internal error.")
            raise AssertionError("unreachable: abort raises") from err
        finally:
            self._count("Complete", code)

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ListModelsResponse:
        code = grpc.StatusCode.OK
        try:
            self._authorize(context)
            return generation_proto.models_response([self.state.model_card()])
        except StagemeshError as err:
            code = face_of(err).grpc_code
            await self._abort(context, err)
            raise AssertionError("unreachable: abort raises") from err
        finally:
            self._count("ListModels", code)
