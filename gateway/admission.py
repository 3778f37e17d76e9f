"""`ReplicaGate`: the gateway's bounded FIFO in front of one replica, and the load it carries."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class ReplicaGate:
    """At most ``max_running`` requests in flight to the replica; beyond that, at most
    ``max_waiting`` wait here in arrival order.

    Invariant: ``running <= max_running``. A freed slot is handed straight to the oldest
    waiter (``running`` stays), so a request that arrives later never overtakes one that
    waits. ``outstanding_tokens`` is what the requests here still may cost the replica
    (prompt + tokens not yet generated), the least-loaded router's second key.
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.outstanding_tokens = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def load(self) -> int:
        """Requests this replica has from us: running plus waiting."""
        return self.running + len(self._waiters)

    @property
    def can_run_now(self) -> bool:
        return self.running < self.max_running and not self._waiters

    @property
    def can_queue(self) -> bool:
        return len(self._waiters) < self.max_waiting

    async def acquire(self) -> None:
        """Take a slot, waiting in line if none is free (raises what `fail_waiters` sets)."""
        if self.can_run_now:
            self.running += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest live waiter, or to the pool of free slots."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    def fail_waiters(self, err: BaseException) -> None:
        """Wake every waiter with ``err`` (the replica went down: they retry elsewhere)."""
        waiters, self._waiters = list(self._waiters), deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(err)
