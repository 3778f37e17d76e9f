"""``stagemesh bench serve``: a mesh on this machine driven through the gateway with N
concurrent greedy requests of fixed prompt/output length, against transformers' generate
on the same checkpoint in the same invocation (``--baseline hf``).

``--transport ucx,grpc`` starts one mesh per data plane (all up at once, same layout), and
``--layouts tp1x2,tp2x1`` one mesh per TP layout (TP size x torch threads per rank, with an
optional ``-gloo`` / ``-shm`` for the TP collectives and ``-ep`` for experts placed whole; a
``dpN-`` prefix starts N replicas, a ``-dpa`` suffix makes them one data-parallel-attention
group, and ``-f16`` / ``-bf16`` stores the linear weights in half precision);
either way the meshes are measured in alternating rounds (``--rounds``, ABBA order), so
that the load other processes put on the machine falls on all alike; figures are medians
over rounds, ratios against the last mesh.

After the meshes (and the baselines: transformers with ``--baseline hf``, llama.cpp's
``llama-batched-bench`` with ``--llama-cpp-bench``/``--gguf``), a one-stage head in this
process decodes at batch 1 (``step_profile``) and the read bandwidth is measured right
after: the batch-1 step time and how close its weight streaming comes to that limit."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from stagemesh.bench.rss import tree_rss_mib

if TYPE_CHECKING:
    from stagemesh.bench.load import LoadResult
    from stagemesh.launcher import Mesh


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: a demo model of --model-size)")
    p.add_argument("--model-size", default="small", choices=["tiny", "small"],
                   help="demo model size when --model is not given (small: ~125M Llama)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--transport", default="",
                   help="comma-separated data planes between stages, e.g. ucx,grpc (or ucx:shm, ucx:tcp...): one "
                        "mesh each, measured in alternating rounds (default: the stages' own default)")
    p.add_argument("--layouts", default="",
                   help="comma-separated TP layouts instead of --tp/--threads, e.g. tp2x1,tp1x2 (TP size x threads "
                        "per rank; a -gloo or -shm suffix picks the TP collectives, -ep places a MoE model's "
                        "experts whole over the TP ranks; a dpN- prefix runs N replicas, and -dpa makes them one "
                        "data-parallel-attention group, e.g. dp2-tp1x1-dpa; -f16 / -bf16 stores the linear weights "
                        "in half precision, --weight-dtype): one mesh each, alternating rounds")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the meshes; figures are medians (default 1)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads per rank (and for the baseline)")
    p.add_argument("--kv-cache-memory", default="4GiB", help="KV cache per stage rank")
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
    p.add_argument("--no-step-profile", action="store_true",
                   help="skip the batch-1 step measured in this process (step and matmul time, weight streaming "
                        "against the machine's read bandwidth)")
    p.add_argument("--llama-cpp-bench", default="", metavar="PATH",
                   help="a llama-batched-bench binary: run it as a baseline in the same run (needs --gguf)")
    p.add_argument("--gguf", default="", metavar="PATH", help="GGUF of the same weights for --llama-cpp-bench")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def _model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from stagekit.demo import write_demo_model

    path = Path(tempfile.gettempdir()) / f"stagemesh-bench-{args.model_size}"
    if not (path / "config.json").is_file():
        write_demo_model(path, size=args.model_size)
    return str(path)


def run(args: argparse.Namespace) -> int:
    from stagekit.config.model_config import load_model_config
    from stagemesh.bench.load import run_load  # httpx: only needed to run it

    if bool(args.llama_cpp_bench) != bool(args.gguf):
        from stagekit.errors import ConfigError

        raise ConfigError("--llama-cpp-bench and --gguf go together: the binary and the GGUF of the same weights")
    model = _model_dir(args)
    cfg = load_model_config(model)
    batches = [int(b) for b in args.batch.split(",")]
    variants = _variants(args)
    planes = list(variants)
    load_start = os.getloadavg()
    meshes: dict[str, Mesh] = {}
    results: dict[str, dict[int, list[LoadResult]]] = {t: {b: [] for b in batches} for t in planes}
    rss: dict[str, dict[str, float]] = {}
    try:
        for t in planes:
            meshes[t] = _start_mesh(args, model, cfg.num_layers, t, **variants[t])
            asyncio.run(run_load(meshes[t].url, cfg.name, _prompts(1, 16, cfg.vocab_size, 99), 4))  # warm-up
        for r in range(max(1, args.rounds)):
            for t in (planes if r % 2 == 0 else planes[::-1]):
                for b in batches:
                    prompts = _prompts(b, args.prompt_len, cfg.vocab_size, args.seed)
                    results[t][b].append(asyncio.run(run_load(meshes[t].url, cfg.name, prompts, args.output_len)))
        for t, mesh in meshes.items():
            pids = [p.pid for name, p in mesh.procs if name.startswith("stage")]
            ranks = len(pids) * variants[t]["tp"]
            rss[t] = {"end": round(sum(tree_rss_mib(p) for p in pids), 1),
                      "peak": round(sum(tree_rss_mib(p, peak=True) for p in pids), 1),
                      "ranks": ranks, "end_per_rank": round(sum(tree_rss_mib(p) for p in pids) / ranks, 1)}
    finally:
        for mesh in meshes.values():
            mesh.stop()
    baseline = {}
    if args.baseline == "hf":
        from stagemesh.bench.hf_baseline import run_hf

        for b in batches:
            baseline[b] = run_hf(model, _prompts(b, args.prompt_len, cfg.vocab_size, args.seed), args.output_len,
                                 args.threads)
    llama_cpp = {}
    if args.llama_cpp_bench:
        from stagemesh.bench.llama_cpp_baseline import run_llama_batched_bench

        llama_cpp = run_llama_batched_bench(args.llama_cpp_bench, args.gguf, batches, args.prompt_len,
                                            args.output_len, args.threads)
    report = {
        "model": model, "pp": args.pp, "tp": args.tp, "threads": args.threads, "rounds": max(1, args.rounds),
        "meshes": variants,
        "prompt_len": args.prompt_len, "output_len": args.output_len,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "stage_rss_mib": rss, "runs": [],
    }
    for t in planes:
        for b in batches:
            row = _row(t, b, results[t][b])
            if len(planes) > 1 and t != planes[-1]:
                ref = statistics.median(r.output_tok_s for r in results[planes[-1]][b])
                row[f"ratio_vs_{planes[-1]}"] = round(row["output_tok_s"] / ref, 3)
            if b in baseline:
                row["hf_output_tok_s"] = round(baseline[b].output_tok_s, 2)
                row["hf_ttft_s"] = round(baseline[b].ttft_s, 4)
                row["ratio_vs_hf"] = round(row["output_tok_s"] / baseline[b].output_tok_s, 3)
            if b in llama_cpp:
                row["llama_cpp_output_tok_s"] = llama_cpp[b]["output_tok_s"]
                row["llama_cpp_decode_step_ms"] = llama_cpp[b]["decode_step_ms"]
                row["ratio_vs_llama_cpp"] = round(row["output_tok_s"] / llama_cpp[b]["output_tok_s"], 3)
            report["runs"].append(row)
    if not args.no_step_profile:
        report["step"] = batch1_step(model, cfg.num_layers, cfg.vocab_size, args)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def batch1_step(model: str, num_layers: int, vocab_size: int, args: argparse.Namespace) -> dict:
    """The batch-1 decode step of a one-stage replica (TP 1, ``--threads``) measured in this
    process, beside the read bandwidth measured right after it: how close the step's weight
    streaming comes to the machine's limit, in the matmuls alone and over the whole step."""
    from stagemesh.bench.step_profile import profile_steps
    from stagemesh.cli.sizes import parse_bytes

    prof = profile_steps(model, num_layers, vocab_size, tp=1, threads=args.threads,
                         kv_bytes=parse_bytes(args.kv_cache_memory), batches=[1], prompt_len=args.prompt_len,
                         output_len=args.output_len, seed=args.seed)
    row, bw = prof["batches"][0], prof["read_bandwidth_gb_s"]
    cats = row["categories"]
    matmul_ms = cats["matmul"]["ms"] + cats["lm_head"]["ms"] + cats["fused_layer"]["ms"]  # see step_profile
    step_gb_s = prof["weight_bytes"] / (row["step_ms"] / 1000) / 1e9
    return {"step_ms": row["step_ms"], "profiled_step_ms": row["profiled_step_ms"], "matmul_ms": round(matmul_ms, 3),
            "weight_bytes": prof["weight_bytes"],
            "read_bandwidth_gb_s": bw, "matmul_gb_s": row["matmul_gb_s"],
            "matmul_vs_bandwidth": row["matmul_vs_bandwidth"],
            "step_gb_s": round(step_gb_s, 2), "step_vs_bandwidth": round(step_gb_s / bw, 3)}


