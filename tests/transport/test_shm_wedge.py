"""A same-host neighbour killed in the middle of a shared-memory transfer may leave this
process's UCX receive FIFO wedged for every sender (UcxRuntime.mark_shm_unsafe). The
survivor notices, publishes that its shared memory is unsafe, and links made afterwards,
both ways, use TCP with error handling: a replacement neighbour links and frames go
around. Runs in its own process (shm_wedge_scenario.py): a wedged FIFO is for good."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.transport.conftest import needs_ucx


@needs_ucx
def test_a_replacement_links_after_a_neighbour_died_mid_transfer() -> None:
    run = subprocess.run([sys.executable, "-m", "tests.transport.shm_wedge_scenario"], capture_output=True,
                         text=True, timeout=180)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"scenario failed (exit {run.returncode}): {run.stderr[-2000:]}"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["mid_frame"] and out["inbound_lost"]
    assert "exited in the middle of frame" in out["shm_unsafe"]
    assert out["published_unsafe"] is True
    assert "error" not in out, out.get("error")
    assert out["out_error_handling"] is True and out["in_error_handling"] is True
    assert out["round_trip"] is True
