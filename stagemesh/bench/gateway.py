"""Gateway overhead: what the gateway adds to a request, and how many trivial requests it serves.

Starts a mesh (DP replicas x 1 stage of the demo model, or ``--model``) with the gateway as its
own process, then in the same run:

1. latency of short completions (``--max-tokens``, greedy, one request at a time) three ways,
   interleaved so that drift hits all alike: the replica head's Stage.Generate called directly
   over gRPC, the gateway's REST ``/v1/completions``, the gateway's gRPC ``Generation.Complete``
   (SDK). The prompt is sent as token ids on every path, so the stage does the same work.
2. request rate on trivial completions (``max_tokens=1``) at ``--concurrency`` clients for
   ``--seconds``: REST through the gateway, gRPC through the gateway, and the replica heads
   directly (the ceiling the gateway is measured against); with the gateway process's CPU
   time per request, which other load on the machine does not distort the way it does rates.

    stagemesh bench gateway [--dp 1] [--json]

Client, gateway and stages share the machine's cores, so the rates are those of the whole
loopback setup, not of the gateway alone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from stagekit.client import AsyncGenerationClient, GenerationClient
from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.ports import free_port
from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec

PROMPT = [3, 200, 201, 202, 203, 50, 60, 70]
_ids = itertools.count()


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary_ms(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    p50, p99 = quantile(xs, 0.5), quantile(xs, 0.99)
    return {"p50_ms": 1000 * p50, "p99_ms": 1000 * p99, "mean_ms": 1000 * statistics.mean(xs)}


def stage_request(max_tokens: int) -> stage_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, top_p=1.0)
    return stage_pb2.GenerateRequest(request_id=f"bench-{next(_ids)}", prompt_token_ids=PROMPT, sampling=sampling)


def latency(mesh: Mesh, grpc_target: str, model: str, n: int, max_tokens: int) -> dict[str, dict[str, float]]:
    import httpx  # a test extra: imported here so that `stagemesh` starts in an image without it

    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    times: dict[str, list[float]] = {"direct_stage": [], "gateway_rest": [], "gateway_grpc": []}
    with (
        grpc.insecure_channel(mesh.replicas[0][0]) as channel,
        httpx.Client(base_url=mesh.url, timeout=60) as http,
        GenerationClient(grpc_target) as sdk,
    ):
        stub = stage_pb2_grpc.StageStub(channel)
        calls: dict[str, Callable[[], object]] = {
            "direct_stage": lambda: list(stub.Generate(stage_request(max_tokens), timeout=60)),
            "gateway_rest": lambda: http.post("/v1/completions", json=body).raise_for_status(),
            "gateway_grpc": lambda: sdk.complete(PROMPT, max_tokens=max_tokens, temperature=0, ignore_eos=True),
        }
        for i in range(n + 20):  # the first 20 rounds warm up every path
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if i >= 20:
                    times[name].append(time.perf_counter() - start)
    out = {name: summary_ms(xs) for name, xs in times.items()}
    for path in ("gateway_rest", "gateway_grpc"):
        out[f"{path}_added"] = {
            "p50_ms": out[path]["p50_ms"] - out["direct_stage"]["p50_ms"],
            "p99_ms": out[path]["p99_ms"] - out["direct_stage"]["p99_ms"],
        }
    return out


async def closed_loop(call: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` clients, each sending its next request when the last one answered."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    begin = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - begin
    return {"requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / wall, **summary_ms(latencies)}


class KeepAliveHttp:
    """A minimal HTTP/1.1 keep-alive client for the rate runs: httpx's connection pool spends
    more CPU per request than the gateway does, and would measure itself instead."""

    def __init__(self, port: int, path: str, body: dict) -> None:
        payload = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        self.request = (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self) -> None:
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self._streams
        writer.write(self.request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def rate(mesh: Mesh, grpc_target: str, model: str, concurrency: int, seconds: float) -> dict[str, dict]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    gateway_pid = next(p.pid for name, p in mesh.procs if name == "gateway")
    out: dict[str, dict] = {}

    async def measured(name: str, call: Callable[[], Awaitable[object]]) -> None:
        before = cpu_seconds(gateway_pid)
        out[name] = await closed_loop(call, concurrency, seconds)
        spent = cpu_seconds(gateway_pid) - before
        if name.startswith("gateway"):
            out[name]["gateway_cpu_ms_per_req"] = 1000 * spent / max(1, out[name]["requests"])

    pool = [KeepAliveHttp(mesh.spec.port, "/v1/completions", body) for _ in range(concurrency)]
    free: asyncio.Queue[KeepAliveHttp] = asyncio.Queue()
    for c in pool:
        free.put_nowait(c)

    async def rest() -> None:
        conn = await free.get()
        try:
            await conn.post()
        finally:
            free.put_nowait(conn)

    await measured("gateway_rest", rest)
    for c in pool:
        c.close()
    async with AsyncGenerationClient(grpc_target) as sdk:

        async def via_sdk() -> None:
            await sdk.complete(PROMPT, max_tokens=1, temperature=0)

        await measured("gateway_grpc", via_sdk)
    channels = [grpc.aio.insecure_channel(r[0]) for r in mesh.replicas]
    stubs = itertools.cycle([stage_pb2_grpc.StageStub(c) for c in channels])

    async def direct() -> None:
        async for _ in next(stubs).Generate(stage_request(1), timeout=60):
            pass

    await measured("direct_stage", direct)
    for channel in channels:
        await channel.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF model directory (default: the demo model)")
    parser.add_argument("--dp", type=int, default=1, help="replicas behind the gateway")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    parser.add_argument("--requests", type=int, default=200, help="latency samples per path")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per short completion")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each rate run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:

    root = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    model = args.model or str(write_demo_model(root / "demo"))
    cfg = load_model_config(model)
    grpc_port = free_port()
    spec = MeshSpec(
        model=model, layer_splits=[(0, cfg.num_layers)], dp=args.dp, threads=args.threads, port=free_port(),
        extra_gateway_args=["--grpc-port", str(grpc_port), "--max-running-per-replica", "1024",
                            "--max-waiting", "4096"],
    )  # fmt: skip
    mesh = Mesh(spec, root / "logs")
    try:
        mesh.start(timeout_s=180)
        target = f"127.0.0.1:{grpc_port}"
        report = {
            "setup": {"model": cfg.name, "dp": args.dp, "concurrency": args.concurrency, "seconds": args.seconds},
            "latency": latency(mesh, target, cfg.name, args.requests, args.max_tokens),
            "rate_max_tokens_1": asyncio.run(rate(mesh, target, cfg.name, args.concurrency, args.seconds)),
        }
    finally:
        mesh.stop()
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"latency, {args.max_tokens}-token completions, one at a time (ms):")
    for name, row in report["latency"].items():
        print(f"  {name:<20} p50 {row['p50_ms']:7.2f}   p99 {row['p99_ms']:7.2f}")
    print(f"rate, max_tokens=1, {args.concurrency} concurrent clients, {args.seconds:g}s each:")
    for name, row in report["rate_max_tokens_1"].items():
        cpu = f"   gateway CPU {row['gateway_cpu_ms_per_req']:.2f} ms/req" if "gateway_cpu_ms_per_req" in row else ""
        print(f"  {name:<20} {row['req_per_s']:7.1f} req/s   p50 {row['p50_ms']:7.2f} ms   "
              f"p99 {row['p99_ms']:7.2f} ms   errors {row['errors']}{cpu}")  # fmt: skip
    return 0