# a --layouts suffix -> the stages' --weight-dtype (none: the checkpoint's own)
_WEIGHT_DTYPES = {None: "", "f16": "float16", "bf16": "bfloat16"}


def _variants(args: argparse.Namespace) -> dict[str, dict]:
    """The meshes to compare, by label: one per --layouts entry, else one per --transport plane."""
    from stagekit.errors import ConfigError

    if args.layouts:
        if "," in args.transport:
            raise ConfigError("--layouts compares TP layouts on one data plane: give --transport one plane")
        out = {}
        for v in (s for s in args.layouts.split(",") if s):
            m = re.fullmatch(r"(?:dp(\d+)-)?tp(\d+)x(\d+)(?:-(shm|gloo))?(-ep)?(-dpa)?(?:-(f16|bf16))?", v)
            if m is None:
                raise ConfigError(f"--layouts entry {v!r}: expected [dpN-]tpNxT[-shm|-gloo][-ep][-dpa][-f16|-bf16] "
                                  "(replicas, TP size x threads), e.g. tp2x1, tp2x1-gloo, dp2-tp1x1-dpa, tp1x2-f16")
            out[v] = {"tp": int(m[2]), "threads": int(m[3]), "collectives": m[4] or "auto",
                      "transport": args.transport or "", "moe_parallel": "ep" if m[5] else "",
                      "dp": int(m[1] or 1), "dp_attention": bool(m[6]), "weight_dtype": _WEIGHT_DTYPES[m[7]]}
        return out
    return {t: {"tp": args.tp, "threads": args.threads, "collectives": "auto", "transport": t, "moe_parallel": "",
                "dp": 1, "dp_attention": False, "weight_dtype": ""}
            for t in ([t for t in args.transport.split(",") if t] or [""])}


