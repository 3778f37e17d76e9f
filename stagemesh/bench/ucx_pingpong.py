"""The Python floor of a UCX round trip, and the Python ceiling of a UCX stream: two
processes over bare ucxx with nothing else in the way (no envelope, no asyncio turns while
waiting: tight ``progress_once`` loops). Whatever Python code sits on a data plane built on
ucxx costs at least the round trip and moves at most the stream's bandwidth;
``ucx_perftest`` (C) gives both without Python.

    python -m stagemesh.bench.ucx_pingpong --profile shm --sizes 4096,524288   # round trips, µs
    python -m stagemesh.bench.ucx_pingpong --profile shm --sizes 1048576 --stream --window 4   # GB/s

Round trip: one message of N bytes bounced, median. Stream: about 256 MiB of N-byte
messages one way (up to ``--window`` sends outstanding, as many receives posted ahead),
then a small acknowledgement back; bytes over the time until it is in, median of 3 runs.
Both print one JSON object, size -> figure.

The measuring process starts its echo peer (``--serve``) as a child and the two swap
worker addresses over the child's stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from stagekit.transport.ucx.settings import UcxSettings, prepare_environment

_START_S = 60.0
_MODULE = "stagemesh.bench.ucx_pingpong"


def init_ucxx(profile: str) -> tuple[Any, bool]:
    """Import and initialise ucxx for ``profile`` (UCX_TLS unless set, blocking progress):
    the module and whether its same-host endpoints use error handling."""
    s = UcxSettings.for_profile(profile)
    os.environ.setdefault("UCX_TLS", s.tls)
    prepare_environment(cuda=False)
    import ucxx

    ucxx.init(progress_mode="blocking")
    return ucxx, bool(s.link_error_handling(same_host=True))


async def _bounce(ucxx: Any, ep: Any, sizes: list[int], iters: int, first: bool) -> dict[str, float]:
    import numpy as np
    from ucxx._lib.arr import Array
    from ucxx.types import Tag, TagMaskFull

    worker = ucxx.core._get_ctx().worker

    def wait(req: Any) -> None:
        while not req.completed:
            worker.progress_once()
        req.check_error()

    out = {}
    for n in sizes:
        send, recv = np.ones(n, np.uint8), np.empty(n, np.uint8)
        times = []
        for i in range(iters + iters // 5):
            t0 = time.perf_counter()
            if first:
                wait(ep._ep.tag_send(Array(send), Tag(i)))
                wait(ep._ep.tag_recv(Array(recv), Tag(i), TagMaskFull))
            else:
                wait(ep._ep.tag_recv(Array(recv), Tag(i), TagMaskFull))
                wait(ep._ep.tag_send(Array(send), Tag(i)))
            times.append(time.perf_counter() - t0)
        out[str(n)] = statistics.median(times[iters // 5:]) * 1e6
    return out


def _stream_count(nbytes: int, quick: bool = False) -> int:
    """Messages per stream run: about 256 MiB (32 MiB quick), 8 to 400 of them."""
    return max(8, min(400, ((32 if quick else 256) << 20) // max(nbytes, 1)))


async def _stream(ucxx: Any, ep: Any, sizes: list[int], window: int, quick: bool, first: bool) -> dict[str, float]:
    import numpy as np
    from ucxx._lib.arr import Array
    from ucxx.types import Tag, TagMaskFull

    worker = ucxx.core._get_ctx().worker

    def drain(reqs: list[Any], keep: int) -> list[Any]:
        while len(reqs) > keep:
            worker.progress_once()
            reqs = [r for r in reqs if not r.completed]
        return reqs

    out = {}
    tag = 0
    for n in sizes:
        bufs = [np.ones(n, np.uint8) for _ in range(4)]   # a few, reused: as a stage reuses its memory
        ack = np.zeros(8, np.uint8)
        count, runs = _stream_count(n, quick), []
        for _ in range(4):   # the first run warms the size up
            t0 = time.perf_counter()
            if first:
                pending: list[Any] = []
                for i in range(count):
                    pending = drain(pending, window - 1)
                    pending.append(ep._ep.tag_send(Array(bufs[i % 4]), Tag(tag + i)))
                drain([ep._ep.tag_recv(Array(ack), Tag(tag + count), TagMaskFull)] + pending, 0)
            else:
                posted = {}
                for i in range(count):
                    for j in range(i, min(count, i + window)):
                        if j not in posted:
                            posted[j] = ep._ep.tag_recv(Array(bufs[j % 4]), Tag(tag + j), TagMaskFull)
                    drain([posted.pop(i)], 0)
                drain([ep._ep.tag_send(Array(ack), Tag(tag + count))], 0)
            runs.append(n * count / (time.perf_counter() - t0))
            tag += count + 1
        out[str(n)] = statistics.median(runs[1:]) / 1e9
    return out


async def _endpoint(ucxx: Any, address_hex: str, error_handling: bool) -> Any:
    addr = ucxx.get_ucx_address_from_buffer(bytes.fromhex(address_hex))
    return await ucxx.create_endpoint_from_worker_address(addr, endpoint_error_handling=error_handling)


async def endpoint_to_measurer(ucxx: Any, error_handling: bool) -> Any:
    """The serving side: print our worker address, read the measurer's, connect to it."""
    print(bytes(ucxx.get_worker_address()).hex(), flush=True)
    return await _endpoint(ucxx, sys.stdin.readline().strip(), error_handling)


