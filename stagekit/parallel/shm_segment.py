"""The shared-memory segment of one group: named uniquely, mapped by every rank, then unlinked.

Bootstrap, over the group's ``exchange`` (a function that gives every rank the list of
every rank's small picklable value, in rank order; a gloo CPU group's
``all_gather_object`` in practice):

1. every rank sends its pid, boot id, pid namespace and a random token; ranks on other
   hosts (or pid namespaces, where pids mean nothing to a peer) make every rank fail alike;
2. rank 0 creates ``/dev/shm/stagemesh-coll-<pid of rank 0>-<rank 0's token>-g<group
   ranks>`` with O_EXCL: the token keeps two groups over the same ranks (TP and EP, two
   meshes on one host) apart, and a clash would be an error, never a shared segment;
3. the other ranks map it; after a second exchange (all mapped) every rank unlinks the name
   (the first one to get there removes it), so it is gone when ``open_segment`` returns.

The mappings stay valid after the unlink, so from then on nothing is left in /dev/shm
however the processes end, SIGKILL included. A rank killed inside the short window between
1 and 3 can leave its name behind; the next bootstrap on the host removes names whose
creator pid is gone (``sweep_stale``), so no leftover accumulates.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from stagekit.errors import StageUnavailable
from stagekit.processes import process_running

SHM_DIR = Path("/dev/shm")
PREFIX = "stagemesh-coll-"
Exchange = Callable[[object], list]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return os.uname().nodename


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def segment_name(creator_pid: int, token: str, group_ranks: list[int]) -> str:
    ranks = ".".join(map(str, group_ranks))
    return f"{PREFIX}{creator_pid}-{token}-g{ranks}"[:240]


def sweep_stale() -> list[str]:
    """Unlink this host's segments whose creator process is gone; returns their names."""
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_running(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed


def _all_ok(exchange: Exchange, error: str | None) -> None:
    """Every rank raises together if any rank failed its part (no rank is left waiting)."""
    errors = [e for e in exchange(error) if e]
    if errors:
        raise StageUnavailable(f"shared-memory collectives unavailable: {errors[0]}")


def open_segment(exchange: Exchange, rank: int, world: int, group_ranks: list[int],
                 nbytes: int) -> tuple[mmap.mmap, str, list[int]]:
    """Map one segment of ``nbytes`` shared by the group: (mapping, name, pids in rank order)."""
    me = {"pid": os.getpid(), "boot": _boot_id(), "pidns": _pid_namespace(), "token": secrets.token_hex(8)}
    infos = exchange(me)
    if len(infos) != world:
        raise StageUnavailable(f"shared-memory bootstrap: exchange returned {len(infos)} values for {world} ranks")
    if any((i["boot"], i["pidns"]) != (infos[0]["boot"], infos[0]["pidns"]) for i in infos):
        raise StageUnavailable("shared-memory collectives need every rank on one host and in one pid namespace")
    name = segment_name(infos[0]["pid"], infos[0]["token"], group_ranks)
    path = SHM_DIR / name
    error, created = None, False
    if rank == 0:
        sweep_stale()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            created = True
            try:
                os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)
        except OSError as e:
            error = f"rank 0 could not create {path}: {e}"
    mapping = None
    try:
        _all_ok(exchange, error)
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            finally:
                os.close(fd)
        except OSError as e:
            error = f"rank {rank} could not map {path}: {e}"
        _all_ok(exchange, error)
        created = True  # mapped everywhere: any rank may remove the name, so it is gone when each returns
    except BaseException:
        if mapping is not None:
            mapping.close()
        raise
    finally:
        if created:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return mapping, name, [i["pid"] for i in infos]


def open_pidfds(pids: list[int], rank: int) -> list[int]:
    """A pidfd per peer (-1 for this rank and where the kernel has none): it polls readable
    once the process has exited, even while it is an unreaped zombie, and never names a
    recycled pid."""
    fds = []
    for r, pid in enumerate(pids):
        fd = -1
        if r != rank and hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
        fds.append(fd)
    return fds
