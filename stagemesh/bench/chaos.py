"""A chaos soak of a whole mesh: ``stagemesh up --dp 2 --pp 2`` on the demo model under steady load
(greedy and seeded-sampled requests, REST and gRPC streams) while stage processes are SIGKILLed
at random moments (``up`` restarts them) and one at a time is SIGSTOPped for a while. Every answer
is checked against the same request's answer on the calm mesh before the chaos.

Goal: 0 failed, 0 wrong, and nothing leaked in the gateway (open descriptors back where they were,
resident memory within a bound); the command exits 1 when the goal is missed, saying what failed.

    stagemesh bench chaos [--duration 60] [--max-requests N] [--no-stop] [--json]
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load under chaos (default 60)")
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many requests (default: no limit)")
    p.add_argument("--dp", type=int, default=2, help="replicas (default 2; at least 2, so one always serves)")
    p.add_argument("--pp", type=int, default=2, help="stages per replica (default 2)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per request (default 48)")
    p.add_argument("--gap", type=float, nargs=2, default=(3.0, 8.0), metavar=("MIN", "MAX"),
                   help="seconds of calm between disturbances, drawn uniformly (default 3 8)")
    p.add_argument("--stop-for", type=float, default=12.0,
                   help="seconds a SIGSTOPped stage stays stopped (default 12: longer than --step-timeout)")
    p.add_argument("--no-stop", action="store_true", help="SIGKILL only, never SIGSTOP")
    p.add_argument("--step-timeout", type=float, default=8.0,
                   help="the stages' step timeout (default 8 s, so a stopped stage's steps time out and migrate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the disturbances' times and victims")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (default 1)")
    p.add_argument("--transport", default=None, help="data plane between stages: ucx or grpc (default: up's)")
    p.add_argument("--request-timeout", type=float, default=180.0, help="seconds a request may take (default 180)")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                   help="gateway resident memory growth that counts as a leak (default 64 MiB)")
    p.add_argument("--max-fd-growth", type=int, default=4,
                   help="gateway open descriptors gained that count as a leak, after they settle (default 4)")
    p.add_argument("--log-dir", default=None, help="where up's output and the process logs go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")


def run(args: argparse.Namespace) -> int:
    from stagemesh.bench.chaos_run import run_chaos  # httpx and the gRPC client: only for a run, not for --help

    return run_chaos(args)
