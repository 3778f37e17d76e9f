"""What it costs TP rank 0 to hand a decode step's metadata to a worker: pipe vs shared-memory ring.

Rank 0 (this process) sends a ``RunStep`` of a decode step of 1, 8 and 32 sequences (one new
token each, a middle stage's: no token ids, a ``TensorsMeta``) the way ``TPExecutor._tell``
does (``ForkingPickler.dumps`` once, then ``send_bytes`` per pipe, or once into the ring) to
one worker process that receives it the way ``tp_worker`` does (``recv``, unpickled). Reported
per case: rank 0's send time and the hand-off, from before the pickling to the worker holding
the unpickled step (both processes read CLOCK_MONOTONIC), p50 and p99. Sends are spaced by
``--gaps`` ms that rank 0 spends busy (as it is, running its own shard, in a stage; a sleeping
sender measures its own wake-up instead): a gap shorter than the ring readers' spin window
(``--spin-ms``) finds the worker polling, a longer one finds it asleep on its futex (a pipe
reader always sleeps in read).

    stagemesh bench handoff [--seqs 1,8,32] [--gaps 1,20] [--spin-ms MS] [--iters 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from multiprocessing.reduction import ForkingPickler

import torch

from stagekit.engine.tp_messages import RunStep, Stop, TensorsMeta
from stagekit.parallel.shm_broadcaster import ShmBroadcaster, ShmBroadcastReader
from stagekit.types.step import SeqSlice, StepHeader, StepInputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqs", default="1,8,32", help="comma-separated sequences per decode step (default 1,8,32)")
    p.add_argument("--gaps", default="1,20", help="comma-separated ms between steps (default 1,20)")
    p.add_argument("--spin-ms", type=float, default=None,
                   help="the ring readers' spin window (default: ShmBroadcastReader's)")
    p.add_argument("--iters", type=int, default=300, help="timed steps per case (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def decode_step(step_id: int, n: int, hidden: int = 768) -> RunStep:
    """A middle stage's decode step of ``n`` sequences, as rank 0 sends it to a worker."""
    seqs = [SeqSlice(1000 + i, 200 + i, 1, sample=True) for i in range(n)]
    return RunStep(StepInputs(StepHeader(step_id, seqs)), TensorsMeta((n, hidden), torch.float32, True))


def _worker(kind: str, conn, ring_name: str | None, spin_ms: float | None, out: mp.Queue) -> None:
    spin = {} if spin_ms is None else {"spin_s": spin_ms / 1e3}
    inbox = conn if ring_name is None else ShmBroadcastReader.attach(ring_name, 0, os.getppid(), **spin)
    conn.send("ready")
    got: list[tuple[int, int]] = []
    while True:
        msg = inbox.recv()
        t = time.perf_counter_ns()
        if isinstance(msg, Stop):
            break
        got.append((msg.step.header.step_id, t))
    out.put(got)


def _q(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def _measure(kind: str, seqs: list[int], gaps_ms: list[float], iters: int, spin_ms: float | None) -> list[dict]:
    ctx = mp.get_context("spawn")
    ring = ShmBroadcaster.create(1) if kind == "ring" else None
    if kind == "ring" and ring is None:
        return []
    parent, child = ctx.Pipe()
    out = ctx.Queue()
    name = None if ring is None else ring.name
    proc = ctx.Process(target=_worker, args=(kind, child, name, spin_ms, out), daemon=True)
    proc.start()
    assert parent.recv() == "ready"
    if ring is not None:
        ring.watch([proc.pid])
        ring.unlink()
    cases, sent, rows = [(n, g) for g in gaps_ms for n in seqs], {}, []
    warmup = max(10, iters // 10)
    step_id = 0
    for n, gap in cases:
        for i in range(warmup + iters):
            msg = decode_step(step_id, n)
            until = time.perf_counter() + gap / 1e3
            while time.perf_counter() < until:  # busy, as rank 0 is with its own shard of the step
                pass
            t0 = time.perf_counter_ns()
            data = ForkingPickler.dumps(msg)
            if ring is not None:
                ring.send_bytes(data)
            else:
                parent.send_bytes(data)
            t1 = time.perf_counter_ns()
            if i >= warmup:
                sent[step_id] = (n, gap, t0, t1, len(data))
            step_id += 1
    (ring.send_bytes if ring is not None else parent.send_bytes)(ForkingPickler.dumps(Stop()))
    got = dict(out.get(timeout=120))
    proc.join(timeout=10)
    if ring is not None:
        ring.close()
    for n, gap in cases:
        mine = [(t0, t1, nbytes, got[s]) for s, (m, g, t0, t1, nbytes) in sent.items() if (m, g) == (n, gap)]
        send_p50, send_p99 = _q([(t1 - t0) / 1e3 for t0, t1, _, _ in mine])
        hand_p50, hand_p99 = _q([(tr - t0) / 1e3 for t0, _, _, tr in mine])
        rows.append({"transport": kind, "seqs": n, "gap_ms": gap, "bytes": mine[0][2], "send_p50_us": send_p50,
                     "send_p99_us": send_p99, "handoff_p50_us": hand_p50, "handoff_p99_us": hand_p99})
    return rows


def measure(seqs: list[int], gaps_ms: list[float], iters: int, spin_ms: float | None = None) -> dict:
    torch.set_num_threads(1)
    rows = _measure("pipe", seqs, gaps_ms, iters, spin_ms) + _measure("ring", seqs, gaps_ms, iters, spin_ms)
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "results": rows}


def format_table(result: dict) -> str:
    lines = [f"step hand-off, TP rank 0 -> 1 worker ({result['machine']}); us from before pickling to the "
             "worker holding the step",
             f"{'transport':<9} {'seqs':>4} {'gap ms':>6} {'bytes':>6} {'send p50':>8} {'send p99':>8} "
             f"{'hand-off p50':>12} {'hand-off p99':>12}"]
    for r in result["results"]:
        lines.append(f"{r['transport']:<9} {r['seqs']:>4} {r['gap_ms']:>6g} {r['bytes']:>6} {r['send_p50_us']:>8.1f} "
                     f"{r['send_p99_us']:>8.1f} {r['handoff_p50_us']:>12.1f} {r['handoff_p99_us']:>12.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure([int(s) for s in args.seqs.split(",") if s], [float(g) for g in args.gaps.split(",") if g],
                     max(10, args.iters), args.spin_ms)
    print(json.dumps(result) if args.json else format_table(result), flush=True)
    return 0
