"""`create_app`: the OpenAI-compatible HTTP gateway (and its gRPC API) in front of a pool of replicas."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.admin import admin_router
from gateway.auth import ApiKeys
from gateway.bodylimit import BodyLimitMiddleware
from gateway.chat import create_chat_completion
from gateway.completions import create_completion
from gateway.config import GatewayConfig
from gateway.errors import Unauthorized, error_body, face_of, gateway_error_body
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.openapi import install_openapi
from gateway.pd import install_pd
from gateway.pool import ReplicaPool
from gateway.replica import ReplicaClient
from gateway.replica_admin import ReplicaAdmin
from gateway.replica_file import ReplicaFile
from gateway.request_run import ClientDisconnected, check_model
from gateway.routing import PrefixIndex, Router, make_router
from gateway.rpc.server import GenerationServer
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.stall import StallWatch
from gateway.state import GatewayState, get_state
from gateway.tokenizing import TokenizerFactory, load_tokenizer
from stagekit.errors import StagemeshError

logger = logging.getLogger("stagemesh.gateway")


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence per offending top-level field (pydantic lists every union branch)."""
    by_field: dict[str, str] = {}
    for e in err.errors():
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "")
            return f"Invalid request: the body is not valid JSON ({reason or e.get('msg', 'decode error')}).", None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        by_field.setdefault(loc[0] if loc else "body", e.get("msg", "invalid value"))
    parts = [
        f"invalid JSON body: {msg}" if name == "body" else f"invalid value for '{name}': {msg}"
        for name, msg in list(by_field.items())[:3]
    ]
    param = next((name for name in by_field if name != "body"), None)
    return "Invalid request: " + "; ".join(parts) + ".", param


class ErrorJSONResponse(JSONResponse):
    """JSON in ASCII: an error message may quote what the client sent, and a lone surrogate
    (valid in a JSON string, not in UTF-8) must not turn a 400 into a 500 while rendering."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StagemeshError)
    async def on_error(request: Request, err: StagemeshError) -> JSONResponse:
        face = face_of(err)
        return ErrorJSONResponse(gateway_error_body(err), status_code=face.status_code, headers=dict(face.headers))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return ErrorJSONResponse(error_body(message, "invalid_request_error", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if err.status_code < 500 else "server_error"
        # the headers carry e.g. a 405's Allow
        return ErrorJSONResponse(error_body(str(err.detail), error_type), status_code=err.status_code,
                                 headers=err.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path, exc_info=err)
        body = error_body("The gateway hit an internal error.", "server_error", code="internal_error")
        return JSONResponse(body, status_code=500)

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, err: ClientDisconnected) -> Response:
        return Response(status_code=499)


def _api_key_check(keys: ApiKeys) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise Unauthorized("Incorrect API key provided.")

    return check


def _v1_router(keys: ApiKeys) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(keys))])

    @router.post("/completions", summary="Create a completion (text or token-id prompts)")
    async def completions(
        body: CompletionRequest, request: Request, state: GatewayState = Depends(get_state)
    ) -> Response:
        return await create_completion(body, request, state)

    @router.post("/chat/completions", summary="Create a chat completion (the model's chat template)")
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, state: GatewayState = Depends(get_state)
    ) -> Response:
        return await create_chat_completion(body, request, state)

    @router.get("/models", summary="List the served model")
    async def list_models(state: GatewayState = Depends(get_state)) -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card()]}

    @router.get("/models/{model:path}", summary="Describe a model")
    async def get_model(model: str, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
        check_model(model, state)
        return state.model_card()

    return router


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", summary="200 while at least one replica serves, else 503; per-replica and DP-group detail")
    async def health(state: GatewayState = Depends(get_state)) -> JSONResponse:
        replicas = state.pool.snapshot()
        ok = state.pool.any_serving
        body = {
            "status": "ok" if ok else "unavailable",
            "model": state.model_name,
            "routing": state.pool.router.policy,
            "replicas": replicas,
            "dp_groups": state.pool.dp_groups.snapshot(),
        }
        if state.pool.pd is not None:
            body["disaggregation"] = state.pool.pd.snapshot()
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(state: GatewayState = Depends(get_state)) -> Response:
        for r in state.pool.replicas:
            state.metrics.observe_replica(r.index, healthy=r.serving, running=r.gate.running, waiting=r.gate.waiting)
        state.metrics.observe_states([r.state for r in state.pool.replicas])
        payload, content_type = state.metrics.render()
        return Response(payload, media_type=content_type)

    return router


def _route_groups_least_loaded(pool: ReplicaPool) -> None:
    """The default policy once replicas form DP-attention groups: attention load is per replica,
    so a group's heads are balanced by what each has in flight."""
    if pool.dp_groups.groups and pool.router.policy != "least_loaded":
        pool.router = make_router("least_loaded", pool.prefix_index)
        logger.info("replicas form DP-attention group(s) %s: routing least_loaded", sorted(pool.dp_groups.groups))


