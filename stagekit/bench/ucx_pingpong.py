"""The Python floor of a UCX round trip: two processes bounce one message of N bytes over
ucxx with nothing else in the way (no envelope, no asyncio turns while waiting: a tight
``progress_once`` loop). Whatever Python code sits on a data plane built on ucxx costs at
least this; ``ucx_perftest`` (C) is the floor without Python.

    python -m stagekit.bench.ucx_pingpong --profile shm --sizes 4096,524288   # prints JSON

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

from stagekit.transport.ucx_settings import UcxSettings, prepare_environment

_START_S = 60.0
_MODULE = "stagekit.bench.ucx_pingpong"


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


async def _serve(profile: str, sizes: list[int], iters: int) -> None:
    ucxx, eh = init_ucxx(profile)
    ep = await endpoint_to_measurer(ucxx, eh)
    await _bounce(ucxx, ep, sizes, iters, first=False)
    sys.stdin.readline()  # the measuring side is done: close only then


async def _measure(profile: str, sizes: list[int], iters: int) -> dict[str, float]:
    ucxx, eh = init_ucxx(profile)
    cmd = [sys.executable, "-m", _MODULE, "--serve", "--profile", profile,
           "--sizes", ",".join(map(str, sizes)), "--iters", str(iters)]
    async with endpoint_to_peer(ucxx, cmd, eh) as ep:
        return await _bounce(ucxx, ep, sizes, iters, first=True)


def python_floor(profile: str, sizes: list[int], iters: int = 200, timeout_s: float = 120.0) -> dict[str, float] | None:
    """Median round trip (µs) per size, measured in fresh processes; None if it failed."""
    try:
        out = subprocess.run([sys.executable, "-m", _MODULE, "--profile", profile, "--sizes",
                              ",".join(map(str, sizes)), "--iters", str(iters)],
                             capture_output=True, text=True, timeout=timeout_s)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="shm")
    p.add_argument("--sizes", required=True)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.serve:
        asyncio.run(_serve(args.profile, sizes, args.iters))
    else:
        print(json.dumps(asyncio.run(_measure(args.profile, sizes, args.iters))), flush=True)


if __name__ == "__main__":
    main()
