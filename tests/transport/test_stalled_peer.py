"""A neighbour that stalls (alive, SIGSTOPped) in the middle of a transfer over UCX. UCX
never reports a live peer that stops progressing, so a frame whose parts started to arrive
must complete within ``part_timeout_s`` and a send be taken within ``send_timeout_s``; past
that the link is lost with a reason that says so, and the steps this side originated come
back as error results, never a hang. (Waiting for the *next* frame has no deadline: an
idle upstream is normal.) Deadlines are run by the progress pump's watches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from stagekit.errors import StageUnavailable
from stagekit.testing.transport_peer import frame_ok, step_frame
from tests.transport.conftest import Linked, LoopThread, link, transport_params

STALL_TRANSPORTS = transport_params(["ucx:shm", "ucx:tcp"])
TIMEOUT_S = 2.0
ORIGIN_STEP = 10**6


def _resume_and_stop(linked: Linked) -> None:
    """Let the peer go on and end by itself: killed while stopped inside a write into this
    process's shared-memory receive FIFO, it would leave that FIFO wedged for every later
    same-host sender (see ARCHITECTURE, "A neighbour dies")."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(linked.peer.proc.pid, signal.SIGCONT)
    linked.peer.stop()


def _drain(tr: object) -> list:
    q = tr._inbound  # type: ignore[attr-defined]
    return [q.get_nowait() for _ in range(q.qsize())]


def _results(frames: list) -> list:
    return [f.result for f in frames if f.result is not None and not f.result.link_lost]


@pytest.mark.parametrize("name", STALL_TRANSPORTS)
def test_sender_stalled_mid_frame_loses_the_link(name: str, loop_thread: LoopThread) -> None:
    linked = link(loop_thread, name, "source", "--nbytes", str(8 << 20), "--interval", "0",
                  timeout_s=TIMEOUT_S)
    tr, pid = linked.transport, linked.peer.proc.pid
    try:
        async def scenario() -> tuple[list, list, float]:
            await tr.send(step_frame(ORIGIN_STEP, 1024))   # a step of ours, waiting for its result
            frames = [await asyncio.wait_for(tr.recv(), 30)]
            for _ in range(50):   # stop the sender until it stops with a frame half-received
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(0.05)
                frames += _drain(tr)
                link_ = tr._inbox.link
                if link_ is not None and link_._mid_frame:
                    break
                os.kill(pid, signal.SIGCONT)
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("never caught the sender between a frame's envelope and its tensors")
            stopped = time.monotonic()
            errors: list = []
            while not errors and time.monotonic() - stopped < TIMEOUT_S + 10:
                with contextlib.suppress(asyncio.TimeoutError):
                    frames.append(await asyncio.wait_for(tr.recv(), 0.25))
                errors = _results(frames)
            return [f for f in frames if f.result is None], errors, time.monotonic() - stopped

        frames, errors, took = loop_thread.run(scenario(), timeout=60)
        assert frames and all(frame_ok(f) for f in frames), "a partial or corrupt frame was delivered"
        assert [f.step.step_id for f in frames] == list(range(len(frames)))
        assert [e.step_id for e in errors] == [ORIGIN_STEP]
        assert "sender stalled" in errors[0].error and "lost" in errors[0].error
        assert TIMEOUT_S - 0.5 < took < TIMEOUT_S + 5, f"reported {took:.1f}s after the stall"
        assert tr.inbound_lost
    finally:
        _resume_and_stop(linked)
        loop_thread.run(linked.host.stop())


@pytest.mark.parametrize("name", STALL_TRANSPORTS)
def test_receiver_stalled_fails_the_send(name: str, loop_thread: LoopThread) -> None:
    linked = link(loop_thread, name, "sink", timeout_s=TIMEOUT_S)
    tr, pid = linked.transport, linked.peer.proc.pid
    try:
        async def scenario() -> tuple[float, str, list]:
            frame = step_frame(1, 16 << 20)
            await tr.send(frame)
            os.kill(pid, signal.SIGSTOP)
            start = time.monotonic()
            try:
                while time.monotonic() - start < 30:
                    await tr.send(frame)
            except StageUnavailable as e:
                return time.monotonic() - start, str(e), _results(_drain(tr))
            raise AssertionError("sends to a stalled receiver kept succeeding")

        took, err, failed = loop_thread.run(scenario(), timeout=60)
        assert "receiver stalled" in err and "down" in err
        assert took < TIMEOUT_S + 5, f"the stalled receiver was noticed only after {took:.1f}s"
        # the steps sent before the stall never got results: they come back as errors
        assert failed and all("receiver stalled" in r.error for r in failed)
    finally:
        _resume_and_stop(linked)
        loop_thread.run(linked.host.stop())
