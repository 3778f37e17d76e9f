"""Ends a helper process that its host no longer wants: the host (its parent) died, nothing
happened for too long, or an orderly stop is taking too long.

A benchmark/test peer was once found hung for 37 minutes after its host went away: closing
stdin only helps when stdin is the host's pipe and the event loop still runs. The watchdog
is a thread that does not need the loop (a loop stuck in a native call cannot stop it) and
ends the process with ``os._exit``, which needs no cooperation from native libraries either.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from stagekit.processes import process_running

_TICK_S = 0.25
EXIT_ORPHANED, EXIT_IDLE, EXIT_STOP_HUNG = 70, 71, 72


class PeerWatchdog:
    """Invariant: once started, the process exits (code EXIT_*) at most ``_TICK_S`` after
    the parent ``parent_pid`` is gone, after ``idle_timeout_s`` without ``touch``, or
    ``stop_grace_s`` after ``stopping`` unless it exited by itself first."""

    def __init__(self, parent_pid: int, idle_timeout_s: float, stop_grace_s: float = 10.0) -> None:
        self.parent_pid = parent_pid
        self.idle_timeout_s = idle_timeout_s
        self.stop_grace_s = stop_grace_s
        self._last = time.monotonic()
        self._stop_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

    def start(self) -> PeerWatchdog:
        self._thread.start()
        return self

    def touch(self) -> None:
        """Something happened (a frame moved): the idle clock restarts."""
        self._last = time.monotonic()

    def stopping(self) -> None:
        """An orderly stop began: it has ``stop_grace_s`` to finish."""
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.stop_grace_s

    def _run(self) -> None:
        while True:
            time.sleep(_TICK_S)
            now = time.monotonic()
            if self.parent_pid > 1 and (os.getppid() != self.parent_pid and not process_running(self.parent_pid)):
                self._exit(EXIT_ORPHANED, f"host process {self.parent_pid} is gone")
            if now - self._last > self.idle_timeout_s:
                self._exit(EXIT_IDLE, f"idle for {self.idle_timeout_s:.0f}s")
            if self._stop_at is not None and now > self._stop_at:
                self._exit(EXIT_STOP_HUNG, f"stop did not finish within {self.stop_grace_s:.0f}s")

    @staticmethod
    def _exit(code: int, reason: str) -> None:
        try:
            print(f"transport peer exiting: {reason}", file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(code)
