"""What this machine can do at best, to hold the data plane against: UCX's own C
benchmark (``ucx_perftest``, shipped in the libucx wheel's ``bin/``) on the same UCX
transports, and a same-process memcpy."""

from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

import torch


def perftest_binary() -> Path | None:
    spec = importlib.util.find_spec("libucx")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "ucx_perftest"
    return binary if binary.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_final(out: str) -> list[float] | None:
    for line in out.splitlines():
        if line.startswith("Final:"):
            return [float(x) for x in line.split()[1:]]
    return None


def perftest(test: str, nbytes: int, tls: str, error_handling: bool, iters: int, timeout_s: float = 60.0
             ) -> float | None:
    """One ``ucx_perftest`` run between two processes over loopback: ``tag_bw`` gives the
    bandwidth in bytes/s, ``tag_lat`` the median round trip in seconds. None when the
    binary is missing or the run failed."""
    binary = perftest_binary()
    if binary is None:
        return None
    env = dict(os.environ, UCX_TLS=tls, UCX_WARN_UNUSED_ENV_VARS="n",
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(binary.parent.parent / "lib"),
                                                             os.environ.get("LD_LIBRARY_PATH")])))
    env.setdefault("UCX_RNDV_FRAG_MEM_TYPE", "host")
    port = _free_port()
    args = ["-p", str(port), *(["-e"] if error_handling else [])]
    server = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    final = None
    try:
        while final is None and time.monotonic() < deadline:  # the server needs a moment to listen
            time.sleep(0.1)
            try:
                client = subprocess.run(
                    [str(binary), "127.0.0.1", *args, "-t", test, "-s", str(nbytes), "-n", str(iters),
                     "-w", str(max(1, iters // 10))],
                    env=env, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return None
            final = _parse_final(client.stdout)
        if final is None:
            return None
    finally:
        server.kill()
        server.wait()
    # "Final:" iterations, latency median/average/overall (usec, one way), bandwidth average/overall (MB/s), ...
    if test == "tag_lat":
        return 2 * final[1] * 1e-6
    return final[5] * 1e6


def memcpy_bandwidth(nbytes: int, repeats: int = 9) -> float:
    """Bytes/s of one same-process copy (``Tensor.copy_``), the median of ``repeats``."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)
