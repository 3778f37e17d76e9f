"""A live mesh of the tiny demo model for integration tests: DP replicas of one stage each
(cheap on CPU), stage processes killed and restarted on their own ports."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.ports import free_port
from stagemesh.launcher import Mesh, MeshSpec


@contextmanager
def demo_mesh(root: Path, *, dp: int = 2, gateway: bool = False, **spec: Any) -> Iterator[Mesh]:
    """``dp`` one-stage replicas of the demo model (and a gateway process if asked), stopped on exit."""
    model = write_demo_model(root / "demo")
    num_layers = load_model_config(str(model)).num_layers
    mesh_spec = MeshSpec(
        model=str(model), layer_splits=[(0, num_layers)], dp=dp, threads=1, port=free_port(), gateway=gateway, **spec
    )
    mesh = Mesh(mesh_spec, root / "logs")
    try:
        mesh.start(timeout_s=120)
        yield mesh
    finally:
        mesh.stop()


def kill_stage(mesh: Mesh, replica: int, index: int = 0) -> None:
    """SIGKILL a stage's process group (no goodbye), and forget the process."""
    name = f"stage-r{replica}-s{index}"
    for entry in [e for e in mesh.procs if e[0] == name and e[1].poll() is None]:
        os.killpg(entry[1].pid, signal.SIGKILL)
        entry[1].wait(timeout=10)
        mesh.procs.remove(entry)


def restart_stage(mesh: Mesh, replica: int, index: int = 0, timeout_s: float = 60.0) -> None:
    """Start the stage again on its old port and wait until it serves."""
    address = mesh.replicas[replica][index]
    mesh.start_stage(replica, index, int(address.rsplit(":", 1)[1]))
    mesh.wait_stage(address, time.monotonic() + timeout_s)
