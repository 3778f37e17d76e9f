"""``stagemesh bench transport`` runs end to end (one UCX profile and gRPC, one size, two
frames in flight in the bandwidth runs) and reports the decode step against its Python
floor and the bandwidth against its Python ceiling (bare ucxx between two processes)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.transport.conftest import needs_ucx


@needs_ucx
def test_bench_transport_reports_every_plane_and_the_python_floor_and_ceiling() -> None:
    out = subprocess.run([sys.executable, "-m", "stagemesh.cli.main", "bench", "transport", "--quick", "--json",
                          "--transports", "ucx:shm,grpc", "--sizes", "4KiB", "--no-perftest", "--window", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ucx, grpc = result["transports"]["ucx:shm"], result["transports"]["grpc"]
    for r in (ucx, grpc):
        assert r["sizes"]["4096"]["rtt_us"] > 0 and r["sizes"]["4096"]["bw_gbps"] > 0
        assert r["decode_step"]["rtt_us"] > 0
    assert result["window"] == 2 and ucx["rounds"] == 1
    floor = result["python_floor_us"]["ucx:shm"]
    assert floor is not None and floor > 0
    assert ucx["decode_step"]["vs_py_floor"] == ucx["decode_step"]["rtt_us"] / floor
    ceiling = result["python_ceiling_gbps"]["ucx:shm"]["4096"]
    assert ceiling > 0 and "grpc" not in result["python_ceiling_gbps"]
    assert ucx["sizes"]["4096"]["bw_vs_bare_ucxx"] == ucx["sizes"]["4096"]["bw_gbps"] / ceiling
