"""``stagemesh bench profile``: where a decode step's time goes, by category, at fixed batch sizes.

A one-stage replica head (engine, stage runtime, TP executor, model runner: the objects a
stage process builds) runs in this process on a deterministic workload: ``B`` fixed prompts
admitted at once, greedy, ``ignore_eos``, exactly ``--output-len`` tokens each. Each batch
size runs ``--rounds`` times two runs: one with only the engine's marks (the step time a
client sees, without instrumentation), one with every module of the model timed
(``step_clock.StepClock``); the table averages the decode steps of the timed runs, beside
the step time of the others.
``--mesh`` adds what sits outside a step: the per-token cost of the gateway and, with
``pp2``, of the data plane between two stages (``stream_overhead``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import nn

from stagemesh.bench.step_clock import CATEGORIES, StepClock, StepRecord

if TYPE_CHECKING:
    from stagekit.engine.engine import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: a demo model of --model-size)")
    p.add_argument("--model-size", default="small", choices=["tiny", "small"],
                   help="demo model size when --model is not given (small: ~125M Llama)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64, help="tokens per request: the decode steps measured")
    p.add_argument("--threads", type=int, default=2, help="torch threads per rank")
    p.add_argument("--tp", type=int, default=1, help="TP ranks of the stage (rank 0 is timed)")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV cache per rank")
    p.add_argument("--mesh", default="pp1",
                   help="comma-separated meshes for the costs outside a step: pp1 (gateway vs a direct "
                        "Stage.Generate stream), pp2 (adds a two-stage pipeline: the data plane); none to skip")
    p.add_argument("--trace", default="", help="also write a torch.profiler Chrome trace of a few batch-1 steps here, "
                                               "with the categories as record_function ranges")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per batch size, each a run without and a run with the module timers (alternating, "
                        "so that drift in the machine's load falls on both); figures average over all (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from stagekit.config.model_config import load_model_config
    from stagekit.errors import ConfigError
    from stagemesh.bench.serving import _model_dir
    from stagemesh.cli.sizes import parse_bytes

    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        raise ConfigError(f"--batch {args.batch!r}: expected comma-separated integers, e.g. 1,8") from None
    meshes = [m for m in args.mesh.split(",") if m and m != "none"]
    if not batches or min(batches) < 1 or args.output_len < 4 or args.prompt_len < 1 or args.rounds < 1:
        raise ConfigError("--batch sizes must be >= 1, --output-len >= 4, --prompt-len >= 1 and --rounds >= 1")
    if set(meshes) - {"pp1", "pp2"}:
        raise ConfigError(f"--mesh {args.mesh!r}: expected pp1, pp2 or none")
    model = _model_dir(args)
    cfg = load_model_config(model)
    load_start = os.getloadavg()
    report: dict = {"model": model, "num_layers": cfg.num_layers, "tp": args.tp, "threads": args.threads,
                    "prompt_len": args.prompt_len, "output_len": args.output_len}
    report |= profile_steps(model, cfg.num_layers, cfg.vocab_size, tp=args.tp, threads=args.threads,
                            kv_bytes=parse_bytes(args.kv_cache_memory), batches=batches, prompt_len=args.prompt_len,
                            output_len=args.output_len, seed=args.seed, trace=args.trace, rounds=args.rounds)
    if meshes:
        from stagemesh.bench.stream_overhead import measure_meshes

        report["streams"] = measure_meshes(model, cfg, meshes, args.threads, args.kv_cache_memory, args.prompt_len,
                                           args.output_len)
    report["load_average"] = {"start": [round(x, 2) for x in load_start],
                              "end": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps(report))
    else:
        from stagemesh.bench.profile_table import format_profile

        sys.stdout.write(format_profile(report))
    return 0


def profile_steps(model: str, num_layers: int, vocab_size: int, *, tp: int, threads: int, kv_bytes: int,
                  batches: list[int], prompt_len: int, output_len: int, seed: int = 0, trace: str = "",
                  rounds: int = 1) -> dict:
    """The step profile of each batch size on a head built in this process, with the weight
    bytes a step streams and the read bandwidth measured right after (same thread count)."""
    from stagemesh.bench.read_bandwidth import read_bandwidth

    out: dict = {"batches": []}
    head = HeadUnderTest(model, num_layers, tp, threads, kv_bytes)
    try:
        out["weight_bytes"] = weight_bytes(head.model)
        out["expert_bytes"] = expert_bytes(head.model)
        asyncio.run(_measure(head, vocab_size, batches, prompt_len, output_len, seed, trace, rounds, out))
    finally:
        head.close()
    out["read_bandwidth_gb_s"] = round(read_bandwidth(threads) / 1e9, 2)
    for row in out["batches"]:
        row["matmul_vs_bandwidth"] = round(row["matmul_gb_s"] / out["read_bandwidth_gb_s"], 3)
    return out


async def _measure(head: HeadUnderTest, vocab: int, batches: list[int], prompt_len: int, output_len: int,
                   seed: int, trace: str, rounds: int, out: dict) -> None:
    from stagemesh.bench.serving import _prompts

    await head.start()
    try:
        await head.generate(_prompts(1, 16, vocab, 99), 4)  # warm-up
        for b in batches:
            prompts = _prompts(b, prompt_len, vocab, seed)
            plain: list[StepRecord] = []
            timed: list[StepRecord] = []
            for _ in range(rounds):
                for records, modules in ((plain, False), (timed, True)):
                    clock = StepClock()
                    await head.generate(prompts, output_len, clock, modules)
                    records += decode_steps(b, clock.records)
            out["batches"].append(summarize(b, plain, timed, out["weight_bytes"]))
        if trace:
            out["trace"] = trace
            out["trace_top_ops"] = await head.trace(_prompts(1, prompt_len, vocab, seed), trace)
    finally:
        await head.stop()


class HeadUnderTest:
    """A one-stage replica head built in this process the way a stage process builds it (its
    own compute thread, its TP worker processes); ``close`` stops the workers."""

    def __init__(self, model: str, num_layers: int, tp: int, threads: int, kv_bytes: int) -> None:
        from stagekit.engine.stage_runtime import StageRuntime, start_executor
        from stagekit.engine.stage_spec import StageSpec

        spec = StageSpec(model, 0, num_layers, tp_size=tp, num_threads=threads, kv_cache_memory_bytes=kv_bytes,
                         show_progress=False)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="stage-compute")
        self.runtime = StageRuntime(self.pool.submit(start_executor, spec).result())
        self.model: nn.Module = self.runtime.executor.runner.model
        self.engine: Engine | None = None
        self._ids = itertools.count()

    async def start(self) -> None:
        """The engine, on the running loop (one for every run: its sequence ids and the stage's
        per-sequence state must not restart)."""
        from stagekit.engine.engine import Engine
        from stagekit.transport.grpc.transport import GrpcTransport

        self.engine = Engine(self.runtime, GrpcTransport(), self.pool)  # one stage: no data plane is used
        self.engine.start()

    async def generate(self, prompts: list[list[int]], output_len: int, clock: StepClock | None = None,
                       modules: bool = False) -> None:
        """All ``prompts`` at once, greedy, ``output_len`` tokens each; timed by ``clock`` when given."""
        from stagekit.types.sampling_params import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        engine = self.engine
        assert engine is not None, "start() first"

        async def one(prompt: list[int]) -> None:
            async for _ in engine.generate(f"profile-{next(self._ids)}", prompt, params):
                pass

        if clock is not None:
            attach(clock, engine, modules)
        try:
            await asyncio.gather(*(one(p) for p in prompts))
        finally:
            if clock is not None:
                clock.detach()

    async def trace(self, prompts: list[list[int]], path: str, tokens: int = 17) -> list[dict]:
        """A torch.profiler Chrome trace of ``tokens`` greedy tokens (categories as ranges) written
        to ``path``; returns the aten ops that took the most time, per generated token (the
        prompt's prefill step included)."""
        # the profiler records the thread it was started on: the compute thread, where the step runs
        loop = asyncio.get_running_loop()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        await loop.run_in_executor(self.pool, prof.__enter__)
        try:
            await self.generate(prompts, tokens, StepClock(trace=True), modules=True)
        finally:
            await loop.run_in_executor(self.pool, prof.__exit__, None, None, None)
        prof.export_chrome_trace(path)
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::") or e.key.startswith("mkldnn::")]
        ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        return [{"op": e.key, "calls_per_token": round(e.count / tokens, 1),
                 "self_ms_per_token": round(e.self_cpu_time_total / 1000 / tokens, 3)} for e in ops[:15]]

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()

    def close(self) -> None:
        self.pool.submit(self.runtime.shutdown).result()
        self.pool.shutdown(wait=True)


def attach(clock: StepClock, engine: object, modules: bool) -> None:
    """Time ``engine``'s steps (marks and the engine-side categories); with ``modules``, also
    every category inside the compute thread."""
    sch, runtime = engine.scheduler, engine.runtime  # type: ignore[attr-defined]
    clock.step_boundary(sch)
    clock.wrap(sch, "postprocess", "scheduler")
    clock.mark(sch, "postprocess", "post_start", "post_end")
    clock.wrap(runtime, "process", "runtime")
    clock.mark(runtime, "process", "process_start", "process_end")
    if not modules:
        return
    runner = runtime.executor.runner
    clock.wrap(runner, "run", "step_setup")
    if runtime.sampler is not None:
        clock.wrap(runtime.sampler, "sample", "sampling")
    if runner.groups.tp.world_size > 1:
        for name in ("all_reduce", "all_gather"):
            clock.wrap(runner.groups.tp, name, "tp_comm")
    from stagekit.models import fused_decode

    clock.wrap(fused_decode, "run", "fused_layer")   # llama.py calls it through the module: a decode step's layers
    model = runner.model
    for m in model.modules():
        category = module_category(m)
        if category:
            clock.hook(m, category)
    clock.hook(model, "layer_glue")   # what no category below it claims: the layer loop, views, splits
    clock.wrap(model, "compute_logits", "layer_glue")
    if hasattr(model, "lm_head"):
        clock.wrap(model.lm_head, "compute_logits", "lm_head")


def module_category(m: nn.Module) -> str:
    from stagekit.layers.activation import SiluAndMul
    from stagekit.layers.attention import Attention
    from stagekit.layers.cpu_packed import PackedWeight
    from stagekit.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from stagekit.layers.linear import ReplicatedLinear
    from stagekit.layers.moe import FusedMoE
    from stagekit.layers.norm import RMSNorm
    from stagekit.layers.rotary import RotaryEmbedding

    if isinstance(m, ParallelLMHead):
        return ""  # called through compute_logits, timed there
    for cls, category in ((VocabParallelEmbedding, "embed"), (PackedWeight, "matmul"), (ReplicatedLinear, "matmul"),
                          (Attention, "attention"), (RMSNorm, "norm"), (RotaryEmbedding, "rope"),
                          (SiluAndMul, "act"), (FusedMoE, "moe")):
        if isinstance(m, cls):
            return category
    return ""


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the projection weights a decode step streams (packed or dense), LM head included."""
    total = 0
    for m in model.modules():
        if module_category(m) == "matmul" or m is getattr(model, "lm_head", None):
            cpu = getattr(m, "cpu_weight", None)   # CPU-packed: panels or oneDNN's layout
            total += m.weight.numel() * m.weight.element_size() if cpu is None else cpu.nbytes
    return total


def expert_bytes(model: nn.Module) -> int:
    """Bytes of the MoE experts' weights (packed or dense), all experts of the stage: not in
    ``weight_bytes``, since a step streams only those of the experts its tokens pick."""
    from stagekit.layers.moe_experts import ExpertWeights

    total = 0
    for m in model.modules():
        if isinstance(m, ExpertWeights):
            packed = m.packed_weights()
            if packed:
                total += sum(w.nbytes for pair in packed for w in pair)
            else:
                total += sum(t.numel() * t.element_size() for t in (m.w13_weight, m.w2_weight))
    return total


def decode_steps(batch: int, records: list[StepRecord], skip: int = 2) -> list[StepRecord]:
    """The decode steps of all ``batch`` sequences of one run; its first ``skip`` decode steps
    warm up shapes and are left out when there are more."""
    steps = [r for r in records if r.decode and r.num_seqs == batch]
    return steps[skip:] if len(steps) > skip else steps


def summarize(batch: int, plain: list[StepRecord], timed: list[StepRecord], nbytes: int) -> dict:
    """Mean ms per decode step by category over the decode steps of ``batch`` sequences."""
    if not plain or not timed:
        raise RuntimeError(f"batch {batch}: no decode step ran with all {batch} sequences")
    cats = {c: 1000 * sum(r.seconds.get(c, 0.0) for r in timed) / len(timed) for c in CATEGORIES}
    profiled = 1000 * statistics.mean(r.wall for r in timed)
    step = 1000 * statistics.mean(r.wall for r in plain)
    # a fused layer's matmuls cannot be timed apart from its glue and attention: with it on, this is
    # the weights' streaming rate over the time of the calls that stream them (a lower bound)
    matmul_ms = cats["matmul"] + cats["lm_head"] + cats["fused_layer"]
    return {
        "batch": batch, "decode_steps": len(timed),
        "step_ms": round(step, 3), "step_ms_median": round(1000 * statistics.median(r.wall for r in plain), 3),
        "decode_tok_s": round(batch * 1000 / step, 2),
        "profiled_step_ms": round(profiled, 3),
        "categories": {c: {"ms": round(ms, 3), "pct": round(100 * ms / profiled, 1)} for c, ms in cats.items()},
        "compute_thread_ms": round(1000 * statistics.mean(r.marks["process_end"] - r.marks["process_start"]
                                                          for r in timed), 3),
        "matmul_gb_s": round(nbytes / (matmul_ms / 1000) / 1e9, 2) if matmul_ms > 0 else 0.0,
    }
