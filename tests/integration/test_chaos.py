"""A short chaos run, as a user runs it: ``stagemesh bench chaos`` starts ``stagemesh up --dp 2 --pp
2`` itself, drives greedy and seeded REST and gRPC streams while it SIGKILLs stages and SIGSTOPs
one past the step timeout, and exits 0 only if no request failed, none gave other tokens than on
the calm mesh, and the gateway leaked no descriptors or memory. The longer run is in
docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(600)
def test_a_short_chaos_run_meets_the_goal(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    args = ["bench", "chaos", "--duration", "30", "--gap", "2", "5", "--stop-for", "10", "--step-timeout", "6",
            "--seed", "1", "--log-dir", str(tmp_path / "chaos"), "--json"]
    done = subprocess.run([sys.executable, "-m", "stagemesh.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=540)
    assert done.stdout.strip(), done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and report["goal_met"], json.dumps(report["problems"], indent=1)
    assert report["failed"] == report["wrong"] == 0 and report["succeeded"] == report["sent"] > 0
    assert report["by_api"]["rest"] > 0 and report["by_api"]["grpc"] > 0
    actions = [d["action"] for d in report["disturbances"]]
    assert "kill" in actions and "stop" in actions, actions
    assert all(d["recovered_s"] is not None for d in report["disturbances"])
    assert report["gateway_after"]["open_fds"] <= report["gateway_before"]["open_fds"] + 4
    # the killed stages' requests were moved by the gateway, not lost (a kill may land between requests)
    assert report["moves"]["retry"] + report["moves"]["migration"] >= 1
