"""Running the gateway: `serve` (asyncio) and `main` (argv, for ``python -m gateway.server``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig


class GatewayStartupError(RuntimeError):
    """The gateway never served: no replica became ready, or a port was taken."""


def build_server(
    config: GatewayConfig, host: str, port: int, *, log_level: str = "info", access_log: bool = False
) -> uvicorn.Server:
    """A uvicorn server for the gateway app (``await server.serve()`` runs it).

    uvicorn's access log is off by default: the gateway logs one line per generation request
    itself (id, outcome, tokens, latency), and a second line per request costs throughput.
    """
    app = create_app(config)
    tls = config.tls_cert is not None and config.rest_tls
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=5,
        ssl_certfile=config.tls_cert if tls else None,
        ssl_keyfile=config.tls_key if tls else None,
    )
    return uvicorn.Server(uv_config)


async def serve(
    config: GatewayConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); raises `GatewayStartupError` if it never started."""
    server = build_server(config, host, port, log_level=log_level, access_log=access_log)
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn "exits the process" when the lifespan startup fails
        raise GatewayStartupError(f"the gateway failed to start on {host}:{port} (see the log above)") from exc
    if not server.started:
        raise GatewayStartupError(f"the gateway failed to start on {host}:{port} (see the log above)")


def main(argv: Sequence[str] | None = None) -> int:
    from gateway import cli

    parser = argparse.ArgumentParser(prog="stagemesh gateway", description=cli.DESCRIPTION)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
