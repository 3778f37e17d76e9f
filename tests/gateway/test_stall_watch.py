"""`StallWatch`'s policy on a pool of replica clients (no network: the calls in flight are stand-ins):
progress is a token or a completed step, a replica with requests and no progress is taken out
once, and one that stalls again is kept out longer each time."""

from __future__ import annotations

import asyncio
import time

from gateway.domain import StageInfo
from gateway.metrics import GatewayMetrics
from gateway.pool import ReplicaPool
from gateway.replica import ReplicaClient
from gateway.stall import MAX_HOLD_S, StallWatch


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _pool() -> tuple[ReplicaPool, ReplicaClient]:
    replica = ReplicaClient(0, ["h:1"])
    replica.mark_healthy()
    replica.head_info = StageInfo("m", steps_completed=10)
    return ReplicaPool([replica]), replica


def _run_requests(replica: ReplicaClient, n: int, idle_s: float) -> list[FakeCall]:
    calls = [FakeCall() for _ in range(n)]
    replica._calls = {f"req-{i}": c for i, c in enumerate(calls)}  # noqa: SLF001 (stand-ins for gRPC calls)
    replica.last_progress = time.monotonic() - idle_s
    return calls


def test_progress_keeps_a_replica_in() -> None:
    pool, replica = _pool()
    watch = StallWatch(5.0)
    watch(pool)
    _run_requests(replica, 2, idle_s=60)
    replica.head_info = StageInfo("m", steps_completed=11)  # a long prefill: no token, but a step
    watch(pool)
    assert replica.healthy and not replica.stalled
    assert time.monotonic() - replica.last_progress < 1


def test_no_requests_no_stall() -> None:
    pool, replica = _pool()
    replica.last_progress = time.monotonic() - 600
    StallWatch(5.0)(pool)
    assert replica.healthy


def test_a_stalled_replica_is_taken_out_once_then_longer_each_time() -> None:
    pool, replica = _pool()
    metrics = GatewayMetrics()
    watch = StallWatch(5.0, metrics)
    calls = _run_requests(replica, 2, idle_s=6)
    watch(pool)
    assert not replica.healthy and replica.stalled and replica.stall_steps == 10
    assert all(c.cancelled for c in calls) and "stalled: 2 request(s) in flight" in (replica.last_error or "")
    assert replica.out_until <= time.monotonic()  # the first time: back at its next good probe
    watch(pool)  # still the same outage: counted once
    assert metrics.replica_stalls.labels(replica="0")._value.get() == 1

    holds = []
    for _ in range(3):
        replica.mark_healthy()  # re-wired and back; stalls again
        _run_requests(replica, 1, idle_s=6)
        watch(pool)
        holds.append(replica.out_until - time.monotonic())
    assert [round(h) for h in holds] == [5, 10, 20]
    assert metrics.replica_stalls.labels(replica="0")._value.get() == 4
    assert all(h <= MAX_HOLD_S for h in holds)


def test_a_held_replica_is_not_probed() -> None:
    _, replica = _pool()
    replica.mark_unhealthy("stalled")
    replica.out_until = time.monotonic() + 60
    assert asyncio.run(replica.probe()) is False  # no stage contacted (h:1 does not exist)
    assert replica.last_error == "stalled" and not replica._channels  # noqa: SLF001
