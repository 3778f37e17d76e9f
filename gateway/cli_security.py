"""The gateway's security options: TLS for its own APIs, TLS and the mesh token toward stages."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from stagekit.errors import ConfigError
from stagekit.rpc.mesh_credentials import MeshCredentials

logger = logging.getLogger("stagemesh.gateway")


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group("TLS and mesh token", "see README, 'TLS and mesh token'")
    tls.add_argument("--tls-cert", default=None, metavar="PEM",
                     help="serve the REST API (HTTPS) and the gRPC Generation API over TLS with this certificate")
    tls.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    # the old gRPC-only pair keeps its meaning (REST stays plain HTTP), so a deployment using it does not change
    tls.add_argument("--grpc-tls-cert", default=None, metavar="PEM",
                     help="deprecated: TLS on gRPC only; use --tls-cert")
    tls.add_argument("--grpc-tls-key", default=None, metavar="PEM", help="deprecated: use --tls-key")
    tls.add_argument("--stage-tls-ca", default=None, metavar="PEM",
                     help="dial the stages over TLS and check their certificates against this CA")
    tls.add_argument("--stage-tls-cert", default=None, metavar="PEM",
                     help="client certificate shown to stages that require one (their --tls-ca)")
    tls.add_argument("--stage-tls-key", default=None, metavar="PEM", help="the private key of --stage-tls-cert")
    tls.add_argument("--mesh-token-file", default=None, metavar="FILE",
                     help="send the mesh token in this file on every call to a stage (stages' --mesh-token-file)")


def tls_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`GatewayConfig` fields for the security options; raises ConfigError on a bad combination."""
    old = args.grpc_tls_cert is not None or args.grpc_tls_key is not None
    if old and (args.tls_cert is not None or args.tls_key is not None):
        raise ConfigError("--grpc-tls-cert/--grpc-tls-key are the deprecated gRPC-only form of --tls-cert/--tls-key: "
                          "give one pair")
    if old:
        logger.warning("--grpc-tls-cert/--grpc-tls-key are deprecated: use --tls-cert/--tls-key, which serve the "
                       "REST API over TLS too (the old pair leaves REST on plain HTTP)")
    cert, key = (args.grpc_tls_cert, args.grpc_tls_key) if old else (args.tls_cert, args.tls_key)
    if (cert is None) != (key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    for path in (cert, key):   # fail at start-up, not when the first listener binds
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS: no file {path}")
    stage = MeshCredentials.from_files(ca=args.stage_tls_ca, cert=args.stage_tls_cert, key=args.stage_tls_key,
                                       token_file=args.mesh_token_file, flag="--stage-tls")
    return {"tls_cert": cert, "tls_key": key, "rest_tls": not old, "stage_credentials": stage}