def _start_mesh(args: argparse.Namespace, model: str, num_layers: int, label: str, *, tp: int, threads: int,
                collectives: str, transport: str, moe_parallel: str, dp: int, dp_attention: bool,
                weight_dtype: str) -> Mesh:
    from stagekit.ports import free_port
    from stagemesh.launcher import MeshSpec, split_layers, start_mesh

    spec = MeshSpec(model=model, layer_splits=split_layers(num_layers, args.pp), tp=tp, threads=threads,
                    port=free_port(), kv_cache_memory=args.kv_cache_memory, transport=transport or None,
                    dp=dp, dp_attention=dp_attention,
                    extra_gateway_args=["--routing", "least_loaded"] if dp > 1 else [],
                    extra_stage_args=["--collectives", collectives,
                                      *(["--moe-parallel", moe_parallel] if moe_parallel else []),
                                      *(["--weight-dtype", weight_dtype] if weight_dtype else [])])
    return start_mesh(spec, f"stagemesh-bench-{label.replace(':', '-') or 'default'}-")


def _row(label: str, batch: int, rounds: list[LoadResult]) -> dict:
    """Median tokens/s over rounds; latency quantiles over every request of every round."""
    from stagemesh.bench.load import LoadResult

    pooled = LoadResult(batch, sum(r.wall_s for r in rounds), sum(r.output_tokens for r in rounds),
                        [t for r in rounds for t in r.timings])
    return {"mesh": label or "default", "batch": batch,
            "output_tok_s": round(statistics.median(r.output_tok_s for r in rounds), 2),
            "rounds_tok_s": [round(r.output_tok_s, 2) for r in rounds],
            "ttft_p50_s": round(pooled.ttft(0.5), 4), "ttft_p90_s": round(pooled.ttft(0.9), 4),
            "itl_p50_s": round(pooled.itl(0.5), 5), "itl_p90_s": round(pooled.itl(0.9), 5)}


