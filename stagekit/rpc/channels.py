"""`stage_channel`: the one way this code base opens a gRPC channel to a stage, so that TLS and
the mesh token reach every caller (gateway, Wire's neighbour check, the gRPC data plane, KV
transfers) and none is left dialing in plaintext."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.mesh_token import token_interceptors


def stage_channel(address: str, creds: MeshCredentials = PLAINTEXT,
                  options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to the stage at ``address`` with ``creds``' TLS and token."""
    interceptors = token_interceptors(creds.token) if creds.token else None
    if creds.tls:
        return grpc.aio.secure_channel(address, creds.channel_credentials(), options=list(options),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def stage_channel_sync(address: str, creds: MeshCredentials = PLAINTEXT,
                       options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A blocking channel to the stage at ``address`` with ``creds``' TLS (health probes; the
    token, which only the Stage API asks for, goes in per call as ``creds.metadata()``)."""
    if creds.tls:
        return grpc.secure_channel(address, creds.channel_credentials(), options=list(options))
    return grpc.insecure_channel(address, options=list(options))
