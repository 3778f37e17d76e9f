"""Frames survive a round trip through a real peer process bit for bit, on every
transport: every dtype, odd and zero-size shapes, non-contiguous inputs, headers of every
kind (results, large headers that overflow the UCX envelope)."""

from __future__ import annotations

import asyncio

import torch

from stagekit.types.sampling_params import SamplingParams
from stagekit.types.step import Frame, NewSeq, SeqSlice, StepHeader, StepResult
from tests.transport.conftest import Linked, LoopThread

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def round_trip(loop_thread: LoopThread, linked: Linked, frames: list[Frame]) -> list[Frame]:
    async def go() -> list[Frame]:
        out = []
        for f in frames:
            await linked.transport.send(f)
            out.append(await asyncio.wait_for(linked.transport.recv(), 30))
        return out

    return loop_thread.run(go(), timeout=120)


def assert_same_tensors(sent: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    assert len(sent) == len(got)
    for a, b in zip(sent, got, strict=True):
        assert b.dtype == a.dtype and tuple(b.shape) == tuple(a.shape)
        assert b.is_contiguous()
        assert torch.equal(a.cpu(), b.cpu())


def _step(step_id: int, tensors: list[torch.Tensor], num_seqs: int = 2) -> Frame:
    seqs = [SeqSlice(i, 3 * i, 1 + i % 3, i % 2 == 0) for i in range(num_seqs)]
    return Frame(step=StepHeader(step_id, seqs), tensors=tensors)


def test_every_dtype_small_and_large(echo: Linked, loop_thread: LoopThread) -> None:
    gen = torch.Generator().manual_seed(0)
    frames = []
    for i, dt in enumerate(DTYPES):
        small = _random((3, 5, 7), dt, gen)              # travels inside the UCX envelope
        large = _random((129, 1031), dt, gen)            # its own message (rendezvous above 8 KiB)
        frames.append(_step(i, [small, large]))
    back = round_trip(loop_thread, echo, frames)
    for sent, got in zip(frames, back, strict=True):
        assert got.step is not None and got.step.step_id == sent.step.step_id
        assert got.step.seqs == sent.step.seqs
        assert_same_tensors(sent.tensors, got.tensors)


def test_odd_and_zero_size_shapes(echo: Linked, loop_thread: LoopThread) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(), (1,), (0,), (0, 4096), (7, 0, 3), (1, 1, 1, 1, 1), (3, 1), ((1 << 20) + 3,)]
    frames = [_step(i, [_random(s, torch.float16, gen), _random(s, torch.int8, gen)]) for i, s in enumerate(shapes)]
    frames.append(_step(100, []))                                         # a step without tensors
    frames.append(_step(101, [torch.empty(0), torch.empty(0, 2)]))        # only empty tensors
    back = round_trip(loop_thread, echo, frames)
    for sent, got in zip(frames, back, strict=True):
        assert got.step.step_id == sent.step.step_id
        assert_same_tensors(sent.tensors, got.tensors)


def test_non_contiguous_inputs_arrive_as_their_values(echo: Linked, loop_thread: LoopThread) -> None:
    base = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    big = torch.randn(600, 900, dtype=torch.bfloat16)
    views = [base.T, base[::2, 1::3], base[:, 5], torch.ones(1, 5).expand(4, 5), big.T, big[:, ::7]]
    assert not any(v.is_contiguous() for v in views)
    (got,) = round_trip(loop_thread, echo, [_step(7, views)])
    assert_same_tensors(views, got.tensors)


def test_results_and_large_headers(echo: Linked, loop_thread: LoopThread) -> None:
    result = StepResult(11, [1, 2, 3], [10, 20, 30], [-0.5, -1.25, -2.0],
                        top_logprobs=[[(10, -0.5), (11, -0.75)], [], [(30, -2.0)]])
    failed = StepResult(12, [], [], [], error="something broke upstream")
    params = SamplingParams(temperature=0.5, top_p=0.75, top_k=40, max_tokens=99, stop_token_ids=(2, 5), seed=3)
    # about 60 KiB of header: more than the UCX envelope's 16 KiB, so it travels on its own
    many = Frame(step=StepHeader(13, [SeqSlice(i, i, 1, True) for i in range(3000)], freed_seq_ids=list(range(500)),
                                 new_seqs=[NewSeq(i, params) for i in range(200)]),
                 tensors=[torch.randn(3000, 8)])
    back = round_trip(loop_thread, echo, [Frame(result=result), Frame(result=failed), many])
    assert back[0].result == result and back[0].step is None and back[0].tensors == []
    assert back[1].result == failed
    got = back[2].step
    assert got.seqs == many.step.seqs and got.freed_seq_ids == many.step.freed_seq_ids
    assert got.new_seqs == many.step.new_seqs
    assert_same_tensors(many.tensors, back[2].tensors)
