"""``stagemesh bench serve --layouts`` runs end to end: one mesh per TP layout, every one
measured through the gateway in the same run, each stage with the TP collectives named,
ratios against the last layout, the batch-1 step against the read bandwidth measured in the
same run, and a llama-batched-bench baseline read from the binary's table; a malformed layout
is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = [sys.executable, "-m", "stagemesh.cli.main", "bench", "serve", "--model-size", "tiny", "--batch", "1,2",
         "--prompt-len", "8", "--output-len", "4", "--kv-cache-memory", "64MiB"]


# prints llama-batched-bench's table for the -npl batch sizes it is given, and its arguments
FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import sys
a = sys.argv[1:]
npl = a[a.index("-npl") + 1].split(",")
pp, tg = int(a[a.index("-npp") + 1]), int(a[a.index("-ntg") + 1])
print("args:", " ".join(a), file=sys.stderr)
print("|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |")
for b in map(int, npl):
    print(f"| {pp:5d} | {tg:6d} | {b:4d} | {b * (pp + tg):6d} |    0.100 |   100.00 |    0.400 |    10.00 |    0.500 |"
          "    10.00 |")
"""


def test_bench_serve_compares_tp_layouts(tmp_path: Path) -> None:
    fake = tmp_path / "llama-batched-bench"
    fake.write_text(FAKE_LLAMA_BENCH)
    fake.chmod(0o755)
    gguf = tmp_path / "demo.gguf"
    gguf.write_bytes(b"GGUF")
    out = subprocess.run([*BENCH, "--layouts", "tp2x1-gloo,tp1x1-f16", "--json", "--llama-cpp-bench", str(fake),
                          "--gguf", str(gguf)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["meshes"] == {
        "tp2x1-gloo": {"tp": 2, "threads": 1, "collectives": "gloo", "transport": "", "moe_parallel": "", "dp": 1,
                       "dp_attention": False, "weight_dtype": ""},
        "tp1x1-f16": {"tp": 1, "threads": 1, "collectives": "auto", "transport": "", "moe_parallel": "", "dp": 1,
                      "dp_attention": False, "weight_dtype": "float16"},
    }
    rows = {(r["mesh"], r["batch"]): r for r in report["runs"]}
    assert set(rows) == {(m, b) for m in ("tp2x1-gloo", "tp1x1-f16") for b in (1, 2)}
    for (mesh, batch), r in rows.items():
        assert r["output_tok_s"] > 0
        if mesh == "tp2x1-gloo":
            ref = rows[("tp1x1-f16", batch)]["output_tok_s"]
            assert r["ratio_vs_tp1x1-f16"] == round(r["output_tok_s"] / ref, 3)
        # 4 output tokens per request over the table's 0.5 s total, 0.4 s for 4 decode steps
        assert r["llama_cpp_output_tok_s"] == 4 * batch / 0.5 and r["llama_cpp_decode_step_ms"] == 100.0
        assert r["ratio_vs_llama_cpp"] == round(r["output_tok_s"] / r["llama_cpp_output_tok_s"], 3)
    step = report["step"]
    assert step["read_bandwidth_gb_s"] > 0 and step["step_ms"] > 0 and 0 < step["matmul_ms"] < step["profiled_step_ms"]
    assert step["weight_bytes"] > 0 and step["matmul_gb_s"] > 0
    assert step["matmul_vs_bandwidth"] == round(step["matmul_gb_s"] / step["read_bandwidth_gb_s"], 3)


def test_bench_serve_wants_the_gguf_with_llama_cpp(capsys: pytest.CaptureFixture[str]) -> None:
    from stagemesh.cli.main import main

    assert main([*BENCH[3:], "--llama-cpp-bench", "/bin/true"]) == 2
    assert "--llama-cpp-bench and --gguf go together" in capsys.readouterr().err


def test_bench_serve_rejects_a_bad_layout() -> None:
    out = subprocess.run([*BENCH, "--layouts", "tp2"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "expected [dpN-]tpNxT" in out.stderr and "Traceback" not in out.stderr
