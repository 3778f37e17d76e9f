"""CUDA tensors over the UCX data plane (skipped without CUDA or ucxx): sent from device
memory and received into device memory by a real peer process, bit for bit."""

from __future__ import annotations

import asyncio

import pytest
import torch

from stagekit.transport.ucx.runtime import ucx_importable
from stagekit.types.step import Frame, SeqSlice, StepHeader
from tests.transport.conftest import LoopThread, link, shared_loop, unlink

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not ucx_importable(), reason="needs CUDA and ucxx")]


@pytest.fixture(scope="module")
def loop() -> LoopThread:
    return shared_loop()


@pytest.mark.parametrize("name", ["ucx", "ucx:tcp"])
def test_cuda_tensors_round_trip_in_device_memory(name: str, loop: LoopThread) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(1024, 4096, device="cuda", generator=gen)                     # 16 MiB fp32
    tensors = [big, big.to(torch.bfloat16).T, torch.randn(32, 4096, device="cuda", generator=gen).half(),
               torch.arange(10, device="cuda"), torch.ones(3, 3, device="cuda", dtype=torch.bool),
               torch.empty(0, 8, device="cuda"), torch.randn(5, 7)]                  # the last on the host
    frame = Frame(step=StepHeader(1, [SeqSlice(1, 0, 1, True)]), tensors=tensors)
    linked = link(loop, name, "echo")
    try:
        async def go() -> Frame:
            await linked.transport.send(frame)
            return await asyncio.wait_for(linked.transport.recv(), 60)

        back = loop.run(go(), timeout=120)
    finally:
        unlink(loop, linked)
    assert len(back.tensors) == len(tensors)
    for sent, got in zip(tensors, back.tensors, strict=True):
        assert got.device.type == sent.device.type and got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got.cpu(), sent.cpu())
