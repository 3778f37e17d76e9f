"""Whether a process on this host still runs: the liveness check that data-plane links,
shared-memory collectives and test peers make of a peer they were given the pid of."""

from __future__ import annotations

import os


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited. A zombie has exited (a container's
    init may never reap it), so it counts as gone; so does a pid that is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):   # no such process (or no /proc): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return state not in (b"Z", b"X")
