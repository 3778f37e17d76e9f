"""Notice at once that a neighbour process on this host exited.

Without endpoint error handling UCX never reports a dead peer: receives just wait and
rendezvous sends stall. A pidfd (Linux 5.3+) turns readable when its process exits, so the
loop learns of the death without polling; where pidfds are unavailable, poll every 0.5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

_POLL_S = 0.5


class PeerWatch:
    """Invariant: ``on_exit`` is called at most once, on the loop, after the process exited
    (and never after ``close``)."""

    def __init__(self, pid: int, on_exit: Callable[[], None]) -> None:
        self.pid = pid
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None
        self._task: asyncio.Task | None = None
        self._done = False
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._loop.call_soon(self._fire)
            return
        except (AttributeError, OSError) as e:  # old kernel / platform: fall back to polling
            log.debug("pidfd unavailable for %d (%s); polling", pid, e)
            self._task = self._loop.create_task(self._poll())
            return
        self._loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        if self._done:
            return
        self.close()
        self._on_exit()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_POLL_S)
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self._fire()
                return
            except PermissionError:  # alive, owned by someone else
                pass

    def close(self) -> None:
        self._done = True
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
