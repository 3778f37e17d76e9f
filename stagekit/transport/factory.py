"""Pick a data plane by name: ``grpc`` always works; ``ucx`` where ucxx imports.

``ucx`` may name a profile of UCX settings: ``ucx:auto``, ``ucx:shm``, ``ucx:cma``, ``ucx:tcp``
(see ucx/settings); plain ``ucx`` takes STAGEMESH_UCX_PROFILE, else ``auto``.
"""

from __future__ import annotations

import logging

from stagekit.errors import ConfigError
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.transport.base import Transport

log = logging.getLogger(__name__)

TRANSPORTS = ("ucx", "grpc")


def default_transport() -> str:
    from stagekit.transport.ucx.runtime import ucx_importable

    return "ucx" if ucx_importable() else "grpc"


def make_transport(name: str | None = None, creds: MeshCredentials = PLAINTEXT) -> Transport:
    """The named data plane; without a name the default, where a UCX that imports but
    cannot start (no usable transports, say) falls back to gRPC with a warning."""
    if name is None and default_transport() == "ucx":
        try:
            return make_transport("ucx", creds)
        except ConfigError:  # a bad STAGEMESH_UCX_* setting: say so rather than fall back
            raise
        except Exception as e:
            log.warning("the UCX data plane did not start (%s); using grpc", e)
            name = "grpc"
    name = name or default_transport()
    if name == "grpc":
        from stagekit.transport.grpc.transport import GrpcTransport

        return GrpcTransport(creds)
    base, _, profile = name.partition(":")
    if base == "ucx":
        from stagekit.transport.ucx.runtime import ucx_importable

        if not ucx_importable():
            raise ConfigError("the ucx data plane needs the ucxx package (pip install 'stagemesh[ucx]'); "
                              "use --transport grpc")
        from stagekit.transport.ucx.settings import UcxSettings
        from stagekit.transport.ucx.transport import UcxTransport

        return UcxTransport(UcxSettings.from_env(profile or None))
    raise ConfigError(f"unknown transport {name!r} (available: {', '.join(TRANSPORTS)})")
