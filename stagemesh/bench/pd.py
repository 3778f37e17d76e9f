"""``stagemesh bench pd``: prefill/decode disaggregation against colocated replicas.

Short-prompt streams decode while long prompts arrive at a steady rate, through the gateway,
on two meshes in the same invocation with the same prompts and the same threads per replica:
two colocated replicas (``both``, least-loaded routing) and one prefill + one decode replica.
Reported per mesh: the decode inter-token latency of the short streams (p50/p99), the time to
first token of the long and of the short requests (p50/p99) and the output throughput; then
the ratios colocated / disaggregated. A long prefill stalls every decode step of the replica
it runs on; disaggregated, the short streams decode on a replica that never prefills a long
prompt (their own short prompts are prefilled on the prefill replica too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from stagemesh.bench.serving import _model_dir

if TYPE_CHECKING:
    from stagemesh.bench.load import RequestTiming


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: a demo model of --model-size)")
    p.add_argument("--model-size", default="small", choices=["tiny", "small"])
    p.add_argument("--streams", type=int, default=4, help="short-prompt streams decoding throughout")
    p.add_argument("--short-len", type=int, default=32, help="prompt tokens of a stream")
    p.add_argument("--stream-output", type=int, default=128, help="tokens each stream generates")
    p.add_argument("--long-len", type=int, default=1024, help="prompt tokens of a long request")
    p.add_argument("--long-output", type=int, default=8, help="tokens each long request generates")
    p.add_argument("--long-every", type=float, default=2.0, help="seconds between long-prompt arrivals")
    p.add_argument("--long-count", type=int, default=8, help="long requests in a run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (both meshes)")
    p.add_argument("--transport", default=None, help="data plane (default: the stages' default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seed", type=int, default=0)


async def _workload(base_url: str, model: str, args: argparse.Namespace, vocab: int) -> dict:
    import httpx  # only to run it: the CLI's parser imports this module without the test extras

    from stagemesh.bench.load import _one, _quantile

    rng = random.Random(args.seed)
    shorts = [[rng.randrange(10, vocab) for _ in range(args.short_len)] for _ in range(args.streams)]
    longs = [[rng.randrange(10, vocab) for _ in range(args.long_len)] for _ in range(args.long_count)]
    url = f"{base_url}/v1/completions"

    def body(prompt: list[int], n: int) -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

    limits = httpx.Limits(max_connections=args.streams + args.long_count + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def long_at(i: int, prompt: list[int]) -> RequestTiming:
            await asyncio.sleep(i * args.long_every)
            return await _one(client, url, body(prompt, args.long_output), t0)

        stream_tasks = [asyncio.create_task(_one(client, url, body(p, args.stream_output), t0)) for p in shorts]
        await asyncio.sleep(0.5)   # the streams are decoding when the first long prompt arrives
        long_tasks = [asyncio.create_task(long_at(i, p)) for i, p in enumerate(longs)]
        streams = await asyncio.gather(*stream_tasks)
        long_timings = await asyncio.gather(*long_tasks)
        wall = time.perf_counter() - t0
    itl = [x for t in streams for x in t.itl_s]
    tokens = sum(t.num_tokens for t in (*streams, *long_timings))
    return {"decode_itl_p50_ms": round(1000 * _quantile(itl, 0.5), 1),
            "decode_itl_p99_ms": round(1000 * _quantile(itl, 0.99), 1),
            "long_ttft_p50_s": round(_quantile([t.ttft_s for t in long_timings], 0.5), 3),
            "long_ttft_p99_s": round(_quantile([t.ttft_s for t in long_timings], 0.99), 3),
            "short_ttft_p50_s": round(_quantile([t.ttft_s for t in streams], 0.5), 3),
            "short_ttft_p99_s": round(_quantile([t.ttft_s for t in streams], 0.99), 3),
            "output_tok_s": round(tokens / wall, 2), "wall_s": round(wall, 2), "output_tokens": tokens}


def _run_mesh(label: str, roles: list[str], model: str, name: str, vocab: int, num_layers: int,
              args: argparse.Namespace) -> dict:
    from stagekit.ports import free_port
    from stagemesh.launcher import Mesh, MeshSpec

    gateway_args = ["--routing", "least_loaded"] if not roles else []
    spec = MeshSpec(model=model, layer_splits=[(0, num_layers)], dp=2, roles=roles, threads=args.threads,
                    port=free_port(), kv_cache_memory="2GiB", transport=args.transport,
                    extra_gateway_args=gateway_args)
    mesh = Mesh(spec, tempfile.mkdtemp(prefix=f"stagemesh-bench-pd-{label}-"))
    try:
        mesh.start(timeout_s=600)
        warm = argparse.Namespace(**{**vars(args), "streams": 2, "stream_output": 4, "long_count": 1,
                                     "long_len": 64, "long_output": 2})
        asyncio.run(_workload(mesh.url, name, warm, vocab))
        row = {"run": label, **asyncio.run(_workload(mesh.url, name, args, vocab))}
    finally:
        mesh.stop()
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def run(args: argparse.Namespace) -> int:
    from stagekit.config.model_config import load_model_config

    model = _model_dir(args)
    cfg = load_model_config(model)
    if args.long_len + args.long_output > cfg.max_model_len:
        print(f"stagemesh bench pd: --long-len {args.long_len} + --long-output exceeds the model's context "
              f"{cfg.max_model_len}", file=sys.stderr)
        return 2
    report: dict = {"model": model, "streams": args.streams, "short_len": args.short_len,
                    "stream_output": args.stream_output, "long_len": args.long_len, "long_output": args.long_output,
                    "long_every_s": args.long_every, "long_count": args.long_count, "threads": args.threads,
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()], "runs": []}
    colocated = _run_mesh("colocated", [], model, cfg.name, cfg.vocab_size, cfg.num_layers, args)
    disagg = _run_mesh("disaggregated", ["prefill", "decode"], model, cfg.name, cfg.vocab_size, cfg.num_layers, args)
    report["runs"] = [colocated, disagg]
    report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    for key in ("decode_itl_p50_ms", "decode_itl_p99_ms", "long_ttft_p50_s", "long_ttft_p99_s"):
        report[f"{key}_colocated_over_disaggregated"] = round(colocated[key] / disagg[key], 2) if disagg[key] else None
    report["throughput_disaggregated_over_colocated"] = round(disagg["output_tok_s"] / colocated["output_tok_s"], 2)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _print(report: dict) -> None:
    out = sys.stdout
    out.write(f"model {report['model']}: {report['streams']} streams ({report['short_len']} -> "
              f"{report['stream_output']} tokens) while {report['long_count']} prompts of {report['long_len']} tokens "
              f"arrive every {report['long_every_s']} s; {report['threads']} thread(s) per replica\n")
    cols = ("decode_itl_p50_ms", "decode_itl_p99_ms", "long_ttft_p50_s", "long_ttft_p99_s", "short_ttft_p50_s",
            "short_ttft_p99_s", "output_tok_s")
    out.write(f"{'run':<15}" + "".join(f"{c:>18}" for c in cols) + "\n")
    for r in report["runs"]:
        out.write(f"{r['run']:<15}" + "".join(f"{r[c]:>18}" for c in cols) + "\n")
    for key, value in report.items():
        if key.endswith("_over_disaggregated") or key.endswith("_over_colocated"):
            out.write(f"{key}: {value}\n")
    out.write(f"load average before {report['loadavg_before']}, after {report['loadavg_after']}\n")
