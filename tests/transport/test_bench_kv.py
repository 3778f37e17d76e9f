"""``stagemesh bench kv`` runs end to end: two replicas per data plane, a real ExportKv per
round, every block sent over the plane named, and a clear error for a bad prompt length."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.transport.conftest import needs_ucx

BENCH = [sys.executable, "-m", "stagemesh.cli.main", "bench", "kv", "--rounds", "1", "--threads", "1",
         "--kv-cache-memory", "64MiB"]


@needs_ucx
def test_bench_kv_moves_every_block_over_each_plane() -> None:
    out = subprocess.run([*BENCH, "--prompt-len", "32", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["pool"] == "prefaulted" and report["kv_bytes_per_token"] == 64 << 10
    runs = {r["transport"]: r for r in report["runs"]}
    assert set(runs) == {"ucx", "grpc"}
    for r in runs.values():
        assert (r["prompt_len"], r["blocks"], r["bytes"]) == (32, 2, 32 * (64 << 10))
        assert r["gb_s"] > 0 and r["seconds_p50"] > 0
    assert report["ucx_over_grpc"]["32"] == round(runs["ucx"]["gb_s"] / runs["grpc"]["gb_s"], 2)


def test_bench_kv_rejects_partial_blocks() -> None:
    out = subprocess.run([*BENCH, "--transport", "grpc", "--prompt-len", "40"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "--prompt-len [40]: prompt lengths must be whole KV blocks of 16 tokens" in out.stderr
