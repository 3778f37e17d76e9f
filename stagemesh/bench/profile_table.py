"""The plain-text table of ``stagemesh bench profile``: ms per decode step and share of the
step by category, a column pair per batch size, then what sits outside a step."""

from __future__ import annotations

from stagemesh.bench.step_clock import CATEGORIES, COMPUTE


def format_profile(report: dict) -> str:
    rows = report["batches"]
    lines = [f"model {report['model']}  layers {report['num_layers']}  tp {report['tp']}  threads {report['threads']}"
             f"  prompt {report['prompt_len']} -> {report['output_len']} tokens (greedy, ignore_eos)",
             f"{'':38}" + "".join(f"{'batch ' + str(r['batch']):>17}" for r in rows),
             f"{'ms per decode step':38}" + "".join(f"{'ms':>10}{'%':>7}" for _ in rows)]

    def line(label: str, values: list[tuple[float, float | None]]) -> str:
        cells = "".join(f"{ms:>10.2f}" + (f"{pct:>7.1f}" if pct is not None else f"{'':>7}") for ms, pct in values)
        return f"{label:38}{cells}"

    for c, label in CATEGORIES.items():
        values = [(r["categories"][c]["ms"], r["categories"][c]["pct"]) for r in rows]
        if any(ms > 0 for ms, _ in values):
            lines.append(line(f"  {label}", values))
    compute = [sum(r["categories"][c]["ms"] for c in COMPUTE) for r in rows]
    lines += [
        line("compute thread", [(ms, 100 * ms / r["profiled_step_ms"]) for ms, r in zip(compute, rows, strict=True)]),
        line("event loop side", [(r["profiled_step_ms"] - ms, 100 - 100 * ms / r["profiled_step_ms"])
                                 for ms, r in zip(compute, rows, strict=True)]),
        line("step, profiled (sum of the above)", [(r["profiled_step_ms"], 100.0) for r in rows]),
        line("step, not profiled (mean)", [(r["step_ms"], None) for r in rows]),
        line("step, not profiled (median)", [(r["step_ms_median"], None) for r in rows]),
        f"{'decode tokens/s, not profiled':38}" + "".join(f"{r['decode_tok_s']:>10.1f}{'':>7}" for r in rows),
        f"{'weight streaming GB/s in matmuls':38}" + "".join(
            f"{r['matmul_gb_s']:>10.1f}{100 * r['matmul_vs_bandwidth']:>6.0f}%" for r in rows),
        f"weights {report['weight_bytes'] / 1e6:.1f} MB per step; read bandwidth {report['read_bandwidth_gb_s']} GB/s "
        f"(torch sum, {report['threads']} threads); steps averaged: " + ", ".join(str(r["decode_steps"]) for r in rows),
        ]
    if report.get("expert_bytes"):
        lines.append(f"MoE experts {report['expert_bytes'] / 1e6:.1f} MB in all, not in the weights above (timed under "
                     "MoE routing/experts; a step streams the experts its tokens pick)")
    for s in report.get("streams", []):
        lines.append(f"batch-1 stream, {s['mesh']}, ms per token after the first: direct Stage.Generate "
                     f"{s['direct_itl_ms']:.2f}, through the gateway {s['gateway_itl_ms']:.2f} (gateway adds "
                     f"{s['gateway_adds_ms']:+.2f})")
    streams = {s["mesh"]: s for s in report.get("streams", [])}
    if {"pp1", "pp2"} <= streams.keys():
        extra = streams["pp2"]["direct_itl_ms"] - streams["pp1"]["direct_itl_ms"]
        lines.append(f"data plane + second stage (pp2 - pp1, direct): {extra:+.2f} ms per token")
    if "trace" in report:
        lines.append(f"torch.profiler trace: {report['trace']}; top ops per generated token (batch 1, "
                     "prefill included):")
        lines += [f"  {op['op']:40}{op['calls_per_token']:>8.1f} calls{op['self_ms_per_token']:>9.3f} ms"
                  for op in report["trace_top_ops"]]
    la = report["load_average"]
    lines.append(f"load average: start {la['start']}, end {la['end']}")
    return "\n".join(lines) + "\n"
