"""`UpProcess`: a ``stagemesh up`` started as a user starts it (a subprocess), for benchmarks that
disturb it from outside: its stage and gateway processes are found in its own process tree by
their command lines (never system-wide by name), and their RSS and open descriptors are read from
/proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stagemesh.bench.rss import tree_pids


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def rss_mib(pid: int) -> float:
    """Resident memory of one process (VmRSS), in MiB; 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    """Descriptors the process has open (sockets, files, pipes); -1 once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class UpProcess:
    """A running ``stagemesh up`` and every process it was seen to start.

    Invariant: once `start` returned, the mesh answered on ``url``; `stop` (also when `start`
    failed) ends ``up`` with SIGTERM and then SIGKILLs the process group of every process ever
    seen in its tree, so nothing it started outlives the benchmark.
    """

    def __init__(self, up_args: list[str], log_dir: Path, port: int) -> None:
        self.up_args, self.log_dir, self.port = up_args, log_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.output = log_dir / "up.out"
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()

    def start(self, timeout_s: float = 600.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "stagemesh.cli.main", "up", "--port", str(self.port),
                "--log-dir", str(self.log_dir / "logs"), *self.up_args]
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout_s
        while "stagemesh is up" not in self.said():
            if self.proc.poll() is not None:
                raise RuntimeError(f"stagemesh up exited with code {self.proc.returncode}:\n{self.said()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stagemesh up not up within {timeout_s:g}s:\n{self.said()[-3000:]}")
            time.sleep(0.2)
        self.tree()

    def said(self) -> str:
        """What ``up`` printed so far (stdout and stderr)."""
        return self.output.read_text(errors="replace") if self.output.is_file() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree(self) -> list[int]:
        """The processes under ``up`` now (remembered for `stop`)."""
        pids = tree_pids(self.proc.pid)[1:] if self.alive() else []
        self.seen.update(pids)
        return pids

    def stage_pid(self, replica: int, index: int) -> int | None:
        """The process of stage ``index`` of ``replica`` now: the one whose command line names its
        ready file (a restarted stage is a new process with the same command line)."""
        needle = f"stage-r{replica}-s{index}.address"
        for pid in self.tree():
            argv = _argv(pid)
            if "stage" in argv and any(a.endswith(needle) for a in argv):
                return pid
        return None

    def gateway_pid(self) -> int | None:
        for pid in self.tree():
            argv = _argv(pid)
            if argv[3:4] == ["gateway"] and "stagemesh.cli.main" in argv:
                return pid
        return None

    def stop(self) -> int | None:
        """End ``up`` and everything it started; its exit code (None: it had to be killed)."""
        if self.proc is None:
            return None
        self.tree()
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=60)
        else:
            code = self.proc.returncode
        for pid in self.seen | {self.proc.pid}:
            if "stagemesh.cli.main" not in _argv(pid):  # gone (its pid perhaps reused by someone else's)
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGCONT)  # a stopped group would not die of SIGTERM, only SIGKILL
                os.killpg(pid, signal.SIGKILL)  # each process leads its own group (stages: their TP workers)
        self.proc.wait(timeout=10)
        return code
