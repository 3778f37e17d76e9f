"""Transports of different UCX profiles in one process share its UCX context, but each
link follows its own transport's settings (error handling, timeouts): a `ucx:tcp` link
made after a `ucx:shm` transport started the context still uses error handling, and the
other way round (links used to read the settings of whichever transport came first)."""

from __future__ import annotations

import asyncio

from stagekit.testing.transport_peer import frame_ok, step_frame
from tests.transport.conftest import LoopThread, link, needs_ucx, unlink


@needs_ucx
def test_each_link_follows_its_own_profile(loop_thread: LoopThread) -> None:
    for name, error_handling in [("ucx:shm", False), ("ucx:tcp", True), ("ucx:shm", False)]:
        linked = link(loop_thread, name, "echo", timeout_s=7.0)
        tr = linked.transport
        try:
            out = tr._out  # type: ignore[attr-defined]
            assert out.error_handling is error_handling, name
            assert out.settings.send_timeout_s == 7.0
            assert tr._inbox.link.settings.part_timeout_s == 7.0  # type: ignore[attr-defined]

            back = loop_thread.run(_round_trip(tr))
            assert frame_ok(back) and back.step.step_id == 3
        finally:
            unlink(loop_thread, linked)


async def _round_trip(tr: object) -> object:
    await tr.send(step_frame(3, 1 << 20))  # type: ignore[attr-defined]
    return await asyncio.wait_for(tr.recv(), 30)  # type: ignore[attr-defined]
