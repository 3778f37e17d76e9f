"""The chaos bench's disturber: at random moments it SIGKILLs one stage process of a ``stagemesh
up`` mesh (``up`` restarts it) or SIGSTOPs one for a while (then SIGCONT), one disturbance at a
time: the next starts only once the gateway serves on every replica again."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import httpx

from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagemesh.bench.up_process import UpProcess


@dataclass
class Disturbance:
    at_s: float  # since the load started
    action: str  # "kill" or "stop"
    stage: str  # stage-rR-sI
    pid: int
    recovered_s: float | None = None  # from the signal until every replica served again


@dataclass
class Monkey:
    """Disturbs ``up`` until ``done`` is set. Invariant: at most one stage is disturbed at a time,
    a stopped stage is always continued (also when the run ends meanwhile), and a stage is never
    killed so often that ``up``'s supervisor would give up on it (it stops a mesh whose stage exits
    5 times within 60 s): the victim is the stage killed least in the last minute."""

    up: UpProcess
    dp: int
    pp: int
    rng: random.Random
    gap_s: tuple[float, float]  # calm between disturbances, drawn uniformly
    stop_s: float  # how long a SIGSTOP lasts; 0: never stop
    recover_timeout_s: float
    done: threading.Event
    clock: Callable[[], float] = time.monotonic
    log: Callable[[str], None] = print
    t0: float = 0.0
    events: list[Disturbance] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _kills: dict[str, list[float]] = field(default_factory=dict)

    def run(self) -> None:
        try:
            if not self._recovered():
                self.errors.append("the mesh was not serving on every replica when the chaos began")
                return
            n = 0
            while not self.done.wait(self.rng.uniform(*self.gap_s)):
                # the second disturbance is a stop, then every fourth: kills dominate, a stop is in every run
                stop = self.stop_s > 0 and n % 4 == 1
                if not (self._stop() if stop else self._kill()):
                    return
                n += 1
        except Exception as e:  # the report says the chaos broke, rather than a thread dying silently
            self.errors.append(f"the disturber failed: {type(e).__name__}: {e}")

    def _stages(self) -> list[tuple[int, int]]:
        return [(r, i) for r in range(self.dp) for i in range(self.pp)]

    def _kill(self) -> bool:
        now = self.clock()
        for times in self._kills.values():
            times[:] = [t for t in times if now - t < 60.0]
        fewest = min(len(self._kills.get(f"stage-r{r}-s{i}", [])) for r, i in self._stages())
        r, i = self.rng.choice([(r, i) for r, i in self._stages()
                                if len(self._kills.get(f"stage-r{r}-s{i}", [])) == fewest])
        name, pid = f"stage-r{r}-s{i}", self.up.stage_pid(r, i)
        if pid is None:
            self.errors.append(f"{name}: no process under stagemesh up")
            return False
        self._kills.setdefault(name, []).append(now)
        event = Disturbance(now - self.t0, "kill", name, pid)
        self.events.append(event)
        self.log(f"chaos: SIGKILL {name} (pid {pid}) at {event.at_s:.1f}s")
        os.killpg(pid, signal.SIGKILL)  # a stage leads its process group (its TP workers go with it)
        return self._await_recovery(event)

    def _stop(self) -> bool:
        r, i = self.rng.choice(self._stages())
        name, pid = f"stage-r{r}-s{i}", self.up.stage_pid(r, i)
        if pid is None:
            self.errors.append(f"{name}: no process under stagemesh up")
            return False
        event = Disturbance(self.clock() - self.t0, "stop", name, pid)
        self.events.append(event)
        self.log(f"chaos: SIGSTOP {name} (pid {pid}) for {self.stop_s:g}s at {event.at_s:.1f}s")
        os.killpg(pid, signal.SIGSTOP)
        try:
            time.sleep(self.stop_s)  # not cut short by the end of the run: the stall is what is measured
        finally:
            os.killpg(pid, signal.SIGCONT)
        return self._await_recovery(event)

    def _await_recovery(self, event: Disturbance) -> bool:
        start = self.t0 + event.at_s
        deadline = self.clock() + self.recover_timeout_s
        while self.clock() < deadline:
            pid = self.up.stage_pid(*_place(event.stage))
            if pid is not None and (pid != event.pid or event.action == "stop") and self._recovered():
                event.recovered_s = self.clock() - start
                self.log(f"chaos: every replica serves again {event.recovered_s:.1f}s after the {event.action}")
                return True
            if not self.up.alive():
                break
            time.sleep(0.25)
        self.errors.append(f"not every replica served within {self.recover_timeout_s:g}s after the {event.action} "
                           f"of {event.stage} (stagemesh up {'running' if self.up.alive() else 'exited'})")
        return False

    def _recovered(self) -> bool:
        """Every stage answers and is wired into its pipeline (a restarted one forgot its wiring
        until the gateway re-wired it), and the gateway routes to every replica."""
        try:
            replicas = httpx.get(f"{self.up.url}/health", timeout=5).json()["replicas"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        if len(replicas) != self.dp or any(r.get("state") != "serving" for r in replicas):
            return False
        return all(_wired(address) for r in replicas for address in r["addresses"])


def _wired(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            return stage_pb2_grpc.StageStub(channel).GetInfo(stage_pb2.GetInfoRequest(), timeout=5).wired
    except grpc.RpcError:
        return False


def _place(stage: str) -> tuple[int, int]:
    """``stage-r1-s0`` -> (1, 0)."""
    _, r, i = stage.split("-")
    return int(r[1:]), int(i[1:])
