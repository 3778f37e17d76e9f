"""Drive a UCX worker from the asyncio loop without burning a core while idle.

ucxx's own modes either spin the loop forever (``polling``; its request ``wait()`` spins
too) or hop through two threads per message (``thread``). A stage always has a receive
pending, so spinning would cost a core per stage process even with no traffic. Instead one
pump per process progresses the worker and runs the callbacks of watched requests (a
frame's envelope arrived: post its tensors' receives, in the same loop turn): while
requests move it runs on every loop turn; once nothing has moved for a while it arms the
worker and the loop sleeps until the worker's event fd turns readable.

Two kinds of watches, because UCX's event fd does not cover every step of a transfer (a
sender waiting for room in a shared-memory FIFO gets no event, for one):
- idle watches (for the next message to arrive): spin ``spin_s``, then sleep on the fd,
  checking at least every 50 ms;
- transfer watches (a send, or the rest of a frame whose envelope arrived): spin for
  ``_BUSY_SPIN_S`` after the last movement, then nap 0.5 ms at a time (fd events still
  wake earlier): no transfer stalls on a missed event, and a stalled peer costs little CPU.

Deadlines are checked on every run of the pump, so at least every 50 ms while any watch
is pending.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# Wake up at least this often even without an fd event: a missed wakeup costs latency, never a hang.
_IDLE_NAP_S = 0.05
_BUSY_SPIN_S = 0.002
_BUSY_NAP_S = 0.0005


class WaitAborted(Exception):
    """The abort future of a wait completed before its requests did."""


class Watch:
    """Requests being watched; exactly one of ``on_done`` / ``on_timeout`` runs, once,
    unless the watch is cancelled first."""

    __slots__ = ("requests", "on_done", "on_timeout", "deadline", "idle", "active")

    def __init__(self, requests: Sequence[Any], on_done: Callable[[], None], on_timeout: Callable[[], None] | None,
                 deadline: float, idle: bool) -> None:
        self.requests, self.on_done, self.on_timeout = requests, on_done, on_timeout
        self.deadline, self.idle, self.active = deadline, idle, True

    def cancel(self) -> None:
        self.active = False


class UcxProgress:
    """Invariant: whenever the pump is not scheduled, the worker is armed (so the fd wakes
    the loop on the next event) and, while watches are pending, a nap timer is set."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, spin_s: float) -> None:
        self.worker, self.loop, self.spin_s = worker, loop, spin_s
        self._busy_spin_s = spin_s if math.isinf(spin_s) else max(spin_s, _BUSY_SPIN_S)
        self._fd = worker.epoll_file_descriptor
        self._watches: list[Watch] = []
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._moved = time.monotonic()
        self._closed = False
        # ucxx's "blocking" mode registered its own reader on this fd; take it over.
        loop.remove_reader(self._fd)
        loop.add_reader(self._fd, self._kick)

    def close(self) -> None:
        self._closed = True
        self.loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()

    def watch(self, requests: Sequence[Any], on_done: Callable[[], None], *, timeout: float | None = None,
              on_timeout: Callable[[], None] | None = None, idle: bool = False) -> Watch:
        """Call ``on_done()`` from the loop once every request completed (successfully or
        not: the callback checks), or ``on_timeout()`` after ``timeout`` seconds. Never calls
        back from inside this call. ``idle``: the requests may take long to come (see the
        module doc)."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        w = Watch(requests, on_done, on_timeout, deadline, idle)
        self._watches.append(w)
        self._kick()
        return w

    def _kick(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._pump()
        except Exception:   # UCX raised (arm, progress): the pump must not die with the worker unarmed
            log.exception("UCX progress failed; retrying")
            if not self._scheduled and self._timer is None:
                self._timer = self.loop.call_later(_BUSY_NAP_S, self._kick)

    def _pump(self) -> None:
        w = self.worker
        moved = False
        while w.progress_once():
            moved = True
        now = time.monotonic()
        if self._watches:
            pending, self._watches = self._watches, []
            keep = []
            for wt in pending:
                if not wt.active:
                    continue
                if all(r.completed for r in wt.requests):
                    moved = True
                    wt.active = False
                    self._call(wt.on_done)
                elif now >= wt.deadline:
                    wt.active = False
                    if wt.on_timeout is not None:
                        self._call(wt.on_timeout)
                else:
                    keep.append(wt)
            self._watches = keep + self._watches   # callbacks may have added watches
        if moved:
            self._moved = now
        if self._scheduled:
            return
        busy = any(not wt.idle for wt in self._watches)
        if self._watches and now - self._moved < (self._busy_spin_s if busy else self.spin_s):
            self._kick()
            return
        if not w.arm():   # events pending: progress again before sleeping
            self._kick()
            return
        if self._watches:
            nap = _BUSY_NAP_S if busy else _IDLE_NAP_S
            nap = min(nap, max(0.0, min(wt.deadline for wt in self._watches) - now))
            self._timer = self.loop.call_later(nap, self._kick)

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a callback's own failure must not stop the pump
            log.exception("UCX completion callback failed")

    async def wait(self, requests: Sequence[Any], timeout: float | None = None,
                   abort: asyncio.Future | None = None, idle: bool = False) -> None:
        """Wait until every request completed, then raise the first request's error if any.
        Raises TimeoutError after ``timeout`` seconds, WaitAborted once ``abort`` is done.
        The requests stay posted in either case: the caller owns what happens to the link.
        Returns without a loop turn when the requests complete on the spot (eager sends)."""
        if not all(r.completed for r in requests):
            w = self.worker
            while w.progress_once():
                pass
        # Traffic just moved (a send went out, typically): an answer or the next frame tends
        # to follow, so idle watches spin again from here instead of going back to sleep.
        self._moved = time.monotonic()
        if not all(r.completed for r in requests):
            if abort is not None and abort.done():
                raise WaitAborted()
            fut = self.loop.create_future()

            def done() -> None:
                if not fut.done():
                    fut.set_result(None)

            def timed_out() -> None:
                if not fut.done():
                    fut.set_exception(TimeoutError())

            def aborted(_: asyncio.Future) -> None:
                if not fut.done():
                    fut.set_exception(WaitAborted())

            wt = self.watch(requests, done, timeout=timeout, on_timeout=timed_out, idle=idle)
            if abort is not None:
                abort.add_done_callback(aborted)
            try:
                await fut
            finally:
                wt.cancel()
                if abort is not None:
                    abort.remove_done_callback(aborted)
        for r in requests:
            r.check_error()
