"""``stagemesh``: one console script, a subcommand per service or tool."""

from __future__ import annotations

import argparse
import sys

from stagemesh.cli import bench_cmd, demo_cmd, stage_cmd, up_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagemesh", description="Distributed LLM inference as gRPC services.")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (up_cmd, stage_cmd, demo_cmd, bench_cmd):
        mod.register(sub)
    try:
        from gateway import cli as gateway_cli  # the gateway is an optional layer above the core
    except ImportError:
        gateway_cli = None
    if gateway_cli is not None:
        p = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway over one or more replicas")
        gateway_cli.add_arguments(p)
        p.set_defaults(func=gateway_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from stagekit.errors import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # settings that cannot work: say which, like argparse does, no traceback
        name = " ".join(filter(None, ["stagemesh", args.command, getattr(args, "bench", None)]))
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
