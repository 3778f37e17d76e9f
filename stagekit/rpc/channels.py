"""`stage_channel`: the one way this code base opens a gRPC channel to a stage, so that TLS and
the mesh token reach every caller (gateway, Wire's neighbour check, the gRPC data plane, KV
transfers) and none is left dialing in plaintext.

Addresses may be DNS names (a Kubernetes pod's stable name, a compose service): gRPC resolves the name
when it connects and again when a connection fails, so a stage replaced at a new address under the same
name is reached again. gRPC waits at least 30 s between two resolutions of a channel's name by default,
which kept a replaced stage out that long after it served; `RESOLVE_OPTIONS` makes that 1 s."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.mesh_token import token_interceptors

# a failed connection re-resolves the target's name within a second (gRPC's default: 30 s)
RESOLVE_OPTIONS: tuple[tuple[str, object], ...] = (("grpc.dns_min_time_between_resolutions_ms", 1000),)


def with_resolve_options(options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """``options`` plus `RESOLVE_OPTIONS` for what they do not set themselves."""
    given = {name for name, _ in options}
    return [*options, *(o for o in RESOLVE_OPTIONS if o[0] not in given)]


def stage_channel(address: str, creds: MeshCredentials = PLAINTEXT,
                  options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to the stage at ``address`` with ``creds``' TLS and token."""
    interceptors = token_interceptors(creds.token) if creds.token else None
    if creds.tls:
        return grpc.aio.secure_channel(address, creds.channel_credentials(), options=with_resolve_options(options),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=with_resolve_options(options), interceptors=interceptors)


def stage_channel_sync(address: str, creds: MeshCredentials = PLAINTEXT,
                       options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A blocking channel to the stage at ``address`` with ``creds``' TLS (health probes; the
    token, which only the Stage API asks for, goes in per call as ``creds.metadata()``)."""
    if creds.tls:
        return grpc.secure_channel(address, creds.channel_credentials(), options=with_resolve_options(options))
    return grpc.insecure_channel(address, options=with_resolve_options(options))
