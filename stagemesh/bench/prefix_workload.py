"""``stagemesh bench prefix``: a shared-prefix workload through the gateway.

G groups of R requests; the requests of a group share a long prefix (a system prompt, a
document) and differ in a short suffix; they arrive shuffled and run with a fixed number
in flight. Two comparisons, each in the same invocation on the same prompts:

1. one TP1·PP1 replica with automatic prefix caching on vs off (``--no-prefix-caching``):
   time to first token and throughput;
2. two replicas (DP=2, each with half the torch threads) behind the gateway, ``prefix``
   routing vs ``round_robin``, with each replica's KV pool sized (``--dp-kv-tokens``) to
   hold about half the groups' prefixes: routing decides whether the caches hold them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass

from stagemesh.bench.serving import _model_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: a demo model of --model-size)")
    p.add_argument("--model-size", default="small", choices=["tiny", "small"])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the single replica (DP: half each)")
    p.add_argument("--dp-kv-tokens", type=int, default=0,
                   help="KV pool per DP replica in tokens (default: prefixes of half the groups + the running "
                        "requests)")
    p.add_argument("--parts", default="cache,routing", help="cache, routing or both")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def workload(groups: int, per_group: int, prefix_len: int, suffix_len: int, vocab: int,
             seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, vocab) for _ in range(prefix_len)] for _ in range(groups)]
    prompts = [p + [rng.randrange(10, vocab) for _ in range(suffix_len)] for p in prefixes for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


@dataclass
class RunResult:
    label: str
    wall_s: float
    output_tokens: int
    ttfts: list[float]
    hit_tokens: int = 0
    query_tokens: int = 0

    def row(self) -> dict:
        t = sorted(self.ttfts)
        return {"run": self.label, "output_tok_s": round(self.output_tokens / self.wall_s, 2),
                "wall_s": round(self.wall_s, 2), "ttft_p50_s": round(t[len(t) // 2], 4),
                "ttft_p90_s": round(t[min(len(t) - 1, int(len(t) * 0.9))], 4),
                "prefix_hit_rate": round(self.hit_tokens / self.query_tokens, 3) if self.query_tokens else None}


async def drive(base_url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int
                ) -> tuple[float, int, list[float]]:
    """Every prompt once, ``concurrency`` in flight; (wall seconds, output tokens, TTFTs)."""
    import httpx

    from stagemesh.bench.load import _one

    sem = asyncio.Semaphore(concurrency)
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0),
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        t0 = time.perf_counter()

        async def one(p: list[int]):
            body = {"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with sem:
                return await _one(client, url, body, t0)

        timings = await asyncio.gather(*[one(p) for p in prompts])
        wall = time.perf_counter() - t0
    return wall, sum(t.num_tokens for t in timings), [t.ttft_s for t in timings]


def _prefix_counts(heads: list[str]) -> tuple[int, int]:
    import grpc

    from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc

    hits = queries = 0
    for head in heads:
        with grpc.insecure_channel(head) as ch:
            info = stage_pb2_grpc.StageStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=10)
        hits, queries = hits + info.prefix_hit_tokens, queries + info.prefix_query_tokens
    return hits, queries


def _one_mesh(label: str, spec_kw: dict, model: str, name: str, prompts: list[list[int]],
              args: argparse.Namespace) -> RunResult:
    from stagekit.ports import free_port
    from stagemesh.launcher import Mesh, MeshSpec

    mesh = Mesh(MeshSpec(model=model, port=free_port(), **spec_kw), tempfile.mkdtemp(prefix="stagemesh-bench-"))
    try:
        mesh.start(timeout_s=600)
        warm = workload(1, 2, 16, 4, 1000, seed=12345)
        asyncio.run(drive(mesh.url, name, warm, 2, 2))
        base_hits, base_queries = _prefix_counts([r[0] for r in mesh.replicas])
        wall, tokens, ttfts = asyncio.run(drive(mesh.url, name, prompts, args.output_len, args.concurrency))
        hits, queries = _prefix_counts([r[0] for r in mesh.replicas])
    finally:
        mesh.stop()
    r = RunResult(label, wall, tokens, ttfts, hits - base_hits, queries - base_queries)
    print(json.dumps(r.row()), file=sys.stderr, flush=True)
    return r


def run(args: argparse.Namespace) -> int:
    from stagekit.config.model_config import load_model_config

    model = _model_dir(args)
    cfg = load_model_config(model)
    prompts = workload(args.groups, args.per_group, args.prefix_len, args.suffix_len, cfg.vocab_size, args.seed)
    parts = set(args.parts.split(","))
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 KV bytes per token
    report: dict = {"model": model, "groups": args.groups, "per_group": args.per_group,
                    "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "output_len": args.output_len,
                    "concurrency": args.concurrency, "runs": []}
    one = {"layer_splits": [(0, cfg.num_layers)], "threads": args.threads, "kv_cache_memory": "2GiB"}
    if "cache" in parts:
        on = _one_mesh("cache on", one, model, cfg.name, prompts, args)
        off = _one_mesh("cache off", {**one, "extra_stage_args": ["--no-prefix-caching"]}, model, cfg.name,
                        prompts, args)
        report["runs"] += [on.row(), off.row()]
        report["ttft_p50_ratio_off_over_on"] = round(off.row()["ttft_p50_s"] / on.row()["ttft_p50_s"], 2)
        report["throughput_ratio_on_over_off"] = round(on.row()["output_tok_s"] / off.row()["output_tok_s"], 2)
    if "routing" in parts:
        kv_tokens = args.dp_kv_tokens or (
            (args.groups // 2 + 1) * args.prefix_len
            + args.concurrency * (args.suffix_len + args.output_len + 32))
        report["dp_kv_tokens"] = kv_tokens
        dp = {"layer_splits": [(0, cfg.num_layers)], "threads": max(1, args.threads // 2), "dp": 2,
              "kv_cache_memory": str(kv_tokens * per_token)}
        rr = _one_mesh("dp2 round_robin", {**dp, "extra_gateway_args": ["--routing", "round_robin"]}, model,
                       cfg.name, prompts, args)
        px = _one_mesh("dp2 prefix", {**dp, "extra_gateway_args": ["--routing", "prefix"]}, model, cfg.name,
                       prompts, args)
        report["runs"] += [rr.row(), px.row()]
        report["throughput_ratio_prefix_over_rr"] = round(px.row()["output_tok_s"] / rr.row()["output_tok_s"], 2)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _print(report: dict) -> None:
    out = sys.stdout
    out.write(f"model {report['model']}: {report['groups']} groups x {report['per_group']} requests, prefix "
              f"{report['prefix_len']} + suffix {report['suffix_len']} -> {report['output_len']} tokens, "
              f"{report['concurrency']} in flight\n")
    out.write(f"{'run':<18} {'tok/s':>8} {'wall s':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'hit rate':>9}\n")
    for r in report["runs"]:
        hit = "-" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.2f}"
        out.write(f"{r['run']:<18} {r['output_tok_s']:>8.1f} {r['wall_s']:>8.1f} {r['ttft_p50_s']:>9.3f} "
                  f"{r['ttft_p90_s']:>9.3f} {hit:>9}\n")
    for key in ("ttft_p50_ratio_off_over_on", "throughput_ratio_on_over_off", "throughput_ratio_prefix_over_rr"):
        if key in report:
            out.write(f"{key}: {report[key]}\n")
    if "dp_kv_tokens" in report:
        out.write(f"KV pool per DP replica: {report['dp_kv_tokens']} tokens\n")
