"""The head's scheduler on its own: admission by KV reservation, chunked prefill within
the token budget, micro-batches for a pipeline, finish reasons, abort frees KV."""

from __future__ import annotations

import pytest

from stagekit.engine.sampling_params import SamplingParams
from stagekit.engine.scheduler import Scheduler
from stagekit.engine.sequence import Sequence
from stagekit.engine.step import StepResult


def _seq(i: int, prompt_len: int, max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(i, f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def _result(header, token: int = 7) -> StepResult:
    ids = [s.seq_id for s in header.seqs if s.sample]
    return StepResult(header.step_id, ids, [token] * len(ids), [0.0] * len(ids))


def test_admission_waits_for_kv_reservation() -> None:
    sch = Scheduler(kv_capacity_tokens=20, max_model_len=100, eos_token_ids=[0])
    sch.add(_seq(1, 10, max_tokens=5))  # reserves 15
    sch.add(_seq(2, 4, max_tokens=4))   # 8 more would exceed 20
    h = sch.schedule()
    assert [s.seq_id for s in h.seqs] == [1]
    assert len(sch.waiting) == 1
    sch.postprocess(h, _result(h))
    seq1 = sch.running[1]
    sch.finish(seq1)  # frees its reservation
    h2 = sch.schedule()
    assert [s.seq_id for s in h2.seqs] == [2] and h2.freed_seq_ids == [1]


def test_chunked_prefill_splits_a_long_prompt_and_samples_at_the_end() -> None:
    sch = Scheduler(kv_capacity_tokens=1000, max_model_len=1000, eos_token_ids=[0], max_num_batched_tokens=16)
    sch.add(_seq(1, 40))
    chunks = []
    while True:
        h = sch.schedule()
        (s,) = h.seqs
        chunks.append((s.num_computed, s.num_new, s.sample))
        out = sch.postprocess(h, _result(h))
        if s.sample:
            assert len(out.emitted) == 1
            break
        assert not out.emitted
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    h = sch.schedule()
    assert [(s.num_computed, s.num_new, s.sample) for s in h.seqs] == [(40, 1, True)]


def test_decodes_come_before_new_prompts_in_the_budget() -> None:
    sch = Scheduler(kv_capacity_tokens=1000, max_model_len=1000, eos_token_ids=[0], max_num_batched_tokens=10)
    sch.add(_seq(1, 5))
    h = sch.schedule()
    sch.postprocess(h, _result(h))
    sch.add(_seq(2, 30))
    h = sch.schedule()
    assert [(s.seq_id, s.num_new, s.sample) for s in h.seqs] == [(1, 1, True), (2, 9, False)]


def test_microbatches_take_disjoint_sequences() -> None:
    sch = Scheduler(kv_capacity_tokens=1000, max_model_len=1000, eos_token_ids=[0])
    for i in range(4):
        sch.add(_seq(i, 3))
    a = sch.schedule(num_microbatches=2)
    b = sch.schedule(num_microbatches=2)
    assert sch.schedule(num_microbatches=2) is None  # everything is in flight
    ids_a, ids_b = {s.seq_id for s in a.seqs}, {s.seq_id for s in b.seqs}
    assert len(ids_a) == 2 and len(ids_b) == 2 and not ids_a & ids_b
    sch.postprocess(a, _result(a))
    c = sch.schedule(num_microbatches=2)
    assert {s.seq_id for s in c.seqs} == ids_a


@pytest.mark.parametrize(
    "params, tokens, reason",
    [
        (dict(max_tokens=3), [5, 5, 5], "length"),
        (dict(max_tokens=9), [5, 0], "stop"),  # EOS
        (dict(max_tokens=9, ignore_eos=True), [5, 0, 5], None),
        (dict(max_tokens=9, stop_token_ids=(8,)), [5, 8], "stop"),
        (dict(max_tokens=9, min_tokens=3), [0, 0, 0], "stop"),  # EOS counts only from the 3rd token
        (dict(max_tokens=9, min_tokens=3), [0, 0], None),
    ],
)
def test_finish_reasons(params, tokens, reason) -> None:
    sch = Scheduler(kv_capacity_tokens=1000, max_model_len=1000, eos_token_ids=[0])
    sch.add(Sequence(1, "r", [1, 2], SamplingParams(**params)))
    got = None
    for tok in tokens:
        h = sch.schedule()
        out = sch.postprocess(h, _result(h, tok))
        if out.finished:
            got = out.finished[0].reason
            break
    assert got == reason


def test_abort_frees_kv_on_the_next_step() -> None:
    sch = Scheduler(kv_capacity_tokens=100, max_model_len=1000, eos_token_ids=[0])
    sch.add(_seq(1, 10))
    h = sch.schedule()
    assert sch.abort("r1") is not None
    assert sch.reserved_tokens == 0
    sch.postprocess(h, _result(h))  # the in-flight step comes back: ignored
    h2 = sch.schedule()
    assert h2.seqs == [] and h2.freed_seq_ids == [1]
    assert not sch.has_work()
