"""``stagemesh bench kv``: KV transfer between two replicas (``Stage.ExportKv``), per data plane.

For each data plane in ``--transport`` two one-stage TP1 replicas run on it (all up at
once). Each round computes a fresh prompt on replica A (a prompt per round and length, so
B lacks its blocks) and times ``ExportKv`` A→B from this process (the RPC's wall time:
reserve, the stages' push, commit). GB/s = bytes_sent / that time; figures are medians
over rounds, after one unmeasured warm-up round, planes in alternating order (ABBA) so
that other load falls on both alike, against a same-process memcpy of the same bytes.
Each transfer is checked to be real: the reply names the plane and sent every block.
The stages prefault their KV pools (``--kv-prefault``) unless ``--cold-pool``: each round
lands in blocks never written before, which on a fresh lazily-mapped pool page-faults
every page on the importing side (the first pass over a new pool, not the steady state).

The default checkpoint is a random-weight Llama shaped for a large KV per token (64 KiB
in fp32) with little compute, so that prefilling the prompts stays cheap."""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stagekit.rpc.pb import stage_pb2
    from stagemesh.launcher import Mesh

# hidden 256 with 8 KV heads of 128: KV per token = 8 layers x 2 x 8 x 128 x 4 B = 64 KiB (fp32)
KV_SHAPE = {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 512, "max_position_embeddings": 16384}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF model directory (default: a random-weight Llama with 64 KiB of KV per token)")
    p.add_argument("--transport", default="ucx,grpc", help="comma-separated data planes, e.g. ucx,grpc")
    p.add_argument("--prompt-len", default="512,2048", help="comma-separated prompt lengths (whole KV blocks)")
    p.add_argument("--rounds", type=int, default=3, help="transfers per plane and length; figures are medians")
    p.add_argument("--threads", type=int, default=2, help="torch threads per stage")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV cache per stage")
    p.add_argument("--cold-pool", action="store_true",
                   help="stages without --kv-prefault: the importing stage page-faults its fresh blocks "
                        "(the first pass over a new pool) instead of a pool touched at start-up (steady state)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)


def kv_model_dir(model: str | None) -> str:
    """``model``, or the KV-heavy demo checkpoint (written once into the temp dir)."""
    if model:
        return model
    from safetensors.torch import save_file

    from stagekit.demo import demo_config, random_weights
    from stagekit.demo.bpe import write_tokenizer_files
    from stagekit.demo.checkpoint import generation_config

    path = Path(tempfile.gettempdir()) / "stagemesh-bench-kv"
    if (path / "config.json").is_file():
        return str(path)
    cfg = {**demo_config("llama", "tiny"), **KV_SHAPE}
    tmp = Path(tempfile.mkdtemp(prefix=".stagemesh-bench-kv.tmp-", dir=path.parent))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(generation_config("llama"), indent=2))
    write_tokenizer_files(tmp, "llama", cfg["vocab_size"])
    save_file(random_weights(cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    try:
        tmp.rename(path)
    except OSError:  # another invocation wrote it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def prompt(length: int, round_: int, vocab: int, seed: int) -> list[int]:
    """A prompt of its own per (round, length): no two share a first block."""
    rng = random.Random(seed * 1_000_003 + round_ * 100_003 + length)
    return [rng.randrange(10, vocab) for _ in range(length)]


def run(args: argparse.Namespace) -> int:
    from stagemesh.bench.ceilings import memcpy_bandwidth

    model = kv_model_dir(args.model)
    planes = [t for t in args.transport.split(",") if t]
    lengths = [int(n) for n in args.prompt_len.split(",") if n]
    rounds = max(1, args.rounds)
    if not planes or not lengths:
        raise SystemExit("--transport and --prompt-len need at least one value each")
    load_start = os.getloadavg()
    meshes: dict[str, Mesh] = {}
    times: dict[str, dict[int, list[float]]] = {t: {n: [] for n in lengths} for t in planes}
    sent: dict[int, int] = {}
    try:
        for t in planes:
            meshes[t] = _start(args, model, t)
        info = _info(meshes[planes[0]].replicas[0][0])
        bad = [n for n in lengths if n <= 0 or n % info.kv_block_size or n >= info.max_model_len]
        if bad:
            raise SystemExit(f"--prompt-len {bad}: prompt lengths must be whole KV blocks of "
                             f"{info.kv_block_size} tokens, under {info.max_model_len}")
        for t in planes:  # warm-up round, not measured: data planes learnt, first-use costs paid
            a, b = meshes[t].replicas
            for n in lengths:
                _transfer(a[0], b, prompt(n, -1, info.vocab_size, args.seed), t, info.kv_block_size)
        for r in range(rounds):
            for t in (planes if r % 2 == 0 else planes[::-1]):
                a, b = meshes[t].replicas
                for n in lengths:
                    secs, nbytes = _transfer(a[0], b, prompt(n, r, info.vocab_size, args.seed), t,
                                             info.kv_block_size)
                    times[t][n].append(secs)
                    if sent.setdefault(n, nbytes) != nbytes:
                        raise RuntimeError(f"{t}: {nbytes} bytes sent for {n} tokens, {sent[n]} before")
                    print(f"round {r} {t} {n} tokens: {nbytes / 1e6:.1f} MB in {secs * 1e3:.1f} ms",
                          file=sys.stderr, flush=True)
    finally:
        for mesh in meshes.values():
            mesh.stop()
    memcpy = {n: memcpy_bandwidth(nbytes) for n, nbytes in sent.items()}
    report: dict = {
        "command": shlex.join(["stagemesh", *sys.argv[1:]]), "model": model, "rounds": rounds,
        "threads": args.threads, "pool": "cold" if args.cold_pool else "prefaulted",
        "block_size": info.kv_block_size, "kv_bytes_per_token": sent[lengths[0]] // lengths[0],
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "runs": [],
    }
    for t in planes:
        for n in lengths:
            gbs = [sent[n] / s / 1e9 for s in times[t][n]]
            report["runs"].append({
                "transport": t, "prompt_len": n, "blocks": n // info.kv_block_size, "bytes": sent[n],
                "seconds_p50": round(statistics.median(times[t][n]), 5), "gb_s": round(statistics.median(gbs), 3),
                "rounds_gb_s": [round(g, 3) for g in gbs], "memcpy_gb_s": round(memcpy[n] / 1e9, 2),
                "of_memcpy": round(statistics.median(gbs) / (memcpy[n] / 1e9), 3)})
    if "ucx" in planes and "grpc" in planes:
        by = {(r["transport"], r["prompt_len"]): r["gb_s"] for r in report["runs"]}
        report["ucx_over_grpc"] = {str(n): round(by["ucx", n] / by["grpc", n], 2) for n in lengths}
    print(json.dumps(report) if args.json else format_table(report), flush=True)
    return 0


def _start(args: argparse.Namespace, model: str, transport: str) -> Mesh:
    """Two one-stage replicas (A, B) on ``transport``, no gateway."""
    from stagemesh.launcher import MeshSpec, start_mesh

    spec = MeshSpec(model=model, layer_splits=[(0, _num_layers(model))], dp=2, threads=args.threads,
                    gateway=False, kv_cache_memory=args.kv_cache_memory, transport=transport,
                    extra_stage_args=[] if args.cold_pool else ["--kv-prefault"])
    return start_mesh(spec, f"stagemesh-bench-kv-{transport.replace(':', '-')}-")


def _num_layers(model: str) -> int:
    from stagekit.config.model_config import load_model_config

    return load_model_config(model).num_layers


def _info(head: str) -> stage_pb2.StageInfo:
    import grpc

    from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc

    with grpc.insecure_channel(head) as ch:
        return stage_pb2_grpc.StageStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=10)


def _transfer(head: str, destination: list[str], tokens: list[int], plane: str, block_size: int) -> tuple[float, int]:
    """Compute ``tokens`` on ``head``'s replica, then export their KV to ``destination``:
    (seconds of the ExportKv call, bytes sent). Raises unless every block went over ``plane``."""
    import grpc

    from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc

    with grpc.insecure_channel(head) as ch:
        stub = stage_pb2_grpc.StageStub(ch)
        req = stage_pb2.GenerateRequest(request_id=f"kv-bench-{time.monotonic_ns()}", prompt_token_ids=tokens,
                                        sampling=common_pb2.SamplingParams(max_tokens=1))
        for _ in stub.Generate(req, timeout=900):
            pass
        t0 = time.perf_counter()
        reply = stub.ExportKv(stage_pb2.ExportKvRequest(token_ids=tokens, destination=destination), timeout=300)
        took = time.perf_counter() - t0
    want = len(tokens) // block_size
    if reply.transport != plane.split(":")[0] or reply.num_blocks_sent != want or reply.bytes_sent <= 0:
        raise RuntimeError(f"{plane}: expected {want} blocks over {plane}, the export sent {reply.num_blocks_sent} "
                           f"blocks ({reply.bytes_sent} bytes) over {reply.transport or 'nothing'}")
    return took, reply.bytes_sent


def format_table(report: dict) -> str:
    """The report as a markdown table, with the command line and load average."""
    ratios = report.get("ucx_over_grpc", {})
    lines = [f"`{report['command']}`", "",
             f"model {report['model']}: {report['kv_bytes_per_token'] / 1024:.0f} KiB of KV per token, blocks of "
             f"{report['block_size']}; KV pool {report['pool']}; threads {report['threads']}; "
             f"median of {report['rounds']} round(s)", "",
             "| transport | prompt tokens | blocks | MB | ExportKv ms | GB/s | memcpy GB/s | of memcpy | ucx ÷ grpc "
             "| rounds GB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        ratio = ratios.get(str(r["prompt_len"])) if r["transport"].startswith("ucx") else None
        per_round = ", ".join(f"{g:.2f}" for g in r["rounds_gb_s"])
        lines.append(f"| {r['transport']} | {r['prompt_len']} | {r['blocks']} | {r['bytes'] / 1e6:.1f} "
                     f"| {r['seconds_p50'] * 1e3:.1f} | {r['gb_s']:.2f} | {r['memcpy_gb_s']:.2f} "
                     f"| {r['of_memcpy']:.2f} | {'' if ratio is None else f'{ratio:.2f}'} | {per_round} |")
    la = report["load_average"]
    lines += ["", f"load average: start {la['start']}, end {la['end']}"]
    return "\n".join(lines)
