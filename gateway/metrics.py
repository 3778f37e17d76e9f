"""Prometheus metrics of one gateway (a registry per app, so tests and apps never share counters)."""

from __future__ import annotations

import contextlib
from collections import Counter as Tally

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
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})
REPLICA_STATES = ("serving", "draining", "held", "down", "joining")


class GatewayMetrics:
    """Request, token, latency, routing and replica metrics named ``stagemesh_*``.

    Per-replica gauges (running, waiting, healthy) are set from the pool just before each
    scrape (`observe_replica`), so they are never stale; DP-group ones whenever the pool
    re-evaluates its groups (`observe_dp_group`).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stagemesh_requests",
            "Requests by endpoint (HTTP path or gRPC method) and status (HTTP code or gRPC code name).",
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
        self.inter_token_latency = Histogram(
            "stagemesh_inter_token_latency_seconds",
            "Time between successive outputs of a choice, per token.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "stagemesh_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("stagemesh_requests_running", "Generation requests in flight.", registry=r)
        self.replica_running = Gauge(
            "stagemesh_replica_requests_running",
            "Stage requests the gateway has running on the replica.",
            ["replica"],
            registry=r,
        )
        self.replica_waiting = Gauge(
            "stagemesh_replica_requests_waiting",
            "Stage requests waiting at the gateway for a slot on the replica.",
            ["replica"],
            registry=r,
        )
        self.replica_healthy = Gauge(
            "stagemesh_replica_healthy", "1 when the replica serves requests.", ["replica"], registry=r
        )
        self.routing_decisions = Counter(
            "stagemesh_routing_decisions",
            "Stage requests routed, by policy and replica.",
            ["policy", "replica"],
            registry=r,
        )
        self.prefix_hits = Counter(
            "stagemesh_prefix_hits",
            "Routed requests whose replica had served a prefix (a whole block or more) of the prompt.",
            ["policy"],
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "stagemesh_prefix_hit_tokens",
            "Prompt tokens routed to a replica that had served them as a prefix.",
            ["policy"],
            registry=r,
        )
        self.routed_prompt_tokens = Counter(
            "stagemesh_routed_prompt_tokens",
            "Prompt tokens routed (the denominator of the prefix hit rate).",
            ["policy"],
            registry=r,
        )
        self.retries = Counter(
            "stagemesh_request_retries",
            "Stage requests moved to another replica: 'retry' before any token, 'migration' after some.",
            ["kind"],
            registry=r,
        )
        self.dp_group_up = Gauge(
            "stagemesh_dp_group_up",
            "1 while the DP-attention group serves (every member known to the gateway and healthy).",
            ["group"],
            registry=r,
        )
        self.dp_group_down = Counter(
            "stagemesh_dp_group_down",
            "Times the DP-attention group went from serving to down (all its replicas taken out).",
            ["group"],
            registry=r,
        )

        self.replicas = Gauge(
            "stagemesh_replicas", "Replicas known to the gateway, by state (see /health).", ["state"], registry=r
        )
        self.admin_operations = Counter(
            "stagemesh_admin_operations",
            "Admin API and replica-file operations, by operation and outcome (ok or the HTTP status of the refusal).",
            ["op", "outcome"],
            registry=r,
        )
        self.replica_stalls = Counter(
            "stagemesh_replica_stalls",
            "Times a replica with requests in flight completed no step for --stall-timeout and was taken out.",
            ["replica"],
            registry=r,
        )
        self.replica_file_reloads = Counter(
            "stagemesh_replica_file_reloads",
            "Reloads of --replica-file (SIGHUP), by outcome (ok, invalid, failed).",
            ["outcome"],
            registry=r,
        )

    def record_route(self, policy: str, replica: int, prompt_tokens: int, matched_tokens: int) -> None:
        self.routing_decisions.labels(policy=policy, replica=str(replica)).inc()
        self.routed_prompt_tokens.labels(policy=policy).inc(prompt_tokens)
        if matched_tokens:
            self.prefix_hits.labels(policy=policy).inc()
            self.prefix_hit_tokens.labels(policy=policy).inc(matched_tokens)

    def observe_replica(self, index: int, *, healthy: bool, running: int, waiting: int) -> None:
        label = str(index)
        self.replica_healthy.labels(replica=label).set(1 if healthy else 0)
        self.replica_running.labels(replica=label).set(running)
        self.replica_waiting.labels(replica=label).set(waiting)

    def observe_states(self, states: list[str]) -> None:
        counts = Tally(states)
        for state in REPLICA_STATES:
            self.replicas.labels(state=state).set(counts.get(state, 0))

    def forget_replica(self, index: int) -> None:
        """Drop a removed replica's per-replica series (its counters' history goes with it)."""
        for metric in (self.replica_running, self.replica_waiting, self.replica_healthy, self.replica_stalls):
            with contextlib.suppress(KeyError):
                metric.remove(str(index))
        for policy in ("round_robin", "least_loaded", "prefix"):
            with contextlib.suppress(KeyError):
                self.routing_decisions.remove(policy, str(index))

    def observe_dp_group(self, group: str, *, up: bool) -> None:
        self.dp_group_up.labels(group=group).set(1 if up else 0)
        self.dp_group_down.labels(group=group)  # exported (at 0) from the moment the group is known

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
        if path.startswith("/admin/"):
            endpoint = "/admin"
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
