"""Prefix cache bookkeeping on the head: chained block hashes, LRU index, and the commands
the scheduler sends to the stages."""

from __future__ import annotations

from stagekit.engine.prefix_cache import BLOCK_SIZE, PrefixIndex, block_hashes
from stagekit.engine.sampling_params import SamplingParams
from stagekit.engine.scheduler import Scheduler
from stagekit.engine.sequence import Sequence
from stagekit.engine.step import StepResult


def test_hashes_are_chained_over_full_blocks() -> None:
    a = list(range(100, 150))  # 3 full blocks + 2 tokens
    b = a[:32] + [7] * 18
    c = [5] + a[1:]
    assert len(block_hashes(a)) == 3
    assert block_hashes(a)[:2] == block_hashes(b)[:2] and block_hashes(a)[2] != block_hashes(b)[2]
    assert not set(block_hashes(a)) & set(block_hashes(c))  # a change in block 0 changes every later hash
    assert block_hashes(a) == block_hashes(list(a))


def test_index_matches_leading_blocks_and_evicts_lru() -> None:
    idx = PrefixIndex(capacity_blocks=3)
    assert idx.insert(1) == [] and idx.insert(2) == [] and idx.insert(3) == []
    assert idx.match([1, 2, 9], num_prompt_tokens=48) == 2
    assert idx.insert(2) is None  # already cached
    assert idx.insert(4) == [3]  # 3 is least recently used (1 and 2 were just matched)
    assert idx.match([3], 16) == 0
    assert idx.query_tokens == 64 and idx.hit_tokens == 2 * BLOCK_SIZE


def _seq(i: int, prompt: list[int]) -> Sequence:
    return Sequence(i, f"r{i}", prompt, SamplingParams(max_tokens=2))


def _run_prefill(sch: Scheduler):
    h = sch.schedule()
    ids = [s.seq_id for s in h.seqs if s.sample]
    sch.postprocess(h, StepResult(h.step_id, ids, [9] * len(ids), [0.0] * len(ids)))
    return h


def test_scheduler_saves_then_loads_a_shared_prefix() -> None:
    sch = Scheduler(kv_capacity_tokens=10_000, max_model_len=1000, eos_token_ids=[0])
    sch.reset_prefix_cache(capacity_blocks=100)
    prompt = list(range(1, 41))  # 2 full blocks + 8
    sch.add(_seq(1, prompt))
    first = _run_prefill(sch)  # prefill done: both blocks go into the cache
    assert first.prefix.reset and not first.prefix.load  # the first step carries the reset
    sch.add(_seq(2, prompt[:32] + [77, 78]))
    h = sch.schedule()
    hashes = block_hashes(prompt)
    assert not h.prefix.reset
    assert h.prefix.save == [(1, 0, hashes[0]), (1, 1, hashes[1])]
    assert h.prefix.load == [(2, hashes[:2])]
    new = next(s for s in h.seqs if s.seq_id == 2)
    assert (new.num_computed, new.num_new) == (32, 2)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    sch = Scheduler(kv_capacity_tokens=10_000, max_model_len=1000, eos_token_ids=[0])
    sch.reset_prefix_cache(capacity_blocks=100)
    prompt = list(range(1, 33))  # exactly 2 blocks
    sch.add(_seq(1, prompt))
    _run_prefill(sch)
    sch.add(_seq(2, prompt))
    h = sch.schedule()
    new = next(s for s in h.seqs if s.seq_id == 2)
    assert (new.num_computed, new.num_new) == (16, 16)  # block 1 recomputed for the last position


def test_eviction_before_a_save_reaches_the_stages_drops_the_save() -> None:
    sch = Scheduler(kv_capacity_tokens=10_000, max_model_len=1000, eos_token_ids=[0])
    sch.reset_prefix_cache(capacity_blocks=1)
    sch.add(_seq(1, list(range(1, 34))))  # 2 blocks, capacity 1
    _run_prefill(sch)
    h = sch.schedule()
    assert h.prefix.evict == []  # block 0 was never saved, so nothing to evict on the stages
    assert [x[1] for x in h.prefix.save] == [1]
