"""Routing policies and the prefix index, on plain candidates (no gateway, no stages)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.routing import LeastLoadedRouter, PrefixIndex, PrefixRouter, RoundRobinRouter, make_router


@dataclass
class Cand:
    index: int
    load: int = 0
    outstanding_tokens: int = 0


def picks(router, candidates, prompt=(), times=4) -> list[int]:  # noqa: ANN001
    return [router.pick(candidates, list(prompt)).index for _ in range(times)]


def test_round_robin_alternates() -> None:
    assert picks(RoundRobinRouter(), [Cand(0), Cand(1)]) == [0, 1, 0, 1]


def test_least_loaded_prefers_fewer_requests_then_tokens_and_rotates_ties() -> None:
    router = LeastLoadedRouter()
    assert picks(router, [Cand(0, load=3), Cand(1, load=1)]) == [1, 1, 1, 1]
    assert picks(router, [Cand(0, 1, 500), Cand(1, 1, 20)]) == [1, 1, 1, 1]
    assert sorted(picks(router, [Cand(0), Cand(1)])) == [0, 0, 1, 1]  # equal: take turns


def test_prefix_index_matches_whole_leading_blocks() -> None:
    index = PrefixIndex(block_size=4)
    prompt = list(range(10))
    hashes = index.block_hashes(prompt)
    assert len(hashes) == 2  # the partial third block is not indexed
    index.insert(0, hashes)
    assert index.matched_tokens(0, hashes) == 8
    assert index.matched_tokens(1, hashes) == 0
    assert index.matched_tokens(0, index.block_hashes([0, 1, 2, 3, 9, 9, 9, 9])) == 4
    # Same block content after a different first block is a different chain: no match.
    assert index.matched_tokens(0, index.block_hashes([9, 9, 9, 9, 4, 5, 6, 7])) == 0
    index.forget(0)
    assert index.matched_tokens(0, hashes) == 0


def test_prefix_index_is_bounded_lru() -> None:
    index = PrefixIndex(block_size=1, max_blocks=3)
    index.insert(0, index.block_hashes([1, 2, 3]))
    index.insert(0, index.block_hashes([7]))
    assert index.size(0) == 3
    assert index.matched_tokens(0, index.block_hashes([1])) == 0  # the oldest block went first
    assert index.matched_tokens(0, index.block_hashes([7])) == 1


def _route(router: PrefixRouter, candidates: list[Cand], prompt: list[int]) -> int:
    choice = router.pick(candidates, prompt)
    router.index.insert(choice.index, router.index.block_hashes(prompt))  # what the pool does
    return choice.index


def test_prefix_router_keeps_shared_prefixes_together() -> None:
    router = PrefixRouter(PrefixIndex(block_size=4))
    candidates = [Cand(0), Cand(1)]
    system = list(range(100, 140))
    first = _route(router, candidates, system + [1, 2])
    assert [_route(router, candidates, system + [i, i]) for i in range(5)] == [first] * 5
    other = _route(router, candidates, list(range(500, 540)))
    assert other != first  # a new prefix goes where fewer prefixes live


def test_prefix_router_gives_way_to_load() -> None:
    router = PrefixRouter(PrefixIndex(block_size=4), balance_abs=2)
    prompt = list(range(40))
    home = _route(router, [Cand(0), Cand(1)], prompt)
    busy = [Cand(0), Cand(1)]
    busy[home].load = 2
    assert _route(router, busy, prompt) == home  # within the imbalance allowance
    busy[home].load = 5
    assert _route(router, busy, prompt) == 1 - home  # too busy: load wins


def test_prefix_router_ignores_short_matches() -> None:
    router = PrefixRouter(PrefixIndex(block_size=4), cache_threshold=0.5)
    _route(router, [Cand(0), Cand(1)], [1, 2, 3, 4])
    # 4 of 12 tokens matched (< 50%): no affinity, the least loaded replica wins.
    assert router.pick([Cand(0, load=1), Cand(1)], [1, 2, 3, 4] + list(range(8))).index == 1


def test_make_router() -> None:
    index = PrefixIndex()
    assert make_router("prefix", index).index is index  # type: ignore[attr-defined]
    assert make_router("least_loaded", index).policy == "least_loaded"
    with pytest.raises(ValueError):
        make_router("random", index)
