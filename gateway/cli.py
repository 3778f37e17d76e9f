"""The ``stagemesh gateway`` subcommand: `add_arguments` fills a parser, `run` executes it."""

from __future__ import annotations

import argparse
import asyncio
import logging

from gateway.auth import ADMIN_API_KEYS_ENV, API_KEYS_ENV, load_api_keys
from gateway.cli_roles import add_pd_arguments, replicas_with_roles
from gateway.cli_security import add_security_arguments, tls_settings
from gateway.config import PROMPT_CHARS_PER_TOKEN, ROUTING_POLICIES, AdmissionLimits, GatewayConfig, RequestLimits
from gateway.roles import PdSettings
from stagekit.errors import ConfigError, InvalidRequest

DESCRIPTION = (
    "OpenAI-compatible HTTP gateway (and gRPC Generation API) in front of one or more replicas. "
    "Each --replica is one pipeline: its stage addresses (host:port) in layer order, comma separated; "
    "--replica-file names more (or all) of them in a file reloaded on SIGHUP."
)
logger = logging.getLogger("stagemesh.gateway")
_ADMISSION, _LIMITS = AdmissionLimits(), RequestLimits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="ADDR[,ADDR...]",
        help="stage addresses of one replica in layer order; repeat for data parallelism",
    )
    parser.add_argument(
        "--replica-file",
        default=None,
        metavar="PATH",
        help="replicas from a file, one a line (addresses comma separated, '#' comments); on SIGHUP it is read "
        "again: new lines are added, missing ones drained and removed, changed ones re-wired; a malformed file is "
        "logged and ignored. Combines with --replica, whose replicas reloads leave alone",
    )
    add_pd_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=None, help="serve the gRPC Generation API on this port")
    parser.add_argument("--model-name", default=None, help="model name to serve (default: the head's)")
    parser.add_argument(
        "--routing",
        default=None,
        choices=ROUTING_POLICIES,
        help="routing policy (default: round_robin; least_loaded when the replicas form a DP-attention group, "
        "whose attention load is per replica)",
    )
    add_security_arguments(parser)
    auth = parser.add_argument_group("auth", f"keys also come from ${API_KEYS_ENV} (comma separated)")
    auth.add_argument(
        "--api-key", action="append", default=[], help="require 'Authorization: Bearer KEY' on /v1 and gRPC"
    )
    auth.add_argument("--api-key-file", action="append", default=[], help="file with one API key per line")
    admin = parser.add_argument_group(
        "admin API",
        f"/admin on the REST port (README, 'Replicas and stages at runtime'); off without a key; keys also come "
        f"from ${ADMIN_API_KEYS_ENV} (comma separated)",
    )
    admin.add_argument("--admin-api-key", action="append", default=[],
                       help="require 'Authorization: Bearer KEY' on /admin (a key of its own, not a --api-key)")
    admin.add_argument("--admin-api-key-file", action="append", default=[], help="file with one admin key per line")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="a replica with requests in flight that completes no step for this long is taken out, its requests "
        "moved and its stages re-wired (0: off; default: %(default)s)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="refuse longer prompts (400)")
    limits.add_argument("--max-tokens", type=int, default=None, help="refuse larger max_tokens (400)")
    limits.add_argument("--max-body-bytes", type=int, default=_LIMITS.max_body_bytes, help="413 above")
    limits.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help=f"refuse longer text prompts (400) before tokenizing them (default: {PROMPT_CHARS_PER_TOKEN} per "
        "token of --max-prompt-tokens, else of the model's context)",
    )
    limits.add_argument(
        "--max-running-per-replica",
        type=int,
        default=_ADMISSION.max_running_per_replica,
        help="requests in flight per replica (default: %(default)s)",
    )
    limits.add_argument(
        "--max-waiting-per-replica",
        type=int,
        default=_ADMISSION.max_waiting_per_replica,
        help="requests queued at the gateway per replica; beyond: 429 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-waiting",
        type=int,
        default=_ADMISSION.max_waiting_total,
        help="requests queued at the gateway in total; beyond: 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--no-migration",
        action="store_true",
        help="fail (rather than continue elsewhere) a request whose replica dies after it produced tokens",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for a first replica to be ready; the others join when they are (default: %(default)s)",
    )
    parser.add_argument(
        "--health-interval", type=float, default=5.0, help="seconds between replica probes (default: %(default)s)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="also log every HTTP request (uvicorn)")


def parse_replicas(values: list[str]) -> list[list[str]]:
    """``["a:1,b:2", "c:3"]`` -> ``[["a:1", "b:2"], ["c:3"]]``; raises ValueError when one is empty."""
    replicas = []
    for value in values:
        addresses = [a.strip() for a in value.split(",") if a.strip()]
        if not addresses:
            raise ValueError(f"--replica {value!r} names no stage address")
        replicas.append(addresses)
    return replicas


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The gateway config the arguments describe; raises ValueError/OSError/InvalidRequest on bad ones."""
    from gateway.replica_file import parse_replica_file  # the CLI's --help stays light

    file_replicas = parse_replica_file(args.replica_file) if args.replica_file else []
    replicas, roles = replicas_with_roles(args)
    return GatewayConfig(
        replicas=replicas,
        roles=roles,
        pd=PdSettings(args.pd_min_prefill_tokens, args.pd_lease),
        replica_file=args.replica_file,
        file_replicas=tuple(file_replicas),
        admin_api_keys=load_api_keys(args.admin_api_key, args.admin_api_key_file, env=ADMIN_API_KEYS_ENV),
        stall_timeout_s=args.stall_timeout,
        model_name_override=args.model_name,
        api_keys=load_api_keys(args.api_key, args.api_key_file),
        routing=args.routing,
        grpc_port=args.grpc_port,
        grpc_host=args.host,
        **tls_settings(args),
        admission=AdmissionLimits(args.max_running_per_replica, args.max_waiting_per_replica, args.max_waiting),
        limits=RequestLimits(args.max_prompt_tokens, args.max_tokens, args.max_body_bytes, args.max_prompt_chars),
        migrate=not args.no_migration,
        startup_timeout_s=args.startup_timeout,
        health_interval_s=args.health_interval,
    )


def run(args: argparse.Namespace) -> int:
    """Run the gateway until interrupted; the process exit code."""
    from gateway.server import GatewayStartupError, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (ValueError, OSError, ConfigError, InvalidRequest) as err:
        logger.error("%s", err)
        return 2
    if config.api_keys:
        logger.info("API keys required on /v1 (%d key(s))", len(config.api_keys))
    if config.admin_api_keys:
        logger.info("admin API on /admin (%d key(s))", len(config.admin_api_keys))
    try:
        asyncio.run(serve(config, args.host, args.port, log_level=args.log_level, access_log=args.access_log))
    except GatewayStartupError as err:
        logger.error("%s", err)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
