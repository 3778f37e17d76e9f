"""Prometheus metrics of one gateway (a registry per app, so tests and apps never share counters)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})


class GatewayMetrics:
    """Request, token and latency metrics named ``stagemesh_*``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stagemesh_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("stagemesh_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = Counter("stagemesh_generation_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram(
            "stagemesh_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "stagemesh_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("stagemesh_requests_running", "Generation requests in flight.", registry=r)
        self.replica_healthy = Gauge(
            "stagemesh_replica_healthy", "1 when the replica serves requests.", ["replica"], registry=r
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and status (pure ASGI, so streaming is untouched)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN_PATHS or path.startswith("/v1/models/") else "other"
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if endpoint.startswith("/v1/models/"):
                endpoint = "/v1/models/{model}"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