def _print_table(report: dict) -> None:
    out = sys.stdout
    meshes = "; ".join(f"{k or 'default'}: tp={v['tp']} threads={v['threads']} collectives={v['collectives']}"
                       for k, v in report["meshes"].items())
    out.write(f"model {report['model']}  pp={report['pp']}  {meshes}\n  "
              f"prompt {report['prompt_len']} -> {report['output_len']} tokens  "
              f"median of {report['rounds']} round(s)\n")
    ratio = next((k for r in report["runs"] for k in r
                  if k.startswith("ratio_vs_") and k not in ("ratio_vs_hf", "ratio_vs_llama_cpp")), "")
    out.write(f"{'mesh':>12} {'batch':>5} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>9}"
              f" {'ITL p90':>9} {ratio.removeprefix('ratio_'):>10} {'HF tok/s':>9} {'vs HF':>6}  rounds tok/s\n")
    for r in report["runs"]:
        out.write(f"{r['mesh']:>12} {r['batch']:>5} {r['output_tok_s']:>9.1f} {r['ttft_p50_s']:>9.3f}"
                  f" {r['ttft_p90_s']:>9.3f} {r['itl_p50_s']:>9.4f} {r['itl_p90_s']:>9.4f}"
                  f" {r.get(ratio, float('nan')):>10.3f} {r.get('hf_output_tok_s', float('nan')):>9.1f}"
                  f" {r.get('ratio_vs_hf', float('nan')):>6.2f}  {r['rounds_tok_s']}\n")
    for t, rss in report["stage_rss_mib"].items():
        out.write(f"stage RSS MiB ({t or 'default'}): end {rss['end']}, peak {rss['peak']}, "
                  f"{rss['end_per_rank']} per rank of {rss['ranks']}\n")
    for r in report["runs"]:
        if "llama_cpp_output_tok_s" in r:
            out.write(f"llama.cpp (llama-batched-bench) batch {r['batch']}: {r['llama_cpp_output_tok_s']:.1f} tok/s, "
                      f"decode step {r['llama_cpp_decode_step_ms']:.2f} ms; stagemesh {r['mesh']} / llama.cpp "
                      f"{r['ratio_vs_llama_cpp']:.2f}\n")
    one = [r for r in report["runs"] if r["batch"] == 1]
    if one:
        out.write("batch-1 ms per token through the gateway (ITL p50): "
                  + ", ".join(f"{r['mesh']} {1000 * r['itl_p50_s']:.2f}" for r in one) + "\n")
    if "step" in report:
        s = report["step"]
        out.write(f"batch-1 step in this process: {s['step_ms']:.2f} ms (profiled {s['profiled_step_ms']:.2f} ms, "
                  f"of it matmuls {s['matmul_ms']:.2f} ms over {s['weight_bytes'] / 1e6:.0f} MB of weights: "
                  f"{s['matmul_gb_s']:.1f} GB/s "
                  f"= {100 * s['matmul_vs_bandwidth']:.0f}% of the read bandwidth, {s['read_bandwidth_gb_s']:.1f} GB/s "
                  f"with {report['threads']} threads); over the whole step {s['step_gb_s']:.1f} GB/s "
                  f"({100 * s['step_vs_bandwidth']:.0f}%)\n")
    la = report["load_average"]
    out.write(f"load average: start {la['start']}, end {la['end']}\n")
