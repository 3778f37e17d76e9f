"""`Supervisor`: keeps the stages of a started `Mesh` running, for ``stagemesh up``.

A stage that exits (its TP workers go with it: they share its process group) is started again
after a back-off on the port it had, so the gateway's ``--replica`` lists still name it; the
gateway's health loop finds it forgot its wiring and re-wires its replica, while the other
replicas keep serving. A data-parallel-attention member restarts the same way: its group
re-forms once it is back. What cannot be fixed by a restart stops the mesh: the gateway
exiting, or a stage that keeps failing (too many exits in a window, or restarts that keep
exiting before they serve).
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stagemesh.launcher import Mesh


class MeshFailed(RuntimeError):
    """The mesh cannot go on: the message says which process and why (the end of its log)."""


@dataclass
class _StageRun:
    """One stage's restart record."""

    replica: int
    index: int
    exits: deque[float] = field(default_factory=deque)  # when it exited, within the window
    restart_at: float | None = None  # set while it waits out its back-off
    starting: bool = False  # restarted and not serving yet
    failed_starts: int = 0  # restarts in a row that exited before they served
    attempt: int = 0  # restarts so far


def exit_reason(code: int) -> str:
    """``code 1``, or ``code -9 (SIGKILL)`` for a process killed by a signal."""
    if code < 0:
        try:
            return f"code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"code {code}"


class Supervisor:
    """Restarts the stages of a started mesh; `step` (called every fraction of a second) does one round.

    Invariant: after `step` returns, every stage is running, starting again, or waiting out its
    back-off (``backoff_s`` doubling per exit within ``window_s``, at most ``max_backoff_s``), and
    the gateway is running; otherwise `step` raised `MeshFailed`. A stage fails the mesh when it
    exited ``max_exits`` times within ``window_s`` or ``max_exits`` restarts in a row exited before
    serving. Every exit, restart and return is reported through ``log``.
    """

    def __init__(
        self,
        mesh: Mesh,
        log: Callable[[str], None],
        *,
        max_exits: int = 5,
        window_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mesh = mesh
        self.log = log
        self.max_exits = max_exits
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        spec = mesh.spec
        self.stages = {
            f"stage-r{r}-s{i}": _StageRun(r, i) for r in range(spec.dp) for i in range(len(spec.layer_splits))
        }

    def step(self) -> None:
        now = self.clock()
        for name, proc in list(self.mesh.procs):
            if proc.poll() is None:
                continue
            self.mesh.reap(name, proc)
            run = self.stages.get(name)
            if run is None:  # the gateway: the one process every client talks to
                raise MeshFailed(f"{name} exited with {exit_reason(proc.returncode)}; stopping the mesh. "
                                 f"The end of its log:\n{self.mesh.log_tail(name)}")
            self._exited(name, run, proc.returncode, now)
        for name, run in self.stages.items():
            if run.restart_at is not None and now >= run.restart_at:
                run.restart_at, run.starting, run.attempt = None, True, run.attempt + 1
                self.mesh.restart_stage(run.replica, run.index)
            elif run.starting and self.mesh.stage_ready(run.replica, run.index):
                run.starting, run.failed_starts = False, 0
                self.log(f"{name} serves again on {self._address(run)} (restart {run.attempt})")

    def _exited(self, name: str, run: _StageRun, code: int, now: float) -> None:
        run.exits.append(now)
        while now - run.exits[0] > self.window_s:
            run.exits.popleft()
        if run.starting:
            run.failed_starts += 1
        run.starting = False
        if len(run.exits) >= self.max_exits:
            why = f"it exited {len(run.exits)} times within {self.window_s:g}s"
        elif run.failed_starts >= self.max_exits:
            why = f"{run.failed_starts} restarts in a row exited before it served"
        else:
            delay = min(self.backoff_s * 2 ** (len(run.exits) - 1), self.max_backoff_s)
            run.restart_at = now + delay
            self.log(f"{name} (replica {run.replica} stage {run.index}) exited with {exit_reason(code)}; "
                     f"restarting it on {self._address(run)} in {delay:g}s (restart {run.attempt + 1})")
            return
        raise MeshFailed(f"{name} (replica {run.replica} stage {run.index}) keeps failing: {why} (the last with "
                         f"{exit_reason(code)}); stopping the mesh. The end of its log:\n{self.mesh.log_tail(name)}")

    def _address(self, run: _StageRun) -> str:
        return self.mesh.replicas[run.replica][run.index]
