"""``stagemesh bench serve``: a mesh on this machine driven through the gateway with N
concurrent greedy requests of fixed prompt/output length, against transformers' generate
on the same checkpoint in the same invocation (``--baseline hf``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path

from stagemesh.bench.rss import tree_rss_mib


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: a demo model of --model-size)")
    p.add_argument("--model-size", default="small", choices=["tiny", "small"],
                   help="demo model size when --model is not given (small: ~125M Llama)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads per rank (and for the baseline)")
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
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
    from stagekit.parallel.tp_executor import free_port
    from stagemesh.bench.load import LoadResult, run_load  # httpx: only needed to run it
    from stagemesh.launcher import Mesh, MeshSpec, split_layers

    model = _model_dir(args)
    cfg = load_model_config(model)
    batches = [int(b) for b in args.batch.split(",")]
    spec = MeshSpec(model=model, layer_splits=split_layers(cfg.num_layers, args.pp), tp=args.tp,
                    threads=args.threads, port=free_port(), kv_cache_memory="4GiB")
    mesh = Mesh(spec, tempfile.mkdtemp(prefix="stagemesh-bench-"))
    results: dict[int, LoadResult] = {}
    try:
        mesh.start(timeout_s=600)
        stage_pids = [p.pid for name, p in mesh.procs if name.startswith("stage")]
        rss_start = sum(tree_rss_mib(p) for p in stage_pids)
        asyncio.run(run_load(mesh.url, cfg.name, _prompts(1, 16, cfg.vocab_size, 99), 4))  # warm-up
        for b in batches:
            results[b] = asyncio.run(run_load(mesh.url, cfg.name, _prompts(b, args.prompt_len, cfg.vocab_size,
                                                                         args.seed), args.output_len))
        rss_end = sum(tree_rss_mib(p) for p in stage_pids)
        rss_peak = sum(tree_rss_mib(p, peak=True) for p in stage_pids)
    finally:
        mesh.stop()
    baseline = {}
    if args.baseline == "hf":
        from stagemesh.bench.hf_baseline import run_hf

        for b in batches:
            baseline[b] = run_hf(model, _prompts(b, args.prompt_len, cfg.vocab_size, args.seed), args.output_len,
                                 args.threads)
    report = {
        "model": model, "pp": args.pp, "tp": args.tp, "threads": args.threads,
        "prompt_len": args.prompt_len, "output_len": args.output_len,
        "stage_rss_mib": {"start": round(rss_start, 1), "end": round(rss_end, 1), "peak": round(rss_peak, 1)},
        "runs": [],
    }
    for b, r in results.items():
        row = {"batch": b, "output_tok_s": round(r.output_tok_s, 2), "ttft_p50_s": round(r.ttft(0.5), 4),
               "ttft_p90_s": round(r.ttft(0.9), 4), "itl_p50_s": round(r.itl(0.5), 5),
               "itl_p90_s": round(r.itl(0.9), 5)}
        if b in baseline:
            row["hf_output_tok_s"] = round(baseline[b].output_tok_s, 2)
            row["hf_ttft_s"] = round(baseline[b].ttft_s, 4)
            row["ratio_vs_hf"] = round(r.output_tok_s / baseline[b].output_tok_s, 3)
        report["runs"].append(row)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    out = sys.stdout
    out.write(f"model {report['model']}  pp={report['pp']} tp={report['tp']} threads={report['threads']}  "
              f"prompt {report['prompt_len']} -> {report['output_len']} tokens\n")
    out.write(f"{'batch':>5} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>9} {'ITL p90':>9}"
              f" {'HF tok/s':>9} {'ratio':>6}\n")
    for r in report["runs"]:
        out.write(f"{r['batch']:>5} {r['output_tok_s']:>9.1f} {r['ttft_p50_s']:>9.3f} {r['ttft_p90_s']:>9.3f}"
                  f" {r['itl_p50_s']:>9.4f} {r['itl_p90_s']:>9.4f} {r.get('hf_output_tok_s', float('nan')):>9.1f}"
                  f" {r.get('ratio_vs_hf', float('nan')):>6.2f}\n")
    rss = report["stage_rss_mib"]
    out.write(f"stage RSS MiB: start {rss['start']}, end {rss['end']}, peak {rss['peak']}\n")
