"""Measure one data-plane transport against a peer process; prints one JSON object.

    python -m stagemesh.bench.transport_probe --transport ucx:shm --sizes 4096,1048576 --window 4

Run as its own process per transport because UCX keeps one context (one UCX_TLS) per
process. For each size it measures, through the real Transport API (envelope + tensor,
hosted and wired as a stage does it):

- round trip: a step frame with one fp16 tensor of that many bytes to an echoing peer and
  back (median);
- bandwidth: N step frames to a sink peer (up to ``--window`` sends outstanding), then one
  result frame it returns: N x bytes over the time until that result is back (one way);

plus the round trip of a decode-sized step: 32 sequences, hidden_states and residual
[32, 4096] fp16 each (512 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from stagekit.engine.startup_heap import freeze_startup_heap
from stagekit.testing.transport_host import TransportHost
from stagekit.transport.factory import make_transport
from stagekit.types.step import Frame, SeqSlice, StepHeader, StepResult

_PEER_START_S = 60.0


def decode_step(step_id: int, num_seqs: int = 32, hidden: int = 4096) -> Frame:
    seqs = [SeqSlice(i, 100 + i, 1, True) for i in range(num_seqs)]
    x = torch.randn(num_seqs, hidden, dtype=torch.float16)  # [num_seqs, hidden]
    return Frame(step=StepHeader(step_id, seqs), tensors=[x, x.clone()])


def _tensor_frame(step_id: int, nbytes: int) -> Frame:
    return Frame(step=StepHeader(step_id, [SeqSlice(0, 0, 1, True)]),
                 tensors=[torch.ones(nbytes // 2, dtype=torch.float16)])


async def _spawn_peer(name: str, me: str, role: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagekit.testing.transport_peer", "--transport", name, "--connect", me, "--role", role],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    loop = asyncio.get_running_loop()
    for _ in range(100):  # UCX logs to stdout too: skip its lines
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), _PEER_START_S)
        if not line or line.startswith("PEER READY"):
            break
    if not line.startswith("PEER READY"):
        proc.kill()
        raise RuntimeError(f"peer did not start (exit code {proc.wait()})")
    proc.address = line.split()[-1]  # type: ignore[attr-defined]
    return proc


async def _round_trips(host: TransportHost, make: object, iters: int, warmup: int) -> list[float]:
    tr, out = host.transport, []
    # built before timing, a few reused (as ucx_perftest reuses its buffer, and as a stage
    # sends hidden states it just computed: in cache); negative step ids: the sink echoes them
    built = [make(-(i + 1)) for i in range(4)]  # type: ignore[operator]
    for i in range(warmup + iters):
        frame = built[i % len(built)]
        t0 = time.perf_counter()
        await tr.send(frame)
        back = await asyncio.wait_for(tr.recv(), 120)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
        assert back.step is not None and back.step.step_id == frame.step.step_id
    return out


async def _bandwidth(host: TransportHost, nbytes: int, count: int, window: int) -> float:
    """Bytes/s of ``count`` frames to the sink with up to ``window`` sends outstanding (a head
    with pipeline depth N keeps up to N steps in flight; ucx_perftest's tag_bw many sends)."""
    tr = host.transport
    frames = [_tensor_frame(i, nbytes) for i in range(min(count, 4))]  # reused: no allocation in the loop
    await _round_trips(host, lambda sid: _tensor_frame(sid, nbytes), 1, 1)  # warm this size up
    sending: set[asyncio.Task] = set()
    t0 = time.perf_counter()
    for i in range(count):
        if len(sending) >= window:
            done, sending = await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
            for d in done:
                d.result()
        # tasks start in creation order and post their frame before their first await: in order
        sending.add(asyncio.ensure_future(tr.send(frames[i % len(frames)])))
        await asyncio.sleep(0)  # let the gRPC fallback's pump run between sends
    for d in sending:
        await d
    await tr.send(Frame(result=StepResult(10**9, [], [], [])))
    while (await asyncio.wait_for(tr.recv(), 300)).result is None:
        pass
    return nbytes * count / (time.perf_counter() - t0)


def _count(nbytes: int, quick: bool) -> tuple[int, int]:
    """(round trips, bandwidth frames) for a size: about 256 MiB (32 MiB quick) per bandwidth run."""
    budget = (32 if quick else 256) << 20
    frames = max(4, min(400, budget // max(nbytes, 1)))
    return max(4, min(50 if not quick else 15, frames)), frames


async def probe(name: str, sizes: list[int], quick: bool, window: int = 1) -> dict:
    host = TransportHost(make_transport(name))
    me = await host.start()
    freeze_startup_heap()   # as a stage does once it serves
    peer = await _spawn_peer(name, me, "sink")
    try:
        await host.link(peer.address)  # type: ignore[attr-defined]
        result: dict = {"transport": name, "window": window, "sizes": {}}
        for nbytes in sizes:
            rt_iters, bw_frames = _count(nbytes, quick)
            rts = await _round_trips(host, lambda sid, n=nbytes: _tensor_frame(sid, n), rt_iters, 2)
            bw = await _bandwidth(host, nbytes, bw_frames, window)
            result["sizes"][str(nbytes)] = {"rtt_us": statistics.median(rts) * 1e6, "bw_gbps": bw / 1e9,
                                            "rtt_iters": rt_iters, "bw_frames": bw_frames}
        rts = await _round_trips(host, decode_step, 15 if quick else 50, 3)
        result["decode_step"] = {"rtt_us": statistics.median(rts) * 1e6, "bytes": 2 * 32 * 4096 * 2}
        return result
    finally:
        peer.stdin.close()
        # wait without blocking the loop: the peer's endpoint close needs this side to progress
        deadline = time.monotonic() + 10
        while peer.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if peer.poll() is None:
            os.kill(peer.pid, 9)
            peer.wait()
        await host.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", required=True)
    p.add_argument("--sizes", required=True, help="comma-separated tensor bytes per frame")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--window", type=int, default=1, help="frames in flight in the bandwidth runs (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # idle OpenMP workers spin and steal the peer's core on small machines
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(json.dumps(asyncio.run(probe(args.transport, sizes, args.quick, max(1, args.window)))), flush=True)


if __name__ == "__main__":
    main()