def create_app(
    config: GatewayConfig,
    *,
    tokenizer_factory: TokenizerFactory | None = None,
    router: Router | None = None,
) -> FastAPI:
    """The gateway app; its lifespan waits for the first ready replica (the others join when they
    answer), fetches its head's info and tokenizer, and serves the gRPC Generation API when
    ``config.grpc_port`` is set."""
    metrics = GatewayMetrics()
    keys = ApiKeys(config.api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replicas = [
            ReplicaClient(i, addrs, transport=config.transport, rpc_timeout_s=config.rpc_timeout_s,
                          creds=config.stage_credentials, role=config.role_of(i))
            for i, addrs in enumerate((*config.replicas, *config.file_replicas))
        ]
        for r in replicas[len(config.replicas):]:
            r.origin = "file"
        index = PrefixIndex()
        # disaggregated, the decode replica is chosen prefix-aware (with load) unless told otherwise
        policy = config.routing or ("prefix" if config.disaggregated else "round_robin")
        pool = ReplicaPool(
            replicas,
            router=router or make_router(policy, index),
            health_interval_s=config.health_interval_s,
            admission=config.admission,
            prefix_index=index,
            metrics=metrics,
        )
        if config.stall_timeout_s > 0:
            pool.probe_listeners.append(StallWatch(config.stall_timeout_s, metrics))
        grpc_server: GenerationServer | None = None
        replica_file: ReplicaFile | None = None
        if config.replica_file is not None:  # before start-up: a SIGHUP meanwhile must not end the process
            replica_file = ReplicaFile(config.replica_file, metrics)
            replica_file.install_sighup()
        # at least two: one huge prompt being tokenized must not queue every other request behind it
        workers = ThreadPoolExecutor(min(8, max(2, os.cpu_count() or 1)), thread_name_prefix="gateway-prepare")
        try:
            head_info = await pool.start(config.startup_timeout_s)
            if config.disaggregated:
                install_pd(pool, config.pd, metrics)
            if router is None and config.routing is None:
                _route_groups_least_loaded(pool)
                pool.probe_listeners.append(_route_groups_least_loaded)  # a group may appear after start
            tokenizer = (tokenizer_factory or load_tokenizer)(await pool.tokenizer_files())
            model_name = config.model_name_override or head_info.model_name or "stagemesh"
            state = GatewayState(config, pool, tokenizer, head_info, model_name, metrics, int(time.time()), workers)
            state.admin = ReplicaAdmin(pool, config, head_info.model_name)
            app.state.gateway = state
            if replica_file is not None:
                replica_file.attach(state.admin)
            if config.grpc_port is not None:
                grpc_server = GenerationServer(state, keys)
                app.state.grpc_port = await grpc_server.start(config.grpc_host, config.grpc_port)
            logger.info(
                "serving %s (max_model_len %d, vocab %d) from %d of %d replica(s), routing %s%s",
                model_name,
                head_info.max_model_len,
                head_info.vocab_size,
                sum(r.healthy for r in replicas),
                len(replicas),
                pool.router.policy,
                f", gRPC on {config.grpc_host}:{app.state.grpc_port}" if grpc_server else "",
            )
            yield
        finally:
            if replica_file is not None:
                replica_file.uninstall_sighup()
            if grpc_server is not None:
                await grpc_server.stop()
            await pool.close()
            workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="stagemesh gateway", version="1", lifespan=lifespan)
    _install_error_handlers(app)
    app.include_router(_v1_router(keys))
    app.include_router(_ops_router())
    if config.admin_api_keys:
        app.include_router(admin_router(ApiKeys(config.admin_api_keys)))
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_openapi(app, auth=keys.enabled)
    return app
