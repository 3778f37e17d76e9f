"""A CPU decode step with the fused decoder layer (one native call per layer) against the unfused
layers (torch ops and one kernel call per projection), per batch size.

One stage holds the whole demo Llama (``--size small``: the ~125M model, 12 layers) in-process,
with its real ModelRunner (embedding, layers, final norm, LM head, logits); every sequence is
prefilled with ``--prompt`` tokens, then decode steps run with the fused layer on and off in
turns (``--rounds`` each), so drift on a shared machine hits both alike; the table gives the
median wall ms per step, the median process CPU ms per step, and their ratios.
``--linear-kernel`` and ``--weight-dtype`` are the stage's.

    stagemesh bench layer [--batch 1,8] [--rounds 20] [--prompt 128] [--threads 0]
                          [--linear-kernel panel] [--weight-dtype float16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.engine.model_runner import ModelRunner
from stagekit.engine.stage_spec import StageSpec
from stagekit.kernels.fused_layer import native_available
from stagekit.models.fused_decode import ENV
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.types.step import SeqSlice, StepHeader, StepInputs

BLOCK = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes (default 1,8)")
    p.add_argument("--rounds", type=int, default=20, help="timed steps per mode and batch size (default 20)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--size", default="small", choices=["tiny", "small"], help="demo Llama size (default small)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--linear-kernel", default="panel", choices=["auto", "panel"],
                   help="the stage's --linear-kernel (default panel)")
    p.add_argument("--weight-dtype", default="", choices=["", "float16", "bfloat16"],
                   help="the stage's --weight-dtype (default: fp32 weights)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _step(runner: ModelRunner, seqs: list[SeqSlice], ids: list[int], fused: bool) -> tuple[float, float]:
    """Wall and process CPU ms of one step (on a loaded machine the CPU time of a one-thread run
    is the steadier measure of the work; spinning OpenMP threads count in it too)."""
    os.environ[ENV] = "1" if fused else "0"
    t0, c0 = time.perf_counter(), time.process_time()
    runner.run(StepInputs(StepHeader(0, seqs), input_ids=ids))
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def measure(runner: ModelRunner, batches: list[int], rounds: int, prompt: int) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    next_block, seq_id = 0, 0
    for b in batches:
        need = -(-(prompt + 2 * rounds + 4) // BLOCK)
        seqs = []
        for _ in range(b):
            seqs.append(SeqSlice(seq_id, 0, prompt, new_blocks=tuple(range(next_block, next_block + need))))
            seq_id, next_block = seq_id + 1, next_block + need
        gen = torch.Generator().manual_seed(b)
        runner.run(StepInputs(StepHeader(0, seqs), input_ids=torch.randint(0, 1000, (b * prompt,),
                                                                             generator=gen).tolist()))
        times: dict[str, list[float]] = {k: [] for k in ("unfused", "fused", "unfused_cpu", "fused_cpu")}
        pos = prompt
        for r in range(rounds + 1):
            for mode in ("unfused", "fused"):
                dec = [SeqSlice(s.seq_id, pos, 1) for s in seqs]
                wall, cpu = _step(runner, dec, [(pos * 31 + i) % 1000 for i in range(b)], mode == "fused")
                pos += 1
                if r:  # round 0 warms both paths up
                    times[mode].append(wall)
                    times[mode + "_cpu"].append(cpu)
        freed = [s.seq_id for s in seqs]
        runner.kv_cache.apply([], freed, [])
        next_block = 0
        out[b] = {mode: statistics.median(t) for mode, t in times.items()}
    os.environ.pop(ENV, None)
    return out


def run(args: argparse.Namespace) -> int:
    if not native_available():
        print("the fused layer needs the native kernels (a C compiler); nothing to compare")
        return 1
    batches = [int(s) for s in args.batch.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_demo_model(tmp, arch="llama", size=args.size)
        cfg = load_model_config(str(path))
        # sequences of one batch size are freed before the next: room for the largest batch
        tokens = max(batches) * (args.prompt + 2 * args.rounds + 4 * BLOCK)
        spec = StageSpec(str(path), 0, cfg.num_layers, num_threads=args.threads, show_progress=False,
                         linear_kernel=args.linear_kernel, weight_dtype=args.weight_dtype,
                         kv_cache_memory_bytes=tokens * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4)
        runner = ModelRunner(spec, ParallelGroups(tp=GroupCoordinator([0], 0)))
        result = measure(runner, batches, max(1, args.rounds), max(1, args.prompt))
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "ms_per_step": result}))
        return 0
    print(f"median ms per decode step (whole stage: layers, final norm, LM head), {torch.get_num_threads()} threads, "
          f"--linear-kernel {args.linear_kernel}{' --weight-dtype ' + args.weight_dtype if args.weight_dtype else ''}")
    print(f"{'batch':>5} {'unfused':>9} {'fused':>9} {'speed-up':>9}   CPU ms: {'unfused':>9} {'fused':>9} "
          f"{'ratio':>6}")
    for b, r in result.items():
        print(f"{b:>5} {r['unfused']:>9.2f} {r['fused']:>9.2f} {r['unfused'] / r['fused']:>8.2f}x   "
              f"        {r['unfused_cpu']:>9.2f} {r['fused_cpu']:>9.2f} {r['unfused_cpu'] / r['fused_cpu']:>5.2f}x")
    return 0
