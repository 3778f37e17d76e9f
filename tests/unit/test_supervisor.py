"""`Supervisor` over a real `Mesh` whose processes are tiny scripts standing in for stages (they
take the stage's arguments, write the ready file and serve, or fail at start): a killed stage
comes back on its port with its log appended, the others untouched; a stage that keeps failing
stops the mesh naming it and the end of its log; the gateway exiting is fatal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stagemesh.launcher import Mesh, MeshSpec
from stagemesh.supervisor import MeshFailed, Supervisor

SCRIPT = r"""
import sys, time
mode, args = sys.argv[1], sys.argv[2:]
if mode == "crash":
    print("stage failed: no weights in /models/x", flush=True)
    sys.exit(3)
port = args[args.index("--port") + 1]
with open(args[args.index("--ready-file") + 1], "w") as f:
    f.write(f"127.0.0.1:{port}\n")
print(f"serving on {port}", flush=True)
time.sleep(120)
"""


class ScriptMesh(Mesh):
    """A mesh of one replica of two script stages "on" fixed ports; ``modes`` says what each does."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(MeshSpec(model="none", layer_splits=[(0, 1), (1, 2)], gateway=False), log_dir)
        self.modes = {"stage-r0-s0": "serve", "stage-r0-s1": "serve", "gateway": "crash"}
        self.replicas = [["127.0.0.1:41001", "127.0.0.1:41002"]]

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-c", SCRIPT, self.modes[name], *args], stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        return p


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[ScriptMesh]:
    mesh = ScriptMesh(tmp_path)
    try:
        for index in (0, 1):
            mesh.restart_stage(0, index)
        deadline = time.monotonic() + 20
        while not (mesh.stage_ready(0, 0) and mesh.stage_ready(0, 1)):
            assert time.monotonic() < deadline, "the script stages did not start"
            time.sleep(0.02)
        yield mesh
    finally:
        mesh.stop()


def pid_of(mesh: Mesh, name: str) -> int:
    return next(p.pid for n, p in mesh.procs if n == name)


def step_until(supervisor: Supervisor, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        supervisor.step()
        time.sleep(0.01)


def test_a_killed_stage_comes_back_on_its_port(mesh: ScriptMesh) -> None:
    lines: list[str] = []
    supervisor = Supervisor(mesh, lines.append, backoff_s=0.05)
    head, victim = pid_of(mesh, "stage-r0-s0"), pid_of(mesh, "stage-r0-s1")
    supervisor.step()
    assert lines == []
    os.killpg(victim, signal.SIGKILL)
    step_until(supervisor, lambda: len(lines) == 2)
    assert lines == [
        "stage-r0-s1 (replica 0 stage 1) exited with code -9 (SIGKILL); restarting it on 127.0.0.1:41002 in 0.05s "
        "(restart 1)",
        "stage-r0-s1 serves again on 127.0.0.1:41002 (restart 1)",
    ]
    assert mesh.ready_file(0, 1).read_text() == "127.0.0.1:41002\n"
    assert pid_of(mesh, "stage-r0-s0") == head and pid_of(mesh, "stage-r0-s1") != victim
    assert [name for name, _ in mesh.procs] == ["stage-r0-s0", "stage-r0-s1"]
    assert (mesh.log_dir / "stage-r0-s1.log").read_text() == "serving on 41002\n" * 2  # appended, not replaced

    # a second exit within the window waits twice as long
    os.killpg(pid_of(mesh, "stage-r0-s1"), signal.SIGKILL)
    step_until(supervisor, lambda: len(lines) == 4)
    assert "in 0.1s (restart 2)" in lines[2] and lines[3].endswith("(restart 2)")


@pytest.mark.parametrize(
    "window_s, why",
    [(60.0, "it exited 5 times within 60s"), (0.0, "5 restarts in a row exited before it served")],
)
def test_a_stage_that_keeps_failing_stops_the_mesh(mesh: ScriptMesh, window_s: float, why: str) -> None:
    lines: list[str] = []
    supervisor = Supervisor(mesh, lines.append, backoff_s=0.01, window_s=window_s)
    mesh.modes["stage-r0-s0"] = "crash"  # from its next start on
    os.killpg(pid_of(mesh, "stage-r0-s0"), signal.SIGKILL)
    with pytest.raises(MeshFailed) as failed:
        step_until(supervisor, lambda: False)
    message = str(failed.value)
    assert message.startswith(f"stage-r0-s0 (replica 0 stage 0) keeps failing: {why} (the last with code 3)")
    assert message.endswith("stage failed: no weights in /models/x\n")  # the end of its log says why
    assert sum("exited with" in line for line in lines) == (4 if window_s else 5)
    assert [name for name, _ in mesh.procs] == ["stage-r0-s1"]  # the rest is for mesh.stop()


def test_the_gateway_exiting_is_fatal(mesh: ScriptMesh) -> None:
    supervisor = Supervisor(mesh, print)
    mesh._spawn("gateway", [])
    with pytest.raises(MeshFailed, match=r"^gateway exited with code 3; stopping the mesh"):
        step_until(supervisor, lambda: False)
