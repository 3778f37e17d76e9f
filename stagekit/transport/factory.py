"""Pick a data plane by name: ``grpc`` always works; ``ucx`` where ucxx imports."""

from __future__ import annotations

import logging

from stagekit.errors import InvalidRequest
from stagekit.transport.base import Transport

log = logging.getLogger(__name__)

TRANSPORTS = ("grpc",)


def default_transport() -> str:
    return "grpc"


def make_transport(name: str | None = None) -> Transport:
    name = name or default_transport()
    if name == "grpc":
        from stagekit.transport.grpc_transport import GrpcTransport

        return GrpcTransport()
    raise InvalidRequest(f"unknown transport {name!r} (available: {', '.join(TRANSPORTS)})")