@contextlib.asynccontextmanager
async def endpoint_to_peer(ucxx: Any, peer_cmd: list[str], error_handling: bool) -> AsyncIterator[Any]:
    """The measuring side: start ``peer_cmd`` (which calls endpoint_to_measurer, bounces,
    then reads one more line before it closes), swap worker addresses over its stdin/stdout
    and yield an endpoint to it; on exit tell it to finish and reap it."""
    peer = subprocess.Popen(peer_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        loop = asyncio.get_running_loop()
        line = ""
        while not line or " " in line.strip():   # UCX may log to stdout: the address is one hex word
            line = await asyncio.wait_for(loop.run_in_executor(None, peer.stdout.readline), _START_S)
            if not line:
                raise RuntimeError(f"ping-pong peer exited ({peer.wait()})")
        ep = await _endpoint(ucxx, line.strip(), error_handling)
        peer.stdin.write(bytes(ucxx.get_worker_address()).hex() + "\n")
        peer.stdin.flush()
        yield ep
    finally:
        try:
            peer.stdin.write("done\n")
            peer.stdin.close()
            peer.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            peer.kill()
            peer.wait()


async def _serve(args: argparse.Namespace, sizes: list[int]) -> None:
    ucxx, eh = init_ucxx(args.profile)
    ep = await endpoint_to_measurer(ucxx, eh)
    if args.stream:
        await _stream(ucxx, ep, sizes, args.window, args.quick, first=False)
    else:
        await _bounce(ucxx, ep, sizes, args.iters, first=False)
    sys.stdin.readline()  # the measuring side is done: close only then


async def _measure(args: argparse.Namespace, sizes: list[int]) -> dict[str, float]:
    ucxx, eh = init_ucxx(args.profile)
    cmd = [sys.executable, "-m", _MODULE, "--serve",
           *_argv(args.profile, sizes, args.iters, args.stream, args.window, args.quick)]
    async with endpoint_to_peer(ucxx, cmd, eh) as ep:
        if args.stream:
            return await _stream(ucxx, ep, sizes, args.window, args.quick, first=True)
        return await _bounce(ucxx, ep, sizes, args.iters, first=True)


def _argv(profile: str, sizes: list[int], iters: int = 200, stream: bool = False, window: int = 1,
          quick: bool = False) -> list[str]:
    """This module's command line for one measurement."""
    return ["--profile", profile, "--sizes", ",".join(map(str, sizes)), "--iters", str(iters),
            "--window", str(window), *(["--stream"] if stream else []), *(["--quick"] if quick else [])]


def _run_fresh(argv: list[str], timeout_s: float) -> dict[str, float] | None:
    try:
        out = subprocess.run([sys.executable, "-m", _MODULE, *argv], capture_output=True, text=True,
                             timeout=timeout_s)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return None


def python_floor(profile: str, sizes: list[int], iters: int = 200, timeout_s: float = 120.0) -> dict[str, float] | None:
    """Median round trip (µs) per size, measured in fresh processes; None if it failed."""
    return _run_fresh(_argv(profile, sizes, iters=iters), timeout_s)


def python_ceiling(profile: str, sizes: list[int], window: int = 1, quick: bool = False,
                   timeout_s: float = 300.0) -> dict[str, float] | None:
    """Stream bandwidth (GB/s) per size, measured in fresh processes; None if it failed."""
    return _run_fresh(_argv(profile, sizes, stream=True, window=window, quick=quick), timeout_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="shm")
    p.add_argument("--sizes", required=True)
    p.add_argument("--iters", type=int, default=200, help="round trips per size")
    p.add_argument("--stream", action="store_true", help="measure one-way stream bandwidth (GB/s) instead")
    p.add_argument("--window", type=int, default=1, help="stream: sends outstanding, receives posted ahead")
    p.add_argument("--quick", action="store_true", help="stream: about 32 MiB per run instead of 256")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.window = max(1, args.window)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.serve:
        asyncio.run(_serve(args, sizes))
    else:
        print(json.dumps(asyncio.run(_measure(args, sizes))), flush=True)


if __name__ == "__main__":
    main()
