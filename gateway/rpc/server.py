"""`GenerationServer`: the gateway's grpc.aio server (Generation, health, reflection), in its event loop."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.auth import ApiKeys
from gateway.pool import ReplicaPool
from gateway.rpc.servicer import GenerationServicer
from gateway.state import GatewayState
from stagekit.rpc.decode_guard import MalformedRequestGuard
from stagekit.rpc.pb import generation_pb2, generation_pb2_grpc

logger = logging.getLogger("stagemesh.gateway")

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class GenerationServer:
    """Serves ``stagemesh.v1.Generation`` plus ``grpc.health.v1.Health`` (SERVING while a replica
    serves, following the pool's probes) and server reflection, optionally over TLS; malformed
    request bytes are answered INVALID_ARGUMENT (`MalformedRequestGuard`)."""

    def __init__(self, state: GatewayState, keys: ApiKeys) -> None:
        self.state = state
        self.keys = keys
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()

    async def start(self, host: str, port: int) -> int:
        """Bind and start; the bound port (``port`` 0 picks a free one)."""
        server = grpc.aio.server(interceptors=[MalformedRequestGuard()])
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.state, self.keys), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection([GENERATION_SERVICE, _HEALTH_SERVICE, reflection.SERVICE_NAME], server)
        config = self.state.config
        address = f"{host}:{port}"
        if config.tls_cert and config.tls_key:
            key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise RuntimeError(f"could not bind the gRPC port {address}")
        await server.start()
        self._server = server
        await self._set_health(self.state.pool)
        self.state.pool.probe_listeners.append(lambda pool: pool.spawn(self._set_health(pool)))
        return bound

    async def _set_health(self, pool: ReplicaPool) -> None:
        serving = health_pb2.HealthCheckResponse
        status = serving.SERVING if pool.any_serving else serving.NOT_SERVING
        for service in ("", GENERATION_SERVICE):
            await self._health.set(service, status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace=2)
            self._server = None
