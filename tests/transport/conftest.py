"""Transport tests run this side in the test process, on one event loop in a background
thread for the whole session (the process's UCX context is bound to the loop that made
it), and the other side as a real peer process (stagekit.testing.transport_peer)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from stagekit.testing.transport_host import TransportHost
from stagekit.transport.base import Transport
from stagekit.transport.ucx.runtime import ucx_importable

# Every UCX profile a peer may run; this process serves them all from one UCX context
# (error handling is chosen per endpoint). No cma here: a peer dying mid-copy would
# abort the test process (that profile is tested with both sides as subprocesses).
TEST_TLS = "posix,tcp"
TRANSPORTS = ["grpc", "ucx:shm", "ucx:tcp", "ucx"]
needs_ucx = pytest.mark.skipif(not ucx_importable(), reason="ucxx does not import here")
# A same-host peer killed in the middle of a transfer may wedge this process's UCX
# shared-memory receive FIFO for good (UcxRuntime.mark_shm_unsafe): the auto profile then
# links over TCP, but every later test pinned to ``ucx:shm`` would find no one answering.
# Tests that kill a UCX peer mid-transfer therefore run in a fresh pytest process of their own.
own_process = pytest.mark.own_process
_OWN_PROCESS_ENV = "STAGEMESH_TEST_OWN_PROCESS"
_OWN_PROCESS_TIMEOUT_S = 240


def transport_params(names: list[str] = TRANSPORTS, own_process_for: tuple[str, ...] = ()) -> list:
    """``names`` as test parameters; UCX ones skip without ucxx, those in ``own_process_for``
    run in a process of their own."""
    def marks(n: str) -> list:
        return [needs_ucx] * n.startswith("ucx") + [own_process] * (n in own_process_for)

    return [pytest.param(n, marks=marks(n)) for n in names]


def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``own_process`` test as ``python -m pytest <its id>`` in a child process
    (which runs it here, in-process) and report the child's verdict."""
    if pyfuncitem.get_closest_marker("own_process") is None or \
            os.environ.get(_OWN_PROCESS_ENV) == pyfuncitem.nodeid:
        return None
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
                         cwd=pyfuncitem.config.rootpath, capture_output=True, text=True,
                         env={**os.environ, _OWN_PROCESS_ENV: pyfuncitem.nodeid}, timeout=_OWN_PROCESS_TIMEOUT_S)
    if run.returncode != 0:
        pytest.fail(f"in its own process (exit {run.returncode}):\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}",
                    pytrace=False)
    return True


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="transport-tests", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_LOOP: list[LoopThread] = []


def shared_loop() -> LoopThread:
    """The process's one test loop (its UCX context is bound to it; the thread is a daemon)."""
    if not _LOOP:
        _LOOP.append(LoopThread())
    return _LOOP[0]


@pytest.fixture(scope="session")
def loop_thread() -> LoopThread:
    return shared_loop()


def make_test_transport(name: str, timeout_s: float = 10.0) -> Transport:
    """This side's transport for a peer running ``name``; ``timeout_s``: its UCX part and
    send timeouts."""
    if name == "grpc":
        from stagekit.transport.grpc.transport import GrpcTransport

        return GrpcTransport()
    from stagekit.transport.ucx.settings import UcxSettings
    from stagekit.transport.ucx.transport import UcxTransport

    profile = name.partition(":")[2] or None
    return UcxTransport(replace(UcxSettings.from_env(profile), tls=TEST_TLS, part_timeout_s=timeout_s,
                                send_timeout_s=timeout_s))


@dataclass
class Peer:
    proc: subprocess.Popen
    address: str

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def spawn_peer(name: str, connect: str, role: str, *extra: str, env: dict[str, str] | None = None) -> Peer:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagekit.testing.transport_peer", "--transport", name, "--connect", connect,
         "--role", role, *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    for _ in range(100):  # UCX logs to stdout too: skip its lines
        line = proc.stdout.readline()
        if not line or line.startswith("PEER READY"):
            break
    if not line.startswith("PEER READY"):
        proc.kill()
        raise RuntimeError(f"peer {name}/{role} did not start (exit code {proc.wait()}): {line!r}")
    return Peer(proc, line.split()[-1])


@dataclass
class Linked:
    """This side's host, linked both ways to a peer process."""

    name: str
    host: TransportHost
    peer: Peer

    @property
    def transport(self) -> Transport:
        return self.host.transport


def link(loop_thread: LoopThread, name: str, role: str, *extra: str, timeout_s: float = 10.0) -> Linked:
    host = TransportHost(make_test_transport(name, timeout_s))
    addr = loop_thread.run(host.start())
    peer = spawn_peer(name, addr, role, *extra)
    try:
        loop_thread.run(host.link(peer.address))
    except BaseException:
        peer.kill()
        raise
    return Linked(name, host, peer)


def unlink(loop_thread: LoopThread, linked: Linked) -> None:
    linked.peer.stop()
    loop_thread.run(linked.host.stop())


@pytest.fixture(scope="module", params=transport_params())
def echo(request: pytest.FixtureRequest, loop_thread: LoopThread) -> Iterator[Linked]:
    """A peer that sends every frame back, for each transport."""
    linked = link(loop_thread, request.param, "echo")
    yield linked
    unlink(loop_thread, linked)
