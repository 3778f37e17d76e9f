"""A neighbour killed in the middle of a transfer: the surviving side never hangs and
never delivers a partial frame. On both planes it also says so within seconds: the
receiving side marks its upstream link lost and turns each step it originated into an error
result (what makes the replica head fail exactly those requests), and sends raise
StageUnavailable. (UCX notices through a pidfd or the endpoint's error; gRPC through the
stream from upstream ending without the sender's goodbye, or the stream downstream failing.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time

import pytest

from stagekit.errors import StageUnavailable
from stagekit.testing.transport_peer import frame_ok, step_frame
from tests.transport.conftest import LoopThread, link, needs_ucx, own_process, spawn_peer, transport_params, unlink

KILL_TRANSPORTS = transport_params(["grpc", "ucx:shm", "ucx:tcp"], own_process_for=("ucx:shm",))
REPORT_S = 5.0      # a lost link is reported within this (pidfd / TCP reset: well under a second)
ORIGIN_STEP = 10**6


@pytest.mark.parametrize("name", KILL_TRANSPORTS)
def test_sender_killed_mid_frame(name: str, loop_thread: LoopThread) -> None:
    interval = "0.05" if name == "grpc" else "0"   # the gRPC fallback queues without bound: pace it
    linked = link(loop_thread, name, "source", "--nbytes", str(8 << 20), "--interval", interval)
    tr = linked.transport
    try:
        async def scenario() -> tuple[list, list, float | None]:
            await tr.send(step_frame(ORIGIN_STEP, 1024))   # a step of ours, waiting for its result
            frames = [await asyncio.wait_for(tr.recv(), 30) for _ in range(2)]
            linked.peer.kill()
            killed = time.monotonic()
            errors, notices, reported = [], [], None
            while time.monotonic() - killed < REPORT_S + 1:
                try:
                    f = await asyncio.wait_for(tr.recv(), 0.25)
                except asyncio.TimeoutError:
                    continue
                if f.result is not None and f.result.link_lost:   # to be passed on toward the head
                    notices.append(f.result)
                elif f.result is not None:
                    errors.append(f.result)
                    reported = reported or time.monotonic() - killed
                else:
                    frames.append(f)
            return frames, errors, notices, reported

        frames, errors, notices, reported = loop_thread.run(scenario(), timeout=60)
        assert len(frames) >= 2 and all(frame_ok(f) for f in frames), "a partial or corrupt frame was delivered"
        assert [f.step.step_id for f in frames] == list(range(len(frames)))
        assert [e.step_id for e in errors] == [ORIGIN_STEP] and "lost" in errors[0].error
        assert len(notices) == 1 and "from upstream" in notices[0].error
        assert reported is not None and reported < REPORT_S
        assert tr.inbound_lost
        with pytest.raises(StageUnavailable, match="results cannot come back"):
            loop_thread.run(tr.send(step_frame(ORIGIN_STEP + 1, 10)))
    finally:
        unlink(loop_thread, linked)


@pytest.mark.parametrize("name", KILL_TRANSPORTS)
def test_receiver_killed_mid_frame(name: str, loop_thread: LoopThread) -> None:
    linked = link(loop_thread, name, "sink")
    tr = linked.transport
    try:
        async def scenario() -> tuple[float, str, list]:
            frame = step_frame(1, 16 << 20)
            await tr.send(frame)
            asyncio.get_running_loop().call_later(0.2, linked.peer.kill)
            start = time.monotonic()
            try:
                while time.monotonic() - start < 30:
                    await tr.send(frame)
                    await asyncio.sleep(0)
            except StageUnavailable as e:
                failed = [f.result for f in _drain(tr)]
                return time.monotonic() - start, str(e), failed
            raise AssertionError("sends to a dead receiver kept succeeding")

        took, err, failed = loop_thread.run(scenario(), timeout=60)
        assert took < 15, f"the dead receiver was noticed only after {took:.1f}s"
        assert "down" in err
        # the steps sent before the death never got results: they come back as errors
        assert failed and all(r is not None and "lost" in r.error for r in failed)
    finally:
        unlink(loop_thread, linked)


def _drain(tr: object) -> list:
    q = tr._inbound  # type: ignore[attr-defined]
    return [q.get_nowait() for _ in range(q.qsize())]


@needs_ucx
@pytest.mark.parametrize("interval", ["0", "1"], ids=["mid-copy", "between-frames"])
def test_cma_profile_survivor_reports_or_shares_fate(interval: str) -> None:
    """With cma (one-copy reads of the sender's memory, no error handling) UCX kills a
    receiver whose sender dies mid-copy (SIGABRT here): the documented fate-sharing. Both
    sides run as processes; the receiver must report the loss or be killed by UCX, never
    hang, and never deliver a corrupt frame. A sender that dies between frames (paced a
    second apart) leaves nothing to read: the receiver survives and reports the loss, both
    as a link-lost notice passed on toward the head and as its inbound link lost."""
    receiver = spawn_peer("ucx:cma", "", "report")
    sender = spawn_peer("ucx:cma", receiver.address, "source", "--nbytes", str(16 << 20), "--interval", interval)
    try:
        lines = []
        while sum(ln.startswith("FRAME ") for ln in lines) < 2:   # UCX may log on stdout too
            lines.append(receiver.proc.stdout.readline())
        sender.kill()
        try:   # not communicate(): closing its stdin would stop the receiver before it reports
            receiver.proc.wait(timeout=REPORT_S + 10)
        except subprocess.TimeoutExpired:
            receiver.kill()
            raise AssertionError("the receiver hung after its sender died") from None
        lines += receiver.proc.stdout.read().splitlines()
        frames = [ln.split() for ln in lines if ln.startswith("FRAME ")]
        assert frames[0] == ["FRAME", "0", "ok"] and all(f[2] == "ok" for f in frames), lines
        assert [int(f[1]) for f in frames] == list(range(len(frames)))
        assert not any(ln.startswith("RESULT ") for ln in lines), lines
        rc = receiver.proc.returncode
        reported = any(ln.startswith("LOST ") for ln in lines)
        if interval != "0" or rc == 0:   # it survived: it must have said so both ways
            assert rc == 0 and reported, (rc, lines)
            assert sum(ln.startswith("NOTICE ") for ln in lines) == 1, lines
        else:
            assert rc in (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS) or reported, (rc, lines)
    finally:
        sender.kill()
        receiver.kill()


@needs_ucx
@own_process
def test_a_restarted_neighbour_links_again(loop_thread: LoopThread) -> None:
    """Re-wiring to the same live peer keeps the link; after that peer dies, a new process
    in its place links both ways again and frames flow (the gateway's re-wire after a restart)."""
    linked = link(loop_thread, "ucx", "echo")
    tr = linked.transport
    first = tr._out.link_id  # type: ignore[attr-defined]
    loop_thread.run(linked.host.link(linked.peer.address))
    assert tr._out.link_id == first  # type: ignore[attr-defined]
    linked.peer.kill()
    replacement = spawn_peer("ucx", linked.host.address, "echo")   # links to us: a new upstream
    try:
        async def scenario() -> bool:
            deadline = time.monotonic() + REPORT_S
            while not tr.inbound_lost and time.monotonic() < deadline:  # the old link's loss is noticed...
                await asyncio.sleep(0.05)
            await linked.host.link(replacement.address)
            assert tr._out.link_id != first  # type: ignore[attr-defined]
            await tr.send(step_frame(5, 1 << 20))
            back = await asyncio.wait_for(tr.recv(), 30)
            if back.result is not None and back.result.link_lost:   # the old link's loss, for the head
                back = await asyncio.wait_for(tr.recv(), 30)
            return frame_ok(back) and back.step.step_id == 5 and not tr.inbound_lost   # ...and forgotten

        assert loop_thread.run(scenario(), timeout=60)
    finally:
        replacement.stop()
        loop_thread.run(linked.host.stop())


@own_process
@pytest.mark.parametrize("name", transport_params(["ucx", "ucx:shm"]))
def test_closing_a_link_to_a_stalled_then_dead_peer_never_blocks(name: str, loop_thread: LoopThread) -> None:
    """ucxx closes an endpoint without error handling by spinning until a flush completes,
    which a stalled peer never lets happen (the loop spun until the peer was resumed, and for
    good once it was killed): a link closed with a send outstanding must return at once."""
    linked = link(loop_thread, name, "sink")
    tr = linked.transport
    pid = linked.peer.proc.pid
    try:
        async def scenario() -> tuple[float, float]:
            await tr.send(step_frame(1, 16 << 20))
            os.kill(pid, signal.SIGSTOP)
            pending = asyncio.ensure_future(tr.send(step_frame(2, 16 << 20)))
            await asyncio.sleep(0.5)
            start = time.monotonic()
            tr._close_outbound()   # what a re-wire or shutdown does
            closed = time.monotonic() - start
            with pytest.raises(StageUnavailable, match="closed"):
                await asyncio.wait_for(pending, 5)
            linked.peer.kill()      # the stalled peer dies: nothing may be left waiting on it
            start = time.monotonic()
            await asyncio.sleep(0.2)
            return closed, time.monotonic() - start

        closed, slept = loop_thread.run(scenario(), timeout=30)
        assert closed < 0.5, f"closing the link blocked the loop for {closed:.1f}s"
        assert slept < 1.0, f"the loop was blocked for {slept:.1f}s after the peer died"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        unlink(loop_thread, linked)
