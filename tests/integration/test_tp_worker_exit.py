"""TP worker processes never outlive their stage: when rank 0 (the gRPC process) is
killed, its workers notice the closed pipe, close their process groups and exit."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from stagekit.demo import write_demo_model
from stagemesh.launcher import Mesh, MeshSpec


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_workers_exit_when_rank0_is_killed(tmp_path: Path) -> None:
    demo = write_demo_model(tmp_path / "demo")
    mesh = Mesh(MeshSpec(model=str(demo), layer_splits=[(0, 4)], tp=2, threads=1, gateway=False,
                         transport="grpc"), tmp_path / "logs")
    workers: list[int] = []
    try:
        mesh.start(timeout_s=180)
        rank0 = next(p for name, p in mesh.procs if name.startswith("stage"))
        workers = [k for k in _children(rank0.pid)  # the TP rank it spawned
                   if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert workers, f"no TP worker found under the stage process {rank0.pid}"
        os.kill(rank0.pid, signal.SIGKILL)    # rank 0 only: its workers are left on their own
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [w for w in workers if _alive(w)]
        assert not left, f"TP workers {left} outlived their stage by 20 s"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        mesh.stop()
