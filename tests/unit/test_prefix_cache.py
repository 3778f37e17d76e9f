"""Automatic prefix caching on the head: chained block hashes, the block manager's
reference counts and LRU reuse, and the block tables the scheduler sends when a prompt
shares a cached prefix."""

from __future__ import annotations

from stagekit.engine.block_manager import BlockManager
from stagekit.engine.prefix_cache import block_hashes
from stagekit.engine.scheduler import Scheduler
from stagekit.engine.sequence import Sequence
from stagekit.types.sampling_params import SamplingParams
from stagekit.types.step import StepResult


def test_hashes_are_chained_over_full_blocks() -> None:
    a = list(range(100, 150))  # 3 full blocks + 2 tokens
    b = a[:32] + [7] * 18
    c = [5] + a[1:]
    assert len(block_hashes(a)) == 3
    assert block_hashes(a)[:2] == block_hashes(b)[:2] and block_hashes(a)[2] != block_hashes(b)[2]
    assert not set(block_hashes(a)) & set(block_hashes(c))  # a change in block 0 changes every later hash
    assert block_hashes(a) == block_hashes(list(a))


def test_cached_blocks_are_shared_and_reclaimed_least_recently_used_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    a = bm.allocate(2)
    bm.register(a[0], 101)
    bm.register(a[1], 102)
    bm.release(a)                                  # unreferenced, still cached
    assert bm.num_free == 4 and bm.num_cached == 2
    assert bm.match([101, 102, 103]) == a          # the longest cached prefix
    assert bm.cost(a, 1) == 3                      # the 2 cached blocks leave the free count too
    bm.take(a[:1])
    assert bm.refs[a[0]] == 1 and bm.num_free == 3
    other = bm.allocate(3)                         # 2 clean blocks, then the LRU cached one (a[1])
    assert a[1] in other and bm.match([101, 102]) == a[:1] and bm.num_cached == 1
    bm.register(other[0], 101)                     # a duplicate name keeps the first block
    assert bm.match([101]) == a[:1]
    bm.forget_hashes()
    assert bm.match([101]) == [] and bm.refs[a[0]] == 1


def _seq(i: int, prompt: list[int]) -> Sequence:
    return Sequence(i, f"r{i}", prompt, SamplingParams(max_tokens=2))


def _run(sch: Scheduler):
    h = sch.schedule()
    ids = [s.seq_id for s in h.seqs if s.sample]
    sch.postprocess(h, StepResult(h.step_id, ids, [9] * len(ids), [0.0] * len(ids)))
    return h


def test_a_shared_prefix_reuses_the_same_blocks() -> None:
    sch = Scheduler(num_blocks=100, max_model_len=1000, eos_token_ids=[0])
    prompt = list(range(1, 41))  # 2 full blocks + 8
    sch.add(_seq(1, prompt))
    first = _run(sch).seqs[0]
    assert len(first.new_blocks) == 3
    sch.add(_seq(2, prompt[:32] + [77, 78]))
    h = sch.schedule()
    new = next(s for s in h.seqs if s.seq_id == 2)
    assert (new.num_computed, new.num_new) == (32, 2)
    assert new.new_blocks[:2] == first.new_blocks[:2] and new.new_blocks[2] != first.new_blocks[2]
    assert sch.blocks.query_tokens == 40 + 34 and sch.blocks.hit_tokens == 32


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    sch = Scheduler(num_blocks=100, max_model_len=1000, eos_token_ids=[0])
    prompt = list(range(1, 33))  # exactly 2 blocks
    sch.add(_seq(1, prompt))
    _run(sch)
    sch.add(_seq(2, prompt))
    h = sch.schedule()
    new = next(s for s in h.seqs if s.seq_id == 2)
    assert (new.num_computed, new.num_new) == (16, 16)  # block 1 recomputed for the last position


def test_prefix_survives_its_request_until_the_pool_needs_the_blocks() -> None:
    sch = Scheduler(num_blocks=4, max_model_len=1000, eos_token_ids=[0])
    prompt = list(range(1, 34))  # 2 full blocks + 1
    sch.add(_seq(1, prompt))
    while sch.has_work():
        _run(sch)
    assert sch.blocks.num_used == 0 and sch.blocks.num_cached == 2
    sch.add(_seq(2, list(range(500, 549))))  # 4 blocks with its tokens: takes the cached ones too
    _run(sch)
    assert sch.blocks.match(block_hashes(prompt)) == []
    sch.add(_seq(3, prompt))
    while sch.has_work():
        _run(sch)
    assert sch.blocks.hit_tokens == 0
