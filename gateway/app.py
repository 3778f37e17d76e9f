"""`create_app`: the OpenAI-compatible HTTP gateway in front of a pool of replicas."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.chat import create_chat_completion
from gateway.completions import create_completion
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, Unauthorized, error_body, gateway_error_body
from gateway.handling import ClientDisconnected, check_model
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.pool import ReplicaPool
from gateway.replica import ReplicaClient
from gateway.router import Router
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState, get_state
from gateway.tokenizing import TokenizerFactory, load_tokenizer

logger = logging.getLogger("stagemesh.gateway")


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence per offending top-level field (pydantic lists every union branch)."""
    by_field: dict[str, str] = {}
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        by_field.setdefault(loc[0] if loc else "body", e.get("msg", "invalid value"))
    parts = [
        f"invalid JSON body: {msg}" if name == "body" else f"invalid value for '{name}': {msg}"
        for name, msg in list(by_field.items())[:3]
    ]
    param = next((name for name in by_field if name != "body"), None)
    return "Invalid request: " + "; ".join(parts) + ".", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, err: GatewayError) -> JSONResponse:
        return JSONResponse(gateway_error_body(err), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return JSONResponse(error_body(message, "invalid_request_error", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(err.detail), error_type), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path, exc_info=err)
        body = error_body("The gateway hit an internal error.", "server_error", code="internal_error")
        return JSONResponse(body, status_code=500)

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, err: ClientDisconnected) -> Response:
        return Response(status_code=499)


def _api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise Unauthorized("Incorrect API key provided.")

    return check


def _v1_router(api_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(api_key))])

    @router.post("/completions")
    async def completions(
        body: CompletionRequest, request: Request, state: GatewayState = Depends(get_state)
    ) -> Response:
        return await create_completion(body, request, state)

    @router.post("/chat/completions")
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, state: GatewayState = Depends(get_state)
    ) -> Response:
        return await create_chat_completion(body, request, state)

    @router.get("/models")
    async def list_models(state: GatewayState = Depends(get_state)) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @router.get("/models/{model:path}")
    async def get_model(model: str, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
        check_model(model, state)
        return _model_card(state)

    return router


def _model_card(state: GatewayState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "stagemesh",
        "root": state.head_info.model_name or state.model_name,
        "max_model_len": state.max_model_len,
    }


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(state: GatewayState = Depends(get_state)) -> JSONResponse:
        replicas = state.pool.snapshot()
        ok = state.pool.any_healthy
        body = {"status": "ok" if ok else "unavailable", "model": state.model_name, "replicas": replicas}
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def metrics(state: GatewayState = Depends(get_state)) -> Response:
        for r in state.pool.replicas:
            state.metrics.replica_healthy.labels(replica=str(r.index)).set(1 if r.healthy else 0)
        payload, content_type = state.metrics.render()
        return Response(payload, media_type=content_type)

    return router


def create_app(
    config: GatewayConfig,
    *,
    tokenizer_factory: TokenizerFactory | None = None,
    router: Router | None = None,
) -> FastAPI:
    """The gateway app; its lifespan wires the replicas and fetches the head's info and tokenizer."""
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replicas = [
            ReplicaClient(i, addrs, transport=config.transport, rpc_timeout_s=config.rpc_timeout_s)
            for i, addrs in enumerate(config.replicas)
        ]
        pool = ReplicaPool(replicas, router=router, health_interval_s=config.health_interval_s)
        try:
            head_info = await pool.start(config.startup_timeout_s)
            tokenizer = (tokenizer_factory or load_tokenizer)(await pool.tokenizer_files())
            model_name = config.model_name_override or head_info.model_name or "stagemesh"
            app.state.gateway = GatewayState(config, pool, tokenizer, head_info, model_name, metrics, int(time.time()))
            logger.info(
                "serving %s (max_model_len %d, vocab %d) from %d replica(s)",
                model_name,
                head_info.max_model_len,
                head_info.vocab_size,
                len(replicas),
            )
            yield
        finally:
            await pool.close()

    app = FastAPI(title="stagemesh gateway", lifespan=lifespan)
    _install_error_handlers(app)
    app.include_router(_v1_router(config.api_key))
    app.include_router(_ops_router())
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
