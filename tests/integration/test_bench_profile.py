"""``stagemesh bench profile`` end to end on the tiny demo model: every category of a decode
step measured at two batch sizes, the categories adding up to the profiled step, the step's
weight bytes those of the model's projections, the gateway's per-token cost from a mesh, and
clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stagemesh.bench.step_clock import CATEGORIES, COMPUTE

PROFILE = [sys.executable, "-m", "stagemesh.cli.main", "bench", "profile", "--model-size", "tiny",
           "--prompt-len", "8", "--output-len", "6", "--kv-cache-memory", "64MiB", "--rounds", "1", "--json"]


def tiny_projection_bytes(cfg: dict) -> int:
    """fp32 bytes of QKV, O, gate/up and down of every layer, plus the LM head."""
    h, d, i = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    qkv = h * d * (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    per_layer = qkv + cfg["num_attention_heads"] * d * h + 3 * h * i
    return 4 * (cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * h)


def run_profile(*extra: str, fused: bool = True) -> dict:
    env = {**os.environ, "STAGEMESH_FUSED_LAYER": "1" if fused else "0"}
    out = subprocess.run([*PROFILE, *extra], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_profile_categories_add_up_to_the_step() -> None:
    # the fused decode layer off: every layer's pieces are timed apart
    report = run_profile("--batch", "1,2", "--mesh", "pp1", fused=False)
    with open(f"{report['model']}/config.json") as f:
        cfg = json.load(f)
    assert report["weight_bytes"] == tiny_projection_bytes(cfg)
    assert report["expert_bytes"] == 0  # a dense model
    assert report["read_bandwidth_gb_s"] > 0
    assert [r["batch"] for r in report["batches"]] == [1, 2]
    for row in report["batches"]:
        cats = row["categories"]
        assert set(cats) == set(CATEGORIES)
        assert row["decode_steps"] >= 1
        total = sum(c["ms"] for c in cats.values())
        assert total == pytest.approx(row["profiled_step_ms"], rel=0.01, abs=0.05)
        assert sum(c["pct"] for c in cats.values()) == pytest.approx(100, abs=1)
        # the compute thread's categories are the time between its start and end marks
        compute = sum(cats[c]["ms"] for c in COMPUTE)
        assert compute == pytest.approx(row["compute_thread_ms"], rel=0.05, abs=0.2)
        for c in ("matmul", "lm_head", "attention", "norm", "rope", "act", "embed", "sampling", "scheduler"):
            assert cats[c]["ms"] > 0, c
        assert cats["tp_comm"]["ms"] == 0 and cats["moe"]["ms"] == 0
        assert row["step_ms"] > 0 and row["decode_tok_s"] > 0 and row["matmul_gb_s"] > 0
    assert cats["fused_layer"]["ms"] < cats["norm"]["ms"]  # only the switch's look, which says no
    (stream,) = report["streams"]
    assert stream["mesh"] == "pp1" and stream["direct_itl_ms"] > 0 and stream["gateway_itl_ms"] > 0
    assert stream["gateway_adds_ms"] == pytest.approx(stream["gateway_itl_ms"] - stream["direct_itl_ms"], abs=2e-3)


def test_profile_times_the_fused_layer_as_one_category() -> None:
    """With the fused decode layer on (the default), a decode step's layers are one native call
    each: timed as `fused_layer`, nothing left in the per-op categories of the layers."""
    report = run_profile("--batch", "1", "--mesh", "none")
    (row,) = report["batches"]
    cats = row["categories"]
    assert cats["fused_layer"]["ms"] > 0 and cats["lm_head"]["ms"] > 0
    # the final norm runs outside the layers, so `norm` keeps a little
    assert cats["matmul"]["ms"] == 0 and cats["attention"]["ms"] == 0 and cats["rope"]["ms"] == 0
    assert row["matmul_gb_s"] > 0


@pytest.mark.slow
def test_profile_of_a_tp2_stage_times_its_collectives() -> None:
    report = run_profile("--batch", "1", "--mesh", "none", "--tp", "2", "--threads", "1")
    cats = report["batches"][0]["categories"]
    assert cats["tp_comm"]["ms"] > 0 and cats["matmul"]["ms"] + cats["fused_layer"]["ms"] > 0


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch sizes must be >= 1"),
    (["--batch", "x"], "expected comma-separated integers"),
    (["--mesh", "pp3"], "expected pp1, pp2 or none"),
])
def test_profile_rejects_bad_input(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from stagemesh.cli.main import main

    assert main([*PROFILE[3:], *args]) == 2   # checked before anything is loaded or started
    assert message in capsys.readouterr().err
