"""The linear kernels of a CPU decode step: oneDNN packed fp32 against the panel GEMM in fp32,
fp16 and bf16, on a whole model's weight set, per token count M.

The weights are random with the shapes of the ``small`` demo Llama (12 layers: qkv, o,
gate_up, down; and the LM head; ~100M parameters, 400 MB in fp32), each projection a separate
tensor so every pass streams the whole set from memory as a decode step does. For each M the
kernels run in turns (one pass each per round, ``--rounds`` rounds) so drift on a shared
machine hits them alike; the table gives each kernel's median wall-clock ms per pass, the median CPU ms of the
process in it (which a busy machine's waits for a core do not inflate), and which fp32
kernel was faster at that M.

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


def measure(ms: list[int], rounds: int, layers: int, report: Callable[[int, dict], None] | None = None
            ) -> dict[int, dict[str, dict[str, float]]]:
    """Per M and kernel: the median wall-clock ms of a pass and the median CPU ms the process
    spent in it (all threads; on a shared machine the time a thread waited for a core shows in
    the first only)."""
    kernels = _kernels(LAYER_SHAPES * layers + [HEAD_SHAPE])
    out: dict[int, dict[str, dict[str, float]]] = {}
    for m in ms:
        xs = {k: torch.randn(m, k) for k in {k for _, k in LAYER_SHAPES + [HEAD_SHAPE]}}
        wall: dict[str, list[float]] = {name: [] for name in kernels}
        cpu: dict[str, list[float]] = {name: [] for name in kernels}
        for f in kernels.values():  # warm-up: oneDNN builds its primitive for this M
            f(xs)
        for _ in range(rounds):
            for name, f in kernels.items():
                c0, t0 = time.process_time(), time.perf_counter()
                f(xs)
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
        out[m] = {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])}
                  for name in kernels}
        if report is not None:
            report(m, out[m])
    return out


def _row(m: int, row: dict[str, dict[str, float]]) -> None:
    verdict = ""
    if "onednn_f32" in row and "panel_f32" in row:
        verdict = "panel" if row["panel_f32"]["wall_ms"] <= row["onednn_f32"]["wall_ms"] else "onednn"
    print(f"{m:>4} " + " ".join(f"{r['wall_ms']:>8.2f} ({r['cpu_ms']:>7.2f})" for r in row.values())
          + f"  {verdict}", flush=True)


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ms = [int(s) for s in args.m.split(",") if s]
    if not args.json:
        print(f"median ms per pass over the weight set: wall (CPU), {torch.get_num_threads()} threads")
        print(f"{'M':>4} " + " ".join(f"{n:>19}" for n in ("onednn_f32", "panel_f32", "panel_f16", "panel_bf16"))
              + "  faster fp32 (wall)", flush=True)
    result = measure(ms, max(1, args.rounds), max(1, args.layers), None if args.json else _row)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "ms_per_pass": result}))
    return 0
