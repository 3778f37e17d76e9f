"""`StallWatch`: a replica whose steps stop completing is taken out, its requests moved, and re-wired.

A stage that hangs (SIGSTOP, a wedged data-plane link, a stuck collective) may still answer
nothing wrong to a probe, or its head may: the requests on it just stop getting tokens until the
head's step timeout (minutes) fails them. The watch runs after every probe round: progress is a
token arriving on any request of the replica (`ReplicaClient.last_progress`) or the head reporting
more completed steps than at the last probe (a long prefill emits no token but completes steps).
A replica with requests in flight and no progress for ``timeout_s`` is stalled: it is marked
down (out of routing), its requests are moved to other replicas (`evict_all`, then migration),
and it serves again once a probe sees its head complete a step (a stopped stage continued), or,
if its stages answer for ``timeout_s`` without one (a wedged link), after a re-wire of every
stage (not at once: a re-wire can lose the steps in flight of a stage that just continued, and
the head would wait out its step timeout for them). A replica that
stalls again within ``REPEAT_WINDOW_S`` (a link that a re-wire does not mend, while its stages
answer probes) is kept out longer each time: ``timeout_s`` doubling per repeat, at most
``MAX_HOLD_S``, so it costs the requests routed to it a stall now and then, not every time.
"""

from __future__ import annotations

import logging
import time

from gateway.metrics import GatewayMetrics
from gateway.pool import ReplicaPool
from gateway.replica import ReplicaClient

logger = logging.getLogger("stagemesh.gateway")

REPEAT_WINDOW_S = 600.0
MAX_HOLD_S = 600.0


class StallWatch:
    """A probe listener of one pool (`ReplicaPool.probe_listeners`).

    Invariant: a replica is declared stalled at most once per outage (``stalled`` is cleared by
    `ReplicaClient.mark_healthy`), and only while it has requests of ours in flight and no admin
    operation owns it; detection takes at most ``timeout_s`` plus one probe interval.
    """

    def __init__(self, timeout_s: float, metrics: GatewayMetrics | None = None) -> None:
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._steps: dict[int, int] = {}  # the head's completed steps at the last probe, per replica
        self._stalls: dict[int, list[float]] = {}  # when each replica stalled, within REPEAT_WINDOW_S

    def __call__(self, pool: ReplicaPool) -> None:
        now = time.monotonic()
        for r in list(pool.replicas):
            steps = r.head_info.steps_completed if r.head_info is not None else 0
            if steps != self._steps.get(r.index, steps):
                r.last_progress = max(r.last_progress, now)
            self._steps[r.index] = steps
            if r.stalled or r.busy is not None or not r.active_requests or self.timeout_s <= 0:
                continue
            idle = now - r.last_progress
            if idle > self.timeout_s:
                self._take_out(r, idle)
        for index in set(self._steps) - {r.index for r in pool.replicas}:
            del self._steps[index]
            self._stalls.pop(index, None)

    def _take_out(self, r: ReplicaClient, idle: float) -> None:
        reason = (f"stalled: {r.active_requests} request(s) in flight and no step completed for {idle:.0f}s "
                  f"(--stall-timeout {self.timeout_s:g}s)")
        now = time.monotonic()
        recent = [t for t in self._stalls.get(r.index, []) if now - t < REPEAT_WINDOW_S] + [now]
        self._stalls[r.index] = recent
        hold = min(self.timeout_s * 2 ** (len(recent) - 2), MAX_HOLD_S) if len(recent) > 1 else 0.0
        r.stalled = True
        r.stall_steps = r.head_info.steps_completed if r.head_info is not None else 0
        r.answering_since, r.rewire_after_s = None, self.timeout_s
        r.out_until = now + hold
        r.mark_unhealthy(reason)
        moved = r.evict_all(reason)
        again = f" after {hold:.0f}s (stall {len(recent)} within {REPEAT_WINDOW_S:.0f}s)" if hold else ""
        logger.warning("replica %s %s: moving %d request(s) to other replicas; it serves again once its head "
                       "completes a step, or is re-wired if its stages answer for %gs without one%s",
                       r.id, reason, moved, self.timeout_s, again)
        if self.metrics is not None:
            self.metrics.replica_stalls.labels(replica=str(r.index)).inc()
