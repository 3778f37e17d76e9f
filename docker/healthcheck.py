#!/usr/bin/env python3
"""Container health probe (installed in the image as ``stagemesh-healthcheck``).

    stagemesh-healthcheck grpc [HOST:PORT] [TLS]   # a stage: grpc.health.v1 Check says SERVING
    stagemesh-healthcheck http [URL] [TLS]         # the gateway: GET URL answers 200 (default /health)

TLS, for a stage or gateway that serves it (the same PEM files it was given):
    --tls-ca FILE      the CA that signed the server's certificate (trusting it turns TLS on)
    --tls-cert FILE    with --tls-key: this probe's client certificate (mutual TLS)
    --tls-key FILE
    --server-name NAME the name to check the certificate against when it is not HOST's (gRPC)

Exit status 0 when healthy, 1 otherwise (what Docker's HEALTHCHECK expects), 2 for bad
arguments; one line of output either way, which ``docker inspect`` shows under .State.Health.
"""

from __future__ import annotations

import argparse
import sys

TIMEOUT_S = 3.0


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def check_grpc(address: str, ca: str | None = None, cert: str | None = None, key: str | None = None,
               server_name: str | None = None) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                             certificate_chain=_read(cert))
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{address}: {status}")
    return f"{address}: {status}"


def check_http(url: str, ca: str | None = None, cert: str | None = None, key: str | None = None) -> str:
    import ssl
    import urllib.request

    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as reply:  # non-2xx raises HTTPError
        return f"{url}: {reply.status}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stagemesh-healthcheck", add_help=False)
    p.add_argument("kind", choices=["grpc", "http"])
    p.add_argument("target", nargs="?")
    p.add_argument("--tls-ca")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--server-name")
    return p


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        if args.kind == "grpc":
            print(check_grpc(args.target or "127.0.0.1:50051", args.tls_ca, args.tls_cert, args.tls_key,
                             args.server_name))
        else:
            print(check_http(args.target or "http://127.0.0.1:8000/health", args.tls_ca, args.tls_cert,
                             args.tls_key))
    except Exception as e:  # any failure is "unhealthy"; say why
        print(f"unhealthy: {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
