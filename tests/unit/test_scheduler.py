"""The head's scheduler on its own: admission by free KV blocks, block tables sent with
the steps, preemption (recompute) when blocks run out, chunked prefill within the token
budget, micro-batches for a pipeline, finish reasons, abort frees KV."""

from __future__ import annotations

import pytest

from stagekit.engine.scheduler import Scheduler
from stagekit.engine.sequence import Sequence, SequenceStatus
from stagekit.types.sampling_params import SamplingParams
from stagekit.types.step import StepResult


def _seq(i: int, prompt_len: int, max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(i, f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def _result(header, token: int = 7) -> StepResult:
    ids = [s.seq_id for s in header.seqs if s.sample]
    return StepResult(header.step_id, ids, [token] * len(ids), [0.0] * len(ids))


def _sched(num_blocks: int = 1000, block_size: int = 16, **kw) -> Scheduler:
    kw.setdefault("max_model_len", 1000)
    return Scheduler(num_blocks, eos_token_ids=[0], block_size=block_size, prefix_caching=False, **kw)


def test_admission_waits_for_free_blocks() -> None:
    sch = _sched(num_blocks=3, block_size=4, max_model_len=100)
    sch.add(_seq(1, 10, max_tokens=5))  # 3 blocks for its prompt
    sch.add(_seq(2, 4, max_tokens=4))   # one more block: none left
    h = sch.schedule()
    assert [(s.seq_id, s.new_blocks) for s in h.seqs] == [(1, (0, 1, 2))]
    assert len(sch.waiting) == 1 and sch.blocks.num_free == 0
    sch.postprocess(h, _result(h))
    sch.finish(sch.running[1])  # its blocks come back
    h2 = sch.schedule()
    assert [s.seq_id for s in h2.seqs] == [2] and h2.freed_seq_ids == [1]
    assert len(h2.seqs[0].new_blocks) == 1


def test_decode_sends_a_new_block_only_at_a_block_boundary() -> None:
    sch = _sched(num_blocks=10, block_size=4)
    sch.add(_seq(1, 3, max_tokens=9))
    sent = []
    for _ in range(6):
        h = sch.schedule()
        (s,) = h.seqs
        sent.append((s.num_computed, s.num_new, s.new_blocks))
        sch.postprocess(h, _result(h))
    assert sent == [(0, 3, (0,)), (3, 1, ()), (4, 1, (1,)), (5, 1, ()), (6, 1, ()), (7, 1, ())]


def test_a_full_pool_preempts_the_latest_sequence_which_is_recomputed_later() -> None:
    sch = _sched(num_blocks=4, block_size=4)
    for i in range(1, 5):
        sch.add(_seq(i, 4, max_tokens=4))  # one full block each; 2 blocks by their end
    h = sch.schedule()
    assert sch.blocks.num_free == 0
    sch.postprocess(h, _result(h, 5))  # every sequence now needs a second block to decode
    h = sch.schedule()
    # seq 1 takes seq 4's block, seq 2 takes seq 3's: the two latest are preempted
    assert [s.seq_id for s in h.seqs] == [1, 2]
    assert sorted(h.preempted_seq_ids) == [3, 4] and sch.num_preemptions == 2
    assert [s.seq_id for s in sch.waiting] == [3, 4]  # back at the front, in their order
    sch.postprocess(h, _result(h, 6))
    for _ in range(2):  # seq 1 and 2 run to their end (4 tokens) in their 2 blocks
        h = sch.schedule()
        assert not h.preempted_seq_ids
        out = sch.postprocess(h, _result(h, 6))
    assert {f.seq.seq_id for f in out.finished} == {1, 2}
    h = sch.schedule()
    again = {s.seq_id: s for s in h.seqs}
    # recomputed from scratch: the prompt and the one token each already had; not re-announced
    assert again[3].num_computed == 0 and again[3].num_new == 5 and again[3].sample
    assert h.new_seqs == [] and sorted(h.freed_seq_ids) == [1, 2]
    out = sch.postprocess(h, _result(h, 7))
    assert [t for _, t, _, _ in out.emitted] == [7, 7]
    assert sch.running[3].output_ids == [5, 7]


def test_a_sequence_in_flight_is_never_preempted() -> None:
    sch = _sched(num_blocks=2, block_size=4)
    sch.add(_seq(1, 4, max_tokens=8))
    sch.add(_seq(2, 4, max_tokens=8))
    a = sch.schedule(num_microbatches=2)  # seq 1
    b = sch.schedule(num_microbatches=2)  # seq 2, now in flight
    sch.postprocess(a, _result(a))
    assert sch.schedule(num_microbatches=2) is None  # seq 1 needs a block, seq 2 holds it in flight
    sch.postprocess(b, _result(b))
    h = sch.schedule(num_microbatches=2)
    assert [s.seq_id for s in h.seqs] == [1] and h.preempted_seq_ids == [2]


def test_chunked_prefill_splits_a_long_prompt_and_samples_at_the_end() -> None:
    sch = _sched(max_num_batched_tokens=16)
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
    sch = _sched(max_num_batched_tokens=10)
    sch.add(_seq(1, 5))
    h = sch.schedule()
    sch.postprocess(h, _result(h))
    sch.add(_seq(2, 30))
    h = sch.schedule()
    assert [(s.seq_id, s.num_new, s.sample) for s in h.seqs] == [(1, 1, True), (2, 9, False)]


def test_microbatches_take_disjoint_sequences() -> None:
    sch = _sched()
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
    sch = _sched()
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
    sch = _sched(num_blocks=10)
    sch.add(_seq(1, 10))
    h = sch.schedule()
    assert sch.abort("r1") is not None
    assert sch.blocks.num_free == 10
    sch.postprocess(h, _result(h))  # the in-flight step comes back: ignored
    h2 = sch.schedule()
    assert h2.seqs == [] and h2.freed_seq_ids == [1]
    assert not sch.has_work()


def _waiting_for_remote_kv(sch: Scheduler, seq: Sequence) -> None:
    assert sch.admit_for_remote_kv(seq)
    assert seq.status == SequenceStatus.WAITING_FOR_REMOTE_KV


def test_a_sequence_waiting_for_remote_kv_holds_its_blocks_and_is_never_scheduled() -> None:
    sch = _sched(num_blocks=10, block_size=4)
    waiter = _seq(1, 10, max_tokens=2)          # 10 + 2 tokens: 3 blocks
    _waiting_for_remote_kv(sch, waiter)
    assert len(waiter.block_ids) == 3 and sch.blocks.num_free == 7
    assert sch.schedule() is None                # nothing else to run: no step at all
    sch.add(_seq(2, 4))
    for _ in range(3):                           # others run around it; it stays out
        h = sch.schedule()
        assert 1 not in {s.seq_id for s in h.seqs} and all(n.seq_id != 1 for n in h.new_seqs)
        sch.postprocess(h, _result(h))
    assert sch.remote == {1: waiter} and len(waiter.block_ids) == 3 and waiter.num_computed == 0


def test_remote_kv_arrival_makes_the_next_step_prefill_only_the_rest() -> None:
    sch = _sched(num_blocks=10, block_size=4)
    waiter = _seq(1, 10, max_tokens=2)
    _waiting_for_remote_kv(sch, waiter)
    blocks = list(waiter.block_ids)
    sch.remote_kv_arrived(1, 8)                  # two blocks' worth came from the other replica
    h = sch.schedule()
    (s,) = h.seqs
    assert (s.seq_id, s.num_computed, s.num_new, s.sample) == (1, 8, 2, True)
    assert s.new_blocks == tuple(blocks) and [n.seq_id for n in h.new_seqs] == [1]   # its table, announced once
    out = sch.postprocess(h, _result(h, 5))
    assert [t for _, t, _, _ in out.emitted] == [5]
    with pytest.raises(ValueError):
        sch.remote_kv_arrived(1, 8)              # not waiting any more


def test_remote_kv_failure_falls_back_to_a_full_prefill() -> None:
    sch = _sched(num_blocks=10, block_size=4)
    sch.add(_seq(2, 4))
    waiter = _seq(1, 10, max_tokens=2)
    _waiting_for_remote_kv(sch, waiter)
    sch.remote_kv_failed(1)
    assert waiter.status == SequenceStatus.WAITING and waiter.block_ids == [] and sch.blocks.num_free == 10
    assert [s.seq_id for s in sch.waiting] == [1, 2]   # first in line: it was admitted before
    h = sch.schedule()
    assert [(s.seq_id, s.num_computed, s.num_new) for s in h.seqs] == [(1, 0, 10), (2, 0, 4)]
    with pytest.raises(ValueError):
        sch.remote_kv_failed(1)


def test_abort_while_waiting_for_remote_kv_frees_its_blocks() -> None:
    sch = _sched(num_blocks=3, block_size=4)
    _waiting_for_remote_kv(sch, _seq(1, 10, max_tokens=2))   # every block
    assert not sch.admit_for_remote_kv(_seq(3, 4))           # no room for another
    sch.add(_seq(2, 4))
    assert sch.schedule() is None                            # seq 2 cannot be admitted
    assert sch.abort("r1") is not None and sch.blocks.num_free == 3 and not sch.remote
    h = sch.schedule()
    assert [s.seq_id for s in h.seqs] == [2] and h.freed_seq_ids == []   # never announced: nothing to free
