"""Drive a UCX worker from the asyncio loop without burning a core while idle.

ucxx's own modes either spin the loop forever (``polling``; its request ``wait()`` spins
too) or hop through two threads per message (``thread``). A stage always has a receive
pending, so spinning would cost a core per stage process even with no traffic. Instead:
while requests move, progress the worker on every loop turn; once nothing has moved for a
while, arm the worker and sleep until its event fd turns readable.

Two kinds of waits, because UCX's event fd does not cover every step of a transfer (a
sender waiting for room in a shared-memory FIFO gets no event, for one):
- idle waits (for the next message to arrive): spin ``spin_s``, then sleep on the fd,
  checking at least every 50 ms;
- transfer waits (a send, or the rest of a frame whose envelope arrived): spin for
  ``_BUSY_SPIN_S`` after the last movement, then nap 0.5 ms at a time (fd events still
  wake earlier): no transfer stalls on a missed event, and a stalled peer costs little CPU.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

# Wake up at least this often even without an fd event: a missed wakeup costs latency, never a hang.
_IDLE_NAP_S = 0.05
_BUSY_SPIN_S = 0.002
_BUSY_NAP_S = 0.0005


class WaitAborted(Exception):
    """The abort future of a wait completed before its requests did."""


class UcxProgress:
    """Invariant: whenever no waiter is spinning, the worker is armed or its fd is readable,
    so a completion always wakes the loop."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, spin_s: float) -> None:
        self.worker, self.loop, self.spin_s = worker, loop, spin_s
        self._fd = worker.epoll_file_descriptor
        self._sleepers: list[asyncio.Future[None]] = []
        # ucxx's "blocking" mode registered its own reader on this fd; take it over.
        loop.remove_reader(self._fd)
        loop.add_reader(self._fd, self._on_event)

    def close(self) -> None:
        self.loop.remove_reader(self._fd)
        self._wake()

    def _on_event(self) -> None:
        self.poll()
        self._wake()

    def poll(self) -> None:
        """Progress until idle and re-arm (arm refuses while events are pending)."""
        w = self.worker
        while True:
            while w.progress_once():
                pass
            if w.arm():
                return

    def _wake(self) -> None:
        sleepers, self._sleepers = self._sleepers, []
        for f in sleepers:
            if not f.done():
                f.set_result(None)

    async def wait(self, requests: Sequence[Any], timeout: float | None = None,
                   abort: asyncio.Future | None = None, idle: bool = False) -> None:
        """Wait until every request completed, then raise the first request's error if any.
        Raises TimeoutError after ``timeout`` seconds, WaitAborted once ``abort`` is done.
        The requests stay posted in either case: the caller owns what happens to the link.
        ``idle``: the wait is for a message that may take long to come (see the module doc)."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        spin_s = self.spin_s if idle or math.isinf(self.spin_s) else max(self.spin_s, _BUSY_SPIN_S)
        nap_s = _IDLE_NAP_S if idle else _BUSY_NAP_S
        w = self.worker
        moved = time.monotonic()
        while not all(r.completed for r in requests):
            if abort is not None and abort.done():
                raise WaitAborted()
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError()
            if w.progress_once():
                moved = now
                await asyncio.sleep(0)
                continue
            if now - moved < spin_s:
                await asyncio.sleep(0)
                continue
            if not w.arm():
                continue
            sleeper = self.loop.create_future()
            self._sleepers.append(sleeper)
            waits: set[asyncio.Future] = {sleeper} if abort is None else {sleeper, abort}
            await asyncio.wait(waits, timeout=min(nap_s, deadline - now), return_when=asyncio.FIRST_COMPLETED)
            if not sleeper.done():
                sleeper.cancel()
                self._sleepers.remove(sleeper)
            moved = time.monotonic()
        for r in requests:
            r.check_error()
