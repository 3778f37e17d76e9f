"""The linear kernels of a CPU decode step: oneDNN packed fp32 against the panel GEMM in fp32,
fp16 and bf16, on a whole model's weight set, per token count M.

The weights are random with the shapes of the ``small`` demo Llama (12 layers: qkv, o,
gate_up, down; and the LM head; ~100M parameters, 400 MB in fp32), each projection a separate
tensor so every pass streams the whole set from memory as a decode step does. For each M the
kernels run in turns (one pass each per round, ``--rounds`` rounds) so drift on a shared
machine hits them alike; the table gives each kernel's median ms per pass and the last column
the crossover verdict (which fp32 kernel is faster at that M).

    stagemesh bench gemm [--m 1,2,4,8,16,32,64] [--rounds 15] [--threads 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from stagekit.kernels.panel_gemm import native_available, pack_panels, panel_gemm
from stagekit.layers.cpu_packed import pack_linear_weight, packed_linear, packing_supported

# (out, in) of each projection of one layer of the small demo Llama, and its LM head
LAYER_SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)]
HEAD_SHAPE = (32000, 768)
LAYERS = 12


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--m", default="1,2,4,8,16,32,64", help="comma-separated token counts (default 1,2,4,8,16,32,64)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per token count (default 15)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--layers", type=int, default=LAYERS, help=f"decoder layers' worth of weights (default {LAYERS})")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _kernels(shapes: list[tuple[int, int]]) -> dict[str, Callable[[dict[int, torch.Tensor]], None]]:
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes]
    kernels: dict[str, Callable[[dict[int, torch.Tensor]], None]] = {}
    if packing_supported(dense[0]):
        packed = [pack_linear_weight(w) for w in dense]
        kernels["onednn_f32"] = lambda xs: [packed_linear(xs[w.shape[1]], w) for w in packed] and None
    if native_available():
        for name, dtype in (("panel_f32", torch.float32), ("panel_f16", torch.float16),
                            ("panel_bf16", torch.bfloat16)):
            panels = [(pack_panels(w, dtype)[0], w.shape[0]) for w in dense]
            kernels[name] = (lambda ps: lambda xs: [panel_gemm(xs[p.shape[1]], p, n) for p, n in ps] and None)(panels)
    return kernels


def measure(ms: list[int], rounds: int, layers: int) -> dict[int, dict[str, float]]:
    kernels = _kernels(LAYER_SHAPES * layers + [HEAD_SHAPE])
    out: dict[int, dict[str, float]] = {}
    for m in ms:
        xs = {k: torch.randn(m, k) for k in {k for _, k in LAYER_SHAPES + [HEAD_SHAPE]}}
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for f in kernels.values():  # warm-up: oneDNN builds its primitive for this M
            f(xs)
        for _ in range(rounds):
            for name, f in kernels.items():
                t0 = time.perf_counter()
                f(xs)
                times[name].append((time.perf_counter() - t0) * 1e3)
        out[m] = {name: statistics.median(t) for name, t in times.items()}
    return out


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ms = [int(s) for s in args.m.split(",") if s]
    result = measure(ms, max(1, args.rounds), max(1, args.layers))
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "ms_per_pass": result}))
        return 0
    names = list(next(iter(result.values())))
    print(f"median ms per pass over the weight set, {torch.get_num_threads()} threads")
    print(f"{'M':>4} " + " ".join(f"{n:>11}" for n in names) + "  faster fp32")
    for m, row in result.items():
        verdict = ""
        if "onednn_f32" in row and "panel_f32" in row:
            verdict = "panel" if row["panel_f32"] <= row["onednn_f32"] else "onednn"
        print(f"{m:>4} " + " ".join(f"{row[n]:>11.2f}" for n in names) + f"  {verdict}")
    return 0
