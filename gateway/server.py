"""Running the gateway: `serve` (asyncio) and `main` (argv, for ``python -m gateway.server``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig


class GatewayStartupError(RuntimeError):
    """The gateway never served: no replica became ready, or the port was taken."""


def build_server(config: GatewayConfig, host: str, port: int, *, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for the gateway app (``await server.serve()`` runs it)."""
    app = create_app(config)
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5
    )
    return uvicorn.Server(uv_config)


async def serve(
    replicas: list[list[str]],
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name_override: str | None = None,
    *,
    api_key: str | None = None,
    startup_timeout_s: float = 300.0,
    health_interval_s: float = 5.0,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); raises `GatewayStartupError` if it never started."""
    config = GatewayConfig(
        replicas=tuple(tuple(r) for r in replicas),
        model_name_override=model_name_override,
        api_key=api_key,
        startup_timeout_s=startup_timeout_s,
        health_interval_s=health_interval_s,
    )
    server = build_server(config, host, port, log_level=log_level)
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
