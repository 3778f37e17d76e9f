"""Many frames in flight at once (sent concurrently, steps of all sizes interleaved with
results) come back complete and in the order they were sent."""

from __future__ import annotations

import asyncio

import torch

from stagekit.testing.transport_peer import frame_ok, step_frame
from stagekit.types.step import Frame, StepResult
from tests.transport.conftest import Linked, LoopThread

SIZES = [0, 100, 4096, 64 << 10, 1 << 20, 3 << 20]


def test_concurrent_interleaved_frames_keep_their_order(echo: Linked, loop_thread: LoopThread) -> None:
    frames: list[Frame] = []
    for i in range(48):
        if i % 5 == 4:
            frames.append(Frame(result=StepResult(i, [i], [i * 7], [-float(i)])))
        else:
            frames.append(step_frame(i, SIZES[i % len(SIZES)]))

    async def go() -> list[Frame]:
        tr = echo.transport
        # every send starts at once: the micro-batches of a head in flight together
        await asyncio.gather(*(tr.send(f) for f in frames))
        return [await asyncio.wait_for(tr.recv(), 60) for _ in frames]

    back = loop_thread.run(go(), timeout=180)
    ids = [(f.step or f.result).step_id for f in back]
    assert ids == list(range(48))
    for sent, got in zip(frames, back, strict=True):
        if sent.result is not None:
            assert got.result == sent.result
        else:
            assert frame_ok(got) and got.tensors[0].numel() == sent.tensors[0].numel()
            assert torch.equal(got.tensors[0], sent.tensors[0])
