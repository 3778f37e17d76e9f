#!/usr/bin/env python3
"""Container health probe (installed in the image as ``stagemesh-healthcheck``).

    stagemesh-healthcheck grpc [HOST:PORT]   # a stage: grpc.health.v1 Check says SERVING
    stagemesh-healthcheck http [URL]         # the gateway: GET URL answers 200 (default /health)

Exit status 0 when healthy, 1 otherwise (what Docker's HEALTHCHECK expects); one line of
output either way, which ``docker inspect`` shows under .State.Health.
"""

from __future__ import annotations

import sys

TIMEOUT_S = 3.0


def check_grpc(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{address}: {status}")
    return f"{address}: {status}"


def check_http(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:  # non-2xx raises HTTPError
        return f"{url}: {reply.status}"


def main(argv: list[str]) -> int:
    kind = argv[1] if len(argv) > 1 else ""
    try:
        if kind == "grpc":
            print(check_grpc(argv[2] if len(argv) > 2 else "127.0.0.1:50051"))
        elif kind == "http":
            print(check_http(argv[2] if len(argv) > 2 else "http://127.0.0.1:8000/health"))
        else:
            print(__doc__.strip(), file=sys.stderr)
            return 2
    except Exception as e:  # any failure is "unhealthy"; say why
        print(f"unhealthy: {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
