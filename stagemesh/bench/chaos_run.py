"""The chaos soak's run (`stagemesh bench chaos`; its arguments and description: chaos.py)."""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from stagekit.ports import free_port
from stagemesh.bench.chaos_load import Load, Sender, kinds, run_workers
from stagemesh.bench.chaos_monkey import Monkey
from stagemesh.bench.chaos_report import ChaosReport
from stagemesh.bench.up_process import UpProcess, open_fds, rss_mib


def _up_args(args: argparse.Namespace, grpc_port: int) -> list[str]:
    out = ["--dp", str(args.dp), "--pp", str(args.pp), "--threads", str(args.threads), "--grpc-port", str(grpc_port),
           "--step-timeout", str(args.step_timeout)]
    return out + (["--transport", args.transport] if args.transport else [])


def _gateway_stats(up: UpProcess) -> dict[str, float]:
    pid = up.gateway_pid()
    return {"rss_mib": rss_mib(pid), "open_fds": open_fds(pid)} if pid else {"rss_mib": 0.0, "open_fds": -1}


def _moves(url: str) -> dict[str, float]:
    """Requests the gateway moved: before their first token (retry) and after (migration)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for kind in ("retry", "migration"):
        found = re.search(rf'^stagemesh_request_retries_total{{kind="{kind}"}} ([\d.e+]+)$', text, re.MULTILINE)
        out[kind] = float(found.group(1)) if found else 0.0
    return out


def _calm_references(up: UpProcess, grpc_target: str, model: str, args: argparse.Namespace,
                     report: ChaosReport) -> dict:
    """Each request kind's answer on the calm mesh, sent twice: two calm answers that differ mean the
    mesh is not deterministic for that kind, which the report says (chaos is then not to blame)."""
    answers: dict = {}
    for _ in range(2):
        load = Load(kinds(), max_requests=len(kinds()))
        senders = [Sender(up.url, grpc_target, model, args.max_tokens, args.request_timeout)
                   for _ in range(args.concurrency)]
        for t in run_workers(load, senders):
            t.join()
        for s in senders:
            s.close()
        for o in load.outcomes:
            if o.answer is None:
                report.problems.append(f"the calm mesh failed {o.kind.label()}: {o.error}")
            elif answers.setdefault(o.kind, o.answer) != o.answer:
                report.problems.append(f"the calm mesh gave two answers to {o.kind.label()}")
    return answers


def run_chaos(args: argparse.Namespace) -> int:
    log = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.dp < 2 or args.pp < 1 or args.concurrency < 1 or args.gap[0] > args.gap[1]:
        print("stagemesh bench chaos: error: needs --dp 2 or more (one replica serves while another is "
              "disturbed), --pp and --concurrency of 1 or more, and --gap MIN <= MAX", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="stagemesh-chaos-"))
    grpc_port = free_port()
    up = UpProcess(_up_args(args, grpc_port), log_dir, free_port())
    report = ChaosReport(config={k: v for k, v in vars(args).items() if k != "func"}, log_dir=str(log_dir))
    try:
        log(f"starting stagemesh up --dp {args.dp} --pp {args.pp} (logs in {log_dir})")
        up.start()
        model = httpx.get(f"{up.url}/v1/models", timeout=30).json()["data"][0]["id"]
        grpc_target = f"127.0.0.1:{grpc_port}"
        references = _calm_references(up, grpc_target, model, args, report)
        time.sleep(1.0)  # the reference clients' connections close on the gateway's side too
        report.gateway_before = _gateway_stats(up)
        if report.problems:
            return report.finish(args.json)
        log(f"calm references taken; load for {args.duration:g}s with {args.concurrency} in flight, chaos on")
        load = Load(kinds(), max_requests=args.max_requests)
        monkey = Monkey(up, args.dp, args.pp, random.Random(args.seed), tuple(args.gap),
                        0.0 if args.no_stop else args.stop_for, recover_timeout_s=180.0,
                        done=threading.Event(), log=log, t0=time.monotonic())
        senders = [Sender(up.url, grpc_target, model, args.max_tokens, args.request_timeout)
                   for _ in range(args.concurrency)]
        chaos = threading.Thread(target=monkey.run, daemon=True)
        chaos.start()
        workers = run_workers(load, senders)
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline and any(t.is_alive() for t in workers):
            time.sleep(0.2)
        load.stop.set()
        monkey.done.set()
        for t in workers:
            t.join(timeout=args.request_timeout + 30)
        chaos.join(timeout=args.stop_for + 200)
        report.wall_s = time.monotonic() - monkey.t0
        for s in senders:
            s.close()
        report.gateway_after = _settled_stats(up, report.gateway_before, args.max_fd_growth)
        report.moves = _moves(up.url)
        report.add_outcomes(load.outcomes, references)
        report.disturbances = [vars(e) for e in monkey.events]
        report.problems += monkey.errors
        report.check(args.max_rss_growth_mib, args.max_fd_growth, gateway_alive=up.gateway_pid() is not None,
                     up_alive=up.alive())
    except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
        report.problems.append(f"{type(e).__name__}: {e}")
    finally:
        up.stop()
    return report.finish(args.json)


def _settled_stats(up: UpProcess, before: dict[str, float], max_fd_growth: int) -> dict[str, float]:
    """The gateway's figures once its descriptors settled (closed connections take a moment), or
    after 15 s."""
    deadline = time.monotonic() + 15.0
    while True:
        stats = _gateway_stats(up)
        if stats["open_fds"] <= before["open_fds"] + max_fd_growth or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)
