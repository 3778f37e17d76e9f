"""The ``stagemesh gateway`` subcommand: `add_arguments` fills a parser, `run` executes it."""

from __future__ import annotations

import argparse
import asyncio
import logging

DESCRIPTION = (
    "OpenAI-compatible HTTP gateway in front of one or more replicas. Each --replica is one "
    "pipeline: its stage addresses (host:port) in layer order, comma separated."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replica",
        action="append",
        required=True,
        metavar="ADDR[,ADDR...]",
        help="stage addresses of one replica in layer order; repeat for data parallelism",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--model-name", default=None, help="model name to serve (default: the head's)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for stages (default: %(default)s)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=5.0,
        help="seconds between replica probes (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def parse_replicas(values: list[str]) -> list[list[str]]:
    """``["a:1,b:2", "c:3"]`` -> ``[["a:1", "b:2"], ["c:3"]]``; raises ValueError when one is empty."""
    replicas = []
    for value in values:
        addresses = [a.strip() for a in value.split(",") if a.strip()]
        if not addresses:
            raise ValueError(f"--replica {value!r} names no stage address")
        replicas.append(addresses)
    return replicas


def run(args: argparse.Namespace) -> int:
    """Run the gateway until interrupted; the process exit code."""
    from gateway.server import GatewayStartupError, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        replicas = parse_replicas(args.replica)
    except ValueError as err:
        logging.getLogger("stagemesh.gateway").error("%s", err)
        return 2
    try:
        asyncio.run(
            serve(
                replicas,
                args.host,
                args.port,
                args.model_name,
                api_key=args.api_key,
                startup_timeout_s=args.startup_timeout,
                health_interval_s=args.health_interval,
                log_level=args.log_level,
            )
        )
    except GatewayStartupError as err:
        logging.getLogger("stagemesh.gateway").error("%s", err)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
