"""A stage process's membership in a data-parallel-attention group: whether its world is the
group's current one, the heads' lockstep round, and the way back after a failure.

The group fails as one: a collective that errors or times out (a member died or stalled), a
lockstep round that does, a newer epoch published at the rendezvous (another member failed
first), or a rendezvous host gone — any of these turns this member to ``forming``. The stage
then fails what it holds, leaves its world and knocks again (``StageRuntime.rejoin``); the
group serves again once every member, restarted ones included, has joined the next epoch.
No member ever waits on a peer without a deadline: every collective of the world runs
under ``--collective-timeout``, and the watcher notices a moved-on group within a second.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from stagekit.engine.stage_spec import StageSpec
from stagekit.engine.stage_world import group_member
from stagekit.errors import StageUnavailable
from stagekit.parallel.dp_rendezvous import DpRendezvous
from stagekit.parallel.group import GroupCoordinator

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5


class DpMember:
    """State ``forming`` until the first world forms, ``ready`` while the executor's world
    (``epoch``) is the group's current one, ``forming`` again from the first sign it is not
    until the next world forms. ``on_failure`` (set by the stage) schedules the rejoin on
    the compute thread; ``listeners`` hear every state change (any thread)."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.rendezvous = DpRendezvous(spec.dp_group, group_member(spec, 0, os.getpid()), spec.dp_size,
                                       timeout_s=spec.collective_timeout_s)
        self.cancel = threading.Event()
        self.state, self.epoch, self.failures_total = "forming", 0, 0
        self._reason = ""
        self._lock = threading.Lock()
        self._round_idle = threading.Event()
        self._round_idle.set()
        self.on_failure: Callable[[], None] | None = None
        self.listeners: list[Callable[[], None]] = []
        self._watcher = threading.Thread(target=self._watch, name="dp-watch", daemon=True)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def detail(self) -> str:
        """Why the group is not ready: the failure that broke it and what the rendezvous waits for."""
        if self.ready:
            return ""
        return "; ".join(x for x in (self._reason, self.rendezvous.status) if x)

    def formed(self, epoch: int) -> None:
        with self._lock:
            self.state, self.epoch, self._reason = "ready", epoch, ""
        log.info("DP group %s: epoch %d formed, replica %d of %d ready", self.spec.dp_group, epoch,
                 self.spec.dp_rank, self.spec.dp_size)
        self._notify()

    def fail(self, reason: str) -> None:
        """The world of ``epoch`` is broken (any thread; the first report counts)."""
        with self._lock:
            if self.state != "ready":
                return
            self.state, self._reason = "forming", f"epoch {self.epoch} failed: {reason}"
            self.failures_total += 1
        log.error("DP group %s: %s; failing this replica's requests and re-forming", self.spec.dp_group, reason)
        self._notify()
        if self.on_failure is not None:
            self.on_failure()

    def start_watch(self) -> None:
        self._watcher.start()

    def agree(self, dp: GroupCoordinator, has_work: bool, wired: bool) -> bool:
        """The heads' lockstep round (module docstring of engine/lockstep.py): True when every
        head is wired and at least one has work, so every head steps (a dummy step where it
        has none). Runs on the engine's lockstep thread; a failure fails the group."""
        self._round_idle.clear()
        try:
            if not self.ready:
                raise StageUnavailable(f"DP group is forming: {self.detail}")
            # one MIN over [-has_work, wired]: -(anyone has work), everyone wired
            try:
                neg_anyone, all_wired = dp.min_ints([-int(has_work), int(wired)])
            except Exception as e:
                self.fail(f"the lockstep with the other heads failed: {e}")
                raise StageUnavailable(f"DP group failed: {e}") from e
            return neg_anyone < 0 and all_wired > 0
        finally:
            self._round_idle.set()

    def wait_round_idle(self) -> None:
        """Until no lockstep round runs (it ends within the collective timeout): the world it
        uses may be torn down only then."""
        self._round_idle.wait(self.spec.collective_timeout_s + 5.0)

    def close(self) -> None:
        self.cancel.set()
        self.rendezvous.close()

    def _watch(self) -> None:
        while not self.cancel.wait(WATCH_INTERVAL_S):
            if not self.ready:
                continue
            epoch = self.epoch
            try:
                current = self.rendezvous.current_epoch()
            except StageUnavailable as e:
                self.fail(f"the group's rendezvous host is unreachable: {e}")
                continue
            if current is not None and current != epoch and self.epoch == epoch:
                self.fail(f"the group moved on to epoch {current} (a member failed elsewhere)")

    def _notify(self) -> None:
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not stop the others hearing
                log.exception("DP group listener failed")
