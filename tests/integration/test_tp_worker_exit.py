"""TP workers of a real TP2 stage, with step messages over the shared-memory ring (the
default) and over pipes (``STAGEMESH_NATIVE_KERNELS=0``): the stage says which it uses, an
idle stage's workers use almost no CPU after a request, and when rank 0 (the gRPC process)
is killed its workers notice (the ring sees rank 0's process exit, the pipe closes), close
their process groups and exit; when a worker dies instead, rank 0 stops the stage with exit
code 3 (its supervisor restarts it) rather than serving on, failing every step."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from stagekit.demo import write_demo_model
from stagekit.kernels import shm_ring
from stagemesh.launcher import Mesh, MeshSpec
from tests.helpers.stage_client import generate, tokens_of, wire

MODES = {"ring": ("1", "shared-memory ring"), "pipe": ("0", "pipes")}


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


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture(scope="module", params=list(MODES))
def stage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "ring" and not shm_ring.native_available():
        pytest.skip("no C compiler for the ring")
    root = tmp_path_factory.mktemp(request.param)
    demo = write_demo_model(root / "demo")
    mesh = Mesh(MeshSpec(model=str(demo), layer_splits=[(0, 4)], tp=2, threads=1, gateway=False,
                         transport="grpc"), root / "logs")
    workers: list[int] = []
    with pytest.MonkeyPatch.context() as env:  # inherited by the stage and its TP worker
        env.setenv("STAGEMESH_NATIVE_KERNELS", MODES[request.param][0])
        try:
            mesh.start(timeout_s=180)
            rank0 = next(p for name, p in mesh.procs if name.startswith("stage"))
            workers = [k for k in _children(rank0.pid)  # the TP rank it spawned
                       if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
            assert workers, f"no TP worker found under the stage process {rank0.pid}"
            yield request.param, mesh, rank0, workers, root / "logs"
        finally:
            for w in workers:
                if _alive(w):
                    os.kill(w, signal.SIGKILL)
            mesh.stop()


def test_the_stage_names_its_step_transport(stage) -> None:
    mode, _, _, _, logs = stage
    text = "\n".join(p.read_text() for p in logs.iterdir() if p.is_file())
    assert f"steps to TP workers: {MODES[mode][1]}" in text


def test_an_idle_stage_uses_almost_no_cpu(stage) -> None:
    _, mesh, _, workers, _ = stage
    wire(mesh.replicas[0])
    assert len(tokens_of(generate(mesh.replicas[0][0], [3, 200, 201], temperature=0.0, max_tokens=8,
                                  ignore_eos=True))) == 8
    time.sleep(0.3)
    before = {w: _cpu_s(w) for w in workers}
    time.sleep(3.0)
    used = {w: (_cpu_s(w) - c) / 3.0 for w, c in before.items()}
    assert max(used.values()) < 0.05, f"idle TP workers used {used} of a core"


def test_workers_exit_when_rank0_is_killed(stage) -> None:
    _, _, rank0, workers, _ = stage
    os.kill(rank0.pid, signal.SIGKILL)    # rank 0 only: its workers are left on their own
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    assert not left, f"TP workers {left} outlived their stage by 20 s"


def test_rank0_stops_the_stage_when_a_worker_dies(tmp_path: Path) -> None:
    demo = write_demo_model(tmp_path / "demo")
    mesh = Mesh(MeshSpec(model=str(demo), layer_splits=[(0, 4)], tp=2, threads=1, gateway=False,
                         transport="grpc"), tmp_path / "logs")
    try:
        mesh.start(timeout_s=180)
        rank0 = next(p for name, p in mesh.procs if name.startswith("stage"))
        worker = next(k for k in _children(rank0.pid) if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes())
        os.kill(worker, signal.SIGKILL)
        assert rank0.wait(timeout=60) == 3
        log = "\n".join(f.read_text() for f in (tmp_path / "logs").iterdir() if f.is_file())
        assert f"TP rank 1 (pid {worker}) exited with code -9: this stage cannot run steps without it" in log
    finally:
        mesh.stop()
