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
reader always sleeps in read). Pipe and ring run at once, alternating in blocks of 20 steps.

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
from stagekit.kernels import shm_ring
from stagekit.parallel.shm_broadcaster import ShmBroadcaster, ShmBroadcastReader
from stagekit.types.step import SeqSlice, StepHeader, StepInputs

BLOCK = 20  # steps in a row over one transport


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


class _Link:
    """Rank 0's end of one transport to its own worker process."""

    def __init__(self, kind: str, spin_ms: float | None) -> None:
        ctx = mp.get_context("spawn")
        self.kind, self.ring = kind, ShmBroadcaster.create(1) if kind == "ring" else None
        self.conn, child = ctx.Pipe()
        self.out = ctx.Queue()
        name = None if self.ring is None else self.ring.name
        self.proc = ctx.Process(target=_worker, args=(kind, child, name, spin_ms, self.out), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"
        if self.ring is not None:
            self.ring.watch([self.proc.pid])
            self.ring.unlink()

    def send(self, msg: object) -> None:
        data = ForkingPickler.dumps(msg)  # as TPExecutor._tell
        (self.conn.send_bytes if self.ring is None else self.ring.send_bytes)(data)

    def close(self) -> dict[int, int]:
        self.send(Stop())
        got = dict(self.out.get(timeout=120))
        self.proc.join(timeout=10)
        if self.ring is not None:
            self.ring.close()
        return got


def measure(seqs: list[int], gaps_ms: list[float], iters: int, spin_ms: float | None = None) -> dict:
    """Both transports at once, alternating in blocks of ``BLOCK`` steps so that drift on the
    machine hits both alike."""
    torch.set_num_threads(1)
    links = [_Link("pipe", spin_ms)] + ([_Link("ring", spin_ms)] if shm_ring.native_available() else [])
    cases, sent, step_id = [(n, g) for g in gaps_ms for n in seqs], {}, 0
    warmup = max(BLOCK, iters // 10) // BLOCK
    for n, gap in cases:
        for block in range(warmup + -(-iters // BLOCK)):
            for link in links:
                for _ in range(BLOCK):
                    msg = decode_step(step_id, n)
                    until = time.perf_counter() + gap / 1e3
                    while time.perf_counter() < until:  # busy, as rank 0 is with its own shard of the step
                        pass
                    t0 = time.perf_counter_ns()
                    link.send(msg)
                    if block >= warmup:
                        sent[step_id] = (link.kind, n, gap, t0, time.perf_counter_ns())
                    step_id += 1
    got = {s: t for link in links for s, t in link.close().items()}
    rows = []
    for kind, (n, gap) in ((link.kind, c) for link in links for c in cases):
        mine = [(t0, t1, got[s]) for s, (k, m, g, t0, t1) in sent.items() if (k, m, g) == (kind, n, gap)]
        send_p50, send_p99 = _q([(t1 - t0) / 1e3 for t0, t1, _ in mine])
        hand_p50, hand_p99 = _q([(tr - t0) / 1e3 for t0, _, tr in mine])
        rows.append({"transport": kind, "seqs": n, "gap_ms": gap,
                     "bytes": len(ForkingPickler.dumps(decode_step(0, n))), "send_p50_us": send_p50,
                     "send_p99_us": send_p99, "handoff_p50_us": hand_p50, "handoff_p99_us": hand_p99})
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
