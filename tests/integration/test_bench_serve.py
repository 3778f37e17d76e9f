"""``stagemesh bench serve --layouts`` runs end to end: one mesh per TP layout, every one
measured through the gateway in the same run, each stage with the TP collectives named,
ratios against the last layout; a malformed layout is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

BENCH = [sys.executable, "-m", "stagemesh.cli.main", "bench", "serve", "--model-size", "tiny", "--batch", "1,2",
         "--prompt-len", "8", "--output-len", "4", "--kv-cache-memory", "64MiB"]


def test_bench_serve_compares_tp_layouts() -> None:
    out = subprocess.run([*BENCH, "--layouts", "tp2x1-gloo,tp1x1", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["meshes"] == {
        "tp2x1-gloo": {"tp": 2, "threads": 1, "collectives": "gloo", "transport": "", "moe_parallel": "", "dp": 1,
                       "dp_attention": False},
        "tp1x1": {"tp": 1, "threads": 1, "collectives": "auto", "transport": "", "moe_parallel": "", "dp": 1,
                  "dp_attention": False},
    }
    rows = {(r["mesh"], r["batch"]): r for r in report["runs"]}
    assert set(rows) == {(m, b) for m in ("tp2x1-gloo", "tp1x1") for b in (1, 2)}
    for (mesh, batch), r in rows.items():
        assert r["output_tok_s"] > 0
        if mesh == "tp2x1-gloo":
            ref = rows[("tp1x1", batch)]["output_tok_s"]
            assert r["ratio_vs_tp1x1"] == round(r["output_tok_s"] / ref, 3)


def test_bench_serve_rejects_a_bad_layout() -> None:
    out = subprocess.run([*BENCH, "--layouts", "tp2"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "expected [dpN-]tpNxT" in out.stderr and "Traceback" not in out.stderr
