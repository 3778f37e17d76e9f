"""Decode steps of a whole model per linear-kernel configuration: oneDNN fp32, the panel GEMM
in fp32 and with fp16 / bf16 weights (``--configs``), at each batch size.

One ModelRunner per configuration (TP1, all layers, in this process) over the same checkpoint;
each batch first prefills ``--prompt-len`` tokens per sequence, then the configurations take
turns, one decode step each per round (``--steps`` rounds), so drift on a shared machine hits
them alike. A step is ``ModelRunner.run``: every layer, the KV writes, attention and the LM
head's logits for the batch (no sampling, scheduler or RPC). The table gives each
configuration's median ms per step and the tokens per second that makes.

    stagemesh bench decode --model DIR [--batch 1,8] [--prompt-len 128] [--steps 32] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stagekit.engine.model_runner import ModelRunner

# name -> (--linear-kernel, --weight-dtype)
CONFIGS = {"onednn": ("onednn", ""), "dense": ("dense", ""), "panel": ("panel", ""), "auto": ("auto", ""),
           "panel_f16": ("panel", "float16"), "panel_bf16": ("panel", "bfloat16")}
BLOCK = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (e.g. stagemesh demo-model DIR --size small)")
    p.add_argument("--configs", default="onednn,panel,panel_f16",
                   help=f"comma-separated, of {', '.join(CONFIGS)} (default onednn,panel,panel_f16)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens prefilled per sequence (default 128)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per configuration and batch (default 32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _decode(runners: dict[str, ModelRunner], batch: int, prompt_len: int, steps: int, first_id: int
            ) -> dict[str, float]:
    from stagekit.types.step import SeqSlice, StepHeader, StepInputs

    seq_ids = list(range(first_id, first_id + batch))
    blocks_per_seq = -(-(prompt_len + steps) // BLOCK)
    tables = {s: tuple(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i, s in enumerate(seq_ids)}
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(3, 200, (batch * prompt_len,), generator=gen).tolist()
    prefill = StepHeader(0, [SeqSlice(s, 0, prompt_len, True, tables[s]) for s in seq_ids])
    for r in runners.values():
        r.run(StepInputs(prefill, input_ids=prompt))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(steps):
        header = StepHeader(step + 1, [SeqSlice(s, prompt_len + step, 1) for s in seq_ids])
        ids = [7 + step] * batch
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.run(StepInputs(header, input_ids=ids))
            times[name].append((time.perf_counter() - t0) * 1e3)
    done = StepHeader(steps + 1, [], freed_seq_ids=seq_ids)
    for r in runners.values():
        r.run(StepInputs(done))
    return {name: statistics.median(t[2:] or t) for name, t in times.items()}  # first steps warm oneDNN up


def run(args: argparse.Namespace) -> int:
    # the model stack is imported here, not when the CLI builds its parser
    from stagekit.config.model_config import load_model_config
    from stagekit.engine.model_runner import ModelRunner
    from stagekit.engine.stage_spec import StageSpec
    from stagekit.kv.kv_cache import PagedKVCache
    from stagekit.parallel.parallel_groups import ParallelGroups
    from stagekit.parallel.parallel_world import ParallelWorld

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; allowed: {', '.join(CONFIGS)}")
    batches = [int(b) for b in args.batch.split(",") if b]
    result: dict[int, dict[str, float]] = {}
    cfg = load_model_config(args.model)
    blocks = max(batches) * -(-(args.prompt_len + args.steps) // BLOCK)
    kv_bytes = blocks * PagedKVCache.bytes_per_block(cfg.num_layers, max(1, cfg.num_kv_heads), cfg.head_dim,
                                                     torch.float32, BLOCK)
    with ParallelWorld(0, 1, "") as world:
        groups = ParallelGroups(tp=world.new_group(range(1)))
        runners = {}
        for name in names:
            kernel, wdtype = CONFIGS[name]
            spec = StageSpec(args.model, 0, cfg.num_layers, num_threads=torch.get_num_threads(), show_progress=False,
                             linear_kernel=kernel, weight_dtype=wdtype, kv_cache_memory_bytes=kv_bytes)
            runners[name] = ModelRunner(spec, groups)
        for i, b in enumerate(batches):
            result[b] = _decode(runners, b, args.prompt_len, args.steps, first_id=1000 * (i + 1))
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "ms_per_step": result}))
        return 0
    print(f"median ms per decode step (tok/s), {torch.get_num_threads()} threads, prompt {args.prompt_len}")
    print(f"{'batch':>5} " + " ".join(f"{n:>18}" for n in names))
    for b, row in result.items():
        print(f"{b:>5} " + " ".join(f"{row[n]:>8.2f} ({b * 1e3 / row[n]:>6.1f})" for n in names))
    return 0

