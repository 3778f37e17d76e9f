"""The transport peer never outlives the process that hosts it, even when its stdin stays
open (here: held by the test, as a terminal or an inherited descriptor would), and gives
up by itself when nothing happens for its idle timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from stagekit.processes import process_running
from stagekit.testing.peer_watchdog import EXIT_IDLE

PEER = [sys.executable, "-m", "stagekit.testing.transport_peer", "--transport", "grpc", "--role", "echo"]
# A host that starts a peer sharing its stdin and stdout, says the peer's pid, and waits.
HOST = ("import subprocess, sys\n"
        f"p = subprocess.Popen({PEER!r})\n"
        "print('PEER PID', p.pid, flush=True)\n"
        "p.wait()\n")
EXIT_S = 5.0


@pytest.fixture
def host() -> Iterator[tuple[subprocess.Popen, list[int]]]:
    proc = subprocess.Popen([sys.executable, "-c", HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    peers: list[int] = []
    yield proc, peers
    for pid in peers:               # never by name: the peer's own pid, if it is still there
        if process_running(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdin.close()
    proc.stdout.close()


def _wait_gone(pid: int, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not process_running(pid):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_peer_exits_when_its_host_is_killed(host: tuple[subprocess.Popen, list[int]]) -> None:
    proc, peers = host
    pid = int(proc.stdout.readline().split()[-1])
    peers.append(pid)
    for _ in range(100):
        if proc.stdout.readline().startswith("PEER READY"):
            break
    os.kill(proc.pid, signal.SIGKILL)       # the host only: the peer's stdin stays open (we hold it)
    took = _wait_gone(pid, EXIT_S + 5)
    assert took is not None, "the peer outlived its host"
    assert took < EXIT_S


def test_peer_exits_when_idle() -> None:
    proc = subprocess.Popen([*PEER, "--idle-timeout", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        rc = proc.wait(timeout=30)          # stdin stays open: only the idle timeout can end it
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("the idle peer did not exit") from None
    finally:
        proc.stdin.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert rc == EXIT_IDLE and "idle" in err, (rc, err)
