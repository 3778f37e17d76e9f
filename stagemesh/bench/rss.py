"""Peak resident memory of a process tree (Linux /proc), for the stage processes."""

from __future__ import annotations

from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_pids(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mib(pid: int, peak: bool = False) -> float:
    """Sum of (peak) RSS over ``pid`` and its descendants, in MiB."""
    key = "VmHWM" if peak else "VmRSS"
    return sum(_status_kib(p, key) for p in tree_pids(pid)) / 1024
